"""Ephemeral state: presence and typing. Never stored, never numbered, never replayed.

Presence is ``active`` while a user has at least one connection and has not set ``away``;
changes go only to connections that subscribed to that user (Slack's lesson: broadcasting
every presence change to a whole workspace costs more than everything else). Typing is relayed
to the channel at most once per ``typing_interval_s`` per user and channel.

A connect, a disconnect or ``presence.set`` costs O(1): counters in memory change, and the
``(workspace, user)`` is marked dirty. On a single node the change is published on the
in-process bus at once. Across nodes (:class:`ClusterPresence`), each node keeps in Redis the
set of users active on it, per workspace, with a TTL it keeps refreshing; a user is active if
any live node has it. One flusher task per node (:meth:`Presence.run`) writes the dirty
changes in batches (SADD/SREM, at most every ``flush_s``), keeps its sets alive, and polls
the union for the workspaces it serves, telling its own watchers about changes. A node that
dies stops showing its users as online within ``ttl + poll`` seconds; the node ids whose keys
expired are pruned from the workspace's node set at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from chat import wire
from chat.bus import Audience, Bus, Envelope
from chat.bus.base import raise_if_cancelling
from chat.journal import now_ms

log = logging.getLogger(__name__)

Status = Literal["active", "away"]


@dataclass(slots=True)
class Delta:
    """The change of one node's active set in one workspace since the last write."""

    added: set[int] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)


class PresenceStore(Protocol):
    """Where a node's presence is shared with the others (:class:`ClusterPresence`)."""

    active: dict[int, set[int]]  # workspace -> users active on any node
    ttl_s: int
    poll_s: float

    async def write(self, deltas: Mapping[int, Delta]) -> None:
        """Apply this node's changes, all workspaces in one round trip."""
        ...

    async def keep_alive(self, local: Mapping[int, set[int]]) -> None:
        """Refresh the TTL of this node's sets; rewrite any that were lost."""
        ...

    async def poll(self, workspaces: Collection[int]) -> None:
        """Re-read the union of the served workspaces (and forget the others)."""
        ...


