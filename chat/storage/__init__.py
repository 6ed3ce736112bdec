"""Storage: the only package that speaks SQL.

``base.py`` is the interface (Database, Connection, errors); ``postgres.py`` and ``sqlite.py``
implement it; ``queries.py`` holds every query as a named function; ``migrate.py`` applies
``migrations/*.sql``. Handlers call query functions, never SQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from chat.storage.base import Connection, Database, Record, StorageError, UniqueViolation
from chat.storage.migrate import migrate

if TYPE_CHECKING:
    from chat.config import Settings

log = logging.getLogger(__name__)


async def open_database(
    database_url: str, sqlite_path: str, settings: Settings | None = None
) -> Database:
    """PostgreSQL when a URL is configured, else the embedded SQLite file; migrated.
    ``settings`` sizes the PostgreSQL pool and its timeouts (the ``# database`` block)."""
    db: Database
    if database_url:
        from chat.storage.postgres import PostgresDatabase

        if settings is None:
            db = await PostgresDatabase.connect(database_url)
        else:
            db = await PostgresDatabase.connect(
                database_url,
                min_size=settings.db_pool_min_size,
                max_size=settings.db_pool_max_size,
                command_timeout_s=settings.db_command_timeout_s,
                statement_cache_size=settings.db_statement_cache_size,
                acquire_timeout_s=settings.db_acquire_timeout_s,
            )
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


def secret_key_path(database_url: str, sqlite_path: str, configured: str = "") -> Path:
    """Where a generated signing secret is kept: ``configured``, else beside the SQLite file
    with the suffix ``.secret`` (``chat.sqlite3`` -> ``chat.secret``), else, with PostgreSQL,
    ``chat.secret`` in the working directory (so ``chat admin`` and ``chat serve`` started
    from one directory agree without configuration)."""
    if configured:
        return Path(configured)
    if database_url:
        return Path("chat.secret")
    return Path(sqlite_path).with_suffix(".secret")


async def token_secret(db: Database, configured: str, path: Path) -> str:
    """The configured signing secret, or the installation's generated one, kept in its own
    0600 file at ``path`` and never in the database (a backup must not hold the key to
    forge tokens). A secret that an older version kept in the ``meta`` table is moved to the
    file, so tokens issued before stay valid."""
    if configured:
        return configured
    existing = _read_secret(path)
    if existing is not None:
        return existing
    from chat.storage import queries

    async with db.transaction() as conn:
        legacy = await queries.get_meta(conn, _META_KEY)
        secret = _write_once(path, legacy or secrets.token_urlsafe(48))
        if legacy is not None:
            await queries.delete_meta(conn, _META_KEY)
    if db.dialect == "postgres":
        log.warning(
            "signing secret kept in %s: give every node the same one (CHAT_SECRET_KEY or"
            " CHAT_SECRET_KEY_FILE)",
            path,
        )
    return secret


_META_KEY = "token_secret"


def _read_secret(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        raise RuntimeError(f"the signing secret file {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("the signing secret file %s is readable by others: chmod 600 it", path)
    return text


def _write_once(path: Path, secret: str) -> str:
    """Create ``path`` (0600) holding ``secret`` unless it exists; the secret it holds.
    Written to a private temporary file, then linked into place: concurrent first starts
    never see a partial file, and exactly one secret wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    winner = _read_secret(path)
    assert winner is not None
    return winner


__all__ = [
    "Connection",
    "Database",
    "Record",
    "StorageError",
    "UniqueViolation",
    "migrate",
    "open_database",
    "secret_key_path",
    "token_secret",
]
