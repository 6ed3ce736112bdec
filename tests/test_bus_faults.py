"""The buses under faults, against real stores and a real Redis (no mocks):

* defect 5: events committed by another process (here a second :class:`chat.admin.Admin`,
  with its own connection and its own in-process bus) reach a running single node's live
  clients, exactly once, in order: on SQLite by the change poll, on PostgreSQL by
  LISTEN/NOTIFY, and in both when the node's own next publish finds the gap first;
* defect 8: cancelling the bus and presence tasks while Redis is frozen (SIGSTOP) ends them;
* defect 23: the stream reader notices a frozen Redis and recovers when it thaws.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chat.admin import Admin
from chat.bus import Envelope, LocalBus
from chat.bus.redis import RedisBus, stream_key
from chat.client import Client
from chat.presence import ClusterPresence, Presence
from chat.replay import DatabaseLog
from chat.server import Node
from chat.storage import Database, open_database
from tests.cluster import TempRedis
from tests.conftest import PostgresFixture
from tests.harness import settings_for
from tests.pg import unique_database_name
from tests.timing import scaled

# --------------------------------------------------------------------------- a single node


class SingleNode:
    """A node over ``db`` whose LocalBus follows the store, a workspace, two members."""

    def __init__(self, node: Node, admin: Admin, workspace_id: int, users: dict[str, int]):
        self.node = node
        self.admin = admin
        self.workspace_id = workspace_id
        self.users = users
        self.tokens: dict[str, str] = {}
        self.general = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.node.port}/"

    def client(self, handle: str) -> contextlib.AbstractAsyncContextManager[Client]:
        return Client.connect(self.url, self.tokens[handle])


@contextlib.asynccontextmanager
async def store_settings(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    if store == "sqlite":
        yield {"sqlite_path": str(tmp_path / "chat.sqlite3")}
        return
    pg: PostgresFixture = request.getfixturevalue("postgres_server")
    name = unique_database_name("bus")
    dsn = await pg.create_database(name)
    try:
        yield {"database_url": dsn}
    finally:
        await pg.drop_database(name)


@contextlib.asynccontextmanager
async def single_node(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, *, poll_s: float
) -> AsyncIterator[SingleNode]:
    async with store_settings(store, request, tmp_path) as overrides:
        settings = settings_for(**overrides, rate_limit_per_10s=10_000)
        admin = await Admin.open(settings)
        try:
            wid = await admin.create_workspace("acme")
            specs = [
                {"handle": "olivia", "display_name": "Olivia", "role": "owner"},
                {"handle": "mia", "display_name": "Mia", "role": "member"},
            ]
            users = {u.handle: u.id for u in await admin.create_users(wid, specs)}
            general = await admin.create_channel(
                wid, "general", users["olivia"], list(users.values()), False
            )
            db: Database = await open_database(settings.database_url, settings.sqlite_path)
            # What the node builds when it runs without Redis (see the report to the lead).
            bus = LocalBus(db, database_url=settings.database_url, poll_s=poll_s)
            node = Node(settings, db=db, bus=bus)
            await node.start()
            try:
                running = SingleNode(node, admin, wid, users)
                running.tokens = {h: await admin.issue_token(i) for h, i in users.items()}
                running.general = general.id
                yield running
            finally:
                await node.stop()
        finally:
            await admin.close()


async def durable_events(client: Client, count: int) -> list[dict[str, Any]]:
    """The next ``count`` numbered events, then a short quiet wait for any duplicate."""
    events: list[dict[str, Any]] = []
    while len(events) < count:
        event = await client.next_event(timeout=scaled(10))
        if event.get("seq") is not None:
            events.append(event)
    with contextlib.suppress(TimeoutError):
        while True:
            event = await client.next_event(timeout=scaled(1))
            if event.get("seq") is not None:
                events.append(event)
    return events


async def test_defect_05_a_channel_created_by_another_process_reaches_live_members(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with single_node(store, request, tmp_path, poll_s=0.2) as n:
        async with n.client("mia") as mia:
            other = await Admin.open(n.node.settings)  # another committer, its own bus
            try:
                channel = await other.create_channel(
                    n.workspace_id,
                    "created-elsewhere",
                    n.users["olivia"],
                    list(n.users.values()),
                    False,
                )
            finally:
                await other.close()
            events = await durable_events(mia, 1)
            assert [e["type"] for e in events] == ["channel.created"]
            assert events[0]["channel"]["id"] == channel.id
            assert events[0]["seq"] > mia.session["seq"]


async def test_defect_05_postgres_notify_delivers_without_waiting_for_a_poll(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # The poll is an hour away: only LISTEN/NOTIFY can deliver this.
    async with single_node("postgres", request, tmp_path, poll_s=3600) as n:
        async with n.client("mia") as mia:
            other = await Admin.open(n.node.settings)
            try:
                channel = await other.create_channel(
                    n.workspace_id, "notified", n.users["olivia"], list(n.users.values()), False
                )
            finally:
                await other.close()
            events = await durable_events(mia, 1)
            assert [(e["type"], e["channel"]["id"]) for e in events] == [
                ("channel.created", channel.id)
            ]


async def test_defect_05_a_local_post_after_a_foreign_commit_delivers_both_in_order(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # No poll in time, and on SQLite no notification: the node's own publish finds the gap.
    async with single_node(store, request, tmp_path, poll_s=3600) as n:
        async with n.client("mia") as mia, n.client("olivia") as olivia:
            other = await Admin.open(n.node.settings)
            try:
                foreign = await other.create_channel(
                    n.workspace_id, "foreign", n.users["olivia"], list(n.users.values()), False
                )
            finally:
                await other.close()
            await olivia.request(
                "messages.post", channel_id=n.general, client_msg_id="after", text="after"
            )
            events = await durable_events(mia, 2)
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(set(seqs)) and seqs[1] == seqs[0] + 1
            assert [e["type"] for e in events] == ["channel.created", "message.posted"]
            assert events[0]["channel"]["id"] == foreign.id


# --------------------------------------------------------------------------- Redis faults


@contextlib.contextmanager
def frozen(redis: TempRedis) -> Iterator[None]:
    """SIGSTOP the redis-server we started (by PID): connections stay open, nothing answers
    (a half-open peer); SIGCONT on the way out."""
    pid = redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def redis_bus(tmp_path: Path, redis: TempRedis) -> AsyncIterator[tuple[RedisBus, Admin]]:
    """A RedisBus over a SQLite store with a workspace of two users and 20 events."""
    settings = settings_for(sqlite_path=str(tmp_path / "chat.sqlite3"))
    admin = await Admin.open(settings)
    try:
        wid = await admin.create_workspace("acme")
        specs = [{"handle": f"u{i}", "display_name": f"U{i}", "role": "member"} for i in range(2)]
        users = [u.id for u in await admin.create_users(wid, specs)]
        for i in range(18):
            await admin.create_channel(wid, f"c{i}", users[0], users, False)
        bus = RedisBus(redis.url, admin.db, window_s=900, max_events=10_000)
        await bus.start()
        try:
            yield bus, admin
        finally:
            await bus.close()
    finally:
        await admin.close()


@pytest.fixture
def redis() -> Iterator[TempRedis]:
    with TempRedis(startup_timeout=scaled(10)) as server:
        yield server


async def test_defect_08_cancelling_presence_mid_pipeline_on_a_frozen_redis_ends_it(
    tmp_path: Path, redis: TempRedis
) -> None:
    async with redis_bus(tmp_path, redis) as (bus, _admin):
        cluster = ClusterPresence(bus.client, "n1", lambda envs: None, ttl_s=15, poll_s=0.1)
        presence = Presence(bus, 3.0, cluster, flush_s=0.05)
        task = asyncio.create_task(presence.run())
        await presence.connected(1, 1)
        await asyncio.sleep(0.3)  # flushed and polled at least once while Redis answers
        with frozen(redis):
            await presence.connected(1, 2)  # the next flush's pipeline hangs on Redis
            await asyncio.sleep(0.3)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=scaled(3))
            assert task in done and task.cancelled()


async def test_defect_08_closing_the_redis_bus_on_a_frozen_redis_ends_its_tasks(
    tmp_path: Path, redis: TempRedis
) -> None:
    async with redis_bus(tmp_path, redis) as (bus, _admin):
        await bus.subscribe(1, lambda envs: None)
        await asyncio.sleep(0.3)
        with frozen(redis):
            await asyncio.sleep(0.3)  # XREAD and the sweeper are now waiting on Redis
            tasks = list(bus._tasks)
            closing = asyncio.create_task(bus.close())
            done, _ = await asyncio.wait([closing], timeout=scaled(3))
            assert closing in done
            assert all(t.done() for t in tasks)


async def test_defect_23_the_stream_reader_recovers_after_redis_froze(
    tmp_path: Path, redis: TempRedis
) -> None:
    async with redis_bus(tmp_path, redis) as (bus, _admin):
        got: list[Envelope] = []
        await bus.subscribe(1, got.extend)
        assert bus.healthy
        with frozen(redis):
            async with asyncio.timeout(scaled(15)):
                while bus.healthy:  # noqa: ASYNC110 - a property; the read times out, not hangs
                    await asyncio.sleep(0.1)
        async with asyncio.timeout(scaled(15)):
            while not bus.healthy:  # noqa: ASYNC110 - a property, polled
                await asyncio.sleep(0.1)
        # The next event (seq 21) goes through the thawed stream to the subscriber.
        await bus.append(1, [Envelope(1, 21, "test.event", b'{"n":21}')])
        async with asyncio.timeout(scaled(10)):
            while not got:  # noqa: ASYNC110 - filled by the subscriber callback
                await asyncio.sleep(0.05)
        assert [(e.seq, e.payload) for e in got] == [(21, b'{"n":21}')]


async def test_defect_20_replay_reads_in_bounded_chunks_from_the_stream_and_the_log(
    tmp_path: Path, redis: TempRedis
) -> None:
    async with redis_bus(tmp_path, redis) as (bus, admin):
        log = DatabaseLog(admin.db, 900, 10_000)
        events = await log.chunk(1, 0, 20)
        assert [e.seq for e in events] == list(range(1, 21))
        # The stream holds only 9..14 (as after a restart and a partial repair).
        await bus.append(1, events[8:14])
        await bus.client.xtrim(stream_key(1), minid="9-0")
        assert await bus.holds(1, 0, 20)
        chunks = [list(c) async for c in bus.read(1, 0, 20, chunk=4)]
        assert all(0 < len(c) <= 4 for c in chunks)
        assert [e.seq for c in chunks for e in c] == list(range(1, 21))
        assert [e.payload for c in chunks for e in c] == [e.payload for e in events]
        db_chunks = [list(c) async for c in log.read(1, 3, 20, chunk=5)]
        assert [len(c) for c in db_chunks] == [5, 5, 5, 2]


async def test_defect_04_resume_after_redis_lost_the_stream_uses_the_log(
    tmp_path: Path, redis: TempRedis
) -> None:
    # max_events 3: the window is "the last 3 OR younger than 900 s"; every event is young.
    async with redis_bus(tmp_path, redis) as (_bus, admin):
        bus = RedisBus(redis.url, admin.db, window_s=900, max_events=3)
        events = await DatabaseLog(admin.db, 900, 3).chunk(1, 0, 20)
        await bus.append(1, events[15:])  # the restarted stream holds 16..20 only
        assert await bus.holds(1, 2, 20)
        missed = [e async for chunk in bus.read(1, 2, 20) for e in chunk]
        assert [e.seq for e in missed] == list(range(3, 21))
        # Outside the window (old AND beyond the last 3): too_old, explicitly.
        old = RedisBus(redis.url, admin.db, window_s=0, max_events=3)
        assert not await old.holds(1, 2, 20)
        assert await old.holds(1, 16, 20)
        await bus.close()
        await old.close()
