"""The resilient client's decisions, without sockets: backoff, event cursor, close handling,
the server's retry hints (goodbye frames, HTTP 503 refusals)."""

from __future__ import annotations

import random
import statistics

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Response

from chat.client import (
    FATAL_REASONS,
    HINT_CAP_MS,
    OVERLOAD_MIN_ATTEMPT,
    Backoff,
    EventCursor,
    Frame,
    ResilientClient,
    goodbye_delay,
    goodbye_hint,
    is_fatal_close,
    reconnect_delay,
    refusal_hint,
)
from chat.errors import CloseCode
from tests.timing import Fixed

# ------------------------------------------------------------------ Backoff


def test_backoff_ceiling_doubles_from_base_up_to_cap() -> None:
    b = Backoff(base=0.5, cap=20)
    assert [b.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 20, 20]
    assert b.ceiling(10_000) == 20  # no overflow for absurd attempt counts


def test_backoff_defaults() -> None:
    b = Backoff()
    assert (b.base, b.cap) == (0.5, 20.0)


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_backoff_rejects_nonsense(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base=base, cap=cap)


def test_backoff_delays_stay_within_zero_and_the_ceiling() -> None:
    b = Backoff(base=0.1, cap=3, rng=random.Random(1))
    for attempt in range(12):
        for _ in range(200):
            assert 0 <= b.delay(attempt) <= b.ceiling(attempt)


def test_backoff_is_full_jitter_uniform_over_the_whole_range() -> None:
    # Full jitter: uniform on [0, ceiling], not ceiling/2 + jitter ("equal jitter").
    b = Backoff(base=1, cap=8, rng=random.Random(42))
    draws = [b.delay(3) for _ in range(20_000)]  # ceiling 8
    assert min(draws) < 0.05
    assert max(draws) > 7.95
    assert statistics.fmean(draws) == pytest.approx(4, abs=0.1)
    below_1 = sum(d < 1 for d in draws) / len(draws)
    assert below_1 == pytest.approx(1 / 8, abs=0.01)  # the low end is as likely as any
    # Deciles are evenly spaced.
    deciles = statistics.quantiles(draws, n=10)
    for i, q in enumerate(deciles, start=1):
        assert q == pytest.approx(0.8 * i, abs=0.15)


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = Backoff(rng=random.Random(7))
    b = Backoff(rng=random.Random(7))
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]


def test_backoff_next_counts_attempts_and_reset_starts_over() -> None:
    b = Backoff(base=1, cap=1000, rng=random.Random(3))
    for n in range(6):
        assert b.attempts == n
        assert 0 <= b.next() <= 2**n
    assert b.attempts == 6
    b.reset()
    assert b.attempts == 0
    assert b.next() <= 1


def test_backoff_grows_on_average() -> None:
    b = Backoff(base=0.5, cap=20, rng=random.Random(5))
    means = [statistics.fmean(b.delay(n) for _ in range(2000)) for n in range(7)]
    assert means == sorted(means)
    assert means[0] == pytest.approx(0.25, rel=0.1)
    assert means[6] == pytest.approx(10, rel=0.1)  # capped at 20: mean 10


def test_backoff_floor_draws_from_a_higher_attempt() -> None:
    b = Backoff(base=1, cap=1000, rng=random.Random(9))
    draws = []
    for _ in range(500):
        b.reset()
        draws.append(b.next(floor=3))
        assert b.attempts == 4
    assert max(draws) > 7  # ceiling 8, not 1


# ------------------------------------------------------------------ EventCursor


def ev(seq: int | None, kind: str = "message.posted") -> dict[str, object]:
    return {"type": kind, "seq": seq}


def test_cursor_accepts_increasing_seqs_with_gaps() -> None:
    c = EventCursor(10)
    assert [c.accept(ev(s)) for s in (11, 15, 40)] == [True, True, True]
    assert c.position == 40
    assert c.duplicates == 0


def test_cursor_refuses_duplicates_and_stale_events() -> None:
    c = EventCursor(10)
    seqs = [9, 10, 11, 11, 12, 11, 13, 5, 13, 14]
    accepted = [s for s in seqs if c.accept(ev(s))]
    assert accepted == [11, 12, 13, 14]
    assert c.duplicates == 6
    assert c.position == 14


