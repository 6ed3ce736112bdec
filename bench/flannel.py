"""Flannel benchmarks (issue 8): ``python -m bench.flannel [--parts P,...]``.

Four parts, each a ratio against a baseline measured in the same run (``--parts``, default
all; see bench/README.md and docs/benchmarks.md, "Flannel"):

1. ``bootstrap``: bytes a client receives to draw its first screen. Workspaces of
   ``--sizes`` users (default 1,500 and 32,000; ``chat admin seed`` with ``--channels``
   public channels, everyone in every one), in which the measured user also has ``--dms``
   DMs (the last a group DM of three); ``--posts`` messages in each of its channels. The slim
   path: through Flannel, ``hello`` + the ``auth`` reply + the ``bootstrap`` reply. The
   baseline, from the chat tier alone: bench/resume.py's fresh path as it is
   (:func:`bench.resume.bootstrap`: ``users.list`` every page, ``channels.list`` member_only,
   ``reads.counts``, ``messages.history`` limit 50 for every channel), with the bytes of each
   request kind from a second, sequential pass (so the ratio without the histories is shown
   too). Also: the chat node's own in-process ``bootstrap`` (the same bytes, as a check),
   and the first bootstrap of each workspace through Flannel, which loads its cache (wall
   time, and Flannel's RSS before and after: memory per cached user in the process).
2. ``autocomplete``: a workspace of ``--ac-users`` (default 100,000); the measured user has a
   private channel of ``--ac-members`` and ``--ac-recent`` DMs. Through Flannel, one request
   in flight: ``users.autocomplete`` (prefixes of 1 to 4 characters of seeded handles and
   names, ~5% misses; ``channel_id`` = that channel) and the baseline ``ping`` (answered by
   Flannel itself), interleaved; request-to-reply p50/p99 of each. The in-process figure is
   bench/autocomplete.py's, cited from its latest result file.
3. ``memory``: a :class:`flannel.cache.WorkspaceCache` of N users (``--cache-sizes``; names
   from bench/autocomplete.py, a #general of everyone plus one channel of ~100 per user),
   ``tracemalloc`` bytes per user, against the same users held alone in a dict (the least
   any cache holds). Memory per idle client connection comes from ``fanout`` below.
4. ``fanout``: bench/fanout.py's machinery (wsblast receivers, poster, rounds interleaved:
   bare, chat, flannel, ...), with a third server kind: receivers and the poster connect to
   a Flannel node in front of a chat node on a fresh copy of the seeded store. Frames/s
   received, flannel / chat per round; CPU per delivered frame across both tiers (Flannel +
   chat node + PostgreSQL with ``--store postgres``; from /proc); memory per idle connection
   (RSS delta of the server the clients connect to with N authenticated receivers vs
   none, and of the chat node behind Flannel).

Processes: the chat node (with PostgreSQL and Redis under ``--store postgres``) and Flannel
on CPU 0, the harness, wsblast and the posters on CPU 1 (``--no-pin``: nowhere). Loopback
only; every process is started here and stopped by PID, also after an error, Ctrl-C or
SIGTERM; every wait has a limit (``--timeout``) and every loop a count. Results go to
``bench/results/flannel-<date>.json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import fanout
from bench.autocomplete import MISSES, make_user
from bench.autocomplete import summary as latency_summary
from bench.fanout import (
    CLIENT_CPU,
    REPO,
    RESULTS,
    SERVER_CPU,
    BareTarget,
    BenchError,
    ChatTarget,
    Prepared,
    Proc,
    Round,
    Target,
    fmt,
    free_port,
    machine_info,
    median,
    rss_bytes,
    wait_ready,
    write_results,
)
from bench.infra import Infra, cpu_ns
from bench.resume import Counted, open_ws
from bench.resume import bootstrap as fresh_bootstrap
from bench.resume import post as post_messages
from chat import wire
from flannel.cache import WorkspaceCache

PARTS = ("bootstrap", "autocomplete", "memory", "fanout")
FANOUT_KINDS = ("bare", "chat", "flannel")
# The chat node accepts service connections signed with this key; Flannel signs with it.
SERVICE_KEY = "bench=flannel-bench-service-key-not-for-production-0123456789"
GOAL_BOOTSTRAP_BYTES = 4096
GOAL_CONN_BYTES = 16 * 1024
GOAL_FANOUT_RATIO = 0.8
LEAN_PARTS = ["channels", "users"]
MAX_FRAMES_PER_REPLY = 10_000  # frames read while waiting for one reply (events between)


# ----------------------------------------------------------------------------- processes


def flannel_env(upstream_port: int, extra: Sequence[str]) -> dict[str, str]:
    """Flannel's environment: ours without CHAT_*/FLANNEL_* (a shell's setting would change
    what is measured), the upstream and key, limits out of the way, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "FLANNEL_"))}
    env.update(
        FLANNEL_UPSTREAM=json.dumps([f"ws://127.0.0.1:{upstream_port}/service"]),
        FLANNEL_SERVICE_KEY=SERVICE_KEY,
        FLANNEL_NODE_ID="flannel-bench",
        FLANNEL_RATE_LIMIT_PER_10S="100000",
        FLANNEL_LOG_LEVEL="warning",
        FLANNEL_DRAIN_PERIOD_S="0.5",
        FLANNEL_SHUTDOWN_GRACE_S="1",
        # A bound, not a speed: the load of a 100,000-user workspace may pass the default
        # 10 s on a 2-core machine shared with the chat node (its time is reported).
        FLANNEL_UPSTREAM_TIMEOUT_S="60",
        PYTHONUNBUFFERED="1",
    )
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def flannel_argv(python: str, port: int) -> list[str]:
    return [python, "-m", "flannel", "serve", "--host", "127.0.0.1", "--port", str(port)]


def start_flannel(
    args: argparse.Namespace, upstream_port: int, log_dir: Path, cpu: int | None
) -> tuple[Proc, int]:
    """A Flannel node in front of the chat node on ``upstream_port``; returns it once its
    ``/readyz`` is 200 (its service connections are up), and its port."""
    port = free_port()
    proc = Proc(
        "flannel",
        flannel_argv(args.python, port),
        log=log_dir / "flannel.log",
        cpu=cpu,
        env=flannel_env(upstream_port, args.flannel_env),
        pipes=False,
    )
    try:
        wait_ready(proc, port, args.timeout)
    except BaseException:
        proc.stop()
        raise
    return proc, port


