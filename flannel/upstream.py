"""Flannel's connections to the chat tier: a few persistent service connections that carry
many users' sessions (docs/flannel.md).

:class:`Upstream` keeps ``upstream_connections`` links open. A workspace belongs to one link
(``workspace_id`` modulo their number): its sessions, its subscription, its replays and its
load all travel on that link, so the chat node that serves the subscription has the
workspace's sessions attached (what authorizes it), and losing a link concerns a known set
of workspaces. A session's workspace is known before its ``attach`` from the token's claims,
read without verification for routing only (the chat node verifies it); a ``login`` (or a
``signup``, ``setup``) is attached where its workspace name (or invite code) hashes to, and
moved if its workspace belongs elsewhere.

A lost link is opened again (to the next URL, with backoff); its sessions are attached again
with their tokens, their snapshots taken so relayed requests are authorized again, and its
workspaces subscribed again after the last event delivered: clients see a delay, never a
gap or a duplicate. Requests in flight on the lost link are answered ``unavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pydantic_core
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidState

from chat import credentials, service_frames, wire
from chat.bus import Envelope
from chat.replay import ReplayLost
from chat.storage.base import Unavailable
from chat.transport import write_frames

log = logging.getLogger(__name__)

# Request ids of the frames Flannel itself sends on a session's behalf (bootstrap's counts).
INTERNAL_ID_PREFIX = "flannel:"


# Refusals that mean "later", not "no".
_BUSY = frozenset({"overloaded", "unavailable"})


class UpstreamRefused(Exception):
    """The chat tier refused an attach or a snapshot: ``code`` as in an ``error`` frame."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class UpstreamUnavailable(Unavailable):
    """No upstream connection, or it was lost while the request was pending: the client gets
    ``unavailable`` with a retry hint (1013 while connecting)."""

    retry_after_ms = 1000


FrameSink = Callable[[bytes], None]
ClosedSink = Callable[[int, str], None]


@dataclass(slots=True, eq=False)
class Session:
    """One user's session, as carried upstream."""

    sid: int
    workspace_id: int  # the link it travels on (a login's guess until attached)
    token: str
    on_frame: FrameSink  # relayed replies and errors, for the client
    on_closed: ClosedSink  # the chat tier ended the session (code, reason)
    user_id: int = 0
    session_id: str = ""
    expires_at: int = 0  # the token's expiry (seconds since the epoch; 0: unknown)
    attached: bool = False  # attached and snapshotted on the current link
    live: bool = False
    gone: bool = False


@dataclass(slots=True)
class _Subscription:
    deliver: Callable[[list[Envelope]], None]
    on_gap: Callable[[], None]
    last_seq: int = 0
    active: bool = False  # subscribed on the current link


@dataclass(slots=True)
class _Replay:
    workspace_id: int
    chunks: asyncio.Queue[list[Envelope] | BaseException | None] = field(
        default_factory=asyncio.Queue
    )


