"""The connect path and the connection lifecycle against a real node, on both stores.

Regression tests for issue 6 (defects 2, 3, 8, 11, 16, 21, 24): each names its defect.
The sequence's every interleaving is unit-tested in ``tests/test_connect_unit.py``; these
check that the node carries the verdicts out over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from websockets.asyncio.client import connect

from chat.bus import Envelope
from chat.client import Client
from tests.harness import RunningNode, running_node
from tests.test_bad_input import http_get
from tests.timing import scaled


async def wait_closed(client: Client) -> tuple[int | None, str | None]:
    await asyncio.wait_for(client.closed.wait(), scaled(10))
    return client.ws.close_code, client.ws.close_reason


async def raw_session(node: RunningNode, handle: str) -> Any:
    """A raw websocket connection, authenticated: the test reads every frame itself."""
    ws = await connect(node.url, compression=None)
    await ws.recv()  # hello
    await ws.send(json.dumps({"type": "auth", "id": "auth", "token": node.tokens[handle]}))
    reply = json.loads(await ws.recv())
    assert reply["type"] == "reply", reply
    return ws


# --------------------------------------------------------------------------- defect 2


async def test_defect_02_requests_after_a_revocation_are_refused(node: RunningNode) -> None:
    """A connection whose session is revoked by one of its own requests gets that reply,
    refuses every later request (token_revoked, nothing stored), then closes 1008."""
    ws = await raw_session(node, "mia")
    try:
        frames = [
            {"type": "sessions.revoke", "id": "revoke"},
            *(
                {
                    "type": "messages.post",
                    "id": f"p{i}",
                    "channel_id": node.general,
                    "client_msg_id": f"after-revoke-{i}",
                    "text": "must not be stored",
                }
                for i in range(5)
            ),
        ]
        for frame in frames:
            await ws.send(json.dumps(frame))
        answers: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(Exception):
            async with asyncio.timeout(scaled(10)):
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("reply_to"):
                        answers[frame["reply_to"]] = frame
        assert answers["revoke"]["type"] == "reply"
        for i in range(5):
            answer = answers.get(f"p{i}")
            # Refused, or never read because the connection closed first: never accepted.
            assert answer is None or answer["code"] == "token_revoked", answer
        assert (ws.close_code, ws.close_reason) == (1008, "token_revoked")
    finally:
        await ws.close()
    async with node.client("olivia") as olivia:
        history = await olivia.request("messages.history", channel_id=node.general)
    assert not [m for m in history["messages"] if m["text"] == "must not be stored"]


# --------------------------------------------------------------------------- defect 3


class BrokenReplay:
    """A replay log whose reads fail: the failure a connect must survive cleanly."""

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        return True

    def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = 512
    ) -> AsyncIterator[Sequence[Envelope]]:
        async def fail() -> AsyncIterator[Sequence[Envelope]]:
            raise RuntimeError("the replay log broke")
            yield []  # pragma: no cover

        return fail()


async def test_defect_03_a_failed_connect_answers_and_leaves_presence_alone(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    async with node.clients("mia", "olivia") as (mia, olivia):
        await olivia.request("presence.subscribe", user_ids=[node.users["mia"]])
        seq = mia.session["seq"]
        await mia.request("messages.post", channel_id=node.general, client_msg_id="x", text="x")
        node.node.replay = BrokenReplay()
        client = await Client.open(node.url)
        try:
            frame = await client.request_frame(
                "auth",
                token=node.tokens["mia"],
                resume={"session_id": mia.session["session_id"], "seq": seq},
            )
            assert frame["type"] == "error" and frame["code"] == "internal_error"
            assert await wait_closed(client) == (1011, "internal_error")
        finally:
            await client.close()
        # Mia's first connection is still live and still shown active (presence changes
        # are flushed in batches: give a wrong "away" time to show).
        await asyncio.sleep(scaled(1.0))
        away = [
            e
            for e in olivia.drain_events()
            if e["type"] == "presence" and e["user_id"] == node.users["mia"]
        ]
        assert all(e["status"] == "active" for e in away), away
        assert (await mia.request("ping"))["server_time"] > 0


# --------------------------------------------------------------------------- defect 11


async def test_defect_11_every_accepted_request_is_answered_before_a_flood_close(
    node: RunningNode,
) -> None:
    ws = await raw_session(node, "max")
    sent = 150
    try:
        for i in range(sent):
            await ws.send(json.dumps({"type": "ping", "id": f"r{i}"}))
        answers: dict[str, list[str]] = {}
        with contextlib.suppress(Exception):
            async with asyncio.timeout(scaled(10)):
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("reply_to"):
                        kind = frame["type"] if frame["type"] == "reply" else frame["code"]
                        answers.setdefault(frame["reply_to"], []).append(kind)
        assert (ws.close_code, ws.close_reason) == (1008, "rate_limited")
    finally:
        await ws.close()
    assert all(len(kinds) == 1 for kinds in answers.values()), answers
    accepted = [rid for rid, kinds in answers.items() if kinds == ["reply"]]
    refused = [rid for rid, kinds in answers.items() if kinds == ["rate_limited"]]
    assert len(accepted) >= 40 and refused
    # Every request read before the close has exactly one answer: the answered ids are a
    # prefix of what was sent (the rest were never read).
    numbers = sorted(int(rid[1:]) for rid in answers)
    assert numbers == list(range(len(numbers)))


# --------------------------------------------------------------------------- defect 16 / 21


async def test_defect_16_metrics_only_on_their_own_listener(node: RunningNode) -> None:
    status, _ = await http_get(node.node.port, "/metrics")
    assert status == 404
    assert node.node.metrics_port is not None
    status, body = await http_get(node.node.metrics_port, "/metrics")
    assert status == 200 and b"chat_connections" in body
    status, _ = await http_get(node.node.metrics_port, "/readyz")
    assert status == 404  # the metrics listener serves metrics only


class CountingPings:
    """Wraps the node's database to count /readyz pings (the store itself stays real)."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.pings = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def ping(self) -> None:
        self.pings += 1
        await self._db.ping()


