"""Graceful shutdown of a real server process: SIGTERM -> goodbye, close 1012, exit 0.

The node runs as ``python -m chat serve`` in a subprocess over a SQLite file, seeded with
``python -m chat admin seed``. Every message the server acknowledged before it stopped is in
the history after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from chat.client import Client
from tests.timing import scaled

SECRET = "shutdown-test-secret-key-0123456789-abcdefghij"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chat_env(db: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CHAT_SQLITE_PATH=str(db),
        CHAT_DATABASE_URL="",
        CHAT_SECRET_KEY=SECRET,
        CHAT_LOG_LEVEL="warning",
        CHAT_LOG_FORMAT="text",
        CHAT_SHUTDOWN_GRACE_S="4",
    )
    return env


async def seed(db: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chat",
        "admin",
        "seed",
        "--workspace",
        "w",
        "--users",
        "3",
        "--channels",
        "1",
        env=chat_env(db),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), scaled(30))
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def http_status(port: int, path: str) -> int | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), scaled(5))
        return int(line.split()[1]) if line else None
    except (OSError, IndexError, ValueError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Server:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def serving(db: Path, log: Path) -> AsyncIterator[Server]:
    port = free_port()
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chat",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=chat_env(db),
            stdout=out,
            stderr=out,
        )
    server = Server(proc, port, log)
    try:
        async with asyncio.timeout(scaled(20)):
            while await http_status(port, "/readyz") != 200:
                assert proc.returncode is None, server.output()
                await asyncio.sleep(0.05)
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()  # only if the test failed before its own SIGTERM
            await proc.wait()


async def test_sigterm_says_goodbye_closes_1012_and_exits_0(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    seeded = await seed(db)
    tokens = [u["token"] for u in seeded["users"]]
    channel = seeded["channels"][0]["id"]
    accepted: list[int] = []

    async with serving(db, tmp_path / "serve1.log") as server:
        async with (
            Client.connect(server.url, tokens[1]) as a,
            Client.connect(server.url, tokens[2]) as b,
        ):
            reply = await a.request(
                "messages.post", channel_id=channel, client_msg_id="before", text="before"
            )
            accepted.append(reply["message"]["id"])
            # More posts in flight as the signal arrives: those acknowledged must survive.
            in_flight = [
                asyncio.ensure_future(
                    a.request(
                        "messages.post",
                        channel_id=channel,
                        client_msg_id=f"late{i}",
                        text=f"late {i}",
                        timeout=scaled(10),
                    )
                )
                for i in range(10)
            ]
            await asyncio.sleep(0)
            os.kill(server.proc.pid, signal.SIGTERM)

            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, dict):
                    accepted.append(outcome["message"]["id"])

            for c in (a, b):
                await asyncio.wait_for(c.closed.wait(), scaled(10))
                frames = c.drain_events()
                goodbyes = [f for f in frames if f["type"] == "goodbye"]
                assert len(goodbyes) == 1, frames
                assert goodbyes[0]["reason"] == "service_restart"
                assert goodbyes[0]["reconnect_after_ms"] > 0
                assert frames[-1]["type"] == "goodbye", frames  # the last frame before close
                assert c.ws.close_code == 1012
                assert c.ws.close_reason == "service_restart"

        code = await asyncio.wait_for(server.proc.wait(), scaled(10))
        assert code == 0, server.output()

    # No accepted message is lost: restart over the same database and read the history.
    async with serving(db, tmp_path / "serve2.log") as server:
        async with Client.connect(server.url, tokens[0]) as c:
            history = await c.request("messages.history", channel_id=channel, limit=200)
        stored = {m["id"] for m in history["messages"]}
        assert set(accepted) <= stored, (accepted, stored)
        os.kill(server.proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), scaled(10)) == 0


async def test_sigterm_with_no_clients_exits_promptly(tmp_path: Path) -> None:
    db = tmp_path / "idle.db"
    await seed(db)
    async with serving(db, tmp_path / "idle.log") as server:
        started = asyncio.get_running_loop().time()
        os.kill(server.proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), scaled(10)) == 0, server.output()
        assert asyncio.get_running_loop().time() - started < scaled(5)
