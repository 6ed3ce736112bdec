"""Versioned schema migrations: ``migrations/NNNN_name.sql``, applied in order, once.

One schema for both stores, written for PostgreSQL; for SQLite the few DDL differences are
translated (:func:`sqlite_ddl`). Each file runs in its own transaction and is recorded in
``schema_migrations``. On PostgreSQL an advisory lock makes concurrent starts (several nodes)
apply each file exactly once.
"""

from __future__ import annotations

import time
from importlib import resources

from chat.storage.base import Database

_LOCK_ID = 7_300_417_001  # any constant; identifies "chat schema migration" among advisory locks


def sqlite_ddl(sql: str) -> str:
    """PostgreSQL DDL -> SQLite, for what our migrations use."""
    return sql.replace(
        "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "INTEGER PRIMARY KEY AUTOINCREMENT"
    )


def for_dialect(sql: str, dialect: str) -> str:
    """The lines of a migration meant for ``dialect``: a line ``--% postgres`` or
    ``--% sqlite`` starts a section for that store only, ``--% both`` ends it. For the rare
    change one dialect cannot express (SQLite cannot drop a table constraint)."""
    keep, out = True, []
    for line in sql.splitlines():
        marker = line.strip()
        if marker.startswith("--%"):
            section = marker.removeprefix("--%").strip()
            keep = section in ("both", dialect)
            continue
        if keep:
            out.append(line)
    return "\n".join(out)


def migration_files(dialect: str) -> list[tuple[str, str]]:
    """(version, sql) pairs for the dialect, in order."""
    folder = resources.files("chat.storage") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    out = [
        (f.name.removesuffix(".sql"), for_dialect(f.read_text(encoding="utf-8"), dialect))
        for f in files
    ]
    return [(v, sqlite_ddl(sql)) for v, sql in out] if dialect == "sqlite" else out


def split_statements(sql: str) -> list[str]:
    """Statements of a migration file. Our files keep ';' out of strings and comments."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def migrate(db: Database) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    async with db.transaction() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
    applied: list[str] = []
    for version, sql in migration_files(db.dialect):
        async with db.transaction() as conn:
            if db.dialect == "postgres":
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            done = await conn.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", version
            )
            if done:
                continue
            for statement in split_statements(sql):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                version,
                int(time.time() * 1000),
            )
            applied.append(version)
    return applied
