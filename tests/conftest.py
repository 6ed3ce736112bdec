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
