"""Replay for resume: the events a reconnecting client missed, within the replay window.

The window keeps an event while it is among the last ``max_events`` of its workspace OR
younger than ``window_s``. A resume is possible when the first missed event is still in the
window; otherwise the answer is an explicit ``too_old``, never a silent gap.

:class:`DatabaseLog` reads the event log in the store (the embedded default, and the fallback
for any range the Redis stream does not hold); the Redis bus provides its own log over the
workspace stream. Which events a given user may see is decided by
:func:`chat.fanout.visible_backlog`, with the membership the user had at each event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from chat.bus import Envelope
from chat.storage import Database, Record, queries


class ReplayLog(Protocol):
    async def replay(
        self, workspace_id: int, after_seq: int, up_to: int
    ) -> Sequence[Envelope] | None:
        """Envelopes with after_seq < seq <= up_to, in order; None when the window no longer
        holds the first of them."""
        ...


def envelope_from_row(workspace_id: int, row: Record) -> Envelope:
    payload = row["payload"]
    return Envelope.from_header(
        workspace_id,
        int(row["seq"]),
        row["type"],
        row["audience"],
        payload.encode() if isinstance(payload, str) else payload,
    )


class DatabaseLog:
    def __init__(self, db: Database, window_s: float, max_events: int) -> None:
        self._db = db
        self._window_s = window_s
        self._max_events = max_events

    async def replay(
        self, workspace_id: int, after_seq: int, up_to: int
    ) -> Sequence[Envelope] | None:
        if after_seq >= up_to:
            return []
        async with self._db.connection() as conn:
            if up_to - after_seq > self._max_events:
                first_time = await queries.event_time(conn, workspace_id, after_seq + 1)
                cutoff = (time.time() - self._window_s) * 1000
                if first_time is None or first_time < cutoff:
                    return None
            rows = await queries.events_between(conn, workspace_id, after_seq, up_to)
        if len(rows) != up_to - after_seq:
            return None  # the log itself has lost entries: do not pretend
        return [envelope_from_row(workspace_id, r) for r in rows]
