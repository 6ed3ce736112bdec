"""Flannel in front of a real chat node (both stores): clients see the protocol unchanged,
through a bounded number of upstream connections, with the chat tier's visibility rules,
resume and revocation; a lost upstream connection costs a delay, never a gap or a duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from chat.client import Client, RequestError
from flannel.config import FlannelSettings
from flannel.server import Edge
from tests.harness import SERVICE_KID, SERVICE_SECRET, RunningNode
from tests.timing import scaled, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@contextlib.asynccontextmanager
async def flannel(node: RunningNode, **overrides: Any) -> AsyncIterator[Edge]:
    defaults: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "upstream": [f"ws://127.0.0.1:{node.node.port}/service"],
        "service_key": f"{SERVICE_KID}={SERVICE_SECRET}",
        "log_format": "text",
        "log_level": "warning",
        "shutdown_grace_s": 2.0,
        "drain_period_s": 0.2,
        "upstream_backoff_s": 0.05,
        "upstream_backoff_cap_s": 0.2,
    }
    settings = FlannelSettings(**(defaults | overrides))
    edge = Edge(settings)
    await edge.start()
    try:
        await edge.upstream.ready(10)
        yield edge
    finally:
        await edge.stop()


def url(edge: Edge) -> str:
    return f"ws://127.0.0.1:{edge.port}/"


async def messages(client: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            event = await client.events.get()
            if event["type"] == "message.posted":
                got.append(event)
    return got


async def test_a_client_sees_the_protocol_unchanged(node: RunningNode) -> None:
    async with flannel(node) as edge:
        async with (
            Client.connect(url(edge), node.tokens["mia"]) as mia,
            node.client("olivia") as olivia,
        ):
            assert mia.hello["type"] == "hello"
            assert mia.session["user"]["handle"] == "mia"
            assert mia.session["workspace_name"] == "acme"
            assert "server_time" in await mia.request("ping")
            posted = await mia.post(node.general, "through flannel", "cm-1")
            assert posted["message"]["user_id"] == node.users["mia"]
            await olivia.post(node.private, "secret, straight to chat")
            got = await messages(mia, 2)
            assert [e["message"]["text"] for e in got] == [
                "through flannel",
                "secret, straight to chat",
            ]
            with pytest.raises(RequestError) as refused:
                await mia.request("channels.join", channel_id=10**9)
            assert refused.value.code == "channel_not_found"


async def test_visibility_is_the_chat_tiers(node: RunningNode) -> None:
    async with flannel(node) as edge:
        async with (
            Client.connect(url(edge), node.tokens["max"]) as mx,
            Client.connect(url(edge), node.tokens["mia"]) as mia,
            node.client("olivia") as olivia,
        ):
            await olivia.post(node.private, "for mia only")
            await olivia.post(node.general, "for everyone")
            assert [e["message"]["text"] for e in await messages(mia, 2)] == [
                "for mia only",
                "for everyone",
            ]
            assert [e["message"]["text"] for e in await messages(mx, 1)] == ["for everyone"]
            assert all(e["type"] != "message.posted" for e in mx.drain_events())


async def test_bad_credentials_are_refused_as_by_chat(node: RunningNode) -> None:
    async with flannel(node) as edge:
        client = await Client.open(url(edge))
        try:
            with pytest.raises(RequestError) as refused:
                await client.request("auth", token="not-a-token")
            assert refused.value.code == "invalid_auth"
            await asyncio.wait_for(client.closed.wait(), 5)
            assert client.ws.close_code == 1008
        finally:
            await client.close()


async def test_many_clients_few_upstream_connections(node: RunningNode) -> None:
    async with flannel(node, upstream_connections=2) as edge:
        handles = ["olivia", "adam", "mia", "max", "gus", "mallory"] * 5
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(Client.connect(url(edge), node.tokens[h]))
                for h in handles
            ]
            assert len(node.node._links) == 2
            assert sum(len(link.sessions) for link in node.node._links) == len(clients)
            assert edge.loads <= 1


async def test_resume_through_flannel_gets_what_it_missed_once(node: RunningNode) -> None:
    async with flannel(node) as edge, node.client("olivia") as olivia:
        async with Client.connect(url(edge), node.tokens["mia"]) as mia:
            await olivia.post(node.general, "seen")
            (seen,) = await messages(mia, 1)
            session_id = mia.session["session_id"]
        for i in range(3):
            await olivia.post(node.private, f"missed {i}")
        async with Client.connect(url(edge)) as again:
            resume = {"session_id": session_id, "seq": seen["seq"]}
            reply = await again.request("auth", token=node.tokens["mia"], resume=resume)
            assert reply["resumed"] is True
            await olivia.post(node.general, "live")
            got = await messages(again, 4)
            assert [e["message"]["text"] for e in got] == [
                "missed 0",
                "missed 1",
                "missed 2",
                "live",
            ]
            assert [e["seq"] for e in got] == sorted({e["seq"] for e in got})


async def test_a_lost_upstream_connection_is_a_delay_not_a_gap(node: RunningNode) -> None:
    async with flannel(node, upstream_connections=1) as edge, node.client("olivia") as olivia:
        async with Client.connect(url(edge), node.tokens["mia"]) as mia:
            await olivia.post(node.general, "before")
            await messages(mia, 1)
            for link in list(node.node._links):
                link.abort()  # the chat node's end drops, as if the node had gone
            for i in range(5):
                await olivia.post(node.general, f"during {i}")
            await edge.upstream.ready(10)
            await olivia.post(node.general, "after")
            got = await messages(mia, 6)
            assert [e["message"]["text"] for e in got] == [
                *(f"during {i}" for i in range(5)),
                "after",
            ]
            await asyncio.sleep(0.2)
            assert not [e for e in mia.drain_events() if e["type"] == "message.posted"]
            # The session was attached again upstream: requests work as before.
            assert "server_time" in await mia.request("ping")


async def test_revocation_closes_the_client(node: RunningNode) -> None:
    async with flannel(node) as edge:
        async with Client.connect(url(edge), node.tokens["gus"]) as gus:
            await gus.request("sessions.revoke")
            await asyncio.wait_for(gus.closed.wait(), 5)
            assert gus.ws.close_code == 1008 and gus.ws.close_reason == "token_revoked"


async def readyz(edge: Edge) -> int:
    with pytest.raises(websockets.InvalidStatus) as answer:
        async with websockets.connect(f"ws://127.0.0.1:{edge.port}/readyz"):
            pass
    return answer.value.response.status_code


async def test_readyz_follows_the_upstream(node: RunningNode) -> None:
    async with flannel(node) as edge:
        assert await readyz(edge) == 200
    settings = FlannelSettings(
        port=0,
        upstream=["ws://127.0.0.1:9/service"],  # nothing listens there
        service_key=f"{SERVICE_KID}={SERVICE_SECRET}",
        log_level="error",
        shutdown_grace_s=1.0,
    )
    lonely = Edge(settings)
    await lonely.start()
    try:
        assert await readyz(lonely) == 503
    finally:
        await lonely.stop()


async def test_sessions_turned_away_on_reattach_wait_and_come_back(node: RunningNode) -> None:
    """A chat node's loss moves a whole link's sessions to another node at once; that
    node's admission control turns most of them away (overloaded). They wait for the hint
    and attach again: no client is dropped, and each is a working session upstream."""
    handles = ["adam", "mia", "max", "gus"]
    async with contextlib.AsyncExitStack() as stack:
        edge = await stack.enter_async_context(flannel(node, upstream_connections=1))
        clients = [
            await stack.enter_async_context(Client.connect(url(edge), node.tokens[h]))
            for h in handles
        ]
        admission = node.node.admission
        saved, refused = (admission._max, admission._min_limit), admission.refused
        admission._max = admission._min_limit = 1  # one connect in progress at a time
        try:
            for link in list(node.node._links):
                link.abort()
            await wait_until(lambda: edge.upstream.connected == 0, scaled(10), "the loss")
            await edge.upstream.ready(scaled(30))
        finally:
            admission._max, admission._min_limit = saved
        assert admission.refused > refused  # the path under test was taken
        assert not any(c.closed.is_set() for c in clients)
        async with node.client("olivia") as olivia:
            await olivia.post(node.general, "after the move")
        for client in clients:
            got = await messages(client, 1)
            assert got[0]["message"]["text"] == "after the move"
            # Relayed, as this user: the session is attached upstream again.
            history = await client.request("messages.history", channel_id=node.general)
            assert history["messages"][0]["text"] == "after the move"


class Gate:
    """A TCP forwarder to the chat node that the test can shut: while shut, connections
    are cut and new ones refused (the chat tier, or the balancer before it, restarting)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._pipes):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()
                self._pipes.discard(dst)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_readyz_rides_out_an_upstream_blip(node: RunningNode) -> None:
    gate = Gate(node.node.port)
    await gate.open()
    upstream = {"upstream": [f"ws://127.0.0.1:{gate.port}/service"]}
    async with (
        flannel(node, upstream_grace_s=3600, **upstream) as patient,
        flannel(node, upstream_grace_s=0, **upstream) as strict,
    ):
        assert await readyz(patient) == 200 and await readyz(strict) == 200
        await gate.shut()
        await wait_until(
            lambda: patient.upstream.connected == strict.upstream.connected == 0,
            scaled(10),
            "both nodes to lose their links",
        )
        # Within the grace the node stays in rotation: its workspaces keep their node.
        assert await readyz(patient) == 200
        assert await readyz(strict) == 503
        await gate.open()  # same port
        await patient.upstream.ready(scaled(10))
        await strict.upstream.ready(scaled(10))
        assert await readyz(strict) == 200
    await gate.shut()


