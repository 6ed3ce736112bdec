"""The connect sequence of one client session, without I/O.

From a well-formed ``auth``/``login`` to a live session that receives every event after its
snapshot exactly once, or to a defined refusal (an error reply, a close code). The driver (the
websocket server, or the edge cache relaying a session) performs each step's I/O and feeds the
outcome back; the sequence answers with what to send and what to do next::

    start ─> Identify ─identified─> Subscribe ─subscribed─> (attach to the hub) TakeSnapshot
      ─snapshot_taken─> reply ─> [CheckWindow ─window_checked─> ScanReplay ─scanned─>
      StreamReplay ─streamed─> resumed] ─> Ready ─ready─> (hub: buffered events) ─> Live

Anything can happen between two steps, and each case has one answer:

- an event commits: the hub buffers it from ``attach`` on; ``ready`` delivers those after the
  snapshot, judged by the membership the user had at each (joins and leaves included);
- the session is revoked or the user deactivated: before the snapshot, the snapshot (one
  statement with the membership) sees it and the connect is refused; after it, the revocation
  is an event after the snapshot, so the hub revokes the recipient, which the sequence sees at
  its next step;
- a step fails (a store or the bus is unavailable, or a bug): the client gets an error reply
  naming its ``auth`` and a close code, never silence; whatever was done is undone by
  :meth:`Connect.close` (only what was done: a failed connect never marks the user away).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, auto

from chat import wire
from chat.bus import Envelope
from chat.errors import ChatError, CloseCode, ErrorCode, ProtocolViolation
from chat.fanout import Hub, Recipient, receives
from chat.identity import Identity
from chat.protocol import ClientProtocol, Close, Send, State
from chat.replay import ReplayLost
from chat.storage import StorageError

# The first pass keeps what it read, up to this many payload bytes, so that a short resume
# (the common one) reads its range once; a longer one is read again, never held whole.
REPLAY_CACHE_BYTES = 1 << 20


# --------------------------------------------------------------------------- what the driver does


@dataclass(frozen=True, slots=True)
class Identify:
    """Prove who the client is (token or password): feed :meth:`Connect.identified`."""

    request: wire.FirstFrame


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Make sure this node reads the workspace's events: then :meth:`Connect.subscribed`."""

    workspace_id: int


@dataclass(frozen=True, slots=True)
class TakeSnapshot:
    """Read the session's state, the user's channels and the workspace position in one
    statement: feed :meth:`Connect.snapshot_taken`."""

    workspace_id: int
    user_id: int
    session_id: str


@dataclass(frozen=True, slots=True)
class CheckWindow:
    """Ask the replay log whether it still holds every event after ``after_seq``."""

    workspace_id: int
    after_seq: int
    up_to: int


@dataclass(frozen=True, slots=True)
class ScanReplay:
    """Read the missed range in chunks into :meth:`Connect.scan`, then :meth:`Connect.scanned`.
    (The user's membership before the range is only known once the range was seen.)"""

    workspace_id: int
    after_seq: int
    up_to: int


@dataclass(frozen=True, slots=True)
class StreamReplay:
    """Read the range again, in chunks; write :meth:`Connect.visible` of each with flow
    control; then :meth:`Connect.streamed`. When ``cached`` is not empty it is the whole
    range, kept by the scan: no second read."""

    workspace_id: int
    after_seq: int
    up_to: int
    cached: tuple[Sequence[Envelope], ...] = ()


@dataclass(frozen=True, slots=True)
class Ready:
    """The reply (and any replay) has been written: call :meth:`Connect.ready`, which hands
    the recipient what the hub buffered since the attach. A step of its own so that the
    buffered events leave after the frames before them, never ahead."""


@dataclass(frozen=True, slots=True)
class Live:
    """The session is live: count it for presence."""

    workspace_id: int
    user_id: int


Action = Identify | Subscribe | TakeSnapshot | CheckWindow | ScanReplay | StreamReplay | Ready
Effect = Send | Close | Action | Live


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the snapshot statement read: the workspace position ``as_of`` and, as of the same
    instant, the user, the user's channels and whether the session may still be used."""

    as_of: int
    channel_ids: frozenset[int]
    user: wire.User | None  # None only with a refusal
    workspace_name: str = ""
    # invalid_auth (no such session), token_revoked, token_expired, account_inactive
    refusal: ErrorCode | None = None


