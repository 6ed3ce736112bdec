"""Settings, from ``CHAT_*`` environment variables or a ``.env``-style settings file.

Every limit the server enforces lives here, so an operator can see and change it in one place.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chat.credentials import parse_keys


class FrontSettings(BaseSettings):
    """What every tier that clients connect to shares (the chat node and the edge): the
    client-facing limits, admission control, heartbeats, drain and operations. Each tier
    reads them with its own prefix (``CHAT_``, ``FLANNEL_``)."""

    host: str = "127.0.0.1"
    port: int = 8765
    # Unique by default (bus and presence): in containers every server is PID 1, and two
    # nodes with one id would overwrite each other's presence.
    node_id: str = Field(default_factory=lambda: default_node_id())

    # Limits.
    max_frame_bytes: int = 16 * 1024
    rate_limit_per_10s: int = 50
    rate_limit_disconnect_after: int = 20  # refused frames within 10 s before closing
    max_inflight_requests: int = 32
    auth_timeout_s: float = 5.0
    handshake_timeout_s: float = 10.0
    # A connection quiet this long gets a websocket PING (its PONG is liveness); one that
    # sent nothing for two heartbeat intervals is closed 4000.
    ping_interval_s: float = Field(default=20.0, gt=0)
    heartbeat_interval_ms: int = 30_000

    # Browsers must send an allowed Origin, or the origin of the server itself (a page this
    # server gave out: Origin's host is the request's Host); clients that send none (apps,
    # scripts) are accepted. "*": any.
    allowed_origins: list[str] = []
    # The names this node answers to, for its own pages' websockets (chat/web.py
    # trusted_host, against DNS rebinding). Empty: loopback names when listening on
    # loopback, else any. "*": any.
    allowed_hosts: list[str] = []
    # The browser client's static files, served on plain GETs of the client port (chat/web.py).
    # Empty: web/ beside the chat package, else web/ in the working directory.
    web_root: str = ""
    # Slow consumers: past the soft mark, typing/presence are dropped; past the hard mark,
    # the connection is closed (4001: reconnect and resume) instead of growing its buffer.
    send_buffer_soft_bytes: int = 256 * 1024
    # Under load, a connection's frames are written at most this often (the frames of the
    # interval in one write: fewer system calls per frame); an idle connection's at once.
    write_delay_ms: float = Field(default=0.0, ge=0, le=100)
    send_buffer_hard_bytes: int = 2 * 1024 * 1024
    # The kernel caps the accept queue at net.core.somaxconn (4096 on recent kernels, 128 on
    # old ones): raise both for storms (docs/operations.md).
    listen_backlog: int = 8192

    # Admission control (chat/admission.py): connects in progress at once are capped at what
    # the node finishes in admission_budget_s at its measured rate, and at max_connecting;
    # the others get HTTP 503 with a retry hint. A connect not live connect_deadline_s after
    # its HTTP request is dropped with a hint (its client has likely given up).
    max_connecting: int = Field(default=10_000, ge=1)
    admission_budget_s: float = Field(default=4.0, gt=0)
    connect_deadline_s: float = Field(default=10.0, gt=0)

    # Operations: Prometheus /metrics is served on its own listener, never on the client port
    # (None: not served; 0: a free port, logged at start).
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    # Drain: on SIGTERM, connections are closed over this period (not all at once), each
    # told to come back after a random delay, so a deploy does not cause a reconnect storm.
    drain_period_s: float = 5.0
    shutdown_grace_s: float = 5.0

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"


class Settings(FrontSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHAT_",
        env_file=os.environ.get("CHAT_SETTINGS_FILE"),
        extra="ignore",
    )

    # Empty: the embedded SQLite store at sqlite_path with in-process fan-out.
    database_url: str = ""
    sqlite_path: str = "chat.sqlite3"
    redis_url: str = ""

    # Tokens are HMAC-signed with this secret. Unset: one is generated once and kept in
    # secret_key_file (below), so the server and the admin command agree without configuration.
    secret_key: str = ""
    token_ttl_s: int = 30 * 24 * 3600

    # Replay window for resume: events are kept while they are among the last
    # replay_max_events of their workspace OR younger than replay_window_s (both minimums).
    replay_window_s: float = 900.0
    replay_max_events: int = 10_000

    # Presence across nodes: a node's users stay active this long after it stops refreshing
    # (it died), and each node re-reads everyone's presence this often.
    presence_ttl_s: int = 15
    presence_poll_s: float = 2.0

    # security
    # Password login (argon2id: ~200 ms and 64 MiB each) is limited per node: attempts per
    # client IP and per account (workspace + handle) within login_window_s (only failures
    # count), and hashing runs on login_hash_concurrency threads with at most
    # login_hash_queue attempts waiting; beyond any limit: rate_limited with retry_after_ms.
    login_attempts_per_ip: int = Field(default=20, ge=1)
    login_attempts_per_account: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=60.0, gt=0)
    login_hash_concurrency: int = Field(default=2, ge=1)
    login_hash_queue: int = Field(default=8, ge=0)
    # Open setup: while the database has no workspace at all, the first client may create
    # one and its owner (`setup`; `hello` says `setup_required`). Off: only `chat admin`.
    open_setup: bool = True
    # Service connections from edge nodes (Flannel, docs/flannel.md) at /service: the keys
    # their credentials may be signed with, "kid=secret[,kid=secret...]" (32+ byte secrets;
    # several at once while a key is rotated). Empty: /service refuses everyone.
    service_keys: str = ""
    # An edge that stops reading its service connection is cut off past this (it subscribes
    # again, after what it has, on a new connection).
    service_buffer_hard_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    # Where a generated signing secret is kept (mode 0600) when secret_key is unset. Empty:
    # "chat.secret" beside the SQLite file, or in the working directory with PostgreSQL.
    secret_key_file: str = ""

    # bus and presence
    typing_interval_s: float = 3.0
    # Presence changes are written to Redis in batches at most this often (a connect costs
    # O(1)); without Redis, a node polls the store this often for events committed by other
    # processes (PostgreSQL also notifies at once).
    presence_flush_s: float = Field(default=0.25, gt=0)
    change_poll_s: float = Field(default=0.5, gt=0)

    # database
    # PostgreSQL pool, per node: connections kept open, and the most open at once. A
    # statement running past db_command_timeout_s, or a wait for a pooled connection past
    # db_acquire_timeout_s, fails the request with `unavailable` (retryable). Prepared
    # statements are cached per connection (0 behind a transaction-mode pooler).
    db_pool_min_size: int = Field(default=2, ge=0)
    db_pool_max_size: int = Field(default=20, ge=1)
    db_command_timeout_s: float = Field(default=30.0, gt=0)
    db_acquire_timeout_s: float = Field(default=10.0, gt=0)
    db_statement_cache_size: int = Field(default=100, ge=0)
    # Retention (chat/retention.py, every prune_interval_s, at most prune_batch_size rows per
    # statement): events older than event_retention_s (at least the resume window) and not
    # among a workspace's last replay_max_events; sessions past their expiry, and revoked
    # ones revoked_session_retention_s after their revocation.
    event_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    revoked_session_retention_s: float = Field(default=24 * 3600.0, ge=0)
    prune_interval_s: float = Field(default=300.0, gt=0)
    prune_batch_size: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _database_settings_agree(self) -> Settings:
        if self.event_retention_s < self.replay_window_s:
            raise ValueError(
                "event_retention_s must be at least replay_window_s: resume reads the event log"
            )
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("db_pool_min_size must not exceed db_pool_max_size")
        parse_keys(self.service_keys)  # a malformed key list fails at start-up
        return self


def default_node_id() -> str:
    """Host name, PID and a random suffix: unique even where every server is PID 1."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
