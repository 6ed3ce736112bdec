"""A chat node: its database, bus, journal and hub behind the front door.

::

    socket ──text──> ClientProtocol.receive ──Dispatch──> handlers ──> journal ──> DB ──> bus
       ^                                                                               │
       └──────── FrameWriter.write(frame bytes, built once per event) <── Hub <─────────┘

The rules live in sans-I/O units: :mod:`chat.protocol` (each frame), :mod:`chat.connect` (the
connect and resume sequence), :mod:`chat.fanout` (who receives an event). What every tier
clients connect to does alike (probes, admission control, the connect driver, the request
loop, heartbeats, drain) is :class:`chat.front.Front`; this module performs what each step
means on a chat node: the sequence's actions against the database and the bus, requests
through the handlers, and service connections from edge nodes (:mod:`chat.service`).
"""

from __future__ import annotations

import asyncio
import http
import logging

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chat import credentials, metrics, wire
from chat.bus import Bus, LocalBus
from chat.config import Settings
from chat.connect import (
    Connect,
    Effect,
    Identify,
    Live,
    Snapshot,
    Subscribe,
    TakeSnapshot,
)
from chat.front import Front, bounded, serve_until_signalled
from chat.handlers import Caller, Services, handle
from chat.handlers.cached import Caches
from chat.identity import Identifier, Identity
from chat.journal import Journal
from chat.peer import Peer
from chat.presence import ClusterPresence, Presence
from chat.protocol import ClientProtocol
from chat.replay import DatabaseLog, ReplayCache, ReplayLog
from chat.retention import Pruner
from chat.service import PATH as SERVICE_PATH
from chat.service import ServiceLink
from chat.snapshots import REFUSALS, SnapshotReader
from chat.storage import Database, open_database, queries, secret_key_path, token_secret
from chat.transport import (
    Connection,
    set_max_message_size,
    text_frame,
)

log = logging.getLogger(__name__)

_READY_CACHE_S = 1.0

__all__ = ["Node", "Peer", "run", "text_frame"]


class Node(Front):
    """One chat node: storage, bus, journal, hub and the websocket server."""

    def __init__(
        self, settings: Settings, *, db: Database | None = None, bus: Bus | None = None
    ) -> None:
        super().__init__(settings)
        self.settings = settings
        self._db = db
        self._bus = bus
        self._ready_cache: tuple[float, str | None] = (-1e9, None)
        self._subscribed: set[int] = set()
        self._subscribe_locks: dict[int, asyncio.Lock] = {}
        self._links: set[ServiceLink] = set()
        self._service_keys = credentials.parse_keys(settings.service_keys)
        self.setup_required = False  # at start: the database had no workspace (open setup)
        self.services: Services
        self._identifier: Identifier
        self.snapshots: SnapshotReader

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
        hub = self.hub
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
        caches = Caches(db, bus)
        hub.on_last_peer = caches.chain(hub.on_last_peer)  # a cache lives while peers do
        self.services = Services(
            settings=s, db=db, journal=journal, hub=hub, presence=presence, caches=caches
        )
        self._identifier = Identifier(
            s, db, journal=journal, on_setup=lambda: self.announce_setup(False)
        )
        if s.open_setup:
            async with db.connection() as conn:
                self.setup_required = not await queries.any_workspace(conn)
            self.announce_setup(self.setup_required)
        metrics.CONNECTING.set_function(lambda: self.admission.pending)
        self.snapshots = SnapshotReader(db)
        self.replay = ReplayCache(replay)
        self._bus = bus
        await self._listen()
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

    async def stop(self) -> None:
        """Graceful and bounded: refuse new connections (the listener stays open, so probes
        answer 503 "draining"), finish queued writes, close sockets with 1012 spread over the
        drain period, then cancel what is left. Whatever is stuck, this returns within about
        ``shutdown_grace_s + drain_period_s`` plus a few close timeouts."""
        grace = self.settings.shutdown_grace_s
        if not await self._close_front(before_drain=self.services.journal.close):
            return
        self._identifier.close()
        await self.snapshots.close()
        assert self._bus is not None
        await bounded(self._bus.close(), grace / 2, "bus close")
        await bounded(self.services.db.close(), grace / 2, "database close")
        log.info("stopped")

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

    # ------------------------------------------------------------------ HTTP probes

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == SERVICE_PATH and not self._draining:
            assert isinstance(ws, Connection)
            return self._service_upgrade(ws, request)
        return await super()._process_request(ws, request)

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

    async def identify(self, request: wire.FirstFrame, *, peer_ip: str | None) -> Identity:
        """Who a request to attach a session is from (a client's auth, or one relayed)."""
        return await self._identifier.identify(request, peer_ip=peer_ip)

    async def subscribe(self, workspace_id: int) -> None:
        """Make sure this node reads the workspace's events."""
        await self._subscribe(workspace_id)

    async def _problem(self) -> str | None:
        """Why this node should get no new clients, or None. The database ping is cached
        briefly: a load balancer probing often must not cost a query each time."""
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

    # ------------------------------------------------------------------ connections

    async def _connection(self, ws: ServerConnection) -> None:
        assert isinstance(ws, Connection)  # serve(create_connection=Connection)
        if ws.service_subject is not None:
            await self._service_connection(ws, ws.service_subject)
        else:
            await super()._connection(ws)

    async def _dispatch(
        self, peer: Peer, protocol: ClientProtocol, request: wire.Request, text: str
    ) -> None:
        caller = Caller(peer.user_id, peer.workspace_id, peer.session_id, peer)
        self.spawn(self._request(peer, protocol, caller, request))

    async def _went_live(self, peer: Peer, live: Live) -> None:
        await self.services.presence.connected(live.workspace_id, live.user_id)

    async def _ended(self, peer: Peer, was_live: bool) -> None:
        if was_live:
            await self.services.presence.disconnected(peer.workspace_id, peer.user_id)

    def _heartbeat_more(self, now: float, limit: float, ping_after: float) -> None:
        for link in list(self._links):
            link.heartbeat(now, limit, ping_after)

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
                row.as_of, row.channel_ids, row.user, row.workspace_name, REFUSALS.get(row.session)
            )
            return sequence.snapshot_taken(snapshot)
        return await self._perform_replay(peer, sequence, action)

    async def _request(
        self,
        peer: Peer,
        protocol: ClientProtocol,
        caller: Caller,
        request: wire.Request,
    ) -> None:
        await self._respond(peer, protocol, request, handle(self.services, caller, request))


async def run(settings: Settings, *, demo: bool = False) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully. Once listening, print where
    to open the web client (on stdout); with ``demo``, seed the demo workspace first and
    print how to sign in (chat/demo.py)."""
    from chat import demo as demo_workspace

    tokens = await demo_workspace.prepare(settings) if demo else None
    node = Node(settings)

    async def started() -> None:
        host = settings.host if settings.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        if tokens is not None:
            await demo_workspace.converse(f"ws://{host}:{node.port}/", tokens)
        text = demo_workspace.banner(
            f"http://{host}:{node.port}/", setup_required=node.setup_required, demo=demo
        )
        print(text, flush=True)

    await serve_until_signalled(node, started)
