"""haproxy.cfg, rendered from the topology and the endpoints (compose and the launcher).

Listeners:

* ``public`` (TLS, clients' ``wss://``): ``/chat`` goes straight to the chat tier (clients
  that want no edge cache); every other path goes to Flannel, balanced by consistent
  hashing on the ``workspace`` URL parameter: clients connect to
  ``wss://host:port/?workspace=<id>`` so that one workspace's cache stays warm on one
  Flannel node and moves minimally when a node joins or leaves. A URL without the
  parameter is balanced round-robin: it works, but the workspace is then cached on every
  Flannel node its users land on. ``/service`` is refused here (it is internal).
* ``internal`` (plain, Flannel's service connections): every path to the chat tier, which
  balances by least connections with a slow start for a returning node.
* ``stats``: the statistics page, on its own listener.

Health checks ``GET /readyz`` every second: a draining chat node (SIGTERM) or one that lost
PostgreSQL answers 503 and is taken out after two failures. Websocket timeouts: ``timeout
tunnel`` (an upgraded connection's idle limit) is three heartbeat intervals, ``timeout
client-fin`` bounds half-closed connections, ``timeout http-request`` bounds a slow
upgrade request. A storm waits at the edge: each server takes ``maxconn`` connections at
once and the rest queue for up to ``timeout queue``; each source address may open
``rate_limit`` connections per 10 s (a stick table), beyond that it is refused.

Reloads (``kill -USR2 <master pid>``, master-worker mode): the new worker takes the
listening sockets and new connections; the old one keeps every websocket it holds (a reload
cuts none) until it ends, for at most ``hard-stop-after``. ``close-spread-time`` spreads the
closing of its idle and HTTP keep-alive connections over a window; it does not apply to
websockets (tunnels): those still open at ``hard-stop-after`` are closed together then, and
their clients reconnect with backoff and jitter and resume (tests/test_deploy.py shows both).
Raise ``hard-stop-after`` to let more of them end on their own, at the cost of old workers
lingering (each holds its connections' memory and descriptors), or spread them out as the
launcher can (``HAProxyProcess.reload(spread_s=...)``: ``shutdown session`` on the old
worker through the master CLI, one at a time over the window).
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.cluster.topology import CHAT_PATH, Endpoints, Topology
from chat.config import FrontSettings

_HEARTBEAT_MS: int = FrontSettings.model_fields["heartbeat_interval_ms"].default


@dataclass(frozen=True)
class Limits:
    heartbeat_interval_s: float = _HEARTBEAT_MS / 1000  # the nodes' default
    # Connections at once: the process needs two descriptors each (client and server side),
    # within its open-files limit.
    global_maxconn: int = 9000
    server_maxconn: int = 4000  # per server; beyond: queued
    queue_s: int = 10  # how long a queued connection waits for a server
    rate_limit: int = 2000  # new connections per source address per 10 s
    slowstart_s: int = 10
    hard_stop_after_s: int = 60
    close_spread_s: int = 10


def render(
    topology: Topology,
    endpoints: Endpoints,
    *,
    cert: str,
    stats_socket: str | None = None,
    state_file: str | None = None,
    docker_dns: bool = False,
    limits: Limits = Limits(),
    plain_port: int | None = None,
) -> str:
    """The whole configuration. ``cert``: a PEM with the certificate and its key.
    ``stats_socket``: a path for the admin socket (``show servers state``, ``disable
    server``); None: none. ``state_file``: where a reload finds the servers' states (the
    reloader writes ``show servers state`` there first), so the new worker starts with a
    DOWN server DOWN rather than UP until its checks fail. ``docker_dns``: resolve server
    names with Docker's DNS at run time, so HAProxy starts before every node exists (a node
    not up yet is DOWN). ``plain_port``: also accept clients without TLS on
    127.0.0.1:``plain_port``, for load generators that speak no TLS (loopback only; never
    rendered into the deployed files)."""
    tunnel = round(3 * limits.heartbeat_interval_s)
    global_lines = [
        "global",
        "    master-worker",
        f"    hard-stop-after {limits.hard_stop_after_s}s",
        f"    close-spread-time {limits.close_spread_s}s",
        f"    maxconn {limits.global_maxconn}",
    ]
    if stats_socket is not None:
        global_lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    if state_file is not None:
        global_lines.append(f"    server-state-file {state_file}")
    lh = endpoints.listen_host
    resolvers = ["", "resolvers docker", "    nameserver dns 127.0.0.11:53"] if docker_dns else []
    server_defaults = "check inter 1s fall 2 rise 2"
    if docker_dns:
        server_defaults += " resolvers docker init-addr last,libc,none"
    out = [
        "# Generated by chat.cluster.haproxy from the cluster topology; do not edit.",
        *global_lines,
        *resolvers,
        "",
        "defaults",
        "    mode http",
        "    option http-server-close",
        "    timeout connect 5s",
        # A connect to a node that died (before the health check says so) is retried once
        # more, then sent to another node: a node kill costs a storm a retry, not three
        # connect timeouts per client (measured by chat loadtest: ~6 s to ~1 s).
        "    retries 2",
        "    option redispatch 1",
        "    timeout client 30s",
        "    timeout server 30s",
        f"    timeout tunnel {tunnel}s  # > the heartbeat interval: idle websockets survive",
        "    timeout client-fin 5s",
        "    timeout http-request 5s  # a slow upgrade request is cut",
        f"    timeout queue {limits.queue_s}s",
        f"    default-server {server_defaults}",
        *(["    load-server-state-from-file global"] if state_file is not None else []),
        "",
        "frontend public",
        f"    bind {lh}:{endpoints.public.port} ssl crt {cert}",
        *(
            [f"    bind 127.0.0.1:{plain_port}  # load generation: plaintext, loopback"]
            if plain_port is not None
            else []
        ),
        "    stick-table type ip size 100k expire 30s store conn_rate(10s)",
        "    tcp-request connection track-sc0 src",
        f"    tcp-request connection reject if {{ sc_conn_rate(0) gt {limits.rate_limit} }}",
        "    http-request deny deny_status 404 if { path_beg /service }",
        f"    use_backend chat if {{ path {CHAT_PATH} }} || {{ path_beg {CHAT_PATH}/ }}",
        "    default_backend flannel",
        "",
        "frontend internal",
        f"    bind {lh}:{endpoints.internal.port}",
        "    default_backend chat",
        "",
        "frontend stats",
        f"    bind {lh}:{endpoints.stats.port}",
        "    stats enable",
        "    stats uri /",
        "    stats refresh 5s",
        "    stats show-legends",
        "",
        "backend flannel",
        "    balance url_param workspace",
        "    hash-type consistent",
        "    option httpchk",
        "    http-check send meth GET uri /readyz",
        "    http-check expect status 200",
    ]
    for name in topology.flannel_nodes:
        at = endpoints.at[name]
        out.append(f"    server {name} {at.host}:{at.port} maxconn {limits.server_maxconn}")
    out += [
        "",
        "backend chat",
        "    balance leastconn",
        "    option httpchk",
        "    http-check send meth GET uri /readyz",
        "    http-check expect status 200",
    ]
    for name in topology.chat_nodes:
        at = endpoints.at[name]
        out.append(
            f"    server {name} {at.host}:{at.port} maxconn {limits.server_maxconn}"
            f" slowstart {limits.slowstart_s}s"
        )
    return "\n".join(out) + "\n"
