"""The cluster's deployment: deploy/haproxy.cfg and docker-compose.yml against the topology,
and (below) the launcher's cluster through the real HAProxy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import yaml
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from chat import credentials
from chat.client import Client, ResilientClient
from chat.cluster import haproxy, render, tls
from chat.cluster.launcher import LocalCluster
from chat.cluster.processes import resp_command
from chat.cluster.topology import (
    SERVICE_KID,
    Endpoints,
    Role,
    Secrets,
    Topology,
    environment,
    redis_args,
)
from tests.conftest import MakeLocalCluster
from tests.pg import free_port
from tests.timing import scaled

HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAPROXY_BIN, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )


# ----------------------------------------------------------------------------- static


def test_rendered_files_are_up_to_date() -> None:
    assert render.main(["--check"]) == 0, "run: python -m chat.cluster.render"


def test_haproxy_accepts_the_deploy_config(tmp_path: Path) -> None:
    _, bundle = tls.self_signed(tmp_path)
    text = render.HAPROXY_CFG.read_text().replace(render.CERT_IN_CONTAINER, str(bundle))
    (tmp_path / "haproxy.cfg").write_text(text)
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_accepts_the_launcher_config(tmp_path: Path) -> None:
    topology = Topology(n_chat=3, n_flannel=1)
    _, bundle = tls.self_signed(tmp_path)
    text = haproxy.render(
        topology,
        Endpoints.local(topology, free_port),
        cert=str(bundle),
        stats_socket=str(tmp_path / "admin.sock"),
    )
    (tmp_path / "haproxy.cfg").write_text(text)
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert text.count("slowstart") == 3 and "balance url_param workspace" in text
    with_state = haproxy.render(
        topology,
        Endpoints.local(topology, free_port),
        cert=str(bundle),
        state_file=str(tmp_path / "haproxy.state"),  # absent: HAProxy starts all the same
    )
    (tmp_path / "haproxy.cfg").write_text(with_state)
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr
    plain = haproxy.render(
        topology, Endpoints.local(topology, free_port), cert=str(bundle), plain_port=free_port()
    )
    (tmp_path / "haproxy.cfg").write_text(plain)
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bind 127.0.0.1:" in plain.split("frontend public")[1].split("frontend internal")[0]


def test_the_deployed_files_have_no_plaintext_client_listener() -> None:
    public = render.HAPROXY_CFG.read_text().split("frontend public")[1].split("frontend")[0]
    binds = [ln for ln in public.splitlines() if ln.strip().startswith("bind ")]
    assert binds and all(" ssl crt " in ln for ln in binds)


def test_compose_matches_the_topology() -> None:
    doc = yaml.safe_load(render.COMPOSE.read_text())
    services = doc["services"]
    topology = Topology()
    ends, secrets = Endpoints.compose(topology), Secrets.compose()
    expected = {s.name for s in topology.services} | {"migrate"}
    assert set(services) == expected
    by_role = {s.name: s.role for s in topology.services}
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published == [f"{ends.public.port}:{ends.public.port}"]  # one port for clients
    for name, svc in services.items():
        role = by_role.get(name)
        if role in (Role.CHAT, Role.FLANNEL):
            module = "chat" if role is Role.CHAT else "flannel"
            assert svc["command"] == ["python", "-m", module, "serve"]
            assert svc["environment"] == environment(topology, ends, secrets, name)
            assert "readyz" in " ".join(svc["healthcheck"]["test"])
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
    assert services["redis"]["command"][1:] == redis_args(ends, secrets)
    assert "default" in services["redis"]["command"] and "off" in services["redis"]["command"]
    assert services["postgres"]["environment"]["POSTGRES_INITDB_ARGS"] == "--auth=scram-sha-256"
    # Flannel goes to the chat tier through HAProxy's internal frontend.
    for name in topology.flannel_nodes:
        upstream = json.loads(services[name]["environment"]["FLANNEL_UPSTREAM"])
        assert upstream == [f"ws://haproxy:{ends.internal.port}/service"]
    assert topology.service("haproxy").talks_to == (*topology.flannel_nodes, *topology.chat_nodes)


def test_compose_secrets_have_dev_only_defaults() -> None:
    text = render.COMPOSE.read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SERVICE_SECRET", "TOKEN_SECRET"):
        assert f"${{{var}:-dev-only-" in text


@pytest.mark.parametrize("name", ["postgres", "redis", "haproxy"])
def test_environment_is_only_for_our_nodes(name: str) -> None:
    topology = Topology()
    with pytest.raises(ValueError):
        environment(topology, Endpoints.compose(topology), Secrets.compose(), name)


# ----------------------------------------------------------------------------- the launcher
#
# Real processes: PostgreSQL, Redis, chat and Flannel nodes, HAProxy. Clients trust the
# launcher's certificate through SSL_CERT_FILE (what websockets' default context reads), so
# ResilientClient, which builds its own connections, verifies it too.


@contextlib.contextmanager
def trusting(cert: Path) -> Iterator[None]:
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cert)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old


N_CLIENTS = 6
HANDLES = ["alice", "bob", *(f"u{i}" for i in range(N_CLIENTS))]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def cluster() -> AsyncIterator[LocalCluster]:
    """One cluster for the tests that leave it as they found it."""
    async with LocalCluster() as c:
        await c.seed(handles=HANDLES)
        with trusting(c.cert):
            yield c


async def fresh(
    make: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> LocalCluster:
    """A cluster of the test's own (to break), its certificate trusted."""
    cluster = await make(handles=HANDLES, **kwargs)
    monkeypatch.setenv("SSL_CERT_FILE", str(cluster.cert))
    return cluster


