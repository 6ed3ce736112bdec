"""A chat node's service connections (chat/service.py), against a real node on both stores:
who may open one, sessions attached with their users' own tokens, relayed requests run as
those users, and a workspace's events once per connection, unfiltered and in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from chat import credentials, service_frames, wire
from chat.auth import issue_token
from chat.bus import Envelope
from tests.harness import SECRET, SERVICE_KID, SERVICE_SECRET, RunningNode

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Edge:
    """The edge's end, raw: what Flannel sends and reads, and nothing hidden."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[Envelope] = []
        self.replayed: dict[int, list[Envelope]] = {}
        self.relayed: dict[int, list[dict[str, Any]]] = {}
        self.control: list[wire.ServiceFrame] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.ws:
                if isinstance(message, str):
                    self.control.append(wire.CHAT_SERVICE_FRAME_ADAPTER.validate_json(message))
                elif message[:1] == wire.EVENTS:
                    self.events.extend(service_frames.unpack_events(message)[1])
                elif message[:1] == wire.REPLAY_CHUNK:
                    rid, envs = service_frames.unpack_replay_chunk(message, 0)
                    self.replayed.setdefault(rid, []).extend(envs)
                else:
                    sid, frame = service_frames.unpack_relay(message)
                    self.relayed.setdefault(sid, []).append(json.loads(frame))
                self._arrived.set()

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def relay(self, sid: int, **frame: Any) -> dict[str, Any]:
        before = len(self.relayed.get(sid, []))
        await self.ws.send(service_frames.relay(sid, json.dumps(frame).encode()))
        await self.until(lambda: len(self.relayed.get(sid, [])) > before)
        return self.relayed[sid][before]

    async def until(self, done: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self._arrived.clear()
                await self._arrived.wait()

    async def reply(self, kind: type[wire.ServiceFrame], **match: Any) -> Any:
        def found() -> Any:
            for frame in self.control:
                if isinstance(frame, kind) and all(
                    getattr(frame, k) == v for k, v in match.items()
                ):
                    return frame
            return None

        await self.until(lambda: found() is not None)
        return found()

    async def attach(self, sid: int, token: str) -> wire.SnapshotTaken:
        await self.send(type="attach", sid=sid, request={"type": "auth", "id": "a", "token": token})
        await self.reply(wire.Attached, sid=sid)
        await self.send(type="snapshot", sid=sid)
        taken: wire.SnapshotTaken = await self.reply(wire.SnapshotTaken, sid=sid)
        return taken


def credential(secret: str = SERVICE_SECRET, kid: str = SERVICE_KID, **kw: Any) -> str:
    return credentials.issue(kid, secret, "edge-under-test", **kw)


@contextlib.asynccontextmanager
async def edge(node: RunningNode, token: str | None = None) -> AsyncIterator[Edge]:
    url = f"ws://127.0.0.1:{node.node.port}/service"
    headers = {"Authorization": f"Bearer {token or credential()}"}
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        e = Edge(ws)
        try:
            yield e
        finally:
            e._reader.cancel()


async def test_only_a_valid_service_credential_opens_one(node: RunningNode) -> None:
    url = f"ws://127.0.0.1:{node.node.port}/service"
    user_token = node.tokens["olivia"]
    forged = [
        None,  # no credential
        credential(secret="x" * 40),  # the right key id, another secret
        credential(kid="other"),  # a key the node does not know
        credential(ttl_s=-5),  # expired
        user_token,  # a user's token is not a service credential
        issue_token(SECRET, 1, 1, "s_x", 60)[0],  # nor one signed with the node's token secret
    ]
    for token in forged:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
    async with edge(node) as e:
        await e.send(type="load", rid=1, workspace_id=node.workspace_id)
        failed = await e.reply(wire.Failed, rid=1)
        assert failed.code == "not_attached"  # the credential alone reads nothing


async def test_relayed_requests_run_as_the_attached_user(node: RunningNode) -> None:
    async with edge(node) as e:
        mia = await e.attach(1, node.tokens["mia"])
        mx = await e.attach(2, node.tokens["max"])
        assert mia.user is not None and mia.user.handle == "mia" and mia.refusal is None
        assert set(mia.channel_ids) == {node.general, node.private}
        assert mx.channel_ids == [node.general]
        private = await e.relay(1, type="channels.info", id="i1", channel_id=node.private)
        assert private["type"] == "reply", private
        assert private["data"]["channel"]["name"] == "secret"
        refused = await e.relay(2, type="channels.info", id="i2", channel_id=node.private)
        assert refused["type"] == "error" and refused["reply_to"] == "i2"
        posted = await e.relay(
            2, type="messages.post", id="p", channel_id=node.general, text="hi", client_msg_id="c1"
        )
        assert posted["data"]["message"]["user_id"] == node.users["max"]
        # A session number nobody attached, and bad frames through a good session.
        ghost = await e.relay(9, type="ping", id="g")
        assert ghost["type"] == "error" and ghost["code"] == "not_authenticated"
        bad = await e.relay(1, type="channels.info", id="b", channel_id="1")
        assert bad["type"] == "error" and bad["code"] == "invalid_frame"
        await e.send(type="detach", sid=2)
        gone = await e.relay(2, type="ping", id="after-detach")
        assert gone["code"] == "not_authenticated"


async def test_attach_refusals(node: RunningNode) -> None:
    async with edge(node) as e:
        await e.send(type="attach", sid=1, request={"type": "auth", "id": "a", "token": "nope"})
        assert (await e.reply(wire.Detached, sid=1)).code == "invalid_auth"
        login = {"type": "login", "id": "l", "workspace": "acme", "handle": "mia", "password": "x"}
        await e.send(type="attach", sid=2, request=login)
        assert (await e.reply(wire.Detached, sid=2)).code == "invalid_auth"
        login["password"] = "correct horse battery staple"
        await e.send(type="attach", sid=3, request=login, client_ip="192.0.2.7")
        attached = await e.reply(wire.Attached, sid=3)
        assert attached.user_id == node.users["mia"] and attached.token
        # Revoked after its token was issued: the token verifies, the snapshot refuses.
        gus = node.tokens["gus"]
        async with node.client("gus") as c:
            await c.request("sessions.revoke")
        await e.send(type="attach", sid=4, request={"type": "auth", "id": "a", "token": gus})
        await e.reply(wire.Attached, sid=4)
        await e.send(type="snapshot", sid=4)
        taken = await e.reply(wire.SnapshotTaken, sid=4)
        assert taken.refusal == "token_revoked"
        refused = await e.relay(4, type="ping", id="p")
        assert refused["code"] == "not_authenticated"


async def test_a_workspace_reaches_the_edge_once_unfiltered_in_order(node: RunningNode) -> None:
    async with edge(node) as e, node.client("olivia") as olivia:
        await e.send(type="subscribe", rid=1, workspace_id=node.workspace_id)
        assert (await e.reply(wire.Failed, rid=1)).code == "not_attached"
        await e.attach(1, node.tokens["max"])  # max is not in the private channel
        await e.send(type="subscribe", rid=2, workspace_id=node.workspace_id)
        start = (await e.reply(wire.Subscribed, rid=2)).seq
        await olivia.post(node.general, "public")
        await olivia.post(node.private, "private")  # the edge filters, not the node
        await e.until(lambda: len([x for x in e.events if x.seq]) >= 2)
        durable = [x for x in e.events if x.seq]
        assert [x.seq for x in durable] == [start + 1, start + 2]
        assert [x.audience.channel_id for x in durable] == [node.general, node.private]
        await e.send(type="subscribe", rid=3, workspace_id=node.workspace_id)
        assert (await e.reply(wire.Failed, rid=3)).code == "already_subscribed"


async def test_subscribe_after_a_position_replays_the_gap_then_goes_live(
    node: RunningNode,
) -> None:
    async with node.client("olivia") as olivia:
        async with edge(node) as first:
            await first.attach(1, node.tokens["mia"])
            await first.send(type="subscribe", rid=1, workspace_id=node.workspace_id)
            start = (await first.reply(wire.Subscribed, rid=1)).seq
        for i in range(3):  # committed while the edge is away
            await olivia.post(node.private, f"missed {i}")
        async with edge(node) as again:
            await again.attach(1, node.tokens["mia"])
            await again.send(type="subscribe", rid=1, workspace_id=node.workspace_id, after=start)
            sub = await again.reply(wire.Subscribed, rid=1)
            assert sub.seq == start + 3 and sub.resume_error is None
            await olivia.post(node.private, "live")
            await again.until(lambda: len(again.events) >= 4)
            assert [x.seq for x in again.events] == [start + 1, start + 2, start + 3, start + 4]
            await again.send(type="subscribe", rid=2, workspace_id=node.workspace_id)
            await again.reply(wire.Failed, rid=2)
        async with edge(node) as future:
            await future.attach(1, node.tokens["mia"])
            await future.send(
                type="subscribe", rid=1, workspace_id=node.workspace_id, after=start + 99
            )
            assert (await future.reply(wire.Subscribed, rid=1)).resume_error == "future_seq"


async def test_replay_and_load(node: RunningNode) -> None:
    async with node.client("olivia") as olivia, edge(node) as e:
        after = (await e.attach(1, node.tokens["mia"])).as_of
        for text, channel in (("one", node.general), ("two", node.private), ("3", node.general)):
            await olivia.post(channel, text)
        up_to = after + 3
        await e.send(type="replay", rid=5, workspace_id=node.workspace_id, after=after, up_to=up_to)
        done = await e.reply(wire.Replayed, rid=5)
        assert done.count == 3 == len(e.replayed[5])
        assert [x.seq for x in e.replayed[5]] == [after + 1, after + 2, after + 3]
        assert [x.audience.channel_id for x in e.replayed[5]] == [
            node.general,
            node.private,
            node.general,
        ]
        await e.send(type="load", rid=6, workspace_id=node.workspace_id)
        loaded: wire.Loaded = await e.reply(wire.Loaded, rid=6)
        assert loaded.seq == up_to and loaded.workspace_name == "acme"
        assert {u.handle for u in loaded.users} == set(node.users)
        members = {m.channel_id: set(m.user_ids) for m in loaded.members}
        assert members[node.private] == {node.users["olivia"], node.users["mia"]}
        assert node.users["mallory"] not in members[node.general]
        latest = {m.channel_id: m.last_ts for m in loaded.members}
        assert latest[node.general] is not None and latest[node.private] is not None


async def test_a_malformed_service_frame_closes_the_connection(node: RunningNode) -> None:
    async with edge(node) as e:
        await e.ws.send("{not json")
        async with asyncio.timeout(5):
            await e.ws.wait_closed()
        assert e.ws.close_code == 1008 and e.ws.close_reason == "invalid_service_frame"
    # The node serves everyone else meanwhile.
    async with node.client("olivia") as olivia:
        assert "server_time" in await olivia.request("ping")
