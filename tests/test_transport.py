"""The websockets internals that :mod:`chat.transport` relies on. If a websockets upgrade
moves one of them, these fail here, by name, instead of fan-out breaking somewhere else."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import State

from chat.transport import Connection, FrameWriter, text_frame, waited_s, write_frames
from tests.timing import scaled


def test_server_connection_exposes_what_the_adapter_uses() -> None:
    assert "create_connection" in inspect.signature(serve).parameters
    assert callable(ServerConnection.data_received)
    assert callable(ServerConnection.connection_made)
    assert issubclass(Connection, ServerConnection)
    assert State.OPEN.name == "OPEN"


def test_text_frame_headers_for_each_length_class() -> None:
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert text_frame(b"x" * 70000)[:10] == b"\x81\x7f" + (70000).to_bytes(8, "big")


async def test_raw_frames_interleave_with_the_library_and_pings_count_as_traffic() -> None:
    """Frames written through FrameWriter arrive intact and in order between frames that
    websockets sends itself; a client's PING (a control frame, no data) moves ``last_seen``."""
    connections: list[Connection] = []
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, Connection)
        connections.append(ws)
        writer = FrameWriter(ws)
        assert writer.open and writer.buffered() == 0
        await ws.send("library-1")
        writer.write(text_frame(b"raw-2") + text_frame(b"raw-3" * 100))
        await ws.send("library-4")
        await done.wait()

    async with serve(handler, "127.0.0.1", 0, create_connection=Connection) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", ping_interval=None) as client:
            got = [await asyncio.wait_for(client.recv(), scaled(5)) for _ in range(4)]
            assert got == ["library-1", "raw-2", "raw-3" * 100, "library-4"]
            before = connections[0].last_seen
            await asyncio.sleep(0.05)
            await asyncio.wait_for(await client.ping(), scaled(5))  # the pong came back
            assert connections[0].last_seen > before
            done.set()


async def test_waited_is_the_time_a_connection_spent_in_the_listen_queue() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # the request arrives, nobody accepts
        await asyncio.sleep(0.3)
        accepted, _ = listener.accept()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            asyncio.Protocol, accepted
        )
        started = time.monotonic()
        waited = waited_s(transport)
        assert 0.3 <= waited <= 0.3 + (time.monotonic() - started) + scaled(1.0)
        transport.close()
    finally:
        client.close()
        listener.close()


def test_waited_is_zero_without_a_socket() -> None:
    assert waited_s(asyncio.Transport()) == 0.0


async def test_several_client_frames_in_one_write_arrive_as_separate_messages() -> None:
    """write_frames: websockets frames (and masks) each payload, the bytes leave in
    one write, and the server reads each as its own message (binary or text), in order."""
    received: list[bytes | str] = []
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(message)
            if len(received) == 4:
                done.set()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            writes: list[bytes] = []
            write = ws.transport.write
            ws.transport.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
            payloads: list[bytes | str] = [b"R\x00\x00\x00\x01{}", b"", "{}", b"x" * 70_000]
            write_frames(ws, payloads)
            await asyncio.wait_for(done.wait(), scaled(5))
            assert len(writes) == 1  # one system call for the four
    assert received == payloads
