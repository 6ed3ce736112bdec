"""The buses under faults, against real stores and a real Redis (no mocks):

* defect 5: events committed by another process (here a second :class:`chat.admin.Admin`,
  with its own connection and its own in-process bus) reach a running single node's live
  clients, exactly once, in order: on SQLite by the change poll, on PostgreSQL by
  LISTEN/NOTIFY, and in both when the node's own next publish finds the gap first;
* defect 8: cancelling the bus and presence tasks while Redis is frozen (SIGSTOP) ends them;
* defect 23: the stream reader notices a frozen Redis and recovers when it thaws.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chat.admin import Admin
from chat.bus import LocalBus
from chat.client import Client
from chat.server import Node
from chat.storage import Database, open_database
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
