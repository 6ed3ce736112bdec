"""The shortest path through the system: two clients, one message, on both stores."""

from __future__ import annotations

from tests.harness import RunningNode


async def test_post_reaches_other_member(node: RunningNode) -> None:
    async with node.clients("olivia", "mia") as (olivia, mia):
        reply = await olivia.request(
            "messages.post", channel_id=node.general, client_msg_id="c1", text="hello @mia"
        )
        assert reply["duplicate"] is False
        event = await mia.next_event("message.posted")
        assert event["message"]["id"] == reply["message"]["id"]
        assert event["seq"] > mia.session["seq"]
        mention = await mia.next_event("mention")
        assert mention["message_id"] == reply["message"]["id"]
        assert mention["kind"] == "user"
