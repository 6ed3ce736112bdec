"""HAProxy as the load test sees it: its stats page and per-socket bytes."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import urllib.request
from collections.abc import Collection

from chat.cluster.launcher import LocalCluster


def haproxy_stats(cluster: LocalCluster) -> dict[tuple[str, str], dict[str, str]]:
    """The stats page as ``{(proxy, server): row}``; empty if HAProxy does not answer."""
    try:
        with urllib.request.urlopen(cluster.stats_url + ";csv", timeout=2.0) as response:
            page = response.read().decode()
    except OSError:
        return {}
    rows = csv.DictReader(io.StringIO(page.lstrip("# ")))
    return {(r["pxname"], r["svname"]): r for r in rows}


_SS_FIELD = re.compile(r"\b(bytes_sent|bytes_received):(\d+)")


def edge_sockets(port: int) -> dict[str, tuple[int, int]]:
    """HAProxy's established connections on loopback ``port``: ``{peer address: (bytes
    sent to it, bytes received from it)}`` from ``ss -ti`` (the kernel's per-socket
    counters; HAProxy's own counters only move when a websocket ends)."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    sockets: dict[str, tuple[int, int]] = {}
    peer = None
    for line in out.splitlines():
        if line and not line[0].isspace():  # "Recv-Q Send-Q local peer"
            peer = line.split()[-1]
            sockets[peer] = (0, 0)
        elif peer is not None:
            fields = dict(_SS_FIELD.findall(line))
            sockets[peer] = (int(fields.get("bytes_sent", 0)), int(fields.get("bytes_received", 0)))
    return sockets


def edge_bytes(port: int, old: Collection[str] = ()) -> dict[str, int]:
    """Bytes sent and received on the connections to ``port`` that are not in ``old`` (the
    peers of an earlier :func:`edge_sockets`), and how many there are."""
    new = [v for k, v in edge_sockets(port).items() if k not in old]
    return {
        "sent": sum(v[0] for v in new),
        "received": sum(v[1] for v in new),
        "sockets": len(new),
    }


def stat_int(row: dict[str, str] | None, key: str) -> int:
    value = (row or {}).get(key) or "0"
    return int(value) if value.isdigit() else 0
