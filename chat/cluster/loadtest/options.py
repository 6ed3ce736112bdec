"""What a run is asked to do, and the one error of the harness."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
RESULTS = REPO / "bench" / "results"
SCENARIOS = ("chatter", "hot", "storm", "monday")
CUTS = ("flannel", "chat", "haproxy", "client")


class LoadTestError(Exception):
    """The run could not be carried out (not a failed check: those are in the report)."""


@dataclass
class Options:
    scenario: str = "storm"
    clients: int = 1000
    procs: int = 2
    flannel: bool = True
    cut: str = "flannel"
    workspaces: int = 1
    channels: int = 4
    rate: float = 20.0  # messages/s over all posters
    post_before: float = 2.0
    post_after: float = 3.0
    backoff_ms: int = 100
    backoff_cap_ms: int = 5000
    jitter_ms: int = 1000
    attempts: int = 30
    connect_batch: int = 200  # handshakes in flight while clients first connect (not monday)
    conn_timeout_ms: int = 10000
    storm_max_s: float = 60.0
    observers: int = 2  # per workspace
    n_chat: int = 2
    n_flannel: int = 2
    out: Path | None = None  # JSON path; the PNG beside it
    cluster_dir: Path | None = None
    live: bool = False
    plot: bool = True
