"""Retention: deletes what nothing reads any more, in bounded batches.

- ``events``: the event log and outbox. Resume reads it within the replay window (the last
  ``replay_max_events`` of a workspace OR younger than ``replay_window_s``); the sweeper and
  catch-up read recent positions. An event is deleted once it is older than
  ``event_retention_s`` (validated to be at least ``replay_window_s``) AND not among its
  workspace's last ``replay_max_events``.
- ``sessions``: deleted once expired, and once revoked for ``revoked_session_retention_s``
  (a token whose session is gone is refused like an unknown one).

Each statement deletes at most ``prune_batch_size`` rows, so no transaction holds many locks
or a long one; one :meth:`Pruner.prune_once` runs at most ``MAX_BATCHES`` statements per
table and leaves the rest to the next round. Several nodes may prune at once: the deletes
are idempotent. The node runs :meth:`Pruner.run` as a background task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from chat.config import Settings
from chat.storage import Database, StorageError, queries

log = logging.getLogger(__name__)

#: Statements per table per round; the rest waits for the next round.
MAX_BATCHES = 100


@dataclass(frozen=True, slots=True)
class PruneCounts:
    events: int = 0
    sessions: int = 0


class Pruner:
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    async def prune_once(self, now_ms: int) -> PruneCounts:
        """One round at ``now_ms``: what was deleted."""
        s = self._settings
        limit = s.prune_batch_size
        events_before = now_ms - int(s.event_retention_s * 1000)
        events = 0
        async with self._db.connection() as conn:
            workspaces = await queries.prunable_workspaces(conn, s.replay_max_events)
        batches = 0
        for workspace_id, max_seq in workspaces:
            while batches < MAX_BATCHES:
                batches += 1
                async with self._db.transaction() as conn:
                    deleted = await queries.prune_events(
                        conn, workspace_id, max_seq, events_before, limit
                    )
                events += deleted
                if deleted < limit:
                    break
        revoked_before = now_ms - int(s.revoked_session_retention_s * 1000)
        sessions = 0
        for _ in range(MAX_BATCHES):
            async with self._db.transaction() as conn:
                deleted = await queries.prune_sessions(conn, now_ms, revoked_before, limit)
            sessions += deleted
            if deleted < limit:
                break
        return PruneCounts(events=events, sessions=sessions)

    async def run(self) -> None:
        """Prune every ``prune_interval_s`` until cancelled; a failed round is logged and
        the next one tried (cancellation is never swallowed)."""
        while True:
            try:
                counts = await self.prune_once(int(time.time() * 1000))
            except StorageError as exc:  # the database is down or busy: next round
                log.warning("pruning failed: %s", exc)
            except Exception:
                log.exception("pruning failed")
            else:
                if counts.events or counts.sessions:
                    log.info(
                        "pruned",
                        extra={"events": counts.events, "sessions": counts.sessions},
                    )
            await asyncio.sleep(self._settings.prune_interval_s)
