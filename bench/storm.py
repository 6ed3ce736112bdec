"""Reconnect-storm benchmark: ``python -m bench.storm`` (issue 7).

Two scenarios (``--scenario``):

**cold** (default): N clients (``--clients``, default 2,000) open a websocket to one ``chat
serve`` and send ``auth`` all at once (``wsblast --storm --batch 0``: every connect() is
issued at once, no client-side limit on handshakes in flight). Each attempt gives up after
``--timeout`` seconds (default 10) from its connect(); by default with no retry
(``--attempts 1``). Failures are counted by kind (timeout, upgrade refused with its HTTP
status, error frame, server close with its close code, socket error); retry hints (an HTTP
503 with ``reconnect_after_ms``, a ``goodbye`` before a 1013 close) are followed (the hint
plus up to as much jitter) and counted apart: a hint uses no attempt.

**kill**: two nodes A and B (PostgreSQL + Redis: ``--store postgres --redis``, implied).
All N clients connect to A (paced, ``--connect-batch`` in flight) and go live; a poster
(users[0], an asyncio client in this process) connected to B posts ``--post-rate``
messages/s into the channel every client is in; after ``--post-before`` s, A is SIGKILLed.
Every client reconnects to B (``wsblast --failover-port``) after uniform(0, ``--jitter-ms``)
ms (0: all at once) and resumes (``auth`` with ``resume``: its session and the last durable
``seq`` it saw; live again at the ``resumed`` frame). Measured from the kill: time until all
are live again, p50/p99 per client, hints, timeouts and other failures (each failed attempt
backs off exponentially with full jitter, as the client library does; a hint does not grow
the backoff); PostgreSQL statements per client (``pg_stat_statements``, reset right before
the kill) and Redis commands per client (``INFO commandstats`` delta), both also net of the
background rate (poster, idle nodes) measured over the ``--post-before`` window; node B's
CPU. Then the poster goes on for ``--post-after`` s and stops, deliveries settle, and every
client live at the end must hold exactly the number of messages the poster stored in
PostgreSQL (it started after all clients were live and stopped before the count): fewer is
lost, a durable ``seq`` seen twice on a connection is a duplicate.

Both: ``--procs K`` wsblast processes share the clients (10,000 clients need two: the
file-descriptor limit is 20,000); they start together (``--go``). Nodes, PostgreSQL and
Redis run on CPU 0; wsblast, the poster and this harness on CPU 1 (``--no-pin``: off).
The store is seeded with N+1 users (``chat admin seed``); users[0] warms every node up
(one connect + auth) and posts, users[1..N] are the clients.

Before/after in one run: ``--chat-src [LABEL=]DIR`` (repeatable) runs seed and nodes from
another checkout (``PYTHONPATH=DIR``, ``PYTHONSAFEPATH=1``, same venv), each on a fresh
store, one after the other; the table has a column per source. Without it, the working
tree runs. E.g. ``git worktree add /work/before e1563d2`` and ``git worktree add
/work/after HEAD``, then ``--chat-src before=/work/before --chat-src after=/work/after``.

Everything started here is stopped by PID, also on errors, Ctrl-C and SIGTERM; every wait is
bounded (``--storm-max`` per storm, wsblast's own ``--max-seconds``).

Results: ``bench/results/storm-<date>.json``; a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.fanout import (
    AUTH_ID,
    CLIENT_CPU,
    REPO,
    RESULTS,
    SERVER_CPU,
    WSBLAST,
    BenchError,
    Proc,
    _pg_settings,
    _terminate,
    build_wsblast,
    cpu_seconds,
    free_port,
    machine_info,
    on_cpu,
    process_tree,
    rss_bytes,
    wait_ready,
    write_results,
)
from bench.infra import NODE_ENV, cpu_busy, cpu_times, run_seed, source_state

if TYPE_CHECKING:
    from tests.cluster import TempRedis
    from tests.pg import TempPostgres

SECRET = "storm-bench-secret-not-for-production"
DB = "storm"
PG_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.track_utility": "on",
    "pg_stat_statements.max": "5000",
    # Two nodes' pools (CHAT_DB_POOL_MAX_SIZE, default 20) plus our own connections.
    "max_connections": "200",
}
# PostgreSQL >= 15 flushes a backend's pending statistics (pg_stat_database) at most once a
# second while busy, and within 10 s once idle: xact_commit is read this long after the storm.
PG_STATS_FLUSH_S = 11.0
FAIL_MATCH = '"type":"error"'  # a frame before the auth reply that fails the attempt
PING = '{"type":"ping","id":"hb"}'
# Redis commands that are ours (reading the counters), not the nodes'.
OWN_REDIS_COMMANDS = {"info", "config|resetstat", "config", "ping", "client|setinfo"}


# --------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where the chat code comes from: the working tree (``path`` None) or another checkout,
    run with ``PYTHONPATH=path`` and ``PYTHONSAFEPATH=1`` (so the working directory, this
    repository, is not searched first)."""

    label: str
    path: Path | None

    @classmethod
    def parse(cls, text: str) -> Source:
        label, sep, path = text.partition("=")
        if not sep:
            label, path = Path(text).name or text, text
        p = Path(path).resolve()
        if not (p / "chat" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"{p} has no chat/ package")
        return cls(label, p)

    def env(self) -> dict[str, str]:
        if self.path is None:
            return {}
        return {"PYTHONPATH": str(self.path), "PYTHONSAFEPATH": "1"}

    def state(self) -> dict[str, Any]:
        """The checkout's commit and any uncommitted change under chat/."""
        if self.path is None:
            return {"path": str(REPO), **source_state()}
        try:
            rev = subprocess.run(
                ["git", "-C", str(self.path), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(self.path), "status", "--porcelain", "--", "chat"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return {"path": str(self.path)}
        return {"path": str(self.path), "git_rev": rev or None, "chat_uncommitted": dirty}


# ----------------------------------------------------------------------------------- /proc


def vm_hwm(pid: int) -> int | None:
    """Peak RSS (VmHWM) of one process, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def net_counters() -> dict[str, int]:
    """Machine-wide TCP counters that show a storm at the kernel: listen-queue overflows and
    drops, retransmitted segments (SYN retries included), resets."""
    out: dict[str, int] = {}
    wanted = {
        ("TcpExt", "ListenOverflows"),
        ("TcpExt", "ListenDrops"),
        ("TcpExt", "TCPReqQFullDrop"),
        ("TcpExt", "TCPReqQFullDoCookies"),
        ("TcpExt", "TCPTimeouts"),
        ("Tcp", "RetransSegs"),
        ("Tcp", "EstabResets"),
        ("Tcp", "AttemptFails"),
    }
    for name in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            continue
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            keys, nums = head.split(), vals.split()
            if not keys or keys[0] != nums[0]:
                continue
            prefix = keys[0].rstrip(":")
            for k, v in zip(keys[1:], nums[1:], strict=False):
                if (prefix, k) in wanted:
                    with contextlib.suppress(ValueError):
                        out[k] = int(v)
    return out


def all_cpu_ticks() -> dict[int, int]:
    """utime + stime (clock ticks) of every user process on the machine (kernel threads,
    such as ksoftirqd doing our loopback traffic, are left out)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != "2":
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[1] != "2":
                    out[int(entry.name)] = int(fields[11]) + int(fields[12])
    return out


def foreign_cpu_s(before: dict[int, int], ours: set[int]) -> float:
    """CPU seconds used since ``before`` by processes that are not ours (another engineer's
    tests or benchmark on the same machine skew every figure)."""
    ticks = os.sysconf("SC_CLK_TCK")
    after = all_cpu_ticks()
    used = sum(t - before.get(pid, 0) for pid, t in after.items() if pid not in ours)
    return round(max(used, 0) / ticks, 2)


class Sampler(threading.Thread):
    """Samples the node's RSS and CPU every ``period`` s until stopped (bounded by
    ``max_s``): the peak RSS during the storm, and a CPU timeline."""

    def __init__(self, pid: int, period: float = 0.1, max_s: float = 600.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.max_s = pid, period, max_s
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, float, int]] = []  # (t, cpu_s, rss)

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() - self.t0 < self.max_s:
            self.samples.append(
                (time.monotonic() - self.t0, cpu_seconds(self.pid), rss_bytes(self.pid))
            )
            self.stop_event.wait(self.period)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)

    @property
    def peak_rss(self) -> int:
        return max((s[2] for s in self.samples), default=0)

    def timeline(self, step: float = 1.0) -> list[dict[str, float]]:
        """Node CPU (cores) and RSS (MiB) per ``step`` seconds."""
        out, last = [], None
        for t, cpu, rss in self.samples:
            if last is None or t - last[0] >= step - 1e-6:
                if last is not None:
                    out.append(
                        {
                            "t_s": round(t, 1),
                            "cpu_cores": round((cpu - last[1]) / (t - last[0]), 2),
                            "rss_mib": round(rss / 2**20, 1),
                        }
                    )
                last = (t, cpu, rss)
        return out


