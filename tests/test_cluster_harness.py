"""The multi-node harness itself (tests/cluster.py over the launcher's LocalCluster): starts,
restarts, stops, leaks nothing.

Nothing here depends on the Redis bus: the nodes run without Redis, or with a Redis URL
they may ignore.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from chat.client import Client
from chat.cluster.launcher import LocalCluster
from chat.cluster.topology import Topology
from tests.cluster import (
    REPO_ROOT,
    ChatNodeProcess,
    Cluster,
    ClusterError,
    TempRedis,
    http_get,
)
from tests.conftest import MakeCluster
from tests.timing import scaled

PR_SET_CHILD_SUBREAPER = 36


def refuses(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:port is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (or is a zombie nobody reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --------------------------------------------------------------------------- Redis


async def test_redis_answers_and_restart_keeps_port_but_loses_data(
    redis_server: TempRedis,
) -> None:
    assert redis_server.ping()
    port, first_pid = redis_server.port, redis_server.pid
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    # A fresh client per phase: a pooled connection to the old server fails its next
    # command with ConnectionError (redis-py does not retry that by default).
    async with aioredis.from_url(redis_server.url) as r:
        await r.set("k", "v")
        assert await r.get("k") == b"v"

    redis_server.restart()  # graceful: SIGTERM, and no snapshot to reload
    assert redis_server.port == port and redis_server.pid not in (None, first_pid)
    async with aioredis.from_url(redis_server.url) as r:
        assert await r.get("k") is None  # the data is gone
        await r.set("k", "v2")

    redis_server.restart(hard=True)  # SIGKILL
    assert redis_server.port == port
    async with aioredis.from_url(redis_server.url) as r:
        assert await r.get("k") is None


def test_redis_kill_stop_start_close(tmp_path: Path) -> None:
    server = TempRedis(base_dir=tmp_path)
    with server:
        pid = server.pid
        assert pid is not None
        assert server.kill() == -9
        assert gone(pid) and not server.running and not server.ping()
        assert refuses(server.port)
        server.start()
        assert server.ping()
        assert server.stop() == 0  # SIGTERM: clean exit
        assert refuses(server.port)
        server.start()
        pid = server.pid
        directory = server.directory
    assert pid is not None and gone(pid)
    assert not directory.exists()


def test_redis_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = TempRedis(port=busy.getsockname()[1], base_dir=tmp_path, startup_timeout=5)
        with pytest.raises(ClusterError, match="exited with status"):
            server.start()
        server.close()
    assert not server.running


# --------------------------------------------------------------------------- one node


async def test_node_without_redis_serves_kills_and_terminates(
    fresh_pg_dsn: str, tmp_path: Path
) -> None:
    setup = Cluster(fresh_pg_dsn, n_nodes=0, use_redis=False)
    seeded = await setup.seed()
    await setup.close()  # only its directory: it started nothing
    token = seeded.tokens["alice"]
    node = ChatNodeProcess("solo", database_url=fresh_pg_dsn, log_dir=tmp_path)
    started = time.monotonic()
    await node.astart()
    try:
        assert time.monotonic() - started < scaled(10)
        assert node.url == f"ws://127.0.0.1:{node.port}/"
        assert node.http_get("/readyz") == (200, b"ready\n")
        assert "CHAT_REDIS_URL" in node.env() and node.env()["CHAT_REDIS_URL"] == ""
        async with Client.connect(node.url, token) as client:
            assert client.session["user"]["id"] == seeded.users["alice"]
            await client.request("ping")

        # SIGKILL: the port refuses connections at once.
        pid, port = node.pid, node.port
        assert pid is not None
        assert node.kill() == -9
        assert gone(pid) and refuses(port) and node.pid is None

        # Same port again; graceful stop exits 0.
        await node.astart()
        assert node.port == port and node.pid not in (None, pid)
        async with Client.connect(node.url, token) as client:
            await client.request("ping")
        assert await node.aterminate() == 0
        assert refuses(port)
        with pytest.raises(ClusterError, match="not running"):
            node.terminate()

        await node.arestart(hard=True)  # not running: just starts
        assert node.http_get("/healthz") == (200, b"ok\n")
        await node.arestart()
        assert node.http_get("/readyz") == (200, b"ready\n")
        assert node.log_tail(500).count("--- start #") == 4
    finally:
        await node.astop()
    assert node.pid is None


async def test_node_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    node = ChatNodeProcess(
        "broken",
        database_url="postgresql://nobody@127.0.0.1:1/nothing",  # nothing listens on port 1
        log_dir=tmp_path,
        startup_timeout=scaled(20),
    )
    with pytest.raises(ClusterError, match="exited with status") as info:
        await node.astart()
    assert "Connection refused" in str(info.value)  # the log tail is in the message
    assert "--- start #1 of broken" in node.log_tail(1000)
    assert not node.running


# --------------------------------------------------------------------------- cluster


async def test_cluster_fixture_starts_two_nodes_and_leaks_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    assert len(cluster) == 2 and cluster.seeded is not None
    assert cluster.redis is not None and cluster.redis.ping()
    assert len({n.port for n in cluster.nodes}) == 2
    for i, node in enumerate(cluster.nodes):
        assert node.name == f"chat{i}"
        assert node.env()["CHAT_NODE_ID"] == node.name
        assert node.env()["CHAT_REDIS_URL"] == cluster.redis.url
        assert http_get(node.port, "/readyz") == (200, b"ready\n")
    async with cluster.client(0, "alice") as a, cluster.client(1, "bob") as b:
        assert a.session["user"]["id"] == cluster.seeded.users["alice"]
        assert b.session["user"]["id"] == cluster.seeded.users["bob"]
    pids = [n.pid for n in cluster.nodes] + [cluster.redis.pid]
    await cluster.close()
    for pid in pids:
        assert pid is not None and gone(pid)


@pytest.mark.parametrize("cluster", [3], indirect=True)
async def test_cluster_node_count_by_indirect_parametrize(cluster: Cluster) -> None:
    assert [n.name for n in cluster.nodes] == ["chat0", "chat1", "chat2"]
    assert all(n.running for n in cluster.nodes)
    extra = await cluster.add_node(extra_env={"CHAT_HEARTBEAT_INTERVAL_MS": "1000"})
    assert extra.name == "chat3" and extra.env()["CHAT_HEARTBEAT_INTERVAL_MS"] == "1000"
    assert extra.http_get("/readyz") == (200, b"ready\n")


async def test_cluster_without_redis_and_seeding_after_start(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(1, use_redis=False, seed=False)
    assert cluster.redis is None and cluster.nodes[0].env()["CHAT_REDIS_URL"] == ""
    seeded = await cluster.seed(workspace="late", handles=["zed", "yan"], channels=["a", "b"])
    assert list(seeded.users) == ["zed", "yan"] and set(seeded.channels) == {"a", "b"}
    async with cluster.client(0, "yan") as yan:
        assert yan.session["user"]["id"] == seeded.users["yan"]


# --------------------------------------------------------------------------- the launcher under it


async def test_launcher_options_the_harness_uses_change_only_their_settings(
    tmp_path: Path,
) -> None:
    """A test's database, no Redis, no HAProxy: each option changes its own settings of
    the topology's, nothing else; what is not there says so."""
    dsn = "postgresql://someone:pw@127.0.0.1:1/theirs"
    local = LocalCluster(
        Topology(n_chat=2, n_flannel=1),
        directory=tmp_path / "c",
        database_url=dsn,
        redis=False,
        haproxy=False,
        chat_env={"CHAT_LOG_LEVEL": "debug"},
    )
    try:
        chat0, chat1 = local.chats.values()
        assert chat0.env()["CHAT_DATABASE_URL"] == dsn and local.database_url == dsn
        assert chat0.env()["CHAT_REDIS_URL"] == "" and local.redis is None
        assert chat0.env()["CHAT_LOG_LEVEL"] == "debug"
        assert chat0.env()["CHAT_SERVICE_KEYS"] == local.secrets.service_key
        edge = local.flannels["flannel0"].env()
        assert json.loads(edge["FLANNEL_UPSTREAM"]) == [chat0.service_url, chat1.service_url]
        assert edge["FLANNEL_SERVICE_KEY"] == local.secrets.service_key
        assert "CHAT_LOG_LEVEL" not in edge
        for missing in ("postgres", "haproxy", "cert", "chat_url"):
            with pytest.raises(ClusterError, match=r"no (PostgreSQL|HAProxy)"):
                getattr(local, missing)
        assert not (tmp_path / "c" / "haproxy.cfg").exists()
    finally:
        await local.close()


