"""Security regressions of issue 6: who receives channel metadata (defect 12), login limits
(defect 13) and where the signing secret lives (defect 14). Integration tests run a real node
on both stores; the limiter and the secret file also have unit tests without sockets."""

from __future__ import annotations

import itertools
from typing import Any

from chat.client import Client
from tests.harness import RunningNode
from tests.timing import scaled

OWNER, GUEST = "olivia", "gus"
_barriers = (f"barrier-{i}" for i in itertools.count())


async def events_until_barrier(node: RunningNode, olivia: Client, gus: Client) -> list[Any]:
    """gus's events up to a message olivia posts in general (gus is a member there): events
    arrive in order, so anything meant for gus before it has arrived by then."""
    barrier = await olivia.request(
        "messages.post", channel_id=node.general, client_msg_id=next(_barriers), text="barrier"
    )
    seen: list[Any] = []
    while True:
        event = await gus.next_event(timeout=scaled(5))
        if event["type"] == "message.posted" and event["message"]["id"] == barrier["message"]["id"]:
            return seen
        seen.append(event)


async def test_defect_12_guest_gets_no_public_channel_metadata_until_promoted(
    node: RunningNode,
) -> None:
    async with node.clients(OWNER, GUEST) as (olivia, gus):
        created = await olivia.request(
            "channels.create", name="plans", topic="the secret plans", purpose="p"
        )
        cid = created["channel"]["id"]
        await olivia.request("channels.update", channel_id=cid, topic="still secret")
        await olivia.request("channels.archive", channel_id=cid)
        seen = await events_until_barrier(node, olivia, gus)
        leaked = [e for e in seen if e.get("channel", {}).get("id") == cid]
        assert leaked == [], leaked  # before the fix: created, updated, archived
        # The same rule as reads: to a guest the channel does not exist.
        frame = await gus.request_frame("channels.info", channel_id=cid)
        assert frame["code"] == "channel_not_found"

        await olivia.request("users.set_role", user_id=node.users[GUEST], role="member")
        promoted = await gus.next_event("user.updated", timeout=scaled(5))
        assert promoted["user"]["role"] == "member"
        await olivia.request("channels.unarchive", channel_id=cid)
        await olivia.request("channels.update", channel_id=cid, topic="now open")
        seen = await events_until_barrier(node, olivia, gus)
        kinds = [e["type"] for e in seen if e.get("channel", {}).get("id") == cid]
        assert kinds == ["channel.unarchived", "channel.updated"], seen
        info = await gus.request("channels.info", channel_id=cid)
        assert info["channel"]["topic"] == "now open"
