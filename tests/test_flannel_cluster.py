"""Flannel as processes (issue 8's "What must be shown"): real PostgreSQL, Redis, two
``python -m chat serve`` nodes and two ``python -m flannel serve`` nodes (tests/cluster.py).

* a storm of 500 clients of one workspace on one Flannel node: all authenticate, one
  upstream workspace load, no more upstream sockets than configured;
* a Flannel node SIGKILLed under a steady poster: its clients resume on the other one and
  hold exactly what PostgreSQL stored, each event once;
* a wrong service key never makes a Flannel node ready, and the chat tier's ``/service``
  refuses a missing or forged credential (and a user token) with HTTP 401;
* differential: a seeded random workload gives every user the same durable event sequence
  through Flannel as straight from the chat tier;
* stale state (after Zulip's): after every step of a random series of changes, Flannel's
  answers equal those of a cache loaded fresh from PostgreSQL.

Assertions are on counts and outcomes, never on durations; every wait is bounded
(``scaled``) and every process is stopped by the fixtures, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from chat import credentials, service_frames, wire
from chat.client import Backoff, Client, RequestError, ResilientClient, goodbye_hint
from chat.errors import ChatError
from chat.storage import Database, open_database, queries
from flannel import answers
from flannel.cache import WorkspaceCache
from tests.cluster import SERVICE_KID, SERVICE_SECRET, Cluster
from tests.conftest import MakeCluster
from tests.timing import scaled, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")

Frame = dict[str, Any]

# The default limits (50 requests per 10 s) are for humans; these tests send thousands.
FAST_CHAT = {"CHAT_RATE_LIMIT_PER_10S": "1000000", "CHAT_RATE_LIMIT_DISCONNECT_AFTER": "1000000"}
FAST_FLANNEL = {
    "FLANNEL_RATE_LIMIT_PER_10S": "1000000",
    "FLANNEL_RATE_LIMIT_DISCONNECT_AFTER": "1000000",
}
UPSTREAM_CONNECTIONS = 2


# --------------------------------------------------------------------------- helpers


def durable(frames: Iterable[Frame]) -> list[Frame]:
    """The durable events among ``frames`` (typing and presence have no ``seq``)."""
    return [f for f in frames if f.get("seq") is not None and f.get("type") != "resumed"]


def record(client: Client) -> list[Frame]:
    """Every frame the server pushes to ``client`` from now on (and those queued), in order:
    draining the queue and installing the callback happen in one step of the loop."""
    frames = client.drain_events()
    client.on_frame = frames.append
    return frames


async def posted(frames: list[Frame], message_id: int, timeout: float, who: str) -> None:
    def seen() -> bool:
        return any(
            f.get("type") == "message.posted" and f["message"]["id"] == message_id for f in frames
        )

    await wait_until(seen, timeout, f"{who} to receive message {message_id}")


async def connect_retrying(url: str, token: str, attempts: int = 30) -> tuple[Client, int]:
    """An authenticated client, following the server's hints while it sheds load (HTTP 503
    before the upgrade, goodbye + 1013 after it), at most ``attempts`` times. Returns the
    client and the number of refusals it met."""
    rng = random.Random()
    refusals = 0
    for _ in range(attempts):
        hint_ms: int | None = None
        try:
            client = await Client.open(url, open_timeout=scaled(30))
        except InvalidStatus as exc:
            assert exc.response.status_code == 503, exc
            refusals += 1
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            continue
        try:
            client.session = await client.request("auth", token=token, timeout=scaled(30))
            return client, refusals
        except (RequestError, ConnectionError) as exc:
            hint_ms = goodbye_hint(client.drain_events())
            await client.close()
            if hint_ms is None and client.ws.close_code != 1013:
                raise AssertionError(f"auth refused for good: {exc!r}") from exc
        refusals += 1
        await asyncio.sleep((hint_ms or 500) / 1000 * rng.uniform(1.0, 2.0))
    raise AssertionError(f"not admitted after {attempts} attempts")


async def service_upgrade(url: str, token: str | None) -> int:
    """The HTTP status a websocket upgrade to ``url`` gets with ``Authorization: Bearer
    <token>`` (no header when None): 101 when it is accepted."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        async with websockets.connect(
            url, additional_headers=headers, open_timeout=scaled(10), compression=None
        ):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


# --------------------------------------------------------------------------- a. storm


STORM = 500


