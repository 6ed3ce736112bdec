"""Connect snapshots, coalesced: the one database round trip of a connect, shared.

In a reconnect storm thousands of sessions of one workspace connect within a second, and
each needs the same read (:func:`chat.storage.queries.connect_snapshots`): the workspace
position and, as of it, the user, the user's channels and the session's state. Reads of a
workspace that arrive while earlier ones are in flight wait, and go together in the next
statement (group commit, for reads): a storm costs a handful of statements, not one or more
per client. A workspace has one statement in flight at a time; while connects stream in (a
statement ran in the last ``busy_s``), each batch also waits ``linger_s`` for more before it
leaves; on a quiet node a connect never waits. A few workspaces' statements run at once
(``concurrency``), so one slow workspace does not hold up the others, and the pool keeps
connections for the requests of live sessions.

A read whose client has gone (or passed its deadline) by the time its batch is formed is
dropped with :class:`Abandoned` instead of being served: a storm must not spend the
database on connections nobody waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from chat import metrics
from chat.errors import ErrorCode
from chat.journal import now_ms
from chat.storage import Database, queries

# The state of the session and user as of the snapshot (ConnectState.session) -> why the
# connect is refused ("ok": it is not).
REFUSALS = {
    "revoked": ErrorCode.TOKEN_REVOKED,
    "expired": ErrorCode.TOKEN_EXPIRED,
    "missing": ErrorCode.INVALID_AUTH,
    "inactive": ErrorCode.ACCOUNT_INACTIVE,
}


class Abandoned(Exception):
    """The client went away before its snapshot was read: nothing was read for it."""


@dataclass(slots=True)
class _Wanted:
    user_id: int
    session_id: str
    alive: Callable[[], bool]
    future: asyncio.Future[queries.ConnectState] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SnapshotReader:
    """One per node. :meth:`read` is what the connect sequence's ``TakeSnapshot`` awaits."""

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = 500,
        concurrency: int = 2,
        linger_s: float = 0.02,
        busy_s: float = 0.05,
    ) -> None:
        self._db = db
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._busy_s = busy_s
        self._busy_until = 0.0
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting: dict[int, list[_Wanted]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Counters, for /metrics and the tests: statements run, snapshots read, dropped.
        self.statements = 0
        self.served = 0
        self.abandoned = 0
        self._closed = False

    async def read(
        self, workspace_id: int, user_id: int, session_id: str, alive: Callable[[], bool]
    ) -> queries.ConnectState:
        """The snapshot of one connecting session; :class:`Abandoned` if ``alive()`` turned
        False before its batch was read."""
        if self._closed:
            raise Abandoned()
        wanted = _Wanted(user_id, session_id, alive)
        waiting = self._waiting.get(workspace_id)
        if waiting is None:
            waiting = self._waiting[workspace_id] = []
            # Started on the next loop iteration: what arrives meanwhile joins the batch.
            task = asyncio.ensure_future(self._flush(workspace_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        waiting.append(wanted)
        return await wanted.future

    async def _flush(self, workspace_id: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = self._waiting.get(workspace_id)
            if waiting and len(waiting) < self._max_batch and loop.time() < self._busy_until:
                # Connects are streaming in (a statement ran moments ago): let a few more
                # milliseconds' worth join this batch. On a quiet node nothing waits.
                await asyncio.sleep(self._linger_s)
            async with self._slots:
                waiting = self._waiting.get(workspace_id)
                if not waiting:
                    self._waiting.pop(workspace_id, None)
                    return
                batch: list[_Wanted] = []
                taken = 0
                for wanted in waiting:
                    if len(batch) >= self._max_batch:
                        break
                    taken += 1
                    if wanted.future.done():  # the waiter was cancelled
                        continue
                    if not wanted.alive():
                        self.abandoned += 1
                        wanted.future.set_exception(Abandoned())
                        continue
                    batch.append(wanted)
                del waiting[:taken]
                if batch:
                    await self._read(workspace_id, batch)

    async def _read(self, workspace_id: int, batch: list[_Wanted]) -> None:
        try:
            async with self._db.connection() as conn:
                states = await queries.connect_snapshots(
                    conn, workspace_id, [(w.user_id, w.session_id) for w in batch], now_ms()
                )
        except BaseException as exc:  # the node stopping (cancelled) included
            failure = exc if isinstance(exc, Exception) else Abandoned()
            for wanted in batch:
                if not wanted.future.done():
                    wanted.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        self.statements += 1
        self.served += len(batch)
        metrics.SNAPSHOT_BATCH.observe(len(batch))
        self._busy_until = asyncio.get_running_loop().time() + self._busy_s
        for wanted, state in zip(batch, states, strict=True):
            if not wanted.future.done():
                wanted.future.set_result(state)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for waiting in self._waiting.values():
            for wanted in waiting:
                if not wanted.future.done():
                    wanted.future.set_exception(Abandoned())
        self._waiting.clear()
