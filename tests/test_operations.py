"""Every request type against a real node: its effect on state, and who receives its events.

Negative delivery checks ("X receives nothing") do not sleep: the server writes an operation's
events to every recipient's socket before it writes the reply to the requester, and a
connection's frames leave in order. So once the requester has its reply, a ``ping`` round trip
on X flushes everything X was sent; :func:`settle` returns exactly those events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.client import Client, RequestError
from tests.harness import RunningNode
from tests.timing import scaled

WAIT = scaled(5.0)
_client_msg_ids = (f"cm-{i}" for i in itertools.count(1))

Event = dict[str, Any]


# --------------------------------------------------------------------------- helpers


async def settle(client: Client) -> list[Event]:
    """Every event delivered to ``client`` so far (a ping round trip flushes the socket)."""
    await client.request("ping", timeout=WAIT)
    return client.drain_events()


async def settle_all(*clients: Client) -> list[list[Event]]:
    return [await settle(c) for c in clients]


def of_type(events: list[Event], *types: str) -> list[Event]:
    return [e for e in events if e["type"] in types]


def one(events: list[Event], type_: str, **match: Any) -> Event:
    """The single event of ``type_`` whose fields equal ``match``."""
    found = [
        e for e in events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())
    ]
    assert len(found) == 1, f"expected one {type_} {match}, got {events}"
    return found[0]


async def error_code(client: Client, type_: str, **fields: Any) -> str:
    with pytest.raises(RequestError) as info:
        await client.request(type_, timeout=WAIT, **fields)
    return info.value.code


async def post_error(client: Client, channel_id: int, text: str, **fields: Any) -> str:
    """The error code of a refused post."""
    return await error_code(
        client,
        "messages.post",
        channel_id=channel_id,
        client_msg_id=next(_client_msg_ids),
        text=text,
        **fields,
    )


async def post(client: Client, channel_id: int, text: str, **fields: Any) -> dict[str, Any]:
    cmid = fields.pop("client_msg_id", None) or next(_client_msg_ids)
    reply = await client.request(
        "messages.post", channel_id=channel_id, client_msg_id=cmid, text=text, **fields
    )
    message: dict[str, Any] = reply["message"]
    return message


async def history(client: Client, channel_id: int, **fields: Any) -> list[dict[str, Any]]:
    reply = await client.request("messages.history", channel_id=channel_id, **fields)
    messages: list[dict[str, Any]] = reply["messages"]
    return messages


async def send_only(client: Client, type_: str, **fields: Any) -> None:
    """Send a request without waiting for its answer."""
    await client.send_raw(json.dumps({"type": type_, "id": client.new_id(), **fields}))


async def wait_closed(client: Client) -> tuple[int | None, str | None]:
    await asyncio.wait_for(client.closed.wait(), WAIT)
    return client.ws.close_code, client.ws.close_reason


@contextlib.asynccontextmanager
async def connect_with(node: RunningNode, token: str) -> AsyncIterator[Client]:
    async with Client.connect(node.url, token) as c:
        yield c


async def refused_auth(node: RunningNode, token: str) -> tuple[str, int | None, str | None]:
    """Authenticate with ``token`` on a fresh connection: (error code, close code, reason)."""
    async with Client.connect(node.url) as c:
        frame = await c.request_frame("auth", token=token, timeout=WAIT)
        assert frame["type"] == "error", frame
        close_code, reason = await wait_closed(c)
        return frame["code"], close_code, reason


async def add_users(node: RunningNode, *handles: str) -> dict[str, int]:
    specs = [{"handle": h, "display_name": h.title(), "role": "member"} for h in handles]
    users = await node.admin.create_users(node.workspace_id, specs)
    ids = {u.handle: u.id for u in users}
    node.users.update(ids)
    for handle, uid in ids.items():
        node.tokens[handle] = await node.admin.issue_token(uid)
    return ids


# --------------------------------------------------------------------------- ping


async def test_ping_replies_with_server_time(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        before = int(time.time() * 1000)
        pong = await mia.request("ping")
        after = int(time.time() * 1000)
        assert set(pong) == {"server_time"}
        assert before - 1000 <= pong["server_time"] <= after + 1000


# --------------------------------------------------------------------------- auth


async def test_login_with_password_issues_a_working_token(node: RunningNode) -> None:
    async with Client.connect(node.url) as c:
        session = await c.request(
            "login", workspace="acme", handle="mia", password="correct horse battery staple"
        )
        assert session["user"]["id"] == node.users["mia"]
        assert (session["workspace_id"], session["workspace_name"]) == (node.workspace_id, "acme")
        assert session["token"]
        assert await c.request("ping")
    async with connect_with(node, session["token"]) as again:
        assert again.session["session_id"] == session["session_id"]
        assert again.session["token"] is None  # auth does not mint tokens

    async with Client.connect(node.url) as c:
        frame = await c.request_frame(
            "login", workspace="acme", handle="mia", password="wrong", timeout=WAIT
        )
        assert (frame["type"], frame["code"]) == ("error", "invalid_auth")
        await wait_closed(c)


async def test_auth_reply_describes_the_session(node: RunningNode) -> None:
    async with node.client("gus") as gus:
        assert gus.session["user"]["handle"] == "gus"
        assert gus.session["user"]["role"] == "guest"
        assert gus.session["workspace_id"] == node.workspace_id
        assert isinstance(gus.session["seq"], int) and gus.session["seq"] > 0
        frame = await gus.request_frame("auth", token=node.tokens["gus"], timeout=WAIT)
        assert (frame["type"], frame["code"]) == ("error", "already_authenticated")
        assert not gus.closed.is_set()


# --------------------------------------------------------------------------- users


async def test_users_list_pages_by_cursor_until_next_cursor_is_null(node: RunningNode) -> None:
    everyone = sorted(node.users.values())
    async with node.client("mallory") as mallory:
        whole = await mallory.request("users.list")
        assert [u["id"] for u in whole["users"]] == everyone
        assert whole["next_cursor"] is None

        for limit in (1, 2, 4, 5):
            seen: list[int] = []
            cursor = 0
            pages = 0
            while True:
                page = await mallory.request("users.list", cursor=cursor, limit=limit)
                pages += 1
                assert len(page["users"]) <= limit
                seen += [u["id"] for u in page["users"]]
                if page["next_cursor"] is None:
                    break
                assert page["next_cursor"] == page["users"][-1]["id"]
                cursor = page["next_cursor"]
                assert pages <= len(everyone) + 1
            assert seen == everyone, limit

        handles = {u["handle"]: u["role"] for u in whole["users"]}
        assert handles == {
            "olivia": "owner",
            "adam": "admin",
            "mia": "member",
            "max": "member",
            "gus": "guest",
            "mallory": "member",
        }


async def test_users_list_limit_bounds_are_validated(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        assert await error_code(mia, "users.list", limit=0) == "invalid_frame"
        assert await error_code(mia, "users.list", limit=1001) == "invalid_frame"
        assert await error_code(mia, "users.list", cursor=-1) == "invalid_frame"


async def test_users_info_returns_known_users_only(node: RunningNode) -> None:
    async with node.client("gus") as gus:
        reply = await gus.request(
            "users.info", user_ids=[node.users["max"], node.users["mia"], 10**12]
        )
        assert [u["id"] for u in reply["users"]] == sorted([node.users["max"], node.users["mia"]])
        by_handle = {u["handle"]: u for u in reply["users"]}
        assert by_handle["mia"]["display_name"] == "Mia"
        assert by_handle["mia"]["deactivated"] is False
        assert await error_code(gus, "users.info", user_ids=[]) == "invalid_frame"


async def test_update_profile_changes_user_and_notifies_workspace(node: RunningNode) -> None:
    async with node.clients("mia", "olivia", "mallory") as (mia, olivia, mallory):
        reply = await mia.request(
            "users.update_profile", display_name="Mia M.", tz="Europe/Paris", real_name="Mia Moe"
        )
        user = reply["user"]
        assert (user["display_name"], user["tz"], user["real_name"]) == (
            "Mia M.",
            "Europe/Paris",
            "Mia Moe",
        )
        assert user["avatar_url"] == ""  # untouched
        for client in (olivia, mallory, mia):  # the whole workspace, members of nothing too
            event = one(await settle(client), "user.updated")
            assert event["user"] == user
            assert event["seq"] > client.session["seq"]

        info = await olivia.request("users.info", user_ids=[node.users["mia"]])
        assert info["users"] == [user]
        assert await error_code(mia, "users.update_profile", display_name="") == "invalid_frame"


async def test_owner_sets_role_and_workspace_is_told(node: RunningNode) -> None:
    mia_id = node.users["mia"]
    async with node.clients("olivia", "mia", "max", "adam") as (olivia, mia, max_, adam):
        # Not allowed: a member, an admin promoting to owner, anyone changing themself.
        assert await error_code(max_, "users.set_role", user_id=mia_id, role="admin") == (
            "forbidden"
        )
        assert await error_code(adam, "users.set_role", user_id=mia_id, role="owner") == (
            "forbidden"
        )
        assert (
            await error_code(olivia, "users.set_role", user_id=node.users["olivia"], role="member")
            == "forbidden"
        )
        assert await error_code(olivia, "users.set_role", user_id=10**12, role="admin") == (
            "user_not_found"
        )
        await settle_all(olivia, mia, max_, adam)

        reply = await olivia.request("users.set_role", user_id=mia_id, role="admin")
        assert reply["user"]["role"] == "admin"
        for client in (olivia, mia, max_, adam):
            event = one(await settle(client), "user.updated")
            assert event["user"]["id"] == mia_id
            assert event["user"]["role"] == "admin"

        # The new role applies at once: mia, now an admin, may delete max's message.
        message = await post(max_, node.general, "delete me if you can")
        deleted = await mia.request("messages.delete", message_id=message["id"])
        assert deleted["message"]["deleted"] is True


async def test_deactivate_revokes_the_users_connections_and_tokens(node: RunningNode) -> None:
    max_id = node.users["max"]
    async with node.clients("adam", "mia", "max") as (adam, mia, max_):
        assert await error_code(mia, "users.deactivate", user_id=max_id) == "forbidden"
        assert await error_code(adam, "users.deactivate", user_id=node.users["olivia"]) == (
            "forbidden"
        )
        await settle_all(adam, mia)

        reply = await adam.request("users.deactivate", user_id=max_id)
        assert reply["user"]["id"] == max_id
        assert reply["user"]["deactivated"] is True

        revoked = await max_.next_event("session.revoked", timeout=WAIT)
        assert revoked["user_id"] == max_id
        assert revoked["session_id"] is None
        assert await wait_closed(max_) == (1008, "token_revoked")

        for client in (adam, mia):
            events = await settle(client)
            event = one(events, "user.updated")
            assert event["user"]["id"] == max_id
            assert event["user"]["deactivated"] is True
            assert of_type(events, "session.revoked") == []  # only max's connections

        info = await mia.request("users.info", user_ids=[max_id])
        assert info["users"][0]["deactivated"] is True


async def test_deactivated_users_tokens_are_refused_with_1008(node: RunningNode) -> None:
    max_id = node.users["max"]
    async with node.client("adam") as adam:
        await adam.request("users.deactivate", user_id=max_id)
    code, close_code, reason = await refused_auth(node, node.tokens["max"])
    assert code in ("account_inactive", "token_revoked")
    assert (close_code, reason) == (1008, code)

    # A token issued after deactivation is refused too.
    fresh = await node.admin.issue_token(max_id)
    code, close_code, reason = await refused_auth(node, fresh)
    assert code == "account_inactive"
    assert (close_code, reason) == (1008, "account_inactive")


async def test_revoke_own_session_closes_only_that_connection(node: RunningNode) -> None:
    mia_id = node.users["mia"]
    other_token = await node.admin.issue_token(mia_id)
    async with (
        node.clients("mia", "olivia") as (mia, olivia),
        connect_with(node, other_token) as mia_phone,
    ):
        assert mia.session["session_id"] != mia_phone.session["session_id"]
        # Not waiting for the reply here: whether one comes is the next test's subject.
        await send_only(mia, "sessions.revoke")

        revoked = await mia.next_event("session.revoked", timeout=WAIT)
        assert revoked["user_id"] == mia_id
        assert revoked["session_id"] == mia.session["session_id"]
        assert await wait_closed(mia) == (1008, "token_revoked")

        # The other device: told which session went, but stays connected and served.
        event = one(await settle(mia_phone), "session.revoked")
        assert event["session_id"] == mia.session["session_id"]
        assert not mia_phone.closed.is_set()
        message = await post(olivia, node.general, "still there?")
        one(await settle(mia_phone), "message.posted", message=message)
        assert of_type(await settle(olivia), "session.revoked") == []

    async with connect_with(node, other_token) as again:
        assert again.session["user"]["id"] == mia_id
    code, _, _ = await refused_auth(node, node.tokens["mia"])
    assert code == "token_revoked"


async def test_revoke_own_session_is_answered_before_the_close(node: RunningNode) -> None:
    # Every request gets exactly one reply or error (docs/protocol.md), this one included.
    async with node.client("mia") as mia:
        frame = await mia.request_frame("sessions.revoke", timeout=WAIT)
        assert frame["type"] == "reply", frame
        assert frame["data"] == {"revoked": 1}
        assert await wait_closed(mia) == (1008, "token_revoked")


async def test_revoked_token_is_refused_with_1008(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        await send_only(mia, "sessions.revoke")
        await wait_closed(mia)
    code, close_code, reason = await refused_auth(node, node.tokens["mia"])
    assert (code, close_code, reason) == ("token_revoked", 1008, "token_revoked")


async def test_revoke_all_sessions_closes_every_connection(node: RunningNode) -> None:
    mia_id = node.users["mia"]
    other_token = await node.admin.issue_token(mia_id)
    async with (
        node.clients("mia", "olivia") as (mia, olivia),
        connect_with(node, other_token) as mia_phone,
    ):
        await send_only(mia, "sessions.revoke", all=True)
        for client in (mia, mia_phone):
            event = await client.next_event("session.revoked", timeout=WAIT)
            assert (event["user_id"], event["session_id"]) == (mia_id, None)
            assert await wait_closed(client) == (1008, "token_revoked")
        assert not olivia.closed.is_set()
        await olivia.request("ping")

    for token in (node.tokens["mia"], other_token):
        code, _, _ = await refused_auth(node, token)
        assert code == "token_revoked"

    # Revoking all sessions from a connection that stays open (an admin's) counts them.
    tokens = [await node.admin.issue_token(mia_id) for _ in range(2)]
    async with node.client("adam") as adam:
        assert await adam.request("sessions.revoke", user_id=mia_id) == {"revoked": 2}
    for token in tokens:
        code, _, _ = await refused_auth(node, token)
        assert code == "token_revoked"


async def test_revoke_other_users_sessions_needs_admin(node: RunningNode) -> None:
    async with node.clients("mia", "max", "adam") as (mia, max_, adam):
        assert await error_code(mia, "sessions.revoke", user_id=node.users["max"]) == "forbidden"
        assert await error_code(adam, "sessions.revoke", user_id=node.users["olivia"]) == (
            "forbidden"
        )
        reply = await adam.request("sessions.revoke", user_id=node.users["max"])
        assert reply == {"revoked": 1}
        assert await wait_closed(max_) == (1008, "token_revoked")
        assert not mia.closed.is_set()


# --------------------------------------------------------------------------- channels


async def test_create_public_channel_is_announced_to_those_who_may_read_it(
    node: RunningNode,
) -> None:
    """Everyone who may read public channels hears of a new one; a guest who is not a
    member does not (it could not read it either: issue 6 defect 12)."""
    async with node.clients("mia", "olivia", "mallory", "gus") as clients:
        mia, gus = clients[0], clients[3]
        reply = await mia.request("channels.create", name="launch", topic="go", purpose="ship")
        channel = reply["channel"]
        assert channel["kind"] == "public"
        assert (channel["name"], channel["topic"], channel["purpose"]) == ("launch", "go", "ship")
        assert channel["created_by"] == node.users["mia"]
        assert channel["member_count"] == 1
        assert channel["archived"] is False
        for client in clients[:3]:
            event = one(await settle(client), "channel.created")
            assert event["channel"]["id"] == channel["id"]
        assert of_type(await settle(gus), "channel.created") == []

        members = await mia.request("channels.members", channel_id=channel["id"])
        assert members["user_ids"] == [node.users["mia"]]


async def test_create_private_channel_is_announced_only_to_creator(node: RunningNode) -> None:
    async with node.clients("mia", "olivia", "mallory") as (mia, olivia, mallory):
        reply = await mia.request("channels.create", name="hush", private=True)
        channel = reply["channel"]
        assert channel["kind"] == "private"
        one(await settle(mia), "channel.created", channel=channel)
        for outsider in (olivia, mallory):
            assert of_type(await settle(outsider), "channel.created") == []
            assert await error_code(outsider, "channels.info", channel_id=channel["id"]) == (
                "channel_not_found"
            )


async def test_create_refuses_taken_and_invalid_names_and_guests(node: RunningNode) -> None:
    async with node.clients("mia", "gus") as (mia, gus):
        assert await error_code(mia, "channels.create", name="general") == "name_taken"
        assert await error_code(mia, "channels.create", name="secret", private=True) == (
            "name_taken"
        )
        for bad in ("Launch", "has space", "-dash-first", "dot.name", "émoji"):
            assert await error_code(mia, "channels.create", name=bad) == "invalid_name", bad
        assert await error_code(mia, "channels.create", name="x" * 81) == "invalid_frame"
        assert await error_code(gus, "channels.create", name="guest-room") == "forbidden"
        # Nothing was created by the refusals.
        names = [c["name"] for c in (await mia.request("channels.list"))["channels"]]
        assert names == ["general", "secret"]


async def test_update_topic_by_member_and_rename_by_creator(node: RunningNode) -> None:
    async with node.clients("mia", "olivia", "mallory") as (mia, olivia, mallory):
        reply = await mia.request("channels.update", channel_id=node.general, topic="Q3 plans")
        assert reply["channel"]["topic"] == "Q3 plans"
        assert reply["channel"]["name"] == "general"
        for client in (mia, olivia, mallory):  # public: the whole workspace
            event = one(await settle(client), "channel.updated")
            assert event["channel"] == reply["channel"]

        assert await error_code(mia, "channels.update", channel_id=node.general, name="mine") == (
            "forbidden"
        )
        renamed = await olivia.request("channels.update", channel_id=node.general, name="town")
        assert renamed["channel"]["name"] == "town"
        assert renamed["channel"]["topic"] == "Q3 plans"
        one(await settle(mia), "channel.updated", channel=renamed["channel"])

        # Non-members cannot update; bad or taken names are refused.
        assert await error_code(mallory, "channels.update", channel_id=node.general, topic="x") == (
            "not_in_channel"
        )
        assert await error_code(olivia, "channels.update", channel_id=node.general, name="A B") == (
            "invalid_name"
        )
        assert (
            await error_code(olivia, "channels.update", channel_id=node.general, name="secret")
            == "name_taken"
        )
        info = await mallory.request("channels.info", channel_id=node.general)
        assert (info["channel"]["name"], info["channel"]["topic"]) == ("town", "Q3 plans")


async def test_update_private_channel_is_told_to_members_only(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "mallory") as (olivia, mia, mallory):
        reply = await olivia.request("channels.update", channel_id=node.private, purpose="plans")
        one(await settle(mia), "channel.updated", channel=reply["channel"])
        assert of_type(await settle(mallory), "channel.updated") == []


async def test_archive_makes_channel_read_only_until_unarchived(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "mallory") as (olivia, mia, mallory):
        posted = await post(mia, node.general, "before archiving")
        assert await error_code(mia, "channels.archive", channel_id=node.general) == "forbidden"
        await settle_all(mia, mallory)

        reply = await olivia.request("channels.archive", channel_id=node.general)
        assert reply["channel"]["archived"] is True
        for client in (mia, mallory):
            event = one(await settle(client), "channel.archived")
            assert event["channel"]["archived"] is True

        assert await post_error(mia, node.general, "hello?") == "channel_archived"
        assert await error_code(mia, "reactions.add", message_id=posted["id"], emoji="x") == (
            "channel_archived"
        )
        assert await error_code(mallory, "channels.join", channel_id=node.general) == (
            "channel_archived"
        )
        # Still readable.
        assert [m["id"] for m in await history(mia, node.general)] == [posted["id"]]
        # Archiving twice is a no-op without an event.
        again = await olivia.request("channels.archive", channel_id=node.general)
        assert again["channel"]["archived"] is True
        assert of_type(await settle(mia), "channel.archived") == []

        reply = await olivia.request("channels.unarchive", channel_id=node.general)
        assert reply["channel"]["archived"] is False
        for client in (mia, mallory):
            one(await settle(client), "channel.unarchived")
        await post(mia, node.general, "back again")


async def test_join_public_channel_then_receive_its_messages(node: RunningNode) -> None:
    mallory_id = node.users["mallory"]
    async with node.clients("mallory", "olivia", "mia") as (mallory, olivia, mia):
        await post(olivia, node.general, "before mallory joins")
        assert of_type(await settle(mallory), "message.posted") == []
        await settle_all(olivia, mia)

        reply = await mallory.request("channels.join", channel_id=node.general)
        assert reply["channel"]["member_count"] == 6
        for client in (mallory, olivia, mia):
            event = one(await settle(client), "channel.member_joined")
            assert (event["channel_id"], event["user_id"], event["by_user_id"]) == (
                node.general,
                mallory_id,
                mallory_id,
            )

        message = await post(olivia, node.general, "welcome @mallory")
        events = await settle(mallory)
        one(events, "message.posted", message=message)
        assert one(events, "mention")["kind"] == "user"

        # Joining again is a no-op.
        again = await mallory.request("channels.join", channel_id=node.general)
        assert again["channel"]["member_count"] == 6
        assert of_type(await settle(olivia), "channel.member_joined") == []


async def test_guest_cannot_join_public_channel(node: RunningNode) -> None:
    async with node.clients("mia", "gus") as (mia, gus):
        channel = (await mia.request("channels.create", name="launch"))["channel"]
        assert await error_code(gus, "channels.join", channel_id=channel["id"]) == (
            "channel_not_found"
        )
        async with node.client("max") as max_:
            assert await error_code(max_, "channels.join", channel_id=node.private) == (
                "channel_not_found"
            )


async def test_leaver_stops_receiving_channel_messages(node: RunningNode) -> None:
    max_id = node.users["max"]
    async with node.clients("max", "olivia", "mia") as (max_, olivia, mia):
        reply = await max_.request("channels.leave", channel_id=node.general)
        assert reply["channel"]["member_count"] == 4
        for client in (max_, olivia, mia):
            event = one(await settle(client), "channel.member_left")
            assert (event["user_id"], event["by_user_id"]) == (max_id, max_id)

        message = await post(olivia, node.general, "after max left @max @channel")
        one(await settle(mia), "message.posted", message=message)
        assert await settle(max_) == []

        # A public channel stays readable, but leaving twice is refused.
        assert [m["id"] for m in await history(max_, node.general)] == [message["id"]]
        assert await error_code(max_, "channels.leave", channel_id=node.general) == (
            "not_in_channel"
        )
        members = await mia.request("channels.members", channel_id=node.general)
        assert max_id not in members["user_ids"]


async def test_invite_to_private_channel_grants_messages_and_history(node: RunningNode) -> None:
    max_id = node.users["max"]
    async with node.clients("olivia", "mia", "max", "mallory") as (olivia, mia, max_, mallory):
        earlier = await post(olivia, node.private, "before the invite")
        assert await error_code(max_, "messages.history", channel_id=node.private) == (
            "channel_not_found"
        )
        assert of_type(await settle(max_), "message.posted") == []
        await settle_all(olivia, mia)

        reply = await olivia.request("channels.invite", channel_id=node.private, user_ids=[max_id])
        assert reply["channel"]["member_count"] == 3
        for client in (olivia, mia, max_):
            event = one(await settle(client), "channel.member_joined")
            assert (event["channel_id"], event["user_id"], event["by_user_id"]) == (
                node.private,
                max_id,
                node.users["olivia"],
            )
        assert await settle(mallory) == []

        later = await post(olivia, node.private, "after the invite")
        one(await settle(max_), "message.posted", message=later)
        assert [m["id"] for m in await history(max_, node.private)] == [earlier["id"], later["id"]]
        assert await settle(mallory) == []

        # Inviting someone already in is a no-op; unknown users are refused.
        again = await olivia.request("channels.invite", channel_id=node.private, user_ids=[max_id])
        assert again["channel"]["member_count"] == 3
        assert of_type(await settle(mia), "channel.member_joined") == []
        assert (
            await error_code(olivia, "channels.invite", channel_id=node.private, user_ids=[10**12])
            == "user_not_found"
        )
        code = await error_code(
            mallory, "channels.invite", channel_id=node.private, user_ids=[node.users["mallory"]]
        )
        assert code == "channel_not_found"


async def test_remove_from_private_channel_cuts_member_off(node: RunningNode) -> None:
    mia_id = node.users["mia"]
    async with node.clients("olivia", "mia", "max") as (olivia, mia, max_):
        code = await error_code(
            mia, "channels.remove", channel_id=node.general, user_id=node.users["max"]
        )
        assert code == "forbidden"
        reply = await olivia.request("channels.remove", channel_id=node.private, user_id=mia_id)
        assert reply["channel"]["member_count"] == 1
        for client in (mia, olivia):
            event = one(await settle(client), "channel.member_left")
            assert (event["channel_id"], event["user_id"], event["by_user_id"]) == (
                node.private,
                mia_id,
                node.users["olivia"],
            )
        assert await settle(max_) == []

        await post(olivia, node.private, "mia is gone @mia")
        assert await settle(mia) == []
        assert await error_code(mia, "messages.history", channel_id=node.private) == (
            "channel_not_found"
        )
        assert await error_code(mia, "channels.info", channel_id=node.private) == (
            "channel_not_found"
        )
        assert (
            await error_code(olivia, "channels.remove", channel_id=node.private, user_id=mia_id)
            == "not_in_channel"
        )


async def test_channels_list_shows_public_and_own_channels(node: RunningNode) -> None:
    async with node.clients("olivia", "mallory", "mia") as (olivia, mallory, mia):
        dm = (await mia.request("dms.open", user_ids=[node.users["mallory"]]))["channel"]

        def ids(page: dict[str, Any]) -> list[int]:
            return [c["id"] for c in page["channels"]]

        assert ids(await olivia.request("channels.list")) == [node.general, node.private]
        assert ids(await olivia.request("channels.list", member_only=True)) == [
            node.general,
            node.private,
        ]
        assert ids(await mallory.request("channels.list")) == [node.general, dm["id"]]
        assert ids(await mallory.request("channels.list", member_only=True)) == [dm["id"]]
        assert ids(await mia.request("channels.list")) == [node.general, node.private, dm["id"]]

        seen: list[int] = []
        cursor = 0
        while True:
            page = await mia.request("channels.list", cursor=cursor, limit=1)
            seen += ids(page)
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert seen == [node.general, node.private, dm["id"]]

        general = (await olivia.request("channels.list"))["channels"][0]
        assert (general["name"], general["kind"], general["member_count"]) == (
            "general",
            "public",
            5,
        )


async def test_channels_info_respects_visibility(node: RunningNode) -> None:
    async with node.clients("mallory", "mia") as (mallory, mia):
        general = (await mallory.request("channels.info", channel_id=node.general))["channel"]
        assert (general["id"], general["kind"], general["member_count"]) == (
            node.general,
            "public",
            5,
        )
        private = (await mia.request("channels.info", channel_id=node.private))["channel"]
        assert (private["name"], private["kind"], private["member_count"]) == (
            "secret",
            "private",
            2,
        )
        assert await error_code(mallory, "channels.info", channel_id=node.private) == (
            "channel_not_found"
        )
        assert await error_code(mallory, "channels.info", channel_id=10**12) == (
            "channel_not_found"
        )


async def test_channels_members_pages_by_cursor(node: RunningNode) -> None:
    expected = sorted(i for h, i in node.users.items() if h != "mallory")
    async with node.clients("mallory", "mia") as (mallory, mia):
        seen: list[int] = []
        cursor = 0
        while True:
            page = await mallory.request(
                "channels.members", channel_id=node.general, cursor=cursor, limit=2
            )
            assert len(page["user_ids"]) <= 2
            seen += page["user_ids"]
            if page["next_cursor"] is None:
                break
            assert page["next_cursor"] == page["user_ids"][-1]
            cursor = page["next_cursor"]
        assert seen == expected

        private = await mia.request("channels.members", channel_id=node.private)
        assert private == {
            "user_ids": sorted([node.users["olivia"], node.users["mia"]]),
            "next_cursor": None,
        }
        assert await error_code(mallory, "channels.members", channel_id=node.private) == (
            "channel_not_found"
        )


# --------------------------------------------------------------------------- DMs


async def test_dm_is_one_channel_from_either_side(node: RunningNode) -> None:
    olivia_id, mia_id = node.users["olivia"], node.users["mia"]
    async with node.clients("olivia", "mia", "max") as (olivia, mia, max_):
        dm = (await olivia.request("dms.open", user_ids=[mia_id]))["channel"]
        assert dm["kind"] == "dm"
        assert dm["member_count"] == 2
        for client in (olivia, mia):
            one(await settle(client), "channel.created", channel=dm)
        assert await settle(max_) == []

        again = (await olivia.request("dms.open", user_ids=[mia_id]))["channel"]
        other_side = (await mia.request("dms.open", user_ids=[olivia_id]))["channel"]
        with_self = (await mia.request("dms.open", user_ids=[olivia_id, mia_id]))["channel"]
        assert again["id"] == other_side["id"] == with_self["id"] == dm["id"]
        assert of_type(await settle(olivia), "channel.created") == []

        message = await post(mia, dm["id"], "just between us @max")
        one(await settle(olivia), "message.posted", message=message)
        assert await settle(max_) == []
        assert await error_code(max_, "messages.history", channel_id=dm["id"]) == (
            "channel_not_found"
        )
        assert [m["id"] for m in await history(olivia, dm["id"])] == [message["id"]]

        # A DM with oneself is a channel of one.
        solo = (await max_.request("dms.open", user_ids=[node.users["max"]]))["channel"]
        assert (solo["kind"], solo["member_count"]) == ("dm", 1)
        assert await error_code(olivia, "dms.open", user_ids=[10**12]) == "user_not_found"


async def test_dm_cannot_be_renamed_left_joined_or_invited_to(node: RunningNode) -> None:
    async with node.clients("olivia", "mia") as (olivia, mia):
        dm = (await olivia.request("dms.open", user_ids=[node.users["mia"]]))["channel"]
        cid = dm["id"]
        assert await error_code(olivia, "channels.update", channel_id=cid, name="ours") == (
            "not_allowed_for_dm"
        )
        assert await error_code(mia, "channels.leave", channel_id=cid) == "not_allowed_for_dm"
        assert await error_code(mia, "channels.join", channel_id=cid) == "not_allowed_for_dm"
        assert await error_code(olivia, "channels.archive", channel_id=cid) == (
            "not_allowed_for_dm"
        )
        max_id = node.users["max"]
        code = await error_code(olivia, "channels.invite", channel_id=cid, user_ids=[max_id])
        assert code == "not_allowed_for_dm"
        assert (
            await error_code(olivia, "channels.remove", channel_id=cid, user_id=node.users["mia"])
            == "not_allowed_for_dm"
        )
        members = await mia.request("channels.members", channel_id=cid)
        assert len(members["user_ids"]) == 2


async def test_group_dm_holds_at_most_eight_people(node: RunningNode) -> None:
    extra = await add_users(node, "xena", "yuri", "zoe")
    others = [node.users[h] for h in ("adam", "mia", "max", "gus", "mallory", "xena", "yuri")]
    async with node.clients("olivia", "mia", "zoe") as (olivia, mia, zoe):
        group = (await olivia.request("dms.open", user_ids=others))["channel"]
        assert (group["kind"], group["member_count"]) == ("group_dm", 8)
        one(await settle(mia), "channel.created", channel=group)
        assert await settle(zoe) == []

        from_mia = [node.users["olivia"], *(u for u in reversed(others) if u != node.users["mia"])]
        same = (await mia.request("dms.open", user_ids=from_mia))["channel"]
        assert same["id"] == group["id"]

        message = await post(mia, group["id"], "hello group")
        one(await settle(olivia), "message.posted", message=message)
        assert await settle(zoe) == []
        assert await error_code(zoe, "messages.history", channel_id=group["id"]) == (
            "channel_not_found"
        )

        # Eight others would make nine people: the request model refuses it.
        assert await error_code(olivia, "dms.open", user_ids=[*others, extra["zoe"]]) == (
            "invalid_frame"
        )
        assert await error_code(olivia, "dms.open", user_ids=[]) == "invalid_frame"


# --------------------------------------------------------------------------- messages


async def test_post_length_limit_is_4000_characters(node: RunningNode) -> None:
    async with node.clients("olivia", "mia") as (olivia, mia):
        longest = await post(olivia, node.general, "x" * 4000)
        assert len(longest["text"]) == 4000
        one(await settle(mia), "message.posted", message=longest)
        assert await post_error(olivia, node.general, "y" * 4001) == "msg_too_long"
        assert await post_error(olivia, node.general, "   ") == "invalid_argument"
        assert await post_error(olivia, node.general, "") == "invalid_frame"
        assert await settle(mia) == []
        assert [m["id"] for m in await history(mia, node.general)] == [longest["id"]]


async def test_post_needs_membership(node: RunningNode) -> None:
    async with node.clients("mallory", "mia") as (mallory, mia):
        assert await post_error(mallory, node.general, "hi") == "not_in_channel"
        assert await post_error(mallory, node.private, "hi") == "channel_not_found"
        assert await settle(mia) == []


async def test_post_retry_with_same_client_msg_id_is_idempotent(node: RunningNode) -> None:
    async with node.clients("olivia", "mia") as (olivia, mia):
        fields = {"channel_id": node.general, "client_msg_id": "retry-1", "text": "once"}
        first = await olivia.request("messages.post", **fields)
        retry = await olivia.request("messages.post", **fields)
        assert first["duplicate"] is False
        assert retry["duplicate"] is True
        assert retry["message"] == first["message"]

        events = of_type(await settle(mia), "message.posted")
        assert [e["message"]["id"] for e in events] == [first["message"]["id"]]
        page = await history(mia, node.general)
        assert [m["client_msg_id"] for m in page] == ["retry-1"]

        # The same client_msg_id from another user is another message.
        other = await mia.request("messages.post", **fields)
        assert other["duplicate"] is False
        assert other["message"]["id"] != first["message"]["id"]


async def test_concurrent_duplicate_posts_create_one_message(node: RunningNode) -> None:
    async with node.clients("olivia", "mia") as (olivia, mia):
        fields = {"channel_id": node.general, "client_msg_id": "race-1", "text": "at once"}
        replies = await asyncio.gather(
            *(olivia.request("messages.post", **fields) for _ in range(2))
        )
        assert replies[0]["message"]["id"] == replies[1]["message"]["id"]
        assert sorted(r["duplicate"] for r in replies) == [False, True]

        events = of_type(await settle(mia), "message.posted")
        assert len(events) == 1
        page = await history(mia, node.general)
        assert [m["id"] for m in page] == [replies[0]["message"]["id"]]


async def test_edit_by_author_is_broadcast_with_edited_ts(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "mallory") as (olivia, mia, mallory):
        message = await post(olivia, node.general, "frist")
        assert message["edited_ts"] is None
        await settle_all(mia, mallory)

        assert await error_code(mia, "messages.edit", message_id=message["id"], text="mine") == (
            "forbidden"
        )
        reply = await olivia.request("messages.edit", message_id=message["id"], text="first")
        edited = reply["message"]
        assert edited["text"] == "first"
        assert edited["edited_ts"] is not None and edited["edited_ts"] >= message["ts"]
        assert (edited["id"], edited["seq"], edited["ts"]) == (
            message["id"],
            message["seq"],
            message["ts"],
        )
        event = one(await settle(mia), "message.edited")
        assert event["message"] == edited
        assert await settle(mallory) == []
        assert (await history(mia, node.general))[0]["text"] == "first"

        assert (
            await error_code(olivia, "messages.edit", message_id=message["id"], text="z" * 4001)
            == "msg_too_long"
        )
        assert await error_code(olivia, "messages.edit", message_id=10**12, text="x") == (
            "message_not_found"
        )


async def test_delete_by_author_or_admin_leaves_tombstone(node: RunningNode) -> None:
    async with node.clients("mia", "max", "adam", "olivia") as (mia, max_, adam, olivia):
        mine = await post(mia, node.general, "oops")
        maxs = await post(max_, node.general, "spam")
        await settle_all(mia, max_, adam, olivia)

        assert await error_code(max_, "messages.delete", message_id=mine["id"]) == "forbidden"
        deleted = (await mia.request("messages.delete", message_id=mine["id"]))["message"]
        assert (deleted["deleted"], deleted["text"]) == (True, "")
        for client in (olivia, max_, adam, mia):
            event = one(await settle(client), "message.deleted")
            assert (event["message_id"], event["channel_id"], event["thread_root_id"]) == (
                mine["id"],
                node.general,
                None,
            )

        by_admin = (await adam.request("messages.delete", message_id=maxs["id"]))["message"]
        assert by_admin["deleted"] is True
        for client in (olivia, max_):
            one(await settle(client), "message.deleted", message_id=maxs["id"])

        page = await history(olivia, node.general)
        assert [(m["id"], m["deleted"], m["text"]) for m in page] == [
            (mine["id"], True, ""),
            (maxs["id"], True, ""),
        ]
        # Deleted messages cannot be edited; deleting again is a quiet no-op.
        assert await error_code(mia, "messages.edit", message_id=mine["id"], text="x") == (
            "message_not_found"
        )
        await mia.request("messages.delete", message_id=mine["id"])
        assert of_type(await settle(olivia), "message.deleted") == []


# --------------------------------------------------------------------------- threads


async def test_thread_replies_update_root_and_stay_out_of_history(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max") as (olivia, mia, max_):
        root = await post(olivia, node.general, "thread root")
        await settle_all(olivia, mia, max_)

        first = await post(mia, node.general, "reply one", thread_root_id=root["id"])
        assert first["thread_root_id"] == root["id"]
        for client in (olivia, max_):
            events = await settle(client)
            one(events, "message.posted", message=first)
            update = one(events, "thread.updated")
            assert (update["message_id"], update["channel_id"]) == (root["id"], node.general)
            assert (update["reply_count"], update["latest_reply_ts"]) == (1, first["ts"])

        second = await post(max_, node.general, "reply two", thread_root_id=root["id"])
        update = one(await settle(olivia), "thread.updated")
        assert (update["reply_count"], update["latest_reply_ts"]) == (2, second["ts"])

        replies = await olivia.request("messages.replies", message_id=root["id"])
        assert [m["id"] for m in replies["messages"]] == [first["id"], second["id"]]
        assert (replies["has_more_before"], replies["has_more_after"]) == (False, False)
        paged = await olivia.request("messages.replies", message_id=root["id"], limit=1)
        assert [m["id"] for m in paged["messages"]] == [first["id"]]
        assert paged["has_more_after"] is True
        rest = await olivia.request(
            "messages.replies", message_id=root["id"], after=first["seq"], limit=1
        )
        assert [m["id"] for m in rest["messages"]] == [second["id"]]
        assert (rest["has_more_before"], rest["has_more_after"]) == (True, False)

        top = await history(mia, node.general)
        assert [m["id"] for m in top] == [root["id"]]
        assert (top[0]["reply_count"], top[0]["latest_reply_ts"]) == (2, second["ts"])

        code = await post_error(mia, node.general, "nested", thread_root_id=first["id"])
        assert code == "invalid_argument"
        assert await error_code(mia, "messages.replies", message_id=first["id"]) == (
            "invalid_argument"
        )
        code = await post_error(mia, node.private, "elsewhere", thread_root_id=root["id"])
        assert code == "message_not_found"

        # Deleting a reply recounts the thread.
        await max_.request("messages.delete", message_id=second["id"])
        events = await settle(olivia)
        assert one(events, "message.deleted")["thread_root_id"] == root["id"]
        update = one(events, "thread.updated")
        assert (update["reply_count"], update["latest_reply_ts"]) == (1, first["ts"])
        replies = await olivia.request("messages.replies", message_id=root["id"])
        assert [(m["id"], m["deleted"]) for m in replies["messages"]] == [
            (first["id"], False),
            (second["id"], True),
        ]


# --------------------------------------------------------------------------- reactions


async def test_reactions_count_per_emoji_across_users(node: RunningNode) -> None:
    mia_id, max_id = node.users["mia"], node.users["max"]
    async with node.clients("olivia", "mia", "max", "mallory") as (olivia, mia, max_, mallory):
        message = await post(olivia, node.general, "react to me")
        mid = message["id"]
        await settle_all(olivia, mia, max_, mallory)

        await mia.request("reactions.add", message_id=mid, emoji="tada")
        event = one(await settle(olivia), "reaction.added")
        assert (event["message_id"], event["user_id"], event["emoji"], event["count"]) == (
            mid,
            mia_id,
            "tada",
            1,
        )
        reply = await max_.request("reactions.add", message_id=mid, emoji="tada")
        event = one(await settle(olivia), "reaction.added")
        assert (event["user_id"], event["count"]) == (max_id, 2)
        tada = reply["reactions"][0]
        assert (tada["emoji"], tada["count"], sorted(tada["user_ids"])) == (
            "tada",
            2,
            sorted([mia_id, max_id]),
        )

        # Adding the same reaction twice changes nothing and tells no one.
        again = await mia.request("reactions.add", message_id=mid, emoji="tada")
        assert again["reactions"] == reply["reactions"]
        assert of_type(await settle(olivia), "reaction.added") == []

        reply = await mia.request("reactions.add", message_id=mid, emoji="+1")
        counts = {r["emoji"]: (r["count"], sorted(r["user_ids"])) for r in reply["reactions"]}
        assert counts == {"tada": (2, sorted([mia_id, max_id])), "+1": (1, [mia_id])}

        reply = await mia.request("reactions.remove", message_id=mid, emoji="tada")
        for client in (olivia, max_):
            event = one(await settle(client), "reaction.removed")
            assert (event["user_id"], event["emoji"], event["count"]) == (mia_id, "tada", 1)
        counts = {r["emoji"]: (r["count"], r["user_ids"]) for r in reply["reactions"]}
        assert counts == {"tada": (1, [max_id]), "+1": (1, [mia_id])}

        # Removing a reaction one does not have is a quiet no-op.
        await mia.request("reactions.remove", message_id=mid, emoji="tada")
        assert of_type(await settle(olivia), "reaction.removed") == []

        page = await history(olivia, node.general)
        counts = {r["emoji"]: (r["count"], r["user_ids"]) for r in page[0]["reactions"]}
        assert counts == {"tada": (1, [max_id]), "+1": (1, [mia_id])}

        assert await settle(mallory) == []
        assert await error_code(mallory, "reactions.add", message_id=mid, emoji="tada") == (
            "not_in_channel"
        )
        assert await error_code(mia, "reactions.add", message_id=mid, emoji="Bad!") == (
            "invalid_frame"
        )


# --------------------------------------------------------------------------- mentions


async def test_user_mention_goes_only_to_mentioned_member(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max", "adam") as (olivia, mia, max_, adam):
        message = await post(olivia, node.general, "hey @mia, look")
        assert message["mentions"] == [node.users["mia"]]
        mention = one(await settle(mia), "mention")
        assert mention == {
            "type": "mention",
            "seq": mention["seq"],
            "workspace_id": node.workspace_id,
            "ts": message["ts"],
            "channel_id": node.general,
            "message_id": message["id"],
            "by_user_id": node.users["olivia"],
            "kind": "user",
        }
        for client in (olivia, max_, adam):
            assert of_type(await settle(client), "mention") == []


async def test_channel_mention_goes_to_all_other_members(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max", "mallory") as (olivia, mia, max_, mallory):
        message = await post(olivia, node.general, "@channel standup in 5")
        assert message["mention_channel"] is True
        for client in (mia, max_):
            mention = one(await settle(client), "mention")
            assert (mention["kind"], mention["message_id"]) == ("channel", message["id"])
        for client in (olivia, mallory):
            assert of_type(await settle(client), "mention") == []
    # Members who were offline are counted too.
    async with node.client("gus") as gus:
        counts = {c["channel_id"]: c for c in (await gus.request("reads.counts"))["channels"]}
        assert counts[node.general]["mentions"] == 1


async def test_here_mention_goes_only_to_active_members(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max") as (olivia, mia, max_):
        await max_.request("presence.set", status="away")
        message = await post(olivia, node.general, "anyone @here?")
        assert message["mention_here"] is True
        mention = one(await settle(mia), "mention")
        assert (mention["kind"], mention["message_id"]) == ("here", message["id"])
        assert of_type(await settle(max_), "mention") == []  # connected, but away
        assert of_type(await settle(olivia), "mention") == []
        mia_counts = {c["channel_id"]: c for c in (await mia.request("reads.counts"))["channels"]}
        assert mia_counts[node.general]["mentions"] == 1
    async with node.client("adam") as adam:  # was not connected
        counts = {c["channel_id"]: c for c in (await adam.request("reads.counts"))["channels"]}
        assert counts[node.general]["mentions"] == 0
        assert counts[node.general]["unread"] == 1


async def test_mention_never_reaches_non_members(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max", "mallory") as (olivia, mia, max_, mallory):
        secret = await post(olivia, node.private, "@max @mia @channel see this")
        one(await settle(mia), "message.posted", message=secret)
        assert await settle(max_) == []
        counts = {c["channel_id"] for c in (await max_.request("reads.counts"))["channels"]}
        assert node.private not in counts

        public = await post(olivia, node.general, "@mallory are you there?")
        assert public["mentions"] == [node.users["mallory"]]
        assert await settle(mallory) == []


# --------------------------------------------------------------------------- reads


async def test_read_marker_drives_unread_and_mention_counts(node: RunningNode) -> None:
    second_token = await node.admin.issue_token(node.users["olivia"])
    async with (
        node.clients("olivia", "mia") as (olivia, mia),
        connect_with(node, second_token) as olivia_phone,
    ):

        async def general_counts() -> dict[str, int]:
            reply = await olivia.request("reads.counts")
            counts = {c["channel_id"]: c for c in reply["channels"]}
            assert set(counts) == {node.general, node.private}
            return counts[node.general]

        assert await general_counts() == {
            "channel_id": node.general,
            "last_read_seq": 0,
            "unread": 0,
            "mentions": 0,
        }
        m1 = await post(mia, node.general, "one")
        m2 = await post(mia, node.general, "two for @olivia")
        await post(olivia, node.general, "my own does not count")
        await post(mia, node.general, "a reply", thread_root_id=m1["id"])
        m3 = await post(mia, node.general, "three")
        counts = await general_counts()
        assert (counts["unread"], counts["mentions"]) == (3, 1)

        await settle_all(olivia, olivia_phone, mia)
        marker = await olivia.request("reads.mark", channel_id=node.general, seq=m2["seq"])
        assert marker == {"channel_id": node.general, "last_read_seq": m2["seq"]}
        counts = await general_counts()
        assert (counts["last_read_seq"], counts["unread"], counts["mentions"]) == (m2["seq"], 1, 0)
        for client in (olivia_phone, olivia):
            event = one(await settle(client), "read_marker.updated")
            assert (event["channel_id"], event["last_read_seq"]) == (node.general, m2["seq"])
        assert await settle(mia) == []

        # Past the end is clamped to the channel's last position.
        marker = await olivia.request("reads.mark", channel_id=node.general, seq=10**9)
        assert marker["last_read_seq"] == m3["seq"]
        counts = await general_counts()
        assert (counts["unread"], counts["mentions"]) == (0, 0)
        one(await settle(olivia_phone), "read_marker.updated", last_read_seq=m3["seq"])

        # Moving the marker back makes messages unread again.
        await olivia.request("reads.mark", channel_id=node.general, seq=0)
        counts = await general_counts()
        assert (counts["unread"], counts["mentions"]) == (3, 1)
        async with node.client("max") as max_:
            assert await error_code(max_, "reads.mark", channel_id=node.private, seq=0) == (
                "channel_not_found"
            )


async def test_joining_does_not_make_old_history_unread(node: RunningNode) -> None:
    async with node.clients("olivia", "mallory") as (olivia, mallory):
        await post(olivia, node.general, "old news")
        await mallory.request("channels.join", channel_id=node.general)
        counts = {c["channel_id"]: c for c in (await mallory.request("reads.counts"))["channels"]}
        assert counts[node.general]["unread"] == 0
        await post(olivia, node.general, "new news")
        counts = {c["channel_id"]: c for c in (await mallory.request("reads.counts"))["channels"]}
        assert counts[node.general]["unread"] == 1


# --------------------------------------------------------------------------- typing


async def test_typing_is_relayed_to_other_members_once_per_interval(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max", "mallory") as (olivia, mia, max_, mallory):
        assert await olivia.request("typing", channel_id=node.general) == {}
        for client in (mia, max_):
            event = one(await settle(client), "typing")
            assert event == {
                "type": "typing",
                "seq": None,
                "workspace_id": node.workspace_id,
                "ts": event["ts"],
                "channel_id": node.general,
                "user_id": node.users["olivia"],
                "thread_root_id": None,
            }
        assert await settle(olivia) == []
        assert await settle(mallory) == []

        # Within the interval: acknowledged, not relayed.
        assert await olivia.request("typing", channel_id=node.general) == {}
        assert await settle(mia) == []

        # Another user, another channel: relayed.
        await mia.request("typing", channel_id=node.private)
        event = one(await settle(olivia), "typing")
        assert (event["channel_id"], event["user_id"]) == (node.private, node.users["mia"])
        assert await settle(max_) == []

        assert await error_code(mallory, "typing", channel_id=node.general) == "not_in_channel"
        assert await error_code(max_, "typing", channel_id=node.private) == "channel_not_found"


# --------------------------------------------------------------------------- presence


async def test_presence_subscriber_sees_connect_away_and_disconnect(node: RunningNode) -> None:
    mia_id = node.users["mia"]
    async with node.clients("olivia", "max") as (olivia, max_):
        assert await olivia.request("presence.subscribe", user_ids=[mia_id]) == {"active": []}

        async def presence() -> Event:
            event = await olivia.next_event("presence", timeout=WAIT)
            assert (event["seq"], event["user_id"], event["workspace_id"]) == (
                None,
                mia_id,
                node.workspace_id,
            )
            return event

        async with node.client("mia") as mia:
            assert (await presence())["status"] == "active"
            # The reply says who is active now (olivia is; max is not watched).
            watched = [mia_id, node.users["olivia"], 10**9]
            snapshot = await olivia.request("presence.subscribe", user_ids=watched)
            assert snapshot == {"active": sorted([mia_id, node.users["olivia"]])}
            await olivia.request("presence.subscribe", user_ids=[mia_id])
            await mia.request("presence.set", status="away")
            assert (await presence())["status"] == "away"
            await mia.request("presence.set", status="auto")
            assert (await presence())["status"] == "active"
            # A second connection changes nothing.
            async with connect_with(node, await node.admin.issue_token(mia_id)):
                pass
        assert (await presence())["status"] == "away"
        assert of_type(await settle(olivia), "presence") == []
        assert await settle(max_) == []  # not subscribed

        # Subscribing replaces the set: olivia now watches max only.
        await olivia.request("presence.subscribe", user_ids=[node.users["max"]])
        async with node.client("mia"):
            pass
        await max_.request("presence.set", status="away")
        event = await olivia.next_event("presence", timeout=WAIT)
        assert (event["user_id"], event["status"]) == (node.users["max"], "away")
        assert of_type(await settle(olivia), "presence") == []


# --------------------------------------------------------------------------- numbering


async def test_event_seq_is_increasing_and_shared_between_members(node: RunningNode) -> None:
    async with node.clients("olivia", "mia", "max", "mallory") as clients:
        olivia, mia, max_, mallory = clients
        root = await post(olivia, node.general, "numbered @mia")
        await mia.request("reactions.add", message_id=root["id"], emoji="eyes")
        await post(max_, node.general, "a reply", thread_root_id=root["id"])
        await olivia.request("messages.edit", message_id=root["id"], text="numbered, edited")
        await mia.request("channels.update", channel_id=node.general, topic="numbers")
        await olivia.request("typing", channel_id=node.general)
        dm = (await olivia.request("dms.open", user_ids=[node.users["mia"]]))["channel"]
        await post(mia, dm["id"], "private word")
        await post(olivia, node.private, "secret word")
        await mia.request("reads.mark", channel_id=node.general, seq=root["seq"])
        await max_.request("users.update_profile", display_name="Max!")
        await mallory.request("channels.join", channel_id=node.general)
        await post(mia, node.general, "the end")

        received = await settle_all(*clients)
        by_seq: list[dict[int, Event]] = []
        for client, events in zip(clients, received, strict=True):
            durable = [e for e in events if e["seq"] is not None]
            ephemeral = [e for e in events if e["seq"] is None]
            assert {e["type"] for e in ephemeral} <= {"typing", "presence"}
            seqs = [e["seq"] for e in durable]
            assert seqs == sorted(set(seqs)), f"not strictly increasing: {seqs}"
            assert seqs and seqs[0] > client.session["seq"]
            by_seq.append({e["seq"]: e for e in durable})

        olivia_seen, mia_seen, max_seen, mallory_seen = by_seq
        for a, b in [(olivia_seen, mia_seen), (olivia_seen, max_seen), (mia_seen, mallory_seen)]:
            for seq in a.keys() & b.keys():
                assert a[seq] == b[seq]

        def kinds(seen: dict[int, Event]) -> list[str]:
            return [seen[s]["type"] for s in sorted(seen)]

        general_kinds = [
            "message.posted",
            "reaction.added",
            "message.posted",
            "thread.updated",
            "message.edited",
            "channel.updated",
        ]
        for seen in (olivia_seen, mia_seen, max_seen):
            assert [k for k in kinds(seen) if k != "mention"][: len(general_kinds)] == (
                general_kinds
            )
        # Who saw what: the DM and the private channel only reach their members.
        shared = olivia_seen.keys() & mia_seen.keys()
        assert len(shared) >= 10
        assert "channel.created" in kinds(olivia_seen) and "channel.created" in kinds(mia_seen)
        assert "channel.created" not in kinds(max_seen)
        assert kinds(mia_seen).count("read_marker.updated") == 1
        assert "read_marker.updated" not in kinds(olivia_seen)
        assert kinds(mallory_seen) == [
            "channel.updated",
            "user.updated",
            "channel.member_joined",
            "message.posted",
        ]