# ------------------------------------------------------------------------------ PostgreSQL


async def _pg_exec(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _pg_counts(admin_dsn: str, db: str, statements: bool, top: int = 0) -> dict[str, Any]:
    """Counters of database ``db``, read from the maintenance database (so our own queries
    are not counted): transactions, and pg_stat_statements calls (with the top statements)."""
    import asyncpg

    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback, oid AS dbid FROM pg_stat_database "
            "JOIN pg_database USING (datname) WHERE datname = $1",
            db,
        )
        assert row is not None
        out: dict[str, Any] = {"xacts": int(row["xact_commit"]) + int(row["xact_rollback"])}
        out["backends"] = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", db
        )
        if statements:
            out["statements"] = int(
                await conn.fetchval(
                    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = $1",
                    row["dbid"],
                )
            )
            if top:
                rows = await conn.fetch(
                    "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query "
                    "FROM pg_stat_statements WHERE dbid = $1 ORDER BY calls DESC LIMIT $2",
                    row["dbid"],
                    top,
                )
                out["top_statements"] = [{"calls": r["calls"], "query": r["query"]} for r in rows]
        return out
    finally:
        await conn.close()


async def _pg_statements(admin_dsn: str, db: str, top: int = 0) -> dict[str, Any]:
    """pg_stat_statements of database ``db`` (read from the maintenance database, so our own
    queries are not counted): total calls and the ``top`` most called statements."""
    import asyncpg

    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        dbid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = $1", db)
        total = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = $1", dbid
        )
        out: dict[str, Any] = {"statements": int(total)}
        if top:
            rows = await conn.fetch(
                "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query "
                "FROM pg_stat_statements WHERE dbid = $1 ORDER BY calls DESC LIMIT $2",
                dbid,
                top,
            )
            out["top_statements"] = [{"calls": r["calls"], "query": r["query"]} for r in rows]
        return out
    finally:
        await conn.close()


async def _pg_count_posted(dsn: str, channel_id: int, user_id: int) -> int:
    """Messages stored in the channel by the poster: what every client must have received."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE channel_id = $1 AND user_id = $2",
            channel_id,
            user_id,
        )
        return int(n)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------- poster


class Poster(threading.Thread):
    """users[0] posting ``rate`` messages/s into the channel (a fixed schedule, not waiting
    for replies) until :meth:`stop` or ``max_s``; its own asyncio loop in a thread of the
    harness (CPU 1). PostgreSQL, not this count, is the truth for the delivery check."""

    def __init__(self, url: str, token: str, channel_id: int, rate: float, max_s: float):
        super().__init__(name="poster", daemon=True)
        self.url, self.token, self.channel_id = url, token, channel_id
        self.rate, self.max_s = rate, max_s
        self.run_id = uuid.uuid4().hex[:8]
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.sent = self.acked = self.errors = 0
        self.error: str | None = None
        self.error_sample: str | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.ready.set()  # never leave a waiter hanging

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "error": self.error,
            "error_sample": self.error_sample,
        }

    async def _main(self) -> None:
        from websockets.asyncio.client import ClientConnection, connect

        async def read(ws: ClientConnection) -> None:
            async for raw in ws:
                frame = json.loads(raw)
                rid = frame.get("reply_to")
                if isinstance(rid, str) and rid.startswith("p"):
                    if frame.get("type") == "reply":
                        self.acked += 1
                    else:
                        self.errors += 1
                        self.error_sample = self.error_sample or str(raw)[:300]

        async with asyncio.timeout(self.max_s + 90):
            async with connect(self.url, compression=None, max_size=None, open_timeout=30) as ws:
                hello = json.loads(await ws.recv())
                if hello.get("type") != "hello":
                    raise BenchError(f"poster: expected hello, got {hello!r}"[:300])
                auth = {"type": "auth", "id": "poster-auth", "token": self.token}
                await ws.send(json.dumps(auth))
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("reply_to") == "poster-auth":
                        if frame.get("type") != "reply":
                            raise BenchError(f"poster: auth refused: {frame!r}"[:300])
                        break
                self.ready.set()
                reader = asyncio.create_task(read(ws))
                start, i = time.monotonic(), 0
                while not self.stopping.is_set() and time.monotonic() - start < self.max_s:
                    delay = start + i / self.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(min(delay, 0.1))
                        continue
                    post = {
                        "type": "messages.post",
                        "id": f"p{i}",
                        "channel_id": self.channel_id,
                        "client_msg_id": f"{self.run_id}-{i}",
                        "text": f"storm {i}",
                    }
                    await ws.send(json.dumps(post, separators=(",", ":")))
                    self.sent += 1
                    i += 1
                deadline = time.monotonic() + 15  # the replies still on their way
                while self.acked + self.errors < self.sent and time.monotonic() < deadline:
                    if reader.done():
                        break
                    await asyncio.sleep(0.05)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader


# ------------------------------------------------------------------------- wsblast reports


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-quantile as wsblast computes it (the ceil(q*n)-th smallest)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s) - 1e-9) - 1))]


STORM_SUMS = (
    "conns ok failed unfinished not_lost out_before live_now connects retries max_inflight "
    "upgraded conn_errors timeouts refused error_frames server_closed hints hint_wait_ms "
    "goodbyes resumed replayed switched lost"
).split()
STORM_DICTS = ("hint_kinds", "resume_errors", "close_codes", "http_status")


def merge_storm(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One STORM report from those of the K wsblast processes of a round: counts summed,
    percentiles over every client, times from the earliest process's start (round 0) or
    from the MARK (later rounds: the same instant for all)."""
    out: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in reports) for k in STORM_SUMS}
    for key in STORM_DICTS:
        merged: dict[str, int] = {}
        for r in reports:
            for k, v in r.get(key, {}).items():
                merged[k] = merged.get(k, 0) + int(v)
        out[key] = merged
    t0 = min(int(r["t0_ns"]) for r in reports)
    ready = [x for r in reports for x in r.get("ready_ms", [])]
    hs = [x for r in reports for x in r.get("handshake_ms", [])]
    last_ns = max(int(r["last_ready_ns"]) for r in reports)
    out |= {
        "round": reports[0]["round"],
        "procs": len(reports),
        "attempts": reports[0]["attempts"],
        "t0_ns": t0,
        "last_ready_ms": round((last_ns - t0) / 1e6, 1) if ready else None,
        "settled_ms": round(
            max(float(r["settled_ms"]) + (int(r["t0_ns"]) - t0) / 1e6 for r in reports), 1
        ),
        "ready_p50_ms": pct(ready, 0.5),
        "ready_p90_ms": pct(ready, 0.9),
        "ready_p99_ms": pct(ready, 0.99),
        "ready_max_ms": pct(ready, 1.0),
        "handshake_p50_ms": pct(hs, 0.5),
        "handshake_p99_ms": pct(hs, 0.99),
        "handshake_max_ms": pct(hs, 1.0),
        "cpu_s": round(sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in reports), 3),
        "per_proc": [
            {k: v for k, v in r.items() if k not in ("ready_ms", "handshake_ms")} for r in reports
        ],
    }
    return out


