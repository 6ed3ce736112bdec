"""``chat loadtest``: load tests over the launcher's cluster (:class:`LocalCluster`).

One run = one scenario on a fresh cluster (PostgreSQL, Redis, chat and Flannel nodes,
HAProxy, all on loopback)::

    wsblast x --procs --ws--> haproxy :plain --/?workspace=W--> flannel-i --> chat-j
                                              --/chat---------> chat-j     (--no-flannel)
    poster  (users p0 of each workspace) --ws /chat--> chat tier  (t=<monotonic ns>; in text)
    observers (o0.. per workspace, Python) --same path as the clients--> latency samples

Scenarios (``--scenario``):

* ``chatter``: every client live (paced), then the posters post ``--rate`` messages/s
  round-robin over ``--channels`` channels for ``--post-before`` + ``--post-after`` s;
* ``hot``: the same into one channel (fan-out to everyone in it);
* ``storm``: clients live, posting, then every client is dropped at once by ``--cut``:
  ``flannel`` (SIGKILL the Flannel node holding most clients), ``chat`` (SIGKILL the chat
  node holding most connections), ``haproxy`` (stop and start HAProxy: every connection
  through it is cut), ``client`` (every client connection is shut at the edge with
  HAProxy's ``shutdown sessions``: wsblast has no client-side drop command); clients come
  back after uniform(0, ``--jitter-ms``) and resume, failures back off from
  ``--backoff-ms`` with full jitter (wsblast's storm mode, as ``chat.client``);
* ``monday``: a cold start: every client connects at once (no pacing, no resume) to
  caches that never saw the workspace, then a short posting period.

Measured: time to live (p50/p99/last) and the peak connect rate of the measured round
(the storm, or the cold start), bytes from HAProxy to the clients per client in it
(HAProxy's backend counters), Flannel workspace loads (``flannel_workspace_loads_total``)
and PostgreSQL work in it (``pg_stat_statements`` when the server preloads it, else
transactions from ``pg_stat_database``), delivery latency p50/p99 during and after the
storm (observers), and the delivery check: each live client's count of ``message.posted``
against the posters' messages in PostgreSQL (lost) and durable seqs seen twice
(duplicated). Reported live (rich), then as a table, JSON
(``bench/results/loadtest-<date>.json``) and a PNG (matplotlib).

HAProxy's public listener is TLS only and wsblast speaks no TLS: :func:`add_plain_bind`
adds a plaintext loopback ``bind`` to the generated config's ``public`` frontend (same
routing, limits and counters). Everything started here is stopped by PID; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.cluster import haproxy
from chat.cluster.launcher import LocalCluster, SeededWorkspace
from chat.cluster.processes import free_port, parse_metric
from chat.cluster.topology import CHAT_PATH, Topology

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
WSBLAST_SRC = REPO / "bench" / "wsblast.c"
WSBLAST = REPO / "bench" / ".build" / "wsblast"
AUTH_ID = "bench-auth"  # the request id of every client's auth; the reply names it
FAIL_MATCH = '"type":"error"'
PING = '{"type":"ping","id":"hb"}'
SCENARIOS = ("chatter", "hot", "storm", "monday")
CUTS = ("flannel", "chat", "haproxy", "client")
STAT_SUMS = (
    "conns ok failed unfinished not_lost out_before connects retries hints goodbyes resumed "
    "switched conn_errors timeouts refused error_frames server_closed"
).split()
STAT_DICTS = ("hint_kinds", "resume_errors", "close_codes", "http_status")
PG_STATS_FLUSH_S = 11.0  # pg_stat_database: an idle backend's counters arrive within 10 s
_T_RE = re.compile(rb"t=(\d+);")


class LoadTestError(Exception):
    """The run could not be carried out (not a failed check: those are in the report)."""


@dataclass
class Options:
    scenario: str = "storm"
    clients: int = 1000
    procs: int = 2
    flannel: bool = True
    cut: str = "flannel"
    workspaces: int = 1
    channels: int = 4
    rate: float = 20.0  # messages/s over all posters
    post_before: float = 2.0
    post_after: float = 3.0
    backoff_ms: int = 100
    backoff_cap_ms: int = 5000
    jitter_ms: int = 1000
    attempts: int = 30
    connect_batch: int = 200  # handshakes in flight while clients first connect (not monday)
    conn_timeout_ms: int = 10000
    storm_max_s: float = 60.0
    observers: int = 2  # per workspace
    n_chat: int = 2
    n_flannel: int = 2
    out: Path | None = None  # JSON path; the PNG beside it
    cluster_dir: Path | None = None
    live: bool = False
    plot: bool = True


# --------------------------------------------------------------------------- HAProxy


def add_plain_bind(cluster: LocalCluster) -> int:
    """Add ``bind 127.0.0.1:<free port>`` (no TLS) to the ``public`` frontend of the
    cluster's generated haproxy.cfg, before it starts; returns the port."""
    config = cluster.haproxy.config
    lines = config.read_text().splitlines()
    port = free_port()
    try:
        at = next(i for i, ln in enumerate(lines) if ln.strip() == "frontend public")
    except StopIteration:
        raise LoadTestError("haproxy.cfg has no public frontend") from None
    lines.insert(at + 2, f"    bind 127.0.0.1:{port}  # chat loadtest: plaintext, loopback")
    config.write_text("\n".join(lines) + "\n")
    return port


