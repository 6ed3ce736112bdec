"""Messages: post (idempotent), edit, delete, threads, mentions, reactions, history."""

from __future__ import annotations

import re
from dataclasses import dataclass

from chat import wire
from chat.bus import Audience
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import (
    Action,
    actor,
    allowed,
    member_channel,
    visible_channel,
    visible_message,
)
from chat.handlers.context import Caller, Services
from chat.journal import Tx
from chat.storage import Connection, queries

_MENTION = re.compile(r"(?<![\w@])@([a-z0-9][a-z0-9._-]{0,79})", re.IGNORECASE)
_SPECIAL = {"here": "here", "channel": "channel", "everyone": "channel"}


@dataclass(frozen=True, slots=True)
class Mentions:
    user_ids: tuple[int, ...]
    channel: bool
    here: bool


def parse_mentions(text: str) -> tuple[list[str], bool, bool]:
    """Handles mentioned (lowercased, in order, unique), @channel/@everyone, @here."""
    handles: list[str] = []
    channel = here = False
    for match in _MENTION.finditer(text):
        word = match.group(1).lower().rstrip(".")
        special = _SPECIAL.get(word)
        if special == "channel":
            channel = True
        elif special == "here":
            here = True
        elif word not in handles:
            handles.append(word)
    return handles, channel, here


async def _resolve_mentions(tx_conn: Connection, workspace_id: int, text: str) -> Mentions:
    handles, channel, here = parse_mentions(text)
    ids: list[int] = []
    if handles:
        by_handle = await queries.user_ids_by_handles(tx_conn, workspace_id, handles[:50])
        ids = [by_handle[h] for h in handles if h in by_handle]
    return Mentions(tuple(ids), channel, here)


def _check_text(text: str) -> None:
    if len(text) > wire.MAX_TEXT_CHARS:
        raise ChatError(
            ErrorCode.MSG_TOO_LONG, f"text is {len(text)} characters; the limit is 4000"
        )
    if not text.strip():
        raise ChatError(ErrorCode.INVALID_ARGUMENT, "text is blank")


async def messages_post(s: Services, c: Caller, req: wire.MessagesPost) -> wire.PostResult:
    _check_text(req.text)

    async def op(tx: Tx) -> wire.PostResult:
        me = await actor(tx.conn, c)
        channel = await member_channel(tx.conn, me, req.channel_id)
        root: wire.Message | None = None
        if req.thread_root_id is not None:
            root = await queries.get_message(tx.conn, req.thread_root_id)
            if root is None or root.channel_id != channel.id or root.deleted:
                raise ChatError(ErrorCode.MESSAGE_NOT_FOUND, "no such thread in this channel")
            if root.thread_root_id is not None:
                raise ChatError(ErrorCode.INVALID_ARGUMENT, "reply to the thread's root")
        mentions = await _resolve_mentions(tx.conn, c.workspace_id, req.text)
        message = await queries.insert_message(
            tx.conn,
            channel_id=channel.id,
            user_id=me.id,
            client_msg_id=req.client_msg_id,
            text=req.text,
            ts=tx.now,
            thread_root_id=root.id if root else None,
            mentions=mentions.user_ids,
            mention_channel=mentions.channel,
            mention_here=mentions.here,
        )
        if message is None:  # a retry: answer with the original, create nothing
            original = await queries.get_message_by_client_id(
                tx.conn, channel.id, me.id, req.client_msg_id
            )
            assert original is not None
            _check_same_post(original, req)
            return wire.PostResult(message=original, duplicate=True)
        tx.emit(
            wire.MessagePosted(seq=0, workspace_id=0, ts=0, message=message),
            Audience(channel_id=channel.id),
        )
        if root is not None:
            count, latest = await queries.refresh_thread(tx.conn, root.id)
            _thread_event(tx, channel.id, root.id, count, latest)
        await _notify_mentions(s, tx, channel, message, mentions)
        return wire.PostResult(message=message, duplicate=False)

    return await s.journal.run(c.workspace_id, op)


def _check_same_post(original: wire.Message, req: wire.MessagesPost) -> None:
    """A retry must be the same post: the same id with other content is a client bug that
    would otherwise silently lose the new message. The text is compared only while the
    original is as posted (an edit or a delete since then changed it)."""
    unchanged = original.edited_ts is None and not original.deleted
    if original.thread_root_id != req.thread_root_id or (unchanged and original.text != req.text):
        raise ChatError(
            ErrorCode.DUPLICATE_CLIENT_MSG_ID,
            "client_msg_id was already used in this channel for a different message",
        )