@pytest.mark.timeout(300)
async def test_a_storm_of_one_workspace_is_one_load_over_few_upstream_sockets(
    make_flannel_cluster: MakeCluster,
) -> None:
    cluster = await make_flannel_cluster(
        seed_users=STORM,
        upstream_connections=UPSTREAM_CONNECTIONS,
        extra_env=FAST_CHAT,
        flannel_env=FAST_FLANNEL,
    )
    seeded = cluster.seeded
    assert seeded is not None and len(seeded.users) == STORM
    edge, other = cluster.flannel(0), cluster.flannel(1)
    assert await edge.ametric("flannel_workspace_loads_total") == 0

    results = await asyncio.gather(
        *(connect_retrying(edge.url, seeded.tokens[h]) for h in seeded.handles)
    )
    clients = [c for c, _ in results]
    try:
        assert sorted(c.session["user"]["id"] for c in clients) == sorted(seeded.users.values())
        boots = await asyncio.gather(*(c.request("bootstrap", timeout=scaled(60)) for c in clients))
        general = seeded.channels["general"]
        for client, boot in zip(clients, boots, strict=True):
            assert boot["user"]["id"] == client.session["user"]["id"]
            assert boot["workspace"] == {"id": seeded.workspace_id, "name": "acme"}
            assert [ch["id"] for ch in boot["channels"]] == [general]
            assert boot["channels"][0]["member_count"] == STORM
        completions = await asyncio.gather(
            *(c.request("users.autocomplete", query="ada", limit=5) for c in clients[:50])
        )
        assert all(len(found["users"]) > 0 for found in completions)

        assert await edge.ametric("flannel_workspace_loads_total") == 1
        assert await other.ametric("flannel_workspace_loads_total") == 0
        assert await edge.ametric("flannel_upstream_connections") == UPSTREAM_CONNECTIONS
        service = await cluster.achat_metric("chat_service_connections")
        assert service <= UPSTREAM_CONNECTIONS * len(cluster.flannels), service
        refusals = sum(r for _, r in results)
        print(f"storm: {STORM} clients, {refusals} refusals, {service:.0f} service connections")
    finally:
        await asyncio.gather(*(c.close() for c in clients))


# --------------------------------------------------------------------------- c. credentials


@pytest.mark.timeout(180)
async def test_c_wrong_or_missing_service_credentials_are_refused(
    make_flannel_cluster: MakeCluster,
) -> None:
    cluster = await make_flannel_cluster(n_flannel=0)
    seeded = cluster.seeded
    assert seeded is not None
    refused_before = await cluster.achat_metric("chat_service_refused_total")

    # Right kid, wrong secret: the chat nodes refuse every attempt; it never becomes ready.
    wrong = f"{SERVICE_KID}=not-the-secret-but-long-enough-0123456789abcdef"
    forger = await cluster.add_flannel(
        service_key=wrong, ready=False, extra_env={"FLANNEL_UPSTREAM_TIMEOUT_S": "1"}
    )
    statuses: Counter[int | None] = Counter()

    async def refused_enough() -> bool:
        statuses[await forger.areadyz()] += 1
        grown = await cluster.achat_metric("chat_service_refused_total") - refused_before
        return grown >= 4 * UPSTREAM_CONNECTIONS  # every link refused, again and again

    deadline = time.monotonic() + scaled(30)
    while not await refused_enough():
        assert forger.running, forger.log_tail()
        assert time.monotonic() < deadline, f"refusals did not grow: {forger.log_tail()}"
        await asyncio.sleep(0.05)
    assert statuses[200] == 0, statuses
    assert await forger.areadyz() == 503
    assert await forger.ametric("flannel_upstream_connections") == 0
    assert await cluster.achat_metric("chat_service_connections") == 0
    # A client it admits meanwhile is told to come back later, as by a chat node whose
    # database is down: `unavailable` with a retry hint, then 1013.
    client = await Client.open(forger.url)
    try:
        with pytest.raises(RequestError) as refused:
            await client.request("auth", token=seeded.tokens["alice"], timeout=scaled(20))
        assert (refused.value.code, refused.value.retry_after_ms) == ("unavailable", 1000)
        await asyncio.wait_for(client.closed.wait(), scaled(10))
        assert client.ws.close_code == 1013
    finally:
        await client.close()
    await forger.akill()

    # Raw upgrades to a chat node's /service: each refusal is a bare 401, and counted.
    url = cluster.nodes[0].service_url
    refused_before = await cluster.achat_metric("chat_service_refused_total")
    kid, secret = SERVICE_KID, SERVICE_SECRET
    attempts = {
        "no credential": None,
        "a user token": seeded.tokens["alice"],
        "right kid, wrong secret": credentials.issue(kid, "x" * 40, "forger"),
        "unknown kid": credentials.issue("other", secret, "forger"),
        "expired": credentials.issue(kid, secret, "late", ttl_s=-10),
        "garbage": "not.a.jwt",
    }
    for what, token in attempts.items():
        assert await service_upgrade(url, token) == 401, what
    counted = await cluster.achat_metric("chat_service_refused_total") - refused_before
    assert counted == len(attempts)
    assert await service_upgrade(url, credentials.issue(kid, secret, "tester")) == 101


async def test_c_a_service_credential_alone_acts_as_nobody(
    make_flannel_cluster: MakeCluster,
) -> None:
    """A good credential opens a service connection, and that is all: a relayed request for
    a session never attached is refused, and so is a workspace's load or subscription."""
    cluster = await make_flannel_cluster(n_flannel=0)
    seeded = cluster.seeded
    assert seeded is not None
    token = credentials.issue(SERVICE_KID, SERVICE_SECRET, "tester")
    async with websockets.connect(
        cluster.nodes[0].service_url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=scaled(10),
        compression=None,
    ) as ws:
        post = {
            "type": "messages.post",
            "id": "p1",
            "channel_id": seeded.channels["general"],
            "client_msg_id": "forged",
            "text": "as nobody",
        }
        await ws.send(service_frames.relay(1, json.dumps(post).encode()))
        answer = await asyncio.wait_for(ws.recv(), scaled(10))
        assert isinstance(answer, bytes)
        sid, frame = service_frames.unpack_relay(answer)
        error = json.loads(frame)
        assert (sid, error["type"], error["code"]) == (1, "error", "not_authenticated")
        for request in (
            {"type": "load", "rid": 1, "workspace_id": seeded.workspace_id},
            {"type": "subscribe", "rid": 2, "workspace_id": seeded.workspace_id, "after": None},
        ):
            await ws.send(json.dumps(request))
            failed = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
            assert (failed["type"], failed["rid"]) == ("failed", request["rid"]), failed
    async with cluster.client(0, "alice") as alice:
        history = await alice.request("messages.history", channel_id=seeded.channels["general"])
        assert history["messages"] == []


