"""flannel/cache.py and flannel/answers.py without sockets: a workspace cache fed envelopes
built exactly as chat's handlers emit them, and its answers compared with what chat answers
(the rules of chat/handlers/access.py and the SQL of chat/storage/queries.py, restated
trivially in :class:`Reference`)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from chat import wire
from chat.bus import Audience, Envelope
from chat.errors import ChatError
from chat.handlers.access import channel_audience, user_audience
from chat.service import loaded_frame
from chat.storage.queries import WorkspaceModel
from flannel import answers
from flannel.cache import WorkspaceCache

W = 1
T0 = 1_764_348_000_000

# --------------------------------------------------------------------------- building blocks


def user(uid: int, handle: str, role: str = "member", **fields: Any) -> wire.User:
    return wire.User(
        id=uid,
        workspace_id=W,
        handle=handle,
        display_name=fields.pop("display_name", handle.title()),
        role=role,
        **fields,
    )


def channel(cid: int, name: str, kind: str = "public", **fields: Any) -> wire.Channel:
    return wire.Channel(
        id=cid,
        workspace_id=W,
        kind=kind,
        name=name,
        created_by=fields.pop("created_by", 1),
        created_at=fields.pop("created_at", T0 + cid),
        **fields,
    )


def env(seq: int | None, frame: wire.Frame, audience: Audience) -> Envelope:
    type_ = frame.type  # type: ignore[attr-defined]
    return Envelope(W, seq, type_, wire.dump(frame), audience)


def user_event(seq: int, u: wire.User, kind: str = "user.updated") -> Envelope:
    frame = wire.UserChanged(type=kind, seq=seq, workspace_id=W, ts=T0, user=u)
    return env(seq, frame, user_audience(u))


def channel_event(
    seq: int, c: wire.Channel, kind: str = "channel.updated", joins: tuple[int, ...] = ()
) -> Envelope:
    frame = wire.ChannelChanged(type=kind, seq=seq, workspace_id=W, ts=T0, channel=c)
    return env(seq, frame, channel_audience(c, joins=joins))


def member_event(seq: int, cid: int, uid: int, joined: bool = True, by: int = 0) -> Envelope:
    kind = "channel.member_joined" if joined else "channel.member_left"
    frame = wire.MemberChanged(
        type=kind,
        seq=seq,
        workspace_id=W,
        ts=T0,
        channel_id=cid,
        user_id=uid,
        by_user_id=by or uid,
    )
    if joined:
        return env(seq, frame, Audience(channel_id=cid, joins=(uid,)))
    return env(seq, frame, Audience(channel_id=cid, user_ids=frozenset({uid}), leaves=(uid,)))


def posted(seq: int, cid: int, channel_seq: int, ts: int, uid: int = 1, root: int | None = None):
    message = wire.Message(
        id=seq,
        channel_id=cid,
        seq=channel_seq,
        user_id=uid,
        client_msg_id=f"m{seq}",
        text="hello",
        ts=ts,
        thread_root_id=root,
    )
    frame = wire.MessagePosted(seq=seq, workspace_id=W, ts=ts, message=message)
    return env(seq, frame, Audience(channel_id=cid))


def unparsable(seq: int | None, type_: str, cid: int | None = None) -> Envelope:
    """An event the cache must not parse: its payload is not even JSON."""
    return Envelope(W, seq, type_, b"\xff not json", Audience(channel_id=cid))


# The seeded workspace: olivia owner, adam admin, mia and max members, gus guest, mallory a
# member in no channel, dora deactivated; general public (all but mallory), secret private
# (olivia, mia), a DM mia-max, a group DM mia-max-gus, an archived public channel (max).
OLIVIA, ADAM, MIA, MAX, GUS, MALLORY, DORA = 1, 2, 3, 4, 5, 6, 7
GENERAL, SECRET, DM, GROUP, OLD = 10, 11, 12, 13, 14
USERS = [
    user(OLIVIA, "olivia", "owner", real_name="Olivia Núñez"),
    user(ADAM, "adam", "admin", real_name="Adam Smith"),
    user(MIA, "mia", real_name="Mia José"),
    user(MAX, "max", real_name="Max Zoë"),
    user(GUS, "gus", "guest"),
    user(MALLORY, "mallory"),
    user(DORA, "dora", deactivated=True),
]
CHANNELS = [
    channel(GENERAL, "general", topic="all hands", last_seq=3),
    channel(SECRET, "secret", "private"),
    channel(DM, f"dm:{MIA},{MAX}", "dm", created_by=MIA),
    channel(GROUP, f"group_dm:{MIA},{MAX},{GUS}", "group_dm", created_by=MIA),
    channel(OLD, "old-news", archived=True),
]
MEMBERS = {
    GENERAL: [OLIVIA, ADAM, MIA, MAX, GUS],
    SECRET: [OLIVIA, MIA],
    DM: [MIA, MAX],
    GROUP: [MIA, MAX, GUS],
    OLD: [MAX],
}
LAST_TS = {GENERAL: T0 + 300, DM: T0 + 100, GROUP: T0 + 200}


def seeded_model(seq: int = 50) -> WorkspaceModel:
    return WorkspaceModel(
        seq=seq,
        name="acme",
        users=list(USERS),
        channels=list(CHANNELS),
        members={cid: list(ids) for cid, ids in MEMBERS.items()},
        last_ts=dict(LAST_TS),
    )


def seeded() -> WorkspaceCache:
    return WorkspaceCache.from_model(W, seeded_model())


def code(call: Any, *args: Any, **kwargs: Any) -> str:
    try:
        call(*args, **kwargs)
    except ChatError as exc:
        return exc.code.value
    return "ok"


# --------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """The workspace as plain dicts and a set of (channel, user) pairs, changed the obvious
    way; its answers restate chat's handlers and queries as directly as possible."""

    seq: int = 0
    name: str = "acme"
    users: dict[int, wire.User] = field(default_factory=dict)
    channels: dict[int, wire.Channel] = field(default_factory=dict)
    pairs: set[tuple[int, int]] = field(default_factory=set)
    last_seq: dict[int, int] = field(default_factory=dict)
    last_ts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: WorkspaceModel) -> Reference:
        ref = cls(model.seq, model.name)
        ref.users = {u.id: u for u in model.users}
        ref.channels = {c.id: c for c in model.channels}
        ref.pairs = {(cid, uid) for cid, ids in model.members.items() for uid in ids}
        ref.last_seq = {c.id: c.last_seq for c in model.channels}
        ref.last_ts = dict(model.last_ts)
        return ref

    def model(self) -> WorkspaceModel:
        members: dict[int, list[int]] = {}
        for cid, uid in sorted(self.pairs):
            members.setdefault(cid, []).append(uid)
        return WorkspaceModel(
            seq=self.seq,
            name=self.name,
            users=list(self.users.values()),
            channels=[self.channel(cid) for cid in self.channels],
            members=members,
            last_ts=dict(self.last_ts),
        )

    # what the store holds

    def member_ids(self, cid: int) -> list[int]:
        return sorted(uid for c, uid in self.pairs if c == cid)

    def channel(self, cid: int) -> wire.Channel:
        return self.channels[cid].model_copy(
            update={"member_count": len(self.member_ids(cid)), "last_seq": self.last_seq[cid]}
        )

    # chat's answers

    def actor(self, uid: int) -> wire.User:
        me = self.users.get(uid)
        if me is None or me.deactivated:
            raise ChatError(wire_code("account_inactive"))
        return me

    def visible(self, me: wire.User, cid: int) -> wire.Channel:
        if cid not in self.channels:
            raise ChatError(wire_code("channel_not_found"))
        member = (cid, me.id) in self.pairs
        reader = me.role in ("owner", "admin", "member")
        if not member and (self.channels[cid].kind != "public" or not reader):
            raise ChatError(wire_code("channel_not_found"))
        return self.channel(cid)

    def users_info(self, uid: int, ids: list[int]) -> wire.Users:
        self.actor(uid)
        return wire.Users(users=[self.users[i] for i in sorted(set(ids)) if i in self.users])

    def channels_info(self, uid: int, cid: int) -> wire.ChannelData:
        return wire.ChannelData(channel=self.visible(self.actor(uid), cid))

    def channels_members(self, uid: int, cid: int, cursor: int, limit: int) -> wire.MemberPage:
        self.visible(self.actor(uid), cid)
        ids = [i for i in self.member_ids(cid) if i > cursor][:limit]
        return wire.MemberPage(user_ids=ids, next_cursor=ids[-1] if len(ids) == limit else None)

    def bootstrap(self, uid: int) -> wire.BootstrapData:
        me = self.actor(uid)
        mine = sorted(cid for cid, u in self.pairs if u == uid)
        rows = []
        partners: set[int] = set()
        for cid in mine:
            c = self.channel(cid)
            dm = [i for i in self.member_ids(cid) if i != uid] if c.kind.endswith("dm") else []
            partners.update(dm)
            rows.append(
                wire.BootstrapChannel(
                    id=cid,
                    kind=c.kind,
                    name=c.name,
                    topic=c.topic,
                    archived=c.archived,
                    member_count=c.member_count,
                    last_seq=c.last_seq,
                    last_ts=self.last_ts.get(cid),
                    last_read_seq=0,
                    unread=0,
                    mentions=0,
                    dm_user_ids=dm,
                )
            )
        return wire.BootstrapData(
            seq=self.seq,
            user=me,
            workspace=wire.WorkspaceInfo(id=W, name=self.name),
            channels=rows,
            users=[self.users[i] for i in sorted(partners)],
        )

    # changes, as the store makes them

    def apply(self, envelopes: Iterable[Envelope]) -> None:
        for e in envelopes:
            if e.seq is None or e.seq <= self.seq:
                continue
            self.seq = e.seq
            if e.type.startswith("user."):
                u = wire.UserChanged.model_validate_json(e.payload).user
                self.users[u.id] = u
            elif e.type.startswith("channel.member_"):
                m = wire.MemberChanged.model_validate_json(e.payload)
                if e.type == "channel.member_joined":
                    self.pairs.add((m.channel_id, m.user_id))
                else:
                    self.pairs.discard((m.channel_id, m.user_id))
            elif e.type.startswith("channel."):
                c = wire.ChannelChanged.model_validate_json(e.payload).channel
                self.channels[c.id] = c
                self.last_seq[c.id] = max(self.last_seq.get(c.id, 0), c.last_seq)
                if e.type == "channel.created":
                    self.pairs.update((c.id, uid) for uid in e.audience.joins)
            elif e.type == "message.posted":
                msg = wire.MessagePosted.model_validate_json(e.payload).message
                if msg.seq >= self.last_seq[msg.channel_id]:
                    self.last_seq[msg.channel_id] = msg.seq
                    self.last_ts[msg.channel_id] = msg.ts


