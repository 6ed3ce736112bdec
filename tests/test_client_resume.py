"""The resilient client against a real node (both stores) and against scripted fake servers.

Real node: a dropped connection resumes and every missed event arrives once, in order; a
resume the server cannot honour resets; revoked or bad tokens stop the client instead of a
reconnect loop; heartbeats keep an idle connection up; posts survive a drop.

Fake servers (a few lines of websockets each) pin down the client's side of the contract
exactly: what ``auth`` carries, de-duplication around a replay, the heartbeat's dead-peer
detection, and the ``goodbye`` hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from chat.client import Backoff, Client, FatalConnectionError, ResilientClient
from chat.metrics import TALLY
from chat.server import Node
from tests.cluster import TempRedis
from tests.conftest import PostgresFixture
from tests.harness import RunningNode, running_node
from tests.pg import unique_database_name
from tests.timing import Fixed, scaled

Frame = dict[str, Any]


def fixed_backoff(seconds: float) -> Backoff:
    """Every reconnect waits exactly ``seconds``."""
    return Backoff(base=seconds, cap=seconds, rng=Fixed(1.0))


async def posted_texts(rc: ResilientClient, count: int) -> list[Frame]:
    out: list[Frame] = []
    while len(out) < count:
        out.append(await rc.next_event("message.posted", timeout=scaled(10)))
    return out


async def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(scaled(timeout)):
        while not predicate():  # noqa: ASYNC110 -- polls counters that have no event
            await asyncio.sleep(0.01)


# =========================================================================== real node


async def test_first_connect_emits_a_fresh_reset(node: RunningNode) -> None:
    async with ResilientClient(node.url, node.tokens["mia"]) as rc:
        await rc.wait_connected(scaled(10))
        reset = await rc.next_event(timeout=scaled(5))
        assert reset == {"type": "client.reset", "reason": "fresh", "seq": rc.session["seq"]}
        assert rc.session["user"]["handle"] == "mia"
        assert rc.position == rc.session["seq"]
        assert (rc.connects, rc.resumes) == (1, 0)


async def test_drop_then_resume_replays_every_missed_event_once_in_order(
    node: RunningNode,
) -> None:
    # The reconnect waits 1 s, time for olivia's 30 posts to land while mia is away.
    async with (
        ResilientClient(node.url, node.tokens["mia"], backoff=fixed_backoff(scaled(1))) as rc,
        node.client("olivia") as olivia,
    ):
        await rc.wait_connected(scaled(10))
        assert (await rc.next_event("client.reset"))["reason"] == "fresh"
        before = rc.position
        rc.drop()
        await wait_for(lambda: rc.client is None)
        for i in range(30):
            await olivia.request(
                "messages.post", channel_id=node.general, client_msg_id=f"r{i}", text=f"m{i}"
            )

        frames: list[Frame] = []

        async def until_posted(count: int) -> None:
            while len([f for f in frames if f["type"] == "message.posted"]) < count:
                frames.append(await rc.next_event(timeout=scaled(10)))

        await until_posted(30)
        await olivia.request(
            "messages.post", channel_id=node.general, client_msg_id="r30", text="m30"
        )
        await until_posted(31)
        await asyncio.sleep(0.2)
        frames += rc.drain_events()

        assert rc.connects == 2
        assert rc.resumes == 1
        assert rc.session["resumed"] is True
        assert rc.session["resume_error"] is None
        assert not [f for f in frames if f["type"] == "client.reset"], frames
        posted = [f for f in frames if f["type"] == "message.posted"]
        assert [p["message"]["text"] for p in posted] == [f"m{i}" for i in range(31)]
        seqs = [p["seq"] for p in posted]
        assert seqs == sorted(set(seqs))
        assert seqs[0] > before
        # The resumed frame follows the replayed events and says how many there were (events
        # committed during the replay may come before it too).
        kinds = [f["type"] for f in frames]
        assert kinds.count("resumed") == 1
        at = kinds.index("resumed")
        resumed = frames[at]
        assert 1 <= resumed["replayed"] <= 30
        durable_before = [f for f in frames[:at] if f.get("seq") is not None]
        assert len(durable_before) >= resumed["replayed"]
        assert resumed["seq"] >= durable_before[resumed["replayed"] - 1]["seq"]
        assert rc.position == seqs[-1]


async def test_resume_from_a_future_seq_resets(node: RunningNode) -> None:
    async with (
        ResilientClient(node.url, node.tokens["mia"], backoff=fixed_backoff(0.05)) as rc,
        node.client("olivia") as olivia,
    ):
        await rc.wait_connected(scaled(10))
        assert (await rc.next_event("client.reset"))["reason"] == "fresh"
        rc.cursor.reset(rc.position + 1_000_000)
        rc.drop()
        reset = await rc.next_event("client.reset", timeout=scaled(10))
        assert reset["reason"] == "future_seq"
        assert rc.session["resumed"] is False
        assert rc.session["resume_error"] == "future_seq"
        assert reset["seq"] == rc.session["seq"] == rc.position
        assert (rc.connects, rc.resumes) == (2, 0)
        # Live delivery carries on from the reset position.
        await olivia.request(
            "messages.post", channel_id=node.general, client_msg_id="f1", text="after reset"
        )
        event = await rc.next_event("message.posted", timeout=scaled(5))
        assert event["message"]["text"] == "after reset"
        assert event["seq"] > reset["seq"]


async def test_revoking_own_session_is_fatal_and_does_not_reconnect(node: RunningNode) -> None:
    async with ResilientClient(node.url, node.tokens["mia"], backoff=fixed_backoff(0.01)) as rc:
        await rc.wait_connected(scaled(10))
        assert (await rc.request("sessions.revoke"))["revoked"] == 1
        seen = []
        with pytest.raises(FatalConnectionError) as raised:
            while True:
                seen.append((await rc.next_event(timeout=scaled(5)))["type"])
        assert raised.value is rc.fatal
        assert (raised.value.code, raised.value.reason) == (1008, "token_revoked")
        assert "session.revoked" in seen
        await asyncio.sleep(0.2)
        assert (rc.attempts, rc.connects) == (1, 1)
        with pytest.raises(FatalConnectionError):
            await rc.request("ping")
        with pytest.raises(FatalConnectionError):
            await rc.wait_connected()


async def test_deactivation_is_fatal(node: RunningNode) -> None:
    async with (
        ResilientClient(node.url, node.tokens["mia"], backoff=fixed_backoff(0.01)) as rc,
        node.client("adam") as adam,
    ):
        await rc.wait_connected(scaled(10))
        await adam.request("users.deactivate", user_id=node.users["mia"])
        with pytest.raises(FatalConnectionError):
            async for _ in rc.events():
                pass
        assert rc.fatal is not None
        assert rc.fatal.code == 1008
        assert rc.fatal.reason in ("token_revoked", "account_inactive")
        await asyncio.sleep(0.2)
        assert rc.attempts == 1


async def test_a_bad_token_is_fatal_at_once(node: RunningNode) -> None:
    async with ResilientClient(node.url, "not-a-token", backoff=fixed_backoff(0.01)) as rc:
        with pytest.raises(FatalConnectionError):
            await rc.wait_connected(scaled(10))
        assert rc.fatal is not None
        assert rc.fatal.reason == "invalid_auth"
        await asyncio.sleep(0.1)
        assert (rc.attempts, rc.connects) == (1, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rotates_past_a_dead_url(node: RunningNode) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/"
    async with ResilientClient(
        [dead, node.url], node.tokens["mia"], backoff=fixed_backoff(0.01)
    ) as rc:
        await rc.wait_connected(scaled(10))
        assert (rc.attempts, rc.connects) == (2, 1)
        assert rc.last_close is not None
        assert rc.last_close[0] is None  # refused: no close at all


async def test_post_survives_a_drop_and_is_stored_once(node: RunningNode) -> None:
    async with (
        ResilientClient(node.url, node.tokens["mia"], backoff=fixed_backoff(0.05)) as rc,
        node.client("olivia") as olivia,
    ):
        await rc.wait_connected(scaled(10))
        # Drop right after the post leaves: it may or may not have been stored; the retry
        # with the same client_msg_id is acknowledged either way, and stored once.
        posting = asyncio.ensure_future(
            rc.post(node.general, "survivor", client_msg_id="once", timeout=scaled(10))
        )
        await asyncio.sleep(0)
        rc.drop()
        reply = await posting
        assert reply["message"]["client_msg_id"] == "once"
        assert rc.connects == 2
        history = await olivia.request("messages.history", channel_id=node.general, limit=50)
        assert [m["text"] for m in history["messages"]].count("survivor") == 1
        # And a post while connected is plain.
        again = await rc.post(node.general, "second")
        assert again["duplicate"] is False


async def test_request_fails_with_connection_error_when_the_connection_drops(
    node: RunningNode,
) -> None:
    async with ResilientClient(node.url, node.tokens["mia"], backoff=fixed_backoff(0.05)) as rc:
        client = await rc.wait_connected(scaled(10))
        request = asyncio.ensure_future(rc.request("messages.history", channel_id=node.general))
        await asyncio.sleep(0)
        client.abort()
        with contextlib.suppress(ConnectionError):
            await request  # unless the reply won the race
        await rc.wait_connected(scaled(10))
        assert rc.connects == 2
        assert "messages" in await rc.request("messages.history", channel_id=node.general)


async def test_heartbeats_keep_an_idle_connection_up(tmp_path: Path) -> None:
    async with (
        running_node(sqlite_path=str(tmp_path / "hb.sqlite3"), heartbeat_interval_ms=300) as n,
        ResilientClient(n.url, n.tokens["mia"]) as rc,
    ):
        client = await rc.wait_connected(scaled(10))
        assert client.hello["heartbeat_interval_ms"] == 300
        frames_in = TALLY.frames_in
        await asyncio.sleep(1.5)  # five intervals, idle
        assert rc.pings >= 3
        assert TALLY.frames_in - frames_in >= 3
        assert rc.client is client
        assert not client.closed.is_set()
        assert rc.connects == 1


async def test_without_heartbeats_the_server_cuts_an_idle_connection_and_it_resumes(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "nohb.sqlite3")
    async with (
        running_node(sqlite_path=path, heartbeat_interval_ms=200) as n,
        ResilientClient(n.url, n.tokens["mia"], heartbeat=False, backoff=fixed_backoff(0.01)) as rc,
    ):
        await wait_for(lambda: rc.connects >= 2, timeout=5)
        assert rc.last_close == (4000, "heartbeat_timeout")
        assert rc.resumes >= 1
        assert rc.pings == 0


async def test_resume_outside_the_replay_window_resets_too_old(tmp_path: Path) -> None:
    path = str(tmp_path / "window.sqlite3")
    async with (
        running_node(sqlite_path=path, replay_max_events=5, replay_window_s=0) as n,
        ResilientClient(n.url, n.tokens["mia"], backoff=fixed_backoff(scaled(1))) as rc,
        n.client("olivia") as olivia,
    ):
        await rc.wait_connected(scaled(10))
        assert (await rc.next_event("client.reset"))["reason"] == "fresh"
        rc.drop()
        await wait_for(lambda: rc.client is None)
        for i in range(10):
            await olivia.request(
                "messages.post", channel_id=n.general, client_msg_id=f"w{i}", text=f"w{i}"
            )
        reset = await rc.next_event("client.reset", timeout=scaled(10))
        assert reset["reason"] == "too_old"
        assert (rc.connects, rc.resumes) == (2, 0)
        assert rc.position == reset["seq"] == rc.session["seq"]


async def test_fails_over_to_another_node_when_one_drains(
    postgres_server: PostgresFixture,
) -> None:
    # Two nodes over one PostgreSQL and Redis. mia is on A, olivia on B; A drains (goodbye,
    # 1012) while olivia posts: mia moves to B, resumes, and sees every post once, in order.
    name = unique_database_name("rcfail")
    dsn = await postgres_server.create_database(name)
    try:
        with TempRedis() as redis:
            async with running_node(database_url=dsn, redis_url=redis.url, drain_period_s=0.2) as a:
                b = Node(a.settings.model_copy(update={"port": 0, "node_id": "node-b"}))
                await b.start()
                b_url = f"ws://127.0.0.1:{b.port}/"
                try:
                    async with (
                        ResilientClient(
                            [a.url, b_url], a.tokens["mia"], backoff=fixed_backoff(0.05)
                        ) as rc,
                        Client.connect(b_url, a.tokens["olivia"]) as olivia,
                    ):
                        client = await rc.wait_connected(scaled(10))
                        assert client.ws.remote_address[1] == a.node.port

                        async def post(i: int) -> None:
                            await olivia.request(
                                "messages.post",
                                channel_id=a.general,
                                client_msg_id=f"fo{i}",
                                text=f"fo{i}",
                            )

                        for i in range(5):
                            await post(i)
                        stopping = asyncio.ensure_future(a.node.stop())
                        for i in range(5, 15):
                            await post(i)
                        await stopping
                        posted = await posted_texts(rc, 15)
                        assert [p["message"]["text"] for p in posted] == [
                            f"fo{i}" for i in range(15)
                        ]
                        seqs = [p["seq"] for p in posted]
                        assert seqs == sorted(set(seqs))
                        assert rc.last_close == (1012, "service_restart")
                        assert (rc.connects, rc.resumes) == (2, 1)
                        live = await rc.wait_connected(scaled(10))
                        assert live.ws.remote_address[1] == b.port
                        await post(15)
                        last = await rc.next_event("message.posted", timeout=scaled(5))
                        assert last["message"]["text"] == "fo15"
                        await asyncio.sleep(0.1)
                        assert not [e for e in rc.drain_events() if e["type"] == "message.posted"]
                finally:
                    await b.stop()
    finally:
        await postgres_server.drop_database(name)


async def test_a_closing_client_ends_the_event_stream(node: RunningNode) -> None:
    rc = ResilientClient(node.url, node.tokens["mia"])
    async with rc:
        await rc.wait_connected(scaled(10))
    assert [e["type"] async for e in rc.events()] == ["client.reset"]
    assert rc.fatal is None
    assert rc.client is None


# =========================================================================== fake servers

Script = Callable[[ServerConnection, int, Frame], Awaitable[None]]


class Fake:
    """A scripted server: hello, read auth, then ``script(ws, n, auth)`` (n: 0, 1, ...)."""

    def __init__(self, script: Script, heartbeat_interval_ms: int = 0) -> None:
        self.script = script
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.auths: list[Frame] = []
        self.times: list[float] = []
        self.closed_at: list[float] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        hello = {
            "type": "hello",
            "server_version": "fake",
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "limits": {},
        }
        await ws.send(json.dumps(hello))
        auth = json.loads(await ws.recv())
        self.auths.append(auth)
        self.times.append(loop.time())
        try:
            await self.script(ws, len(self.auths) - 1, auth)
        finally:
            self.closed_at.append(loop.time())


@contextlib.asynccontextmanager
async def fake_server(script: Script, heartbeat_interval_ms: int = 0) -> AsyncIterator[Fake]:
    fake = Fake(script, heartbeat_interval_ms)
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        fake.port = server.sockets[0].getsockname()[1]
        yield fake


def reply(auth: Frame, seq: int, resumed: bool = False, error: str | None = None) -> str:
    data = {
        "user": {"id": 3, "workspace_id": 1, "handle": "mia", "display_name": "Mia"},
        "workspace_id": 1,
        "workspace_name": "acme",
        "session_id": "s_fake",
        "seq": seq,
        "token": None,
        "resumed": resumed,
        "resume_error": error,
    }
    return json.dumps({"type": "reply", "reply_to": auth["id"], "data": data})


def event(seq: int | None, kind: str = "message.posted") -> str:
    return json.dumps({"type": kind, "seq": seq, "n": seq})


async def idle(ws: ServerConnection) -> None:
    """Read (and ignore) until the client goes away."""
    async for _ in ws:
        pass


async def test_fake_resume_sends_position_and_dedups_around_the_replay() -> None:
    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        if n == 0:
            await ws.send(reply(auth, 5))
            for seq in (6, 7):
                await ws.send(event(seq))
            await ws.send(event(None, "typing"))
            await ws.close(1011)
        else:
            await ws.send(reply(auth, 12, resumed=True))
            for seq in (6, 7, 8, 10):  # a sloppy replay: 6 and 7 again
                await ws.send(event(seq))
            await ws.send(json.dumps({"type": "resumed", "seq": 12, "replayed": 4}))
            for seq in (10, 12, 13):  # live overlap
                await ws.send(event(seq))
            await idle(ws)

    async with (
        fake_server(script) as fake,
        ResilientClient(fake.url, "tok", backoff=fixed_backoff(0.01)) as rc,
    ):
        got: list[tuple[str, int | None]] = []
        while len(got) < 8:
            e = await rc.next_event(timeout=scaled(5))
            got.append((e["type"], e.get("seq")))
        assert got == [
            ("client.reset", 5),
            ("message.posted", 6),
            ("message.posted", 7),
            ("typing", None),
            ("message.posted", 8),
            ("message.posted", 10),
            ("resumed", 12),
            ("message.posted", 13),
        ]
        await asyncio.sleep(0.1)
        assert rc.drain_events() == []  # 10 and 12 again were refused
        assert rc.cursor.duplicates == 4  # 6, 7 replayed; 10, 12 live
        assert "resume" not in fake.auths[0]
        assert fake.auths[0]["token"] == "tok"
        assert fake.auths[1]["resume"] == {"session_id": "s_fake", "seq": 7}
        assert (rc.connects, rc.resumes, rc.position) == (2, 1, 13)


async def test_fake_refused_resume_resets_with_the_servers_reason() -> None:
    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        if n == 0:
            await ws.send(reply(auth, 100))
            await ws.send(event(101))
            await ws.close(4001)
        else:
            await ws.send(reply(auth, 900, resumed=False, error="too_old"))
            await ws.send(event(901))
            await idle(ws)

    async with (
        fake_server(script) as fake,
        ResilientClient(fake.url, "tok", backoff=fixed_backoff(0.01)) as rc,
    ):
        kinds = [(await rc.next_event(timeout=scaled(5))) for _ in range(4)]
        assert [(e["type"], e.get("seq")) for e in kinds] == [
            ("client.reset", 100),
            ("message.posted", 101),
            ("client.reset", 900),
            ("message.posted", 901),
        ]
        assert kinds[2]["reason"] == "too_old"
        assert fake.auths[1]["resume"]["seq"] == 101
        assert rc.last_close == (4001, "")


async def test_fake_silent_server_is_detected_by_the_heartbeat() -> None:
    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        await ws.send(reply(auth, 1))
        pings = 0
        async for raw in ws:  # never answers: alive at the TCP level, silent above it
            assert json.loads(raw)["type"] == "ping"
            pings += 1
        assert pings >= 1

    async with (
        fake_server(script, heartbeat_interval_ms=200) as fake,
        ResilientClient(fake.url, "tok", backoff=fixed_backoff(0.01)) as rc,
    ):
        await wait_for(lambda: rc.connects >= 2, timeout=5)
        # First ping within one interval (jittered), then one interval of silence: <= 0.4 s.
        assert fake.closed_at[0] - fake.times[0] < scaled(0.4) + 0.2
        assert rc.last_close == (1006, "")


async def test_fake_heartbeat_ping_is_jittered_and_pongs_are_not_events() -> None:
    pings_at: list[float] = []

    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        await ws.send(reply(auth, 1))
        async for raw in ws:
            frame = json.loads(raw)
            pings_at.append(asyncio.get_running_loop().time())
            await ws.send(json.dumps({"type": "reply", "reply_to": frame["id"], "data": {}}))

    async with (
        fake_server(script, heartbeat_interval_ms=200) as fake,
        ResilientClient(fake.url, "tok", rng=Fixed(0.25)) as rc,
    ):
        await rc.next_event("client.reset")
        await wait_for(lambda: len(pings_at) >= 3)
        first = pings_at[0] - fake.times[0]
        assert 0.04 <= first < 0.05 + 0.1  # 200 ms * 0.25
        gaps = [b - a for a, b in itertools.pairwise(pings_at)]
        assert all(0.18 <= g <= 0.2 + scaled(0.1) for g in gaps), gaps
        assert rc.drain_events() == []
        assert rc.connects == 1


async def test_fake_goodbye_hint_sets_the_reconnect_delay() -> None:
    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        await ws.send(reply(auth, 1))
        if n == 0:
            goodbye = {"type": "goodbye", "reason": "service_restart", "reconnect_after_ms": 300}
            await ws.send(json.dumps(goodbye))
            await ws.close(1012, "service_restart")
        else:
            await idle(ws)

    # The backoff alone would wait 5 s; the hint says 0.3 s plus up to 0.3 s of jitter, here
    # half of it: 0.45 s.
    async with (
        fake_server(script) as fake,
        ResilientClient(fake.url, "tok", backoff=fixed_backoff(5), rng=Fixed(0.5)) as rc,
    ):
        await wait_for(lambda: rc.connects == 2, timeout=3)
        waited = fake.times[1] - fake.closed_at[0]
        assert 0.4 <= waited <= 0.45 + scaled(0.3)
        assert rc.drain_events()[-1]["type"] != "goodbye"


@pytest.mark.parametrize("reason", ["token_expired", "account_inactive"])
async def test_fake_fatal_close_stops_reconnecting(reason: str) -> None:
    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        await ws.send(reply(auth, 1))
        await ws.close(1008, reason)

    async with (
        fake_server(script) as fake,
        ResilientClient(fake.url, "tok", backoff=fixed_backoff(0.01)) as rc,
    ):
        with pytest.raises(FatalConnectionError):
            async for _ in rc.events():
                pass
        await asyncio.sleep(0.2)
        assert len(fake.auths) == 1
        assert rc.fatal is not None
        assert (rc.fatal.code, rc.fatal.reason) == (1008, reason)


async def test_fake_auth_error_is_fatal_but_a_flood_close_is_not() -> None:
    async def script(ws: ServerConnection, n: int, auth: Frame) -> None:
        if n < 2:
            await ws.send(reply(auth, 1))
            await ws.close(1008, "rate_limited")
            return
        error = {
            "type": "error",
            "reply_to": auth["id"],
            "code": "token_expired",
            "message": "expired",
            "retry_after_ms": None,
        }
        await ws.send(json.dumps(error))
        await ws.close(1008, "token_expired")

    async with (
        fake_server(script) as fake,
        ResilientClient(fake.url, "tok", backoff=fixed_backoff(0.01)) as rc,
    ):
        with pytest.raises(FatalConnectionError):
            await rc.next_event("never", timeout=scaled(5))
        assert len(fake.auths) == 3
        assert (rc.connects, rc.attempts) == (2, 3)
        assert rc.fatal is not None
        assert rc.fatal.reason == "token_expired"


async def test_plain_client_still_works_alongside(node: RunningNode) -> None:
    # The single-connection Client keeps its queue-based API.
    async with Client.connect(node.url, node.tokens["mia"]) as c:
        assert c.session["user"]["handle"] == "mia"
        assert c.on_frame is None
        assert (await c.request("ping"))["server_time"] > 0
