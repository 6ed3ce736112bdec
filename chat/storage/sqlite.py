"""SQLite through aiosqlite: the embedded default, for one process and no servers to install.

One connection, guarded by a lock: SQLite serializes writers anyway, and a single connection
keeps read-your-writes simple. Queries arrive in PostgreSQL's dialect and are translated:
``$n`` becomes ``?n``, ``= ANY($n::bigint[])`` becomes a ``json_each`` over a JSON array, and
``FOR UPDATE`` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

import aiosqlite

from chat.storage.base import (
    Connection,
    Dialect,
    Record,
    StorageError,
    Unavailable,
    UniqueViolation,
)

_ANY = re.compile(r"= ANY\(\$(\d+)::\w+\[\]\)")
_PARAM = re.compile(r"\$(\d+)")
_CAST = re.compile(r"::\w+")
# Row locks: SQLite has none (BEGIN IMMEDIATE takes the database's write lock instead).
_FOR_UPDATE = re.compile(r"\s+FOR UPDATE\b")
# string_agg is SQLite's only from 3.44; group_concat has the same arguments.
_STRING_AGG = re.compile(r"\bstring_agg\(")


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """PostgreSQL dialect -> SQLite, for the subset the queries use."""
    sql = _ANY.sub(r"IN (SELECT value FROM json_each($\1))", sql)
    sql = _CAST.sub("", sql)
    sql = _FOR_UPDATE.sub("", sql)
    sql = _STRING_AGG.sub("group_concat(", sql)
    return _PARAM.sub(r"?\1", sql)


def _args(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(json.dumps(a) if isinstance(a, list | tuple) else a for a in args)


class SqliteConnection:
    __slots__ = ("_conn", "_savepoints")

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._savepoints = itertools.count(1)

    async def execute(self, sql: str, *args: Any) -> None:
        with _translate_errors():
            await self._conn.execute(translate(sql), _args(args))

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        with _translate_errors():
            await self._conn.executemany(translate(sql), [_args(a) for a in args])

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        with _translate_errors():
            async with self._conn.execute(translate(sql), _args(args)) as cur:
                return [dict(r) for r in await cur.fetchall()]

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        with _translate_errors():
            async with self._conn.execute(translate(sql), _args(args)) as cur:
                row = await cur.fetchone()
                return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        name = f"sp{next(self._savepoints)}"
        await self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            await self._conn.execute(f"ROLLBACK TO {name}")
            await self._conn.execute(f"RELEASE {name}")
            raise
        await self._conn.execute(f"RELEASE {name}")


class SqliteDatabase:
    dialect: Dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str) -> SqliteDatabase:
        on_disk = path != ":memory:" and not path.startswith("file:")
        if on_disk:
            # Private from the start: the database holds password hashes and session ids.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        if on_disk:
            # SQLite gives -wal/-shm the database's mode; also tighten files made by older
            # versions (0644).
            for name in (path, path + "-wal", path + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(name, 0o600)
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        return cls(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._lock:
            with _translate_errors():
                await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteConnection(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            with _translate_errors():
                await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self._lock:
            yield SqliteConnection(self._conn)

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._conn.close()


class _translate_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
            raise UniqueViolation(str(exc)) from exc
        if isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc):
            # Another process (``chat admin``) held the write lock past busy_timeout.
            raise Unavailable(str(exc)) from exc
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"{type(exc).__name__}: {exc}") from exc
