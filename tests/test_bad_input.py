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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat.auth import issue_token
from chat.client import Client
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
        status, body = await http_get(node.node.port, "/metrics")
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