def wire_code(value: str) -> Any:
    from chat.errors import ErrorCode

    return ErrorCode(value)


def outcome(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except ChatError as exc:
        return exc.code.value


def assert_same_answers(cache: WorkspaceCache, ref: Reference) -> None:
    """Every lazy look-up and the bootstrap of every user, as chat would answer them."""
    assert cache.seq == ref.seq
    all_users = sorted(ref.users)
    for uid in [*all_users, 999]:
        req = wire.UsersInfo(type="users.info", id="1", user_ids=[*all_users, 999, all_users[0]])
        assert outcome(answers.users_info, cache, uid, req) == outcome(
            ref.users_info, uid, req.user_ids
        )
        for cid in [*ref.channels, 998]:
            info = wire.ChannelsInfo(type="channels.info", id="2", channel_id=cid)
            assert outcome(answers.channels_info, cache, uid, info) == outcome(
                ref.channels_info, uid, cid
            ), (uid, cid)
            for cursor, limit in ((0, 2), (2, 2), (0, 100)):
                page = wire.ChannelsMembers(
                    type="channels.members", id="3", channel_id=cid, cursor=cursor, limit=limit
                )
                assert outcome(answers.channels_members, cache, uid, page) == outcome(
                    ref.channels_members, uid, cid, cursor, limit
                )
        assert outcome(answers.bootstrap, cache, uid, None, []) == outcome(ref.bootstrap, uid)


# --------------------------------------------------------------------------- loading


def loaded_of(model: WorkspaceModel) -> wire.Loaded:
    return loaded_frame(1, W, model)


def test_both_constructors_give_the_same_state() -> None:
    model = seeded_model()
    from_model = WorkspaceCache.from_model(W, model)
    from_loaded = WorkspaceCache.from_loaded(loaded_of(model))
    ref = Reference.of(model)
    for cache in (from_model, from_loaded):
        assert cache.seq == 50 and cache.name == "acme" and cache.workspace_id == W
        assert_same_answers(cache, ref)
        assert cache.channel(GENERAL) == ref.channel(GENERAL)
        assert cache.channel(GENERAL).member_count == 5  # type: ignore[union-attr]
        assert cache.last_ts(DM) == T0 + 100 and cache.last_ts(SECRET) is None


def test_member_count_is_the_member_set_size_whatever_the_load_said() -> None:
    model = seeded_model()
    model.channels[0] = model.channels[0].model_copy(update={"member_count": 42})
    assert WorkspaceCache.from_model(W, model).channel(GENERAL).member_count == 5  # type: ignore[union-attr]


# --------------------------------------------------------------------------- each event kind


def test_user_created_and_updated() -> None:
    cache = seeded()
    zed = user(20, "zed", real_name="Zédé Quux")
    cache.apply([user_event(51, zed, "user.created")])
    assert cache.user(20) == zed and cache.seq == 51
    assert [u.id for u in ac_users(cache, MIA, "zede")] == [20]
    renamed = zed.model_copy(update={"display_name": "Quentin", "handle": "quentin"})
    cache.apply([user_event(52, renamed)])
    assert cache.user(20) == renamed
    assert [u.id for u in ac_users(cache, MIA, "zed")] == [20]  # still a word of the real name
    assert [u.id for u in ac_users(cache, MIA, "quen")] == [20]
    promoted = renamed.model_copy(update={"role": "admin"})
    cache.apply([user_event(53, promoted)])
    assert cache.user(20).role == "admin"  # type: ignore[union-attr]


def test_deactivation_hides_the_user_and_refuses_the_caller() -> None:
    cache = seeded()
    assert [u.id for u in ac_users(cache, OLIVIA, "max")] == [MAX]
    cache.apply([user_event(51, USERS[MAX - 1].model_copy(update={"deactivated": True}))])
    assert ac_users(cache, OLIVIA, "max") == []
    req = wire.UsersInfo(type="users.info", id="1", user_ids=[MAX])
    assert answers.users_info(cache, OLIVIA, req).users[0].deactivated  # still looked up
    assert code(answers.users_info, cache, MAX, req) == "account_inactive"
    assert code(answers.bootstrap, cache, MAX, None, []) == "account_inactive"


def test_channel_created_with_its_members_from_the_audience() -> None:
    cache = seeded()
    new = channel(30, "launch", "private", created_by=MIA, member_count=1)
    cache.apply([channel_event(51, new, "channel.created", joins=(MIA,))])
    assert cache.members(30) == {MIA} and cache.channels_of(MIA) >= {30}
    assert cache.channel(30) == new
    dm = channel(31, f"dm:{OLIVIA},{GUS}", "dm", created_by=OLIVIA, created_at=T0 + 999)
    cache.apply([channel_event(52, dm, "channel.created", joins=(OLIVIA, GUS))])
    assert cache.members(31) == {OLIVIA, GUS}
    assert cache.channel(31).member_count == 2  # type: ignore[union-attr]
    assert cache.recent_contacts(GUS)[0] == OLIVIA  # opened after the last message of the others


def test_channel_updated_archived_unarchived() -> None:
    cache = seeded()
    renamed = CHANNELS[0].model_copy(update={"name": "town-square", "topic": "new"})
    cache.apply([channel_event(51, renamed)])
    assert cache.channel(GENERAL).name == "town-square"  # type: ignore[union-attr]
    assert ac_channels(cache, MIA, "gen") == []
    assert ac_channels(cache, MIA, "town") == [GENERAL]
    assert ac_channels(cache, MIA, "squ") == [GENERAL]
    archived = renamed.model_copy(update={"archived": True})
    cache.apply([channel_event(52, archived, "channel.archived")])
    assert cache.channel(GENERAL).archived  # type: ignore[union-attr]
    cache.apply([channel_event(53, renamed, "channel.unarchived")])
    assert not cache.channel(GENERAL).archived  # type: ignore[union-attr]
    assert cache.seq == 53


def test_member_joined_and_left() -> None:
    cache = seeded()
    assert cache.members_page(GENERAL, 0, 100) == [OLIVIA, ADAM, MIA, MAX, GUS]  # now sorted
    cache.apply([member_event(51, GENERAL, MALLORY)])
    assert MALLORY in cache.members(GENERAL) and cache.channels_of(MALLORY) == {GENERAL}
    assert cache.channel(GENERAL).member_count == 6  # type: ignore[union-attr]
    assert cache.members_page(GENERAL, MAX, 100) == [GUS, MALLORY]
    cache.apply([member_event(52, GENERAL, ADAM, joined=False, by=OLIVIA)])
    assert cache.members_page(GENERAL, 0, 100) == [OLIVIA, MIA, MAX, GUS, MALLORY]
    assert cache.channel(GENERAL).member_count == 5  # type: ignore[union-attr]
    cache.apply([member_event(53, OLD, MAX, joined=False)])
    assert cache.members(OLD) == set() and OLD not in cache.channels_of(MAX)
    assert cache.channel(OLD).member_count == 0  # type: ignore[union-attr]


def test_message_posted_moves_last_activity_thread_replies_too() -> None:
    cache = seeded()
    cache.apply([posted(51, GENERAL, 4, T0 + 400)])
    assert cache.channel(GENERAL).last_seq == 4 and cache.last_ts(GENERAL) == T0 + 400  # type: ignore[union-attr]
    cache.apply([posted(52, GENERAL, 5, T0 + 500, root=51)])
    assert cache.channel(GENERAL).last_seq == 5 and cache.last_ts(GENERAL) == T0 + 500  # type: ignore[union-attr]
    cache.apply([posted(53, SECRET, 1, T0 + 600)])
    assert cache.last_ts(SECRET) == T0 + 600


def test_other_events_only_move_seq_and_are_never_parsed() -> None:
    cache = seeded()
    before = answers.bootstrap(cache, MIA, None, [])
    cache.apply(
        [
            unparsable(51, "message.edited", GENERAL),
            unparsable(52, "message.deleted", GENERAL),
            unparsable(53, "reaction.added", GENERAL),
            unparsable(54, "thread.updated", GENERAL),
            unparsable(55, "mention", GENERAL),
            unparsable(56, "read_marker.updated"),
            unparsable(57, "session.revoked"),
            unparsable(None, "typing", GENERAL),
            unparsable(None, "presence"),
        ]
    )
    assert cache.seq == 57
    assert answers.bootstrap(cache, MIA, None, []) == before.model_copy(update={"seq": 57})


def test_old_seqs_and_other_workspaces_are_ignored() -> None:
    cache = seeded()
    cache.apply([member_event(50, GENERAL, MALLORY), member_event(12, SECRET, MAX)])
    assert MALLORY not in cache.members(GENERAL) and MAX not in cache.members(SECRET)
    other = member_event(60, GENERAL, MALLORY)
    cache.apply([Envelope(2, 60, other.type, other.payload, other.audience)])
    assert MALLORY not in cache.members(GENERAL) and cache.seq == 50
    cache.apply([posted(61, GENERAL, 9, T0 + 900), posted(61, GENERAL, 10, T0 + 999)])
    assert cache.last_seq(GENERAL) == 9  # the second 61 is a duplicate delivery


def test_reapplying_what_the_load_already_reflected_changes_nothing() -> None:
    """A read at seq 50 that already saw events 51-56 (workspace_model reads seq first),
    then those events: the cache converges to the store after the last one."""
    start = Reference.of(seeded_model())
    events = [
        member_event(51, GENERAL, MALLORY),
        channel_event(52, channel(30, "launch", created_by=MIA), "channel.created", joins=(MIA,)),
        member_event(53, 30, MAX),
        member_event(54, 30, MIA, joined=False),
        posted(55, GENERAL, 4, T0 + 400),
        user_event(56, USERS[MIA - 1].model_copy(update={"display_name": "Mimi"})),
        channel_event(57, CHANNELS[0].model_copy(update={"topic": "t", "last_seq": 3})),
    ]
    end = Reference.of(seeded_model())
    end.apply(events)
    for seen in range(len(events) + 1):  # how many of them the read reflected
        partial = Reference.of(seeded_model())
        partial.apply(events[:seen])
        model = partial.model()
        model = WorkspaceModel(
            50, model.name, model.users, model.channels, model.members, model.last_ts
        )
        cache = WorkspaceCache.from_model(W, model)
        cache.apply(events)
        assert_same_answers(cache, end)
        assert cache.channel(GENERAL).last_seq == 4  # type: ignore[union-attr]
        cache.apply(events)  # and again, by seq: nothing
        assert_same_answers(cache, end)
    assert start.seq == 50


# --------------------------------------------------------------------------- visibility

# (caller, channel) -> channels.info outcome, as chat/handlers/access.py rules it.
VISIBILITY = [
    (MIA, GENERAL, "ok"),  # public, member
    (MALLORY, GENERAL, "ok"),  # public, not a member, may read public
    (GUS, GENERAL, "ok"),  # guest, member
    (GUS, OLD, "channel_not_found"),  # guest, public, not a member
    (MIA, SECRET, "ok"),  # private, member
    (MAX, SECRET, "channel_not_found"),  # private, not a member
    (ADAM, SECRET, "channel_not_found"),  # admins too
    (OLIVIA, SECRET, "ok"),
    (MAX, DM, "ok"),  # DM, member
    (OLIVIA, DM, "channel_not_found"),  # DM, not a member, even the owner
    (GUS, GROUP, "ok"),
    (ADAM, GROUP, "channel_not_found"),
    (MALLORY, OLD, "ok"),  # archived public: still readable
    (DORA, GENERAL, "account_inactive"),  # deactivated caller
    (MIA, 999, "channel_not_found"),  # no such channel
    (999, GENERAL, "account_inactive"),  # no such user
]


@pytest.mark.parametrize(("caller", "cid", "expected"), VISIBILITY)
def test_visibility_matches_chat(caller: int, cid: int, expected: str) -> None:
    cache = seeded()
    ref = Reference.of(seeded_model())
    info = wire.ChannelsInfo(type="channels.info", id="1", channel_id=cid)
    assert code(answers.channels_info, cache, caller, info) == expected
    assert code(ref.channels_info, caller, cid) == expected
    page = wire.ChannelsMembers(type="channels.members", id="2", channel_id=cid)
    assert code(answers.channels_members, cache, caller, page) == expected
    ac = wire.UsersAutocomplete(type="users.autocomplete", id="3", query="m", channel_id=cid)
    assert code(answers.users_autocomplete, cache, caller, ac) == expected
    if expected == "ok":
        assert answers.channels_info(cache, caller, info).channel == ref.channel(cid)


def test_the_whole_seeded_workspace_answers_like_chat() -> None:
    assert_same_answers(seeded(), Reference.of(seeded_model()))


# --------------------------------------------------------------------------- paging


def test_member_pages_follow_chat_cursors() -> None:
    cache = seeded()
    for uid in range(100, 125):
        cache.apply([member_event(cache.seq + 1, GENERAL, uid)])
    everyone = sorted(cache.members(GENERAL))
    got: list[int] = []
    cursor: int | None = 0
    pages = 0
    while cursor is not None:
        page = answers.channels_members(
            cache,
            MIA,
            wire.ChannelsMembers(
                type="channels.members", id="p", channel_id=GENERAL, cursor=cursor, limit=10
            ),
        )
        got += page.user_ids
        cursor = page.next_cursor
        pages += 1
    assert got == everyone and pages == 4  # three full pages say "more", the fourth is empty
    last = answers.channels_members(
        cache,
        MIA,
        wire.ChannelsMembers(
            type="channels.members", id="p", channel_id=GENERAL, cursor=everyone[-1], limit=10
        ),
    )
    assert last.user_ids == [] and last.next_cursor is None


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_content() -> None:
    cache = seeded()
    counts = [
        wire.ChannelCounts(channel_id=GENERAL, last_read_seq=1, unread=2, mentions=1),
        wire.ChannelCounts(channel_id=SECRET, last_read_seq=0, unread=0, mentions=0),
    ]
    data = answers.bootstrap(cache, MIA, None, counts)
    assert data.seq == 50 and data.user == USERS[MIA - 1]
    assert data.workspace == wire.WorkspaceInfo(id=W, name="acme")
    assert data.channels is not None
    rows = {c.id: c for c in data.channels}
    assert list(rows) == [GENERAL, SECRET, DM, GROUP]
    g = rows[GENERAL]
    assert (g.name, g.topic, g.member_count, g.last_seq, g.last_ts) == (
        "general",
        "all hands",
        5,
        3,
        T0 + 300,
    )
    assert (g.last_read_seq, g.unread, g.mentions, g.dm_user_ids) == (1, 2, 1, [])
    assert rows[DM].dm_user_ids == [MAX] and rows[GROUP].dm_user_ids == [MAX, GUS]
    assert (rows[DM].unread, rows[DM].last_read_seq) == (0, 0)  # not in counts
    assert rows[SECRET].last_ts is None
    assert [u.id for u in data.users or []] == [MAX, GUS]  # DM partners only
    # Archived channels the caller is in stay, flagged.
    rows = {c.id: c for c in answers.bootstrap(cache, MAX, None, []).channels or []}
    assert rows[OLD].archived and not rows[GENERAL].archived
    # A member of no channel: nothing but itself.
    lone = answers.bootstrap(cache, MALLORY, None, [])
    assert lone.channels == [] and lone.users == []


@pytest.mark.parametrize(
    "parts", [["user"], ["workspace"], ["channels"], ["users"], ["channels", "users"]]
)
def test_bootstrap_parts(parts: list[wire.BootstrapPart]) -> None:
    cache = seeded()
    full = answers.bootstrap(cache, MIA, None, [])
    some = answers.bootstrap(cache, MIA, parts, [])
    for part in ("user", "workspace", "channels", "users"):
        assert getattr(some, part) == (getattr(full, part) if part in parts else None)
    assert some.seq == full.seq


def test_bootstrap_is_small_for_a_member_of_twenty_channels() -> None:
    users = [user(i, f"user{i}", real_name=f"Some Body{i}") for i in range(1, 5001)]
    channels = [channel(10_000 + i, f"channel-{i}", topic="x" * 40) for i in range(20)]
    dms = [channel(20_000 + i, f"dm:1,{i + 2}", "dm") for i in range(5)]
    members = {c.id: list(range(1, 5001)) for c in channels}
    members.update({c.id: [1, i + 2] for i, c in enumerate(dms)})
    cache = WorkspaceCache.from_model(
        W, WorkspaceModel(1, "big", users, channels + dms, members, {})
    )
    data = answers.bootstrap(cache, 1, None, [])
    size = len(data.__pydantic_serializer__.to_json(data))
    assert len(data.channels or []) == 25 and len(data.users or []) == 5
    assert size < 8_000, size


# --------------------------------------------------------------------------- recent contacts


def test_recent_contacts_by_last_activity_of_the_dm() -> None:
    cache = seeded()
    # mia: GROUP (ts 200) after DM (ts 100): max and gus from the group, max first by id.
    assert cache.recent_contacts(MIA) == [MAX, GUS]
    cache.apply([posted(51, DM, 1, T0 + 500, uid=MAX)])
    assert cache.recent_contacts(MIA) == [MAX, GUS]
    assert cache.recent_contacts(GUS) == [MIA, MAX]
    talk = channel(30, f"dm:{GUS},{OLIVIA}", "dm", created_at=T0 + 50)
    cache.apply([channel_event(52, talk, "channel.created", joins=(GUS, OLIVIA))])
    assert cache.recent_contacts(GUS) == [MIA, MAX, OLIVIA]  # opened long ago, no message
    cache.apply([posted(53, 30, 1, T0 + 900, uid=GUS)])
    assert cache.recent_contacts(GUS) == [OLIVIA, MIA, MAX]
    assert cache.recent_contacts(MALLORY) == [] and cache.recent_contacts(999) == []


# --------------------------------------------------------------------------- autocomplete


def ac_users(cache: WorkspaceCache, caller: int, query: str, **kw: Any) -> list[wire.User]:
    req = wire.UsersAutocomplete(type="users.autocomplete", id="a", query=query, **kw)
    return answers.users_autocomplete(cache, caller, req).users


def ac_channels(cache: WorkspaceCache, caller: int, query: str, limit: int = 10) -> list[int]:
    req = wire.ChannelsAutocomplete(type="channels.autocomplete", id="c", query=query, limit=limit)
    return [c.id for c in answers.channels_autocomplete(cache, caller, req).channels]


def test_users_autocomplete_ranking_and_accents() -> None:
    cache = seeded()
    assert [u.id for u in ac_users(cache, OLIVIA, "jose")] == [MIA]  # "Mia José"
    assert [u.id for u in ac_users(cache, OLIVIA, "ZOE")] == [MAX]
    assert [u.id for u in ac_users(cache, OLIVIA, "nunez")] == [OLIVIA]
    assert [u.id for u in ac_users(cache, OLIVIA, "d")] == []  # dora is deactivated
    # "m": mallory, max, mia. In secret (olivia, mia), mia first; then the recent contacts
    # of the caller; then everyone by handle.
    assert [u.id for u in ac_users(cache, OLIVIA, "m")] == [MALLORY, MAX, MIA]
    assert [u.id for u in ac_users(cache, OLIVIA, "m", channel_id=SECRET)] == [MIA, MALLORY, MAX]
    assert [u.id for u in ac_users(cache, GUS, "m")] == [MIA, MAX, MALLORY]  # group DM partners
    exact = ac_users(cache, OLIVIA, "max", channel_id=SECRET)
    assert exact[0].id == MAX  # the exact handle before the channel's members
    assert len(ac_users(cache, OLIVIA, "", limit=2)) == 2
    # The channel must be one the caller may see.
    assert code(ac_users, cache, MAX, "m", channel_id=SECRET) == "channel_not_found"
    assert code(ac_users, cache, GUS, "m", channel_id=OLD) == "channel_not_found"
    assert code(ac_users, cache, DORA, "m") == "account_inactive"


def test_channels_autocomplete_never_leaks() -> None:
    cache = seeded()
    assert ac_channels(cache, OLIVIA, "") == [GENERAL, SECRET, OLD]  # live first; no DMs
    assert ac_channels(cache, MAX, "") == [GENERAL, OLD]  # secret: not a member
    assert ac_channels(cache, MAX, "sec") == []
    assert ac_channels(cache, ADAM, "sec") == []  # admins are not members either
    assert ac_channels(cache, MIA, "sec") == [SECRET]
    assert ac_channels(cache, GUS, "") == [GENERAL]  # guests: their own channels only
    assert ac_channels(cache, MALLORY, "o") == [OLD]
    assert ac_channels(cache, MIA, "news") == [OLD]  # public and archived: readable
    assert ac_channels(cache, MALLORY, "news") == [OLD]
    assert ac_channels(cache, MIA, "dm") == []
    assert code(ac_channels, cache, DORA, "g") == "account_inactive"
    # Joining makes a private channel visible; leaving hides it again.
    cache.apply([member_event(51, SECRET, MAX)])
    assert ac_channels(cache, MAX, "sec") == [SECRET]
    cache.apply([member_event(52, SECRET, MAX, joined=False)])
    assert ac_channels(cache, MAX, "sec") == []
    # A private channel created for others never appears.
    hidden = channel(30, "secret-plans", "private", created_by=OLIVIA)
    cache.apply([channel_event(53, hidden, "channel.created", joins=(OLIVIA,))])
    assert ac_channels(cache, MAX, "secret") == [] and ac_channels(cache, OLIVIA, "secret") == [
        SECRET,
        30,
    ]


# --------------------------------------------------------------------------- randomized


def random_step(rng: random.Random, ref: Reference, next_id: list[int]) -> list[Envelope]:
    """One change as chat's handlers would emit it (sometimes with a stale or ephemeral
    event around it), drawn from the reference's current state."""
    seq = ref.seq + 1
    users = sorted(ref.users)
    channels = sorted(ref.channels)
    named = [c for c in channels if ref.channels[c].kind in ("public", "private")]
    kind = rng.choice(
        ["user.created", "profile", "role", "deactivate", "channel", "dm", "rename", "archive"]
        + ["join"] * 3
        + ["leave"] * 2
        + ["post"] * 3
        + ["other"]
    )
    out: list[Envelope] = []
    if kind == "user.created":
        uid = next_id[0] = next_id[0] + 1
        name = rng.choice(["José", "Zoë", "山田", "Anne", "Ann-Marie", "Bob"])
        out.append(user_event(seq, user(uid, f"u{uid}", real_name=f"{name} X{uid}"), kind))
    elif kind in ("profile", "role", "deactivate"):
        u = ref.users[rng.choice(users)]
        updates: dict[str, dict[str, Any]] = {
            "profile": {"display_name": rng.choice(["Jo", "Zed", "Ana", "Ünal"])},
            "role": {"role": rng.choice(["admin", "member", "guest"])},
            "deactivate": {"deactivated": True},
        }
        update = updates[kind]
        out.append(user_event(seq, u.model_copy(update=update)))
    elif kind in ("channel", "dm"):
        cid = next_id[0] = next_id[0] + 1
        creator = rng.choice(users)
        if kind == "channel":
            c = channel(cid, f"ch{cid}", rng.choice(["public", "private"]), created_by=creator)
            joins: tuple[int, ...] = (creator,)
        else:
            joins = tuple(sorted({creator, *rng.sample(users, rng.randint(1, 3))}))
            kind_ = "dm" if len(joins) <= 2 else "group_dm"
            c = channel(cid, f"{kind_}:{joins}", kind_, created_by=creator)
        c = c.model_copy(update={"member_count": len(joins), "created_at": T0 + seq})
        out.append(channel_event(seq, c, "channel.created", joins=joins))
    elif kind in ("rename", "archive") and named:
        c = ref.channel(rng.choice(named))
        if kind == "rename":
            c = c.model_copy(update={"name": f"{c.name}-x", "topic": rng.choice(["", "t"])})
            out.append(channel_event(seq, c))
        else:
            c = c.model_copy(update={"archived": not c.archived})
            out.append(
                channel_event(seq, c, "channel.archived" if c.archived else "channel.unarchived")
            )
    elif kind == "join" and named:
        out.append(member_event(seq, rng.choice(named), rng.choice(users)))
    elif kind == "leave" and ref.pairs:
        cid, uid = rng.choice(sorted(ref.pairs))
        out.append(member_event(seq, cid, uid, joined=False))
    elif kind == "post" and channels:
        cid = rng.choice(channels)
        out.append(posted(seq, cid, ref.last_seq[cid] + 1, T0 + seq * 10))
    else:
        out.append(unparsable(seq, "reaction.added"))
    if rng.random() < 0.2:  # an ephemeral event, and an old event delivered again
        out.append(unparsable(None, "typing"))
        out.append(member_event(rng.randint(1, seq), rng.choice(channels), rng.choice(users)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_random_changes_match_the_reference_and_a_fresh_load(seed: int) -> None:
    rng = random.Random(seed)
    ref = Reference.of(seeded_model())
    cache = seeded()
    next_id = [100]
    for _ in range(60):
        events = random_step(rng, ref, next_id)
        ref.apply(events)
        cache.apply(events)
        assert_same_answers(cache, ref)
        fresh = WorkspaceCache.from_model(W, ref.model())
        for uid in ref.users:
            for query in ("", "j", "jo", "zo", "u1", "an", "山", "ch1"):
                for cid in (None, GENERAL, SECRET):
                    req = wire.UsersAutocomplete(
                        type="users.autocomplete", id="u", query=query, channel_id=cid, limit=5
                    )
                    got = outcome(answers.users_autocomplete, cache, uid, req)
                    assert got == outcome(answers.users_autocomplete, fresh, uid, req)
                    if not isinstance(got, str):
                        assert not any(u.deactivated for u in got.users)
                creq = wire.ChannelsAutocomplete(type="channels.autocomplete", id="c", query=query)
                got_c = outcome(answers.channels_autocomplete, cache, uid, creq)
                assert got_c == outcome(answers.channels_autocomplete, fresh, uid, creq)
                if not isinstance(got_c, str):
                    for c in got_c.channels:  # never a channel the caller may not see
                        assert c.kind in ("public", "private")
                        assert ref.channels_info(uid, c.id).channel == c
            assert cache.recent_contacts(uid) == fresh.recent_contacts(uid)


def test_bootstrap_leaves_default_values_out_and_reads_back_the_same() -> None:
    from chat import wire

    user = wire.User(id=2, workspace_id=1, handle="ada", display_name="Ada", role="member")
    channel = wire.BootstrapChannel(id=4, kind="public", name="general", member_count=3)
    dm = wire.BootstrapChannel(
        id=5, kind="dm", name="dm", member_count=2, unread=1, dm_user_ids=[3], last_ts=7
    )
    data = wire.BootstrapData(
        seq=9, user=user, workspace=None, channels=[channel, dm], users=[user]
    )
    dumped = data.model_dump(mode="json")
    assert dumped["channels"][0] == {
        "id": 4,
        "kind": "public",
        "name": "general",
        "member_count": 3,
    }
    assert dumped["channels"][1]["dm_user_ids"] == [3] and "topic" not in dumped["channels"][1]
    assert "tz" not in dumped["user"] and "avatar_url" not in dumped["users"][0]
    assert dumped["workspace"] is None  # parts not asked for stay, as null
    assert wire.BootstrapData.model_validate(dumped) == data