class Listener:
    """A ResilientClient and the message ids it received (once each)."""

    def __init__(self, url: str, token: str) -> None:
        self.rc = ResilientClient(url, token, connect_timeout=scaled(20))
        self.ids: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.rc.start()
        self._task = asyncio.create_task(self._pump())
        await self.rc.wait_connected(scaled(30))

    async def _pump(self) -> None:
        async for event in self.rc.events():
            if event["type"] == "message.posted":
                self.ids.append(event["message"]["id"])

    async def close(self) -> None:
        await self.rc.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def listeners(
    cluster: LocalCluster, url: str, n: int = N_CLIENTS
) -> AsyncIterator[list[Listener]]:
    assert cluster.seeded is not None
    made = [Listener(url, cluster.seeded.tokens[f"u{i}"]) for i in range(n)]
    try:
        await asyncio.gather(*(m.start() for m in made))
        yield made
    finally:
        await asyncio.gather(*(m.close() for m in made))


async def stored_ids(cluster: LocalCluster, channel_id: int) -> list[int]:
    conn = await asyncpg.connect(cluster.database_url, timeout=scaled(10))
    try:
        rows = await conn.fetch(
            "SELECT id FROM messages WHERE channel_id = $1 ORDER BY seq", channel_id
        )
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_clients_reach_flannel_and_chat_through_haproxy_over_tls(
    cluster: LocalCluster,
) -> None:
    seeded = cluster.seeded
    assert seeded is not None
    general = seeded.channels["general"]
    ctx = cluster.ssl_context()
    via_flannel = cluster.url(seeded.workspace_id)
    async with (
        Client.connect(via_flannel, seeded.tokens["alice"], ssl=ctx) as alice,
        Client.connect(cluster.chat_url, seeded.tokens["bob"], ssl=ctx) as bob,
    ):
        posted = await alice.post(general, "over tls")
        for who in (alice, bob):
            event = await who.next_event("message.posted", timeout=scaled(10))
            assert event["message"]["id"] == posted["message"]["id"]
    loads = [await f.ametric("flannel_workspace_loads_total") for f in cluster.flannels.values()]
    assert sorted(loads) == [0, 1]  # the workspace hashed to one Flannel node
    # A client that does not trust the certificate does not get in.
    with pytest.raises(ssl.SSLCertVerificationError):
        async with Client.connect(cluster.chat_url, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)):
            pass


async def test_without_a_workspace_parameter_clients_are_spread_round_robin(
    cluster: LocalCluster,
) -> None:
    seeded = cluster.seeded
    assert seeded is not None
    ctx = cluster.ssl_context()
    for handle in ("u0", "u1"):  # one after the other: round robin alternates
        async with Client.connect(cluster.url(), seeded.tokens[handle], ssl=ctx):
            pass
    loads = [await f.ametric("flannel_workspace_loads_total") for f in cluster.flannels.values()]
    assert all(n >= 1 for n in loads)  # the workspace got cached on both Flannel nodes