# --------------------------------------------------------------------------- b. SIGKILL


class TracingClient(ResilientClient):
    """A ResilientClient that also keeps every frame the server pushed, before its
    de-duplication, with the number of the connection it came on; and every event it
    delivered, pumped by :meth:`pump`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: list[tuple[int, Frame]] = []
        self.delivered: list[Frame] = []

    def _on_frame(self, frame: Frame) -> None:
        self.raw.append((self.connects, frame))
        super()._on_frame(frame)

    async def pump(self) -> None:
        async for event in self.events():
            self.delivered.append(event)

    def resent(self) -> list[tuple[int, int, str]]:
        """(connection, seq, type) of every durable event the server sent again."""
        seen: set[int] = set()
        out = []
        for conn, frame in self.raw:
            seq = frame.get("seq")
            if seq is None or frame.get("type") == "resumed":
                continue
            if seq in seen:
                out.append((conn, seq, frame["type"]))
            seen.add(seq)
        return out

    def message_ids(self, channel_id: int) -> list[int]:
        return [
            e["message"]["id"]
            for e in self.delivered
            if e["type"] == "message.posted" and e["message"]["channel_id"] == channel_id
        ]


async def stored_ids(db: Database, channel_id: int) -> list[int]:
    """The channel's messages as PostgreSQL has them, in channel order."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT id FROM messages WHERE channel_id = $1 ORDER BY seq", channel_id
        )
    return [int(r["id"]) for r in rows]


@contextlib.asynccontextmanager
async def database(cluster: Cluster) -> AsyncIterator[Database]:
    """A connection pool of our own on the cluster's PostgreSQL database."""
    db = await open_database(cluster.database_url, "")
    try:
        yield db
    finally:
        await db.close()


N_RESUMERS = 50
N_POSTS = 200
KILL_AFTER = 60


@pytest.mark.timeout(240)
async def test_b_flannel_killed_under_a_steady_poster_its_clients_resume_on_the_other(
    make_flannel_cluster: MakeCluster,
) -> None:
    cluster = await make_flannel_cluster(seed=False, extra_env=FAST_CHAT, flannel_env=FAST_FLANNEL)
    handles = ["owner", "poster", *(f"u{i:02d}" for i in range(N_RESUMERS))]
    seeded = await cluster.seed(handles=handles, channels=["general"])
    general = seeded.channels["general"]
    a, b = cluster.flannel(0), cluster.flannel(1)
    clients = [
        TracingClient(
            [a.url, b.url],  # A first; after A's death the next attempt goes to B
            seeded.tokens[h],
            backoff=Backoff(base=0.1, cap=1.0),
            connect_timeout=scaled(20),
        )
        for h in handles[2:]
    ]
    pumps = []
    try:
        for client in clients:
            client.start()
            pumps.append(asyncio.create_task(client.pump()))
        await asyncio.gather(*(c.wait_connected(scaled(30)) for c in clients))
        assert all(c.attempts == 1 for c in clients)  # all on A
        assert await a.ametric("flannel_workspace_loads_total") == 1

        killed = asyncio.Event()
        acked: list[int] = []
        async with cluster.client(0, "poster") as poster:

            async def post_steadily() -> None:
                for i in range(N_POSTS):
                    reply = await poster.post(general, f"m{i}", f"m{i}", timeout=scaled(30))
                    acked.append(reply["message"]["id"])
                    if len(acked) == KILL_AFTER:
                        killed.set()
                    await asyncio.sleep(0.01)

            posting = asyncio.create_task(post_steadily())
            try:
                await asyncio.wait_for(killed.wait(), scaled(60))
                assert await a.akill() == -9  # mid-stream, the poster goes on
                await asyncio.wait_for(posting, scaled(120))
            finally:
                posting.cancel()

        async with database(cluster) as db:
            stored = await stored_ids(db, general)
        assert stored == acked and len(stored) == N_POSTS

        await wait_until(
            lambda: all(len(c.message_ids(general)) >= N_POSTS for c in clients),
            scaled(60),
            "every client to hold every message",
        )
        for i, client in enumerate(clients):
            who = f"client {i} ({handles[i + 2]})"
            assert client.message_ids(general) == stored, who
            assert client.resent() == [], f"{who}: the server sent events twice"
            seqs = [e["seq"] for e in durable(client.delivered)]
            assert seqs == sorted(set(seqs)), who
            resets = [e for e in client.delivered if e["type"] == "client.reset"]
            assert len(resets) == 1, f"{who}: {resets}"  # the first connect, not the resume
            assert (client.connects, client.resumes) == (2, 1), who
            assert client.urls[(client.attempts - 1) % 2] == b.url, who
        on_b = [
            sum(1 for conn, f in c.raw if conn == 2 and f.get("type") == "message.posted")
            for c in clients
        ]
        assert min(on_b) >= N_POSTS - KILL_AFTER  # what was posted after the kill came via B
        # B loaded the workspace once for all fifty resumes.
        assert await b.ametric("flannel_workspace_loads_total") == 1
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


