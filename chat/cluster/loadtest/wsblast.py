"""The clients: wsblast processes in storm mode (bench/wsblast.c) and their reports merged."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chat.cluster.loadtest.options import REPO, LoadTestError

WSBLAST_SRC = REPO / "bench" / "wsblast.c"
WSBLAST = REPO / "bench" / ".build" / "wsblast"
AUTH_ID = "bench-auth"  # the request id of every client's auth; the reply names it
FAIL_MATCH = '"type":"error"'
PING = '{"type":"ping","id":"hb"}'
STAT_SUMS = (
    "conns ok failed unfinished not_lost out_before connects retries hints goodbyes resumed "
    "switched conn_errors timeouts refused error_frames server_closed"
).split()
STAT_DICTS = ("hint_kinds", "resume_errors", "close_codes", "http_status")


def build_wsblast() -> Path:
    if not WSBLAST.exists() or WSBLAST.stat().st_mtime < WSBLAST_SRC.stat().st_mtime:
        WSBLAST.parent.mkdir(exist_ok=True)
        cmd = ["gcc", "-O2", "-Wall", "-o", str(WSBLAST), str(WSBLAST_SRC)]
        subprocess.run(cmd, check=True, timeout=120)
    return WSBLAST


class Blast:
    """One wsblast process in storm mode: its clients, a line protocol on stdin/stdout."""

    def __init__(self, name: str, argv: list[str], log: Path, workspace: int) -> None:
        self.name = name
        self.workspace = workspace
        self.log = log
        self._buf = b""
        with log.open("ab") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
            )
        self.pid = self.popen.pid

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        """Read lines until one starts with ``prefix``; the rest of it (blocking, bounded)."""
        import select

        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LoadTestError(f"{self.name}: no {prefix} within {timeout:.0f}s")
                if select.select([fd], [], [], left)[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise LoadTestError(f"{self.name}: exited ({self.popen.poll()})")
                    self._buf += chunk
            line, _, self._buf = self._buf.partition(b"\n")
            text = line.decode(errors="replace")
            if text.startswith(prefix):
                return text[len(prefix) :].strip()

    def expect_json(self, prefix: str, timeout: float) -> dict[str, Any]:
        data = json.loads(self.expect(prefix, timeout))
        assert isinstance(data, dict)
        return data

    def stop(self, timeout: float = 10.0) -> None:
        """QUIT, then SIGTERM, then SIGKILL: this process only, by PID."""
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.send("QUIT")
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout)
                        break
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (the ceil(q*n)-th smallest), as wsblast computes it."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))]


def merge_rounds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One STORM report from the K processes' reports of a round: counts summed, times
    over every client from the earliest start (round 0) or the MARK (later rounds)."""
    out: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in reports) for k in STAT_SUMS}
    for key in STAT_DICTS:
        merged: dict[str, int] = {}
        for r in reports:
            for k, v in r.get(key, {}).items():
                merged[k] = merged.get(k, 0) + int(v)
        out[key] = merged
    t0 = min(int(r["t0_ns"]) for r in reports)
    ready = [float(x) + (int(r["t0_ns"]) - t0) / 1e6 for r in reports for x in r["ready_ms"]]
    out |= {
        "round": reports[0]["round"],
        "live": len(ready) + out["not_lost"],  # round >= 1: back, or never lost
        "dropped": out["conns"] - out["not_lost"],
        "resume_errors_total": sum(out["resume_errors"].values()),
        "ready_ms": sorted(ready),
        "last_ready_ms": max(ready) if ready else None,
        "ready_p50_ms": pct(ready, 0.5),
        "ready_p99_ms": pct(ready, 0.99),
        "peak_connects_per_s": peak_rate(ready),
    }
    return out


def peak_rate(ready_ms: Sequence[float], window_ms: float = 100.0) -> float:
    """The most clients that went live in one ``window_ms`` window, per second."""
    if not ready_ms:
        return 0.0
    bins: dict[int, int] = {}
    for x in ready_ms:
        bins[int(x // window_ms)] = bins.get(int(x // window_ms), 0) + 1
    return max(bins.values()) * 1000.0 / window_ms


def merge_counts(reports: list[dict[str, Any]]) -> dict[str, Any]:
    keys = "conns live posted dups conns_exact conns_short short_sum conns_over over_sum"
    out: dict[str, Any] = {k: sum(int(r[k]) for r in reports) for k in keys.split()}
    out["not_live"] = sum(int(r["not_live"]) for r in reports)
    return out
