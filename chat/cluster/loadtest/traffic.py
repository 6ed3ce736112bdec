"""The Python clients: posters (timestamped messages) and observers (delivery latency)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chat.cluster.loadtest.options import LoadTestError

_T_RE = re.compile(rb"t=(\d+);")


@dataclass
class Samples:
    """What the poster and the observers saw, on the harness's monotonic clock."""

    posted: list[float] = field(default_factory=list)  # send times (s)
    delivered: list[float] = field(default_factory=list)  # observer receive times (s)
    latency: list[tuple[float, float]] = field(default_factory=list)  # (at s, latency ms)
    frame_bytes: list[int] = field(default_factory=list)  # sizes of message.posted frames
    poster_errors: int = 0
    poster_reconnects: int = 0
    paused: bool = False  # the posters hold off (while PostgreSQL's counters settle)
    error_sample: str | None = None


async def _hello_auth(ws: Any, token: str, rid: str, resume: dict[str, Any] | None) -> Any:
    hello = json.loads(await ws.recv())
    if hello.get("type") != "hello":
        raise LoadTestError(f"expected hello, got {str(hello)[:200]}")
    auth: dict[str, Any] = {"type": "auth", "id": rid, "token": token}
    if resume:
        auth["resume"] = resume
    await ws.send(json.dumps(auth))
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("reply_to") == rid:
            if frame.get("type") != "reply":
                raise LoadTestError(f"auth refused: {str(frame)[:200]}")
            return frame


async def observe(url: str, token: str, samples: Samples, stop: asyncio.Event) -> None:
    """Stay connected (reconnecting after 0.2 s, without resume) and record the latency of
    every ``message.posted`` that carries the poster's ``t=<ns>;``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    while not stop.is_set():
        try:
            async with connect(url, compression=None, max_size=None, open_timeout=10) as ws:
                await _hello_auth(ws, token, "obs-auth", None)
                while not stop.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        continue
                    data = raw.encode() if isinstance(raw, str) else raw
                    if b'"message.posted"' in data and (m := _T_RE.search(data)):
                        now = time.monotonic_ns()
                        samples.delivered.append(now / 1e9)
                        samples.latency.append((now / 1e9, (now - int(m.group(1))) / 1e6))
                        samples.frame_bytes.append(len(data))
        except (OSError, TimeoutError, LoadTestError, WebSocketException):
            pass  # cut, refused or not ready yet: try again
        if not stop.is_set():
            await asyncio.sleep(0.2)


async def post(
    url: str,
    token: str,
    channels: Sequence[int],
    rate: float,
    samples: Samples,
    stop: asyncio.Event,
    max_s: float,
) -> int:
    """Post ``rate`` messages/s round-robin over ``channels`` until ``stop`` (bounded by
    ``max_s``), reconnecting after 0.2 s when cut (no burst to catch up); returns how many
    were acknowledged. PostgreSQL is the truth, not this."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import WebSocketException

    run_id, acked, i = uuid.uuid4().hex[:8], 0, 0
    start = next_t = time.monotonic()

    async def read(ws: ClientConnection) -> None:
        nonlocal acked
        async for raw in ws:
            frame = json.loads(raw)
            rid = frame.get("reply_to")
            if isinstance(rid, str) and rid.startswith("p"):
                if frame.get("type") == "reply":
                    acked += 1
                else:
                    samples.poster_errors += 1
                    samples.error_sample = samples.error_sample or str(raw)[:300]

    def running() -> bool:
        return not stop.is_set() and time.monotonic() - start < max_s

    while running():
        try:
            async with connect(url, compression=None, max_size=None, open_timeout=10) as ws:
                await _hello_auth(ws, token, "poster-auth", None)
                reader = asyncio.create_task(read(ws))
                try:
                    next_t = max(next_t, time.monotonic())
                    while running():
                        if samples.paused:
                            next_t = time.monotonic() + 0.05
                        delay = next_t - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(min(delay, 0.1))
                            continue
                        frame = {
                            "type": "messages.post",
                            "id": f"p{i}",
                            "channel_id": channels[i % len(channels)],
                            "client_msg_id": f"{run_id}-{i}",
                            "text": f"t={time.monotonic_ns()}; load {i}",
                        }
                        await ws.send(json.dumps(frame, separators=(",", ":")))
                        samples.posted.append(time.monotonic())
                        i, next_t = i + 1, next_t + 1 / rate
                    deadline = time.monotonic() + 10  # replies on their way
                    while acked + samples.poster_errors < i and time.monotonic() < deadline:
                        if reader.done():
                            break
                        await asyncio.sleep(0.05)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
        except (OSError, TimeoutError, LoadTestError, WebSocketException):
            samples.poster_reconnects += 1
            await asyncio.sleep(0.2)
    return acked
