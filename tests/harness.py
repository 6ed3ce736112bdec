"""A real chat node in the test's event loop, with a seeded workspace and connected clients.

``running_node()`` starts :class:`chat.server.Node` on a free loopback port over the given
store and seeds a workspace (``acme``) whose users cover every role. Tests connect real
websocket clients (:class:`chat.client.Client`) to ``node.url``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from chat.admin import Admin
from chat.client import Client
from chat.config import Settings
from chat.server import Node

SECRET = "test-secret-key-of-a-reasonable-length-0123456789"
# Every test node accepts service connections signed with this key (kid "test").
SERVICE_KID, SERVICE_SECRET = "test", "test-service-key-0123456789abcdefghijklmnop"

# handle -> role; "mallory" is a member who belongs to no seeded channel.
PEOPLE = {
    "olivia": "owner",
    "adam": "admin",
    "mia": "member",
    "max": "member",
    "gus": "guest",
    "mallory": "member",
}


@dataclass
class RunningNode:
    node: Node
    settings: Settings
    admin: Admin
    workspace_id: int
    users: dict[str, int] = field(default_factory=dict)  # handle -> id
    tokens: dict[str, str] = field(default_factory=dict)  # handle -> token
    general: int = 0  # public channel: everyone but mallory (and the guest is in it)
    private: int = 0  # private channel: olivia, mia

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.node.port}/"

    @contextlib.asynccontextmanager
    async def client(self, handle: str, **kwargs: Any) -> AsyncIterator[Client]:
        async with Client.connect(self.url, self.tokens[handle], **kwargs) as c:
            yield c

    @contextlib.asynccontextmanager
    async def clients(self, *handles: str) -> AsyncIterator[list[Client]]:
        async with contextlib.AsyncExitStack() as stack:
            yield [await stack.enter_async_context(self.client(h)) for h in handles]


def settings_for(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "secret_key": SECRET,
        "log_format": "text",
        "log_level": "warning",
        "shutdown_grace_s": 2.0,
        "drain_period_s": 0.2,
        "metrics_port": 0,
        "service_keys": f"{SERVICE_KID}={SERVICE_SECRET}",
    }
    base.update(overrides)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running_node(**overrides: Any) -> AsyncIterator[RunningNode]:
    settings = settings_for(**overrides)
    admin = await Admin.open(settings)
    try:
        wid = await admin.create_workspace("acme")
        specs = [{"handle": h, "display_name": h.title(), "role": r} for h, r in PEOPLE.items()]
        specs[2]["password"] = "correct horse battery staple"  # mia can log in
        users = {u.handle: u.id for u in await admin.create_users(wid, specs)}
        everyone_but_mallory = [i for h, i in users.items() if h != "mallory"]
        general = await admin.create_channel(
            wid, "general", users["olivia"], everyone_but_mallory, private=False
        )
        private = await admin.create_channel(
            wid, "secret", users["olivia"], [users["mia"]], private=True
        )
        tokens = {h: await admin.issue_token(i) for h, i in users.items()}
        node = Node(settings)
        await node.start()
        try:
            yield RunningNode(node, settings, admin, wid, users, tokens, general.id, private.id)
        finally:
            await node.stop()
    finally:
        await admin.close()
