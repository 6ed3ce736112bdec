"""Throwaway PostgreSQL servers for tests (no pytest dependency).

Typical use::

    with postgres_for_tests() as server:      # external or temporary, see below
        dsn = server.create_database(unique_database_name())
        ...                                   # or: await server.acreate_database(...)

* If ``CHAT_TEST_PG_DSN`` is set (a ``postgresql://`` URL of a role that may
  ``CREATE DATABASE``), that server is used as is: :class:`ExternalPostgres`,
  nothing is started or stopped.
* Otherwise :class:`TempPostgres` runs ``initdb`` + ``pg_ctl start`` in a fresh
  temporary directory on a free loopback port and removes everything on exit.

``initdb`` and ``postgres`` refuse to run as root; when we are root the server
runs as the ``postgres`` OS user if it exists, else ``nobody``.

The cluster lives in ``$CHAT_TEST_PG_TMPDIR`` if set, else in ``/dev/shm`` when it
is a roomy tmpfs (CREATE DATABASE measured at ~7 ms there against ~260 ms on an
ext4 /tmp, even with fsync=off), else in the usual temp dir (``$TMPDIR``, /tmp).

The server binaries are looked up in this order: ``$CHAT_TEST_PG_BINDIR``, the
newest ``/usr/lib/postgresql/<version>/bin`` (Debian/Ubuntu), ``pg_config
--bindir``, then ``initdb`` on ``PATH``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg

PG_DSN_ENV = "CHAT_TEST_PG_DSN"
PG_BINDIR_ENV = "CHAT_TEST_PG_BINDIR"
PG_TMPDIR_ENV = "CHAT_TEST_PG_TMPDIR"

# Lower-case, unquoted-style identifiers only: no quoting surprises, fits NAMEDATALEN (63).
_DB_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(RuntimeError):
    """A test PostgreSQL server could not be found, started, used or stopped."""


def unique_database_name(prefix: str = "test") -> str:
    """A fresh valid database name such as ``test_3f2a...``, unique per call."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    _check_db_name(name)
    return name


def _check_db_name(name: str) -> None:
    if not _DB_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid database name {name!r}: use [a-z_][a-z0-9_]*, at most 63 characters"
        )


def dsn_with_database(dsn: str, database: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) with its database replaced by ``database``."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {dsn!r}")
    return urlunsplit(parts._replace(path="/" + database))


# --------------------------------------------------------------------------- servers


class PostgresServer:
    """A reachable server: an admin ``dsn`` and helpers to make databases on it.

    The sync helpers use ``asyncio.run`` and so cannot be called from a running
    event loop; use the ``a``-prefixed coroutines there.
    """

    connect_timeout: float = 10.0
    # CREATE DATABASE ... STRATEGY = FILE_COPY (PostgreSQL >= 15): ~10x faster than the
    # default WAL_LOG copy on a throwaway server, but it forces two checkpoints, which
    # is rude to a shared one. Subclasses choose.
    file_copy_strategy: bool = False

    @property
    def dsn(self) -> str:
        """DSN of the maintenance database, for a role allowed to CREATE DATABASE."""
        raise NotImplementedError

    def dsn_for(self, name: str) -> str:
        """DSN of database ``name`` on this server (whether or not it exists)."""
        _check_db_name(name)
        return dsn_with_database(self.dsn, name)

    async def acreate_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its DSN."""
        dsn = self.dsn_for(name)
        # template0 rather than the default template1: CREATE DATABASE fails if anyone
        # is connected to its template, and nobody can connect to template0.
        sql = f'CREATE DATABASE "{name}" TEMPLATE template0'
        conn = await self._admin_connect()
        try:
            if self.file_copy_strategy and conn.get_server_version().major >= 15:
                sql += " STRATEGY = FILE_COPY"
            await conn.execute(sql)
        finally:
            await conn.close()
        return dsn

    async def adrop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions (PG >= 13)."""
        _check_db_name(name)
        conn = await self._admin_connect()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def create_database(self, name: str) -> str:
        """Sync :meth:`acreate_database`."""
        return asyncio.run(self.acreate_database(name))

    def drop_database(self, name: str) -> None:
        """Sync :meth:`adrop_database`."""
        asyncio.run(self.adrop_database(name))

    async def _admin_connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=self.connect_timeout)


class ExternalPostgres(PostgresServer):
    """A server somebody else runs (e.g. ``$CHAT_TEST_PG_DSN``): nothing to start or stop."""

    def __init__(self, dsn: str) -> None:
        dsn_with_database(dsn, "postgres")  # validate the URL form early
        self._dsn = dsn

    @property
    def dsn(self) -> str:
        return self._dsn

    def __repr__(self) -> str:
        return f"ExternalPostgres({_redact(self._dsn)!r})"