class _Link:
    """One service connection and what travels on it."""

    def __init__(self, upstream: Upstream, index: int) -> None:
        self.upstream = upstream
        self.index = index
        self.ws: ClientConnection | None = None
        self.up = asyncio.Event()
        self.sessions: dict[int, Session] = {}
        self.subscriptions: dict[int, _Subscription] = {}
        self.waiting: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self.replays: dict[int, _Replay] = {}
        self.task: asyncio.Task[None] | None = None
        self._outbox: list[bytes | str] = []

    # ------------------------------------------------------------------ lifetime

    async def run(self) -> None:
        up = self.upstream
        urls = itertools.cycle(
            up.urls[self.index % len(up.urls) :] + up.urls[: self.index % len(up.urls)]
        )
        failures = 0
        while True:
            url = next(urls)
            try:
                kid, secret = up.key
                token = credentials.issue(kid, secret, up.node_id)
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    max_size=None,  # events and loads from the chat tier, trusted
                    compression=None,
                    open_timeout=up.timeout_s,
                    ping_interval=up.ping_interval_s,
                    ping_timeout=up.ping_interval_s,
                ) as ws:
                    self.ws = ws
                    failures = 0
                    reader = asyncio.ensure_future(self._read(ws))
                    try:
                        await self._restore()
                        self.up.set()
                        self.upstream.link_up()
                        await reader
                    finally:
                        reader.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("upstream connection failed", extra={"url": url, "error": repr(exc)})
            finally:
                self._lost()
            failures += 1
            ceiling = min(up.backoff_cap_s, up.backoff_s * 2 ** min(failures, 16))
            await asyncio.sleep(random.uniform(0, ceiling))

    def _lost(self) -> None:
        """The connection is gone: whatever waits on it fails, sessions and subscriptions
        are to be restored on the next one."""
        self.up.clear()
        self.upstream.link_lost()
        self.ws = None
        self._outbox.clear()
        lost = UpstreamUnavailable("the upstream connection was lost")
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(lost)
        self.waiting.clear()
        for replay in self.replays.values():
            replay.chunks.put_nowait(lost)
        self.replays.clear()
        for session in self.sessions.values():
            session.attached = False
        for sub in self.subscriptions.values():
            sub.active = False
        self.upstream.relay_lost(self)

    async def _restore(self) -> None:
        """Attach every session again (a refused one is closed), then subscribe every
        workspace again after the last event it delivered."""
        sessions = [s for s in self.sessions.values() if not s.gone]
        results = await asyncio.gather(
            *(self._reattach(s) for s in sessions), return_exceptions=True
        )
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, UpstreamRefused):
                self.sessions.pop(session.sid, None)
                session.gone = True
                session.on_closed(1008, result.code)
            elif isinstance(result, UpstreamUnavailable) and self.ws is not None:
                # This session alone could not get back in time: its client comes back
                # later (1013), the link and its other sessions carry on.
                self.sessions.pop(session.sid, None)
                session.gone = True
                session.on_closed(1013, "overloaded")
            elif isinstance(result, BaseException):
                raise result
        for workspace_id, sub in list(self.subscriptions.items()):
            if not any(s.workspace_id == workspace_id for s in self.sessions.values()):
                del self.subscriptions[workspace_id]  # nobody left to serve it to
                continue
            await self._subscribe(workspace_id, sub, after=sub.last_seq)

    async def _reattach(self, session: Session) -> None:
        """Attach ``session`` again on this (new) connection. The chat node's admission
        control may turn some of a big link's sessions away (``overloaded``): those wait
        for the hint and try again, up to the upstream timeout, so that a chat node's loss
        drops no client. Any other refusal ends the session (raises UpstreamRefused)."""
        auth = {"type": "auth", "id": "reattach", "token": session.token}
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.upstream.timeout_s
        while True:
            answer = await self.call(
                "sid", session.sid, {"type": "attach", "sid": session.sid, "request": auth}
            )
            if isinstance(answer, wire.Detached) and answer.code in _BUSY:
                wait = (answer.retry_after_ms or 100) / 1000
                if loop.time() + wait > give_up:
                    raise UpstreamUnavailable("the chat tier stayed overloaded")
                await asyncio.sleep(wait * random.uniform(1, 1.5))
                continue
            break
        if isinstance(answer, wire.Detached):
            raise UpstreamRefused(answer.code, answer.message, answer.retry_after_ms)
        taken = await self.call("sid", session.sid, {"type": "snapshot", "sid": session.sid})
        if isinstance(taken, wire.Detached):
            raise UpstreamRefused(taken.code, taken.message, taken.retry_after_ms)
        assert isinstance(taken, wire.SnapshotTaken)
        if taken.refusal is not None:
            raise UpstreamRefused(taken.refusal, "refused on reattach")
        session.attached = True
        if session.live:
            await self.send({"type": "live", "sid": session.sid})

    # ------------------------------------------------------------------ requests

    async def send(self, frame: dict[str, Any] | bytes) -> None:
        """Queue ``frame`` (:meth:`send_soon`). In a storm, thousands of attaches,
        snapshots and lives leave in a few writes instead of a system call each."""
        self.send_soon(frame if isinstance(frame, bytes) else json.dumps(frame))

    def send_soon(self, frame: bytes | str) -> None:
        """Queue a frame; the frames of this turn of the event loop leave in one write, so
        the chat node reads a burst of requests as one (and commits it as one batch, as
        when clients send to it straight). A lost connection answers what waits on it."""
        if self.ws is None:
            raise UpstreamUnavailable("no upstream connection")
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_outbox)
        self._outbox.append(frame)

    def _send_outbox(self) -> None:
        frames, self._outbox = self._outbox, []
        if self.ws is None or not frames:
            return  # lost: Upstream.relay_lost answers the requests in flight
        # Closing (InvalidState): the reader sees it and the link is restored.
        with contextlib.suppress(InvalidState):
            write_frames(self.ws, frames)

    async def call(
        self, kind: str, key: int, frame: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        """Send a frame and wait for the answer keyed by its ``sid`` or ``rid``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[(kind, key)] = future
        try:
            await self.send(frame)
            async with asyncio.timeout(timeout or self.upstream.timeout_s):
                return await future
        except TimeoutError:
            raise UpstreamUnavailable("the chat tier did not answer in time") from None
        finally:
            if self.waiting.get((kind, key)) is future:
                del self.waiting[(kind, key)]

    async def _subscribe(self, workspace_id: int, sub: _Subscription, *, after: int | None) -> None:
        rid = self.upstream.next_rid()
        frame: dict[str, Any] = {"type": "subscribe", "rid": rid, "workspace_id": workspace_id}
        if after is not None:
            frame["after"] = after
        answer = await self.call("rid", rid, frame)
        if isinstance(answer, wire.Failed):
            raise UpstreamRefused(answer.code, answer.message)
        assert isinstance(answer, wire.Subscribed)
        if answer.resume_error is not None:
            # Events were lost to this node: everything derived from before is stale.
            log.warning("upstream gap", extra={"workspace_id": workspace_id, "after": after})
            sub.last_seq = max(sub.last_seq, answer.seq)
            sub.on_gap()
        elif after is None:
            # Events may have been read already (they follow this answer on the wire).
            sub.last_seq = max(sub.last_seq, answer.seq)
        sub.active = True

    # ------------------------------------------------------------------ reading

    async def _read(self, ws: ClientConnection) -> None:
        async for message in ws:
            if isinstance(message, str):
                self._control(message)
            elif message[:1] == wire.EVENTS:
                workspace_id, envelopes = service_frames.unpack_events(message)
                self._events(workspace_id, envelopes)
            elif message[:1] == wire.REPLAY_CHUNK:
                rid = int.from_bytes(message[1:5], "big")
                replay = self.replays.get(rid)
                if replay is not None:
                    _, chunk = service_frames.unpack_replay_chunk(message, replay.workspace_id)
                    replay.chunks.put_nowait(chunk)
            else:
                sid, frame = service_frames.unpack_relay(message)
                self.upstream.relayed(self, sid, frame)

    def _control(self, text: str) -> None:
        try:
            frame = wire.CHAT_SERVICE_FRAME_ADAPTER.validate_json(text)
        except pydantic.ValidationError:
            log.warning("unreadable frame from the chat tier", extra={"frame": text[:200]})
            return
        if isinstance(frame, wire.SessionClosed):
            session = self.sessions.pop(frame.sid, None)
            if session is not None and not session.gone:
                session.gone = True
                session.on_closed(frame.code, frame.reason)
            return
        if isinstance(frame, wire.Replayed | wire.Failed) and frame.rid in self.replays:
            replay = self.replays.pop(frame.rid)
            if isinstance(frame, wire.Failed):
                replay.chunks.put_nowait(_replay_error(frame))
            replay.chunks.put_nowait(None)
            return
        if isinstance(frame, wire.Attached | wire.Detached | wire.SnapshotTaken):
            key: tuple[str, int] = ("sid", frame.sid)
        else:
            assert isinstance(frame, wire.Subscribed | wire.Failed | wire.Loaded | wire.Replayed)
            key = ("rid", frame.rid)
        future = self.waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(frame)

    def _events(self, workspace_id: int, envelopes: list[Envelope]) -> None:
        sub = self.subscriptions.get(workspace_id)
        if sub is None or not envelopes:
            return
        durable = [e for e in envelopes if e.seq is None or e.seq > sub.last_seq]
        for env in reversed(durable):
            if env.seq is not None:
                sub.last_seq = env.seq
                break
        if durable:
            sub.deliver(durable)


def _replay_error(frame: wire.Failed) -> BaseException:
    if frame.code == "too_old":
        return ReplayLost(frame.message)
    return UpstreamUnavailable(f"{frame.code}: {frame.message}")


def token_claim(token: str, name: str) -> int | None:
    """An integer claim of a user token (``ws``, ``exp``), unverified: the chat tier verifies
    the token; the edge only routes by it, and stops answering from its cache at expiry."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError):
        return None
    value = claims.get(name) if isinstance(claims, dict) else None
    return value if type(value) is int and value > 0 else None


class Upstream:
    """The links, and the operations Flannel's server performs over them."""

    def __init__(
        self,
        urls: list[str],
        *,
        connections: int,
        key: tuple[str, str],
        node_id: str,
        timeout_s: float = 10.0,
        load_timeout_s: float = 60.0,
        backoff_s: float = 0.2,
        backoff_cap_s: float = 5.0,
        ping_interval_s: float = 20.0,
    ) -> None:
        if not urls:
            raise ValueError("no upstream URL")
        self.urls = list(urls)
        self.key = key
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.ping_interval_s = ping_interval_s
        self.links = [_Link(self, i) for i in range(connections)]
        self._ids = itertools.count(1)
        # Relayed requests in flight: (link, sid) -> request ids, answered `unavailable` if
        # the link is lost before their replies.
        self._in_flight: dict[int, dict[str, _Link]] = {}
        self._internal: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._sessions: dict[int, Session] = {}
        self._ever_up = False
        self._down_since: float | None = None  # monotonic; None while a link is up

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        for link in self.links:
            link.task = asyncio.ensure_future(link.run())

    async def close(self) -> None:
        for link in self.links:
            if link.task is not None:
                link.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await link.task
            if link.ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.ws.close(), 2)

    @property
    def connected(self) -> int:
        return sum(link.up.is_set() for link in self.links)

    def link_up(self) -> None:
        self._ever_up = True
        self._down_since = None

    def link_lost(self) -> None:
        if self._ever_up and self.connected == 0 and self._down_since is None:
            self._down_since = time.monotonic()

    def down_for(self) -> float:
        """Seconds since no link has been up: 0 while one is; infinite before the first."""
        if not self._ever_up:
            return math.inf
        if self._down_since is None:
            return 0.0
        return time.monotonic() - self._down_since

    async def ready(self, timeout: float) -> None:
        """Wait until every link is up (start-up)."""
        async with asyncio.timeout(timeout):
            for link in self.links:
                await link.up.wait()

    def next_rid(self) -> int:
        return next(self._ids) % (2**32 - 1) + 1

    def _link(self, workspace_id: int) -> _Link:
        return self.links[workspace_id % len(self.links)]

    async def _up(self, link: _Link) -> _Link:
        if not link.up.is_set():
            try:
                async with asyncio.timeout(self.timeout_s):
                    await link.up.wait()
            except TimeoutError:
                raise UpstreamUnavailable("no upstream connection") from None
        return link

    # ------------------------------------------------------------------ sessions

    async def attach(
        self,
        request: wire.FirstFrame,
        *,
        client_ip: str | None,
        on_frame: FrameSink,
        on_closed: ClosedSink,
    ) -> tuple[Session, wire.Attached]:
        """Attach a session with the user's own credentials. Raises UpstreamRefused."""
        if isinstance(request, wire.Auth):
            request = request.model_copy(update={"resume": None})
            routing = token_claim(request.token, "ws") or 1
            token = request.token
        else:
            # A login or setup names its workspace; a signup's is its invite's.
            name = request.invite if isinstance(request, wire.Signup) else request.workspace
            routing = zlib.crc32(name.encode()) or 1
            token = ""
        session = Session(self.next_rid(), routing, token, on_frame, on_closed)
        attached = await self._attach(session, request.model_dump(mode="json"), client_ip)
        if attached.token is not None:
            session.token = attached.token
        if self._link(attached.workspace_id) is not self._link(routing):
            # A login whose workspace lives on another link: move it there, with its token.
            await self._detach_from(self._link(routing), session)
            session.workspace_id = attached.workspace_id
            auth = {"type": "auth", "id": "moved", "token": session.token}
            attached = await self._attach(session, auth, client_ip)
            # The client's reply still carries the token its login (or sign-up) got.
            attached = attached.model_copy(update={"token": session.token})
        session.workspace_id = attached.workspace_id
        session.user_id, session.session_id = attached.user_id, attached.session_id
        session.expires_at = token_claim(session.token, "exp") or 0
        return session, attached

    async def _attach(
        self, session: Session, request: dict[str, Any], client_ip: str | None
    ) -> wire.Attached:
        link = await self._up(self._link(session.workspace_id))
        frame: dict[str, Any] = {"type": "attach", "sid": session.sid, "request": request}
        if client_ip is not None:
            frame["client_ip"] = client_ip[:64]
        link.sessions[session.sid] = session
        self._sessions[session.sid] = session
        try:
            answer = await link.call("sid", session.sid, frame)
        except BaseException:
            self._forget(link, session)
            raise
        if isinstance(answer, wire.Detached):
            self._forget(link, session)
            raise UpstreamRefused(answer.code, answer.message, answer.retry_after_ms)
        assert isinstance(answer, wire.Attached)
        return answer

    async def snapshot(self, session: Session) -> wire.SnapshotTaken:
        link = await self._up(self._link(session.workspace_id))
        answer = await link.call("sid", session.sid, {"type": "snapshot", "sid": session.sid})
        if isinstance(answer, wire.Detached):
            raise UpstreamRefused(answer.code, answer.message, answer.retry_after_ms)
        assert isinstance(answer, wire.SnapshotTaken)
        session.attached = answer.refusal is None
        return answer

    async def live(self, session: Session) -> None:
        session.live = True
        with contextlib.suppress(UpstreamUnavailable):
            await self._link(session.workspace_id).send({"type": "live", "sid": session.sid})

    async def detach(self, session: Session) -> None:
        if session.gone:
            return
        session.gone = True
        await self._detach_from(self._link(session.workspace_id), session)

    async def _detach_from(self, link: _Link, session: Session) -> None:
        self._forget(link, session)
        with contextlib.suppress(UpstreamUnavailable):
            await link.send({"type": "detach", "sid": session.sid})

    def _forget(self, link: _Link, session: Session) -> None:
        link.sessions.pop(session.sid, None)
        self._sessions.pop(session.sid, None)
        self._in_flight.pop(session.sid, None)

    # ------------------------------------------------------------------ relaying

    async def relay(self, session: Session, request_id: str, text: str) -> None:
        """Send a client's request upstream verbatim; its reply reaches ``on_frame``.
        Raises UpstreamUnavailable when the link is down (the caller answers the client)."""
        link = self._link(session.workspace_id)
        if not session.attached or not link.up.is_set():
            raise UpstreamUnavailable("no upstream connection")
        self._in_flight.setdefault(session.sid, {})[request_id] = link
        try:
            link.send_soon(service_frames.relay(session.sid, text.encode()))
        except UpstreamUnavailable:
            self._in_flight.get(session.sid, {}).pop(request_id, None)
            raise

    async def request(self, session: Session, frame: dict[str, Any]) -> dict[str, Any]:
        """A request Flannel makes on the session's behalf; returns its reply (or error)."""
        request_id = INTERNAL_ID_PREFIX + str(self.next_rid())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._internal[request_id] = future
        try:
            await self.relay(session, request_id, json.dumps({**frame, "id": request_id}))
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            raise UpstreamUnavailable("the chat tier did not answer in time") from None
        finally:
            self._internal.pop(request_id, None)

    def relayed(self, link: _Link, sid: int, frame: bytes) -> None:
        """A reply or error from the chat tier for one of ``link``'s sessions."""
        session = link.sessions.get(sid)
        reply_to = _reply_to(frame)
        if reply_to is not None:
            self._in_flight.get(sid, {}).pop(reply_to, None)
            internal = self._internal.pop(reply_to, None)
            if internal is not None:
                if not internal.done():
                    internal.set_result(pydantic_core.from_json(frame))
                return
        if session is not None and not session.gone:
            session.on_frame(frame)

    def relay_lost(self, link: _Link) -> None:
        """``link`` is gone: every relayed request in flight on it gets ``unavailable``."""
        for sid, requests in list(self._in_flight.items()):
            lost = [rid for rid, on in requests.items() if on is link]
            session = self._sessions.get(sid)
            for rid in lost:
                del requests[rid]
                internal = self._internal.pop(rid, None)
                if internal is not None and not internal.done():
                    internal.set_exception(UpstreamUnavailable("the upstream connection was lost"))
                elif session is not None and not session.gone:
                    error = wire.Error(
                        reply_to=rid,
                        code="unavailable",
                        message="The chat tier connection was lost; retry.",
                        retry_after_ms=1000,
                    )
                    session.on_frame(wire.dump(error))

    # ------------------------------------------------------------------ workspaces

    async def subscribe(
        self,
        workspace_id: int,
        deliver: Callable[[list[Envelope]], None],
        on_gap: Callable[[], None],
        *,
        after: int | None = None,
    ) -> int:
        """Receive the workspace's events, once, from now (or after ``after``); returns
        the position they follow. The link must carry a session of the workspace."""
        link = await self._up(self._link(workspace_id))
        sub = _Subscription(deliver, on_gap, last_seq=after or 0)
        link.subscriptions[workspace_id] = sub
        try:
            await link._subscribe(workspace_id, sub, after=after)
        except BaseException:
            if link.subscriptions.get(workspace_id) is sub:
                del link.subscriptions[workspace_id]
            raise
        return sub.last_seq

    async def unsubscribe(self, workspace_id: int) -> None:
        link = self._link(workspace_id)
        if link.subscriptions.pop(workspace_id, None) is not None:
            with contextlib.suppress(UpstreamUnavailable):
                await link.send({"type": "unsubscribe", "workspace_id": workspace_id})

    async def replay(
        self, workspace_id: int, after: int, up_to: int
    ) -> AsyncIterator[list[Envelope]]:
        """The workspace's events in (after, up_to], in chunks. Raises ReplayLost when the
        chat tier's window no longer holds them."""
        link = await self._up(self._link(workspace_id))
        rid = self.next_rid()
        replay = link.replays[rid] = _Replay(workspace_id)
        try:
            await link.send(
                {
                    "type": "replay",
                    "rid": rid,
                    "workspace_id": workspace_id,
                    "after": after,
                    "up_to": up_to,
                }
            )
            while True:
                async with asyncio.timeout(self.timeout_s):
                    item = await replay.chunks.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            link.replays.pop(rid, None)

    async def load(self, workspace_id: int) -> wire.Loaded:
        link = await self._up(self._link(workspace_id))
        rid = self.next_rid()
        answer = await link.call(
            "rid",
            rid,
            {"type": "load", "rid": rid, "workspace_id": workspace_id},
            timeout=self.load_timeout_s,
        )
        if isinstance(answer, wire.Failed):
            raise UpstreamUnavailable(f"{answer.code}: {answer.message}")
        assert isinstance(answer, wire.Loaded)
        return answer


def _reply_to(frame: bytes) -> str | None:
    try:
        obj = pydantic_core.from_json(frame)
    except ValueError:
        return None
    value = obj.get("reply_to") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None
