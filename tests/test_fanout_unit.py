"""Unit tests of :class:`chat.fanout.Hub`: who receives what, with fake peers and no sockets."""

from __future__ import annotations

import pytest

from chat import fanout
from chat.bus import Audience, Envelope
from chat.connect import BacklogFilter
from chat.fanout import Hub

W = 1  # workspace
X, Y = 10, 20  # channels
ALICE, BOB, CAROL = 100, 200, 300


class FakePeer:
    """Records what the hub hands it; hashable by identity like the real Peer."""

    def __init__(
        self,
        user_id: int,
        session_id: str = "",
        log: list[object] | None = None,
        role: str = "member",
    ):
        self.user_id = user_id
        self.session_id = session_id or f"s{user_id}"
        self.role = role
        self.sent: list[tuple[bytes, bool]] = []
        self.revoked = 0
        self._log = log

    def send(self, frame: bytes, droppable: bool) -> None:
        self.sent.append((frame, droppable))
        if self._log is not None:
            self._log.append(("send", self, frame))

    def revoke(self) -> None:
        self.revoked += 1
        if self._log is not None:
            self._log.append(("revoke", self))

    @property
    def frames(self) -> list[bytes]:
        """Frames received, in order. The hub may hand over several frames in one write
        (a run of events for one channel); split them back at the framer's brackets."""
        out: list[bytes] = []
        for write, _ in self.sent:
            if write.startswith(b"<") and write.endswith(b">"):
                out += [b"<" + part + b">" for part in write[1:-1].split(b"><")]
            else:
                out.append(write)
        return out

    def __repr__(self) -> str:
        return f"FakePeer({self.user_id}, {self.session_id!r})"


class CountingFramer:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, payload: bytes) -> bytes:
        self.calls.append(payload)
        return b"<" + payload + b">"  # a new bytes object per call


def env(seq: int | None, name: str, **kw: object) -> Envelope:
    workspace_id = kw.pop("workspace_id", W)
    return Envelope(
        workspace_id=workspace_id,  # type: ignore[arg-type]
        seq=seq,
        type="test",
        payload=name.encode(),
        audience=Audience(**kw),  # type: ignore[arg-type]
    )


def FIRST(peer: FakePeer) -> None:
    """What the connect sequence sends before ``ready``: the auth reply."""
    peer.send(b"FIRST", False)


def peer_count(hub: Hub) -> int:
    return sum(len(p) for ws in hub._workspaces.values() for p in ws.peers.values())


def local_users(hub: Hub) -> set[int]:
    ws = hub._workspaces.get(W)
    return set(ws.peers) if ws else set()


def replayed(user_id: int, role_after: str, events: list[Envelope]) -> list[bytes]:
    """What a resume replays of ``events`` to the user (the connect sequence's filter)."""
    backlog = BacklogFilter(user_id, role_after, [])
    backlog.scan(events)
    backlog.start()
    return backlog.visible(events)


def framed(*names: str) -> list[bytes]:
    return [b"<" + n.encode() + b">" for n in names]


@pytest.fixture
def framer() -> CountingFramer:
    return CountingFramer()


@pytest.fixture
def hub(framer: CountingFramer) -> Hub:
    return Hub(framer=framer)


def connect(hub: Hub, peer: FakePeer, channels: list[int], as_of: int = 0) -> None:
    hub.attach(W, peer)
    assert hub.ready(W, peer, channels, as_of)


# --------------------------------------------------------------------------- audiences


def test_channel_event_goes_only_to_local_members(hub: Hub) -> None:
    a, b, c = FakePeer(ALICE), FakePeer(BOB), FakePeer(CAROL)
    connect(hub, a, [X])
    connect(hub, b, [X, Y])
    connect(hub, c, [Y])
    hub.deliver([env(1, "in-x", channel_id=X), env(2, "in-y", channel_id=Y)])
    assert a.frames == framed("in-x")
    assert b.frames == framed("in-x", "in-y")
    assert c.frames == framed("in-y")


