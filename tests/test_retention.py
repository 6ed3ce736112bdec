"""Retention (defect 23): the pruning job on both stores, and the settings it relies on."""

from __future__ import annotations

import asyncio
import time

import pydantic
import pytest

from chat.config import Settings
from chat.retention import PruneCounts, Pruner
from chat.storage import Database, queries
from tests.pg import unique_database_name
from tests.timing import scaled

NOW = 1_800_000_000_000
HOUR = 3_600_000


def _settings(**overrides: float) -> Settings:
    values: dict[str, float] = {
        "replay_window_s": 900,
        "event_retention_s": 3600,
        "replay_max_events": 5,
        "prune_batch_size": 3,
        "revoked_session_retention_s": 60,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def _workspace_with_events(db: Database, created: list[int]) -> tuple[int, int]:
    """A workspace whose events 1..n were created at ``created``; returns (id, owner id)."""
    async with db.transaction() as conn:
        wid = await queries.create_workspace(conn, unique_database_name("ws"), 0)
        user = await queries.create_user(conn, wid, "ada", "Ada", "owner", 0)
        await queries.allocate_event_seqs(conn, wid, len(created))
        await queries.insert_events(
            conn,
            [(wid, i + 1, "message.posted", "{}", "{}", t) for i, t in enumerate(created)],
        )
    return wid, user.id


async def _seqs(db: Database, wid: int) -> list[int]:
    async with db.connection() as conn:
        return [r["seq"] for r in await queries.events_between(conn, wid, 0, 1000)]


async def test_defect_23_old_events_and_dead_sessions_are_pruned(db: Database) -> None:
    old, recent = NOW - 2 * HOUR, NOW - 60_000
    # 1..17 old, 18..20 recent: 1..15 go; 16..17 stay (among the last 5), 18..20 are young.
    busy, uid = await _workspace_with_events(db, [old] * 17 + [recent] * 3)
    # Three old events, fewer than replay_max_events: all kept.
    quiet, _ = await _workspace_with_events(db, [old] * 3)
    async with db.transaction() as conn:
        await queries.create_session(conn, "expired", uid, 0, NOW - 1)
        await queries.create_session(conn, "live", uid, 0, NOW + HOUR)
        await queries.create_session(conn, "revoked-long-ago", uid, 0, NOW + HOUR)
        await queries.revoke_session(conn, "revoked-long-ago", NOW - 120_000)
        await queries.create_session(conn, "revoked-just-now", uid, 0, NOW + HOUR)
        await queries.revoke_session(conn, "revoked-just-now", NOW - 1_000)

    pruner = Pruner(db, _settings())
    assert await pruner.prune_once(NOW) == PruneCounts(events=15, sessions=2)
    assert await _seqs(db, busy) == list(range(16, 21))
    assert await _seqs(db, quiet) == [1, 2, 3]
    async with db.connection() as conn:
        kept = [
            s
            for s in ("expired", "live", "revoked-long-ago", "revoked-just-now")
            if await conn.fetchval("SELECT 1 FROM sessions WHERE id = $1", s) is not None
        ]
    assert kept == ["live", "revoked-just-now"]
    # Nothing left to do: a second round deletes nothing.
    assert await pruner.prune_once(NOW) == PruneCounts()


async def test_defect_23_prune_loop_runs_until_cancelled(db: Database) -> None:
    # run() prunes at the wall clock's now.
    wid, _ = await _workspace_with_events(db, [int(time.time() * 1000) - 2 * HOUR] * 10)
    pruner = Pruner(db, _settings(prune_interval_s=0.05))
    task = asyncio.create_task(pruner.run())
    try:
        for _ in range(int(scaled(10) / 0.05)):
            if await _seqs(db, wid) == list(range(6, 11)):
                break
            await asyncio.sleep(0.05)
        assert await _seqs(db, wid) == list(range(6, 11))
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_defect_23_event_retention_must_cover_the_replay_window() -> None:
    with pytest.raises(pydantic.ValidationError, match="event_retention_s"):
        _settings(replay_window_s=7200, event_retention_s=3600)
    with pytest.raises(pydantic.ValidationError, match="db_pool_min_size"):
        Settings(db_pool_min_size=30, db_pool_max_size=10)
    defaults = Settings()
    assert defaults.event_retention_s == 7 * 24 * 3600
    assert defaults.event_retention_s >= defaults.replay_window_s
