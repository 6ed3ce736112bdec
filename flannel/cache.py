"""One workspace's users, channels and memberships in memory: :class:`WorkspaceCache`.

Pure logic (no I/O, no asyncio). A cache is built from a whole workspace read as of at least
a position ``seq`` (:meth:`WorkspaceCache.from_loaded`, from the chat tier's ``loaded``
frame, at the edge; :meth:`WorkspaceCache.from_model`, from the node's own database, on a
chat node) and is then kept current by :meth:`WorkspaceCache.apply`, with the workspace's
durable events after ``seq`` in order. :mod:`flannel.answers` answers requests from it.

What the events change::

    user.created, user.updated          the user (profile, role, deactivation), and its keys
                                        in the @-mention index
    channel.created, .updated,          the channel (name, topic, archived), and its keys in
    .archived, .unarchived              the #-channel index
    any event whose audience has        memberships: ``joins`` become members of the audience's
    joins / leaves                      channel, ``leaves`` stop being members (the hub's own
                                        rule: channel.created and channel.member_joined carry
                                        joins, channel.member_left leaves)
    message.posted                      the channel's last activity: ``last_seq`` (the
                                        message's channel position) and ``last_ts``

Every other event only moves ``seq``; its payload is never parsed. Each of these events
carries the state it sets (a whole user, a whole channel, who joined or left, a message's
position), so applying one that the load already reflected changes nothing: a read that
saw some events after its ``seq`` converges, after the last of them, to the store's state
(``queries.workspace_model`` relies on the same property). Positions only grow: a channel's
``last_seq`` is the highest seen. A channel's ``member_count`` is always the size of its
member set, whatever count its last event carried.

Memory, for 100,000 users: each user is one :class:`chat.wire.User` (held once, in
``users``); the indexes hold folded keys and ids; memberships are sets of ids, by channel
and by user. No other per-user copy.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Set
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from chat import wire
from chat.bus import Envelope
from flannel.autocomplete import ChannelIndex, UserIndex

if TYPE_CHECKING:
    from chat.storage.queries import WorkspaceModel

DM_KINDS = frozenset({"dm", "group_dm"})

_NO_IDS: frozenset[int] = frozenset()


class _Position(BaseModel):
    """The part of a message that last activity needs; the rest of the payload (the text)
    is skipped, not validated."""

    model_config = ConfigDict(extra="ignore")
    channel_id: int
    seq: int
    ts: int


class _Posted(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message: _Position


class WorkspaceCache:
    """Users, channels and memberships of one workspace, as of position :attr:`seq` at
    least. Read it through its methods; change it only with :meth:`apply`."""

    __slots__ = (
        "_by_user",
        "_channels",
        "_last_seq",
        "_last_ts",
        "_members",
        "_sorted",
        "channel_index",
        "name",
        "seq",
        "user_index",
        "users",
        "workspace_id",
    )

    def __init__(
        self,
        workspace_id: int,
        name: str,
        seq: int,
        users: Iterable[wire.User],
        channels: Iterable[wire.Channel],
        members: Iterable[tuple[int, Iterable[int]]],
        last_ts: Iterable[tuple[int, int]],
    ) -> None:
        """The workspace as read at ``seq`` (or later): prefer the two constructors below.
        ``members``: (channel id, its member ids); ``last_ts``: (channel id, time of its
        latest message) for the channels that have one."""
        self.workspace_id = workspace_id
        self.name = name
        self.seq = seq
        self.users: dict[int, wire.User] = {u.id: u for u in users}
        self._channels: dict[int, wire.Channel] = {c.id: c for c in channels}
        self._last_seq: dict[int, int] = {cid: c.last_seq for cid, c in self._channels.items()}
        self._last_ts: dict[int, int] = dict(last_ts)
        self._members: dict[int, set[int]] = {}
        self._by_user: dict[int, set[int]] = {}
        # channel -> its member ids in order, built by the first members_page of a channel
        # and kept in order after that (a page is then one bisect and a slice).
        self._sorted: dict[int, list[int]] = {}
        for cid, ids in members:
            for uid in ids:
                self._join(cid, uid)
        self.user_index = UserIndex(self.users.values())
        self.channel_index = ChannelIndex(self._channels.values())

    @classmethod
    def from_loaded(cls, loaded: wire.Loaded) -> WorkspaceCache:
        """From the chat tier's ``loaded`` frame (at the edge)."""
        return cls(
            loaded.workspace_id,
            loaded.workspace_name,
            loaded.seq,
            loaded.users,
            loaded.channels,
            ((m.channel_id, m.user_ids) for m in loaded.members),
            ((m.channel_id, m.last_ts) for m in loaded.members if m.last_ts is not None),
        )

    @classmethod
    def from_model(cls, workspace_id: int, model: WorkspaceModel) -> WorkspaceCache:
        """From :func:`chat.storage.queries.workspace_model` (a chat node's own read)."""
        return cls(
            workspace_id,
            model.name,
            model.seq,
            model.users,
            model.channels,
            model.members.items(),
            model.last_ts.items(),
        )

    # ------------------------------------------------------------------ reading

    def user(self, user_id: int) -> wire.User | None:
        return self.users.get(user_id)

    def channel(self, channel_id: int) -> wire.Channel | None:
        """The channel as chat would return it: with its current ``last_seq`` and
        ``member_count`` (a copy only when they moved since its last channel event)."""
        channel = self._channels.get(channel_id)
        if channel is None:
            return None
        count = len(self._members.get(channel_id, _NO_IDS))
        last_seq = self._last_seq[channel_id]
        if channel.member_count != count or channel.last_seq != last_seq:
            channel = channel.model_copy(update={"member_count": count, "last_seq": last_seq})
        return channel

    def channel_ids(self) -> Set[int]:
        """Every channel's id (DMs and private channels included)."""
        return self._channels.keys()

    def kind(self, channel_id: int) -> wire.ChannelKind | None:
        channel = self._channels.get(channel_id)
        return None if channel is None else channel.kind

    def members(self, channel_id: int) -> Set[int]:
        """The channel's member ids (a live view: do not keep it across :meth:`apply`)."""
        return self._members.get(channel_id, _NO_IDS)

    def channels_of(self, user_id: int) -> Set[int]:
        """The ids of the channels the user is a member of (a live view)."""
        return self._by_user.get(user_id, _NO_IDS)

    def is_member(self, channel_id: int, user_id: int) -> bool:
        return user_id in self._members.get(channel_id, _NO_IDS)

    def last_seq(self, channel_id: int) -> int:
        return self._last_seq.get(channel_id, 0)

    def last_ts(self, channel_id: int) -> int | None:
        """The time of the channel's latest message (thread replies included); None: none."""
        return self._last_ts.get(channel_id)

    def members_page(self, channel_id: int, after: int, limit: int) -> list[int]:
        """Up to ``limit`` member ids above ``after``, ascending (``queries.members_page``)."""
        ordered = self._sorted.get(channel_id)
        if ordered is None:
            ordered = self._sorted[channel_id] = sorted(self._members.get(channel_id, ()))
        start = bisect.bisect_right(ordered, after)
        return ordered[start : start + limit]

    def recent_contacts(self, user_id: int) -> list[int]:
        """The user's DM and group-DM partners, each once, by the last activity of the DM
        they share (its latest message, or its creation before any), most recent first."""
        dms: list[tuple[int, int]] = []
        for cid in self._by_user.get(user_id, ()):
            channel = self._channels.get(cid)
            if channel is not None and channel.kind in DM_KINDS:
                dms.append((self._last_ts.get(cid, channel.created_at), cid))
        dms.sort(reverse=True)
        partners: dict[int, None] = {}
        for _, cid in dms:
            for uid in sorted(self._members[cid]):
                if uid != user_id:
                    partners.setdefault(uid)
        return list(partners)

    # ------------------------------------------------------------------ changes

    def apply(self, envelopes: Iterable[Envelope]) -> None:
        """Apply the workspace's durable events, in ``seq`` order. Events at or below
        :attr:`seq`, ephemeral events and other workspaces' events are skipped."""
        for env in envelopes:
            seq = env.seq
            if seq is None or seq <= self.seq or env.workspace_id != self.workspace_id:
                continue
            self.seq = seq
            audience = env.audience
            cid = audience.channel_id
            if cid is not None:
                for uid in audience.joins:
                    self._join(cid, uid)
            change = _CHANGES.get(env.type)
            if change is not None:
                change(self, env.payload)
            if cid is not None:
                for uid in audience.leaves:
                    self._leave(cid, uid)

    def _user_changed(self, payload: bytes) -> None:
        user = wire.UserChanged.model_validate_json(payload).user
        self.users[user.id] = user
        self.user_index.upsert(user)

    def _channel_changed(self, payload: bytes) -> None:
        channel = wire.ChannelChanged.model_validate_json(payload).channel
        cid = channel.id
        self._channels[cid] = channel
        self._last_seq[cid] = max(self._last_seq.get(cid, 0), channel.last_seq)
        self.channel_index.upsert(channel)

    def _message_posted(self, payload: bytes) -> None:
        message = _Posted.model_validate_json(payload).message
        cid = message.channel_id
        if cid in self._channels and message.seq >= self._last_seq.get(cid, 0):
            self._last_seq[cid] = message.seq
            self._last_ts[cid] = message.ts

    def _join(self, cid: int, uid: int) -> None:
        members = self._members.get(cid)
        if members is None:
            members = self._members[cid] = set()
        if uid in members:
            return
        members.add(uid)
        self._by_user.setdefault(uid, set()).add(cid)
        ordered = self._sorted.get(cid)
        if ordered is not None:
            bisect.insort(ordered, uid)

    def _leave(self, cid: int, uid: int) -> None:
        members = self._members.get(cid)
        if members is None or uid not in members:
            return
        members.discard(uid)
        if not members:
            del self._members[cid]
        channels = self._by_user[uid]
        channels.discard(cid)
        if not channels:
            del self._by_user[uid]
        ordered = self._sorted.get(cid)
        if ordered is not None:
            del ordered[bisect.bisect_left(ordered, uid)]


# The events whose payload changes the cache, by type (membership comes from the audience).
_CHANGES: Mapping[str, Callable[[WorkspaceCache, bytes], None]] = {
    "user.created": WorkspaceCache._user_changed,
    "user.updated": WorkspaceCache._user_changed,
    "channel.created": WorkspaceCache._channel_changed,
    "channel.updated": WorkspaceCache._channel_changed,
    "channel.archived": WorkspaceCache._channel_changed,
    "channel.unarchived": WorkspaceCache._channel_changed,
    "message.posted": WorkspaceCache._message_posted,
}
