"""Flannel's own metrics, beside the front door's (chat/metrics.py, the same registry, so
one ``/metrics`` page shows both)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from chat.metrics import REGISTRY

UPSTREAM_CONNECTIONS = Gauge(
    "flannel_upstream_connections",
    "Service connections to the chat tier that are up",
    registry=REGISTRY,
)
WORKSPACE_LOADS = Counter(
    "flannel_workspace_loads_total",
    "Workspace caches loaded from the chat tier (one per workspace while it is cached here)",
    registry=REGISTRY,
)
CACHED_WORKSPACES = Gauge(
    "flannel_cached_workspaces", "Workspace caches held in memory", registry=REGISTRY
)
CACHED_USERS = Gauge("flannel_cached_users", "Users held in workspace caches", registry=REGISTRY)
