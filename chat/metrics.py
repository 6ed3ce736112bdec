"""Prometheus metrics of one node, served at ``/metrics``."""

from __future__ import annotations

import json
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("chat_connections", "Open websocket connections", registry=REGISTRY)
SESSIONS = Gauge("chat_sessions", "Authenticated sessions on this node", registry=REGISTRY)
ERRORS = Counter("chat_errors_total", "Error frames sent, by code", ["code"], registry=REGISTRY)
CLOSES = Counter(
    "chat_closes_total", "Connections closed by the server, by code", ["code"], registry=REGISTRY
)
RESUMES = Counter(
    "chat_resumes_total", "Resume attempts, by outcome", ["outcome"], registry=REGISTRY
)
REQUESTS = Histogram(
    "chat_request_seconds",
    "Request handling time, by type",
    ["type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
ADMISSION_REFUSED = Counter(
    "chat_admission_refused_total",
    "Connects sent away with a retry hint: HTTP 503 before the upgrade, for a full queue "
    "(at_upgrade) or a connection that had waited too long in the listen queue "
    "(waited_too_long); or goodbye + close 1013 past the connect deadline (past_deadline);"
    " or a session attach over a service connection (service_attach)",
    ["when"],
    registry=REGISTRY,
)
SERVICE_CONNECTIONS = Gauge(
    "chat_service_connections",
    "Open service connections from edge nodes (each carries many sessions)",
    registry=REGISTRY,
)
SERVICE_REFUSED = Counter(
    "chat_service_refused_total",
    "Service connections refused before the upgrade: missing, forged, expired or unknown-key"
    " credentials",
    registry=REGISTRY,
)
CONNECTING = Gauge(
    "chat_connects_in_progress",
    "Connects admitted and not yet live or ended (admission control's queue)",
    registry=REGISTRY,
)
SNAPSHOT_BATCH = Histogram(
    "chat_connect_snapshot_batch_size",
    "Connecting sessions whose snapshots one statement read",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
DB_COMMIT = Histogram(
    "chat_db_commit_seconds",
    "Journal transaction time (one batch of operations)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
DB_BATCH = Histogram(
    "chat_db_batch_size",
    "Operations per journal transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)


def observe_commit(batch: int, seconds: float) -> None:
    DB_COMMIT.observe(seconds)
    DB_BATCH.observe(batch)


def render() -> bytes:
    return generate_latest(REGISTRY)


class Tally:
    """Plain counters for the per-frame hot path (a prometheus Counter takes a lock per
    increment); exported as counters at scrape time."""

    __slots__ = ("dropped", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0


TALLY = Tally()


class _TallyCollector:
    def collect(self) -> Iterator[Metric]:
        for name, doc, value in (
            ("chat_frames_in", "Frames received from clients", TALLY.frames_in),
            ("chat_frames_out", "Frames written to clients (events, replies)", TALLY.frames_out),
            ("chat_frames_dropped", "Droppable frames skipped for slow consumers", TALLY.dropped),
        ):
            yield CounterMetricFamily(name, doc, value=value)


REGISTRY.register(_TallyCollector())


def count_error(frame: bytes) -> None:
    """Count an error frame by its code (cheap: error frames are rare)."""
    try:
        code = json.loads(frame).get("code")
    except ValueError:
        return
    if code:
        ERRORS.labels(code=code).inc()