async def test_redis_and_postgres_require_their_passwords(cluster: LocalCluster) -> None:
    port = cluster.endpoints.at["redis"].port

    def redis(*commands: bytes) -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            answers = []
            for command in commands:
                sock.sendall(command)
                answers.append(sock.recv(4096).split(b"\r\n")[0])
            return answers

    # Without the ACL user's password nothing reads or injects events.
    for command in (
        resp_command("PING"),
        resp_command("XADD", "events:1", "*", "type", "forged"),
        resp_command("XREAD", "STREAMS", "events:1", "0"),
        resp_command("SUBSCRIBE", "anything"),
        resp_command("PUBLISH", "anything", "forged"),
        resp_command("KEYS", "*"),
    ):
        assert redis(command)[0].startswith(b"-NOAUTH"), command
    assert redis(resp_command("AUTH", "chat", "wrong"))[0].startswith(b"-WRONGPASS")
    assert redis(resp_command("AUTH", "default", ""))[0].startswith(b"-WRONGPASS")
    ok = redis(resp_command("AUTH", "chat", cluster.secrets.redis_password), resp_command("PING"))
    assert ok == [b"+OK", b"+PONG"]

    wrong = cluster.database_url.replace(cluster.secrets.postgres_password, "wrong")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong, timeout=scaled(10))
    without = cluster.database_url.replace(f":{cluster.secrets.postgres_password}@", "@")
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ClientCannotConnectError)):
        await asyncpg.connect(without, timeout=scaled(10))
    conn = await asyncpg.connect(cluster.database_url, timeout=scaled(10))
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_only_holders_of_the_service_key_act_as_flannel(cluster: LocalCluster) -> None:
    internal = f"ws://127.0.0.1:{cluster.endpoints.internal.port}/service"

    async def status(url: str, token: str | None, **kwargs: Any) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with ws_connect(url, additional_headers=headers, **kwargs):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    forged = credentials.issue(SERVICE_KID, "not-the-secret-" * 3, "intruder")
    assert await status(internal, None) == 401
    assert await status(internal, forged) == 401
    kid, secret = cluster.secrets.service_key.split("=", 1)
    assert await status(internal, credentials.issue(kid, secret, "ours")) == 101
    # The public frontend does not offer /service at all, credential or not.
    public = cluster.chat_url.replace("/chat", "/service")
    ctx = cluster.ssl_context()
    assert await status(public, credentials.issue(kid, secret, "ours"), ssl=ctx) == 404


async def moved_without_loss(cluster: LocalCluster, url: str, kill: Any) -> list[Listener]:
    """Listeners on ``url``; 10 posts, ``kill()``, 10 more posts; every listener ends with
    all 20 (nothing lost, nothing twice) and PostgreSQL holds exactly those 20."""
    seeded = cluster.seeded
    assert seeded is not None
    general = seeded.channels["general"]
    async with listeners(cluster, url) as clients:
        async with ResilientClient(cluster.chat_url, seeded.tokens["alice"]) as poster:
            await poster.wait_connected(scaled(30))
            acked = [(await poster.post(general, f"a{i}"))["message"]["id"] for i in range(10)]
            await kill()
            for i in range(10):
                reply = await poster.post(general, f"b{i}", timeout=scaled(60))
                acked.append(reply["message"]["id"])
        await wait_for(lambda: all(len(c.ids) >= 20 for c in clients), scaled(60), "every delivery")
        stored = await stored_ids(cluster, general)
        assert stored == acked and len(set(stored)) == 20
        for c in clients:
            assert c.ids == stored  # in order, once each
        return clients


