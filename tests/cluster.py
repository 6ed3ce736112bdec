"""Multi-node test clusters: a thin layer over the launcher (:class:`LocalCluster`).

There is one harness: :class:`chat.cluster.launcher.LocalCluster` starts every cluster, for
``chat cluster up``, ``chat loadtest``, tests/test_deploy.py and the tests here. What this
module adds is what tests configure themselves, as options of that cluster: an external
per-test PostgreSQL database (``database_url=``: fast, no PostgreSQL per test), no HAProxy
(Flannel nodes reach the chat nodes' ``/service`` URLs directly), fixed secrets, test
knobs in the nodes' environment; and the API the test files use. No pytest dependency (the
fixtures live in ``tests/conftest.py``). Typical use::

    with TempRedis() as redis:                              # redis-server on a free port
        node = ChatNodeProcess("a", database_url=dsn, redis_url=redis.url)
        with node:                                          # start() waits for /readyz
            async with Client.connect(node.url, token) as client: ...
            node.kill()                                     # SIGKILL: a crash
            node.restart()                                  # same port again

    async with Cluster(dsn, n_nodes=3) as cluster:          # Redis (ACL) + 3 chat nodes
        seeded = await cluster.seed()                       # or before start(): see below
        async with cluster.client(0, "alice") as alice: ...

    async with Cluster(dsn, n_nodes=2, n_flannel=2) as cluster:    # + 2 Flannel nodes
        async with cluster.flannel_client(0, "alice") as alice:  # through Flannel
        cluster.flannel(0).metric("flannel_workspace_loads_total")

* :class:`Cluster`: a :class:`LocalCluster` over one PostgreSQL database, with Redis (an
  ACL user and password, as in production; ``use_redis=False``: none), N chat nodes and
  M Flannel nodes (``chat0``..., ``flannel0``...: :class:`NodeProcess`, with the
  settings of :func:`chat.cluster.topology.environment`) and no HAProxy. It migrates
  before starting nodes, starts Flannel after the chat nodes, and seeds through
  :class:`chat.admin.Admin`.
* :class:`ChatNodeProcess`: one ``python -m chat serve`` outside any cluster (the browser
  tests' server, the benchmarks, a node a test configures by hand), with the settings of
  :func:`chat.cluster.topology.chat_environment`.
* :class:`TempRedis` runs ``redis-server`` without persistence (``save ""``,
  ``appendonly no``): a restart comes back empty, on the same port, which is what failure
  tests want to provoke.
* Every node reads its own ``/metrics`` listener: ``node.metric(name, labels)``; its
  stdout/stderr go to a log file whose tail is in every error.

Every process is started in its own session (a terminal's ^C meant for pytest does not hit
it), stopped by PID only, and every wait is bounded. If the test process dies without
stopping them (SIGKILL, ``os._exit``), a small reaper process kills whatever we registered
with it, checking the PID's start time so a recycled PID is never hit
(``chat/cluster/processes.py``).

The synchronous methods block; in async tests prefer the ``a``-prefixed variants of the
node methods that wait for a while (``astart``, ``aterminate``, ``arestart``, ``astop``,
``akill``, ``ametric``): a test whose event loop is blocked cannot answer a stopping node's
close handshake. Redis operations take milliseconds and have no async variants.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from chat.admin import Admin
from chat.client import Client
from chat.cluster.launcher import (
    DEFAULT_HANDLES,
    LocalCluster,
    NodeProcess,
    SeededWorkspace,
)
from chat.cluster.processes import (  # the process machinery lives with the launcher
    REDIS_SERVER_ENV,
    ClusterError,
    ServerProcess,
    TempRedis,
    http_get,
    parse_metric,
)
from chat.cluster.topology import SERVICE_KID, Secrets, Topology, chat_environment
from chat.config import Settings

__all__ = [
    "REDIS_SERVER_ENV",
    "SERVICE_KEY",
    "SERVICE_KID",
    "SERVICE_SECRET",
    "ChatNodeProcess",
    "Cluster",
    "ClusterError",
    "NodeProcess",
    "SeededWorkspace",
    "ServerProcess",
    "TempRedis",
    "http_get",
    "parse_metric",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "cluster-test-secret-key-0123456789-abcdefghijklmnop"
# Service connections (docs/flannel.md): every cluster's chat nodes accept this key, and its
# Flannel nodes sign their credentials with it (the topology's key id, a fixed secret).
SERVICE_SECRET = "cluster-service-secret-0123456789-abcdefghijklmnop"
SERVICE_KEY = f"{SERVICE_KID}={SERVICE_SECRET}"
# What every test Flannel node gets besides the topology's settings: a fast upstream
# reconnect backoff (tests kill chat nodes and wait for the links to come back).
FLANNEL_TEST_ENV = {
    "FLANNEL_UPSTREAM_BACKOFF_S": "0.05",
    "FLANNEL_UPSTREAM_BACKOFF_CAP_S": "0.5",
    "FLANNEL_LOG_LEVEL": "info",
}


# --------------------------------------------------------------------------- one node


class ChatNodeProcess(NodeProcess):
    """``python -m chat serve`` outside any cluster, with the settings every chat node gets
    (:func:`chat.cluster.topology.chat_environment`, as the launcher's): ``CHAT_DATABASE_URL``,
    ``CHAT_REDIS_URL`` (empty: no Redis), ``CHAT_NODE_ID`` (the name), ``CHAT_SECRET_KEY``,
    ``CHAT_METRICS_PORT``, ``CHAT_SERVICE_KEYS`` (empty: no Flannel may connect),
    ``CHAT_LOG_FORMAT=text``; plus ``CHAT_LOG_LEVEL=info``. The port is chosen at the first
    start (see :class:`~chat.cluster.processes.ServerProcess`)."""

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
            "chat",
            self._own_settings,
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

    def _own_settings(self) -> dict[str, str]:
        env = chat_environment(
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


# --------------------------------------------------------------------------- cluster


class Cluster:
    """A :class:`LocalCluster` without HAProxy over the PostgreSQL database at
    ``database_url``: Redis, N chat nodes and M Flannel nodes in front of them, secrets
    fixed for tests (token secret ``secret_key``, service key :data:`SERVICE_KEY`).

    ``nodes[i]`` is ``chat<i>``, ``flannels[i]`` ``flannel<i>`` (``local.chats`` and
    ``local.flannels``, in order). ``start()`` starts Redis (if it is not running),
    migrates the database once (concurrent first starts would race on it), then every chat
    node in parallel, then every Flannel node in parallel, each with ``FLANNEL_UPSTREAM`` =
    every chat node's ``/service`` URL. ``stop()``/``close()`` stop the Flannel nodes, then
    the chat nodes (SIGTERM, in parallel) and then Redis.
    """

    def __init__(
        self,
        database_url: str,
        *,
        n_nodes: int = 2,
        n_flannel: int = 0,
        use_redis: bool = True,
        secret_key: str = SECRET,
        extra_env: Mapping[str, str] | None = None,
        flannel_env: Mapping[str, str] | None = None,
        upstream_connections: int = 2,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """
        :param n_flannel: Flannel nodes in front of the chat nodes (started after them).
        :param use_redis: False: no Redis at all, nodes get an empty CHAT_REDIS_URL.
        :param extra_env: extra environment for every chat node.
        :param flannel_env: extra environment for every Flannel node.
        :param upstream_connections: each Flannel node's FLANNEL_UPSTREAM_CONNECTIONS.
        :param log_dir: the cluster's directory, kept (node logs in ``log_dir/logs``);
            default: a temp dir, deleted by close().
        """
        self.database_url = database_url
        self.secret_key = secret_key
        secrets = dataclasses.replace(
            Secrets.generate(), service_secret=SERVICE_SECRET, token_secret=secret_key
        )
        self.local = LocalCluster(
            Topology(n_chat=n_nodes, n_flannel=n_flannel),
            directory=log_dir,
            secrets=secrets,
            chat_env={"CHAT_LOG_LEVEL": "info", **(extra_env or {})},
            flannel_env={
                **FLANNEL_TEST_ENV,
                "FLANNEL_UPSTREAM_CONNECTIONS": str(upstream_connections),
                **(flannel_env or {}),
            },
            database_url=database_url,
            redis=use_redis,
            haproxy=False,
        )
        self.seeded: SeededWorkspace | None = None  # the last seed()

    @property
    def redis(self) -> TempRedis | None:
        """The cluster's Redis (its ``url`` has the ACL user and password); None without."""
        return self.local.redis

    @property
    def redis_url(self) -> str:
        """The Redis URL nodes get: empty without Redis."""
        return self.local.redis_url

    @property
    def log_dir(self) -> Path:
        """Where the nodes' logs are."""
        return self.local.logs

    @property
    def nodes(self) -> list[NodeProcess]:
        return list(self.local.chats.values())

    @property
    def flannels(self) -> list[NodeProcess]:
        return list(self.local.flannels.values())

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

    def flannel(self, index: int) -> NodeProcess:
        return self.flannels[index]

    def chat_metric(self, name: str, labels: str = "") -> float:
        """A metric summed over the running chat nodes (``chat_service_connections``)."""
        return sum(n.metric(name, labels) for n in self.nodes if n.running)

    async def achat_metric(self, name: str, labels: str = "") -> float:
        return await asyncio.to_thread(self.chat_metric, name, labels)

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.local.chats)

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
        await self.local.migrate()

    async def seed(
        self,
        workspace: str = "acme",
        handles: Sequence[str] = DEFAULT_HANDLES,
        channels: Sequence[str] = ("general",),
    ) -> SeededWorkspace:
        """Create ``workspace`` with users ``handles`` (the first is the owner, the rest
        members), public ``channels`` with every user in them, and a token per user.
        Works before or after start(); the result is also kept in ``self.seeded``."""
        self.seeded = await self.local.seed(workspace, handles, channels)
        return self.seeded

    async def start(self) -> Self:
        """:meth:`LocalCluster.start`: Redis (if needed), migrations, every chat node not
        running, in parallel, then every Flannel node not running, in parallel."""
        await self.local.start()
        return self

    async def add_node(self, *, extra_env: Mapping[str, str] | None = None) -> NodeProcess:
        """One more chat node (``chat<N>``), started; ``extra_env`` adds to the cluster's."""
        return await self.local.add_chat(extra_env=extra_env)

    async def add_flannel(
        self,
        *,
        extra_env: Mapping[str, str] | None = None,
        service_key: str = SERVICE_KEY,
        ready: bool = True,
    ) -> NodeProcess:
        """One more Flannel node (``flannel<N>``) in front of every chat node, started,
        signing with ``service_key``. ``ready``: wait for its /readyz (False: only spawned;
        one the chat tier refuses never becomes ready). ``extra_env`` adds to the
        cluster's ``flannel_env``."""
        env = {**(extra_env or {})}
        if service_key != SERVICE_KEY:
            env["FLANNEL_SERVICE_KEY"] = service_key
        return await self.local.add_flannel(extra_env=env, ready=ready)

    async def stop(self) -> None:
        """Stop every Flannel node, then every chat node (SIGTERM, in parallel, SIGKILL
        after a bound), then Redis."""
        await self.local.stop()

    async def close(self) -> None:
        """stop(), then delete temporary directories. Idempotent."""
        await self.local.close()

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