class TempPostgres(PostgresServer):
    """A private PostgreSQL server in a temporary directory, for one test run.

    ``start()`` runs initdb and ``pg_ctl start``; ``stop()`` stops it and deletes
    the directory (also registered with ``atexit`` in case nobody calls it). If
    our process dies without either (SIGKILL, SIGTERM, ``os._exit``), a small
    watchdog process shuts the server down and deletes the directory.
    Usable as a context manager. The server listens on 127.0.0.1 only, trusts
    every local connection (superuser ``postgres``, no password) and runs with
    ``fsync=off``: fast, and fine for data that is thrown away after the run.
    """

    file_copy_strategy = True

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        run_as: str | None = None,
        startup_timeout: float = 60.0,
        extra_settings: Mapping[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """
        :param bindir: directory holding initdb/pg_ctl; found automatically if None.
        :param run_as: OS user for the server when we are root (default: ``postgres``
            if that user exists, else ``nobody``); ignored when not root.
        :param startup_timeout: seconds to wait for initdb/start/stop each.
        :param extra_settings: more ``-c name=value`` server settings.
        :param base_dir: where to create the temporary directory; None picks one
            (see the module docstring).
        """
        self._bindir = Path(bindir) if bindir is not None else None
        self._run_as = run_as
        self.startup_timeout = startup_timeout
        self._extra_settings = dict(extra_settings or {})
        self._base_dir = base_dir
        self._tmpdir: Path | None = None
        self._port: int | None = None
        self._ids: tuple[int, int] | None = None  # (uid, gid) to run as, None = ourselves
        self._postmaster_pid: int | None = None
        self._active_bindir: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- public ------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresError("TempPostgres is not started")
        return self._port

    @property
    def directory(self) -> Path:
        """The temporary directory: ``data/`` (cluster), ``logfile``, the Unix socket."""
        if self._tmpdir is None:
            raise PostgresError("TempPostgres is not started")
        return self._tmpdir

    @property
    def log_path(self) -> Path:
        return self.directory / "logfile"

    @property
    def started(self) -> bool:
        return self._port is not None

    @property
    def postmaster_pid(self) -> int | None:
        """The running server's PID (from its data directory), None when not running."""
        if self._tmpdir is None or not self.started:
            return None
        return _read_postmaster_pid(self._tmpdir / "data")

    def start(self) -> Self:
        """Create the cluster and start the server; returns self. Raises PostgresError."""
        if self._tmpdir is not None:
            raise PostgresError("TempPostgres already started")
        bindir = self._active_bindir = self._bindir or find_pg_bindir()
        self._ids = _unprivileged_ids(self._run_as) if os.geteuid() == 0 else None
        base_dir = self._base_dir if self._base_dir is not None else default_base_dir()
        self._tmpdir = Path(tempfile.mkdtemp(prefix="chat-pg-", dir=base_dir))
        atexit.register(self.stop)
        try:
            if self._ids is not None:
                os.chown(self._tmpdir, *self._ids)
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D", "data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
                    # Skip fsync of the new cluster: it is thrown away after the run anyway.
                    "--no-sync",
                ],
                what="initdb",
            )  # fmt: skip
            self._start_server(bindir)
            self._start_watchdog()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and delete the directory. Idempotent."""
        atexit.unregister(self.stop)
        tmpdir, self._tmpdir = self._tmpdir, None
        self._port = None
        if tmpdir is None:
            return
        try:
            if (tmpdir / "data" / "postmaster.pid").exists():
                bindir = self._active_bindir or find_pg_bindir()
                try:
                    self._run(
                        [str(bindir / "pg_ctl"), "-D", "data", "-m", "fast", "-w",
                         "-t", str(max(1, round(self.startup_timeout))), "stop"],
                        what="pg_ctl stop",
                        cwd=tmpdir,
                    )  # fmt: skip
                except PostgresError:
                    self._kill_postmaster()
                    raise
        finally:
            self._postmaster_pid = None
            shutil.rmtree(tmpdir, ignore_errors=True)
            self._stop_watchdog()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"port {self._port}, {self._tmpdir}" if self.started else "not started"
        return f"<TempPostgres {where}>"

    # -- internals ---------------------------------------------------------------------

    def _start_server(self, bindir: Path) -> None:
        assert self._tmpdir is not None
        settings = {
            # Durability off: test data is disposable and this makes DDL-heavy tests fast.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            **self._extra_settings,
        }
        attempts = 3  # free_port() can race with other processes grabbing the same port
        for attempt in range(1, attempts + 1):
            port = free_port()
            options = ["-h", "127.0.0.1", "-p", str(port), "-k", str(self._tmpdir)]
            for key, value in settings.items():
                options += ["-c", f"{key}={value}"]
            try:
                self._run(
                    [str(bindir / "pg_ctl"), "-D", "data", "-o", shlex.join(options),
                     "-l", "logfile", "-w", "-t", str(max(1, round(self.startup_timeout))),
                     "start"],
                    what="pg_ctl start",
                )  # fmt: skip
            except PostgresError:
                log = _tail(self._tmpdir / "logfile")
                if attempt < attempts and "could not bind" in log:
                    (self._tmpdir / "logfile").unlink(missing_ok=True)
                    continue
                raise
            self._port = port
            self._postmaster_pid = _read_postmaster_pid(self._tmpdir / "data")
            self._wait_ready(bindir)
            return

    def _wait_ready(self, bindir: Path) -> None:
        """Poll until the server accepts connections (pg_ctl -w mostly did this already)."""
        deadline = time.monotonic() + self.startup_timeout
        pg_isready = bindir / "pg_isready"
        while True:
            ok = False
            if pg_isready.exists():
                ok = (
                    subprocess.run(
                        [str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                         "-U", "postgres", "-d", "postgres", "-t", "2"],
                        check=False,
                        stdin=subprocess.DEVNULL,
                        env=_clean_env(),
                    ).returncode
                    == 0
                )  # fmt: skip
            else:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=2),
                ):
                    ok = True
            if ok:
                return
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"postgres on port {self.port} not accepting connections after "
                    f"{self.startup_timeout}s\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _run(self, argv: list[str], *, what: str, cwd: Path | None = None) -> None:
        """Run a server tool in the temp dir, as the unprivileged user if we are root."""
        cwd = cwd or self._tmpdir
        # As root: same effect as `setpriv --reuid --regid --clear-groups`, without needing it.
        uid, gid = self._ids if self._ids is not None else (None, None)
        groups: list[int] | None = [] if self._ids is not None else None
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
                timeout=self.startup_timeout + 10,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"{what} failed: {exc}") from exc
        if proc.returncode != 0:
            log = _tail(cwd / "logfile") if cwd is not None else ""
            raise PostgresError(
                f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n"
                f"{proc.stdout}{proc.stderr}" + (f"\n--- server log ---\n{log}" if log else "")
            )

    def _start_watchdog(self) -> None:
        """Start a process that cleans up after us if we die without calling stop().

        It waits for EOF on a pipe whose only writer is this process: EOF comes
        when stop() closes it (the directory is gone by then: nothing to do) or
        when this process dies, in which case the server is still running.
        """
        assert self._tmpdir is not None
        if self._postmaster_pid is None:
            return
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self._postmaster_pid), str(self._tmpdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not hit by the terminal's ^C meant for pytest
        )

    def _stop_watchdog(self) -> None:
        proc, self._watchdog = self._watchdog, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl stop failed: immediate shutdown of the server we started."""
        pid = self._postmaster_pid
        if pid is None:
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):  # SIGQUIT = immediate shutdown
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.05)