def test_cursor_output_is_strictly_increasing_and_never_repeats() -> None:
    rng = random.Random(11)
    c = EventCursor(0)
    stream = [rng.randint(1, 200) for _ in range(2000)]
    out = [s for s in stream if c.accept(ev(s))]
    assert out == sorted(set(out))
    assert len(out) == len(set(out))


def test_cursor_lets_ephemeral_events_through_without_moving() -> None:
    c = EventCursor(50)
    assert c.accept(ev(None, "typing"))
    assert c.accept(ev(None, "presence"))
    assert c.accept({"type": "typing"})  # no seq key at all
    assert c.position == 50
    assert c.duplicates == 0


def test_cursor_advance_never_goes_back_and_reset_goes_anywhere() -> None:
    c = EventCursor(20)
    c.advance(30)
    assert c.position == 30
    c.advance(25)
    assert c.position == 30
    assert not c.accept(ev(28))  # covered by the resumed position
    c.reset(5)  # a reload from an older position: the stream starts over
    assert c.position == 5
    assert c.accept(ev(6))


def test_replay_then_live_overlap_is_delivered_once() -> None:
    # Resume from 100; the server replays 101..105 and live delivery overlaps from 104.
    c = EventCursor(100)
    replay = [101, 102, 103, 104, 105]
    live = [104, 105, 106, 107]
    out = [s for s in replay + live if c.accept(ev(s))]
    assert out == [101, 102, 103, 104, 105, 106, 107]


# ------------------------------------------------------------------ close decisions

ALL_CODES = [int(c) for c in CloseCode] + [1006, None]


@pytest.mark.parametrize("reason", sorted(FATAL_REASONS))
def test_auth_failures_on_1008_are_fatal(reason: str) -> None:
    assert is_fatal_close(1008, reason)
    assert reconnect_delay(1008, reason, None, Backoff(), random.Random()) is None
    # ... even when a goodbye hint came before.
    assert reconnect_delay(1008, reason, 1000, Backoff(), random.Random()) is None


def test_fatal_reasons_are_exactly_the_token_and_account_errors() -> None:
    assert {"invalid_auth", "token_expired", "token_revoked", "account_inactive"} == FATAL_REASONS


@pytest.mark.parametrize("reason", ["auth_timeout", "rate_limited", "", None, "internal_error"])
def test_other_1008_reasons_back_off(reason: str | None) -> None:
    assert not is_fatal_close(1008, reason)
    b = Backoff(base=1, cap=1, rng=random.Random(1))
    delay = reconnect_delay(1008, reason, None, b, random.Random())
    assert delay is not None
    assert 0 <= delay <= 1
    assert b.attempts == 1


@pytest.mark.parametrize("code", ALL_CODES)
def test_fatal_reasons_only_count_with_1008(code: int | None) -> None:
    if code == 1008:
        return
    assert not is_fatal_close(code, "token_revoked")
    assert reconnect_delay(code, "token_revoked", None, Backoff(), random.Random()) is not None


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 4000, 4001, None])
def test_ordinary_closes_and_failures_back_off(code: int | None) -> None:
    b = Backoff(base=1, cap=100, rng=random.Random(2))
    delays = [reconnect_delay(code, "x", None, b, random.Random()) for _ in range(5)]
    assert b.attempts == 5
    for n, d in enumerate(delays):
        assert d is not None
        assert 0 <= d <= 2**n


def test_overloaded_close_backs_off_at_least_from_the_overload_attempt() -> None:
    b = Backoff(base=1, cap=100, rng=random.Random(4))
    draws = []
    for _ in range(300):
        b.reset()  # as after a connection that authenticated, then got 1013
        d = reconnect_delay(1013, "sync_overflow", None, b, random.Random())
        assert d is not None
        draws.append(d)
        assert b.attempts == OVERLOAD_MIN_ATTEMPT + 1
    assert max(draws) > 2 ** (OVERLOAD_MIN_ATTEMPT - 1)


