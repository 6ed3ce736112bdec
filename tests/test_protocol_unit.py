"""Unit tests of the sans-I/O connection state machine :class:`chat.protocol.ClientProtocol`.

No sockets: frames go in as text, verdicts come out. Time is passed explicitly (``now``), so
rate limiting is tested with an injected clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chat import wire
from chat.errors import ChatError, CloseCode, ErrorCode, ProtocolViolation
from chat.protocol import (
    Authenticate,
    ClientProtocol,
    Close,
    Dispatch,
    Send,
    State,
    TokenBucket,
)

T0 = 1000.0


def frame(type: str, id: str = "1", **fields: Any) -> str:
    return json.dumps({"type": type, "id": id, **fields})


def error_of(data: bytes | None) -> dict[str, Any]:
    assert data is not None
    obj: dict[str, Any] = json.loads(data)
    assert obj["type"] == "error"
    return obj


def open_session(**kwargs: Any) -> ClientProtocol:
    s = ClientProtocol(now=T0, **kwargs)
    assert isinstance(s.receive(frame("auth", "a", token="t"), T0), Authenticate)
    s.authenticated()
    return s


# --------------------------------------------------------------------------- states


def test_starts_awaiting_auth() -> None:
    assert ClientProtocol(now=T0).state is State.AWAITING_AUTH


def test_auth_before_authentication_is_an_authenticate_verdict() -> None:
    s = ClientProtocol(now=T0)
    verdict = s.receive(frame("auth", "a1", token="tok"), T0)
    assert isinstance(verdict, Authenticate)
    assert isinstance(verdict.request, wire.Auth)
    assert verdict.request.token == "tok"
    assert verdict.request.id == "a1"
    assert s.state is State.AWAITING_AUTH  # only authenticated() opens it


def test_login_before_authentication_is_an_authenticate_verdict() -> None:
    s = ClientProtocol(now=T0)
    verdict = s.receive(frame("login", "l1", workspace="acme", handle="mia", password="pw"), T0)
    assert isinstance(verdict, Authenticate)
    assert isinstance(verdict.request, wire.Login)
    assert verdict.request.handle == "mia"


def test_request_before_auth_closes_1008_with_not_authenticated() -> None:
    s = ClientProtocol(now=T0)
    verdict = s.receive(frame("ping", "p1"), T0)
    assert isinstance(verdict, Close)
    assert verdict.code == CloseCode.POLICY_VIOLATION
    assert int(verdict.code) == 1008
    assert verdict.reason == "not_authenticated"
    err = error_of(verdict.frame)
    assert err["code"] == "not_authenticated"
    assert err["reply_to"] == "p1"
    assert s.state is State.CLOSED


def test_garbage_before_auth_closes_the_connection() -> None:
    s = ClientProtocol(now=T0)
    verdict = s.receive("{not json", T0)
    assert isinstance(verdict, Close)
    assert verdict.code == CloseCode.POLICY_VIOLATION
    assert error_of(verdict.frame)["code"] == "invalid_json"
    assert s.state is State.CLOSED


def test_after_authenticated_requests_are_dispatched() -> None:
    s = open_session()
    assert s.state is State.OPEN
    verdict = s.receive(frame("ping", "p1"), T0)
    assert isinstance(verdict, Dispatch)
    assert isinstance(verdict.request, wire.Ping)
    assert verdict.request.id == "p1"
    assert "p1" in s.inflight
    verdict = s.receive(frame("messages.history", "h1", channel_id=3), T0)
    assert isinstance(verdict, Dispatch)
    assert isinstance(verdict.request, wire.MessagesHistory)
    assert verdict.request.channel_id == 3


@pytest.mark.parametrize(
    "data",
    [
        frame("auth", "x", token="t"),
        frame("login", "x", workspace="w", handle="h", password="p"),
    ],
)
def test_auth_again_is_already_authenticated_and_keeps_the_connection(data: str) -> None:
    s = open_session()
    verdict = s.receive(data, T0)
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "already_authenticated"
    assert err["reply_to"] == "x"
    assert s.state is State.OPEN
    assert isinstance(s.receive(frame("ping", "after"), T0), Dispatch)


def test_closed_session_answers_close() -> None:
    s = ClientProtocol(now=T0)
    s.receive(frame("ping"), T0)  # not authenticated: closes
    assert s.state is State.CLOSED
    verdict = s.receive(frame("auth", token="t"), T0)
    assert isinstance(verdict, Close)
    assert verdict.code == CloseCode.NORMAL_CLOSURE


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(
    ("data", "code", "reply_to", "names"),
    [
        ("{bad json", "invalid_json", None, None),
        ('{"type": "nope", "id": "u1"}', "unknown_type", "u1", None),
        ('{"id": "m1"}', "invalid_frame", "m1", None),
        ('{"type": "ping", "id": "e1", "extra": 1}', "invalid_frame", "e1", "extra"),
        ('{"type": "ping", "id": 5}', "invalid_frame", None, "id"),
        (json.dumps({"type": "ping", "id": "x" * 65}), "invalid_frame", None, "id"),
        (
            '{"type": "messages.post", "id": "w1", "channel_id": "x",'
            ' "client_msg_id": "c", "text": "t"}',
            "invalid_frame",
            "w1",
            "channel_id",
        ),
    ],
)
def test_bad_frames_after_auth_are_errors_not_closes(
    data: str, code: str, reply_to: str | None, names: str | None
) -> None:
    s = open_session()
    verdict = s.receive(data, T0)
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == code
    assert err["reply_to"] == reply_to
    if names:
        assert names in err["message"]
    assert s.state is State.OPEN
    assert not s.inflight


@pytest.mark.parametrize("data", ["[1, 2]", "5", '"text"', "null"])
def test_json_that_is_not_an_object_is_invalid_json(data: str) -> None:
    # docs/protocol.md: invalid_json = "The frame is not valid JSON, or not a JSON object."
    s = open_session()
    verdict = s.receive(data, T0)
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "invalid_json", err
    assert err["reply_to"] is None


def test_binary_frame_is_invalid_frame() -> None:
    s = open_session()
    verdict = s.receive(b'{"type": "ping", "id": "1"}', T0)
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "invalid_frame"
    assert err["reply_to"] is None


# --------------------------------------------------------------------------- in-flight ids


def test_duplicate_in_flight_id_is_refused_until_answered() -> None:
    s = open_session()
    assert isinstance(s.receive(frame("ping", "same"), T0), Dispatch)
    verdict = s.receive(frame("ping", "same"), T0)
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "duplicate_request_id"
    assert err["reply_to"] == "same"
    assert "same" in s.inflight  # the first one is still in flight
    reply = json.loads(s.reply("same", wire.Pong(server_time=1)))
    assert reply == {"type": "reply", "reply_to": "same", "data": {"server_time": 1}}
    assert "same" not in s.inflight
    assert isinstance(s.receive(frame("ping", "same"), T0), Dispatch)


def test_fail_frees_the_id() -> None:
    s = open_session()
    assert isinstance(s.receive(frame("ping", "f"), T0), Dispatch)
    s.fail("f", ChatError(ErrorCode.FORBIDDEN))
    assert isinstance(s.receive(frame("ping", "f"), T0), Dispatch)


# --------------------------------------------------------------------------- fail()


def test_fail_chat_error_is_an_error_frame_with_its_code() -> None:
    s = open_session()
    s.receive(frame("ping", "r"), T0)
    verdict = s.fail("r", ChatError(ErrorCode.NOT_IN_CHANNEL, "not here", retry_after_ms=7))
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err == {
        "type": "error",
        "reply_to": "r",
        "code": "not_in_channel",
        "message": "not here",
        "retry_after_ms": 7,
    }
    assert s.state is State.OPEN


def test_fail_chat_error_default_message_is_the_description() -> None:
    s = open_session()
    verdict = s.fail("r", ChatError(ErrorCode.FORBIDDEN))
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "forbidden"
    assert err["message"]


def test_fail_protocol_violation_closes_with_its_code() -> None:
    s = open_session()
    verdict = s.fail("r", ProtocolViolation(ErrorCode.TOKEN_REVOKED, CloseCode.POLICY_VIOLATION))
    assert isinstance(verdict, Close)
    assert verdict.code == CloseCode.POLICY_VIOLATION
    assert verdict.reason == "token_revoked"
    err = error_of(verdict.frame)
    assert err["code"] == "token_revoked"
    assert err["reply_to"] == "r"
    assert s.state is State.CLOSED


def test_fail_other_close_code() -> None:
    s = open_session()
    verdict = s.fail(None, ProtocolViolation(ErrorCode.INTERNAL_ERROR, CloseCode.TRY_AGAIN_LATER))
    assert isinstance(verdict, Close)
    assert verdict.code == 1013


def test_fail_unexpected_exception_is_internal_error_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = open_session()
    s.receive(frame("ping", "boom"), T0)
    secret = "password=hunter2 at db.internal:5432"
    verdict = s.fail("boom", RuntimeError(secret))
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "internal_error"
    assert err["reply_to"] == "boom"
    assert "hunter2" not in err["message"]
    assert "RuntimeError" not in err["message"]
    assert secret not in verdict.frame.decode()
    assert s.state is State.OPEN
    assert "boom" not in s.inflight
    # ... but the log has it, for the operator.
    assert any(r.exc_info and r.exc_info[1] is not None for r in caplog.records)


# --------------------------------------------------------------------------- rate limiting


def test_burst_allowed_then_refused_with_retry_after() -> None:
    s = open_session(requests_per_10s=6, disconnect_after=100)  # auth took one token
    for i in range(5):
        assert isinstance(s.receive(frame("ping", f"p{i}"), T0), Dispatch)
    verdict = s.receive(frame("ping", "over"), T0)
    assert isinstance(verdict, Send)
    err = error_of(verdict.frame)
    assert err["code"] == "rate_limited"
    assert err["retry_after_ms"] is not None
    # 6 per 10 s: one token every 1.667 s.
    assert 1600 <= err["retry_after_ms"] <= 1700
    assert s.state is State.OPEN


def test_refill_after_time_passes() -> None:
    s = open_session(requests_per_10s=5, disconnect_after=100)
    for i in range(4):
        assert isinstance(s.receive(frame("ping", f"p{i}"), T0), Dispatch)
    assert isinstance(s.receive(frame("ping", "x"), T0), Send)
    # One token per 2 s.
    assert isinstance(s.receive(frame("ping", "y"), T0 + 1.0), Send)
    assert isinstance(s.receive(frame("ping", "z"), T0 + 2.1), Dispatch)
    assert isinstance(s.receive(frame("ping", "w"), T0 + 2.2), Send)
    # A long pause refills to the burst size, not beyond.
    for i in range(5):
        assert isinstance(s.receive(frame("ping", f"q{i}"), T0 + 100), Dispatch)
    assert isinstance(s.receive(frame("ping", "q5"), T0 + 100), Send)


def test_retry_after_shrinks_as_time_passes() -> None:
    s = open_session(requests_per_10s=2, disconnect_after=100)
    s.receive(frame("ping", "1"), T0)
    first = error_of(s.receive(frame("ping", "2"), T0).frame)  # type: ignore[union-attr]
    later = error_of(s.receive(frame("ping", "3"), T0 + 2).frame)  # type: ignore[union-attr]
    assert first["retry_after_ms"] > later["retry_after_ms"] > 0


def test_sustained_flood_closes_1008_rate_limited() -> None:
    s = open_session(requests_per_10s=5, disconnect_after=3)
    verdicts = [s.receive(frame("ping", f"p{i}"), T0) for i in range(4)]
    assert all(isinstance(v, Dispatch) for v in verdicts)
    for i in range(3):
        v = s.receive(frame("ping", f"r{i}"), T0)
        assert isinstance(v, Send)
        assert error_of(v.frame)["code"] == "rate_limited"
    v = s.receive(frame("ping", "last"), T0)
    assert isinstance(v, Close)
    assert v.code == CloseCode.POLICY_VIOLATION
    assert v.reason == "rate_limited"
    assert s.state is State.CLOSED


def test_slow_refusals_do_not_disconnect() -> None:
    # Refusals spread out in time refill the refusal bucket: no disconnect.
    s = open_session(requests_per_10s=1, disconnect_after=2)
    now = T0
    refused = 0
    for i in range(20):
        now += 5.1  # refusal bucket refills 1 per 5 s; request bucket 1 per 10 s
        v = s.receive(frame("ping", f"x{i}"), now)
        assert not isinstance(v, Close)
        refused += isinstance(v, Send)
    assert refused >= 9
    assert s.state is State.OPEN


def test_rate_limit_applies_before_auth() -> None:
    s = ClientProtocol(now=T0, requests_per_10s=1, disconnect_after=1)
    assert isinstance(s.receive(frame("auth", "a", token="t"), T0), Authenticate)
    s.authenticated()
    assert isinstance(s.receive(frame("ping", "b"), T0), Send)
    assert isinstance(s.receive(frame("ping", "c"), T0), Close)


# --------------------------------------------------------------------------- TokenBucket


def test_token_bucket_burst_and_wait() -> None:
    b = TokenBucket(10, 10.0, now=0.0)  # 1 token per second, burst 10
    for _ in range(10):
        assert b.take(0.0) == 0.0
    assert b.take(0.0) == pytest.approx(1.0)
    assert b.take(0.5) == pytest.approx(0.5)
    assert b.take(1.0) == 0.0
    assert b.take(1.0) == pytest.approx(1.0)


def test_token_bucket_caps_at_rate() -> None:
    b = TokenBucket(3, 1.0, now=0.0)
    for _ in range(3):
        assert b.take(0.0) == 0.0
    # After a very long time it holds 3, not more.
    for _ in range(3):
        assert b.take(1e6) == 0.0
    assert b.take(1e6) > 0


def test_token_bucket_fractional_refill() -> None:
    b = TokenBucket(4, 2.0, now=0.0)  # 2 tokens per second
    for _ in range(4):
        b.take(0.0)
    assert b.take(0.25) == pytest.approx(0.25)  # holds 0.5, needs 0.5 more
    assert b.take(0.5) == 0.0
    assert b.take(0.5) == pytest.approx(0.5)


def test_token_bucket_refused_take_does_not_consume() -> None:
    b = TokenBucket(1, 1.0, now=0.0)
    assert b.take(0.0) == 0.0
    for _ in range(5):
        assert b.take(0.0) == pytest.approx(1.0)
    assert b.take(1.0) == 0.0