def haproxy_stats(cluster: LocalCluster) -> dict[tuple[str, str], dict[str, str]]:
    """The stats page as ``{(proxy, server): row}``; empty if HAProxy does not answer."""
    try:
        with urllib.request.urlopen(cluster.stats_url + ";csv", timeout=2.0) as response:
            page = response.read().decode()
    except OSError:
        return {}
    rows = csv.DictReader(io.StringIO(page.lstrip("# ")))
    return {(r["pxname"], r["svname"]): r for r in rows}


_SS_RE = re.compile(r"bytes_sent:(\d+).*?bytes_received:(\d+)", re.S)


def edge_bytes(port: int) -> dict[str, int]:
    """Bytes HAProxy sent to / received from the clients on its established connections
    to loopback ``port`` (``ss -ti``: the kernel's per-socket counters; HAProxy's own
    counters only move when a websocket ends)."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    sent = received = sockets = 0
    for m in _SS_RE.finditer(out):
        sent, received, sockets = sent + int(m[1]), received + int(m[2]), sockets + 1
    return {"sent": sent, "received": received, "sockets": sockets}


def _int(row: dict[str, str] | None, key: str) -> int:
    value = (row or {}).get(key) or "0"
    return int(value) if value.isdigit() else 0


# --------------------------------------------------------------------------- wsblast


def build_wsblast() -> Path:
    if not WSBLAST.exists() or WSBLAST.stat().st_mtime < WSBLAST_SRC.stat().st_mtime:
        WSBLAST.parent.mkdir(exist_ok=True)
        cmd = ["gcc", "-O2", "-Wall", "-o", str(WSBLAST), str(WSBLAST_SRC)]
        subprocess.run(cmd, check=True, timeout=120)
    return WSBLAST


class Blast:
    """One wsblast process in storm mode: its clients, a line protocol on stdin/stdout."""

    def __init__(self, name: str, argv: list[str], log: Path, workspace: int) -> None:
        self.name = name
        self.workspace = workspace
        self.log = log
        self._buf = b""
        with log.open("ab") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
            )
        self.pid = self.popen.pid

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        """Read lines until one starts with ``prefix``; the rest of it (blocking, bounded)."""
        import select

        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LoadTestError(f"{self.name}: no {prefix} within {timeout:.0f}s")
                if select.select([fd], [], [], left)[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise LoadTestError(f"{self.name}: exited ({self.popen.poll()})")
                    self._buf += chunk
            line, _, self._buf = self._buf.partition(b"\n")
            text = line.decode(errors="replace")
            if text.startswith(prefix):
                return text[len(prefix) :].strip()

    def expect_json(self, prefix: str, timeout: float) -> dict[str, Any]:
        data = json.loads(self.expect(prefix, timeout))
        assert isinstance(data, dict)
        return data

    def stop(self, timeout: float = 10.0) -> None:
        """QUIT, then SIGTERM, then SIGKILL: this process only, by PID."""
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.send("QUIT")
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout)
                        break
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (the ceil(q*n)-th smallest), as wsblast computes it."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))]


def merge_rounds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One STORM report from the K processes' reports of a round: counts summed, times
    over every client from the earliest start (round 0) or the MARK (later rounds)."""
    out: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in reports) for k in STAT_SUMS}
    for key in STAT_DICTS:
        merged: dict[str, int] = {}
        for r in reports:
            for k, v in r.get(key, {}).items():
                merged[k] = merged.get(k, 0) + int(v)
        out[key] = merged
    t0 = min(int(r["t0_ns"]) for r in reports)
    ready = [float(x) + (int(r["t0_ns"]) - t0) / 1e6 for r in reports for x in r["ready_ms"]]
    out |= {
        "round": reports[0]["round"],
        "live": len(ready) + out["not_lost"],  # round >= 1: back, or never lost
        "dropped": out["conns"] - out["not_lost"],
        "resume_errors_total": sum(out["resume_errors"].values()),
        "ready_ms": sorted(ready),
        "last_ready_ms": max(ready) if ready else None,
        "ready_p50_ms": pct(ready, 0.5),
        "ready_p99_ms": pct(ready, 0.99),
        "peak_connects_per_s": peak_rate(ready),
    }
    return out