def test_everyone_reaches_every_local_peer(hub: Hub) -> None:
    a, b, c = FakePeer(ALICE), FakePeer(BOB), FakePeer(CAROL)
    connect(hub, a, [X])
    connect(hub, b, [])
    connect(hub, c, [Y])
    hub.deliver([env(1, "all", everyone=True)])
    for p in (a, b, c):
        assert p.frames == framed("all")


def test_user_ids_reach_those_users_and_channel_members(hub: Hub) -> None:
    a, b, c = FakePeer(ALICE), FakePeer(BOB), FakePeer(CAROL)
    connect(hub, a, [X])
    connect(hub, b, [])
    connect(hub, c, [])
    hub.deliver([env(1, "to-bob", user_ids=frozenset({BOB}))])
    hub.deliver([env(2, "x-and-carol", channel_id=X, user_ids=frozenset({CAROL}))])
    assert a.frames == framed("x-and-carol")
    assert b.frames == framed("to-bob")
    assert c.frames == framed("x-and-carol")


def test_exclude_user(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [X])
    connect(hub, b, [X])
    hub.deliver([env(None, "typing", channel_id=X, exclude_user=ALICE, droppable=True)])
    hub.deliver([env(1, "all-but-bob", everyone=True, exclude_user=BOB)])
    assert a.frames == framed("all-but-bob")
    assert b.sent == [(b"<typing>", True)]


def test_presence_goes_to_watchers_only(hub: Hub) -> None:
    a, b, c = FakePeer(ALICE), FakePeer(BOB), FakePeer(CAROL)
    for p in (a, b, c):
        connect(hub, p, [X])
    hub.watch_presence(W, a, [CAROL])
    hub.watch_presence(W, b, [ALICE])
    hub.deliver([env(None, "carol-away", presence_of=CAROL, droppable=True)])
    assert a.sent == [(b"<carol-away>", True)]
    assert b.sent == []
    assert c.sent == []  # not even the subject
    # Replacing the watch set stops the old subscriptions.
    hub.watch_presence(W, a, [BOB])
    hub.deliver([env(None, "carol-back", presence_of=CAROL, droppable=True)])
    hub.deliver([env(None, "bob-away", presence_of=BOB, droppable=True)])
    assert a.frames == framed("carol-away", "bob-away")


def test_overlapping_audiences_deliver_once(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [X])
    connect(hub, b, [X])
    hub.deliver(
        [
            env(1, "chan+user", channel_id=X, user_ids=frozenset({ALICE})),
            env(2, "all+user", everyone=True, user_ids=frozenset({ALICE, BOB})),
            env(3, "all+chan", everyone=True, channel_id=X),
        ]
    )
    assert a.frames == b.frames == framed("chan+user", "all+user", "all+chan")


def test_other_workspaces_are_not_delivered(hub: Hub) -> None:
    a = FakePeer(ALICE)
    connect(hub, a, [X])
    hub.deliver([env(1, "elsewhere", workspace_id=2, channel_id=X, everyone=True)])
    assert a.sent == []


def test_droppable_flag_is_passed_through(hub: Hub) -> None:
    a = FakePeer(ALICE)
    connect(hub, a, [X])
    hub.deliver([env(1, "durable", channel_id=X), env(None, "eph", channel_id=X, droppable=True)])
    assert a.sent == [(b"<durable>", False), (b"<eph>", True)]


# --------------------------------------------------------------------------- joins and leaves


def test_joiner_receives_its_own_join_and_what_follows(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [X])
    connect(hub, b, [])
    hub.deliver([env(1, "before", channel_id=X)])
    hub.deliver([env(2, "bob-joined", channel_id=X, joins=(BOB,))])
    hub.deliver([env(3, "after", channel_id=X)])
    assert b.frames == framed("bob-joined", "after")
    assert a.frames == framed("before", "bob-joined", "after")


def test_leaver_receives_its_own_leave_then_nothing_more(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [X])
    connect(hub, b, [X, Y])
    hub.deliver(
        [
            env(1, "m1", channel_id=X),
            env(2, "bob-left", channel_id=X, user_ids=frozenset({BOB}), leaves=(BOB,)),
            env(3, "m2", channel_id=X),
            env(4, "y", channel_id=Y),
        ]
    )
    assert b.frames == framed("m1", "bob-left", "y")
    assert a.frames == framed("m1", "bob-left", "m2")