class ClusterPresence:
    """Presence shared by the nodes through Redis (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        node_id: str,
        deliver: Callable[[Sequence[Envelope]], None],
        *,
        ttl_s: int = 15,
        poll_s: float = 2.0,
    ) -> None:
        self._redis = redis
        self._node = node_id
        self._deliver = deliver
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.active: dict[int, set[int]] = {}  # workspace -> users active on any node

    def _key(self, workspace_id: int, node: str) -> str:
        return f"chat:presence:{workspace_id}:{node}"

    @staticmethod
    def _nodes_key(workspace_id: int) -> str:
        return f"chat:presence:{workspace_id}:nodes"

    async def write(self, deltas: Mapping[int, Delta]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for workspace_id, delta in deltas.items():
                key = self._key(workspace_id, self._node)
                if delta.removed:
                    pipe.srem(key, *delta.removed)
                if delta.added:
                    pipe.sadd(key, *delta.added)
                    pipe.sadd(self._nodes_key(workspace_id), self._node)
                pipe.expire(key, self.ttl_s)
            await pipe.execute()
        # Users this node just made active are active in the union: say so now. Removals
        # wait for the poll (the user may be active on another node).
        news = []
        for workspace_id, delta in deltas.items():
            known = self.active.setdefault(workspace_id, set())
            for user_id in delta.added - known:
                known.add(user_id)
                news.append(_presence_envelope(workspace_id, user_id, "active"))
        if news:
            self._deliver(news)

    async def keep_alive(self, local: Mapping[int, set[int]]) -> None:
        workspaces = [w for w, users in local.items() if users]
        if not workspaces:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for workspace_id in workspaces:
                pipe.expire(self._key(workspace_id, self._node), self.ttl_s)
                pipe.sadd(self._nodes_key(workspace_id), self._node)
            results = await pipe.execute()
        lost = [w for w, ok in zip(workspaces, results[::2], strict=True) if not ok]
        if lost:  # expired (this node stalled) or Redis restarted empty: write them again
            await self.write({w: Delta(added=set(local[w])) for w in lost})

    async def poll(self, workspaces: Collection[int]) -> None:
        for workspace_id in [w for w in self.active if w not in workspaces]:
            del self.active[workspace_id]  # no longer served here
        served = list(workspaces)
        if not served:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for workspace_id in served:
                pipe.smembers(self._nodes_key(workspace_id))
            members = await pipe.execute()
        nodes = {
            w: sorted({n.decode() for n in ns} | {self._node})
            for w, ns in zip(served, members, strict=True)
        }
        async with self._redis.pipeline(transaction=False) as pipe:
            for workspace_id in served:
                for node in nodes[workspace_id]:
                    pipe.exists(self._key(workspace_id, node))
            exists = iter(await pipe.execute())
        live = {w: [n for n in nodes[w] if next(exists)] for w in served}
        union_at: list[int] = []  # where each workspace's SUNION is among the replies
        async with self._redis.pipeline(transaction=False) as pipe:
            for workspace_id in served:
                dead = set(nodes[workspace_id]) - set(live[workspace_id]) - {self._node}
                if dead:  # their keys expired: the nodes died (or have nobody here)
                    pipe.srem(self._nodes_key(workspace_id), *dead)
                keys = [self._key(workspace_id, n) for n in live[workspace_id]]
                union_at.append(len(pipe))
                pipe.sunion(keys or [self._key(workspace_id, self._node)])
            replies = await pipe.execute()
        unions = [replies[i] for i in union_at]
        changes: list[Envelope] = []
        for workspace_id, union in zip(served, unions, strict=True):
            now = {int(u) for u in union}
            before = self.active.get(workspace_id, set())
            self.active[workspace_id] = now
            changes += [_presence_envelope(workspace_id, u, "active") for u in now - before]
            changes += [_presence_envelope(workspace_id, u, "away") for u in before - now]
        if changes:
            self._deliver(changes)


def _presence_envelope(workspace_id: int, user_id: int, status: Status) -> Envelope:
    event = wire.PresenceEvent(
        workspace_id=workspace_id, ts=now_ms(), user_id=user_id, status=status
    )
    return Envelope(
        workspace_id=workspace_id,
        seq=None,
        type=event.type,
        payload=wire.dump(event),
        audience=Audience(presence_of=user_id, droppable=True),
    )


class Presence:
    def __init__(
        self,
        bus: Bus,
        typing_interval_s: float,
        cluster: PresenceStore | None = None,
        *,
        flush_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._cluster = cluster
        self._typing_interval = typing_interval_s
        self._flush_s = flush_s
        self._clock = clock
        self._connections: Counter[tuple[int, int]] = Counter()  # (workspace, user) -> count
        self._per_workspace: Counter[int] = Counter()  # workspace -> connections here
        self._away: set[tuple[int, int]] = set()
        self._local: dict[int, set[int]] = {}  # workspace -> users active here
        self._dirty: set[tuple[int, int]] = set()
        self._written: dict[int, set[int]] = {}  # workspace -> what Redis has from this node
        self._next_poll = 0.0
        self._last_typing: dict[tuple[int, int, int], float] = {}

    def status(self, workspace_id: int, user_id: int) -> Status:
        key = (workspace_id, user_id)
        return "active" if self._connections[key] > 0 and key not in self._away else "away"

    def snapshot(self, workspace_id: int, user_ids: Iterable[int]) -> wire.PresenceSnapshot:
        """Which of ``user_ids`` are active now (``presence.subscribe``'s reply)."""
        active = self.active_users(workspace_id)
        return wire.PresenceSnapshot(active=sorted({u for u in user_ids if u in active}))

    def active_users(self, workspace_id: int) -> set[int]:
        """Active users of the workspace: on any node when clustered."""
        local = self._local.get(workspace_id, set())
        if self._cluster is not None:
            return local | self._cluster.active.get(workspace_id, set())
        return set(local)

    # ------------------------------------------------------------------ changes, O(1)

    async def connected(self, workspace_id: int, user_id: int) -> None:
        key = (workspace_id, user_id)
        before = self.status(workspace_id, user_id)
        self._connections[key] += 1
        self._per_workspace[workspace_id] += 1
        await self._changed(workspace_id, user_id, before)

    async def disconnected(self, workspace_id: int, user_id: int) -> None:
        key = (workspace_id, user_id)
        if self._connections[key] <= 0:
            self._connections.pop(key, None)
            return  # never connected here: nothing to undo
        before = self.status(workspace_id, user_id)
        self._connections[key] -= 1
        self._per_workspace[workspace_id] -= 1
        if self._connections[key] <= 0:
            del self._connections[key]
            self._away.discard(key)
        if self._per_workspace[workspace_id] <= 0:
            del self._per_workspace[workspace_id]
        await self._changed(workspace_id, user_id, before)

    async def set_away(self, workspace_id: int, user_id: int, away: bool) -> None:
        key = (workspace_id, user_id)
        before = self.status(workspace_id, user_id)
        if away:
            self._away.add(key)
        else:
            self._away.discard(key)
        await self._changed(workspace_id, user_id, before)

    async def _changed(self, workspace_id: int, user_id: int, before: Status) -> None:
        after = self.status(workspace_id, user_id)
        if after == before:
            return
        local = self._local.setdefault(workspace_id, set())
        if after == "active":
            local.add(user_id)
        else:
            local.discard(user_id)
            if not local:
                del self._local[workspace_id]
        if self._cluster is not None:
            # The flusher writes it; the union across nodes decides what watchers hear.
            self._dirty.add((workspace_id, user_id))
            return
        await self._bus.publish([_presence_envelope(workspace_id, user_id, after)])

    # ------------------------------------------------------------------ the flusher

    async def run(self) -> None:
        """Clustered: write changes in batches every ``flush_s``, keep this node's sets
        alive and poll everyone's every ``poll_s``. Ends only when cancelled."""
        if self._cluster is None:
            return
        while True:
            await asyncio.sleep(self._flush_s)
            try:
                await self.tick()
            except Exception:
                raise_if_cancelling()  # a library may have turned the cancel into an error
                log.warning("presence refresh failed", exc_info=True)

    async def tick(self) -> None:
        """One round of the flusher: the dirty changes, then the poll when it is due."""
        assert self._cluster is not None
        await self.flush()
        now = self._clock()
        if now >= self._next_poll:
            self._next_poll = now + self._cluster.poll_s
            await self._cluster.keep_alive(self._written)
            await self._cluster.poll(set(self._per_workspace) | set(self._written))

    async def flush(self) -> None:
        """Write what changed since the last flush, in one batch (none if nothing did)."""
        assert self._cluster is not None
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        deltas: dict[int, Delta] = {}
        for workspace_id, user_id in dirty:
            written = user_id in self._written.get(workspace_id, ())
            active = user_id in self._local.get(workspace_id, ())
            if active and not written:
                deltas.setdefault(workspace_id, Delta()).added.add(user_id)
            elif written and not active:
                deltas.setdefault(workspace_id, Delta()).removed.add(user_id)
        if not deltas:
            return  # connected and gone again within one flush: nothing to say
        try:
            await self._cluster.write(deltas)
        except BaseException:
            self._dirty |= dirty  # not written: the next flush tries again
            raise
        for workspace_id, delta in deltas.items():
            written_set = self._written.setdefault(workspace_id, set())
            written_set |= delta.added
            written_set -= delta.removed
            if not written_set:
                del self._written[workspace_id]

    # ------------------------------------------------------------------ typing

    async def typing(
        self, workspace_id: int, channel_id: int, user_id: int, thread_root_id: int | None
    ) -> bool:
        """Relay a typing notice unless this user did so in this channel very recently."""
        now = time.monotonic()
        key = (workspace_id, channel_id, user_id)
        if now - self._last_typing.get(key, -1e9) < self._typing_interval:
            return False
        self._last_typing[key] = now
        if len(self._last_typing) > 100_000:
            cutoff = now - self._typing_interval
            self._last_typing = {k: t for k, t in self._last_typing.items() if t >= cutoff}
        event = wire.TypingEvent(
            workspace_id=workspace_id,
            ts=now_ms(),
            channel_id=channel_id,
            user_id=user_id,
            thread_root_id=thread_root_id,
        )
        await self._publish(
            event, Audience(channel_id=channel_id, exclude_user=user_id, droppable=True)
        )
        return True

    async def _publish(self, event: wire.Ephemeral, audience: Audience) -> None:
        envelope = Envelope(
            workspace_id=event.workspace_id,
            seq=None,
            type=event.type,  # type: ignore[attr-defined]
            payload=wire.dump(event),
            audience=audience,
        )
        await self._bus.publish([envelope])
