"""Presence without sockets (defect 21): a connect costs O(1) and writes nothing by itself;
one flusher writes the changes in batches; a node id is unique by default.

The cluster side is a fake of our own :class:`chat.presence.PresenceStore` interface (it
records what the flusher asked for); the Redis implementation is exercised against a real
Redis in tests/test_scaleout.py and tests/test_cluster.py.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence

import pytest

from chat.bus import Envelope
from chat.config import Settings
from chat.presence import Delta, Presence


class RecordingStore:
    """Implements PresenceStore by recording every call."""

    def __init__(self) -> None:
        self.active: dict[int, set[int]] = {}
        self.ttl_s = 15
        self.poll_s = 2.0
        self.writes: list[dict[int, Delta]] = []
        self.keep_alives: list[dict[int, set[int]]] = []
        self.polls: list[set[int]] = []
        self.fail_next_write = False

    async def write(self, deltas: Mapping[int, Delta]) -> None:
        if self.fail_next_write:
            self.fail_next_write = False
            raise ConnectionError("redis is down")
        self.writes.append({w: Delta(set(d.added), set(d.removed)) for w, d in deltas.items()})

    async def keep_alive(self, local: Mapping[int, set[int]]) -> None:
        self.keep_alives.append({w: set(u) for w, u in local.items()})

    async def poll(self, workspaces: Collection[int]) -> None:
        self.polls.append(set(workspaces))


class NoBus:
    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.published.extend(envelopes)

    async def subscribe(self, workspace_id: int, subscriber: object) -> None: ...

    def unsubscribe(self, workspace_id: int, subscriber: object) -> None: ...

    async def close(self) -> None: ...


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def clustered() -> tuple[Presence, RecordingStore, NoBus, Clock]:
    store, bus, clock = RecordingStore(), NoBus(), Clock()
    return Presence(bus, 3.0, store, flush_s=0.25, clock=clock), store, bus, clock


async def test_defect_21_connects_write_nothing_until_one_batched_flush() -> None:
    presence, store, bus, _ = clustered()
    for user_id in range(1, 1001):
        await presence.connected(7, user_id)
    assert store.writes == [] and bus.published == []  # O(1) each: no I/O per connect
    assert presence.active_users(7) == set(range(1, 1001))
    await presence.flush()
    assert len(store.writes) == 1
    assert store.writes[0][7].added == set(range(1, 1001)) and not store.writes[0][7].removed
    await presence.flush()
    assert len(store.writes) == 1  # nothing changed since: nothing written


async def test_defect_21_a_flicker_within_one_flush_writes_nothing() -> None:
    presence, store, _, _ = clustered()
    await presence.connected(7, 1)
    await presence.disconnected(7, 1)
    await presence.connected(7, 2)
    await presence.set_away(7, 2, True)
    await presence.flush()
    assert store.writes == []


async def test_defect_21_removals_and_away_are_written_as_removals() -> None:
    presence, store, _, _ = clustered()
    await presence.connected(7, 1)
    await presence.connected(7, 1)  # a second connection of the same user
    await presence.connected(7, 2)
    await presence.connected(8, 3)
    await presence.flush()
    await presence.disconnected(7, 1)  # one connection left: still active
    await presence.set_away(7, 2, True)
    await presence.disconnected(8, 3)
    await presence.flush()
    assert store.writes[1] == {7: Delta(set(), {2}), 8: Delta(set(), {3})}
    assert presence.active_users(7) == {1}


async def test_defect_21_a_failed_write_is_retried_by_the_next_flush() -> None:
    presence, store, _, _ = clustered()
    await presence.connected(7, 1)
    store.fail_next_write = True
    with pytest.raises(ConnectionError):
        await presence.flush()
    await presence.flush()
    assert store.writes == [{7: Delta({1}, set())}]


async def test_defect_21_poll_follows_the_clock_and_only_served_workspaces() -> None:
    presence, store, _, clock = clustered()
    await presence.connected(7, 1)
    await presence.connected(8, 2)
    await presence.tick()
    assert store.polls == [{7, 8}] and store.keep_alives == [{7: {1}, 8: {2}}]
    await presence.disconnected(8, 2)
    clock.now += 1.0  # poll_s is 2: not due yet
    await presence.tick()
    assert len(store.polls) == 1
    assert store.writes[-1] == {8: Delta(set(), {2})}
    clock.now += 1.5
    await presence.tick()
    assert store.polls[-1] == {7}  # workspace 8 is no longer served here
    assert store.keep_alives[-1] == {7: {1}}


async def test_defect_21_single_node_publishes_each_change_at_once() -> None:
    bus = NoBus()
    presence = Presence(bus, 3.0)
    await presence.connected(7, 1)
    await presence.connected(7, 1)
    await presence.disconnected(7, 1)
    await presence.disconnected(7, 1)
    statuses = [(e.audience.presence_of, b'"active"' in e.payload) for e in bus.published]
    assert statuses == [(1, True), (1, False)]


async def test_defect_21_disconnect_without_connect_changes_nothing() -> None:
    bus = NoBus()
    presence = Presence(bus, 3.0)
    await presence.connected(7, 1)
    await presence.disconnected(7, 2)
    assert presence.status(7, 1) == "active" and bus.published[-1].audience.presence_of == 1
    assert len(bus.published) == 1


def test_defect_21_default_node_ids_are_unique_even_for_one_pid() -> None:
    a, b = Settings().node_id, Settings().node_id
    assert a != b
    assert a != f"node-{os.getpid()}"
