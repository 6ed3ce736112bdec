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
- ``serve(create_connection=...)``: the server builds our subclass.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

OPEN = State.OPEN


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked websocket text frame (FIN set) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Connection(ServerConnection):
    """websockets' server connection, noting when the client last sent anything at all, and
    carrying its admission (:meth:`admit`) from the HTTP request to the end of the connect."""

    last_seen: float = 0.0
    deadline: float = math.inf  # when the connect must be live by (loop time)
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