def test_join_of_a_user_not_connected_here_is_ignored(hub: Hub) -> None:
    a = FakePeer(ALICE)
    connect(hub, a, [X])
    hub.deliver([env(1, "carol-joined", channel_id=X, joins=(CAROL,))])
    c = FakePeer(CAROL)
    connect(hub, c, [X], as_of=1)
    hub.deliver([env(2, "m", channel_id=X)])
    assert c.frames == framed("m")


# --------------------------------------------------------------------------- revocation


def test_revoke_user_revokes_all_of_its_peers_after_delivery(hub: Hub) -> None:
    log: list[object] = []
    a1, a2 = FakePeer(ALICE, "s1", log), FakePeer(ALICE, "s2", log)
    b = FakePeer(BOB, "s3", log)
    for p in (a1, a2, b):
        connect(hub, p, [X])
    log.clear()
    hub.deliver(
        [env(1, "revoked", user_ids=frozenset({ALICE}), revoke_user=ALICE, revoke_session=None)]
    )
    assert (a1.revoked, a2.revoked, b.revoked) == (1, 1, 0)
    assert b.sent == []
    # Each peer got the event before being revoked.
    for p in (a1, a2):
        assert log.index(("send", p, b"<revoked>")) < log.index(("revoke", p))


def test_revoke_session_revokes_only_that_session(hub: Hub) -> None:
    a1, a2 = FakePeer(ALICE, "s1"), FakePeer(ALICE, "s2")
    b = FakePeer(BOB, "s1")  # same session id string, other user: untouched
    for p in (a1, a2, b):
        connect(hub, p, [])
    hub.deliver(
        [env(1, "revoked", user_ids=frozenset({ALICE}), revoke_user=ALICE, revoke_session="s2")]
    )
    assert (a1.revoked, a2.revoked, b.revoked) == (0, 1, 0)
    assert a1.frames == a2.frames == framed("revoked")


def test_revoke_reaches_a_peer_still_syncing(hub: Hub) -> None:
    a1, a2 = FakePeer(ALICE, "s1"), FakePeer(ALICE, "s2")
    connect(hub, a1, [])
    hub.attach(W, a2)
    hub.deliver([env(1, "revoked", user_ids=frozenset({ALICE}), revoke_user=ALICE)])
    assert (a1.revoked, a2.revoked) == (1, 1)


# --------------------------------------------------------------------------- framing once


def test_framer_called_once_per_envelope_and_bytes_shared(hub: Hub, framer: CountingFramer) -> None:
    peers = [FakePeer(ALICE), FakePeer(ALICE, "s2"), FakePeer(BOB), FakePeer(CAROL)]
    for p in peers:
        connect(hub, p, [X])
    framer.calls.clear()
    hub.deliver([env(1, "one", channel_id=X), env(2, "two", everyone=True)])
    assert framer.calls == [b"one", b"two"]
    firsts = [p.sent[0][0] for p in peers]
    seconds = [p.sent[1][0] for p in peers]
    assert all(f is firsts[0] for f in firsts)
    assert all(s is seconds[0] for s in seconds)
    assert firsts[0] == b"<one>"


def test_framer_not_called_without_recipients(hub: Hub, framer: CountingFramer) -> None:
    connect(hub, FakePeer(ALICE), [X])
    framer.calls.clear()
    hub.deliver([env(1, "nobody", channel_id=Y)])
    assert framer.calls == []


# --------------------------------------------------------------------------- attach / ready


def test_sync_skips_events_up_to_as_of_and_flushes_after_first(hub: Hub) -> None:
    a = FakePeer(ALICE)
    hub.attach(W, a)
    hub.deliver(
        [
            env(5, "old", channel_id=X),  # already reflected in the snapshot
            env(6, "old-all", everyone=True),
            env(None, "typing", channel_id=X, droppable=True),  # ephemeral: not buffered
            env(7, "new", channel_id=X),
            env(8, "new-all", everyone=True),
            env(9, "other-channel", channel_id=Y),
            env(10, "to-me", user_ids=frozenset({ALICE})),
        ]
    )
    assert a.sent == []  # nothing before ready
    FIRST(a)
    assert hub.ready(W, a, [X], as_of=6)
    assert a.frames == [b"FIRST", *framed("new", "new-all", "to-me")]
    hub.deliver([env(11, "live", channel_id=X)])
    assert a.frames[-1] == b"<live>"


