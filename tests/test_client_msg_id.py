"""``client_msg_id`` is the idempotency key of ``messages.post``, per channel and user
(defect 7), against both stores through a real node."""

from __future__ import annotations

import pytest

from chat.client import RequestError
from tests.harness import RunningNode


async def test_defect_07_client_msg_id_is_scoped_to_the_channel(node: RunningNode) -> None:
    async with node.clients("olivia", "mia") as (olivia, mia):
        private = await mia.request(
            "messages.post", channel_id=node.private, client_msg_id="k1", text="secret plan"
        )
        # Mia leaves the private channel; reactions come after she is gone.
        await olivia.request("channels.remove", channel_id=node.private, user_id=node.users["mia"])
        await olivia.request("reactions.add", message_id=private["message"]["id"], emoji="eyes")

        # The same key in another channel is another message, not the private one.
        public = await mia.request(
            "messages.post", channel_id=node.general, client_msg_id="k1", text="hello"
        )
        assert public["duplicate"] is False
        assert public["message"]["channel_id"] == node.general
        assert public["message"]["text"] == "hello"
        assert public["message"]["id"] != private["message"]["id"]

        # A retry in the same channel with the same content is the original.
        again = await mia.request(
            "messages.post", channel_id=node.general, client_msg_id="k1", text="hello"
        )
        assert again["duplicate"] is True and again["message"] == public["message"]

        # The same key with other content is refused, not answered with the original.
        with pytest.raises(RequestError) as refused:
            await mia.request(
                "messages.post", channel_id=node.general, client_msg_id="k1", text="other"
            )
        assert refused.value.code == "duplicate_client_msg_id"
        with pytest.raises(RequestError) as threaded:
            await mia.request(
                "messages.post",
                channel_id=node.general,
                client_msg_id="k1",
                text="hello",
                thread_root_id=public["message"]["id"],
            )
        assert threaded.value.code == "duplicate_client_msg_id"

        # A retry into the channel she left passes the membership check first.
        with pytest.raises(RequestError) as gone:
            await mia.request(
                "messages.post", channel_id=node.private, client_msg_id="k1", text="secret plan"
            )
        assert gone.value.code in ("channel_not_found", "not_in_channel")