# --------------------------------------------------------------------------- d. differential


@dataclass
class Room:
    """What the workload knows of a channel (it keeps this itself, from its own replies)."""

    kind: str
    creator: int
    members: set[int]


@dataclass
class Workload:
    """A seeded random workload of one workspace, one request at a time, each through the
    actor's Flannel client or its direct one (chosen at random). It only asks for what
    makes sense by its own model (a post in a channel the actor is in, an edit of its own
    message...); a refusal is counted, not fatal (a guest may not join, for instance)."""

    rng: random.Random
    users: dict[str, int]
    clients: dict[str, tuple[Client, Client]]  # handle -> (through Flannel, straight)
    rooms: dict[int, Room]
    excluded: set[int]  # channels left alone (the barrier)
    roles: dict[int, str]
    messages: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (channel, author)
    reactions: set[tuple[int, int, str]] = field(default_factory=set)  # (message, user, emoji)
    done: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    via: Counter[str] = field(default_factory=Counter)

    OPS = {
        "post": 30,
        "edit": 8,
        "delete": 6,
        "react": 10,
        "unreact": 4,
        "join": 6,
        "leave": 6,
        "invite": 6,
        "remove": 5,
        "private": 4,
        "dm": 6,
    }

    async def run(self, steps: int) -> None:
        handles = list(self.users)
        for step in range(steps):
            actor = self.rng.choice(handles)
            op = self.rng.choices(list(self.OPS), weights=list(self.OPS.values()))[0]
            through = self.rng.choice(("flannel", "chat"))
            client = self.clients[actor][0 if through == "flannel" else 1]
            self.via[through] += 1
            try:
                name = await getattr(self, f"_{op}")(client, self.users[actor], step)
            except RequestError as exc:
                self.refused[f"{op}:{exc.code}"] += 1
            else:
                self.done[name] += 1

    # -- choices --------------------------------------------------------------------------

    def _mine(self, uid: int, *kinds: str) -> list[int]:
        return sorted(
            cid
            for cid, room in self.rooms.items()
            if uid in room.members
            and cid not in self.excluded
            and (not kinds or room.kind in kinds)
        )

    def _alive_in(self, channels: Iterable[int]) -> list[int]:
        wanted = set(channels)
        return sorted(mid for mid, (cid, _) in self.messages.items() if cid in wanted)

    # -- operations (each returns what it did) --------------------------------------------

    async def _post(self, c: Client, uid: int, step: int) -> str:
        channels = self._mine(uid)
        if not channels:
            return await self._dm(c, uid, step)
        cid = self.rng.choice(channels)
        text = f"post {step}"
        others = sorted(self.rooms[cid].members - {uid})
        if others and self.rng.random() < 0.3:
            mentioned = self.rng.choice(others)
            handle = next(h for h, i in self.users.items() if i == mentioned)
            text += f" @{handle}"
        fields: dict[str, Any] = {}
        roots = self._alive_in([cid])
        if roots and self.rng.random() < 0.2:
            fields["thread_root_id"] = self.rng.choice(roots)
        reply = await c.post(cid, text, f"w{step}", **fields)
        if "thread_root_id" not in fields:
            self.messages[reply["message"]["id"]] = (cid, uid)
        return "post"

    async def _edit(self, c: Client, uid: int, step: int) -> str:
        own = [mid for mid, (_, author) in self.messages.items() if author == uid]
        if not own:
            return await self._post(c, uid, step)
        await c.request("messages.edit", message_id=self.rng.choice(own), text=f"edit {step}")
        return "edit"

    async def _delete(self, c: Client, uid: int, step: int) -> str:
        own = [mid for mid, (_, author) in self.messages.items() if author == uid]
        if not own:
            return await self._post(c, uid, step)
        mid = self.rng.choice(own)
        await c.request("messages.delete", message_id=mid)
        del self.messages[mid]
        self.reactions = {r for r in self.reactions if r[0] != mid}
        return "delete"

    async def _react(self, c: Client, uid: int, step: int) -> str:
        candidates = self._alive_in(self._mine(uid))
        if not candidates:
            return await self._post(c, uid, step)
        mid, emoji = self.rng.choice(candidates), self.rng.choice(("+1", "tada", "eyes"))
        await c.request("reactions.add", message_id=mid, emoji=emoji)
        self.reactions.add((mid, uid, emoji))
        return "react"

    async def _unreact(self, c: Client, uid: int, step: int) -> str:
        mine = sorted(r for r in self.reactions if r[1] == uid)
        if not mine:
            return await self._react(c, uid, step)
        mid, _, emoji = reaction = self.rng.choice(mine)
        await c.request("reactions.remove", message_id=mid, emoji=emoji)
        self.reactions.discard(reaction)
        return "unreact"

    async def _join(self, c: Client, uid: int, step: int) -> str:
        public = sorted(
            cid
            for cid, room in self.rooms.items()
            if room.kind == "public" and uid not in room.members and cid not in self.excluded
        )
        if not public:
            return await self._leave(c, uid, step)
        cid = self.rng.choice(public)
        await c.request("channels.join", channel_id=cid)
        self.rooms[cid].members.add(uid)
        return "join"

    async def _leave(self, c: Client, uid: int, step: int) -> str:
        channels = self._mine(uid, "public", "private")
        if not channels:
            return await self._dm(c, uid, step)
        cid = self.rng.choice(channels)
        await c.request("channels.leave", channel_id=cid)
        self.rooms[cid].members.discard(uid)
        return "leave"

    async def _invite(self, c: Client, uid: int, step: int) -> str:
        channels = self._mine(uid, "public", "private")
        outside = {
            cid: sorted(set(self.users.values()) - self.rooms[cid].members) for cid in channels
        }
        channels = [cid for cid in channels if outside[cid]]
        if not channels:
            return await self._private(c, uid, step)
        cid = self.rng.choice(channels)
        invited = self.rng.sample(outside[cid], k=min(len(outside[cid]), self.rng.randint(1, 2)))
        await c.request("channels.invite", channel_id=cid, user_ids=invited)
        self.rooms[cid].members.update(invited)
        return "invite"

    async def _remove(self, c: Client, uid: int, step: int) -> str:
        staff = self.roles[uid] in ("owner", "admin")
        channels = [
            cid
            for cid in self._mine(uid, "public", "private")
            if (staff or self.rooms[cid].creator == uid) and len(self.rooms[cid].members) > 1
        ]
        if not channels:
            return await self._invite(c, uid, step)
        cid = self.rng.choice(channels)
        target = self.rng.choice(sorted(self.rooms[cid].members - {uid}))
        await c.request("channels.remove", channel_id=cid, user_id=target)
        self.rooms[cid].members.discard(target)
        return "remove"

    async def _private(self, c: Client, uid: int, step: int) -> str:
        reply = await c.request("channels.create", name=f"private-{step}", private=True)
        self.rooms[reply["channel"]["id"]] = Room("private", uid, {uid})
        return "private"

    async def _dm(self, c: Client, uid: int, step: int) -> str:
        others = sorted(set(self.users.values()) - {uid})
        partners = self.rng.sample(others, k=self.rng.choice((1, 1, 2)))
        channel = (await c.request("dms.open", user_ids=partners))["channel"]
        cid = channel["id"]
        self.rooms.setdefault(cid, Room(channel["kind"], uid, {uid, *partners}))
        reply = await c.post(cid, f"dm {step}", f"w{step}")
        self.messages[reply["message"]["id"]] = (cid, uid)
        return "dm"


