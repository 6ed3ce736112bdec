"""Hub taps (chat/fanout.py): a service connection receives every event of a workspace once,
in order, whatever happens between its attach and its ready."""

from __future__ import annotations

from collections.abc import Sequence

from chat.bus import Audience, Envelope
from chat.fanout import Hub


class FakeTap:
    def __init__(self) -> None:
        self.got: list[Envelope] = []

    def take(self, envelopes: Sequence[Envelope]) -> None:
        self.got.extend(envelopes)

    def seqs(self) -> list[int | None]:
        return [e.seq for e in self.got]


def ev(seq: int | None, workspace_id: int = 1, **audience: object) -> Envelope:
    return Envelope(
        workspace_id,
        seq,
        "message.posted",
        f"e{seq}".encode(),
        Audience(**audience),  # type: ignore[arg-type]
    )


def test_a_ready_tap_gets_everything_unfiltered_in_order() -> None:
    hub, tap = Hub(), FakeTap()
    hub.attach_tap(1, tap)
    hub.ready_tap(1, tap, as_of=0)
    hub.deliver(
        [
            ev(1, channel_id=5),  # a channel nobody here is in
            ev(2, user_ids=frozenset({9})),
            ev(None, channel_id=5, droppable=True),  # typing
            ev(3, everyone=True),
            ev(1, workspace_id=2, everyone=True),  # another workspace
        ]
    )
    assert tap.seqs() == [1, 2, None, 3]


def test_events_between_attach_and_ready_are_buffered_and_cut_at_the_snapshot() -> None:
    hub, tap = Hub(), FakeTap()
    hub.attach_tap(1, tap)
    hub.deliver([ev(4, channel_id=1), ev(5, channel_id=1), ev(None, channel_id=1)])
    assert tap.got == []
    hub.ready_tap(1, tap, as_of=4)  # the snapshot said 4: 5 follows, the typing is gone
    hub.deliver([ev(6, channel_id=1)])
    assert tap.seqs() == [5, 6]


def test_a_snapshot_ahead_of_the_bus_is_not_sent_twice() -> None:
    hub, tap = Hub(), FakeTap()
    hub.attach_tap(1, tap)
    hub.ready_tap(1, tap, as_of=7)  # the database said 7; the bus has delivered nothing yet
    hub.deliver([ev(6), ev(None), ev(7)])
    hub.deliver([ev(8), ev(9)])
    assert tap.seqs() == [None, 8, 9]


def test_detach_and_last_subscriber() -> None:
    hub, tap, other = Hub(), FakeTap(), FakeTap()
    dropped: list[int] = []
    hub.on_last_peer = dropped.append
    hub.attach_tap(1, tap)
    hub.attach_tap(1, other)
    hub.ready_tap(1, tap, 0)
    hub.ready_tap(1, other, 0)
    hub.detach_tap(1, tap)
    hub.deliver([ev(1, everyone=True)])
    assert tap.got == [] and other.seqs() == [1]
    assert dropped == []
    hub.detach_tap(1, other)
    assert dropped == [1]  # no peer and no tap left: the node may unsubscribe
    hub.detach_tap(1, other)  # twice is harmless
    assert dropped == [1]
    hub.deliver([ev(2, everyone=True)])
    assert other.seqs() == [1]