def _thread_event(tx: Tx, channel_id: int, root_id: int, count: int, latest: int | None) -> None:
    tx.emit(
        wire.ThreadUpdated(
            seq=0,
            workspace_id=0,
            ts=0,
            channel_id=channel_id,
            message_id=root_id,
            reply_count=count,
            latest_reply_ts=latest,
        ),
        Audience(channel_id=channel_id),
    )


async def _notify_mentions(
    s: Services, tx: Tx, channel: wire.Channel, message: wire.Message, mentions: Mentions
) -> None:
    """Store who was mentioned (for mention counts) and emit one mention event per kind.
    Only members are notified: a mention never leaks a private channel."""
    if not (mentions.user_ids or mentions.channel or mentions.here):
        return
    members = set(await queries.member_ids(tx.conn, channel.id))
    members.discard(message.user_id)
    by_kind: dict[str, set[int]] = {"user": members & set(mentions.user_ids)}
    if mentions.channel:
        by_kind["channel"] = members - by_kind["user"]
    elif mentions.here:
        active = s.presence.active_users(channel.workspace_id)
        by_kind["here"] = (members & active) - by_kind["user"]
    notified: set[int] = set()
    for kind, users in by_kind.items():
        if not users:
            continue
        notified |= users
        tx.emit(
            wire.Mention(
                seq=0,
                workspace_id=0,
                ts=0,
                channel_id=channel.id,
                message_id=message.id,
                by_user_id=message.user_id,
                kind=kind,
            ),
            Audience(user_ids=frozenset(users)),
        )
    await queries.insert_mentions(tx.conn, message.id, channel.id, message.seq, sorted(notified))


async def messages_edit(s: Services, c: Caller, req: wire.MessagesEdit) -> wire.MessageData:
    _check_text(req.text)

    async def op(tx: Tx) -> wire.MessageData:
        me = await actor(tx.conn, c)
        message, channel, _member = await visible_message(tx.conn, me, req.message_id)
        if message.deleted:
            raise ChatError(ErrorCode.MESSAGE_NOT_FOUND, "the message was deleted")
        if message.user_id != me.id:
            raise ChatError(ErrorCode.FORBIDDEN, "only the author may edit a message")
        await member_channel(tx.conn, me, channel.id)
        mentions = await _resolve_mentions(tx.conn, c.workspace_id, req.text)
        await queries.edit_message(
            tx.conn,
            message.id,
            req.text,
            tx.now,
            mentions.user_ids,
            mentions.channel,
            mentions.here,
        )
        edited = await queries.get_message(tx.conn, message.id)
        assert edited is not None
        tx.emit(
            wire.MessageEdited(seq=0, workspace_id=0, ts=0, message=edited),
            Audience(channel_id=channel.id),
        )
        # Newly mentioned people are told; earlier notifications stand.
        old = set(message.mentions)
        fresh = Mentions(tuple(u for u in mentions.user_ids if u not in old), False, False)
        await _notify_mentions(s, tx, channel, edited, fresh)
        return wire.MessageData(message=edited)

    return await s.journal.run(c.workspace_id, op)


async def messages_delete(s: Services, c: Caller, req: wire.MessagesDelete) -> wire.MessageData:
    async def op(tx: Tx) -> wire.MessageData:
        me = await actor(tx.conn, c)
        message, channel, member = await visible_message(tx.conn, me, req.message_id)
        if message.deleted:
            return wire.MessageData(message=message)
        is_author = message.user_id == me.id
        if not (is_author and member) and not (allowed(me, Action.DELETE_ANY_MESSAGE)):
            raise ChatError(ErrorCode.FORBIDDEN, "only the author or an admin may delete")
        await queries.delete_message(tx.conn, message.id, tx.now)
        tx.emit(
            wire.MessageDeleted(
                seq=0,
                workspace_id=0,
                ts=0,
                channel_id=channel.id,
                message_id=message.id,
                thread_root_id=message.thread_root_id,
            ),
            Audience(channel_id=channel.id),
        )
        if message.thread_root_id is not None:
            count, latest = await queries.refresh_thread(tx.conn, message.thread_root_id)
            _thread_event(tx, channel.id, message.thread_root_id, count, latest)
        deleted = await queries.get_message(tx.conn, message.id)
        assert deleted is not None
        return wire.MessageData(message=deleted)

    return await s.journal.run(c.workspace_id, op)


