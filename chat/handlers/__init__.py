"""What each operation means. One module per domain; ``HANDLERS`` maps request types to them.

Reads open a connection and check access; writes hand an operation to the journal, which runs
it (access checks included) inside the workspace's next transaction. A handler's first await
is its journal submission, so requests from one connection are applied in the order sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chat import wire
from chat.handlers import cached, channels, invites, live, messages, users
from chat.handlers.context import Caller, Services

Handler = Callable[[Services, Caller, Any], Awaitable[wire.Data]]

HANDLERS: dict[type[wire.Request], Handler] = {
    wire.Ping: live.ping,
    wire.UsersList: users.users_list,
    wire.UsersInfo: users.users_info,
    wire.UsersUpdateProfile: users.users_update_profile,
    wire.UsersSetRole: users.users_set_role,
    wire.UsersDeactivate: users.users_deactivate,
    wire.SessionsRevoke: users.sessions_revoke,
    wire.ChannelsCreate: channels.channels_create,
    wire.ChannelsUpdate: channels.channels_update,
    wire.ChannelsArchive: channels.channels_archive,
    wire.ChannelsUnarchive: channels.channels_unarchive,
    wire.ChannelsJoin: channels.channels_join,
    wire.ChannelsLeave: channels.channels_leave,
    wire.ChannelsInvite: channels.channels_invite,
    wire.ChannelsRemove: channels.channels_remove,
    wire.ChannelsList: channels.channels_list,
    wire.ChannelsInfo: channels.channels_info,
    wire.ChannelsMembers: channels.channels_members,
    wire.DmsOpen: channels.dms_open,
    wire.MessagesPost: messages.messages_post,
    wire.MessagesEdit: messages.messages_edit,
    wire.MessagesDelete: messages.messages_delete,
    wire.MessagesHistory: messages.messages_history,
    wire.MessagesReplies: messages.messages_replies,
    wire.ReactionsAdd: messages.reactions_add,
    wire.ReactionsRemove: messages.reactions_remove,
    wire.ReadsMark: messages.reads_mark,
    wire.ReadsCounts: messages.reads_counts,
    wire.Typing: live.typing,
    wire.PresenceSubscribe: live.presence_subscribe,
    wire.PresenceSet: live.presence_set,
    wire.Bootstrap: cached.bootstrap,
    wire.UsersAutocomplete: cached.users_autocomplete,
    wire.ChannelsAutocomplete: cached.channels_autocomplete,
    wire.InvitesCreate: invites.invites_create,
    wire.InvitesList: invites.invites_list,
    wire.InvitesRevoke: invites.invites_revoke,
}


async def handle(s: Services, caller: Caller, request: wire.Request) -> wire.Data:
    return await HANDLERS[type(request)](s, caller, request)


__all__ = ["HANDLERS", "Caller", "Services", "handle"]