def assert_same_events(who: str, through: list[Frame], straight: list[Frame]) -> None:
    """Event by event, with the first difference in the error."""
    for i, (f, d) in enumerate(zip(through, straight, strict=False)):
        assert f == d, f"{who}: event #{i} differs:\n  through Flannel {f}\n  straight      {d}"
    assert len(through) == len(straight), (
        f"{who}: {len(through)} events through Flannel, {len(straight)} straight; the "
        f"first extra: {(through[len(straight) :] or straight[len(through) :])[:3]}"
    )


DIFFERENTIAL_SEED = int(os.environ.get("CHAT_TEST_SEED", "20240608"))
DIFFERENTIAL_STEPS = 150


@pytest.mark.timeout(240)
async def test_d_every_user_gets_the_same_events_through_flannel_as_straight(
    make_flannel_cluster: MakeCluster,
) -> None:
    cluster = await make_flannel_cluster(seed=False, extra_env=FAST_CHAT, flannel_env=FAST_FLANNEL)
    handles = ["alice", "bob", "carol", "dave", "erin", "frank"]
    seeded = await cluster.seed(handles=handles, channels=["general", "random", "barrier"])
    users = seeded.users
    roles = {uid: ("owner" if h == "alice" else "member") for h, uid in users.items()}
    async with cluster.client(0, "alice") as alice:  # one guest: other visibility rules
        await alice.request("users.set_role", user_id=users["frank"], role="guest")
        roles[users["frank"]] = "guest"

    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, tuple[Client, Client]] = {}
        for i, h in enumerate(handles):
            through = await stack.enter_async_context(cluster.flannel_client(i % 2, h))
            straight = await stack.enter_async_context(cluster.client((i + 1) % 2, h))
            clients[h] = (through, straight)
        frames = {h: (record(f), record(d)) for h, (f, d) in clients.items()}

        everyone = set(users.values())
        rooms = {
            cid: Room("public", users["alice"], set(everyone)) for cid in seeded.channels.values()
        }
        barrier = seeded.channels["barrier"]
        workload = Workload(
            random.Random(DIFFERENTIAL_SEED), users, clients, rooms, {barrier}, roles
        )
        await workload.run(DIFFERENTIAL_STEPS)
        assert sum(workload.done.values()) >= DIFFERENTIAL_STEPS * 3 // 4, workload.refused
        assert workload.via["flannel"] > 0 and workload.via["chat"] > 0

        # Settled: the barrier, posted after everything, has reached every client.
        last = (await clients["alice"][1].post(barrier, "barrier", "barrier"))["message"]["id"]
        for h, (via_f, via_d) in frames.items():
            await posted(via_f, last, scaled(30), f"{h} through Flannel")
            await posted(via_d, last, scaled(30), f"{h} straight")

        compared = 0
        for h, (through, straight) in clients.items():
            assert through.session["seq"] == straight.session["seq"], h
            start = through.session["seq"]
            via_f, via_d = frames[h]
            events_f = [e for e in durable(via_f) if e["seq"] > start]
            events_d = [e for e in durable(via_d) if e["seq"] > start]
            assert_same_events(h, events_f, events_d)
            compared += len(events_f)
        assert compared > DIFFERENTIAL_STEPS
        print(f"differential: {dict(workload.done)}, refused {dict(workload.refused)}")


