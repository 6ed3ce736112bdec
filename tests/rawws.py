"""A raw websocket client for tests that need what a well-behaved library will not do:
stop reading after the handshake, so the server's send buffer fills."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator

from tests.timing import scaled


def masked_text_frame(payload: bytes) -> bytes:
    """A client (masked) websocket text frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@contextlib.asynccontextmanager
async def stalled_client(port: int, token: str) -> AsyncIterator[socket.socket]:
    """An authenticated websocket connection that reads nothing after the handshake."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            "GET / HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        response = b""
        async with asyncio.timeout(scaled(5)):
            while b"\r\n\r\n" not in response:
                chunk = await loop.sock_recv(sock, 1)  # not a byte past the handshake
                assert chunk, "server closed during the handshake"
                response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response
        auth = json.dumps({"type": "auth", "id": "1", "token": token})
        await loop.sock_sendall(sock, masked_text_frame(auth.encode()))
        yield sock
    finally:
        sock.close()


async def read_until_closed(sock: socket.socket) -> None:
    """Drain the socket until the server's side is gone (EOF or reset)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(scaled(10)):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except (ConnectionResetError, BrokenPipeError):
                return
            if not chunk:
                return
