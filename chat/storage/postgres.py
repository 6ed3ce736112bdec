"""PostgreSQL through an asyncpg pool: the production store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from chat.storage.base import Connection, Dialect, Record, StorageError, UniqueViolation


class PgConnection:
    __slots__ = ("_conn",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        # Always with arguments: asyncpg's argument-less execute() runs several statements.
        with _translate_errors():
            await self._conn.execute(sql, *args) if args else await self._conn.fetch(sql)

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        with _translate_errors():
            await self._conn.executemany(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        with _translate_errors():
            return list(await self._conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        with _translate_errors():
            row: Record | None = await self._conn.fetchrow(sql, *args)
            return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with _translate_errors():
            return await self._conn.fetchval(sql, *args)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        with _translate_errors():
            async with self._conn.transaction():
                yield


class PostgresDatabase:
    dialect: Dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 20) -> PostgresDatabase:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._pool.acquire() as conn:
            with _translate_errors():
                async with conn.transaction():
                    yield PgConnection(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self._pool.acquire() as conn:
            yield PgConnection(conn)

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._pool.close()


class _translate_errors:
    """Map asyncpg's exceptions onto the store's, so handlers see one vocabulary."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise UniqueViolation(str(exc)) from exc
        if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            raise StorageError(f"{type(exc).__name__}: {exc}") from exc