async def test_defect_16_readyz_caches_the_database_ping(node: RunningNode) -> None:
    counting = CountingPings(node.node.services.db)
    node.node.services.db = counting  # type: ignore[assignment]
    try:
        for _ in range(20):
            status, _ = await http_get(node.node.port, "/readyz")
            assert status == 200
        assert 1 <= counting.pings < 20
    finally:
        node.node.services.db = counting._db


async def test_defect_21_readyz_answers_draining_during_a_drain(tmp_path: Any) -> None:
    async with running_node(sqlite_path=str(tmp_path / "chat.sqlite3"), drain_period_s=3.0) as n:
        # The drain closes these one by one over its period: it is still going on below.
        async with n.clients("mia", "max", "olivia", "adam") as clients:
            stopping = asyncio.create_task(n.node.stop())
            await asyncio.sleep(scaled(0.3))
            assert not stopping.done()
            status, body = await http_get(n.node.port, "/readyz")
            assert (status, body) == (503, b"draining\n")
            status, _ = await http_get(n.node.port, "/healthz")
            assert status == 200
            with pytest.raises(Exception, match="503"):
                async with Client.connect(n.url, n.tokens["gus"]):
                    pass
            for client in clients:
                assert await wait_closed(client) == (1012, "service_restart")
            await asyncio.wait_for(stopping, scaled(15))


# --------------------------------------------------------------------------- defect 8


async def test_defect_08_stop_is_bounded_when_a_task_ignores_cancellation(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_node(sqlite_path=str(tmp_path / "chat.sqlite3")) as n:
        release = asyncio.Event()

        async def stubborn() -> None:
            # Swallows its cancellation, as the Redis pipeline did: a bug stop() must survive.
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)

        n.node.spawn(stubborn())
        try:
            await asyncio.wait_for(n.node.stop(), scaled(30))
        finally:
            release.set()
        assert "did not stop when cancelled" in caplog.text


# --------------------------------------------------------------------------- defect 24


async def test_defect_24_websocket_pings_count_as_liveness(tmp_path: Any) -> None:
    """A client that only answers and sends websocket PINGs (no ``ping`` requests) is kept;
    one that sends nothing at all is closed 4000."""
    async with running_node(
        sqlite_path=str(tmp_path / "chat.sqlite3"),
        heartbeat_interval_ms=400,
        ping_interval_s=3600.0,
    ) as n:
        quiet = await Client.open(n.url, ping_interval=None)
        pinging = await Client.open(n.url, ping_interval=0.1)
        try:
            for client in (quiet, pinging):
                client.session = await client.request("auth", token=n.tokens["mia"])
            assert await wait_closed(quiet) == (4000, "heartbeat_timeout")
            await asyncio.sleep(scaled(1.0))  # well over two heartbeat intervals
            assert not pinging.closed.is_set()
            assert (await pinging.request("ping"))["server_time"] > 0
        finally:
            await quiet.close()
            await pinging.close()


