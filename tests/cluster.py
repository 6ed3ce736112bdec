"""Multi-node test clusters: a throwaway Redis, chat node processes, a seeded workspace.

No pytest dependency (the fixtures live in ``tests/conftest.py``). Typical use::

    with TempRedis() as redis:                              # redis-server on a free port
        node = ChatNodeProcess("a", database_url=dsn, redis_url=redis.url)
        with node:                                          # start() waits for /readyz
            async with Client.connect(node.url, token) as client: ...
            node.kill()                                     # SIGKILL: a crash
            node.restart()                                  # same port again

    async with Cluster(dsn, n_nodes=3) as cluster:          # own TempRedis + 3 nodes
        seeded = await cluster.seed()                       # or before start(): see below
        async with cluster.client(0, "alice") as alice: ...

    async with Cluster(dsn, n_nodes=2, n_flannel=2) as cluster:    # + 2 Flannel nodes
        async with cluster.flannel_client(0, "alice") as alice: ...  # through Flannel
        cluster.flannel(0).metric("flannel_workspace_loads_total")

* :class:`TempRedis` runs ``redis-server`` without persistence (``save ""``,
  ``appendonly no``): a restart comes back empty, on the same port, which is what
  failure tests want to provoke.
* :class:`ChatNodeProcess` runs ``python -m chat serve`` on a loopback port with the
  shared database, Redis and secret; its stdout/stderr go to a log file whose tail is
  in every error.
* :class:`FlannelNodeProcess` runs ``python -m flannel serve`` (the edge tier,
  docs/flannel.md) in front of chat nodes' ``/service`` URLs, signing its service
  credentials with :data:`SERVICE_KEY`.
* :class:`Cluster` ties one PostgreSQL database, one TempRedis, N chat nodes and M
  Flannel nodes together, migrates before starting nodes, starts Flannel after the chat
  nodes, and seeds through :class:`chat.admin.Admin`.
* Both kinds of node read their own ``/metrics`` listener: ``node.metric(name, labels)``.

The process machinery (:class:`ServerProcess`, :class:`TempRedis`, the reaper, bounded
starts) lives in ``chat/cluster/processes.py`` and seeding in
:func:`chat.cluster.launcher.seed_workspace`, shared with ``chat cluster up``; this module
adds what tests configure themselves (fixed secrets, an external database, no HAProxy).
For the whole topology through HAProxy use :class:`chat.cluster.launcher.LocalCluster`
(the ``make_local_cluster`` fixture).

Every process is started in its own session (a terminal's ^C meant for pytest does
not hit it), stopped by PID only, and every wait is bounded. If the test process dies
without stopping them (SIGKILL, ``os._exit``), a small reaper process kills whatever we
registered with it, checking the PID's start time so a recycled PID is never hit.

The synchronous methods block; in async tests prefer the ``a``-prefixed variants of the
node methods that wait for a while (``astart``, ``aterminate``, ``arestart``, ``astop``,
``akill``, ``ametric``):
a test whose event loop is blocked cannot answer a stopping node's close handshake.
Redis operations take milliseconds and have no async variants.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from chat.admin import Admin
from chat.client import Client
from chat.cluster.launcher import DEFAULT_HANDLES, SeededWorkspace, seed_workspace
from chat.cluster.processes import (  # the process machinery lives with the launcher
    REDIS_SERVER_ENV,
    ClusterError,
    ServerProcess,
    TempRedis,
    http_get,
    parse_metric,
    start_all,
)
from chat.cluster.topology import chat_environment, flannel_environment
from chat.config import Settings
from chat.storage import open_database

__all__ = [
    "REDIS_SERVER_ENV",
    "ChatNodeProcess",
    "Cluster",
    "ClusterError",
    "FlannelNodeProcess",
    "SeededWorkspace",
    "ServerProcess",
    "TempRedis",
    "http_get",
    "parse_metric",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "cluster-test-secret-key-0123456789-abcdefghijklmnop"
# Service connections (docs/flannel.md): every cluster's chat nodes accept this key, and its
# Flannel nodes sign their credentials with it.
SERVICE_KID = "cluster"
SERVICE_SECRET = "cluster-service-secret-0123456789-abcdefghijklmnop"
SERVICE_KEY = f"{SERVICE_KID}={SERVICE_SECRET}"


# --------------------------------------------------------------------------- chat nodes


class ChatNodeProcess(ServerProcess):
    """``python -m chat serve`` with the settings every chat node gets
    (:func:`chat.cluster.topology.chat_environment`, as in the launcher): ``CHAT_DATABASE_URL``,
    ``CHAT_REDIS_URL`` (empty: no Redis), ``CHAT_NODE_ID`` (the name), ``CHAT_SECRET_KEY``,
    ``CHAT_METRICS_PORT``, ``CHAT_SERVICE_KEYS`` (empty: no Flannel may connect),
    ``CHAT_LOG_FORMAT=text``; plus ``CHAT_LOG_LEVEL=info``; see :class:`ServerProcess`."""

    module = "chat"
    kind = "node"
    cwd = REPO_ROOT
    prefixes = ("CHAT_",)

    def __init__(
        self,
        name: str,
        *,
        database_url: str,
        redis_url: str = "",
        secret_key: str = SECRET,
        service_keys: str = "",
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__(
            name,
            port=port,
            extra_env=extra_env,
            log_dir=log_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.database_url = database_url
        self.redis_url = redis_url
        self.secret_key = secret_key
        self.service_keys = service_keys

    @property
    def service_url(self) -> str:
        """Where edge nodes open service connections (docs/flannel.md)."""
        return f"ws://127.0.0.1:{self.port}/service"

    def settings_env(self) -> dict[str, str]:
        env = chat_environment(  # what the launcher's nodes get, with the test's values
            self.name,
            host="127.0.0.1",
            port=self.port,
            database_url=self.database_url,
            redis_url=self.redis_url,
            token_secret=self.secret_key,
            service_keys=self.service_keys,
            metrics_port=self.metrics_port,
        )
        env["CHAT_LOG_LEVEL"] = "info"
        return env


# --------------------------------------------------------------------------- Flannel nodes


class FlannelNodeProcess(ServerProcess):
    """``python -m flannel serve``: an edge node in front of the chat nodes at ``upstream``
    (their ``/service`` URLs; a plain list attribute, read at each start).

    Environment (:func:`chat.cluster.topology.flannel_environment`, as in the launcher, plus
    test knobs): ``FLANNEL_UPSTREAM`` (JSON), ``FLANNEL_SERVICE_KEY`` (one of the chat
    nodes' ``CHAT_SERVICE_KEYS``), ``FLANNEL_UPSTREAM_CONNECTIONS``, ``FLANNEL_NODE_ID``
    (the name), ``FLANNEL_METRICS_PORT``, a fast upstream reconnect backoff (0.05 s, capped
    at 0.5 s), ``FLANNEL_LOG_FORMAT=text``, ``FLANNEL_LOG_LEVEL=info``, then ``extra_env``.
    ``/readyz`` answers 200 once an upstream connection is up: a node whose credential the
    chat tier refuses never becomes ready (use :meth:`spawn`, not :meth:`start`, for one).
    """

    module = "flannel"
    kind = "flannel"
    cwd = REPO_ROOT

    def __init__(
        self,
        name: str,
        *,
        upstream: Sequence[str],
        service_key: str = SERVICE_KEY,
        upstream_connections: int = 2,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__(
            name,
            port=port,
            extra_env=extra_env,
            log_dir=log_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.upstream: list[str] = list(upstream)
        self.service_key = service_key
        self.upstream_connections = upstream_connections

    def settings_env(self) -> dict[str, str]:
        env = flannel_environment(  # what the launcher's nodes get, with the test's values
            self.name,
            host="127.0.0.1",
            port=self.port,
            upstream=self.upstream,
            service_key=self.service_key,
            metrics_port=self.metrics_port,
        )
        env |= {
            "FLANNEL_UPSTREAM_CONNECTIONS": str(self.upstream_connections),
            "FLANNEL_UPSTREAM_BACKOFF_S": "0.05",
            "FLANNEL_UPSTREAM_BACKOFF_CAP_S": "0.5",
            "FLANNEL_LOG_LEVEL": "info",
        }
        return env


# --------------------------------------------------------------------------- cluster


class Cluster:
    """One PostgreSQL database, one Redis, N chat node processes, the same secret; and M
    Flannel nodes in front of them.

    ``nodes[i]`` is named ``node0``, ``node1``...; ``flannels[i]`` ``flannel0``...
    ``start()`` starts Redis (if it is not running), migrates the database once
    (concurrent first starts would race on it), then starts every chat node in parallel,
    then every Flannel node in parallel, each with ``FLANNEL_UPSTREAM`` = every chat node's
    ``/service`` URL. ``stop()``/``close()`` stop the Flannel nodes, then the chat nodes
    (SIGTERM, in parallel) and then Redis, if this cluster created it.

    Every chat node accepts :data:`SERVICE_KEY` (``CHAT_SERVICE_KEYS``); Flannel nodes sign
    with it unless given another ``service_key`` (``add_flannel``).
    """

    def __init__(
        self,
        database_url: str,
        *,
        n_nodes: int = 2,
        n_flannel: int = 0,
        redis: TempRedis | None = None,
        use_redis: bool = True,
        secret_key: str = SECRET,
        extra_env: Mapping[str, str] | None = None,
        flannel_env: Mapping[str, str] | None = None,
        upstream_connections: int = 2,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """
        :param n_flannel: Flannel nodes in front of the chat nodes (started after them).
        :param redis: a TempRedis to use (left running by close()); None creates one.
        :param use_redis: False: no Redis at all, nodes get an empty CHAT_REDIS_URL.
        :param extra_env: extra environment for every chat node (see ChatNodeProcess).
        :param flannel_env: extra environment for every Flannel node.
        :param upstream_connections: each Flannel node's FLANNEL_UPSTREAM_CONNECTIONS.
        :param log_dir: where node logs go (default: a temp dir per node, deleted).
        """
        self.database_url = database_url
        self.secret_key = secret_key
        self.extra_env: dict[str, str] = dict(extra_env or {})
        self.flannel_env: dict[str, str] = dict(flannel_env or {})
        self.upstream_connections = upstream_connections
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._own_redis = use_redis and redis is None
        self.redis: TempRedis | None = None
        if use_redis:
            self.redis = redis if redis is not None else TempRedis()
        self.nodes: list[ChatNodeProcess] = []
        self.flannels: list[FlannelNodeProcess] = []
        self.seeded: SeededWorkspace | None = None  # the last seed()
        for _ in range(n_nodes):
            self._new_node()
        for _ in range(n_flannel):
            self._new_flannel()

    @property
    def redis_url(self) -> str:
        """The Redis URL nodes get: empty without Redis or before it first started."""
        if self.redis is None or self.redis.port_or_none is None:
            return ""
        return self.redis.url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def service_urls(self) -> list[str]:
        """Every chat node's ``/service`` URL: what Flannel nodes connect to."""
        return [node.service_url for node in self.nodes]

    @property
    def flannel_urls(self) -> list[str]:
        return [f.url for f in self.flannels]

    def flannel(self, index: int) -> FlannelNodeProcess:
        return self.flannels[index]

    def chat_metric(self, name: str, labels: str = "") -> float:
        """A metric summed over the running chat nodes (``chat_service_connections``)."""
        return sum(n.metric(name, labels) for n in self.nodes if n.running)

    async def achat_metric(self, name: str, labels: str = "") -> float:
        return await asyncio.to_thread(self.chat_metric, name, labels)

    def __getitem__(self, index: int) -> ChatNodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def settings(self, **overrides: Any) -> Settings:
        """:class:`chat.config.Settings` for in-process use of this cluster's store."""
        base: dict[str, Any] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "secret_key": self.secret_key,
        }
        base.update(overrides)
        return Settings(**base)

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[Admin]:
        """A :class:`chat.admin.Admin` on the cluster's database, closed afterwards."""
        admin = await Admin.open(self.settings())
        try:
            yield admin
        finally:
            await admin.close()

    async def migrate(self) -> None:
        """Apply the schema migrations (opening the store does it)."""
        db = await open_database(self.database_url, "")
        await db.close()

    async def seed(
        self,
        workspace: str = "acme",
        handles: Sequence[str] = DEFAULT_HANDLES,
        channels: Sequence[str] = ("general",),
    ) -> SeededWorkspace:
        """Create ``workspace`` with users ``handles`` (the first is the owner, the rest
        members), public ``channels`` with every user in them, and a token per user.
        Works before or after start(); the result is also kept in ``self.seeded``."""
        self.seeded = await seed_workspace(self.settings(), workspace, handles, channels)
        return self.seeded

    async def start(self) -> Self:
        """Start Redis (if needed), migrate, then every chat node not running, in parallel,
        then every Flannel node not running, in parallel."""
        if self.redis is not None and not self.redis.running:
            await asyncio.to_thread(self.redis.start)
        await self.migrate()
        pending = [n for n in self.nodes if not n.running]
        for node in pending:
            node.redis_url = self.redis_url
        await asyncio.to_thread(start_all, pending)
        edges = [f for f in self.flannels if not f.running]
        for edge in edges:
            edge.upstream = self.service_urls
        await asyncio.to_thread(start_all, edges)
        return self

    async def add_node(self, *, extra_env: Mapping[str, str] | None = None) -> ChatNodeProcess:
        """One more node (``node<N>``), started; ``extra_env`` adds to the cluster's."""
        node = self._new_node(extra_env)
        node.redis_url = self.redis_url
        await node.astart()
        return node

    async def add_flannel(
        self,
        *,
        extra_env: Mapping[str, str] | None = None,
        service_key: str = SERVICE_KEY,
        ready: bool = True,
    ) -> FlannelNodeProcess:
        """One more Flannel node (``flannel<N>``) in front of every chat node, started.
        ``ready``: wait for its /readyz (False: only spawned; one the chat tier refuses
        never becomes ready). ``extra_env`` adds to the cluster's ``flannel_env``."""
        edge = self._new_flannel(extra_env, service_key)
        edge.upstream = self.service_urls
        if ready:
            await edge.astart()
        else:
            await asyncio.to_thread(edge.spawn)
        return edge

    async def stop(self) -> None:
        """Stop every Flannel node, then every chat node (SIGTERM, in parallel, SIGKILL
        after a bound), then our Redis."""
        await asyncio.gather(*(f.astop() for f in self.flannels))
        await asyncio.gather(*(n.astop() for n in self.nodes))
        if self.redis is not None and self._own_redis:
            self.redis.stop()

    async def close(self) -> None:
        """stop(), then delete temporary directories. Idempotent."""
        try:
            try:
                await asyncio.gather(*(asyncio.to_thread(f.close) for f in self.flannels))
            finally:
                await asyncio.gather(*(asyncio.to_thread(n.close) for n in self.nodes))
        finally:
            if self.redis is not None and self._own_redis:
                self.redis.close()

    @contextlib.asynccontextmanager
    async def client(self, node: int, handle: str, **kwargs: Any) -> AsyncIterator[Client]:
        """A :class:`chat.client.Client` on ``nodes[node]`` authenticated as ``handle``
        of the last seeded workspace."""
        if self.seeded is None:
            raise ClusterError("seed() the cluster first")
        async with Client.connect(self.nodes[node].url, self.seeded.tokens[handle], **kwargs) as c:
            yield c

    @contextlib.asynccontextmanager
    async def flannel_client(self, index: int, handle: str, **kwargs: Any) -> AsyncIterator[Client]:
        """A :class:`chat.client.Client` on ``flannels[index]`` authenticated as ``handle``
        of the last seeded workspace."""
        if self.seeded is None:
            raise ClusterError("seed() the cluster first")
        token = self.seeded.tokens[handle]
        async with Client.connect(self.flannels[index].url, token, **kwargs) as c:
            yield c

    async def __aenter__(self) -> Self:
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        edges = f" flannels={self.flannels}" if self.flannels else ""
        return f"<Cluster {self.nodes}{edges} redis={self.redis}>"

    # -- internals ---------------------------------------------------------------------

    def _new_node(self, extra_env: Mapping[str, str] | None = None) -> ChatNodeProcess:
        node = ChatNodeProcess(
            f"node{len(self.nodes)}",
            database_url=self.database_url,
            redis_url=self.redis_url,
            secret_key=self.secret_key,
            service_keys=SERVICE_KEY,
            extra_env={**self.extra_env, **(extra_env or {})},
            log_dir=self.log_dir,
        )
        self.nodes.append(node)
        return node

    def _new_flannel(
        self, extra_env: Mapping[str, str] | None = None, service_key: str = SERVICE_KEY
    ) -> FlannelNodeProcess:
        edge = FlannelNodeProcess(
            f"flannel{len(self.flannels)}",
            upstream=[],  # the chat nodes' ports are known once they started
            service_key=service_key,
            upstream_connections=self.upstream_connections,
            extra_env={**self.flannel_env, **(extra_env or {})},
            log_dir=self.log_dir,
        )
        self.flannels.append(edge)
        return edge
