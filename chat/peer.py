"""One client connection as the hub sees it once authenticated: raw frame writes with the
slow-consumer policy, corking, pings, revocation and a bounded close.

Shared by the chat node (:mod:`chat.server`) and the edge (:mod:`flannel.server`): both hand
the same :class:`Peer` to the same :class:`~chat.fanout.Hub` and connect sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Protocol

from chat import metrics
from chat.errors import CloseCode, ErrorCode
from chat.metrics import TALLY
from chat.transport import OPEN, PING_FRAME, Connection, FrameWriter

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 2.0
# Requests already accepted get their replies before a close for flooding or revocation;
# this bounds how long the close waits for them.
FINISH_REQUESTS_S = 10.0


class Host(Protocol):
    """What a peer needs from the server it belongs to: a place for its background work, and
    a flush of its frames once the current turn of the event loop is over."""

    def spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]: ...

    def defer(self, peer: Peer) -> None:
        """Call ``peer.flush()`` once the current turn of the event loop is over."""
        ...


class Peer(FrameWriter):
    """One websocket connection, as the hub sees it once authenticated."""

    __slots__ = (
        "_corked",
        "_hard",
        "_node",
        "_pending",
        "_soft",
        "closer",
        "closing",
        "live",
        "pinged_at",
        "requests",
        "revoked",
        "role",
        "session_id",
        "user_id",
        "workspace_id",
        "ws",
    )

    def __init__(
        self, host: Host, ws: Connection, *, soft: int, hard: int, max_inflight: int
    ) -> None:
        super().__init__(ws)
        self._node = host
        self.ws = ws
        self._soft = soft
        self._hard = hard
        self.user_id = 0
        self.workspace_id = 0
        self.session_id = ""
        self.role = "guest"
        self.closing = False
        self.live = False  # set once the connect sequence went live
        self.revoked = False
        self.closer: asyncio.Task[object] | None = None
        self.requests = Slots(max_inflight)
        self._corked: list[bytes] | None = None
        self._pending: list[bytes] | None = None  # written at the end of the loop's turn
        self.pinged_at = 0.0

    def send(self, frame: bytes, droppable: bool) -> None:
        # The per-recipient hot path of fan-out: keep it short (FrameWriter's fields, inline).
        if self.closing or self.revoked or self._protocol.state is not OPEN:
            return
        self._write(frame, droppable)

    def reply(self, frame: bytes) -> None:
        """A reply or error frame: still sent after revocation, to requests made before."""
        if self.closing or self._protocol.state is not OPEN:
            return
        self._write(frame, False)

    def ping(self, now: float) -> None:
        """A websocket PING (empty); the client's PONG counts as liveness."""
        if not self.closing and self._protocol.state is OPEN:
            self._transport.write(PING_FRAME)
            self.pinged_at = now

    def cork(self) -> None:
        """Hold frames until :meth:`uncork`, which writes them in one go: a connect's reply,
        replay, marker and buffered events cost one system call, not one each (in a storm,
        the node's time goes to system calls)."""
        if self._corked is None:
            self.flush()  # what came before goes first
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self._protocol.state is OPEN:
            self._transport.write(b"".join(corked))

    def flush(self) -> None:
        """Write the frames of this turn of the event loop in one go. Every frame (events,
        replies) waits here until the turn is over, in order, so that the events of several
        batches handled in one turn (a busy edge reads several at once) cost one system call
        per connection, not one each."""
        pending, self._pending = self._pending, None
        if pending and self._protocol.state is OPEN:
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, frame: bytes, droppable: bool) -> None:
        if self._corked is not None:
            self._corked.append(frame)
            return
        transport = self._transport
        if transport.get_write_buffer_size() > self._soft:
            if droppable:
                TALLY.dropped += 1
                return
            if transport.get_write_buffer_size() > self._hard:
                log.warning("slow consumer cut off", extra={"user_id": self.user_id})
                self.close(CloseCode.SLOW_CONSUMER, "slow_consumer")
                return
        pending = self._pending
        if pending is None:
            self._pending = [frame]
            self._node.defer(self)
        else:
            pending.append(frame)
        TALLY.frames_out += 1

    def waited_for(self) -> bool:
        """Whether a connect in progress is still worth serving: its client is there, and
        its deadline has not passed."""
        return (
            self.open and not self.closing and asyncio.get_running_loop().time() <= self.ws.deadline
        )

    def revoke(self) -> None:
        """No more events, no new requests; close once the requests already in flight have
        their replies (the revocation may be one of them). While connecting, the connect
        sequence sees ``revoked`` at its next step and answers the ``auth`` itself."""
        if self.revoked:
            return
        self.revoked = True
        if self.live:
            self.close_when_idle(CloseCode.POLICY_VIOLATION, ErrorCode.TOKEN_REVOKED.value)

    def close_when_idle(self, code: CloseCode, reason: str) -> None:
        if not self.requests.busy:
            self.close(code, reason)
            return

        async def later() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.requests.idle(), FINISH_REQUESTS_S)
            self.close(code, reason)

        self._node.spawn(later())

    def close(self, code: CloseCode, reason: str) -> None:
        if self.closing:
            return
        self.flush()  # what was written before the close goes before it
        self.uncork()
        self.closing = True
        metrics.CLOSES.labels(code=str(int(code))).inc()
        self.closer = self._node.spawn(self._close(code, reason))

    async def _close(self, code: CloseCode, reason: str) -> None:
        # websockets' close() first waits for the write buffer to drain, which a client that
        # stopped reading never lets happen: bound it, then drop the connection.
        try:
            await asyncio.wait_for(self.ws.close(code, reason), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.abort()


class Slots:
    """A per-connection bound on requests in flight; a lighter asyncio.Semaphore (there is
    one per connection, and most never wait)."""

    __slots__ = ("_free", "_idle", "_size", "_waiter")

    def __init__(self, size: int) -> None:
        self._free = self._size = size
        self._waiter: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return self._free < self._size

    async def acquire(self) -> None:
        while self._free <= 0:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._free -= 1

    def release(self) -> None:
        self._free += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None
        if self._free == self._size and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def idle(self) -> None:
        """Wait until no request is in flight."""
        if not self.busy:
            return
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)
