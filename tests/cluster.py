"""Multi-node test clusters: a throwaway Redis, chat node processes, a seeded workspace.

No pytest dependency (the fixtures live in ``tests/conftest.py``). Typical use::

    with TempRedis() as redis:                              # redis-server on a free port
        node = ChatNodeProcess("a", database_url=dsn, redis_url=redis.url)
        with node:                                          # start() waits for /readyz
            async with Client.connect(node.url, token) as client: ...
            node.kill()                                     # SIGKILL: a crash
            node.restart()                                  # same port again

    async with Cluster(dsn, n_nodes=3) as cluster:          # own TempRedis + 3 nodes
        seeded = await cluster.seed()                       # or before start(): see below
        async with cluster.client(0, "alice") as alice: ...

    async with Cluster(dsn, n_nodes=2, n_flannel=2) as cluster:    # + 2 Flannel nodes
        async with cluster.flannel_client(0, "alice") as alice: ...  # through Flannel
        cluster.flannel(0).metric("flannel_workspace_loads_total")

* :class:`TempRedis` runs ``redis-server`` without persistence (``save ""``,
  ``appendonly no``): a restart comes back empty, on the same port, which is what
  failure tests want to provoke.
* :class:`ChatNodeProcess` runs ``python -m chat serve`` on a loopback port with the
  shared database, Redis and secret; its stdout/stderr go to a log file whose tail is
  in every error.
* :class:`FlannelNodeProcess` runs ``python -m flannel serve`` (the edge tier,
  docs/flannel.md) in front of chat nodes' ``/service`` URLs, signing its service
  credentials with :data:`SERVICE_KEY`.
* :class:`Cluster` ties one PostgreSQL database, one TempRedis, N chat nodes and M
  Flannel nodes together, migrates before starting nodes, starts Flannel after the chat
  nodes, and seeds through :class:`chat.admin.Admin`.
* Both kinds of node read their own ``/metrics`` listener: ``node.metric(name, labels)``.

Every process is started in its own session (a terminal's ^C meant for pytest does
not hit it), stopped by PID only, and every wait is bounded. If the test process dies
without stopping them (SIGKILL, ``os._exit``), a small reaper process kills whatever we
registered with it, checking the PID's start time so a recycled PID is never hit.

The synchronous methods block; in async tests prefer the ``a``-prefixed variants of the
node methods that wait for a while (``astart``, ``aterminate``, ``arestart``, ``astop``,
``akill``, ``ametric``):
a test whose event loop is blocked cannot answer a stopping node's close handshake.
Redis operations take milliseconds and have no async variants.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from chat.admin import Admin
from chat.client import Client
from chat.config import Settings
from chat.storage import open_database
from tests.pg import free_port
from tests.timing import scaled

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER_ENV = "CHAT_TEST_REDIS_SERVER"  # path of redis-server, if not on PATH
SECRET = "cluster-test-secret-key-0123456789-abcdefghijklmnop"
DEFAULT_HANDLES = ("alice", "bob", "carol", "dave")  # the first one is the owner
# Service connections (docs/flannel.md): every cluster's chat nodes accept this key, and its
# Flannel nodes sign their credentials with it.
SERVICE_KID = "cluster"
SERVICE_SECRET = "cluster-service-secret-0123456789-abcdefghijklmnop"
SERVICE_KEY = f"{SERVICE_KID}={SERVICE_SECRET}"


class ClusterError(RuntimeError):
    """A test Redis or chat node could not be started, reached or stopped."""


# --------------------------------------------------------------------------- Redis


class TempRedis:
    """A private ``redis-server`` on 127.0.0.1, without persistence, in a temp directory.

    ``start()`` picks a free port the first time and keeps it: ``stop()``/``kill()``
    followed by ``start()`` (or ``restart()``) listen on the same port, with no data.
    ``close()`` (and leaving the ``with`` block) stops the server and deletes the
    directory; it is also registered with ``atexit``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        executable: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """
        :param port: listen on this port; None picks a free one at the first start.
        :param executable: redis-server binary; default ``$CHAT_TEST_REDIS_SERVER``, else
            ``redis-server`` on PATH, else /usr/bin/redis-server.
        :param startup_timeout: seconds to wait for PING to answer (default scaled 10).
        :param stop_timeout: seconds to wait after SIGTERM before SIGKILL (default scaled 5).
        :param base_dir: where to create the temporary directory (default: tempfile's).
        """
        self._port = port
        self._fixed_port = port is not None
        self._executable = Path(executable) if executable is not None else None
        self.startup_timeout = startup_timeout if startup_timeout is not None else scaled(10)
        self.stop_timeout = stop_timeout if stop_timeout is not None else scaled(5)
        self._base_dir = base_dir
        self._tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- public ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("TempRedis has not been started")
        return self._port

    @property
    def port_or_none(self) -> int | None:
        """The port, or None before the first start() chose one."""
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running server, None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def directory(self) -> Path:
        if self._tmpdir is None:
            raise ClusterError("TempRedis has not been started")
        return self._tmpdir

    @property
    def log_path(self) -> Path:
        """The server's own log (``logfile``); early start-up errors go to ``stderr.log``."""
        return self.directory / "redis.log"

    def log_tail(self, lines: int = 40) -> str:
        if self._tmpdir is None:
            return ""
        return (
            _tail(self._tmpdir / "stderr.log", lines) + "\n" + _tail(self.log_path, lines)
        ).strip()

    def start(self) -> Self:
        """Start the server (fresh, empty) and wait until it answers PING; returns self."""
        if self.running:
            raise ClusterError(f"redis-server already running on port {self._port}")
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="chat-redis-", dir=self._base_dir))
            _reaper.register_dir(self._tmpdir)
            atexit.register(self.close)
        attempts = 1 if self._fixed_port else 3  # free_port() can race with another process
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = free_port()
            try:
                self._spawn()
                self._wait_ready()
                return self
            except ClusterError as exc:
                self._reap(kill=True)
                if attempt < attempts and "Address already in use" in str(exc):
                    self._port = None
                    continue
                raise
        raise AssertionError("unreachable")

    def stop(self) -> int | None:
        """SIGTERM, wait up to ``stop_timeout``, then SIGKILL. Returns the exit status
        (None if it was not running). Keeps the port and directory for a later start()."""
        return self._reap(kill=False)

    def kill(self) -> int | None:
        """SIGKILL and wait: a crash. Returns the exit status (None if not running)."""
        return self._reap(kill=True)

    def restart(self, *, hard: bool = False) -> Self:
        """Stop (``hard``: kill) and start again on the same port; all data is gone."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def ping(self, timeout: float = 1.0) -> bool:
        """Whether the server answers PING with PONG right now."""
        if self._port is None:
            return False
        return _redis_ping(self._port, timeout)

    def close(self) -> None:
        """Stop the server and delete the directory. Idempotent."""
        atexit.unregister(self.close)
        try:
            self._reap(kill=False)
        finally:
            tmpdir, self._tmpdir = self._tmpdir, None
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
                _reaper.unregister_dir(tmpdir)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "not running"
        return f"<TempRedis port {self._port}, {state}>"

    # -- internals ---------------------------------------------------------------------

    def _find_executable(self) -> str:
        if self._executable is not None:
            return str(self._executable)
        if env := os.environ.get(REDIS_SERVER_ENV):
            return env
        found = shutil.which("redis-server")
        if found:
            return found
        if Path("/usr/bin/redis-server").is_file():
            return "/usr/bin/redis-server"
        raise ClusterError(
            "redis-server not found: install it (scripts/install; Debian: apt-get install "
            f"redis-server) or set ${REDIS_SERVER_ENV}"
        )

    def _spawn(self) -> None:
        tmpdir = self.directory
        conf = tmpdir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode no",
                    "daemonize no",
                    'save ""',  # no RDB snapshots: a restart loses everything
                    "appendonly no",
                    f'dir "{tmpdir}"',
                    f'logfile "{self.log_path}"',
                    "loglevel notice",
                    "",
                ]
            )
        )
        self.log_path.unlink(missing_ok=True)
        self._log_file = open(tmpdir / "stderr.log", "ab")  # noqa: SIM115 - closed in _reap
        try:
            self._proc = subprocess.Popen(
                [self._find_executable(), str(conf)],
                cwd=tmpdir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log_file.close()
            self._log_file = None
            raise ClusterError(f"cannot run redis-server: {exc}") from exc
        _reaper.register(self._proc.pid)

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if proc.poll() is not None:
                raise ClusterError(
                    f"redis-server on port {self._port} exited with status {proc.returncode}"
                    f" during start-up\n{self.log_tail()}"
                )
            if _redis_ping(self.port, 0.5):
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"redis-server on port {self._port} did not answer PING within "
                    f"{self.startup_timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def _reap(self, *, kill: bool) -> int | None:
        proc, self._proc = self._proc, None
        try:
            if proc is None:
                return None
            return _stop_process(proc, kill=kill, timeout=self.stop_timeout)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None


def _redis_ping(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return _recv_line(sock) == b"+PONG"
    except OSError:
        return False


def _recv_line(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n" not in buf and len(buf) < 1024:
        chunk = sock.recv(1024)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\r\n", 1)[0]


# --------------------------------------------------------------------------- server processes


class ServerProcess:
    """A server of ours (``python -m <module> serve``) in a subprocess on 127.0.0.1, stopped
    by PID. Subclasses say which module and environment: :class:`ChatNodeProcess`,
    :class:`FlannelNodeProcess`.

    The port is chosen at the first start and kept: ``restart()`` and ``start()`` after
    ``kill()``/``terminate()`` listen on the same one; so is ``metrics_port`` (``/metrics``
    has its own listener, never the client port). stdout+stderr of every run are appended
    to ``log_path`` (in ``log_dir``, or in a temp directory deleted by close()). The
    environment is ours without the server's settings prefixes (``CHAT_TEST_*`` are kept),
    plus what the subclass sets, then ``extra_env`` (which may override any of them; it is
    a plain dict attribute, so a test may change it before a restart). The working
    directory is the repository root.
    """

    module = ""  # python -m <module> serve
    kind = "server"  # in messages: "node x ...", "flannel x ..."
    prefixes: tuple[str, ...] = ("CHAT_", "FLANNEL_")  # settings not inherited from us

    def __init__(
        self,
        name: str,
        *,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        """
        :param name: node id and log file name.
        :param startup_timeout: seconds for /readyz to answer 200 (default scaled 20).
        :param stop_timeout: seconds to wait for exit after SIGTERM (default scaled 15).
        """
        self.name = name
        self.extra_env: dict[str, str] = dict(extra_env or {})
        self.startup_timeout = startup_timeout if startup_timeout is not None else scaled(20)
        self.stop_timeout = stop_timeout if stop_timeout is not None else scaled(15)
        self._port = port
        self._fixed_port = port is not None
        self.metrics_port = free_port()
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._own_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._runs = 0
        self.returncode: int | None = None  # exit status of the last run that ended

    # -- what a subclass says ----------------------------------------------------------

    def settings_env(self) -> dict[str, str]:
        """The server's own settings (before ``extra_env``)."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError(f"{self.kind} {self.name} has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Websocket URL for :meth:`chat.client.Client.connect`."""
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        """PID of the running process, None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        if self._log_dir is None:
            if self._own_dir is None:
                self._own_dir = Path(tempfile.mkdtemp(prefix=f"chat-{self.kind}-{self.name}-"))
                _reaper.register_dir(self._own_dir)
            self._log_dir = self._own_dir
        return self._log_dir / f"{self.name}.log"

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the log (all runs, separated by ``--- start`` lines)."""
        return _tail(self.log_path, n)

    def env(self) -> dict[str, str]:
        """The environment the next start() will use."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(self.prefixes) or k.startswith("CHAT_TEST_")
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.settings_env())
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        """Start the process and wait until ``GET /readyz`` answers 200; returns self.

        Raises ClusterError with the log tail if it exits or is not ready in time (the
        process is killed then)."""
        attempts = 1 if self._fixed_port or self._port is not None else 3
        for attempt in range(1, attempts + 1):
            self.spawn()
            try:
                self.wait_ready()
                return self
            except ClusterError as exc:
                self._reap(kill=True)
                if attempt < attempts and "address already in use" in str(exc).lower():
                    self._port = None  # free_port() raced with someone: take another
                    continue
                raise
        raise AssertionError("unreachable")

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        if self.running:
            raise ClusterError(f"{self.kind} {self.name} is already running (pid {self.pid})")
        if self._port is None:
            self._port = free_port()
        self._runs += 1
        self.returncode = None
        log = self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        log.write(f"--- start #{self._runs} of {self.name} on port {self._port}\n".encode())
        log.flush()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "serve", "--host", "127.0.0.1",
                 "--port", str(self._port)],
                cwd=REPO_ROOT,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            log.close()
            self._log_file = None
            raise ClusterError(f"cannot start {self.kind} {self.name}: {exc}") from exc
        _reaper.register(self._proc.pid)
        atexit.unregister(self.close)
        atexit.register(self.close)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/readyz`` until it answers 200, the process exits, or ``timeout``."""
        proc = self._proc
        if proc is None:
            raise ClusterError(f"{self.kind} {self.name} is not started")
        limit = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last = "no answer"
        while True:
            if proc.poll() is not None:
                raise ClusterError(
                    f"{self.kind} {self.name} (port {self._port}) exited with status "
                    f"{proc.returncode} during start-up\n{self.log_tail()}"
                )
            answer = http_get(self.port, "/readyz", timeout=1.0)
            if answer is not None:
                if answer[0] == 200:
                    return
                last = f"HTTP {answer[0]} {answer[1][:200]!r}"
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.kind} {self.name} (port {self._port}) not ready after {limit}s "
                    f"(last /readyz: {last})\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
        """``GET path`` on this node: (status, body), or None if nothing answers. ``/metrics``
        goes to the node's metrics listener."""
        port = self.metrics_port if path.split("?", 1)[0] == "/metrics" else self.port
        return http_get(port, path, timeout=timeout)

    def readyz(self) -> int | None:
        """The status ``/readyz`` answers right now (None: nothing answers)."""
        answer = self.http_get("/readyz", timeout=1.0)
        return None if answer is None else answer[0]

    def metrics(self) -> str:
        """The node's ``/metrics`` page; raises ClusterError if it does not answer 200."""
        answer = self.http_get("/metrics")
        if answer is None or answer[0] != 200:
            raise ClusterError(f"{self.kind} {self.name}: /metrics gave {answer!r}")
        return answer[1].decode()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of ``/metrics`` (0 when absent): ``metric("chat_errors_total",
        'code="rate_limited"')``."""
        return parse_metric(self.metrics(), name, labels)

    def kill(self) -> int | None:
        """SIGKILL by PID and wait: a crash. Returns the exit status (None if not running)."""
        return self._reap(kill=True)

    def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM (graceful shutdown) and wait up to ``timeout`` (default ``stop_timeout``);
        returns the exit status. If it does not exit in time it is SIGKILLed and
        ClusterError raised with the log tail."""
        proc = self._proc
        if proc is None:
            raise ClusterError(f"{self.kind} {self.name} is not running")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        limit = self.stop_timeout if timeout is None else timeout
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self._reap(kill=True)
            raise ClusterError(
                f"{self.kind} {self.name} (pid {proc.pid}) did not exit within {limit}s of "
                f"SIGTERM; killed\n{self.log_tail()}"
            ) from None
        code = self._reap(kill=True)
        assert code is not None
        return code

    def stop(self) -> int | None:
        """For teardown: SIGTERM, SIGKILL after ``stop_timeout``; never raises for a slow
        exit. Returns the exit status (None if it was not running)."""
        return self._reap(kill=False)

    def restart(self, *, hard: bool = False) -> Self:
        """terminate() (``hard``: kill()) then start() on the same port."""
        if hard:
            self.kill()
        elif self.running:
            self.terminate()
        return self.start()

    def close(self) -> None:
        """stop(), and delete the log directory if we created it. Idempotent."""
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            own, self._own_dir = self._own_dir, None
            if own is not None:
                self._log_dir = None
                shutil.rmtree(own, ignore_errors=True)
                _reaper.unregister_dir(own)

    # Async variants: the blocking waits run in a worker thread.

    async def astart(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def aterminate(self, timeout: float | None = None) -> int:
        return await asyncio.to_thread(self.terminate, timeout)

    async def arestart(self, *, hard: bool = False) -> Self:
        return await asyncio.to_thread(lambda: self.restart(hard=hard))

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    async def akill(self) -> int | None:
        return await asyncio.to_thread(self.kill)

    async def areadyz(self) -> int | None:
        return await asyncio.to_thread(self.readyz)

    async def ametric(self, name: str, labels: str = "") -> float:
        return await asyncio.to_thread(self.metric, name, labels)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "not running"
        return f"<{type(self).__name__} {self.name} port {self._port}, {state}>"

    # -- internals ---------------------------------------------------------------------

    def _reap(self, *, kill: bool) -> int | None:
        proc, self._proc = self._proc, None
        try:
            if proc is None:
                return None
            self.returncode = _stop_process(proc, kill=kill, timeout=self.stop_timeout)
            return self.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None


def parse_metric(page: str, name: str, labels: str = "") -> float:
    """The value of sample ``name{labels}`` in a Prometheus text page (0 when absent)."""
    pattern = "^" + re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)$"
    found = re.search(pattern, page, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --------------------------------------------------------------------------- chat nodes


class ChatNodeProcess(ServerProcess):
    """``python -m chat serve``: ``CHAT_DATABASE_URL``, ``CHAT_REDIS_URL`` (empty: no
    Redis), ``CHAT_NODE_ID`` (the name), ``CHAT_SECRET_KEY``, ``CHAT_METRICS_PORT``,
    ``CHAT_SERVICE_KEYS`` (when ``service_keys`` is set: Flannel may connect),
    ``CHAT_LOG_FORMAT=text``, ``CHAT_LOG_LEVEL=info``; see :class:`ServerProcess`."""

    module = "chat"
    kind = "node"
    prefixes = ("CHAT_",)

    def __init__(
        self,
        name: str,
        *,
        database_url: str,
        redis_url: str = "",
        secret_key: str = SECRET,
        service_keys: str = "",
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__(
            name,
            port=port,
            extra_env=extra_env,
            log_dir=log_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.database_url = database_url
        self.redis_url = redis_url
        self.secret_key = secret_key
        self.service_keys = service_keys

    @property
    def service_url(self) -> str:
        """Where edge nodes open service connections (docs/flannel.md)."""
        return f"ws://127.0.0.1:{self.port}/service"

    def settings_env(self) -> dict[str, str]:
        env = {
            "CHAT_DATABASE_URL": self.database_url,
            "CHAT_REDIS_URL": self.redis_url,
            "CHAT_NODE_ID": self.name,
            "CHAT_SECRET_KEY": self.secret_key,
            "CHAT_METRICS_PORT": str(self.metrics_port),
            "CHAT_LOG_FORMAT": "text",
            "CHAT_LOG_LEVEL": "info",
        }
        if self.service_keys:
            env["CHAT_SERVICE_KEYS"] = self.service_keys
        return env


# --------------------------------------------------------------------------- Flannel nodes


class FlannelNodeProcess(ServerProcess):
    """``python -m flannel serve``: an edge node in front of the chat nodes at ``upstream``
    (their ``/service`` URLs; a plain list attribute, read at each start).

    Environment: ``FLANNEL_UPSTREAM`` (JSON), ``FLANNEL_SERVICE_KEY`` (one of the chat
    nodes' ``CHAT_SERVICE_KEYS``), ``FLANNEL_UPSTREAM_CONNECTIONS``, ``FLANNEL_NODE_ID``
    (the name), ``FLANNEL_METRICS_PORT``, a fast upstream reconnect backoff (0.05 s, capped
    at 0.5 s), ``FLANNEL_LOG_FORMAT=text``, ``FLANNEL_LOG_LEVEL=info``, then ``extra_env``.
    ``/readyz`` answers 200 once an upstream connection is up: a node whose credential the
    chat tier refuses never becomes ready (use :meth:`spawn`, not :meth:`start`, for one).
    """

    module = "flannel"
    kind = "flannel"

    def __init__(
        self,
        name: str,
        *,
        upstream: Sequence[str],
        service_key: str = SERVICE_KEY,
        upstream_connections: int = 2,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__(
            name,
            port=port,
            extra_env=extra_env,
            log_dir=log_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.upstream: list[str] = list(upstream)
        self.service_key = service_key
        self.upstream_connections = upstream_connections

    def settings_env(self) -> dict[str, str]:
        return {
            "FLANNEL_UPSTREAM": json.dumps(self.upstream),
            "FLANNEL_SERVICE_KEY": self.service_key,
            "FLANNEL_UPSTREAM_CONNECTIONS": str(self.upstream_connections),
            "FLANNEL_NODE_ID": self.name,
            "FLANNEL_METRICS_PORT": str(self.metrics_port),
            "FLANNEL_UPSTREAM_BACKOFF_S": "0.05",
            "FLANNEL_UPSTREAM_BACKOFF_CAP_S": "0.5",
            "FLANNEL_LOG_FORMAT": "text",
            "FLANNEL_LOG_LEVEL": "info",
        }


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """``GET path`` on 127.0.0.1:port: (status, body), or None if nothing answers."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(request.encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                buf += chunk
            head, body = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = None
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip())
            while length is None or len(body) < length:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                body += chunk
            return status, body
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class SeededWorkspace:
    """What :meth:`Cluster.seed` created."""

    workspace_id: int
    users: dict[str, int]  # handle -> user id
    tokens: dict[str, str]  # handle -> token
    channels: dict[str, int]  # name -> channel id (public, every seeded user a member)

    @property
    def handles(self) -> list[str]:
        return list(self.users)


class Cluster:
    """One PostgreSQL database, one Redis, N chat node processes, the same secret; and M
    Flannel nodes in front of them.

    ``nodes[i]`` is named ``node0``, ``node1``...; ``flannels[i]`` ``flannel0``...
    ``start()`` starts Redis (if it is not running), migrates the database once
    (concurrent first starts would race on it), then starts every chat node in parallel,
    then every Flannel node in parallel, each with ``FLANNEL_UPSTREAM`` = every chat node's
    ``/service`` URL. ``stop()``/``close()`` stop the Flannel nodes, then the chat nodes
    (SIGTERM, in parallel) and then Redis, if this cluster created it.

    Every chat node accepts :data:`SERVICE_KEY` (``CHAT_SERVICE_KEYS``); Flannel nodes sign
    with it unless given another ``service_key`` (``add_flannel``).
    """

    def __init__(
        self,
        database_url: str,
        *,
        n_nodes: int = 2,
        n_flannel: int = 0,
        redis: TempRedis | None = None,
        use_redis: bool = True,
        secret_key: str = SECRET,
        extra_env: Mapping[str, str] | None = None,
        flannel_env: Mapping[str, str] | None = None,
        upstream_connections: int = 2,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """
        :param n_flannel: Flannel nodes in front of the chat nodes (started after them).
        :param redis: a TempRedis to use (left running by close()); None creates one.
        :param use_redis: False: no Redis at all, nodes get an empty CHAT_REDIS_URL.
        :param extra_env: extra environment for every chat node (see ChatNodeProcess).
        :param flannel_env: extra environment for every Flannel node.
        :param upstream_connections: each Flannel node's FLANNEL_UPSTREAM_CONNECTIONS.
        :param log_dir: where node logs go (default: a temp dir per node, deleted).
        """
        self.database_url = database_url
        self.secret_key = secret_key
        self.extra_env: dict[str, str] = dict(extra_env or {})
        self.flannel_env: dict[str, str] = dict(flannel_env or {})
        self.upstream_connections = upstream_connections
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._own_redis = use_redis and redis is None
        self.redis: TempRedis | None = None
        if use_redis:
            self.redis = redis if redis is not None else TempRedis()
        self.nodes: list[ChatNodeProcess] = []
        self.flannels: list[FlannelNodeProcess] = []
        self.seeded: SeededWorkspace | None = None  # the last seed()
        for _ in range(n_nodes):
            self._new_node()
        for _ in range(n_flannel):
            self._new_flannel()

    @property
    def redis_url(self) -> str:
        """The Redis URL nodes get: empty without Redis or before it first started."""
        if self.redis is None or self.redis.port_or_none is None:
            return ""
        return self.redis.url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def service_urls(self) -> list[str]:
        """Every chat node's ``/service`` URL: what Flannel nodes connect to."""
        return [node.service_url for node in self.nodes]

    @property
    def flannel_urls(self) -> list[str]:
        return [f.url for f in self.flannels]

    def flannel(self, index: int) -> FlannelNodeProcess:
        return self.flannels[index]

    def chat_metric(self, name: str, labels: str = "") -> float:
        """A metric summed over the running chat nodes (``chat_service_connections``)."""
        return sum(n.metric(name, labels) for n in self.nodes if n.running)

    async def achat_metric(self, name: str, labels: str = "") -> float:
        return await asyncio.to_thread(self.chat_metric, name, labels)

    def __getitem__(self, index: int) -> ChatNodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def settings(self, **overrides: Any) -> Settings:
        """:class:`chat.config.Settings` for in-process use of this cluster's store."""
        base: dict[str, Any] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "secret_key": self.secret_key,
        }
        base.update(overrides)
        return Settings(**base)

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[Admin]:
        """A :class:`chat.admin.Admin` on the cluster's database, closed afterwards."""
        admin = await Admin.open(self.settings())
        try:
            yield admin
        finally:
            await admin.close()

    async def migrate(self) -> None:
        """Apply the schema migrations (opening the store does it)."""
        db = await open_database(self.database_url, "")
        await db.close()

    async def seed(
        self,
        workspace: str = "acme",
        handles: Sequence[str] = DEFAULT_HANDLES,
        channels: Sequence[str] = ("general",),
    ) -> SeededWorkspace:
        """Create ``workspace`` with users ``handles`` (the first is the owner, the rest
        members), public ``channels`` with every user in them, and a token per user.
        Works before or after start(); the result is also kept in ``self.seeded``."""
        async with self.admin() as admin:
            wid = await admin.create_workspace(workspace)
            specs = [
                {"handle": h, "display_name": h.title(), "role": "owner" if i == 0 else "member"}
                for i, h in enumerate(handles)
            ]
            users = {u.handle: u.id for u in await admin.create_users(wid, specs)}
            ids = list(users.values())
            chans = {}
            for name in channels:
                chans[name] = (await admin.create_channel(wid, name, ids[0], ids, False)).id
            tokens = dict(zip(users, await admin.issue_tokens(ids), strict=True))
        self.seeded = SeededWorkspace(wid, users, tokens, chans)
        return self.seeded

    async def start(self) -> Self:
        """Start Redis (if needed), migrate, then every chat node not running, in parallel,
        then every Flannel node not running, in parallel."""
        if self.redis is not None and not self.redis.running:
            await asyncio.to_thread(self.redis.start)
        await self.migrate()
        pending = [n for n in self.nodes if not n.running]
        for node in pending:
            node.redis_url = self.redis_url
        await asyncio.to_thread(self._start_nodes, pending)
        edges = [f for f in self.flannels if not f.running]
        for edge in edges:
            edge.upstream = self.service_urls
        await asyncio.to_thread(self._start_nodes, edges)
        return self

    async def add_node(self, *, extra_env: Mapping[str, str] | None = None) -> ChatNodeProcess:
        """One more node (``node<N>``), started; ``extra_env`` adds to the cluster's."""
        node = self._new_node(extra_env)
        node.redis_url = self.redis_url
        await node.astart()
        return node

    async def add_flannel(
        self,
        *,
        extra_env: Mapping[str, str] | None = None,
        service_key: str = SERVICE_KEY,
        ready: bool = True,
    ) -> FlannelNodeProcess:
        """One more Flannel node (``flannel<N>``) in front of every chat node, started.
        ``ready``: wait for its /readyz (False: only spawned; one the chat tier refuses
        never becomes ready). ``extra_env`` adds to the cluster's ``flannel_env``."""
        edge = self._new_flannel(extra_env, service_key)
        edge.upstream = self.service_urls
        if ready:
            await edge.astart()
        else:
            await asyncio.to_thread(edge.spawn)
        return edge

    async def stop(self) -> None:
        """Stop every Flannel node, then every chat node (SIGTERM, in parallel, SIGKILL
        after a bound), then our Redis."""
        await asyncio.gather(*(f.astop() for f in self.flannels))
        await asyncio.gather(*(n.astop() for n in self.nodes))
        if self.redis is not None and self._own_redis:
            self.redis.stop()

    async def close(self) -> None:
        """stop(), then delete temporary directories. Idempotent."""
        try:
            try:
                await asyncio.gather(*(asyncio.to_thread(f.close) for f in self.flannels))
            finally:
                await asyncio.gather(*(asyncio.to_thread(n.close) for n in self.nodes))
        finally:
            if self.redis is not None and self._own_redis:
                self.redis.close()

    @contextlib.asynccontextmanager
    async def client(self, node: int, handle: str, **kwargs: Any) -> AsyncIterator[Client]:
        """A :class:`chat.client.Client` on ``nodes[node]`` authenticated as ``handle``
        of the last seeded workspace."""
        if self.seeded is None:
            raise ClusterError("seed() the cluster first")
        async with Client.connect(self.nodes[node].url, self.seeded.tokens[handle], **kwargs) as c:
            yield c

    @contextlib.asynccontextmanager
    async def flannel_client(self, index: int, handle: str, **kwargs: Any) -> AsyncIterator[Client]:
        """A :class:`chat.client.Client` on ``flannels[index]`` authenticated as ``handle``
        of the last seeded workspace."""
        if self.seeded is None:
            raise ClusterError("seed() the cluster first")
        token = self.seeded.tokens[handle]
        async with Client.connect(self.flannels[index].url, token, **kwargs) as c:
            yield c

    async def __aenter__(self) -> Self:
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        edges = f" flannels={self.flannels}" if self.flannels else ""
        return f"<Cluster {self.nodes}{edges} redis={self.redis}>"

    # -- internals ---------------------------------------------------------------------

    def _new_node(self, extra_env: Mapping[str, str] | None = None) -> ChatNodeProcess:
        node = ChatNodeProcess(
            f"node{len(self.nodes)}",
            database_url=self.database_url,
            redis_url=self.redis_url,
            secret_key=self.secret_key,
            service_keys=SERVICE_KEY,
            extra_env={**self.extra_env, **(extra_env or {})},
            log_dir=self.log_dir,
        )
        self.nodes.append(node)
        return node

    def _new_flannel(
        self, extra_env: Mapping[str, str] | None = None, service_key: str = SERVICE_KEY
    ) -> FlannelNodeProcess:
        edge = FlannelNodeProcess(
            f"flannel{len(self.flannels)}",
            upstream=[],  # the chat nodes' ports are known once they started
            service_key=service_key,
            upstream_connections=self.upstream_connections,
            extra_env={**self.flannel_env, **(extra_env or {})},
            log_dir=self.log_dir,
        )
        self.flannels.append(edge)
        return edge

    @staticmethod
    def _start_nodes(nodes: Sequence[ServerProcess]) -> None:
        """Spawn all, then wait for each: they boot in parallel. All or none."""
        try:
            for node in nodes:
                node.spawn()
            for node in nodes:
                node.wait_ready()
        except BaseException:
            for node in nodes:
                node.kill()
            raise


# --------------------------------------------------------------------------- processes


def _stop_process(proc: subprocess.Popen[bytes], *, kill: bool, timeout: float) -> int:
    """Stop ``proc`` (ours, by PID): SIGKILL, or SIGTERM then SIGKILL after ``timeout``."""
    try:
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
                try:
                    return proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
        return proc.wait(timeout=scaled(10))  # SIGKILL: bounded all the same
    finally:
        if proc.poll() is not None:
            _reaper.unregister(proc.pid)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a recycled PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class _Reaper:
    """One helper process per test process that cleans up what we registered if we die.

    We write ``+ PID STARTTIME`` / ``- PID`` and ``+d PATH`` / ``-d PATH`` lines to its
    stdin; at EOF (we closed it, or exited however abruptly) it SIGKILLs every PID still
    registered whose start time still matches, then deletes the directories still
    registered. Started lazily; without /proc it kills nothing.
    """

    _SRC = r"""
import os, shutil, signal, sys
def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
live, dirs = {}, set()
for line in sys.stdin:  # until EOF: our parent closed the pipe or died
    op, arg = line.rstrip("\n").split(" ", 1)
    if op == "+":
        pid, started = arg.split()
        live[int(pid)] = started
    elif op == "-":
        live.pop(int(arg), None)
    elif op == "+d":
        dirs.add(arg)
    elif op == "-d":
        dirs.discard(arg)
for pid, started in live.items():
    if start_time(pid) == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = -1  # the process that started the reaper (not a forked child)

    def register(self, pid: int) -> None:
        started = _start_time(pid)
        if started is not None:
            self._send(f"+ {pid} {started}\n")

    def unregister(self, pid: int) -> None:
        self._send(f"- {pid}\n")

    def register_dir(self, path: Path) -> None:
        self._send(f"+d {path}\n")

    def unregister_dir(self, path: Path) -> None:
        self._send(f"-d {path}\n")

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._pid != os.getpid():
                if line.startswith("-"):
                    return  # nothing registered in this process yet
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", self._SRC, "chat-test-reaper"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # not hit by the terminal's ^C meant for pytest
                )
                self._pid = os.getpid()
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.write(line.encode())
                self._proc.stdin.flush()


_reaper = _Reaper()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
