"""The envelope every event travels in, and the bus interface."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

HEADER_VERSION = 1


@dataclass(frozen=True, slots=True)
class Audience:
    """Who receives an event: the one typed description every layer passes along (handlers
    emit it, the journal stores it, the bus carries it, the hub and replay judge by it).

    Recipients are the union of: the members of ``channel_id``, ``user_ids``, the whole
    workspace when ``everyone``, every connection whose user's role is in ``roles`` (the
    roles come from ``access.POLICY``: who may read it), and connections subscribed to the
    presence of ``presence_of``, less ``exclude_user`` (a typist does not see itself).

    ``joins`` become members of ``channel_id`` before delivery and ``leaves`` stop being
    members after it: a joiner sees its own join, a leaver its own leave, and nothing
    after. ``revoke_user``/``revoke_session`` close matching connections after delivery.
    ``droppable`` events (typing, presence) may be dropped for a slow consumer.
    ``role_change`` is (user_id, old_role, new_role): the hub updates that user's
    connections before delivery, and a replay judges each event with the role of its time.
    """

    channel_id: int | None = None
    user_ids: frozenset[int] = frozenset()
    everyone: bool = False
    presence_of: int | None = None
    joins: tuple[int, ...] = ()
    leaves: tuple[int, ...] = ()
    revoke_user: int | None = None
    revoke_session: str | None = None
    exclude_user: int | None = None
    droppable: bool = False
    roles: frozenset[str] = frozenset()
    role_change: tuple[int, str, str] | None = None

    @property
    def plain(self) -> bool:
        """For a channel's members and nobody else, changing nothing: such events can be
        batched into one write per recipient."""
        return (
            self.channel_id is not None
            and not self.everyone
            and not self.user_ids
            and not self.joins
            and not self.leaves
            and self.presence_of is None
            and self.exclude_user is None
            and self.revoke_user is None
            and not self.droppable
            and not self.roles
            and self.role_change is None
        )

    def header(self) -> str:
        """Every field, compactly and versioned (``1|c5;u1,2``): stored beside the payload in
        the event log and in the Redis stream, so a replayed event is routed exactly like
        the live one."""
        parts = []
        if self.everyone:
            parts.append("w")
        if self.channel_id is not None:
            parts.append(f"c{self.channel_id}")
        if self.user_ids:
            parts.append("u" + ",".join(map(str, sorted(self.user_ids))))
        if self.presence_of is not None:
            parts.append(f"p{self.presence_of}")
        if self.joins:
            parts.append("j" + ",".join(map(str, self.joins)))
        if self.leaves:
            parts.append("l" + ",".join(map(str, self.leaves)))
        if self.revoke_user is not None:
            parts.append(
                f"r{self.revoke_user}" + (f",{self.revoke_session}" if self.revoke_session else "")
            )
        if self.exclude_user is not None:
            parts.append(f"x{self.exclude_user}")
        if self.droppable:
            parts.append("d")
        if self.roles:
            parts.append("g" + ",".join(sorted(self.roles)))
        if self.role_change is not None:
            parts.append("s" + ",".join(map(str, self.role_change)))
        return f"{HEADER_VERSION}|" + ";".join(parts)

    @classmethod
    def from_header(cls, header: str) -> Audience:
        """Parse :meth:`header`; a header without a version is version 0 (the same fields,
        written before headers were versioned)."""
        version, bar, body = header.partition("|")
        if not bar:
            version, body = "0", header
        if version not in ("0", "1"):
            raise ValueError(f"unknown audience header version {version!r}")
        fields: dict[str, Any] = {}
        for part in filter(None, body.split(";")):
            key, value = part[0], part[1:]
            if key == "w":
                fields["everyone"] = True
            elif key == "d":
                fields["droppable"] = True
            elif key == "c":
                fields["channel_id"] = int(value)
            elif key == "u":
                fields["user_ids"] = frozenset(map(int, value.split(",")))
            elif key == "p":
                fields["presence_of"] = int(value)
            elif key == "j":
                fields["joins"] = tuple(map(int, value.split(",")))
            elif key == "l":
                fields["leaves"] = tuple(map(int, value.split(",")))
            elif key == "r":
                user, _, session = value.partition(",")
                fields["revoke_user"] = int(user)
                fields["revoke_session"] = session or None
            elif key == "x":
                fields["exclude_user"] = int(value)
            elif key == "g":
                fields["roles"] = frozenset(value.split(","))
            elif key == "s":
                user, old, new = value.split(",")
                fields["role_change"] = (int(user), old, new)
            else:
                raise ValueError(f"unknown audience header field {part!r}")
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event, serialized once (``payload`` is the complete frame), and its audience.
    ``seq`` is None for ephemeral events (typing, presence)."""

    workspace_id: int
    seq: int | None
    type: str
    payload: bytes
    audience: Audience = field(default_factory=Audience)
    # Precomputed for the delivery hot path: a plain durable channel event.
    plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", self.seq is not None and self.audience.plain)

    @classmethod
    def from_header(
        cls, workspace_id: int, seq: int | None, type: str, header: str, payload: bytes
    ) -> Envelope:
        return cls(workspace_id, seq, type, payload, Audience.from_header(header))

    @classmethod
    def from_record(cls, workspace_id: int, row: Mapping[str, Any]) -> Envelope:
        """An envelope from a row of the event log (seq, type, audience, payload)."""
        payload = row["payload"]
        return cls.from_header(
            workspace_id,
            int(row["seq"]),
            row["type"],
            row["audience"],
            payload.encode() if isinstance(payload, str) else payload,
        )


Subscriber = Callable[[Sequence[Envelope]], None]


class Bus(Protocol):
    """Carries envelopes to every node's subscriber, per workspace, in ``seq`` order."""

    async def publish(self, envelopes: Sequence[Envelope]) -> None: ...

    async def subscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        """Deliver the workspace's events committed from now on (call before a snapshot)."""
        ...

    def unsubscribe(self, workspace_id: int, subscriber: Subscriber) -> None: ...

    async def close(self) -> None: ...


def raise_if_cancelling() -> None:
    """For loops that catch ``Exception`` to retry: stop if this task was cancelled, even when
    a library turned the CancelledError into an ordinary error while it disconnected (a
    swallowed cancellation made a node's shutdown wait forever on its presence loop)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
