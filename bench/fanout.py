"""Fan-out benchmark: our chat server against a bare websockets ``broadcast()`` server.

For each server kind, each round (kinds interleaved, so noise hits both alike):

1. start the server pinned to CPU 0 on a fresh port (chat: on a fresh copy of the seeded
   store: a copy of the SQLite file, or with ``--store postgres`` a database made with
   ``CREATE DATABASE round_<i> TEMPLATE seeded`` on a throwaway PostgreSQL server that this
   harness starts, also pinned to CPU 0), wait for ``GET /readyz`` = 200, read its RSS;
2. connect N receivers with ``wsblast`` (compiled epoll client) pinned to CPU 1, wait for
   READY, read the server's RSS again: (after - before) / N = memory per idle connection;
3. burst phase: a poster process (also CPU 1) posts M messages with W in flight; wsblast counts
   the frames delivered: frames/s = frames / (last frame - first frame);
4. latency phase: the poster posts at a steady rate; every delivered frame carries the post's
   ``t=<monotonic ns>;`` and wsblast records deliver - post on every connection;
5. stop everything it started, by PID (PostgreSQL at the end of the run, also on errors,
   Ctrl-C and SIGTERM).

Results (every round and the medians) go to ``bench/results/fanout-<date>.json``; a Markdown
table is printed. ``python -m bench.fanout --help`` lists the knobs; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.pg import TempPostgres

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / ".build"
WSBLAST = BUILD / "wsblast"
RESULTS = BENCH / "results"
SERVER_CPU = 0
CLIENT_CPU = 1
AUTH_ID = "bench-auth"  # the request id of every auth frame; the reply names it


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- processes


def pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def _pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return _pin


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Processes started inside the block run on ``cpu`` (None: no change): a child inherits
    the affinity of the thread that starts it, daemons (pg_ctl's postmaster) included."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Proc:
    """A child process we started: line-oriented stdout, optional stdin, stderr to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        cpu: int | None,
        env: dict[str, str] | None = None,
        pipes: bool = True,
    ) -> None:
        self.name = name
        self.log = log
        self._buf = b""
        with log.open("ab") as err:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else err,
                stderr=err,
                env=env,
                cwd=REPO,
                preexec_fn=pinned(cpu),
            )
        self.pid = self.popen.pid

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def readline(self, timeout: float) -> str:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no output within {timeout:.0f}s{self.tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"{self.name}: exited ({self.popen.poll()}){self.tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")

    def expect(self, prefix: str, timeout: float) -> str:
        """Read lines until one starts with ``prefix``; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            if line.startswith("FAILED"):
                raise BenchError(f"{self.name}: {line}{self.tail()}")

    def expect_json(self, prefix: str, timeout: float) -> dict[str, Any]:
        data = json.loads(self.expect(prefix, timeout))
        assert isinstance(data, dict)
        return data

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n  " + "\n  ".join(text)) if text else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL: only this process, by its PID."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        return self.popen.returncode


# ----------------------------------------------------------------------------------- /proc


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


# ------------------------------------------------------------------------------- servers


@dataclass
class Prepared:
    auth_lines: list[str]  # one per receiver; "" = send nothing after the handshake
    poster_args: list[str]  # extra arguments for bench.poster
    env: dict[str, str] = field(default_factory=dict)


class Target:
    """One server kind: how to start it and how wsblast/poster talk to it."""

    name = ""
    ws_path = "/"  # where receivers connect
    ready_frames = 0  # wsblast: frames containing ready_match before a connection is ready
    ready_match = ""
    fail_match = ""  # a pre-ready frame containing this aborts the run
    count_match = "message.posted"  # frames that count as delivered messages
    heartbeat_ms = 0
    heartbeat_text = ""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def setup(self, workdir: Path, receivers: int) -> None:
        """Once per benchmark run (e.g. seeding)."""

    def prepare(self, rounddir: Path, receivers: int) -> Prepared:
        raise NotImplementedError

    def server_argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def finish_round(self) -> None:
        """After a round's processes are stopped (e.g. drop its database)."""

    def store_pid(self) -> int | None:
        """A process whose tree is the server's store (PostgreSQL's postmaster), or None."""
        return None

    def close(self) -> None:
        """Once at the end of the run, also after errors: stop what setup() started."""


