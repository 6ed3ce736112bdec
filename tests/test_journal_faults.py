"""The journal and the stores under faults, on real PostgreSQL: cross-node lock order
(defect 1), concurrent DM opens (defect 6), commit ambiguity (defect 9), a stopped database
(defect 22), and Redis down while posting (defect 10).

"Two nodes", as far as the database is concerned, are two connection pools over the same
database; each test below gives every simulated node its own :class:`PostgresDatabase` and
its own :class:`Journal`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import pytest

from chat import wire
from chat.bus import Audience, Envelope, LocalBus
from chat.client import RequestError
from chat.journal import Journal, Tx
from chat.storage import Database, open_database, queries
from tests.cluster import TempRedis
from tests.conftest import MakeCluster, PostgresFixture
from tests.harness import running_node
from tests.pg import TempPostgres, unique_database_name
from tests.timing import scaled


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Envelope] = []

    def __call__(self, envelopes: Sequence[Envelope]) -> None:
        self.seen.extend(envelopes)


@contextlib.asynccontextmanager
async def _nodes(pg: PostgresFixture, n: int) -> AsyncIterator[list[Database]]:
    """``n`` independent pools over one fresh, migrated database."""
    name = unique_database_name("faults")
    dsn = await pg.create_database(name)
    dbs: list[Database] = []
    try:
        for _ in range(n):
            dbs.append(await open_database(dsn, ""))
        yield dbs
    finally:
        for db in dbs:
            await db.close()
        await pg.drop_database(name)


async def _workspace_with_channels(db: Database, n_channels: int) -> tuple[int, int, list[int]]:
    async with db.transaction() as conn:
        wid = await queries.create_workspace(conn, unique_database_name("ws"), 0)
        user = await queries.create_user(conn, wid, "ada", "Ada", "owner", 0)
        channels = [
            await queries.create_channel(conn, wid, "public", f"c{i}", user.id, 0)
            for i in range(n_channels)
        ]
    return wid, user.id, channels


def _bump(channel_id: int):  # type: ignore[no-untyped-def]
    """An op that does what a post does to locks: the channel row, then (at the end of the
    batch) the workspace row."""

    async def op(tx: Tx) -> int:
        seq = await queries.next_channel_seq(tx.conn, channel_id)
        message = wire.Message(
            id=1, channel_id=channel_id, seq=seq, user_id=1, client_msg_id="x", text="x", ts=0
        )
        tx.emit(
            wire.MessagePosted(seq=0, workspace_id=0, ts=0, message=message),
            Audience(channel_id=channel_id),
        )
        # Hold the channel lock a little while the batch goes on, as a real batch does.
        await asyncio.sleep(0.001)
        return seq

    return op


async def test_defect_01_two_nodes_posting_in_opposite_channel_orders_never_fail(
    postgres_server: PostgresFixture,
) -> None:
    async with _nodes(postgres_server, 3) as dbs:
        wid, _, channels = await _workspace_with_channels(dbs[0], 8)
        journals = [Journal(db, LocalBus()) for db in dbs]
        orders = [channels, channels[::-1], channels[2:] + channels[:2]]
        rounds = 10

        async def node(i: int) -> list[object]:
            out: list[object] = []
            for _ in range(rounds):
                # Submitted together: one batch per round holding every channel's lock.
                out += await asyncio.gather(
                    *(journals[i].run(wid, _bump(c)) for c in orders[i]), return_exceptions=True
                )
            return out

        results = await asyncio.wait_for(asyncio.gather(*(node(i) for i in range(3))), scaled(90))
        for j in journals:
            await j.close()
        errors = [r for rs in results for r in rs if isinstance(r, BaseException)]
        assert errors == []
        async with dbs[0].connection() as conn:
            last = await queries.get_workspace(conn, wid)
            seqs = [r["seq"] for r in await queries.events_between(conn, wid, 0, 10_000)]
        assert last is not None
        total = 3 * rounds * len(channels)
        assert seqs == list(range(1, total + 1)) and last["last_event_seq"] == total


async def test_defect_06_concurrent_dm_opens_on_two_nodes_answer_the_one_dm(
    make_cluster: MakeCluster,
) -> None:
    handles = ("owner", "u1", "u2", "u3", "u4", "u5", "u6")
    cluster = await make_cluster(2, use_redis=False, seed=False)
    seeded = await cluster.seed(handles=handles)
    pairs = [("u1", "u2"), ("u3", "u4"), ("u5", "u6"), ("u1", "u3"), ("u2", "u4")]
    async with contextlib.AsyncExitStack() as stack:
        left = {h: await stack.enter_async_context(cluster.client(0, h)) for h in handles[1:]}
        right = {h: await stack.enter_async_context(cluster.client(1, h)) for h in handles[1:]}
        for a, b in pairs:
            # Each side opens the DM with the other at once, through different nodes.
            replies = await asyncio.gather(
                left[a].request("dms.open", user_ids=[seeded.users[b]]),
                right[b].request("dms.open", user_ids=[seeded.users[a]]),
                right[a].request("dms.open", user_ids=[seeded.users[b]]),
                return_exceptions=True,
            )
            assert not [r for r in replies if isinstance(r, BaseException)], replies
            ids = {r["channel"]["id"] for r in replies if isinstance(r, dict)}
            assert len(ids) == 1


# --------------------------------------------------------------------------- defect 9, 22


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a database condition: nothing to wait on but a query), bounded."""
    for _ in range(int(scaled(timeout) / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not reached")


async def test_defect_09_connection_lost_during_commit_answers_outcome_unknown() -> None:
    """COMMIT is made to hang after the commit record is written (a synchronous standby that
    does not exist), then the backend is terminated: the post is stored, yet its connection
    died during COMMIT. The answer is ``outcome_unknown`` (not ``internal_error``), and the
    client library's retry with the same ``client_msg_id`` gets ``duplicate: true``."""
    with TempPostgres(
        startup_timeout=scaled(60), extra_settings={"synchronous_commit": "on"}
    ) as server:
        dsn = await server.acreate_database("ambiguous")
        admin = await asyncpg.connect(server.dsn)
        try:
            async with running_node(database_url=dsn) as node:
                async with node.client("mia") as mia:
                    await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'ghost'")
                    await admin.execute("SELECT pg_reload_conf()")
                    posting = asyncio.ensure_future(
                        mia.request_frame(
                            "messages.post",
                            channel_id=node.general,
                            client_msg_id="maybe",
                            text="did it commit?",
                            timeout=scaled(30),
                        )
                    )

                    async def committing() -> bool:
                        return bool(
                            await admin.fetchval(
                                "SELECT count(*) FROM pg_stat_activity"
                                " WHERE wait_event = 'SyncRep' AND datname = 'ambiguous'"
                            )
                        )

                    await _wait_for(committing)
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE wait_event = 'SyncRep' AND datname = 'ambiguous'"
                    )
                    reply = await posting
                    assert reply["type"] == "error"
                    assert reply["code"] == "outcome_unknown"

                    await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
                    await admin.execute("SELECT pg_reload_conf()")
                    # It had committed: the retry finds it.
                    retried = await mia.post(node.general, "did it commit?", "maybe")
                    assert retried["duplicate"] is True
                    history = await mia.request("messages.history", channel_id=node.general)
                    texts = [m["text"] for m in history["messages"]]
                    assert texts.count("did it commit?") == 1
        finally:
            await admin.close()


async def test_defect_22_database_down_answers_unavailable_with_retry_after() -> None:
    with TempPostgres(startup_timeout=scaled(60)) as server:
        dsn = await server.acreate_database("outage")
        async with running_node(database_url=dsn) as node, node.client("mia") as mia:
            ok = await mia.post(node.general, "before")
            assert ok["duplicate"] is False
            await asyncio.to_thread(server.stop)
            reply = await mia.request_frame(
                "messages.post", channel_id=node.general, client_msg_id="during", text="x"
            )
            assert reply["type"] == "error"
            assert reply["code"] == "unavailable"
            assert reply["retry_after_ms"] > 0
            # The client library retries it, then gives the caller the last answer.
            with pytest.raises(RequestError) as failed:
                await mia.post(node.general, "during", "during", attempts=2)
            assert failed.value.code == "unavailable"


# --------------------------------------------------------------------------- defect 10


async def test_defect_10_posts_are_answered_while_redis_is_down_and_delivered_after(
    postgres_server: PostgresFixture, redis_server: TempRedis
) -> None:
    name = unique_database_name("redisdown")
    dsn = await postgres_server.create_database(name)
    try:
        async with (
            running_node(database_url=dsn, redis_url=redis_server.url) as node,
            node.clients("mia", "olivia") as (mia, olivia),
        ):
            await mia.post(node.general, "before")
            assert (await olivia.next_event("message.posted"))["message"]["text"] == "before"
            redis_server.stop()
            # Committed is acknowledged: the reply comes while Redis is still down.
            replies = [await mia.post(node.general, f"during {i}") for i in range(3)]
            assert [r["duplicate"] for r in replies] == [False, False, False]
            assert not redis_server.running
            redis_server.start()  # empty: the outbox (event log + sweeper) delivers
            texts = [
                (await olivia.next_event("message.posted", timeout=scaled(30)))["message"]["text"]
                for _ in range(3)
            ]
            assert texts == ["during 0", "during 1", "during 2"]
    finally:
        await postgres_server.drop_database(name)
