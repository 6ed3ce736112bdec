"""Resume on one node, both stores: a reconnecting client gets exactly what it missed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chat.client import Client
from tests.harness import RunningNode, running_node


async def auth_resume(node: RunningNode, handle: str, session_id: str, seq: int) -> Client:
    """Connect and send auth with resume by hand (the Client's connect() sends a plain auth)."""
    cm = Client.connect(node.url)
    client = await cm.__aenter__()
    client._cm = cm  # type: ignore[attr-defined]
    client.session = await client.request(
        "auth", token=node.tokens[handle], resume={"session_id": session_id, "seq": seq}
    )
    return client


async def close(client: Client) -> None:
    await client._cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def until_resumed(client: Client) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    events = []
    while True:
        event = await client.next_event()
        if event["type"] == "resumed":
            return events, event
        events.append(event)


async def post(c: Client, channel: int, text: str) -> dict[str, Any]:
    reply = await c.request("messages.post", channel_id=channel, client_msg_id=text, text=text)
    return reply["message"]  # type: ignore[no-any-return]


async def test_resume_replays_exactly_the_missed_events(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        session_id, seen = mia.session["session_id"], mia.session["seq"]
        await post(mia, node.general, "before")
        last = (await mia.next_event("message.posted"))["seq"]
    async with node.client("olivia") as olivia:
        missed = [await post(olivia, node.general, f"m{i}") for i in range(5)]
        secret = await post(olivia, node.private, "private")
    mia = await auth_resume(node, "mia", session_id, last)
    try:
        assert mia.session["resumed"] is True and mia.session["resume_error"] is None
        events, marker = await until_resumed(mia)
        posted = [e for e in events if e["type"] == "message.posted"]
        assert [e["message"]["id"] for e in posted] == [m["id"] for m in [*missed, secret]]
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)) and seqs[0] > last > seen
        assert marker["replayed"] == len(events)
        # And live again.
        async with node.client("olivia") as olivia:
            live = await post(olivia, node.general, "live")
        assert (await mia.next_event("message.posted"))["message"]["id"] == live["id"]
    finally:
        await close(mia)


async def test_resume_respects_membership_at_each_event(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        session_id, seq = mia.session["session_id"], mia.session["seq"]
    async with node.client("olivia") as olivia:
        before = await post(olivia, node.private, "while-member")
        await olivia.request("channels.remove", channel_id=node.private, user_id=node.users["mia"])
        await post(olivia, node.private, "after-removal")
    mia = await auth_resume(node, "mia", session_id, seq)
    try:
        events, _ = await until_resumed(mia)
        texts = [e["message"]["text"] for e in events if e["type"] == "message.posted"]
        assert texts == [before["text"]]
        left = [e for e in events if e["type"] == "channel.member_left"]
        assert [e["user_id"] for e in left] == [node.users["mia"]]
    finally:
        await close(mia)


async def test_resume_refusals_are_explicit(node: RunningNode) -> None:
    async with node.client("mia") as mia:
        session_id, seq = mia.session["session_id"], mia.session["seq"]
    future = await auth_resume(node, "mia", session_id, seq + 1000)
    assert future.session["resumed"] is False
    assert future.session["resume_error"] == "future_seq"
    await close(future)
    foreign = await auth_resume(node, "mia", "s_not_mine", seq)
    assert foreign.session["resume_error"] == "session_mismatch"
    # Refused resumes still authenticate: the client reloads state and goes on live.
    async with node.client("olivia") as olivia:
        live = await post(olivia, node.general, "after-refusal")
    assert (await foreign.next_event("message.posted"))["message"]["id"] == live["id"]
    await close(foreign)


async def test_resume_outside_the_window_is_too_old(tmp_path: Path) -> None:
    async with running_node(
        sqlite_path=str(tmp_path / "w.db"), replay_max_events=3, replay_window_s=0
    ) as node:
        async with node.client("mia") as mia:
            session_id, seq = mia.session["session_id"], mia.session["seq"]
        async with node.client("olivia") as olivia:
            for i in range(5):
                await post(olivia, node.general, f"m{i}")
        old = await auth_resume(node, "mia", session_id, seq)
        assert old.session["resumed"] is False
        assert old.session["resume_error"] == "too_old"
        assert json.dumps(old.drain_events()).count("message.posted") == 0
        await close(old)
        # Within the last 3 events it still works.
        recent = await auth_resume(node, "mia", session_id, old.session["seq"] - 2)
        assert recent.session["resumed"] is True
        events, marker = await until_resumed(recent)
        assert marker["replayed"] == len(events) == 2
        await close(recent)
