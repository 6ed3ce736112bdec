"""Storage: the only package that speaks SQL.

``base.py`` is the interface (Database, Connection, errors); ``postgres.py`` and ``sqlite.py``
implement it; ``queries.py`` holds every query as a named function; ``migrate.py`` applies
``migrations/*.sql``. Handlers call query functions, never SQL.
"""

from __future__ import annotations

import secrets

from chat.storage.base import Connection, Database, Record, StorageError, UniqueViolation
from chat.storage.migrate import migrate


async def open_database(database_url: str, sqlite_path: str) -> Database:
    """PostgreSQL when a URL is configured, else the embedded SQLite file; migrated."""
    db: Database
    if database_url:
        from chat.storage.postgres import PostgresDatabase

        db = await PostgresDatabase.connect(database_url)
    else:
        from chat.storage.sqlite import SqliteDatabase

        db = await SqliteDatabase.connect(sqlite_path)
    try:
        await migrate(db)
    except BaseException:
        # An open aiosqlite connection keeps a non-daemon thread that would hang the exit.
        await db.close()
        raise
    return db


async def token_secret(db: Database, configured: str) -> str:
    """The configured signing secret, or the installation's generated one."""
    if configured:
        return configured
    from chat.storage import queries

    async with db.transaction() as conn:
        return await queries.get_or_set_meta(conn, "token_secret", secrets.token_urlsafe(48))


__all__ = [
    "Connection",
    "Database",
    "Record",
    "StorageError",
    "UniqueViolation",
    "migrate",
    "open_database",
    "token_secret",
]