async def test_killing_a_chat_node_moves_its_clients_with_nothing_lost(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(make_local_cluster, monkeypatch)

    async def kill() -> None:
        assert await cluster.chats["chat0"].akill() == -9

    clients = await moved_without_loss(cluster, cluster.chat_url, kill)
    moved = [c for c in clients if c.rc.connects == 2]
    assert moved and all(c.rc.resumes == 1 for c in moved)  # leastconn spread them


async def test_killing_a_flannel_node_moves_its_clients_with_nothing_lost(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(make_local_cluster, monkeypatch)
    assert cluster.seeded is not None
    url = cluster.url(cluster.seeded.workspace_id)
    holder: list[str] = []

    async def kill() -> None:
        loads = {
            n: await f.ametric("flannel_workspace_loads_total") for n, f in cluster.flannels.items()
        }
        (name,) = [n for n, v in loads.items() if v == 1]  # the workspace's one node
        holder.append(name)
        assert await cluster.flannels[name].akill() == -9

    clients = await moved_without_loss(cluster, url, kill)
    assert all(c.rc.connects == 2 for c in clients)  # all were on the killed node
    (other,) = [f for n, f in cluster.flannels.items() if n != holder[0]]
    assert await other.ametric("flannel_workspace_loads_total") == 1


async def test_a_draining_chat_node_is_taken_out_by_the_health_check(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    drain = {"CHAT_DRAIN_PERIOD_S": "20", "CHAT_SHUTDOWN_GRACE_S": "1"}
    cluster = await fresh(make_local_cluster, monkeypatch, node_env=drain)
    seeded = cluster.seeded
    assert seeded is not None
    node = cluster.chats["chat0"]
    stopping = asyncio.create_task(node.aterminate(scaled(60)))
    try:
        states = await cluster.wait_servers(
            lambda s: s.get(("chat", "chat0"), "").startswith(("DOWN", "MAINT")), scaled(20)
        )
        assert states[("chat", "chat1")] == "UP"
        assert node.running  # still draining: its /readyz said 503
        state = await asyncio.to_thread(cluster.haproxy.command, "show servers state chat")
        assert any(" chat0 " in line and line.split()[5] == "0" for line in state.splitlines())
        before = await cluster.chats["chat1"].ametric("chat_sessions")
        ctx = cluster.ssl_context()
        async with contextlib.AsyncExitStack() as stack:
            for i in range(4):  # a draining node would refuse them with 503
                await stack.enter_async_context(
                    Client.connect(cluster.chat_url, seeded.tokens[f"u{i}"], ssl=ctx)
                )
            assert await cluster.chats["chat1"].ametric("chat_sessions") == before + 4
    finally:
        await stopping


async def test_a_chat_node_that_lost_postgres_is_taken_out(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(make_local_cluster, monkeypatch, n_flannel=1)
    await asyncio.to_thread(cluster.postgres.stop)
    await cluster.wait_servers(
        lambda s: all(s.get(("chat", n), "").startswith("DOWN") for n in cluster.chats),
        scaled(30),
    )
    assert all(node.running for node in cluster.chats.values())  # alive, but not ready


async def test_the_compose_haproxy_health_probe_reads_the_stats_page(
    cluster: LocalCluster,
) -> None:
    probe = render._stats_probe(cluster.endpoints.stats.port)
    ok = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", probe], capture_output=True, timeout=10, check=False
    )
    assert ok.returncode == 0, ok.stderr
    closed = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", render._stats_probe(free_port())],
        capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    assert closed.returncode != 0


async def test_the_launchers_postgres_counts_statements(cluster: LocalCluster) -> None:
    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=scaled(10))
    try:
        preload = await conn.fetchval("SHOW shared_preload_libraries")
    finally:
        await conn.close()
    assert "pg_stat_statements" in preload


async def test_a_reload_keeps_a_down_server_down(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(make_local_cluster, monkeypatch, n_flannel=1)
    await cluster.chats["chat0"].akill()
    await cluster.wait_servers(lambda s: s.get(("chat", "chat0")) == "DOWN", scaled(20))
    await asyncio.to_thread(cluster.haproxy.reload)
    state = await asyncio.to_thread(cluster.haproxy.command, "show servers state chat")
    (line,) = [x for x in state.splitlines() if " chat0 " in x]
    assert line.split()[5] == "0"  # srv_op_state 0 (stopped) in the new worker at once


async def test_each_source_gets_a_limited_connection_rate(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(
        make_local_cluster, monkeypatch, n_flannel=1, limits=haproxy.Limits(rate_limit=5)
    )
    ctx = cluster.ssl_context()
    port = cluster.endpoints.public.port

    async def handshake() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        except (OSError, ssl.SSLError):
            return False
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return True

    outcomes = [await handshake() for _ in range(12)]
    assert outcomes == [True] * 5 + [False] * 7  # within 10 s, from one address


async def test_a_full_server_makes_new_clients_wait_in_the_queue(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = haproxy.Limits(server_maxconn=1, queue_s=60)
    # No Flannel: its service connections would hold the one slot.
    cluster = await fresh(make_local_cluster, monkeypatch, n_chat=1, n_flannel=0, limits=limits)
    seeded = cluster.seeded
    assert seeded is not None
    ctx = cluster.ssl_context()

    async def queued() -> int:
        rows = await asyncio.to_thread(cluster.haproxy.stat)
        return sum(int(r["qcur"] or 0) for (proxy, _), r in rows.items() if proxy == "chat")

    async with Client.connect(cluster.chat_url, seeded.tokens["u0"], ssl=ctx):
        waiting = asyncio.create_task(_connect_and_close(cluster.chat_url, seeded.tokens["u1"]))
        await wait_for_async(lambda: queued(), 1, scaled(20), "a queued connection")
        assert not waiting.done()
    await asyncio.wait_for(waiting, scaled(30))  # in, once the slot was free
    assert await queued() == 0


async def _connect_and_close(url: str, token: str) -> None:
    async with Client.connect(url, token):
        pass


async def wait_for_async(probe: Any, want: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await probe() != want:
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_haproxy_reload_under_load_drops_nobody(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(make_local_cluster, monkeypatch)
    seeded = cluster.seeded
    assert seeded is not None
    general = seeded.channels["general"]
    async with listeners(cluster, cluster.chat_url) as clients:
        async with ResilientClient(cluster.chat_url, seeded.tokens["alice"]) as poster:
            await poster.wait_connected(scaled(30))
            acked = [(await poster.post(general, f"a{i}"))["message"]["id"] for i in range(5)]
            await asyncio.to_thread(cluster.haproxy.reload)
            for i in range(5):
                acked.append((await poster.post(general, f"b{i}"))["message"]["id"])
            # A connection made after the reload (the new worker) posts too.
            async with Client.connect(
                cluster.chat_url, seeded.tokens["bob"], ssl=cluster.ssl_context()
            ) as bob:
                acked.append((await bob.post(general, "after"))["message"]["id"])
        await wait_for(
            lambda: all(len(c.ids) >= len(acked) for c in clients), scaled(30), "deliveries"
        )
        survivors = [c for c in clients if c.rc.connects == 1]
        assert len(survivors) == len(clients)  # the old worker kept every websocket
        assert all(c.ids == acked for c in clients)


def test_chat_cluster_up_prints_where_to_connect_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat", "cluster", "up", "--chat", "1", "--flannel", "1", "--seed"],
        cwd=render.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        stdout = proc.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")))
        reader.start()
        deadline = time.monotonic() + scaled(90)
        while not any("Ctrl-C" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        out = "".join(lines)
        cert = re.search(r"SSL_CERT_FILE=(\S+)", out)
        chat_url = re.search(r"chat tier direct: +(\S+)", out)
        token = re.search(r"alice: (\S+)", out)
        assert cert and chat_url and token, out
        directory = Path(cert.group(1)).parent

        async def talk() -> None:
            ctx = ssl.create_default_context(cafile=cert.group(1))
            async with Client.connect(chat_url.group(1), token.group(1), ssl=ctx) as alice:
                assert alice.session["user"]["handle"] == "alice"

        asyncio.run(talk())
        proc.send_signal(signal.SIGHUP)
        while not any("haproxy reloaded" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        asyncio.run(talk())  # the new worker
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=scaled(60)) == 0
        reader.join(timeout=scaled(10))
        assert "stopping" in "".join(lines)
        assert not directory.exists()  # its temp directory, and so every server, is gone
        port = int(chat_url.group(1).rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_kept_directory_keeps_the_database_and_its_passwords() -> None:
    # Not under tmp_path: as root, PostgreSQL runs as another user, who cannot enter it.
    directory = Path(tempfile.mkdtemp(prefix="chat-kept-cluster-"))
    try:
        await _run_twice(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _run_twice(directory: Path) -> None:
    async with LocalCluster(Topology(n_chat=1, n_flannel=0), directory=directory) as first:
        seeded = await first.seed()
        general = seeded.channels["general"]
        async with Client.connect(
            first.chat_url, seeded.tokens["alice"], ssl=first.ssl_context()
        ) as alice:
            posted = (await alice.post(general, "kept"))["message"]["id"]
    assert (directory / "postgres" / "data" / "PG_VERSION").exists()
    async with LocalCluster(Topology(n_chat=1, n_flannel=0), directory=directory) as second:
        assert second.secrets == first.secrets and not second.postgres.created
        assert await stored_ids(second, general) == [posted]


async def test_a_directory_closed_to_postgres_still_works(tmp_path: Path) -> None:
    # pytest's tmp_path is 0700: as root, PostgreSQL (another user) cannot enter it.
    cluster = LocalCluster(Topology(n_chat=1, n_flannel=0), directory=tmp_path / "c")
    side = cluster.postgres.directory
    async with cluster:
        seeded = await cluster.seed()
        assert await stored_ids(cluster, seeded.channels["general"]) == []
    if os.geteuid() == 0:
        assert tmp_path not in side.parents and not side.exists()
    else:
        assert side == tmp_path / "c" / "postgres"


async def test_websockets_an_old_worker_still_holds_at_hard_stop_after_resume(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = haproxy.Limits(hard_stop_after_s=2, close_spread_s=1)
    cluster = await fresh(make_local_cluster, monkeypatch, n_flannel=1, limits=limits)
    seeded = cluster.seeded
    assert seeded is not None
    general = seeded.channels["general"]
    async with listeners(cluster, cluster.chat_url) as clients:
        async with ResilientClient(cluster.chat_url, seeded.tokens["alice"]) as poster:
            await poster.wait_connected(scaled(30))
            acked = [(await poster.post(general, f"a{i}"))["message"]["id"] for i in range(5)]
            await asyncio.to_thread(cluster.haproxy.reload)
            await wait_for(
                lambda: all(c.rc.connects == 2 for c in clients), scaled(30), "the hard stop"
            )
            for i in range(5):
                acked.append((await poster.post(general, f"b{i}"))["message"]["id"])
        await wait_for(
            lambda: all(len(c.ids) >= len(acked) for c in clients), scaled(30), "deliveries"
        )
        assert await stored_ids(cluster, general) == acked
        for c in clients:
            assert c.ids == acked and c.rc.resumes == 1  # cut once, resumed, nothing lost


async def test_a_reload_can_spread_the_old_workers_closes(
    make_local_cluster: MakeLocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await fresh(make_local_cluster, monkeypatch, n_flannel=1)
    seeded = cluster.seeded
    assert seeded is not None
    general = seeded.channels["general"]
    async with listeners(cluster, cluster.chat_url) as clients:
        async with ResilientClient(cluster.chat_url, seeded.tokens["alice"]) as poster:
            await poster.wait_connected(scaled(30))
            acked = [(await poster.post(general, f"a{i}"))["message"]["id"] for i in range(5)]
            spreading = await asyncio.to_thread(cluster.haproxy.reload, 2.0)
            assert spreading is not None
            await asyncio.to_thread(spreading.join, scaled(30))
            assert not spreading.is_alive() and spreading.error is None
            await wait_for(lambda: all(c.rc.connects == 2 for c in clients), scaled(30), "moves")
            for i in range(5):
                acked.append((await poster.post(general, f"b{i}"))["message"]["id"])
        # One at a time: before each close the old worker held as many as before the last
        # one (that close not carried out yet, on a loaded machine) or one fewer, never
        # two fewer. Flannel's two service connections and the poster were there too.
        held = spreading.remaining
        assert held[0] >= N_CLIENTS + 1 and held[-1] >= 1
        assert all(a - b in (0, 1) for a, b in itertools.pairwise(held)), held
        assert len(set(held)) == held[0]  # every count from the first down to 1
        await wait_for(
            lambda: all(len(c.ids) >= len(acked) for c in clients), scaled(30), "deliveries"
        )
        for c in clients:
            assert c.ids == acked and c.rc.resumes == 1
