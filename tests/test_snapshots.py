"""Coalesced connect snapshots (:mod:`chat.snapshots`) on both real stores.

A storm's concurrent connects of one workspace share a statement; each still gets its own
user, channels and session state, as of one instant; a connect whose client has gone is
dropped before the read."""

from __future__ import annotations

import asyncio

import pytest

from chat.journal import now_ms
from chat.snapshots import Abandoned, SnapshotReader
from chat.storage import Database, queries

HOUR_MS = 3_600_000


async def seed(db: Database, users: int) -> tuple[int, list[int], int]:
    """A workspace with ``users`` users, each with session "s<uid>"; channel c holds the
    even-numbered ones. Returns (workspace, user ids, channel)."""
    now = now_ms()
    async with db.transaction() as conn:
        ws = await queries.create_workspace(conn, "acme", now)
        uids = []
        for i in range(users):
            user = await queries.create_user(conn, ws, f"u{i}", f"U {i}", "member", now)
            await queries.create_session(conn, f"s{user.id}", user.id, now, now + HOUR_MS)
            uids.append(user.id)
        channel = await queries.create_channel(conn, ws, "public", "general", uids[0], now)
        for uid in uids[::2]:
            await queries.add_member(conn, channel, uid, now)
    return ws, uids, channel


def alive() -> bool:
    return True


async def test_concurrent_connects_share_one_statement(db: Database) -> None:
    ws, uids, channel = await seed(db, 40)
    reader = SnapshotReader(db)
    states = await asyncio.gather(*(reader.read(ws, uid, f"s{uid}", alive) for uid in uids))
    assert reader.statements == 1 and reader.served == 40
    async with db.connection() as conn:
        as_of = await conn.fetchval("SELECT last_event_seq FROM workspaces WHERE id = $1", ws)
    for i, (uid, state) in enumerate(zip(uids, states, strict=True)):
        assert state.session == "ok"
        assert state.user is not None and state.user.id == uid and state.user.handle == f"u{i}"
        assert state.workspace_name == "acme" and state.as_of == as_of
        assert state.channel_ids == (frozenset({channel}) if i % 2 == 0 else frozenset())


async def test_each_connect_gets_its_own_refusal(db: Database) -> None:
    ws, uids, _ = await seed(db, 5)
    now = now_ms()
    async with db.transaction() as conn:
        await queries.revoke_session(conn, f"s{uids[1]}", now)
        await conn.execute("UPDATE sessions SET expires_at = $1 WHERE id = $2", now, f"s{uids[2]}")
        await queries.deactivate_user(conn, uids[3])
    reader = SnapshotReader(db)
    wanted = [
        (uids[0], f"s{uids[0]}"),  # ok
        (uids[1], f"s{uids[1]}"),  # revoked
        (uids[2], f"s{uids[2]}"),  # expired
        (uids[3], f"s{uids[3]}"),  # deactivated
        (uids[4], f"s{uids[0]}"),  # another user's session
        (uids[4], "s_unknown"),  # no such session
        (999_999, "s999999"),  # no such user
        (uids[0], f"s{uids[0]}"),  # the same session twice (two tabs)
    ]
    states = await asyncio.gather(*(reader.read(ws, u, s, alive) for u, s in wanted))
    assert [s.session for s in states] == [
        "ok",
        "revoked",
        "expired",
        "inactive",
        "missing",
        "missing",
        "missing",
        "ok",
    ]
    assert reader.statements == 1
    assert all(s.user is None for s in states[4:7])


async def test_a_connect_in_another_workspace_is_not_answered_for_this_one(
    db: Database,
) -> None:
    _, uids, _ = await seed(db, 2)
    async with db.transaction() as conn:
        other = await queries.create_workspace(conn, "other", now_ms())
    reader = SnapshotReader(db)
    state = await reader.read(other, uids[0], f"s{uids[0]}", alive)
    assert state.session == "missing" and state.user is None


async def test_connects_arriving_during_a_read_go_together_in_the_next(db: Database) -> None:
    ws, uids, _ = await seed(db, 30)
    reader = SnapshotReader(db, concurrency=1)
    first = asyncio.ensure_future(reader.read(ws, uids[0], f"s{uids[0]}", alive))
    await asyncio.sleep(0)  # the first batch (of one) is formed and its read started
    rest = [asyncio.ensure_future(reader.read(ws, u, f"s{u}", alive)) for u in uids[1:]]
    states = await asyncio.gather(first, *rest)
    assert all(s.session == "ok" for s in states)
    assert reader.statements == 2 and reader.served == 30


async def test_batches_are_bounded(db: Database) -> None:
    ws, uids, _ = await seed(db, 25)
    reader = SnapshotReader(db, max_batch=10)
    states = await asyncio.gather(*(reader.read(ws, u, f"s{u}", alive) for u in uids))
    assert [s.user.id for s in states if s.user] == uids
    assert reader.statements == 3


async def test_a_connect_whose_client_has_gone_is_not_read(db: Database) -> None:
    ws, uids, _ = await seed(db, 4)
    reader = SnapshotReader(db)
    gone = {uids[1], uids[3]}
    results = await asyncio.gather(
        *(reader.read(ws, u, f"s{u}", lambda u=u: u not in gone) for u in uids),
        return_exceptions=True,
    )
    assert [isinstance(r, Abandoned) for r in results] == [False, True, False, True]
    assert (reader.served, reader.abandoned, reader.statements) == (2, 2, 1)


async def test_nobody_left_means_no_statement(db: Database) -> None:
    ws, uids, _ = await seed(db, 2)
    reader = SnapshotReader(db)
    with pytest.raises(Abandoned):
        await reader.read(ws, uids[0], f"s{uids[0]}", lambda: False)
    assert reader.statements == 0


async def test_a_cancelled_waiter_is_skipped(db: Database) -> None:
    ws, uids, _ = await seed(db, 3)
    reader = SnapshotReader(db)
    tasks = [asyncio.ensure_future(reader.read(ws, u, f"s{u}", alive)) for u in uids]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert reader.served == 2


async def test_waiters_are_released_when_the_reader_closes(db: Database) -> None:
    ws, uids, _ = await seed(db, 2)
    reader = SnapshotReader(db)
    task = asyncio.ensure_future(reader.read(ws, uids[0], f"s{uids[0]}", alive))
    await asyncio.sleep(0)  # waiting for its batch
    await reader.close()  # before the batch was read
    with pytest.raises(Abandoned):
        await task
    with pytest.raises(Abandoned):  # and nothing more is read
        await reader.read(ws, uids[1], f"s{uids[1]}", alive)


async def test_while_connects_stream_in_a_batch_lingers_for_more(db: Database) -> None:
    ws, uids, _ = await seed(db, 3)
    reader = SnapshotReader(db, linger_s=0.5, busy_s=60)
    await reader.read(ws, uids[0], f"s{uids[0]}", alive)  # busy from here on
    first = asyncio.ensure_future(reader.read(ws, uids[1], f"s{uids[1]}", alive))
    await asyncio.sleep(0.05)  # arrives while the batch lingers
    second = asyncio.ensure_future(reader.read(ws, uids[2], f"s{uids[2]}", alive))
    await asyncio.gather(first, second)
    assert reader.statements == 2 and reader.served == 3
