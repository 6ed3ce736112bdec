"""The envelope every event travels in, and the bus interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event, serialized once (``payload`` is the complete frame), and who receives it.

    Recipients are the union of: the members of ``channel_id``, ``user_ids``, the whole
    workspace when ``everyone``, and connections subscribed to the presence of
    ``presence_of``, less ``exclude_user`` (a typist does not see itself).

    ``joins`` become members of ``channel_id`` before delivery and ``leaves`` stop being
    members after it: a joiner sees its own join, a leaver its own leave, and nothing
    after. ``revoke_user``/``revoke_session`` close matching connections after delivery.
    """

    workspace_id: int
    seq: int | None
    type: str
    payload: bytes
    channel_id: int | None = None
    user_ids: frozenset[int] = frozenset()
    everyone: bool = False
    presence_of: int | None = None
    joins: tuple[int, ...] = ()
    leaves: tuple[int, ...] = ()
    revoke_user: int | None = None
    revoke_session: str | None = None
    exclude_user: int | None = None
    droppable: bool = field(default=False)

    @property
    def audience(self) -> str:
        """Compact description of the audience, stored with the event for replay."""
        parts = []
        if self.everyone:
            parts.append("w")
        if self.channel_id is not None:
            parts.append(f"c:{self.channel_id}")
        if self.user_ids:
            parts.append("u:" + ",".join(map(str, sorted(self.user_ids))))
        return ";".join(parts)


Subscriber = Callable[[Sequence[Envelope]], None]


class Bus(Protocol):
    """Carries envelopes to every node's subscriber, per workspace, in ``seq`` order."""

    async def publish(self, envelopes: Sequence[Envelope]) -> None: ...

    def subscribe(self, workspace_id: int, subscriber: Subscriber) -> None: ...

    def unsubscribe(self, workspace_id: int, subscriber: Subscriber) -> None: ...

    async def close(self) -> None: ...
