"""PostgreSQL through an asyncpg pool: the production store.

Every asyncpg exception is mapped onto the store's vocabulary (:mod:`chat.storage.base`)
here, in one place: a lost or refused connection is :class:`Unavailable`, a deadlock or
serialization failure is :class:`TransactionConflict`, and a connection lost while COMMIT was
in flight is :class:`OutcomeUnknown` (the server cannot know whether it committed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import asyncpg

from chat.storage.base import (
    Connection,
    Dialect,
    OutcomeUnknown,
    Record,
    StorageError,
    TransactionConflict,
    Unavailable,
    UniqueViolation,
)

# The server refused or dropped the connection: nothing the client did, retry later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # pool acquire or command_timeout
    asyncpg.PostgresConnectionError,  # 08xxx, ConnectionDoesNotExistError (lost mid-query)
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
)
_CONFLICT: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,  # 40P01
    asyncpg.SerializationError,  # 40001
)


def classify(exc: BaseException) -> BaseException | None:
    """The store's exception for an asyncpg/OS exception; None when it is not one of ours
    (cancellation and bugs pass through unchanged)."""
    if isinstance(exc, StorageError):
        return None
    if isinstance(exc, asyncpg.UniqueViolationError):
        return UniqueViolation(str(exc))
    if isinstance(exc, _CONFLICT):
        return TransactionConflict(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, _UNAVAILABLE) or _closed_connection(exc):
        return Unavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return StorageError(f"{type(exc).__name__}: {exc}")
    return None


def commit_failure(exc: BaseException) -> BaseException | None:
    """The store's exception for a failure of COMMIT itself. The server's definite answers
    (a deferred constraint, a serialization failure) mean "not committed"; a connection lost
    or a timeout while COMMIT was in flight means nobody knows."""
    mapped = classify(exc)
    if isinstance(mapped, Unavailable):
        return OutcomeUnknown(f"connection lost during COMMIT: {mapped}")
    return mapped


def _closed_connection(exc: BaseException) -> bool:
    # asyncpg raises a bare InterfaceError for a connection it already knows is closed.
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


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


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset on release. asyncpg's default runs four statements (UNLISTEN *, CLOSE
    ALL, pg_advisory_unlock_all(), RESET ALL) on every release, which for a reconnect storm
    was 8 of the 12 statements a connect cost. Nothing here leaves session state on a pooled
    connection: no SET, no cursors, no LISTEN (the change watcher listens on a connection of
    its own), only transaction-scoped advisory locks. asyncpg still rolls back a transaction
    left open before calling this."""


class PostgresDatabase:
    dialect: Dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float | None = None) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        command_timeout_s: float | None = 30.0,
        statement_cache_size: int = 100,
        acquire_timeout_s: float | None = 10.0,
    ) -> PostgresDatabase:
        """A pool (defaults: the ``# database`` block of :mod:`chat.config`). A statement
        past ``command_timeout_s`` or a wait for a connection past ``acquire_timeout_s``
        raises :class:`Unavailable`."""
        with _translate_errors():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout_s,
                statement_cache_size=statement_cache_size,
                reset=_no_session_state,
            )
        return cls(pool, acquire_timeout_s=acquire_timeout_s)

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        with _translate_errors():
            conn = await self._pool.acquire(timeout=self._acquire_timeout_s)
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._acquire() as conn:
            tr = conn.transaction()
            with _translate_errors():
                await tr.start()
            try:
                yield PgConnection(conn)
            except BaseException:
                # Best effort: on a dead connection the server rolls back by itself.
                with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await tr.rollback()
                raise
            try:
                await tr.commit()
            except Exception as exc:
                mapped = commit_failure(exc)
                if mapped is None:
                    raise
                raise mapped from exc

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self._acquire() as conn:
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
        if exc is None:
            return
        mapped = classify(exc)
        if mapped is not None:
            raise mapped from exc