# Run by TempPostgres._start_watchdog as `python -c _WATCHDOG POSTMASTER_PID TMPDIR`.
_WATCHDOG = """
import os, shutil, signal, sys, time
pid, tmpdir = int(sys.argv[1]), sys.argv[2]
sys.stdin.buffer.read()  # returns at EOF: stop() closed the pipe, or our parent died
if not os.path.isdir(tmpdir):
    sys.exit(0)  # stop() did its job
def ours():  # still alive and still our postmaster (not a reused pid)?
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return tmpdir.encode() in f.read()
    except OSError:
        return False
for sig in (signal.SIGQUIT, signal.SIGKILL):  # SIGQUIT: immediate shutdown
    if ours():
        os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while ours() and time.monotonic() < deadline:
            time.sleep(0.05)
shutil.rmtree(tmpdir, ignore_errors=True)
"""


@contextlib.contextmanager
def postgres_for_tests(*, startup_timeout: float = 60.0) -> Iterator[PostgresServer]:
    """The server tests should use, for the duration of the ``with`` block.

    ``$CHAT_TEST_PG_DSN`` set: an :class:`ExternalPostgres` for it (left running).
    Otherwise a started :class:`TempPostgres`, stopped and removed on exit.
    """
    external = os.environ.get(PG_DSN_ENV, "").strip()
    if external:
        yield ExternalPostgres(external)
        return
    with TempPostgres(startup_timeout=startup_timeout) as server:
        yield server


# --------------------------------------------------------------------------- helpers


def find_pg_bindir() -> Path:
    """Directory with the PostgreSQL server binaries (initdb, pg_ctl, postgres)."""
    candidates: list[Path] = []
    if env := os.environ.get(PG_BINDIR_ENV):
        candidates.append(Path(env))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)  # follow /usr/local/bin symlinks
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PostgresError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them "
        "(Debian: apt-get install postgresql), set $CHAT_TEST_PG_BINDIR, or point "
        f"${PG_DSN_ENV} at a running server. Looked in: {[str(c) for c in candidates]}"
    )


def default_base_dir() -> str | None:
    """Where TempPostgres puts its directory by default; None means tempfile's choice."""
    if env := os.environ.get(PG_TMPDIR_ENV):
        return env
    shm = "/dev/shm"
    # Docker's default /dev/shm is only 64 MB: too small for a cluster plus test databases.
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free >= 1 << 30:
            return shm
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unprivileged_ids(user: str | None) -> tuple[int, int]:
    names = [user] if user else ["postgres", "nobody"]
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise PostgresError(f"user {name!r} is root; postgres refuses to run as root")
        return entry.pw_uid, entry.pw_gid
    raise PostgresError(f"running as root and none of the users {names} exists to run postgres")


def _clean_env() -> dict[str, str]:
    """Our environment without PG* variables that would redirect the server tools."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _read_postmaster_pid(datadir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((datadir / "postmaster.pid").read_text().splitlines()[0])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"  # a zombie has exited; in a container nobody may reap it


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
