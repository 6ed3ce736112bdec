"""The protocol state machine of one client session, without I/O.

A :class:`ClientProtocol` takes the text of each received frame and answers with what to do:
send an error, close with a code, authenticate, or dispatch a request. It owns the auth state,
the rate limit, in-flight request ids and the conversion of exceptions into frames and close
codes (the one place where that happens). The server feeds it and carries out its verdicts; tests
drive it directly, with no sockets. The session is not the socket: the same rules serve a
connection relayed through the edge cache.

::

    AWAITING_AUTH --auth/login ok--> OPEN --close--> CLOSED
          |  other frame, bad auth, timeout          ^
          +------------------------------------------+
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum, auto

import pydantic

from chat import wire
from chat.errors import ChatError, CloseCode, ErrorCode, ProtocolViolation
from chat.storage.base import OutcomeUnknown, Unavailable

log = logging.getLogger(__name__)


class State(Enum):
    AWAITING_AUTH = auto()
    OPEN = auto()
    CLOSED = auto()


@dataclass(frozen=True, slots=True)
class Send:
    frame: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: CloseCode
    reason: str
    frame: bytes | None = None  # an error frame to send first


@dataclass(frozen=True, slots=True)
class Authenticate:
    request: wire.FirstFrame


@dataclass(frozen=True, slots=True)
class Dispatch:
    request: wire.Request


Verdict = Send | Close | Authenticate | Dispatch


class TokenBucket:
    """``rate`` tokens per ``per`` seconds, bursting to ``rate``; time is passed in."""

    __slots__ = ("_last", "_per", "_rate", "_tokens")

    def __init__(self, rate: int, per: float, now: float) -> None:
        self._rate = float(rate)
        self._per = per
        self._tokens = float(rate)
        self._last = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else seconds until one is available."""
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate / self._per)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) * self._per / self._rate


