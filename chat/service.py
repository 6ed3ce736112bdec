"""A chat node's end of a service connection: an edge node's many sessions over one socket.

An edge node (Flannel, docs/flannel.md) opens it at ``/service`` with a service credential
(:mod:`chat.credentials`, checked before the upgrade). Over it:

- **sessions** (``sid``): each is attached with its user's own token or password, checked by
  the same :class:`~chat.identity.Identifier` as a client's ``auth``; its connect snapshot
  comes from the same batched :class:`~chat.snapshots.SnapshotReader`; admission control
  counts each attach as a connect. A relayed request (a binary ``R`` frame) passes through
  the session's own :class:`~chat.protocol.ClientProtocol` (rate limits, strict parsing) and
  the same handlers as a client's, as that user: the credential alone acts as nobody.
- **workspaces**: ``subscribe`` makes the connection a hub tap (:class:`chat.fanout.Tap`):
  every event of the workspace once, in order, from a position, and the edge filters per
  client with the same rules. ``replay`` and ``load`` serve the edge's resumes and cache.
  All three need a session of that workspace attached here.

Nothing a misbehaving edge sends reaches ``internal_error``: a malformed frame closes the
service connection with 1008 (its sessions are then the edge's to move elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pydantic

from chat import metrics, service_frames, wire
from chat.bus import Envelope
from chat.errors import ChatError, CloseCode, ErrorCode
from chat.handlers import Caller, handle
from chat.identity import Identity
from chat.metrics import TALLY
from chat.protocol import ClientProtocol, Close, Dispatch, Send
from chat.replay import ReplayLost
from chat.snapshots import REFUSALS, Abandoned
from chat.storage import StorageError, queries
from chat.transport import OPEN, PING_FRAME, Connection, FrameWriter, binary_frame, text_frame

if TYPE_CHECKING:
    from chat.server import Node

log = logging.getLogger(__name__)

PATH = "/service"
_CLOSE_TIMEOUT_S = 2.0
# Relayed requests in flight per service connection: past it the node stops reading the
# connection and TCP pushes back on the edge.
MAX_INFLIGHT = 512


@dataclass(slots=True)
class _Session:
    sid: int
    identity: Identity | None = None
    protocol: ClientProtocol | None = None  # set once the snapshot admitted it
    caller: Caller | None = None
    admitted: bool = False  # counted by admission control until the snapshot
    live: bool = False


class _NoDelivery:
    """The ``peer`` of a relayed session's :class:`Caller`: events reach the edge through
    the tap, never per session, so a handler that registers a peer (``presence.subscribe``)
    registers nothing here; the edge keeps its clients' presence watches itself."""

    __slots__ = ("revoked", "role", "session_id", "user_id")

    def __init__(self, identity: Identity) -> None:
        self.user_id = identity.user_id
        self.session_id = identity.session_id
        self.role = "guest"
        self.revoked = False

    def send(self, frame: bytes, droppable: bool) -> None:
        return None

    def revoke(self) -> None:
        self.revoked = True


