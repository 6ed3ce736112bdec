"""``chat cluster up``: the whole topology as local processes, from the installed binaries;
and THE harness: the integration tests, ``tests/cluster.py`` and ``chat loadtest`` all run
through :class:`LocalCluster` (one orchestration, not three).

PostgreSQL (``initdb --auth=scram-sha-256``, a password), Redis (an ACL user with a
password, the ``default`` user off), N chat nodes and M Flannel nodes (``python -m chat
serve`` / ``python -m flannel serve`` with :func:`chat.cluster.topology.environment`) and
HAProxy (the rendered config, a self-signed certificate), each on a free loopback port, in
one directory. Started in dependency order, each waited for (bounded); stopped in reverse,
each by its PID.

What tests need besides, as options of the same cluster: ``database_url=`` (a database
of theirs: no PostgreSQL started), ``redis=False`` (no Redis), ``haproxy=False`` (no HAProxy:
Flannel nodes reach the chat nodes' ``/service`` URLs directly), per-kind and per-node
extra environment, and nodes added at run time (:meth:`LocalCluster.add_chat`,
:meth:`LocalCluster.add_flannel`). Every node's settings are still
:func:`~chat.cluster.topology.environment`'s, with only what those options change.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from chat.cluster import tls
from chat.cluster.haproxy import Limits
from chat.cluster.haproxy import render as render_haproxy
from chat.cluster.processes import (
    ClusterError,
    ServerProcess,
    TempRedis,
    _reaper,
    _stop_process,
    _tail,
    free_port,
    http_get,
    scaled,
    start_all,
)
from chat.cluster.topology import (
    CHAT_PATH,
    DATABASE,
    POSTGRES,
    REDIS,
    REDIS_USER,
    Endpoint,
    Endpoints,
    Secrets,
    Topology,
    database_url,
    environment,
    redis_args,
    redis_url,
)

log = logging.getLogger(__name__)
PG_BINDIR_ENV = "CHAT_PG_BINDIR"  # where initdb/postgres are, if not found


# --------------------------------------------------------------------------- our nodes


class NodeProcess(ServerProcess):
    """A chat or Flannel node (``python -m <module> serve``) whose settings are
    ``settings``: a mapping, or a function called at each start (a cluster's nodes get
    :meth:`LocalCluster.settings_for`, so a Flannel node started again sees the chat nodes
    added since). See :class:`~chat.cluster.processes.ServerProcess` for the rest."""

    def __init__(
        self,
        name: str,
        module: str,
        settings: Mapping[str, str] | Callable[[], Mapping[str, str]],
        *,
        port: int | None = None,
        metrics_port: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__(
            name,
            port=port,
            log_dir=log_dir,
            extra_env=extra_env,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.module = module
        self.kind = module
        if metrics_port is not None:
            self.metrics_port = metrics_port
        self._settings = settings

    @property
    def service_url(self) -> str:
        """A chat node's service endpoint, where Flannel opens its connections."""
        return f"ws://127.0.0.1:{self.port}/service"

    def settings_env(self) -> dict[str, str]:
        settings = self._settings
        return dict(settings() if callable(settings) else settings)


# --------------------------------------------------------------------------- PostgreSQL


def find_pg_bindir() -> Path:
    candidates = [Path(p) for p in [os.environ.get(PG_BINDIR_ENV, "")] if p]
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
        reverse=True,
    )
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise ClusterError(f"initdb/postgres not found: install PostgreSQL or set ${PG_BINDIR_ENV}")


