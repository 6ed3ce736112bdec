"""The database interface both stores implement, and the errors they share.

Queries are written once, in PostgreSQL's dialect with ``$n`` parameters
(:mod:`chat.storage.queries`); the SQLite adapter translates the few differences. A
:class:`Database` hands out connections: ``transaction()`` for writes (savepoints nest inside),
``connection()`` for reads in autocommit mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

Record = Mapping[str, Any]
Dialect = Literal["postgres", "sqlite"]


class StorageError(Exception):
    """The database refused or failed; handlers turn it into ``internal_error``."""


class UniqueViolation(StorageError):
    """An insert hit a unique constraint (asyncpg's 23505, SQLite's UNIQUE failure)."""


class Connection(Protocol):
    async def execute(self, sql: str, *args: Any) -> None: ...

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Record]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Record | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested transaction: an exception inside rolls back only its own work."""
        ...


class Database(Protocol):
    dialect: Dialect

    def transaction(self) -> AbstractAsyncContextManager[Connection]: ...

    def connection(self) -> AbstractAsyncContextManager[Connection]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
