"""Ephemeral state: presence and typing. Never stored, never numbered, never replayed.

Presence is ``active`` while a user has at least one connection and has not set ``away``;
changes go only to connections that subscribed to that user (Slack's lesson: broadcasting
every presence change to a whole workspace costs more than everything else). Typing is relayed
to the channel at most once per ``typing_interval_s`` per user and channel.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Literal

from chat import wire
from chat.bus import Bus, Envelope
from chat.journal import now_ms

Status = Literal["active", "away"]


class Live:
    def __init__(self, bus: Bus, typing_interval_s: float) -> None:
        self._bus = bus
        self._typing_interval = typing_interval_s
        self._connections: Counter[tuple[int, int]] = Counter()  # (workspace, user) -> count
        self._away: set[tuple[int, int]] = set()
        self._last_typing: dict[tuple[int, int, int], float] = {}

    def status(self, workspace_id: int, user_id: int) -> Status:
        key = (workspace_id, user_id)
        return "active" if self._connections[key] > 0 and key not in self._away else "away"

    def active_users(self, workspace_id: int) -> set[int]:
        return {
            uid
            for (wid, uid), n in self._connections.items()
            if wid == workspace_id and n > 0 and (wid, uid) not in self._away
        }

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
        await self._publish(event, channel_id=channel_id, exclude_user=user_id)
        return True

    async def _changed(self, workspace_id: int, user_id: int, before: Status) -> None:
        after = self.status(workspace_id, user_id)
        if after == before:
            return
        event = wire.PresenceEvent(
            workspace_id=workspace_id, ts=now_ms(), user_id=user_id, status=after
        )
        await self._publish(event, presence_of=user_id)

    async def _publish(self, event: wire.Ephemeral, **audience: Any) -> None:
        envelope = Envelope(
            workspace_id=event.workspace_id,
            seq=None,
            type=event.type,  # type: ignore[attr-defined]
            payload=wire.dump(event),
            droppable=True,
            **audience,
        )
        await self._bus.publish([envelope])