def postgres_ids() -> tuple[int, int] | None:
    """(uid, gid) PostgreSQL runs as: ``postgres`` (else ``nobody``) when we are root (it
    refuses to run as root), None (ourselves) otherwise."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(user)
            return entry.pw_uid, entry.pw_gid
    raise ClusterError("running as root, and no postgres or nobody user to run PostgreSQL as")


def enterable(path: Path, ids: tuple[int, int]) -> bool:
    """Whether user ``ids`` may enter ``path`` and every directory above it."""
    uid, gid = ids
    for directory in (path, *path.parents):
        st = directory.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


class PostgresProcess:
    """``postgres`` in ``directory/data``, password (SCRAM) authentication only, on
    127.0.0.1:``port``; as the ``postgres`` (else ``nobody``) user when we are root. The
    superuser ``postgres`` has ``password``. Stopped by PID: SIGINT (fast shutdown), then
    SIGKILL after a bound."""

    def __init__(self, directory: Path, port: int, password: str) -> None:
        self.directory = directory
        self.port = port
        self.password = password
        self.timeout = scaled(60)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ids = postgres_ids()
        self.created = False  # the last start() ran initdb

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _as_user(self) -> dict[str, Any]:
        if self._ids is None:
            return {}
        return {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}

    def start(self) -> None:
        """initdb (unless ``data`` holds a cluster already: ``created`` says which), start,
        wait until it accepts connections."""
        bindir = find_pg_bindir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.created = not (self.directory / "data" / "PG_VERSION").exists()
        if self.created:
            self._initdb(bindir)
        self._log = open(self.directory / "postgres.log", "ab")  # noqa: SIM115 - closed in stop
        self._proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(self.directory / "data"), "-h", "127.0.0.1",
             "-p", str(self.port), "-k", str(self.directory), "-c", "fsync=off",
             "-c", "max_connections=200", *_preload(bindir)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, **self._as_user(),
        )  # fmt: skip
        _reaper.register(self._proc.pid)
        deadline = time.monotonic() + self.timeout
        while not _pg_ready(bindir, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"postgres did not start\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        return _tail(self.directory / "postgres.log")

    def _initdb(self, bindir: Path) -> None:
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._ids is not None:
            for path in (self.directory, pwfile):
                os.chown(path, *self._ids)
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.directory / "data"), "-U", "postgres",
             "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale",
             "--no-sync"],
            capture_output=True, text=True, timeout=self.timeout, check=False,
            stdin=subprocess.DEVNULL, **self._as_user(),
        )  # fmt: skip
        pwfile.unlink()
        if initdb.returncode != 0:
            raise ClusterError(
                f"initdb failed (as root, every directory above {self.directory} must be "
                f"enterable by the postgres user):\n{initdb.stdout}{initdb.stderr}"
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # fast shutdown (SIGTERM waits for clients)
                _stop_process(proc, kill=False, timeout=self.timeout)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def _preload(bindir: Path) -> list[str]:
    """pg_stat_statements, when this PostgreSQL ships it (Debian's does): load tests count
    the statements a storm costs."""
    libdir = bindir.parent / "lib"
    if (libdir / "pg_stat_statements.so").is_file():
        return ["-c", "shared_preload_libraries=pg_stat_statements"]
    return []


def _pg_ready(bindir: Path, port: int) -> bool:
    """Whether PostgreSQL accepts connections: ``pg_isready`` (a port that accepts TCP may
    still answer "the database system is starting up"), else a TCP connect."""
    pg_isready = bindir / "pg_isready"
    if not pg_isready.is_file():
        return _accepts(port)
    ready = subprocess.run(
        [str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "2"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=scaled(10), check=False,
    )  # fmt: skip
    return ready.returncode == 0


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


# --------------------------------------------------------------------------- HAProxy


class HAProxyProcess:
    """``haproxy -W -S master.sock -f haproxy.cfg`` (master-worker): :meth:`reload` is
    SIGUSR2 to the master (a new worker; the old one keeps its websockets, and with
    ``spread_s`` we close them one at a time over that window instead of all together at
    ``hard-stop-after``), :meth:`stop` SIGTERM to the master, SIGKILL after a bound.
    :meth:`servers` reads the stats page."""

    def __init__(self, config: Path, stats_port: int, admin_socket: Path) -> None:
        self.config = config
        self.stats_port = stats_port
        self.admin_socket = admin_socket
        self.master_socket = config.parent / "haproxy-master.sock"
        self.timeout = scaled(15)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self._log = open(self.config.parent / "haproxy.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [exe, "-W", "-S", str(self.master_socket), "-f", str(self.config)],
            cwd=self.config.parent,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _reaper.register(self._proc.pid)
        deadline = time.monotonic() + self.timeout
        while http_get(self.stats_port, "/;csv", timeout=1.0) is None:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"haproxy did not start\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        return _tail(self.config.parent / "haproxy.log")

    def reload(self, spread_s: float | None = None) -> SpreadClose | None:
        """Save the servers' states (``server-state-file``), SIGUSR2 to the master; returns
        once it reports the new worker loaded. ``spread_s``: then close the old workers'
        client connections one at a time over that many seconds, in a thread (returned;
        its ``remaining`` attribute lists how many each old worker still held before each
        close)."""
        if self._proc is None or self._proc.poll() is not None:
            raise ClusterError("haproxy is not running")
        (self.config.parent / "haproxy.state").write_text(self.command("show servers state"))
        log = self.config.parent / "haproxy.log"
        loaded = log.read_text(errors="replace").count("Loading success.")
        before = self.workers()
        self._proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + self.timeout
        while log.read_text(errors="replace").count("Loading success.") <= loaded:
            if time.monotonic() > deadline or "Reload failed" in self.log_tail():
                raise ClusterError(f"haproxy did not reload\n{self.log_tail()}")
            time.sleep(0.05)
        if spread_s is None:
            return None
        thread = SpreadClose(self, before, spread_s)
        thread.start()
        return thread

    def master(self, line: str) -> str:
        """One command on the master CLI (``show proc``; ``@!<pid> show sess``)."""
        return _unix_command(self.master_socket, line)

    def workers(self) -> list[int]:
        """The current workers' PIDs (``show proc``, before ``# old workers``)."""
        text = self.master("show proc").split("# old workers")[0]
        section = text.split("# workers", 1)[1] if "# workers" in text else ""
        return [int(line.split()[0]) for line in section.splitlines() if line[:1].isdigit()]

    def client_sessions(self, pid: int) -> list[str]:
        """Ids of worker ``pid``'s sessions from the public and internal frontends."""
        out = self.master(f"@!{pid} show sess")
        return [
            line.split(":", 1)[0]
            for line in out.splitlines()
            if " fe=public " in line or " fe=internal " in line
        ]

    def servers(self) -> dict[tuple[str, str], str]:
        """``{(backend, server): status}`` from the stats page (``UP``, ``DOWN``, ``MAINT``,
        ``UP 1/2``, ...); empty if it does not answer."""
        try:
            url = f"http://127.0.0.1:{self.stats_port}/;csv"
            with urllib.request.urlopen(url, timeout=2.0) as response:
                page = response.read().decode()
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(page.lstrip("# ")))
        return {
            (r["pxname"], r["svname"]): r["status"]
            for r in rows
            if r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def stat(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat`` on the admin socket: every row (``FRONTEND``/``BACKEND`` too) by
        (proxy, server), fields by name (``qcur``: queued now, ``scur``: sessions now)."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {(r["pxname"], r["svname"]): r for r in rows if r.get("svname")}

    def command(self, line: str) -> str:
        """One command on the admin socket (``show servers state``, ``disable server b/s``)."""
        return _unix_command(self.admin_socket, line)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                _stop_process(proc, kill=False, timeout=self.timeout)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def _unix_command(path: Path, line: str) -> str:
    """Send one CLI command, read the answer until the server closes (bounded)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)  # the master CLI answers and closes only then
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


class SpreadClose(threading.Thread):
    """Close old workers' client sessions one by one over ``window`` seconds."""

    def __init__(self, haproxy: HAProxyProcess, old: list[int], window: float) -> None:
        super().__init__(name="haproxy-spread-close", daemon=True)
        self.haproxy, self.old, self.window = haproxy, old, window
        self.remaining: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for pid in self.old:
                sessions = self.haproxy.client_sessions(pid)
                pause = self.window / max(len(sessions), 1)
                # Bounded: twice what it held at the start (a shutdown the worker has not
                # carried out yet by the next look is asked again, not skipped).
                for _ in range(2 * len(sessions) + 2):
                    current = self.haproxy.client_sessions(pid)
                    if not current:
                        break
                    self.remaining.append(len(current))
                    self.haproxy.master(f"@!{pid} shutdown session {current[0]}")
                    time.sleep(pause)
        except (OSError, ClusterError) as exc:  # the old worker may be gone already
            self.error = exc


# --------------------------------------------------------------------------- the cluster


DEFAULT_HANDLES = ("alice", "bob", "carol", "dave")  # the first one is the owner
NO_HAPROXY = "this cluster runs no HAProxy (haproxy=False): no public URL, certificate or stats"


@dataclass(frozen=True)
class SeededWorkspace:
    """What :func:`seed_workspace` created."""

    workspace_id: int
    users: dict[str, int]  # handle -> user id
    tokens: dict[str, str]  # handle -> token
    channels: dict[str, int]  # name -> channel id (public, every seeded user a member)

    @property
    def handles(self) -> list[str]:
        return list(self.users)


async def seed_workspace(
    settings: Any,
    workspace: str = "acme",
    handles: Sequence[str] = DEFAULT_HANDLES,
    channels: Sequence[str] = ("general",),
) -> SeededWorkspace:
    """Create ``workspace`` with users ``handles`` (the first is the owner, the rest
    members), public ``channels`` with every user in them, and a token per user, in the
    store of ``settings`` (:class:`chat.config.Settings`)."""
    from chat.admin import Admin

    admin = await Admin.open(settings)
    try:
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
    finally:
        await admin.close()
    return SeededWorkspace(wid, users, tokens, chans)


class LocalCluster:
    """The topology on 127.0.0.1, in ``directory`` (default: a temp dir, deleted at
    close()). ``async with LocalCluster() as c:`` starts and stops it.

    :param node_env: extra environment for every chat and Flannel node (a test's knobs);
        ``chat_env``/``flannel_env`` for one kind (after ``node_env``).
    :param plain: HAProxy also takes clients without TLS on 127.0.0.1:``plain_port``
        (load generators).
    :param database_url: use this database (it is migrated at start()); no PostgreSQL is
        started (``postgres`` raises). The tests' per-test databases.
    :param redis: False: no Redis; chat nodes get an empty ``CHAT_REDIS_URL``.
    :param haproxy: False: no HAProxy (``haproxy``, ``cert``, ``url()`` ... raise); each
        Flannel node's ``FLANNEL_UPSTREAM`` lists every chat node's ``/service`` URL, as
        the chat nodes are when it starts.

    ``chats`` and ``flannels`` map names (``chat0``..., ``flannel0``...) to
    :class:`NodeProcess`; :meth:`add_chat` and :meth:`add_flannel` grow the topology
    while it runs.
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        secrets: Secrets | None = None,
        limits: Limits | None = None,
        node_env: Mapping[str, str] | None = None,
        chat_env: Mapping[str, str] | None = None,
        flannel_env: Mapping[str, str] | None = None,
        plain: bool = False,
        database_url: str | None = None,
        redis: bool = True,
        haproxy: bool = True,
    ) -> None:
        if plain and not haproxy:
            raise ValueError("plain= is a listener of HAProxy's: it needs haproxy=True")
        self.topology = topology or Topology()
        self.limits = limits or Limits()
        self.endpoints = Endpoints.local(self.topology, free_port)
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="chat-cluster-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.secrets = secrets or _kept_secrets(self.directory / "secrets.json")
        if self._own_dir:
            _reaper.register_dir(self.directory)
        self.logs = self.directory / "logs"
        self.logs.mkdir(exist_ok=True)
        self.node_env = dict(node_env or {})
        self.kind_env = {"chat": dict(chat_env or {}), "flannel": dict(flannel_env or {})}
        self._side_dirs: list[Path] = []
        self._database_url = database_url
        self._postgres: PostgresProcess | None = None
        if database_url is None:
            if os.geteuid() == 0:
                self.directory.chmod(0o755)  # PostgreSQL runs as another user
            self._postgres = PostgresProcess(
                self._postgres_directory(),
                self.endpoints.at[POSTGRES].port,
                self.secrets.postgres_password,
            )
        self.redis: TempRedis | None = None
        if redis:
            self.redis = TempRedis(
                port=self.endpoints.at[REDIS].port,
                base_dir=self.directory,
                extra_args=redis_args(self.endpoints, self.secrets),
                auth=(REDIS_USER, self.secrets.redis_password),
            )
        self.chats = {n: self._node(n, "chat") for n in self.topology.chat_nodes}
        self.flannels = {n: self._node(n, "flannel") for n in self.topology.flannel_nodes}
        self.plain_port = free_port() if plain else None
        self._cert: Path | None = None
        self._bundle: Path | None = None  # certificate + key, for HAProxy
        self._haproxy: HAProxyProcess | None = None
        if haproxy:
            self._cert, self._bundle = tls.self_signed(self.directory)
            self._write_haproxy_config()
            self._haproxy = HAProxyProcess(
                self.directory / "haproxy.cfg",
                self.endpoints.stats.port,
                self.directory / "haproxy.sock",
            )
        self.seeded: SeededWorkspace | None = None

    # -- the parts ------------------------------------------------------------------------

    @property
    def postgres(self) -> PostgresProcess:
        """Our PostgreSQL; ClusterError with ``database_url=`` (none of ours)."""
        if self._postgres is None:
            raise ClusterError("this cluster runs no PostgreSQL (database_url= was given)")
        return self._postgres

    @property
    def haproxy(self) -> HAProxyProcess:
        """Our HAProxy; ClusterError with ``haproxy=False``."""
        if self._haproxy is None:
            raise ClusterError(NO_HAPROXY)
        return self._haproxy

    @property
    def cert(self) -> Path:
        """HAProxy's self-signed certificate (clients trust it)."""
        if self._cert is None:
            raise ClusterError(NO_HAPROXY)
        return self._cert

    def settings_for(self, name: str) -> dict[str, str]:
        """Node ``name``'s ``CHAT_*``/``FLANNEL_*`` settings: :func:`environment` in this
        topology, with what the options change: ``database_url=`` (``CHAT_DATABASE_URL``),
        ``redis=False`` (``CHAT_REDIS_URL`` empty), ``haproxy=False`` (``FLANNEL_UPSTREAM``:
        every chat node's ``/service`` URL)."""
        env = environment(self.topology, self.endpoints, self.secrets, name)
        if name in self.topology.chat_nodes:
            if self._database_url is not None:
                env["CHAT_DATABASE_URL"] = self._database_url
            if self.redis is None:
                env["CHAT_REDIS_URL"] = ""
        elif self._haproxy is None:
            env["FLANNEL_UPSTREAM"] = json.dumps([n.service_url for n in self.chats.values()])
        return env

    # -- where to connect ----------------------------------------------------------------

    def url(self, workspace: int | None = None) -> str:
        """The public ``wss://`` URL through Flannel (``?workspace=`` for affinity)."""
        query = f"?workspace={workspace}" if workspace is not None else ""
        return f"wss://127.0.0.1:{self._public_port()}/{query}"

    @property
    def chat_url(self) -> str:
        """The public ``wss://`` URL straight to the chat tier (no Flannel)."""
        return f"wss://127.0.0.1:{self._public_port()}{CHAT_PATH}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.haproxy.stats_port}/"

    @property
    def database_url(self) -> str:
        if self._database_url is not None:
            return self._database_url
        return database_url(self.endpoints, self.secrets)

    @property
    def redis_url(self) -> str:
        """Redis as the chat nodes reach it (ACL user and password); empty without Redis."""
        return redis_url(self.endpoints, self.secrets) if self.redis is not None else ""

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the cluster's certificate (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.cert))

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> Self:
        """PostgreSQL (role + database), Redis, migrations, chat nodes, HAProxy, Flannel
        nodes; then wait until HAProxy sees every server UP. Whatever runs already (or is
        not ours) is left as it is."""
        if self._postgres is not None:
            await asyncio.to_thread(self._postgres.start)
            if self._postgres.created:
                await self._bootstrap_database()
        if self.redis is not None and not self.redis.running:
            await asyncio.to_thread(self.redis.start)
        await self.migrate()
        await asyncio.to_thread(start_all, [n for n in self.chats.values() if not n.running])
        if self._haproxy is not None and self._haproxy.pid is None:
            await asyncio.to_thread(self._haproxy.start)
        await asyncio.to_thread(start_all, [n for n in self.flannels.values() if not n.running])
        if self._haproxy is not None:
            every = {("chat", n) for n in self.chats} | {("flannel", n) for n in self.flannels}
            await self.wait_servers(lambda s: all(s.get(k) == "UP" for k in every), scaled(30))
        return self

    async def migrate(self) -> None:
        """Apply the schema migrations (opening the store does it), once, before any node:
        concurrent first starts would race on them."""
        from chat.storage import open_database

        db = await open_database(self.database_url, "")
        await db.close()

    async def add_chat(self, *, extra_env: Mapping[str, str] | None = None) -> NodeProcess:
        """One more chat node (``chat<N>``, ``extra_env`` after the cluster's), started;
        with HAProxy, its config is rendered again and reloaded, and this returns once the
        node is UP there. Flannel nodes without HAProxy learn of it when they start again."""
        name = self._grow("chat")
        node = self.chats[name] = self._node(name, "chat", extra_env)
        await node.astart()
        await self._reload_haproxy(("chat", name))
        return node

    async def add_flannel(
        self, *, extra_env: Mapping[str, str] | None = None, ready: bool = True
    ) -> NodeProcess:
        """One more Flannel node (``flannel<N>``, ``extra_env`` after the cluster's),
        started. ``ready``: wait for its /readyz (and, with HAProxy, until it is UP there);
        False: only spawned (a node the chat tier refuses never becomes ready)."""
        name = self._grow("flannel")
        node = self.flannels[name] = self._node(name, "flannel", extra_env)
        if ready:
            await node.astart()
        else:
            await asyncio.to_thread(node.spawn)
        await self._reload_haproxy(("flannel", name) if ready else None)
        return node

    async def wait_servers(self, done: Any, timeout: float) -> dict[tuple[str, str], str]:
        """Poll HAProxy's server states until ``done(states)``; ClusterError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            states = await asyncio.to_thread(self.haproxy.servers)
            if done(states):
                return states
            if time.monotonic() > deadline:
                raise ClusterError(f"haproxy servers: {states}\n{self.haproxy.log_tail()}")
            await asyncio.sleep(0.1)

    async def seed(
        self,
        workspace: str = "acme",
        handles: Sequence[str] = DEFAULT_HANDLES,
        channels: Sequence[str] = ("general",),
    ) -> SeededWorkspace:
        """:func:`seed_workspace` in the cluster's database; kept in ``self.seeded``. With
        ``database_url=`` it works before start() too."""
        from chat.config import Settings

        settings = Settings(database_url=self.database_url, secret_key=self.secrets.token_secret)
        self.seeded = await seed_workspace(settings, workspace, handles, channels)
        return self.seeded

    async def stop(self) -> None:
        """Flannel nodes, HAProxy, chat nodes, Redis, PostgreSQL: each by PID, bounded."""
        try:
            await asyncio.gather(*(f.astop() for f in self.flannels.values()))
            if self._haproxy is not None:
                await asyncio.to_thread(self._haproxy.stop)
            await asyncio.gather(*(n.astop() for n in self.chats.values()))
        finally:
            if self.redis is not None:
                await asyncio.to_thread(self.redis.stop)
            if self._postgres is not None:
                await asyncio.to_thread(self._postgres.stop)

    async def close(self) -> None:
        """stop(), then delete the directory if it is ours. Idempotent."""
        try:
            await self.stop()
        finally:
            for node in [*self.flannels.values(), *self.chats.values()]:
                node.close()  # stopped already: forgets its atexit hook
            if self.redis is not None:
                self.redis.close()
            for side in self._side_dirs:
                shutil.rmtree(side, ignore_errors=True)
                _reaper.unregister_dir(side)
            if self._own_dir and self.directory.exists():
                shutil.rmtree(self.directory, ignore_errors=True)
                _reaper.unregister_dir(self.directory)

    # -- internals -------------------------------------------------------------------------

    def _node(
        self, name: str, kind: str, extra_env: Mapping[str, str] | None = None
    ) -> NodeProcess:
        return NodeProcess(
            name,
            kind,
            lambda: self.settings_for(name),
            port=self.endpoints.at[name].port,
            metrics_port=self.endpoints.metrics[name],
            log_dir=self.logs,
            extra_env={**self.node_env, **self.kind_env[kind], **(extra_env or {})},
        )

    def _grow(self, kind: str) -> str:
        """One more node of ``kind`` in the topology, with endpoints of its own; its name."""
        chat, flannel = self.topology.n_chat, self.topology.n_flannel
        if kind == "chat":
            self.topology = Topology(n_chat=chat + 1, n_flannel=flannel)
            name = self.topology.chat_nodes[-1]
        else:
            self.topology = Topology(n_chat=chat, n_flannel=flannel + 1)
            name = self.topology.flannel_nodes[-1]
        ends = self.endpoints
        self.endpoints = dataclasses.replace(
            ends,
            at={**ends.at, name: Endpoint(ends.listen_host, free_port())},
            metrics={**ends.metrics, name: free_port()},
        )
        return name

    def _write_haproxy_config(self) -> None:
        (self.directory / "haproxy.cfg").write_text(
            render_haproxy(
                self.topology,
                self.endpoints,
                cert=str(self._bundle),
                stats_socket=str(self.directory / "haproxy.sock"),
                state_file=str(self.directory / "haproxy.state"),
                limits=self.limits,
                plain_port=self.plain_port,
            )
        )

    async def _reload_haproxy(self, server: tuple[str, str] | None) -> None:
        """After the topology grew: render HAProxy's config again; if HAProxy runs, reload
        it and wait until ``server`` (backend, name) is UP."""
        if self._haproxy is None:
            return
        self._write_haproxy_config()
        if self._haproxy.pid is None:
            return
        await asyncio.to_thread(self._haproxy.reload)
        if server is not None:
            await self.wait_servers(lambda s: s.get(server) == "UP", scaled(30))

    def _public_port(self) -> int:
        if self._haproxy is None:
            raise ClusterError(NO_HAPROXY)
        return self.endpoints.public.port

    def _postgres_directory(self) -> Path:
        """``<directory>/postgres``; but when PostgreSQL runs as another user (we are root)
        who cannot enter ``directory`` (e.g. under pytest's 0700 tmp_path), a directory of
        its own in the temp dir, deleted at close(): the database is then not kept."""
        ids = postgres_ids()
        if ids is None or enterable(self.directory, ids):
            return self.directory / "postgres"
        side = Path(tempfile.mkdtemp(prefix="chat-cluster-pg-"))
        side.chmod(0o755)
        _reaper.register_dir(side)
        self._side_dirs.append(side)
        log.warning(
            "%s is closed to the postgres user: the database lives in %s", self.directory, side
        )
        return side

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

    async def _bootstrap_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.postgres.admin_dsn, timeout=scaled(10))
        try:
            password = self.secrets.postgres_password.replace("'", "''")
            await conn.execute(f"CREATE ROLE {DATABASE} LOGIN PASSWORD '{password}'")
            await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {DATABASE}")
        finally:
            await conn.close()


def _kept_secrets(path: Path) -> Secrets:
    """The secrets saved in ``path`` by an earlier run in the same directory (its database
    has those passwords), else new ones, saved there (mode 0600)."""
    if path.exists():
        return Secrets(**json.loads(path.read_text()))
    secrets = Secrets.generate()
    path.touch(mode=0o600)
    path.write_text(json.dumps(dataclasses.asdict(secrets)))
    return secrets


# --------------------------------------------------------------------------- command line


async def up(topology: Topology, directory: Path | None, seed: bool) -> int:
    """Start the cluster, print where to connect, run until SIGINT/SIGTERM, tear down.
    SIGHUP reloads HAProxy, closing the old worker's websockets spread over
    ``close-spread-time``."""
    stop = asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
    cluster = LocalCluster(topology, directory=directory)
    try:
        await cluster.start()
        lines = [
            f"cluster up in {cluster.directory}; clients trust its certificate, e.g. "
            f"SSL_CERT_FILE={cluster.cert}",
            f"  through Flannel:   {cluster.url()}?workspace=<workspace id>",
            f"  chat tier direct:  {cluster.chat_url}",
            f"  HAProxy stats:     {cluster.stats_url}",
            f"  PostgreSQL:        {cluster.database_url}",
        ]
        if seed:
            seeded = await cluster.seed()
            lines.append(f"  seeded workspace {seeded.workspace_id}, tokens:")
            lines += [f"    {handle}: {token}" for handle, token in seeded.tokens.items()]
        lines.append(f"kill -HUP {os.getpid()} reloads HAProxy; Ctrl-C stops everything.")
        print("\n".join(lines), flush=True)
        stopping = asyncio.create_task(stop.wait())
        while not stop.is_set():
            reload = asyncio.create_task(reloads.get())
            await asyncio.wait({stopping, reload}, return_when=asyncio.FIRST_COMPLETED)
            if reload.done():
                spread = float(cluster.limits.close_spread_s)
                try:
                    await asyncio.to_thread(cluster.haproxy.reload, spread)
                except ClusterError as exc:  # the old worker keeps serving
                    print(f"haproxy reload failed: {exc}", file=sys.stderr, flush=True)
                else:
                    print(f"haproxy reloaded; old websockets close over {spread:g}s", flush=True)
            else:
                reload.cancel()
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        await cluster.close()
    return 0