async def next_of(client: Client, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = await client.events.get()
            if event["type"] == kind:
                return event


async def test_presence_watches_are_kept_at_the_edge(node: RunningNode) -> None:
    """presence.subscribe is answered by Flannel's hub; presence comes from the chat tier
    (a user's sessions through Flannel count, as straight ones do)."""
    mia_id = node.users["mia"]
    async with flannel(node) as edge:
        async with Client.connect(url(edge), node.tokens["olivia"]) as olivia:
            assert await olivia.request("presence.subscribe", user_ids=[mia_id]) == {"active": []}
            async with Client.connect(url(edge), node.tokens["mia"]) as mia:
                event = await next_of(olivia, "presence")
                assert (event["user_id"], event["status"]) == (mia_id, "active")
                # Who is active now comes from the chat tier.
                watched = [mia_id, node.users["max"]]
                snapshot = await olivia.request("presence.subscribe", user_ids=watched)
                assert snapshot == {"active": [mia_id]}
                await mia.request("presence.set", status="away")
                assert (await next_of(olivia, "presence"))["status"] == "away"
                await mia.request("presence.set", status="auto")
                assert (await next_of(olivia, "presence"))["status"] == "active"
            assert (await next_of(olivia, "presence"))["status"] == "away"  # mia left
            await olivia.request("presence.subscribe", user_ids=[])
            async with node.client("mia"):
                await asyncio.sleep(0.5)  # a presence change nobody here watches
            assert not [e for e in olivia.drain_events() if e["type"] == "presence"]


async def test_typing_reaches_the_other_members_not_the_typist(node: RunningNode) -> None:
    async with flannel(node) as edge:
        async with (
            Client.connect(url(edge), node.tokens["mia"]) as mia,
            Client.connect(url(edge), node.tokens["max"]) as mx,
            node.client("olivia") as olivia,
        ):
            await mia.request("typing", channel_id=node.general)
            event = await next_of(mx, "typing")
            assert (event["user_id"], event["channel_id"]) == (node.users["mia"], node.general)
            assert (await next_of(olivia, "typing"))["user_id"] == node.users["mia"]
            await olivia.request("typing", channel_id=node.private)
            assert (await next_of(mia, "typing"))["channel_id"] == node.private
            await olivia.request("typing", channel_id=node.general)
            # In order: had the private one reached max, it would come first.
            event = await next_of(mx, "typing")
            assert (event["user_id"], event["channel_id"]) == (node.users["olivia"], node.general)
            event = await next_of(mia, "typing")  # and mia never saw her own
            assert (event["user_id"], event["channel_id"]) == (node.users["olivia"], node.general)


async def test_an_idle_workspace_keeps_its_cache_and_catches_up(node: RunningNode) -> None:
    """The last client leaves: the subscription goes, the cache stays (memory allows). Changes
    made meanwhile reach it when a client returns, without a second load."""
    async with flannel(node) as edge, node.client("olivia") as olivia:
        async with Client.connect(url(edge), node.tokens["mia"]) as mia:
            await mia.request("bootstrap")
        assert edge.loads == 1
        await wait_until(lambda: node.workspace_id in edge._idle, scaled(5), "the workspace idle")
        await olivia.request("channels.update", channel_id=node.general, name="renamed-away")
        await olivia.request("users.update_profile", display_name="Olivia Away")
        async with Client.connect(url(edge), node.tokens["mia"]) as mia:
            found = await mia.request("channels.autocomplete", query="renamed")
            assert [c["name"] for c in found["channels"]] == ["renamed-away"]
            info = await mia.request("users.info", user_ids=[node.users["olivia"]])
            assert info["users"][0]["display_name"] == "Olivia Away"
        assert edge.loads == 1  # caught up from its position, not loaded again


async def test_idle_caches_are_evicted_past_the_bound(node: RunningNode) -> None:
    async with flannel(node, cache_max_users=0) as edge:
        async with Client.connect(url(edge), node.tokens["mia"]) as mia:
            await mia.request("bootstrap")
            assert node.workspace_id in edge._workspaces  # in use: never evicted
        await wait_until(
            lambda: node.workspace_id not in edge._workspaces, scaled(5), "the eviction"
        )
        async with Client.connect(url(edge), node.tokens["mia"]) as mia:
            await mia.request("users.autocomplete", query="mi")
        assert edge.loads == 2


async def test_flannel_has_the_chat_tiers_admission_control(node: RunningNode) -> None:
    """A connect over Flannel's limit is refused at once with HTTP 503, Retry-After and a
    goodbye body (a retry hint), as a chat node refuses one; the slot frees when the first
    connect goes live."""
    async with flannel(node, max_connecting=1) as edge:
        first = await Client.open(url(edge))  # admitted: in progress until live
        try:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url(edge)):
                    pass
            response = refused.value.response
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            body = json.loads(response.body)
            assert body["type"] == "goodbye" and body["reason"] == "overloaded"
            assert body["reconnect_after_ms"] > 0
            await first.request("auth", token=node.tokens["mia"])  # live: the slot frees
            async with Client.connect(url(edge), node.tokens["max"]) as second:
                assert second.session["user"]["handle"] == "max"
        finally:
            await first.close()
