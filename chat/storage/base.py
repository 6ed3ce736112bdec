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
    """The database refused or failed; unless a subclass says otherwise, a bug: the client
    gets ``internal_error``.

    ::

        StorageError
        ├── UniqueViolation      a unique constraint decided (idempotent inserts use it)
        ├── TransactionConflict  deadlock / serialization failure: the transaction rolled
        │                        back; the same work may simply be run again
        ├── Unavailable          the database cannot be reached (down, restarting, full,
        │                        pool timeout): nothing was committed; retry later
        └── OutcomeUnknown       the connection died during COMMIT: the transaction may or
                                 may not have committed; only an idempotent retry can tell
    """


class UniqueViolation(StorageError):
    """An insert hit a unique constraint (asyncpg's 23505, SQLite's UNIQUE failure)."""


class TransactionConflict(StorageError):
    """The database rolled the transaction back to break a deadlock (40P01) or a
    serialization failure (40001). Nothing was committed; re-running the whole transaction
    is safe and is what the journal does."""


class Unavailable(StorageError):
    """The database cannot be reached or refuses connections for now (connection refused or
    lost, shutting down, starting up, too many connections, pool or command timeout)."""

    #: How long a client should wait before retrying.
    retry_after_ms: int = 1000


class OutcomeUnknown(StorageError):
    """The connection failed while COMMIT was in flight: the server cannot know whether the
    transaction committed. Clients retry with the same idempotency key (``client_msg_id``)."""


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