def peak_rate(ready_ms: Sequence[float], window_ms: float = 100.0) -> float:
    """The most clients that went live in one ``window_ms`` window, per second."""
    if not ready_ms:
        return 0.0
    bins: dict[int, int] = {}
    for x in ready_ms:
        bins[int(x // window_ms)] = bins.get(int(x // window_ms), 0) + 1
    return max(bins.values()) * 1000.0 / window_ms


def merge_counts(reports: list[dict[str, Any]]) -> dict[str, Any]:
    keys = "conns live posted dups conns_exact conns_short short_sum conns_over over_sum"
    out: dict[str, Any] = {k: sum(int(r[k]) for r in reports) for k in keys.split()}
    out["not_live"] = sum(int(r["not_live"]) for r in reports)
    return out


# --------------------------------------------------------------------------- Python clients


@dataclass
class Samples:
    """What the poster and the observers saw, on the harness's monotonic clock."""

    posted: list[float] = field(default_factory=list)  # send times (s)
    delivered: list[float] = field(default_factory=list)  # observer receive times (s)
    latency: list[tuple[float, float]] = field(default_factory=list)  # (at s, latency ms)
    poster_errors: int = 0
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
    ``max_s``); returns how many were acknowledged. PostgreSQL is the truth, not this."""
    from websockets.asyncio.client import connect

    run_id, acked = uuid.uuid4().hex[:8], 0
    async with connect(url, compression=None, max_size=None, open_timeout=30) as ws:
        await _hello_auth(ws, token, "poster-auth", None)

        async def read() -> None:
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

        reader = asyncio.create_task(read())
        start, i = time.monotonic(), 0
        try:
            while not stop.is_set() and time.monotonic() - start < max_s:
                delay = start + i / rate - time.monotonic()
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
                i += 1
            deadline = time.monotonic() + 10  # replies on their way
            while acked + samples.poster_errors < i and time.monotonic() < deadline:
                if reader.done():
                    break
                await asyncio.sleep(0.05)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
    return acked


# --------------------------------------------------------------------------- PostgreSQL


async def pg_work(cluster: LocalCluster) -> dict[str, Any]:
    """The chat database's statement count (pg_stat_statements, if loaded) and its
    transaction count (pg_stat_database), read over the maintenance database."""
    import asyncpg

    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT oid, xact_commit + xact_rollback AS xacts FROM pg_database d "
            "JOIN pg_stat_database s ON s.datid = d.oid WHERE d.datname = 'chat'"
        )
        out: dict[str, Any] = {"xacts": int(row["xacts"]), "statements": None}
        with contextlib.suppress(asyncpg.PostgresError):
            out["statements"] = int(
                await conn.fetchval(
                    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = $1",
                    row["oid"],
                )
            )
        return out
    finally:
        await conn.close()


async def pg_prepare(cluster: LocalCluster) -> bool:
    """CREATE EXTENSION pg_stat_statements; False when the server does not preload it."""
    import asyncpg

    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=10)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def pg_reset(cluster: LocalCluster) -> None:
    import asyncpg

    conn = await asyncpg.connect(cluster.postgres.admin_dsn, timeout=10)
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def pg_posted(cluster: LocalCluster, user_id: int) -> int:
    """Messages stored by one poster: what every client of its workspace must hold."""
    import asyncpg

    conn = await asyncpg.connect(cluster.database_url, timeout=10)
    try:
        n = await conn.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user_id)
        return int(n)
    finally:
        await conn.close()


def flannel_loads(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    """Per running Flannel node: workspace loads so far and workspaces cached now."""
    out = {}
    for name, node in cluster.flannels.items():
        if node.running:
            page = node.metrics()
            out[name] = {
                "loads": parse_metric(page, "flannel_workspace_loads_total"),
                "cached": parse_metric(page, "flannel_cached_workspaces"),
            }
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class Timeline:
    """Samples of HAProxy's live client connections (scur), over time."""

    t0: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, int]] = field(default_factory=list)  # (s, live)
    events: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        self.events.append((time.monotonic() - self.t0, what))


