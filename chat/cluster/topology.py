"""The one description of the cluster: which processes, their roles, who talks to whom, and
the settings each one gets.

``docker-compose.yml`` (:mod:`chat.cluster.render`) and the local launcher
(:mod:`chat.cluster.launcher`) both build from :func:`environment`, :func:`redis_args` and
:func:`chat.cluster.haproxy.render`; only the :class:`Endpoints` (compose: service names
and fixed ports; launcher: 127.0.0.1 and free ports) and the :class:`Secrets` (compose:
``${VAR:-dev-only default}`` references; launcher: fresh random values) differ.
"""

from __future__ import annotations

import json
import secrets as _secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

POSTGRES = "postgres"
REDIS = "redis"
HAPROXY = "haproxy"
DATABASE = "chat"  # database and role name on PostgreSQL
REDIS_USER = "chat"  # Redis ACL user (the `default` user is off)
SERVICE_KID = "cluster"  # the service key's id (chat/credentials.py)
CHAT_PATH = "/chat"  # the public frontend's path to the chat tier (no Flannel)


class Role(StrEnum):
    POSTGRES = "postgres"
    REDIS = "redis"
    CHAT = "chat"
    FLANNEL = "flannel"
    HAPROXY = "haproxy"


@dataclass(frozen=True)
class Service:
    name: str
    role: Role
    talks_to: tuple[str, ...]  # names of the services it opens connections to


@dataclass(frozen=True)
class Topology:
    """N chat nodes, M Flannel nodes, one PostgreSQL, one Redis, one HAProxy::

    client --wss--> haproxy :public --/?workspace=W--> flannel-i --ws /service-->
           haproxy :internal --> chat-j --> postgres, redis
    client --wss--> haproxy :public --/chat--> chat-j      (no edge cache)
    """

    n_chat: int = 2
    n_flannel: int = 2

    @property
    def chat_nodes(self) -> list[str]:
        return [f"chat{i}" for i in range(self.n_chat)]

    @property
    def flannel_nodes(self) -> list[str]:
        return [f"flannel{i}" for i in range(self.n_flannel)]

    @property
    def services(self) -> list[Service]:
        chats = self.chat_nodes
        return [
            Service(POSTGRES, Role.POSTGRES, ()),
            Service(REDIS, Role.REDIS, ()),
            *(Service(n, Role.CHAT, (POSTGRES, REDIS)) for n in chats),
            # Flannel reaches the chat tier through HAProxy's internal frontend.
            *(Service(n, Role.FLANNEL, (HAPROXY,)) for n in self.flannel_nodes),
            Service(HAPROXY, Role.HAPROXY, (*self.flannel_nodes, *chats)),
        ]

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class Endpoint:
    host: str  # where others connect
    port: int


@dataclass(frozen=True)
class Endpoints:
    """Where every process listens (``listen_host``) and is reached (``at[name]``). HAProxy
    has three listeners: ``public`` (TLS, clients), ``internal`` (Flannel to chat) and
    ``stats``; chat and Flannel nodes also have a ``/metrics`` listener each."""

    listen_host: str
    at: dict[str, Endpoint]
    public: Endpoint
    internal: Endpoint
    stats: Endpoint
    metrics: dict[str, int]  # node name -> its metrics port

    @classmethod
    def compose(cls, topology: Topology) -> Endpoints:
        """Docker compose: service names, the servers' usual ports (one network each)."""
        at = {POSTGRES: Endpoint(POSTGRES, 5432), REDIS: Endpoint(REDIS, 6379)}
        at |= {n: Endpoint(n, 8765) for n in topology.chat_nodes}
        at |= {n: Endpoint(n, 8766) for n in topology.flannel_nodes}
        nodes = topology.chat_nodes + topology.flannel_nodes
        return cls(
            listen_host="0.0.0.0",
            at=at,
            public=Endpoint(HAPROXY, 8443),
            internal=Endpoint(HAPROXY, 8080),
            stats=Endpoint(HAPROXY, 8404),
            metrics=dict.fromkeys(nodes, 9100),
        )

    @classmethod
    def local(cls, topology: Topology, free_port: Callable[[], int]) -> Endpoints:
        """The launcher: everything on 127.0.0.1, each on a free port."""
        names = [POSTGRES, REDIS, *topology.chat_nodes, *topology.flannel_nodes]
        at = {n: Endpoint("127.0.0.1", free_port()) for n in names}
        nodes = topology.chat_nodes + topology.flannel_nodes
        return cls(
            listen_host="127.0.0.1",
            at=at,
            public=Endpoint("127.0.0.1", free_port()),
            internal=Endpoint("127.0.0.1", free_port()),
            stats=Endpoint("127.0.0.1", free_port()),
            metrics={n: free_port() for n in nodes},
        )


