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
- Roles: an owner may set any role; an admin may make members and guests, of non-owners.
"""

from __future__ import annotations

from enum import StrEnum

from chat import wire
from chat.errors import ChatError, ErrorCode
from chat.storage import Connection, queries


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
}


def allowed(user: wire.User, action: Action) -> bool:
    return not user.deactivated and user.role in POLICY[action]


def require(user: wire.User, action: Action) -> None:
    if not allowed(user, action):
        raise ChatError(ErrorCode.FORBIDDEN, f"role {user.role!r} may not {action.value}")


async def actor(conn: Connection, user_id: int) -> wire.User:
    """The caller, fresh from the database (role changes and deactivation apply at once)."""
    user = await queries.get_user(conn, user_id)
    if user is None or user.deactivated:
        raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
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
    if not member and (channel.kind != "public" or not allowed(user, Action.READ_PUBLIC)):
        raise ChatError(ErrorCode.CHANNEL_NOT_FOUND)
    return channel, member


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


def can_set_role(user: wire.User, target: wire.User, role: str) -> bool:
    if not allowed(user, Action.SET_ROLE) or target.id == user.id:
        return False
    if user.role == "owner":
        return True
    return target.role != "owner" and role in ("member", "guest") and target.role != "admin"
