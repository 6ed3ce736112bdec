"""messages.history pagination edges, against a real node on both stores.

Each case builds a fresh public channel holding ``n`` top-level messages and pages through it
with ``limit``: empty, one message, exactly one page, one more than a page, and many pages
with a partial last one. Pages are ascending by ``seq`` whichever direction they are taken in.

Posting is spread over four member connections: one connection may burst only
``requests_per_10s`` (50) requests before it is rate-limited, so 120 posts from a single
client would be refused (and eventually disconnected) instead of being fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from chat.client import Client, RequestError
from tests.harness import RunningNode
from tests.timing import scaled

WAIT = scaled(10.0)
CHUNK = 20
POSTERS = ("olivia", "adam", "mia", "max")

Message = dict[str, Any]

# (messages in the channel, page limit)
CASES = [
    pytest.param(0, 10, id="empty"),
    pytest.param(1, 10, id="one"),
    pytest.param(10, 10, id="exactly-limit"),
    pytest.param(11, 10, id="limit-plus-one"),
    pytest.param(120, 25, id="many-pages"),
]


@dataclass
class Filled:
    reader: Client
    channel_id: int
    messages: list[Message]  # ascending by seq

    @property
    def ids(self) -> list[int]:
        return [m["id"] for m in self.messages]

    async def page(self, **fields: Any) -> dict[str, Any]:
        return await self.reader.request(
            "messages.history", channel_id=self.channel_id, timeout=WAIT, **fields
        )


async def post_many(
    clients: list[Client], channel_id: int, n: int, prefix: str = "m"
) -> list[Message]:
    """``n`` top-level posts, round robin over ``clients``, pipelined ``CHUNK`` at a time.
    Returns the messages ascending by seq."""
    posted: list[Message] = []
    rotation = itertools.cycle(clients)
    for start in range(0, n, CHUNK):
        replies = await asyncio.gather(
            *(
                next(rotation).request(
                    "messages.post",
                    channel_id=channel_id,
                    client_msg_id=f"{prefix}-{i}",
                    text=f"{prefix} {i}",
                    timeout=WAIT,
                )
                for i in range(start, min(n, start + CHUNK))
            )
        )
        assert not any(r["duplicate"] for r in replies)
        posted += [r["message"] for r in replies]
    return sorted(posted, key=lambda m: m["seq"])


@contextlib.asynccontextmanager
async def filled_channel(node: RunningNode, n: int) -> AsyncIterator[Filled]:
    """A new public channel with the posters as members and ``n`` messages; the reader is a
    separate connection (its own rate budget)."""
    async with (
        node.clients(*POSTERS) as posters,
        node.client("olivia") as reader,
    ):
        created = await posters[0].request("channels.create", name=f"history-{n}")
        cid = created["channel"]["id"]
        others = [node.users[h] for h in POSTERS[1:]]
        await posters[0].request("channels.invite", channel_id=cid, user_ids=others)
        messages = await post_many(posters, cid, n)
        # Positions are consecutive from 1: nothing else was posted in the channel.
        assert [m["seq"] for m in messages] == list(range(1, n + 1))
        assert len({m["client_msg_id"] for m in messages}) == n
        yield Filled(reader, cid, messages)


def ids_of(page: dict[str, Any]) -> list[int]:
    return [m["id"] for m in page["messages"]]


def assert_ascending(page: dict[str, Any]) -> None:
    seqs = [m["seq"] for m in page["messages"]]
    assert seqs == sorted(set(seqs)), seqs


async def error_code(client: Client, type_: str, **fields: Any) -> str:
    with pytest.raises(RequestError) as info:
        await client.request(type_, timeout=WAIT, **fields)
    return info.value.code


# --------------------------------------------------------------------------- pagination


@pytest.mark.parametrize(("n", "limit"), CASES)
async def test_latest_page_without_position(node: RunningNode, n: int, limit: int) -> None:
    async with filled_channel(node, n) as ch:
        page = await ch.page(limit=limit)
        assert_ascending(page)
        assert ids_of(page) == ch.ids[-limit:]
        assert page["has_more_before"] is (n > limit)
        assert page["has_more_after"] is False
        if n:
            newest = page["messages"][-1]
            assert newest["text"] == ch.messages[-1]["text"]
            assert newest["deleted"] is False and newest["thread_root_id"] is None

        default = await ch.page()  # limit defaults to 50
        assert ids_of(default) == ch.ids[-50:]
        assert default["has_more_before"] is (n > 50)


@pytest.mark.parametrize(("n", "limit"), CASES)
async def test_walk_back_with_before_covers_every_message_once(
    node: RunningNode, n: int, limit: int
) -> None:
    async with filled_channel(node, n) as ch:
        page = await ch.page(limit=limit)
        walked = ids_of(page)
        pages = 1
        while page["has_more_before"]:
            oldest = page["messages"][0]["seq"]
            page = await ch.page(before=oldest, limit=limit)
            assert_ascending(page)
            assert page["messages"], "has_more_before promised more"
            assert page["messages"][-1]["seq"] < oldest
            assert page["has_more_after"] is True
            assert len(page["messages"]) == limit or not page["has_more_before"]
            walked = ids_of(page) + walked
            pages += 1
            assert pages <= n + 1
        assert page["has_more_before"] is False
        assert walked == ch.ids  # in order, no gaps
        assert len(set(walked)) == len(walked)  # no duplicates
        assert pages == max(1, -(-n // limit))


@pytest.mark.parametrize(("n", "limit"), CASES)
async def test_walk_forward_with_after_covers_every_message_once(
    node: RunningNode, n: int, limit: int
) -> None:
    async with filled_channel(node, n) as ch:
        page = await ch.page(after=0, limit=limit)
        assert page["has_more_before"] is False
        walked = ids_of(page)
        pages = 1
        while page["has_more_after"]:
            newest = page["messages"][-1]["seq"]
            page = await ch.page(after=newest, limit=limit)
            assert_ascending(page)
            assert page["messages"], "has_more_after promised more"
            assert page["messages"][0]["seq"] > newest
            assert page["has_more_before"] is True
            assert len(page["messages"]) == limit or not page["has_more_after"]
            walked += ids_of(page)
            pages += 1
            assert pages <= n + 1
        assert page["has_more_after"] is False
        assert walked == ch.ids
        assert len(set(walked)) == len(walked)
        assert pages == max(1, -(-n // limit))


@pytest.mark.parametrize(("n", "limit"), CASES)
async def test_around_a_message_returns_a_window_containing_it(
    node: RunningNode, n: int, limit: int
) -> None:
    async with filled_channel(node, n) as ch:
        if n == 0:
            page = await ch.page(around=1, limit=limit)
            assert page == {"messages": [], "has_more_before": False, "has_more_after": False}
            return
        for index in sorted({0, n // 2, n - 1}):
            target = ch.messages[index]
            page = await ch.page(around=target["seq"], limit=limit)
            assert_ascending(page)
            window = ids_of(page)
            assert target["id"] in window
            assert 0 < len(window) <= limit
            start = ch.ids.index(window[0])
            assert window == ch.ids[start : start + len(window)]  # contiguous
            end = start + len(window)
            assert page["has_more_before"] is (start > 0), (index, start)
            assert page["has_more_after"] is (end < n), (index, end)
            if limit // 2 <= index < n - limit // 2 and n >= limit:
                assert len(window) == limit  # room on both sides: a full page


@pytest.mark.parametrize(("n", "limit"), CASES)
async def test_before_first_and_after_last_are_empty(node: RunningNode, n: int, limit: int) -> None:
    async with filled_channel(node, n) as ch:
        page = await ch.page(before=1, limit=limit)
        assert page["messages"] == []
        assert page["has_more_before"] is False
        assert page["has_more_after"] is (n > 0)

        last = n  # positions are 1..n
        page = await ch.page(after=last, limit=limit)
        assert page["messages"] == []
        assert page["has_more_after"] is False
        assert page["has_more_before"] is (n > 0)

        # One past either end is the first / last page.
        page = await ch.page(before=last + 1, limit=limit)
        assert ids_of(page) == ch.ids[-limit:]
        assert page["has_more_after"] is False
        page = await ch.page(after=0, limit=limit)
        assert ids_of(page) == ch.ids[:limit]
        assert page["has_more_after"] is (n > limit)


async def test_walks_skip_thread_replies_and_keep_tombstones(node: RunningNode) -> None:
    async with filled_channel(node, 12) as ch:
        poster = ch.reader
        # Replies take channel positions too, leaving gaps between top-level messages.
        for root in ch.messages[::3]:
            await poster.request(
                "messages.post",
                channel_id=ch.channel_id,
                client_msg_id=f"reply-{root['id']}",
                text="a reply",
                thread_root_id=root["id"],
            )
        tail = await post_many([poster], ch.channel_id, 3, prefix="tail")
        top = ch.ids + [m["id"] for m in tail]
        await poster.request("messages.delete", message_id=ch.messages[4]["id"])

        walked: list[int] = []
        page = await ch.page(after=0, limit=4)
        walked += ids_of(page)
        while page["has_more_after"]:
            page = await ch.page(after=page["messages"][-1]["seq"], limit=4)
            walked += ids_of(page)
        assert walked == top

        back: list[int] = []
        page = await ch.page(limit=4)
        back = ids_of(page)
        while page["has_more_before"]:
            page = await ch.page(before=page["messages"][0]["seq"], limit=4)
            back = ids_of(page) + back
        assert back == top

        latest = await ch.page(limit=50)
        tombstone = next(m for m in latest["messages"] if m["id"] == ch.messages[4]["id"])
        assert (tombstone["deleted"], tombstone["text"]) == (True, "")
        assert all(m["thread_root_id"] is None for m in latest["messages"])
        assert [m["reply_count"] for m in latest["messages"][:12:3]] == [1, 1, 1, 1]


# --------------------------------------------------------------------------- arguments


async def test_limit_bounds_are_validated(node: RunningNode) -> None:
    async with filled_channel(node, 3) as ch:
        for bad in (0, 201, -1):
            assert await error_code(
                ch.reader, "messages.history", channel_id=ch.channel_id, limit=bad
            ) == ("invalid_frame"), bad
        assert ids_of(await ch.page(limit=1)) == ch.ids[-1:]
        assert ids_of(await ch.page(limit=200)) == ch.ids
        for field in ("before", "after", "around"):
            assert await error_code(
                ch.reader, "messages.history", channel_id=ch.channel_id, **{field: -1}
            ) == ("invalid_frame"), field


async def test_at_most_one_position_may_be_given(node: RunningNode) -> None:
    async with filled_channel(node, 3) as ch:
        for combo in (
            {"before": 3, "after": 1},
            {"before": 3, "around": 2},
            {"after": 1, "around": 2},
            {"before": 3, "after": 1, "around": 2},
            {"before": 0, "after": 0},
        ):
            code = await error_code(
                ch.reader, "messages.history", channel_id=ch.channel_id, **combo
            )
            assert code == "invalid_argument", combo


# --------------------------------------------------------------------------- visibility


async def test_private_history_is_hidden_from_non_members(node: RunningNode) -> None:
    async with node.clients("olivia", "mallory", "max", "adam") as (olivia, mallory, max_, adam):
        await olivia.request(
            "messages.post", channel_id=node.private, client_msg_id="p1", text="secret"
        )
        for outsider in (mallory, max_, adam):  # even an admin who is not a member
            assert await error_code(outsider, "messages.history", channel_id=node.private) == (
                "channel_not_found"
            )
        page = await olivia.request("messages.history", channel_id=node.private)
        assert [m["text"] for m in page["messages"]] == ["secret"]
        assert await error_code(olivia, "messages.history", channel_id=10**12) == (
            "channel_not_found"
        )


async def test_public_history_readable_by_members_role_not_by_outside_guest(
    node: RunningNode,
) -> None:
    async with node.clients("mia", "mallory", "gus") as (mia, mallory, gus):
        channel = (await mia.request("channels.create", name="open-plan"))["channel"]
        await mia.request(
            "messages.post", channel_id=channel["id"], client_msg_id="o1", text="come read"
        )
        # mallory is in no channel, but a member-role user may read any public channel.
        page = await mallory.request("messages.history", channel_id=channel["id"])
        assert [m["text"] for m in page["messages"]] == ["come read"]
        # The guest is not in this channel: it does not exist for him.
        assert await error_code(gus, "messages.history", channel_id=channel["id"]) == (
            "channel_not_found"
        )
        # ... while the public channel he was invited to is readable.
        await mia.request(
            "messages.post", channel_id=node.general, client_msg_id="g1", text="hi gus"
        )
        page = await gus.request("messages.history", channel_id=node.general)
        assert [m["text"] for m in page["messages"]] == ["hi gus"]
