"""Scale-out benchmark: one channel's fan-out from 1 chat node vs 2 nodes (PostgreSQL + Redis).

Both configurations run in the same process tree, same run, on the same PostgreSQL and Redis
(started by this benchmark, stopped at the end), rounds interleaved (1, 2, then 2, 1, ...):

- ``1 node``: N receivers all on node A;
- ``2 nodes``: N/2 receivers on node A, N/2 on node B.

The client side is identical in both: two ``wsblast`` instances of N/2 connections each (both
on node A, or one per node), and one poster on node A posting M messages with W in flight
(like bench.fanout). Node B gets the events through the Redis stream only.

Each round of each configuration: a fresh copy of the seeded database (CREATE DATABASE ...
TEMPLATE), Redis restarted empty, fresh node processes; then the burst and, unless
``--rate 0``, a steady phase for post-to-deliver latency on A's and B's receivers.

Results go to ``bench/results/scaleout-<date>.json``; a Markdown table is printed.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fanout import (
    AUTH_ID,
    RESULTS,
    WSBLAST,
    BenchError,
    Proc,
    build_wsblast,
    cpu_seconds,
    fmt,
    machine_info,
    median,
    rss_bytes,
    write_results,
)
from bench.infra import Infra, cpu_arg, cpu_busy, cpu_times, source_state
from tests.cluster import ChatNodeProcess

SEED_DB = "scaleout_seed"
HEARTBEAT = json.dumps({"type": "ping", "id": "hb"}, separators=(",", ":"))


def split(n: int) -> tuple[int, int]:
    return n // 2, n - n // 2


class Round:
    """One configuration (1 or 2 nodes), one round."""

    def __init__(
        self, args: argparse.Namespace, infra: Infra, seed: dict[str, Any], nodes: int, number: int
    ):
        self.args = args
        self.infra = infra
        self.seed = seed
        self.n_nodes = nodes
        self.number = number
        self.dir = args.workdir / f"{nodes}node-{number}"
        self.dir.mkdir()
        self.procs: list[Proc] = []
        self.nodes: list[ChatNodeProcess] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, log=self.dir / f"{name}.log", cpu=self.args.client_cpu)
        self.procs.append(proc)
        return proc

    def poster(self, port: int, mode: list[str]) -> Proc:
        a = self.args
        argv = [a.python, "-m", "bench.poster", "--kind", "chat", "--port", str(port)]
        argv += ["--token", self.seed["users"][0]["token"]]
        argv += ["--channel-id", str(self.seed["channels"][0]["id"])]
        argv += [*mode, "--timeout", str(a.connect_timeout + 2 * a.phase_timeout)]
        proc = self.start(f"poster{len(self.procs)}", argv)
        proc.expect("CONNECTED", 60)
        return proc

    def blast(self, name: str, port: int, users: list[dict[str, Any]]) -> Proc:
        a = self.args
        auth = self.dir / f"{name}-auth.txt"
        auth.write_text(
            "".join(
                json.dumps({"type": "auth", "id": AUTH_ID, "token": u["token"]}) + "\n"
                for u in users
            )
        )
        argv = [str(WSBLAST), "--port", str(port), "--path", "/", "--conns", str(len(users))]
        argv += ["--batch", str(a.batch), "--ready-frames", "1", "--ready-match", AUTH_ID]
        argv += ["--fail-match", '"error"', "--count-match", "message.posted"]
        argv += ["--lat-every", "1", "--auth-file", str(auth)]
        argv += ["--connect-timeout-ms", str(int(a.connect_timeout * 1000))]
        argv += ["--max-seconds", str(int(a.max_seconds))]
        argv += ["--heartbeat-ms", "15000", "--heartbeat-text", HEARTBEAT]
        return self.start(name, argv)

    def phase(self, blasts: list[tuple[Proc, int]], poster: Proc, count: int) -> dict[str, Any]:
        a = self.args
        for blast, conns in blasts:
            blast.send(f"RUN {count * conns} {int(a.phase_timeout * 1000)}")
        for blast, _ in blasts:
            blast.expect("ARMED", 10)
        node_cpu0 = [cpu_seconds(n.pid) for n in self.nodes if n.pid]
        infra0 = self.infra.infra_cpu()
        times0 = cpu_times()
        t0 = time.monotonic()
        poster.send("GO")
        posted = poster.expect_json("DONE", a.phase_timeout + 30)
        got = [blast.expect_json("RESULT", a.phase_timeout + 30) for blast, _ in blasts]
        wall = time.monotonic() - t0
        machine = cpu_busy(times0, cpu_times())
        node_cpu = [
            cpu_seconds(n.pid) - c0 for n, c0 in zip(self.nodes, node_cpu0, strict=True) if n.pid
        ]
        infra1 = self.infra.infra_cpu()
        infra = {k: infra1[k] - infra0[k] for k in infra0 if k in infra1}
        poster.stop()

        frames = sum(g["frames"] for g in got)
        expected = sum(g["expected"] for g in got)
        firsts = [g["first_ns"] for g in got if g["frames"]]
        lasts = [g["last_ns"] for g in got if g["frames"]]
        active = max(1e-9, (max(lasts) - min(firsts)) / 1e9) if firsts else None
        lossless = all(
            g["complete"] and g["min_per_conn"] == g["max_per_conn"] == count for g in got
        )
        client_cpu = sum(g["cpu_user_s"] + g["cpu_sys_s"] for g in got)
        nodes_total = sum(node_cpu)
        infra_total = sum(infra.values())
        out: dict[str, Any] = {
            "messages": count,
            "frames": frames,
            "expected": expected,
            "lossless": lossless,
            "per_blast_min_max": [[g["min_per_conn"], g["max_per_conn"]] for g in got],
            "closed_conns": sum(g["closed_conns"] for g in got),
            "deliver_s": round(active, 4) if active else None,
            "frames_per_s": round(frames / active, 1) if active and frames > 1 else None,
            "e2e_frames_per_s": round(
                frames / max(1e-9, (max(lasts) - posted["first_send_ns"]) / 1e9), 1
            )
            if lasts
            else None,
            "bytes_per_frame": round(sum(g["bytes"] for g in got) / frames, 1) if frames else None,
            "wall_s": round(wall, 3),
            "node_cpu_s": [round(c, 3) for c in node_cpu],
            "node_cpu_util": [round(c / wall, 3) for c in node_cpu],
            "nodes_cpu_util": round(nodes_total / wall, 3),
            "infra_cpu_s": {k: round(v, 3) for k, v in infra.items()},
            "infra_cpu_util": {k: round(v / wall, 3) for k, v in infra.items()},
            "node_cpu_us_per_frame": round(nodes_total / frames * 1e6, 3) if frames else None,
            "all_cpu_us_per_frame": round((nodes_total + infra_total) / frames * 1e6, 3)
            if frames
            else None,
            "cpus": machine,  # whole machine, per CPU: busy / softirq / steal fractions
            "client_cpu_s": round(client_cpu, 3),
            "client_cpu_util": round(client_cpu / active, 3) if active else None,
            # Receivers of blast 0 are on node A; of blast 1 on node B (2 nodes) or A (1 node).
            "lat_p50_ms": [round(g["lat_p50_us"] / 1000, 3) if g["lat_n"] else None for g in got],
            "lat_p99_ms": [round(g["lat_p99_us"] / 1000, 3) if g["lat_n"] else None for g in got],
            "poster": posted,
            "wsblast": got,
        }
        core = self.server_core()
        if core is not None and frames and f"cpu{core}" in machine:
            # Everything server-side shares this core: its busy time (softirq included: the
            # loopback sends, charged to no process) per delivered frame.
            busy_s = machine[f"cpu{core}"]["busy"] * wall
            out["core_us_per_frame"] = round(busy_s / frames * 1e6, 3)
        if not lossless or posted["errors"]:
            print(
                f"#   WARNING {self.n_nodes} node(s): {frames}/{expected} frames, per blast "
                f"(min, max) per conn {out['per_blast_min_max']}, poster errors "
                f"{posted['errors']} {posted['error_sample'] or ''}",
                flush=True,
            )
        return out

    def server_core(self) -> int | None:
        """The one CPU all server-side processes are pinned to, if there is one."""
        cpus = {*self.args.node_cpus, self.args.infra_cpu}
        return cpus.pop() if len(cpus) == 1 else None

    def run(self) -> dict[str, Any]:
        a, n = self.args, self.args.members
        dbname = f"scaleout_r{self.number}_{self.n_nodes}n"
        dsn = self.infra.create_database(dbname, template=SEED_DB)
        try:
            self.infra.fresh_redis()
            names = ["a", "b"][: self.n_nodes]
            t0 = time.monotonic()
            self.nodes = self.infra.start_nodes(
                names, database_url=dsn, log_dir=self.dir, cpus=a.node_cpus[: self.n_nodes]
            )
            startup = time.monotonic() - t0
            port_a = self.nodes[0].port
            port_b = self.nodes[-1].port  # == A with one node
            burst = ["--messages", str(a.messages), "--window", str(a.window)]
            burst_poster = self.poster(port_a, burst)
            if a.warmup:
                # One idle receiver on the second blast's node (B, or A with one node), so
                # the receivers' first authentications do not race to subscribe the node to
                # the workspace (see bench/README.md); the poster does this on A.
                warm = self.blast("warmup", port_b, [self.seed["users"][n + 1]])
                warm.expect_json("READY", 30)
            half_a, half_b = split(n)
            receivers = self.seed["users"][1 : n + 1]
            blasts = [
                (self.blast("wsblast-a", port_a, receivers[:half_a]), half_a),
                (self.blast("wsblast-b", port_b, receivers[half_a:]), half_b),
            ]
            ready = [b.expect_json("READY", a.connect_timeout + 10) for b, _ in blasts]
            time.sleep(a.settle)
            result: dict[str, Any] = {
                "nodes": self.n_nodes,
                "round": self.number,
                "node_startup_s": round(startup, 3),
                "connect": ready,
                "node_rss_connected": [_rss(nd) for nd in self.nodes],
            }
            result["burst"] = self.phase(blasts, burst_poster, a.messages)
            if a.rate > 0 and a.duration > 0:
                time.sleep(a.settle)
                steady = ["--rate", str(a.rate), "--duration", str(a.duration)]
                poster = self.poster(port_a, steady)
                result["steady"] = self.phase(blasts, poster, round(a.rate * a.duration))
            for blast, _ in blasts:
                blast.send("QUIT")
            for blast, _ in blasts:
                with contextlib.suppress(Exception):
                    blast.popen.wait(10)
            return result
        finally:
            for proc in reversed(self.procs):
                proc.stop()
            self.infra.stop_nodes(self.nodes)
            self.infra.drop_database(dbname)


def _rss(node: ChatNodeProcess) -> int | None:
    return rss_bytes(node.pid) if node.pid else None


# ---------------------------------------------------------------------------------- report


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(phase: str, key: str) -> list[Any]:
        return [r[phase][key] for r in rounds if phase in r]

    def pick_i(phase: str, key: str, i: int) -> list[Any]:
        return [r[phase][key][i] for r in rounds if phase in r and len(r[phase][key]) > i]

    s: dict[str, Any] = {
        "rounds": len(rounds),
        "frames_per_s": median(pick("burst", "frames_per_s")),
        "frames_per_s_all": pick("burst", "frames_per_s"),
        "e2e_frames_per_s": median(pick("burst", "e2e_frames_per_s")),
        "lossless": all(pick("burst", "lossless")) and all(pick("steady", "lossless")),
        "bytes_per_frame": median(pick("burst", "bytes_per_frame")),
        "node_a_cpu_util": median(pick_i("burst", "node_cpu_util", 0)),
        "node_b_cpu_util": median(pick_i("burst", "node_cpu_util", 1)),
        "nodes_cpu_util": median(pick("burst", "nodes_cpu_util")),
        "postgres_cpu_util": median([r["burst"]["infra_cpu_util"].get("postgres") for r in rounds]),
        "redis_cpu_util": median([r["burst"]["infra_cpu_util"].get("redis") for r in rounds]),
        "node_cpu_us_per_frame": median(pick("burst", "node_cpu_us_per_frame")),
        "all_cpu_us_per_frame": median(pick("burst", "all_cpu_us_per_frame")),
        "core_us_per_frame": median([r["burst"].get("core_us_per_frame") for r in rounds]),
        "client_cpu_util": median(pick("burst", "client_cpu_util")),
        "burst_lat_p50_ms_a": median(pick_i("burst", "lat_p50_ms", 0)),
        "burst_lat_p50_ms_b": median(pick_i("burst", "lat_p50_ms", 1)),
        "connect_ms": median([max(c["connect_ms"] for c in r["connect"]) for r in rounds]),
    }
    for cpu in rounds[0]["burst"]["cpus"] if rounds else ():
        for key in ("busy", "softirq", "steal"):
            s[f"{cpu}_{key}"] = median(
                [r["burst"]["cpus"].get(cpu, {}).get(key) for r in rounds if "burst" in r]
            )
    if any("steady" in r for r in rounds):
        s |= {
            "lat_p50_ms_a": median(pick_i("steady", "lat_p50_ms", 0)),
            "lat_p50_ms_b": median(pick_i("steady", "lat_p50_ms", 1)),
            "lat_p99_ms_a": median(pick_i("steady", "lat_p99_ms", 0)),
            "lat_p99_ms_b": median(pick_i("steady", "lat_p99_ms", 1)),
        }
    return s


def paired_ratios(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> dict[str, Any]:
    """2 nodes / 1 node within each round (same noise), and the median of those."""
    out: dict[str, Any] = {}
    for key in (
        "frames_per_s",
        "e2e_frames_per_s",
        "node_cpu_us_per_frame",
        "all_cpu_us_per_frame",
        "core_us_per_frame",
    ):
        per = [
            r2["burst"][key] / r1["burst"][key]
            for r1, r2 in zip(one, two, strict=True)
            if r1["burst"].get(key) and r2["burst"].get(key) is not None
        ]
        out[key] = {"per_round": [round(x, 3) for x in per], "median": median(per)}
    return out


def markdown(s1: dict[str, Any], s2: dict[str, Any], ratios: dict[str, Any], args: Any) -> str:
    def r(key: str) -> str:
        m = ratios.get(key, {}).get("median")
        return f"**{m:.2f}x**" if m is not None else "—"

    def pair(s: dict[str, Any], a: str, b: str, spec: str) -> str:
        return f"{fmt(s.get(a), spec)} / {fmt(s.get(b), spec)}"

    n, m = args.members, args.messages
    cpus = ",".join(str(c) for c in args.node_cpus)
    lines = [
        f"Fan-out to N={n} receivers of one channel, {m} messages posted on node A (window "
        f"{args.window}), PostgreSQL + Redis, median of {args.rounds} rounds; nodes on CPU "
        f"{cpus}, PostgreSQL and Redis on CPU {args.infra_cpu}, clients on CPU {args.client_cpu}.",
        "",
        "| metric | 1 node (N on A) | 2 nodes (N/2 on A, N/2 on B) | 2 / 1 (median of per-round) |",
        "|---|---:|---:|---:|",
        f"| delivered frames/s, all receivers (first→last frame) | {fmt(s1['frames_per_s'])} "
        f"| {fmt(s2['frames_per_s'])} | {r('frames_per_s')} |",
        f"| delivered frames/s (first post→last frame) | {fmt(s1['e2e_frames_per_s'])} "
        f"| {fmt(s2['e2e_frames_per_s'])} | {r('e2e_frames_per_s')} |",
        f"| node CPU during burst, A / B (cores) | {fmt(s1['node_a_cpu_util'], '.2f')} / — "
        f"| {pair(s2, 'node_a_cpu_util', 'node_b_cpu_util', '.2f')} | |",
        f"| PostgreSQL / Redis CPU during burst (cores) "
        f"| {pair(s1, 'postgres_cpu_util', 'redis_cpu_util', '.2f')} "
        f"| {pair(s2, 'postgres_cpu_util', 'redis_cpu_util', '.2f')} | |",
        f"| node CPU per delivered frame (µs, all nodes) "
        f"| {fmt(s1['node_cpu_us_per_frame'], '.2f')} "
        f"| {fmt(s2['node_cpu_us_per_frame'], '.2f')} | {r('node_cpu_us_per_frame')} |",
        f"| server CPU per delivered frame (µs, nodes + PG + Redis) "
        f"| {fmt(s1['all_cpu_us_per_frame'], '.2f')} | {fmt(s2['all_cpu_us_per_frame'], '.2f')} "
        f"| {r('all_cpu_us_per_frame')} |",
    ]
    if s1.get("core_us_per_frame") is not None:
        core = args.infra_cpu
        lines.append(
            f"| CPU {core} busy time per delivered frame (µs, incl. kernel softirq) "
            f"| {fmt(s1['core_us_per_frame'], '.2f')} | {fmt(s2['core_us_per_frame'], '.2f')} "
            f"| {r('core_us_per_frame')} |"
        )
    if "lat_p50_ms_a" in s1:
        lines += [
            f"| latency p50 @ {args.rate:g} msg/s, receivers on A / on B (ms) "
            f"| {pair(s1, 'lat_p50_ms_a', 'lat_p50_ms_b', '.2f')} "
            f"| {pair(s2, 'lat_p50_ms_a', 'lat_p50_ms_b', '.2f')} | |",
            f"| latency p99 @ {args.rate:g} msg/s, receivers on A / on B (ms) "
            f"| {pair(s1, 'lat_p99_ms_a', 'lat_p99_ms_b', '.2f')} "
            f"| {pair(s2, 'lat_p99_ms_a', 'lat_p99_ms_b', '.2f')} | |",
        ]
    cpu_names = sorted(
        k[: -len("_busy")] for k in s1 if k.startswith("cpu") and k.endswith("_busy")
    )

    def busy(s: dict[str, Any]) -> str:
        return " / ".join(
            f"{fmt(s.get(f'{c}_busy'), '.2f')} ({fmt(s.get(f'{c}_softirq'), '.2f')})"
            for c in cpu_names
        )

    lines += [
        f"| machine CPU busy during burst, {' / '.join(cpus)} (of which softirq) "
        f"| {busy(s1)} | {busy(s2)} | |",
        f"| wsblast CPU / active time during burst | {fmt(s1['client_cpu_util'], '.2f')} "
        f"| {fmt(s2['client_cpu_util'], '.2f')} | |",
        f"| lossless (every conn got every message) | {'yes' if s1['lossless'] else 'NO'} "
        f"| {'yes' if s2['lossless'] else 'NO'} | |",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--members", type=int, default=1000, help="receiving connections (N)")
    p.add_argument("--messages", type=int, default=1000, help="burst: messages posted (M)")
    p.add_argument("--window", type=int, default=20, help="burst: posts in flight")
    p.add_argument("--rate", type=float, default=50.0, help="latency phase: msg/s (0: skip)")
    p.add_argument("--duration", type=float, default=3.0, help="latency phase: seconds")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (R)")
    p.add_argument("--batch", type=int, default=200, help="wsblast: handshakes in flight")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between phases")
    p.add_argument(
        "--node-cpus",
        default="0,0",
        help="CPUs of node A and node B ('none': unpinned); default both on 0",
    )
    p.add_argument("--infra-cpu", type=cpu_arg, default=0, help="CPU of PostgreSQL and Redis")
    p.add_argument("--client-cpu", type=cpu_arg, default=1, help="CPU of wsblast, poster, harness")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="pin nothing")
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="no idle receiver on the second node before the others connect",
    )
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--phase-timeout", type=float, default=60.0)
    p.add_argument("--max-seconds", type=float, default=900.0, help="wsblast's hard lifetime")
    p.add_argument("--python", default=sys.executable, help="interpreter for nodes/poster")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/scaleout-<date>)")
    args = p.parse_args(argv)
    if args.members < 2 or args.messages < 1 or args.rounds < 1 or args.window < 1:
        p.error("--members >= 2; --messages, --rounds and --window must be positive")
    args.node_cpus = [cpu_arg(c.strip()) for c in args.node_cpus.split(",")]
    if len(args.node_cpus) == 1:
        args.node_cpus *= 2
    if len(args.node_cpus) != 2:
        p.error("--node-cpus: two CPUs, e.g. 0,0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {c for c in [*args.node_cpus, args.infra_cpu, args.client_cpu] if c is not None}
    if args.pin and not wanted <= os.sched_getaffinity(0):
        print(f"# CPUs {sorted(wanted)} not all available: not pinning", flush=True)
        args.pin = False
    if not args.pin:
        args.node_cpus, args.infra_cpu, args.client_cpu = [None, None], None, None
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})  # the harness stays off the servers' CPU
    build_wsblast()
    started = dt.datetime.now()
    source_start = source_state()
    args.workdir = Path(tempfile.mkdtemp(prefix="scaleout-"))
    rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    t_start = time.monotonic()
    try:
        with Infra(cpu=args.infra_cpu, redis=True, python=args.python) as infra:
            seed_dsn = infra.create_database(SEED_DB)
            seed = infra.seed(
                {"CHAT_DATABASE_URL": seed_dsn}, "bench", args.members + 2, channels=1
            )
            for i in range(1, args.rounds + 1):
                order = (1, 2) if i % 2 else (2, 1)  # alternate which goes first
                for k in order:
                    print(f"# round {i}/{args.rounds}: {k} node(s)", flush=True)
                    r = Round(args, infra, seed, k, i).run()
                    rounds[k].append(r)
                    b = r["burst"]
                    lat = r.get("steady", {})
                    print(
                        f"#   {fmt(b['frames_per_s'])} frames/s, node cpu "
                        f"{'+'.join(f'{c:.2f}' for c in b['node_cpu_util'])}, pg "
                        f"{b['infra_cpu_util'].get('postgres', 0):.2f}, redis "
                        f"{b['infra_cpu_util'].get('redis', 0):.2f}, "
                        f"{fmt(b['node_cpu_us_per_frame'], '.2f')} node-µs/frame, latency p50 "
                        f"A/B {fmt(lat.get('lat_p50_ms', [None])[0], '.2f')}/"
                        f"{fmt(lat.get('lat_p50_ms', [None, None])[-1], '.2f')} ms, "
                        f"lossless {b['lossless'] and lat.get('lossless', True)}",
                        flush=True,
                    )
    except BaseException:
        print(f"# logs kept in {args.workdir}", file=sys.stderr)
        raise
    shutil.rmtree(args.workdir, ignore_errors=True)
    s1, s2 = summarize(rounds[1]), summarize(rounds[2])
    ratios = paired_ratios(rounds[1], rounds[2])
    ratios["frames_per_s_of_medians"] = (
        s2["frames_per_s"] / s1["frames_per_s"]
        if s1["frames_per_s"] and s2["frames_per_s"]
        else None
    )
    table = markdown(s1, s2, ratios, args)
    out = args.out or RESULTS / f"scaleout-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc: dict[str, Any] = {
        "benchmark": "scaleout",
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t_start, 1),
        "config": config,
        "machine": machine_info(),
        "source": {"at_start": source_start, "at_end": source_state()},
        "summary": {"1_node": s1, "2_nodes": s2},
        "ratio_2_over_1": ratios,
        "rounds": {"1_node": rounds[1], "2_nodes": rounds[2]},
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
        print(f"scaleout: {exc}", file=sys.stderr)
        sys.exit(1)