class Step(Enum):
    START = auto()
    IDENTIFYING = auto()
    SUBSCRIBING = auto()
    SNAPSHOT = auto()
    WINDOW = auto()
    SCANNING = auto()
    STREAMING = auto()
    READY = auto()
    LIVE = auto()
    CLOSED = auto()


class Connect:
    """One connect attempt. Methods are called in the order of the diagram; each returns the
    effects to carry out, in order, ending with the next action, ``Live`` or a ``Close``.
    Once live it keeps only what :meth:`close` needs: the driver holds it for the whole
    connection, and the request (with its token), the identity and the snapshot are freed."""

    __slots__ = (
        "_cache",
        "_cached_bytes",
        "_hub",
        "_protocol",
        "_recipient",
        "_replay",
        "_resume",
        "_snapshot",
        "_workspace_id",
        "attached",
        "identity",
        "live",
        "replayed",
        "request",
        "step",
    )

    def __init__(self, protocol: ClientProtocol, hub: Hub, recipient: Recipient) -> None:
        self._protocol = protocol
        self._hub = hub
        self._recipient = recipient
        self.step = Step.START
        self.request: wire.FirstFrame | None = None
        self.identity: Identity | None = None
        self.attached = False
        self.live = False
        self._workspace_id = 0
        self._snapshot: Snapshot | None = None
        self._resume: wire.Resume | None = None
        self._replay: BacklogFilter | None = None
        self._cache: list[Sequence[Envelope]] | None = []
        self._cached_bytes = 0
        self.replayed = 0

    # ------------------------------------------------------------------ steps

    def start(self, request: wire.FirstFrame) -> list[Effect]:
        self._expect(Step.START)
        self.request = request
        self._resume = request.resume if isinstance(request, wire.Auth) else None
        self.step = Step.IDENTIFYING
        return [Identify(request)]

    def identified(self, identity: Identity) -> list[Effect]:
        self._expect(Step.IDENTIFYING)
        self.identity = identity
        self.step = Step.SUBSCRIBING
        return [Subscribe(identity.workspace_id)]

    def subscribed(self) -> list[Effect]:
        """Attach first, snapshot second: every event that commits after the snapshot is then
        seen by the hub for this recipient."""
        self._expect(Step.SUBSCRIBING)
        identity = self._identity()
        self._workspace_id = identity.workspace_id
        self._hub.attach(self._workspace_id, self._recipient)
        self.attached = True
        self.step = Step.SNAPSHOT
        return [TakeSnapshot(identity.workspace_id, identity.user_id, identity.session_id)]

    def snapshot_taken(self, snapshot: Snapshot) -> list[Effect]:
        self._expect(Step.SNAPSHOT)
        if snapshot.refusal is not None or snapshot.user is None:
            return self._refuse(snapshot.refusal or ErrorCode.INVALID_AUTH)
        if self._recipient.revoked:
            return self._refuse(ErrorCode.TOKEN_REVOKED)
        self._snapshot = snapshot
        resume = self._resume
        if resume is None:
            return self._reply(None)
        if resume.session_id != self._identity().session_id:
            return self._reply("session_mismatch")
        if resume.seq > snapshot.as_of:
            return self._reply("future_seq")
        if resume.seq == snapshot.as_of:
            return self._reply(None)
        self.step = Step.WINDOW
        return [CheckWindow(self._workspace_id, resume.seq, snapshot.as_of)]

    def window_checked(self, holds: bool) -> list[Effect]:
        self._expect(Step.WINDOW)
        if not holds:
            return self._reply("too_old")
        resume, snapshot = self._resume, self._snapshot
        assert resume is not None and snapshot is not None
        user = self._user()
        self._replay = BacklogFilter(user.id, user.role, snapshot.channel_ids)
        self.step = Step.SCANNING
        return [ScanReplay(self._workspace_id, resume.seq, snapshot.as_of)]

    def scan(self, chunk: Sequence[Envelope]) -> None:
        """One chunk of the missed range, in order (first pass)."""
        self._expect(Step.SCANNING)
        assert self._replay is not None
        self._replay.scan(chunk)
        if self._cache is not None:
            self._cached_bytes += sum(len(env.payload) for env in chunk)
            if self._cached_bytes <= REPLAY_CACHE_BYTES:
                self._cache.append(chunk)
            else:
                self._cache = None

    def scanned(self) -> list[Effect]:
        self._expect(Step.SCANNING)
        if self._recipient.revoked:
            return self._refuse(ErrorCode.TOKEN_REVOKED)
        resume, snapshot = self._resume, self._snapshot
        assert resume is not None and snapshot is not None and self._replay is not None
        self._replay.start()
        reply = self._reply(None, final=False)
        self.step = Step.STREAMING
        cached = tuple(self._cache or ())
        self._cache = None
        return [*reply, StreamReplay(self._workspace_id, resume.seq, snapshot.as_of, cached)]

    def visible(self, chunk: Sequence[Envelope]) -> list[bytes]:
        """The payloads of one chunk (second pass) that the user may see."""
        self._expect(Step.STREAMING)
        assert self._replay is not None
        payloads = self._replay.visible(chunk)
        self.replayed += len(payloads)
        return payloads

    def streamed(self) -> list[Effect]:
        self._expect(Step.STREAMING)
        snapshot = self._snapshot
        assert snapshot is not None
        marker = wire.Resumed(seq=snapshot.as_of, replayed=self.replayed)
        self.step = Step.READY
        return [Send(wire.dump(marker)), Ready()]

    def failed(self, exc: BaseException) -> list[Effect]:
        """A step's I/O raised: a refusal (ChatError) or a failure. Every failure gets an
        error reply naming the ``auth`` and a close code."""
        request_id = self.request.id if self.request is not None else None
        if isinstance(exc, ReplayLost):
            # The log lost part of the range while it was read (pruned or trimmed).
            if self.step is Step.SCANNING:
                return self._reply("too_old")  # nothing replayed yet: say so, go on live
            self.step = Step.CLOSED
            return [Close(CloseCode.SLOW_CONSUMER, "replay_lost")]  # reconnect, resume
        if isinstance(exc, ProtocolViolation):
            verdict = self._protocol.fail(request_id, exc)
        elif isinstance(exc, ChatError):
            # A refused auth leaves nothing worth keeping the connection for.
            close = (
                CloseCode.TRY_AGAIN_LATER
                if exc.retry_after_ms is not None
                else CloseCode.POLICY_VIOLATION
            )
            violation = ProtocolViolation(exc.code, close, exc.message)
            violation.retry_after_ms = exc.retry_after_ms
            verdict = self._protocol.fail(request_id, violation)
        else:
            # The error frame says what happened (internal_error, or unavailable for a store
            # that is down); the close code says whether to come back soon (1013) or not (1011).
            frame = self._protocol.fail(request_id, exc).frame
            self._protocol.state = State.CLOSED
            reason = str(json.loads(frame).get("code", "internal_error")) if frame else ""
            code = (
                CloseCode.TRY_AGAIN_LATER
                if isinstance(exc, StorageError)
                else CloseCode.INTERNAL_ERROR
            )
            verdict = Close(code, reason, frame)
        self.step = Step.CLOSED
        return [verdict]

    def close(self) -> bool:
        """The connection ended (at any step): leave the hub if attached. True if the session
        had gone live, so the driver undoes its presence; a failed connect never does."""
        if self.attached:
            self._hub.detach(self._workspace_id, self._recipient)
            self.attached = False
        was_live, self.live = self.live, False
        self.step = Step.CLOSED
        return was_live

    # ------------------------------------------------------------------ helpers

    def _reply(self, resume_error: wire.ResumeError | None, *, final: bool = True) -> list[Effect]:
        identity, snapshot, request = self._identity(), self._snapshot, self.request
        assert snapshot is not None and request is not None
        user = self._user()
        self._protocol.authenticated()
        resumed = self._resume is not None and resume_error is None
        info = wire.SessionInfo(
            user=user,
            workspace_id=user.workspace_id,
            workspace_name=snapshot.workspace_name,
            session_id=identity.session_id,
            seq=snapshot.as_of,
            token=identity.token,
            resumed=resumed,
            resume_error=resume_error,
        )
        effects: list[Effect] = [Send(self._protocol.reply(request.id, info))]
        if not final:
            return effects
        if resumed:
            marker = wire.Resumed(seq=snapshot.as_of, replayed=0)
            effects.append(Send(wire.dump(marker)))
        self.step = Step.READY
        return [*effects, Ready()]

    def ready(self) -> list[Effect]:
        """Apply the snapshot in the hub and flush what it buffered since the attach (the
        driver has written everything before): ``Live``, or a ``Close``."""
        self._expect(Step.READY)
        if self._recipient.revoked:
            return self._refuse(ErrorCode.TOKEN_REVOKED)
        snapshot = self._snapshot
        assert snapshot is not None
        user = self._user()
        if not self._hub.ready(
            user.workspace_id,
            self._recipient,
            snapshot.channel_ids,
            snapshot.as_of,
            role=user.role,
        ):
            self.step = Step.CLOSED
            return [Close(CloseCode.SLOW_CONSUMER, "sync_overflow")]
        if self._recipient.revoked:  # a revocation among the buffered events
            return self._refuse(ErrorCode.TOKEN_REVOKED, replied=True)
        self.step = Step.LIVE
        self.live = True
        # Held for the connection's lifetime from here on: keep only the workspace id.
        self.request = self.identity = self._snapshot = self._resume = self._replay = None
        return [Live(user.workspace_id, user.id)]

    def _refuse(self, code: ErrorCode, *, replied: bool = False) -> list[Effect]:
        self.step = Step.CLOSED
        if replied or self._protocol.state is State.OPEN:
            # The auth was answered already: the close says why.
            return [Close(CloseCode.POLICY_VIOLATION, code.value)]
        request_id = self.request.id if self.request is not None else None
        verdict = self._protocol.fail(
            request_id, ProtocolViolation(code, CloseCode.POLICY_VIOLATION)
        )
        return [verdict]

    def _identity(self) -> Identity:
        assert self.identity is not None
        return self.identity

    def _user(self) -> wire.User:
        assert self._snapshot is not None and self._snapshot.user is not None
        return self._snapshot.user

    def _expect(self, step: Step) -> None:
        if self.step is not step:
            raise RuntimeError(f"connect sequence: expected {step.name}, at {self.step.name}")


