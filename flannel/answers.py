"""The requests answered from a :class:`~flannel.cache.WorkspaceCache`, as pure functions.

Each takes the cache, the caller's user id and the request, and returns the reply's data or
raises :class:`chat.errors.ChatError` with the code chat's own handler would use, so a client
cannot tell which tier answered:

- ``users.info``, ``channels.info``, ``channels.members``: what ``chat/handlers/users.py`` and
  ``chat/handlers/channels.py`` answer from the database, paging included;
- ``bootstrap``, ``users.autocomplete``, ``channels.autocomplete``: served only from a cache
  (the chat node's in-process one, :mod:`chat.handlers.cached`, or Flannel's).

Access follows :mod:`chat.handlers.access` (its ``POLICY`` and ``allowed``, not a copy): a
deactivated caller gets ``account_inactive``; a private channel or DM the caller is not in,
and for a guest any channel it is not in, is ``channel_not_found``, as if it did not exist.
The session's own state (revoked, expired) is not in a cache: the caller checks it first,
as every chat request does (``access.actor``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from chat import wire
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import Action, allowed, may_know
from flannel.cache import DM_KINDS, WorkspaceCache

ALL_PARTS: tuple[wire.BootstrapPart, ...] = ("user", "workspace", "channels", "users")


def actor(cache: WorkspaceCache, user_id: int) -> wire.User:
    """The caller as the cache knows it; ``account_inactive`` when deactivated (or unknown,
    as ``access.actor`` says for a user it cannot find)."""
    user = cache.user(user_id)
    if user is None or user.deactivated:
        raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
    return user


def may_see(cache: WorkspaceCache, user: wire.User, channel_id: int) -> bool:
    """Whether ``user`` may know the channel exists (``access.visible_channel``): a member,
    or a public channel and a role that may ``READ_PUBLIC``."""
    kind = cache.kind(channel_id)
    return kind is not None and may_know(user, kind, member=cache.is_member(channel_id, user.id))


def visible_channel(cache: WorkspaceCache, user: wire.User, channel_id: int) -> wire.Channel:
    channel = cache.channel(channel_id)
    if channel is None or not may_see(cache, user, channel_id):
        raise ChatError(ErrorCode.CHANNEL_NOT_FOUND)
    return channel


# --------------------------------------------------------------------------- lazy look-ups


def users_info(cache: WorkspaceCache, user_id: int, req: wire.UsersInfo) -> wire.Users:
    """The workspace's users among ``user_ids``, by id, each once, deactivated ones included;
    unknown ids are left out (``queries.get_users``)."""
    actor(cache, user_id)
    users = cache.users
    return wire.Users(users=[users[i] for i in sorted(set(req.user_ids)) if i in users])


def channels_info(cache: WorkspaceCache, user_id: int, req: wire.ChannelsInfo) -> wire.ChannelData:
    me = actor(cache, user_id)
    return wire.ChannelData(channel=visible_channel(cache, me, req.channel_id))


def channels_members(
    cache: WorkspaceCache, user_id: int, req: wire.ChannelsMembers
) -> wire.MemberPage:
    """A page of member ids above ``cursor`` (the last id of the previous page); the next
    cursor is the page's last id when the page is full, as chat computes it."""
    me = actor(cache, user_id)
    visible_channel(cache, me, req.channel_id)
    ids = cache.members_page(req.channel_id, req.cursor, req.limit)
    return wire.MemberPage(user_ids=ids, next_cursor=ids[-1] if len(ids) == req.limit else None)


# --------------------------------------------------------------------------- bootstrap


def bootstrap(
    cache: WorkspaceCache,
    user_id: int,
    parts: Collection[wire.BootstrapPart] | None,
    counts: Sequence[wire.ChannelCounts],
) -> wire.BootstrapData:
    """The caller's first screen as of the cache's ``seq``: itself, the workspace, its
    channels and DMs (archived ones included, flagged) by id with the unread and mention
    ``counts`` (``reads.counts``; zero for a channel they do not cover) and last activity,
    and the users its DMs need (the partners, never everyone). ``parts``: the parts wanted
    (None: all); the others are null."""
    me = actor(cache, user_id)
    wanted = frozenset(ALL_PARTS if parts is None else parts)
    mine = sorted(cache.channels_of(me.id))
    channels: list[wire.BootstrapChannel] | None = None
    if "channels" in wanted:
        by_channel = {c.channel_id: c for c in counts}
        channels = []
        for cid in mine:
            channel = cache.channel(cid)
            if channel is None:
                continue
            count = by_channel.get(cid)
            channels.append(
                wire.BootstrapChannel(
                    id=cid,
                    kind=channel.kind,
                    name=channel.name,
                    topic=channel.topic,
                    archived=channel.archived,
                    member_count=channel.member_count,
                    last_seq=channel.last_seq,
                    last_ts=cache.last_ts(cid),
                    last_read_seq=count.last_read_seq if count is not None else 0,
                    unread=count.unread if count is not None else 0,
                    mentions=count.mentions if count is not None else 0,
                    dm_user_ids=_partners(cache, cid, me.id),
                )
            )
    users: list[wire.User] | None = None
    if "users" in wanted:
        partner_ids = {uid for cid in mine for uid in _partners(cache, cid, me.id)}
        users = [u for uid in sorted(partner_ids) if (u := cache.user(uid)) is not None]
    return wire.BootstrapData(
        seq=cache.seq,
        user=me if "user" in wanted else None,
        workspace=(
            wire.WorkspaceInfo(id=cache.workspace_id, name=cache.name)
            if "workspace" in wanted
            else None
        ),
        channels=channels,
        users=users,
    )


def _partners(cache: WorkspaceCache, channel_id: int, user_id: int) -> list[int]:
    """A DM's members but the caller, by id; [] for any other channel."""
    if cache.kind(channel_id) not in DM_KINDS:
        return []
    return sorted(uid for uid in cache.members(channel_id) if uid != user_id)


# --------------------------------------------------------------------------- autocomplete


def users_autocomplete(
    cache: WorkspaceCache, user_id: int, req: wire.UsersAutocomplete
) -> wire.Users:
    """@-mention completion: ranked by :class:`flannel.autocomplete.UserIndex` (members of
    ``channel_id`` after an exact handle, then the caller's recent contacts, then everyone).
    ``channel_id`` must be a channel the caller may see (``channel_not_found`` otherwise).
    Deactivated users are never returned."""
    me = actor(cache, user_id)
    members: Collection[int] = ()
    if req.channel_id is not None:
        visible_channel(cache, me, req.channel_id)
        members = cache.members(req.channel_id)
    ids = cache.user_index.complete(
        req.query,
        limit=req.limit,
        channel_members=members,
        recent=cache.recent_contacts(me.id),
    )
    users = cache.users
    return wire.Users(users=[u for i in ids if not (u := users[i]).deactivated])


def channels_autocomplete(
    cache: WorkspaceCache, user_id: int, req: wire.ChannelsAutocomplete
) -> wire.ChannelList:
    """#-channel completion among the channels the caller may see (public ones if its role
    may read them, and the private ones it is a member of), live before archived; never DMs."""
    me = actor(cache, user_id)
    read_public = allowed(me, Action.READ_PUBLIC)

    def visible(cid: int) -> bool:
        kind = cache.kind(cid)
        if kind is None or kind in DM_KINDS:
            return False
        return (read_public and kind == "public") or cache.is_member(cid, me.id)

    ids = cache.channel_index.complete(req.query, limit=req.limit, visible=visible)
    return wire.ChannelList(channels=[c for cid in ids if (c := cache.channel(cid)) is not None])
