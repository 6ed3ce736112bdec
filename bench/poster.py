"""The fan-out benchmark's poster: one websockets client that posts messages to a channel.

Protocol with the harness (stdout/stdin, one line each):

1. connects (and, for ``--kind chat``, reads ``hello``, authenticates), prints ``CONNECTED``;
2. waits for ``GO`` on stdin (so the receivers' counting can be armed first);
3. posts, prints ``DONE {json}`` and exits. On any failure it prints ``FAILED {json}``.

Modes: ``--messages M --window W`` posts as fast as the server acknowledges, with at most W
posts unacknowledged; ``--rate R --duration D`` posts R messages/s for D seconds on a fixed
schedule. Every text carries ``t=<time.monotonic_ns()>;`` taken just before the send, which the
receivers (wsblast, same CLOCK_MONOTONIC) turn into post-to-deliver latency.

Chat (``--kind chat``) frames follow chat.wire: ``messages.post`` answered by a ``reply`` (or
``error``) naming the request id. Bare (``--kind bare``) frames are a ``message.posted``-shaped
JSON event of about the chat event's size, answered by the text ``ack`` in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
import uuid
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

AUTH_ID = "bench-auth"


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentile_us(samples: list[int], q: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    i = max(0, min(len(s) - 1, int(q * len(s) + 0.999999) - 1))
    return s[i] / 1000.0


class Poster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.error_sample: str | None = None
        self.first_send_ns = 0
        self.last_send_ns = 0
        self.last_ack_ns = 0
        self.ack_lat: list[int] = []
        self.pending: dict[str, int] = {}  # chat: request id -> send time
        self.fifo: deque[int] = deque()  # bare: send times, acked in order
        self.all_acked = asyncio.Event()
        self.window = asyncio.Semaphore(args.window if args.messages else 1_000_000)
        self.total = args.messages if args.messages else round(args.rate * args.duration)

    # ------------------------------------------------------------------- frames out

    def frame(self, i: int, now_ns: int) -> tuple[str, str]:
        """Return (request id, frame text) for message number ``i``."""
        text = f"bench {i} t={now_ns};"
        rid = f"p{i}"
        if self.args.kind == "chat":
            body: dict[str, Any] = {
                "type": "messages.post",
                "id": rid,
                "channel_id": self.args.channel_id,
                "client_msg_id": f"{self.run_id}-{i}",
                "text": text,
            }
        else:
            ts = time.time_ns() // 1_000_000
            body = {
                "type": "message.posted",
                "seq": i + 1,
                "workspace_id": 1,
                "ts": ts,
                "message": {
                    "id": i + 1,
                    "channel_id": 1,
                    "seq": i + 1,
                    "user_id": 1,
                    "client_msg_id": f"{self.run_id}-{i}",
                    "text": text,
                    "ts": ts,
                    "thread_root_id": None,
                    "reply_count": 0,
                    "latest_reply_ts": None,
                    "edited_ts": None,
                    "deleted": False,
                    "mentions": [],
                    "mention_channel": False,
                    "mention_here": False,
                    "reactions": [],
                },
            }
        return rid, json.dumps(body, separators=(",", ":"))

    async def send_one(self, ws: ClientConnection, i: int) -> None:
        await self.window.acquire()
        now = time.monotonic_ns()
        rid, text = self.frame(i, now)
        if self.args.kind == "chat":
            self.pending[rid] = now
        else:
            self.fifo.append(now)
        if not self.first_send_ns:
            self.first_send_ns = now
        self.last_send_ns = now
        self.sent += 1
        await ws.send(text)

    # -------------------------------------------------------------------- frames in

    def on_ack(self, sent_ns: int | None, ok: bool = True) -> None:
        now = time.monotonic_ns()
        if not ok:
            self.errors += 1
        else:
            self.acked += 1
            self.last_ack_ns = now
            if sent_ns is not None:
                self.ack_lat.append(now - sent_ns)
        self.window.release()
        if self.acked + self.errors >= self.total:
            self.all_acked.set()

    async def receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            if self.args.kind == "bare":
                if raw == "ack":
                    self.on_ack(self.fifo.popleft() if self.fifo else None)
                continue
            frame = json.loads(raw)
            rid = frame.get("reply_to")
            if not isinstance(rid, str) or rid not in self.pending:
                continue  # our own message.posted events and anything else
            sent_ns = self.pending.pop(rid)
            ok = frame.get("type") == "reply"
            if not ok:
                self.error_sample = self.error_sample or str(raw)[:300]
            self.on_ack(sent_ns, ok)

    # ------------------------------------------------------------------------ flow

    async def authenticate(self, ws: ClientConnection) -> None:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected hello, got {hello!r}"[:300])
        await ws.send(json.dumps({"type": "auth", "id": AUTH_ID, "token": self.args.token}))
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("reply_to") == AUTH_ID:
                if frame.get("type") != "reply":
                    raise RuntimeError(f"auth refused: {frame!r}"[:300])
                return

    async def post_all(self, ws: ClientConnection) -> None:
        if self.args.messages:
            for i in range(self.total):
                await self.send_one(ws, i)
                if self.errors > self.args.max_errors:
                    return
            return
        start = time.monotonic()
        for i in range(self.total):
            delay = start + i / self.args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.send_one(ws, i)
            if self.errors > self.args.max_errors:
                return

    async def run(self) -> dict[str, Any]:
        url = f"ws://{self.args.host}:{self.args.port}{self.args.path}"
        async with asyncio.timeout(self.args.timeout):
            async with connect(url, compression=None, max_size=2**22, open_timeout=30) as ws:
                if self.args.kind == "chat":
                    await self.authenticate(ws)
                print("CONNECTED", flush=True)
                go = await asyncio.to_thread(sys.stdin.readline)
                if go.strip() != "GO":
                    raise RuntimeError(f"expected GO on stdin, got {go!r}")
                cpu0 = cpu_seconds()
                receiver = asyncio.create_task(self.receive(ws))
                await self.post_all(ws)
                if self.errors <= self.args.max_errors:
                    await asyncio.wait(
                        [asyncio.ensure_future(self.all_acked.wait()), receiver],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                cpu = cpu_seconds() - cpu0
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
        return {
            "kind": self.args.kind,
            "total": self.total,
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "error_sample": self.error_sample,
            "first_send_ns": self.first_send_ns,
            "last_send_ns": self.last_send_ns,
            "last_ack_ns": self.last_ack_ns,
            "cpu_s": round(cpu, 4),
            "ack_p50_us": percentile_us(self.ack_lat, 0.50),
            "ack_p99_us": percentile_us(self.ack_lat, 0.99),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kind", choices=["chat", "bare"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default=None, help="default: / for chat, /post for bare")
    p.add_argument("--token", default="", help="chat: the posting user's token")
    p.add_argument("--channel-id", type=int, default=0, help="chat: the channel to post to")
    p.add_argument("--messages", type=int, default=0, help="burst mode: messages to post")
    p.add_argument("--window", type=int, default=20, help="burst mode: posts in flight")
    p.add_argument("--rate", type=float, default=0.0, help="steady mode: messages per second")
    p.add_argument("--duration", type=float, default=0.0, help="steady mode: seconds")
    p.add_argument("--max-errors", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300.0, help="hard limit for the whole run")
    args = p.parse_args(argv)
    if args.path is None:
        args.path = "/" if args.kind == "chat" else "/post"
    if bool(args.messages) == bool(args.rate and args.duration):
        p.error("give either --messages or --rate with --duration")
    if args.kind == "chat" and not (args.token and args.channel_id):
        p.error("--kind chat needs --token and --channel-id")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        result = run(Poster(args).run())
    except Exception as exc:
        print("FAILED " + json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
        return 1
    print("DONE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
