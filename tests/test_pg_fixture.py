"""The PostgreSQL test fixtures give a working server and isolated databases."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import PostgresFixture
from tests.pg import dsn_with_database, unique_database_name
from tests.timing import scaled


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=scaled(10))


async def test_fresh_database_is_usable(fresh_pg_dsn: str) -> None:
    conn = await _connect(fresh_pg_dsn)
    try:
        assert await conn.fetchval("SELECT current_database()") == fresh_pg_dsn.rsplit("/", 1)[1]
        # Empty: no user tables yet.
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text NOT NULL)")
        await conn.executemany("INSERT INTO t VALUES ($1, $2)", [(1, "héllo"), (2, "wörld")])
        rows = await conn.fetch("SELECT id, body FROM t ORDER BY id")
        assert [tuple(r) for r in rows] == [(1, "héllo"), (2, "wörld")]
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
    finally:
        await conn.close()


async def test_fresh_database_is_fresh_again(fresh_pg_dsn: str) -> None:
    """Same table name as the test above: would fail if databases were reused."""
    conn = await _connect(fresh_pg_dsn)
    try:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        assert await conn.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await conn.close()


async def test_two_fresh_databases_are_isolated(
    postgres_server: PostgresFixture, fresh_pg_dsn: str
) -> None:
    other_name = unique_database_name("test")
    other_dsn = await postgres_server.create_database(other_name)
    assert other_dsn != fresh_pg_dsn
    a = await _connect(fresh_pg_dsn)
    b = await _connect(other_dsn)
    try:
        await a.execute("CREATE TABLE only_in_a (x int)")
        await a.execute("INSERT INTO only_in_a VALUES (42)")
        await b.execute("CREATE TABLE only_in_b (x int)")
        assert await a.fetchval("SELECT to_regclass('only_in_b')") is None
        assert await b.fetchval("SELECT to_regclass('only_in_a')") is None
        assert await a.fetchval("SELECT x FROM only_in_a") == 42
    finally:
        await a.close()
        await b.close()
        await postgres_server.drop_database(other_name)


async def test_admin_dsn_reaches_maintenance_database(postgres_server: PostgresFixture) -> None:
    conn = await _connect(postgres_server.dsn)
    try:
        assert await conn.fetchval("SELECT current_database()") == "postgres"
    finally:
        await conn.close()


@pytest.mark.parametrize("name", ["", "Upper", "1abc", "a-b", 'x"; DROP', "a" * 64])
async def test_bad_database_names_are_refused(postgres_server: PostgresFixture, name: str) -> None:
    with pytest.raises(ValueError, match="invalid database name"):
        await postgres_server.create_database(name)


def test_dsn_with_database_keeps_everything_else() -> None:
    dsn = "postgresql://u:p%40ss@db.example:6543/postgres?sslmode=disable"
    assert dsn_with_database(dsn, "other") == (
        "postgresql://u:p%40ss@db.example:6543/other?sslmode=disable"
    )
    with pytest.raises(ValueError):
        dsn_with_database("host=localhost dbname=x", "other")


def test_scaled_reads_timeout_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHAT_TEST_TIMEOUT_FACTOR", raising=False)
    assert scaled(2.0) == 2.0
    monkeypatch.setenv("CHAT_TEST_TIMEOUT_FACTOR", "2.5")
    assert scaled(2.0) == 5.0
    monkeypatch.setenv("CHAT_TEST_TIMEOUT_FACTOR", "0")
    with pytest.raises(ValueError):
        scaled(1.0)