async def test_launcher_with_a_test_database_grows_through_haproxy(
    fresh_pg_dsn: str, tmp_path: Path
) -> None:
    """The whole topology but PostgreSQL (a test's database instead); a chat node and a
    Flannel node added while it runs are in HAProxy's config, reloaded, and serve."""
    async with LocalCluster(
        Topology(n_chat=1, n_flannel=1), directory=tmp_path / "c", database_url=fresh_pg_dsn
    ) as local:
        seeded = await local.seed()
        token = seeded.tokens["alice"]
        chat1 = await local.add_chat(extra_env={"CHAT_HEARTBEAT_INTERVAL_MS": "1000"})
        flannel1 = await local.add_flannel()
        assert (chat1.name, flannel1.name) == ("chat1", "flannel1")
        assert chat1.env()["CHAT_HEARTBEAT_INTERVAL_MS"] == "1000"
        assert chat1.env()["CHAT_DATABASE_URL"] == fresh_pg_dsn
        states = await asyncio.to_thread(local.haproxy.servers)
        assert {k: states.get(k) for k in [("chat", "chat1"), ("flannel", "flannel1")]} == {
            ("chat", "chat1"): "UP",
            ("flannel", "flannel1"): "UP",
        }
        async with Client.connect(local.chat_url, token, ssl=local.ssl_context()) as client:
            await client.request("ping")
        async with Client.connect(flannel1.url, token) as client:  # upstream: HAProxy
            assert client.session["user"]["id"] == seeded.users["alice"]
            await client.request("ping")
        pids = [n.pid for n in [*local.chats.values(), *local.flannels.values()]]
        pids += [local.haproxy.pid, local.redis.pid if local.redis is not None else None]
    assert all(pid is not None and gone(pid) for pid in pids)
    assert (tmp_path / "c" / "logs" / "chat1.log").exists()  # a directory given is kept


