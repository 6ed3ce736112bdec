"""A client that stops reading must not stall anyone else: it is cut off (4001) instead.

The stalled client is a raw socket with a tiny receive buffer that does the websocket
handshake and authenticates by hand, then never reads again; its kernel buffers fill up, the
server's write buffer for it grows past the hard mark, and the server closes it. Meanwhile a
healthy client receives every message, in order.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from chat import metrics
from tests.harness import RunningNode, running_node
from tests.rawws import read_until_closed, stalled_client
from tests.timing import scaled

N_MESSAGES = 400
TEXT = "slow consumers must not stall the others " * 25  # ~1 KB


def shrink_server_send_buffers(node: RunningNode, size: int) -> None:
    """Give the node's sockets a fixed, small kernel send buffer (accepted sockets inherit
    it from the listening socket). Otherwise Linux autotunes it up to tcp_wmem's maximum
    (4 MiB here, more elsewhere), and the kernel, not the server, would absorb the backlog."""
    server = node.node._server
    assert server is not None
    for listener in server.sockets:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def sessions() -> float:
    return metrics.REGISTRY.get_sample_value("chat_sessions") or 0.0


def closes_slow() -> float:
    return metrics.REGISTRY.get_sample_value("chat_closes_total", {"code": "4001"}) or 0.0


async def wait_for_peers(node: RunningNode, count: int, timeout: float) -> None:
    async with asyncio.timeout(scaled(timeout)):
        while sessions() != count:  # noqa: ASYNC110 - the hub has no event to wait on
            await asyncio.sleep(0.01)


async def test_stalled_reader_is_cut_off_and_others_get_everything(tmp_path: Path) -> None:
    async with running_node(
        sqlite_path=str(tmp_path / "slow.db"),
        send_buffer_soft_bytes=64 * 1024,
        send_buffer_hard_bytes=256 * 1024,
        rate_limit_per_10s=100_000,
    ) as node:
        shrink_server_send_buffers(node, 16 * 1024)
        cut_before = closes_slow()
        async with stalled_client(node.node.port, node.tokens["max"]) as stalled:
            await wait_for_peers(node, 1, timeout=5)
            async with node.clients("olivia", "mia") as (olivia, mia):
                assert sessions() == 3
                replies = []
                for start in range(0, N_MESSAGES, 25):
                    replies += await asyncio.gather(
                        *(
                            olivia.request(
                                "messages.post",
                                channel_id=node.general,
                                client_msg_id=f"m{i}",
                                text=f"{i} {TEXT}",
                                timeout=scaled(20),
                            )
                            for i in range(start, min(start + 25, N_MESSAGES))
                        )
                    )
                expected = [
                    r["message"]["id"] for r in sorted(replies, key=lambda r: r["message"]["seq"])
                ]
                assert len(set(expected)) == N_MESSAGES

                received: list[int] = []
                seqs: list[int] = []
                async with asyncio.timeout(scaled(30)):
                    while len(received) < N_MESSAGES:
                        event = await mia.next_event("message.posted", timeout=scaled(10))
                        if event["message"]["channel_id"] == node.general:
                            received.append(event["message"]["id"])
                            seqs.append(event["seq"])
                assert received == expected
                assert seqs == sorted(seqs)
                assert len(set(seqs)) == len(seqs)

                # The stalled connection was cut off with 4001 ...
                assert closes_slow() >= cut_before + 1
                # ... and is gone from the hub, while the healthy ones stay.
                await wait_for_peers(node, 2, timeout=6)
                pong = await mia.request("ping")
                assert pong["server_time"] > 0
            # Reading now, the stalled client finds the server gone.
            await read_until_closed(stalled)
