"""What the cluster counts: PostgreSQL work and messages, Flannel's workspace loads."""

from __future__ import annotations

import contextlib
from typing import Any

from chat.cluster.launcher import LocalCluster
from chat.cluster.processes import parse_metric

PG_STATS_FLUSH_S = 11.0  # pg_stat_database: an idle backend's counters arrive within 10 s


async def pg_work(cluster: LocalCluster) -> dict[str, Any]:
    """The chat database's statement count (pg_stat_statements, if loaded) and its
    transaction count (pg_stat_database), read over the maintenance database."""
    import asyncpg

    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT oid, xact_commit + xact_rollback AS xacts FROM pg_database d "
            "JOIN pg_stat_database s ON s.datid = d.oid WHERE d.datname = 'chat'"
        )
        out: dict[str, Any] = {"xacts": int(row["xacts"]), "statements": None}
        with contextlib.suppress(asyncpg.PostgresError):
            out["statements"] = int(
                await conn.fetchval(
                    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = $1",
                    row["oid"],
                )
            )
        return out
    finally:
        await conn.close()


async def pg_prepare(cluster: LocalCluster) -> bool:
    """CREATE EXTENSION pg_stat_statements; False when the server does not preload it."""
    import asyncpg

    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=10)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def pg_reset(cluster: LocalCluster) -> None:
    import asyncpg

    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=10)
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def pg_posted(cluster: LocalCluster, user_id: int) -> int:
    """Messages stored by one poster: what every client of its workspace must hold."""
    import asyncpg

    conn = await asyncpg.connect(cluster.database_url, timeout=10)
    try:
        n = await conn.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user_id)
        return int(n)
    finally:
        await conn.close()


def flannel_loads(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    """Per running Flannel node: workspace loads so far and workspaces cached now."""
    out = {}
    for name, node in cluster.flannels.items():
        if node.running:
            page = node.metrics()
            out[name] = {
                "loads": parse_metric(page, "flannel_workspace_loads_total"),
                "cached": parse_metric(page, "flannel_cached_workspaces"),
            }
    return out
