"""Unit tests of the connect sequence (:mod:`chat.connect`) with a real hub, no sockets.

Each test drives the sequence step by step and, between two steps, makes something happen:
an event commits, the session is revoked, the user joins or leaves a channel, or the step's
I/O fails. The client must then see every event after its snapshot exactly once, in order;
a revoked session must never go live; every failure must end in a reply and a close code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from chat import wire
from chat.bus import Audience, Envelope
from chat.connect import (
    BacklogFilter,
    CheckWindow,
    Connect,
    Effect,
    Identify,
    Live,
    Ready,
    ScanReplay,
    Snapshot,
    Step,
    StreamReplay,
    Subscribe,
    TakeSnapshot,
)
from chat.errors import ChatError, CloseCode, ErrorCode
from chat.fanout import Hub
from chat.identity import Identity
from chat.protocol import ClientProtocol, Close, Send, State
from chat.replay import ReplayLost
from chat.storage import StorageError

W = 1
ALICE, BOB = 100, 200
X, Y = 10, 20  # channels
SESSION = "s_alice"


class Recipient:
    """What the hub hands a session: frames in order (also onto ``wire``, the one stream the
    client reads, which the sequence's own sends join); revocations."""

    def __init__(self, wire: list[bytes], user_id: int = ALICE, session_id: str = SESSION) -> None:
        self.user_id = user_id
        self.session_id = session_id
        self.role = "member"
        self.revoked = False
        self.frames: list[bytes] = []
        self._wire = wire

    def send(self, frame: bytes, droppable: bool) -> None:
        self.frames.append(frame)
        self._wire.append(frame)

    def revoke(self) -> None:
        self.revoked = True


def event(seq: int, name: str, **audience: Any) -> Envelope:
    return Envelope(W, seq, "test", name.encode(), Audience(**audience))


def revocation(seq: int, session: str | None = SESSION) -> Envelope:
    return event(
        seq,
        f"revoke{seq}",
        user_ids=frozenset({ALICE}),
        revoke_user=ALICE,
        revoke_session=session,
    )


def identity(user_id: int = ALICE) -> Identity:
    return Identity(user_id, W, SESSION, None)


def snap(as_of: int, channels: frozenset[int], refusal: ErrorCode | None = None) -> Snapshot:
    """What the snapshot statement reads for Alice, a member."""
    user = wire.User(id=ALICE, workspace_id=W, handle="alice", display_name="A", role="member")
    return Snapshot(as_of, channels, None if refusal else user, "acme", refusal)


def auth(resume_seq: int | None = None, session: str = SESSION) -> wire.Auth:
    resume = wire.Resume(session_id=session, seq=resume_seq) if resume_seq is not None else None
    return wire.Auth(type="auth", id="a1", token="t", resume=resume)


class Harness:
    """A hub, a recipient, a protocol and the sequence; records every Send."""

    def __init__(self) -> None:
        self.hub = Hub()
        self.wire: list[bytes] = []  # everything the client reads, in order
        self.recipient = Recipient(self.wire)
        self.protocol = ClientProtocol(now=0.0)
        self.connect = Connect(self.protocol, self.hub, self.recipient)
        self.sent: list[bytes] = []

    def deliver(self, *envelopes: Envelope) -> None:
        self.hub.deliver(list(envelopes))

    def carry(self, effects: list[Effect]) -> Effect:
        """Apply Sends; return the last effect (the next action, Live or a Close)."""
        for effect in effects[:-1]:
            assert isinstance(effect, Send), effects
            self.sent.append(effect.frame)
            self.wire.append(effect.frame)
        last = effects[-1]
        if isinstance(last, Close) and last.frame is not None:
            self.sent.append(last.frame)
            self.wire.append(last.frame)
        return last

    def on_the_wire(self) -> list[str]:
        """The client's view, in order: frame types for JSON frames, names for events."""
        return [
            json.loads(frame)["type"] if frame.startswith(b"{") else frame.decode()
            for frame in self.wire
        ]

    def received(self) -> list[str]:
        """Everything the client got, in order: replies/markers by kind, events by name."""
        out: list[str] = []
        for frame in self.sent:
            out.append(json.loads(frame)["type"] if frame.startswith(b"{") else "?")
        return out

    def events(self) -> list[bytes]:
        return self.recipient.frames


def run(
    h: Harness,
    request: wire.Auth,
    snapshot: Snapshot,
    *,
    holds: bool = True,
    log: Sequence[Sequence[Envelope]] = (),
    at: dict[str, Callable[[], None]] | None = None,
) -> Effect:
    """Drive the whole sequence; ``at[step]`` runs just before that step's outcome is fed."""
    at = at or {}

    def before(step: str) -> None:
        if step in at:
            at[step]()

    effect = h.carry(h.connect.start(request))
    while True:
        if isinstance(effect, Identify):
            before("identify")
            effect = h.carry(h.connect.identified(identity()))
        elif isinstance(effect, Subscribe):
            before("subscribe")
            effect = h.carry(h.connect.subscribed())
        elif isinstance(effect, TakeSnapshot):
            before("snapshot")
            effect = h.carry(h.connect.snapshot_taken(snapshot))
        elif isinstance(effect, CheckWindow):
            before("window")
            effect = h.carry(h.connect.window_checked(holds))
        elif isinstance(effect, ScanReplay):
            for chunk in log:
                h.connect.scan(chunk)
            before("scan")
            effect = h.carry(h.connect.scanned())
        elif isinstance(effect, StreamReplay):
            chunks = effect.cached or log
            for chunk in chunks:
                payloads = h.connect.visible(chunk)
                h.sent += payloads
                h.wire += payloads
            before("stream")
            effect = h.carry(h.connect.streamed())
        elif isinstance(effect, Ready):
            before("ready")
            effect = h.carry(h.connect.ready())
        else:
            return effect


# --------------------------------------------------------------------------- the plain path


def test_fresh_connect_replies_then_goes_live() -> None:
    h = Harness()
    effect = run(h, auth(), snap(5, frozenset({X})))
    assert effect == Live(W, ALICE)
    assert h.received() == ["reply"]
    reply = json.loads(h.sent[0])
    assert reply["reply_to"] == "a1" and reply["data"]["seq"] == 5
    assert h.protocol.state is State.OPEN and h.connect.step is Step.LIVE
    h.deliver(event(6, "m6", channel_id=X), event(7, "not-mine", channel_id=Y))
    assert h.events() == [b"m6"]
    assert h.connect.close() is True  # live: the driver undoes presence


@pytest.mark.parametrize("step", ["identify", "subscribe", "snapshot"])
def test_event_in_the_snapshot_is_not_delivered_again(step: str) -> None:
    """An event that commits before the snapshot is read (seq <= as_of) is reflected by the
    snapshot; the hub may see it before or after the attach, and must not deliver it."""
    h = Harness()
    commit = {step: lambda: h.deliver(event(5, "in-snapshot", channel_id=X))}
    run(h, auth(), snap(5, frozenset({X})), at=commit)
    h.deliver(event(6, "live", channel_id=X))
    assert h.events() == [b"live"]


@pytest.mark.parametrize("step", ["snapshot", "window", "scan", "stream"])
def test_event_after_the_snapshot_arrives_once_after_the_reply(step: str) -> None:
    """An event that commits after the snapshot was read (seq > as_of), at any later step,
    is buffered by the hub and delivered once, after the reply and any replay."""
    h = Harness()
    log = [[event(3, "m3", channel_id=X), event(4, "m4", channel_id=X)]]
    commit = {step: lambda: h.deliver(event(5, "after", channel_id=X))}
    effect = run(h, auth(resume_seq=2), snap(4, frozenset({X})), log=log, at=commit)
    assert effect == Live(W, ALICE)
    assert h.received() == ["reply", "?", "?", "resumed"]
    h.deliver(event(6, "live", channel_id=X))
    assert h.events() == [b"after", b"live"]


def test_events_during_replay_follow_the_replay_in_order() -> None:
    h = Harness()
    log = [[event(3, "m3", channel_id=X), event(4, "m4", channel_id=X)]]
    run(
        h,
        auth(resume_seq=2),
        snap(4, frozenset({X})),
        log=log,
        at={"scan": lambda: h.deliver(event(5, "m5", channel_id=X))},
    )
    assert h.received() == ["reply", "?", "?", "resumed"]
    assert h.sent[1:3] == [b"m3", b"m4"]
    assert h.events() == [b"m5"]  # after the resumed marker, from the hub


# --------------------------------------------------------------------------- revocation


def test_defect_02_revoked_before_the_snapshot_is_refused_by_the_snapshot() -> None:
    h = Harness()
    effect = run(h, auth(), snap(5, frozenset({X}), ErrorCode.TOKEN_REVOKED))
    assert isinstance(effect, Close)
    assert (effect.code, effect.reason) == (CloseCode.POLICY_VIOLATION, "token_revoked")
    error = json.loads(h.sent[-1])
    assert (error["type"], error["reply_to"], error["code"]) == ("error", "a1", "token_revoked")
    h.deliver(event(6, "private", channel_id=X))
    assert h.events() == []
    assert h.connect.close() is False  # never live: presence untouched


@pytest.mark.parametrize("step", ["snapshot", "window", "scan", "stream"])
def test_defect_02_revocation_at_each_step_never_goes_live(step: str) -> None:
    """Defect 2: a revocation that commits while the session connects (delivered by the
    hub at any step after the attach, at a seq before or after the snapshot) closes it."""
    h = Harness()
    seq = 4 if step == "snapshot" else 7
    effect = run(
        h,
        auth(resume_seq=2),
        snap(5, frozenset({X})),
        log=[[event(3, "m3", channel_id=X), event(4, "m4", channel_id=X), event(5, "m5")]],
        at={step: lambda: h.deliver(revocation(seq))},
    )
    assert isinstance(effect, Close)
    assert (effect.code, effect.reason) == (CloseCode.POLICY_VIOLATION, "token_revoked")
    assert h.connect.step is Step.CLOSED
    h.deliver(event(8, "after", channel_id=X))
    assert b"after" not in h.events()
    assert h.connect.close() is False


def test_revocation_of_another_session_does_not_close_this_one() -> None:
    h = Harness()
    effect = run(
        h,
        auth(),
        snap(5, frozenset({X})),
        at={"snapshot": lambda: h.deliver(revocation(6, session="s_other"))},
    )
    assert effect == Live(W, ALICE)


# --------------------------------------------------------------------------- membership


@pytest.mark.parametrize("step", ["subscribe", "snapshot"])
def test_join_after_the_snapshot_applies_from_that_event(step: str) -> None:
    h = Harness()
    seq = 6 if step == "snapshot" else 5

    def join() -> None:
        h.deliver(event(seq, "joined", channel_id=Y, joins=(ALICE,)))

    run(h, auth(), snap(5, frozenset({X})), at={step: join})
    h.deliver(event(7, "y7", channel_id=Y))
    # Before the attach the join is in the snapshot (the driver's snapshot would list Y);
    # here the snapshot says X only, so the seq-5 join is not re-applied: Y stays unknown.
    expected = [b"joined", b"y7"] if step == "snapshot" else []
    assert h.events() == expected


def test_leave_after_the_snapshot_stops_delivery_at_that_event() -> None:
    h = Harness()
    leave = event(6, "left", channel_id=X, user_ids=frozenset({ALICE}), leaves=(ALICE,))
    run(
        h,
        auth(),
        snap(5, frozenset({X})),
        at={"snapshot": lambda: h.deliver(event(6, "x6-before-leave", channel_id=X))},
    )
    h.deliver(leave, event(7, "x7", channel_id=X))
    assert h.events() == [b"x6-before-leave", b"left"]


def test_replay_judges_each_event_by_the_membership_at_that_event() -> None:
    """Alice left X at 4 and joined Y at 6 within the missed range; after it she is in Y."""
    h = Harness()
    log = [
        [event(3, "x3", channel_id=X), event(4, "left-x", channel_id=X, leaves=(ALICE,))],
        [event(5, "x5", channel_id=X), event(6, "joined-y", channel_id=Y, joins=(ALICE,))],
        [event(7, "y7", channel_id=Y)],
    ]
    run(h, auth(resume_seq=2), snap(7, frozenset({Y})), log=log)
    assert h.sent[1:-1] == [b"x3", b"left-x", b"joined-y", b"y7"]
    assert json.loads(h.sent[-1]) == {"type": "resumed", "seq": 7, "replayed": 4}


def test_a_single_chunk_is_not_read_twice() -> None:
    h = Harness()
    effect = h.carry(h.connect.start(auth(resume_seq=1)))
    assert isinstance(effect, Identify)
    h.carry(h.connect.identified(identity()))
    h.carry(h.connect.subscribed())
    assert isinstance(h.carry(h.connect.snapshot_taken(snap(2, frozenset({X})))), CheckWindow)
    assert isinstance(h.carry(h.connect.window_checked(True)), ScanReplay)
    chunk = [event(2, "x2", channel_id=X)]
    h.connect.scan(chunk)
    stream = h.carry(h.connect.scanned())
    assert isinstance(stream, StreamReplay) and stream.cached == (chunk,)


def test_backlog_filter_follows_role_changes() -> None:
    """A guest promoted to member inside the range sees public metadata from then on."""
    readers = frozenset({"owner", "admin", "member"})
    f = BacklogFilter(ALICE, "member", set())
    chunk = [
        event(1, "before", channel_id=X, roles=readers),
        event(2, "promoted", user_ids=frozenset({ALICE}), role_change=(ALICE, "guest", "member")),
        event(3, "after", channel_id=X, roles=readers),
    ]
    f.scan(chunk)
    f.start()
    assert f.visible(chunk) == [b"promoted", b"after"]


# --------------------------------------------------------------------------- resume verdicts


@pytest.mark.parametrize(
    ("request_", "holds", "error"),
    [
        (auth(resume_seq=2, session="s_other"), True, "session_mismatch"),
        (auth(resume_seq=9), True, "future_seq"),
        (auth(resume_seq=2), False, "too_old"),
    ],
)
def test_refused_resume_still_authenticates(request_: wire.Auth, holds: bool, error: str) -> None:
    h = Harness()
    effect = run(h, request_, snap(5, frozenset({X})), holds=holds)
    assert effect == Live(W, ALICE)
    data = json.loads(h.sent[0])["data"]
    assert (data["resumed"], data["resume_error"]) == (False, error)


def test_resume_at_the_snapshot_needs_no_replay() -> None:
    h = Harness()
    assert run(h, auth(resume_seq=5), snap(5, frozenset({X}))) == Live(W, ALICE)
    assert h.received() == ["reply", "resumed"]


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("step", ["identify", "subscribe", "snapshot", "window", "scan"])
@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (StorageError("connection lost"), CloseCode.TRY_AGAIN_LATER, None),
        (RuntimeError("a bug"), CloseCode.INTERNAL_ERROR, "internal_error"),
        (ChatError(ErrorCode.INVALID_AUTH), CloseCode.POLICY_VIOLATION, "invalid_auth"),
    ],
)
def test_defect_03_a_failure_at_each_step_answers_the_auth_and_closes(
    step: str, exc: Exception, code: CloseCode, reason: str | None, caplog: Any
) -> None:
    """Defect 3: every connect failure has a reply naming the auth and a close code, and a
    failed connect never marks the user's other connections away."""
    h = Harness()
    steps = ["identify", "subscribe", "snapshot", "window", "scan"]
    effect = h.carry(h.connect.start(auth(resume_seq=2)))
    feed: list[Callable[[], list[Effect]]] = [
        lambda: h.connect.identified(identity()),
        lambda: h.connect.subscribed(),
        lambda: h.connect.snapshot_taken(snap(5, frozenset({X}))),
        lambda: h.connect.window_checked(True),
        lambda: h.connect.scanned(),
    ]
    for name, outcome in zip(steps, feed, strict=True):
        if name == step:
            effect = h.carry(h.connect.failed(exc))
            break
        effect = h.carry(outcome())
    assert isinstance(effect, Close) and effect.code == code
    error = json.loads(h.sent[-1])
    assert error["type"] == "error" and error["reply_to"] == "a1"
    if reason is not None:
        assert effect.reason == reason == error["code"]
    assert h.protocol.state is State.CLOSED
    assert h.connect.close() is False
    h.deliver(event(6, "x6", channel_id=X))
    assert h.events() == []  # detached


