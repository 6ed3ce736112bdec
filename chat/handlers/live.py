"""Ephemeral requests: ping, typing, presence."""

from __future__ import annotations

from chat import wire
from chat.handlers.access import actor, member_channel
from chat.handlers.context import Caller, Services
from chat.journal import now_ms


async def ping(s: Services, c: Caller, req: wire.Ping) -> wire.Pong:
    return wire.Pong(server_time=now_ms())


async def typing(s: Services, c: Caller, req: wire.Typing) -> wire.Empty:
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        await member_channel(conn, me, req.channel_id)
    await s.presence.typing(c.workspace_id, req.channel_id, c.user_id, req.thread_root_id)
    return wire.Empty()


async def presence_subscribe(
    s: Services, c: Caller, req: wire.PresenceSubscribe
) -> wire.PresenceSnapshot:
    # Presence of anyone in the workspace is visible to its members (as in Slack); the hub
    # only delivers presence of this workspace's users, so foreign ids see nothing (and
    # are never active in the snapshot, which is per workspace).
    s.hub.watch_presence(c.workspace_id, c.peer, req.user_ids)
    return s.presence.snapshot(c.workspace_id, req.user_ids)


async def presence_set(s: Services, c: Caller, req: wire.PresenceSet) -> wire.Empty:
    await s.presence.set_away(c.workspace_id, c.user_id, req.status == "away")
    return wire.Empty()
