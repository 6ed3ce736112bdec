"""The report: a live table with a progress bar (rich), a table, JSON and a PNG (matplotlib)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from chat.cluster.loadtest.options import RESULTS
from chat.cluster.loadtest.run import Run
from chat.cluster.loadtest.wsblast import pct


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
        (
            "time until all live",
            f"{r.get('time_to_live_s')} s"
            if r.get("dropped") != 0
            else f"none dropped (links back in {r.get('back_at_edge_s')} s)",
        ),
        ("live p50 / p99", f"{r.get('live_p50_s')} / {r.get('live_p99_s')} s"),
        ("peak connect rate", f"{r.get('peak_connects_per_s', 0):.0f} /s"),
        (
            "bytes to each client",
            f"{cost.get('bytes_to_clients_net', '-')} (+ {cost.get('messages_in_window', 0)}"
            f" messages: {cost.get('bytes_to_clients_per_client', '-')})",
        ),
        ("Flannel workspace loads", str(cost.get("flannel_loads", "-"))),
        ("PostgreSQL statements", str(cost.get("pg_statements", "-"))),
        (
            "PostgreSQL transactions",
            f"{cost.get('pg_xacts_net', '-')} (+ {cost.get('posts_in_window', 0)} posts:"
            f" {cost.get('pg_xacts', '-')})",
        ),
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
    width = 1.0  # posters send in step: finer bins alias
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
