"""The change watcher: which workspaces' event logs moved, whoever committed.

A node without Redis delivers the events its own journal commits in-process. Events that
another process commits (``chat admin``, a second process over the same store) reach it only
through the database, so it watches:

- PostgreSQL: the committing journal calls ``pg_notify('chat_events', 'workspace:seq')``
  inside its transaction (delivered at commit, :func:`chat.storage.queries.notify_events`);
  a dedicated connection LISTENs, reconnecting when it drops.
- Both stores: a cheap poll, one query of the watched workspaces' ``last_event_seq`` every
  ``poll_s``: the only signal on SQLite, and the backstop on PostgreSQL for notifications
  sent while the listening connection was down.

The watcher only reports ``(workspace_id, last_seq)``; reading the missing events is the
bus's job. Besides ``queries.py``, the only module that speaks SQL (LISTEN needs its own
connection, outside the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Collection
from typing import Any

from chat.storage import queries
from chat.storage.base import Database

log = logging.getLogger(__name__)

CHANNEL = "chat_events"

OnChange = Callable[[int, int], None]  # (workspace_id, last committed seq)


class ChangeWatcher:
    """Calls ``on_change(workspace_id, last_seq)`` for the workspaces ``watched()`` returns,
    when the database shows events committed there (possibly ones already seen: the caller
    compares with its own position)."""

    def __init__(
        self,
        db: Database,
        watched: Callable[[], Collection[int]],
        on_change: OnChange,
        *,
        database_url: str = "",
        poll_s: float = 0.5,
    ) -> None:
        self._db = db
        self._watched = watched
        self._on_change = on_change
        self._database_url = database_url
        self._poll_s = poll_s
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll(), name="changes-poll"))
        if self._db.dialect == "postgres" and self._database_url:
            self._tasks.append(asyncio.create_task(self._listen(), name="changes-listen"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _report(self, workspace_id: int, last_seq: int) -> None:
        if workspace_id in self._watched():
            try:
                self._on_change(workspace_id, last_seq)
            except Exception:
                log.exception("change handler failed", extra={"workspace_id": workspace_id})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            workspaces = list(self._watched())
            if not workspaces:
                continue
            try:
                async with self._db.connection() as conn:
                    positions = await queries.event_positions(conn, workspaces)
            except Exception as exc:  # the store is down: the next poll tries again
                _raise_if_cancelling()
                log.warning("change poll failed", extra={"error": str(exc)})
                continue
            for workspace_id, last_seq in positions.items():
                self._report(int(workspace_id), int(last_seq))

    async def _listen(self) -> None:
        import asyncpg

        backoff = 0.1
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._database_url, timeout=5)
                closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(functools.partial(_set_done, closed))
                await conn.add_listener(CHANNEL, self._notified)
                backoff = 0.1
                await closed  # until PostgreSQL restarts or the connection drops
                log.warning("change listener lost its connection; reconnecting")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                _raise_if_cancelling()
                log.warning("change listener failed", extra={"error": str(exc)})
            finally:
                if conn is not None:
                    # terminate(): no round trip to a server that may be gone.
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        workspace, _, seq = payload.partition(":")
        try:
            self._report(int(workspace), int(seq))
        except ValueError:
            log.warning("bad change notification", extra={"payload": payload})


def _set_done(future: asyncio.Future[None], _conn: Any) -> None:
    if not future.done():
        future.set_result(None)


def _raise_if_cancelling() -> None:
    # The storage layer cannot import the bus's helper (layers import downwards only).
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
