"""Resume benchmark: catching up after missing K events (default 1,000) vs a fresh bootstrap.

One chat node; a workspace of U users (default 1,000) and C channels (default 20), everyone a
member of every channel. Per store mode (``--modes``; default all three):

- ``redis``: PostgreSQL + Redis (replay from the Redis stream),
- ``postgres``: PostgreSQL, no Redis (replay from the events table),
- ``sqlite``: the embedded store (replay from its events table).

Each round: a client (users[1]) connects, authenticates, records ``session_id`` and ``seq``,
disconnects; a poster (users[0], its own connection) posts K messages round-robin over the
channels (W in flight), then the benchmark waits ``--settle`` seconds. Then, in alternating
order:

- **resume**: connect + ``auth`` with ``resume: {session_id, seq}`` → until the ``resumed``
  frame (the K missed ``message.posted`` events come before it);
- **fresh**: connect + ``auth`` + what a client needs to rebuild its state without resume:
  ``users.list`` (limit 1000, every page), ``channels.list`` (member_only, every page),
  ``reads.counts`` and ``messages.history`` (limit 50) for every channel. Requests are
  pipelined the way a client would (``--inflight`` at most; pages follow their cursor).

Measured for each: wall time (time.perf_counter, from before the TCP connect to the last frame
needed), websocket payload bytes received (every frame from ``hello`` on; no compression is
negotiated), frames received, and server CPU (node + PostgreSQL + Redis, from schedstat).
Every frame is JSON-decoded, as a client would. Medians over R rounds, and the median of the
per-round resume/fresh ratios.

Results go to ``bench/results/resume-<date>.json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.fanout import RESULTS, BenchError, fmt, machine_info, median, write_results
from bench.infra import Infra, cpu_arg, cpu_ns, source_state
from tests.cluster import ChatNodeProcess

MODES = ("redis", "postgres", "sqlite")
AUTH_ID = "bench-auth"


# ------------------------------------------------------------------------------- clients


class Counted:
    """A websockets client connection that counts what it receives (payload bytes, frames)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.bytes = 0
        self.frames = 0

    async def recv(self) -> dict[str, Any]:
        raw = await self.ws.recv(decode=False)
        self.bytes += len(raw)
        self.frames += 1
        frame = json.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame, separators=(",", ":")))

    async def auth(self, token: str, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        hello = await self.recv()
        if hello.get("type") != "hello":
            raise BenchError(f"expected hello, got {hello!r}"[:300])
        auth: dict[str, Any] = {"type": "auth", "id": AUTH_ID, "token": token}
        if resume is not None:
            auth["resume"] = resume
        await self.send(auth)
        while True:
            frame = await self.recv()
            if frame.get("reply_to") == AUTH_ID:
                if frame.get("type") != "reply":
                    raise BenchError(f"auth refused: {frame!r}"[:300])
                data: dict[str, Any] = frame["data"]
                return data


@contextlib.asynccontextmanager
async def open_ws(url: str):
    async with connect(url, compression=None, max_size=None, open_timeout=30) as ws:
        yield Counted(ws)


async def snapshot(url: str, token: str) -> tuple[str, int]:
    """Connect, authenticate, return (session_id, seq), disconnect."""
    async with open_ws(url) as c:
        info = await c.auth(token)
    return info["session_id"], int(info["seq"])


async def resume(url: str, token: str, session_id: str, seq: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with open_ws(url) as c:
        t_open = time.perf_counter()
        info = await c.auth(token, {"session_id": session_id, "seq": seq})
        t_reply = time.perf_counter()
        if not info.get("resumed"):
            raise BenchError(f"resume refused: {info.get('resume_error')!r}")
        events = 0
        while True:
            frame = await c.recv()
            kind = frame.get("type")
            if kind == "resumed":
                break
            if kind == "message.posted":
                events += 1
        t_end = time.perf_counter()
    return {
        "wall_ms": (t_end - t0) * 1000,
        "connect_ms": (t_open - t0) * 1000,
        "auth_reply_ms": (t_reply - t0) * 1000,
        "bytes": c.bytes,
        "frames": c.frames,
        "events": events,
        "replayed": frame.get("replayed"),
        "seq_after": frame.get("seq"),
    }


async def bootstrap(url: str, token: str, inflight: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with open_ws(url) as c:
        t_open = time.perf_counter()
        await c.auth(token)
        t_reply = time.perf_counter()
        waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        slots = asyncio.Semaphore(inflight)
        counter = iter(range(1, 1_000_000))

        async def reader() -> None:
            while True:
                frame = await c.recv()
                fut = waiting.pop(str(frame.get("reply_to")), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)

        async def request(kind: str, **fields: Any) -> dict[str, Any]:
            async with slots:
                rid = f"r{next(counter)}"
                fut = asyncio.get_running_loop().create_future()
                waiting[rid] = fut
                await c.send({"type": kind, "id": rid, **fields})
                frame = await fut
            if frame.get("type") != "reply":
                raise BenchError(f"{kind} failed: {frame!r}"[:300])
            data: dict[str, Any] = frame["data"]
            return data

        async def paged(kind: str, key: str, **fields: Any) -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            cursor: int | None = 0
            for _ in range(10_000):
                page = await request(kind, cursor=cursor, limit=1000, **fields)
                items += page[key]
                cursor = page["next_cursor"]
                if cursor is None:
                    return items
            raise BenchError(f"{kind}: too many pages")

        async def channels_and_history() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            channels = await paged("channels.list", "channels", member_only=True)
            histories = await asyncio.gather(
                *(request("messages.history", channel_id=ch["id"], limit=50) for ch in channels)
            )
            return channels, list(histories)

        read_task = asyncio.create_task(reader())
        try:
            users, (channels, histories), counts = await asyncio.gather(
                paged("users.list", "users"), channels_and_history(), request("reads.counts")
            )
        finally:
            read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task
        t_end = time.perf_counter()
    return {
        "wall_ms": (t_end - t0) * 1000,
        "connect_ms": (t_open - t0) * 1000,
        "auth_reply_ms": (t_reply - t0) * 1000,
        "bytes": c.bytes,
        "frames": c.frames,
        "users": len(users),
        "channels": len(channels),
        "messages": sum(len(h["messages"]) for h in histories),
        "counts": len(counts["channels"]),
    }


async def post(url: str, token: str, channel_ids: list[int], count: int, window: int) -> float:
    """Post ``count`` messages round-robin over ``channel_ids``; returns seconds taken."""
    run = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    async with open_ws(url) as c:
        await c.auth(token)
        pending: set[str] = set()
        slots = asyncio.Semaphore(window)
        done = asyncio.Event()
        acked = 0
        errors: list[dict[str, Any]] = []

        async def reader() -> None:
            nonlocal acked
            while True:
                frame = await c.recv()
                rid = frame.get("reply_to")
                if rid in pending:
                    pending.discard(rid)
                    slots.release()
                    acked += 1
                    if frame.get("type") != "reply":
                        errors.append(frame)
                    if acked == count:
                        done.set()
                        return

        task = asyncio.create_task(reader())
        for i in range(count):
            await slots.acquire()
            rid = f"p{i}"
            pending.add(rid)
            await c.send(
                {
                    "type": "messages.post",
                    "id": rid,
                    "channel_id": channel_ids[i % len(channel_ids)],
                    "client_msg_id": f"{run}-{i}",
                    "text": f"resume bench message {i} of {count}, run {run}",
                }
            )
            if errors:
                break
        await asyncio.wait([task, asyncio.ensure_future(done.wait())], timeout=120)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if errors or acked != count:
        raise BenchError(f"poster: {acked}/{count} acked, errors {errors[:1]!r}"[:400])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------- rounds


def server_cpu_ns(node: ChatNodeProcess, infra: Infra | None, mode: str) -> dict[str, int]:
    out = {"node": cpu_ns(node.pid) if node.pid else 0}
    if infra is not None:
        out |= infra.infra_cpu_ns()
    if mode != "redis":
        out.pop("redis", None)  # running for the redis mode, unused by this one
    return out


async def measure(
    mode: str,
    kind: str,
    node: ChatNodeProcess,
    infra: Infra | None,
    token: str,
    point: tuple[str, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    cpu0 = server_cpu_ns(node, infra, mode)
    async with asyncio.timeout(args.timeout):
        if kind == "resume":
            r = await resume(node.url, token, *point)
        else:
            r = await bootstrap(node.url, token, args.inflight)
    cpu1 = server_cpu_ns(node, infra, mode)
    cpu = {k: (cpu1[k] - cpu0[k]) / 1e6 for k in cpu0 if k in cpu1}
    r["server_cpu_ms"] = cpu
    r["server_cpu_ms_total"] = sum(cpu.values())
    return r


def history_expected(posted: int, channels: int, limit: int = 50) -> int:
    """Messages the fresh bootstrap's histories hold after ``posted`` round-robin posts."""
    return sum(min(limit, posted // channels + (j < posted % channels)) for j in range(channels))


async def run_mode(
    mode: str,
    node: ChatNodeProcess,
    infra: Infra | None,
    seed: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    users, channel_ids = seed["users"], [c["id"] for c in seed["channels"]]
    poster_token, token = users[0]["token"], users[1]["token"]
    rounds = []
    posted = 0
    for i in range(1 - args.warmup, args.rounds + 1):
        point = await snapshot(node.url, token)
        post_s = await post(node.url, poster_token, channel_ids, args.missed, args.window)
        posted += args.missed
        await asyncio.sleep(args.settle)
        order = ("resume", "fresh") if i % 2 else ("fresh", "resume")
        r: dict[str, Any] = {"round": i, "from_seq": point[1], "post_s": round(post_s, 3)}
        for kind in order:
            r[kind] = await measure(mode, kind, node, infra, token, point, args)
        res, fresh = r["resume"], r["fresh"]
        r["ok"] = (
            res["events"] == args.missed
            and res["replayed"] is not None
            and res["replayed"] >= args.missed
            and fresh["users"] >= args.users
            and fresh["channels"] == args.channels
            and fresh["messages"] == history_expected(posted, args.channels)
        )
        if not r["ok"]:
            print(
                f"#   WARNING {mode}: resume got {res['events']} events "
                f"(replayed {res['replayed']}), fresh got {fresh['users']} users, "
                f"{fresh['channels']} channels, {fresh['messages']} messages",
                flush=True,
            )
        print(
            f"#   {mode} {'warm-up' if i < 1 else f'round {i}'}: resume {res['wall_ms']:.1f} ms "
            f"{res['bytes'] / 1024:.0f} KiB"
            f" cpu {res['server_cpu_ms_total']:.0f} ms | fresh {fresh['wall_ms']:.1f} ms "
            f"{fresh['bytes'] / 1024:.0f} KiB cpu {fresh['server_cpu_ms_total']:.0f} ms",
            flush=True,
        )
        if i >= 1:  # rounds before 1 warm the node up (first queries, pools): not counted
            rounds.append(r)
    return rounds


def mode_setup(
    mode: str, infra: Infra | None, workdir: Path, args: argparse.Namespace
) -> tuple[dict[str, str], dict[str, str]]:
    """(seed environment, node extra environment) for a store mode."""
    if mode == "sqlite":
        path = str(workdir / "resume.sqlite3")
        return {"CHAT_SQLITE_PATH": path}, {"CHAT_SQLITE_PATH": path}
    assert infra is not None
    dsn = infra.create_database(f"resume_{mode}")
    return {"CHAT_DATABASE_URL": dsn}, {}


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    needs_pg = any(m in ("redis", "postgres") for m in args.modes)
    infra = Infra(cpu=args.server_cpu, redis="redis" in args.modes, python=args.python)
    try:
        if needs_pg:
            infra.start()
        for mode in args.modes:
            print(f"# mode {mode}", flush=True)
            seed_env, node_env = mode_setup(mode, infra if needs_pg else None, workdir, args)
            seed = infra.seed(seed_env, "bench", args.users, args.channels)
            node_env |= {"CHAT_REPLAY_MAX_EVENTS": str(max(10_000, 2 * args.missed))}
            (node,) = infra.start_nodes(
                [mode],
                database_url=seed_env.get("CHAT_DATABASE_URL", ""),
                log_dir=workdir,
                cpus=[args.server_cpu],
                redis=mode == "redis",
                extra_env=node_env,
            )
            try:
                pg = infra if mode != "sqlite" else None
                results[mode] = asyncio.run(run_mode(mode, node, pg, seed, args))
            finally:
                infra.stop_nodes([node])
    finally:
        infra.close()
    return results


# ---------------------------------------------------------------------------------- report


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"rounds": len(rounds), "ok": all(r["ok"] for r in rounds)}
    for kind in ("resume", "fresh"):
        for key in ("wall_ms", "auth_reply_ms", "bytes", "frames", "server_cpu_ms_total"):
            s[f"{kind}_{key}"] = median([r[kind][key] for r in rounds])
    for key in ("wall_ms", "bytes", "frames", "server_cpu_ms_total"):
        per = [r["resume"][key] / r["fresh"][key] for r in rounds if r["fresh"][key]]
        s[f"ratio_{key}_per_round"] = [round(x, 4) for x in per]
        s[f"ratio_{key}"] = median(per)
    return s


def markdown(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Resume after missing {args.missed:,} events vs a fresh bootstrap; U={args.users:,} "
        f"users, C={args.channels} channels (everyone in every channel); median of "
        f"{args.rounds} rounds; node{', PostgreSQL, Redis' if args.server_cpu is not None else ''}"
        f" on CPU {args.server_cpu}, client on CPU {args.client_cpu}.",
        "",
        "| store | path | wall time (ms) | of which connect + auth reply (ms) "
        "| bytes received | frames | server CPU (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "redis": "PostgreSQL + Redis",
        "postgres": "PostgreSQL",
        "sqlite": "SQLite (embedded)",
    }
    for mode, s in summary.items():
        for kind, label in (("resume", "resume"), ("fresh", "fresh bootstrap")):
            lines.append(
                f"| {names[mode]} | {label} | {fmt(s[f'{kind}_wall_ms'], ',.1f')} "
                f"| {fmt(s[f'{kind}_auth_reply_ms'], ',.1f')} "
                f"| {fmt(s[f'{kind}_bytes'], ',.0f')} | {fmt(s[f'{kind}_frames'], ',.0f')} "
                f"| {fmt(s[f'{kind}_server_cpu_ms_total'], ',.1f')} |"
            )
        lines.append(
            f"| {names[mode]} | **resume / fresh** | **{fmt(s['ratio_wall_ms'], '.2f')}x** | "
            f"| **{fmt(s['ratio_bytes'], '.2f')}x** | {fmt(s['ratio_frames'], '.2f')}x "
            f"| **{fmt(s['ratio_server_cpu_ms_total'], '.2f')}x** |"
        )
    ok = all(s["ok"] for s in summary.values())
    verdict = "yes" if ok else "NO"
    lines += ["", f"Every round complete and correct (events, users, channels): {verdict}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.resume",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--users", type=int, default=1000, help="users in the workspace (U)")
    p.add_argument("--channels", type=int, default=20, help="channels, everyone a member (C)")
    p.add_argument("--missed", type=int, default=1000, help="messages posted while away (K)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per mode (R)")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated store modes among {', '.join(MODES)}",
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="uncounted rounds first, per mode (node warm-up)"
    )
    p.add_argument("--window", type=int, default=20, help="poster: posts in flight")
    p.add_argument("--inflight", type=int, default=16, help="fresh bootstrap: requests in flight")
    p.add_argument("--settle", type=float, default=0.5, help="seconds after posting")
    p.add_argument("--timeout", type=float, default=60.0, help="limit for one measurement")
    p.add_argument("--server-cpu", type=cpu_arg, default=0, help="CPU of node, PG, Redis")
    p.add_argument("--client-cpu", type=cpu_arg, default=1, help="CPU of the harness (client)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="pin nothing")
    p.add_argument("--python", default=sys.executable, help="interpreter for the node")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/resume-<date>)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes: among {', '.join(MODES)}")
    if args.users < 2 or args.channels < 1 or args.missed < 1 or args.rounds < 1:
        p.error("--users >= 2; --channels, --missed and --rounds must be positive")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.inflight < 1 or args.inflight > 32:
        p.error("--inflight: 1..32 (the server's max_inflight_requests)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {c for c in (args.server_cpu, args.client_cpu) if c is not None}
    if args.pin and not wanted <= os.sched_getaffinity(0):
        print(f"# CPUs {sorted(wanted)} not all available: not pinning", flush=True)
        args.pin = False
    if not args.pin:
        args.server_cpu = args.client_cpu = None
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    started = dt.datetime.now()
    source_start = source_state()
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="resume-"))
    try:
        rounds = run_all(args, workdir)
    except BaseException:
        print(f"# logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    summary = {mode: summarize(r) for mode, r in rounds.items()}
    table = markdown(summary, args)
    out = args.out or RESULTS / f"resume-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "resume",
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t_start, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "source": {"at_start": source_start, "at_end": source_state()},
        "summary": summary,
        "rounds": rounds,
        "table_md": table,
    }
    if doc["source"]["at_start"] != doc["source"]["at_end"] or source_start.get("chat_uncommitted"):
        print("# WARNING: chat/ was modified or committed during the run: see source in the JSON")
    write_results(out, doc, table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"resume: {exc}", file=sys.stderr)
        sys.exit(1)
