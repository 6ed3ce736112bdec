"""The workspace journal: every durable change goes through here.

Operations on one workspace are queued and run by one writer task, in arrival order, many to a
transaction (group commit): each operation runs in its own savepoint, so a refused one rolls
back alone. Events the operations emit are numbered with consecutive workspace positions
(``seq``), serialized once, written to the ``events`` table in the same transaction (the
outbox), and published to the bus only after the commit. So: an acknowledged operation is
committed; its events are numbered in commit order; and every node sees them in that order.

::

    handler ──submit(op)──> queue ──writer──> BEGIN
                                               lock the workspace row (first, always)
                                               op1 (savepoint) ─ emits events
                                               op2 (savepoint) ─ refused, rolled back
                                               number events, INSERT INTO events
                                              COMMIT ──> replies
                                                 └──> ordered publisher ──> bus.publish

Locks: every batch takes the workspace row lock before anything else, so batches of one
workspace are serialized across nodes and never wait for each other's channel rows in
opposite orders. A deadlock or serialization failure that still happens (another writer
outside the journal) re-runs the whole batch, a bounded number of times: operations are
closures over a fresh :class:`Tx`, and the failed transaction rolled back.

Publishing: with Redis (several nodes), the reply does not wait for the bus. Committed is
acknowledged; each workspace has one publisher task that hands batches to the bus in commit
order, and the outbox (the ``events`` table plus the Redis sweeper) delivers whatever a failed
publish missed. With the in-process :class:`LocalBus` delivery is synchronous and cheap, so it
happens before the reply: a single node's clients see their own events first.

Failures become the store's vocabulary (:mod:`chat.storage.base`): ``Unavailable`` (nothing
committed, retry later) and ``OutcomeUnknown`` (the connection died during COMMIT).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chat import wire
from chat.bus import Audience, Bus, Envelope, LocalBus
from chat.errors import ChatError, ErrorCode
from chat.storage import Connection, Database, queries
from chat.storage.base import OutcomeUnknown, TransactionConflict, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 256
# Whole-batch re-runs after a deadlock or serialization failure before giving up (as
# Unavailable: retryable, never internal_error).
MAX_ATTEMPTS = 5
# Envelopes waiting for a slow or absent bus, per workspace; beyond it the oldest are
# dropped: they are in the event log, and the bus copies what its stream misses from there.
MAX_UNPUBLISHED = 50_000
# Whole-batch failures: the transaction as a whole is gone, so no operation in it may be
# answered on its own.
_BATCH_FAILURES = (TransactionConflict, Unavailable, OutcomeUnknown)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Draft:
    """An event emitted by an operation, not yet numbered."""

    event: wire.Event
    audience: Audience


@dataclass(slots=True)
class Tx:
    """What an operation gets: the transaction's connection and a place to emit events."""

    conn: Connection
    workspace_id: int
    now: int
    drafts: list[Draft] = field(default_factory=list)

    def emit(self, event: wire.Event, audience: Audience) -> None:
        self.drafts.append(Draft(event, audience))


Op = Callable[[Tx], Awaitable[T]]


@dataclass(slots=True)
class _Pending:
    op: Op[Any]
    future: asyncio.Future[Any]


class _Publisher:
    """Hands committed batches of one workspace to the bus, in commit order, off the reply
    path. One task while there is work; it exits when idle."""

    __slots__ = ("_bus", "_on_idle", "_pending", "_task", "workspace_id")

    def __init__(self, bus: Bus, workspace_id: int, on_idle: Callable[[], None]) -> None:
        self._bus = bus
        self.workspace_id = workspace_id
        self._on_idle = on_idle  # forget this publisher: quiet workspaces hold nothing
        self._pending: deque[Envelope] = deque()
        self._task: asyncio.Task[None] | None = None

    def put(self, envelopes: list[Envelope]) -> None:
        self._pending.extend(envelopes)
        overflow = len(self._pending) - MAX_UNPUBLISHED
        if overflow > 0:
            for _ in range(overflow):
                self._pending.popleft()
            log.warning(
                "bus behind: dropped queued events (the event log keeps them)",
                extra={"workspace_id": self.workspace_id, "dropped": overflow},
            )
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"journal-publish-{self.workspace_id}"
            )

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def _run(self) -> None:
        try:
            while self._pending:
                # Everything queued so far, in order, in one call: a bus that is slow or
                # retrying gets fewer, larger batches instead of a growing backlog of calls.
                batch = list(self._pending)
                self._pending.clear()
                try:
                    await self._bus.publish(batch)
                except Exception:
                    # Committed but not delivered: the events are in the log, and the bus's
                    # sweeper (or the next append, which fills holes) copies them later.
                    log.exception("publish failed", extra={"workspace_id": self.workspace_id})
        finally:
            self._task = None
            self._on_idle()