def merge_counts(reports: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "conns live posted dups conns_exact conns_short short_sum conns_over over_sum "
        "conns_with_dups not_live not_live_posted not_live_dups"
    ).split()
    out: dict[str, Any] = {k: sum(int(r[k]) for r in reports) for k in keys}
    live = [r for r in reports if r["live"]]
    out["expected"] = reports[0]["expected"]
    out["min_posted"] = min((r["min_posted"] for r in live), default=None)
    out["max_posted"] = max((r["max_posted"] for r in live), default=None)
    return out


def redis_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Calls per command between two INFO commandstats readings, without our own."""
    out = {k: v - before.get(k, 0) for k, v in after.items() if k not in OWN_REDIS_COMMANDS}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v}


# ----------------------------------------------------------------------------------- storm


class Storm:
    """One run of one scenario against one source: the store (and Redis), the seed, the
    node(s), the warm-up, the storm."""

    def __init__(self, args: argparse.Namespace, workdir: Path, source: Source) -> None:
        self.args = args
        self.dir = workdir
        self.source = source
        self.pin = args.pin
        self.pg: TempPostgres | None = None
        self.redis: TempRedis | None = None
        self.procs: list[Proc] = []
        self.statements = False  # pg_stat_statements available
        self.store_info: dict[str, Any] = {"store": args.store}

    # -- processes ------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], cpu: int, **kw: Any) -> Proc:
        proc = Proc(name, argv, log=self.dir / f"{name}.log", cpu=cpu if self.pin else None, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop everything we started, by PID (clients first, PostgreSQL last)."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        redis, self.redis = self.redis, None
        if redis is not None:
            try:
                redis.close()
            except Exception as exc:  # in a finally: don't hide the run's own error
                print(f"# storm: stopping Redis: {exc}", file=sys.stderr)
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.stop()
            except Exception as exc:
                print(f"# storm: stopping PostgreSQL: {exc}", file=sys.stderr)
            else:
                print("# storm: PostgreSQL stopped", flush=True)

    def env(self, node: str = "") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env.pop("PYTHONPATH", None)
        env.update(self.source.env())
        if self.pg is not None:
            env["CHAT_DATABASE_URL"] = self.pg.dsn_for(DB)
        else:
            env["CHAT_SQLITE_PATH"] = str(self.dir / "chat.sqlite3")
        if self.redis is not None:
            env["CHAT_REDIS_URL"] = self.redis.url
        env.update(
            CHAT_RATE_LIMIT_PER_10S="100000",
            CHAT_LOG_LEVEL="warning",
            CHAT_SECRET_KEY=SECRET,
        )
        if node:
            env.update(NODE_ENV)
            env["CHAT_NODE_ID"] = node
        for item in self.args.chat_env:
            key, _, value = item.partition("=")
            env[key] = value
        return env

    # -- store ----------------------------------------------------------------------------

    def start_store(self) -> None:
        cpu = SERVER_CPU if self.pin else None
        if self.args.store == "postgres":
            from tests.pg import PostgresError, TempPostgres

            t0 = time.monotonic()
            try:
                self.pg = TempPostgres(startup_timeout=60, extra_settings=PG_SETTINGS)
                with on_cpu(cpu):
                    self.pg.start()
                self.statements = True
            except PostgresError as exc:
                print(f"# storm: PostgreSQL with pg_stat_statements failed ({exc}); without")
                settings = {k: v for k, v in PG_SETTINGS.items() if "stat_statements" not in k}
                self.pg = TempPostgres(startup_timeout=60, extra_settings=settings)
                with on_cpu(cpu):
                    self.pg.start()
            if self.statements:
                try:
                    asyncio.run(_pg_exec(self.pg.dsn, "CREATE EXTENSION pg_stat_statements"))
                except Exception as exc:
                    print(f"# storm: no pg_stat_statements ({exc}): transactions only")
                    self.statements = False
            self.pg.create_database(DB)
            info = asyncio.run(_pg_settings(self.pg.dsn))
            info |= {
                "store": "postgres",
                "cpu": cpu,
                "directory": str(self.pg.directory),
                "pg_stat_statements": self.statements,
            }
            self.store_info = info
            print(
                f"# storm: PostgreSQL {info.get('server_version')} on 127.0.0.1:{self.pg.port}"
                f" (CPU {cpu}), pg_stat_statements={'on' if self.statements else 'off'}, "
                f"up in {time.monotonic() - t0:.1f}s",
                flush=True,
            )
        if self.args.redis:
            from tests.cluster import TempRedis

            self.redis = TempRedis()
            with on_cpu(cpu):
                self.redis.start()
            self.store_info["redis"] = {"url": self.redis.url, "cpu": cpu}
            print(f"# storm: Redis on {self.redis.url} (CPU {cpu})", flush=True)

    def postmaster_pid(self) -> int | None:
        return self.pg.postmaster_pid if self.pg is not None else None

    def our_pids(self) -> set[int]:
        """This harness and everything it started (PostgreSQL and Redis included)."""
        roots = [os.getpid()]
        pm = self.postmaster_pid()
        if pm is not None:
            roots.append(pm)
        if self.redis is not None and self.redis.pid is not None:
            roots.append(self.redis.pid)
        return {p for root in roots for p in process_tree(root)}

    def _redis_info(self, section: str) -> dict[str, Any]:
        import redis

        assert self.redis is not None
        client = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=10)
        try:
            return dict(client.info(section))
        finally:
            client.close()

    def redis_commands(self) -> int | None:
        if self.redis is None:
            return None
        return int(self._redis_info("stats")["total_commands_processed"])

    def redis_commandstats(self) -> dict[str, int]:
        """Calls per command so far (INFO commandstats)."""
        if self.redis is None:
            return {}
        out = {}
        for key, value in self._redis_info("commandstats").items():
            name = key.removeprefix("cmdstat_")
            if isinstance(value, dict) and "calls" in value:
                out[name] = int(value["calls"])
        return out

    def pg_counts(self, top: int = 0) -> dict[str, Any] | None:
        if self.pg is None:
            return None
        return asyncio.run(_pg_counts(self.pg.dsn, DB, self.statements, top))

    def pg_reset(self) -> None:
        if self.pg is not None and self.statements:
            asyncio.run(_pg_exec(self.pg.dsn, "SELECT pg_stat_statements_reset()"))

    def pg_statements(self, top: int = 0) -> dict[str, Any] | None:
        if self.pg is None or not self.statements:
            return None
        return asyncio.run(_pg_statements(self.pg.dsn, DB, top))

    # -- pieces ---------------------------------------------------------------------------

    def seed(self, users: int) -> dict[str, Any]:
        argv = [self.args.python, "-m", "chat", "admin", "seed", "--workspace", "storm"]
        argv += ["--users", str(users), "--channels", str(self.args.channels)]
        t0 = time.monotonic()
        seed = run_seed(argv, self.env(), timeout=900)
        if len(seed["users"]) < users:
            raise BenchError(f"seed gave {len(seed['users'])} users, wanted {users}")
        print(f"# storm: seeded {users} users in {time.monotonic() - t0:.1f}s", flush=True)
        return seed

    def start_node(self, name: str, port: int, node_id: str = "") -> tuple[Proc, float]:
        argv = [self.args.python, "-m", "chat", "serve", "--host", "127.0.0.1", "--port", str(port)]
        node = self.start(name, argv, SERVER_CPU, env=self.env(node_id), pipes=False)
        return node, wait_ready(node, port, self.args.start_timeout)

    def blast_argv(self, port: int, n: int, auth: Path) -> list[str]:
        argv = [str(WSBLAST), "--port", str(port), "--path", "/", "--conns", str(n)]
        argv += ["--auth-file", str(auth), "--ready-frames", "1", "--ready-match", AUTH_ID]
        argv += ["--fail-match", FAIL_MATCH]
        return argv

    def warm_up(self, port: int, line: str, name: str) -> None:
        """One connect + auth (users[0]), so one-time costs stay out of the storm."""
        path = self.dir / f"{name}.txt"
        path.write_text(line + "\n")
        argv = [*self.blast_argv(port, 1, path), "--expect-per-conn", "0"]
        argv += ["--connect-timeout-ms", "30000", "--max-seconds", "60"]
        warm = self.start(name, argv, CLIENT_CPU)
        warm.expect("READY", 40)
        warm.expect("RESULT", 10)
        warm.stop()

    def start_blasts(self, port: int, lines: list[str], extra: list[str]) -> list[Proc]:
        """``--procs`` wsblast processes in storm mode, the clients split evenly; each waits
        for GO (:meth:`go`)."""
        k = min(self.args.procs, len(lines))
        blasts = []
        for i in range(k):
            part = lines[i * len(lines) // k : (i + 1) * len(lines) // k]
            path = self.dir / f"auth-{i}.txt"
            path.write_text("".join(line + "\n" for line in part))
            argv = [*self.blast_argv(port, len(part), path), "--storm", "--go", *extra]
            if self.args.heartbeat_ms:
                argv += ["--heartbeat-ms", str(self.args.heartbeat_ms), "--heartbeat-text", PING]
            blasts.append(self.start(f"wsblast-{i}", argv, CLIENT_CPU))
        for b in blasts:
            b.expect("WAITING", 60)
        return blasts

    @staticmethod
    def go(blasts: list[Proc]) -> None:
        for b in blasts:
            b.send("GO")

    @staticmethod
    def collect(blasts: list[Proc], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        return merge_storm(
            [b.expect_json("STORM", max(1.0, deadline - time.monotonic())) for b in blasts]
        )

    def wsblast_common(self) -> list[str]:
        a = self.args
        argv = ["--conn-timeout-ms", str(int(a.timeout * 1000))]
        argv += ["--storm-max-ms", str(int(a.storm_max * 1000))]
        argv += ["--backoff-ms", str(a.backoff_ms), "--backoff-cap-ms", str(a.backoff_cap_ms)]
        lifetime = 3 * a.storm_max + a.post_before + a.post_after + a.settle_max
        argv += ["--max-seconds", str(int(lifetime + a.idle_timeout + 300))]
        return argv

    def auth_lines(self, seed: dict[str, Any]) -> list[str]:
        return [
            json.dumps({"type": "auth", "id": AUTH_ID, "token": u["token"]}, separators=(",", ":"))
            for u in seed["users"][: self.args.clients + 1]
        ]

    # -- run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.start_store()
        seed = self.seed(self.args.clients + 1)
        if self.args.scenario == "kill":
            return self.run_kill(seed)
        return self.run_cold(seed)

    def run_cold(self, seed: dict[str, Any]) -> dict[str, Any]:
        args, n = self.args, self.args.clients
        lines = self.auth_lines(seed)
        port = free_port()
        server, startup_s = self.start_node("server", port)
        self.warm_up(port, lines[0], "warmup")
        extra = ["--attempts", str(args.attempts), "--batch", str(args.max_inflight)]
        blasts = self.start_blasts(port, lines[1:], extra + self.wsblast_common())
        time.sleep(args.settle)

        log_offset = server.log.stat().st_size
        rss0, hwm0 = rss_bytes(server.pid), vm_hwm(server.pid)
        pm = self.postmaster_pid()
        self.pg_reset()
        pg0 = self.pg_counts()
        redis0 = self.redis_commands()
        redis_by0 = self.redis_commandstats()
        net0, cpus0 = net_counters(), cpu_times()
        pg_cpu0 = cpu_seconds(pm) if pm is not None else None
        redis_pid = self.redis.pid if self.redis is not None else None
        redis_cpu0 = cpu_seconds(redis_pid) if redis_pid is not None else None

        sampler = Sampler(server.pid, max_s=args.storm_max + args.idle_timeout + 120)
        others0 = all_cpu_ticks()
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        sampler.start()
        try:
            print(
                f"# storm: {n} clients at once in {len(blasts)} wsblast "
                f"(timeout {args.timeout:g} s, {args.attempts} attempt(s))",
                flush=True,
            )
            self.go(blasts)
            storm = self.collect(blasts, args.storm_max + 60)
            settled_wall = time.monotonic() - t0
            cpu_settled = cpu_seconds(server.pid) - cpu0
            pg_cpu_settled = (
                cpu_seconds(pm) - pg_cpu0 if pm is not None and pg_cpu0 is not None else None
            )
            cpus1 = cpu_times()
            foreign = foreign_cpu_s(others0, self.our_pids())
            print(
                f"#   {storm['ok']}/{n} authenticated, last at {_ms(storm['last_ready_ms'])}, "
                f"p50/p99 {_ms(storm['ready_p50_ms'])}/{_ms(storm['ready_p99_ms'])}, "
                f"{storm['failed']} failed ({storm['timeouts']} timeouts), "
                f"{storm['hints']} hints; node CPU {cpu_settled:.2f} s",
                flush=True,
            )
            # The node may go on working for clients that gave up: CPU until it is idle.
            idle_wall, prev, prev_t = None, cpu_seconds(server.pid), time.monotonic()
            while time.monotonic() - t0 < settled_wall + args.idle_timeout:
                time.sleep(0.5)
                cur, cur_t = cpu_seconds(server.pid), time.monotonic()
                if (cur - prev) / (cur_t - prev_t) < 0.05:
                    idle_wall = prev_t - t0
                    break
                prev, prev_t = cur, cur_t
            cpu_idle = cpu_seconds(server.pid) - cpu0
        finally:
            sampler.stop()
        rss1, hwm1 = rss_bytes(server.pid), vm_hwm(server.pid)
        pg_cpu_idle = cpu_seconds(pm) - pg_cpu0 if pm is not None and pg_cpu0 is not None else None
        redis_cpu = (
            cpu_seconds(redis_pid) - redis_cpu0
            if redis_pid is not None and redis_cpu0 is not None
            else None
        )
        net1 = net_counters()
        redis1 = self.redis_commands()
        redis_by = redis_delta(self.redis_commandstats(), redis_by0)
        if self.pg is not None:
            wait = PG_STATS_FLUSH_S - (time.monotonic() - t0 - settled_wall)
            if wait > 0:
                print(f"#   waiting {wait:.0f} s for PostgreSQL's statistics", flush=True)
                time.sleep(wait)
        pg1 = self.pg_counts(top=25)
        for b in blasts:
            b.send("QUIT")
        for b in blasts:
            with contextlib.suppress(subprocess.TimeoutExpired):
                b.popen.wait(10)

        log_lines = server.log.read_bytes()[log_offset:].decode(errors="replace").splitlines()
        result: dict[str, Any] = {
            "scenario": "cold",
            "clients": n,
            "port": port,
            "server_startup_s": round(startup_s, 3),
            "wsblast": storm,
            "ok": storm["ok"],
            "failed": storm["failed"],
            "timeouts": storm["timeouts"],
            "hints": storm["hints"],
            "last_auth_s": _s(storm["last_ready_ms"]),
            "settled_s": _s(storm["settled_ms"]),
            "auth_p50_s": _s(storm["ready_p50_ms"]),
            "auth_p99_s": _s(storm["ready_p99_ms"]),
            "handshake_p50_s": _s(storm["handshake_p50_ms"]),
            "handshake_p99_s": _s(storm["handshake_p99_ms"]),
            "server_cpu_s_settled": round(cpu_settled, 3),
            "server_cpu_util_settled": round(cpu_settled / max(settled_wall, 1e-9), 3),
            "server_cpu_s_to_idle": round(cpu_idle, 3),
            "server_idle_after_s": round(idle_wall, 2) if idle_wall is not None else None,
            "server_rss_before": rss0,
            "server_rss_after": rss1,
            "server_rss_peak_sampled": sampler.peak_rss,
            "server_vmhwm_before": hwm0,
            "server_vmhwm_after": hwm1,
            "server_timeline": sampler.timeline(),
            "postgres_cpu_s_settled": _round(pg_cpu_settled),
            "postgres_cpu_s_to_idle": _round(pg_cpu_idle),
            "redis_cpu_s_to_idle": _round(redis_cpu),
            "cpu_busy_settled": cpu_busy(cpus0, cpus1),
            "foreign_cpu_s": foreign,
            "net": {k: net1.get(k, 0) - v for k, v in net0.items()},
            "server_log_lines": len(log_lines),
            "server_log_sample": sorted({ln[:300] for ln in log_lines})[:10],
        }
        if pg0 is not None and pg1 is not None:
            xacts = pg1["xacts"] - pg0["xacts"]
            result["postgres"] = {
                "xacts": xacts,
                "xacts_per_client": round(xacts / n, 2),
                "backends_after": pg1["backends"],
                "statements_counted_by": "pg_stat_statements" if self.statements else None,
            }
            if self.statements:
                result["postgres"] |= {
                    "statements": pg1["statements"],
                    "statements_per_client": round(pg1["statements"] / n, 2),
                    "top_statements": pg1.get("top_statements", []),
                }
        if redis0 is not None and redis1 is not None:
            # Our own INFO call is one command: not the node's.
            cmds = redis1 - redis0 - 1
            result["redis"] = {
                "commands": cmds,
                "commands_per_client": round(cmds / n, 2),
                "by_command": redis_by,
            }
        return result

    def run_kill(self, seed: dict[str, Any]) -> dict[str, Any]:
        args, n = self.args, self.args.clients
        assert self.pg is not None and self.redis is not None
        lines = self.auth_lines(seed)
        channel_id = int(seed["channels"][0]["id"])
        poster_user = seed["users"][0]
        port_a = free_port()
        port_b = free_port()
        while port_b == port_a:
            port_b = free_port()
        node_a, start_a = self.start_node("node-a", port_a, "a")
        node_b, start_b = self.start_node("node-b", port_b, "b")
        self.warm_up(port_a, lines[0], "warm-a")
        self.warm_up(port_b, lines[0], "warm-b")

        # 1. every client live on A (paced: --connect-batch handshakes in flight)
        extra = ["--attempts", str(args.attempts), "--batch", str(args.connect_batch)]
        extra += ["--resume", "--failover-port", str(port_b), "--jitter-ms", str(args.jitter_ms)]
        blasts = self.start_blasts(port_a, lines[1:], extra + self.wsblast_common())
        t0 = time.monotonic()
        self.go(blasts)
        initial = self.collect(blasts, args.storm_max + 60)
        print(
            f"# storm: {initial['ok']}/{n} clients live on node A in "
            f"{time.monotonic() - t0:.1f} s ({args.connect_batch} in flight)",
            flush=True,
        )
        if initial["ok"] < n:
            raise BenchError(f"only {initial['ok']} of {n} clients went live on node A")
        time.sleep(args.settle)

        # 2. the poster (on B), and the background rate of statements and commands
        poster = Poster(
            f"ws://127.0.0.1:{port_b}/",
            str(poster_user["token"]),
            channel_id,
            args.post_rate,
            args.post_before + args.storm_max + args.post_after + 120,
        )
        poster.start()
        if not poster.ready.wait(60) or poster.error:
            raise BenchError(f"poster did not start: {poster.error}")
        self.pg_reset()
        redis_bg0, t_bg = self.redis_commandstats(), time.monotonic()
        time.sleep(args.post_before)
        bg_pg = self.pg_statements(top=10)
        bg_redis = redis_delta(self.redis_commandstats(), redis_bg0)
        bg_s = time.monotonic() - t_bg

        # 3. the kill, right after resetting the counters
        self.pg_reset()
        redis0 = self.redis_commandstats()
        net0, cpus0 = net_counters(), cpu_times()
        pm, redis_pid = self.postmaster_pid(), self.redis.pid
        pg_cpu0 = cpu_seconds(pm) if pm is not None else 0.0
        redis_cpu0 = cpu_seconds(redis_pid) if redis_pid is not None else 0.0
        b_cpu0, rss_b0 = cpu_seconds(node_b.pid), rss_bytes(node_b.pid)
        log_offset = node_b.log.stat().st_size
        sampler = Sampler(node_b.pid, max_s=args.storm_max + 120)
        others0 = all_cpu_ticks()
        sampler.start()
        try:
            kill_ns = time.monotonic_ns()
            for b in blasts:
                b.send(f"MARK {kill_ns}")
            for b in blasts:
                b.expect("MARKED", 10)
            os.kill(node_a.pid, signal.SIGKILL)
            node_a.popen.wait(10)
            t_kill = time.monotonic()
            posted_at_kill = poster.sent
            print(
                f"# storm: node A killed; {n} clients reconnect to B (jitter {args.jitter_ms} ms)",
                flush=True,
            )
            storm = self.collect(blasts, args.storm_max + 60)
            storm_s = time.monotonic() - t_kill
            b_cpu = cpu_seconds(node_b.pid) - b_cpu0
            pg_cpu = cpu_seconds(pm) - pg_cpu0 if pm is not None else None
            redis_cpu = cpu_seconds(redis_pid) - redis_cpu0 if redis_pid is not None else None
            cpus1 = cpu_times()
            foreign = foreign_cpu_s(others0, self.our_pids() | {node_a.pid})
            pg_storm = self.pg_statements(top=25)
            redis_storm = redis_delta(self.redis_commandstats(), redis0)
            counted_s = time.monotonic() - t_kill
            net1 = net_counters()
        finally:
            sampler.stop()
        print(
            f"#   {storm['ok']}/{n} live again, last at {_ms(storm['last_ready_ms'])} after "
            f"the kill, p50/p99 {_ms(storm['ready_p50_ms'])}/{_ms(storm['ready_p99_ms'])}; "
            f"{storm['hints']} hints, {storm['timeouts']} timeouts, {storm['failed']} gave up, "
            f"{storm['unfinished']} unfinished; node B CPU {b_cpu:.2f} s",
            flush=True,
        )

        # 4. posts after the storm, then the delivery check against PostgreSQL
        time.sleep(args.post_after)
        poster.stop()
        if poster.is_alive():
            raise BenchError("poster did not stop")
        expected = asyncio.run(
            _pg_count_posted(self.pg.dsn_for(DB), channel_id, int(poster_user["id"]))
        )
        counts = self.settle(blasts, expected)
        print(
            f"#   delivery: {expected} messages stored; {counts['live']} live clients hold "
            f"{counts['min_posted']}..{counts['max_posted']} each; lost {counts['short_sum']}, "
            f"duplicated {counts['dups']}",
            flush=True,
        )
        rss_b1 = rss_bytes(node_b.pid)
        for b in blasts:
            b.send("QUIT")
        for b in blasts:
            with contextlib.suppress(subprocess.TimeoutExpired):
                b.popen.wait(10)
        log_lines = node_b.log.read_bytes()[log_offset:].decode(errors="replace").splitlines()

        result: dict[str, Any] = {
            "scenario": "kill",
            "clients": n,
            "jitter_ms": args.jitter_ms,
            "ports": {"a": port_a, "b": port_b},
            "node_startup_s": {"a": round(start_a, 3), "b": round(start_b, 3)},
            "initial": initial,
            "wsblast": storm,
            "ok": storm["ok"],
            "all_live": storm["ok"] == n,
            "failed": storm["failed"],
            "unfinished": storm["unfinished"],
            "timeouts": storm["timeouts"],
            "hints": storm["hints"],
            "last_live_s": _s(storm["last_ready_ms"]),
            "live_p50_s": _s(storm["ready_p50_ms"]),
            "live_p99_s": _s(storm["ready_p99_ms"]),
            "storm_wall_s": round(storm_s, 3),
            "node_b_cpu_s": round(b_cpu, 3),
            "node_b_cpu_util": round(b_cpu / max(storm_s, 1e-9), 3),
            "node_b_rss_before": rss_b0,
            "node_b_rss_peak_sampled": sampler.peak_rss,
            "node_b_rss_end": rss_b1,
            "node_b_timeline": sampler.timeline(),
            "postgres_cpu_s": _round(pg_cpu),
            "redis_cpu_s": _round(redis_cpu),
            "cpu_busy": cpu_busy(cpus0, cpus1),
            "foreign_cpu_s": foreign,
            "net": {k: net1.get(k, 0) - v for k, v in net0.items()},
            "poster": poster.stats() | {"sent_at_kill": posted_at_kill},
            "expected_messages": expected,
            "deliveries_checked": counts["posted"] + counts["dups"],
            "counts": counts,
            "lost": counts["short_sum"],
            "duplicated": counts["dups"],
            "node_b_log_lines": len(log_lines),
            "node_b_log_sample": sorted({ln[:300] for ln in log_lines})[:10],
        }
        bg: dict[str, Any] = {"window_s": round(bg_s, 3)}
        if bg_pg is not None:
            bg |= {"pg_statements": bg_pg["statements"], "pg_top": bg_pg.get("top_statements")}
        bg |= {"redis_commands": sum(bg_redis.values()), "redis_by_command": bg_redis}
        result["background"] = bg
        if pg_storm is not None:
            gross = pg_storm["statements"]
            net = gross - bg.get("pg_statements", 0) * counted_s / bg_s
            result["postgres"] = {
                "statements": gross,
                "statements_per_client": round(gross / n, 2),
                "statements_per_client_net": round(net / n, 2),
                "window_s": round(counted_s, 3),
                "top_statements": pg_storm.get("top_statements", []),
            }
        redis_total = sum(redis_storm.values())
        redis_net = redis_total - bg["redis_commands"] * counted_s / bg_s
        result["redis"] = {
            "commands": redis_total,
            "commands_per_client": round(redis_total / n, 2),
            "commands_per_client_net": round(redis_net / n, 2),
            "by_command": redis_storm,
        }
        return result

    def settle(self, blasts: list[Proc], expected: int) -> dict[str, Any]:
        """Poll the delivery counts until every live client holds ``expected`` messages or
        the counts stop moving (3 polls a second apart), at most ``--settle-max`` s."""
        deadline = time.monotonic() + self.args.settle_max
        prev, still = -1, 0
        while True:
            for b in blasts:
                b.send(f"COUNTS {expected}")
            counts = merge_counts([b.expect_json("COUNTS", 30) for b in blasts])
            if counts["conns_exact"] == counts["live"] or time.monotonic() > deadline:
                return counts
            total = counts["posted"] + counts["dups"]
            still = still + 1 if total == prev else 0
            if still >= 3:
                return counts
            prev = total
            time.sleep(1.0)


# ---------------------------------------------------------------------------------- report


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _s(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)


def _ms(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.0f} ms"


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def _kinds(w: dict[str, Any]) -> str:
    kinds = ", ".join(
        f"{w[k]:,} {k.replace('_', ' ')}"
        for k in ("timeouts", "refused", "error_frames", "server_closed", "conn_errors")
        if w.get(k)
    )
    return kinds or "none"


def _hints(w: dict[str, Any]) -> str:
    if not w["hints"]:
        return "0"
    kinds = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in w["hint_kinds"].items() if v)
    return f"{w['hints']:,} ({kinds})"


def _codes(d: dict[str, int]) -> str:
    return ", ".join(f"{c}: {k:,}" for c, k in d.items()) or "—"


def rows_cold(r: dict[str, Any]) -> list[tuple[str, str]]:
    n, w = r["clients"], r["wsblast"]
    rss_peak = max(r["server_rss_peak_sampled"], r["server_rss_after"])
    rows = [
        ("clients (all `auth` at once)", f"{n:,} in {w['procs']} wsblast"),
        ("authenticated", f"{r['ok']:,} of {n:,}"),
        ("gave up", f"{r['failed']:,}"),
        ("failed attempts by kind", _kinds(w)),
        ("retry hints followed", _hints(w)),
        ("time until the last client is authenticated",
         fmt_s(r["last_auth_s"] if r["ok"] else None)),
        ("time until every client authenticated or gave up", fmt_s(r["settled_s"])),
        ("time-to-authenticated p50 / p99 (per client, from its first connect)",
         f"{fmt_s(r['auth_p50_s'])} / {fmt_s(r['auth_p99_s'])}" if r["ok"] else "—"),
        ("time to the 101 (handshake) p50 / p99", f"{fmt_s(r['handshake_p50_s'])} / "
         f"{fmt_s(r['handshake_p99_s'])}"),
        ("node CPU until settled (s, cores)", f"{r['server_cpu_s_settled']:.2f} s "
         f"({r['server_cpu_util_settled']:.2f})"),
        ("node CPU until idle", f"{r['server_cpu_s_to_idle']:.2f} s"
         + (f" (idle {r['server_idle_after_s']:.1f} s after the start)"
            if r["server_idle_after_s"] is not None else " (not idle)")),
        ("node RSS before → peak", f"{r['server_rss_before'] / 2**20:.0f} → "
         f"{rss_peak / 2**20:.0f} MiB"),
        ("close codes before auth", _codes(w.get("close_codes", {}))),
        ("upgrades refused (HTTP status)", _codes(w.get("http_status", {}))),
    ]  # fmt: skip
    pg = r.get("postgres")
    if pg:
        if pg.get("statements") is not None:
            rows.append(
                (
                    "PostgreSQL statements per client (pg_stat_statements)",
                    f"{pg['statements_per_client']:.2f} ({pg['statements']:,})",
                )
            )
        rows.append(
            (
                "PostgreSQL transactions per client (pg_stat_database)",
                f"{pg['xacts_per_client']:.2f} ({pg['xacts']:,})",
            )
        )
        if r.get("postgres_cpu_s_to_idle") is not None:
            rows.append(("PostgreSQL CPU until idle", f"{r['postgres_cpu_s_to_idle']:.2f} s"))
    rd = r.get("redis")
    if rd:
        rows.append(("Redis commands per client", f"{rd['commands_per_client']:.2f}"))
    rows += _net_rows(r["net"])
    rows.append(("node log lines (warnings+) during the storm", f"{r['server_log_lines']:,}"))
    rows.append(("CPU used by other processes during the storm", f"{r['foreign_cpu_s']:.2f} s"))
    return rows


def rows_kill(r: dict[str, Any]) -> list[tuple[str, str]]:
    n, w, c = r["clients"], r["wsblast"], r["counts"]
    ini = r["initial"]
    rss_peak = max(r["node_b_rss_peak_sampled"], r["node_b_rss_end"])
    rows = [
        ("clients (in wsblast processes)", f"{n:,} ({w['procs']})"),
        ("reconnect jitter per client", f"uniform(0, {r['jitter_ms']:,} ms)"
         if r["jitter_ms"] else "none (all at once)"),
        ("before the kill: all live on node A after",
         fmt_s(_s(ini["last_ready_ms"]))),
        ("live again on node B (resumed)", f"{r['ok']:,} of {n:,}"),
        ("**time from the kill until all are live**",
         f"**{fmt_s(r['last_live_s'])}**" if r["all_live"] else
         f"not all: {r['unfinished']:,} unfinished after {r['storm_wall_s']:.0f} s, "
         f"{r['failed']:,} gave up"),
        ("time to live p50 / p99 (per client, from the kill)",
         f"{fmt_s(r['live_p50_s'])} / {fmt_s(r['live_p99_s'])}"),
        ("retry hints followed", _hints(w)),
        ("failed attempts by kind", _kinds(w)),
        ("resumed / resume refused", f"{w['resumed']:,} / "
         + (", ".join(f"{v:,} {k}" for k, v in w["resume_errors"].items() if v) or "0")),
        ("events replayed on resume", f"{w['replayed']:,}"),
        ("connection attempts", f"{w['connects']:,}"),
        ("close codes before live", _codes(w.get("close_codes", {}))),
        ("upgrades refused (HTTP status)", _codes(w.get("http_status", {}))),
        ("node B CPU from the kill until all live (s, cores)",
         f"{r['node_b_cpu_s']:.2f} s ({r['node_b_cpu_util']:.2f})"),
        ("node B RSS before → peak", f"{r['node_b_rss_before'] / 2**20:.0f} → "
         f"{rss_peak / 2**20:.0f} MiB"),
    ]  # fmt: skip
    pg = r.get("postgres")
    if pg:
        rows.append(
            (
                "PostgreSQL statements per client (net of the poster; gross)",
                f"{pg['statements_per_client_net']:.2f} ({pg['statements_per_client']:.2f})",
            )
        )
    rd = r["redis"]
    rows.append(
        (
            "Redis commands per client (net of the poster; gross)",
            f"{rd['commands_per_client_net']:.2f} ({rd['commands_per_client']:.2f})",
        )
    )
    if r.get("postgres_cpu_s") is not None:
        rows.append(
            ("PostgreSQL / Redis CPU until all live", f"{r['postgres_cpu_s']:.2f} s / "
             f"{(r['redis_cpu_s'] or 0):.2f} s")
        )  # fmt: skip
    p = r["poster"]
    rows += [
        ("messages posted (stored in PostgreSQL)", f"{r['expected_messages']:,} at "
         f"{p['rate']:g}/s ({p['errors']} errors)"),
        ("deliveries checked", f"{r['deliveries_checked']:,} on {c['live']:,} live clients"),
        ("**lost / duplicated messages**", f"**{r['lost']:,} / {r['duplicated']:,}**"
         + (f" ({c['conns_short']:,} clients short)" if c["conns_short"] else "")),
    ]  # fmt: skip
    rows += _net_rows(r["net"])
    rows.append(("node B log lines (warnings+) during the storm", f"{r['node_b_log_lines']:,}"))
    rows.append(("CPU used by other processes during the storm", f"{r['foreign_cpu_s']:.2f} s"))
    return rows


def _net_rows(net: dict[str, int]) -> list[tuple[str, str]]:
    return [
        (
            "listen overflows / SYN-queue drops / retransmits (kernel)",
            f"{net.get('ListenOverflows', 0):,} / {net.get('ListenDrops', 0):,} / "
            f"{net.get('RetransSegs', 0):,}",
        )
    ]


def markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One table, a column per source (before / after)."""
    info = runs[0]["store_info"]
    store = args.store + (" + Redis" if args.redis else "")
    if args.store == "postgres":
        store = f"PostgreSQL {info.get('server_version', '?')}" + (" + Redis" if args.redis else "")
    pins = f"nodes on CPU {SERVER_CPU}, clients on CPU {CLIENT_CPU}" if args.pin else "not pinned"
    ok = [r for r in runs if "error" not in r["result"]]
    if not ok:
        return "Every run failed: " + "; ".join(r["result"]["error"][:300] for r in runs)
    if args.scenario == "kill":
        head = (
            f"Node kill: {args.clients:,} clients live on node A, A SIGKILLed, clients resume "
            f"on node B ({store}); {pins}; attempt timeout {args.timeout:g} s, at most "
            f"{args.attempts} failed attempts, storm bounded at {args.storm_max:g} s."
        )
        rows = [rows_kill(r["result"]) if r in ok else [] for r in runs]
    else:
        head = (
            f"Cold storm, one node ({store}); {pins}; attempt timeout {args.timeout:g} s, "
            f"{args.attempts} attempt(s), retry hints followed."
        )
        rows = [rows_cold(r["result"]) if r in ok else [] for r in runs]
    labels = [f"{r['source']['label']} ({r['source'].get('git_rev') or '?'})" for r in runs]
    out = [head, "", "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(runs)]
    values = [dict(rs) if rs else {"run": "failed (see the JSON)"} for rs in rows]
    if len(ok) < len(runs):
        out.append("| run | " + " | ".join(v.get("run", "ok") for v in values) + " |")
    for label, _ in next(rs for rs in rows if rs):
        out.append(f"| {label} | " + " | ".join(v.get(label, "—") for v in values) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenario", choices=["cold", "kill"], default="cold")
    p.add_argument("--clients", type=int, default=2000, help="clients in the storm (N)")
    p.add_argument("--procs", type=int, default=1, help="wsblast processes (clients split evenly)")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="cold: the embedded SQLite file (default), or a throwaway PostgreSQL on the "
        "nodes' CPU; kill: always postgres",
    )
    p.add_argument("--redis", action="store_true", help="also a throwaway Redis (kill: always)")
    p.add_argument(
        "--chat-src",
        dest="sources",
        action="append",
        type=Source.parse,
        default=[],
        metavar="[LABEL=]DIR",
        help="run seed and nodes from this checkout (repeat: one column each, in order)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="per attempt (s)")
    p.add_argument(
        "--attempts",
        type=int,
        help="failed attempts a client makes before giving up (hints are not counted); "
        "default 1 (cold: no retry), 20 (kill)",
    )
    p.add_argument(
        "--storm-max",
        type=float,
        default=120.0,
        help="a storm ends after this many s: clients not live then are 'unfinished'",
    )
    p.add_argument("--backoff-ms", type=int, default=500, help="exponential backoff base")
    p.add_argument("--backoff-cap-ms", type=int, default=20000, help="exponential backoff cap")
    p.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="cold: connections in flight before authenticated (0: no limit, the storm)",
    )
    p.add_argument(
        "--jitter-ms",
        type=int,
        default=0,
        help="kill: each client waits uniform(0, J) ms before reconnecting (0: all at once)",
    )
    p.add_argument(
        "--connect-batch",
        type=int,
        default=200,
        help="kill: connections in flight while the clients first connect to node A",
    )
    p.add_argument("--post-rate", type=float, default=5.0, help="kill: poster messages/s")
    p.add_argument(
        "--post-before", type=float, default=3.0, help="kill: s of posting before the kill"
    )
    p.add_argument(
        "--post-after", type=float, default=2.0, help="kill: s of posting after all are live"
    )
    p.add_argument("--settle-max", type=float, default=30.0, help="kill: s to wait for deliveries")
    p.add_argument("--channels", type=int, default=1, help="seeded channels (all users in all)")
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=15000,
        help='live clients send {"type":"ping"} this often (0: never)',
    )
    p.add_argument(
        "--settle",
        type=float,
        help="s of calm after the warm-up (cold, default 1) or after every client went live "
        "on node A (kill, default 5: the connects' aftermath stays out of the background rate)",
    )
    p.add_argument(
        "--idle-timeout", type=float, default=30.0, help="cold: wait for the node's idle"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many s for both CPUs to be under 20%% busy",
    )
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--no-pin", dest="pin", action="store_false", help="don't pin CPUs")
    p.add_argument("--python", default=sys.executable, help="interpreter for chat")
    p.add_argument(
        "--chat-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for seed and serve",
    )
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/storm-<date>)")
    args = p.parse_args(argv)
    if args.attempts is None:
        args.attempts = 20 if args.scenario == "kill" else 1
    if args.settle is None:
        args.settle = 5.0 if args.scenario == "kill" else 1.0
    if args.scenario == "kill":
        args.store, args.redis = "postgres", True  # two nodes share PostgreSQL and Redis
    if args.clients < 1 or args.timeout <= 0 or args.max_inflight < 0 or args.channels < 1:
        p.error("--clients, --timeout, --channels must be positive, --max-inflight >= 0")
    if args.procs < 1 or args.attempts < 1 or args.storm_max <= 0 or args.jitter_ms < 0:
        p.error("--procs, --attempts, --storm-max must be positive, --jitter-ms >= 0")
    if args.post_rate <= 0 or args.post_before <= 0 or args.connect_batch < 0:
        p.error("--post-rate and --post-before must be positive")
    if args.redis and args.store != "postgres":
        p.error("--redis needs --store postgres (Redis joins nodes that share PostgreSQL)")
    labels = [s.label for s in args.sources]
    if len(set(labels)) != len(labels):
        p.error("--chat-src labels must differ (LABEL=DIR)")
    return args


