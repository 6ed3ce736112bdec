"""Security regressions of issue 6: who receives channel metadata (defect 12), login limits
(defect 13) and where the signing secret lives (defect 14). Integration tests run a real node
on both stores; the limiter and the secret file also have unit tests without sockets."""

from __future__ import annotations

import asyncio
import itertools
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chat.client import Client
from chat.errors import ChatError, ErrorCode
from chat.identity import HashPool, LoginGuard, TokenBuckets
from chat.storage import open_database, queries
from tests.conftest import PostgresFixture
from tests.harness import RunningNode, running_node
from tests.pg import unique_database_name
from tests.timing import scaled

OWNER, GUEST = "olivia", "gus"
_barriers = (f"barrier-{i}" for i in itertools.count())


async def events_until_barrier(node: RunningNode, olivia: Client, gus: Client) -> list[Any]:
    """gus's events up to a message olivia posts in general (gus is a member there): events
    arrive in order, so anything meant for gus before it has arrived by then."""
    barrier = await olivia.request(
        "messages.post", channel_id=node.general, client_msg_id=next(_barriers), text="barrier"
    )
    seen: list[Any] = []
    while True:
        event = await gus.next_event(timeout=scaled(5))
        if event["type"] == "message.posted" and event["message"]["id"] == barrier["message"]["id"]:
            return seen
        seen.append(event)


async def test_defect_12_guest_gets_no_public_channel_metadata_until_promoted(
    node: RunningNode,
) -> None:
    async with node.clients(OWNER, GUEST) as (olivia, gus):
        created = await olivia.request(
            "channels.create", name="plans", topic="the secret plans", purpose="p"
        )
        cid = created["channel"]["id"]
        await olivia.request("channels.update", channel_id=cid, topic="still secret")
        await olivia.request("channels.archive", channel_id=cid)
        seen = await events_until_barrier(node, olivia, gus)
        leaked = [e for e in seen if e.get("channel", {}).get("id") == cid]
        assert leaked == [], leaked  # before the fix: created, updated, archived
        # The same rule as reads: to a guest the channel does not exist.
        frame = await gus.request_frame("channels.info", channel_id=cid)
        assert frame["code"] == "channel_not_found"

        await olivia.request("users.set_role", user_id=node.users[GUEST], role="member")
        promoted = await gus.next_event("user.updated", timeout=scaled(5))
        assert promoted["user"]["role"] == "member"
        await olivia.request("channels.unarchive", channel_id=cid)
        await olivia.request("channels.update", channel_id=cid, topic="now open")
        seen = await events_until_barrier(node, olivia, gus)
        kinds = [e["type"] for e in seen if e.get("channel", {}).get("id") == cid]
        assert kinds == ["channel.unarchived", "channel.updated"], seen
        info = await gus.request("channels.info", channel_id=cid)
        assert info["channel"]["topic"] == "now open"


# --------------------------------------------------------------------------- defect 13


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(guard: LoginGuard, ip: str | None, account: str) -> int | None:
    """None if the attempt may go ahead (and takes its tokens), else retry_after_ms."""
    try:
        guard.begin(ip, account)
    except ChatError as exc:
        assert exc.code is ErrorCode.RATE_LIMITED
        assert exc.message == "too many login attempts"
        return exc.retry_after_ms
    return None


def test_defect_13_per_ip_limit_refills_over_the_window() -> None:
    clock = FakeClock()
    guard = LoginGuard(per_ip=3, per_account=100, window_s=60, clock=clock)
    for i in range(3):
        assert refusal(guard, "10.0.0.1", f"acme\x00user{i}") is None
    # The 4th from that IP, whatever the account, waits for a token: 60 s / 3 = 20 s.
    assert refusal(guard, "10.0.0.1", "acme\x00other") == 20_000
    assert refusal(guard, "10.0.0.2", "acme\x00other") is None  # another IP is not limited
    clock.now += 19.0
    assert refusal(guard, "10.0.0.1", "acme\x00other") == 1_000
    clock.now += 1.0
    assert refusal(guard, "10.0.0.1", "acme\x00other") is None


def test_defect_13_per_account_limit_and_success_resets_it() -> None:
    clock = FakeClock()
    guard = LoginGuard(per_ip=100, per_account=2, window_s=10, clock=clock)
    account = LoginGuard.account_key("acme", "mia")
    assert refusal(guard, "10.0.0.1", account) is None
    assert refusal(guard, "10.0.0.2", account) is None
    # From any IP: the account is out of tokens.
    assert refusal(guard, "10.0.0.3", account) == 5_000
    clock.now += 5.0
    assert refusal(guard, "10.0.0.3", account) is None
    guard.succeeded("10.0.0.3", account)  # a successful login: only failures count
    assert refusal(guard, "10.0.0.3", account) is None
    assert refusal(guard, "10.0.0.3", account) is None
    assert refusal(guard, "10.0.0.3", account) is not None