class Journal:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        on_commit: Callable[[int, float], None] | None = None,
        publish_inline: bool | None = None,
        flush_timeout_s: float = 5.0,
    ) -> None:
        """``publish_inline``: deliver before replying (default: only for the in-process
        :class:`LocalBus`). ``flush_timeout_s`` bounds how long :meth:`close` waits for
        the publishers."""
        self._db = db
        self._bus = bus
        self._queues: dict[int, deque[_Pending]] = {}
        self._writers: dict[int, asyncio.Task[None]] = {}
        self._publishers: dict[int, _Publisher] = {}
        self._on_commit = on_commit
        self._inline = isinstance(bus, LocalBus) if publish_inline is None else publish_inline
        self._flush_timeout_s = flush_timeout_s
        self._closed = False

    async def run(self, workspace_id: int, op: Op[T]) -> T:
        """Run ``op`` in the workspace's next transaction; returns its result once committed
        (and, on a single node, delivered). The op is queued synchronously, so calls made in
        order run in order. It may run more than once (a deadlock re-runs the batch): it must
        only act through ``tx``."""
        return await self.submit(workspace_id, op)

    def submit(self, workspace_id: int, op: Op[T]) -> asyncio.Future[T]:
        if self._closed:
            # Draining: nothing new is accepted here; the client retries after reconnecting.
            raise ChatError(
                ErrorCode.UNAVAILABLE,
                "this node is shutting down; retry on another",
                retry_after_ms=1000,
            )
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(workspace_id, deque()).append(_Pending(op, future))
        if workspace_id not in self._writers:
            self._writers[workspace_id] = asyncio.create_task(
                self._write(workspace_id), name=f"journal-{workspace_id}"
            )
        return future

    async def _write(self, workspace_id: int) -> None:
        queue = self._queues[workspace_id]
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(MAX_BATCH, len(queue)))]
                await self._commit(workspace_id, batch)
        finally:
            # Exit when idle, so thousands of quiet workspaces hold no tasks.
            del self._writers[workspace_id]
            if queue:
                self._writers[workspace_id] = asyncio.create_task(self._write(workspace_id))
            else:
                del self._queues[workspace_id]

    async def _commit(self, workspace_id: int, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        attempt = 1
        while True:
            try:
                outcomes, envelopes = await self._transaction(workspace_id, batch)
                break
            except TransactionConflict as exc:
                if attempt < MAX_ATTEMPTS:
                    log.info(
                        "journal batch conflicted; re-running",
                        extra={"workspace_id": workspace_id, "attempt": attempt},
                    )
                    # Jittered, growing pause so two colliding writers do not collide again.
                    await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
                    attempt += 1
                    continue
                log.warning("journal batch kept conflicting", extra={"workspace_id": workspace_id})
                self._fail(batch, Unavailable(f"database conflict persisted: {exc}"))
                return
            except (Unavailable, OutcomeUnknown) as exc:
                log.warning("journal commit failed: %s", exc, extra={"workspace_id": workspace_id})
                self._fail(batch, exc)
                return
            except Exception as exc:
                log.exception("journal commit failed", extra={"workspace_id": workspace_id})
                self._fail(batch, exc)
                return
        if self._on_commit:
            self._on_commit(len(batch), time.perf_counter() - started)
        if envelopes:
            if self._inline:
                try:
                    await self._bus.publish(envelopes)
                except Exception:
                    # Committed but not delivered: the events are in the log for replay.
                    log.exception("publish failed", extra={"workspace_id": workspace_id})
            else:
                publisher = self._publishers.get(workspace_id)
                if publisher is None:
                    publisher = self._publishers[workspace_id] = _Publisher(
                        self._bus, workspace_id, lambda: self._forget_publisher(workspace_id)
                    )
                publisher.put(envelopes)
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            if pending.future.done():  # the requester went away; the work is done anyway
                continue
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)

    async def _transaction(
        self, workspace_id: int, batch: list[_Pending]
    ) -> tuple[list[tuple[bool, Any]], list[Envelope]]:
        """One attempt at the batch: (per-operation outcomes, sealed envelopes) once
        committed. Raises a whole-batch failure (conflict, unavailable, unknown outcome)."""
        outcomes: list[tuple[bool, Any]] = []
        envelopes: list[Envelope] = []
        async with self._db.transaction() as conn:
            await queries.lock_workspace(conn, workspace_id)
            now = now_ms()
            drafts: list[Draft] = []
            for pending in batch:
                tx = Tx(conn, workspace_id, now)
                try:
                    async with conn.savepoint():
                        result = await pending.op(tx)
                except _BATCH_FAILURES:
                    raise
                except Exception as exc:  # refused (ChatError) or failed: alone
                    outcomes.append((False, exc))
                    continue
                outcomes.append((True, result))
                drafts.extend(tx.drafts)
            envelopes = await self._record(conn, workspace_id, drafts, now)
        return outcomes, envelopes

    async def _record(
        self, conn: Connection, workspace_id: int, drafts: list[Draft], now: int
    ) -> list[Envelope]:
        """Number the drafts, write them to the event log; the sealed envelopes."""
        if not drafts:
            return []
        last = await queries.allocate_event_seqs(conn, workspace_id, len(drafts))
        envelopes = [
            _seal(d, workspace_id, seq, now)
            for seq, d in enumerate(drafts, start=last - len(drafts) + 1)
        ]
        await queries.insert_events(
            conn,
            [
                (workspace_id, e.seq or 0, e.type, e.audience.header(), e.payload.decode(), now)
                for e in envelopes
            ],
        )
        if self._db.dialect == "postgres":  # other processes' nodes listen
            await queries.notify_events(conn, workspace_id, last)
        return envelopes

    async def found(self, create: Callable[[Connection, int], Awaitable[int]], op: Op[T]) -> T:
        """Create a workspace (``create`` returns its id) and run its first operation, in one
        transaction: either both commit, with the operation's events as the workspace's
        first, or neither does. Nothing else can be queued for a workspace that does not
        exist yet, so this runs outside the queues."""
        if self._closed:
            raise ChatError(
                ErrorCode.UNAVAILABLE, "this node is shutting down", retry_after_ms=1000
            )
        async with self._db.transaction() as conn:
            now = now_ms()
            workspace_id = await create(conn, now)
            tx = Tx(conn, workspace_id, now)
            result = await op(tx)
            envelopes = await self._record(conn, workspace_id, tx.drafts, now)
        if envelopes:
            try:
                await self._bus.publish(envelopes)
            except Exception:
                log.exception("publish failed", extra={"workspace_id": workspace_id})
        return result

    def _forget_publisher(self, workspace_id: int) -> None:
        self._publishers.pop(workspace_id, None)

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    async def close(self) -> None:
        """Finish queued work, then refuse more; then flush the publishers, waiting at most
        ``flush_timeout_s`` (what is left is in the event log)."""
        self._closed = True
        while self._writers:
            await asyncio.gather(*self._writers.values(), return_exceptions=True)
        tasks = [p.task for p in self._publishers.values() if p.task is not None]
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=self._flush_timeout_s)
        finally:
            for task in tasks:
                task.cancel()
            self._publishers.clear()


def _seal(draft: Draft, workspace_id: int, seq: int, now: int) -> Envelope:
    event = draft.event.model_copy(update={"seq": seq, "workspace_id": workspace_id, "ts": now})
    return Envelope(
        workspace_id=workspace_id,
        seq=seq,
        type=event.type,  # type: ignore[attr-defined]
        payload=wire.dump(event),
        audience=draft.audience,
    )
