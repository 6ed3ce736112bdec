"""Two chat nodes in this process, one PostgreSQL, one Redis (real servers): events cross
nodes in one order, resume works on the other node, Redis loss delays but loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.client import Client
from chat.server import Node
from tests.cluster import TempRedis
from tests.conftest import PostgresFixture
from tests.harness import RunningNode, running_node
from tests.pg import unique_database_name
from tests.timing import scaled


@contextlib.asynccontextmanager
async def two_nodes(
    postgres_server: PostgresFixture, redis: TempRedis, **extra: Any
) -> AsyncIterator[tuple[RunningNode, Node]]:
    name = unique_database_name("scale")
    dsn = await postgres_server.create_database(name)
    try:
        async with running_node(database_url=dsn, redis_url=redis.url, **extra) as first:
            second = Node(first.settings.model_copy(update={"port": 0, "node_id": "node-b"}))
            await second.start()
            try:
                yield first, second
            finally:
                await second.stop()
    finally:
        await postgres_server.drop_database(name)


def url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.port}/"


@pytest.fixture
def redis() -> Any:
    with TempRedis() as server:  # started on entering
        yield server


async def posted(client: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    return [await client.next_event("message.posted", timeout=scaled(timeout)) for _ in range(n)]


async def test_concurrent_posts_on_two_nodes_arrive_in_one_order(
    postgres_server: PostgresFixture, redis: TempRedis
) -> None:
    async with two_nodes(postgres_server, redis) as (a, b):
        ch = a.general
        async with (
            Client.connect(a.url, a.tokens["olivia"]) as olivia_a,
            Client.connect(url(b), a.tokens["mia"]) as mia_b,
            Client.connect(a.url, a.tokens["max"]) as max_a,
            Client.connect(url(b), a.tokens["adam"]) as adam_b,
        ):

            async def burst(c: Client, who: str) -> None:
                for i in range(0, 40, 10):
                    await asyncio.gather(
                        *(
                            c.request(
                                "messages.post",
                                channel_id=ch,
                                client_msg_id=f"{who}{j}",
                                text=f"{who}{j}",
                            )
                            for j in range(i, i + 10)
                        )
                    )

            await asyncio.gather(burst(olivia_a, "a"), burst(mia_b, "b"))
            seen_a = [e["seq"] for e in await posted(max_a, 80)]
            seen_b = [e["seq"] for e in await posted(adam_b, 80)]
            assert seen_a == seen_b
            assert seen_a == sorted(seen_a) and len(set(seen_a)) == 80


async def test_resume_on_another_node(postgres_server: PostgresFixture, redis: TempRedis) -> None:
    async with two_nodes(postgres_server, redis) as (a, b):
        async with Client.connect(a.url, a.tokens["mia"]) as mia:
            session_id, seq = mia.session["session_id"], mia.session["seq"]
        async with Client.connect(a.url, a.tokens["olivia"]) as olivia:
            ids = [
                (
                    await olivia.request(
                        "messages.post", channel_id=a.general, client_msg_id=f"m{i}", text=f"m{i}"
                    )
                )["message"]["id"]
                for i in range(20)
            ]
        async with Client.connect(url(b)) as mia_b:
            reply = await mia_b.request(
                "auth", token=a.tokens["mia"], resume={"session_id": session_id, "seq": seq}
            )
            assert reply["resumed"] is True
            got = []
            while True:
                event = await mia_b.next_event(timeout=scaled(5))
                if event["type"] == "resumed":
                    break
                if event["type"] == "message.posted":
                    got.append(event["message"]["id"])
            assert got == ids


async def test_redis_restart_loses_no_acknowledged_message(
    postgres_server: PostgresFixture, redis: TempRedis
) -> None:
    async with two_nodes(postgres_server, redis) as (a, b):
        async with (
            Client.connect(a.url, a.tokens["olivia"]) as olivia,
            Client.connect(url(b), a.tokens["mia"]) as mia_b,
        ):
            acked: list[int] = []
            for i in range(30):
                if i == 10:
                    redis.restart(hard=True)  # the stream is gone
                try:
                    reply = await olivia.request(
                        "messages.post", channel_id=a.general, client_msg_id=f"r{i}", text=f"r{i}"
                    )
                    acked.append(reply["message"]["id"])
                except Exception:
                    continue
            received: list[int] = []
            async with asyncio.timeout(scaled(15)):
                while not set(acked) <= set(received):
                    event = await mia_b.next_event("message.posted", timeout=scaled(15))
                    received.append(event["message"]["id"])
            assert len(received) == len(set(received)), "duplicates"
            assert [r for r in received if r in set(acked)] == acked


async def test_presence_and_typing_cross_nodes(
    postgres_server: PostgresFixture, redis: TempRedis
) -> None:
    async with two_nodes(postgres_server, redis) as (a, b):
        async with Client.connect(url(b), a.tokens["olivia"]) as watcher:
            await watcher.request("presence.subscribe", user_ids=[a.users["mia"]])
            async with Client.connect(a.url, a.tokens["mia"]) as mia:
                event = await watcher.next_event("presence", timeout=scaled(6))
                assert (event["user_id"], event["status"]) == (a.users["mia"], "active")
                await mia.request("typing", channel_id=a.general)
                typing = await watcher.next_event("typing", timeout=scaled(5))
                assert typing["user_id"] == a.users["mia"] and typing["seq"] is None
            event = await watcher.next_event("presence", timeout=scaled(6))
            assert (event["user_id"], event["status"]) == (a.users["mia"], "away")
