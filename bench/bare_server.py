"""The baseline for the fan-out benchmark: the least a websockets server can do to fan out.

Receivers connect on ``/`` and are kept in a set. A poster connects on ``/post``; every text
frame it sends is pushed to all receivers with ``websockets.broadcast()`` (the bytes are encoded
once, as a server that serializes an event once would do), then acknowledged to the poster with
a text frame ``ack`` so the poster can keep a bounded window of posts in flight, like it does
with the chat server's replies. ``GET /readyz`` answers 200. No compression, uvloop.

    python -m bench.bare_server --host 127.0.0.1 --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

RECEIVERS: set[ServerConnection] = set()


def process_request(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/readyz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def handler(ws: ServerConnection) -> None:
    if ws.request is not None and ws.request.path == "/post":
        while True:
            try:
                data = await ws.recv(decode=False)
            except Exception:  # the poster went away: nothing to clean up
                return
            broadcast(RECEIVERS, data, text=True)
            await ws.send("ack")
    RECEIVERS.add(ws)
    try:
        await ws.wait_closed()
    finally:
        RECEIVERS.discard(ws)


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        host,
        port,
        compression=None,
        process_request=process_request,
        max_size=2**20,
        backlog=4096,  # as the chat server's default listen_backlog: 200 SYNs at once are fine
    ):
        print(f"LISTENING {host}:{port}", flush=True)
        await stop


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main(args.host, args.port))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(main(args.host, args.port))


if __name__ == "__main__":
    run()