# --------------------------------------------------------------------------- e. stale state


Answer = tuple[str, Any]  # ("reply", data) or ("error", code)


async def ask(client: Client, kind: str, fields: dict[str, Any]) -> Answer:
    frame = await client.request_frame(kind, timeout=scaled(20), **fields)
    if frame["type"] == "error":
        return ("error", frame["code"])
    return ("reply", frame["data"])


def answer_from(
    cache: WorkspaceCache, user_id: int, kind: str, fields: dict[str, Any], counts: Any
) -> Answer:
    """What ``flannel.answers`` says from ``cache``, shaped like :func:`ask`'s result."""
    request = wire.CLIENT_FRAME_ADAPTER.validate_python({"type": kind, "id": "1", **fields})
    try:
        if kind == "bootstrap":
            data = answers.bootstrap(cache, user_id, fields.get("parts"), counts)
        else:
            data = PURE_ANSWERS[kind](cache, user_id, request)
    except ChatError as exc:
        return ("error", exc.code.value)
    return ("reply", data.model_dump(mode="json"))


PURE_ANSWERS: dict[str, Callable[[WorkspaceCache, int, Any], Any]] = {
    "users.info": answers.users_info,
    "channels.info": answers.channels_info,
    "channels.members": answers.channels_members,
    "users.autocomplete": answers.users_autocomplete,
    "channels.autocomplete": answers.channels_autocomplete,
}
QUERIES = ("", "a", "al", "b", "ca", "jo", "jose", "zoe", "wa", "王", "gen", "pri", "x9")
NAMES = (
    ("José Álvarez", "José María Álvarez"),
    ("Zoë", "Zoë Kravitz"),
    ("王小明", "王 小明"),
    ("Ålice", "Ålice Liddell"),
    ("bob the builder", ""),
    ("Carol", "Carol Danvers"),
    ("jo", "Jo March"),
    ("Gene", "Gene Kranz"),
)
WORDS = ("general", "private", "ops", "jose", "zoe", "gen", "alpha", "wagon")


def requests_for(
    cache: WorkspaceCache, channel_ids: Iterable[int]
) -> list[tuple[str, dict[str, Any]]]:
    """Every request the comparison makes of one observer, from the fresh cache's ids."""
    nowhere = max([*cache.users, *cache.channel_ids()]) + 1000
    out: list[tuple[str, dict[str, Any]]] = [
        ("users.info", {"user_ids": [*sorted(cache.users), nowhere]}),
        ("bootstrap", {}),
        ("bootstrap", {"parts": ["channels", "users"]}),
    ]
    for cid in [*sorted(cache.channel_ids()), nowhere]:
        out.append(("channels.info", {"channel_id": cid}))
        out.append(("channels.members", {"channel_id": cid, "limit": 3}))
        out.append(("channels.members", {"channel_id": cid, "limit": 3, "cursor": 2}))
        out.append(("channels.members", {"channel_id": cid, "limit": 1000}))
    for q in QUERIES:
        out.append(("users.autocomplete", {"query": q, "limit": 50}))
        out.append(("channels.autocomplete", {"query": q, "limit": 50}))
        for cid in channel_ids:
            out.append(("users.autocomplete", {"query": q, "channel_id": cid, "limit": 5}))
    return out


