"""The one place that relies on websockets internals.

Fan-out writes pre-built frames straight to the socket: a server frame is unmasked and, with
compression off, its bytes are the same for every recipient, so one ``bytes`` object serves a
whole channel. That bypasses websockets' own framing, so it depends on a few internals that a
websockets upgrade could change; they are all here, and ``tests/test_transport.py`` fails if
one of them moves:

- ``ServerConnection.transport`` (the asyncio transport) and ``.protocol.state``: frames written
  to the transport leave in write order with websockets' own control frames;
- ``ServerConnection.data_received``: every inbound byte passes through it, control frames
  (ping, pong) included, which is how a connection's liveness is measured;
- ``ServerConnection.connection_lost``: called once when the socket goes, also for a
  handshake that never reached the handler (admission control counts those);
- ``serve(create_connection=...)``: the server builds our subclass;
- ``Protocol.max_message_size``: read per frame, so one connection's limit can differ;
- ``Connection.protocol.send_binary``/``send_text`` and ``.data_to_send``: several frames
  framed (and, by a client, masked) by websockets, then written in one system call
  (:func:`write_frames`).

It also reads one kernel fact, Linux's ``TCP_INFO.tcpi_last_data_recv`` (:func:`waited_s`).
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
from collections.abc import Callable
from typing import Any

from websockets.asyncio.connection import Connection as Connection_
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

OPEN = State.OPEN
PING_FRAME = b"\x89\x00"  # an unmasked websocket PING, FIN set, no payload

# struct tcp_info (linux/tcp.h): tcpi_last_data_recv, in ms, after 8 one-byte fields and
# eight 32-bit ones.
_TCP_INFO_LAST_DATA_RECV = 52
_TCP_INFO_SIZE = 104


def waited_s(transport: asyncio.BaseTransport) -> float:
    """How long ago the client's last bytes arrived on this connection, in seconds, from the
    kernel (Linux ``TCP_INFO``); 0 when it cannot say. Asked when the HTTP request is handled,
    that is how long the connection waited: in the kernel's listen queue (invisible to the
    server otherwise), then in ours."""
    sock: Any = transport.get_extra_info("socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
    except OSError:
        return 0.0
    if len(info) < _TCP_INFO_LAST_DATA_RECV + 4:
        return 0.0
    ms: int = struct.unpack_from("I", info, _TCP_INFO_LAST_DATA_RECV)[0]
    return ms / 1000


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked websocket text frame (FIN set) carrying ``payload``."""
    return _frame(0x81, payload)


def _frame(first_byte: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first_byte, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first_byte, 126, n) + payload
    return struct.pack("!BBQ", first_byte, 127, n) + payload


def set_max_message_size(ws: ServerConnection, size: int) -> None:
    """Change one connection's inbound message limit after ``serve(max_size=...)`` set it
    for all: websockets reads ``Protocol.max_message_size`` as each frame is parsed."""
    ws.protocol.max_message_size = size


def write_frames(ws: Connection_, payloads: list[bytes | str]) -> None:
    """Send several messages in one write (bytes: binary, str: text), framed (and masked,
    by a client) by websockets: a peer reads a burst as one burst (a chat node then commits
    it as one batch), where one write each lets it wake and read them one or two at a time,
    and costs a system call each. Raises websockets' ``InvalidState`` when the connection
    is not open."""
    protocol = ws.protocol
    for payload in payloads:
        if isinstance(payload, str):
            protocol.send_text(payload.encode())
        else:
            protocol.send_binary(payload)
    ws.transport.write(b"".join(protocol.data_to_send()))


def binary_frame(payload: bytes) -> bytes:
    """A complete unmasked websocket binary frame (FIN set) carrying ``payload``."""
    return _frame(0x82, payload)


class Connection(ServerConnection):
    """websockets' server connection, noting when the client last sent anything at all, and
    carrying its admission (:meth:`admit`) from the HTTP request to the end of the connect."""

    last_seen: float = 0.0
    deadline: float = math.inf  # when the connect must be live by (loop time)
    service_subject: str | None = None  # an edge node's service connection (chat/service.py)
    _release: Callable[[bool], None] | None = None

    def admit(self, release: Callable[[bool], None], deadline: float) -> None:
        """Admission control took this connect on: ``release(went_live)`` is called exactly
        once, by :meth:`release` or when the connection is lost (a handshake abandoned
        before the handler ran)."""
        self._release = release
        self.deadline = deadline

    def release(self, served: bool) -> None:
        release, self._release = self._release, None
        self.deadline = math.inf
        if release is not None:
            release(served)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release(False)
        super().connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_seen = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        # Any traffic is liveness, websocket PING/PONG control frames included: many client
        # libraries keep a connection alive with those and send nothing else when idle.
        self.last_seen = asyncio.get_running_loop().time()
        super().data_received(data)


class FrameWriter:
    """Raw frame writes to one connection: ``write`` never blocks; ``buffered`` says how much
    is waiting in the kernel-side queue (slow-consumer policy is the caller's)."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, ws: ServerConnection) -> None:
        self._transport = ws.transport
        self._protocol = ws.protocol

    @property
    def open(self) -> bool:
        return self._protocol.state is OPEN

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    def write(self, frames: bytes) -> None:
        self._transport.write(frames)

    def abort(self) -> None:
        self._transport.abort()