def test_goodbye_waits_its_hint_plus_up_to_as_much_jitter() -> None:
    rng = random.Random(8)
    draws = [goodbye_delay(1000, rng) for _ in range(5000)]
    assert min(draws) >= 1.0
    assert max(draws) <= 2.0
    assert min(draws) < 1.01
    assert max(draws) > 1.99
    assert goodbye_delay(0, rng) == 0


def test_goodbye_hint_wins_over_backoff_for_the_close_that_follows() -> None:
    b = Backoff(base=50, cap=50, rng=random.Random(1))
    for code in (1012, 1006, 1001, None):
        d = reconnect_delay(code, "service_restart", 500, b, random.Random(3))
        assert d is not None
        assert 0.5 <= d <= 1.0
    assert b.attempts == 0  # the backoff was not consulted


# ------------------------------------------------------------------ overload hints (issue 7)

OVERLOADED = b'{"type":"goodbye","reason":"overloaded","reconnect_after_ms":1500}'


def refused(status: int, body: bytes = b"", **headers: str) -> Response:
    """An HTTP response refusing the upgrade, as websockets hands it over in InvalidStatus."""
    h = Headers()
    for name, value in headers.items():
        h[name.replace("_", "-")] = value
    return Response(status, "Refused", h, body)


def after_refusal(response: Response, backoff: Backoff, rng: random.Random) -> float | None:
    """What the client decides after ``response`` refused an attempt (as ``_connection``
    reports it: no close code, and the response's hint)."""
    return reconnect_delay(
        None, f"HTTP {response.status_code}", refusal_hint(response), backoff, rng
    )


def test_503_with_a_goodbye_body_waits_the_bodys_hint_and_leaves_the_backoff_alone() -> None:
    # The body's hint (1500 ms, spread by the server) wins over the rounded-up header (2 s).
    response = refused(503, OVERLOADED, Retry_After="2", Content_Type="application/json")
    assert refusal_hint(response) == 1500
    b = Backoff(base=50, cap=50, rng=random.Random(1))
    b.attempts = 4  # earlier failures: a hint neither grows nor resets the count
    for jitter, expected in [(0.0, 1.5), (0.5, 2.25), (1.0, 3.0)]:
        assert after_refusal(response, b, Fixed(jitter)) == pytest.approx(expected)
    assert b.attempts == 4


def test_503_with_only_retry_after_waits_that_many_seconds_plus_jitter() -> None:
    response = refused(503, b"", Retry_After="3")
    assert refusal_hint(response) == 3000
    b = Backoff(base=50, cap=50, rng=random.Random(1))
    rng = random.Random(6)
    draws = [after_refusal(response, b, rng) for _ in range(500)]
    assert all(d is not None and 3.0 <= d <= 6.0 for d in draws)
    assert b.attempts == 0


def test_the_draining_503_hints_its_retry_after() -> None:
    # The node's drain refusal: a text body, not a goodbye; its Retry-After still counts.
    assert refusal_hint(refused(503, b"draining\n", Retry_After="1")) == 1000


@pytest.mark.parametrize(
    "response",
    [
        refused(503),
        refused(503, b"draining\n"),
        refused(503, b"\xff\xfe not json"),
        refused(503, b'{"type":"error","reconnect_after_ms":500}'),  # not a goodbye
        refused(503, b'{"type":"goodbye","reason":"overloaded"}'),  # no hint in it
        refused(503, b'{"type":"goodbye","reason":"overloaded","reconnect_after_ms":0}'),
        refused(503, b'{"type":"goodbye","reason":"overloaded","reconnect_after_ms":"5"}'),
        refused(503, b"[1, 2]"),
        refused(503, Retry_After="0"),  # 0 would retry at once, in a loop
        refused(503, Retry_After="-1"),
        refused(503, Retry_After="1.5"),
        refused(503, Retry_After="Wed, 21 Oct 2026 07:28:00 GMT"),  # dates are not read
        refused(429, Retry_After="3"),  # only the 503 is the contract's refusal
        refused(403, OVERLOADED),
    ],
    ids=lambda r: f"{r.status_code}-{bytes(r.body)[:12]!r}-{r.headers.get_all('Retry-After')}",
)
def test_a_refusal_without_a_usable_hint_falls_back_to_the_backoff(response: Response) -> None:
    assert refusal_hint(response) is None
    b = Backoff(base=1, cap=100, rng=random.Random(2))
    delays = [after_refusal(response, b, random.Random()) for _ in range(5)]
    assert b.attempts == 5  # each one grew the backoff
    for n, d in enumerate(delays):
        assert d is not None
        assert 0 <= d <= 2**n


