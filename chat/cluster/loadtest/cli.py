"""``chat loadtest``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chat.cluster.loadtest.options import CUTS, SCENARIOS, Options
from chat.cluster.loadtest.report import print_table, run_with_display, write
from chat.cluster.loadtest.run import Run


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="chat loadtest",
        description="Load tests over the launcher's cluster (chat.cluster.loadtest).",
    )
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
