"""Hostile and broken clients: bad frames, bad auth, floods, oversize and invalid frames, origins.

Every test that misbehaves on a connection also checks that the node goes on serving other
clients: two bystanders (olivia and mia) are connected throughout, and a message between
them still gets through once the bad client has been dealt with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat import wire
from chat.auth import issue_token
from chat.client import Client
from chat.errors import CloseCode
from chat.protocol import Authenticate, ClientProtocol, Close, Send, Verdict
from tests.harness import SECRET, RunningNode, running_node
from tests.timing import scaled

_ids = (f"b{i}" for i in itertools.count())

Check = Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def bystanders(node: RunningNode) -> AsyncIterator[Check]:
    """Two connected clients; ``check()`` proves a message still goes from one to the other."""
    async with node.clients("olivia", "mia") as (olivia, mia):

        async def check() -> None:
            reply = await olivia.request(
                "messages.post",
                channel_id=node.general,
                client_msg_id=next(_ids),
                text="still served",
                timeout=scaled(10),
            )
            while True:
                event = await mia.next_event("message.posted", timeout=scaled(5))
                if event["message"]["id"] == reply["message"]["id"]:
                    return

        await check()
        yield check


async def closed(c: Client, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Wait until the server has closed the connection; its close code and reason."""
    await asyncio.wait_for(c.closed.wait(), scaled(timeout))
    return c.ws.close_code, c.ws.close_reason


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(scaled(timeout)):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event to wait on
            await asyncio.sleep(0.005)


async def raw_then_ping(c: Client, data: str | bytes) -> list[dict[str, Any]]:
    """Send ``data`` as is, then a ping (frames are answered in order for these cheap cases);
    the error frames that named no pending request, received in between."""
    before = len(c.errors)
    await c.send_raw(data)
    pong = await c.request("ping", timeout=scaled(5))
    assert "server_time" in pong  # the connection is still usable
    return c.errors[before:]


# --------------------------------------------------------------------------- malformed frames


async def test_malformed_json_is_invalid_json_and_connection_survives(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        errors = await raw_then_ping(c, "{this is not json")
        assert len(errors) == 1
        assert errors[0]["code"] == "invalid_json"
        assert errors[0]["reply_to"] is None
        assert errors[0]["retry_after_ms"] is None
        await check()


@pytest.mark.parametrize("data", ["[1, 2, 3]", "42", '"just a string"', "null"])
async def test_json_that_is_not_an_object_is_invalid_json(node: RunningNode, data: str) -> None:
    # docs/protocol.md: invalid_json = "The frame is not valid JSON, or not a JSON object."
    async with bystanders(node) as check, node.client("max") as c:
        errors = await raw_then_ping(c, data)
        assert [(e["code"], e["reply_to"]) for e in errors] == [("invalid_json", None)]
        await check()


async def test_unknown_type_names_the_request(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        frame = await c.request_frame("messages.frobnicate", id="u-1")
        assert frame["type"] == "error"
        assert frame["code"] == "unknown_type"
        assert frame["reply_to"] == "u-1"
        await c.request("ping")
        await check()


async def test_missing_type_is_invalid_frame(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        errors = await raw_then_ping(c, json.dumps({"id": "nt-1", "channel_id": 1}))
        assert len(errors) == 1
        assert errors[0]["code"] == "invalid_frame"
        assert errors[0]["reply_to"] == "nt-1"
        await check()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"channel_id": "general", "client_msg_id": "c", "text": "t"}, "channel_id"),
        ({"channel_id": 1, "client_msg_id": "c", "text": 12}, "text"),
        ({"channel_id": 1, "client_msg_id": ["c"], "text": "t"}, "client_msg_id"),
        ({"channel_id": 1, "text": "t"}, "client_msg_id"),  # missing
    ],
)
async def test_wrong_field_types_are_invalid_frame_naming_the_field(
    node: RunningNode, fields: dict[str, Any], field: str
) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        frame = await c.request_frame("messages.post", id="wf-1", **fields)
        assert frame["type"] == "error"
        assert frame["code"] == "invalid_frame"
        assert frame["reply_to"] == "wf-1"
        assert field in frame["message"]
        await c.request("ping")
        await check()