def test_sync_judges_buffer_by_membership_at_each_event(hub: Hub) -> None:
    a = FakePeer(ALICE)
    hub.attach(W, a)
    hub.deliver(
        [
            env(7, "m1", channel_id=X),
            env(8, "left", channel_id=X, user_ids=frozenset({ALICE}), leaves=(ALICE,)),
            env(9, "m2", channel_id=X),
        ]
    )
    FIRST(a)
    assert hub.ready(W, a, [X], as_of=6)
    assert a.frames == [b"FIRST", *framed("m1", "left")]
    # The replayed leave is the user's membership from now on.
    hub.deliver([env(10, "m3", channel_id=X)])
    assert a.frames == [b"FIRST", *framed("m1", "left")]


def test_sync_buffered_join_counts_from_the_join(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, b, [X])
    hub.attach(W, a)
    hub.deliver(
        [
            env(7, "before-join", channel_id=X),
            env(8, "joined", channel_id=X, joins=(ALICE,)),
            env(9, "after-join", channel_id=X),
        ]
    )
    FIRST(a)
    assert hub.ready(W, a, [], as_of=6)
    assert a.frames == [b"FIRST", *framed("joined", "after-join")]
    hub.deliver([env(10, "live", channel_id=X)])
    assert a.frames[-1] == b"<live>"
    assert b.frames == framed("before-join", "joined", "after-join", "live")


def test_snapshot_after_a_buffered_join_already_contains_it(hub: Hub) -> None:
    a = FakePeer(ALICE)
    hub.attach(W, a)
    hub.deliver([env(8, "joined", channel_id=X, joins=(ALICE,)), env(9, "m", channel_id=X)])
    assert hub.ready(W, a, [X], as_of=8)
    assert a.frames == framed("m")


def test_second_peer_of_a_ready_user(hub: Hub) -> None:
    a1, a2 = FakePeer(ALICE, "s1"), FakePeer(ALICE, "s2")
    connect(hub, a1, [X])
    hub.attach(W, a2)
    hub.deliver(
        [
            env(10, "old", channel_id=X),
            env(11, "m", channel_id=X),
            env(12, "not-mine", channel_id=Y),
            env(13, "left", channel_id=X, user_ids=frozenset({ALICE}), leaves=(ALICE,)),
            env(14, "after-leave", channel_id=X),
        ]
    )
    # The first peer is live throughout.
    assert a1.frames == framed("old", "m", "left")
    assert a2.sent == []
    FIRST(a2)
    assert hub.ready(W, a2, [X], as_of=10)
    assert a2.frames == [b"FIRST", *framed("m", "left")]
    hub.deliver(
        [env(15, "x-again", channel_id=X), env(16, "to-alice", user_ids=frozenset({ALICE}))]
    )
    assert a1.frames[-1] == a2.frames[-1] == b"<to-alice>"
    assert b"<x-again>" not in a1.frames + a2.frames


def test_second_peer_does_not_reset_the_users_membership(hub: Hub) -> None:
    a1, a2 = FakePeer(ALICE, "s1"), FakePeer(ALICE, "s2")
    connect(hub, a1, [X])
    hub.attach(W, a2)
    hub.deliver([env(2, "joined-y", channel_id=Y, joins=(ALICE,))])
    # a2's snapshot predates the join; the live membership already has Y.
    assert hub.ready(W, a2, [X], as_of=1)
    hub.deliver([env(3, "in-y", channel_id=Y)])
    assert a1.frames == framed("joined-y", "in-y")
    assert a2.frames == framed("joined-y", "in-y")