@dataclass
class Changes:
    """A seeded random series of changes to one workspace, each made straight on a chat
    node by a user allowed to make it (the owner, or the user concerned), chosen from its
    own model of who and what exists (so nearly every change is accepted)."""

    rng: random.Random
    users: dict[str, int]
    direct: dict[str, Client]
    observers: set[str]  # never deactivated (their Flannel clients are compared)
    rooms: dict[int, Room]
    archived: set[int]
    excluded: set[int]
    roles: dict[int, str]
    active: set[str] = field(default_factory=set)
    done: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)

    OPS = {
        "profile": 6,
        "role": 3,
        "rename": 4,
        "archive": 3,
        "unarchive": 3,
        "join": 4,
        "leave": 4,
        "create": 4,
        "invite": 3,
        "dm": 3,
        "post": 4,
        "deactivate": 1,
    }

    async def step(self, step: int) -> str:
        op = self.rng.choices(list(self.OPS), weights=list(self.OPS.values()))[0]
        try:
            done: str = await getattr(self, f"_{op}")(step)
        except RequestError as exc:
            self.refused[f"{op}:{exc.code}"] += 1
            return f"{op} (refused: {exc.code})"
        self.done[done] += 1
        return done

    def _pick_user(self, *, staff_ok: bool = True, guest_ok: bool = True) -> str:
        return self.rng.choice(
            sorted(
                h
                for h in self.active
                if (guest_ok or self.roles[self.users[h]] != "guest")
                and (staff_ok or self.roles[self.users[h]] not in ("owner", "admin"))
            )
        )

    def _channels(
        self, *, archived: bool | None = None, kinds: tuple[str, ...] = ("public", "private")
    ) -> list[int]:
        return sorted(
            cid
            for cid, room in self.rooms.items()
            if room.kind in kinds
            and cid not in self.excluded
            and (archived is None or (cid in self.archived) == archived)
        )

    async def _profile(self, step: int) -> str:
        who = self._pick_user()
        display, real = self.rng.choice(NAMES)
        await self.direct[who].request(
            "users.update_profile", display_name=f"{display} {step}", real_name=real
        )
        return "profile"

    async def _role(self, step: int) -> str:
        others = sorted(h for h in self.active if self.roles[self.users[h]] != "owner")
        who = self.rng.choice(others)
        role = self.rng.choice(("admin", "member", "guest"))
        await self.direct["alice"].request("users.set_role", user_id=self.users[who], role=role)
        self.roles[self.users[who]] = role
        return "role"

    def _manager(self, cid: int) -> Client:
        """The channel's creator if still active (it may rename or archive it), else the
        owner."""
        creator = next(h for h, uid in self.users.items() if uid == self.rooms[cid].creator)
        return self.direct[creator if creator in self.active else "alice"]

    async def _rename(self, step: int) -> str:
        cid = self.rng.choice(self._channels())
        name = f"{self.rng.choice(WORDS)}-{step}"
        await self._manager(cid).request("channels.update", channel_id=cid, name=name)
        return "rename"

    async def _archive(self, step: int) -> str:
        choices = self._channels(archived=False)
        if not choices:
            return await self._unarchive(step)
        cid = self.rng.choice(choices)
        await self._manager(cid).request("channels.archive", channel_id=cid)
        self.archived.add(cid)
        return "archive"

    async def _unarchive(self, step: int) -> str:
        choices = self._channels(archived=True)
        if not choices:
            return await self._archive(step)
        cid = self.rng.choice(choices)
        await self._manager(cid).request("channels.unarchive", channel_id=cid)
        self.archived.discard(cid)
        return "unarchive"

    async def _join(self, step: int) -> str:
        who = self._pick_user(guest_ok=False)
        uid = self.users[who]
        choices = [
            cid
            for cid in self._channels(archived=False, kinds=("public",))
            if uid not in self.rooms[cid].members
        ]
        if not choices:
            return await self._leave(step)
        cid = self.rng.choice(choices)
        await self.direct[who].request("channels.join", channel_id=cid)
        self.rooms[cid].members.add(uid)
        return "join"

    async def _leave(self, step: int) -> str:
        who = self._pick_user()
        uid = self.users[who]
        choices = [cid for cid in self._channels() if uid in self.rooms[cid].members]
        if not choices:
            return await self._create(step)
        cid = self.rng.choice(choices)
        await self.direct[who].request("channels.leave", channel_id=cid)
        self.rooms[cid].members.discard(uid)
        return "leave"

    async def _create(self, step: int) -> str:
        who = self._pick_user(guest_ok=False)
        private = self.rng.random() < 0.5
        name = f"{self.rng.choice(WORDS)}-new-{step}"
        reply = await self.direct[who].request("channels.create", name=name, private=private)
        uid = self.users[who]
        self.rooms[reply["channel"]["id"]] = Room("private" if private else "public", uid, {uid})
        return "create"

    async def _invite(self, step: int) -> str:
        alice = self.users["alice"]
        choices = [
            cid
            for cid in self._channels(archived=False)
            if alice in self.rooms[cid].members
            and {self.users[h] for h in self.active} - self.rooms[cid].members
        ]
        if not choices:
            return await self._join(step)
        cid = self.rng.choice(choices)
        outside = sorted({self.users[h] for h in self.active} - self.rooms[cid].members)
        invited = self.rng.sample(outside, k=min(2, len(outside)))
        await self.direct["alice"].request("channels.invite", channel_id=cid, user_ids=invited)
        self.rooms[cid].members.update(invited)
        return "invite"

    async def _dm(self, step: int) -> str:
        who = self._pick_user()
        partner = self.rng.choice(sorted(self.active - {who}))
        channel = (await self.direct[who].request("dms.open", user_ids=[self.users[partner]]))[
            "channel"
        ]
        self.rooms.setdefault(
            channel["id"], Room("dm", self.users[who], {self.users[who], self.users[partner]})
        )
        await self.direct[who].post(channel["id"], f"dm {step}", f"dm{step}")
        return "dm"

    async def _post(self, step: int) -> str:
        who = self._pick_user()
        uid = self.users[who]
        choices = [
            cid
            for cid, room in self.rooms.items()
            if uid in room.members and cid not in self.archived and cid not in self.excluded
        ]
        if not choices:
            return await self._dm(step)
        await self.direct[who].post(self.rng.choice(sorted(choices)), f"post {step}", f"p{step}")
        return "post"

    async def _deactivate(self, step: int) -> str:
        choices = sorted(self.active - self.observers - {"alice"})
        if len(choices) <= 2:
            return await self._profile(step)
        who = self.rng.choice(choices)
        await self.direct["alice"].request("users.deactivate", user_id=self.users[who])
        self.active.discard(who)
        return "deactivate"


