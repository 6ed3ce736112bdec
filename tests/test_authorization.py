"""Who may do what, as a table: (actor, operation) -> "ok" or the error code.

The rules are in the docstring of ``chat/handlers/access.py``. Each row runs against a fresh
seeded node (see ``tests/harness.py``): olivia owner, adam admin, mia and max members, gus
guest, mallory a member who is in no channel. ``general`` is public (everyone but mallory),
``secret`` private (olivia, mia). Every row runs on both stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chat import wire
from chat.client import Client
from chat.handlers.access import Action, can_set_role, may_act_on
from chat.journal import now_ms
from chat.storage import queries
from tests.harness import RunningNode
from tests.timing import scaled

OWNER, ADMIN, MEMBER, GUEST, OUTSIDER = "olivia", "adam", "mia", "gus", "mallory"
ACTORS = (OWNER, ADMIN, MEMBER, GUEST, OUTSIDER)

_names = (f"c{i}" for i in itertools.count())


async def attempt(client: Client, type: str, **fields: Any) -> str:
    frame = await client.request_frame(type, timeout=scaled(10), **fields)
    if frame["type"] == "reply":
        return "ok"
    assert frame["type"] == "error", frame
    return str(frame["code"])


def other(actor: str, preferred: str = "max", fallback: str = "mia") -> str:
    """A target that is not the actor."""
    return fallback if actor == preferred else preferred


async def post_as(node: RunningNode, handle: str, channel_id: int, text: str = "hi") -> int:
    async with node.client(handle) as c:
        reply = await c.request(
            "messages.post", channel_id=channel_id, client_msg_id=next(_names), text=text
        )
    return int(reply["message"]["id"])


async def lounge(node: RunningNode) -> int:
    """A public channel with only its creator, olivia."""
    channel = await node.admin.create_channel(
        node.workspace_id, "lounge", node.users[OWNER], [], private=False
    )
    return channel.id


# Each operation: (node, actor's connected client, actor's handle) -> outcome.
Op = Callable[[RunningNode, Client, str], Awaitable[str]]


async def create_public(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "channels.create", name=f"pub-{actor}")


async def create_private(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "channels.create", name=f"priv-{actor}", private=True)


async def join_public(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "channels.join", channel_id=await lounge(node))


async def post_general(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(
        c, "messages.post", channel_id=node.general, client_msg_id="p", text="hello"
    )


async def post_private(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(
        c, "messages.post", channel_id=node.private, client_msg_id="p", text="hello"
    )


async def history_private(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "messages.history", channel_id=node.private)


async def history_general(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "messages.history", channel_id=node.general)


async def history_public_not_member(node: RunningNode, c: Client, actor: str) -> str:
    cid = await lounge(node)
    if actor == OWNER:  # the creator is a member; take a public channel she is not in
        async with node.client(ADMIN) as a:
            cid = (await a.request("channels.create", name="adams"))["channel"]["id"]
    return await attempt(c, "messages.history", channel_id=cid)


async def invite_general(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(
        c, "channels.invite", channel_id=node.general, user_ids=[node.users[OUTSIDER]]
    )


async def rename_general(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "channels.update", channel_id=node.general, name="renamed")


async def topic_general(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "channels.update", channel_id=node.general, topic="new topic")


async def archive_general(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "channels.archive", channel_id=node.general)


async def remove_from_general(node: RunningNode, c: Client, actor: str) -> str:
    target = node.users[other(actor)]
    return await attempt(c, "channels.remove", channel_id=node.general, user_id=target)


async def delete_others_message(node: RunningNode, c: Client, actor: str) -> str:
    message_id = await post_as(node, other(actor), node.general)
    return await attempt(c, "messages.delete", message_id=message_id)


async def delete_private_message(node: RunningNode, c: Client, actor: str) -> str:
    author = other(actor, preferred=MEMBER, fallback=OWNER)
    message_id = await post_as(node, author, node.private)
    return await attempt(c, "messages.delete", message_id=message_id)


async def edit_others_message(node: RunningNode, c: Client, actor: str) -> str:
    message_id = await post_as(node, other(actor), node.general)
    return await attempt(c, "messages.edit", message_id=message_id, text="edited")


async def set_role_admin(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.set_role", user_id=node.users[other(actor)], role="admin")


async def set_role_guest(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.set_role", user_id=node.users[other(actor)], role="guest")


async def demote_owner(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.set_role", user_id=node.users[OWNER], role="member")


async def deactivate_member(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.deactivate", user_id=node.users[other(actor)])


async def deactivate_owner(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.deactivate", user_id=node.users[OWNER])


async def revoke_others(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "sessions.revoke", user_id=node.users[other(actor)], all=True)


async def revoke_owner(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "sessions.revoke", user_id=node.users[OWNER], all=True)


async def create_invite(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "invites.create", role="guest")


async def list_invites(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "invites.list")


async def revoke_invite(node: RunningNode, c: Client, actor: str) -> str:
    async with node.client(OWNER) as owner:
        invite = (await owner.request("invites.create"))["invite"]
    return await attempt(c, "invites.revoke", invite_id=invite["id"])


F, CNF, NIC, MNF = "forbidden", "channel_not_found", "not_in_channel", "message_not_found"

# operation -> outcome per actor, in the order of ACTORS: owner, admin, member, guest, outsider.
TABLE: dict[Op, tuple[str, ...]] = {
    create_public: ("ok", "ok", "ok", F, "ok"),
    create_private: ("ok", "ok", "ok", F, "ok"),
    # Guests cannot see public channels they were not invited to, so to them the channel
    # does not exist (the same answer as for its history).
    join_public: ("ok", "ok", "ok", CNF, "ok"),
    post_general: ("ok", "ok", "ok", "ok", NIC),
    post_private: ("ok", CNF, "ok", CNF, CNF),
    history_private: ("ok", CNF, "ok", CNF, CNF),
    history_general: ("ok", "ok", "ok", "ok", "ok"),
    history_public_not_member: ("ok", "ok", "ok", CNF, "ok"),
    invite_general: ("ok", "ok", "ok", F, NIC),
    rename_general: ("ok", "ok", F, F, NIC),
    topic_general: ("ok", "ok", "ok", "ok", NIC),
    archive_general: ("ok", "ok", F, F, F),
    remove_from_general: ("ok", "ok", F, F, NIC),
    delete_others_message: ("ok", "ok", F, F, F),
    delete_private_message: ("ok", MNF, F, MNF, MNF),  # author: mia (olivia when mia acts)
    edit_others_message: (F, F, F, F, F),
    set_role_admin: ("ok", F, F, F, F),
    set_role_guest: ("ok", "ok", F, F, F),
    demote_owner: (F, F, F, F, F),  # the owner herself included: nobody sets their own role
    deactivate_member: ("ok", "ok", F, F, F),
    revoke_others: ("ok", "ok", F, F, F),
    create_invite: ("ok", "ok", F, F, F),
    list_invites: ("ok", "ok", F, F, F),
    revoke_invite: ("ok", "ok", F, F, F),
}

ROWS = [
    pytest.param(actor, op, expected, id=f"{op.__name__}-{actor}")
    for op, outcomes in TABLE.items()
    for actor, expected in zip(ACTORS, outcomes, strict=True)
]
# Only owners act on owners (olivia on herself: see the logout tests below).
ROWS += [
    pytest.param(actor, op, F, id=f"{op.__name__}-{actor}")
    for op in (deactivate_owner, revoke_owner)
    for actor in (ADMIN, MEMBER, GUEST, OUTSIDER)
]


@pytest.mark.parametrize(("actor", "op", "expected"), ROWS)
async def test_permission(node: RunningNode, actor: str, op: Op, expected: str) -> None:
    async with node.client(actor) as c:
        outcome = await op(node, c, actor)
    assert outcome == expected, f"{actor} {op.__name__}: expected {expected}, got {outcome}"


async def test_refused_changes_have_no_effect(node: RunningNode) -> None:
    async with node.clients(MEMBER, GUEST, OWNER) as (mia, gus, olivia):
        assert await remove_from_general(node, mia, MEMBER) == F
        assert await rename_general(node, gus, GUEST) == F
        assert await set_role_admin(node, mia, MEMBER) == F
        members = await olivia.request("channels.members", channel_id=node.general)
        assert node.users["max"] in members["user_ids"]
        info = await olivia.request("channels.info", channel_id=node.general)
        assert info["channel"]["name"] == "general"
        users = await olivia.request("users.info", user_ids=[node.users["max"]])
        assert users["users"][0]["role"] == "member"


async def test_removed_member_loses_delivery_immediately(node: RunningNode) -> None:
    async with node.clients(OWNER, MEMBER) as (olivia, mia):
        await olivia.request("channels.remove", channel_id=node.private, user_id=node.users[MEMBER])
        left = await mia.next_event("channel.member_left", timeout=scaled(5))
        assert left["channel_id"] == node.private
        assert left["user_id"] == node.users[MEMBER]
        secret = await olivia.request(
            "messages.post", channel_id=node.private, client_msg_id="s1", text="after removal"
        )
        # A barrier: mia's events arrive in order, so once she sees this one, anything from
        # the private channel would have arrived before it.
        barrier = await olivia.request(
            "messages.post", channel_id=node.general, client_msg_id="b1", text="barrier"
        )
        seen: list[dict[str, Any]] = []
        while True:
            event = await mia.next_event(timeout=scaled(5))
            seen.append(event)
            if event["type"] == "message.posted" and (
                event["message"]["id"] == barrier["message"]["id"]
            ):
                break
        leaked = [
            e
            for e in seen
            if e.get("channel_id") == node.private
            or e.get("message", {}).get("channel_id") == node.private
        ]
        assert leaked == [], leaked
        assert secret["message"]["id"] not in [e.get("message", {}).get("id") for e in seen]
        # And she cannot read it either.
        frame = await mia.request_frame("messages.history", channel_id=node.private)
        assert frame["code"] == CNF


async def test_deactivated_user_is_cut_off_at_once(node: RunningNode) -> None:
    async with node.clients(ADMIN, MEMBER) as (adam, mia):
        await adam.request("users.deactivate", user_id=node.users[MEMBER])
        revoked = await mia.next_event("session.revoked", timeout=scaled(5))
        assert revoked["user_id"] == node.users[MEMBER]
        await asyncio.wait_for(mia.closed.wait(), scaled(5))
        assert (mia.ws.close_code, mia.ws.close_reason) == (1008, "token_revoked")


async def test_revoking_others_cuts_off_all_their_sessions(node: RunningNode) -> None:
    async with node.clients(ADMIN, MEMBER, MEMBER, OWNER) as (adam, mia1, mia2, olivia):
        reply = await adam.request("sessions.revoke", user_id=node.users[MEMBER], all=True)
        assert reply["revoked"] >= 1
        for mia in (mia1, mia2):
            await asyncio.wait_for(mia.closed.wait(), scaled(5))
            assert (mia.ws.close_code, mia.ws.close_reason) == (1008, "token_revoked")
        assert not olivia.closed.is_set()
        await olivia.request("ping")


@pytest.mark.parametrize("all_sessions", [False, True], ids=["this-session", "all-sessions"])
async def test_logout_gets_its_reply_then_closes(node: RunningNode, all_sessions: bool) -> None:
    # Every request is answered exactly once (docs/protocol.md), logging out included: the
    # reply must not be lost to the close that the revocation triggers.
    async with node.client(MEMBER) as mia:
        frame = await mia.request_frame("sessions.revoke", all=all_sessions, timeout=scaled(5))
        assert frame["type"] == "reply", frame
        assert frame["data"]["revoked"] == 1
        await asyncio.wait_for(mia.closed.wait(), scaled(5))
        assert (mia.ws.close_code, mia.ws.close_reason) == (1008, "token_revoked")


# --------------------------------------------------------------------------- defect 2


async def _end_session_behind_the_nodes_back(node: RunningNode, session_id: str, how: str) -> None:
    """Revoke or expire a session in the database only, with no event: as if the connection
    had missed the revocation (it raced its connect, or the bus lost it)."""
    async with node.admin.db.transaction() as conn:
        if how == "revoked":
            assert await queries.revoke_session(conn, session_id, now_ms()) == 1
        else:
            await conn.execute(
                "UPDATE sessions SET expires_at = $2 WHERE id = $1", session_id, now_ms() - 1
            )


@pytest.mark.parametrize(
    ("how", "code"), [("revoked", "token_revoked"), ("expired", "token_expired")]
)
async def test_defect_02_requests_recheck_the_session(
    node: RunningNode, how: str, code: str
) -> None:
    async with node.client(MEMBER) as mia:
        await mia.request("ping")
        await _end_session_behind_the_nodes_back(node, mia.session["session_id"], how)
        outcomes = []
        for op in (post_general, history_general, topic_general):
            if mia.closed.is_set():
                break
            with contextlib.suppress(ConnectionError):
                outcomes.append(await op(node, mia, MEMBER))
        # Before the fix the post was accepted; now every request is refused (and the
        # connection may be closed after the first refusal).
        assert outcomes and set(outcomes) == {code}, outcomes
    history = await node_history(node, OWNER, node.general)
    assert "hello" not in history


async def node_history(node: RunningNode, handle: str, channel_id: int) -> list[str]:
    async with node.client(handle) as c:
        page = await c.request("messages.history", channel_id=channel_id)
    return [m["text"] for m in page["messages"]]


# --------------------------------------------------------------------------- defect 15


async def _new_admin(node: RunningNode) -> int:
    (user,) = await node.admin.create_users(
        node.workspace_id, [{"handle": next(_names), "role": "admin"}]
    )
    return user.id


async def demote_admin(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.set_role", user_id=await _new_admin(node), role="member")


async def deactivate_admin(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.deactivate", user_id=await _new_admin(node))


async def revoke_admin(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "sessions.revoke", user_id=await _new_admin(node), all=True)


async def promote_to_owner(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.set_role", user_id=node.users[other(actor)], role="owner")


async def own_role(node: RunningNode, c: Client, actor: str) -> str:
    return await attempt(c, "users.set_role", user_id=node.users[actor], role="guest")


# One rule for acting on another user (rank owner > admin > member > guest): an admin acts
# on admins, members and guests, never owners; an owner on anyone; nobody on their own role.
TABLE_15: dict[Op, tuple[str, ...]] = {
    demote_admin: ("ok", "ok", F, F, F),  # before the fix: ("ok", F, F, F, F)
    deactivate_admin: ("ok", "ok", F, F, F),
    revoke_admin: ("ok", "ok", F, F, F),
    promote_to_owner: ("ok", F, F, F, F),
    own_role: (F, F, F, F, F),
    demote_owner: (F, F, F, F, F),
    deactivate_owner: ("invalid_argument", F, F, F, F),  # the owner herself: not herself
}


@pytest.mark.parametrize(
    ("actor", "op", "expected"),
    [
        pytest.param(actor, op, expected, id=f"{op.__name__}-{actor}")
        for op, outcomes in TABLE_15.items()
        for actor, expected in zip(ACTORS, outcomes, strict=True)
    ],
)
async def test_defect_15_one_rank_rule_for_acting_on_users(
    node: RunningNode, actor: str, op: Op, expected: str
) -> None:
    async with node.client(actor) as c:
        outcome = await op(node, c, actor)
    assert outcome == expected, f"{actor} {op.__name__}: expected {expected}, got {outcome}"


ROLES = ("owner", "admin", "member", "guest")
# actor role -> the target roles it may act on (set_role, deactivate, revoke_others).
RANK_RULE = {
    "owner": {"owner", "admin", "member", "guest"},
    "admin": {"admin", "member", "guest"},
    "member": set(),
    "guest": set(),
}


@pytest.mark.parametrize("action", [Action.SET_ROLE, Action.DEACTIVATE, Action.REVOKE_OTHERS])
@pytest.mark.parametrize("me_role", ROLES)
@pytest.mark.parametrize("target_role", ROLES)
def test_defect_15_policy_table_rank_rule(action: Action, me_role: str, target_role: str) -> None:
    me = _user(1, me_role)
    target = _user(2, target_role)
    assert may_act_on(me, target, action) == (target_role in RANK_RULE[me_role])
    # Nobody changes their own role, whatever the rank.
    assert not can_set_role(me, _user(1, me_role), "member")
    assert not may_act_on(_user(1, me_role, deactivated=True), target, action)


def test_defect_15_roles_an_admin_may_give() -> None:
    admin = _user(1, "admin")
    given = {role for role in ROLES if can_set_role(admin, _user(2, "admin"), role)}
    assert given == {"member", "guest"}
    owner = _user(1, "owner")
    assert {role for role in ROLES if can_set_role(owner, _user(2, "owner"), role)} == set(ROLES)


def _user(user_id: int, role: str, *, deactivated: bool = False) -> wire.User:
    return wire.User(
        id=user_id,
        workspace_id=1,
        handle=f"u{user_id}",
        display_name=f"U{user_id}",
        role=role,
        deactivated=deactivated,
    )
