"""Reconnect storms against real nodes (issue 7): PostgreSQL, Redis and node processes.

A node whose admission limit (``CHAT_MAX_CONNECTING``) is far below the number of clients
that connect at once must answer the surplus with retry hints, never let them time out, and
end with every client live; after the node is killed and restarted, every client resumes,
and each has received every message PostgreSQL stored exactly once. Assertions are on counts
and outcomes, never on time.
"""

from __future__ import annotations

import asyncio
import os
import signal

from chat.client import Backoff, ResilientClient
from tests.cluster import Cluster
from tests.conftest import MakeCluster
from tests.test_cluster import (
    FAST,
    Recorder,
    ametric,
    assert_same_ids,
    post,
    pump,
    stored_ids,
    wait_until,
)
from tests.timing import scaled

CLIENTS = 120
LIMIT = 8  # connects in progress at once, per node: far below CLIENTS
STORM = {**FAST, "CHAT_MAX_CONNECTING": str(LIMIT)}


async def sessions(cluster: Cluster, n: int) -> list[str]:
    """``n`` tokens (one session each: tabs and devices) of the seeded users but the first,
    who posts."""
    seeded = cluster.seeded
    assert seeded is not None
    users = [seeded.users[h] for h in seeded.handles[1:]]
    async with cluster.admin() as admin:
        return await admin.issue_tokens([users[i % len(users)] for i in range(n)])


async def test_a_storm_over_the_admission_limit_gets_hints_then_resumes_without_loss(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, extra_env=STORM)
    seeded = cluster.seeded
    assert seeded is not None
    ch = seeded.channels["general"]
    storm_node = cluster.nodes[0]
    tokens = await sessions(cluster, CLIENTS)
    # Every client knows only the storm node: each attempt goes there.
    clients = [
        ResilientClient([storm_node.url], t, backoff=Backoff(base=0.05, cap=0.5)) for t in tokens
    ]
    recs = [Recorder(ch) for _ in clients]
    pumps: list[asyncio.Task[None]] = []
    try:
        # 1. A cold storm: all at once.
        for rc, rec in zip(clients, recs, strict=True):
            rc.start()
            pumps.append(asyncio.create_task(pump(rc, rec)))
        await asyncio.gather(*(rc.wait_connected(scaled(60)) for rc in clients))
        cold_hints = sum(rc.hints for rc in clients)
        refused = await ametric(storm_node, "chat_admission_refused_total", 'when="at_upgrade"')
        assert cold_hints > 0, "the limit was never reached: nothing was tested"
        assert cold_hints == refused, "every refusal was a hint the client followed"
        assert sum(rc.timeouts for rc in clients) == 0
        assert sum(rc.backoffs for rc in clients) == 0, "hints only, no blind retries"
        await wait_until(lambda: all(r.of_type("client.reset") for r in recs), scaled(10), "resets")

        # 2. Messages before, while the node is down (missed: replayed on resume), and
        #    while the clients storm back in.
        async with cluster.client(1, seeded.handles[0]) as poster:
            for i in range(10):
                await post(poster, ch, f"before{i}", f"before {i}")
            await asyncio.to_thread(storm_node.kill)  # SIGKILL
            for i in range(10):
                await post(poster, ch, f"down{i}", f"while down {i}")
            await storm_node.astart()  # the same port: the storm comes back
            for i in range(10):
                await post(poster, ch, f"after{i}", f"after {i}")
                await asyncio.sleep(0.01)

        expected = await stored_ids(cluster, ch)
        assert len(expected) == 30
        await asyncio.gather(*(rec.wait_posted(len(expected), scaled(60)) for rec in recs))
        await asyncio.gather(*(rc.wait_connected(scaled(60)) for rc in clients))
        await asyncio.sleep(0.2)  # anything sent twice would have arrived by now

        restart_hints = sum(rc.hints for rc in clients) - cold_hints
        refused_after = await ametric(
            storm_node, "chat_admission_refused_total", 'when="at_upgrade"'
        )
        assert restart_hints > 0, "the restart storm never reached the limit"
        assert restart_hints == refused_after
        assert sum(rc.timeouts for rc in clients) == 0
        assert await ametric(storm_node, "chat_connects_in_progress") == 0, "none leaked"
        for i, (rc, rec) in enumerate(zip(clients, recs, strict=True)):
            assert rc.fatal is None
            assert_same_ids(f"client {i}", rec.ids(), expected)
            assert rc.resumes >= 1, f"client {i} did not resume"
            assert [r["reason"] for r in rec.of_type("client.reset")] == ["fresh"]
            assert rc.cursor.duplicates == 0
    finally:
        for rc in clients:
            await rc.close()
        await asyncio.gather(*pumps, return_exceptions=True)


async def test_connects_that_waited_out_a_frozen_node_are_sent_away_then_served(
    make_cluster: MakeCluster,
) -> None:
    """The node stops (a long pause: CPU starvation, swapping) while clients connect: they
    wait in the kernel's listen queue, where the node cannot count them. Once it runs again,
    those that waited past the connect deadline less the admission budget get an
    appointment instead of a
    connect that would finish too late; then every client is served."""
    deadline = {"CHAT_CONNECT_DEADLINE_S": "2", "CHAT_ADMISSION_BUDGET_S": "1"}
    cluster = await make_cluster(1, extra_env={**FAST, **deadline})
    node = cluster.nodes[0]
    assert node.pid is not None
    tokens = await sessions(cluster, 30)
    clients = [ResilientClient([node.url], t, backoff=Backoff(base=0.05, cap=0.5)) for t in tokens]
    try:
        os.kill(node.pid, signal.SIGSTOP)
        try:
            for rc in clients:
                rc.start()
            await asyncio.sleep(1.5)  # past 2 - 1 s, in the listen queue
        finally:
            os.kill(node.pid, signal.SIGCONT)
        await asyncio.gather(*(rc.wait_connected(scaled(30)) for rc in clients))
        stale = await ametric(node, "chat_admission_refused_total", 'when="waited_too_long"')
        assert stale > 0
        assert sum(rc.hints for rc in clients) == stale + await ametric(
            node, "chat_admission_refused_total", 'when="at_upgrade"'
        )
        assert sum(rc.timeouts for rc in clients) == 0
        assert all(rc.fatal is None for rc in clients)
        assert await ametric(node, "chat_connects_in_progress") == 0, "none leaked"
    finally:
        for rc in clients:
            await rc.close()