class Run:
    """One scenario on one cluster: start, seed, connect, post, cut, check, report."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.backend = "flannel" if opts.flannel else "chat"
        self.cluster = LocalCluster(
            Topology(n_chat=opts.n_chat, n_flannel=opts.n_flannel),
            directory=opts.cluster_dir,
            limits=haproxy.Limits(
                rate_limit=max(2000, 10 * opts.clients),
                server_maxconn=max(4000, opts.clients + 100),
                global_maxconn=max(9000, 2 * opts.clients + 1000),
            ),
            node_env={"CHAT_LOG_LEVEL": "warning", "CHAT_RATE_LIMIT_PER_10S": "100000"},
        )
        self.plain_port = add_plain_bind(self.cluster)
        self.blasts: list[Blast] = []
        self.samples = Samples()
        self.timeline = Timeline()
        self.phase = "starting"
        self.phase_deadline: float | None = None
        self.result: dict[str, Any] = {}
        self._stop_sampling = asyncio.Event()

    # -- where the clients go ---------------------------------------------------------------

    def path(self, workspace: int) -> str:
        return f"/?workspace={workspace}" if self.o.flannel else CHAT_PATH

    def url(self, workspace: int) -> str:
        return f"ws://127.0.0.1:{self.plain_port}{self.path(workspace)}"

    # -- pieces -----------------------------------------------------------------------------

    async def seed(self) -> list[SeededWorkspace]:
        o = self.o
        seeded = []
        for w in range(o.workspaces):
            n = o.clients // o.workspaces + (1 if w < o.clients % o.workspaces else 0)
            handles = ["p0", *(f"o{i}" for i in range(o.observers)), *(f"u{i}" for i in range(n))]
            chans = ["hot"] if o.scenario == "hot" else [f"c{i}" for i in range(o.channels)]
            seeded.append(await self.cluster.seed(f"load{w}", handles, chans))
        return seeded

    def start_blasts(self, seeded: list[SeededWorkspace], directory: Path) -> None:
        o = self.o
        per_ws = max(1, o.procs // len(seeded))
        monday = o.scenario == "monday"
        lifetime = o.storm_max_s * 3 + o.post_before + o.post_after + 300
        for ws in seeded:
            tokens = [ws.tokens[h] for h in ws.handles if h.startswith("u")]
            for k in range(per_ws):
                part = tokens[k * len(tokens) // per_ws : (k + 1) * len(tokens) // per_ws]
                if not part:
                    continue
                auth = directory / f"auth-{ws.workspace_id}-{k}.txt"
                lines = [
                    json.dumps({"type": "auth", "id": AUTH_ID, "token": t}, separators=(",", ":"))
                    for t in part
                ]
                auth.write_text("".join(line + "\n" for line in lines))
                argv = [str(WSBLAST), "--port", str(self.plain_port), "--conns", str(len(part))]
                argv += ["--path", self.path(ws.workspace_id), "--auth-file", str(auth)]
                argv += ["--ready-frames", "1", "--ready-match", AUTH_ID]
                argv += ["--fail-match", FAIL_MATCH, "--storm", "--go"]
                argv += ["--attempts", str(o.attempts), "--batch"]
                argv += ["0" if monday else str(max(1, o.connect_batch // per_ws))]
                argv += ["--jitter-ms", str(o.jitter_ms), "--backoff-ms", str(o.backoff_ms)]
                argv += ["--backoff-cap-ms", str(o.backoff_cap_ms)]
                argv += ["--conn-timeout-ms", str(o.conn_timeout_ms)]
                argv += ["--storm-max-ms", str(int(o.storm_max_s * 1000))]
                argv += ["--max-seconds", str(int(lifetime))]
                argv += ["--heartbeat-ms", "20000", "--heartbeat-text", PING]
                if not monday:
                    argv.append("--resume")
                name = f"wsblast-{ws.workspace_id}-{k}"
                self.blasts.append(Blast(name, argv, directory / f"{name}.log", ws.workspace_id))
        for b in self.blasts:
            b.expect("WAITING", 60)

    async def collect_round(self, timeout: float) -> dict[str, Any]:
        reports = await asyncio.gather(
            *(asyncio.to_thread(b.expect_json, "STORM", timeout) for b in self.blasts)
        )
        return merge_rounds(list(reports))

    async def sample(self) -> None:
        """Every 0.2 s: HAProxy's live connections on the clients' backend."""
        while not self._stop_sampling.is_set():
            stats = await asyncio.to_thread(haproxy_stats, self.cluster)
            if stats:
                row = stats.get((self.backend, "BACKEND"))
                self.timeline.rows.append((time.monotonic() - self.timeline.t0, _int(row, "scur")))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_sampling.wait(), 0.2)

    def busiest(self, backend: str) -> str:
        stats = haproxy_stats(self.cluster)
        names = self.cluster.flannels if backend == "flannel" else self.cluster.chats
        return max(names, key=lambda n: _int(stats.get((backend, n)), "scur"))

    async def cut(self) -> dict[str, Any]:
        """Drop every client at once, as ``--cut`` says; what was cut."""
        c, how = self.cluster, self.o.cut
        if how == "flannel":
            name = await asyncio.to_thread(self.busiest, "flannel")
            c.flannels[name].kill()
            return {"killed": name}
        if how == "chat":
            name = await asyncio.to_thread(self.busiest, "chat")
            c.chats[name].kill()
            return {"killed": name}
        if how == "haproxy":
            await asyncio.to_thread(c.haproxy.stop)
            await asyncio.to_thread(c.haproxy.start)
            return {"restarted": "haproxy"}
        names = c.flannels if self.o.flannel else c.chats
        for name in names:
            await asyncio.to_thread(
                c.haproxy.command, f"shutdown sessions server {self.backend}/{name}"
            )
        return {"shutdown_sessions": self.backend}

    # -- the scenario -------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        o = self.o
        if o.scenario not in SCENARIOS or o.cut not in CUTS:
            raise LoadTestError(f"unknown scenario {o.scenario!r} or cut {o.cut!r}")
        build_wsblast()
        self.phase = "cluster"
        t_start = time.monotonic()
        await self.cluster.start()
        statements = await pg_prepare(self.cluster)
        self.phase = "seed"
        seeded = await self.seed()
        self.timeline = Timeline()
        sampler = asyncio.create_task(self.sample())
        stop_obs, stop_post = asyncio.Event(), asyncio.Event()
        observers = [
            asyncio.create_task(
                observe(self.url(ws.workspace_id), ws.tokens[h], self.samples, stop_obs)
            )
            for ws in seeded
            for h in ws.handles
            if h.startswith("o")
        ]
        posters: list[asyncio.Task[int]] = []
        r: dict[str, Any] = {
            "scenario": o.scenario,
            "clients": o.clients,
            "flannel": o.flannel,
            "cut": o.cut if o.scenario == "storm" else None,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(o).items()},
            "topology": {"chat": o.n_chat, "flannel": o.n_flannel},
            "workspaces": [ws.workspace_id for ws in seeded],
            "pg_counted_by": "pg_stat_statements" if statements else "pg_stat_database xacts",
        }
        self.result = r
        try:
            # 1. every client connects (monday: all at once, measured; else paced)
            self.phase = "connect"
            self.phase_deadline = time.monotonic() + o.storm_max_s
            self.start_blasts(seeded, self.cluster.directory)
            loads0, pg0 = flannel_loads(self.cluster), await pg_work(self.cluster)
            await pg_reset(self.cluster)
            self.timeline.mark("connect")
            for b in self.blasts:
                b.send("GO")
            first = await self.collect_round(o.storm_max_s + 60)
            r["connect"] = _strip(first)
            if first["live"] < o.clients:
                raise LoadTestError(f"only {first['live']} of {o.clients} clients went live")
            measured = first
            if o.scenario == "monday":
                await self.measure_cost(r, "cold", loads0, pg0, statements)
            # 2. posting
            self.phase = "posting"
            posters = [
                asyncio.create_task(
                    post(
                        f"ws://127.0.0.1:{self.plain_port}{CHAT_PATH}",
                        ws.tokens["p0"],
                        list(ws.channels.values()),
                        o.rate / len(seeded),
                        self.samples,
                        stop_post,
                        o.post_before + o.storm_max_s + o.post_after + 60,
                    )
                )
                for ws in seeded
            ]
            self.timeline.mark("posting")
            self.phase_deadline = time.monotonic() + o.post_before
            await asyncio.sleep(o.post_before)
            if o.scenario == "storm":
                # 3. the storm
                self.phase = f"storm ({o.cut})"
                self.phase_deadline = time.monotonic() + o.storm_max_s
                loads0, pg0 = flannel_loads(self.cluster), await pg_work(self.cluster)
                await pg_reset(self.cluster)
                t_cut = time.monotonic()
                self.timeline.mark(f"cut {o.cut}")
                mark_ns = time.monotonic_ns()
                r["cut_detail"] = await self.cut()
                for b in self.blasts:
                    b.send(f"MARK {mark_ns}")
                storm = await self.collect_round(o.storm_max_s + 60)
                self.timeline.mark("all live" if storm["live"] >= o.clients else "gave up")
                r["storm"] = _strip(storm)
                r["storm_window_s"] = [t_cut, t_cut + (storm["last_ready_ms"] or 0) / 1000]
                measured = storm
                await self.measure_cost(r, "storm", loads0, pg0, statements)
            # 4. more posting, then the check
            self.phase = "posting"
            self.phase_deadline = time.monotonic() + o.post_after
            await asyncio.sleep(o.post_after)
            stop_post.set()
            acked = await asyncio.gather(*posters, return_exceptions=True)
            r["poster"] = {
                "sent": len(self.samples.posted),
                "acked": [a if isinstance(a, int) else repr(a)[:200] for a in acked],
                "errors": self.samples.poster_errors,
                "error_sample": self.samples.error_sample,
            }
            self.phase = "settle"
            await asyncio.sleep(2.0)
            counts = []
            for ws in seeded:
                expected = await pg_posted(self.cluster, ws.users["p0"])
                mine = [b for b in self.blasts if b.workspace == ws.workspace_id]
                for b in mine:
                    b.send(f"COUNTS {expected}")
                got = await asyncio.gather(
                    *(asyncio.to_thread(b.expect_json, "COUNTS", 30) for b in mine)
                )
                counts.append(merge_counts(list(got)) | {"expected": expected})
            r["delivery"] = {
                "per_workspace": counts,
                "lost": sum(c["short_sum"] for c in counts),
                "duplicated": sum(c["dups"] for c in counts),
                "not_live": sum(c["not_live"] for c in counts),
                "stored": sum(c["expected"] for c in counts),
            }
            r["measured_round"] = "storm" if o.scenario == "storm" else "connect"
            r["live_again"] = measured["live"]
            r["dropped"] = measured["dropped"] if o.scenario == "storm" else None
            r["time_to_live_s"] = _s(measured["last_ready_ms"])
            r["live_p50_s"] = _s(measured["ready_p50_ms"])
            r["live_p99_s"] = _s(measured["ready_p99_ms"])
            r["peak_connects_per_s"] = measured["peak_connects_per_s"]
            r["latency_ms"] = self.latencies(r.get("storm_window_s"))
        finally:
            self.phase = "stopping"
            stop_post.set()
            stop_obs.set()
            for b in self.blasts:
                await asyncio.to_thread(b.stop)
            for task in [*observers, *posters]:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(task, 15)
            self._stop_sampling.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(sampler, 5)
            await self.cluster.close()
        r["timeline"] = {
            "t_s": [round(t, 3) for t, _ in self.timeline.rows],
            "live": [n for _, n in self.timeline.rows],
            "events": self.timeline.events,
            "delivered_s": [round(t - self.timeline.t0, 3) for t in self.samples.delivered],
            "posted_s": [round(t - self.timeline.t0, 3) for t in self.samples.posted],
        }
        r["wall_s"] = round(time.monotonic() - t_start, 1)
        return r

    async def measure_cost(
        self,
        r: dict[str, Any],
        label: str,
        loads0: dict[str, dict[str, float]],
        pg0: dict[str, Any],
        statements: bool,
    ) -> None:
        """Right after every client is live: bytes on the (new) client connections so far,
        Flannel loads and PostgreSQL work since ``*0`` (read right before the round)."""
        n = self.o.clients
        edge = await asyncio.to_thread(edge_bytes, self.plain_port)
        per_socket = max(1, edge["sockets"])
        loads1 = flannel_loads(self.cluster)
        per_node = {
            name: int(v["loads"] - loads0.get(name, {}).get("loads", 0.0))
            for name, v in loads1.items()
        }
        cost: dict[str, Any] = {
            "bytes_to_clients_per_client": round(edge["sent"] / per_socket),
            "bytes_from_clients_per_client": round(edge["received"] / per_socket),
            "edge_sockets": edge["sockets"],
            "flannel_loads": per_node,
            "flannel_loads_total": sum(per_node.values()),
            "flannel_cached_before": {k: v["cached"] for k, v in loads0.items()},
            "flannel_cached_after": {k: v["cached"] for k, v in loads1.items()},
        }
        if not statements:
            await asyncio.sleep(PG_STATS_FLUSH_S)  # pg_stat_database lags
        pg1 = await pg_work(self.cluster)
        cost["pg_xacts"] = pg1["xacts"] - pg0["xacts"]
        cost["pg_statements"] = pg1["statements"]  # reset right before: None without the ext.
        cost["pg_xacts_per_client"] = round(cost["pg_xacts"] / n, 3)
        r[f"{label}_cost"] = cost

    def latencies(self, window: list[float] | None) -> dict[str, Any]:
        lat = self.samples.latency
        out: dict[str, Any] = {}
        groups: dict[str, list[float]] = {"all": [ms for _, ms in lat]}
        if window is not None:
            groups["during"] = [ms for at, ms in lat if window[0] <= at <= window[1]]
            groups["after"] = [ms for at, ms in lat if at > window[1]]
        for name, xs in groups.items():
            out[name] = {"n": len(xs), "p50": _r(pct(xs, 0.5)), "p99": _r(pct(xs, 0.99))}
        return out


def _strip(rnd: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rnd.items() if k != "ready_ms"} | {
        "ready_ms_sample": rnd["ready_ms"][:: max(1, len(rnd["ready_ms"]) // 200)]
    }


def _s(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# --------------------------------------------------------------------------- reporting


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's table: (figure, value)."""
    cost = r.get("storm_cost") or r.get("cold_cost") or {}
    d = r.get("delivery", {})
    lat = r.get("latency_ms", {})

    def ms(group: str) -> str:
        g = lat.get(group)
        return f"{g['p50']} / {g['p99']} ms (n={g['n']})" if g and g["n"] else "-"

    rows = [
        ("scenario", f"{r['scenario']}" + (f", cut {r['cut']}" if r.get("cut") else "")),
        ("path", "Flannel" if r["flannel"] else "chat tier (no Flannel)"),
        ("clients dropped", str(r.get("dropped", "-"))),
        ("clients live again", f"{r.get('live_again')} / {r['clients']}"),
        ("time until all live", f"{r.get('time_to_live_s')} s"),
        ("live p50 / p99", f"{r.get('live_p50_s')} / {r.get('live_p99_s')} s"),
        ("peak connect rate", f"{r.get('peak_connects_per_s', 0):.0f} /s"),
        ("bytes to each client", str(cost.get("bytes_to_clients_per_client", "-"))),
        ("Flannel workspace loads", str(cost.get("flannel_loads", "-"))),
        ("PostgreSQL statements", str(cost.get("pg_statements", "-"))),
        ("PostgreSQL transactions", str(cost.get("pg_xacts", "-"))),
        ("latency during storm", ms("during")),
        ("latency after storm", ms("after")),
        ("latency (whole run)", ms("all")),
        ("messages stored", str(d.get("stored", "-"))),
        ("lost / duplicated", f"{d.get('lost', '-')} / {d.get('duplicated', '-')}"),
    ]
    return rows


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="chat loadtest")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in summary_rows(r):
        table.add_row(k, v)
    Console().print(table)


