"""Processes we start and stop by PID: servers of ours (``python -m <module> serve``), a
private ``redis-server``, and the reaper that kills them if the process that started them dies.

Used by the launcher (:mod:`chat.cluster.launcher`, whose :class:`LocalCluster` is the one
harness: ``chat cluster up``, ``chat loadtest`` and the tests' ``tests/cluster.py`` all run
through it) and by whatever starts a single node or Redis of its own (tests, benchmarks).

Every process is started in its own session (a terminal's ^C meant for the parent does not
hit it), stopped by PID only, and every wait is bounded (bounds scale with
``$CHAT_TEST_TIMEOUT_FACTOR`` on slow machines). If the parent dies without stopping them
(SIGKILL, ``os._exit``), a small reaper process kills whatever we registered with it,
checking the PID's start time so a recycled PID is never hit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

REDIS_SERVER_ENV = "CHAT_TEST_REDIS_SERVER"  # path of redis-server, if not on PATH
TIMEOUT_FACTOR_ENV = "CHAT_TEST_TIMEOUT_FACTOR"


def scaled(seconds: float) -> float:
    """``seconds`` times ``$CHAT_TEST_TIMEOUT_FACTOR`` (default 1): slow machines stretch
    every bound instead of anyone editing them."""
    raw = os.environ.get(TIMEOUT_FACTOR_ENV, "").strip()
    factor = float(raw) if raw else 1.0
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"{TIMEOUT_FACTOR_ENV}={raw!r} must be a finite number > 0")
    return seconds * factor


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
        extra_args: Sequence[str] = (),
        auth: tuple[str, str] | None = None,
    ) -> None:
        """
        :param port: listen on this port; None picks a free one at the first start.
        :param executable: redis-server binary; default ``$CHAT_TEST_REDIS_SERVER``, else
            ``redis-server`` on PATH, else /usr/bin/redis-server.
        :param startup_timeout: seconds to wait for PING to answer (default scaled 10).
        :param stop_timeout: seconds to wait after SIGTERM before SIGKILL (default scaled 5).
        :param base_dir: where to create the temporary directory (default: tempfile's).
        :param extra_args: more ``redis-server`` options (``--user chat on >pw ...``).
        :param auth: (ACL user, password) that PING authenticates as, when the ``default``
            user is off.
        """
        self._port = port
        self._fixed_port = port is not None
        self._executable = Path(executable) if executable is not None else None
        self.startup_timeout = startup_timeout if startup_timeout is not None else scaled(10)
        self.stop_timeout = stop_timeout if stop_timeout is not None else scaled(5)
        self._base_dir = base_dir
        self.extra_args = list(extra_args)
        self.auth = auth
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
        """``redis://127.0.0.1:<port>/0``, with ``user:password@`` when ``auth`` is set."""
        creds = f"{self.auth[0]}:{self.auth[1]}@" if self.auth is not None else ""
        return f"redis://{creds}127.0.0.1:{self.port}/0"

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
        return _redis_ping(self._port, timeout, self.auth)

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
                [self._find_executable(), str(conf), *self.extra_args],
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
            if _redis_ping(self.port, 0.5, self.auth):
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


def _redis_ping(port: int, timeout: float, auth: tuple[str, str] | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            if auth is not None:
                sock.sendall(resp_command("AUTH", *auth))
                if _recv_line(sock) != b"+OK":
                    return False
            sock.sendall(b"PING\r\n")
            return _recv_line(sock) == b"+PONG"
    except OSError:
        return False


def resp_command(*args: str) -> bytes:
    """One command in the Redis protocol (RESP) as an array of bulk strings."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


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
    by PID. Subclasses say which module and environment: the launcher's
    :class:`~chat.cluster.launcher.NodeProcess` (and the tests' ``ChatNodeProcess``).

    The port is chosen at the first start and kept: ``restart()`` and ``start()`` after
    ``kill()``/``terminate()`` listen on the same one; so is ``metrics_port`` (``/metrics``
    has its own listener, never the client port). stdout+stderr of every run are appended
    to ``log_path`` (in ``log_dir``, or in a temp directory deleted by close()). The
    environment is ours without the server's settings prefixes (``CHAT_TEST_*`` are kept),
    plus what the subclass sets, then ``extra_env`` (which may override any of them; it is
    a plain dict attribute, so a test may change it before a restart). The working
    directory is ``cwd`` (None: ours).
    """

    module = ""  # python -m <module> serve
    kind = "server"  # in messages: "node x ...", "flannel x ..."
    prefixes: tuple[str, ...] = ("CHAT_", "FLANNEL_")  # settings not inherited from us
    cwd: Path | None = None  # working directory (None: ours)

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
                cwd=self.cwd,
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


def start_all(nodes: Sequence[ServerProcess]) -> None:
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


def parse_metric(page: str, name: str, labels: str = "") -> float:
    """The value of sample ``name{labels}`` in a Prometheus text page (0 when absent)."""
    pattern = "^" + re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)$"
    found = re.search(pattern, page, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --------------------------------------------------------------------------- HTTP


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
