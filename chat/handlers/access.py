"""Who may do what: the role table and the visibility rules, in one place.

Rules (tested as a table in ``tests/test_authorization.py``):

- Roles: owner > admin > member > guest. Deactivated users can do nothing.
- Guests see and post only in channels they were invited to; they cannot create channels,
  join public channels by themselves, or invite.
- A private channel or DM is invisible to non-members: every operation on it answers
  ``channel_not_found``, as if it did not exist.
- Public channels: any non-guest may read them and join; posting and reacting need membership.
- Archived channels are read-only (leave still works).
- Editing a message: its author only. Deleting: its author, or an admin/owner.
- Renaming or archiving a channel: its creator, or an admin/owner. Topic and purpose: members.
- Removing someone from a channel: the channel's creator, or an admin/owner.
- Acting on another user (set a role, deactivate, revoke their sessions): rank is
  owner > admin > member > guest; an owner may act on anyone, an admin on admins, members
  and guests but not owners (``TARGETS``). Nobody changes their own role. Roles an actor
  may give: an owner any, an admin member or guest (``GRANTS``).
- Invites (create, list, revoke): owners and admins. An invite gives ``member`` or
  ``guest``, never more.
- Requests act as a session: a revoked or expired session can do nothing (``actor``).

Who *receives* an event is authorization too, and follows the same rules as reads
(``*_audience`` below; every event the handlers and ``chat/admin.py`` emit uses one):

- ``channel.*`` (created/updated/archived/unarchived) of a public channel: its members and
  everyone who may ``READ_PUBLIC`` (not guests); of a private channel or DM: its members.
- ``channel.member_joined/left``: the channel's members (and the one who left).
- ``message.*``, ``reaction.*``, typing: the channel's members; mentions: the mentioned
  members; ``read_marker.updated``: the reader.
- ``user.*``: the whole workspace (guests may list users too); a role change is applied to
  the user's live connections at that event, so later events are judged by the new role.
- ``session.revoked``: the user whose sessions they were. Presence: its watchers.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING

from chat import wire
from chat.bus import Audience
from chat.errors import ChatError, ErrorCode
from chat.storage import Connection, queries

if TYPE_CHECKING:
    from chat.handlers.context import Caller


class Action(StrEnum):
    CREATE_CHANNEL = "create_channel"
    JOIN_PUBLIC = "join_public"
    INVITE = "invite"
    READ_PUBLIC = "read_public"
    MANAGE_ANY_CHANNEL = "manage_any_channel"  # rename/archive/remove in channels of others
    DELETE_ANY_MESSAGE = "delete_any_message"
    SET_ROLE = "set_role"
    DEACTIVATE = "deactivate"
    REVOKE_OTHERS = "revoke_others"
    MANAGE_INVITES = "manage_invites"  # invites.create / list / revoke


_ALL_STAFF = frozenset({"owner", "admin"})
_NON_GUEST = frozenset({"owner", "admin", "member"})

POLICY: dict[Action, frozenset[str]] = {
    Action.CREATE_CHANNEL: _NON_GUEST,
    Action.JOIN_PUBLIC: _NON_GUEST,
    Action.INVITE: _NON_GUEST,
    Action.READ_PUBLIC: _NON_GUEST,
    Action.MANAGE_ANY_CHANNEL: _ALL_STAFF,
    Action.DELETE_ANY_MESSAGE: _ALL_STAFF,
    Action.SET_ROLE: _ALL_STAFF,
    Action.DEACTIVATE: _ALL_STAFF,
    Action.REVOKE_OTHERS: _ALL_STAFF,
    Action.MANAGE_INVITES: _ALL_STAFF,
}

# Acting on another user (SET_ROLE, DEACTIVATE, REVOKE_OTHERS): the roles of the targets each
# role may act on (by rank: owner > admin > member > guest; admins act on admins).
TARGETS: dict[str, frozenset[str]] = {
    "owner": frozenset({"owner", "admin", "member", "guest"}),
    "admin": frozenset({"admin", "member", "guest"}),
}
# The roles each role may give with SET_ROLE.
GRANTS: dict[str, frozenset[str]] = {
    "owner": frozenset({"owner", "admin", "member", "guest"}),
    "admin": frozenset({"member", "guest"}),
}


def allowed(user: wire.User, action: Action) -> bool:
    return not user.deactivated and user.role in POLICY[action]


def require(user: wire.User, action: Action) -> None:
    if not allowed(user, action):
        raise ChatError(ErrorCode.FORBIDDEN, f"role {user.role!r} may not {action.value}")


async def actor(conn: Connection, caller: Caller) -> wire.User:
    """The caller, fresh from the database with its session, in one query: role changes,
    deactivation, revocation and expiry apply at once, whatever reached the connection."""
    row = await queries.get_actor(conn, caller.user_id, caller.session_id)
    if row is None:
        raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
    user, revoked_at, expires_at = row
    if user.deactivated:
        raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
    if expires_at is None:  # no such session for this user
        raise ChatError(ErrorCode.INVALID_AUTH)
    if revoked_at is not None:
        raise ChatError(ErrorCode.TOKEN_REVOKED)
    if expires_at <= time.time() * 1000:
        raise ChatError(ErrorCode.TOKEN_EXPIRED)
    return user


async def visible_channel(
    conn: Connection, user: wire.User, channel_id: int
) -> tuple[wire.Channel, bool]:
    """The channel and whether the user is a member; ``channel_not_found`` when the user may
    not even know it exists."""
    channel = await queries.get_channel(conn, channel_id)
    if channel is None or channel.workspace_id != user.workspace_id:
        raise ChatError(ErrorCode.CHANNEL_NOT_FOUND)
    member = await queries.is_member(conn, channel_id, user.id)
    if not may_know(user, channel.kind, member=member):
        raise ChatError(ErrorCode.CHANNEL_NOT_FOUND)
    return channel, member


def may_know(user: wire.User, kind: str, *, member: bool) -> bool:
    """Whether the user may know a channel of ``kind`` exists: its members may, and for a
    public channel every role that may ``READ_PUBLIC``. (The edge's cache answers by the
    same rule, flannel/answers.py.)"""
    return member or (kind == "public" and allowed(user, Action.READ_PUBLIC))


async def member_channel(
    conn: Connection, user: wire.User, channel_id: int, *, writable: bool = True
) -> wire.Channel:
    """A channel the user is a member of (and, if ``writable``, not archived)."""
    channel, member = await visible_channel(conn, user, channel_id)
    if not member:
        raise ChatError(ErrorCode.NOT_IN_CHANNEL)
    if writable and channel.archived:
        raise ChatError(ErrorCode.CHANNEL_ARCHIVED)
    return channel


async def visible_message(
    conn: Connection, user: wire.User, message_id: int
) -> tuple[wire.Message, wire.Channel, bool]:
    message = await queries.get_message(conn, message_id)
    if message is None:
        raise ChatError(ErrorCode.MESSAGE_NOT_FOUND)
    try:
        channel, member = await visible_channel(conn, user, message.channel_id)
    except ChatError:
        raise ChatError(ErrorCode.MESSAGE_NOT_FOUND) from None
    return message, channel, member


def can_manage_channel(user: wire.User, channel: wire.Channel) -> bool:
    return channel.created_by == user.id or allowed(user, Action.MANAGE_ANY_CHANNEL)


def may_act_on(user: wire.User, target: wire.User, action: Action) -> bool:
    """The one rule for acting on another user: the action's roles, then the target's rank."""
    return allowed(user, action) and target.role in TARGETS.get(user.role, frozenset())


def can_set_role(user: wire.User, target: wire.User, role: str) -> bool:
    return (
        target.id != user.id
        and may_act_on(user, target, Action.SET_ROLE)
        and role in GRANTS.get(user.role, frozenset())
    )


# ---------------------------------------------------------------------- event audiences


def channel_audience(channel: wire.Channel, *, joins: tuple[int, ...] = ()) -> Audience:
    """``channel.*`` events: whoever may read the channel (``visible_channel``): its members,
    and for a public channel every role that may ``READ_PUBLIC``."""
    readers = POLICY[Action.READ_PUBLIC] if channel.kind == "public" else frozenset()
    return Audience(channel_id=channel.id, roles=readers, joins=joins)


def user_audience(user: wire.User, *, role_was: str | None = None) -> Audience:
    """``user.*`` events: the whole workspace (every role may list users). ``role_was``:
    the user's role before this event, when it changes it."""
    change = None
    if role_was is not None and role_was != user.role:
        change = (user.id, role_was, user.role)
    return Audience(everyone=True, role_change=change)
