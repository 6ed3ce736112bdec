"""A Python client for the chat protocol: requests with replies, and a stream of events.

    async with Client.connect("ws://127.0.0.1:8765/", token) as client:
        channel = (await client.request("channels.create", name="ops"))["channel"]
        await client.request("messages.post", channel_id=channel["id"],
                             client_msg_id="m1", text="hello")
        event = await client.next_event("message.posted")

Replies are matched to requests by ``id``; everything else the server pushes goes to an event
queue in arrival order. Errors become :class:`RequestError` with the server's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class RequestError(Exception):
    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.session: dict[str, Any] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: list[dict[str, Any]] = []  # errors that name no request
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = (str(i) for i in itertools.count(1))
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str, token: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Self]:
        ws = await connect(url, compression=None, max_size=2**22, **kwargs)
        client = cls(ws)
        try:
            client.hello = json.loads(await ws.recv())
            client._reader = asyncio.create_task(client._read())
            if token is not None:
                client.session = await client.request("auth", token=token)
            yield client
        finally:
            await client.close()

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
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
        await self.ws.send(json.dumps({"type": type, "id": rid, **fields}))
        return await asyncio.wait_for(future, timeout)

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