@dataclass(frozen=True)
class Secrets:
    """Every credential of the cluster: PostgreSQL's SCRAM password, Redis's ACL password,
    the service key secret (Flannel to chat) and the token-signing secret."""

    postgres_password: str
    redis_password: str
    service_secret: str
    token_secret: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secrets(<redacted>)"

    @property
    def service_key(self) -> str:
        return f"{SERVICE_KID}={self.service_secret}"

    @classmethod
    def generate(cls) -> Secrets:
        return cls(*(_secrets.token_urlsafe(32) for _ in range(4)))

    @classmethod
    def compose(cls) -> Secrets:
        """References to compose variables (an ``.env`` file beside docker-compose.yml),
        with defaults that are for local development only."""
        return cls(
            postgres_password="${POSTGRES_PASSWORD:-dev-only-postgres-password}",
            redis_password="${REDIS_PASSWORD:-dev-only-redis-password}",
            service_secret="${SERVICE_SECRET:-dev-only-service-secret-0123456789abcdef}",
            token_secret="${TOKEN_SECRET:-dev-only-token-secret-0123456789abcdef}",
        )


def database_url(endpoints: Endpoints, secrets: Secrets) -> str:
    pg = endpoints.at[POSTGRES]
    return f"postgresql://{DATABASE}:{secrets.postgres_password}@{pg.host}:{pg.port}/{DATABASE}"


def redis_url(endpoints: Endpoints, secrets: Secrets) -> str:
    r = endpoints.at[REDIS]
    return f"redis://{REDIS_USER}:{secrets.redis_password}@{r.host}:{r.port}/0"


def upstream_url(endpoints: Endpoints) -> str:
    """Where Flannel opens service connections: HAProxy's internal frontend."""
    return f"ws://{endpoints.internal.host}:{endpoints.internal.port}/service"


def redis_args(endpoints: Endpoints, secrets: Secrets) -> list[str]:
    """redis-server options: the ``default`` user off, one ACL user with a password."""
    return [
        "--port", str(endpoints.at[REDIS].port),
        "--user", "default", "off",
        "--user", REDIS_USER, "on", f">{secrets.redis_password}", "~*", "&*", "+@all",
    ]  # fmt: skip


def chat_environment(
    name: str,
    *,
    host: str,
    port: int,
    database_url: str,
    redis_url: str,
    token_secret: str,
    service_keys: str,
    metrics_port: int,
) -> dict[str, str]:
    """A chat node's settings: the launcher's and compose's (through :func:`environment`)
    and the tests' own nodes (tests/cluster.py) all come from here."""
    return {
        "CHAT_HOST": host,
        "CHAT_PORT": str(port),
        "CHAT_NODE_ID": name,
        "CHAT_DATABASE_URL": database_url,
        "CHAT_REDIS_URL": redis_url,
        "CHAT_SECRET_KEY": token_secret,
        "CHAT_SERVICE_KEYS": service_keys,
        "CHAT_METRICS_HOST": host,
        "CHAT_METRICS_PORT": str(metrics_port),
        "CHAT_LOG_FORMAT": "text",
    }


def flannel_environment(
    name: str,
    *,
    host: str,
    port: int,
    upstream: list[str],
    service_key: str,
    metrics_port: int,
) -> dict[str, str]:
    """A Flannel node's settings (see :func:`chat_environment`)."""
    return {
        "FLANNEL_HOST": host,
        "FLANNEL_PORT": str(port),
        "FLANNEL_NODE_ID": name,
        "FLANNEL_UPSTREAM": json.dumps(upstream),
        "FLANNEL_SERVICE_KEY": service_key,
        "FLANNEL_METRICS_HOST": host,
        "FLANNEL_METRICS_PORT": str(metrics_port),
        "FLANNEL_LOG_FORMAT": "text",
    }


def environment(
    topology: Topology, endpoints: Endpoints, secrets: Secrets, name: str
) -> dict[str, str]:
    """The ``CHAT_*`` / ``FLANNEL_*`` settings of node ``name`` (chat or Flannel) in this
    topology: the other services at their endpoints, with these secrets."""
    role = topology.service(name).role
    if role not in (Role.CHAT, Role.FLANNEL):
        raise ValueError(f"{name} is a {role} service: it takes no CHAT_/FLANNEL_ settings")
    own = endpoints.at[name]
    if role is Role.CHAT:
        return chat_environment(
            name,
            host=endpoints.listen_host,
            port=own.port,
            database_url=database_url(endpoints, secrets),
            redis_url=redis_url(endpoints, secrets),
            token_secret=secrets.token_secret,
            service_keys=secrets.service_key,
            metrics_port=endpoints.metrics[name],
        )
    return flannel_environment(
        name,
        host=endpoints.listen_host,
        port=own.port,
        upstream=[upstream_url(endpoints)],
        service_key=secrets.service_key,
        metrics_port=endpoints.metrics[name],
    )
