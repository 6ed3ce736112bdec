"""Channels and DMs: create, update, archive, membership, listing."""

from __future__ import annotations

import re

from chat import wire
from chat.bus import Audience
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import (
    Action,
    actor,
    allowed,
    can_manage_channel,
    channel_audience,
    member_channel,
    require,
    visible_channel,
)
from chat.handlers.context import Caller, Services
from chat.journal import Tx
from chat.storage import UniqueViolation, queries

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,79}$")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ChatError(ErrorCode.INVALID_NAME)


def _is_dm(channel: wire.Channel) -> bool:
    return channel.kind in ("dm", "group_dm")


def _channel_event(
    tx: Tx, kind: str, channel: wire.Channel, *, joins: tuple[int, ...] = ()
) -> None:
    """To whoever may read the channel (``access.channel_audience``)."""
    event = wire.ChannelChanged(
        type=kind,
        seq=0,
        workspace_id=tx.workspace_id,
        ts=tx.now,
        channel=channel,
    )
    tx.emit(event, channel_audience(channel, joins=joins))


def _member_event(tx: Tx, kind: str, channel_id: int, user_id: int, by: int) -> None:
    event = wire.MemberChanged(
        type=kind,
        seq=0,
        workspace_id=tx.workspace_id,
        ts=tx.now,
        channel_id=channel_id,
        user_id=user_id,
        by_user_id=by,
    )
    if kind == "channel.member_joined":
        tx.emit(event, Audience(channel_id=channel_id, joins=(user_id,)))
    else:
        tx.emit(
            event, Audience(channel_id=channel_id, user_ids=frozenset({user_id}), leaves=(user_id,))
        )


async def _reload(tx: Tx, channel_id: int) -> wire.Channel:
    channel = await queries.get_channel(tx.conn, channel_id)
    assert channel is not None
    return channel


async def channels_create(s: Services, c: Caller, req: wire.ChannelsCreate) -> wire.ChannelData:
    _check_name(req.name)

    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        require(me, Action.CREATE_CHANNEL)
        try:
            async with tx.conn.savepoint():
                cid = await queries.create_channel(
                    tx.conn,
                    c.workspace_id,
                    "private" if req.private else "public",
                    req.name,
                    me.id,
                    tx.now,
                    topic=req.topic,
                    purpose=req.purpose,
                )
        except UniqueViolation:
            raise ChatError(ErrorCode.NAME_TAKEN) from None
        await queries.add_member(tx.conn, cid, me.id, tx.now)
        channel = await _reload(tx, cid)
        _channel_event(tx, "channel.created", channel, joins=(me.id,))
        return wire.ChannelData(channel=channel)

    return await s.journal.run(c.workspace_id, op)


async def channels_update(s: Services, c: Caller, req: wire.ChannelsUpdate) -> wire.ChannelData:
    if req.name is not None:
        _check_name(req.name)
    changes = req.model_dump(include={"name", "topic", "purpose"}, exclude_none=True)

    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        channel = await member_channel(tx.conn, me, req.channel_id)
        if _is_dm(channel) and "name" in changes:
            raise ChatError(ErrorCode.NOT_ALLOWED_FOR_DM)
        if "name" in changes and not can_manage_channel(me, channel):
            raise ChatError(ErrorCode.FORBIDDEN, "only the creator or an admin may rename")
        try:
            async with tx.conn.savepoint():
                await queries.update_channel(tx.conn, channel.id, changes)
        except UniqueViolation:
            raise ChatError(ErrorCode.NAME_TAKEN) from None
        channel = await _reload(tx, channel.id)
        _channel_event(tx, "channel.updated", channel)
        return wire.ChannelData(channel=channel)

    return await s.journal.run(c.workspace_id, op)


async def _set_archived(
    s: Services, c: Caller, channel_id: int, archived: bool
) -> wire.ChannelData:
    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        channel, member = await visible_channel(tx.conn, me, channel_id)
        if _is_dm(channel):
            raise ChatError(ErrorCode.NOT_ALLOWED_FOR_DM)
        if not can_manage_channel(me, channel) or (not member and channel.kind != "public"):
            raise ChatError(ErrorCode.FORBIDDEN, "only the creator or an admin may archive")
        if channel.archived == archived:
            return wire.ChannelData(channel=channel)
        await queries.set_channel_archived(tx.conn, channel.id, archived)
        channel = await _reload(tx, channel.id)
        _channel_event(tx, "channel.archived" if archived else "channel.unarchived", channel)
        return wire.ChannelData(channel=channel)

    return await s.journal.run(c.workspace_id, op)


async def channels_archive(s: Services, c: Caller, req: wire.ChannelsArchive) -> wire.ChannelData:
    return await _set_archived(s, c, req.channel_id, True)


async def channels_unarchive(
    s: Services, c: Caller, req: wire.ChannelsUnarchive
) -> wire.ChannelData:
    return await _set_archived(s, c, req.channel_id, False)


async def channels_join(s: Services, c: Caller, req: wire.ChannelsJoin) -> wire.ChannelData:
    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        channel, member = await visible_channel(tx.conn, me, req.channel_id)
        if _is_dm(channel):
            raise ChatError(ErrorCode.NOT_ALLOWED_FOR_DM)
        if member:
            return wire.ChannelData(channel=channel)
        require(me, Action.JOIN_PUBLIC)
        if channel.archived:
            raise ChatError(ErrorCode.CHANNEL_ARCHIVED)
        await queries.add_member(tx.conn, channel.id, me.id, tx.now)
        _member_event(tx, "channel.member_joined", channel.id, me.id, me.id)
        return wire.ChannelData(channel=await _reload(tx, channel.id))

    return await s.journal.run(c.workspace_id, op)