# --------------------------------------------------------------------------- no leaks


@contextlib.contextmanager
def child_subreaper() -> Iterator[None]:
    """While inside, orphaned descendants become our children (Linux prctl), so the test
    can reap them instead of leaving zombies to an init that may be slow to."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap(pids: list[int], timeout: float) -> list[int]:
    """waitpid() our children ``pids`` until ``timeout``; returns those still running."""
    deadline = time.monotonic() + timeout
    running = list(pids)
    while running:
        for pid in list(running):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # not our child (reaped elsewhere): judge by /proc
                if not gone(pid):
                    continue
            if done:
                running.remove(pid)
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return running


def test_reaper_kills_processes_of_a_test_process_that_died(
    fresh_pg_dsn: str, tmp_path: Path
) -> None:
    """A test process SIGKILLed mid-run leaves no redis-server, chat node or temp dir."""
    script = textwrap.dedent(
        f"""
        import time
        from tests.cluster import ChatNodeProcess, TempRedis
        redis = TempRedis().start()
        node = ChatNodeProcess("orphan", database_url={fresh_pg_dsn!r}, redis_url=redis.url,
                               log_dir={str(tmp_path)!r}).start()
        print(redis.pid, node.pid, redis.directory, flush=True)
        time.sleep(60)
        """
    )
    pids: list[int] = []
    directory: Path | None = None
    with child_subreaper():
        proc = subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # bounded: the helpers time out and exit
            *pid_words, path = line.split()
            pids, directory = [int(p) for p in pid_words], Path(path)
            assert len(pids) == 2 and directory.is_dir(), line
            assert not any(gone(p) for p in pids)
        finally:
            proc.kill()  # now its children are orphans, reparented to us
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
            left = reap(pids, scaled(10))
            for pid in left:  # the reaper failed: clean up (our children: no PID reuse)
                os.kill(pid, signal.SIGKILL)
            reap(left, scaled(10))
        assert not left, f"still running after the test process died: {left}"
    assert directory is not None
    deadline = time.monotonic() + scaled(10)
    while directory.exists():  # the reaper deletes it right after the kills
        assert time.monotonic() < deadline, f"{directory} left behind"
        time.sleep(0.02)


def test_no_stray_processes_from_this_module() -> None:
    """Whatever the tests above started is gone (pgrep, as a person would check)."""
    mine = os.getpid()
    out = subprocess.run(
        ["pgrep", "-a", "-f", "redis-server|chat serve"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout
    ours = []
    for line in out.splitlines():
        pid = int(line.split()[0])
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == mine and not gone(pid):
            ours.append(line)
    assert not ours
