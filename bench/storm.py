"""Reconnect-storm benchmark against one chat node: ``python -m bench.storm``.

Cold storm: N clients (``--clients``, default 2,000) open a websocket to one ``chat serve``
and send ``auth`` all at once (``wsblast --storm --batch 0``: every connect() is issued at
once, no client-side limit on handshakes in flight). Each client gives up after
``--timeout`` seconds (default 10) from its connect(), with no retry: failures are counted by
kind (timeout, upgrade refused with its HTTP status, error frame, server close with its close
code, socket error).

1. store: the embedded SQLite file (default), or ``--store postgres``: a throwaway PostgreSQL
   (:class:`tests.pg.TempPostgres`, as bench.fanout starts it, plus ``pg_stat_statements``
   preloaded) pinned to CPU 0 with the node; ``--redis`` also starts a
   :class:`tests.cluster.TempRedis` (on CPU 0) and gives the node ``CHAT_REDIS_URL``;
2. seed a workspace of N+1 users (``chat admin seed``); users[0] warms the node up (one
   connect + auth), users[1..N] storm;
3. ``chat serve`` pinned to CPU 0, wsblast and this harness on CPU 1 (``--no-pin``: off);
4. measured: time from the first connect() until the last client is authenticated, p50/p99
   of time-to-authenticated (and time to the 101), failures; the node's CPU seconds until
   the storm settled (every client authenticated or failed) and until it went idle, its peak
   RSS (sampled every 100 ms, and VmHWM); PostgreSQL statements per client
   (``sum(calls)`` of pg_stat_statements for the node's database, reset before the storm)
   and transactions per client (``pg_stat_database.xact_commit + xact_rollback``); Redis
   commands per client (``INFO stats``); the kernel's listen-queue overflows and TCP
   retransmissions (``/proc/net``, machine-wide);
5. everything started here is stopped by PID, also on errors, Ctrl-C and SIGTERM.

Results: ``bench/results/storm-<date>.json``; a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
    rss_bytes,
    wait_ready,
    write_results,
)
from bench.infra import cpu_busy, cpu_times, source_state

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
    # The node's pool (CHAT_DB_POOL_MAX_SIZE, default 20) plus our own connections.
    "max_connections": "200",
}
# PostgreSQL >= 15 flushes a backend's pending statistics (pg_stat_database) at most once a
# second while busy, and within 10 s once idle: xact_commit is read this long after the storm.
PG_STATS_FLUSH_S = 11.0


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


# ----------------------------------------------------------------------------------- storm


class Storm:
    """One run: the store (and Redis), the seed, the node, the warm-up, the storm."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
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

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
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

    def redis_commands(self) -> int | None:
        if self.redis is None:
            return None
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=10)
        try:
            return int(client.info("stats")["total_commands_processed"])
        finally:
            client.close()

    def pg_counts(self, top: int = 0) -> dict[str, Any] | None:
        if self.pg is None:
            return None
        return asyncio.run(_pg_counts(self.pg.dsn, DB, self.statements, top))

    # -- run ------------------------------------------------------------------------------

    def seed(self, users: int) -> dict[str, Any]:
        argv = [self.args.python, "-m", "chat", "admin", "seed", "--workspace", "storm"]
        argv += ["--users", str(users), "--channels", str(self.args.channels)]
        t0 = time.monotonic()
        proc = subprocess.run(
            argv, env=self.env(), cwd=REPO, capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            raise BenchError(f"seed failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise BenchError(f"seed printed no JSON object:\n{proc.stdout[-2000:]}")
        seed: dict[str, Any] = json.loads(lines[-1])
        if len(seed["users"]) < users:
            raise BenchError(f"seed gave {len(seed['users'])} users, wanted {users}")
        print(f"# storm: seeded {users} users in {time.monotonic() - t0:.1f}s", flush=True)
        return seed

    def blast_argv(self, port: int, n: int, auth: Path) -> list[str]:
        argv = [str(WSBLAST), "--port", str(port), "--path", "/", "--conns", str(n)]
        argv += ["--auth-file", str(auth), "--ready-frames", "1", "--ready-match", AUTH_ID]
        argv += ["--fail-match", '"error"']
        return argv

    def run(self) -> dict[str, Any]:
        args, n = self.args, self.args.clients
        self.start_store()
        seed = self.seed(n + 1)
        lines = [
            json.dumps({"type": "auth", "id": AUTH_ID, "token": u["token"]}, separators=(",", ":"))
            for u in seed["users"][: n + 1]
        ]
        warm, auth = self.dir / "warm.txt", self.dir / "auth.txt"
        warm.write_text(lines[0] + "\n")
        auth.write_text("".join(line + "\n" for line in lines[1:]))

        port = free_port()
        argv = [args.python, "-m", "chat", "serve", "--host", "127.0.0.1", "--port", str(port)]
        server = self.start("server", argv, SERVER_CPU, env=self.env(), pipes=False)
        startup_s = wait_ready(server, port, args.start_timeout)
        # Warm-up: one connect + auth (users[0]), so one-time costs stay out of the storm.
        wargv = [*self.blast_argv(port, 1, warm), "--expect-per-conn", "0"]
        wargv += ["--connect-timeout-ms", "30000", "--max-seconds", "60"]
        warmup = self.start("warmup", wargv, CLIENT_CPU)
        warmup.expect("READY", 40)
        warmup.expect("RESULT", 10)
        warmup.stop()
        time.sleep(args.settle)

        log_offset = server.log.stat().st_size
        rss0, hwm0 = rss_bytes(server.pid), vm_hwm(server.pid)
        pm = self.postmaster_pid()
        if self.pg is not None and self.statements:
            asyncio.run(_pg_exec(self.pg.dsn, "SELECT pg_stat_statements_reset()"))
        pg0 = self.pg_counts()
        redis0 = self.redis_commands()
        net0, cpus0 = net_counters(), cpu_times()
        pg_cpu0 = cpu_seconds(pm) if pm is not None else None
        redis_pid = self.redis.pid if self.redis is not None else None
        redis_cpu0 = cpu_seconds(redis_pid) if redis_pid is not None else None

        bargv = [*self.blast_argv(port, n, auth), "--storm", "--attempts", "1"]
        bargv += ["--batch", str(args.max_inflight)]
        bargv += ["--conn-timeout-ms", str(int(args.timeout * 1000))]
        bargv += ["--max-seconds", str(int(args.timeout + args.idle_timeout + 120))]
        if args.heartbeat_ms:
            bargv += ["--heartbeat-ms", str(args.heartbeat_ms)]
            bargv += ["--heartbeat-text", '{"type":"ping","id":"hb"}']
        sampler = Sampler(server.pid, max_s=args.timeout + args.idle_timeout + 120)
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        sampler.start()
        try:
            print(f"# storm: {n} clients at once (timeout {args.timeout:g} s)", flush=True)
            blast = self.start("wsblast", bargv, CLIENT_CPU)
            storm = blast.expect_json("STORM", args.timeout + 60)
            settled_wall = time.monotonic() - t0
            cpu_settled = cpu_seconds(server.pid) - cpu0
            pg_cpu_settled = (
                cpu_seconds(pm) - pg_cpu0 if pm is not None and pg_cpu0 is not None else None
            )
            cpus1 = cpu_times()
            print(
                f"#   {storm['ok']}/{n} authenticated, last at {storm['last_ready_ms']:.0f} ms, "
                f"p50/p99 {storm['ready_p50_ms']:.0f}/{storm['ready_p99_ms']:.0f} ms, "
                f"{storm['failed']} failed ({storm['timeouts']} timeouts); "
                f"node CPU {cpu_settled:.2f} s",
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
        if self.pg is not None:
            wait = PG_STATS_FLUSH_S - (time.monotonic() - t0 - settled_wall)
            if wait > 0:
                print(f"#   waiting {wait:.0f} s for PostgreSQL's statistics", flush=True)
                time.sleep(wait)
        pg1 = self.pg_counts(top=25)
        blast.send("QUIT")
        with contextlib.suppress(subprocess.TimeoutExpired):
            blast.popen.wait(10)

        log_lines = server.log.read_bytes()[log_offset:].decode(errors="replace").splitlines()
        result: dict[str, Any] = {
            "clients": n,
            "port": port,
            "server_startup_s": round(startup_s, 3),
            "wsblast": storm,
            "ok": storm["ok"],
            "failed": storm["failed"],
            "timeouts": storm["timeouts"],
            "last_auth_s": round(storm["last_ready_ms"] / 1000, 3),
            "settled_s": round(storm["settled_ms"] / 1000, 3),
            "auth_p50_s": round(storm["ready_p50_ms"] / 1000, 3),
            "auth_p99_s": round(storm["ready_p99_ms"] / 1000, 3),
            "handshake_p50_s": round(storm["handshake_p50_ms"] / 1000, 3),
            "handshake_p99_s": round(storm["handshake_p99_ms"] / 1000, 3),
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
            result["redis"] = {"commands": cmds, "commands_per_client": round(cmds / n, 2)}
        return result


# ---------------------------------------------------------------------------------- report


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def markdown(r: dict[str, Any], args: argparse.Namespace, info: dict[str, Any]) -> str:
    n = r["clients"]
    w = r["wsblast"]
    store = args.store + (" + Redis" if args.redis else "")
    if args.store == "postgres":
        store = f"PostgreSQL {info.get('server_version', '?')}" + (" + Redis" if args.redis else "")
    pins = f"node on CPU {SERVER_CPU}, clients on CPU {CLIENT_CPU}" if args.pin else "not pinned"
    kinds = ", ".join(
        f"{w[k]} {k.replace('_', ' ')}"
        for k in ("timeouts", "refused", "error_frames", "server_closed", "conn_errors")
        if w.get(k)
    )
    codes = ", ".join(f"{c}: {k}" for c, k in w.get("close_codes", {}).items())
    statuses = ", ".join(f"{c}: {k}" for c, k in w.get("http_status", {}).items())
    rss_peak = max(r["server_rss_peak_sampled"], r["server_rss_after"])
    rows = [
        ("clients (all `auth` at once, no retry)", f"{n:,}"),
        ("authenticated", f"{r['ok']:,} of {n:,}"),
        ("failed", f"{r['failed']:,}" + (f" ({kinds})" if kinds else "")),
        ("time until the last client is authenticated",
         fmt_s(r["last_auth_s"] if r["ok"] else None)),
        ("time until every client authenticated or failed", fmt_s(r["settled_s"])),
        ("time-to-authenticated p50 / p99 (per client, from its connect)",
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
    ]  # fmt: skip
    if codes:
        rows.append(("close codes before auth", codes))
    if statuses:
        rows.append(("upgrades refused (HTTP status)", statuses))
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
    net = r["net"]
    rows.append(
        (
            "listen overflows / SYN-queue drops / retransmits (kernel)",
            f"{net.get('ListenOverflows', 0):,} / {net.get('ListenDrops', 0):,} / "
            f"{net.get('RetransSegs', 0):,}",
        )
    )
    rows.append(("node log lines (warnings+) during the storm", f"{r['server_log_lines']:,}"))
    head = [
        f"Cold reconnect storm, one node ({store}); {pins}; client timeout "
        f"{args.timeout:g} s, no retry.",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    return "\n".join(head + [f"| {a} | {b} |" for a, b in rows])


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=2000, help="clients in the storm (N)")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the embedded SQLite file (default), or a throwaway PostgreSQL on the node's CPU",
    )
    p.add_argument("--redis", action="store_true", help="also a throwaway Redis (postgres only)")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout (s), no retry")
    p.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="wsblast: connections in flight before authenticated (0: no limit, the storm)",
    )
    p.add_argument("--channels", type=int, default=1, help="seeded channels (all users in all)")
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=15000,
        help='authenticated clients send {"type":"ping"} this often (0: never)',
    )
    p.add_argument("--settle", type=float, default=1.0, help="seconds after the warm-up")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="wait for the node's idle")
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
    if args.clients < 1 or args.timeout <= 0 or args.max_inflight < 0 or args.channels < 1:
        p.error("--clients, --timeout, --channels must be positive, --max-inflight >= 0")
    if args.redis and args.store != "postgres":
        p.error("--redis needs --store postgres (Redis joins nodes that share PostgreSQL)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin and not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        print(f"# CPUs {SERVER_CPU} and {CLIENT_CPU} not both available: not pinning")
        args.pin = False
    if args.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})  # the harness stays off the node's CPU
    build_wsblast()
    started = dt.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="storm-"))
    signal.signal(signal.SIGTERM, _terminate)  # unwinds like Ctrl-C: everything is stopped
    source0 = source_state()
    load0 = os.getloadavg()
    print(f"# load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    run = Storm(args, workdir)
    try:
        result = run.run()
    except BaseException:
        print(f"# logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        run.close()
    shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(result, args, run.store_info)
    out = args.out or RESULTS / f"storm-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "storm",
        "started": started.isoformat(timespec="seconds"),
        "store": args.store,
        "redis": args.redis,
        "store_info": run.store_info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "source": {"start": source0, "end": source_state()},
        "loadavg_before": load0,
        "result": result,
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
