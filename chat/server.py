"""The websocket I/O of a node: feeds sessions, carries out their verdicts, serves HTTP probes.

::

    socket ──text──> ClientProtocol.receive ──Dispatch──> handlers ──> journal ──> DB ──> bus
       ^                                                                          │
       └──────── transport.write(frame bytes, built once per event) <── Hub <─────┘

Events are written straight to each connection's transport as pre-built websocket frames
(server frames are unmasked, so the bytes are the same for every recipient); replies take the
same path, so a connection's frames leave in the order they were produced. A connection whose
write buffer passes the soft mark loses droppable frames (typing, presence); past the hard mark
it is closed with 4001 (reconnect and resume) instead of slowing anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import random
import signal
import struct
import time
from collections.abc import Awaitable, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State as WsState
from websockets.typing import Origin

from chat import __version__, metrics, wire
from chat.bus import Bus, Envelope, LocalBus
from chat.config import Settings
from chat.errors import ChatError, CloseCode, ErrorCode, ProtocolViolation
from chat.fanout import Hub, visible_backlog
from chat.handlers import Caller, Services, handle
from chat.identity import identify
from chat.journal import Journal
from chat.metrics import TALLY
from chat.presence import ClusterPresence, Presence
from chat.protocol import Authenticate, ClientProtocol, Close, Dispatch, Send
from chat.replay import DatabaseLog, ReplayLog
from chat.storage import Database, open_database, queries, token_secret

log = logging.getLogger(__name__)

_OPEN = WsState.OPEN
_CLOSE_TIMEOUT_S = 2.0


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked websocket text frame (FIN set) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Peer:
    """One websocket connection, as the hub sees it once authenticated."""

    __slots__ = (
        "_hard",
        "_node",
        "_protocol",
        "_soft",
        "_transport",
        "closer",
        "closing",
        "last_seen",
        "requests",
        "revoked",
        "session_id",
        "user_id",
        "workspace_id",
        "ws",
    )

    def __init__(self, node: Node, ws: ServerConnection) -> None:
        self._node = node
        self.ws = ws
        self._protocol = ws.protocol
        self._transport = ws.transport
        self._soft = node.settings.send_buffer_soft_bytes
        self._hard = node.settings.send_buffer_hard_bytes
        self.user_id = 0
        self.workspace_id = 0
        self.session_id = ""
        self.closing = False
        self.last_seen = asyncio.get_running_loop().time()
        self.revoked = False
        self.closer: asyncio.Task[object] | None = None
        self.requests = Slots(node.settings.max_inflight_requests)

    def send(self, frame: bytes, droppable: bool) -> None:
        # The per-recipient hot path of fan-out: keep it short.
        if self.closing or self.revoked or self._protocol.state is not _OPEN:
            return
        self._write(frame, droppable)

    def reply(self, frame: bytes) -> None:
        """A reply or error frame: still sent after revocation, to requests made before."""
        if self.closing or self._protocol.state is not _OPEN:
            return
        self._write(frame, False)

    def _write(self, frame: bytes, droppable: bool) -> None:
        transport = self._transport
        if transport.get_write_buffer_size() > self._soft:
            if droppable:
                TALLY.dropped += 1
                return
            if transport.get_write_buffer_size() > self._hard:
                log.warning("slow consumer cut off", extra={"user_id": self.user_id})
                self.close(CloseCode.SLOW_CONSUMER, "slow_consumer")
                return
        transport.write(frame)
        TALLY.frames_out += 1

    def revoke(self) -> None:
        """No more events; close once requests already in flight have their replies (the
        revocation may be one of them)."""
        self.revoked = True
        if not self.requests.busy:
            self.close(CloseCode.POLICY_VIOLATION, ErrorCode.TOKEN_REVOKED.value)

    def close(self, code: CloseCode, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        metrics.CLOSES.labels(code=str(int(code))).inc()
        self.closer = self._node.spawn(self._close(code, reason))

    async def _close(self, code: CloseCode, reason: str) -> None:
        # websockets' close() first waits for the write buffer to drain, which a client that
        # stopped reading never lets happen: bound it, then drop the connection.
        try:
            await asyncio.wait_for(self.ws.close(code, reason), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._transport.abort()


class Slots:
    """A per-connection bound on requests in flight; a lighter asyncio.Semaphore (there is
    one per connection, and most never wait)."""

    __slots__ = ("_free", "_size", "_waiter")

    def __init__(self, size: int) -> None:
        self._free = self._size = size
        self._waiter: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return self._free < self._size

    async def acquire(self) -> None:
        while self._free <= 0:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._free -= 1

    def release(self) -> None:
        self._free += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None


class Node:
    """One chat node: storage, bus, journal, hub and the websocket server."""

    def __init__(
        self, settings: Settings, *, db: Database | None = None, bus: Bus | None = None
    ) -> None:
        self.settings = settings
        self._db = db
        self._bus = bus
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._draining = False
        self._subscribed: set[int] = set()
        self._subscribe_locks: dict[int, asyncio.Lock] = {}
        self._peers: set[Peer] = set()
        self.services: Services
        self.replay: ReplayLog
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        db = self._db or await open_database(self.settings.database_url, self.settings.sqlite_path)
        try:
            await self._start(db)
        except BaseException:
            if self._bus is not None:
                await self._bus.close()
            await db.close()  # an open aiosqlite connection would keep the process alive
            raise

    async def _start(self, db: Database) -> None:
        secret = await token_secret(db, self.settings.secret_key)
        self.settings = s = self.settings.model_copy(update={"secret_key": secret})
        bus: Bus
        replay: ReplayLog
        hub = Hub(framer=text_frame)
        cluster: ClusterPresence | None = None
        if self._bus is not None:
            bus, replay = self._bus, DatabaseLog(db, s.replay_window_s, s.replay_max_events)
        elif s.redis_url:
            from chat.bus.redis import RedisBus

            redis_bus = RedisBus(
                s.redis_url, db, window_s=s.replay_window_s, max_events=s.replay_max_events
            )
            await redis_bus.start()
            bus = replay = redis_bus
            cluster = ClusterPresence(
                redis_bus.client,
                s.node_id,
                hub.deliver,
                ttl_s=s.presence_ttl_s,
                poll_s=s.presence_poll_s,
            )
        else:
            bus, replay = LocalBus(), DatabaseLog(db, s.replay_window_s, s.replay_max_events)
        hub.on_last_peer = self._unsubscribe
        journal = Journal(db, bus, on_commit=metrics.observe_commit)
        presence = Presence(bus, s.typing_interval_s, cluster)
        self.services = Services(settings=s, db=db, journal=journal, hub=hub, presence=presence)
        self.replay = replay
        self._bus = bus
        self._server = await serve(
            self._connection,
            s.host,
            s.port,
            process_request=self._process_request,
            compression=None,
            max_size=s.max_frame_bytes,
            max_queue=16,
            open_timeout=s.handshake_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=_CLOSE_TIMEOUT_S,
            origins=self._origins(),
            backlog=s.listen_backlog,
            server_header=f"chat/{__version__}",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.spawn(self._watch_heartbeats())
        self.spawn(presence.run())
        log.info("listening", extra={"host": s.host, "port": self.port, "store": db.dialect})

    def _origins(self) -> list[Origin | None] | None:
        if "*" in self.settings.allowed_origins:
            return None
        return [None, *(Origin(o) for o in self.settings.allowed_origins)]

    async def stop(self) -> None:
        """Graceful: stop accepting, finish in-flight writes, close sockets with 1012."""
        if self._server is None:
            return
        self._draining = True
        grace = self.settings.shutdown_grace_s
        self._server.close(close_connections=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.services.journal.close(), grace / 2)
        await self._drain(list(self._server.connections))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1)
        assert self._bus is not None
        await self._bus.close()
        await self.services.db.close()
        self._server = None
        log.info("stopped")

    async def _drain(self, connections: list[ServerConnection]) -> None:
        """Close every connection with 1012, spread evenly over ``drain_period_s`` in random
        order, each told to come back after a short random delay: the clients of a node that
        is being deployed reconnect to the others as a trickle, not a storm."""
        period = self.settings.drain_period_s
        random.shuffle(connections)

        async def drain_one(ws: ServerConnection, delay: float) -> None:
            await asyncio.sleep(delay)
            hint = wire.Goodbye(
                reason="service_restart", reconnect_after_ms=random.randint(0, 1000)
            )
            if ws.protocol.state is WsState.OPEN:
                ws.transport.write(text_frame(wire.dump(hint)))
            try:
                await asyncio.wait_for(
                    ws.close(CloseCode.SERVICE_RESTART, "service_restart"), _CLOSE_TIMEOUT_S
                )
            except TimeoutError:
                ws.transport.abort()

        n = len(connections)
        tasks = [
            asyncio.ensure_future(drain_one(ws, period * i / n)) for i, ws in enumerate(connections)
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=period + _CLOSE_TIMEOUT_S + 1)

    async def _watch_heartbeats(self) -> None:
        """Close connections that sent nothing for two heartbeat intervals (4000): a dead
        client, or a zombie connection; the client reconnects and resumes."""
        limit = 2 * self.settings.heartbeat_interval_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            now = loop.time()
            for peer in list(self._peers):
                if now - peer.last_seen > limit:
                    peer.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat_timeout")

    async def _subscribe(self, workspace_id: int) -> None:
        """Once per workspace per node, however many connections arrive at once."""
        if workspace_id in self._subscribed:
            return
        lock = self._subscribe_locks.setdefault(workspace_id, asyncio.Lock())
        async with lock:
            if workspace_id not in self._subscribed:
                assert self._bus is not None
                await self._bus.subscribe(workspace_id, self.services.hub.deliver)
                self._subscribed.add(workspace_id)
        if not lock.locked():
            self._subscribe_locks.pop(workspace_id, None)

    def _unsubscribe(self, workspace_id: int) -> None:
        """The hub's last peer of a workspace left: stop reading its events."""
        self._subscribed.discard(workspace_id)
        if self._bus is not None:
            self._bus.unsubscribe(workspace_id, self.services.hub.deliver)

    def spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ HTTP probes

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            try:
                await asyncio.wait_for(self.services.db.ping(), 2)
            except Exception:
                return ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable\n")
            if self._draining:
                return ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return ws.respond(http.HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            body = metrics.render()
            headers = Headers(
                [
                    ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                ]
            )
            return Response(200, "OK", headers, body)
        return None

    # ------------------------------------------------------------------ connections

    async def _connection(self, ws: ServerConnection) -> None:
        # websockets keeps the handshake request (also in its parser's frame) and response for
        # the connection's lifetime; nothing reads their headers after the handshake, and
        # they are ~2 KB a connection: empty them in place.
        for handshake in (ws.request, ws.response):
            if handshake is not None:
                handshake.headers.clear()
        metrics.CONNECTIONS.inc()
        peer = Peer(self, ws)
        self._peers.add(peer)
        s = self.settings
        loop = asyncio.get_running_loop()
        session = ClientProtocol(
            now=loop.time(),
            requests_per_10s=s.rate_limit_per_10s,
            disconnect_after=s.rate_limit_disconnect_after,
        )
        try:
            if not await self._open(peer, session):
                return
            caller = Caller(peer.user_id, peer.workspace_id, peer.session_id, peer)
            async for message in ws:
                TALLY.frames_in += 1
                peer.last_seen = loop.time()
                verdict = session.receive(message, loop.time())
                if isinstance(verdict, Dispatch):
                    # Bounded concurrency per connection: past the limit we stop reading,
                    # and TCP pushes back on the client.
                    await peer.requests.acquire()
                    self.spawn(self._request(peer, session, caller, verdict.request))
                elif isinstance(verdict, Send | Close):
                    await self._apply(peer, verdict)
                if peer.closing:
                    return
        except ConnectionClosed:
            pass
        finally:
            self._peers.discard(peer)
            if peer.closer is not None:
                # Returning from the handler would close with 1000: finish our close first.
                with contextlib.suppress(Exception):
                    await asyncio.shield(peer.closer)
            metrics.CONNECTIONS.dec()
            if peer.workspace_id:
                self.services.hub.detach(peer.workspace_id, peer)
                metrics.SESSIONS.dec()
                await self.services.presence.disconnected(peer.workspace_id, peer.user_id)

    async def _open(self, peer: Peer, session: ClientProtocol) -> bool:
        """Hello, then the first frame must authenticate. True once the session is open.
        (A function of its own so the auth frame and token are freed when it returns.)"""
        ws = peer.ws
        ws.transport.write(text_frame(wire.dump(self._hello())))
        try:
            async with asyncio.timeout(self.settings.auth_timeout_s):
                first = await ws.recv()
        except TimeoutError:
            peer.close(CloseCode.POLICY_VIOLATION, "auth_timeout")
            return False
        TALLY.frames_in += 1
        verdict = session.receive(first, asyncio.get_running_loop().time())
        if isinstance(verdict, Send | Close):
            await self._apply(peer, verdict)
            return False
        if not isinstance(verdict, Authenticate):  # never: no dispatch before auth
            raise AssertionError(verdict)
        return await self._authenticate(peer, session, verdict.request)

    def _hello(self) -> wire.Hello:
        s = self.settings
        return wire.Hello(
            server_version=__version__,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            limits=wire.Limits(
                max_frame_bytes=s.max_frame_bytes,
                max_text_chars=wire.MAX_TEXT_CHARS,
                requests_per_10s=s.rate_limit_per_10s,
                auth_timeout_ms=int(s.auth_timeout_s * 1000),
            ),
        )

    async def _apply(self, peer: Peer, verdict: Send | Close) -> None:
        if isinstance(verdict, Send):
            metrics.count_error(verdict.frame)
            peer.reply(text_frame(verdict.frame))
            return
        if verdict.frame is not None:
            metrics.count_error(verdict.frame)
            peer.reply(text_frame(verdict.frame))
        peer.close(verdict.code, verdict.reason)

    async def _authenticate(
        self, peer: Peer, session: ClientProtocol, request: wire.Auth | wire.Login
    ) -> bool:
        try:
            identity = await identify(self.settings, self.services.db, request)
        except ChatError as exc:
            await self._apply(
                peer,
                session.fail(
                    request.id, ProtocolViolation(exc.code, CloseCode.POLICY_VIOLATION, exc.message)
                ),
            )
            return False
        except Exception as exc:
            await self._apply(peer, session.fail(request.id, exc))
            peer.close(CloseCode.INTERNAL_ERROR, "internal_error")
            return False
        user = identity.user
        peer.user_id, peer.workspace_id, peer.session_id = (
            user.id,
            user.workspace_id,
            identity.session_id,
        )
        hub = self.services.hub
        await self._subscribe(user.workspace_id)  # before the snapshot below
        hub.attach(user.workspace_id, peer)  # events from here on are buffered for the peer
        metrics.SESSIONS.inc()
        async with self.services.db.connection() as conn:
            as_of, channel_ids = await queries.membership_snapshot(conn, user.workspace_id, user.id)
        backlog: list[Envelope] = []
        resume_error: wire.ResumeError | None = None
        resume = request.resume if isinstance(request, wire.Auth) else None
        if resume is not None:
            if resume.session_id != identity.session_id:
                resume_error = "session_mismatch"
            elif resume.seq > as_of:
                resume_error = "future_seq"
            else:
                missed = await self.replay.replay(user.workspace_id, resume.seq, as_of)
                if missed is None:
                    resume_error = "too_old"
                else:
                    backlog = visible_backlog(user.id, channel_ids, missed)
        session.authenticated()
        peer.reply(
            text_frame(
                session.reply(
                    request.id,
                    wire.SessionInfo(
                        user=user,
                        workspace_id=user.workspace_id,
                        workspace_name=identity.workspace_name,
                        session_id=identity.session_id,
                        seq=as_of,
                        token=identity.token,
                        resumed=resume is not None and resume_error is None,
                        resume_error=resume_error,
                    ),
                )
            )
        )
        if backlog and not await self._stream(peer, backlog):
            return False
        if resume is not None and resume_error is None:
            # Caught up to the snapshot: what follows (buffered since, then live) is live.
            marker = wire.Resumed(seq=as_of, replayed=len(backlog))
            peer.reply(text_frame(wire.dump(marker)))
            metrics.RESUMES.labels(outcome="resumed").inc()
        # Events committed since the snapshot were buffered; they follow.
        if not hub.ready(user.workspace_id, peer, channel_ids, as_of):
            peer.close(CloseCode.SLOW_CONSUMER, "sync_overflow")
            return False
        if resume_error is not None:
            metrics.RESUMES.labels(outcome=resume_error).inc()
        await self.services.presence.connected(user.workspace_id, user.id)
        log.debug("authenticated", extra={"user_id": user.id, "session_id": peer.session_id})
        return True

    async def _stream(self, peer: Peer, backlog: Sequence[Envelope]) -> bool:
        """Write a replay with flow control: a long backlog must not look like a slow
        consumer, nor sit in memory all at once. False if the client stopped reading."""
        chunk: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + 30.0
        transport = peer.ws.transport
        for i, env in enumerate(backlog):
            frame = text_frame(env.payload)
            chunk.append(frame)
            size += len(frame)
            if size < 64 * 1024 and i + 1 < len(backlog):
                continue
            peer.reply(b"".join(chunk))
            chunk, size = [], 0
            while transport.get_write_buffer_size() > self.settings.send_buffer_soft_bytes:
                if peer.closing or asyncio.get_running_loop().time() > deadline:
                    peer.close(CloseCode.SLOW_CONSUMER, "slow_consumer")
                    return False
                await asyncio.sleep(0.005)
        return not peer.closing

    async def _request(
        self,
        peer: Peer,
        session: ClientProtocol,
        caller: Caller,
        request: wire.Request,
    ) -> None:
        started = time.perf_counter()
        try:
            data = await handle(self.services, caller, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._apply(peer, session.fail(request.id, exc))
        else:
            peer.reply(text_frame(session.reply(request.id, data)))
        finally:
            peer.requests.release()
            if peer.revoked and not peer.requests.busy:
                peer.revoke()
            metrics.REQUESTS.labels(type=request.type).observe(  # type: ignore[attr-defined]
                time.perf_counter() - started
            )


async def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully."""
    node = Node(settings)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await node.stop()
