"""Self-check of wsblast against a hand-rolled server: ``python -m bench.selfcheck``.

The server speaks raw RFC 6455 so it can send what a normal library would not: frames dribbled
a few bytes per write (headers split across reads), 7-, 16- and 64-bit payload lengths, a
fragmented message, a ping (the pong must come back masked, same payload), a server close (the
close must be echoed). It checks the client's upgrade request and the masked auth frames, and
wsblast's RESULT lines must match the exact counts. Exits 0 when all is well.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import struct
import sys
import time
from pathlib import Path

from bench.fanout import BUILD, WSBLAST, build_wsblast

N = 20
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
go = asyncio.Event()
problems: list[str] = []
auth_seen: set[int] = set()
pongs_ok = 0
close_echoed = 0


def frame(op: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    if not b1 & 0x80:
        problems.append("client frame not masked")
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4)
    data = await reader.readexactly(n)
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(data))


async def write(writer: asyncio.StreamWriter, data: bytes, dribble: bool) -> None:
    if not dribble:
        writer.write(data)
        await writer.drain()
        return
    i = 0
    while i < len(data):
        step = random.randint(1, 7) if i < 4096 else random.randint(500, 9000)
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(0.0005)
        i += step


def marked(size: int) -> bytes:
    head = f'{{"type":"message.posted","text":"t={time.monotonic_ns()};'.encode()
    return head + b"x" * max(0, size - len(head) - 3) + b'"}\n'


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global pongs_ok, close_echoed
    request = (await reader.readuntil(b"\r\n\r\n")).decode()
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in request.split("\r\n")[1:] if line)
    )
    if "sec-websocket-extensions" in headers or headers.get("upgrade") != "websocket":
        problems.append(f"bad upgrade request: {request!r}")
    accept = base64.b64encode(
        hashlib.sha1((headers["sec-websocket-key"] + GUID).encode()).digest()
    ).decode()
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        + frame(1, b'{"type":"hello"}')
    )
    op, auth = await read_client_frame(reader)
    idx = json.loads(auth)["auth"]
    auth_seen.add(idx)
    await write(writer, frame(1, b'{"reply_to":"bench-auth"}'), dribble=idx == 0)
    await go.wait()
    frag = marked(3000)
    data = b"".join(
        [
            frame(9, b"pp"),
            frame(1, marked(60)),  # 7-bit length
            frame(1, b'{"type":"presence"}'),  # not counted: "other"
            frame(1, marked(1000)),  # 16-bit length
            frame(1, marked(70000)),  # 64-bit length
            frame(1, frag[:1000], fin=False) + frame(0, frag[1000:2000], fin=False),
            frame(0, frag[2000:]),
        ]
    )
    await write(writer, data, dribble=idx == 0)
    try:
        op, payload = await asyncio.wait_for(read_client_frame(reader), 5)
        pongs_ok += op == 0xA and payload == b"pp"
        if idx == 1:
            await asyncio.sleep(0.2)
            writer.write(frame(8, struct.pack("!H", 1001)))
            op, payload = await asyncio.wait_for(read_client_frame(reader), 5)
            close_echoed += op == 8 and payload == struct.pack("!H", 1001)
            writer.close()
            return
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        problems.append(f"connection {idx}: no pong/close echo ({type(exc).__name__})")
        writer.close()
        return
    try:
        while True:
            await read_client_frame(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main() -> int:
    build_wsblast()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    auth = BUILD / "selfcheck-auth.txt"
    auth.write_text("".join(json.dumps({"auth": i}) + "\n" for i in range(N)))
    argv = [str(WSBLAST), "--port", str(port), "--conns", str(N), "--batch", "7"]
    argv += ["--auth-file", str(auth), "--ready-frames", "1", "--ready-match", "bench-auth"]
    argv += ["--count-match", "message.posted", "--max-seconds", "60"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin and proc.stdout
    stdout: asyncio.StreamReader = proc.stdout

    async def line(prefix: str) -> str:
        while True:
            raw: bytes = await asyncio.wait_for(stdout.readline(), 30)
            if not raw or raw.startswith(b"FAILED"):
                raise RuntimeError(f"wsblast: {raw!r}")
            if raw.startswith(prefix.encode()):
                return raw.decode()[len(prefix) :].strip()

    try:
        await line("READY")
        proc.stdin.write(f"RUN {4 * N} 20000\n".encode())
        await line("ARMED")
        go.set()
        first = json.loads(await line("RESULT"))
        await asyncio.sleep(0.5)
        proc.stdin.write(b"RUN 1 300\n")
        second = json.loads(await line("RESULT"))
        proc.stdin.write(b"QUIT\n")
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
    want = {"frames": 4 * N, "min_per_conn": 4, "max_per_conn": 4, "other_frames": N}
    want |= {"lat_n": 4 * N, "complete": True}
    for key, value in want.items():
        if first[key] != value:
            problems.append(f"RESULT {key} = {first[key]}, want {value}")
    if first["bytes"] != N * (60 + 1000 + 70000 + 3000):
        problems.append(f"RESULT bytes = {first['bytes']}")
    if second["closed_conns"] != 1:
        problems.append(f"closed_conns = {second['closed_conns']}, want 1")
    if auth_seen != set(range(N)):
        problems.append(f"auth frames seen from {sorted(auth_seen)}")
    if pongs_ok != N or close_echoed != 1:
        problems.append(f"pongs ok {pongs_ok}/{N}, close echoed {close_echoed}/1")
    for p in problems:
        print("FAIL:", p)
    print("wsblast selfcheck:", "FAILED" if problems else "ok", f"(pid {os.getpid()})")
    return 1 if problems else 0


if __name__ == "__main__":
    Path(BUILD).mkdir(exist_ok=True)
    sys.exit(asyncio.run(main()))