async def channels_leave(s: Services, c: Caller, req: wire.ChannelsLeave) -> wire.ChannelData:
    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        channel, member = await visible_channel(tx.conn, me, req.channel_id)
        if _is_dm(channel):
            raise ChatError(ErrorCode.NOT_ALLOWED_FOR_DM)
        if not member:
            raise ChatError(ErrorCode.NOT_IN_CHANNEL)
        await queries.remove_member(tx.conn, channel.id, me.id)
        _member_event(tx, "channel.member_left", channel.id, me.id, me.id)
        return wire.ChannelData(channel=await _reload(tx, channel.id))

    return await s.journal.run(c.workspace_id, op)


async def channels_invite(s: Services, c: Caller, req: wire.ChannelsInvite) -> wire.ChannelData:
    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        channel = await member_channel(tx.conn, me, req.channel_id)
        if _is_dm(channel):
            raise ChatError(ErrorCode.NOT_ALLOWED_FOR_DM)
        require(me, Action.INVITE)
        targets = await queries.get_users(tx.conn, c.workspace_id, req.user_ids)
        if len(targets) != len(set(req.user_ids)) or any(t.deactivated for t in targets):
            raise ChatError(ErrorCode.USER_NOT_FOUND)
        for target in targets:
            if await queries.add_member(tx.conn, channel.id, target.id, tx.now):
                _member_event(tx, "channel.member_joined", channel.id, target.id, me.id)
        return wire.ChannelData(channel=await _reload(tx, channel.id))

    return await s.journal.run(c.workspace_id, op)


async def channels_remove(s: Services, c: Caller, req: wire.ChannelsRemove) -> wire.ChannelData:
    async def op(tx: Tx) -> wire.ChannelData:
        me = await actor(tx.conn, c)
        channel = await member_channel(tx.conn, me, req.channel_id, writable=False)
        if _is_dm(channel):
            raise ChatError(ErrorCode.NOT_ALLOWED_FOR_DM)
        if not can_manage_channel(me, channel):
            raise ChatError(ErrorCode.FORBIDDEN, "only the creator or an admin may remove")
        if not await queries.remove_member(tx.conn, channel.id, req.user_id):
            raise ChatError(ErrorCode.NOT_IN_CHANNEL, "that user is not a member")
        _member_event(tx, "channel.member_left", channel.id, req.user_id, me.id)
        return wire.ChannelData(channel=await _reload(tx, channel.id))

    return await s.journal.run(c.workspace_id, op)


async def channels_list(s: Services, c: Caller, req: wire.ChannelsList) -> wire.ChannelPage:
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        member_only = req.member_only or not allowed(me, Action.READ_PUBLIC)
        channels = await queries.list_channels(
            conn,
            c.workspace_id,
            me.id,
            member_only=member_only,
            after_id=req.cursor,
            limit=req.limit,
        )
    next_cursor = channels[-1].id if len(channels) == req.limit else None
    return wire.ChannelPage(channels=channels, next_cursor=next_cursor)


async def channels_info(s: Services, c: Caller, req: wire.ChannelsInfo) -> wire.ChannelData:
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        channel, _ = await visible_channel(conn, me, req.channel_id)
    return wire.ChannelData(channel=channel)


async def channels_members(s: Services, c: Caller, req: wire.ChannelsMembers) -> wire.MemberPage:
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        await visible_channel(conn, me, req.channel_id)
        ids = await queries.members_page(conn, req.channel_id, req.cursor, req.limit)
    return wire.MemberPage(user_ids=ids, next_cursor=ids[-1] if len(ids) == req.limit else None)


async def dms_open(s: Services, c: Caller, req: wire.DmsOpen) -> wire.ChannelData:
    members = sorted({c.user_id, *req.user_ids})
    if len(members) > wire.MAX_GROUP_DM:
        raise ChatError(ErrorCode.TOO_MANY_MEMBERS)
    key = ",".join(map(str, members))

    async def op(tx: Tx) -> wire.ChannelData:
        await actor(tx.conn, c)
        existing = await queries.find_dm(tx.conn, c.workspace_id, key)
        if existing is not None:
            return wire.ChannelData(channel=await _reload(tx, existing))
        users = await queries.get_users(tx.conn, c.workspace_id, members)
        if len(users) != len(members) or any(u.deactivated for u in users):
            raise ChatError(ErrorCode.USER_NOT_FOUND)
        kind = "dm" if len(members) <= 2 else "group_dm"
        try:
            async with tx.conn.savepoint():
                cid = await queries.create_channel(
                    tx.conn, c.workspace_id, kind, f"{kind}:{key}", c.user_id, tx.now, dm_key=key
                )
        except UniqueViolation:
            # Opened concurrently by a writer outside this workspace's journal order (the
            # journal's workspace lock serializes nodes): the DM key decides, one DM.
            winner = await queries.find_dm(tx.conn, c.workspace_id, key)
            if winner is None:
                raise
            return wire.ChannelData(channel=await _reload(tx, winner))
        for uid in members:
            await queries.add_member(tx.conn, cid, uid, tx.now)
        channel = await _reload(tx, cid)
        _channel_event(tx, "channel.created", channel, joins=tuple(members))
        return wire.ChannelData(channel=channel)

    return await s.journal.run(c.workspace_id, op)
