"""``chat serve`` (issue 10): the URL it prints, and ``--demo``'s living workspace."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from chat import demo
from chat.client import Client
from chat.server import Node
from tests.harness import settings_for
from tests.timing import scaled


def test_banner() -> None:
    url = "http://127.0.0.1:8765/"
    assert demo.banner(url, setup_required=True, demo=False) == (
        f"chat: open {url} to create your workspace"
    )
    assert demo.banner(url, setup_required=False, demo=False) == f"chat: open {url}"
    text = demo.banner(url, setup_required=False, demo=True)
    for person in demo.PEOPLE:
        assert re.search(rf"^  {person.handle} +{person.password} +{person.role}$", text, re.M)


async def test_demo_workspace_is_lived_in(tmp_path: Path) -> None:
    settings = settings_for(sqlite_path=str(tmp_path / "demo.sqlite3"))
    tokens = await demo.prepare(settings)
    assert tokens is not None and set(tokens) == {p.handle for p in demo.PEOPLE}
    node = Node(settings)
    await node.start()
    try:
        url = f"ws://127.0.0.1:{node.port}/"
        await demo.converse(url, tokens)
        assert await demo.prepare(settings) is None  # there already: left as it is
        client = await Client.open(url)
        try:
            grace = demo.PEOPLE[1]
            await client.request(
                "login", workspace=demo.WORKSPACE, handle=grace.handle, password=grace.password
            )
            boot = await client.request("bootstrap")
            names = {c["name"] for c in boot["channels"] if c["kind"] != "dm"}
            assert names == {"general", "random", "engineering", "design-review"}
            assert [c for c in boot["channels"] if c["kind"] == "dm"]
            general = next(c for c in boot["channels"] if c["name"] == "general")
            history = await client.request("messages.history", channel_id=general["id"])
            texts = [m["text"] for m in history["messages"]]
            assert len(texts) >= 5
            assert any(m["reactions"] for m in history["messages"])
            eng = next(c for c in boot["channels"] if c["name"] == "engineering")
            history = await client.request("messages.history", channel_id=eng["id"])
            assert any(m["reply_count"] >= 3 for m in history["messages"])
        finally:
            await client.close()
    finally:
        await node.stop()


async def test_chat_serve_prints_the_url(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CHAT_SQLITE_PATH": str(tmp_path / "empty.sqlite3"),
        "CHAT_LOG_LEVEL": "warning",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chat",
        "serve",
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(scaled(20)):
            line = (await process.stdout.readline()).decode()
        match = re.fullmatch(
            r"chat: open http://127\.0\.0\.1:(\d+)/ to create your workspace\n", line
        )
        assert match, line
        client = await Client.open(f"ws://127.0.0.1:{match.group(1)}/")
        try:
            assert client.hello["setup_required"] is True
        finally:
            await client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(scaled(20)):
            await process.wait()


async def test_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    """A server that cannot listen says why in one line and exits 1, not a traceback."""
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        for module in ("chat", "flannel"):
            env = {
                **os.environ,
                "CHAT_SQLITE_PATH": str(tmp_path / "x.sqlite3"),
                "FLANNEL_SERVICE_KEY": "k=" + "s" * 32,
            }
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, "serve", "--port", str(port),
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(scaled(30)):
                _, err = await process.communicate()
            lines = err.decode().strip().splitlines()
            assert process.returncode == 1, err
            assert lines[-1].startswith(f"{module}: cannot listen:"), err
            assert "address already in use" in lines[-1] and "Traceback" not in err.decode()
    finally:
        taken.close()
        await taken.wait_closed()