class BareTarget(Target):
    name = "bare"

    def prepare(self, rounddir: Path, receivers: int) -> Prepared:
        return Prepared(auth_lines=[""] * receivers, poster_args=["--kind", "bare"])

    def server_argv(self, port: int) -> list[str]:
        return [
            self.args.python,
            "-m",
            "bench.bare_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]


class ChatTarget(Target):
    """The chat server, per the contract in bench/README.md. Adapt here if the server moves.

    ``--store sqlite``: seeded once into a SQLite file; each round gets a copy of it.
    ``--store postgres``: a throwaway PostgreSQL server (:class:`tests.pg.TempPostgres`:
    initdb + pg_ctl in a temp dir on a free loopback port, as an unprivileged user when we
    are root) started once and pinned to the server's CPU; seeded once into database
    ``seeded``; each round gets ``CREATE DATABASE round_<i> TEMPLATE seeded``, dropped after
    the round; the server is stopped by :meth:`close`.
    """

    name = "chat"
    ready_frames = 1  # hello, then the auth reply: ready on the frame naming AUTH_ID
    ready_match = AUTH_ID
    fail_match = '"error"'
    count_match = "message.posted"
    heartbeat_text = json.dumps({"type": "ping", "id": "hb"}, separators=(",", ":"))

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.ws_path = args.chat_ws_path
        self.heartbeat_ms = args.chat_heartbeat_ms
        self.store: str = args.store
        self.template: Path | None = None
        self.seed: dict[str, Any] = {}
        self.pg: TempPostgres | None = None
        self.round_db: str | None = None
        self.rounds_prepared = 0
        self.store_info: dict[str, Any] = {"store": self.store}

    def env(self, db: Path | None = None, database_url: str = "") -> dict[str, str]:
        # Our CHAT_* settings only: one inherited from the shell (CHAT_DATABASE_URL,
        # CHAT_METRICS_PORT, ...) would change what is measured. Add more with --chat-env.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        if database_url:
            env["CHAT_DATABASE_URL"] = database_url
        else:
            assert db is not None
            env["CHAT_SQLITE_PATH"] = str(db)
        env.update(
            CHAT_RATE_LIMIT_PER_10S="100000",
            CHAT_LOG_LEVEL="warning",
            # Tokens printed by `admin seed` must verify in `serve`: the default secret is
            # random per process, so both get the same fixed one.
            CHAT_SECRET_KEY="fanout-bench-secret-not-for-production",
        )
        for item in self.args.chat_env:
            key, _, value = item.partition("=")
            env[key] = value
        return env

    def setup(self, workdir: Path, receivers: int) -> None:
        """Seed once (receivers + 1 users: users[0] posts); rounds get a copy of the store."""
        if self.store == "postgres":
            env = self.env(database_url=self.start_postgres())
        else:
            self.template = workdir / "seed"
            self.template.mkdir()
            env = self.env(self.template / "chat.sqlite3")
        argv = [self.args.python, "-m", "chat", "admin", "seed", "--workspace", "bench"]
        argv += ["--users", str(receivers + 1), "--channels", "1"]
        t0 = time.monotonic()
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise BenchError(f"seed failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise BenchError(f"seed printed no JSON object:\n{proc.stdout[-2000:]}")
        self.seed = json.loads(lines[-1])
        users, channels = self.seed["users"], self.seed["channels"]
        if len(users) < receivers + 1 or not channels:
            raise BenchError(f"seed gave {len(users)} users, {len(channels)} channels")
        print(
            f"# chat ({self.store}): seeded {len(users)} users in {time.monotonic() - t0:.1f}s",
            flush=True,
        )

    def start_postgres(self) -> str:
        """Start the throwaway PostgreSQL server on the server's CPU; return the DSN of the
        (empty, migrated by the seed) database ``seeded``."""
        from tests.pg import TempPostgres

        cpu = SERVER_CPU if self.args.pin else None
        t0 = time.monotonic()
        self.pg = TempPostgres(startup_timeout=60)
        # pg_ctl (hence the postmaster and every backend it forks) inherits our affinity.
        with on_cpu(cpu):
            self.pg.start()
        dsn = self.pg.create_database(SEED_DB)
        info = asyncio.run(_pg_settings(self.pg.dsn))
        info |= {"store": "postgres", "cpu": cpu, "directory": str(self.pg.directory)}
        self.store_info = info
        where = f"pinned to CPU {cpu}" if cpu is not None else "not pinned"
        print(
            f"# chat: PostgreSQL {info.get('server_version')} on 127.0.0.1:{self.pg.port}, "
            f"{where} (like the chat server), in {self.pg.directory}, fsync={info.get('fsync')}, "
            f"synchronous_commit={info.get('synchronous_commit')}; "
            f"up in {time.monotonic() - t0:.1f}s",
            flush=True,
        )
        return dsn

    def prepare(self, rounddir: Path, receivers: int) -> Prepared:
        self.rounds_prepared += 1
        if self.store == "postgres":
            assert self.pg is not None
            self.round_db = f"round_{self.rounds_prepared}"
            dsn = asyncio.run(_copy_database(self.pg, self.round_db, SEED_DB))
            env = self.env(database_url=dsn)
        else:
            assert self.template is not None
            for f in self.template.iterdir():  # chat.sqlite3 and any -wal/-shm beside it
                shutil.copy2(f, rounddir / f.name)
            env = self.env(rounddir / "chat.sqlite3")
        users = self.seed["users"]
        lines = [
            json.dumps({"type": "auth", "id": AUTH_ID, "token": u["token"]}, separators=(",", ":"))
            for u in users[1 : receivers + 1]
        ]
        poster = ["--kind", "chat", "--path", self.ws_path, "--token", users[0]["token"]]
        poster += ["--channel-id", str(self.seed["channels"][0]["id"])]
        return Prepared(lines, poster, env)

    def server_argv(self, port: int) -> list[str]:
        return [self.args.python, "-m", "chat", "serve", "--host", "127.0.0.1", "--port", str(port)]

    def finish_round(self) -> None:
        name, self.round_db = self.round_db, None
        if name is not None and self.pg is not None:
            try:
                self.pg.drop_database(name)
            except Exception as exc:  # in a finally: don't hide the round's own error
                print(f"# chat: could not drop database {name}: {exc}", file=sys.stderr)

    def store_pid(self) -> int | None:
        return self.pg.postmaster_pid if self.pg is not None else None

    def close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.stop()  # pg_ctl stop -m fast (SIGQUIT/SIGKILL to its PID as a last resort)
            except Exception as exc:  # in a finally: don't hide the run's own error
                print(f"# chat: stopping PostgreSQL: {exc}", file=sys.stderr)
            else:
                print("# chat: PostgreSQL stopped", flush=True)


SEED_DB = "seeded"  # --store postgres: the seeded template database


async def _copy_database(pg: TempPostgres, name: str, template: str) -> str:
    """``CREATE DATABASE name TEMPLATE template`` (FILE_COPY: fast on a throwaway server)."""
    import asyncpg

    conn = await asyncpg.connect(pg.dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY = FILE_COPY')
    finally:
        await conn.close()
    return pg.dsn_for(name)


async def _pg_settings(dsn: str) -> dict[str, Any]:
    """The PostgreSQL settings that decide what a commit costs (recorded with the results)."""
    import asyncpg

    names = ["server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level"]
    names += ["shared_buffers", "max_connections"]
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {n: await conn.fetchval(f"SELECT current_setting('{n}')") for n in names}
    finally:
        await conn.close()


# --------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            head = s.recv(64).split(b"\r\n", 1)[0].split()
            return int(head[1]) if len(head) >= 2 else None
    except (OSError, ValueError):
        return None


def wait_ready(server: Proc, port: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.popen.poll() is not None:
            raise BenchError(f"{server.name} exited ({server.popen.returncode}){server.tail()}")
        if http_status(port, "/readyz") == 200:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise BenchError(f"{server.name}: /readyz not 200 within {timeout:.0f}s{server.tail()}")


def build_wsblast() -> None:
    BUILD.mkdir(exist_ok=True)
    src = BENCH / "wsblast.c"
    cmd = ["gcc", "-O2", "-Wall", "-o", str(WSBLAST), str(src)]
    subprocess.run(cmd, check=True, timeout=120)


def median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


# ----------------------------------------------------------------------------------- rounds


class Round:
    def __init__(self, target: Target, args: argparse.Namespace, number: int, workdir: Path):
        self.t = target
        self.args = args
        self.number = number
        self.dir = workdir / f"{target.name}-{number}"
        self.dir.mkdir()
        self.procs: list[Proc] = []
        self.cpu = {"server": SERVER_CPU, "client": CLIENT_CPU} if args.pin else {}

    def start(self, name: str, argv: Sequence[str], cpu: str, **kw: Any) -> Proc:
        proc = Proc(name, argv, log=self.dir / f"{name}.log", cpu=self.cpu.get(cpu), **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def poster(self, prep: Prepared, port: int, mode: list[str]) -> Proc:
        argv = [self.args.python, "-m", "bench.poster", "--port", str(port), *prep.poster_args]
        limit = self.args.connect_timeout + 2 * self.args.phase_timeout
        argv += [*mode, "--timeout", str(limit)]
        proc = self.start(f"poster{len(self.procs)}", argv, "client")
        proc.expect("CONNECTED", 60)
        return proc

    def phase(self, server: Proc, blast: Proc, poster: Proc, count: int) -> dict[str, Any]:
        """Arm wsblast for count*N frames, let the (connected) poster post, return both reports."""
        n = self.args.members
        blast.send(f"RUN {count * n} {int(self.args.phase_timeout * 1000)}")
        blast.expect("ARMED", 10)
        store = self.t.store_pid()
        store0 = cpu_seconds(store) if store is not None else 0.0
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        poster.send("GO")
        posted = poster.expect_json("DONE", self.args.phase_timeout + 30)
        got = blast.expect_json("RESULT", self.args.phase_timeout + 30)
        server_cpu, wall = cpu_seconds(server.pid) - cpu0, time.monotonic() - t0
        # PostgreSQL: the postmaster and all its backends (they live as long as the pool).
        store_cpu = cpu_seconds(store) - store0 if store is not None else None
        poster.stop()
        active_s = max(1e-9, (got["last_ns"] - got["first_ns"]) / 1e9)
        client_cpu = got["cpu_user_s"] + got["cpu_sys_s"]
        out: dict[str, Any] = {
            "messages": count,
            "frames": got["frames"],
            "expected": got["expected"],
            "complete": got["complete"],
            "lossless": got["complete"] and got["min_per_conn"] == got["max_per_conn"] == count,
            "min_per_conn": got["min_per_conn"],
            "max_per_conn": got["max_per_conn"],
            "closed_conns": got["closed_conns"],
            "bytes_per_frame": round(got["bytes"] / got["frames"], 1) if got["frames"] else None,
            "deliver_s": round(active_s, 4),
            "frames_per_s": round(got["frames"] / active_s, 1) if got["frames"] > 1 else None,
            "e2e_frames_per_s": round(
                got["frames"] / max(1e-9, (got["last_ns"] - posted["first_send_ns"]) / 1e9), 1
            )
            if got["frames"]
            else None,
            "lat_p50_ms": round(got["lat_p50_us"] / 1000, 3) if got["lat_n"] else None,
            "lat_p99_ms": round(got["lat_p99_us"] / 1000, 3) if got["lat_n"] else None,
            "lat_max_ms": round(got["lat_max_us"] / 1000, 3) if got["lat_n"] else None,
            "lat_samples": got["lat_n"],
            "client_cpu_s": round(client_cpu, 3),
            "client_cpu_util": round(client_cpu / active_s, 3),
            "server_cpu_s": round(server_cpu, 3),
            "server_cpu_util": round(server_cpu / wall, 3),
            "store_cpu_s": round(store_cpu, 3) if store_cpu is not None else None,
            "store_cpu_util": round(store_cpu / wall, 3) if store_cpu is not None else None,
            "wall_s": round(wall, 3),
            "poster": posted,
            "wsblast": got,
        }
        if not out["lossless"] or posted["errors"]:
            print(
                f"#   WARNING {self.t.name}: {out['frames']}/{out['expected']} frames, "
                f"per conn {out['min_per_conn']}..{out['max_per_conn']}, "
                f"poster errors {posted['errors']} {posted['error_sample'] or ''}",
                flush=True,
            )
        return out

    def run(self) -> dict[str, Any]:
        t, args, n = self.t, self.args, self.args.members
        prep = t.prepare(self.dir, n)
        port = free_port()
        try:
            server = self.start(
                "server", t.server_argv(port), "server", env=prep.env or None, pipes=False
            )
            startup_s = wait_ready(server, port, args.start_timeout)
            # The burst poster connects (and authenticates) first: it warms up the server's
            # connection path, so one-time costs stay out of the per-connection memory.
            burst = ["--messages", str(args.messages), "--window", str(args.window)]
            burst_poster = self.poster(prep, port, burst)
            time.sleep(args.settle)
            rss0 = rss_bytes(server.pid)
            auth = self.dir / "auth.txt"
            auth.write_text("".join(line + "\n" for line in prep.auth_lines))
            argv = [str(WSBLAST), "--port", str(port), "--path", t.ws_path, "--conns", str(n)]
            argv += ["--batch", str(args.batch), "--ready-frames", str(t.ready_frames)]
            argv += ["--ready-match", t.ready_match, "--fail-match", t.fail_match]
            argv += ["--count-match", t.count_match, "--lat-every", str(args.lat_every)]
            argv += ["--connect-timeout-ms", str(int(args.connect_timeout * 1000))]
            argv += ["--max-seconds", str(int(args.max_seconds))]
            if any(prep.auth_lines):
                argv += ["--auth-file", str(auth)]
            if t.heartbeat_ms:
                argv += [
                    "--heartbeat-ms",
                    str(t.heartbeat_ms),
                    "--heartbeat-text",
                    t.heartbeat_text,
                ]
            blast = self.start("wsblast", argv, "client")
            ready = blast.expect_json("READY", args.connect_timeout + 10)
            time.sleep(args.settle)
            rss1 = rss_bytes(server.pid)
            result: dict[str, Any] = {
                "round": self.number,
                "port": port,
                "server_startup_s": round(startup_s, 3),
                "connect": ready,
                "rss_before": rss0,
                "rss_connected": rss1,
                "mem_per_conn_bytes": round((rss1 - rss0) / n),
            }
            result["burst"] = self.phase(server, blast, burst_poster, args.messages)
            if args.rate > 0 and args.duration > 0:
                time.sleep(args.settle)
                steady = ["--rate", str(args.rate), "--duration", str(args.duration)]
                count = round(args.rate * args.duration)
                poster = self.poster(prep, port, steady)
                result["steady"] = self.phase(server, blast, poster, count)
            result["rss_end"] = rss_bytes(server.pid)
            blast.send("QUIT")
            with contextlib.suppress(subprocess.TimeoutExpired):
                blast.popen.wait(10)
            return result
        finally:
            self.stop_all()
            t.finish_round()


# ---------------------------------------------------------------------------------- report


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(phase: str, key: str) -> list[Any]:
        return [r[phase][key] for r in rounds if phase in r]

    s: dict[str, Any] = {
        "rounds": len(rounds),
        "frames_per_s": median(pick("burst", "frames_per_s")),
        "frames_per_s_all": pick("burst", "frames_per_s"),
        "e2e_frames_per_s": median(pick("burst", "e2e_frames_per_s")),
        "mem_per_conn_bytes": median([r["mem_per_conn_bytes"] for r in rounds]),
        "burst_lossless": all(pick("burst", "lossless")),
        "bytes_per_frame": median(pick("burst", "bytes_per_frame")),
        "burst_client_cpu_s": median(pick("burst", "client_cpu_s")),
        "burst_deliver_s": median(pick("burst", "deliver_s")),
        "burst_client_cpu_util": median(pick("burst", "client_cpu_util")),
        "burst_server_cpu_util": median(pick("burst", "server_cpu_util")),
        "burst_store_cpu_util": median(pick("burst", "store_cpu_util")),
        "burst_lat_p50_ms": median(pick("burst", "lat_p50_ms")),
        "burst_lat_p99_ms": median(pick("burst", "lat_p99_ms")),
        "connect_ms": median([r["connect"]["connect_ms"] for r in rounds]),
    }
    if any("steady" in r for r in rounds):
        s |= {
            "steady_lossless": all(pick("steady", "lossless")),
            "lat_p50_ms": median(pick("steady", "lat_p50_ms")),
            "lat_p99_ms": median(pick("steady", "lat_p99_ms")),
            "lat_max_ms": median(pick("steady", "lat_max_ms")),
            "steady_client_cpu_util": median(pick("steady", "client_cpu_util")),
            "steady_server_cpu_util": median(pick("steady", "server_cpu_util")),
        }
    return s


def fmt(x: Any, spec: str = ",.0f", unit: str = "") -> str:
    if x is None:
        return "—"
    return f"{x:{spec}}{unit}"


def store_line(args: argparse.Namespace, info: dict[str, Any]) -> str:
    """Where the chat server keeps its data, and where that runs (first lines of the table)."""
    if args.store == "postgres":
        where = f"pinned to CPU {SERVER_CPU} with the chat server" if args.pin else "not pinned"
        return (
            f"Chat store: PostgreSQL {info.get('server_version', '?')} (own throwaway server, "
            f"{where}; fsync={info.get('fsync', '?')}, "
            f"synchronous_commit={info.get('synchronous_commit', '?')}); "
            "a fresh copy of the seeded database per round."
        )
    return "Chat store: SQLite (embedded, WAL); a fresh copy of the seeded file per round."


def markdown(
    summary: dict[str, dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]
) -> str:
    kinds = [k for k in ("chat", "bare") if k in summary]
    both = len(kinds) == 2

    def ratio(key: str) -> str:
        if not both:
            return ""
        a, b = summary["chat"].get(key), summary["bare"].get(key)
        return f" {a / b:.2f}x |" if a and b else " — |"

    def row(label: str, key: str, spec: str = ",.0f", unit: str = "", r: bool = True) -> str:
        cells = " | ".join(fmt(summary[k].get(key), spec, unit) for k in kinds)
        return f"| {label} | {cells} |" + ((ratio(key) if r else " |") if both else "")

    def cpu(k: str) -> str:
        s = summary[k]
        return f"{fmt(s['burst_client_cpu_s'], '.2f')} s / {fmt(s['burst_deliver_s'], '.2f')} s"

    labels = [f"chat ({args.store})" if k == "chat" else k for k in kinds]
    head = "| metric | " + " | ".join(labels) + " |" + (" chat/bare |" if both else "")
    sep = "|---|" + "---:|" * len(kinds) + ("---:|" if both else "")
    n, m = args.members, args.messages
    pins = (
        f"server{' and PostgreSQL' if args.store == 'postgres' and 'chat' in kinds else ''} "
        f"on CPU {SERVER_CPU}, clients on CPU {CLIENT_CPU}"
        if args.pin
        else "not pinned"
    )
    lines = [
        f"Fan-out to N={n} receivers, {m} messages (window {args.window}), "
        f"median of {args.rounds} rounds; {pins}.",
        *([store_line(args, info)] if "chat" in kinds else []),
        "",
        head,
        sep,
        row("delivered frames/s (first→last frame)", "frames_per_s"),
        row("delivered frames/s (first post→last frame)", "e2e_frames_per_s"),
        row("memory per idle connection (KiB)", "mem_per_conn_kib", ",.1f"),
        row("bytes per delivered frame", "bytes_per_frame", ",.0f", r=False),
        row(f"deliver latency p50 @ {args.rate:g} msg/s (ms)", "lat_p50_ms", ",.2f"),
        row(f"deliver latency p99 @ {args.rate:g} msg/s (ms)", "lat_p99_ms", ",.2f"),
        row("server CPU during burst (cores)", "burst_server_cpu_util", ".2f", r=False),
        *(
            [row("PostgreSQL CPU during burst (cores)", "burst_store_cpu_util", ".2f", r=False)]
            if args.store == "postgres" and "chat" in kinds
            else []
        ),
        row("wsblast CPU / active time during burst", "burst_client_cpu_util", ".2f", r=False),
        "| wsblast CPU s / wall s (burst) | "
        + " | ".join(cpu(k) for k in kinds)
        + " |"
        + (" |" if both else ""),
        row("lossless (every conn got every message)", "lossless_str", "s", r=False),
    ]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("websockets", "uvloop"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        info["git_rev"] = rev.stdout.strip() or None
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--members", type=int, default=1000, help="receiving connections (N)")
    p.add_argument("--messages", type=int, default=200, help="burst: messages posted (M)")
    p.add_argument("--window", type=int, default=20, help="burst: posts in flight")
    p.add_argument("--rate", type=float, default=50.0, help="latency phase: msg/s (0: skip)")
    p.add_argument("--duration", type=float, default=5.0, help="latency phase: seconds")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server (median reported)")
    p.add_argument("--only", choices=["chat", "bare"], help="run one server kind only")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="chat: the embedded SQLite file (default), or a throwaway PostgreSQL server "
        "started by the benchmark and pinned to the server's CPU",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=200,
        help="wsblast: handshakes in flight (keep <= the servers' listen backlog)",
    )
    p.add_argument("--lat-every", type=int, default=1, help="latency on every K-th connection")
    p.add_argument("--settle", type=float, default=1.0, help="seconds before RSS readings")
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--phase-timeout", type=float, default=120.0)
    p.add_argument("--max-seconds", type=float, default=900.0, help="wsblast's hard lifetime")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="don't pin CPUs")
    p.add_argument("--python", default=sys.executable, help="interpreter for servers/poster")
    p.add_argument("--chat-ws-path", default="/", help="chat: websocket path")
    p.add_argument(
        "--chat-heartbeat-ms",
        type=int,
        default=15000,
        help='chat: wsblast sends {"type":"ping"} this often (0: never)',
    )
    p.add_argument(
        "--chat-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="chat: extra environment for seed and serve",
    )
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/fanout-<date>)")
    args = p.parse_args(argv)
    if args.members < 1 or args.messages < 1 or args.rounds < 1 or args.window < 1:
        p.error("--members, --messages, --rounds and --window must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin and not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        print(f"# CPUs {SERVER_CPU} and {CLIENT_CPU} not both available: not pinning")
        args.pin = False
    if args.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})  # the harness itself stays off the server's CPU
    build_wsblast()
    kinds = [args.only] if args.only else ["bare", "chat"]
    targets: dict[str, Target] = {
        k: (ChatTarget(args) if k == "chat" else BareTarget(args)) for k in kinds
    }
    started = dt.datetime.now()
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    workdir = Path(tempfile.mkdtemp(prefix="fanout-"))
    # SIGTERM unwinds like Ctrl-C: every round's processes and PostgreSQL are stopped below.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        for t in targets.values():
            t.setup(workdir, args.members)
        for i in range(1, args.rounds + 1):
            for k, t in targets.items():  # interleaved: bare, chat, bare, chat, ...
                print(f"# round {i}/{args.rounds}: {k}", flush=True)
                r = Round(t, args, i, workdir).run()
                rounds[k].append(r)
                b = r["burst"]
                lat = r.get("steady", {})
                print(
                    f"#   {fmt(b['frames_per_s'])} frames/s, "
                    f"{r['mem_per_conn_bytes'] / 1024:.1f} KiB/conn, "
                    f"latency p50/p99 {fmt(lat.get('lat_p50_ms'), '.2f')}/"
                    f"{fmt(lat.get('lat_p99_ms'), '.2f')} ms, "
                    f"wsblast cpu {b['client_cpu_util']:.2f}, "
                    f"server cpu {b['server_cpu_util']:.2f}"
                    + (
                        f", postgres cpu {b['store_cpu_util']:.2f}"
                        if b.get("store_cpu_util") is not None
                        else ""
                    ),
                    flush=True,
                )
    except BaseException:
        print(f"# logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        for t in targets.values():
            t.close()
    shutil.rmtree(workdir, ignore_errors=True)
    summary = {k: summarize(v) for k, v in rounds.items()}
    for s in summary.values():
        s["mem_per_conn_kib"] = s["mem_per_conn_bytes"] / 1024
        lossless = s["burst_lossless"] and s.get("steady_lossless", True)
        s["lossless_str"] = "yes" if lossless else "NO"
    if "chat" in summary and "bare" in summary:
        c, b = summary["chat"], summary["bare"]
        ratios = {
            key: (c[key] / b[key] if c[key] is not None and b[key] else None)
            for key in ("frames_per_s", "e2e_frames_per_s", "mem_per_conn_bytes")
        }
        # Rounds are interleaved (bare i, chat i): the ratio within each pair, and its median.
        pairs = [
            rc["burst"]["frames_per_s"] / rb["burst"]["frames_per_s"]
            for rc, rb in zip(rounds["chat"], rounds["bare"], strict=True)
            if rc["burst"]["frames_per_s"] and rb["burst"]["frames_per_s"]
        ]
        ratios["frames_per_s_per_round"] = [round(x, 3) for x in pairs]
        ratios["frames_per_s_median_of_rounds"] = median(pairs)
    else:
        ratios = {}
    chat = targets.get("chat")
    store_info = chat.store_info if isinstance(chat, ChatTarget) else {}
    if "chat" in summary:
        summary["chat"]["store"] = args.store
    table = markdown(summary, args, store_info)
    out = args.out or RESULTS / f"fanout-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "fanout",
        "started": started.isoformat(timespec="seconds"),
        "store": args.store,
        "store_info": store_info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "summary": summary,
        "ratio_chat_over_bare": ratios,
        "rounds": rounds,
        "table_md": table,
    }
    write_results(out, doc, table)
    return 0


def write_results(out: Path, doc: dict[str, Any], table: str) -> None:
    """Save a run's JSON and print its Markdown table (every benchmark ends this way)."""
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table)
    print(f"\n# results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cli() -> int:
    from tests.pg import PostgresError

    try:
        return main()
    except (BenchError, PostgresError) as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Through the importable module, not this __main__ copy: bench.infra (scaleout, resume)
    # imports bench.fanout, and one BenchError class must be the one raised and caught.
    from bench import fanout

    sys.exit(fanout.cli())
