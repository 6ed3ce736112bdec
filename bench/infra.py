"""PostgreSQL + Redis + chat nodes for the multi-node benchmarks (bench.scaleout, bench.resume).

Reuses the test harness: :class:`tests.pg.TempPostgres` (a throwaway server, run as an
unprivileged user when we are root, in /dev/shm when it can, ``fsync=off``),
:class:`tests.cluster.TempRedis` (no persistence) and :class:`tests.cluster.ChatNodeProcess`
(``python -m chat serve`` on a free loopback port, stopped by PID). Every process is started
by us, on 127.0.0.1, and stopped by PID when the :class:`Infra` closes.

CPU pinning: a process inherits the CPU affinity of the thread that starts it, so
:func:`on_cpu` pins the harness thread for the duration of a start (PostgreSQL's backends
are forked by the postmaster and inherit its CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.fanout import REPO, BenchError, cpu_seconds, on_cpu, process_tree
from tests.cluster import ChatNodeProcess, TempRedis
from tests.pg import TempPostgres

# The same secret for `admin seed` (which issues the tokens) and every node (which verifies).
SECRET = "bench-cluster-secret-not-for-production-0123456789"
NODE_ENV = {
    "CHAT_RATE_LIMIT_PER_10S": "100000",
    "CHAT_LOG_LEVEL": "warning",
    # Nodes are stopped after the clients left: nothing to drain, no reason to wait.
    "CHAT_DRAIN_PERIOD_S": "0.5",
    "CHAT_SHUTDOWN_GRACE_S": "1",
}


def cpu_arg(text: str) -> int | None:
    """A CPU number from the command line; "", "none" or "-" for no pinning."""
    return None if text in ("", "none", "-") else int(text)


def source_state() -> dict[str, Any]:
    """The commit and any uncommitted change under chat/ (nodes import the working tree
    when they start: a change during a run shows up here)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "chat"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_rev": rev or None, "chat_uncommitted": out.splitlines()}


def cpu_ns(pid: int) -> int:
    """CPU time (ns, from schedstat: finer than clock ticks) of the live threads of ``pid``
    and its descendants. Threads or processes that already exited are not counted."""
    total = 0
    for p in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def cpu_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: {"cpu0": [user, nice, system, idle, iowait, irq,
    softirq, steal], ...}."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            out[name] = [int(x) for x in fields[:8]]
    return out


def cpu_busy(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, Any]:
    """Per CPU between two :func:`cpu_times`: busy fraction, and the softirq (network
    processing on loopback, charged to no process) and steal (hypervisor) fractions."""
    out: dict[str, Any] = {}
    for cpu, b in before.items():
        a = after.get(cpu)
        if a is None:
            continue
        d = [x - y for x, y in zip(a, b, strict=True)]
        total = sum(d)
        if total <= 0:
            continue
        idle = d[3] + d[4]
        out[cpu] = {
            "busy": round((total - idle) / total, 3),
            "softirq": round(d[6] / total, 3),
            "steal": round(d[7] / total, 3),
        }
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without CHAT_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(extra)
    return env


