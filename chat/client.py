"""Python clients for the chat protocol.

:class:`Client` is one websocket connection: requests with replies, and a stream of events.

    async with Client.connect("ws://127.0.0.1:8765/", token) as client:
        channel = (await client.request("channels.create", name="ops"))["channel"]
        await client.request("messages.post", channel_id=channel["id"],
                             client_msg_id="m1", text="hello")
        event = await client.next_event("message.posted")

Replies are matched to requests by ``id``; everything else the server pushes goes to an event
queue in arrival order. Errors become :class:`RequestError` with the server's code.

:class:`ResilientClient` keeps one live connection to any of several nodes: it reconnects
with :class:`Backoff`, resumes where it left off, de-duplicates events by ``seq``
(:class:`EventCursor`), sends heartbeats, and follows the server's hints (``goodbye``, an HTTP
503 refusing the upgrade, close codes). See its docstring for the contract an application
relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.http11 import Response

from chat.errors import CloseCode

log = logging.getLogger(__name__)

Frame = dict[str, Any]


def encode(frame: Frame) -> str:
    """A frame as compact JSON text with non-ASCII characters as themselves (UTF-8 on the
    wire): escaping them would send up to 6 bytes per character, and a legal 4,000-character
    message could exceed the server's frame limit."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


class RequestError(Exception):
    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class Client:
    """One connection. Frames that answer no pending request go to ``events`` or, when
    ``on_frame`` is set, to that callback instead (called in arrival order, from the reader).
    ``last_frame_at`` is the event-loop time the last frame of any kind arrived."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.session: dict[str, Any] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: list[dict[str, Any]] = []  # errors that name no request
        self.on_frame: Callable[[Frame], None] | None = None
        self.last_frame_at = 0.0
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = (str(i) for i in itertools.count(1))
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str, token: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Self]:
        client = await cls.open(url, **kwargs)
        try:
            if token is not None:
                client.session = await client.request("auth", token=token)
            yield client
        finally:
            await client.close()

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Self:
        """Connect and read ``hello``, without authenticating; the caller must ``close()``."""
        ws = await connect(url, compression=None, max_size=2**22, **kwargs)
        client = cls(ws)
        try:
            client.hello = json.loads(await ws.recv())
        except BaseException:
            await ws.close()
            raise
        client.last_frame_at = asyncio.get_running_loop().time()
        client._reader = asyncio.create_task(client._read())
        return client

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake (a dead peer, or a test)."""
        self.ws.transport.abort()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for raw in self.ws:
                self.last_frame_at = loop.time()
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind in ("reply", "error"):
                    future = self._pending.pop(frame.get("reply_to") or "", None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                        continue
                    if kind == "error":
                        self.errors.append(frame)
                        continue
                if self.on_frame is not None:
                    self.on_frame(frame)
                else:
                    self.events.put_nowait(frame)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    def new_id(self) -> str:
        return next(self._ids)

    async def request(self, type: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply's ``data``; raises RequestError on error."""
        frame = await self.request_frame(type, timeout=timeout, **fields)
        if frame["type"] == "error":
            raise RequestError(frame["code"], frame["message"], frame.get("retry_after_ms"))
        data: dict[str, Any] = frame["data"]
        return data

    async def request_frame(
        self, type: str, *, timeout: float = 10.0, **fields: Any
    ) -> dict[str, Any]:
        rid = fields.pop("id", None) or self.new_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        await self.ws.send(encode({"type": type, "id": rid, **fields}))
        return await asyncio.wait_for(future, timeout)

    async def post(
        self,
        channel_id: int,
        text: str,
        client_msg_id: str | None = None,
        *,
        attempts: int = 5,
        timeout: float = 30.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """``messages.post``, retried with the same ``client_msg_id`` on a retryable error
        (``unavailable``, ``outcome_unknown``, ...; see ``RETRYABLE_CODES``) after
        ``retry_after_ms``, at most ``attempts`` times within ``timeout`` seconds. The reply's
        ``duplicate`` is true when an earlier attempt had been stored after all."""
        cmid = client_msg_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(1, attempts + 1):
            try:
                return await self.request(
                    "messages.post",
                    timeout=max(deadline - loop.time(), 0.001),
                    channel_id=channel_id,
                    client_msg_id=cmid,
                    text=text,
                    **fields,
                )
            except RequestError as exc:
                if exc.code not in RETRYABLE_CODES or attempt == attempts:
                    raise
                pause = (exc.retry_after_ms or 100) / 1000
                if loop.time() + pause >= deadline:
                    raise
                log.debug("post %s: attempt %d: %s; retrying", cmid, attempt, exc.code)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def next_event(self, *types: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next event (of one of ``types``, skipping others)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if not types or event["type"] in types:
                    return event

    def drain_events(self) -> list[dict[str, Any]]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out


# ====================================================================== resilient client

#: 1008 close reasons (and ``auth`` error codes) after which retrying with the same token
#: cannot help: the client stops instead of reconnecting in a loop.
FATAL_REASONS = frozenset({"invalid_auth", "token_expired", "token_revoked", "account_inactive"})

#: ``messages.post`` errors that :meth:`Client.post` and :meth:`ResilientClient.post` retry
#: with the same ``client_msg_id`` (after ``retry_after_ms`` when given); any other error is
#: the caller's. ``outcome_unknown``: the post may be stored, and the retry says which.
RETRYABLE_CODES = frozenset({"rate_limited", "internal_error", "unavailable", "outcome_unknown"})

#: After a 1013 (overloaded) close, the backoff draws as if this many attempts had failed
#: already, even right after a successful connection: an overloaded server gets a pause.
OVERLOAD_MIN_ATTEMPT = 3

#: The longest a server hint can make the client wait before its jitter, in ms: a hint past
#: it (a bug, a typo in a header) counts as this much rather than parking clients for hours.
HINT_CAP_MS = 300_000


class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits
    ``uniform(0, min(cap, base * 2**n))`` seconds.

    :meth:`next` draws the delay for the next attempt and counts it; :meth:`reset` after a
    successful connection starts over from attempt 0.
    """

    def __init__(
        self, base: float = 0.5, cap: float = 20.0, rng: random.Random | None = None
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.attempts = 0

    def ceiling(self, attempt: int) -> float:
        """The largest delay attempt ``attempt`` can draw: ``min(cap, base * 2**attempt)``."""
        if attempt >= 64:  # 2**attempt would only overflow the float; the cap wins anyway
            return self.cap
        return min(self.cap, self.base * 2.0**attempt)

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0, self.ceiling(attempt))

    def next(self, floor: int = 0) -> float:
        """The delay before the next attempt, counted as attempt ``max(attempts, floor)``."""
        attempt = max(self.attempts, floor)
        self.attempts = attempt + 1
        return self.delay(attempt)

    def reset(self) -> None:
        self.attempts = 0


class EventCursor:
    """Where the event stream is: the ``seq`` of the last durable event delivered.

    :meth:`accept` lets a durable event through only if its ``seq`` is past the position
    (then moves the position to it), so a replayed or duplicated event is never delivered
    twice and delivered ``seq`` values strictly increase. Events without ``seq`` (ephemeral:
    ``typing``, ``presence``) always pass. :meth:`reset` moves the position anywhere, also
    backwards: after a state reload the stream starts over from the new position.
    """

    def __init__(self, position: int = 0) -> None:
        self.position = position
        self.duplicates = 0  # durable events refused by accept()

    def accept(self, event: Frame) -> bool:
        seq = event.get("seq")
        if seq is None:
            return True
        if seq <= self.position:
            self.duplicates += 1
            return False
        self.position = seq
        return True

    def advance(self, seq: int) -> None:
        """Everything up to ``seq`` has been seen (a ``resumed`` frame says so)."""
        self.position = max(self.position, seq)

    def reset(self, seq: int) -> None:
        self.position = seq


def is_fatal_close(code: int | None, reason: str | None) -> bool:
    """True when reconnecting cannot help: close 1008 for a bad, expired or revoked token,
    or a deactivated account."""
    return code == CloseCode.POLICY_VIOLATION and reason in FATAL_REASONS


def goodbye_delay(reconnect_after_ms: int, rng: random.Random) -> float:
    """``reconnect_after_ms`` (at most :data:`HINT_CAP_MS`) plus jitter of up to the same
    amount, in seconds."""
    base = min(max(reconnect_after_ms, 0), HINT_CAP_MS) / 1000
    return base + rng.uniform(0, base)


def _goodbye_ms(frame: object) -> int | None:
    """The ``reconnect_after_ms`` of a ``goodbye`` frame (0 when absent), or None when
    ``frame`` is not one."""
    if not isinstance(frame, dict) or frame.get("type") != "goodbye":
        return None
    ms = frame.get("reconnect_after_ms") or 0
    return ms if isinstance(ms, int) and not isinstance(ms, bool) else 0


def goodbye_hint(frames: Iterable[Frame]) -> int | None:
    """The hint of the last ``goodbye`` among ``frames`` (ms), or None when there is none.

    For frames a connection received before it was live: a node over its limit answers
    ``auth`` with a ``goodbye`` (``overloaded``) and close 1013 instead of a reply."""
    hint = None
    for frame in frames:
        ms = _goodbye_ms(frame)
        if ms is not None:
            hint = ms
    return hint


def refusal_hint(response: Response) -> int | None:
    """The retry hint (ms) of an HTTP response refusing the websocket upgrade, or None.

    Only a 503 carries one: its body as a ``goodbye`` frame (``reconnect_after_ms``, the
    node's own spread hint), else its ``Retry-After`` header (whole seconds; an HTTP date is
    not read). A hint must be positive: 0 would retry at once without growing the backoff,
    a tight loop against a refusing node. None: fall back to the backoff."""
    if response.status_code != 503:
        return None
    try:
        body_ms = _goodbye_ms(json.loads(response.body))
    except (ValueError, RecursionError):  # not JSON ("draining\n"), not UTF-8
        body_ms = None
    if body_ms is not None and body_ms > 0:
        return body_ms
    seconds = next(iter(response.headers.get_all("Retry-After")), "").strip()
    if seconds.isascii() and seconds.isdigit() and int(seconds) > 0:
        return min(int(seconds), HINT_CAP_MS // 1000) * 1000
    return None


def reconnect_delay(
    code: int | None,
    reason: str | None,
    goodbye_ms: int | None,
    backoff: Backoff,
    rng: random.Random,
) -> float | None:
    """The decision after a connection ends or an attempt fails: seconds to wait before the
    next attempt, or None to stop for good. ``goodbye_ms`` is the server's hint, if it gave
    one: a ``goodbye`` frame before the close (:func:`goodbye_hint`), or an HTTP 503 refusing
    the upgrade (:func:`refusal_hint`; ``code`` is then None).

    ===========================================  ==========================================
    1008 with a reason in ``FATAL_REASONS``      stop (None), hint or not
    a hint: a ``goodbye`` came first (with any   :func:`goodbye_delay` of the hint; the
    close, 1013 ``overloaded`` included), or a   backoff is neither consulted nor grown
    503 with a goodbye body or ``Retry-After``   (a hint is not a failure)
    1013 (overloaded) without a ``goodbye``      backoff, at least ``OVERLOAD_MIN_ATTEMPT``
    anything else (other codes, no close at      backoff
    all: refused, timed out, dropped; an HTTP
    503 with no hint, or any other status)
    ===========================================  ==========================================
    """
    if is_fatal_close(code, reason):
        return None
    if goodbye_ms is not None:
        return goodbye_delay(goodbye_ms, rng)
    if code == CloseCode.TRY_AGAIN_LATER:
        return backoff.next(floor=OVERLOAD_MIN_ATTEMPT)
    return backoff.next()


class FatalConnectionError(Exception):
    """The server refused this client for good (see :data:`FATAL_REASONS`)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection refused for good: {code} {reason}")
        self.code = code
        self.reason = reason


class ClientClosed(Exception):
    """The :class:`ResilientClient` was closed."""


class ResilientClient:
    """One live connection, kept up until closed: reconnect, resume, de-duplicate.

    ::

        async with ResilientClient([url1, url2], token) as rc:
            async for event in rc.events():
                if event["type"] == "client.reset":
                    ...  # (re)load state: channels, history, read counts
                ...

    *Connecting.* ``async with`` starts a background task and returns at once; use
    :meth:`wait_connected` to wait for the first connection. Each attempt uses the next of
    ``urls`` (any node serves any user) and must open the websocket, read ``hello`` and
    authenticate within ``connect_timeout``. After a failure or a dropped connection it waits
    as :func:`reconnect_delay` decides: the server's hint (a ``goodbye`` frame, also one
    answering ``auth`` before a 1013 close; or an HTTP 503 refusing the upgrade, with a
    ``goodbye`` body or ``Retry-After``) without growing the backoff, else :class:`Backoff`
    (reset once authenticated). A 1008 close or ``auth`` error for a bad, expired or revoked
    token or an inactive account is final: ``fatal`` is set, nothing reconnects, and the
    event stream and requests raise :class:`FatalConnectionError`.

    *Resuming.* Every ``auth`` after the first success carries ``resume = {session_id, seq:
    position}``. When the reply says ``resumed``, the missed events follow and then a
    ``resumed`` frame (delivered too, after the replayed events). Otherwise, and on the first
    connection, the application first receives a synthetic
    ``{"type": "client.reset", "reason": <resume_error or "fresh">, "seq": <reply seq>}``:
    reload state, then apply the events that follow.

    *Events* (:meth:`events`, :meth:`next_event`) arrive in order: durable events once each,
    with strictly increasing ``seq`` between two ``client.reset`` events (see
    :class:`EventCursor`; ``position`` is the last one's ``seq``, or the reply's ``seq`` after
    a reset); ephemeral events; ``client.reset`` and ``resumed``. ``hello``, ``goodbye`` and
    stray replies are handled here and not delivered.

    *Heartbeats.* When ``heartbeat`` and ``hello`` announces an interval, a ``ping`` goes out
    first after ``interval * random()`` (so a herd of clients does not ping in step), then
    every interval; if no frame at all arrives within an interval of a ping, the connection
    is deemed dead, dropped and resumed.

    *Requests* (:meth:`request`) go over the current connection, waiting for one to be up;
    a connection lost before the reply raises ``ConnectionError`` (retrying is the caller's
    call). :meth:`post` retries ``messages.post`` with one ``client_msg_id``, which the server
    de-duplicates, until it is acknowledged.

    *Counters* (for tests and benchmarks): ``attempts``, ``connects``, ``resumes``,
    ``pings``; and how each wait before a reconnect was chosen: ``hints`` (a server hint
    honoured) or ``backoffs`` (the backoff drawn); ``refusals`` counts attempts whose upgrade
    the server refused with an HTTP status (503: overloaded or draining), ``timeouts`` those
    that gave up after ``connect_timeout``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str,
        *,
        backoff: Backoff | None = None,
        heartbeat: bool = True,
        connect_timeout: float = 10,
        rng: random.Random | None = None,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("no urls")
        self.token = token
        self.rng = rng or random.Random()
        self.backoff = backoff or Backoff(rng=self.rng)
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.cursor = EventCursor()
        self.session: Frame = {}  # data of the latest auth reply
        self.client: Client | None = None  # the live connection, if any
        self.fatal: FatalConnectionError | None = None
        self.connects = 0  # successful authentications
        self.resumes = 0  # ... of which resumed
        self.attempts = 0  # connection attempts
        self.pings = 0  # heartbeats sent
        self.hints = 0  # reconnect waits taken from a server hint (goodbye, 503)
        self.backoffs = 0  # reconnect waits drawn from the backoff
        self.refusals = 0  # attempts whose upgrade was refused with an HTTP status
        self.timeouts = 0  # attempts that gave up waiting (connect_timeout)
        self.last_close: tuple[int | None, str] | None = None  # (code, reason) of the last end
        self._events: asyncio.Queue[Frame | None] = asyncio.Queue()  # None: stopped
        self._changed = asyncio.Event()  # pulsed when client/fatal/stopped change
        self._goodbye_ms: int | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def position(self) -> int:
        return self.cursor.position

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (``async with`` does this)."""
        if self._runner is None and not self._stopped:
            self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop reconnecting and close the connection (requests in flight get
        ``ConnectionError``); the event stream ends after the events already queued."""
        if self._runner is None:
            if not self._stopped:
                self._stop()
            return
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner

    def drop(self) -> None:
        """Cut the current connection abruptly, as a network failure would (tests, chaos)."""
        if self.client is not None:
            self.client.abort()

    async def wait_connected(self, timeout: float | None = None) -> Client:
        """The live connection, once there is one (``TimeoutError`` after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while self.client is None or self.client.closed.is_set():
                self._raise_if_stopped()
                await self._changed.wait()
            return self.client

    # ------------------------------------------------------------------ events

    async def next_event(self, *types: str, timeout: float | None = 5.0) -> Frame:
        """The next event (of one of ``types``, skipping others)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if event is None:
                    self._events.put_nowait(None)  # every later reader sees the end too
                    self._raise_if_stopped()
                    raise AssertionError("unreachable")
                if not types or event["type"] in types:
                    return event

    async def events(self) -> AsyncIterator[Frame]:
        """Every event, until :meth:`close` (raises :class:`FatalConnectionError` if the
        server refused the client for good)."""
        while True:
            try:
                yield await self.next_event(timeout=None)
            except ClientClosed:
                return

    def drain_events(self) -> list[Frame]:
        out = []
        while not self._events.empty():
            event = self._events.get_nowait()
            if event is None:
                self._events.put_nowait(None)
                break
            out.append(event)
        return out

    # ------------------------------------------------------------------ requests

    async def request(self, type: str, *, timeout: float = 10.0, **fields: Any) -> Frame:
        """Send a request over the current connection (waiting for one) and return its
        reply's ``data``. Raises ``RequestError`` on an error reply, ``ConnectionError`` if
        the connection is lost first, ``TimeoutError`` after ``timeout`` in all."""
        async with asyncio.timeout(timeout):
            client = await self.wait_connected()
            try:
                return await client.request(type, timeout=timeout, **fields)
            except ConnectionClosed as exc:
                raise ConnectionError("connection lost before the reply") from exc

    async def post(
        self,
        channel_id: int,
        text: str,
        client_msg_id: str | None = None,
        *,
        timeout: float = 30.0,
        attempts: int = 10,
        **fields: Any,
    ) -> Frame:
        """``messages.post`` until acknowledged: retried across reconnects with the same
        ``client_msg_id`` (so it is stored once), at most ``attempts`` times and ``timeout``
        seconds. Returns the reply data (``duplicate`` is true when an earlier attempt had
        already been stored)."""
        cmid = client_msg_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(1, attempts + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await self.request(
                    "messages.post",
                    timeout=min(remaining, 10.0),
                    channel_id=channel_id,
                    client_msg_id=cmid,
                    text=text,
                    **fields,
                )
            except (ConnectionError, TimeoutError) as exc:
                log.debug("post %s: attempt %d failed: %r", cmid, attempt, exc)
                pause = 0.0
            except RequestError as exc:
                if exc.code not in RETRYABLE_CODES:
                    raise
                pause = (exc.retry_after_ms or 0) / 1000
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
        raise TimeoutError(f"messages.post {cmid} not acknowledged")

    # ------------------------------------------------------------------ internals

    def _raise_if_stopped(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self._stopped:
            raise ClientClosed("client closed")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _deliver(self, event: Frame) -> None:
        self._events.put_nowait(event)

    def _on_frame(self, frame: Frame) -> None:
        """Every frame of the live connection that answers no request, in order."""
        kind = frame.get("type")
        if kind == "goodbye":
            self._goodbye_ms = goodbye_hint([frame])
        elif kind == "resumed":
            self.cursor.advance(int(frame["seq"]))
            self._deliver(frame)
        elif kind in ("reply", "error", "hello"):
            pass  # pongs, replies to requests that timed out
        elif self.cursor.accept(frame):
            self._deliver(frame)

    async def _run(self) -> None:
        try:
            while True:
                url = self.urls[self.attempts % len(self.urls)]
                self.attempts += 1
                code, reason = await self._connection(url)
                self.last_close = (code, reason)
                delay = reconnect_delay(code, reason, self._goodbye_ms, self.backoff, self.rng)
                if delay is None:
                    log.warning("not reconnecting: %s %s", code, reason)
                    self.fatal = FatalConnectionError(code, reason)
                    return
                if self._goodbye_ms is not None:  # reconnect_delay took the hint
                    self.hints += 1
                else:
                    self.backoffs += 1
                log.debug("reconnecting in %.2fs after %s %s", delay, code, reason)
                await asyncio.sleep(delay)
        except Exception as exc:  # a bug: stop rather than spin
            log.exception("resilient client failed")
            self.fatal = FatalConnectionError(None, repr(exc))
        finally:
            self._stop()

    def _stop(self) -> None:
        self._stopped = True
        self._events.put_nowait(None)  # the end of the event stream
        self._notify()

    async def _connection(self, url: str) -> tuple[int | None, str]:
        """One attempt: connect, authenticate (resuming), serve until the connection ends.
        Returns the close code and reason (``None``/description when there was no close)
        and leaves the server's hint, if any, in ``_goodbye_ms``."""
        self._goodbye_ms = None
        client: Client | None = None
        heartbeat: asyncio.Task[None] | None = None
        failure: str | None = None  # the attempt failed without a close from the server
        try:
            async with asyncio.timeout(self.connect_timeout):
                client = await Client.open(url)
                resume = self._resume_point()
                auth: Frame = {"token": self.token}
                if resume is not None:
                    auth["resume"] = resume
                reply = await client.request("auth", timeout=self.connect_timeout, **auth)
            self._connected(client, reply, resume is not None)
            interval = client.hello.get("heartbeat_interval_ms") or 0
            if self.heartbeat and interval > 0:
                heartbeat = asyncio.create_task(self._heartbeat(client, interval / 1000))
            await client.closed.wait()
        except RequestError as exc:
            # A refused auth closes with 1008 and the error code as the reason.
            return int(CloseCode.POLICY_VIOLATION), exc.code
        except InvalidStatus as exc:
            # The node refused the upgrade (503: overloaded or draining), maybe with a hint.
            log.debug("connection to %s refused: %s", url, exc)
            self.refusals += 1
            self._goodbye_ms = refusal_hint(exc.response)
            return None, f"HTTP {exc.response.status_code}"
        except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
            log.debug("connection to %s failed: %r", url, exc)
            if isinstance(exc, TimeoutError):
                self.timeouts += 1
            if client is None and isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                return exc.rcvd.code, exc.rcvd.reason  # closed before hello (1013, ...)
            if client is None or client.ws.close_code is None:
                failure = repr(exc)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if client is not None:
                self.client = None
                self._notify()
                await client.close()  # the reader has consumed every frame after this
                if client.on_frame is None:
                    # Never live: a goodbye answering auth (or sent instead of hello) is
                    # still queued here, unread.
                    hint = goodbye_hint([client.hello, *client.drain_events()])
                    if hint is not None:
                        self._goodbye_ms = hint
        if failure is not None or client is None:
            return None, failure or "no connection"
        return client.ws.close_code, client.ws.close_reason or ""

    def _resume_point(self) -> Frame | None:
        if not self.session:
            return None
        return {"session_id": self.session["session_id"], "seq": self.cursor.position}

    def _connected(self, client: Client, reply: Frame, resuming: bool) -> None:
        """The auth reply is in; frames that followed it wait in ``client.events``."""
        self.session = client.session = reply
        self.connects += 1
        self.backoff.reset()
        if resuming and reply.get("resumed"):
            self.resumes += 1
        else:
            self.cursor.reset(int(reply["seq"]))
            reason = reply.get("resume_error") or "fresh"
            self._deliver({"type": "client.reset", "reason": reason, "seq": reply["seq"]})
        # From here on frames go straight to _on_frame; none can slip in between.
        for frame in client.drain_events():
            self._on_frame(frame)
        client.on_frame = self._on_frame
        self.client = client
        self._notify()

    async def _heartbeat(self, client: Client, interval: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(interval * self.rng.random())
        while not client.closed.is_set():
            sent = loop.time()
            try:
                async with asyncio.timeout(interval):
                    await client.send_raw(encode({"type": "ping", "id": client.new_id()}))
            except ConnectionClosed:
                return
            except TimeoutError:
                pass  # not even our ping got out: judged below like silence
            self.pings += 1
            await asyncio.sleep(max(sent + interval - loop.time(), 0))
            if client.last_frame_at < sent:
                log.info("no frame within %.2fs of a heartbeat: dropping the connection", interval)
                client.abort()
                return
