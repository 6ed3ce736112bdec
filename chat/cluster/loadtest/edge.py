"""HAProxy as the load test sees it: a plaintext bind, its stats page, per-socket bytes."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import urllib.request

from chat.cluster.launcher import LocalCluster
from chat.cluster.loadtest.options import LoadTestError
from chat.cluster.processes import free_port


def add_plain_bind(cluster: LocalCluster) -> int:
    """Add ``bind 127.0.0.1:<free port>`` (no TLS) to the ``public`` frontend of the
    cluster's generated haproxy.cfg, before it starts; returns the port."""
    config = cluster.haproxy.config
    lines = config.read_text().splitlines()
    port = free_port()
    try:
        at = next(i for i, ln in enumerate(lines) if ln.strip() == "frontend public")
    except StopIteration:
        raise LoadTestError("haproxy.cfg has no public frontend") from None
    lines.insert(at + 2, f"    bind 127.0.0.1:{port}  # chat loadtest: plaintext, loopback")
    config.write_text("\n".join(lines) + "\n")
    return port


def haproxy_stats(cluster: LocalCluster) -> dict[tuple[str, str], dict[str, str]]:
    """The stats page as ``{(proxy, server): row}``; empty if HAProxy does not answer."""
    try:
        with urllib.request.urlopen(cluster.stats_url + ";csv", timeout=2.0) as response:
            page = response.read().decode()
    except OSError:
        return {}
    rows = csv.DictReader(io.StringIO(page.lstrip("# ")))
    return {(r["pxname"], r["svname"]): r for r in rows}


_SS_RE = re.compile(r"bytes_sent:(\d+).*?bytes_received:(\d+)", re.S)


def edge_bytes(port: int) -> dict[str, int]:
    """Bytes HAProxy sent to / received from the clients on its established connections
    to loopback ``port`` (``ss -ti``: the kernel's per-socket counters; HAProxy's own
    counters only move when a websocket ends)."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    sent = received = sockets = 0
    for m in _SS_RE.finditer(out):
        sent, received, sockets = sent + int(m[1]), received + int(m[2]), sockets + 1
    return {"sent": sent, "received": received, "sockets": sockets}


def stat_int(row: dict[str, str] | None, key: str) -> int:
    value = (row or {}).get(key) or "0"
    return int(value) if value.isdigit() else 0
