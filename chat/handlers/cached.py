"""``bootstrap``, ``users.autocomplete`` and ``channels.autocomplete`` on a chat node, in-process.

The embedded default speaks the whole protocol without Flannel: the node keeps Flannel's
:class:`~flannel.cache.WorkspaceCache` for the workspaces its clients use and answers with
Flannel's own :mod:`flannel.answers`, so both tiers give the same answers.

::

    bus ──events──> Caches (one subscriber per cached workspace) ──apply──> WorkspaceCache
                      ^ first request: subscribe, then queries.workspace_model  │
    request ──> access.actor (the session, in the database) ──> flannel.answers ┘

:class:`Caches` is the node's registry, held by :class:`~chat.handlers.context.Services`:

- A workspace's cache is loaded when a request first needs it; concurrent first requests
  share one load (one task per workspace, awaited by all). The load subscribes to the bus
  first and then reads the workspace, so no event falls between the two: the events that
  arrive during the read are kept and applied after it (those the read already reflects are
  skipped by ``seq``, or change nothing).
- It is dropped when the hub's last peer of the workspace leaves (:meth:`Caches.chain`
  follows ``Hub.on_last_peer``, after the node's own callback), and, past
  ``max_workspaces``, the least recently used cache goes first.

The cache follows the bus rather than being a hub tap: a tap keeps the hub's workspace
alive, so ``on_last_peer`` would never fire and the node would read the workspace's events
for as long as the cache lived.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chat import wire
from chat.bus import Bus, Envelope
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import actor
from chat.handlers.context import Caller, Services
from chat.storage import Database, queries
from flannel import answers
from flannel.cache import WorkspaceCache

MAX_WORKSPACES = 64


class _Feed:
    """The bus subscriber of one workspace's cache: keeps the events until the cache is
    loaded, then applies them as they come."""

    __slots__ = ("buffer", "cache")

    def __init__(self) -> None:
        self.cache: WorkspaceCache | None = None
        self.buffer: list[Envelope] = []

    def __call__(self, envelopes: Sequence[Envelope]) -> None:
        if self.cache is not None:
            self.cache.apply(envelopes)
        else:
            # Bounded by what commits during one read of the workspace.
            self.buffer.extend(env for env in envelopes if env.seq is not None)

    def start(self, cache: WorkspaceCache) -> None:
        cache.apply(self.buffer)
        self.buffer = []
        self.cache = cache


@dataclass(slots=True)
class _Entry:
    feed: _Feed
    load: asyncio.Task[WorkspaceCache]


class Caches:
    """The node's workspace caches (see the module docstring)."""

    def __init__(self, db: Database, bus: Bus, *, max_workspaces: int = MAX_WORKSPACES) -> None:
        self._db = db
        self._bus = bus
        self._max = max_workspaces
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first

    def __contains__(self, workspace_id: object) -> bool:
        return workspace_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, workspace_id: int) -> WorkspaceCache:
        """The workspace's cache, loaded by the first caller; the others wait for that load.
        A caller that is cancelled does not cancel the load."""
        entry = self._entries.get(workspace_id)
        if entry is None:
            entry = self._start(workspace_id)
        else:
            self._entries.move_to_end(workspace_id)
        return await asyncio.shield(entry.load)

    def drop(self, workspace_id: int) -> None:
        """Forget the workspace's cache and stop following its events. A load under way
        still answers the requests that wait for it."""
        entry = self._entries.pop(workspace_id, None)
        if entry is not None:
            self._bus.unsubscribe(workspace_id, entry.feed)

    def chain(self, then: Callable[[int], None] | None) -> Callable[[int], None]:
        """A ``Hub.on_last_peer`` that calls ``then`` (the callback it replaces), then drops
        the workspace's cache."""

        def on_last_peer(workspace_id: int) -> None:
            if then is not None:
                then(workspace_id)
            self.drop(workspace_id)

        return on_last_peer

    def _start(self, workspace_id: int) -> _Entry:
        feed = _Feed()
        entry = _Entry(feed, asyncio.ensure_future(self._load(workspace_id, feed)))
        self._entries[workspace_id] = entry
        entry.load.add_done_callback(lambda task: self._loaded(workspace_id, entry, task))
        while len(self._entries) > self._max:
            self.drop(next(iter(self._entries)))
        return entry

    async def _load(self, workspace_id: int, feed: _Feed) -> WorkspaceCache:
        await self._bus.subscribe(workspace_id, feed)  # first: nothing after the read is missed
        async with self._db.connection() as conn:
            model = await queries.workspace_model(conn, workspace_id)
        if model is None:
            raise ChatError(ErrorCode.NOT_FOUND, "no such workspace")
        cache = WorkspaceCache.from_model(workspace_id, model)
        feed.start(cache)
        return cache

    def _loaded(self, workspace_id: int, entry: _Entry, task: asyncio.Task[WorkspaceCache]) -> None:
        failed = task.cancelled() or task.exception() is not None
        current = self._entries.get(workspace_id) is entry
        if failed and current:
            del self._entries[workspace_id]  # the next request loads again
        if failed or not current:
            # Failed, or dropped while loading (maybe before its subscription was made).
            self._bus.unsubscribe(workspace_id, entry.feed)


# --------------------------------------------------------------------------- handlers


async def bootstrap(s: Services, c: Caller, req: wire.Bootstrap) -> wire.BootstrapData:
    counts: list[wire.ChannelCounts] = []
    async with s.db.connection() as conn:
        await actor(conn, c)
        if req.parts is None or "channels" in req.parts:
            counts = await queries.unread_counts(conn, c.user_id)
    cache = await s.caches.get(c.workspace_id)
    return answers.bootstrap(cache, c.user_id, req.parts, counts)


async def users_autocomplete(s: Services, c: Caller, req: wire.UsersAutocomplete) -> wire.Users:
    async with s.db.connection() as conn:
        await actor(conn, c)
    cache = await s.caches.get(c.workspace_id)
    return answers.users_autocomplete(cache, c.user_id, req)


async def channels_autocomplete(
    s: Services, c: Caller, req: wire.ChannelsAutocomplete
) -> wire.ChannelList:
    async with s.db.connection() as conn:
        await actor(conn, c)
    cache = await s.caches.get(c.workspace_id)
    return answers.channels_autocomplete(cache, c.user_id, req)
