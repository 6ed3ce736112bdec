"""One scenario on one cluster: start, seed, connect, post, cut, measure, check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.cluster import haproxy
from chat.cluster.launcher import LocalCluster, SeededWorkspace
from chat.cluster.loadtest.counters import (
    PG_STATS_FLUSH_S,
    flannel_loads,
    pg_posted,
    pg_prepare,
    pg_reset,
    pg_work,
)
from chat.cluster.loadtest.edge import (
    edge_bytes,
    edge_sockets,
    haproxy_stats,
    stat_int,
)
from chat.cluster.loadtest.options import CUTS, SCENARIOS, LoadTestError, Options
from chat.cluster.loadtest.traffic import Samples, observe, post
from chat.cluster.loadtest.wsblast import (
    AUTH_ID,
    FAIL_MATCH,
    PING,
    WSBLAST,
    Blast,
    build_wsblast,
    merge_counts,
    merge_rounds,
    pct,
)
from chat.cluster.processes import parse_metric
from chat.cluster.topology import CHAT_PATH, Topology
from flannel.config import FlannelSettings


@dataclass
class Timeline:
    """Samples of HAProxy's live client connections (scur), over time."""

    t0: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, int]] = field(default_factory=list)  # (s, live)
    events: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, what: str, at: float | None = None) -> None:
        """Note ``what`` now, or at monotonic time ``at``."""
        self.events.append(((time.monotonic() if at is None else at) - self.t0, what))
        self.events.sort()


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
                # two descriptors a connection, within HAProxy's open-files limit
                global_maxconn=max(haproxy.Limits.global_maxconn, opts.clients + 1000),
            ),
            node_env={"CHAT_LOG_LEVEL": "warning", "CHAT_RATE_LIMIT_PER_10S": "100000"},
            plain=True,  # wsblast speaks no TLS
        )
        assert self.cluster.plain_port is not None
        self.plain_port = self.cluster.plain_port
        self.blasts: list[Blast] = []
        self.samples = Samples()
        self.timeline = Timeline()
        self.phase = "starting"
        self.phase_deadline: float | None = None
        self.result: dict[str, Any] = {}
        self._stop_sampling = asyncio.Event()
        # One thread per wsblast process for its blocking report waits.
        self._waits = ThreadPoolExecutor(
            max(1, opts.procs, opts.workspaces), thread_name_prefix="wsblast"
        )

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

    async def _expect(self, blast: Blast, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for a report line of one wsblast process, on a thread of its own: these
        waits block for the whole storm, and in the loop's default executor (a few threads)
        they starved the sampler and the storm's end detection."""
        loop = asyncio.get_running_loop()
        result: dict[str, Any] = await loop.run_in_executor(
            self._waits, blast.expect_json, tag, timeout
        )
        return result

    async def collect_round(self, timeout: float) -> dict[str, Any]:
        reports = await asyncio.gather(*(self._expect(b, "STORM", timeout) for b in self.blasts))
        return merge_rounds(list(reports))

    async def sample(self) -> None:
        """Every 0.2 s: HAProxy's live connections on the clients' backend (0 while it
        does not answer)."""
        while not self._stop_sampling.is_set():
            stats = await asyncio.to_thread(haproxy_stats, self.cluster)
            row = stats.get((self.backend, "BACKEND"))  # no stats: HAProxy down, none live
            self.timeline.rows.append((time.monotonic() - self.timeline.t0, stat_int(row, "scur")))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_sampling.wait(), 0.2)

    def on_servers(self, without: str | None) -> int:
        """Client connections HAProxy holds on the clients' backend's servers (``without``
        one): a connection being retried against a dead server is not counted."""
        stats = haproxy_stats(self.cluster)
        return sum(
            stat_int(row, "scur")
            for (px, sv), row in stats.items()
            if px == self.backend and sv not in ("FRONTEND", "BACKEND", without)
        )

    async def back_at_edge(
        self,
        live0: int,
        sessions0: int,
        killed: str | None,
        t_cut: float,
        round_end: asyncio.Task[Any],
    ) -> float:
        """Seconds from the cut until the servers left hold ``live0`` connections again
        (or the round ended, or --storm-max); returns once they serve ``sessions0`` live
        sessions again."""
        deadline = t_cut + self.o.storm_max_s
        # Through Flannel, a chat node's kill drops no client: Flannel reattaches its
        # sessions to the other chat node. What ends the storm there is every Flannel
        # node's upstream links being up again.
        behind_flannel = self.o.cut == "chat" and self.o.flannel
        while not round_end.done() and time.monotonic() < deadline:
            if time.monotonic() > t_cut + 0.2 and (
                await asyncio.to_thread(self.flannel_links_up)
                if behind_flannel
                else await asyncio.to_thread(self.on_servers, killed) >= live0
            ):
                break
            await asyncio.sleep(0.1)
        back = time.monotonic() - t_cut
        self.timeline.mark("back at the edge")
        # Connected is not resumed: wait until the nodes serve as many sessions as before
        # the cut (a wsblast process none of whose clients dropped reports only at the end).
        while not round_end.done() and time.monotonic() < deadline:
            if await asyncio.to_thread(self.serving_sessions) >= sessions0:
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(round_end), 0.5)
        return round(back, 3)

    def serving_sessions(self) -> int:
        """Live sessions on the running nodes of the tier the clients connect to."""
        nodes = self.cluster.flannels if self.o.flannel else self.cluster.chats
        return sum(
            int(parse_metric(node.metrics(), "chat_sessions"))
            for node in nodes.values()
            if node.running
        )

    def flannel_links_up(self) -> bool:
        want = FlannelSettings.model_fields["upstream_connections"].default
        return all(
            parse_metric(node.metrics(), "flannel_upstream_connections") >= want
            for node in self.cluster.flannels.values()
        )

    def busiest(self, backend: str) -> str:
        stats = haproxy_stats(self.cluster)
        names = self.cluster.flannels if backend == "flannel" else self.cluster.chats
        return max(names, key=lambda n: stat_int(stats.get((backend, n)), "scur"))

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
        """The whole run; the cluster is closed at the end whatever happens."""
        try:
            return await self._run()
        finally:
            await self.cluster.close()  # idempotent
            self._waits.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> dict[str, Any]:
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
            old = set(await asyncio.to_thread(edge_sockets, self.plain_port))  # observers
            self.timeline.mark("connect")
            for b in self.blasts:
                b.send("GO")
            first = await self.collect_round(o.storm_max_s + 60)
            r["connect"] = _strip(first)
            if first["live"] < o.clients:
                raise LoadTestError(f"only {first['live']} of {o.clients} clients went live")
            measured = first
            if o.scenario == "monday":
                await self.measure_cost(r, "cold", loads0, pg0, statements, time.monotonic(), old)
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
                live0 = await asyncio.to_thread(self.on_servers, None)
                sessions0 = await asyncio.to_thread(self.serving_sessions)
                old = set(await asyncio.to_thread(edge_sockets, self.plain_port))
                t_cut = time.monotonic()
                self.timeline.mark(f"cut {o.cut}")
                mark_ns = time.monotonic_ns()
                r["cut_detail"] = await self.cut()
                for b in self.blasts:
                    b.send(f"MARK {mark_ns}")
                round_end = asyncio.create_task(self.collect_round(o.storm_max_s + 60))
                # A wsblast process none of whose clients was dropped reports only at
                # --storm-max: the costs are read once HAProxy holds as many connections
                # as before the cut (and 1 s more for the resumes), not then.
                killed = r["cut_detail"].get("killed") if o.cut != "chat" or not o.flannel else None
                r["back_at_edge_s"] = await self.back_at_edge(
                    live0, sessions0, killed, t_cut, round_end
                )
                await self.measure_cost(r, "storm", loads0, pg0, statements, t_cut, old)
                storm = await round_end
                if storm["live"] < o.clients:
                    self.timeline.mark("gave up")
                elif storm["last_ready_ms"] is not None:
                    # Processes none of whose clients dropped report only at --storm-max.
                    self.timeline.mark("all live", at=t_cut + storm["last_ready_ms"] / 1000)
                r["storm"] = _strip(storm)
                end = (
                    storm["last_ready_ms"] / 1000
                    if storm["last_ready_ms"] is not None
                    else r["back_at_edge_s"]  # none dropped: until the links were back
                )
                r["storm_window_s"] = [t_cut, t_cut + end]
                measured = storm
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
                "reconnects": self.samples.poster_reconnects,
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
                got = await asyncio.gather(*(self._expect(b, "COUNTS", 30) for b in mine))
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
        since: float,
        old: set[str],
    ) -> None:
        """Right after the clients are back: bytes on the connections opened since ``old``,
        Flannel loads and PostgreSQL work since ``*0`` (read right before the round).
        A connection's bytes include the messages posted since ``since`` (replayed or live):
        ``bytes_to_clients_net`` takes those out at the observers' mean frame size."""
        n = self.o.clients
        edge = await asyncio.to_thread(edge_bytes, self.plain_port, old)  # new connections
        per_socket = max(1, edge["sockets"])
        sizes = self.samples.frame_bytes
        frame = sum(sizes) / len(sizes) if sizes else 0.0
        posted = sum(1 for t in self.samples.posted if t >= since) // max(1, self.o.workspaces)
        loads1 = flannel_loads(self.cluster)
        per_node = {
            name: int(v["loads"] - loads0.get(name, {}).get("loads", 0.0))
            for name, v in loads1.items()
        }
        cost: dict[str, Any] = {
            "bytes_to_clients_per_client": round(edge["sent"] / per_socket),
            "messages_in_window": posted,
            "message_frame_bytes": round(frame),
            "bytes_to_clients_net": round(edge["sent"] / per_socket - posted * frame),
            "bytes_from_clients_per_client": round(edge["received"] / per_socket),
            "edge_sockets": edge["sockets"],
            "flannel_loads": per_node,
            "flannel_loads_total": sum(per_node.values()),
            "flannel_cached_before": {k: v["cached"] for k, v in loads0.items()},
            "flannel_cached_after": {k: v["cached"] for k, v in loads1.items()},
        }
        # The posters' own transactions stay out of the wait (pg_stat_database lags).
        posts = sum(1 for t in self.samples.posted if t >= since)
        if not statements:
            self.samples.paused = True
            try:
                await asyncio.sleep(PG_STATS_FLUSH_S)
                pg1 = await pg_work(self.cluster)
            finally:
                self.samples.paused = False
        else:
            pg1 = await pg_work(self.cluster)
        cost["pg_xacts"] = pg1["xacts"] - pg0["xacts"]
        cost["posts_in_window"] = posts  # each one at least one transaction of its own
        cost["pg_xacts_net"] = cost["pg_xacts"] - posts
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
