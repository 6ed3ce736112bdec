"""In-process bus: a single node delivers events in ``seq`` order, whoever committed them.

The node's own journal publishes here after each commit, and that is the hot path: a batch
that continues the workspace's delivered position is handed to the subscribers at once. But
another process may commit to the same store (``chat admin``, another node without Redis).
So, given the database, the bus keeps the position delivered per workspace and:

- a published batch that starts above position + 1 (someone committed in between) is
  preceded by the missing range, read from the event log;
- the change watcher (:mod:`chat.storage.changes`: LISTEN/NOTIFY on PostgreSQL, a cheap
  poll on both stores) reports the database ahead of the position: the bus reads the range.

Each workspace's subscribers thus get every event once, in order, without gaps. Without a
database (``chat admin``'s own journal) it only hands batches to its subscribers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence

from chat.bus.base import Envelope, Subscriber
from chat.storage import Database, queries
from chat.storage.changes import ChangeWatcher

log = logging.getLogger(__name__)

CHUNK = 512


class LocalBus:
    def __init__(
        self, db: Database | None = None, *, database_url: str = "", poll_s: float = 0.5
    ) -> None:
        """``db``: follow commits of other processes (see the module docstring);
        ``database_url``: PostgreSQL's, to LISTEN; ``poll_s``: the change poll's period."""
        self._subscribers: defaultdict[int, list[Subscriber]] = defaultdict(list)
        self._db = db
        self._positions: dict[int, int] = {}  # workspace -> last seq delivered (with a db)
        self._catching: Counter[int] = Counter()  # workspaces with a catch-up under way
        self._locks: dict[int, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: ChangeWatcher | None = None
        if db is not None:
            self._watcher = ChangeWatcher(
                db,
                self._positions.keys,
                self._on_change,
                database_url=database_url,
                poll_s=poll_s,
            )
        self._watching = False

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        by_workspace: defaultdict[int, list[Envelope]] = defaultdict(list)
        for env in envelopes:
            by_workspace[env.workspace_id].append(env)
        for workspace_id, batch in by_workspace.items():
            if workspace_id not in self._subscribers:
                continue
            position = self._positions.get(workspace_id)
            seqs = [e.seq for e in batch if e.seq is not None]
            if position is None or not seqs:  # untracked, or ephemeral only
                self._fan_out(workspace_id, batch)
            elif seqs[0] == position + 1 and not self._catching[workspace_id]:
                # The hot path: the journal's batch continues what was delivered.
                self._positions[workspace_id] = seqs[-1]
                self._fan_out(workspace_id, batch)
            else:
                await self._catch_up(workspace_id, seqs[-1], batch)

    async def subscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        """Deliver the workspace's events committed from now on (call before a snapshot)."""
        if self._db is not None and workspace_id not in self._positions:
            async with self._db.connection() as conn:
                row = await queries.get_workspace(conn, workspace_id)
            if workspace_id not in self._positions:  # checked again after the await
                self._positions[workspace_id] = int(row["last_event_seq"]) if row else 0
            if self._watcher is not None and not self._watching:
                self._watching = True
                self._watcher.start()
        if subscriber not in self._subscribers[workspace_id]:
            self._subscribers[workspace_id].append(subscriber)

    def unsubscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        subs = self._subscribers.get(workspace_id)
        if subs and subscriber in subs:
            subs.remove(subscriber)
        if not subs:
            self._subscribers.pop(workspace_id, None)
            self._positions.pop(workspace_id, None)
            if not self._catching[workspace_id]:
                self._locks.pop(workspace_id, None)

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._subscribers.clear()
        self._positions.clear()

    # ------------------------------------------------------------------ catching up

    def _on_change(self, workspace_id: int, last_seq: int) -> None:
        """The watcher saw the database at ``last_seq``: read what is not delivered yet."""
        position = self._positions.get(workspace_id)
        if position is None or last_seq <= position or self._catching[workspace_id]:
            return
        task = asyncio.create_task(self._catch_up(workspace_id, last_seq, ()))
        self._tasks.add(task)
        task.add_done_callback(self._caught_up)

    def _caught_up(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("catch-up failed", exc_info=task.exception())

    async def _catch_up(self, workspace_id: int, up_to: int, tail: Sequence[Envelope]) -> None:
        """Deliver the events after the position up to ``up_to``: from the event log, except
        the ``tail`` in hand (a published batch), in order, each once."""
        self._catching[workspace_id] += 1
        try:
            lock = self._locks.setdefault(workspace_id, asyncio.Lock())
            async with lock:
                await self._fill(workspace_id, up_to, tail)
        finally:
            self._catching[workspace_id] -= 1
            if not self._catching[workspace_id]:
                del self._catching[workspace_id]

    async def _fill(self, workspace_id: int, up_to: int, tail: Sequence[Envelope]) -> None:
        assert self._db is not None
        position = self._positions.get(workspace_id)
        if position is None:
            return  # unsubscribed meanwhile
        in_hand = [e.seq for e in tail if e.seq is not None and e.seq > position]
        fill_to = in_hand[0] - 1 if in_hand else up_to
        while position < fill_to:
            async with self._db.connection() as conn:
                rows = await queries.events_range(
                    conn, workspace_id, position, fill_to, min(CHUNK, fill_to - position)
                )
            if workspace_id not in self._positions:
                return
            if not rows:
                # The log lacks the range (pruned): skipping it beats stalling delivery.
                log.warning("event log gap", extra={"workspace_id": workspace_id})
                position = fill_to
                break
            chunk = [Envelope.from_record(workspace_id, r) for r in rows]
            position = chunk[-1].seq or position
            self._positions[workspace_id] = position
            self._fan_out(workspace_id, chunk)
        fresh = [e for e in tail if e.seq is None or e.seq > position]
        if any(e.seq is not None for e in fresh):
            self._positions[workspace_id] = max(e.seq or 0 for e in fresh)
        if fresh:
            self._fan_out(workspace_id, fresh)

    def _fan_out(self, workspace_id: int, batch: Sequence[Envelope]) -> None:
        for subscriber in list(self._subscribers.get(workspace_id, ())):
            try:
                subscriber(batch)
            except Exception:
                # One broken subscriber must not keep the event from the others.
                log.exception("subscriber failed")