async def test_the_server_pings_quiet_connections_and_their_pongs_keep_them(
    tmp_path: Any,
) -> None:
    """A client that sends nothing of its own (a browser tab with its timers throttled)
    answers the server's websocket PINGs, and that is enough; the pings come from the
    node's one heartbeat loop, not a task per connection."""
    async with running_node(
        sqlite_path=str(tmp_path / "chat.sqlite3"),
        heartbeat_interval_ms=400,
        ping_interval_s=0.1,
    ) as n:
        quiet = await Client.open(n.url, ping_interval=None)  # answers pings, sends none
        try:
            quiet.session = await quiet.request("auth", token=n.tokens["mia"])
            await asyncio.sleep(scaled(1.5))  # well over two heartbeat intervals
            assert not quiet.closed.is_set()
            assert (await quiet.request("ping"))["server_time"] > 0
        finally:
            await quiet.close()


# --------------------------------------------------------------------------- interleavings


class DuringWindowCheck:
    """The node's real replay log, with something committed (by another client, through the
    real journal and store) while the connect sequence asks it about the window: that is,
    after the snapshot was read and before the replay and ``ready``."""

    def __init__(self, log: Any, action: Any) -> None:
        self._log = log
        self._action = action

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        await self._action()
        return bool(await self._log.holds(workspace_id, after_seq, up_to))

    def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = 512
    ) -> AsyncIterator[Sequence[Envelope]]:
        return self._log.read(workspace_id, after_seq, up_to, chunk=chunk)


async def _resume_frame(node: RunningNode, mia: Client) -> dict[str, Any]:
    return {"session_id": mia.session["session_id"], "seq": mia.session["seq"]}


async def test_defect_02_revocation_committed_mid_connect_closes_the_new_connection(
    node: RunningNode,
) -> None:
    async with node.clients("mia", "olivia") as (mia, olivia):
        resume = await _resume_frame(node, mia)
        await mia.request("messages.post", channel_id=node.private, client_msg_id="a", text="a")

        async def revoke() -> None:
            await olivia.request("sessions.revoke", user_id=node.users["mia"])

        node.node.replay = DuringWindowCheck(node.node.replay, revoke)
        client = await Client.open(node.url)
        try:
            frame = await client.request_frame("auth", token=node.tokens["mia"], resume=resume)
            # Revoked before the reply: the auth is answered token_revoked, then the close.
            assert (frame["type"], frame["code"]) == ("error", "token_revoked")
            assert await wait_closed(client) == (1008, "token_revoked")
        finally:
            await client.close()
        # And nothing private reached it after the revocation.
        await olivia.request("messages.post", channel_id=node.private, client_msg_id="b", text="b")
        assert not [
            e for e in client.drain_events() if e.get("message", {}).get("client_msg_id") == "b"
        ]


async def test_membership_change_committed_mid_connect_applies_from_its_event(
    node: RunningNode,
) -> None:
    """Mia is removed from the private channel while her second connection resumes: that
    connection replays what she missed, gets the removal, and nothing from the channel
    after it."""
    async with node.clients("mia", "olivia") as (mia, olivia):
        resume = await _resume_frame(node, mia)
        await olivia.request("messages.post", channel_id=node.private, client_msg_id="m1", text="1")

        async def remove() -> None:
            await olivia.request(
                "channels.remove", channel_id=node.private, user_id=node.users["mia"]
            )

        node.node.replay = DuringWindowCheck(node.node.replay, remove)
        client = await Client.open(node.url)
        try:
            frame = await client.request_frame("auth", token=node.tokens["mia"], resume=resume)
            assert frame["type"] == "reply" and frame["data"]["resumed"] is True
            await olivia.request(
                "messages.post", channel_id=node.private, client_msg_id="m2", text="2"
            )
            await client.request("ping")  # everything before this reply has arrived
            events = client.drain_events()
        finally:
            await client.close()
    kinds = [(e["type"], e.get("message", {}).get("client_msg_id")) for e in events]
    # The replay (m1: she was a member then), the marker, then her own removal (it committed
    # after the snapshot), once; nothing from the channel after it.
    assert [k for k, _ in kinds] == ["message.posted", "resumed", "channel.member_left"], kinds
    assert kinds[0] == ("message.posted", "m1")