class Tiers:
    """For the bootstrap and autocomplete parts: one store (SQLite, or PostgreSQL + Redis),
    one chat node that accepts service connections, one Flannel node in front of it."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.cpu = SERVER_CPU if args.pin else None
        self.postgres = args.store == "postgres"
        self.infra = Infra(cpu=self.cpu, redis=self.postgres, python=args.python)
        self.seed_env: dict[str, str] = {}
        self.node_env: dict[str, str] = {"CHAT_SERVICE_KEYS": SERVICE_KEY}
        self.chat_extra: dict[str, str] = {}
        for item in args.chat_env:  # for the seed and the node, as bench/fanout.py does
            key, _, value = item.partition("=")
            self.chat_extra[key] = value
        self.chat_url = ""
        self.chat_pid: int | None = None
        self.flannel: Proc | None = None
        self.flannel_url = ""

    def open_store(self) -> None:
        if self.postgres:
            self.infra.start()
            self.seed_env = {"CHAT_DATABASE_URL": self.infra.create_database("flannel_bench")}
        else:
            path = str(self.workdir / "flannel-bench.sqlite3")
            self.seed_env = {"CHAT_SQLITE_PATH": path}
            self.node_env["CHAT_SQLITE_PATH"] = path
        # (bench.infra sets these two for the seed itself; the secret is the nodes' too)
        fixed = ("CHAT_SECRET_KEY", "CHAT_LOG_LEVEL")
        self.seed_env |= {k: v for k, v in self.chat_extra.items() if k not in fixed}
        self.node_env |= self.chat_extra

    def seed(self, workspace: str, users: int, channels: int) -> dict[str, Any]:
        return self.infra.seed(self.seed_env, workspace, users, channels)

    def start(self) -> None:
        (node,) = self.infra.start_nodes(
            ["chat"],
            database_url=self.seed_env.get("CHAT_DATABASE_URL", ""),
            log_dir=self.workdir,
            cpus=[self.cpu],
            redis=self.postgres,
            extra_env=self.node_env,
        )
        self.chat_url, self.chat_pid = node.url, node.pid
        self.flannel, port = start_flannel(self.args, node.port, self.workdir, self.cpu)
        self.flannel_url = f"ws://127.0.0.1:{port}/"
        print(f"# chat node on {node.port}, Flannel on {port}", flush=True)

    def flannel_rss(self) -> int:
        assert self.flannel is not None
        return rss_bytes(self.flannel.pid)

    def close(self) -> None:
        flannel, self.flannel = self.flannel, None
        try:
            if flannel is not None:
                flannel.stop()
        finally:
            self.infra.close()


# ------------------------------------------------------------------------------- clients


class Requester:
    """Requests on one authenticated connection, one at a time, each answered by the frame
    naming its id (frames in between, events, are read and counted)."""

    def __init__(self, conn: Counted, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self._ids = 0

    async def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._ids += 1
        rid = f"q{self._ids}"
        await self.conn.send({"type": kind, "id": rid, **fields})
        async with asyncio.timeout(self.timeout):
            for _ in range(MAX_FRAMES_PER_REPLY):
                frame = await self.conn.recv()
                if frame.get("reply_to") != rid:
                    continue
                if frame.get("type") != "reply":
                    raise BenchError(f"{kind} failed: {frame!r}"[:300])
                data: dict[str, Any] = frame["data"]
                return data
        raise BenchError(f"{kind}: no reply among {MAX_FRAMES_PER_REPLY} frames")

    async def timed(self, kind: str, **fields: Any) -> tuple[int, dict[str, Any]]:
        """(ns from the send to the decoded reply, the reply's data)."""
        t0 = time.perf_counter_ns()
        data = await self.call(kind, **fields)
        return time.perf_counter_ns() - t0, data


async def slim_bootstrap(
    url: str, token: str, timeout: float, parts: list[str] | None = None
) -> dict[str, Any]:
    """Connect, ``auth``, ``bootstrap`` (all parts, or ``parts``): every byte received from
    ``hello`` on."""
    t0 = time.perf_counter()
    async with asyncio.timeout(timeout), open_ws(url) as c:
        await c.auth(token)
        t_auth = time.perf_counter()
        before = c.bytes
        fields = {} if parts is None else {"parts": parts}
        data = await Requester(c, timeout).call("bootstrap", **fields)
        t_end = time.perf_counter()
    channels = data.get("channels") or []
    return {
        "wall_ms": (t_end - t0) * 1000,
        "auth_reply_ms": (t_auth - t0) * 1000,
        "bytes": c.bytes,
        "frames": c.frames,
        "bootstrap_reply_bytes": c.bytes - before,
        "channels": len(channels),
        "dms": sum(ch["kind"] in ("dm", "group_dm") for ch in channels),
        "users": len(data.get("users") or []),
        "unread": sum(ch["unread"] for ch in channels),
    }


async def fresh_by_kind(url: str, token: str, timeout: float) -> dict[str, int]:
    """bench/resume.py's fresh path, one request at a time: the bytes received for each
    kind of request (every page of users.list and channels.list, a history per channel)."""
    async with asyncio.timeout(timeout), open_ws(url) as c:
        await c.auth(token)
        out = {"hello + auth": c.bytes}
        r = Requester(c, timeout)

        async def paged(kind: str, key: str, **fields: Any) -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            cursor: int | None = 0
            for _ in range(10_000):
                page = await r.call(kind, cursor=cursor, limit=1000, **fields)
                items += page[key]
                cursor = page["next_cursor"]
                if cursor is None:
                    return items
            raise BenchError(f"{kind}: too many pages")

        mark = c.bytes
        await paged("users.list", "users")
        out["users.list"], mark = c.bytes - mark, c.bytes
        channels = await paged("channels.list", "channels", member_only=True)
        out["channels.list"], mark = c.bytes - mark, c.bytes
        await r.call("reads.counts")
        out["reads.counts"], mark = c.bytes - mark, c.bytes
        for ch in channels:
            await r.call("messages.history", channel_id=ch["id"], limit=50)
        out["messages.history"] = c.bytes - mark
    return out


# ------------------------------------------------------------------------------ bootstrap


async def shape_for_bootstrap(
    chat_url: str, seed: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The measured user (users[1]) opens ``--dms`` DMs (the last, when there are two or
    more, a group DM of three); ``--posts`` messages go into each of its channels: the
    owner posts in the public ones, a partner in each DM. Through the chat node."""
    users = seed["users"]
    me = users[1]
    dm_ids: list[int] = []
    async with asyncio.timeout(args.timeout), open_ws(chat_url) as c:
        await c.auth(me["token"])
        r = Requester(c, args.timeout)
        for k in range(args.dms):
            group = args.dms > 1 and k == args.dms - 1
            partners = [users[2 + k]["id"]] + ([users[3 + k]["id"]] if group else [])
            data = await r.call("dms.open", user_ids=partners)
            dm_ids.append(int(data["channel"]["id"]))
    public = [int(ch["id"]) for ch in seed["channels"]]
    if args.posts:
        await post_messages(chat_url, users[0]["token"], public, args.posts * len(public), 20)
        for k, cid in enumerate(dm_ids):
            await post_messages(chat_url, users[2 + k]["token"], [cid], args.posts, 20)
    return {"channels": len(public) + len(dm_ids), "dms": len(dm_ids)}


async def bootstrap_size(
    tiers: Tiers, seed: dict[str, Any], size: int, args: argparse.Namespace
) -> dict[str, Any]:
    token = seed["users"][1]["token"]
    shape = await shape_for_bootstrap(tiers.chat_url, seed, args)
    await asyncio.sleep(args.settle)
    # The first bootstrap through Flannel loads the workspace's cache (not counted below).
    rss0 = tiers.flannel_rss()
    first = await slim_bootstrap(tiers.flannel_url, token, args.timeout)
    await asyncio.sleep(args.settle)
    rss1 = tiers.flannel_rss()
    by_kind = await fresh_by_kind(tiers.chat_url, token, args.timeout)
    # The auth reply already carries the user and the workspace's name: a client may ask
    # for the other two parts only.
    lean = await slim_bootstrap(tiers.flannel_url, token, args.timeout, LEAN_PARTS)
    try:
        in_chat: dict[str, Any] | None = await slim_bootstrap(tiers.chat_url, token, args.timeout)
        chat_error = None
    except BenchError as exc:  # a chat node that does not answer bootstrap in-process
        in_chat, chat_error = None, str(exc)
    rounds = []
    for i in range(1, args.rounds + 1):
        r: dict[str, Any] = {"round": i}
        for kind in ("slim", "fresh") if i % 2 else ("fresh", "slim"):
            if kind == "slim":
                r[kind] = await slim_bootstrap(tiers.flannel_url, token, args.timeout)
            else:
                async with asyncio.timeout(args.timeout):
                    r[kind] = await fresh_bootstrap(tiers.chat_url, token, args.inflight)
        slim, fresh = r["slim"], r["fresh"]
        r["ok"] = (
            slim["channels"] == fresh["channels"] == shape["channels"]
            and slim["dms"] == shape["dms"]
            and fresh["users"] >= size
        )
        rounds.append(r)
        print(
            f"#   {size:,} users, round {i}: slim {slim['bytes']:,} B {slim['wall_ms']:.1f} ms"
            f" | fresh {fresh['bytes']:,} B {fresh['wall_ms']:.1f} ms"
            + ("" if r["ok"] else "  WARNING: channels/users differ"),
            flush=True,
        )
    slim_b = median([r["slim"]["bytes"] for r in rounds])
    fresh_b = median([r["fresh"]["bytes"] for r in rounds])
    no_history = sum(v for k, v in by_kind.items() if k != "messages.history")
    return {
        "users": size,
        "shape": shape,
        "first_through_flannel": first,
        "lean_parts": LEAN_PARTS,
        "lean_bytes": lean["bytes"],
        "flannel_rss_before_load": rss0,
        "flannel_rss_after_load": rss1,
        "flannel_rss_per_cached_user": (rss1 - rss0) / size,
        "fresh_bytes_by_kind": by_kind,
        "fresh_bytes_by_kind_total": sum(by_kind.values()),
        "fresh_bytes_without_history": no_history,
        "chat_inprocess_bootstrap": in_chat,
        "chat_inprocess_error": chat_error,
        "rounds": rounds,
        "ok": all(r["ok"] for r in rounds),
        "slim_bytes": slim_b,
        "fresh_bytes": fresh_b,
        "slim_wall_ms": median([r["slim"]["wall_ms"] for r in rounds]),
        "fresh_wall_ms": median([r["fresh"]["wall_ms"] for r in rounds]),
        "ratio_fresh_over_slim": fresh_b / slim_b if fresh_b is not None and slim_b else None,
        "ratio_fresh_without_history_over_slim": no_history / slim_b if slim_b else None,
        "slim_within_goal": slim_b is not None and slim_b <= GOAL_BOOTSTRAP_BYTES,
    }


# --------------------------------------------------------------------------- autocomplete


def queries_from_handles(rng: random.Random, handles: list[str], count: int) -> list[str]:
    """What people type after "@": 1 to 4 characters of a seeded handle, or of its first or
    last name (``first.last[N]``), as typed (capitalized half the time), or ~5% misses."""
    out: list[str] = []
    for _ in range(count):
        if rng.random() < 0.05:
            out.append(rng.choice(MISSES))
            continue
        handle = rng.choice(handles)
        first, _, last = handle.partition(".")
        source = rng.choice([handle, first, last.rstrip("0123456789") or first])
        query = source[: rng.randint(1, 4)]
        out.append(query.capitalize() if rng.random() < 0.5 else query)
    return out


async def shape_for_autocomplete(
    chat_url: str, seed: dict[str, Any], args: argparse.Namespace
) -> int:
    """The measured user's private channel of ``--ac-members`` and its ``--ac-recent`` DMs
    (its recent contacts), through the chat node; returns the channel's id."""
    users = seed["users"]
    ids = [int(u["id"]) for u in users]
    rng = random.Random(args.seed)
    async with asyncio.timeout(args.timeout), open_ws(chat_url) as c:
        await c.auth(users[1]["token"])
        r = Requester(c, args.timeout)
        data = await r.call("channels.create", name="ac-bench", private=True)
        cid = int(data["channel"]["id"])
        others = rng.sample(ids[2:], min(args.ac_members - 1, len(ids) - 2))
        for start in range(0, len(others), 1000):
            await r.call("channels.invite", channel_id=cid, user_ids=others[start : start + 1000])
        for k in range(min(args.ac_recent, len(ids) - 2)):
            await r.call("dms.open", user_ids=[ids[2 + k]])
    return cid


def inprocess_citation() -> dict[str, Any] | None:
    """bench/autocomplete.py's latest result (in process, no sockets), as recorded."""
    files = sorted(RESULTS.glob("autocomplete-*.json"))
    if not files:
        return None
    doc = json.loads(files[-1].read_text())
    result = doc.get("result", {})
    return {
        "file": str(files[-1].relative_to(REPO)),
        "users": result.get("users"),
        "members": result.get("members"),
        "complete": result.get("complete"),
        "bytes_per_user": result.get("bytes_per_user"),
    }


async def autocomplete_part(
    tiers: Tiers, seed: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    cid = await shape_for_autocomplete(tiers.chat_url, seed, args)
    await asyncio.sleep(args.settle)
    rng = random.Random(args.seed)
    handles = [u["handle"] for u in seed["users"]]
    queries = queries_from_handles(rng, handles, args.ac_warmup + args.ac_queries)
    size = len(seed["users"])
    token = seed["users"][1]["token"]
    ping: list[int] = []
    complete: list[int] = []
    results: list[int] = []
    # The workspace has no client at Flannel yet: its first client's connect starts the
    # cache load, and its first request waits for it (timed apart, not counted).
    rss0 = tiers.flannel_rss()
    t0 = time.perf_counter_ns()
    async with open_ws(tiers.flannel_url) as c:
        async with asyncio.timeout(args.timeout):
            await c.auth(token)
        r = Requester(c, args.timeout)
        await r.call("users.autocomplete", query="a", channel_id=cid)
        first_ns = time.perf_counter_ns() - t0
        await asyncio.sleep(args.settle)
        rss1 = tiers.flannel_rss()
        for i, q in enumerate(queries):
            pair: list[tuple[str, dict[str, Any]]] = [
                ("ping", {}),
                ("users.autocomplete", {"query": q, "channel_id": cid, "limit": args.ac_limit}),
            ]
            if i % 2:  # alternate the order, so neither always follows the other
                pair.reverse()
            for kind, fields in pair:
                ns, data = await r.timed(kind, **fields)
                if i < args.ac_warmup:
                    continue
                if kind == "ping":
                    ping.append(ns)
                else:
                    complete.append(ns)
                    results.append(len(data["users"]))
    p, a = latency_summary(ping), latency_summary(complete)
    return {
        "users": size,
        "channel_members": min(args.ac_members, size - 1),
        "recent": min(args.ac_recent, size - 2),
        "limit": args.ac_limit,
        "queries": len(complete),
        "warmup": args.ac_warmup,
        "first_answer_ms": first_ns / 1e6,
        "flannel_rss_before_load": rss0,
        "flannel_rss_after_load": rss1,
        "flannel_rss_per_cached_user": (rss1 - rss0) / size,
        "empty_answers": sum(1 for n in results if n == 0),
        "mean_results": sum(results) / len(results) if results else None,
        "ping": p,
        "autocomplete": a,
        "ratio_p50": a["p50_us"] / p["p50_us"] if p["p50_us"] else None,
        "ratio_p99": a["p99_us"] / p["p99_us"] if p["p99_us"] else None,
        "p50_minus_ping_us": a["p50_us"] - p["p50_us"],
        "p99_minus_ping_us": a["p99_us"] - p["p99_us"],
        "inprocess": inprocess_citation(),
    }


def run_tiers(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The bootstrap and autocomplete parts: seed every workspace, start the chat node and
    Flannel once, measure, stop everything."""
    tiers = Tiers(args, workdir)
    out: dict[str, Any] = {}
    try:
        tiers.open_store()
        seeds: dict[int, dict[str, Any]] = {}
        if "bootstrap" in args.parts:
            for size in args.sizes:
                seeds[size] = tiers.seed(f"boot{size}", size, args.channels)
        ac_seed = None
        if "autocomplete" in args.parts:
            ac_seed = tiers.seed(f"ac{args.ac_users}", args.ac_users, 1)
        tiers.start()
        if seeds:
            print("# part: bootstrap", flush=True)
            sizes = [asyncio.run(bootstrap_size(tiers, s, n, args)) for n, s in seeds.items()]
            out["bootstrap"] = {"sizes": sizes}
        if ac_seed is not None:
            print(f"# part: autocomplete ({args.ac_users:,} users)", flush=True)
            out["autocomplete"] = asyncio.run(autocomplete_part(tiers, ac_seed, args))
    except BaseException:
        if tiers.flannel is not None:
            print(f"# flannel log:{tiers.flannel.tail()}", file=sys.stderr)
        raise
    finally:
        tiers.close()
    return out


# --------------------------------------------------------------------------------- memory


def traced_bytes(build: Callable[[], object]) -> int:
    """Bytes ``build()``'s result keeps allocated (tracemalloc, after a collection)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


def synthetic_workspace(n: int, seed: int) -> WorkspaceCache:
    """N users (bench/autocomplete.py's names), #general with everyone, and one more
    channel of ~100 members per user."""
    rng = random.Random(seed)
    taken: set[str] = set()
    users = [make_user(rng, uid, taken) for uid in range(1, n + 1)]
    groups = max(1, n // 100)
    channels = [
        wire.Channel(
            id=cid,
            workspace_id=1,
            kind="public",
            name="general" if cid == 1 else f"team-{cid}",
            created_by=1,
            created_at=0,
        )
        for cid in range(1, groups + 2)
    ]
    ids = [u.id for u in users]
    members = [(1, ids)] + [(2 + g, ids[g::groups]) for g in range(groups)]
    return WorkspaceCache(1, "bench", 0, users, channels, members, [])


def users_alone(n: int, seed: int) -> dict[int, wire.User]:
    rng = random.Random(seed)
    taken: set[str] = set()
    return {uid: make_user(rng, uid, taken) for uid in range(1, n + 1)}


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for n in args.cache_sizes:
        cache = traced_bytes(functools.partial(synthetic_workspace, n, args.seed))
        alone = traced_bytes(functools.partial(users_alone, n, args.seed))
        sample = list(users_alone(min(n, 1000), args.seed).values())
        json_bytes = sum(len(u.model_dump_json()) for u in sample) / len(sample)
        row = {
            "users": n,
            "cache_bytes": cache,
            "cache_bytes_per_user": cache / n,
            "users_alone_bytes_per_user": alone / n,
            "ratio_cache_over_users_alone": cache / alone if alone else None,
            "user_json_bytes": json_bytes,
        }
        rows.append(row)
        print(
            f"#   {n:,} users: cache {cache / n:,.0f} B/user, users alone {alone / n:,.0f}",
            flush=True,
        )
    return {"sizes": rows}


# -------------------------------------------------------------------------------- fan-out


class FlannelTarget(Target):
    """bench/fanout.py's third server kind: Flannel in front of a chat node.

    Each round, :meth:`prepare` takes the chat target's fresh copy of the seeded store and
    starts a chat node on it (with the service key), pinned like the server; the round then
    starts Flannel as its server: receivers and the poster connect to Flannel, exactly as
    to the chat server (same tokens, same frames). :meth:`finish_round` stops the chat node
    (by PID) and drops the round's database."""

    name = "flannel"
    ready_frames = ChatTarget.ready_frames
    ready_match = ChatTarget.ready_match
    fail_match = ChatTarget.fail_match
    count_match = ChatTarget.count_match
    heartbeat_text = ChatTarget.heartbeat_text

    def __init__(self, args: argparse.Namespace, chat: ChatTarget, flannel_extra: list[str]):
        super().__init__(args)
        self.chat = chat
        self.ws_path = chat.ws_path
        self.heartbeat_ms = chat.heartbeat_ms
        self.flannel_extra = flannel_extra
        self.node: Proc | None = None

    def prepare(self, rounddir: Path, receivers: int) -> Prepared:
        prep = self.chat.prepare(rounddir, receivers)
        port = free_port()
        self.node = Proc(
            "chat-node",
            self.chat.server_argv(port),
            log=rounddir / "chat-node.log",
            cpu=SERVER_CPU if self.args.pin else None,
            env={**prep.env, "CHAT_SERVICE_KEYS": SERVICE_KEY},
            pipes=False,
        )
        try:
            wait_ready(self.node, port, self.args.start_timeout)
        except BaseException:
            self.finish_round()
            raise
        return Prepared(prep.auth_lines, prep.poster_args, flannel_env(port, self.flannel_extra))

    def server_argv(self, port: int) -> list[str]:
        return flannel_argv(self.args.python, port)

    def upstream_pid(self) -> int | None:
        return self.node.pid if self.node is not None else None

    def finish_round(self) -> None:
        node, self.node = self.node, None
        try:
            if node is not None:
                node.stop()
        finally:
            self.chat.finish_round()

    def store_pid(self) -> int | None:
        return self.chat.store_pid()


class TierRound(Round):
    """A bench/fanout.py round that also accounts for the chat node behind Flannel: its CPU
    in each phase (so CPU per delivered frame covers both tiers: the server the clients
    connect to, the chat node behind it, PostgreSQL), and its RSS just before the receivers
    connect and once they are all ready (read next to the round's readings of the server's:
    as wsblast starts, and as the first phase starts)."""

    def __init__(self, target: Target, args: argparse.Namespace, number: int, workdir: Path):
        super().__init__(target, args, number, workdir)
        self.upstream_rss: list[int] = []

    def _upstream(self) -> int | None:
        return self.t.upstream_pid() if isinstance(self.t, FlannelTarget) else None

    def _read_upstream_rss(self) -> None:
        pid = self._upstream()
        if pid is not None:
            self.upstream_rss.append(rss_bytes(pid))

    def start(self, name: str, argv: Sequence[str], cpu: str, **kw: Any) -> Proc:
        if name == "wsblast":
            self._read_upstream_rss()
        return super().start(name, argv, cpu, **kw)

    def phase(self, server: Proc, blast: Proc, poster: Proc, count: int) -> dict[str, Any]:
        if len(self.upstream_rss) == 1:
            self._read_upstream_rss()
        # Every server-side process, in ns (schedstat: the round's own figures are in clock
        # ticks, too coarse for short runs), over the same phase.
        pids = {"server": server.pid, "upstream": self._upstream(), "store": self.t.store_pid()}
        before = {k: cpu_ns(p) for k, p in pids.items() if p is not None}
        out = super().phase(server, blast, poster, count)
        used = {k: (cpu_ns(p) - before[k]) / 1e9 for k, p in pids.items() if p is not None}
        tiers = sum(used.values())
        upstream = used.get("upstream")
        out["tiers_cpu_s_by_process"] = {k: round(v, 4) for k, v in used.items()}
        out["upstream_cpu_s"] = round(upstream, 4) if upstream is not None else None
        out["upstream_cpu_util"] = (
            round(upstream / out["wall_s"], 3) if upstream is not None else None
        )
        out["tiers_cpu_s"] = round(tiers, 4)
        out["tiers_cpu_us_per_frame"] = (
            round(tiers / out["frames"] * 1e6, 3) if out["frames"] else None
        )
        return out

    def run(self) -> dict[str, Any]:
        result = super().run()
        if len(self.upstream_rss) >= 2:
            before, after = self.upstream_rss[:2]
            result["upstream_rss_before"], result["upstream_rss_connected"] = before, after
            result["upstream_mem_per_conn_bytes"] = round((after - before) / self.args.members)
        return result


def fanout_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench/fanout.py's own arguments for our settings (every field its rounds read)."""
    argv = ["--members", str(args.members), "--messages", str(args.messages)]
    argv += ["--window", str(args.window), "--rate", str(args.rate)]
    argv += ["--duration", str(args.duration), "--rounds", str(args.fanout_rounds)]
    argv += ["--store", args.store, "--python", args.python]
    argv += ["--start-timeout", str(args.timeout)]
    for item in args.chat_env:
        argv += ["--chat-env", item]
    if not args.pin:
        argv.append("--no-pin")
    return fanout.parse_args(argv)


def fanout_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fargs = fanout_args(args)
    fanout.build_wsblast()
    chat = ChatTarget(fargs)
    targets: dict[str, Target] = {}
    for kind in args.fanout_kinds:
        if kind == "bare":
            targets[kind] = BareTarget(fargs)
        elif kind == "chat":
            targets[kind] = chat
        else:
            targets[kind] = FlannelTarget(fargs, chat, args.flannel_env)
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
    rounddir = workdir / "fanout"
    rounddir.mkdir()
    try:
        if "chat" in targets or "flannel" in targets:
            chat.setup(rounddir, fargs.members)
        for i in range(1, fargs.rounds + 1):
            for kind, target in targets.items():  # interleaved: bare, chat, flannel, ...
                print(f"#   round {i}/{fargs.rounds}: {kind}", flush=True)
                r = TierRound(target, fargs, i, rounddir).run()
                rounds[kind].append(r)
                b = r["burst"]
                print(
                    f"#     {fmt(b['frames_per_s'])} frames/s, "
                    f"{r['mem_per_conn_bytes'] / 1024:.1f} KiB/conn"
                    + (
                        f" (+{r['upstream_mem_per_conn_bytes'] / 1024:.1f} KiB on the chat node)"
                        if "upstream_mem_per_conn_bytes" in r
                        else ""
                    )
                    + f", {fmt(b['tiers_cpu_us_per_frame'], '.2f')} µs CPU/frame"
                    + ("" if b["lossless"] else ", NOT lossless"),
                    flush=True,
                )
    finally:
        chat.close()
    summary = {k: summarize_fanout(v) for k, v in rounds.items()}
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(fargs).items()},
        "store_info": chat.store_info,
        "summary": summary,
        "ratios": fanout_ratios(rounds, summary),
        "rounds": rounds,
    }


def summarize_fanout(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s = fanout.summarize(rounds)
    s["mem_per_conn_kib"] = s["mem_per_conn_bytes"] / 1024
    s["lossless"] = s["burst_lossless"] and s.get("steady_lossless", True)
    s["tiers_cpu_us_per_frame"] = median([r["burst"]["tiers_cpu_us_per_frame"] for r in rounds])
    s["upstream_cpu_util"] = median([r["burst"]["upstream_cpu_util"] for r in rounds])
    upstream = [
        r["upstream_mem_per_conn_bytes"] for r in rounds if "upstream_mem_per_conn_bytes" in r
    ]
    s["upstream_mem_per_conn_bytes"] = median(upstream)
    return s


def fanout_ratios(
    rounds: dict[str, list[dict[str, Any]]], summary: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per-round ratios of the kinds run side by side (round i of each), and their medians."""
    out: dict[str, Any] = {}
    for a, b in (("flannel", "chat"), ("flannel", "bare"), ("chat", "bare")):
        if a not in rounds or b not in rounds:
            continue
        for key, path in (
            ("frames_per_s", ("burst", "frames_per_s")),
            ("tiers_cpu_us_per_frame", ("burst", "tiers_cpu_us_per_frame")),
            ("mem_per_conn_bytes", ("mem_per_conn_bytes",)),
        ):
            per = [
                va / vb
                for ra, rb in zip(rounds[a], rounds[b], strict=True)
                if (va := _dig(ra, path)) is not None and (vb := _dig(rb, path))
            ]
            out[f"{a}_over_{b}_{key}_per_round"] = [round(x, 3) for x in per]
            out[f"{a}_over_{b}_{key}"] = median(per)
    return out


def _dig(d: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = d
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


# ---------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    pins = (
        f"chat node, Flannel{', PostgreSQL, Redis' if args.store == 'postgres' else ''} on "
        f"CPU {SERVER_CPU}; clients on CPU {CLIENT_CPU}"
        if args.pin
        else "nothing pinned"
    )
    store = "PostgreSQL + Redis" if args.store == "postgres" else "SQLite (embedded)"
    lines = [f"Flannel benchmarks; chat store: {store}; {pins}."]
    if "bootstrap" in results:
        lines += ["", *bootstrap_table(results["bootstrap"], args)]
    if "autocomplete" in results:
        lines += ["", *autocomplete_table(results["autocomplete"])]
    if "memory" in results or "bootstrap" in results or "autocomplete" in results:
        lines += ["", *memory_table(results)]
    if "fanout" in results:
        lines += ["", *fanout_table(results["fanout"], args)]
    return "\n".join(lines)


def bootstrap_table(part: dict[str, Any], args: argparse.Namespace) -> list[str]:
    sizes = part["sizes"]
    head = "| | " + " | ".join(f"{s['users']:,} users" for s in sizes) + " |"
    sep = "|---|" + "---:|" * len(sizes)

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(s) for s in sizes) + " |"

    def kind(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: fmt(s["fresh_bytes_by_kind"].get(name))

    def in_chat(s: dict[str, Any]) -> str:
        b = s["chat_inprocess_bootstrap"]
        return fmt(b["bytes"]) if b is not None else "error"

    return [
        f"**Bootstrap bytes** (member of {args.channels} public channels + {args.dms} DMs, "
        f"{args.posts} messages in each; median of {args.rounds} rounds): slim = hello + auth "
        "reply + bootstrap reply through Flannel; fresh = bench/resume.py's fresh path from "
        "the chat node (users.list every page, channels.list member_only, reads.counts, "
        "messages.history limit 50 per channel).",
        "",
        head,
        sep,
        row("**slim bootstrap through Flannel (bytes)**", lambda s: f"**{fmt(s['slim_bytes'])}**"),
        row(
            "  of which the bootstrap reply",
            lambda s: fmt(s["rounds"][0]["slim"]["bootstrap_reply_bytes"]),
        ),
        row("  the same with parts [channels, users] (bytes)", lambda s: fmt(s["lean_bytes"])),
        row("fresh path from the chat tier (bytes)", lambda s: fmt(s["fresh_bytes"])),
        row("  of which hello + auth", kind("hello + auth")),
        row("  of which users.list", kind("users.list")),
        row("  of which channels.list", kind("channels.list")),
        row("  of which reads.counts", kind("reads.counts")),
        row("  of which messages.history", kind("messages.history")),
        row("**fresh / slim**", lambda s: f"**{fmt(s['ratio_fresh_over_slim'], ',.1f')}x**"),
        row(
            "fresh without histories / slim",
            lambda s: f"{fmt(s['ratio_fresh_without_history_over_slim'], ',.1f')}x",
        ),
        row("slim ≤ 4 KiB", lambda s: "yes" if s["slim_within_goal"] else "NO"),
        row("same bootstrap from the chat node in-process (bytes)", in_chat),
        row("wall: slim, warm cache (ms)", lambda s: fmt(s["slim_wall_ms"], ",.1f")),
        row("wall: fresh path (ms)", lambda s: fmt(s["fresh_wall_ms"], ",.1f")),
        row(
            "wall: first slim bootstrap, cache load (ms)",
            lambda s: fmt(s["first_through_flannel"]["wall_ms"], ",.1f"),
        ),
        row(
            "channels / DMs / users in the bootstrap",
            lambda s: (
                f"{s['rounds'][0]['slim']['channels']} / {s['rounds'][0]['slim']['dms']}"
                f" / {s['rounds'][0]['slim']['users']}"
            ),
        ),
        row("every round consistent", lambda s: "yes" if s["ok"] else "NO"),
    ]


def autocomplete_table(a: dict[str, Any]) -> list[str]:
    p, c = a["ping"], a["autocomplete"]
    lines = [
        f"**Autocomplete through Flannel** ({a['users']:,}-user workspace, users.autocomplete "
        f"with a {a['channel_members']:,}-member channel_id and {a['recent']} recent contacts, "
        f"limit {a['limit']}; {a['queries']:,} queries after {a['warmup']} warm-up, one request "
        f"in flight, each interleaved with a ping; {a['empty_answers']:,} empty answers):",
        "",
        "| request, send to decoded reply | n | p50 (µs) | p99 (µs) | max (µs) |",
        "|---|---:|---:|---:|---:|",
        f"| ping (baseline, answered by Flannel) | {p['n']:,} | {p['p50_us']:,.0f} "
        f"| {p['p99_us']:,.0f} | {p['max_us']:,.0f} |",
        f"| **users.autocomplete** | {c['n']:,} | **{c['p50_us']:,.0f}** "
        f"| **{c['p99_us']:,.0f}** | {c['max_us']:,.0f} |",
        f"| autocomplete / ping | | {fmt(a['ratio_p50'], '.2f')}x | {fmt(a['ratio_p99'], '.2f')}x"
        " | |",
        f"| autocomplete minus ping | | {a['p50_minus_ping_us']:,.0f} "
        f"| {a['p99_minus_ping_us']:,.0f} | |",
    ]
    ip = a.get("inprocess")
    if ip and ip.get("complete"):
        ipc = ip["complete"]
        lines.append(
            f"| in process, bench/autocomplete.py ({fmt(ip['users'])} users; `{ip['file']}`) "
            f"| {ipc['n']:,} | {ipc['p50_us']:,.0f} | {ipc['p99_us']:,.0f} "
            f"| {ipc['max_us']:,.0f} |"
        )
    lines += [
        "",
        f"The first client, from its connect to its first answer (the load of the cache, "
        f"{a['users']:,} users, included): {a['first_answer_ms']:,.0f} ms.",
    ]
    return lines


def memory_table(results: dict[str, Any]) -> list[str]:
    lines = ["**Memory per cached user**"]
    mem = results.get("memory")
    if mem:
        lines += [
            "",
            "| users | WorkspaceCache (B/user, tracemalloc) | the users alone in a dict (B/user) "
            "| cache / users alone | a user as JSON (B) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in mem["sizes"]:
            lines.append(
                f"| {r['users']:,} | {r['cache_bytes_per_user']:,.0f} "
                f"| {r['users_alone_bytes_per_user']:,.0f} "
                f"| {fmt(r['ratio_cache_over_users_alone'], '.2f')}x "
                f"| {r['user_json_bytes']:,.0f} |"
            )
    loads = [
        (f"{s['users']:,} users", s["flannel_rss_per_cached_user"])
        for s in results.get("bootstrap", {}).get("sizes", [])
    ]
    if "autocomplete" in results:
        a = results["autocomplete"]
        loads.append((f"{a['users']:,} users (autocomplete)", a["flannel_rss_per_cached_user"]))
    if loads:
        cells = ", ".join(f"{label}: {b:,.0f} B/user" for label, b in loads)
        lines += ["", f"Flannel's RSS growth per user when a workspace's cache loads: {cells}."]
    return lines


def fanout_table(part: dict[str, Any], args: argparse.Namespace) -> list[str]:
    s = part["summary"]
    kinds = [k for k in FANOUT_KINDS if k in s]
    both = "flannel" in s and "chat" in s
    ratios = part["ratios"]

    def row(label: str, key: str, spec: str = ",.0f", ratio: str | None = None) -> str:
        cells = " | ".join(fmt(s[k].get(key), spec) for k in kinds)
        extra = ""
        if both:
            value = ratios.get(ratio) if ratio else None
            extra = f" {fmt(value, '.2f')}x |" if value is not None else " |"
        return f"| {label} | {cells} |" + extra

    head = "| metric | " + " | ".join(kinds) + " |" + (" flannel / chat |" if both else "")
    sep = "|---|" + "---:|" * len(kinds) + ("---:|" if both else "")
    n, m = args.members, args.messages
    lossless = " | ".join("yes" if s[k]["lossless"] else "NO" for k in kinds)
    small = " | ".join(
        "yes" if (b := s[k]["mem_per_conn_bytes"]) is not None and b < GOAL_CONN_BYTES else "NO"
        for k in kinds
    )
    fast = ratios.get("flannel_over_chat_frames_per_s")
    goal = (" yes |" if fast >= GOAL_FANOUT_RATIO else " NO |") if fast is not None else " |"
    empty = " |" * len(kinds)
    lines = [
        f"**Fan-out to {n:,} members through Flannel vs straight to the chat tier** ({m:,} "
        f"messages, window {args.window}; median of {args.fanout_rounds} rounds, kinds "
        "interleaved; ratios: median of the per-round ratios). Per-connection memory is the "
        "RSS delta of the server the clients connect to.",
        "",
        head,
        sep,
        row("**delivered frames/s**", "frames_per_s", ratio="flannel_over_chat_frames_per_s"),
        row("delivered frames/s, first post → last frame", "e2e_frames_per_s"),
        row(
            "**server CPU per delivered frame, both tiers (µs)**",
            "tiers_cpu_us_per_frame",
            ",.2f",
            ratio="flannel_over_chat_tiers_cpu_us_per_frame",
        ),
        row(
            "memory per idle connection (KiB)",
            "mem_per_conn_kib",
            ",.1f",
            ratio="flannel_over_chat_mem_per_conn_bytes",
        ),
        row("  chat node behind Flannel, per client (bytes)", "upstream_mem_per_conn_bytes"),
        row("CPU of the connected server during burst (cores)", "burst_server_cpu_util", ".2f"),
        row("CPU of the chat node behind it (cores)", "upstream_cpu_util", ".2f"),
        row(f"deliver latency p50 @ {args.rate:g} msg/s (ms)", "lat_p50_ms", ",.2f"),
        row(f"deliver latency p99 @ {args.rate:g} msg/s (ms)", "lat_p99_ms", ",.2f"),
        f"| lossless | {lossless} |" + (" |" if both else ""),
        f"| under 16 KiB per idle connection | {small} |" + (" |" if both else ""),
    ]
    if both:
        lines.append(f"| flannel / chat frames/s at least {GOAL_FANOUT_RATIO}x |{empty}{goal}")
    return lines


# ------------------------------------------------------------------------------------ main


def source_state() -> dict[str, Any]:
    """The commit and any uncommitted change under chat/ and flannel/ (both tiers import
    the working tree when they start)."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "chat", "flannel"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_rev": rev or None, "uncommitted": status.splitlines()}


def int_list(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.flannel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"among {', '.join(PARTS)}")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the chat tier's store: embedded SQLite, or PostgreSQL (+ Redis for the "
        "bootstrap and autocomplete parts), throwaway servers started here",
    )
    g = p.add_argument_group("bootstrap")
    g.add_argument("--sizes", type=int_list, default=[1500, 32000], help="workspace sizes")
    g.add_argument("--channels", type=int, default=15, help="public channels (all members)")
    g.add_argument("--dms", type=int, default=5, help="DMs of the measured user (last: group)")
    g.add_argument("--posts", type=int, default=10, help="messages in each of its channels")
    g.add_argument("--rounds", type=int, default=3, help="rounds per size (median)")
    g.add_argument("--inflight", type=int, default=16, help="fresh path: requests in flight")
    g = p.add_argument_group("autocomplete")
    g.add_argument("--ac-users", type=int, default=100_000, help="workspace size")
    g.add_argument("--ac-queries", type=int, default=2000, help="timed queries (and as many pings)")
    g.add_argument("--ac-warmup", type=int, default=200, help="untimed queries first")
    g.add_argument("--ac-members", type=int, default=1000, help="members of the channel_id")
    g.add_argument("--ac-recent", type=int, default=20, help="DMs of the measured user")
    g.add_argument("--ac-limit", type=int, default=10, help="results per query")
    g = p.add_argument_group("memory")
    g.add_argument(
        "--cache-sizes", type=int_list, default=[1000, 10_000, 100_000], help="users per cache"
    )
    g = p.add_argument_group("fanout (bench/fanout.py's meaning)")
    g.add_argument(
        "--fanout-kinds",
        default=",".join(FANOUT_KINDS),
        help=f"server kinds, interleaved per round, among {', '.join(FANOUT_KINDS)}",
    )
    g.add_argument("--members", type=int, default=1000, help="receiving connections (N)")
    g.add_argument("--messages", type=int, default=1000, help="burst: messages posted (M)")
    g.add_argument("--window", type=int, default=20, help="burst: posts in flight")
    g.add_argument("--rate", type=float, default=50.0, help="latency phase: msg/s (0: skip)")
    g.add_argument("--duration", type=float, default=5.0, help="latency phase: seconds")
    g.add_argument("--fanout-rounds", type=int, default=3, help="rounds per kind (median)")
    g = p.add_argument_group("all parts")
    g.add_argument("--seed", type=int, default=1, help="random seed (queries, members, names)")
    g.add_argument("--settle", type=float, default=1.0, help="seconds before RSS readings")
    g.add_argument("--timeout", type=float, default=120.0, help="limit for any one wait")
    g.add_argument("--no-pin", dest="pin", action="store_false", help="pin nothing")
    g.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    g.add_argument("--chat-env", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--flannel-env", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--out", type=Path, help="JSON output (default bench/results/flannel-<date>)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or any(x not in PARTS for x in args.parts):
        p.error(f"--parts: among {', '.join(PARTS)}")
    args.fanout_kinds = [x.strip() for x in args.fanout_kinds.split(",") if x.strip()]
    if not args.fanout_kinds or any(x not in FANOUT_KINDS for x in args.fanout_kinds):
        p.error(f"--fanout-kinds: among {', '.join(FANOUT_KINDS)}")
    if not args.sizes or min(args.sizes) < args.dms + 4:
        p.error("--sizes: each at least --dms + 4 users")
    if len(set(args.sizes)) != len(args.sizes):
        p.error("--sizes: each once")
    if args.channels < 1 or args.dms < 0 or args.posts < 0 or args.rounds < 1:
        p.error("--channels and --rounds must be positive; --dms and --posts not negative")
    if not 1 <= args.inflight <= 32:
        p.error("--inflight: 1..32 (the server's max_inflight_requests)")
    if args.ac_users < 3 or args.ac_queries < 1 or args.ac_warmup < 0 or args.ac_members < 1:
        p.error("--ac-users >= 3, --ac-queries and --ac-members >= 1, --ac-warmup >= 0")
    if not 1 <= args.ac_limit <= 50 or args.ac_recent < 0:
        p.error("--ac-limit: 1..50; --ac-recent >= 0")
    if not args.cache_sizes or min(args.cache_sizes) < 1:
        p.error("--cache-sizes: positive")
    if min(args.members, args.messages, args.window, args.fanout_rounds) < 1:
        p.error("--members, --messages, --window and --fanout-rounds must be positive")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin and not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        print(f"# CPUs {SERVER_CPU} and {CLIENT_CPU} not both available: not pinning")
        args.pin = False
    if args.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})  # the harness is a client: off the servers' CPU
    # SIGTERM unwinds like Ctrl-C: every process started here is stopped on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now()
    t_start = time.monotonic()
    source_start = source_state()
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="flannel-bench-"))
    results: dict[str, Any] = {}
    try:
        if "bootstrap" in args.parts or "autocomplete" in args.parts:
            results |= run_tiers(args, workdir)
        if "memory" in args.parts:
            print("# part: memory", flush=True)
            results["memory"] = memory_part(args)
        if "fanout" in args.parts:
            print("# part: fanout", flush=True)
            results["fanout"] = fanout_part(args, workdir)
    except BaseException:
        print(f"# logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(results, args)
    out = args.out or RESULTS / f"flannel-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"at_start": source_start, "at_end": source_state()}
    doc: dict[str, Any] = {
        "benchmark": "flannel",
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t_start, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info() | {"loadavg_before": load},
        "source": source,
        "parts": results,
        "table_md": table,
    }
    if source["at_start"] != source["at_end"] or source_start.get("uncommitted"):
        print("# WARNING: chat/ or flannel/ differ from the commit: see source in the JSON")
    write_results(out, doc, table)
    return 0


def cli() -> int:
    from tests.cluster import ClusterError
    from tests.pg import PostgresError

    try:
        return main()
    except (BenchError, PostgresError, ClusterError) as exc:
        print(f"flannel bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Through the importable module, like bench.fanout: one BenchError class.
    from bench import flannel

    sys.exit(flannel.cli())
