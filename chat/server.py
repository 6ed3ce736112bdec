"""The websocket I/O of a node: feeds sessions, carries out their verdicts, serves HTTP probes.

::

    socket ──text──> ClientProtocol.receive ──Dispatch──> handlers ──> journal ──> DB ──> bus
       ^                                                                               │
       └──────── FrameWriter.write(frame bytes, built once per event) <── Hub <─────────┘

The rules live in sans-I/O units: :mod:`chat.protocol` (each frame), :mod:`chat.connect` (the
connect and resume sequence), :mod:`chat.fanout` (who receives an event). This module only
performs the I/O they ask for. Events are written straight to each connection's transport as
pre-built websocket frames (:mod:`chat.transport`); replies take the same path, so a
connection's frames leave in the order they were produced. A connection whose write buffer
passes the soft mark loses droppable frames (typing, presence); past the hard mark it is
closed with 4001 (reconnect and resume) instead of slowing anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Origin

from chat import __version__, credentials, metrics, wire
from chat.admission import Admission
from chat.bus import Bus, Envelope, LocalBus
from chat.config import Settings
from chat.connect import (
    CheckWindow,
    Connect,
    Effect,
    Identify,
    Live,
    Ready,
    ScanReplay,
    Snapshot,
    StreamReplay,
    Subscribe,
    TakeSnapshot,
)
from chat.errors import ChatError, CloseCode, ErrorCode
from chat.fanout import Hub
from chat.handlers import Caller, Services, handle
from chat.identity import Identifier, Identity
from chat.journal import Journal
from chat.metrics import TALLY
from chat.presence import ClusterPresence, Presence
from chat.protocol import Authenticate, ClientProtocol, Close, Dispatch, Send
from chat.replay import DatabaseLog, ReplayCache, ReplayLog
from chat.retention import Pruner
from chat.service import PATH as SERVICE_PATH
from chat.service import ServiceLink
from chat.snapshots import Abandoned, SnapshotReader
from chat.storage import Database, open_database, secret_key_path, token_secret
from chat.transport import (
    OPEN,
    PING_FRAME,
    Connection,
    FrameWriter,
    set_max_message_size,
    text_frame,
    waited_s,
)

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 2.0
# Requests already accepted get their replies before a close for flooding or revocation;
# this bounds how long the close waits for them.
_FINISH_REQUESTS_S = 10.0
_READY_CACHE_S = 1.0
# The state of the session and user as of the snapshot -> why the connect is refused.
_REFUSALS = {
    "revoked": ErrorCode.TOKEN_REVOKED,
    "expired": ErrorCode.TOKEN_EXPIRED,
    "missing": ErrorCode.INVALID_AUTH,
    "inactive": ErrorCode.ACCOUNT_INACTIVE,
}

__all__ = ["Node", "Peer", "run", "text_frame"]


class Peer(FrameWriter):
    """One websocket connection, as the hub sees it once authenticated."""

    __slots__ = (
        "_corked",
        "_hard",
        "_node",
        "_soft",
        "closer",
        "closing",
        "live",
        "pinged_at",
        "requests",
        "revoked",
        "role",
        "session_id",
        "user_id",
        "workspace_id",
        "ws",
    )

    def __init__(self, node: Node, ws: Connection) -> None:
        super().__init__(ws)
        self._node = node
        self.ws = ws
        self._soft = node.settings.send_buffer_soft_bytes
        self._hard = node.settings.send_buffer_hard_bytes
        self.user_id = 0
        self.workspace_id = 0
        self.session_id = ""
        self.role = "guest"
        self.closing = False
        self.live = False  # set once the connect sequence went live
        self.revoked = False
        self.closer: asyncio.Task[object] | None = None
        self.requests = Slots(node.settings.max_inflight_requests)
        self._corked: list[bytes] | None = None
        self.pinged_at = 0.0

    def send(self, frame: bytes, droppable: bool) -> None:
        # The per-recipient hot path of fan-out: keep it short (FrameWriter's fields, inline).
        if self.closing or self.revoked or self._protocol.state is not OPEN:
            return
        self._write(frame, droppable)

    def reply(self, frame: bytes) -> None:
        """A reply or error frame: still sent after revocation, to requests made before."""
        if self.closing or self._protocol.state is not OPEN:
            return
        self._write(frame, False)

    def ping(self, now: float) -> None:
        """A websocket PING (empty); the client's PONG counts as liveness."""
        if not self.closing and self._protocol.state is OPEN:
            self._transport.write(PING_FRAME)
            self.pinged_at = now

    def cork(self) -> None:
        """Hold frames until :meth:`uncork`, which writes them in one go: a connect's reply,
        replay, marker and buffered events cost one system call, not one each (in a storm,
        the node's time goes to system calls)."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self._protocol.state is OPEN:
            self._transport.write(b"".join(corked))

    def _write(self, frame: bytes, droppable: bool) -> None:
        if self._corked is not None:
            self._corked.append(frame)
            return
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

    def waited_for(self) -> bool:
        """Whether a connect in progress is still worth serving: its client is there, and
        its deadline has not passed."""
        return (
            self.open and not self.closing and asyncio.get_running_loop().time() <= self.ws.deadline
        )

    def revoke(self) -> None:
        """No more events, no new requests; close once the requests already in flight have
        their replies (the revocation may be one of them). While connecting, the connect
        sequence sees ``revoked`` at its next step and answers the ``auth`` itself."""
        if self.revoked:
            return
        self.revoked = True
        if self.live:
            self.close_when_idle(CloseCode.POLICY_VIOLATION, ErrorCode.TOKEN_REVOKED.value)

    def close_when_idle(self, code: CloseCode, reason: str) -> None:
        if not self.requests.busy:
            self.close(code, reason)
            return

        async def later() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.requests.idle(), _FINISH_REQUESTS_S)
            self.close(code, reason)

        self._node.spawn(later())

    def close(self, code: CloseCode, reason: str) -> None:
        if self.closing:
            return
        self.uncork()  # what was written before the close goes before it
        self.closing = True
        metrics.CLOSES.labels(code=str(int(code))).inc()
        self.closer = self._node.spawn(self._close(code, reason))

    async def _close(self, code: CloseCode, reason: str) -> None:
        # websockets' close() first waits for the write buffer to drain, which a client that
        # stopped reading never lets happen: bound it, then drop the connection.
        try:
            await asyncio.wait_for(self.ws.close(code, reason), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.abort()


class Slots:
    """A per-connection bound on requests in flight; a lighter asyncio.Semaphore (there is
    one per connection, and most never wait)."""

    __slots__ = ("_free", "_idle", "_size", "_waiter")

    def __init__(self, size: int) -> None:
        self._free = self._size = size
        self._waiter: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None

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
        if self._free == self._size and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def idle(self) -> None:
        """Wait until no request is in flight."""
        if not self.busy:
            return
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)


class Node:
    """One chat node: storage, bus, journal, hub and the websocket server."""

    def __init__(
        self, settings: Settings, *, db: Database | None = None, bus: Bus | None = None
    ) -> None:
        self.settings = settings
        self._db = db
        self._bus = bus
        self._server: Server | None = None
        self._metrics_server: Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._draining = False
        self._ready_cache: tuple[float, str | None] = (-1e9, None)
        self._subscribed: set[int] = set()
        self._subscribe_locks: dict[int, asyncio.Lock] = {}
        self._peers: set[Peer] = set()
        self._links: set[ServiceLink] = set()
        self._service_keys = credentials.parse_keys(settings.service_keys)
        self.services: Services
        self._identifier: Identifier
        self.snapshots: SnapshotReader
        self.admission = Admission(
            max_connecting=settings.max_connecting,
            budget_s=settings.admission_budget_s,
            # Most of the deadline gone before the node even saw it: with the queue ahead
            # (up to the budget) it would not make it.
            max_wait_s=max(settings.connect_deadline_s - settings.admission_budget_s, 0.5),
        )
        self.replay: ReplayCache
        self.port = 0
        self.metrics_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        db = self._db or await open_database(
            self.settings.database_url, self.settings.sqlite_path, settings=self.settings
        )
        try:
            await self._start(db)
        except BaseException:
            if self._bus is not None:
                await self._bus.close()
            await db.close()  # an open aiosqlite connection would keep the process alive
            raise

    async def _start(self, db: Database) -> None:
        secret = await token_secret(
            db,
            self.settings.secret_key,
            secret_key_path(
                self.settings.database_url, self.settings.sqlite_path, self.settings.secret_key_file
            ),
        )
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
            # One node, but other processes (chat admin) commit too: follow the database.
            bus = LocalBus(db, database_url=s.database_url, poll_s=s.change_poll_s)
            replay = DatabaseLog(db, s.replay_window_s, s.replay_max_events)
        hub.on_last_peer = self._unsubscribe
        journal = Journal(db, bus, on_commit=metrics.observe_commit)
        presence = Presence(bus, s.typing_interval_s, cluster, flush_s=s.presence_flush_s)
        self.services = Services(settings=s, db=db, journal=journal, hub=hub, presence=presence)
        self._identifier = Identifier(s, db)
        metrics.CONNECTING.set_function(lambda: self.admission.pending)
        self.snapshots = SnapshotReader(db)
        self._hello_frame = text_frame(wire.dump(self._hello()))  # the same for every client
        self.replay = ReplayCache(replay)
        self._bus = bus
        self._server = await serve(
            self._connection,
            s.host,
            s.port,
            create_connection=Connection,
            process_request=self._process_request,
            compression=None,
            max_size=s.max_frame_bytes,
            max_queue=16,
            open_timeout=s.handshake_timeout_s,
            # Pings are sent by _watch_heartbeats, not by a task per connection.
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT_S,
            origins=self._origins(),
            backlog=s.listen_backlog,
            server_header=f"chat/{__version__}",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if s.metrics_port is not None:
            self._metrics_server = await serve(
                self._refuse_websocket,
                s.metrics_host,
                s.metrics_port,
                process_request=self._process_metrics_request,
                server_header=f"chat/{__version__}",
            )
            self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self.spawn(self._watch_heartbeats())
        self.spawn(presence.run())
        self.spawn(Pruner(db, s).run())
        log.info(
            "listening",
            extra={
                "host": s.host,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "store": db.dialect,
            },
        )

    def _origins(self) -> list[Origin | None] | None:
        if "*" in self.settings.allowed_origins:
            return None
        return [None, *(Origin(o) for o in self.settings.allowed_origins)]

    async def stop(self) -> None:
        """Graceful and bounded: refuse new connections (the listener stays open, so probes
        answer 503 "draining"), finish queued writes, close sockets with 1012 spread over the
        drain period, then cancel what is left. Whatever is stuck, this returns within about
        ``shutdown_grace_s + drain_period_s`` plus a few close timeouts."""
        if self._server is None:
            return
        self._draining = True
        grace = self.settings.shutdown_grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.services.journal.close(), grace / 2)
        await self._drain(list(self._server.connections))
        self._server.close(close_connections=False)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=grace / 2)
            for task in stuck:
                log.error("task did not stop when cancelled", extra={"task": repr(task)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1)
        self._identifier.close()
        await self.snapshots.close()
        assert self._bus is not None
        await _bounded(self._bus.close(), grace / 2, "bus close")
        await _bounded(self.services.db.close(), grace / 2, "database close")
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
            writer = FrameWriter(ws)
            is_link = isinstance(ws, Connection) and ws.service_subject is not None
            if writer.open and not is_link:
                writer.write(text_frame(wire.dump(hint)))
            try:
                await asyncio.wait_for(
                    ws.close(CloseCode.SERVICE_RESTART, "service_restart"), _CLOSE_TIMEOUT_S
                )
            except TimeoutError:
                writer.abort()

        n = len(connections)
        tasks = [
            asyncio.ensure_future(drain_one(ws, period * i / n)) for i, ws in enumerate(connections)
        ]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=period + _CLOSE_TIMEOUT_S + 1)
            for task in late:
                task.cancel()

    async def _watch_heartbeats(self) -> None:
        """Ping connections quiet for ``ping_interval_s`` (a websocket PING: browsers answer
        it themselves), and close those that sent nothing at all (no frame, not even a ping
        or pong) for two heartbeat intervals (4000): a dead client, or a zombie connection;
        the client reconnects and resumes. One loop for all connections, rather than
        websockets' keepalive task per connection (a task, a timer and a future each)."""
        limit = 2 * self.settings.heartbeat_interval_ms / 1000
        ping_after = self.settings.ping_interval_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(limit / 4, ping_after / 2, 5.0))
            now = loop.time()
            for peer in list(self._peers):
                last_seen = peer.ws.last_seen
                if now - last_seen > limit:
                    peer.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat_timeout")
                elif now - max(last_seen, peer.pinged_at) >= ping_after:
                    peer.ping(now)
            for link in list(self._links):
                link.heartbeat(now, limit, ping_after)

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
            problem = await self._not_ready()
            if problem is not None:
                return ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, problem + "\n")
            return ws.respond(http.HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            return ws.respond(http.HTTPStatus.NOT_FOUND, "served on the metrics listener\n")
        if self._draining:
            # Still listening so that probes see the drain; new sessions go elsewhere.
            response = ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            response.headers["Retry-After"] = "1"
            return response
        assert isinstance(ws, Connection)
        if path == SERVICE_PATH:
            return self._service_upgrade(ws, request)
        waited = waited_s(ws.transport)
        stale = self.admission.stale
        hint_ms = self.admission.admit(waited)
        if hint_ms is not None:
            when = "waited_too_long" if self.admission.stale > stale else "at_upgrade"
            metrics.ADMISSION_REFUSED.labels(when=when).inc()
            return _overloaded(hint_ms)
        loop = asyncio.get_running_loop()
        ws.admit(self._connect_ended, loop.time() + self.settings.connect_deadline_s - waited)
        return None

    def _service_upgrade(self, ws: Connection, request: Request) -> Response | None:
        """An edge node's service connection: its credential, checked before the upgrade (a
        bare 401 either way: the reason is logged, not told). Not counted by admission
        control; each session attached over it is."""
        token = credentials.bearer(request.headers.get("Authorization"))
        try:
            if token is None:
                raise credentials.CredentialError("no bearer credential")
            claims = credentials.verify(self._service_keys, token)
        except credentials.CredentialError as exc:
            metrics.SERVICE_REFUSED.inc()
            log.warning("service connection refused", extra={"why": str(exc)})
            response = ws.respond(http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="chat-service"'
            return response
        ws.service_subject = claims.subject
        # Relayed client frames carry a 5-byte prefix; nothing else an edge sends is larger.
        set_max_message_size(ws, self.settings.max_frame_bytes + 1024)
        return None

    async def identify(self, request: wire.Auth | wire.Login, *, peer_ip: str | None) -> Identity:
        """Who a request to attach a session is from (a client's auth, or one relayed)."""
        return await self._identifier.identify(request, peer_ip=peer_ip)

    async def subscribe(self, workspace_id: int) -> None:
        """Make sure this node reads the workspace's events."""
        await self._subscribe(workspace_id)

    def _connect_ended(self, served: bool) -> None:
        self.admission.finished(served=served)

    async def _not_ready(self) -> str | None:
        """Why this node should get no new clients, or None. The database ping is cached
        briefly: a load balancer probing often must not cost a query each time."""
        if self._draining:
            return "draining"
        bus_healthy = getattr(self._bus, "healthy", True)
        if not bus_healthy:
            return "bus unavailable"
        loop = asyncio.get_running_loop()
        checked_at, problem = self._ready_cache
        if loop.time() - checked_at < _READY_CACHE_S:
            return problem
        try:
            await asyncio.wait_for(self.services.db.ping(), 2)
            problem = None
        except Exception:
            problem = "database unavailable"
        self._ready_cache = (loop.time(), problem)
        return problem

    async def _process_metrics_request(self, ws: ServerConnection, request: Request) -> Response:
        if request.path.split("?", 1)[0] != "/metrics":
            return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        body = metrics.render()
        headers = Headers(
            [
                ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ]
        )
        return Response(200, "OK", headers, body)

    async def _refuse_websocket(self, ws: ServerConnection) -> None:
        await ws.close(CloseCode.POLICY_VIOLATION, "not a websocket endpoint")

    # ------------------------------------------------------------------ connections

    async def _connection(self, ws: ServerConnection) -> None:
        assert isinstance(ws, Connection)  # serve(create_connection=Connection)
        if ws.service_subject is not None:
            await self._service_connection(ws, ws.service_subject)
            return
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
        protocol = ClientProtocol(
            now=loop.time(),
            requests_per_10s=s.rate_limit_per_10s,
            disconnect_after=s.rate_limit_disconnect_after,
        )
        sequence = Connect(protocol, self.services.hub, peer)
        try:
            live = await self._open(peer, protocol, sequence)
            peer.ws.release(live)
            if not live:
                return
            metrics.SESSIONS.inc()
            caller = Caller(peer.user_id, peer.workspace_id, peer.session_id, peer)
            async for message in ws:
                TALLY.frames_in += 1
                verdict = protocol.receive(message, loop.time())
                if isinstance(verdict, Dispatch):
                    if peer.revoked:
                        # Revoked while earlier requests finish: refuse new ones.
                        revoked = ChatError(ErrorCode.TOKEN_REVOKED)
                        self._apply(peer, protocol.fail(verdict.request.id, revoked))
                        continue
                    # Bounded concurrency per connection: past the limit we stop reading,
                    # and TCP pushes back on the client.
                    await peer.requests.acquire()
                    self.spawn(self._request(peer, protocol, caller, verdict.request))
                elif isinstance(verdict, Close):
                    # Flooding: every request accepted before gets its reply first.
                    if verdict.frame is not None:
                        self._reply(peer, verdict.frame)
                    await _bounded(peer.requests.idle(), _FINISH_REQUESTS_S, "requests")
                    peer.close(verdict.code, verdict.reason)
                    return
                elif isinstance(verdict, Send):
                    self._reply(peer, verdict.frame)
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
            if sequence.close():  # detached from the hub; True only if it had gone live
                metrics.SESSIONS.dec()
                await self.services.presence.disconnected(peer.workspace_id, peer.user_id)

    async def _service_connection(self, ws: Connection, subject: str) -> None:
        for handshake in (ws.request, ws.response):
            if handshake is not None:
                handshake.headers.clear()  # the credential included
        link = ServiceLink(self, ws, subject)
        self._links.add(link)
        metrics.SERVICE_CONNECTIONS.inc()
        try:
            await link.run()
        except ConnectionClosed:
            pass
        finally:
            self._links.discard(link)
            metrics.SERVICE_CONNECTIONS.dec()

    async def _open(self, peer: Peer, protocol: ClientProtocol, sequence: Connect) -> bool:
        """Hello, then the first frame must authenticate. True once the session is live.
        (A function of its own so the auth frame and token are freed when it returns.)"""
        ws = peer.ws
        peer.write(self._hello_frame)
        try:
            async with asyncio.timeout(self.settings.auth_timeout_s):
                first = await ws.recv()
        except TimeoutError:
            peer.close(CloseCode.POLICY_VIOLATION, "auth_timeout")
            return False
        TALLY.frames_in += 1
        verdict = protocol.receive(first, asyncio.get_running_loop().time())
        if isinstance(verdict, Send | Close):
            self._apply(peer, verdict)
            return False
        if not isinstance(verdict, Authenticate):  # never: no dispatch before auth
            raise AssertionError(verdict)
        return await self._connect(peer, sequence, sequence.start(verdict.request))

    async def _connect(self, peer: Peer, sequence: Connect, effects: list[Effect]) -> bool:
        """Carry out the connect sequence (what it writes leaves in one write, see
        :meth:`Peer.cork`)."""
        peer.cork()
        try:
            return await self._steps(peer, sequence, effects)
        finally:
            peer.uncork()

    async def _steps(self, peer: Peer, sequence: Connect, effects: list[Effect]) -> bool:
        """The effects of each step, and its I/O. A connect whose client has gone stops;
        one past its deadline is told to come back later."""
        loop = asyncio.get_running_loop()
        while True:
            action: Effect | None = None
            for effect in effects:
                if isinstance(effect, Send):
                    peer.reply(text_frame(effect.frame))
                elif isinstance(effect, Close):
                    self._apply(peer, effect)
                    return False
                elif isinstance(effect, Live):
                    peer.live = True
                    await self.services.presence.connected(effect.workspace_id, effect.user_id)
                    return True
                else:
                    action = effect
            if peer.closing or not peer.open:
                return False
            if loop.time() > peer.ws.deadline:
                self._send_away(peer)
                return False
            try:
                effects = await self._perform(peer, sequence, action)
            except asyncio.CancelledError:
                raise
            except Abandoned:
                return False
            except Exception as exc:
                effects = sequence.failed(exc)

    async def _perform(self, peer: Peer, sequence: Connect, action: Effect | None) -> list[Effect]:
        if isinstance(action, Identify):
            address = peer.ws.remote_address
            peer_ip = str(address[0]) if address else None
            identity = await self._identifier.identify(action.request, peer_ip=peer_ip)
            peer.user_id, peer.workspace_id = identity.user_id, identity.workspace_id
            peer.session_id = identity.session_id
            return sequence.identified(identity)
        if isinstance(action, Subscribe):
            await self._subscribe(action.workspace_id)
            return sequence.subscribed()
        if isinstance(action, TakeSnapshot):
            row = await self.snapshots.read(
                action.workspace_id, action.user_id, action.session_id, peer.waited_for
            )
            if row.user is not None:
                peer.role = row.user.role
            snapshot = Snapshot(
                row.as_of, row.channel_ids, row.user, row.workspace_name, _REFUSALS.get(row.session)
            )
            return sequence.snapshot_taken(snapshot)
        if isinstance(action, CheckWindow):
            holds = await self.replay.holds(action.workspace_id, action.after_seq, action.up_to)
            return sequence.window_checked(holds)
        if isinstance(action, ScanReplay):
            async for chunk in self._read(action.workspace_id, action.after_seq, action.up_to):
                sequence.scan(chunk)
            return sequence.scanned()
        if isinstance(action, StreamReplay):
            if not action.cached:
                peer.uncork()  # a long replay: written with flow control, chunk by chunk
            chunks = action.cached or self._read(
                action.workspace_id, action.after_seq, action.up_to
            )
            if not await self._stream(peer, sequence, chunks):
                return [Close(CloseCode.SLOW_CONSUMER, "slow_consumer")]
            return sequence.streamed()
        if isinstance(action, Ready):
            return sequence.ready()
        raise AssertionError(f"no action to perform: {action!r}")

    def _read(
        self, workspace_id: int, after_seq: int, up_to: int
    ) -> AsyncIterator[Sequence[Envelope]]:
        return self.replay.read(workspace_id, after_seq, up_to)

    async def _stream(
        self,
        peer: Peer,
        sequence: Connect,
        chunks: AsyncIterator[Sequence[Envelope]] | Sequence[Sequence[Envelope]],
    ) -> bool:
        """Write a replay with flow control: a long backlog must not look like a slow
        consumer, nor sit in memory all at once. False if the client stopped reading."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        soft = self.settings.send_buffer_soft_bytes

        async def each() -> AsyncIterator[Sequence[Envelope]]:
            if isinstance(chunks, Sequence):
                for chunk in chunks:
                    yield chunk
            else:
                async for chunk in chunks:
                    yield chunk

        async for chunk in each():
            if peer.revoked:
                break  # the sequence refuses at its next step; no more of the replay
            payloads = sequence.visible(chunk)
            if payloads:
                peer.reply(b"".join([text_frame(p) for p in payloads]))
            while peer.buffered() > soft:
                if peer.closing or loop.time() > deadline:
                    return False
                await asyncio.sleep(0.005)
            if peer.closing:
                return False
        return True

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

    def _send_away(self, peer: Peer) -> None:
        """A connect past its deadline: come back later (the client has likely given up)."""
        metrics.ADMISSION_REFUSED.labels(when="past_deadline").inc()
        hint = wire.Goodbye(reason="overloaded", reconnect_after_ms=self.admission.hint_ms())
        peer.reply(text_frame(wire.dump(hint)))
        peer.close(CloseCode.TRY_AGAIN_LATER, "overloaded")

    def _reply(self, peer: Peer, frame: bytes) -> None:
        metrics.count_error(frame)
        peer.reply(text_frame(frame))

    def _apply(self, peer: Peer, verdict: Send | Close) -> None:
        if verdict.frame is not None:
            self._reply(peer, verdict.frame)
        if isinstance(verdict, Close):
            peer.close(verdict.code, verdict.reason)

    async def _request(
        self,
        peer: Peer,
        protocol: ClientProtocol,
        caller: Caller,
        request: wire.Request,
    ) -> None:
        started = time.perf_counter()
        try:
            data = await handle(self.services, caller, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = protocol.fail(request.id, exc)
            if isinstance(exc, ChatError) and exc.code is ErrorCode.TOKEN_REVOKED:
                peer.revoke()  # the session was revoked: a handler noticed it first
            self._apply(peer, verdict)
        else:
            peer.reply(text_frame(protocol.reply(request.id, data)))
        finally:
            peer.requests.release()
            metrics.REQUESTS.labels(type=request.type).observe(  # type: ignore[attr-defined]
                time.perf_counter() - started
            )


def _overloaded(hint_ms: int) -> Response:
    """HTTP 503 refusing an upgrade, with the retry hint both ways: ``Retry-After`` (whole
    seconds, for HTTP clients and proxies) and a ``goodbye`` body (milliseconds)."""
    body = wire.dump(wire.Goodbye(reason="overloaded", reconnect_after_ms=hint_ms))
    headers = Headers(
        [
            ("Retry-After", str(max(1, -(-hint_ms // 1000)))),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(503, "Service Unavailable", headers, body)


async def _bounded(awaitable: Awaitable[object], timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        log.warning("gave up waiting", extra={"for": what, "timeout_s": timeout})


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
