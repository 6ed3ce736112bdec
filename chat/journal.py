"""The workspace journal: every durable change goes through here.

Operations on one workspace are queued and run by one writer task, in arrival order, many to a
transaction (group commit): each operation runs in its own savepoint, so a refused one rolls
back alone. Events the operations emit are numbered with consecutive workspace positions
(``seq``), serialized once, written to the ``events`` table in the same transaction (the
outbox), and published to the bus only after the commit. So: an acknowledged operation is
committed; its events are numbered in commit order; and every node sees them in that order.

::

    handler ──submit(op)──> queue ──writer──> BEGIN
                                               op1 (savepoint) ─ emits events
                                               op2 (savepoint) ─ refused, rolled back
                                               number events, INSERT INTO events
                                              COMMIT ──> bus.publish ──> replies
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chat import wire
from chat.bus import Audience, Bus, Envelope
from chat.errors import ChatError, ErrorCode
from chat.storage import Connection, Database, queries

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 256


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


class Journal:
    def __init__(
        self, db: Database, bus: Bus, *, on_commit: Callable[[int, float], None] | None = None
    ) -> None:
        self._db = db
        self._bus = bus
        self._queues: dict[int, deque[_Pending]] = {}
        self._writers: dict[int, asyncio.Task[None]] = {}
        self._on_commit = on_commit
        self._closed = False

    async def run(self, workspace_id: int, op: Op[T]) -> T:
        """Run ``op`` in the workspace's next transaction; returns its result once committed
        and published. The op is queued synchronously, so calls made in order run in order.
        """
        return await self.submit(workspace_id, op)

    def submit(self, workspace_id: int, op: Op[T]) -> asyncio.Future[T]:
        if self._closed:
            # Draining: nothing new is accepted here; the client retries after reconnecting.
            raise ChatError(ErrorCode.INTERNAL_ERROR, "this node is shutting down; retry")
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
        outcomes: list[tuple[bool, Any]] = []
        envelopes: list[Envelope] = []
        try:
            async with self._db.transaction() as conn:
                now = now_ms()
                drafts: list[Draft] = []
                for pending in batch:
                    tx = Tx(conn, workspace_id, now)
                    try:
                        async with conn.savepoint():
                            result = await pending.op(tx)
                    except Exception as exc:  # refused (ChatError) or failed: alone
                        outcomes.append((False, exc))
                        continue
                    outcomes.append((True, result))
                    drafts.extend(tx.drafts)
                if drafts:
                    last = await queries.allocate_event_seqs(conn, workspace_id, len(drafts))
                    envelopes = [
                        _seal(d, workspace_id, seq, now)
                        for seq, d in enumerate(drafts, start=last - len(drafts) + 1)
                    ]
                    await queries.insert_events(
                        conn,
                        [
                            (
                                workspace_id,
                                e.seq or 0,
                                e.type,
                                e.audience.header(),
                                e.payload.decode(),
                                now,
                            )
                            for e in envelopes
                        ],
                    )
        except Exception as exc:
            log.exception("journal commit failed", extra={"workspace_id": workspace_id})
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        if self._on_commit:
            self._on_commit(len(batch), time.perf_counter() - started)
        if envelopes:
            try:
                await self._bus.publish(envelopes)
            except Exception:
                # Committed but not delivered: the events are in the log for replay.
                log.exception("publish failed", extra={"workspace_id": workspace_id})
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            if pending.future.done():  # the requester went away; the work is done anyway
                continue
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)

    async def close(self) -> None:
        """Finish queued work, then refuse more."""
        self._closed = True
        while self._writers:
            await asyncio.gather(*self._writers.values(), return_exceptions=True)


def _seal(draft: Draft, workspace_id: int, seq: int, now: int) -> Envelope:
    event = draft.event.model_copy(update={"seq": seq, "workspace_id": workspace_id, "ts": now})
    return Envelope(
        workspace_id=workspace_id,
        seq=seq,
        type=event.type,  # type: ignore[attr-defined]
        payload=wire.dump(event),
        audience=draft.audience,
    )
