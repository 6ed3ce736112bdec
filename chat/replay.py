"""Replay for resume: the events a reconnecting client missed, within the replay window.

The window keeps an event while it is among the last ``max_events`` of its workspace OR
younger than ``window_s``. A resume is possible when the first missed event is still in the
window; otherwise the answer is an explicit ``too_old``, never a silent gap.

A :class:`ReplayLog` answers two questions: :meth:`~ReplayLog.holds` (is the resume possible)
and :meth:`~ReplayLog.read` (the missed envelopes, in bounded chunks, so neither memory nor
one step of the event loop grows with the gap). :class:`DatabaseLog` reads the event log in
the store (the embedded default, and the authority on the window for any range a Redis stream
lost); the Redis bus reads its stream and falls back to this log. Which events a given user
may see is decided by :class:`chat.connect.BacklogFilter`, with the membership the user had at
each event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from chat.bus import Envelope
from chat.storage import Database, queries

CHUNK = 512


class ReplayLost(Exception):
    """A range the log held when the replay started is gone (pruned or trimmed mid-read):
    the resume must be answered ``too_old`` rather than with a gap."""


class ReplayLog(Protocol):
    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        """Whether the window still holds every event after after_seq (False: too_old)."""
        ...

    def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = CHUNK
    ) -> AsyncIterator[Sequence[Envelope]]:
        """The envelopes after_seq < seq <= up_to in order, contiguous, in chunks of at most
        ``chunk``. Raises :class:`ReplayLost` if a range vanished mid-read."""
        ...


class DatabaseLog:
    """The event log in the store, judged by the window rule."""

    def __init__(self, db: Database, window_s: float, max_events: int) -> None:
        self._db = db
        self._window_s = window_s
        self._max_events = max_events

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        if after_seq >= up_to:
            return True
        async with self._db.connection() as conn:
            first_time = await queries.event_time(conn, workspace_id, after_seq + 1)
        if first_time is None:
            return False  # pruned (or never written): the log cannot fill the gap
        if up_to - after_seq <= self._max_events:
            return True
        return first_time >= (time.time() - self._window_s) * 1000

    async def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = CHUNK
    ) -> AsyncIterator[Sequence[Envelope]]:
        position = after_seq
        while position < up_to:
            # One connection per chunk, never held across a yield: on SQLite it is the
            # store's only connection.
            batch = await self.chunk(workspace_id, position, min(up_to, position + chunk))
            position = batch[-1].seq or position
            yield batch

    async def chunk(self, workspace_id: int, after_seq: int, up_to: int) -> list[Envelope]:
        """Every envelope after_seq < seq <= up_to (a bounded range), contiguous, or
        :class:`ReplayLost`."""
        async with self._db.connection() as conn:
            rows = await queries.events_range(
                conn, workspace_id, after_seq, up_to, up_to - after_seq
            )
        envelopes = [Envelope.from_record(workspace_id, r) for r in rows]
        if [e.seq for e in envelopes] != list(range(after_seq + 1, up_to + 1)):
            raise ReplayLost(f"workspace {workspace_id}: events ({after_seq}, {up_to}]")
        return envelopes
