"""The journal against both stores: order, group commit, isolation of refused operations,
event numbering, and the outbox written in the same transaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import asyncpg
import pytest

from chat import wire
from chat.bus import Audience, Envelope, LocalBus
from chat.errors import ChatError, ErrorCode
from chat.journal import Journal, Tx
from chat.storage import Database, StorageError, queries
from chat.storage.base import OutcomeUnknown, TransactionConflict, Unavailable, UniqueViolation
from chat.storage.postgres import classify, commit_failure
from chat.storage.sqlite import translate
from tests.pg import unique_database_name
from tests.timing import scaled


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Envelope] = []
        self.batches = 0

    def __call__(self, envelopes: Sequence[Envelope]) -> None:
        self.batches += 1
        self.seen.extend(envelopes)


async def _workspace(db: Database) -> tuple[int, int]:
    async with db.transaction() as conn:
        wid = await queries.create_workspace(conn, unique_database_name("ws"), 0)
        user = await queries.create_user(conn, wid, "ada", "Ada", "owner", 0)
    return wid, user.id


def _event(text: str) -> wire.Event:
    message = wire.Message(
        id=1, channel_id=1, seq=1, user_id=1, client_msg_id=text, text=text, ts=0
    )
    return wire.MessagePosted(seq=0, workspace_id=0, ts=0, message=message)


async def test_operations_commit_in_order_with_contiguous_event_numbers(db: Database) -> None:
    wid, _ = await _workspace(db)
    bus = LocalBus()
    recorder = Recorder()
    await bus.subscribe(wid, recorder)
    journal = Journal(db, bus)

    def op(i: int):  # type: ignore[no-untyped-def]
        async def run(tx: Tx) -> int:
            tx.emit(_event(f"m{i}"), Audience(channel_id=1))
            return i

        return run

    # Submitted without awaiting in between: they share transactions (group commit).
    results = await asyncio.gather(*(journal.run(wid, op(i)) for i in range(50)))
    await journal.close()

    assert results == list(range(50))
    seqs = [e.seq for e in recorder.seen]
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    texts = [json.loads(e.payload)["message"]["text"] for e in recorder.seen]
    assert texts == [f"m{i}" for i in range(50)]
    assert recorder.batches < 50  # batched, not one transaction per operation
    async with db.connection() as conn:
        logged = await queries.events_between(conn, wid, 0, 1000)
    assert [r["seq"] for r in logged] == seqs
    assert [r["payload"].encode() for r in logged] == [e.payload for e in recorder.seen]
    assert all(json.loads(e.payload)["seq"] == e.seq for e in recorder.seen)


async def test_refused_operation_rolls_back_alone(db: Database) -> None:
    wid, uid = await _workspace(db)
    journal = Journal(db, LocalBus())

    async def good(tx: Tx) -> str:
        await queries.update_user_profile(tx.conn, uid, {"display_name": "Ada L."})
        tx.emit(_event("kept"), Audience(channel_id=1))
        return "ok"

    async def refused(tx: Tx) -> str:
        await queries.update_user_profile(tx.conn, uid, {"real_name": "should vanish"})
        tx.emit(_event("dropped"), Audience(channel_id=1))
        raise ChatError(ErrorCode.FORBIDDEN)

    outcomes = await asyncio.gather(
        journal.run(wid, good), journal.run(wid, refused), return_exceptions=True
    )
    await journal.close()

    assert outcomes[0] == "ok"
    assert isinstance(outcomes[1], ChatError) and outcomes[1].code is ErrorCode.FORBIDDEN
    async with db.connection() as conn:
        user = await queries.get_user(conn, uid)
        logged = await queries.events_between(conn, wid, 0, 10)
    assert user is not None
    assert (user.display_name, user.real_name) == ("Ada L.", "")
    assert [json.loads(r["payload"])["message"]["text"] for r in logged] == ["kept"]


async def test_failing_operation_does_not_poison_the_batch(db: Database) -> None:
    """A database error inside one operation (not a ChatError) is confined to it too."""
    wid, uid = await _workspace(db)
    journal = Journal(db, LocalBus())

    async def broken(tx: Tx) -> None:
        await tx.conn.execute("INSERT INTO no_such_table VALUES ($1)", 1)

    async def fine(tx: Tx) -> int:
        user = await queries.get_user(tx.conn, uid)
        assert user is not None
        return user.id

    outcomes = await asyncio.gather(
        journal.run(wid, broken), journal.run(wid, fine), return_exceptions=True
    )
    await journal.close()
    assert isinstance(outcomes[0], StorageError)
    assert outcomes[1] == uid


def test_sqlite_translation_of_postgres_dialect() -> None:
    assert translate("SELECT * FROM t WHERE a = $1 AND b = $2") == (
        "SELECT * FROM t WHERE a = ?1 AND b = ?2"
    )
    assert translate("WHERE id = ANY($2::bigint[])") == (
        "WHERE id IN (SELECT value FROM json_each(?2))"
    )
    assert translate("AND NOT $4::boolean") == "AND NOT ?4"
    assert translate("SELECT id FROM workspaces WHERE id = $1 FOR UPDATE") == (
        "SELECT id FROM workspaces WHERE id = ?1"
    )


# --------------------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (asyncpg.DeadlockDetectedError("deadlock"), TransactionConflict),
        (asyncpg.SerializationError("serialization"), TransactionConflict),
        (asyncpg.ConnectionDoesNotExistError("lost"), Unavailable),
        (asyncpg.CannotConnectNowError("starting"), Unavailable),
        (asyncpg.AdminShutdownError("terminated"), Unavailable),
        (asyncpg.TooManyConnectionsError("full"), Unavailable),
        (asyncpg.InterfaceError("connection is closed"), Unavailable),
        (ConnectionRefusedError(111, "refused"), Unavailable),
        (TimeoutError(), Unavailable),
        (asyncpg.UniqueViolationError("dup"), UniqueViolation),
        (asyncpg.UndefinedTableError("no table"), StorageError),
    ],
)
def test_defect_22_postgres_errors_map_onto_the_store_vocabulary(
    raised: BaseException, expected: type[StorageError]
) -> None:
    mapped = classify(raised)
    assert type(mapped) is expected


def test_defect_09_a_lost_connection_during_commit_is_an_unknown_outcome() -> None:
    # The connection died while COMMIT was in flight: nobody knows.
    for lost in (
        asyncpg.ConnectionDoesNotExistError("lost"),
        ConnectionResetError(),
        TimeoutError(),
    ):
        assert type(commit_failure(lost)) is OutcomeUnknown
    # The server answered COMMIT with a refusal: definitely not committed.
    assert type(commit_failure(asyncpg.SerializationError("x"))) is TransactionConflict
    assert type(commit_failure(asyncpg.UniqueViolationError("x"))) is UniqueViolation
    # Cancellation and bugs are not the store's to translate.
    assert commit_failure(asyncio.CancelledError()) is None
    assert commit_failure(ValueError("bug")) is None


# --------------------------------------------------------------------------- publishing


class GatedBus:
    """A bus whose publish waits until the test opens the gate: a Redis that does not
    answer, without the Redis."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.published: list[Envelope] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        await self.gate.wait()
        self.published.extend(envelopes)

    async def subscribe(self, workspace_id: int, subscriber: object) -> None:
        return None

    def unsubscribe(self, workspace_id: int, subscriber: object) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_defect_10_replies_do_not_wait_for_the_bus_and_publish_in_commit_order(
    db: Database,
) -> None:
    wid, _ = await _workspace(db)
    bus = GatedBus()
    journal = Journal(db, bus)  # type: ignore[arg-type]

    def op(i: int):  # type: ignore[no-untyped-def]
        async def run(tx: Tx) -> int:
            tx.emit(_event(f"m{i}"), Audience(channel_id=1))
            return i

        return run

    # Several batches commit and are answered while the bus does not answer at all.
    results = []
    for i in range(5):
        results.append(await asyncio.wait_for(journal.run(wid, op(i)), scaled(10)))
    assert results == list(range(5))
    assert bus.published == []
    bus.gate.set()
    await journal.close()
    seqs = [e.seq for e in bus.published]
    assert seqs == sorted(seqs) and len(seqs) == 5
    texts = [json.loads(e.payload)["message"]["text"] for e in bus.published]
    assert texts == [f"m{i}" for i in range(5)]


async def test_defect_10_close_flushes_the_publisher_within_its_bound(db: Database) -> None:
    wid, _ = await _workspace(db)
    bus = GatedBus()  # never opens: close() must still return
    journal = Journal(db, bus, flush_timeout_s=0.1)  # type: ignore[arg-type]

    async def op(tx: Tx) -> None:
        tx.emit(_event("stuck"), Audience(channel_id=1))

    await journal.run(wid, op)
    await asyncio.wait_for(journal.close(), scaled(10))
    assert bus.published == []
    async with db.connection() as conn:  # committed: the outbox has it for the sweeper
        logged = await queries.events_between(conn, wid, 0, 10)
    assert [json.loads(r["payload"])["message"]["text"] for r in logged] == ["stuck"]
