"""Getting in (issue 10): the first setup of an empty server, invites, and sign-up with one, on
both stores, through a chat node and through Flannel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chat.client import Client, RequestError
from chat.errors import CloseCode
from chat.server import Node
from tests.harness import RunningNode, running_node, settings_for
from tests.pg import unique_database_name
from tests.test_flannel_relay import flannel
from tests.test_flannel_relay import url as edge_url
from tests.timing import scaled

pytestmark = pytest.mark.asyncio(loop_scope="session")

PASSWORD = "correct horse battery"


@pytest_asyncio.fixture(loop_scope="session")
async def empty(
    store: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Node]:
    """A chat node over a database with no workspace at all."""
    if store == "postgres":
        pg = request.getfixturevalue("postgres_server")
        name = unique_database_name("setup")
        node = Node(settings_for(database_url=await pg.create_database(name)))
        await node.start()
        try:
            yield node
        finally:
            await node.stop()
            await pg.drop_database(name)
    else:
        path = tmp_path_factory.mktemp("setup") / "chat.sqlite3"
        node = Node(settings_for(sqlite_path=str(path)))
        await node.start()
        try:
            yield node
        finally:
            await node.stop()


def ws_url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.port}/"


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Client]:
    client = await Client.open(url)
    try:
        yield client
    finally:
        await client.close()


async def first_frame(url: str, type_: str, **fields: Any) -> dict[str, Any]:
    """Send one first frame on a new connection: its ``data``, or raise RequestError (and
    then the connection was closed 1008, as after a failed login)."""
    async with opened(url) as client:
        frame = await client.request_frame(type_, **fields)
        if frame["type"] == "error":
            async with asyncio.timeout(scaled(5)):
                await client.closed.wait()
            assert client.ws.close_code == CloseCode.POLICY_VIOLATION
            assert client.ws.close_reason == frame["code"]
            raise RequestError(frame["code"], frame["message"])
        data: dict[str, Any] = frame["data"]
        return data


def setup_fields(workspace: str = "acme", handle: str = "ada") -> dict[str, Any]:
    return {"workspace": workspace, "handle": handle, "password": PASSWORD, "display_name": "Ada"}


async def refused(code: str, url: str, type_: str, **fields: Any) -> str:
    with pytest.raises(RequestError) as info:
        await first_frame(url, type_, **fields)
    assert info.value.code == code, info.value
    return info.value.message


# --------------------------------------------------------------------------- setup


async def test_setup_once_then_refused(empty: Node) -> None:
    url = ws_url(empty)
    async with opened(url) as client:
        assert client.hello["setup_required"] is True
    info = await first_frame(url, "setup", **setup_fields())
    assert info["user"]["handle"] == "ada" and info["user"]["role"] == "owner"
    assert info["user"]["display_name"] == "Ada"
    assert info["workspace_name"] == "acme" and info["token"]

    async with Client.connect(url, info["token"]) as ada:
        assert ada.hello["setup_required"] is False
        boot = await ada.request("bootstrap")
        assert [c["name"] for c in boot["channels"]] == ["general"]
        # The owner can post at once, and sign in again with the password.
        general = boot["channels"][0]["id"]
        await ada.post(general, "first!")
    again = await first_frame(url, "login", workspace="acme", handle="ada", password=PASSWORD)
    assert again["user"]["id"] == info["user"]["id"]

    message = await refused("forbidden", url, "setup", **setup_fields("other", "eve"))
    assert "sign in" in message


async def test_concurrent_setups_one_wins(empty: Node) -> None:
    url = ws_url(empty)
    results = await asyncio.gather(
        *(first_frame(url, "setup", **setup_fields(f"ws{i}", f"owner{i}")) for i in range(4)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, RequestError)]
    assert len(won) == 1, results
    assert len(lost) == 3 and {e.code for e in lost} == {"forbidden"}, results
    # Exactly one workspace exists: the winner's.
    name = won[0]["workspace_name"]
    handle = won[0]["user"]["handle"]
    await first_frame(url, "login", workspace=name, handle=handle, password=PASSWORD)
    for i in range(4):
        if f"ws{i}" != name:
            await refused(
                "invalid_auth",
                url,
                "login",
                workspace=f"ws{i}",
                handle=f"owner{i}",
                password=PASSWORD,
            )


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"handle": "Ada"}, "handle"),
        ({"handle": "a d"}, "handle"),
        ({"handle": ".ada"}, "handle"),
        ({"password": "short"}, "password"),
        ({"display_name": "   "}, "display name"),
        ({"workspace": "  acme"}, "workspace"),
    ],
)
async def test_setup_bad_values_are_invalid_argument(
    empty: Node, fields: dict[str, Any], word: str
) -> None:
    message = await refused(
        "invalid_argument", ws_url(empty), "setup", **{**setup_fields(), **fields}
    )
    assert word in message
    async with opened(ws_url(empty)) as client:
        assert client.hello["setup_required"] is True  # nothing was created


async def test_setup_on_a_server_with_a_workspace(node: RunningNode) -> None:
    async with opened(node.url) as client:
        assert client.hello["setup_required"] is False
    await refused("forbidden", node.url, "setup", **setup_fields("other", "eve"))


# --------------------------------------------------------------------------- invites


# Who may create, list and revoke invites: tests/test_authorization.py's table.


@pytest.mark.parametrize("who", ["olivia", "adam"])
async def test_invites_create_list_revoke(node: RunningNode, who: str) -> None:
    async with node.client(who) as client, node.client("olivia") as owner:
        theirs = (await owner.request("invites.create"))["invite"]
        created = (await client.request("invites.create", role="guest", max_uses=3))["invite"]
        assert len(created["code"]) >= 32 and created["prefix"] == created["code"][:6]
        assert created["role"] == "guest" and created["max_uses"] == 3 and created["uses"] == 0
        assert created["created_by"] == node.users[who]
        listed = (await client.request("invites.list"))["invites"]
        ids = [i["id"] for i in listed]
        assert created["id"] in ids and theirs["id"] in ids
        assert all(i["code"] is None for i in listed)  # shown once, at creation
        assert await client.request("invites.revoke", invite_id=created["id"]) == {}
        listed = (await client.request("invites.list"))["invites"]
        assert created["id"] not in [i["id"] for i in listed]
        with pytest.raises(RequestError) as info:
            await client.request("invites.revoke", invite_id=10**9)
        assert info.value.code == "not_found"


async def test_invite_defaults(node: RunningNode) -> None:
    async with node.client("adam") as adam:
        invite = (await adam.request("invites.create"))["invite"]
    assert invite["role"] == "member" and invite["max_uses"] == 1
    week_ms = 7 * 24 * 3600 * 1000
    assert invite["expires_at"] - invite["created_at"] == week_ms


# --------------------------------------------------------------------------- signup


async def create_invite(node: RunningNode, **fields: Any) -> dict[str, Any]:
    async with node.client("olivia") as owner:
        invite: dict[str, Any] = (await owner.request("invites.create", **fields))["invite"]
    return invite


def signup_fields(code: str, handle: str = "bob") -> dict[str, Any]:
    return {"invite": code, "handle": handle, "password": PASSWORD, "display_name": "Bob"}


async def test_signup_joins_general_and_others_see_it(node: RunningNode) -> None:
    invite = await create_invite(node, role="guest")
    async with node.client("max") as max_:
        info = await first_frame(node.url, "signup", **signup_fields(invite["code"]))
        user = info["user"]
        assert (user["handle"], user["display_name"], user["role"]) == ("bob", "Bob", "guest")
        assert user["workspace_id"] == node.workspace_id and info["token"]
        created = await max_.next_event("user.created", timeout=scaled(5))
        assert created["user"]["id"] == user["id"]
        joined = await max_.next_event("channel.member_joined", timeout=scaled(5))
        assert (joined["channel_id"], joined["user_id"]) == (node.general, user["id"])
    async with Client.connect(node.url, info["token"]) as bob:
        boot = await bob.request("bootstrap")
        assert [c["id"] for c in boot["channels"]] == [node.general]
    relog = await first_frame(node.url, "login", workspace="acme", handle="bob", password=PASSWORD)
    assert relog["user"]["id"] == user["id"]


async def test_signup_refusals(node: RunningNode) -> None:
    url = node.url
    # Unknown, used up, revoked, expired: one code, one message.
    messages = {await refused("invalid_invite", url, "signup", **signup_fields("no-such-code"))}
    once = await create_invite(node)
    await first_frame(url, "signup", **signup_fields(once["code"], "first"))
    messages.add(
        await refused("invalid_invite", url, "signup", **signup_fields(once["code"], "second"))
    )
    revoked = await create_invite(node)
    async with node.client("olivia") as owner:
        await owner.request("invites.revoke", invite_id=revoked["id"])
    messages.add(await refused("invalid_invite", url, "signup", **signup_fields(revoked["code"])))
    expired = await create_invite(node)
    async with node.admin.db.transaction() as conn:
        await conn.execute("UPDATE invites SET expires_at = $2 WHERE id = $1", expired["id"], 1_000)
    messages.add(await refused("invalid_invite", url, "signup", **signup_fields(expired["code"])))
    assert len(messages) == 1

    # A taken handle does not use the invite up; a bad value is invalid_argument.
    twice = await create_invite(node, max_uses=2)
    await refused("name_taken", url, "signup", **signup_fields(twice["code"], "mia"))
    await refused(
        "invalid_argument", url, "signup", **{**signup_fields(twice["code"]), "password": "1234567"}
    )
    await refused("invalid_argument", url, "signup", **signup_fields(twice["code"], "Bob!"))
    await first_frame(url, "signup", **signup_fields(twice["code"], "carol"))
    await first_frame(url, "signup", **signup_fields(twice["code"], "dave"))
    await refused("invalid_invite", url, "signup", **signup_fields(twice["code"], "erin"))


async def test_an_invite_lapses_with_its_creators_right_to_invite(node: RunningNode) -> None:
    """An invite speaks for its creator: demoted or deactivated, their invites stop working
    (and leave the list), as if revoked."""
    url = node.url
    async with node.client("adam") as adam:
        demoted = (await adam.request("invites.create"))["invite"]
    async with node.client("olivia") as owner:
        await owner.request("users.set_role", user_id=node.users["adam"], role="member")
        listed = (await owner.request("invites.list"))["invites"]
        assert demoted["id"] not in [i["id"] for i in listed]
        await refused("invalid_invite", url, "signup", **signup_fields(demoted["code"], "zed"))
        await owner.request("users.set_role", user_id=node.users["adam"], role="admin")
        async with node.client("adam") as adam:
            gone = (await adam.request("invites.create"))["invite"]
        await owner.request("users.deactivate", user_id=node.users["adam"])
        await refused("invalid_invite", url, "signup", **signup_fields(gone["code"], "zed"))
        kept = (await owner.request("invites.create"))["invite"]
    await first_frame(url, "signup", **signup_fields(kept["code"], "zed"))


async def test_concurrent_signups_never_exceed_max_uses(node: RunningNode) -> None:
    invite = await create_invite(node, max_uses=2)
    results = await asyncio.gather(
        *(
            first_frame(node.url, "signup", **signup_fields(invite["code"], f"u{i}"))
            for i in range(5)
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, dict)]
    assert len(won) == 2, results
    assert {r.code for r in results if isinstance(r, RequestError)} == {"invalid_invite"}


async def test_signup_is_limited_like_login(tmp_path: Path) -> None:
    """Failed sign-ups count against the address's login attempts: invite codes cannot be
    tried fast (and each costs no hashing while unknown)."""
    async with running_node(sqlite_path=str(tmp_path / "l.db"), login_attempts_per_ip=3) as node:
        for i in range(3):
            await refused("invalid_invite", node.url, "signup", **signup_fields(f"guess-{i}"))
        async with opened(node.url) as client:
            frame = await client.request_frame("signup", **signup_fields("guess-3"))
            assert frame["code"] == "rate_limited" and frame["retry_after_ms"] > 0
            async with asyncio.timeout(scaled(5)):
                await client.closed.wait()
            assert client.ws.close_code == CloseCode.TRY_AGAIN_LATER


async def test_wrong_password_keeps_invalid_auth(node: RunningNode) -> None:
    await refused("invalid_auth", node.url, "login", workspace="acme", handle="mia", password="x")


async def test_signup_and_setup_after_auth_are_refused(node: RunningNode) -> None:
    invite = await create_invite(node)
    async with node.client("max") as max_:
        for type_, fields in [
            ("signup", signup_fields(invite["code"])),
            ("setup", setup_fields()),
        ]:
            with pytest.raises(RequestError) as info:
                await max_.request(type_, **fields)
            assert info.value.code == "already_authenticated"
        assert "server_time" in await max_.request("ping")


# --------------------------------------------------------------------------- through Flannel


async def test_signup_through_flannel(node: RunningNode) -> None:
    invite = await create_invite(node)
    async with flannel(node) as edge, node.client("max") as max_:
        async with opened(edge_url(edge)) as client:
            assert client.hello["setup_required"] is False
        info = await first_frame(edge_url(edge), "signup", **signup_fields(invite["code"]))
        assert info["user"]["handle"] == "bob" and info["token"]
        created = await max_.next_event("user.created", timeout=scaled(5))
        assert created["user"]["id"] == info["user"]["id"]
        async with Client.connect(edge_url(edge), info["token"]) as bob:
            await bob.post(node.general, "hello from bob, through flannel")
        await refused(
            "invalid_invite", edge_url(edge), "signup", **signup_fields(invite["code"], "carl")
        )
