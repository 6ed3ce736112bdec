"""The resilient client honours a node's overload hints (issue 7), against real sockets.

Gate: a small websockets server in front of a real node that refuses the first attempts the
way the admission contract says (HTTP 503 with a ``goodbye`` body and ``Retry-After``, 503
with only ``Retry-After``, a bare 503; or, after the upgrade, ``goodbye`` ``overloaded``
answering ``auth`` and close 1013) and then relays frames both ways. It tests the client
alone, whatever the node's own admission does.

Real admission: a node with ``CHAT_MAX_CONNECTING`` low and a burst of clients; every one
ends connected, having waited only as hinted.

Every assertion is on counts and outcomes, never on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chat.client import Backoff, Client, ResilientClient
from tests.harness import RunningNode, running_node
from tests.timing import Fixed, scaled

HINT_MS = 40  # the gate's goodbye hint: short, so the test is quick

#: What the gate does with one attempt (in order; past the script's end it relays).
RELAY = "relay"
REFUSE_WITH_BODY = "503 goodbye body + Retry-After"
REFUSE_WITH_RETRY_AFTER = "503 Retry-After only"
REFUSE_BARE = "503 without a hint"
GOODBYE_1013 = "goodbye overloaded answering auth, close 1013"


def small_backoff() -> Backoff:
    """Backoff waits of at most 50 ms: a wrong fallback shows as a count, not a timeout."""
    return Backoff(base=0.05, cap=0.05, rng=random.Random(1))


def overloaded(ms: int) -> str:
    return json.dumps({"type": "goodbye", "reason": "overloaded", "reconnect_after_ms": ms})


class Gate:
    """Refuses attempts as ``script`` says, then relays each connection to ``upstream``."""

    def __init__(self, upstream: str, script: Sequence[str]) -> None:
        self.upstream = upstream
        self.script = list(script)
        self.seen: list[str] = []  # what each attempt got, in order
        self.port = 0
        self._kinds: dict[ServerConnection, str] = {}

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        n = len(self.seen)
        kind = self.script[n] if n < len(self.script) else RELAY
        self.seen.append(kind)
        if kind == REFUSE_WITH_BODY:
            response = ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, overloaded(HINT_MS))
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            response.headers["Retry-After"] = "1"  # rounded up; the body's hint wins
            return response
        if kind == REFUSE_WITH_RETRY_AFTER:
            response = ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "")
            response.headers["Retry-After"] = "1"
            return response
        if kind == REFUSE_BARE:
            return ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
        self._kinds[ws] = kind
        return None

    async def handler(self, ws: ServerConnection) -> None:
        kind = self._kinds.pop(ws)
        async with connect(self.upstream, compression=None, max_size=2**22) as up:
            if kind == GOODBYE_1013:
                await ws.send(await up.recv())  # the node's hello
                await ws.recv()  # auth: not forwarded, answered with the hint
                await ws.send(overloaded(HINT_MS))
                await ws.close(1013, "overloaded")
                return
            await relay(ws, up)


async def relay(client: ServerConnection, up: ClientConnection) -> None:
    """Frames both ways until either side closes; the other is closed with its code."""

    async def pump(
        src: ServerConnection | ClientConnection, dst: ServerConnection | ClientConnection
    ) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in src:
                await dst.send(message)
        code = src.close_code  # 1005, 1006, 1015 only describe a close: never sent
        if code is None or code in (1005, 1006, 1015):
            code = 1000
        await dst.close(code, src.close_reason or "")

    tasks = [asyncio.create_task(pump(client, up)), asyncio.create_task(pump(up, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def gate(upstream: str, script: Sequence[str]) -> AsyncIterator[Gate]:
    g = Gate(upstream, script)
    async with serve(g.handler, "127.0.0.1", 0, process_request=g.process_request) as server:
        g.port = server.sockets[0].getsockname()[1]
        yield g


async def wait_for_count(rc: ResilientClient, attr: str, value: int) -> None:
    async with asyncio.timeout(scaled(10)):
        while getattr(rc, attr) < value:  # noqa: ASYNC110 -- polls a counter with no event
            await asyncio.sleep(0.01)


# =========================================================================== gate


async def test_every_kind_of_hint_is_honoured_without_the_backoff(node: RunningNode) -> None:
    script = [REFUSE_WITH_BODY, REFUSE_WITH_RETRY_AFTER, REFUSE_WITH_BODY, GOODBYE_1013]
    async with (
        gate(node.url, script) as g,
        ResilientClient(g.url, node.tokens["mia"], backoff=small_backoff(), rng=Fixed(0)) as rc,
    ):
        await rc.wait_connected(scaled(15))
        assert (await rc.request("ping"))["server_time"] > 0
        assert g.seen == [*script, RELAY]
        assert (rc.attempts, rc.connects) == (5, 1)
        assert rc.hints == 4  # every refusal carried a hint, and it was taken
        assert rc.backoffs == 0
        assert rc.refusals == 3  # the 503s; the goodbye came after the upgrade
        assert rc.last_close == (1013, "overloaded")
        assert rc.fatal is None
        reset = await rc.next_event("client.reset", timeout=scaled(5))
        assert reset["reason"] == "fresh"


async def test_a_503_without_a_hint_falls_back_to_the_backoff(node: RunningNode) -> None:
    script = [REFUSE_BARE, REFUSE_BARE, REFUSE_WITH_BODY, REFUSE_BARE]
    async with (
        gate(node.url, script) as g,
        ResilientClient(g.url, node.tokens["mia"], backoff=small_backoff(), rng=Fixed(0)) as rc,
    ):
        await rc.wait_connected(scaled(15))
        assert g.seen == [*script, RELAY]
        assert (rc.attempts, rc.connects, rc.refusals) == (5, 1, 4)
        assert (rc.hints, rc.backoffs) == (1, 3)


async def test_refused_reconnects_resume_and_lose_nothing(node: RunningNode) -> None:
    # Connected through the gate; the connection drops; the next attempts are refused with
    # hints; the one after resumes, and every message posted meanwhile arrives once.
    script = [RELAY, REFUSE_WITH_BODY, GOODBYE_1013, REFUSE_WITH_BODY]
    async with (
        gate(node.url, script) as g,
        ResilientClient(g.url, node.tokens["mia"], backoff=small_backoff(), rng=Fixed(0)) as rc,
        Client.connect(node.url, node.tokens["olivia"]) as olivia,
    ):
        await rc.wait_connected(scaled(15))

        async def post(i: int) -> None:
            await olivia.post(node.general, f"ad{i}", client_msg_id=f"ad{i}")

        await post(0)
        rc.drop()
        for i in range(1, 6):
            await post(i)
        await wait_for_count(rc, "connects", 2)
        await post(6)
        texts = [
            (await rc.next_event("message.posted", timeout=scaled(10)))["message"]["text"]
            for _ in range(7)
        ]
        assert texts == [f"ad{i}" for i in range(7)]
        assert g.seen == [*script, RELAY]
        assert (rc.connects, rc.resumes) == (2, 1)
        assert (rc.hints, rc.refusals) == (3, 2)
        assert rc.backoffs == 1  # the drop itself: no hint came with it
        await asyncio.sleep(0.05)
        assert not [e for e in rc.drain_events() if e["type"] == "message.posted"]


# =========================================================================== real admission

BURST = 40  # clients connecting at once
MAX_CONNECTING = 2


async def test_a_burst_over_max_connecting_is_admitted_by_hints_alone(tmp_path: Path) -> None:
    async with running_node(
        sqlite_path=str(tmp_path / "chat.sqlite3"), max_connecting=MAX_CONNECTING
    ) as node:
        handles = sorted(node.tokens)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    ResilientClient(
                        node.url,
                        node.tokens[handles[i % len(handles)]],
                        backoff=Backoff(base=0.05, cap=0.05, rng=random.Random(i)),
                        rng=random.Random(1000 + i),
                        heartbeat=False,
                    )
                )
                for i in range(BURST)
            ]
            async with asyncio.timeout(scaled(60)):
                await asyncio.gather(*(rc.wait_connected() for rc in clients))
            assert all(rc.connects == 1 and rc.fatal is None for rc in clients)
            assert sum(rc.hints for rc in clients) >= 1  # the limit was reached and hinted
            assert sum(rc.backoffs for rc in clients) == 0  # every refusal carried a hint
            for rc in clients:
                assert (await rc.request("ping"))["server_time"] > 0