def test_two_users_syncing_at_once(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    hub.attach(W, a)
    hub.attach(W, b)
    hub.deliver([env(3, "x", channel_id=X), env(4, "y", channel_id=Y)])
    assert hub.ready(W, a, [X], as_of=2)
    hub.deliver([env(5, "x2", channel_id=X)])
    assert hub.ready(W, b, [Y], as_of=2)
    assert a.frames == framed("x", "x2")
    assert b.frames == framed("y")


def test_sync_overflow_reports_false(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "MAX_SYNC_BUFFER", 3)
    a = FakePeer(ALICE)
    hub.attach(W, a)
    hub.deliver([env(i, f"m{i}", everyone=True) for i in range(1, 6)])
    assert hub.ready(W, a, [], as_of=0) is False
    assert a.frames == []  # an overflowed buffer is not flushed: the caller closes


# --------------------------------------------------------------------------- detach


def test_detach_cleans_up_and_calls_on_last_peer(hub: Hub) -> None:
    lasts: list[int] = []
    hub.on_last_peer = lasts.append
    a1, a2, b = FakePeer(ALICE, "s1"), FakePeer(ALICE, "s2"), FakePeer(BOB)
    connect(hub, a1, [X])
    connect(hub, a2, [X])
    connect(hub, b, [X])
    hub.watch_presence(W, b, [CAROL])
    assert peer_count(hub) == 3
    assert local_users(hub) == {ALICE, BOB}

    hub.detach(W, a1)
    hub.deliver([env(1, "m1", channel_id=X)])
    assert a1.sent == []
    assert a2.frames == b.frames == framed("m1")
    assert peer_count(hub) == 2

    hub.detach(W, a2)
    assert local_users(hub) == {BOB}
    hub.detach(W, b)
    assert lasts == [W]
    assert peer_count(hub) == 0
    assert local_users(hub) == set()
    hub.deliver([env(2, "m2", channel_id=X, everyone=True), env(None, "p", presence_of=CAROL)])
    assert b.frames == framed("m1")


def test_detached_watcher_gets_no_presence(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [])
    connect(hub, b, [])
    hub.watch_presence(W, a, [CAROL])
    hub.watch_presence(W, b, [CAROL])
    hub.detach(W, a)
    hub.deliver([env(None, "p", presence_of=CAROL, droppable=True)])
    assert a.sent == []
    assert b.frames == framed("p")


def test_detach_while_syncing(hub: Hub) -> None:
    lasts: list[int] = []
    hub.on_last_peer = lasts.append
    a = FakePeer(ALICE)
    hub.attach(W, a)
    hub.deliver([env(1, "m", everyone=True)])
    hub.detach(W, a)
    assert lasts == [W]
    assert peer_count(hub) == 0
    assert a.sent == []


def test_membership_of_a_user_is_forgotten_with_its_last_peer(hub: Hub) -> None:
    a1 = FakePeer(ALICE, "s1")
    connect(hub, a1, [X])
    keep = FakePeer(BOB)
    connect(hub, keep, [])
    hub.detach(W, a1)
    # Reconnecting with a snapshot without X: the old membership must not linger.
    a2 = FakePeer(ALICE, "s2")
    connect(hub, a2, [Y])
    hub.deliver([env(1, "x", channel_id=X), env(2, "y", channel_id=Y)])
    assert a2.frames == framed("y")


def test_a_run_of_channel_events_is_one_write_per_peer(hub: Hub, framer: CountingFramer) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [X])
    connect(hub, b, [X])
    hub.deliver(
        [env(1, "m1", channel_id=X), env(2, "m2", channel_id=X), env(3, "m3", channel_id=X)]
    )
    assert len(a.sent) == len(b.sent) == 1
    assert a.sent[0][0] is b.sent[0][0]  # one joined bytes object for everyone
    assert a.frames == framed("m1", "m2", "m3")
    assert len(framer.calls) == 3  # each payload framed once


def test_a_run_stops_at_an_event_that_changes_membership(hub: Hub) -> None:
    a, b = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, a, [X])
    connect(hub, b, [])
    hub.deliver(
        [
            env(1, "m1", channel_id=X),
            env(2, "bob-joins", channel_id=X, joins=(BOB,)),
            env(3, "m2", channel_id=X),
            env(4, "m3", channel_id=X),
            env(5, "other", channel_id=Y),
        ]
    )
    assert a.frames == framed("m1", "bob-joins", "m2", "m3")
    assert b.frames == framed("bob-joins", "m2", "m3")
    assert len(b.sent) == 2  # the join alone, then the run m2+m3


