"""Shared pytest fixtures.

Sections below, one per kind of resource; add new fixtures to the matching
section (or start a new one) and keep the heavy lifting in plain helper modules
such as ``tests/pg.py`` so it stays usable outside pytest.

Event loop: pyproject.toml sets pytest-asyncio's default loop scope to "session",
so every async test and async fixture shares one loop. Session-scoped async
resources (connection pools, servers) are therefore safe to share between tests.

Timeouts: wrap waits in ``tests.timing.scaled(seconds)``; slow machines set
``CHAT_TEST_TIMEOUT_FACTOR``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.pg import PostgresServer, postgres_for_tests, unique_database_name
from tests.timing import scaled

# =========================================================================== PostgreSQL
#
# `postgres_server` (session): one server for the whole run, started only when the
#   first test that needs it asks for it, stopped at the end of the session.
#   $CHAT_TEST_PG_DSN set -> that external server is used instead (nothing started).
# `fresh_pg_dsn` (function, async): DSN of a new, empty database for one test; it is
#   dropped afterwards.


@dataclass(frozen=True)
class PostgresFixture:
    """What ``postgres_server`` yields: the admin DSN plus async database helpers."""

    server: PostgresServer

    @property
    def dsn(self) -> str:
        """DSN of the ``postgres`` maintenance database (superuser/CREATEDB role)."""
        return self.server.dsn

    async def create_database(self, name: str) -> str:
        """Create empty database ``name`` ([a-z_][a-z0-9_]*) and return its DSN."""
        return await self.server.acreate_database(name)

    async def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting any sessions."""
        await self.server.adrop_database(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresFixture]:
    with postgres_for_tests(startup_timeout=scaled(60)) as server:
        yield PostgresFixture(server)


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_pg_dsn(postgres_server: PostgresFixture) -> AsyncIterator[str]:
    name = unique_database_name("test")
    dsn = await postgres_server.create_database(name)
    yield dsn
    # Matters for an external server (keeps it clean); cheap for the temporary one.
    await postgres_server.drop_database(name)


# =========================================================================== chat nodes
#
# `store` (parametrized): "sqlite" and "postgres"; every test that uses `node` runs
#   against both stores, so one suite covers both implementations.
# `node` (function, async): a real chat node (websockets server on a free loopback port)
#   over a fresh database of that store, with a seeded workspace. See tests/harness.py.

from chat.storage import Database, open_database  # noqa: E402
from tests.harness import RunningNode, running_node  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture(loop_scope="session")
async def node(
    store: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningNode]:
    if store == "postgres":
        pg: PostgresFixture = request.getfixturevalue("postgres_server")
        name = unique_database_name("node")
        dsn = await pg.create_database(name)
        async with running_node(database_url=dsn) as n:
            yield n
        await pg.drop_database(name)
    else:
        path = tmp_path_factory.mktemp("sqlite") / "chat.sqlite3"
        async with running_node(sqlite_path=str(path)) as n:
            yield n


# `db` (function, async, parametrized by `store`): an open, migrated Database over a fresh
#   store (a new PostgreSQL database, or a new SQLite file), closed and dropped afterwards.
@pytest_asyncio.fixture(loop_scope="session")
async def db(
    store: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Database]:
    if store == "postgres":
        pg: PostgresFixture = request.getfixturevalue("postgres_server")
        name = unique_database_name("db")
        database = await open_database(await pg.create_database(name), "")
        yield database
        await database.close()
        await pg.drop_database(name)
    else:
        path = tmp_path_factory.mktemp("db") / "db.sqlite3"
        database = await open_database("", str(path))
        yield database
        await database.close()


# =========================================================================== cluster
#
# Multi-node tests: real processes. There is one harness, the launcher's LocalCluster
# (chat/cluster/launcher.py): `make_cluster`, `make_flannel_cluster` and
# `make_local_cluster` below all start one; tests/cluster.py's Cluster is a thin layer
# over it (a fresh database on the session's PostgreSQL, no HAProxy).
# `redis_server` (function): a fresh, empty redis-server on a free loopback port for one
#   test (no persistence: `redis_server.restart()` comes back empty on the same port).
# `make_cluster` (function, async): a factory; `await make_cluster(n_nodes=3,
#   extra_env={"CHAT_SHUTDOWN_GRACE_S": "1"})` returns a started Cluster (chat nodes
#   chat0, chat1...) over a fresh PostgreSQL database with its own Redis (an ACL user, as
#   in production), seeded (`cluster.seeded`) before the nodes start unless seed=False.
#   Everything it made is stopped by PID and the databases dropped at the end of the test.
#   Node logs are kept in the test's tmp_path.
# `cluster` (function, async): `make_cluster()` with 2 nodes; indirect parametrization
#   sets the node count: `@pytest.mark.parametrize("cluster", [3], indirect=True)`.

from collections.abc import Awaitable, Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.cluster import Cluster, TempRedis  # noqa: E402


@pytest.fixture
def redis_server() -> Iterator[TempRedis]:
    with TempRedis(startup_timeout=scaled(10)) as server:
        yield server


MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest_asyncio.fixture(loop_scope="session")
async def make_cluster(
    postgres_server: PostgresFixture, tmp_path: Path
) -> AsyncIterator[MakeCluster]:
    made: list[tuple[Cluster, str]] = []

    async def make(
        n_nodes: int = 2,
        *,
        extra_env: Mapping[str, str] | None = None,
        use_redis: bool = True,
        seed: bool = True,
        start: bool = True,
    ) -> Cluster:
        name = unique_database_name("cluster")
        dsn = await postgres_server.create_database(name)
        c = Cluster(
            dsn,
            n_nodes=n_nodes,
            use_redis=use_redis,
            extra_env=extra_env,
            log_dir=tmp_path / f"cluster{len(made)}",
        )
        made.append((c, name))
        if seed:
            await c.seed()
        if start:
            await c.start()
        return c

    try:
        yield make
    finally:
        for c, name in reversed(made):
            try:
                await c.close()
            finally:
                await postgres_server.drop_database(name)


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(make_cluster: MakeCluster, request: pytest.FixtureRequest) -> Cluster:
    return await make_cluster(int(getattr(request, "param", 2)))


# =========================================================================== Flannel clusters
#
# `make_flannel_cluster` (function, async): a factory like `make_cluster`, with Flannel
#   nodes (flannel0, flannel1...) in front of the chat nodes, each reaching every chat
#   node's /service URL directly (no HAProxy):
#   `await make_flannel_cluster(n_nodes=2, n_flannel=2, upstream_connections=2,
#   extra_env={...}, flannel_env={...})` returns a started Cluster over a fresh PostgreSQL
#   database with its own Redis, seeded before the nodes start unless seed=False
#   (`seed_users=N`: instead a workspace of N users through Admin.seed, kept in
#   `cluster.seeded`). Everything it made is stopped by PID and the databases dropped at
#   the end of the test; logs are kept in the test's tmp_path.

from tests.cluster import SeededWorkspace  # noqa: E402


@pytest_asyncio.fixture(loop_scope="session")
async def make_flannel_cluster(
    postgres_server: PostgresFixture, tmp_path: Path
) -> AsyncIterator[MakeCluster]:
    made: list[tuple[Cluster, str]] = []

    async def make(
        n_nodes: int = 2,
        n_flannel: int = 2,
        *,
        upstream_connections: int = 2,
        extra_env: Mapping[str, str] | None = None,
        flannel_env: Mapping[str, str] | None = None,
        seed: bool = True,
        seed_users: int = 0,
        start: bool = True,
    ) -> Cluster:
        name = unique_database_name("flannel")
        dsn = await postgres_server.create_database(name)
        c = Cluster(
            dsn,
            n_nodes=n_nodes,
            n_flannel=n_flannel,
            upstream_connections=upstream_connections,
            extra_env=extra_env,
            flannel_env=flannel_env,
            log_dir=tmp_path / f"flannel-cluster{len(made)}",
        )
        made.append((c, name))
        if seed_users:
            await c.migrate()
            async with c.admin() as admin:
                big = await admin.seed("acme", seed_users, 1)
            users = {u["handle"]: u["id"] for u in big["users"]}
            tokens = {u["handle"]: u["token"] for u in big["users"]}
            chans = {ch["name"]: ch["id"] for ch in big["channels"]}
            c.seeded = SeededWorkspace(big["workspace_id"], users, tokens, chans)
        elif seed:
            await c.seed()
        if start:
            await c.start()
        return c

    try:
        yield make
    finally:
        for c, name in reversed(made):
            try:
                await c.close()
            finally:
                await postgres_server.drop_database(name)


# =========================================================================== the launcher
#
# `make_local_cluster` (function, async): `await make_local_cluster(n_chat=2, n_flannel=2,
#   node_env={...}, handles=[...], limits=Limits(...))` returns a started
#   chat.cluster.launcher.LocalCluster with every part of the topology (its own PostgreSQL
#   with SCRAM, Redis with an ACL user, chat and Flannel nodes, HAProxy over TLS), seeded
#   with `handles` (default alice, bob, carol, dave) in `cluster.seeded`. The same
#   harness as `make_cluster`'s, with nothing left out. Everything is stopped by PID and
#   its directory deleted at the end of the test.

from collections.abc import Sequence  # noqa: E402
from typing import Protocol  # noqa: E402

from chat.cluster.haproxy import Limits  # noqa: E402
from chat.cluster.launcher import LocalCluster  # noqa: E402
from chat.cluster.topology import Topology  # noqa: E402


class MakeLocalCluster(Protocol):
    async def __call__(
        self,
        n_chat: int = 2,
        n_flannel: int = 2,
        *,
        node_env: Mapping[str, str] | None = None,
        handles: Sequence[str] | None = None,
        limits: Limits | None = None,
    ) -> LocalCluster: ...


@pytest_asyncio.fixture(loop_scope="session")
async def make_local_cluster() -> AsyncIterator[MakeLocalCluster]:
    made: list[LocalCluster] = []

    async def make(
        n_chat: int = 2,
        n_flannel: int = 2,
        *,
        node_env: Mapping[str, str] | None = None,
        handles: Sequence[str] | None = None,
        limits: Limits | None = None,
    ) -> LocalCluster:
        topology = Topology(n_chat=n_chat, n_flannel=n_flannel)
        c = LocalCluster(topology, node_env=node_env, limits=limits)
        made.append(c)
        await c.start()
        if handles is None:
            await c.seed()
        else:
            await c.seed(handles=handles)
        return c

    try:
        yield make
    finally:
        for c in reversed(made):
            await c.close()
