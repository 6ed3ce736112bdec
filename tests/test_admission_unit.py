"""Admission control (:mod:`chat.admission`), with an injected clock and randomness."""

from __future__ import annotations

from chat.admission import MAX_HINT_MS, MIN_HINT_MS, WINDOW_S, Admission


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(
    clock: Clock, *, max_connecting: int = 10_000, rate: float = 1_000.0, rng: float = 0.5
) -> Admission:
    return Admission(
        max_connecting=max_connecting,
        budget_s=2.0,
        initial_rate=rate,
        min_limit=8,
        clock=clock,
        rng=lambda: rng,
    )


def test_admits_up_to_what_the_node_finishes_within_the_budget() -> None:
    a = admission(Clock(), rate=100.0)  # 100/s for 2 s
    assert [a.admit() for _ in range(200)] == [None] * 200
    hint = a.admit()
    assert hint is not None and hint >= MIN_HINT_MS
    assert (a.pending, a.admitted, a.refused) == (200, 200, 1)


def test_the_hard_cap_wins_over_the_rate() -> None:
    a = admission(Clock(), max_connecting=5, rate=1_000.0)
    assert [a.admit() is None for _ in range(6)] == [True] * 5 + [False]


def test_a_finished_connect_frees_its_place() -> None:
    a = admission(Clock(), max_connecting=2)
    assert a.admit() is None and a.admit() is None
    assert a.admit() is not None
    a.finished(served=False)
    assert a.admit() is None
    assert a.pending == 2


def test_hints_are_about_the_drain_time_and_spread() -> None:
    clock = Clock()
    low = admission(clock, max_connecting=1_000, rate=500.0, rng=0.0)
    high = admission(clock, max_connecting=1_000, rate=500.0, rng=0.999)
    for a in (low, high):
        while a.admit() is None:
            pass
    # 1,000 waiting at 500/s: 2 s to drain; the hint is that times 0.5 .. 1.
    assert low.hint_ms() == 1_000
    assert 1_990 <= high.hint_ms() <= 2_000


def test_hints_are_bounded() -> None:
    clock = Clock()
    fast = admission(clock, max_connecting=1, rate=1e9)
    fast.admit()
    assert fast.hint_ms() == MIN_HINT_MS
    slow = admission(clock, max_connecting=10_000, rate=1.0)
    for _ in range(9):
        slow.admit()
    assert slow.admit() is not None
    assert slow.hint_ms() <= MAX_HINT_MS


def test_the_rate_is_learned_while_the_node_is_behind() -> None:
    clock = Clock()
    a = admission(clock, rate=1_000.0)
    for _ in range(400):
        assert a.admit() is None
    # Half a second in which only 50 finished while 350 still wait: the node does 100/s.
    for _ in range(50):
        a.finished(served=True)
    clock.now += WINDOW_S
    a.admit()
    assert a.rate == 0.5 * 1_000 + 0.5 * 100
    assert a.limit() == int(a.rate * 2)


def test_an_idle_node_does_not_shrink_its_limit() -> None:
    """Few clients, each served at once: the node was never behind, so what finished says
    nothing about what it can do."""
    clock = Clock()
    a = admission(clock, rate=1_000.0)
    for _ in range(20):
        assert a.admit() is None
        a.finished(served=True)
        clock.now += WINDOW_S / 2
    assert a.rate == 1_000.0


def test_failed_connects_do_not_count_as_capacity() -> None:
    clock = Clock()
    a = admission(clock, rate=1_000.0)
    for _ in range(400):
        a.admit()
    for _ in range(300):
        a.finished(served=False)  # refused or abandoned: not work the node finished
    clock.now += WINDOW_S
    a.admit()
    assert a.rate == 1_000.0
    assert a.pending == 101