def test_defect_13_a_refused_attempt_takes_no_tokens() -> None:
    guard = LoginGuard(per_ip=1, per_account=1, window_s=10, clock=FakeClock())
    a, b = LoginGuard.account_key("acme", "a"), LoginGuard.account_key("acme", "b")
    assert refusal(guard, "ip", a) is None
    assert refusal(guard, "ip", b) is not None  # the IP is out
    assert refusal(guard, "other-ip", b) is None  # b's own bucket was not charged


def test_defect_13_buckets_are_bounded() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(2, 1.0, clock, max_keys=10)
    for i in range(10):
        buckets.take(f"k{i}")
    clock.now += 5.0  # all refilled
    buckets.take("new")
    assert len(buckets) == 1
    for i in range(30):
        buckets.take(f"busy{i}")
    assert len(buckets) <= 10


async def test_defect_13_hashing_has_a_bounded_queue() -> None:
    pool = HashPool(workers=1, queue=1)
    try:
        running = [asyncio.create_task(pool.verify(None, "pw")) for _ in range(2)]
        await asyncio.sleep(0)  # both are submitted: one hashing, one waiting
        with pytest.raises(ChatError) as refused:
            await pool.verify(None, "pw")
        assert refused.value.code is ErrorCode.RATE_LIMITED
        assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms > 0
        assert await asyncio.gather(*running) == [False, False]
        assert await pool.verify(None, "pw") is False  # room again
    finally:
        pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def limited_node(
    store: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningNode]:
    """Like the ``node`` fixture, with a login limit of 3 attempts per IP."""
    limits = {"login_attempts_per_ip": 3, "login_attempts_per_account": 100}
    if store == "postgres":
        pg: PostgresFixture = request.getfixturevalue("postgres_server")
        name = unique_database_name("limits")
        dsn = await pg.create_database(name)
        async with running_node(database_url=dsn, **limits) as n:
            yield n
        await pg.drop_database(name)
    else:
        path = tmp_path_factory.mktemp("sqlite") / "chat.sqlite3"
        async with running_node(sqlite_path=str(path), **limits) as n:
            yield n


async def login(node: RunningNode, password: str) -> dict[str, Any]:
    async with Client.connect(node.url) as c:
        return await c.request_frame(
            "login", workspace="acme", handle="mia", password=password, timeout=scaled(10)
        )


async def test_defect_13_bad_passwords_from_one_ip_are_rate_limited(
    limited_node: RunningNode,
) -> None:
    node = limited_node
    for _ in range(3):
        frame = await login(node, "wrong")
        assert (frame["type"], frame["code"]) == ("error", "invalid_auth")
    # Before the fix: invalid_auth forever, each after a full argon2 hash.
    frame = await login(node, "wrong")
    assert (frame["type"], frame["code"]) == ("error", "rate_limited"), frame
    assert frame["retry_after_ms"] > 0
    frame = await login(node, "correct horse battery staple")  # the right one waits too
    assert frame["code"] == "rate_limited"
    # Token authentication costs no hashing and is not limited.
    async with node.client("mia") as mia:
        assert await mia.request("ping")


# --------------------------------------------------------------------------- defect 14


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_defect_14_generated_secret_is_in_a_private_file_not_the_database(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "chat.sqlite3"
    # The harness opens the store twice without a configured secret: once as `chat admin`
    # (seeding, issuing tokens), once as `chat serve`; the tokens must work on the node.
    async with running_node(sqlite_path=str(db_path), secret_key="") as node:
        async with node.client("mia") as mia:
            assert await mia.request("ping")
        secret_file = tmp_path / "chat.secret"
        secret = secret_file.read_text().strip()
        assert secret == node.node.settings.secret_key == node.admin.settings.secret_key
        assert mode(secret_file) == 0o600
        files = [db_path, *(p for p in (tmp_path / "chat.sqlite3-wal",) if p.exists())]
        files += [p for p in (tmp_path / "chat.sqlite3-shm",) if p.exists()]
        for path in files:
            assert mode(path) == 0o600, path  # before the fix: 0644
        async with node.admin.db.connection() as conn:
            assert await queries.get_meta(conn, "token_secret") is None
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


async def test_defect_14_a_secret_kept_in_meta_moves_to_the_file(tmp_path: Path) -> None:
    db_path = tmp_path / "chat.sqlite3"
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)  # as created by an older version
    legacy = "legacy-secret-from-the-meta-table-0123456789abcdef"
    db = await open_database("", str(db_path))
    try:
        async with db.transaction() as conn:
            # As an older version stored it: a row in the meta table.
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2)", "token_secret", legacy
            )
    finally:
        await db.close()
    async with running_node(sqlite_path=str(db_path), secret_key="") as node:
        # Tokens signed with the old secret stay valid.
        assert node.node.settings.secret_key == legacy
        assert (tmp_path / "chat.secret").read_text().strip() == legacy
        async with node.admin.db.connection() as conn:
            assert await queries.get_meta(conn, "token_secret") is None
        assert mode(db_path) == 0o600
        async with node.client("olivia") as olivia:
            assert await olivia.request("ping")
