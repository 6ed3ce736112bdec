"""Real clusters (tests/cluster.py): N ``python -m chat serve`` processes, one PostgreSQL, one
redis-server. What a client may rely on when nodes and Redis fail for real:

* every node delivers a channel's messages in one order, the order stored in PostgreSQL;
* a node SIGKILLed mid-stream: its clients resume on another node and miss nothing, get
  nothing twice; a poster that was on it retries without storing anything twice;
* Redis SIGKILLed and restarted empty mid-stream: acknowledged messages are delayed, not lost;
* a resume outside the replay window gets an explicit ``too_old``, inside it the exact gap;
* a client that stops reading is cut off (4001) while the others get everything;
* the users of a dead node turn ``away`` for the nodes that survive;
* each connection gets each event once (two races where the server sends an event twice,
  which a ResilientClient's de-duplication hides: the two "exactly once" tests);
* issue 6 regressions: a resume after Redis restarted empty replays the gap from PostgreSQL
  (defect 4); presence converges across nodes, a killed node's users turn away and default
  node ids are distinct (defect 21); posts and delivery resume after Redis froze (defect 10).

Every wait is bounded (``scaled``); every process is stopped by the fixtures, by PID.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis

from chat.bus.redis import stream_key
from chat.client import Backoff, Client, ResilientClient
from chat.config import Settings
from tests.cluster import ChatNodeProcess, Cluster, NodeProcess
from tests.conftest import MakeCluster
from tests.rawws import read_until_closed, stalled_client
from tests.timing import scaled, wait_until

Frame = dict[str, Any]
T = TypeVar("T")

# The default limit (50 requests per 10 s) is for humans; these tests post hundreds.
FAST = {"CHAT_RATE_LIMIT_PER_10S": "1000000", "CHAT_RATE_LIMIT_DISCONNECT_AFTER": "1000000"}


# --------------------------------------------------------------------------- helpers


class Recorder:
    """Every pushed frame of one client (events, control frames), with its arrival time."""

    def __init__(self, channel_id: int) -> None:
        self.channel_id = channel_id
        self.frames: list[tuple[float, Frame]] = []

    def __call__(self, frame: Frame) -> None:
        self.frames.append((time.monotonic(), frame))

    def of_type(self, kind: str) -> list[Frame]:
        return [f for _, f in self.frames if f.get("type") == kind]

    def posted(self) -> list[tuple[int, int]]:
        """(event seq, message id) of every ``message.posted`` in the channel, in order."""
        return [
            (f["seq"], f["message"]["id"])
            for f in self.of_type("message.posted")
            if f["message"]["channel_id"] == self.channel_id
        ]

    def ids(self) -> list[int]:
        return [mid for _, mid in self.posted()]

    def arrival(self) -> dict[int, float]:
        """message id -> when it (first) arrived."""
        out: dict[int, float] = {}
        for t, f in self.frames:
            if f.get("type") == "message.posted":
                out.setdefault(f["message"]["id"], t)
        return out

    async def wait_posted(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.posted()) < count:  # noqa: ASYNC110 - frames arrive by callback
                await asyncio.sleep(0.01)


def record(client: Client, channel_id: int) -> Recorder:
    """Route every event of a plain Client into a Recorder (nothing can slip in between:
    draining the queue and installing the callback happen in one step of the loop)."""
    rec = Recorder(channel_id)
    for frame in client.drain_events():
        rec(frame)
    client.on_frame = rec
    return rec


async def pump(rc: ResilientClient, rec: Recorder) -> None:
    """Everything a ResilientClient delivers, into a Recorder, until it is closed."""
    async for event in rc.events():
        rec(event)


async def stored_messages(cluster: Cluster, channel_id: int) -> list[asyncpg.Record]:
    """The channel's messages as PostgreSQL has them, in channel order."""
    conn = await asyncpg.connect(cluster.database_url, timeout=scaled(10))
    try:
        return list(
            await conn.fetch(
                "SELECT id, client_msg_id FROM messages WHERE channel_id = $1 ORDER BY seq",
                channel_id,
            )
        )
    finally:
        await conn.close()


async def stored_ids(cluster: Cluster, channel_id: int) -> list[int]:
    return [r["id"] for r in await stored_messages(cluster, channel_id)]


async def post(client: Client, channel_id: int, cmid: str, text: str) -> Frame:
    return await client.request(
        "messages.post",
        channel_id=channel_id,
        client_msg_id=cmid,
        text=text,
        timeout=scaled(20),
    )


