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

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
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


class _Run:
    """A contiguous run of one workspace's envelopes: seqs ``first .. first+len-1``."""

    __slots__ = ("bytes", "envelopes", "first", "lock", "used")

    def __init__(self) -> None:
        self.first = 0
        self.envelopes: list[Envelope] = []
        self.bytes = 0
        self.used = 0.0
        # Misses of one workspace are read one at a time: a storm's resumes wait for the
        # first read and find what it added, instead of each reading the same range.
        self.lock = asyncio.Lock()

    @property
    def last(self) -> int:
        return self.first + len(self.envelopes) - 1

    def covers(self, seq: int) -> bool:
        return bool(self.envelopes) and self.first <= seq <= self.last


class ReplayCache:
    """A read-through cache over a :class:`ReplayLog`, shared by the node's resumes.

    In a reconnect storm thousands of clients of a workspace resume from about the same
    position, and a client that retries asks again for a longer range. Each workspace keeps
    one contiguous run of the envelopes read last (events never change once committed), at
    most ``max_bytes`` of payload (the oldest go first), dropped ``ttl_s`` after its last
    use. A read takes what the run holds and reads only the rest, once: concurrent misses of
    a workspace queue behind one read. A range longer than ``max_events`` is read straight
    from the log, never held. Where the run still holds events the log has dropped, they are
    served (more than the window promises, no harm)."""

    def __init__(
        self,
        log: ReplayLog,
        *,
        max_bytes: int = 8 << 20,
        max_events: int = 20_000,
        max_workspaces: int = 64,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._max_bytes = max_bytes
        self._max_events = max_events
        self._max_workspaces = max_workspaces
        self._ttl_s = ttl_s
        self._clock = clock
        self._runs: dict[int, _Run] = {}
        self.hits = 0  # envelopes served from memory
        self.misses = 0  # envelopes read from the log

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        if after_seq >= up_to:
            return True
        run = self._runs.get(workspace_id)
        if run is not None and run.covers(after_seq + 1):
            return True
        return await self._log.holds(workspace_id, after_seq, up_to)

    async def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = CHUNK
    ) -> AsyncIterator[Sequence[Envelope]]:
        position = after_seq
        while position < up_to:
            run = self._run(workspace_id)
            if not run.covers(position + 1):
                if up_to - position > self._max_events:
                    # Too long to hold: straight from the log, in chunks, as without a cache.
                    async for batch in self._log.read(workspace_id, position, up_to, chunk=chunk):
                        yield batch
                    return
                async with run.lock:
                    if not run.covers(position + 1):
                        await self._fill(workspace_id, run, position, up_to, chunk)
                if not run.covers(position + 1):
                    raise ReplayLost(f"workspace {workspace_id}: event {position + 1}")
            start = position + 1 - run.first
            batch = run.envelopes[start : start + min(chunk, up_to - position)]
            self.hits += len(batch)
            position += len(batch)
            yield batch

    def extend(self, envelopes: Sequence[Envelope]) -> None:
        """Live events as they are delivered: appended to their workspace's run when they
        follow it, so that resumes from the recent past are served from memory (at the edge:
        without asking the chat tier). A run is never started here, and one being filled is
        left alone: it stays contiguous either way."""
        for env in envelopes:
            if env.seq is None:
                continue
            run = self._runs.get(env.workspace_id)
            if run is None or not run.envelopes or run.lock.locked():
                continue
            if env.seq == run.last + 1:
                run.envelopes.append(env)
                run.bytes += len(env.payload)
                self._trim(run, keep_from=env.seq)

    async def _fill(
        self, workspace_id: int, run: _Run, after_seq: int, up_to: int, chunk: int
    ) -> None:
        """Read what follows ``after_seq`` into the run: up to where the run starts (a
        range before it), or to ``up_to``."""
        end = up_to
        if run.envelopes and after_seq < run.first - 1:
            end = min(up_to, run.first - 1)
        read: list[Envelope] = []
        async for batch in self._log.read(workspace_id, after_seq, end, chunk=chunk):
            read.extend(batch)
        self.misses += len(read)
        size = sum(len(e.payload) for e in read)
        if run.envelopes and end == run.first - 1:  # just before the run
            run.envelopes[:0] = read
            run.first = after_seq + 1
        elif run.envelopes and after_seq == run.last:  # just after it
            run.envelopes.extend(read)
        else:  # elsewhere: the run starts again here
            run.envelopes, run.first, run.bytes = read, after_seq + 1, 0
        run.bytes += size
        self._trim(run, keep_from=after_seq + 1)

    def _trim(self, run: _Run, keep_from: int) -> None:
        """Over the byte bound: drop the oldest envelopes, but never the range being read."""
        drop = 0
        envelopes = run.envelopes
        while run.bytes > self._max_bytes and run.first + drop < keep_from:
            run.bytes -= len(envelopes[drop].payload)
            drop += 1
        if drop:
            del envelopes[:drop]
            run.first += drop

    def _run(self, workspace_id: int) -> _Run:
        now = self._clock()
        run = self._runs.get(workspace_id)
        if run is None or (now - run.used > self._ttl_s and not run.lock.locked()):
            if len(self._runs) >= self._max_workspaces:
                self._forget(now)
            run = self._runs[workspace_id] = _Run()
        run.used = now
        return run

    def _forget(self, now: float) -> None:
        """Drop expired runs, else the least recently used one."""
        idle = [w for w, r in self._runs.items() if not r.lock.locked()]
        expired = [w for w in idle if now - self._runs[w].used > self._ttl_s]
        for workspace_id in expired or sorted(idle, key=lambda w: self._runs[w].used)[:1]:
            del self._runs[workspace_id]