async def messages_history(s: Services, c: Caller, req: wire.MessagesHistory) -> wire.History:
    positions = [p for p in (req.before, req.after, req.around) if p is not None]
    if len(positions) > 1:
        raise ChatError(ErrorCode.INVALID_ARGUMENT, "give at most one of before/after/around")
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        channel, _ = await visible_channel(conn, me, req.channel_id)
        if req.around is not None:
            half = req.limit // 2
            older = await queries.history(conn, channel.id, before=req.around, limit=half)
            newer = await queries.history(
                conn, channel.id, after=req.around - 1, limit=req.limit - half
            )
            messages = older + newer
        elif req.after is not None:
            messages = await queries.history(conn, channel.id, after=req.after, limit=req.limit)
        else:
            messages = await queries.history(conn, channel.id, before=req.before, limit=req.limit)
        has_before = has_after = False
        if messages:
            has_before = bool(
                await queries.history(conn, channel.id, before=messages[0].seq, limit=1)
            )
            has_after = bool(
                await queries.history(conn, channel.id, after=messages[-1].seq, limit=1)
            )
        elif req.after is not None:
            has_before = bool(
                await queries.history(conn, channel.id, before=req.after + 1, limit=1)
            )
        elif req.before is not None:
            has_after = bool(await queries.history(conn, channel.id, after=req.before - 1, limit=1))
    return wire.History(messages=messages, has_more_before=has_before, has_more_after=has_after)


async def messages_replies(s: Services, c: Caller, req: wire.MessagesReplies) -> wire.History:
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        root, _, _ = await visible_message(conn, me, req.message_id)
        if root.thread_root_id is not None:
            raise ChatError(ErrorCode.INVALID_ARGUMENT, "not a thread root")
        messages = await queries.replies(conn, root.id, after=req.after, limit=req.limit + 1)
    more = len(messages) > req.limit
    return wire.History(
        messages=messages[: req.limit], has_more_before=req.after > 0, has_more_after=more
    )


async def _react(
    s: Services, c: Caller, message_id: int, emoji: str, add: bool
) -> wire.ReactionData:
    async def op(tx: Tx) -> wire.ReactionData:
        me = await actor(tx.conn, c)
        message, channel, _member = await visible_message(tx.conn, me, message_id)
        if message.deleted:
            raise ChatError(ErrorCode.MESSAGE_NOT_FOUND, "the message was deleted")
        await member_channel(tx.conn, me, channel.id)
        if add:
            changed = await queries.add_reaction(tx.conn, message.id, emoji, me.id, tx.now)
        else:
            changed = await queries.remove_reaction(tx.conn, message.id, emoji, me.id)
        reactions = (await queries.reactions_for(tx.conn, [message.id])).get(message.id, [])
        if changed:
            count = next((r.count for r in reactions if r.emoji == emoji), 0)
            tx.emit(
                wire.ReactionChanged(
                    type="reaction.added" if add else "reaction.removed",
                    seq=0,
                    workspace_id=0,
                    ts=0,
                    channel_id=channel.id,
                    message_id=message.id,
                    user_id=me.id,
                    emoji=emoji,
                    count=count,
                ),
                Audience(channel_id=channel.id),
            )
        return wire.ReactionData(message_id=message.id, reactions=reactions)

    return await s.journal.run(c.workspace_id, op)


async def reactions_add(s: Services, c: Caller, req: wire.ReactionsAdd) -> wire.ReactionData:
    return await _react(s, c, req.message_id, req.emoji, True)


async def reactions_remove(s: Services, c: Caller, req: wire.ReactionsRemove) -> wire.ReactionData:
    return await _react(s, c, req.message_id, req.emoji, False)


async def reads_mark(s: Services, c: Caller, req: wire.ReadsMark) -> wire.ReadMarker:
    async def op(tx: Tx) -> wire.ReadMarker:
        me = await actor(tx.conn, c)
        channel = await member_channel(tx.conn, me, req.channel_id, writable=False)
        seq = min(req.seq, channel.last_seq)
        await queries.set_read_marker(tx.conn, channel.id, me.id, seq)
        tx.emit(
            wire.ReadMarkerUpdated(
                seq=0, workspace_id=0, ts=0, channel_id=channel.id, last_read_seq=seq
            ),
            Audience(user_ids=frozenset({me.id})),
        )
        return wire.ReadMarker(channel_id=channel.id, last_read_seq=seq)

    return await s.journal.run(c.workspace_id, op)


async def reads_counts(s: Services, c: Caller, req: wire.ReadsCounts) -> wire.Counts:
    async with s.db.connection() as conn:
        await actor(conn, c)
        counts = await queries.unread_counts(conn, c.user_id)
    return wire.Counts(channels=counts)