def metric(node: NodeProcess, name: str, labels: str = "") -> float:
    """A sample of the node's /metrics (0 when absent)."""
    answer = node.http_get("/metrics")
    assert answer is not None and answer[0] == 200, f"{node.name}: /metrics gave {answer!r}"
    pattern = "^" + re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)$"
    found = re.search(pattern, answer[1].decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def ametric(node: NodeProcess, name: str, labels: str = "") -> float:
    return await asyncio.to_thread(metric, node, name, labels)


class TracingClient(ResilientClient):
    """A ResilientClient that also keeps every frame the server pushed, before its
    de-duplication, with the number of the connection it came on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: list[tuple[int, Frame]] = []

    def _on_frame(self, frame: Frame) -> None:
        self.raw.append((self.connects, frame))
        super()._on_frame(frame)

    def resent(self) -> list[tuple[int, int, str]]:
        """(connection, seq, type) of every durable event the server sent again."""
        seen: set[int] = set()
        out = []
        for conn, frame in self.raw:
            seq = frame.get("seq")
            if seq is None or frame.get("type") == "resumed":
                continue
            if seq in seen:
                out.append((conn, seq, frame["type"]))
            seen.add(seq)
        return out


def fast_backoff() -> Backoff:
    return Backoff(base=0.1, cap=1.0)


def assert_same_ids(who: str, got: list[int], want: list[int]) -> None:
    """Message by message, with the first difference in the error."""
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        assert g == w, f"{who}: message #{i} is {g}, PostgreSQL has {w}"
    assert len(got) == len(want), (
        f"{who}: received {len(got)} messages, PostgreSQL has {len(want)}; "
        f"extra {got[len(want) :][:10]}, missing {want[len(got) :][:10]}"
    )
    assert len(set(got)) == len(got), f"{who}: duplicates"


# --------------------------------------------------------------------------- 1. order


async def test_clients_on_different_nodes_see_identical_channel_order(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3, extra_env=FAST)
    seeded = cluster.seeded
    assert seeded is not None
    ch = seeded.channels["general"]
    per_poster = 50
    async with (
        cluster.client(0, "alice") as alice0,
        cluster.client(1, "bob") as bob1,
        cluster.client(0, "carol") as carol0,
        cluster.client(1, "dave") as dave1,
        cluster.client(2, "carol") as carol2,
    ):
        views = {
            "alice@node0 (poster)": record(alice0, ch),
            "bob@node1 (poster)": record(bob1, ch),
            "carol@node0": record(carol0, ch),
            "dave@node1": record(dave1, ch),
            "carol@node2": record(carol2, ch),
        }

        async def burst(client: Client, who: str) -> list[Frame]:
            replies: list[Frame] = []
            for start in range(0, per_poster, 10):  # pipelined, ten requests in flight
                replies += await asyncio.gather(
                    *(post(client, ch, f"{who}{i}", f"{who} {i}") for i in range(start, start + 10))
                )
            return replies

        a, b = await asyncio.gather(burst(alice0, "a"), burst(bob1, "b"))
        acked = {r["message"]["id"] for r in a + b}
        assert len(acked) == 2 * per_poster

        expected = await stored_ids(cluster, ch)
        assert set(expected) == acked
        for rec in views.values():
            await rec.wait_posted(len(expected), scaled(15))
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would arrive by now

        reference = views["carol@node0"].posted()
        for who, rec in views.items():
            seen = rec.posted()
            assert_same_ids(who, [mid for _, mid in seen], expected)
            assert seen == reference, f"{who} differs from carol@node0"
            seqs = [s for s, _ in seen]
            assert seqs == sorted(set(seqs)), f"{who}: seq not strictly increasing"


# --------------------------------------------------------------------------- 2. node killed


async def test_node_killed_mid_stream_clients_resume_without_loss_or_duplicates(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3, extra_env=FAST)
    seeded = cluster.seeded
    assert seeded is not None
    ch = seeded.channels["general"]
    victim, n1, n2 = cluster.urls
    total, kill_after = 200, 100
    rotations = {"bob": [victim, n1, n2], "carol": [victim, n2, n1], "dave": [victim, n1, n2]}
    receivers = {
        h: TracingClient(urls, seeded.tokens[h], backoff=fast_backoff())
        for h, urls in rotations.items()
    }
    recs = {h: Recorder(ch) for h in receivers}
    pumps: list[asyncio.Task[None]] = []
    try:
        for h, rc in receivers.items():
            rc.start()
            pumps.append(asyncio.create_task(pump(rc, recs[h])))
        for h, rc in receivers.items():
            await rc.wait_connected(scaled(10))
            assert rc.attempts == 1, f"{h} is not on the victim node"
        await wait_until(
            lambda: all(r.of_type("client.reset") for r in recs.values()), scaled(5), "resets"
        )

        async with cluster.client(1, "alice") as poster:
            acked: list[int] = []

            async def stream() -> None:
                for i in range(total):
                    reply = await post(poster, ch, f"k{i}", f"kill test {i}")
                    acked.append(reply["message"]["id"])
                    await asyncio.sleep(0.004)

            streaming = asyncio.create_task(stream())
            await wait_until(
                lambda: (
                    len(acked) >= kill_after
                    and all(len(r.posted()) >= kill_after // 2 for r in recs.values())
                ),
                scaled(20),
                "the first half of the stream",
            )
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.nodes[0].kill)  # SIGKILL, mid-stream
            at_kill = len(acked)
            await asyncio.wait_for(streaming, scaled(30))
        assert at_kill < total, "the stream ended before the kill: nothing was tested"

        expected = await stored_ids(cluster, ch)
        assert_same_ids("acknowledged (poster on a survivor)", acked, expected)
        resent: dict[str, int] = {}
        for rec in recs.values():
            await rec.wait_posted(len(expected), scaled(20))
        await asyncio.sleep(0.3)

        for h, rc in receivers.items():
            rec = recs[h]
            assert_same_ids(h, rec.ids(), expected)
            assert rc.fatal is None
            assert rc.resumes >= 1, f"{h} did not resume (connects={rc.connects})"
            assert rc.attempts >= 2
            resets = rec.of_type("client.reset")
            assert [r["reason"] for r in resets] == ["fresh"], f"{h}: {resets}"
            assert len(rec.of_type("resumed")) == rc.resumes
            # The client's de-duplication hides events the server sent twice (see the two
            # tests at the end); here only what the application sees is judged.
            resent[h] = len(rc.resent())
            first_resumed = next(t for t, f in rec.frames if f.get("type") == "resumed")
            print(f"{h}: resumed {first_resumed - killed_at:.2f}s after the kill")
        print(f"events the server sent twice, dropped by the client's de-dup: {resent}")
    finally:
        for rc in receivers.values():
            await rc.close()
        await asyncio.gather(*pumps, return_exceptions=True)


async def test_node_killed_under_its_poster_acknowledged_messages_are_stored_and_seen_once(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3, extra_env=FAST)
    seeded = cluster.seeded
    assert seeded is not None
    ch = seeded.channels["general"]
    lanes, per_lane, kill_after = 4, 50, 100
    total = lanes * per_lane
    poster = ResilientClient(cluster.urls, seeded.tokens["alice"], backoff=fast_backoff())
    async with (
        cluster.client(1, "bob") as bob1,
        cluster.client(2, "carol") as carol2,
        poster,
    ):
        views = {"bob@node1": record(bob1, ch), "carol@node2": record(carol2, ch)}
        await poster.wait_connected(scaled(10))
        assert poster.attempts == 1  # on node0, the victim
        acks: dict[str, Frame] = {}

        async def lane(k: int) -> None:
            # A few posts in flight at any time, so the kill catches some half-way: stored
            # but not acknowledged. The same client_msg_id on every retry stores them once.
            for i in range(per_lane):
                cmid = f"p{k}-{i}"
                acks[cmid] = await poster.post(ch, f"retry test {cmid}", cmid, timeout=scaled(30))
                await asyncio.sleep(0.004)

        streaming = asyncio.gather(*(lane(k) for k in range(lanes)))
        await wait_until(lambda: len(acks) >= kill_after, scaled(20), "the first half")
        await asyncio.to_thread(cluster.nodes[0].kill)
        at_kill = len(acks)
        await asyncio.wait_for(streaming, scaled(45))
        assert at_kill < total, "the stream ended before the kill: nothing was tested"
        assert poster.fatal is None
        assert poster.attempts >= 2, "the poster never left the victim"
        assert len(acks) == total

        rows = await stored_messages(cluster, ch)
        cmids = [r["client_msg_id"] for r in rows]
        assert len(cmids) == len(set(cmids)), "a retried post was stored twice"
        assert sorted(cmids) == sorted(acks)
        # Every acknowledged message is stored, once, and its ack names that row.
        by_cmid = {r["client_msg_id"]: r["id"] for r in rows}
        for cmid, ack in acks.items():
            assert ack["message"]["id"] == by_cmid[cmid], cmid
            assert ack["message"]["client_msg_id"] == cmid
        expected = [r["id"] for r in rows]
        # One lane's posts were stored in the order it sent them.
        for k in range(lanes):
            mine = [c for c in cmids if c.startswith(f"p{k}-")]
            assert mine == [f"p{k}-{i}" for i in range(per_lane)]

        for rec in views.values():
            await rec.wait_posted(len(expected), scaled(20))
        await asyncio.sleep(0.3)
        for who, rec in views.items():
            assert_same_ids(who, rec.ids(), expected)
        retried = sum(1 for a in acks.values() if a["duplicate"])
        print(f"posts answered 'duplicate' after a retry: {retried}; resumes: {poster.resumes}")


# --------------------------------------------------------------------------- 3. Redis restart


async def test_redis_restart_mid_stream_loses_no_acknowledged_message(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, extra_env=FAST)
    seeded = cluster.seeded
    redis = cluster.redis
    assert seeded is not None and redis is not None
    ch = seeded.channels["general"]
    total, restart_after = 100, 30
    async with (
        cluster.client(0, "alice") as poster,
        cluster.client(0, "bob") as bob0,
        cluster.client(1, "carol") as carol1,
        cluster.client(1, "dave") as dave1,
    ):
        views = {
            "bob@node0": record(bob0, ch),
            "carol@node1": record(carol1, ch),
            "dave@node1": record(dave1, ch),
        }
        acked: list[int] = []
        acked_at: dict[int, float] = {}
        failed: list[str] = []

        async def stream() -> None:
            for i in range(total):
                try:
                    reply = await post(poster, ch, f"r{i}", f"redis test {i}")
                except Exception as exc:  # refused or timed out: not acknowledged
                    failed.append(f"r{i}: {exc!r}")
                else:
                    acked.append(reply["message"]["id"])
                    acked_at[reply["message"]["id"]] = time.monotonic()
                await asyncio.sleep(0.01)

        streaming = asyncio.create_task(stream())
        await wait_until(lambda: len(acked) >= restart_after, scaled(20), "30 acks")
        restarted_at = time.monotonic()
        await asyncio.to_thread(redis.restart, hard=True)  # SIGKILL; back empty
        restarted_in = time.monotonic() - restarted_at
        at_restart = len(acked)
        await asyncio.wait_for(streaming, scaled(40))
        assert at_restart < total, "the stream ended before the restart: nothing was tested"
        assert len(acked) >= total // 2, f"most posts failed: {failed[:5]}"

        expected = await stored_ids(cluster, ch)
        assert set(acked) <= set(expected), "an acknowledged message is not stored"
        assert [m for m in expected if m in set(acked)] == acked
        for rec in views.values():
            await rec.wait_posted(len(expected), scaled(20))
        await asyncio.sleep(0.3)
        ack_times = sorted(acked_at.values())
        ack_pause = max(b - a for a, b in itertools.pairwise(ack_times))
        report = [
            f"redis restart took {restarted_in:.2f}s; {len(failed)} posts failed; "
            f"longest pause between acks {ack_pause:.3f}s"
        ]
        for who, rec in views.items():
            assert_same_ids(who, rec.ids(), expected)
            arrival = rec.arrival()
            lag = max(arrival[m] - acked_at[m] for m in acked)
            times = sorted(arrival.values())
            pause = max(b - a for a, b in itertools.pairwise(times))
            report.append(f"{who}: worst ack->delivery {lag:.3f}s, longest silence {pause:.3f}s")
        print("; ".join(report))


# --------------------------------------------------------------------------- 4. window


async def test_resume_outside_the_window_gets_an_explicit_answer(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(
        2, extra_env={**FAST, "CHAT_REPLAY_MAX_EVENTS": "5", "CHAT_REPLAY_WINDOW_S": "0"}
    )
    seeded = cluster.seeded
    assert seeded is not None and cluster.redis is not None
    ch = seeded.channels["general"]
    token = seeded.tokens["carol"]
    async with cluster.client(0, "carol") as carol:
        session_id, left_at = carol.session["session_id"], carol.session["seq"]
    async with cluster.client(1, "alice") as alice:  # keeps node1 subscribed (and trimming)
        ids = [(await post(alice, ch, f"w{i}", f"window {i}"))["message"]["id"] for i in range(20)]
        assert ids == await stored_ids(cluster, ch)

        # The window is a minimum: events leave it when the stream is trimmed (every sweep).
        async with aioredis.from_url(cluster.redis.url) as r:
            key = stream_key(seeded.workspace_id)
            deadline = time.monotonic() + scaled(10)
            while await r.xlen(key) > 5:
                assert time.monotonic() < deadline, "the stream is never trimmed to the window"
                await asyncio.sleep(0.1)

        # Resume from before the 20 messages, on the other node: refused, explicitly.
        client = await Client.open(cluster.urls[1])
        try:
            reply = await client.request(
                "auth", token=token, resume={"session_id": session_id, "seq": left_at}
            )
            assert reply["resumed"] is False
            assert reply["resume_error"] == "too_old"
            top = reply["seq"]
            assert top == left_at + 20
            await asyncio.sleep(0.3)
            extra = client.drain_events()
            assert not [f for f in extra if f.get("seq") is not None or f["type"] == "resumed"]
        finally:
            await client.close()

        # From inside the last 5 events: resumed, exactly the missed ones, then `resumed`.
        for back in (5, 2):
            client = await Client.open(cluster.urls[1])
            try:
                reply = await client.request(
                    "auth", token=token, resume={"session_id": session_id, "seq": top - back}
                )
                assert (reply["resumed"], reply["resume_error"]) == (True, None)
                assert reply["seq"] == top
                frames: list[Frame] = []
                while not frames or frames[-1]["type"] != "resumed":
                    frames.append(await client.next_event(timeout=scaled(5)))
                durable = [f for f in frames[:-1] if f.get("seq") is not None]
                assert [f["type"] for f in durable] == ["message.posted"] * back
                assert [f["seq"] for f in durable] == list(range(top - back + 1, top + 1))
                assert [f["message"]["id"] for f in durable] == ids[-back:]
                assert frames[-1] == {"type": "resumed", "seq": top, "replayed": back}
            finally:
                await client.close()


# --------------------------------------------------------------------------- 5. slow consumer


async def test_stalled_client_is_cut_off_without_slowing_others(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(
        2,
        extra_env={
            **FAST,
            "CHAT_SEND_BUFFER_SOFT_BYTES": "65536",
            "CHAT_SEND_BUFFER_HARD_BYTES": "262144",
        },
    )
    seeded = cluster.seeded
    assert seeded is not None
    ch = seeded.channels["general"]
    node0 = cluster.nodes[0]
    # The kernel, not the server, absorbs the first few MB a non-reading peer is sent: a
    # process's accepted sockets autotune SO_SNDBUF up to tcp_wmem's max (4 MiB here), and
    # the server's own buffer only grows after that. So ~4 KB messages, and as many as it
    # takes (bounded) for the node to cut the stalled client off.
    text = "a stalled reader must not slow the others down. " * 80  # ~3.9 KB
    batch, at_most = 25, 2000
    async with cluster.client(0, "carol") as carol0, cluster.client(1, "bob") as bob1:
        views = {"carol@node0": record(carol0, ch), "bob@node1": record(bob1, ch)}
        async with stalled_client(node0.port, seeded.tokens["dave"]) as stalled:
            deadline = time.monotonic() + scaled(10)
            while await ametric(node0, "chat_sessions") < 2:
                assert time.monotonic() < deadline, "the stalled client never authenticated"
                await asyncio.sleep(0.05)
            assert await ametric(node0, "chat_closes_total", 'code="4001"') == 0

            async with cluster.client(1, "alice") as poster:
                acked_at: dict[int, float] = {}
                cut_after: int | None = None
                started = time.monotonic()
                n = 0
                while n < at_most:
                    replies = await asyncio.gather(
                        *(post(poster, ch, f"s{i}", f"{i} {text}") for i in range(n, n + batch))
                    )
                    now = time.monotonic()
                    acked_at.update((r["message"]["id"], now) for r in replies)
                    n += batch
                    if cut_after is not None and n >= cut_after + 4 * batch:
                        break  # some more after the cut: the others carry on
                    if (
                        cut_after is None
                        and n % 100 == 0
                        and await ametric(node0, "chat_closes_total", 'code="4001"') >= 1
                    ):
                        cut_after = n
                posting = time.monotonic() - started
                assert cut_after is not None, (
                    f"{n} messages of {len(text)} B and the stalled client is still connected"
                )

                expected = await stored_ids(cluster, ch)
                assert set(expected) == set(acked_at)
                for rec in views.values():
                    await rec.wait_posted(len(expected), scaled(20))
                await asyncio.sleep(0.3)
                lags = []
                for who, rec in views.items():
                    assert_same_ids(who, rec.ids(), expected)
                    arrival = rec.arrival()
                    lag = max(arrival[m] - acked_at[m] for m in expected)
                    lags.append(f"{who} worst lag {lag:.2f}s")
                    assert lag < scaled(5), f"{who} was slowed down: {lag:.2f}s behind"
                assert not carol0.closed.is_set() and not bob1.closed.is_set()
                assert (await carol0.request("ping"))["server_time"] > 0
                # Exactly one connection was cut, on node0: the stalled one.
                assert await ametric(node0, "chat_closes_total", 'code="4001"') == 1
                assert await ametric(cluster.nodes[1], "chat_closes_total", 'code="4001"') == 0
                # ... and its session is gone (the close handshake is bounded: 2 s, then
                # the server drops the connection).
                deadline = time.monotonic() + scaled(6)
                while await ametric(node0, "chat_sessions") != 1:
                    assert time.monotonic() < deadline, "the stalled session is still there"
                    await asyncio.sleep(0.1)
                print(
                    f"cut after <= {cut_after} messages ({cut_after * len(text) // 1024} KB); "
                    f"posted {n} in {posting:.1f}s; " + "; ".join(lags)
                )
            # Reading at last, the stalled client finds the server gone (EOF or reset).
            await read_until_closed(stalled)


# --------------------------------------------------------------------------- 6. presence


async def test_killed_nodes_users_turn_away(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(
        2, extra_env={**FAST, "CHAT_PRESENCE_TTL_S": "2", "CHAT_PRESENCE_POLL_S": "0.5"}
    )
    seeded = cluster.seeded
    assert seeded is not None
    dave = seeded.users["dave"]
    async with cluster.client(1, "carol") as watcher:
        await watcher.request("presence.subscribe", user_ids=[dave])
        doomed = await Client.open(cluster.urls[0])
        try:
            await doomed.request("auth", token=seeded.tokens["dave"])
            event = await watcher.next_event("presence", timeout=scaled(6))
            assert (event["user_id"], event["status"]) == (dave, "active")

            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.nodes[0].kill)
            event = await watcher.next_event("presence", timeout=scaled(8))
            took = time.monotonic() - killed_at
            assert (event["user_id"], event["status"]) == (dave, "away")
            print(f"away {took:.2f}s after the kill (ttl 2 s, poll 0.5 s)")
            assert not watcher.closed.is_set()
        finally:
            await doomed.close()


# --------------------------------------------------------------------------- exactly once
#
# The protocol: "The seq values a given client receives are strictly increasing", and
# without resume "events follow from here" (after the reply's seq). Two races break it; a
# ResilientClient's de-duplication hides them, a plain client shows them. Redis CLIENT PAUSE
# stands in for a slow Redis round trip, to hit each race every time.


def durable_seqs(rec: Recorder) -> list[int]:
    return [f["seq"] for _, f in rec.frames if f.get("seq") is not None and f["type"] != "resumed"]


async def test_concurrent_first_logins_on_a_node_get_each_event_once(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, extra_env=FAST)
    seeded = cluster.seeded
    assert seeded is not None and cluster.redis is not None
    ch = seeded.channels["general"]
    handles = ("bob", "carol", "dave")
    clients: list[Client] = []
    try:
        async with aioredis.from_url(cluster.redis.url) as r:
            # Redis answers slowly for a moment while three users log in to node0, the
            # first ones there (node0 has not subscribed to the workspace yet).
            await r.client_pause(1500, all=True)
            opened = await asyncio.gather(*(Client.open(cluster.urls[0]) for _ in handles))
            clients.extend(opened)
            await asyncio.gather(
                *(
                    c.request("auth", token=seeded.tokens[h], timeout=scaled(10))
                    for c, h in zip(opened, handles, strict=True)
                )
            )
        views = {h: record(c, ch) for c, h in zip(clients, handles, strict=True)}
        async with cluster.client(1, "alice") as alice:
            mid = (await post(alice, ch, "once", "exactly once"))["message"]["id"]
        for rec in views.values():
            await rec.wait_posted(1, scaled(10))
        await asyncio.sleep(0.5)
        got = {h: rec.ids() for h, rec in views.items()}
        assert got == {h: [mid] for h in handles}, (
            f"node0 delivered the message more than once: {got} (chat/bus/redis.py "
            "RedisBus.subscribe: concurrent calls all pass the membership check before "
            "either appends, so the hub is subscribed once per concurrent login)"
        )
    finally:
        for c in clients:
            await c.close()


async def test_connecting_while_the_stream_lags_the_database_gets_no_event_twice(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, extra_env=FAST)
    seeded = cluster.seeded
    assert seeded is not None and cluster.redis is not None
    ch = seeded.channels["general"]
    async with cluster.client(0, "dave") as dave:  # where the resume below starts from
        session_id, left_at = dave.session["session_id"], dave.session["seq"]
    async with (
        cluster.client(0, "bob") as bob0,  # keeps node0 subscribed
        cluster.client(1, "alice") as alice1,
        aioredis.from_url(cluster.redis.url) as r,
    ):
        bob = record(bob0, ch)
        first = (await post(alice1, ch, "m0", "before"))["message"]["id"]
        await bob.wait_posted(1, scaled(10))

        # Redis refuses writes for a moment: the next message is committed in PostgreSQL
        # but not yet on the stream when carol connects and dave resumes on node0.
        await r.client_pause(2000, all=False)
        posting = asyncio.create_task(post(alice1, ch, "m1", "lagging"))
        deadline = time.monotonic() + scaled(1.5)
        while len(await stored_ids(cluster, ch)) < 2:
            assert time.monotonic() < deadline, "the message was not committed"
            await asyncio.sleep(0.02)
        carol = await Client.open(cluster.urls[0])
        dave = await Client.open(cluster.urls[0])
        try:
            fresh = await carol.request("auth", token=seeded.tokens["carol"])
            carol_view = record(carol, ch)
            resumed = await dave.request(
                "auth",
                token=seeded.tokens["dave"],
                resume={"session_id": session_id, "seq": left_at},
            )
            dave_view = record(dave, ch)
            assert resumed["resumed"] is True
            second = (await asyncio.wait_for(posting, scaled(10)))["message"]["id"]
            assert await stored_ids(cluster, ch) == [first, second]
            await bob.wait_posted(2, scaled(10))
            await dave_view.wait_posted(2, scaled(10))
            await asyncio.sleep(0.5)

            # dave: the replay (to the reply's seq), then live events after it, each once.
            # carol: the reply's seq already includes the message; events follow from there.
            problems = []
            if dave_view.ids() != [first, second]:
                problems.append(
                    f"dave resumed at seq {left_at} (reply seq {resumed['seq']}) and got "
                    f"(seq, message id) {dave_view.posted()}"
                )
            early = [s for s in durable_seqs(carol_view) if s <= fresh["seq"]]
            if early:
                problems.append(f"carol's reply said seq {fresh['seq']}, then came seq {early}")
            assert not problems, (
                "; ".join(problems) + ". The message was in PostgreSQL (so in the snapshot "
                "and the replay) but not yet on the Redis stream: chat/fanout.py Hub.ready "
                "drops only the events buffered so far with seq <= as_of, and the same event "
                "is delivered again when the stream catches up."
            )
            seqs = durable_seqs(dave_view)
            assert seqs == sorted(set(seqs))
        finally:
            await carol.close()
            await dave.close()


# --------------------------------------------------------------------------- issue 6 defects


async def wait_for_value(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Call ``probe`` until ``done(value)``; the last value. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.1f}s: {what} ({value!r})"
        await asyncio.sleep(0.05)


async def test_defect_04_resume_after_redis_restart_replays_from_postgres(
    make_cluster: MakeCluster,
) -> None:
    # The window is "the last 5 events OR younger than 900 s": every event here is young,
    # so all are in the window, while the restarted stream holds at most the last few.
    cluster = await make_cluster(2, extra_env={**FAST, "CHAT_REPLAY_MAX_EVENTS": "5"})
    seeded = cluster.seeded
    redis = cluster.redis
    assert seeded is not None and redis is not None
    ch = seeded.channels["general"]
    key = stream_key(seeded.workspace_id)
    async with cluster.client(0, "carol") as carol:
        session_id, left_at = carol.session["session_id"], carol.session["seq"]
    before, after = 8, 3
    async with cluster.client(1, "alice") as alice1, cluster.client(0, "bob") as bob0:
        bob = record(bob0, ch)
        for i in range(before):
            await post(alice1, ch, f"b{i}", f"before the restart {i}")
        await bob.wait_posted(before, scaled(10))
        async with aioredis.from_url(redis.url) as r:
            held: Any = await r.xrange(key, min=f"{left_at + 1}-0", max=f"{left_at + 1}-0")
        assert len(held) == 1, "before the restart the stream holds what carol missed"

        await asyncio.to_thread(redis.restart, hard=True)  # SIGKILL; back EMPTY
        async with aioredis.from_url(redis.url) as r:
            assert await r.xlen(key) == 0
        for i in range(after):
            await post(alice1, ch, f"a{i}", f"after the restart {i}")
        top = left_at + before + after
        await bob.wait_posted(before + after, scaled(20))
        # The new stream reaches the top but starts later: alone it cannot serve the resume.
        async with aioredis.from_url(redis.url) as r:
            first, _ = await wait_for_value(
                lambda: _stream_bounds(r, key),
                lambda b: b[1] == top,
                scaled(10),
                "the restarted stream to reach the database's top",
            )
        assert first > left_at + 1, f"the stream still holds seq {left_at + 1}"

    expected = await stored_ids(cluster, ch)
    assert len(expected) == before + after
    client = await Client.open(cluster.urls[1])
    try:
        reply = await client.request(
            "auth",
            token=seeded.tokens["carol"],
            resume={"session_id": session_id, "seq": left_at},
        )
        assert (reply["resumed"], reply["resume_error"]) == (True, None), reply
        assert reply["seq"] == top
        frames: list[Frame] = []
        while not frames or frames[-1]["type"] != "resumed":
            assert len(frames) <= 2 * (before + after) + 10, f"no `resumed`: {frames}"
            frames.append(await client.next_event(timeout=scaled(10)))
        durable = [f for f in frames[:-1] if f.get("seq") is not None]
        assert [f["seq"] for f in durable] == list(range(left_at + 1, top + 1))
        assert [f["type"] for f in durable] == ["message.posted"] * (before + after)
        assert [f["message"]["id"] for f in durable] == expected
        assert frames[-1] == {"type": "resumed", "seq": top, "replayed": before + after}
        # The same as messages.history (PostgreSQL) says, and nothing more arrives.
        history = await client.request("messages.history", channel_id=ch, limit=50)
        assert [m["id"] for m in history["messages"]] == expected
        await asyncio.sleep(0.5)
        extra = [f for f in client.drain_events() if f.get("seq") is not None]
        assert extra == [], f"events after `resumed` that nobody posted: {extra}"
        # Live again: the next message arrives once, right after the replayed ones.
        async with cluster.client(0, "alice") as alice0:
            nxt = (await post(alice0, ch, "live", "after the resume"))["message"]["id"]
        event = await client.next_event("message.posted", timeout=scaled(10))
        assert (event["seq"], event["message"]["id"]) == (top + 1, nxt)
        await asyncio.sleep(0.3)
        assert [f for f in client.drain_events() if f.get("seq") is not None] == []
    finally:
        await client.close()


def _seq_of(entry: Any) -> int:
    entry_id = entry[0].decode() if isinstance(entry[0], bytes) else entry[0]
    return int(entry_id.split("-", 1)[0])


async def _stream_bounds(r: Any, key: str) -> tuple[int, int]:
    """(first seq, last seq) of a stream; (0, 0) when it is empty or absent."""
    first = await r.xrange(key, count=1)
    last = await r.xrevrange(key, count=1)
    if not first or not last:
        return (0, 0)
    return (_seq_of(first[0]), _seq_of(last[0]))


class DefaultIdNode(ChatNodeProcess):
    """A node started without ``CHAT_NODE_ID``: it picks its own default id."""

    def env(self) -> dict[str, str]:
        env = super().env()
        del env["CHAT_NODE_ID"]
        return env


async def presence_nodes(cluster: Cluster, workspace_id: int) -> set[str]:
    """The node ids in the workspace's presence node set in Redis."""
    assert cluster.redis is not None
    async with aioredis.from_url(cluster.redis.url) as r:
        members: Any = await r.smembers(f"chat:presence:{workspace_id}:nodes")
    return {n.decode() for n in members}


async def test_defect_21_presence_converges_across_nodes_and_a_killed_nodes_users_turn_away(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl, poll = 2, 0.5
    env = {**FAST, "CHAT_PRESENCE_TTL_S": str(ttl), "CHAT_PRESENCE_POLL_S": str(poll)}
    cluster = await make_cluster(2, extra_env=env)
    seeded = cluster.seeded
    assert seeded is not None
    wid = seeded.workspace_id
    node0, node1 = (n.name for n in cluster.nodes)  # their CHAT_NODE_IDs
    watched = {seeded.users[h]: h for h in ("bob", "carol", "dave")}
    # A change reaches a watcher on another node within a flush, a TTL and a poll or two.
    bound = scaled(ttl + 2 * poll + 3)
    status: dict[int, str] = {}
    history: list[tuple[str, str]] = []

    async def until(want: dict[int, str], what: str) -> None:
        async with asyncio.timeout(bound):
            while any(status.get(u) != s for u, s in want.items()):
                event = await watcher.next_event("presence", timeout=bound)
                status[event["user_id"]] = event["status"]
                history.append((watched.get(event["user_id"], "?"), event["status"]))
        assert all(status.get(u) == s for u, s in want.items()), what

    async with cluster.client(0, "alice") as watcher:
        await watcher.request("presence.subscribe", user_ids=list(watched))
        on_node1: dict[int, Client] = {}
        try:
            for user_id, handle in watched.items():
                c = on_node1[user_id] = await Client.open(cluster.urls[1])
                await c.request("auth", token=seeded.tokens[handle])
            await until(dict.fromkeys(watched, "active"), "all three active on node0")
            assert await presence_nodes(cluster, wid) == {node0, node1}

            # A clean disconnect: that user alone turns away, the others stay active.
            bob = seeded.users["bob"]
            await on_node1.pop(bob).close()
            await until({bob: "away"}, "bob away after his disconnect")
            assert {u: s for u, s in status.items() if u != bob} == {
                u: "active" for u in watched if u != bob
            }, history

            # Node 1 dies: its presence key expires, node 0's poll turns its users away.
            await asyncio.to_thread(cluster.nodes[1].kill)
            await until(dict.fromkeys(watched, "away"), "node1's users away after the kill")
            assert not watcher.closed.is_set()
            assert history.count(("carol", "away")) == 1 and history.count(("dave", "away")) == 1
            # ... and the dead node is pruned from the workspace's node set.
            await wait_for_value(
                lambda: presence_nodes(cluster, wid),
                lambda nodes: nodes == {node0},
                bound,
                "node1 pruned from the presence node set",
            )
        finally:
            for c in on_node1.values():
                c.abort()
                await c.close()

    # Default node ids are distinct: in one process (as when every server is PID 1) ...
    monkeypatch.delenv("CHAT_NODE_ID", raising=False)
    ids = {Settings().node_id for _ in range(3)}
    assert len(ids) == 3 and all(ids), ids
    # ... and on real nodes started without CHAT_NODE_ID, which share presence correctly.
    defaults = [
        DefaultIdNode(
            f"default{i}",
            database_url=cluster.database_url,
            redis_url=cluster.redis_url,
            extra_env=env,
            log_dir=cluster.log_dir,
        )
        for i in range(2)
    ]
    try:
        await asyncio.gather(*(n.astart() for n in defaults))
        async with cluster.client(0, "alice") as watcher:
            status.clear()
            await watcher.request("presence.subscribe", user_ids=list(watched))
            async with (
                Client.connect(defaults[0].url, seeded.tokens["carol"]),
                Client.connect(defaults[1].url, seeded.tokens["dave"]),
            ):
                nodes = await wait_for_value(
                    lambda: presence_nodes(cluster, wid),
                    lambda nodes: len(nodes - {node0}) == 2,
                    bound,
                    "both default-id nodes in the presence node set",
                )
                assert not nodes & {"default0", "default1", node1}, nodes
                carol, dave = seeded.users["carol"], seeded.users["dave"]
                await until({carol: "active", dave: "active"}, "carol and dave active again")
    finally:
        await asyncio.gather(*(asyncio.to_thread(n.close) for n in defaults))


async def test_defect_10_posts_flow_again_after_redis_froze(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(2, extra_env=FAST)
    seeded = cluster.seeded
    redis = cluster.redis
    assert seeded is not None and redis is not None and redis.pid is not None
    ch = seeded.channels["general"]
    users = list(seeded.users.values())
    frozen_for = 6.0
    async with (
        cluster.client(0, "alice") as alice0,
        cluster.client(0, "bob") as bob0,
        cluster.client(1, "carol") as carol1,
    ):
        views = {"bob@node0": record(bob0, ch), "carol@node1": record(carol1, ch)}
        await post(alice0, ch, "f0", "before the freeze")
        for rec in views.values():
            await rec.wait_posted(1, scaled(10))

        # SIGSTOP the redis-server this test started (by PID): connections stay open and
        # nothing answers. Posts go on: the reply does not wait for the bus.
        pid = redis.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen_until = time.monotonic() + frozen_for
            during = 0
            while time.monotonic() < frozen_until and during < 20:
                await post(alice0, ch, f"d{during}", f"while Redis is frozen {during}")
                during += 1
                await asyncio.sleep(0.5)
            await asyncio.sleep(max(0.0, frozen_until - time.monotonic()))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert during >= 2, "posting stopped while Redis was frozen"

        # Thawed: replies, delivery on both nodes, and an Admin commit all come back.
        after = 5
        for i in range(after):
            await post(alice0, ch, f"a{i}", f"after the thaw {i}")
        async with cluster.admin() as admin:
            created = await asyncio.wait_for(
                admin.create_channel(seeded.workspace_id, "thawed", users[0], users, False),
                scaled(20),
            )
        await post(carol1, ch, "c0", "from node1 after the thaw")
        expected = await stored_ids(cluster, ch)
        assert len(expected) == 1 + during + after + 1
        for rec in views.values():
            await rec.wait_posted(len(expected), scaled(30))
        await asyncio.sleep(0.3)
        for who, rec in views.items():
            assert_same_ids(who, rec.ids(), expected)
            seqs = [s for s, _ in rec.posted()]
            assert seqs == sorted(set(seqs)), f"{who}: seq not strictly increasing"
        # The channel the admin created (another process's commit) reaches both nodes too.

        def got_channel(rec: Recorder) -> bool:
            return any(f["channel"]["id"] == created.id for f in rec.of_type("channel.created"))

        for who, client in (("bob@node0", bob0), ("carol@node1", carol1)):
            rec = views[who]
            await wait_until(partial(got_channel, rec), scaled(20), f"{who} to get channel.created")
            assert (await client.request("ping"))["server_time"] > 0
        for node in cluster.nodes:
            assert node.running, f"{node.name} died\n{node.log_tail()}"