def run_seed(argv: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``chat admin seed`` (``argv``) and return the JSON object it printed last."""
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"seed failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"seed printed no JSON object:\n{proc.stdout[-2000:]}")
    seed: dict[str, Any] = json.loads(lines[-1])
    return seed


class Infra:
    """One TempPostgres, optionally one TempRedis, and the chat nodes started on them."""

    def __init__(self, *, cpu: int | None, redis: bool = True, python: str = sys.executable):
        self.cpu = cpu
        self.python = python
        self.pg = TempPostgres(startup_timeout=60)
        self.redis: TempRedis | None = TempRedis() if redis else None
        self.nodes: list[ChatNodeProcess] = []

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> Infra:
        t0 = time.monotonic()
        with on_cpu(self.cpu):
            self.pg.start()
            if self.redis is not None:
                self.redis.start()
        print(f"# postgres (+redis) up in {time.monotonic() - t0:.1f}s", flush=True)
        return self

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        self.nodes.clear()
        if self.redis is not None:
            self.redis.close()
        self.pg.stop()

    def __enter__(self) -> Infra:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- PostgreSQL ---------------------------------------------------------------------

    @property
    def postmaster_pid(self) -> int | None:
        return self.pg.postmaster_pid

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (empty, or a copy of ``template``); returns its DSN."""
        if template is None:
            return self.pg.create_database(name)

        async def create() -> None:
            conn = await asyncpg.connect(self.pg.dsn, timeout=10)
            try:
                await conn.execute(
                    f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY = FILE_COPY'
                )
            finally:
                await conn.close()

        asyncio.run(create())
        return self.pg.dsn_for(name)

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.pg.drop_database(name)

    # -- Redis --------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return self.redis.url if self.redis is not None else ""

    def fresh_redis(self) -> None:
        """Restart Redis empty (same port): every round starts without a stream."""
        if self.redis is not None:
            with on_cpu(self.cpu):
                self.redis.restart()

    # -- chat ---------------------------------------------------------------------------

    def seed(
        self, env: dict[str, str], workspace: str, users: int, channels: int
    ) -> dict[str, Any]:
        """``python -m chat admin seed`` with ``env`` (the store's settings): its JSON."""
        argv = [self.python, "-m", "chat", "admin", "seed", "--workspace", workspace]
        argv += ["--users", str(users), "--channels", str(channels)]
        env = clean_env(CHAT_SECRET_KEY=SECRET, CHAT_LOG_LEVEL="warning", **env)
        t0 = time.monotonic()
        seed = run_seed(argv, env, timeout=600)
        if len(seed["users"]) < users or len(seed["channels"]) < channels:
            raise BenchError(f"seed gave {len(seed['users'])} users, {len(seed['channels'])} ch.")
        print(
            f"# seeded {users} users, {channels} channels in {time.monotonic() - t0:.1f}s",
            flush=True,
        )
        return seed

    def start_nodes(
        self,
        names: Sequence[str],
        *,
        database_url: str,
        log_dir: Path,
        cpus: Sequence[int | None],
        redis: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> list[ChatNodeProcess]:
        """Start nodes (node i on ``cpus[i]``) in parallel and wait until all are ready."""
        nodes = []
        for name, cpu in zip(names, cpus, strict=True):
            node = ChatNodeProcess(
                name,
                database_url=database_url,
                redis_url=self.redis_url if redis else "",
                secret_key=SECRET,
                extra_env={**NODE_ENV, **(extra_env or {})},
                log_dir=log_dir,
                startup_timeout=60,
                stop_timeout=15,
            )
            self.nodes.append(node)
            nodes.append(node)
            with on_cpu(cpu):
                node.spawn()
        for node in nodes:
            node.wait_ready()
        return nodes

    def stop_nodes(self, nodes: Sequence[ChatNodeProcess]) -> None:
        for node in nodes:
            node.close()
            if node in self.nodes:
                self.nodes.remove(node)

    # -- CPU ----------------------------------------------------------------------------

    def infra_cpu_ns(self) -> dict[str, int]:
        """Like :meth:`infra_cpu`, in ns from schedstat."""
        out = {}
        pm = self.postmaster_pid
        if pm is not None:
            out["postgres"] = cpu_ns(pm)
        if self.redis is not None and self.redis.pid is not None:
            out["redis"] = cpu_ns(self.redis.pid)
        return out

    def infra_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by PostgreSQL (all backends) and Redis."""
        out = {}
        pm = self.postmaster_pid
        if pm is not None:
            out["postgres"] = cpu_seconds(pm)
        if self.redis is not None and self.redis.pid is not None:
            out["redis"] = cpu_seconds(self.redis.pid)
        return out