async def test_extra_unknown_field_is_invalid_frame(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        frame = await c.request_frame("ping", id="x-1", sneaky=True)
        assert frame["code"] == "invalid_frame"
        assert frame["reply_to"] == "x-1"
        assert "sneaky" in frame["message"]
        await c.request("ping")
        await check()


async def test_id_too_long_is_invalid_frame(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        errors = await raw_then_ping(c, json.dumps({"type": "ping", "id": "i" * 65}))
        assert len(errors) == 1
        assert errors[0]["code"] == "invalid_frame"
        assert errors[0]["reply_to"] is None  # an unusable id is not echoed
        assert "id" in errors[0]["message"]
        # 64 is fine.
        frame = await c.request_frame("ping", id="i" * 64)
        assert frame["type"] == "reply"
        await check()


async def test_binary_frame_is_invalid_frame(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        errors = await raw_then_ping(c, b'{"type": "ping", "id": "bin-1"}')
        assert len(errors) == 1
        assert errors[0]["code"] == "invalid_frame"
        assert errors[0]["reply_to"] is None
        await check()


async def test_oversize_frame_closes_1009(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        max_bytes = c.hello["limits"]["max_frame_bytes"]
        assert max_bytes == 16 * 1024
        text = json.dumps({"type": "ping", "id": "big", "pad": "x" * max_bytes})
        await c.send_raw(text)
        code, _ = await closed(c)
        assert code == 1009
        await check()


async def test_frame_at_the_limit_is_accepted(node: RunningNode) -> None:
    async with node.client("max") as c:
        max_bytes = c.hello["limits"]["max_frame_bytes"]
        head = (
            f'{{"type": "messages.post", "id": "edge", "channel_id": {node.general},'
            ' "client_msg_id": "e",'
        )
        frame = head + ' "text": "' + "y" * (max_bytes - len(head) - 12) + '"}'
        assert len(frame.encode()) == max_bytes
        await c.send_raw(frame)
        await wait_for(lambda: bool(c.errors) or c.closed.is_set())
        assert not c.closed.is_set()
        # Read, parsed and refused on its merits (text over 4000 characters).
        assert [(e["code"], e["reply_to"]) for e in c.errors] == [("msg_too_long", "edge")]


async def test_invalid_utf8_text_frame_closes_1007(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        await c.ws.send(b'{"type": "ping", "id": "\xff\xfe"}', text=True)
        code, _ = await closed(c)
        assert code == 1007
        await check()


# --------------------------------------------------------------------------- authentication


async def test_request_before_auth_is_not_authenticated_then_1008(node: RunningNode) -> None:
    async with bystanders(node) as check, Client.connect(node.url) as c:
        frame = await c.request_frame("ping", id="early")
        assert frame["type"] == "error"
        assert frame["code"] == "not_authenticated"
        assert frame["reply_to"] == "early"
        assert await closed(c) == (1008, "not_authenticated")
        await check()


async def test_garbage_before_auth_closes_1008(node: RunningNode) -> None:
    async with bystanders(node) as check, Client.connect(node.url) as c:
        await c.send_raw("{nope")
        code, _ = await closed(c)
        assert code == 1008
        assert [e["code"] for e in c.errors] == ["invalid_json"]
        await check()


async def test_auth_timeout_closes_1008(tmp_path: Path) -> None:
    async with (
        running_node(sqlite_path=str(tmp_path / "t.db"), auth_timeout_s=0.3) as node,
        bystanders(node) as check,
        Client.connect(node.url) as c,
    ):
        assert c.hello["limits"]["auth_timeout_ms"] == 300
        started = asyncio.get_running_loop().time()
        assert await closed(c) == (1008, "auth_timeout")
        assert asyncio.get_running_loop().time() - started >= 0.25
        await check()


async def auth_outcome(node: RunningNode, token: str) -> tuple[str, tuple[int | None, str | None]]:
    """Authenticate with ``token`` on a new connection: the error code and the close."""
    async with Client.connect(node.url) as c:
        frame = await c.request_frame("auth", id="a", token=token)
        assert frame["type"] == "error", frame
        assert frame["reply_to"] == "a"
        return frame["code"], await closed(c)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "eyJhbGciOiJIUzI1NiJ9.e30.sig",
        issue_token("some-other-secret-key-of-a-good-length-0000", 1, 1, "s_x", 3600)[0],
    ],
    ids=["garbage", "bad-signature-shape", "wrong-secret"],
)
async def test_bad_token_closes_1008_invalid_auth(node: RunningNode, token: str) -> None:
    async with bystanders(node) as check:
        assert await auth_outcome(node, token) == ("invalid_auth", (1008, "invalid_auth"))
        await check()


async def test_unknown_session_is_invalid_auth(node: RunningNode) -> None:
    token, _ = issue_token(SECRET, node.users["max"], node.workspace_id, "s_nonexistent", 3600)
    async with bystanders(node) as check:
        assert await auth_outcome(node, token) == ("invalid_auth", (1008, "invalid_auth"))
        await check()


async def test_expired_token_closes_1008_token_expired(node: RunningNode) -> None:
    token, _ = issue_token(SECRET, node.users["max"], node.workspace_id, "s_x", -10)
    async with bystanders(node) as check:
        assert await auth_outcome(node, token) == ("token_expired", (1008, "token_expired"))
        await check()


async def test_revoked_token_closes_1008_token_revoked(node: RunningNode) -> None:
    async with bystanders(node) as check:
        async with node.client("adam") as adam:
            revoked = await adam.request("sessions.revoke", user_id=node.users["max"], all=True)
            assert revoked["revoked"] >= 1
        outcome = await auth_outcome(node, node.tokens["max"])
        assert outcome == ("token_revoked", (1008, "token_revoked"))
        await check()


async def test_deactivated_user_closes_1008_account_inactive(node: RunningNode) -> None:
    async with bystanders(node) as check:
        async with node.client("adam") as adam:
            await adam.request("users.deactivate", user_id=node.users["max"])
        fresh = await node.admin.issue_token(node.users["max"])  # a session not revoked
        outcome = await auth_outcome(node, fresh)
        assert outcome == ("account_inactive", (1008, "account_inactive"))
        await check()


async def test_auth_twice_is_already_authenticated(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        frame = await c.request_frame("auth", token=node.tokens["max"])
        assert frame["code"] == "already_authenticated"
        frame = await c.request_frame(
            "login", workspace="acme", handle="mia", password="correct horse battery staple"
        )
        assert frame["code"] == "already_authenticated"
        # Still the same user, still usable.
        await c.request("ping")
        assert c.session["user"]["handle"] == "max"
        await check()


# --------------------------------------------------------------------------- flood


async def test_flood_is_rate_limited_then_closed(tmp_path: Path) -> None:
    async with (
        running_node(
            sqlite_path=str(tmp_path / "f.db"), rate_limit_per_10s=5, rate_limit_disconnect_after=3
        ) as node,
        bystanders(node) as check,
        node.client("max") as c,
    ):
        assert c.hello["limits"]["requests_per_10s"] == 5
        # The auth took one token: 4 pings pass, then 3 refusals are tolerated.
        for i in range(7):
            await c.send_raw(json.dumps({"type": "ping", "id": f"p{i}"}))
        await wait_for(lambda: len(c.errors) >= 3)
        assert [e["code"] for e in c.errors] == ["rate_limited"] * 3
        for e in c.errors:
            assert isinstance(e["retry_after_ms"], int)
            assert 0 < e["retry_after_ms"] <= 10_000
        await wait_for(lambda: c.events.qsize() >= 4)
        replies = [e["reply_to"] for e in c.drain_events() if e["type"] == "reply"]
        assert replies == ["p0", "p1", "p2", "p3"]
        assert not c.closed.is_set()
        # Keep flooding: the connection is closed.
        with contextlib.suppress(ConnectionClosed):
            for i in range(7, 20):
                await c.send_raw(json.dumps({"type": "ping", "id": f"p{i}"}))
        assert await closed(c) == (1008, "rate_limited")
        await check()


async def test_rate_limited_error_names_the_request(tmp_path: Path) -> None:
    # docs/protocol.md: "The server answers each request with exactly one frame", an error's
    # reply_to being "the request's id"; only unparseable frames get reply_to null. A refused
    # request must be matchable, or Client.request() waits for an answer that never comes.
    async with (
        running_node(
            sqlite_path=str(tmp_path / "r.db"), rate_limit_per_10s=2, rate_limit_disconnect_after=5
        ) as node,
        node.client("max") as c,
    ):
        await c.request("ping", id="ok")
        frame = await c.request_frame("ping", id="over", timeout=scaled(2))
        assert frame["type"] == "error"
        assert frame["code"] == "rate_limited"
        assert frame["reply_to"] == "over"
        assert frame["retry_after_ms"] > 0


# --------------------------------------------------------------------------- in-flight ids


async def test_duplicate_in_flight_request_id(node: RunningNode) -> None:
    async with bystanders(node) as check, node.client("max") as c:
        history = json.dumps({"type": "messages.history", "id": "dup", "channel_id": node.general})
        ping = json.dumps({"type": "ping", "id": "dup"})
        await c.send_raw(history)
        await c.send_raw(ping)

        seen: list[dict[str, Any]] = []

        def answers() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            seen.extend(c.drain_events())  # replies with no pending request land here
            replies = [e for e in seen if e.get("reply_to") == "dup"]
            errors = [e for e in c.errors if e.get("reply_to") == "dup"]
            return replies, errors

        await wait_for(lambda: len(answers()[0]) >= 1)
        await c.request("ping")  # later frames are answered after these two
        await c.request("messages.history", channel_id=node.general)
        replies, errors = answers()
        assert len(replies) == 1
        assert "messages" in replies[0]["data"]  # the first request was the one served
        assert [e["code"] for e in errors] == ["duplicate_request_id"]
        # Once answered, the id may be used again.
        assert (await c.request_frame("ping", id="dup"))["type"] == "reply"
        await check()


# --------------------------------------------------------------------------- origins


async def test_foreign_origin_is_refused_403(node: RunningNode) -> None:
    async with bystanders(node) as check:
        with pytest.raises(InvalidStatus) as info:
            async with Client.connect(node.url, origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403
        await check()


async def test_no_origin_is_accepted(node: RunningNode) -> None:
    async with Client.connect(node.url, node.tokens["max"]) as c:
        assert c.session["user"]["handle"] == "max"


async def test_allowed_origin_is_accepted(tmp_path: Path) -> None:
    async with running_node(
        sqlite_path=str(tmp_path / "o.db"), allowed_origins=["https://chat.example"]
    ) as node:
        async with Client.connect(node.url, node.tokens["max"], origin="https://chat.example") as c:
            await c.request("ping")
        async with Client.connect(node.url, node.tokens["max"]) as c:
            await c.request("ping")
        with pytest.raises(InvalidStatus) as info:
            async with Client.connect(node.url, origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403


# --------------------------------------------------------------------------- HTTP probes


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(scaled(5)):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_http_probes(node: RunningNode) -> None:
    async with node.client("max"):
        status, body = await http_get(node.node.port, "/healthz")
        assert status == 200
        status, body = await http_get(node.node.port, "/readyz")
        assert status == 200
        status, _ = await http_get(node.node.port, "/metrics")
        assert status == 404  # never on the client port (defect 16)
        assert node.node.metrics_port is not None
        status, body = await http_get(node.node.metrics_port, "/metrics")
        assert status == 200
        text = body.decode()
        assert "chat_connections" in text
        assert "chat_frames_out" in text
        connections = [
            float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("chat_connections ")
        ]
        assert connections and connections[0] >= 1


# =========================================================================== issue 6: strict input
#
# Defects 16a, 17, 18 and 19 of issue 6. Unit tests drive the wire models and the sans-I/O
# ClientProtocol (no sockets); the node tests prove the same on both stores, with the log
# free of errors and the connection still serving.

_MAX = 2**63 - 1
_ALL_CLIENT_TYPES = sorted(wire.frame_types(wire.ClientFrame))


def _frame(type_: str, **overrides: Any) -> dict[str, Any]:
    """The first documented example of ``type_`` (a valid frame), with ``overrides``."""
    example = dict(wire.frame_types(wire.ClientFrame)[type_].examples[0])
    example.update(overrides)
    return example


def _opened() -> ClientProtocol:
    p = ClientProtocol(now=0.0)
    assert isinstance(p.receive(json.dumps(_frame("auth")), 0.0), Authenticate)
    p.authenticated()
    return p


def _refusal(verdict: Verdict) -> dict[str, Any]:
    assert isinstance(verdict, Send), verdict
    error: dict[str, Any] = json.loads(verdict.frame)
    assert error["type"] == "error"
    return error


def _nested(depth: int, id_: str = "deep") -> str:
    """A ping whose extra field holds arrays nested so that the frame is ``depth`` deep."""
    inner = depth - 1  # the frame object is the first level
    return f'{{"type": "ping", "id": "{id_}", "pad": ' + "[" * inner + "]" * inner + "}"


# (type, field overrides, field named in the error). Every client frame type appears in both
# tables (test_defect_18_19_tables_cover_every_client_frame_type).
WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("auth", {"token": 5}, "token"),
    ("auth", {"resume": {"session_id": "s", "seq": 1.0}}, "resume.seq"),
    ("login", {"password": True}, "password"),
    ("ping", {"id": 7}, "id"),
    ("users.list", {"cursor": "0"}, "cursor"),
    ("users.list", {"limit": 10.0}, "limit"),
    ("users.info", {"user_ids": [True]}, "user_ids.0"),
    ("users.update_profile", {"display_name": 5}, "display_name"),
    ("users.set_role", {"user_id": True}, "user_id"),
    ("users.deactivate", {"user_id": 3.0}, "user_id"),
    ("sessions.revoke", {"all": "yes"}, "all"),
    ("sessions.revoke", {"all": 1}, "all"),
    ("channels.create", {"private": "yes"}, "private"),
    ("channels.create", {"private": 1}, "private"),
    ("channels.update", {"channel_id": "4"}, "channel_id"),
    ("channels.archive", {"channel_id": True}, "channel_id"),
    ("channels.unarchive", {"channel_id": 4.0}, "channel_id"),
    ("channels.join", {"channel_id": [4]}, "channel_id"),
    ("channels.leave", {"channel_id": None}, "channel_id"),
    ("channels.invite", {"user_ids": ["5"]}, "user_ids.0"),
    ("channels.remove", {"user_id": 5.5}, "user_id"),
    ("channels.list", {"member_only": "true"}, "member_only"),
    ("channels.info", {"channel_id": True}, "channel_id"),
    ("channels.members", {"limit": True}, "limit"),
    ("dms.open", {"user_ids": 3}, "user_ids"),
    ("messages.post", {"channel_id": True}, "channel_id"),
    ("messages.post", {"channel_id": 4.0}, "channel_id"),
    ("messages.edit", {"text": ["x"]}, "text"),
    ("messages.delete", {"message_id": "40"}, "message_id"),
    ("messages.history", {"before": 1.0}, "before"),
    ("messages.replies", {"after": False}, "after"),
    ("reactions.add", {"emoji": 1}, "emoji"),
    ("reactions.remove", {"message_id": {"id": 40}}, "message_id"),
    ("reads.mark", {"seq": "118"}, "seq"),
    ("reads.counts", {"id": 29}, "id"),
    ("typing", {"thread_root_id": True}, "thread_root_id"),
    ("presence.subscribe", {"user_ids": [2.0]}, "user_ids.0"),
    ("presence.set", {"status": True}, "status"),
    ("bootstrap", {"parts": "channels"}, "parts"),
    ("users.autocomplete", {"query": 5}, "query"),
    ("users.autocomplete", {"limit": 5.0}, "limit"),
    ("channels.autocomplete", {"query": None}, "query"),
    ("setup", {"workspace": 1}, "workspace"),
    ("setup", {"display_name": ["Ada"]}, "display_name"),
    ("signup", {"invite": 5}, "invite"),
    ("signup", {"password": None}, "password"),
    ("invites.create", {"max_uses": 1.0}, "max_uses"),
    ("invites.create", {"role": 1}, "role"),
    ("invites.list", {"id": 45}, "id"),
    ("invites.revoke", {"invite_id": "3"}, "invite_id"),
]

OUT_OF_RANGE: list[tuple[str, dict[str, Any], str]] = [
    ("auth", {"resume": {"session_id": "s", "seq": 2**64}}, "resume.seq"),
    ("auth", {"token": "t" * 4097}, "token"),
    ("login", {"workspace": ""}, "workspace"),
    ("login", {"handle": "h" * 81}, "handle"),
    ("ping", {"id": "i" * 65}, "id"),
    ("users.list", {"cursor": 2**64}, "cursor"),
    ("users.list", {"limit": 1001}, "limit"),
    ("users.info", {"user_ids": []}, "user_ids"),
    ("users.info", {"user_ids": list(range(1, 1002))}, "user_ids"),
    ("users.info", {"user_ids": [0]}, "user_ids.0"),
    ("users.update_profile", {"tz": "z" * 65}, "tz"),
    ("users.update_profile", {"avatar_url": "https://a.example/" + "x" * 500}, "avatar_url"),
    ("users.set_role", {"user_id": _MAX + 1}, "user_id"),
    ("users.deactivate", {"user_id": 0}, "user_id"),
    ("sessions.revoke", {"user_id": -1}, "user_id"),
    ("channels.create", {"name": "n" * 81}, "name"),
    ("channels.create", {"topic": "t" * 251}, "topic"),
    ("channels.update", {"channel_id": 2**64}, "channel_id"),
    ("channels.archive", {"channel_id": 0}, "channel_id"),
    ("channels.unarchive", {"channel_id": -5}, "channel_id"),
    ("channels.join", {"channel_id": _MAX + 1}, "channel_id"),
    ("channels.leave", {"channel_id": 0}, "channel_id"),
    ("channels.invite", {"user_ids": list(range(1, 1002))}, "user_ids"),
    ("channels.remove", {"user_id": 2**64}, "user_id"),
    ("channels.list", {"cursor": -1}, "cursor"),
    ("channels.info", {"channel_id": 2**64}, "channel_id"),
    ("channels.members", {"limit": 1001}, "limit"),
    ("dms.open", {"user_ids": list(range(2, 10))}, "user_ids"),
    ("messages.post", {"client_msg_id": "c" * 65}, "client_msg_id"),
    ("messages.post", {"text": ""}, "text"),
    ("messages.post", {"text": "x" * (wire.MAX_TEXT_WIRE_CHARS + 1)}, "text"),
    ("messages.edit", {"message_id": 2**64}, "message_id"),
    ("messages.delete", {"message_id": 0}, "message_id"),
    ("messages.history", {"around": 2**64}, "around"),
    ("messages.history", {"limit": 201}, "limit"),
    ("messages.replies", {"after": -1}, "after"),
    ("messages.replies", {"limit": 0}, "limit"),
    ("reactions.add", {"emoji": "e" * 65}, "emoji"),
    ("reactions.remove", {"emoji": "Tada!"}, "emoji"),
    ("reads.mark", {"seq": _MAX + 1}, "seq"),
    ("reads.counts", {"id": ""}, "id"),
    ("typing", {"thread_root_id": 0}, "thread_root_id"),
    ("presence.subscribe", {"user_ids": list(range(1, 502))}, "user_ids"),
    ("presence.set", {"status": "busy"}, "status"),
    ("bootstrap", {"parts": []}, "parts"),
    ("bootstrap", {"parts": ["everything"]}, "parts.0"),
    ("users.autocomplete", {"query": "q" * 81}, "query"),
    ("users.autocomplete", {"limit": 51}, "limit"),
    ("users.autocomplete", {"channel_id": 0}, "channel_id"),
    ("channels.autocomplete", {"limit": 0}, "limit"),
    ("setup", {"workspace": ""}, "workspace"),
    ("setup", {"password": "p" * 1025}, "password"),
    ("signup", {"invite": ""}, "invite"),
    ("signup", {"invite": "i" * 129}, "invite"),
    ("signup", {"handle": "h" * 81}, "handle"),
    ("invites.create", {"role": "admin"}, "role"),
    ("invites.create", {"max_uses": 0}, "max_uses"),
    ("invites.create", {"max_uses": 1001}, "max_uses"),
    ("invites.create", {"expires_in_s": 59}, "expires_in_s"),
    ("invites.create", {"expires_in_s": 30 * 24 * 3600 + 1}, "expires_in_s"),
    ("invites.list", {"id": ""}, "id"),
    ("invites.revoke", {"invite_id": 0}, "invite_id"),
]


def test_defect_18_19_tables_cover_every_client_frame_type() -> None:
    assert sorted({t for t, _, _ in WRONG_TYPES}) == _ALL_CLIENT_TYPES
    assert sorted({t for t, _, _ in OUT_OF_RANGE}) == _ALL_CLIENT_TYPES


@pytest.mark.parametrize("type_", _ALL_CLIENT_TYPES)
def test_defect_18_19_every_example_is_accepted(type_: str) -> None:
    """The baseline of both tables: each frame, unmodified, validates."""
    wire.parse_client_frame(json.dumps(_frame(type_)))


def _refused_as_invalid_frame(frame: dict[str, Any], field: str) -> None:
    error = _refusal(_opened().receive(json.dumps(frame), 0.0))
    assert error["code"] == "invalid_frame", error
    rid = frame["id"] if isinstance(frame["id"], str) and 0 < len(frame["id"]) <= 64 else None
    assert error["reply_to"] == rid
    assert error["message"].startswith(f"{field}:"), error


@pytest.mark.parametrize(
    ("type_", "overrides", "field"), WRONG_TYPES, ids=[f"{t}-{f}" for t, _, f in WRONG_TYPES]
)
def test_defect_18_wrong_types_are_refused_not_converted(
    type_: str, overrides: dict[str, Any], field: str
) -> None:
    _refused_as_invalid_frame(_frame(type_, **overrides), field)


@pytest.mark.parametrize(
    ("type_", "overrides", "field"), OUT_OF_RANGE, ids=[f"{t}-{f}" for t, _, f in OUT_OF_RANGE]
)
def test_defect_19_out_of_range_values_are_refused(
    type_: str, overrides: dict[str, Any], field: str
) -> None:
    _refused_as_invalid_frame(_frame(type_, **overrides), field)


@pytest.mark.parametrize(
    ("type_", "overrides"),
    [
        ("users.list", {"cursor": _MAX}),
        ("channels.info", {"channel_id": _MAX}),
        ("messages.history", {"before": _MAX, "limit": 200}),
        ("reads.mark", {"seq": _MAX}),
        ("auth", {"resume": {"session_id": "s", "seq": _MAX}}),
        ("messages.post", {"text": "tab\there\r\nnew line"}),
    ],
)
def test_defect_19_values_at_the_bounds_are_accepted(type_: str, overrides: dict[str, Any]) -> None:
    wire.parse_client_frame(json.dumps(_frame(type_, **overrides)))


def _string_fields(type_: str) -> list[tuple[str, str]]:
    """Fields of ``type_`` (other than ``type``) that accept a plain string, each with a
    string it accepts."""
    model = wire.frame_types(wire.ClientFrame)[type_]
    out = []
    for name in model.model_fields:
        for sample in ("ok", "https://ok.example/ok"):
            if name != "type" and _accepts(_frame(type_, **{name: sample})):
                out.append((name, sample))
                break
    return out


def _accepts(frame: dict[str, Any]) -> bool:
    try:
        wire.parse_client_frame(json.dumps(frame))
    except pydantic.ValidationError:
        return False
    return True


_STRING_FIELDS = [(t, f, v) for t in _ALL_CLIENT_TYPES for f, v in _string_fields(t)]


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f"])
@pytest.mark.parametrize(
    ("type_", "field", "sample"), _STRING_FIELDS, ids=[f"{t}-{f}" for t, f, _ in _STRING_FIELDS]
)
def test_defect_19_control_characters_are_refused_in_every_string(
    type_: str, field: str, sample: str, char: str
) -> None:
    frame = _frame(type_, **{field: sample[:-1] + char + sample[-1]})
    with pytest.raises(pydantic.ValidationError) as info:
        wire.parse_client_frame(json.dumps(frame))
    assert [e["loc"][1:] for e in info.value.errors()] == [(field,)]


def test_defect_19_control_characters_are_refused_in_nested_strings() -> None:
    frame = _frame("auth", resume={"session_id": "s\x00", "seq": 1})
    with pytest.raises(pydantic.ValidationError, match="control character"):
        wire.parse_client_frame(json.dumps(frame))


def test_defect_19_string_field_discovery_is_not_vacuous() -> None:
    fields = {(t, f) for t, f, _ in _STRING_FIELDS}
    assert {("messages.post", "text"), ("users.update_profile", "avatar_url")} <= fields
    assert ("reactions.add", "emoji") in fields
    assert len({t for t, _ in fields}) == len(_ALL_CLIENT_TYPES)  # every frame has an id


def _unbounded(node: Any, defs: dict[str, Any], path: str) -> list[str]:
    """Paths of strings without maxLength, arrays without maxItems, integers without a
    maximum, in a client frame's JSON schema."""
    if not isinstance(node, dict):
        return []
    if "$ref" in node:
        return _unbounded(defs[node["$ref"].removeprefix("#/$defs/")], defs, path)
    out: list[str] = []
    for branch in node.get("anyOf", []):
        out += _unbounded(branch, defs, path)
    kind = node.get("type")
    if kind == "string" and "maxLength" not in node and "enum" not in node and "const" not in node:
        out.append(path)
    if kind == "integer" and "maximum" not in node:
        out.append(path)
    if kind == "array":
        if "maxItems" not in node:
            out.append(path)
        out += _unbounded(node.get("items"), defs, path + "[]")
    for name, prop in node.get("properties", {}).items():
        out += _unbounded(prop, defs, f"{path}.{name}")
    return out


@pytest.mark.parametrize("type_", _ALL_CLIENT_TYPES)
def test_defect_19_every_client_string_list_and_integer_is_bounded(type_: str) -> None:
    schema = wire.frame_types(wire.ClientFrame)[type_].model_json_schema()
    assert _unbounded(schema, schema.get("$defs", {}), type_) == []


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        " javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "vbscript:msgbox(1)",
        "ftp://files.example/a.png",
        "//cdn.example/a.png",
        "/avatars/a.png",
        "http://",
        "https:///path-only",
        "https://a.example/a b.png",
        "https://a.example/" + "x" * 500,
    ],
)
def test_defect_16a_avatar_url_must_be_absolute_http_or_https(url: str) -> None:
    _refused_as_invalid_frame(_frame("users.update_profile", avatar_url=url), "avatar_url")


@pytest.mark.parametrize(
    "url", ["", "https://a.example/a.png", "http://a.example:8080/u/1?s=64", "HTTPS://A.EXAMPLE/"]
)
def test_defect_16a_http_and_https_avatar_urls_and_empty_are_accepted(url: str) -> None:
    frame = wire.parse_client_frame(json.dumps(_frame("users.update_profile", avatar_url=url)))
    assert isinstance(frame, wire.UsersUpdateProfile)
    assert frame.avatar_url == url


@pytest.mark.parametrize("depth", [33, 201, 1100, 100_000])
def test_defect_17_deep_json_is_invalid_json_without_recursion(depth: int) -> None:
    # Before: json.loads in the id recovery raised RecursionError (1011, traceback).
    data = _nested(depth)
    opened = _refusal(_opened().receive(data, 0.0))
    assert (opened["code"], opened["reply_to"]) == ("invalid_json", None)
    assert "nested deeper than 32 levels" in opened["message"]
    before_auth = ClientProtocol(now=0.0).receive(data, 0.0)
    assert isinstance(before_auth, Close)
    assert (before_auth.code, before_auth.reason) == (CloseCode.POLICY_VIOLATION, "invalid_json")
    assert wire.frame_id(data) is None


def test_defect_17_depth_32_is_read_and_judged_on_its_fields() -> None:
    error = _refusal(_opened().receive(_nested(32), 0.0))
    assert (error["code"], error["reply_to"]) == ("invalid_frame", "deep")
    assert error["message"].startswith("pad:")


@pytest.mark.parametrize("tail", ["[" * 100_000, "{" * 100_000, '{"a":' * 50_000])
def test_defect_17_deep_unterminated_json_is_invalid_json(tail: str) -> None:
    error = _refusal(_opened().receive('{"type": "ping", "id": "u", "pad": ' + tail, 0.0))
    assert (error["code"], error["reply_to"]) == ("invalid_json", None)


def test_defect_17_rate_limited_deep_frame_is_refused_without_recursion() -> None:
    # A refused (rate-limited) frame is read only for its id: a deep one has none.
    p = ClientProtocol(now=0.0, requests_per_10s=1, disconnect_after=5)
    assert isinstance(p.receive(json.dumps(_frame("auth")), 0.0), Authenticate)
    p.authenticated()
    error = _refusal(p.receive(_nested(100_000), 0.0))
    assert (error["code"], error["reply_to"]) == ("rate_limited", None)
    error = _refusal(p.receive(json.dumps(_frame("ping", id="named")), 0.0))
    assert (error["code"], error["reply_to"]) == ("rate_limited", "named")


# --------------------------------------------------------------------------- the same, on a node


@contextlib.contextmanager
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Bad input is the client's problem: nothing at ERROR, no traceback, in the log."""
    with caplog.at_level(logging.WARNING):
        yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# 8,000 levels is as deep as a frame gets under the default 16 KiB limit.
@pytest.mark.parametrize("depth", [33, 1100, 8000])
async def test_defect_17_deeply_nested_json_is_invalid_json_not_1011(
    node: RunningNode, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    with no_errors_logged(caplog):
        async with bystanders(node) as check:
            async with node.client("max") as c:
                errors = await raw_then_ping(c, _nested(depth))
                assert [(e["code"], e["reply_to"]) for e in errors] == [("invalid_json", None)]
            async with Client.connect(node.url) as c:  # before auth: the first frame
                await c.send_raw(_nested(depth))
                assert await closed(c) == (1008, "invalid_json")
                assert [e["code"] for e in c.errors] == ["invalid_json"]
            await check()


@pytest.mark.parametrize(
    ("type_", "fields", "field"),
    [
        ("messages.history", {"channel_id": True}, "channel_id"),
        ("messages.history", {"channel_id": 1.0}, "channel_id"),
        ("channels.info", {"channel_id": True}, "channel_id"),
        ("channels.create", {"name": "yes-private", "private": "yes"}, "private"),
        ("sessions.revoke", {"all": 1}, "all"),
        ("users.list", {"limit": 2.0}, "limit"),
    ],
)
async def test_defect_18_wrong_types_are_invalid_frame_on_a_node(
    node: RunningNode,
    caplog: pytest.LogCaptureFixture,
    type_: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    with no_errors_logged(caplog):
        async with bystanders(node) as check, node.client("max") as c:
            frame = await c.request_frame(type_, id="wt-1", **fields)
            assert (frame["type"], frame["code"], frame["reply_to"]) == (
                "error",
                "invalid_frame",
                "wt-1",
            )
            assert frame["message"].startswith(f"{field}:")
            listed = await c.request("channels.list", member_only=True)
            assert "yes-private" not in {ch["name"] for ch in listed["channels"]}
            await check()


@pytest.mark.parametrize(
    ("type_", "fields", "field"),
    [
        ("users.list", {"cursor": 2**64}, "cursor"),
        ("channels.list", {"cursor": _MAX + 1}, "cursor"),
        ("channels.members", {"cursor": 2**64}, "cursor"),
        ("messages.history", {"before": 2**64}, "before"),
        ("messages.replies", {"message_id": 2**64}, "message_id"),
        ("reads.mark", {"seq": 2**64}, "seq"),
        ("users.info", {"user_ids": [2**64]}, "user_ids.0"),
        ("messages.post", {"client_msg_id": "nul", "text": "a\x00b"}, "text"),
        ("messages.post", {"client_msg_id": "n\x00l", "text": "ab"}, "client_msg_id"),
        ("channels.update", {"topic": "t\x00"}, "topic"),
        ("users.update_profile", {"display_name": "M\x00x"}, "display_name"),
    ],
)
async def test_defect_19_out_of_range_values_and_nul_are_invalid_frame_on_both_stores(
    node: RunningNode,
    caplog: pytest.LogCaptureFixture,
    type_: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    # Before: 2**64 reached the database (internal_error and a traceback per request), and
    # NUL was stored by SQLite but internal_error on PostgreSQL.
    targets = {"channel_id": node.general, "message_id": 1}
    base = {
        k: v
        for k, v in targets.items()
        if k in wire.frame_types(wire.ClientFrame)[type_].model_fields
    }
    with no_errors_logged(caplog):
        async with bystanders(node) as check, node.client("max") as c:
            frame = await c.request_frame(type_, id="oor-1", **{**base, **fields})
            assert (frame["type"], frame["code"], frame["reply_to"]) == (
                "error",
                "invalid_frame",
                "oor-1",
            )
            assert frame["message"].startswith(f"{field}:")
            await c.request("ping")
            await check()


async def test_defect_19_largest_integers_are_served_not_internal_error(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    with no_errors_logged(caplog):
        async with node.client("max") as c:
            page = await c.request("users.list", cursor=_MAX)
            assert page["users"] == []
            history = await c.request("messages.history", channel_id=node.general, before=_MAX)
            assert isinstance(history["messages"], list)
            frame = await c.request_frame("channels.info", channel_id=_MAX)
            assert (frame["type"], frame["code"]) == ("error", "channel_not_found")


async def test_defect_16a_avatar_url_javascript_is_refused_https_is_kept(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    with no_errors_logged(caplog):
        async with node.client("max") as c:
            frame = await c.request_frame(
                "users.update_profile", id="av-1", avatar_url="javascript:alert(document.cookie)"
            )
            assert (frame["type"], frame["code"], frame["reply_to"]) == (
                "error",
                "invalid_frame",
                "av-1",
            )
            assert frame["message"].startswith("avatar_url:")
            url = "https://avatars.example/max.png"
            updated = await c.request("users.update_profile", avatar_url=url)
            assert updated["user"]["avatar_url"] == url
            cleared = await c.request("users.update_profile", avatar_url="")
            assert cleared["user"]["avatar_url"] == ""
