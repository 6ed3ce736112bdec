"""The Python client library against a real node: what it puts on the wire."""

from __future__ import annotations

from chat.client import encode
from tests.harness import RunningNode


def test_defect_24_frames_are_compact_utf8_not_ascii_escaped() -> None:
    frame = {"type": "messages.post", "id": "1", "text": "é" * 3}
    assert encode(frame) == '{"type":"messages.post","id":"1","text":"ééé"}'


async def test_defect_24_a_long_non_ascii_message_fits_the_frame_limit(node: RunningNode) -> None:
    # 3,000 characters is legal (limit 4,000); ASCII-escaped it would be 18,000 bytes, over
    # the 16 KiB frame limit (close 1009). As UTF-8 it is about 6,000.
    text = "é" * 3000
    async with node.clients("mia", "olivia") as (mia, olivia):
        reply = await mia.post(node.general, text)
        assert reply["message"]["text"] == text
        event = await olivia.next_event("message.posted")
        assert event["message"]["text"] == text
        assert mia.closed.is_set() is False