def test_an_absurd_hint_is_capped() -> None:
    assert refusal_hint(refused(503, Retry_After="99999999999999999999")) == HINT_CAP_MS
    assert goodbye_delay(10**12, Fixed(1.0)) == pytest.approx(2 * HINT_CAP_MS / 1000)


def test_goodbye_hint_is_the_last_goodbye_among_the_frames() -> None:
    hello: Frame = {"type": "hello", "heartbeat_interval_ms": 30000}
    overloaded: Frame = {"type": "goodbye", "reason": "overloaded", "reconnect_after_ms": 700}
    assert goodbye_hint([]) is None
    assert goodbye_hint([hello, {"type": "typing"}]) is None
    assert goodbye_hint([hello, overloaded]) == 700
    assert goodbye_hint([overloaded]) == 700  # sent instead of hello
    later: Frame = {"type": "goodbye", "reason": "service_restart", "reconnect_after_ms": 50}
    assert goodbye_hint([hello, overloaded, later]) == 50
    assert goodbye_hint([{"type": "goodbye", "reason": "too_slow"}]) == 0  # no hint: at once


def test_goodbye_overloaded_then_1013_waits_the_hint_not_the_overload_backoff() -> None:
    # The after-upgrade refusal: goodbye (overloaded) answering auth, then close 1013. The
    # hint wins over the 1013 rule (backoff from OVERLOAD_MIN_ATTEMPT), and the backoff is
    # not consulted.
    frames: list[Frame] = [
        {"type": "hello"},
        {"type": "goodbye", "reason": "overloaded", "reconnect_after_ms": 400},
    ]
    b = Backoff(base=50, cap=50, rng=random.Random(1))
    for jitter in (0.0, 0.5, 1.0):
        d = reconnect_delay(1013, "overloaded", goodbye_hint(frames), b, Fixed(jitter))
        assert d == pytest.approx(0.4 * (1 + jitter))
    assert b.attempts == 0
    # Without the goodbye, the same close backs off from the overload attempt on.
    d = reconnect_delay(1013, "overloaded", goodbye_hint(frames[:1]), b, random.Random(1))
    assert d is not None
    assert b.attempts == OVERLOAD_MIN_ATTEMPT + 1


def test_hints_never_grow_the_backoff_however_many() -> None:
    # A storm: one failure, then twenty hinted refusals of each kind; the backoff still
    # stands where the one failure left it.
    b = Backoff(base=0.5, cap=20, rng=random.Random(3))
    rng = random.Random(4)
    assert reconnect_delay(None, "refused", None, b, rng) is not None
    for _ in range(20):
        assert after_refusal(refused(503, OVERLOADED), b, rng) is not None
        assert after_refusal(refused(503, Retry_After="1"), b, rng) is not None
        assert reconnect_delay(1013, "overloaded", 250, b, rng) is not None
    assert b.attempts == 1


# ------------------------------------------------------------------ construction


def test_resilient_client_takes_one_url_or_many() -> None:
    assert ResilientClient("ws://a/", "t").urls == ["ws://a/"]
    assert ResilientClient(("ws://a/", "ws://b/"), "t").urls == ["ws://a/", "ws://b/"]
    with pytest.raises(ValueError):
        ResilientClient([], "t")


def test_resilient_client_shares_its_rng_with_a_default_backoff() -> None:
    rng = random.Random(1)
    rc = ResilientClient("ws://a/", "t", rng=rng)
    assert rc.backoff.rng is rng
    own = Backoff(rng=random.Random(2))
    assert ResilientClient("ws://a/", "t", backoff=own, rng=rng).backoff is own


async def test_closing_an_unstarted_client_ends_its_event_stream() -> None:
    rc = ResilientClient("ws://a/", "t")
    await rc.close()
    assert [e async for e in rc.events()] == []
