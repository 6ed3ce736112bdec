"""``bootstrap`` and the autocompletes on a chat node (chat/handlers/cached.py), against a real
node on both stores, and Flannel's lazy look-ups (flannel/answers.py) from the node's cache
compared with what the node itself answers.

The seeded workspace (tests/harness.py): olivia owner, adam admin, mia and max members, gus
guest, mallory a member in no channel; ``general`` public (all but mallory), ``secret``
private (olivia, mia).

A change is checked "in the next answer" after the asking client saw its event: the node
feeds the cache and the hub from the same bus delivery, so the event on the socket means the
cache has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import pytest

from chat import wire
from chat.client import Client, RequestError
from chat.errors import ChatError
from chat.journal import now_ms
from chat.storage import queries
from flannel import answers
from flannel.cache import WorkspaceCache
from tests.harness import RunningNode
from tests.timing import scaled

pytestmark = pytest.mark.asyncio(loop_scope="session")

_ids = (f"m{i}" for i in itertools.count())


async def ask(client: Client, type_: str, **fields: Any) -> dict[str, Any]:
    return await client.request(type_, timeout=scaled(10), **fields)


async def refused(client: Client, type_: str, **fields: Any) -> str:
    with pytest.raises(RequestError) as err:
        await ask(client, type_, **fields)
    return err.value.code


async def handles(client: Client, query: str, **fields: Any) -> list[str]:
    data = await ask(client, "users.autocomplete", query=query, **fields)
    return [u["handle"] for u in data["users"]]


async def channel_names(client: Client, query: str) -> list[str]:
    data = await ask(client, "channels.autocomplete", query=query)
    return [c["name"] for c in data["channels"]]


async def bootstrap(client: Client, **fields: Any) -> wire.BootstrapData:
    return wire.BootstrapData.model_validate(await ask(client, "bootstrap", **fields))


async def cache_of(node: RunningNode) -> WorkspaceCache:
    return await node.node.services.caches.get(node.workspace_id)


# --------------------------------------------------------------------------- bootstrap


async def test_bootstrap_content(node: RunningNode) -> None:
    async with node.clients("mia", "max", "gus") as (mia, max_, gus):
        dm = (await ask(mia, "dms.open", user_ids=[node.users["max"]]))["channel"]
        group = (await ask(mia, "dms.open", user_ids=[node.users["max"], node.users["gus"]]))[
            "channel"
        ]
        post = await ask(
            mia,
            "messages.post",
            channel_id=node.general,
            client_msg_id=next(_ids),
            text="hello @max",
        )
        await max_.next_event("mention", timeout=scaled(5))
        await gus.next_event("message.posted", timeout=scaled(5))

        data = await bootstrap(max_)
        assert data.user is not None and data.user.handle == "max"
        assert data.workspace == wire.WorkspaceInfo(id=node.workspace_id, name="acme")
        assert data.seq >= post["message"]["seq"]
        rows = {c.id: c for c in data.channels or []}
        assert sorted(rows) == sorted([node.general, dm["id"], group["id"]])
        general = rows[node.general]
        assert (general.kind, general.name, general.member_count) == ("public", "general", 5)
        assert (general.last_seq, general.last_ts) == (
            post["message"]["seq"],
            post["message"]["ts"],
        )
        counts = {c["channel_id"]: c for c in (await ask(max_, "reads.counts"))["channels"]}
        assert (general.unread, general.mentions) == (1, 1)
        assert general.last_read_seq == counts[node.general]["last_read_seq"]
        assert rows[dm["id"]].dm_user_ids == [node.users["mia"]]
        assert rows[group["id"]].dm_user_ids == sorted([node.users["mia"], node.users["gus"]])
        assert rows[dm["id"]].last_ts is None  # no message yet
        assert [u.handle for u in data.users or []] == ["mia", "gus"]  # partners, by id

        data = await bootstrap(mia)
        rows = {c.id: c for c in data.channels or []}
        assert sorted(rows) == sorted([node.general, node.private, dm["id"], group["id"]])
        assert rows[node.private].kind == "private" and rows[node.private].member_count == 2
        assert (rows[node.general].unread, rows[node.general].mentions) == (0, 0)  # her own

        data = await bootstrap(gus)
        assert sorted(c.id for c in data.channels or []) == sorted([node.general, group["id"]])
        assert [u.handle for u in data.users or []] == ["mia", "max"]
    async with node.client("mallory") as mallory:
        data = await bootstrap(mallory)
        assert data.channels == [] and data.users == []


async def test_bootstrap_parts(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        full = await bootstrap(mia)
        assert full.user and full.workspace and full.channels is not None and full.users == []
        for parts in (["user"], ["workspace"], ["channels"], ["users"], ["channels", "users"]):
            some = await bootstrap(mia, parts=parts)
            for part in ("user", "workspace", "channels", "users"):
                expected = getattr(full, part) if part in parts else None
                assert getattr(some, part) == expected, (parts, part)
        assert await refused(mia, "bootstrap", parts=[]) == "invalid_frame"
        assert await refused(mia, "bootstrap", parts=["everyone"]) == "invalid_frame"


async def test_concurrent_first_requests_share_one_load(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[int] = []
    read = queries.workspace_model

    async def counted(conn: Any, workspace_id: int) -> Any:
        loads.append(workspace_id)
        return await read(conn, workspace_id)

    monkeypatch.setattr(queries, "workspace_model", counted)
    async with node.clients("mia", "max", "gus", "olivia") as clients:
        replies = await asyncio.gather(
            *(bootstrap(c) for c in clients for _ in range(5)),
            *(handles(c, "m") for c in clients),
        )
        assert loads == [node.workspace_id]
        assert all(isinstance(r, wire.BootstrapData) for r in replies[:20])
        assert node.workspace_id in node.node.services.caches
    # The last peer of the workspace left: the cache is dropped.
    async with asyncio.timeout(scaled(5)):
        # The node detaches a peer after its socket closed: nothing to wait on but time.
        while node.workspace_id in node.node.services.caches:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    async with node.client("max") as max_:
        await bootstrap(max_)
    assert loads == [node.workspace_id] * 2


# --------------------------------------------------------------------------- autocomplete


async def test_autocomplete_results_and_ranking(node: RunningNode) -> None:
    async with node.clients("olivia", "gus", "mia", "max") as (olivia, gus, mia, max_):
        assert await handles(olivia, "m") == ["mallory", "max", "mia"]  # by handle
        assert await handles(olivia, "MA") == ["mallory", "max"]
        # Members of the current channel first: mallory is not in general, mia is in secret.
        assert await handles(olivia, "ma", channel_id=node.general) == ["max", "mallory"]
        assert await handles(olivia, "m", channel_id=node.private) == ["mia", "mallory", "max"]
        # An exact handle before the channel's members.
        assert (await handles(olivia, "max", channel_id=node.private))[0] == "max"
        assert await handles(olivia, "m", limit=2) == ["mallory", "max"]
        assert await handles(olivia, "nobody") == []
        # The people one talked to recently come after the channel, before everyone.
        await ask(gus, "dms.open", user_ids=[node.users["max"]])
        await ask(gus, "dms.open", user_ids=[node.users["mia"]])
        dm = (await ask(gus, "dms.open", user_ids=[node.users["max"]]))["channel"]
        await asyncio.sleep(0.01)  # the message is later than the last DM's creation
        await ask(gus, "messages.post", channel_id=dm["id"], client_msg_id=next(_ids), text="yo")
        await gus.next_event("message.posted", timeout=scaled(5))
        assert await handles(gus, "m") == ["max", "mia", "mallory"]
        # Channels: public ones and one's own private ones, never DMs.
        assert await channel_names(mia, "") == ["general", "secret"]
        assert await channel_names(max_, "") == ["general"]
        assert await channel_names(gus, "gen") == ["general"]
        assert await channel_names(mia, "dm") == []
        assert await channel_names(max_, "se") == []


async def test_accents_are_ignored(node: RunningNode) -> None:
    async with node.clients("mia", "olivia") as (mia, olivia):
        await ask(mia, "users.update_profile", real_name="Mía José Zoë")
        await olivia.next_event("user.updated", timeout=scaled(5))
        assert await handles(olivia, "jose") == ["mia"]
        assert await handles(olivia, "JOSÉ") == ["mia"]
        assert await handles(olivia, "zoe") == ["mia"]


# --------------------------------------------------------------------------- changes


async def test_changes_are_in_the_next_answer(node: RunningNode) -> None:
    async with node.clients("olivia", "mallory", "max") as (olivia, mallory, max_):
        assert await channel_names(max_, "town") == []
        await bootstrap(olivia)  # the cache is loaded before the changes
        # A rename.
        await ask(olivia, "channels.update", channel_id=node.general, name="town-square")
        await max_.next_event("channel.updated", timeout=scaled(5))
        assert await channel_names(max_, "town") == ["town-square"]
        assert await channel_names(max_, "squ") == ["town-square"]
        assert await channel_names(max_, "gen") == []
        rows = {c.id: c for c in (await bootstrap(max_)).channels or []}
        assert rows[node.general].name == "town-square"
        # A join.
        await ask(mallory, "channels.join", channel_id=node.general)
        await mallory.next_event("channel.member_joined", timeout=scaled(5))
        data = await bootstrap(mallory)
        assert [(c.id, c.member_count) for c in data.channels or []] == [(node.general, 6)]
        assert await handles(olivia, "ma", channel_id=node.general) == ["mallory", "max"]
        # A profile update.
        await ask(max_, "users.update_profile", display_name="Zed", real_name="Maxime Ünal")
        await olivia.next_event("user.updated", timeout=scaled(5))
        assert await handles(olivia, "zed") == ["max"]
        assert await handles(olivia, "unal") == ["max"]
        # A deactivation: never returned again.
        await ask(olivia, "users.deactivate", user_id=node.users["max"])
        await olivia.next_event("user.updated", timeout=scaled(5))
        assert await handles(olivia, "zed") == []
        assert await handles(olivia, "ma") == ["mallory"]
        # Archived channels come after live ones.
        await ask(olivia, "channels.create", name="town-hall")
        await ask(olivia, "channels.archive", channel_id=node.general)
        await olivia.next_event("channel.archived", timeout=scaled(5))
        assert await channel_names(olivia, "town") == ["town-hall", "town-square"]


async def test_a_private_channel_never_leaks(node: RunningNode) -> None:
    async with node.clients("olivia", "adam", "max", "gus") as (olivia, adam, max_, gus):
        created = await ask(olivia, "channels.create", name="hush-hush", private=True)
        hush = created["channel"]["id"]
        await ask(olivia, "messages.post", channel_id=hush, client_msg_id=next(_ids), text="x")
        await olivia.next_event("message.posted", timeout=scaled(5))
        for outsider in (adam, max_, gus):
            assert await channel_names(outsider, "hush") == []
            assert await channel_names(outsider, "secret") == []
            assert await channel_names(outsider, "") == ["general"]
            assert await refused(outsider, "users.autocomplete", query="o", channel_id=hush) == (
                "channel_not_found"
            )
            assert await refused(
                outsider, "users.autocomplete", query="o", channel_id=node.private
            ) == ("channel_not_found")
            ids = {c.id for c in (await bootstrap(outsider)).channels or []}
            assert hush not in ids and node.private not in ids
        assert await channel_names(olivia, "hush") == ["hush-hush"]
        assert await handles(olivia, "o", channel_id=hush) == ["olivia"]
        # Invited, then removed: visible only in between.
        await ask(olivia, "channels.invite", channel_id=hush, user_ids=[node.users["max"]])
        await max_.next_event("channel.member_joined", timeout=scaled(5))
        assert await channel_names(max_, "hush") == ["hush-hush"]
        await ask(olivia, "channels.remove", channel_id=hush, user_id=node.users["max"])
        await max_.next_event("channel.member_left", timeout=scaled(5))
        assert await channel_names(max_, "hush") == []
        assert await refused(max_, "users.autocomplete", query="o", channel_id=hush) == (
            "channel_not_found"
        )


async def test_a_revoked_or_expired_session_gets_nothing(node: RunningNode) -> None:
    for how, expected in (("revoked", "token_revoked"), ("expired", "token_expired")):
        node.tokens["mia"] = await node.admin.issue_token(node.users["mia"])  # a new session
        async with node.client("mia") as mia:
            await bootstrap(mia)
            async with node.admin.db.transaction() as conn:
                sid = mia.session["session_id"]
                if how == "revoked":
                    await queries.revoke_session(conn, sid, now_ms())
                else:
                    await conn.execute(
                        "UPDATE sessions SET expires_at = $2 WHERE id = $1", sid, now_ms() - 1
                    )
            for type_, fields in (
                ("bootstrap", {}),
                ("users.autocomplete", {"query": "m"}),
                ("channels.autocomplete", {"query": "g"}),
            ):
                if mia.closed.is_set():
                    break
                with contextlib.suppress(ConnectionError):
                    assert await refused(mia, type_, **fields) == expected


# --------------------------------------------------------------------------- Flannel's look-ups


async def _chat_answer(client: Client, type_: str, **fields: Any) -> Any:
    frame = await client.request_frame(type_, timeout=scaled(10), **fields)
    return frame["data"] if frame["type"] == "reply" else frame["code"]


def _cache_answer(call: Any, cache: WorkspaceCache, user_id: int, req: Any) -> Any:
    try:
        return call(cache, user_id, req).model_dump(mode="json")
    except ChatError as exc:
        return exc.code.value


async def test_lazy_lookups_from_the_cache_equal_the_nodes_answers(node: RunningNode) -> None:
    """users.info, channels.info and channels.members answered by flannel/answers.py from the
    node's cache, for every seeded user and channel (a DM and an archived channel too),
    compared with the node's own answers from its database."""
    async with node.clients("olivia", "mia") as (olivia, mia):
        dm = (await ask(mia, "dms.open", user_ids=[node.users["max"]]))["channel"]["id"]
        old = (await ask(olivia, "channels.create", name="old-news"))["channel"]["id"]
        await ask(olivia, "channels.archive", channel_id=old)
        await ask(olivia, "users.deactivate", user_id=node.users["mallory"])
        await mia.next_event("user.updated", timeout=scaled(5))
        cache = await cache_of(node)
        channels = [node.general, node.private, dm, old, 999_999]
        user_ids = sorted(node.users.values())
        for handle, uid in node.users.items():
            if handle == "mallory":
                continue  # deactivated: cannot connect; covered below
            async with node.client(handle) as c:
                req: Any = wire.UsersInfo(type="users.info", id="1", user_ids=[*user_ids, 999])
                chat = await _chat_answer(c, "users.info", user_ids=req.user_ids)
                assert _cache_answer(answers.users_info, cache, uid, req) == chat
                for cid in channels:
                    req = wire.ChannelsInfo(type="channels.info", id="2", channel_id=cid)
                    chat = await _chat_answer(c, "channels.info", channel_id=cid)
                    assert _cache_answer(answers.channels_info, cache, uid, req) == chat, (
                        handle,
                        cid,
                    )
                    for cursor, limit in ((0, 2), (user_ids[1], 2), (0, 100)):
                        req = wire.ChannelsMembers(
                            type="channels.members",
                            id="3",
                            channel_id=cid,
                            cursor=cursor,
                            limit=limit,
                        )
                        chat = await _chat_answer(
                            c, "channels.members", channel_id=cid, cursor=cursor, limit=limit
                        )
                        got = _cache_answer(answers.channels_members, cache, uid, req)
                        assert got == chat, (handle, cid, cursor)
        req = wire.ChannelsInfo(type="channels.info", id="4", channel_id=node.general)
        assert _cache_answer(answers.channels_info, cache, node.users["mallory"], req) == (
            "account_inactive"
        )