class BacklogFilter:
    """Which events of a replay the user may see, judged by the role and membership the user
    had at each, in two passes over chunks (never the whole range in memory).

    The role and membership after the range are known (the snapshot). The first pass notes
    the user's first role change in the range (its old role is the role before) and, per
    channel, the user's first join or leave: a first join means the user was not a member
    before the range, a first leave that it was. The second pass walks forward from there."""

    __slots__ = ("_channels", "_first", "_role", "_role_before", "_user")

    def __init__(self, user_id: int, role_after: str, channels_after: Iterable[int]) -> None:
        self._user = user_id
        self._role = role_after
        self._role_before: str | None = None
        self._channels = set(channels_after)
        self._first: dict[int, bool] = {}  # channel -> member before the range

    def scan(self, chunk: Sequence[Envelope]) -> None:
        uid, first = self._user, self._first
        for env in chunk:
            audience = env.audience
            change = audience.role_change
            if change is not None and change[0] == uid and self._role_before is None:
                self._role_before = change[1]
            cid = audience.channel_id
            if cid is None or cid in first:
                continue
            if uid in audience.joins:
                first[cid] = False
            elif uid in audience.leaves:
                first[cid] = True

    def start(self) -> None:
        """Between the passes: turn the state after the range into the one before it."""
        if self._role_before is not None:
            self._role = self._role_before
        for cid, member in self._first.items():
            if member:
                self._channels.add(cid)
            else:
                self._channels.discard(cid)

    def visible(self, chunk: Sequence[Envelope]) -> list[bytes]:
        uid, channels = self._user, self._channels
        out = []
        for env in chunk:
            audience = env.audience
            change = audience.role_change
            if change is not None and change[0] == uid:
                self._role = change[2]
            cid = audience.channel_id
            if cid is not None and uid in audience.joins:
                channels.add(cid)
            if receives(env, uid, self._role, channels):
                out.append(env.payload)
            if cid is not None and uid in audience.leaves:
                channels.discard(cid)
        return out
