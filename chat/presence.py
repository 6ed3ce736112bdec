"""Ephemeral state: presence and typing. Never stored, never numbered, never replayed.

Presence is ``active`` while a user has at least one connection and has not set ``away``;
changes go only to connections that subscribed to that user (Slack's lesson: broadcasting
every presence change to a whole workspace costs more than everything else). Typing is relayed
to the channel at most once per ``typing_interval_s`` per user and channel.

Across nodes (:class:`ClusterPresence`), each node keeps in Redis the set of users active on
it, with a TTL it keeps refreshing; a user is active if any live node has it. Every node
polls the union for the workspaces it serves and tells its own subscribers about changes, so
a node that dies stops showing its users as online within ``ttl + poll`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

from chat import wire
from chat.bus import Audience, Bus, Envelope
from chat.journal import now_ms

log = logging.getLogger(__name__)

Status = Literal["active", "away"]


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

    async def publish_local(self, workspace_id: int, local_active: set[int]) -> None:
        """Replace this node's set for the workspace, then recompute the union."""
        key = self._key(workspace_id, self._node)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if local_active:
                pipe.sadd(key, *local_active)
                pipe.expire(key, self.ttl_s)
            pipe.sadd(f"chat:presence:{workspace_id}:nodes", self._node)
            await pipe.execute()
        await self.refresh(workspace_id)

    async def refresh(self, workspace_id: int) -> None:
        nodes = [
            n.decode() for n in await self._redis.smembers(f"chat:presence:{workspace_id}:nodes")
        ]
        keys = [self._key(workspace_id, n) for n in nodes] or [self._key(workspace_id, self._node)]
        now = {int(u) for u in await self._redis.sunion(keys)}
        before = self.active.get(workspace_id, set())
        self.active[workspace_id] = now
        changes: list[tuple[int, Status]] = [(u, "active") for u in now - before]
        changes += [(u, "away") for u in before - now]
        if changes:
            self._deliver([_presence_envelope(workspace_id, u, st) for u, st in changes])


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
        self, bus: Bus, typing_interval_s: float, cluster: ClusterPresence | None = None
    ) -> None:
        self._bus = bus
        self._cluster = cluster
        self._typing_interval = typing_interval_s
        self._connections: Counter[tuple[int, int]] = Counter()  # (workspace, user) -> count
        self._away: set[tuple[int, int]] = set()
        self._last_typing: dict[tuple[int, int, int], float] = {}

    def status(self, workspace_id: int, user_id: int) -> Status:
        key = (workspace_id, user_id)
        return "active" if self._connections[key] > 0 and key not in self._away else "away"

    def active_users(self, workspace_id: int) -> set[int]:
        """Active users of the workspace: on any node when clustered."""
        local = self._local_active(workspace_id)
        if self._cluster is not None:
            return local | self._cluster.active.get(workspace_id, set())
        return local

    def _local_active(self, workspace_id: int) -> set[int]:
        return {
            uid
            for (wid, uid), n in self._connections.items()
            if wid == workspace_id and n > 0 and (wid, uid) not in self._away
        }

    async def run(self) -> None:
        """Clustered: keep this node's presence alive in Redis and poll everyone's."""
        if self._cluster is None:
            return
        while True:
            await asyncio.sleep(self._cluster.poll_s)
            for workspace_id in {w for w, _ in self._connections} | set(self._cluster.active):
                try:
                    await self._cluster.publish_local(
                        workspace_id, self._local_active(workspace_id)
                    )
                except Exception:
                    log.warning("presence refresh failed", exc_info=True)

    async def connected(self, workspace_id: int, user_id: int) -> None:
        before = self.status(workspace_id, user_id)
        self._connections[(workspace_id, user_id)] += 1
        await self._changed(workspace_id, user_id, before)

    async def disconnected(self, workspace_id: int, user_id: int) -> None:
        key = (workspace_id, user_id)
        before = self.status(workspace_id, user_id)
        self._connections[key] -= 1
        if self._connections[key] <= 0:
            del self._connections[key]
            self._away.discard(key)
        await self._changed(workspace_id, user_id, before)

    async def set_away(self, workspace_id: int, user_id: int, away: bool) -> None:
        key = (workspace_id, user_id)
        before = self.status(workspace_id, user_id)
        if away:
            self._away.add(key)
        else:
            self._away.discard(key)
        await self._changed(workspace_id, user_id, before)

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

    async def _changed(self, workspace_id: int, user_id: int, before: Status) -> None:
        after = self.status(workspace_id, user_id)
        if after == before:
            return
        if self._cluster is not None:
            # The union across nodes decides; subscribers here hear of changes to it.
            try:
                await self._cluster.publish_local(workspace_id, self._local_active(workspace_id))
            except Exception:
                log.warning("presence update failed", exc_info=True)
            return
        await self._bus.publish([_presence_envelope(workspace_id, user_id, after)])

    async def _publish(self, event: wire.Ephemeral, audience: Audience) -> None:
        envelope = Envelope(
            workspace_id=event.workspace_id,
            seq=None,
            type=event.type,  # type: ignore[attr-defined]
            payload=wire.dump(event),
            audience=audience,
        )
        await self._bus.publish([envelope])
