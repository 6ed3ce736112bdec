"""Admission control (:mod:`chat.admission`), with an injected clock and randomness."""

from __future__ import annotations

from chat.admission import CLIENT_STRETCH, MAX_HINT_MS, MIN_HINT_MS, WINDOW_S, Admission


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, *, max_connecting: int = 10_000, rate: float = 1_000.0) -> Admission:
    return Admission(
        max_connecting=max_connecting,
        budget_s=2.0,
        initial_rate=rate,
        min_limit=8,
        clock=clock,
        cpu_clock=clock,  # a node busy all the time
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


def test_hints_are_appointments_after_the_queue_spaced_at_the_service_rate() -> None:
    clock = Clock()
    a = admission(clock, max_connecting=1_000, rate=500.0)
    assert all(a.admit() is None for _ in range(1_000))
    first = a.admit()
    hints = [a.admit() for _ in range(299)]
    # 1,000 in progress at 500/s: room once half has drained, after 1 s.
    assert first == 1_000 + 2  # the first slot: 1/(500 x 1.5) s later, rounded up
    assert hints == sorted(hints) and len(set(hints)) == len(hints), "distinct, in order"
    assert hints[-1] is not None and first is not None
    # 300 appointments span what the node serves in 300 / (500 x 1.5) s.
    assert abs((hints[-1] - first) - 299 / (500 * CLIENT_STRETCH) * 1000) <= 2


def test_appointments_start_again_from_now_once_passed() -> None:
    clock = Clock()
    a = admission(clock, max_connecting=2, rate=1_000.0)
    a.admit(), a.admit()
    assert a.admit() == MIN_HINT_MS
    clock.now += 60.0
    assert a.admit() == MIN_HINT_MS


def test_a_storm_is_given_about_one_appointment_per_client() -> None:
    """Clients come back at their appointment (plus up to as much again): refused clients
    must find room mostly at the first return, not be refused over and over."""
    clock = Clock()
    a = admission(clock, max_connecting=100, rate=200.0)
    returns: list[tuple[float, int]] = [(clock.now, i) for i in range(2_000)]
    served = refusals = 0
    live: list[float] = []  # when each admitted connect finishes (200/s, one at a time)
    busy_until = clock.now
    for _ in range(20_000):
        if not returns:
            break
        returns.sort()
        at, client = returns.pop(0)
        clock.now = max(clock.now, at)
        while live and live[0] <= clock.now:
            live.pop(0)
            a.finished(served=True)
        hint = a.admit()
        if hint is None:
            busy_until = max(busy_until, clock.now) + 1 / 200
            live.append(busy_until)
            served += 1
        else:
            refusals += 1
            returns.append((clock.now + hint / 1000 * (1 + (client % 10) / 10), client))
    assert served == 2_000
    assert refusals <= 1.1 * 2_000  # about one each (1,948 when written)


def test_hints_are_bounded() -> None:
    clock = Clock()
    fast = admission(clock, max_connecting=1, rate=1e9)
    fast.admit()
    assert fast.hint_ms() == MIN_HINT_MS
    slow = admission(clock, max_connecting=10_000, rate=1.0)  # counted as 50/s
    assert all(slow.admit() is None for _ in range(100))
    hints = [slow.admit() for _ in range(3_000)]
    assert max(h for h in hints if h is not None) == MAX_HINT_MS


def cpu_admission(clock: Clock, cpu: Clock, rate: float = 1_000.0) -> Admission:
    return Admission(
        max_connecting=10_000,
        budget_s=2.0,
        initial_rate=rate,
        min_limit=8,
        clock=clock,
        cpu_clock=cpu,
    )


def test_the_rate_is_connects_per_cpu_second() -> None:
    clock, cpu = Clock(), Clock()
    a = cpu_admission(clock, cpu, rate=1_000.0)
    for _ in range(400):
        assert a.admit() is None
    # Half a second in which 50 finished using 0.5 s of CPU: 100 a CPU second.
    for _ in range(50):
        a.finished(served=True)
    clock.now += WINDOW_S
    cpu.now += 0.5
    a.admit()
    assert a.rate == 0.5 * 1_000 + 0.5 * 100
    assert a.limit() == int(a.rate * 2)


def test_a_node_that_is_not_busy_learns_it_can_do_more() -> None:
    """The ratchet: 100 connects a second arrive (the clients it hinted come at the rate it
    believes), each finished at once with 10% of the CPU: the node can do ten times that,
    and the estimate must rise, not stay where the arrivals put it."""
    clock, cpu = Clock(), Clock()
    a = cpu_admission(clock, cpu, rate=100.0)
    for _ in range(10):
        for _ in range(50):
            assert a.admit() is None
            a.finished(served=True)
        clock.now += WINDOW_S
        cpu.now += WINDOW_S / 10
    a.admit()
    assert a.rate > 900


def test_a_quiet_node_keeps_its_estimate() -> None:
    """A few connects in a window say nothing about what the node can do."""
    clock, cpu = Clock(), Clock()
    a = cpu_admission(clock, cpu, rate=1_000.0)
    for _ in range(20):
        assert a.admit() is None
        a.finished(served=True)
        clock.now += WINDOW_S / 2
        cpu.now += WINDOW_S / 2  # busy with something else
    assert a.rate == 1_000.0


def test_failed_connects_do_not_count_as_capacity() -> None:
    clock, cpu = Clock(), Clock()
    a = cpu_admission(clock, cpu, rate=1_000.0)
    for _ in range(400):
        a.admit()
    for _ in range(300):
        a.finished(served=False)  # refused or abandoned: not work the node finished
    clock.now += WINDOW_S
    cpu.now += WINDOW_S
    a.admit()
    assert a.rate == 1_000.0
    assert a.pending == 101


def test_a_connect_that_waited_too_long_is_sent_away_even_with_room() -> None:
    """It waited in the kernel's listen queue, where the node could not count it."""
    clock = Clock()
    a = Admission(max_connecting=100, budget_s=2.0, max_wait_s=5.0, clock=clock, cpu_clock=clock)
    assert a.admit(waited_s=4.9) is None
    hint = a.admit(waited_s=5.0)
    assert hint is not None and hint >= MIN_HINT_MS
    assert (a.pending, a.refused, a.stale) == (1, 1, 1)
