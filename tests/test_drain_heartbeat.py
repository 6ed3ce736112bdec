"""Heartbeat timeouts and drain: silent connections are closed with 4000 (resume later);
SIGTERM-style drain spreads the 1012 closes over the drain period, each with a goodbye."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.harness import running_node
from tests.timing import scaled


async def test_silent_connection_is_closed_for_missed_heartbeats(tmp_path: Path) -> None:
    async with running_node(sqlite_path=str(tmp_path / "h.db"), heartbeat_interval_ms=200) as node:
        async with node.client("mia") as silent, node.client("max") as chatty:
            assert silent.hello["heartbeat_interval_ms"] == 200
            deadline = time.monotonic() + scaled(1.5)
            while time.monotonic() < deadline and not silent.closed.is_set():
                await chatty.request("ping")
                await asyncio.sleep(0.05)
            await asyncio.wait_for(silent.closed.wait(), scaled(2))
            assert silent.ws.close_code == 4000
            assert silent.ws.close_reason == "heartbeat_timeout"
            assert not chatty.closed.is_set()
            await chatty.request("ping")


async def test_drain_spreads_closes_and_says_goodbye(tmp_path: Path) -> None:
    async with running_node(sqlite_path=str(tmp_path / "d.db"), drain_period_s=1.0) as node:
        handles = ["olivia", "adam", "mia", "max", "gus", "mallory"]
        async with node.clients(*handles) as clients:
            closed_at: dict[int, float] = {}

            async def watch(i: int) -> None:
                await clients[i].closed.wait()
                closed_at[i] = time.monotonic()

            watchers = [asyncio.create_task(watch(i)) for i in range(len(clients))]
            started = time.monotonic()
            await node.node.stop()
            await asyncio.wait_for(asyncio.gather(*watchers), scaled(5))
            for c in clients:
                assert c.ws.close_code == 1012
                goodbye = [e for e in c.drain_events() if e["type"] == "goodbye"]
                assert len(goodbye) == 1
                assert 0 <= goodbye[0]["reconnect_after_ms"] <= 1000
            spread = max(closed_at.values()) - min(closed_at.values())
            assert spread >= 0.5  # not all at once: about 5/6 of the 1 s period
            assert max(closed_at.values()) - started < scaled(4)