def test_a_peer_whose_snapshot_is_ahead_of_the_bus_gets_nothing_twice(hub: Hub) -> None:
    """The bus can lag the database: a peer's snapshot (as_of) may already include events
    the hub has not delivered yet; when they arrive, that peer must not get them again."""
    early, late = FakePeer(ALICE), FakePeer(BOB)
    connect(hub, early, [X], as_of=0)
    connect(hub, late, [X], as_of=2)  # its snapshot already has seq 1 and 2
    hub.deliver(
        [env(1, "m1", channel_id=X), env(2, "m2", channel_id=X), env(3, "m3", channel_id=X)]
    )
    assert early.frames == framed("m1", "m2", "m3")
    assert late.frames == framed("m3")
    hub.deliver([env(4, "m4", channel_id=X), env(5, "m5", channel_id=X)])
    assert late.frames == framed("m3", "m4", "m5")


# --------------------------------------------------------------------------- defect 12

READERS = frozenset({"owner", "admin", "member"})  # access.POLICY[Action.READ_PUBLIC]


def test_defect_12_public_channel_metadata_reaches_readers_and_members_not_guests(
    hub: Hub,
) -> None:
    member, guest, guest_in_x = (
        FakePeer(ALICE),
        FakePeer(BOB, role="guest"),
        FakePeer(CAROL, role="guest"),
    )
    connect(hub, member, [])
    connect(hub, guest, [])
    connect(hub, guest_in_x, [X])
    hub.deliver([env(1, "x-updated", channel_id=X, roles=READERS)])
    assert member.frames == framed("x-updated")  # may read public channels: not a member
    assert guest.frames == []
    assert guest_in_x.frames == framed("x-updated")  # a member, whatever the role


def test_defect_12_a_role_change_applies_from_its_own_event_on(hub: Hub) -> None:
    guest, other = FakePeer(BOB, role="guest"), FakePeer(ALICE)
    connect(hub, guest, [])
    connect(hub, other, [])
    hub.deliver(
        [
            env(1, "before", channel_id=X, roles=READERS),
            env(2, "promoted", everyone=True, role_change=(BOB, "guest", "member")),
            env(3, "after", channel_id=X, roles=READERS),
            env(4, "demoted", everyone=True, role_change=(BOB, "member", "guest")),
            env(5, "after-demotion", channel_id=X, roles=READERS),
        ]
    )
    assert guest.frames == framed("promoted", "after", "demoted")
    assert guest.role == "guest"
    assert other.frames == framed("before", "promoted", "after", "demoted", "after-demotion")


def test_defect_12_a_syncing_peer_judges_its_buffer_by_the_role_at_each_event(hub: Hub) -> None:
    guest = FakePeer(BOB, role="guest")
    hub.attach(W, guest)
    hub.deliver(
        [
            env(7, "before", channel_id=X, roles=READERS),
            env(8, "promoted", everyone=True, role_change=(BOB, "guest", "member")),
            env(9, "after", channel_id=X, roles=READERS),
        ]
    )
    assert hub.ready(W, guest, [], as_of=6)
    assert guest.frames == framed("promoted", "after")
    assert guest.role == "member"
    hub.deliver([env(10, "live", channel_id=Y, roles=READERS)])
    assert guest.frames[-1] == b"<live>"


def test_defect_12_replay_judges_each_event_by_the_role_of_its_time() -> None:
    events = [
        env(1, "before", channel_id=X, roles=READERS),
        env(2, "promoted", everyone=True, role_change=(BOB, "guest", "member")),
        env(3, "after", channel_id=X, roles=READERS),
        env(4, "demoted", everyone=True, role_change=(BOB, "member", "guest")),
        env(5, "last", channel_id=X, roles=READERS),
    ]
    assert replayed(BOB, "guest", events) == [b"promoted", b"after", b"demoted"]
    # Someone else's role change does not change this user's view.
    assert len(replayed(ALICE, "member", events)) == 5
