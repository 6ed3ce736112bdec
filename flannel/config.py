"""Flannel's settings, from ``FLANNEL_*`` environment variables or a settings file.

The client-facing ones (limits, admission control, heartbeats, drain, metrics) are the chat
tier's :class:`~chat.config.FrontSettings`, with the same meaning and defaults: a client sees
the same limits whichever tier it reaches.
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from chat.config import FrontSettings
from chat.credentials import parse_keys


class FlannelSettings(FrontSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLANNEL_",
        env_file=os.environ.get("FLANNEL_SETTINGS_FILE"),
        extra="ignore",
    )

    port: int = 8766
    # The chat tier's service endpoints (a node's ws://host:port/service, or a load balancer
    # in front of several), tried in turn; JSON list.
    upstream: list[str] = ["ws://127.0.0.1:8765/service"]
    # Persistent service connections to keep open; each carries many sessions, and each
    # workspace is served by one of them (workspace id modulo this).
    upstream_connections: int = Field(default=2, ge=1, le=64)
    # The key this node signs its service credentials with, "kid=secret" (one of the chat
    # tier's CHAT_SERVICE_KEYS).
    service_key: str = ""
    # How long an upstream request (attach, snapshot, subscribe, replay, load) may take.
    upstream_timeout_s: float = Field(default=10.0, gt=0)
    # A workspace's load (every user, channel and membership): a 100,000-user workspace is
    # tens of megabytes.
    upstream_load_timeout_s: float = Field(default=60.0, gt=0)
    # Reconnecting a lost upstream connection: exponential backoff with full jitter.
    upstream_backoff_s: float = Field(default=0.2, gt=0)
    upstream_backoff_cap_s: float = Field(default=5.0, gt=0)
    # /readyz fails once no upstream connection has been up for this long (at once before
    # the first). Shorter blips keep the node in rotation: its workspaces stay where their
    # caches are, and its clients' connects wait for the link.
    upstream_grace_s: float = Field(default=5.0, ge=0)
    # Workspace caches are evicted, least recently used first, once no client of theirs is
    # connected here and the cached users of all workspaces pass this many.
    cache_max_users: int = Field(default=1_000_000, ge=0)

    @field_validator("service_key")
    @classmethod
    def _one_key(cls, value: str) -> str:
        if value and len(parse_keys(value)) != 1:
            raise ValueError("service_key is one kid=secret")
        return value

    @property
    def key(self) -> tuple[str, str]:
        """(kid, secret) of the service key; raises if unset."""
        keys = parse_keys(self.service_key)
        if not keys:
            raise ValueError("FLANNEL_SERVICE_KEY is not set: the chat tier refuses Flannel")
        return next(iter(keys.items()))
