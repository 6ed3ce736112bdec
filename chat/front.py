"""What every tier that clients connect to does the same way: the front door.

A :class:`Front` owns the websocket listener and everything between a client's TCP connect
and its requests: the HTTP probes, admission control (a 503 with a retry hint before the
upgrade), the ``hello``, the connect sequence (:mod:`chat.connect`, sans-I/O) driven step by
step with a deadline, replay with flow control, the request loop (parsing, rate limits and
bounded concurrency in :class:`~chat.protocol.ClientProtocol`), heartbeats, and a drain that
spreads its closes. What a step *means* is the tier's: the chat node (:mod:`chat.server`)
performs the sequence's actions against its database and bus, the edge
(:mod:`flannel.server`) against the chat tier; each answers requests its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chat import __version__, metrics, web, wire
from chat.admission import Admission
from chat.bus import Envelope
from chat.config import FrontSettings
from chat.connect import CheckWindow, Connect, Effect, Live, Ready, ScanReplay, StreamReplay
from chat.errors import ChatError, CloseCode, ErrorCode
from chat.fanout import Hub
from chat.metrics import TALLY
from chat.peer import FINISH_REQUESTS_S, Peer
from chat.protocol import Authenticate, ClientProtocol, Close, Dispatch, Send
from chat.replay import ReplayCache
from chat.snapshots import Abandoned
from chat.transport import Connection, FrameWriter, text_frame, waited_s

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 2.0


class Front:
    """A websocket server for clients, less the meaning of each step (see the subclasses:
    ``_perform``, ``_dispatch``, ``_went_live``, ``_ended``, ``_problem``)."""

    def __init__(self, settings: FrontSettings) -> None:
        self.front_settings = settings
        self._server: Server | None = None
        self._metrics_server: Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._draining = False
        self._peers: set[Peer] = set()
        self._unflushed: list[Peer] = []
        self._flushed_at = 0.0
        self._write_delay_s = settings.write_delay_ms / 1000
        self.hub = Hub(framer=text_frame)
        self.admission = Admission(
            max_connecting=settings.max_connecting,
            budget_s=settings.admission_budget_s,
            # Most of the deadline gone before the node even saw it: with the queue ahead
            # (up to the budget) it would not make it.
            max_wait_s=max(settings.connect_deadline_s - settings.admission_budget_s, 0.5),
        )
        self.replay: ReplayCache
        self._hello_frame = text_frame(wire.dump(self._hello()))  # the same for every client
        self.port = 0
        self.metrics_port: int | None = None
        root = settings.web_root
        self.web = web.WebRoot(Path(root) if root else web.default_root())

    # ------------------------------------------------------------------ what a tier decides

    async def _perform(self, peer: Peer, sequence: Connect, action: Effect | None) -> list[Effect]:
        """Carry out one action of the connect sequence; return the sequence's next effects."""
        raise NotImplementedError

    async def _dispatch(
        self, peer: Peer, protocol: ClientProtocol, request: wire.Request, text: str
    ) -> None:
        """Answer one valid request of a live session (``text``: the frame as received).
        Called with a request slot held (``peer.requests``): release it when answered."""
        raise NotImplementedError

    async def _went_live(self, peer: Peer, live: Live) -> None:
        """The session went live (presence)."""

    async def _ended(self, peer: Peer, was_live: bool) -> None:
        """The connection ended, at any step (``was_live``: it had gone live)."""

    async def _problem(self) -> str | None:
        """Why this server should get no new clients (``/readyz``), besides draining."""
        return None

    def _heartbeat_more(self, now: float, limit: float, ping_after: float) -> None:
        """Other connections the heartbeat loop looks after (service links)."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle

    def spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def defer(self, peer: Peer) -> None:
        """Flush ``peer`` at the end of this turn of the event loop (one callback for all),
        or, when the last flush was less than ``write_delay_ms`` ago, once that much time
        has passed: under load, frames then leave in fewer, larger writes."""
        if not self._unflushed:
            loop = asyncio.get_running_loop()
            wait = self._flushed_at + self._write_delay_s - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush)
            else:
                loop.call_soon(self._flush)
        self._unflushed.append(peer)

    def _flush(self) -> None:
        self._flushed_at = asyncio.get_running_loop().time()
        unflushed, self._unflushed = self._unflushed, []
        for peer in unflushed:
            peer.flush()

    async def _listen(self) -> None:
        s = self.front_settings
        self._server = await serve(
            self._connection,
            s.host,
            s.port,
            create_connection=Connection,
            process_request=self._process_request,
            compression=None,
            max_size=s.max_frame_bytes,
            max_queue=16,
            open_timeout=s.handshake_timeout_s,
            # Pings are sent by _watch_heartbeats, not by a task per connection.
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT_S,
            # Origins are checked in _process_request (the server's own origin included).
            origins=None,
            backlog=s.listen_backlog,
            server_header=f"chat/{__version__}",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if s.metrics_port is not None:
            self._metrics_server = await serve(
                self._refuse_websocket,
                s.metrics_host,
                s.metrics_port,
                process_request=self._process_metrics_request,
                server_header=f"chat/{__version__}",
            )
            self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self.spawn(self._watch_heartbeats())

    async def _close_front(
        self, before_drain: Callable[[], Awaitable[object]] | None = None
    ) -> bool:
        """Drain and stop listening, then cancel background work, within the grace period.
        False if it was not listening."""
        if self._server is None:
            return False
        self._draining = True
        grace = self.front_settings.shutdown_grace_s
        if before_drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(before_drain(), grace / 2)
        await self._drain(list(self._server.connections))
        self._server.close(close_connections=False)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=grace / 2)
            for task in stuck:
                log.error("task did not stop when cancelled", extra={"task": repr(task)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1)
        self._server = None
        return True

    # ------------------------------------------------------------------ HTTP probes

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            problem = "draining" if self._draining else await self._problem()
            if problem is not None:
                return ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, problem + "\n")
            return ws.respond(http.HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            return ws.respond(http.HTTPStatus.NOT_FOUND, "served on the metrics listener\n")
        if not web.is_upgrade(request.headers):
            return self.web.respond(request.path, request.headers)
        if self._origin_refused(request.headers):
            return ws.respond(http.HTTPStatus.FORBIDDEN, "invalid Origin header\n")
        if self._draining:
            # Still listening so that probes see the drain; new sessions go elsewhere.
            response = ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            response.headers["Retry-After"] = "1"
            return response
        assert isinstance(ws, Connection)
        return self._admit(ws)

    def _admit(self, ws: Connection) -> Response | None:
        waited = waited_s(ws.transport)
        stale = self.admission.stale
        hint_ms = self.admission.admit(waited)
        if hint_ms is not None:
            when = "waited_too_long" if self.admission.stale > stale else "at_upgrade"
            metrics.ADMISSION_REFUSED.labels(when=when).inc()
            return _overloaded(hint_ms)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.front_settings.connect_deadline_s - waited
        ws.admit(self._connect_ended, deadline)
        return None

    # ------------------------------------------------------------------ connections

    async def _connection(self, ws: ServerConnection) -> None:
        assert isinstance(ws, Connection)  # serve(create_connection=Connection)
        # websockets keeps the handshake request (also in its parser's frame) and response for
        # the connection's lifetime; nothing reads their headers after the handshake, and
        # they are ~2 KB a connection: empty them in place.
        for handshake in (ws.request, ws.response):
            if handshake is not None:
                handshake.headers.clear()
        metrics.CONNECTIONS.inc()
        s = self.front_settings
        peer = Peer(
            self,
            ws,
            soft=s.send_buffer_soft_bytes,
            hard=s.send_buffer_hard_bytes,
            max_inflight=s.max_inflight_requests,
        )
        self._peers.add(peer)
        loop = asyncio.get_running_loop()
        protocol = ClientProtocol(
            now=loop.time(),
            requests_per_10s=s.rate_limit_per_10s,
            disconnect_after=s.rate_limit_disconnect_after,
        )
        sequence = Connect(protocol, self.hub, peer)
        was_live = False
        try:
            live = await self._open(peer, protocol, sequence)
            peer.ws.release(live)
            if not live:
                return
            metrics.SESSIONS.inc()
            async for message in ws:
                TALLY.frames_in += 1
                verdict = protocol.receive(message, loop.time())
                if isinstance(verdict, Dispatch):
                    if peer.revoked:
                        # Revoked while earlier requests finish: refuse new ones.
                        revoked = ChatError(ErrorCode.TOKEN_REVOKED)
                        self._apply(peer, protocol.fail(verdict.request.id, revoked))
                        continue
                    # Bounded concurrency per connection: past the limit we stop reading,
                    # and TCP pushes back on the client.
                    await peer.requests.acquire()
                    assert isinstance(message, str)  # binary frames never dispatch
                    await self._dispatch(peer, protocol, verdict.request, message)
                elif isinstance(verdict, Close):
                    # Flooding: every request accepted before gets its reply first.
                    if verdict.frame is not None:
                        self._reply(peer, verdict.frame)
                    await bounded(peer.requests.idle(), FINISH_REQUESTS_S, "requests")
                    peer.close(verdict.code, verdict.reason)
                    return
                elif isinstance(verdict, Send):
                    self._reply(peer, verdict.frame)
                if peer.closing:
                    return
        except ConnectionClosed:
            pass
        finally:
            self._peers.discard(peer)
            if peer.closer is not None:
                # Returning from the handler would close with 1000: finish our close first.
                with contextlib.suppress(Exception):
                    await asyncio.shield(peer.closer)
            metrics.CONNECTIONS.dec()
            was_live = sequence.close()  # detached from the hub; True only if it went live
            if was_live:
                metrics.SESSIONS.dec()
            await self._ended(peer, was_live)

    def _origin_refused(self, headers: Headers) -> bool:
        """A browser's websocket from a page of another origin than this server's and the
        allowed ones (``allowed_origins``). Clients that send no Origin are not browsers."""
        allowed = self.front_settings.allowed_origins
        origins = headers.get_all("Origin")
        if not origins or "*" in allowed:
            return False
        if len(origins) > 1:
            return True
        origin, host, s = origins[0], headers.get("Host"), self.front_settings
        if origin in allowed:
            return False
        return not (
            web.same_origin(origin, host) and web.trusted_host(host, s.host, s.allowed_hosts)
        )

    async def _drain(self, connections: list[ServerConnection]) -> None:
        """Close every connection with 1012, spread evenly over ``drain_period_s`` in random
        order, each told to come back after a short random delay: the clients of a node that
        is being deployed reconnect to the others as a trickle, not a storm."""
        period = self.front_settings.drain_period_s
        random.shuffle(connections)

        async def drain_one(ws: ServerConnection, delay: float) -> None:
            await asyncio.sleep(delay)
            hint = wire.Goodbye(
                reason="service_restart", reconnect_after_ms=random.randint(0, 1000)
            )
            writer = FrameWriter(ws)
            is_link = isinstance(ws, Connection) and ws.service_subject is not None
            if writer.open and not is_link:
                writer.write(text_frame(wire.dump(hint)))
            try:
                await asyncio.wait_for(
                    ws.close(CloseCode.SERVICE_RESTART, "service_restart"), _CLOSE_TIMEOUT_S
                )
            except TimeoutError:
                writer.abort()

        n = len(connections)
        tasks = [
            asyncio.ensure_future(drain_one(ws, period * i / n)) for i, ws in enumerate(connections)
        ]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=period + _CLOSE_TIMEOUT_S + 1)
            for task in late:
                task.cancel()

    async def _watch_heartbeats(self) -> None:
        """Ping connections quiet for ``ping_interval_s`` (a websocket PING: browsers answer
        it themselves), and close those that sent nothing at all (no frame, not even a ping
        or pong) for two heartbeat intervals (4000): a dead client, or a zombie connection;
        the client reconnects and resumes. One loop for all connections, rather than
        websockets' keepalive task per connection (a task, a timer and a future each)."""
        limit = 2 * self.front_settings.heartbeat_interval_ms / 1000
        ping_after = self.front_settings.ping_interval_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(limit / 4, ping_after / 2, 5.0))
            now = loop.time()
            for peer in list(self._peers):
                last_seen = peer.ws.last_seen
                if now - last_seen > limit:
                    peer.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat_timeout")
                elif now - max(last_seen, peer.pinged_at) >= ping_after:
                    peer.ping(now)
            self._heartbeat_more(now, limit, ping_after)

    def _connect_ended(self, served: bool) -> None:
        self.admission.finished(served=served)

    async def _process_metrics_request(self, ws: ServerConnection, request: Request) -> Response:
        if request.path.split("?", 1)[0] != "/metrics":
            return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        body = metrics.render()
        headers = Headers(
            [
                ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ]
        )
        return Response(200, "OK", headers, body)

    async def _refuse_websocket(self, ws: ServerConnection) -> None:
        await ws.close(CloseCode.POLICY_VIOLATION, "not a websocket endpoint")

    async def _open(self, peer: Peer, protocol: ClientProtocol, sequence: Connect) -> bool:
        """Hello, then the first frame must authenticate. True once the session is live.
        (A function of its own so the auth frame and token are freed when it returns.)"""
        ws = peer.ws
        peer.write(self._hello_frame)
        try:
            async with asyncio.timeout(self.front_settings.auth_timeout_s):
                first = await ws.recv()
        except TimeoutError:
            peer.close(CloseCode.POLICY_VIOLATION, "auth_timeout")
            return False
        TALLY.frames_in += 1
        verdict = protocol.receive(first, asyncio.get_running_loop().time())
        if isinstance(verdict, Send | Close):
            self._apply(peer, verdict)
            return False
        if not isinstance(verdict, Authenticate):  # never: no dispatch before auth
            raise AssertionError(verdict)
        return await self._connect(peer, sequence, sequence.start(verdict.request))

    async def _connect(self, peer: Peer, sequence: Connect, effects: list[Effect]) -> bool:
        """Carry out the connect sequence (what it writes leaves in one write, see
        :meth:`Peer.cork`)."""
        peer.cork()
        try:
            return await self._steps(peer, sequence, effects)
        finally:
            peer.uncork()

    async def _steps(self, peer: Peer, sequence: Connect, effects: list[Effect]) -> bool:
        """The effects of each step, and its I/O. A connect whose client has gone stops;
        one past its deadline is told to come back later."""
        loop = asyncio.get_running_loop()
        while True:
            action: Effect | None = None
            for effect in effects:
                if isinstance(effect, Send):
                    peer.reply(text_frame(effect.frame))
                elif isinstance(effect, Close):
                    self._apply(peer, effect)
                    return False
                elif isinstance(effect, Live):
                    peer.live = True
                    await self._went_live(peer, effect)
                    return True
                else:
                    action = effect
            if peer.closing or not peer.open:
                return False
            if loop.time() > peer.ws.deadline:
                self._send_away(peer)
                return False
            try:
                effects = await self._perform(peer, sequence, action)
            except asyncio.CancelledError:
                raise
            except Abandoned:
                return False
            except Exception as exc:
                effects = sequence.failed(exc)

    async def _perform_replay(
        self, peer: Peer, sequence: Connect, action: Effect | None
    ) -> list[Effect]:
        """The steps every tier performs alike: the resume's window, scan and stream over
        :attr:`replay`, and ``Ready``."""
        if isinstance(action, CheckWindow):
            holds = await self.replay.holds(action.workspace_id, action.after_seq, action.up_to)
            return sequence.window_checked(holds)
        if isinstance(action, ScanReplay):
            async for chunk in self._read(action.workspace_id, action.after_seq, action.up_to):
                sequence.scan(chunk)
            return sequence.scanned()
        if isinstance(action, StreamReplay):
            if not action.cached:
                peer.uncork()  # a long replay: written with flow control, chunk by chunk
            chunks = action.cached or self._read(
                action.workspace_id, action.after_seq, action.up_to
            )
            if not await self._stream(peer, sequence, chunks):
                return [Close(CloseCode.SLOW_CONSUMER, "slow_consumer")]
            return sequence.streamed()
        if isinstance(action, Ready):
            return sequence.ready()
        raise AssertionError(f"no action to perform: {action!r}")

    def _read(
        self, workspace_id: int, after_seq: int, up_to: int
    ) -> AsyncIterator[Sequence[Envelope]]:
        return self.replay.read(workspace_id, after_seq, up_to)

    async def _stream(
        self,
        peer: Peer,
        sequence: Connect,
        chunks: AsyncIterator[Sequence[Envelope]] | Sequence[Sequence[Envelope]],
    ) -> bool:
        """Write a replay with flow control: a long backlog must not look like a slow
        consumer, nor sit in memory all at once. False if the client stopped reading."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        soft = self.front_settings.send_buffer_soft_bytes

        async def each() -> AsyncIterator[Sequence[Envelope]]:
            if isinstance(chunks, Sequence):
                for chunk in chunks:
                    yield chunk
            else:
                async for chunk in chunks:
                    yield chunk

        async for chunk in each():
            if peer.revoked:
                break  # the sequence refuses at its next step; no more of the replay
            payloads = sequence.visible(chunk)
            if payloads:
                peer.reply(b"".join([text_frame(p) for p in payloads]))
            while peer.buffered() > soft:
                if peer.closing or loop.time() > deadline:
                    return False
                await asyncio.sleep(0.005)
            if peer.closing:
                return False
        return True

    async def _respond(
        self,
        peer: Peer,
        protocol: ClientProtocol,
        request: wire.Request,
        work: Awaitable[wire.Data],
    ) -> None:
        """Answer ``request`` with what ``work`` gives, or its error; release the request's
        slot; time it. A ``token_revoked`` refusal revokes the connection (the request saw
        the revocation before its event arrived)."""
        started = time.perf_counter()
        try:
            data = await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = protocol.fail(request.id, exc)
            if isinstance(exc, ChatError) and exc.code is ErrorCode.TOKEN_REVOKED:
                peer.revoke()
            self._apply(peer, verdict)
        else:
            peer.reply(text_frame(protocol.reply(request.id, data)))
        finally:
            peer.requests.release()
            metrics.REQUESTS.labels(type=request.type).observe(  # type: ignore[attr-defined]
                time.perf_counter() - started
            )

    def _hello(self, *, setup_required: bool = False) -> wire.Hello:
        s = self.front_settings
        return wire.Hello(
            server_version=__version__,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            limits=wire.Limits(
                max_frame_bytes=s.max_frame_bytes,
                max_text_chars=wire.MAX_TEXT_CHARS,
                requests_per_10s=s.rate_limit_per_10s,
                auth_timeout_ms=int(s.auth_timeout_s * 1000),
            ),
            setup_required=setup_required,
        )

    def announce_setup(self, required: bool) -> None:
        """Whether ``hello`` tells new clients that ``setup`` may create the first workspace."""
        self._hello_frame = text_frame(wire.dump(self._hello(setup_required=required)))

    def _send_away(self, peer: Peer) -> None:
        """A connect past its deadline: come back later (the client has likely given up)."""
        metrics.ADMISSION_REFUSED.labels(when="past_deadline").inc()
        hint = wire.Goodbye(reason="overloaded", reconnect_after_ms=self.admission.hint_ms())
        peer.reply(text_frame(wire.dump(hint)))
        peer.close(CloseCode.TRY_AGAIN_LATER, "overloaded")

    def _reply(self, peer: Peer, frame: bytes) -> None:
        metrics.count_error(frame)
        peer.reply(text_frame(frame))

    def _apply(self, peer: Peer, verdict: Send | Close) -> None:
        if verdict.frame is not None:
            self._reply(peer, verdict.frame)
        if isinstance(verdict, Close):
            peer.close(verdict.code, verdict.reason)


def _overloaded(hint_ms: int) -> Response:
    """HTTP 503 refusing an upgrade, with the retry hint both ways: ``Retry-After`` (whole
    seconds, for HTTP clients and proxies) and a ``goodbye`` body (milliseconds)."""
    body = wire.dump(wire.Goodbye(reason="overloaded", reconnect_after_ms=hint_ms))
    headers = Headers(
        [
            ("Retry-After", str(max(1, -(-hint_ms // 1000)))),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(503, "Service Unavailable", headers, body)


async def bounded(awaitable: Awaitable[object], timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        log.warning("gave up waiting", extra={"for": what, "timeout_s": timeout})


async def serve_until_signalled(
    server: Front, on_started: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Start ``server`` (then ``on_started``), serve until SIGINT or SIGTERM, then shut it
    down gracefully."""
    await server.start()
    if on_started is not None:
        try:
            await on_started()
        except BaseException:
            await server.stop()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