class ClientProtocol:
    __slots__ = ("_bucket", "_refusals", "inflight", "state")

    def __init__(
        self,
        *,
        now: float,
        requests_per_10s: int = 50,
        disconnect_after: int = 20,
    ) -> None:
        self.state = State.AWAITING_AUTH
        self._bucket = TokenBucket(requests_per_10s, 10.0, now)
        self._refusals = TokenBucket(disconnect_after, 10.0, now)
        # Request ids in flight (a dict: an empty one is a quarter of an empty set's size).
        self.inflight: dict[str, None] = {}

    # ------------------------------------------------------------------ input

    def receive(self, data: str | bytes, now: float) -> Verdict:
        if self.state is State.CLOSED:
            return Close(CloseCode.NORMAL_CLOSURE, "closed")
        wait = self._bucket.take(now)
        if wait:
            if self._refusals.take(now):
                self.state = State.CLOSED
                return Close(CloseCode.POLICY_VIOLATION, ErrorCode.RATE_LIMITED.value)
            refusal = ChatError(ErrorCode.RATE_LIMITED, retry_after_ms=int(wait * 1000) + 1)
            rid = _request_id(data) if isinstance(data, str) else None
            return Send(self._error(rid, refusal))
        if isinstance(data, bytes):
            return self._refuse(
                None,
                ChatError(
                    ErrorCode.INVALID_FRAME, "binary frames are not accepted; send JSON text"
                ),
            )
        try:
            request = wire.parse_client_frame(data)
        except pydantic.ValidationError as exc:
            return self._refuse(_request_id(data), _validation_error(exc))
        if self.state is State.AWAITING_AUTH:
            if isinstance(request, wire.FIRST_FRAMES):
                return Authenticate(request)
            return self.fail(
                request.id,
                ProtocolViolation(ErrorCode.NOT_AUTHENTICATED, CloseCode.POLICY_VIOLATION),
            )
        if isinstance(request, wire.FIRST_FRAMES):
            return self._refuse(request.id, ChatError(ErrorCode.ALREADY_AUTHENTICATED))
        if request.id in self.inflight:
            return self._refuse(request.id, ChatError(ErrorCode.DUPLICATE_REQUEST_ID))
        self.inflight[request.id] = None
        return Dispatch(request)

    def _refuse(self, request_id: str | None, exc: ChatError) -> Verdict:
        if self.state is State.AWAITING_AUTH:
            # Before auth there is nothing worth keeping the connection for.
            return self.fail(
                request_id, ProtocolViolation(exc.code, CloseCode.POLICY_VIOLATION, exc.message)
            )
        return Send(self._error(request_id, exc))

    # ------------------------------------------------------------------ outcomes

    def authenticated(self) -> None:
        self.state = State.OPEN

    def reply(self, request_id: str, data: wire.Data) -> bytes:
        self.inflight.pop(request_id, None)
        return wire.dump(wire.Reply(reply_to=request_id, data=data.model_dump(mode="json")))

    def fail(self, request_id: str | None, exc: BaseException) -> Send | Close:
        """The one place where exceptions become error frames and close codes."""
        if request_id is not None:
            self.inflight.pop(request_id, None)
        if isinstance(exc, ProtocolViolation):
            self.state = State.CLOSED
            return Close(exc.close_code, exc.code.value, self._error(request_id, exc))
        if isinstance(exc, ChatError):
            return Send(self._error(request_id, exc))
        if isinstance(exc, Unavailable):
            # Nothing was done; retryable. One line, no traceback: an outage is not a bug.
            log.warning("database unavailable: %s", exc, extra={"request_id": request_id})
            refusal = ChatError(ErrorCode.UNAVAILABLE, retry_after_ms=exc.retry_after_ms)
            return Send(self._error(request_id, refusal))
        if isinstance(exc, OutcomeUnknown):
            log.warning("commit outcome unknown: %s", exc, extra={"request_id": request_id})
            return Send(self._error(request_id, ChatError(ErrorCode.OUTCOME_UNKNOWN)))
        # A bug: no details to the client (they may be security-sensitive); the traceback
        # goes to the log.
        log.error("request failed", exc_info=exc, extra={"request_id": request_id})
        return Send(self._error(request_id, ChatError(ErrorCode.INTERNAL_ERROR)))

    @staticmethod
    def _error(request_id: str | None, exc: ChatError) -> bytes:
        return wire.dump(
            wire.Error(
                reply_to=request_id,
                code=exc.code.value,
                message=exc.message,
                retry_after_ms=exc.retry_after_ms,
            )
        )


def _request_id(data: str) -> str | None:
    """The ``id`` of a frame that failed validation, when there is a usable one (read
    without recursion, whatever the frame's depth: :func:`chat.wire.frame_id`)."""
    return wire.frame_id(data)


def _validation_error(exc: pydantic.ValidationError) -> ChatError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"type": "", "loc": (), "msg": ""}
    kind = first["type"]
    if kind == "json_invalid":
        # The parser's reason (position, or the depth limit); it never quotes the input.
        ctx: dict[str, object] = errors[0].get("ctx", {}) if errors else {}
        reason = str(ctx.get("error", "")) or "invalid JSON"
        return ChatError(ErrorCode.INVALID_JSON, f"the frame is not valid JSON: {reason}")
    if kind in ("dict_type", "model_attributes_type", "model_type") and not first["loc"]:
        return ChatError(ErrorCode.INVALID_JSON, "the frame is not a JSON object")
    if kind == "union_tag_invalid":
        return ChatError(ErrorCode.UNKNOWN_TYPE, "unknown frame type")
    if kind == "union_tag_not_found":
        return ChatError(ErrorCode.INVALID_FRAME, "the frame has no `type`")
    # loc is (type, field, ...): drop the discriminator value.
    loc = ".".join(str(p) for p in first["loc"][1:]) or "frame"
    return ChatError(ErrorCode.INVALID_FRAME, f"{loc}: {first['msg']}")