class ServiceLink(FrameWriter):
    """One service connection (also the hub's :class:`~chat.fanout.Tap` for the workspaces
    it subscribed)."""

    __slots__ = (
        "_closer",
        "_closing",
        "_node",
        "_pending",
        "_pinged_at",
        "_slots",
        "_tasks",
        "sessions",
        "subject",
        "tapped",
        "ws",
    )

    def __init__(self, node: Node, ws: Connection, subject: str) -> None:
        super().__init__(ws)
        self._node = node
        self.ws = ws
        self.subject = subject
        self.sessions: dict[int, _Session] = {}
        self.tapped: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._closing = False
        self._closer: asyncio.Future[None] | None = None
        self._pinged_at = 0.0
        self._pending: list[bytes] | None = None  # written at the end of the loop's turn

    # ------------------------------------------------------------------ the tap

    def take(self, envelopes: Sequence[Envelope]) -> None:
        self._send(binary_frame(service_frames.events(envelopes[0].workspace_id, envelopes)))

    def heartbeat(self, now: float, limit: float, ping_after: float) -> None:
        """Called by the node's heartbeat loop: ping a quiet link, close a dead one (4000)."""
        last_seen = self.ws.last_seen
        if now - last_seen > limit:
            self._close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat_timeout")
        elif now - max(last_seen, self._pinged_at) >= ping_after and self.open:
            self.write(PING_FRAME)
            self._pinged_at = now

    # ------------------------------------------------------------------ reading

    async def run(self) -> None:
        log.info("service connection", extra={"subject": self.subject})
        try:
            async for message in self.ws:
                TALLY.frames_in += 1
                if isinstance(message, bytes):
                    await self._relay(message)
                else:
                    self._control(message)
                if self._closing:
                    break
        finally:
            if self._closer is not None:
                # Returning first would close with 1000: our close code goes out first.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._closer)
            await self._ended()

    def _control(self, text: str) -> None:
        try:
            frame = wire.EDGE_FRAME_ADAPTER.validate_json(text)
        except pydantic.ValidationError as exc:
            self._violation(f"invalid service frame: {exc.errors()[0].get('msg', '')}")
            return
        if isinstance(frame, wire.Attach):
            if frame.sid in self.sessions:
                self._violation(f"sid {frame.sid} is attached already")
                return
            self.sessions[frame.sid] = _Session(frame.sid)
            self._spawn(self._attach(frame))
        elif isinstance(frame, wire.TakeSnapshotFrame):
            self._spawn(self._snapshot(frame.sid))
        elif isinstance(frame, wire.SessionLive):
            self._live(frame.sid)
        elif isinstance(frame, wire.Detach):
            # At once: the frames after it on this connection see the session gone.
            session = self.sessions.pop(frame.sid, None)
            if session is not None:
                self._spawn(self._end_session(session))
        elif isinstance(frame, wire.SubscribeWorkspace):
            self._spawn(self._subscribe(frame))
        elif isinstance(frame, wire.UnsubscribeWorkspace):
            if frame.workspace_id in self.tapped:
                self.tapped.discard(frame.workspace_id)
                self._node.services.hub.detach_tap(frame.workspace_id, self)
        elif isinstance(frame, wire.ReplayRange):
            self._spawn(self._replay(frame))
        elif isinstance(frame, wire.LoadWorkspace):
            self._spawn(self._load(frame))

    # ------------------------------------------------------------------ sessions

    async def _attach(self, frame: wire.Attach) -> None:
        session = self.sessions[frame.sid]
        node = self._node
        hint_ms = node.admission.admit(0.0)
        if hint_ms is not None:
            metrics.ADMISSION_REFUSED.labels(when="service_attach").inc()
            self.sessions.pop(frame.sid, None)
            self._detached(frame.sid, ChatError(ErrorCode.UNAVAILABLE, "overloaded"), hint_ms)
            return
        session.admitted = True
        try:
            identity = await node.identify(frame.request, peer_ip=frame.client_ip)
        except Exception as exc:
            self._drop(session, served=False)
            self._detached(frame.sid, exc)
            return
        if self.sessions.get(frame.sid) is not session:
            self._drop(session, served=False)  # detached meanwhile
            return
        session.identity = identity
        self._text(
            wire.Attached(
                sid=frame.sid,
                user_id=identity.user_id,
                workspace_id=identity.workspace_id,
                session_id=identity.session_id,
                token=identity.token,
            )
        )

    async def _snapshot(self, sid: int) -> None:
        session = self.sessions.get(sid)
        if session is None or session.identity is None or session.protocol is not None:
            self._detached(sid, ChatError(ErrorCode.NOT_AUTHENTICATED, "not attached"))
            return
        identity = session.identity

        def waited_for() -> bool:
            return self.open and self.sessions.get(sid) is session

        try:
            row = await self._node.snapshots.read(
                identity.workspace_id, identity.user_id, identity.session_id, waited_for
            )
        except Abandoned:
            self._drop(session, served=False)
            return
        except Exception as exc:
            self._drop(session, served=False)
            self.sessions.pop(sid, None)
            self._detached(sid, exc)
            return
        refusal = REFUSALS.get(row.session) if row.user is not None else ErrorCode.INVALID_AUTH
        if refusal is None and row.user is not None:
            peer = _NoDelivery(identity)
            peer.role = row.user.role
            loop = asyncio.get_running_loop()
            s = self._node.settings
            protocol = ClientProtocol(
                now=loop.time(),
                requests_per_10s=s.rate_limit_per_10s,
                disconnect_after=s.rate_limit_disconnect_after,
            )
            protocol.authenticated()
            session.protocol = protocol
            session.caller = Caller(
                identity.user_id, identity.workspace_id, identity.session_id, peer
            )
            self._drop(session, served=True)
        else:
            self.sessions.pop(sid, None)
            self._drop(session, served=False)
        self._text(
            wire.SnapshotTaken(
                sid=sid,
                as_of=row.as_of,
                user=row.user,
                workspace_name=row.workspace_name,
                channel_ids=sorted(row.channel_ids),
                refusal=refusal.value if refusal is not None else None,
            )
        )

    def _live(self, sid: int) -> None:
        session = self.sessions.get(sid)
        if session is None or session.caller is None or session.live:
            return
        session.live = True
        metrics.SESSIONS.inc()
        caller = session.caller
        self._spawn(self._node.services.presence.connected(caller.workspace_id, caller.user_id))

    async def _end_session(self, session: _Session) -> None:
        """A session ended: its presence is undone. Its requests in flight finish (as a
        client's do when it disconnects); their replies go to a session the edge dropped."""
        self._drop(session, served=False)
        if session.live and session.caller is not None:
            session.live = False
            metrics.SESSIONS.dec()
            caller = session.caller
            await self._node.services.presence.disconnected(caller.workspace_id, caller.user_id)

    def _drop(self, session: _Session, *, served: bool) -> None:
        """Admission control's count of this attach ends (once)."""
        if session.admitted:
            session.admitted = False
            self._node.admission.finished(served=served)

    def _detached(self, sid: int, exc: BaseException, hint_ms: int | None = None) -> None:
        if isinstance(exc, ChatError):
            code, message, retry = exc.code.value, exc.message, exc.retry_after_ms
            if hint_ms is not None:
                code, retry = "overloaded", hint_ms
        elif isinstance(exc, StorageError):
            code, message, retry = "unavailable", "The store is unavailable.", 1000
        else:
            log.exception("service attach failed", exc_info=exc)
            code, message, retry = "internal_error", "Internal error.", None
        self._text(wire.Detached(sid=sid, code=code, message=message, retry_after_ms=retry))

    # ------------------------------------------------------------------ relayed requests

    async def _relay(self, data: bytes) -> None:
        try:
            sid, raw = service_frames.unpack_relay(data)
            frame = raw.decode()  # a client's text frame, as the edge received it
        except ValueError:
            self._violation("malformed binary frame")
            return
        session = self.sessions.get(sid)
        if session is None or session.protocol is None or session.caller is None:
            error = wire.Error(
                reply_to=wire.frame_id(frame),
                code=ErrorCode.NOT_AUTHENTICATED.value,
                message="No such session on this connection.",
            )
            self._send(binary_frame(service_frames.relay(sid, wire.dump(error))))
            return
        protocol = session.protocol
        verdict = protocol.receive(frame, asyncio.get_running_loop().time())
        if isinstance(verdict, Dispatch):
            if isinstance(verdict.request, wire.PresenceSubscribe):
                # The edge holds its clients' presence watches (see _NoDelivery); this
                # node answers who is active now.
                presence = self._node.services.presence
                snapshot = presence.snapshot(session.caller.workspace_id, verdict.request.user_ids)
                self._reply(sid, protocol.reply(verdict.request.id, snapshot))
                return
            await self._slots.acquire()
            self._spawn(self._request(session, verdict.request))
        elif isinstance(verdict, Close):
            if verdict.frame is not None:
                self._reply(sid, verdict.frame)
            self._closed(sid, verdict.code, verdict.reason)
        elif isinstance(verdict, Send):
            self._reply(sid, verdict.frame)

    async def _request(self, session: _Session, request: wire.Request) -> None:
        assert session.protocol is not None and session.caller is not None
        started = time.perf_counter()
        try:
            data = await handle(self._node.services, session.caller, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = session.protocol.fail(request.id, exc)
            if verdict.frame is not None:
                metrics.count_error(verdict.frame)
                self._reply(session.sid, verdict.frame)
            if isinstance(exc, ChatError) and exc.code is ErrorCode.TOKEN_REVOKED:
                self._closed(session.sid, CloseCode.POLICY_VIOLATION, exc.code.value)
            elif isinstance(verdict, Close):
                self._closed(session.sid, verdict.code, verdict.reason)
        else:
            self._reply(session.sid, session.protocol.reply(request.id, data))
        finally:
            self._slots.release()
            metrics.REQUESTS.labels(type=request.type).observe(  # type: ignore[attr-defined]
                time.perf_counter() - started
            )

    def _reply(self, sid: int, frame: bytes) -> None:
        self._send(binary_frame(service_frames.relay(sid, frame)))

    def _closed(self, sid: int, code: CloseCode, reason: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        self._text(wire.SessionClosed(sid=sid, code=int(code), reason=reason))
        self._spawn(self._end_session(session))

    # ------------------------------------------------------------------ workspaces

    def _attached_to(self, workspace_id: int) -> bool:
        """Whether a session of the workspace is attached here: its user's token verified.
        (Not yet its snapshot: the connect sequence subscribes before it, so that no event
        between the snapshot and the subscription is missed.)"""
        return any(
            s.identity is not None and s.identity.workspace_id == workspace_id
            for s in self.sessions.values()
        )

    def _failed(self, rid: int, code: str, message: str) -> None:
        self._text(wire.Failed(rid=rid, code=code, message=message))

    async def _subscribe(self, frame: wire.SubscribeWorkspace) -> None:
        wid, node = frame.workspace_id, self._node
        if not self._attached_to(wid):
            self._failed(frame.rid, "not_attached", "No session of this workspace is attached.")
            return
        if wid in self.tapped:
            self._failed(frame.rid, "already_subscribed", "Subscribed already.")
            return
        self.tapped.add(wid)
        hub = node.services.hub
        answered = False
        try:
            await node.subscribe(wid)
            hub.attach_tap(wid, self)  # buffering from here: nothing after the read is missed
            async with node.services.db.connection() as conn:
                as_of = (await queries.event_positions(conn, [wid])).get(wid, 0)
            after = frame.after
            error: Literal["too_old", "future_seq"] | None = None
            if after is not None and after > as_of:
                error, after = "future_seq", None
            elif (
                after is not None
                and after < as_of
                and not await node.replay.holds(wid, after, as_of)
            ):
                error, after = "too_old", None
            self._text(
                wire.Subscribed(rid=frame.rid, workspace_id=wid, seq=as_of, resume_error=error)
            )
            answered = True
            if after is not None and after < as_of:
                async for chunk in node.replay.read(wid, after, as_of):
                    if chunk:
                        self._send(binary_frame(service_frames.events(wid, chunk)))
                    await self._drained()
            if wid in self.tapped:
                hub.ready_tap(wid, self, as_of)
        except (StorageError, ReplayLost, OSError) as exc:
            log.warning("service subscribe failed", extra={"workspace_id": wid, "error": repr(exc)})
            if wid in self.tapped:
                self.tapped.discard(wid)
                hub.detach_tap(wid, self)
            if answered:
                # Part of the catch-up was sent: the edge subscribes again, after what it
                # has, on a new connection.
                self._close(CloseCode.TRY_AGAIN_LATER, "unavailable")
            else:
                self._failed(frame.rid, "unavailable", "The store or the log failed; try again.")

    async def _replay(self, frame: wire.ReplayRange) -> None:
        wid, node = frame.workspace_id, self._node
        if not self._attached_to(wid):
            self._failed(frame.rid, "not_attached", "No session of this workspace is attached.")
            return
        if frame.up_to < frame.after:
            self._failed(frame.rid, "invalid_argument", "up_to is before after.")
            return
        count = 0
        try:
            if frame.up_to > frame.after and not await node.replay.holds(
                wid, frame.after, frame.up_to
            ):
                self._failed(frame.rid, "too_old", "Outside the replay window.")
                return
            if frame.up_to > frame.after:
                async for chunk in node.replay.read(wid, frame.after, frame.up_to):
                    count += len(chunk)
                    self._send(binary_frame(service_frames.replay_chunk(frame.rid, chunk)))
                    await self._drained()
        except ReplayLost:
            self._failed(frame.rid, "too_old", "The log lost part of the range while it was read.")
            return
        except (StorageError, OSError):
            self._failed(frame.rid, "unavailable", "The replay log is unavailable.")
            return
        self._text(wire.Replayed(rid=frame.rid, count=count))

    async def _load(self, frame: wire.LoadWorkspace) -> None:
        wid = frame.workspace_id
        if not self._attached_to(wid):
            self._failed(frame.rid, "not_attached", "No session of this workspace is attached.")
            return
        try:
            async with self._node.services.db.connection() as conn:
                model = await queries.workspace_model(conn, wid)
        except StorageError:
            self._failed(frame.rid, "unavailable", "The store is unavailable.")
            return
        if model is None:
            self._failed(frame.rid, "not_found", "No such workspace.")
            return
        loaded = loaded_frame(frame.rid, wid, model)
        self._text(loaded)

    # ------------------------------------------------------------------ writing

    def _text(self, frame: wire.Frame) -> None:
        self._send(text_frame(wire.dump(frame)))

    def _send(self, frame: bytes) -> None:
        if self._closing or self._protocol.state is not OPEN:
            return
        if self.buffered() > self._node.settings.service_buffer_hard_bytes:
            # The edge stopped reading: it resubscribes after what it has, elsewhere.
            log.warning("service connection cut off: not reading", extra={"subject": self.subject})
            self._close(CloseCode.SLOW_CONSUMER, "slow_consumer")
            return
        # The frames of one turn of the event loop leave in one write: in a storm, an
        # edge's thousands of attaches are answered in a few system calls, not two each.
        if self._pending is None:
            self._pending = []
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame)
        TALLY.frames_out += 1

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and self._protocol.state is OPEN:
            self.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def _drained(self) -> None:
        """Flow control for long reads (a replay, a catch-up): wait while the edge is behind.
        What this turn queued is written first, or a read that never yields to the loop (a
        replay from memory) would queue all of itself unseen by the kernel's buffer count."""
        self._flush()
        soft = self._node.settings.send_buffer_soft_bytes
        while self.buffered() > soft:
            if self._closing or not self.open:
                return
            await asyncio.sleep(0.005)

    def _violation(self, why: str) -> None:
        log.warning(
            "service connection violated the protocol", extra={"subject": self.subject, "why": why}
        )
        self._close(CloseCode.POLICY_VIOLATION, "invalid_service_frame")

    def _close(self, code: CloseCode, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._closer = asyncio.ensure_future(self._close_now(code, reason))

    async def _close_now(self, code: CloseCode, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code, reason), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.abort()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ended(self) -> None:
        """The connection is gone: untap, end every session (presence), stop its work."""
        self._closing = True
        hub = self._node.services.hub
        for wid in list(self.tapped):
            hub.detach_tap(wid, self)
        self.tapped.clear()
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            with contextlib.suppress(Exception):
                await self._end_session(session)
        for task in list(self._tasks):
            if not task.done() and task is not asyncio.current_task():
                task.cancel()
        log.info("service connection ended", extra={"subject": self.subject})


def loaded_frame(rid: int, workspace_id: int, model: queries.WorkspaceModel) -> wire.Loaded:
    """The ``loaded`` answer for a workspace the node read (every channel has a membership
    entry, empty for a channel without members)."""
    return wire.Loaded(
        rid=rid,
        workspace_id=workspace_id,
        workspace_name=model.name,
        seq=model.seq,
        users=model.users,
        channels=model.channels,
        members=[
            wire.Membership(
                channel_id=c.id,
                user_ids=model.members.get(c.id, []),
                last_ts=model.last_ts.get(c.id),
            )
            for c in model.channels
        ],
    )