def quiet_check(wait_s: float) -> dict[str, Any]:
    """How busy each CPU is before a run, over 1 s (others' benchmarks or tests skew every
    figure). While any CPU is more than 20% busy, waits up to ``wait_s`` s for it to calm
    down, then warns and goes on."""
    deadline = time.monotonic() + wait_s
    while True:
        before = cpu_times()
        time.sleep(1.0)
        busy = cpu_busy(before, cpu_times())
        loaded = {cpu: b["busy"] for cpu, b in busy.items() if b["busy"] > 0.2}
        if not loaded:
            return busy
        if time.monotonic() >= deadline:
            print(f"# WARNING: the machine is not quiet before the run: {loaded}", flush=True)
            return busy
        time.sleep(4.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin and not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        print(f"# CPUs {SERVER_CPU} and {CLIENT_CPU} not both available: not pinning")
        args.pin = False
    if args.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})  # the harness stays off the nodes' CPU
    build_wsblast()
    started = dt.datetime.now()
    signal.signal(signal.SIGTERM, _terminate)  # unwinds like Ctrl-C: everything is stopped
    sources = args.sources or [Source("tree", None)]
    runs: list[dict[str, Any]] = []
    for source in sources:
        state = source.state()
        load = os.getloadavg()
        quiet = quiet_check(args.wait_quiet)
        print(
            f"# --- {source.label} ({state.get('git_rev')}, {state['path']}); "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        workdir = Path(tempfile.mkdtemp(prefix=f"storm-{source.label}-"))
        run = Storm(args, workdir, source)
        try:
            result = run.run()
        except BenchError as exc:  # this source failed: the others still run
            print(f"# {source.label} failed: {exc}\n# logs kept in {workdir}", file=sys.stderr)
            result = {"scenario": args.scenario, "error": str(exc)[:2000]}
        except BaseException:
            print(f"# logs kept in {workdir}", file=sys.stderr)
            raise
        finally:
            run.close()
        if "error" not in result:
            shutil.rmtree(workdir, ignore_errors=True)
        runs.append(
            {
                "source": {"label": source.label, **state, "end": source.state()},
                "loadavg_before": load,
                "cpu_busy_before": quiet,
                "store_info": run.store_info,
                "result": result,
            }
        )
    table = markdown(runs, args)
    out = args.out or RESULTS / f"storm-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "storm",
        "scenario": args.scenario,
        "started": started.isoformat(timespec="seconds"),
        "store": args.store,
        "redis": args.redis,
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "sources"
        }
        | {"sources": [{"label": s.label, "path": str(s.path)} for s in sources]},
        "machine": machine_info(),
        "runs": runs,
        "table_md": table,
    }
    write_results(out, doc, table)
    return 0


def cli() -> int:
    from tests.pg import PostgresError

    try:
        return main()
    except (BenchError, PostgresError) as exc:
        print(f"storm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