def plot(r: dict[str, Any], path: Path) -> None:
    """Live connections and deliveries over time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = r["timeline"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(tl["t_s"], tl["live"], drawstyle="steps-post")
    ax1.set_ylabel("live client connections\n(HAProxy)")
    title = f"{r['scenario']}" + (f", cut {r['cut']}" if r.get("cut") else "")
    ax1.set_title(f"{title}, {r['clients']} clients, {'Flannel' if r['flannel'] else 'no Flannel'}")
    width = 0.25
    for series, label in ((tl["delivered_s"], "delivered (observers)"), (tl["posted_s"], "posted")):
        if series:
            end = max(series)
            bins = [i * width for i in range(int(end / width) + 2)]
            ax2.hist(series, bins=bins, histtype="step", label=label)
    ax2.set_ylabel(f"messages per {width:g} s")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper right")
    for t, what in tl["events"]:
        for ax in (ax1, ax2):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax1.annotate(what, (t, 0), rotation=90, fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_with_display(run: Run) -> dict[str, Any]:
    """The run, with a live table and a progress bar (rich) when asked."""
    if not run.o.live:
        return await run.run()
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False
    )
    task = progress.add_task("starting", total=100)

    def view() -> Group:
        rows = run.timeline.rows
        live = rows[-1][1] if rows else 0
        table = Table(show_header=True)
        for col in ("phase", "live", "clients", "posted", "delivered", "p99 ms"):
            table.add_column(col, justify="right")
        lat = [ms for _, ms in run.samples.latency[-500:]]
        p99 = pct(lat, 0.99)
        table.add_row(
            run.phase,
            str(live),
            str(run.o.clients),
            str(len(run.samples.posted)),
            str(len(run.samples.delivered)),
            f"{p99:.1f}" if p99 is not None else "-",
        )
        return Group(table, progress)

    main = asyncio.create_task(run.run())
    with Live(view(), refresh_per_second=4) as display:
        while not main.done():
            left = (run.phase_deadline or time.monotonic()) - time.monotonic()
            progress.update(task, description=run.phase, completed=max(0.0, 100 - left))
            display.update(view())
            await asyncio.wait({main}, timeout=0.25)
    return main.result()


def write(r: dict[str, Any], out: Path | None, make_plot: bool) -> tuple[Path, Path | None]:
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = out or RESULTS / f"loadtest-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png") if make_plot else None
    if png is not None:
        plot(r, png)
        r["plot"] = str(png)
    path.write_text(json.dumps(r, indent=1) + "\n")
    return path, png


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="chat loadtest", description=__doc__.split("\n\n")[0])
    d = Options()
    p.add_argument("--scenario", choices=SCENARIOS, default=d.scenario)
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--procs", type=int, default=d.procs, help="wsblast processes")
    p.add_argument("--flannel", action=argparse.BooleanOptionalAction, default=d.flannel)
    p.add_argument("--cut", choices=CUTS, default=d.cut, help="storm: what drops the clients")
    p.add_argument("--workspaces", type=int, default=d.workspaces)
    p.add_argument("--channels", type=int, default=d.channels)
    p.add_argument("--rate", type=float, default=d.rate, help="messages/s over all posters")
    p.add_argument("--post-before", type=float, default=d.post_before)
    p.add_argument("--post-after", type=float, default=d.post_after)
    p.add_argument("--backoff-ms", type=int, default=d.backoff_ms)
    p.add_argument("--backoff-cap-ms", type=int, default=d.backoff_cap_ms)
    p.add_argument("--jitter-ms", type=int, default=d.jitter_ms)
    p.add_argument("--attempts", type=int, default=d.attempts)
    p.add_argument("--connect-batch", type=int, default=d.connect_batch)
    p.add_argument("--conn-timeout-ms", type=int, default=d.conn_timeout_ms)
    p.add_argument("--storm-max", type=float, default=d.storm_max_s, dest="storm_max_s")
    p.add_argument("--observers", type=int, default=d.observers, help="per workspace")
    p.add_argument("--chat-nodes", type=int, default=d.n_chat, dest="n_chat")
    p.add_argument("--flannel-nodes", type=int, default=d.n_flannel, dest="n_flannel")
    p.add_argument("--out", type=Path, help="JSON path (the PNG beside it)")
    p.add_argument("--cluster-dir", type=Path, help="keep the cluster's files (logs) here")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=sys.stdout.isatty())
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    ns = p.parse_args(argv)
    opts = Options(**vars(ns))
    if opts.clients < 1 or opts.procs < 1 or opts.workspaces < 1 or opts.rate <= 0:
        p.error("--clients, --procs, --workspaces and --rate must be positive")
    return opts


async def amain(opts: Options) -> dict[str, Any]:
    run = Run(opts)
    return await run_with_display(run)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    r = asyncio.run(amain(opts))
    path, png = write(r, opts.out, opts.plot)
    print_table(r)
    print(f"results: {path}" + (f", plot: {png}" if png else ""))
    d = r.get("delivery", {})
    ok = r.get("live_again") == opts.clients and d.get("lost") == 0 and d.get("duplicated") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