STALE_SEED = int(os.environ.get("CHAT_TEST_SEED", "1729"))
STALE_STEPS = int(os.environ.get("CHAT_TEST_STEPS", "30"))


@pytest.mark.timeout(300)
async def test_e_after_every_change_flannel_answers_as_a_fresh_load_would(
    make_flannel_cluster: MakeCluster,
) -> None:
    """After each change, a barrier message is posted and awaited by every observer (so
    its Flannel node has applied the change's event, which comes before it); then every
    look-up, autocomplete and bootstrap through Flannel must equal ``flannel.answers`` over
    a :class:`WorkspaceCache` loaded fresh from PostgreSQL, and so must the chat node's own
    answers (database look-ups; bootstrap and autocomplete from its in-process cache).
    Observers: the owner, two members and a guest, on both Flannel nodes; their roles may
    change, they are never deactivated."""
    cluster = await make_flannel_cluster(seed=False, extra_env=FAST_CHAT, flannel_env=FAST_FLANNEL)
    handles = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hugo"]
    seeded = await cluster.seed(handles=handles, channels=["general", "random", "barrier"])
    users, wid = seeded.users, seeded.workspace_id
    barrier, general = seeded.channels["barrier"], seeded.channels["general"]
    roles = {uid: ("owner" if h == "alice" else "member") for h, uid in users.items()}
    everyone = set(users.values())
    rooms = {cid: Room("public", users["alice"], set(everyone)) for cid in seeded.channels.values()}

    async with contextlib.AsyncExitStack() as stack, database(cluster) as db:
        direct = {
            h: await stack.enter_async_context(cluster.client(i % 2, h))
            for i, h in enumerate(handles)
        }
        # Some variety before the observers arrive: a guest, a private channel, a DM.
        await direct["alice"].request("users.set_role", user_id=users["erin"], role="guest")
        roles[users["erin"]] = "guest"
        secret = (await direct["alice"].request("channels.create", name="secret", private=True))[
            "channel"
        ]["id"]
        await direct["alice"].request("channels.invite", channel_id=secret, user_ids=[users["bob"]])
        rooms[secret] = Room("private", users["alice"], {users["alice"], users["bob"]})
        dm = (await direct["bob"].request("dms.open", user_ids=[users["carol"]]))["channel"]["id"]
        rooms[dm] = Room("dm", users["bob"], {users["bob"], users["carol"]})
        await direct["bob"].post(dm, "hi carol", "dm0")

        observers = {"alice": 0, "bob": 1, "erin": 0, "dave": 1}  # handle -> Flannel node
        through = {
            h: await stack.enter_async_context(cluster.flannel_client(i, h))
            for h, i in observers.items()
        }
        seen = {h: record(c) for h, c in through.items()}
        seen_straight = {h: record(direct[h]) for h in observers}
        changes = Changes(
            random.Random(STALE_SEED),
            users,
            direct,
            set(observers),
            rooms,
            set(),
            {barrier},
            roles,
            active=set(handles),
        )

        async def settle(what: str) -> None:
            """Everything before the barrier post has reached every observer's Flannel
            node and chat node (events are applied in order, before the client gets
            them)."""
            mid = (await direct["alice"].post(barrier, what, what))["message"]["id"]
            for h in observers:
                await posted(seen[h], mid, scaled(20), f"{h} through Flannel")
                await posted(seen_straight[h], mid, scaled(20), f"{h} straight")

        async def compare(step: int, what: str) -> int:
            async with db.connection() as conn:
                model = await queries.workspace_model(conn, wid)
                assert model is not None
                fresh = WorkspaceCache.from_model(wid, model)
                counts = {h: await queries.unread_counts(conn, users[h]) for h in through}
            compared = 0
            for h, client in through.items():
                uid = users[h]
                asked = requests_for(fresh, [general, secret, dm])
                got = await asyncio.gather(*(ask(client, k, f) for k, f in asked))
                # The chat node answers the look-ups from its database, bootstrap and
                # autocomplete from its own cache (chat/handlers/cached.py).
                straight = await asyncio.gather(*(ask(direct[h], k, f) for k, f in asked))
                for (kind, fields), answer, chat in zip(asked, got, straight, strict=True):
                    want = answer_from(fresh, uid, kind, fields, counts[h])
                    where = f"step {step} ({what}): {h} {kind} {fields}"
                    assert answer == want, f"{where}\n  Flannel {answer}\n  fresh   {want}"
                    assert chat == want, f"{where}\n  chat    {chat}\n  fresh   {want}"
                    compared += 1
            return compared

        await settle("start")
        compared = await compare(0, "start")
        for step in range(1, STALE_STEPS + 1):
            what = await changes.step(step)
            await settle(f"after-{step}")
            compared += await compare(step, what)
        assert sum(changes.done.values()) >= STALE_STEPS * 3 // 4, changes.refused
        print(f"stale state: {dict(changes.done)}, refused {dict(changes.refused)}, {compared}")