def test_defect_20_log_lost_during_the_scan_answers_too_old_and_goes_live() -> None:
    """The log was pruned or trimmed after ``holds`` said yes: nothing was sent yet, so the
    answer is an honest too_old, never a replay with a gap."""
    h = Harness()
    h.carry(h.connect.start(auth(resume_seq=2)))
    h.carry(h.connect.identified(identity()))
    h.carry(h.connect.subscribed())
    h.carry(h.connect.snapshot_taken(snap(5, frozenset({X}))))
    h.carry(h.connect.window_checked(True))
    assert isinstance(h.carry(h.connect.failed(ReplayLost("gone"))), Ready)
    assert h.carry(h.connect.ready()) == Live(W, ALICE)
    data = json.loads(h.sent[0])["data"]
    assert (data["resumed"], data["resume_error"]) == (False, "too_old")


def test_defect_20_log_lost_during_the_stream_closes_for_a_new_resume() -> None:
    h = Harness()
    h.carry(h.connect.start(auth(resume_seq=2)))
    h.carry(h.connect.identified(identity()))
    h.carry(h.connect.subscribed())
    h.carry(h.connect.snapshot_taken(snap(5, frozenset({X}))))
    h.carry(h.connect.window_checked(True))
    h.connect.scan([event(3, "x3", channel_id=X)])
    h.connect.scan([event(4, "x4", channel_id=X), event(5, "x5", channel_id=X)])
    assert isinstance(h.carry(h.connect.scanned()), StreamReplay)
    effect = h.carry(h.connect.failed(ReplayLost("gone")))
    assert effect == Close(CloseCode.SLOW_CONSUMER, "replay_lost")
    assert h.connect.close() is False


@pytest.mark.parametrize(
    ("resume", "step"),
    [(True, step) for step in ("snapshot", "window", "scan", "stream", "ready")]
    + [(False, "snapshot"), (False, "ready")],
)
def test_buffered_events_leave_after_the_reply_and_the_replay(resume: bool, step: str) -> None:
    """On the wire the client reads the auth reply, then the replay, then ``resumed``, then
    what committed meanwhile: never a buffered event ahead of the frames before it."""
    h = Harness()
    log = [[event(3, "m3", channel_id=X)]]
    request = auth(resume_seq=2) if resume else auth()
    commit = {step: lambda: h.deliver(event(4, "after", channel_id=X))}
    effect = run(h, request, snap(3, frozenset({X})), log=log, at=commit)
    assert effect == Live(W, ALICE)
    expected = ["reply", "m3", "resumed", "after"] if resume else ["reply", "after"]
    assert h.on_the_wire() == expected
