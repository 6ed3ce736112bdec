"""flannel.autocomplete and flannel.text: matching, ranking and upkeep of the completion
indexes, without sockets. The property tests compare both indexes with brute-force
implementations of the same rules, also with each of the index's cost decisions forced."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

import pytest

from chat.wire import Channel, ChannelKind, User
from flannel import autocomplete
from flannel.autocomplete import MAX_LIMIT, ChannelIndex, UserIndex, clamp_limit
from flannel.text import fold, words


def user(
    uid: int, handle: str, display: str = "", real: str = "", *, deactivated: bool = False
) -> User:
    return User(
        id=uid,
        workspace_id=1,
        handle=handle,
        display_name=display or handle,
        real_name=real,
        role="member",
        deactivated=deactivated,
    )


def channel(
    cid: int, name: str, *, kind: ChannelKind = "public", archived: bool = False
) -> Channel:
    return Channel(
        id=cid,
        workspace_id=1,
        kind=kind,
        name=name,
        archived=archived,
        created_by=1,
        created_at=0,
    )


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("raw", "folded"),
    [
        ("José", "jose"),
        ("JOSÉ", "jose"),
        ("Zoë", "zoe"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),
        ("山田太郎", "山田太郎"),
        ("\uff2a\uff4f\uff53\uff45", "jose"),  # full-width
        ("Łukasz Søren Ærø", "lukasz soren aero"),
        ("ごとう", "ごとう"),  # the voicing mark is kept
        ("\uff7a\uff9e\uff84\uff73", "ゴトウ"),  # half-width katakana, voicing mark composed
        ("김철수", "김철수"),
        ("İstanbul", "istanbul"),
        ("", ""),
    ],
)
def test_fold(raw: str, folded: str) -> None:
    assert fold(raw) == folded
    assert fold(folded) == folded


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("jean-luc o'brien", ["jean", "luc", "o", "brien"]),
        ("José  García", ["José", "García"]),
        ("ana_maria.cruz", ["ana", "maria", "cruz"]),
        ("山田 太郎", ["山田", "太郎", "山田太郎"]),
        ("山田太郎", ["山田太郎"]),
        ("ジョン・スミス", ["ジョン", "スミス", "ジョンスミス"]),
        ("田中Mike", ["田中", "Mike", "田中Mike"]),
        ("bob bob", ["bob"]),
        (" -.", []),
        ("", []),
    ],
)
def test_words(raw: str, expected: list[str]) -> None:
    assert words(raw) == expected


# --------------------------------------------------------------------------- users: matching


def test_accents_both_ways() -> None:
    idx = UserIndex([user(1, "jgarcia", "José García"), user(2, "jl", "josé luis")])
    assert idx.complete("jose") == [1, 2]
    assert idx.complete("JOSÉ") == [1, 2]
    assert idx.complete("josé l") == [2]
    assert idx.complete("garcia") == [1]
    assert idx.complete("GARCÍA") == [1]


def test_zoe_finds_zoe_with_diaeresis() -> None:
    idx = UserIndex([user(1, "zb", "Zoë Baker"), user(2, "zach")])
    assert idx.complete("zoe") == [1]
    assert idx.complete("ZOË") == [1]


def test_sharp_s_and_ss() -> None:
    idx = UserIndex([user(1, "ks", "Karl Straße"), user(2, "ms", "Mia Strasse")])
    assert idx.complete("strasse") == [1, 2]
    assert idx.complete("STRASSE") == [1, 2]
    assert idx.complete("straße") == [1, 2]
    assert idx.complete("straß") == [1, 2]


def test_cjk_prefix() -> None:
    idx = UserIndex(
        [
            user(1, "yamada", "山田太郎"),
            user(2, "tanaka", "tanaka", "田中 花子"),
            user(3, "kim", "김철수"),
            user(4, "yamamoto", "山本"),
        ]
    )
    assert idx.complete("山田") == [1]
    assert idx.complete("山") == [1, 4]
    assert idx.complete("花子") == [2]  # a word of the real name
    assert idx.complete("田中花") == [2]  # a prefix of the whole CJK real name
    assert idx.complete("김") == [3]
    assert idx.complete("太郎") == []  # not a prefix of a word


def test_each_word_of_the_real_name() -> None:
    idx = UserIndex([user(1, "amc", "Ana", "Ana María de la Cruz"), user(2, "zz")])
    for q in ["ana", "maria", "MARÍA", "de", "la", "cruz", "cr"]:
        assert idx.complete(q) == [1], q
    assert idx.complete("maria de") == []  # the real name matches word by word only


def test_display_name_prefix_and_words() -> None:
    idx = UserIndex([user(1, "ghopper", "Grace Hopper"), user(2, "gh")])
    assert idx.complete("grace h") == [1]
    assert idx.complete("hop") == [1]
    assert idx.complete("gh") == [2, 1]  # exact handle first, then the handle prefix


def test_no_match_is_empty() -> None:
    idx = UserIndex([user(1, "ada")])
    assert idx.complete("x") == []
    assert UserIndex().complete("a") == []
    assert UserIndex().complete("") == []


# --------------------------------------------------------------------------- users: ranking


def ranking_index() -> UserIndex:
    return UserIndex(
        [
            user(1, "al"),  # exact handle, not a member
            user(2, "alice"),  # member, handle prefix
            user(3, "bob", "Albert Bob"),  # member, name word
            user(4, "aldo"),  # member, handle prefix
            user(5, "carl"),  # recent, no match
            user(6, "zara", "Zara", "Alana Zee"),  # recent, real-name word
            user(7, "alfred"),  # recent, handle prefix
            user(8, "alvin"),  # everyone else, handle prefix
            user(9, "yan", "Alba"),  # everyone else, display name
            user(10, "albus"),  # everyone else, handle prefix
            user(11, "dora", "Dora"),  # member, no match
        ]
    )


def test_ranking_tiers_in_order() -> None:
    idx = ranking_index()
    got = idx.complete("al", limit=20, channel_members={2, 3, 4, 11}, recent=[7, 2, 6, 99, 5, 7])
    assert got == [1, 4, 2, 3, 7, 6, 10, 8, 9]


def test_exact_handle_first_also_when_a_member() -> None:
    idx = ranking_index()
    got = idx.complete("al", limit=20, channel_members={1, 2, 3, 4}, recent=[1, 7])
    assert got == [1, 4, 2, 3, 7, 10, 8, 9, 6]
    assert idx.complete("AL", limit=1, channel_members={2}) == [1]


def test_ranking_is_cut_at_the_limit() -> None:
    idx = ranking_index()
    for limit, want in [
        (1, [1]),
        (3, [1, 4, 2]),
        (5, [1, 4, 2, 3, 7]),
        (7, [1, 4, 2, 3, 7, 6, 10]),
    ]:
        assert idx.complete("al", limit=limit, channel_members={2, 3, 4}, recent=[7, 6]) == want


def test_channel_members_may_be_any_collection() -> None:
    idx = ranking_index()
    assert idx.complete("al", limit=4, channel_members=[3, 4, 2]) == [1, 4, 2, 3]
    assert idx.complete("al", limit=4, channel_members=(3,)) == [1, 3, 10, 4]


def test_exclude() -> None:
    idx = ranking_index()
    got = idx.complete("al", limit=20, channel_members={2, 3}, recent=[7], exclude={1, 2, 7})
    assert got == [3, 10, 4, 8, 9, 6]


def test_empty_query_lists_members_then_recent_then_everyone() -> None:
    idx = ranking_index()
    got = idx.complete("", limit=50, channel_members={11, 3, 2}, recent=[9, 2, 5])
    assert got == [2, 3, 11, 9, 5, 1, 10, 4, 7, 8, 6]
    assert idx.complete("", limit=4, channel_members={11, 3, 2}, recent=[9]) == [2, 3, 11, 9]
    assert idx.complete("") == [1, 10, 4, 7, 2, 8, 3, 5, 11, 9]  # default limit 10


def test_deactivated_never_returned() -> None:
    idx = UserIndex(
        [user(1, "al", deactivated=True), user(2, "alice"), user(3, "alan", deactivated=True)]
    )
    assert idx.complete("al", channel_members={1, 3}, recent=[3, 1]) == [2]
    assert idx.complete("", channel_members={1, 3}, recent=[3, 1]) == [2]
    assert 1 not in idx and len(idx) == 1


def test_deactivated_after_upsert_and_back() -> None:
    idx = UserIndex([user(1, "al"), user(2, "alice", "Alice Liddell")])
    idx.upsert(user(1, "al", deactivated=True))
    assert idx.complete("al", channel_members={1}, recent=[1]) == [2]
    assert idx.complete("") == [2]
    idx.upsert(user(1, "al"))
    assert idx.complete("al") == [1, 2]
    idx.upsert(user(2, "alice", "Alice Liddell", deactivated=True))
    assert idx.complete("liddell") == []
    assert idx.complete("al") == [1]


def test_upsert_replaces_old_keys() -> None:
    idx = UserIndex([user(1, "jdoe", "John Doe", "John Q Doe")])
    idx.upsert(user(1, "jsmith", "Johnny Smith"))
    assert idx.complete("doe") == []
    assert idx.complete("q") == []
    assert idx.complete("jd") == []
    assert idx.complete("smith") == [1]
    assert idx.complete("john") == [1]
    assert idx.complete("js") == [1]
    idx.upsert(user(2, "mary"))
    idx.upsert(user(2, "mary"))  # unchanged: no duplicate keys
    assert idx.complete("m") == [2]
    assert len(idx) == 2


def test_remove() -> None:
    idx = UserIndex([user(1, "al"), user(2, "alice")])
    idx.remove(1)
    assert idx.complete("al", channel_members={1}, recent=[1]) == [2]
    idx.remove(1)  # twice: no error
    idx.remove(42)  # never indexed: no error
    idx.remove(2)
    assert idx.complete("") == []
    assert len(idx) == 0


def test_a_user_given_twice_counts_as_its_last_copy() -> None:
    idx = UserIndex([user(1, "old"), user(1, "new"), user(2, "x"), user(2, "x", deactivated=True)])
    assert idx.complete("old") == []
    assert idx.complete("new") == [1]
    assert idx.complete("x") == []


def test_limit_clamp() -> None:
    idx = UserIndex([user(i, f"u{i:03d}") for i in range(1, 71)])
    assert idx.complete("u", limit=0) == [1]
    assert idx.complete("u", limit=-5) == [1]
    assert idx.complete("u", limit=1000) == list(range(1, MAX_LIMIT + 1))
    assert idx.complete("u") == list(range(1, 11))
    assert idx.complete("", limit=MAX_LIMIT + 1) == list(range(1, MAX_LIMIT + 1))
    assert [clamp_limit(x) for x in (-1, 0, 1, 50, 51)] == [1, 1, 1, 50, 50]


def test_query_ending_in_the_last_code_point() -> None:
    top = "\U0010ffff"
    idx = UserIndex([user(1, "a" + top), user(2, "a" + top + "b"), user(3, top), user(4, "b")])
    assert idx.complete("a" + top) == [1, 2]
    assert idx.complete(top) == [3]
    assert idx.complete(top + top) == []


def test_empty_index_with_members() -> None:
    assert UserIndex().complete("a", channel_members={1}, recent=[1]) == []


def test_long_range_answers_from_its_cache_and_forgets_it_on_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(autocomplete, "_LONG_RANGE", 2)
    monkeypatch.setattr(autocomplete, "_CACHED", 2)
    idx = UserIndex(
        [user(1, "d", "Zed One"), user(2, "c", "Zed Two"), user(3, "zed"), user(4, "b", "Zedd")]
    )
    assert idx.complete("zed") == [3, 4, 2, 1]  # b and c cached, d from the range past them
    assert idx.complete("zed") == [3, 4, 2, 1]
    assert idx.complete("zed", exclude={4}) == [3, 2, 1]
    idx.upsert(user(4, "b", "Ted"))
    assert idx.complete("zed") == [3, 2, 1]
    idx.upsert(user(5, "a", "Zed Five"))
    assert idx.complete("zed") == [3, 5, 2, 1]
    idx.remove(2)
    assert idx.complete("ze") == [3, 5, 1]
    idx.upsert(user(1, "0x", "Zed One"))  # a new handle: a new place in the order
    assert idx.complete("ze") == [3, 1, 5]


def test_cached_matches_kept_true_as_they_shrink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autocomplete, "_LONG_RANGE", 2)
    monkeypatch.setattr(autocomplete, "_CACHED", 4)
    idx = UserIndex([user(uid, f"a{uid}", "Zed") for uid in range(1, 7)])
    assert idx.complete("zed", limit=2) == [1, 2]  # caches a1..a4, not all
    idx.upsert(user(7, "b", "Zed"))  # after the cached ones: not cached
    idx.upsert(user(8, "a0", "Zed"))  # before: cached, a4 out
    assert idx.complete("zed") == [8, 1, 2, 3, 4, 5, 6, 7]
    for uid in (8, 1, 2):
        idx.remove(uid)
    assert idx.complete("zed") == [3, 4, 5, 6, 7]  # a3 alone was left: filled again
    idx.upsert(user(3, "a3", "Ted"))
    assert idx.complete("ze") == [4, 5, 6, 7]


def test_cached_queries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autocomplete, "_LONG_RANGE", 1)
    monkeypatch.setattr(autocomplete, "_CACHED_QUERIES", 1)
    idx = UserIndex([user(1, "b", "Zed Young"), user(2, "a", "Yves Zorn")])
    for _ in range(2):
        assert idx.complete("z") == [2, 1]
        assert idx.complete("y") == [2, 1]
    idx.remove(2)  # the cache holds "y" alone now
    assert idx.complete("z") == [1]
    assert idx.complete("y") == [1]


# --------------------------------------------------------------------------- channels


def public_or_member(private: set[int], mine: set[int]) -> Callable[[int], bool]:
    return lambda cid: cid not in private or cid in mine


def test_channel_prefix_and_words() -> None:
    idx = ChannelIndex(
        [
            channel(1, "eng-backend"),
            channel(2, "backend_ops.eu"),
            channel(3, "general"),
            channel(4, "Équipe Café"),
        ]
    )
    yes = public_or_member(set(), set())
    assert idx.complete("backend", visible=yes) == [2, 1]  # full-name prefix first
    assert idx.complete("ops", visible=yes) == [2]
    assert idx.complete("eu", visible=yes) == [2]
    assert idx.complete("GEN", visible=yes) == [3]
    assert idx.complete("cafe", visible=yes) == [4]
    assert idx.complete("equipe c", visible=yes) == [4]
    assert idx.complete("e", visible=yes) == [1, 4, 2]
    assert idx.complete("", visible=yes) == [2, 1, 4, 3]
    assert idx.complete("x", visible=yes) == []


def test_channel_visibility() -> None:
    idx = ChannelIndex(
        [
            channel(1, "secret-plans", kind="private"),
            channel(2, "secret-santa", kind="private"),
            channel(3, "secrets-public"),
        ]
    )
    calls: list[int] = []

    def visible(cid: int) -> bool:
        calls.append(cid)
        return public_or_member({1, 2}, {2})(cid)

    assert idx.complete("secret", visible=visible) == [2, 3]
    assert sorted(calls) == [1, 2, 3]  # only matching channels, each once
    assert idx.complete("plans", visible=visible) == []
    assert idx.complete("", visible=lambda cid: False) == []


def test_channel_dm_kinds_never_returned() -> None:
    idx = ChannelIndex(
        [
            channel(1, "dm-1-2", kind="dm"),
            channel(2, "dm-group", kind="group_dm"),
            channel(3, "dmitri-fans"),
        ]
    )
    yes = public_or_member(set(), set())
    assert idx.complete("dm", visible=yes) == [3]
    assert idx.complete("", visible=yes) == [3]
    idx.upsert(channel(3, "dmitri-fans", kind="group_dm"))  # a kind change removes it
    idx.upsert(channel(4, "dm-x", kind="dm"))
    assert idx.complete("dm", visible=yes) == []
    assert len(idx) == 0


def test_channel_archived_after_live() -> None:
    idx = ChannelIndex(
        [
            channel(1, "design", archived=True),
            channel(2, "design-system"),
            channel(3, "dev", archived=True),
            channel(4, "web-design"),
        ]
    )
    yes = public_or_member(set(), set())
    assert idx.complete("de", visible=yes) == [2, 4, 1, 3]
    assert idx.complete("de", visible=yes, limit=2) == [2, 4]
    idx.upsert(channel(1, "design"))  # unarchived
    assert idx.complete("de", visible=yes) == [1, 2, 4, 3]
    idx.upsert(channel(2, "design-system", archived=True))
    assert idx.complete("de", visible=yes) == [1, 4, 2, 3]


def test_channel_rename_and_remove() -> None:
    idx = ChannelIndex([channel(1, "random"), channel(2, "ran-out")])
    yes = public_or_member(set(), set())
    idx.upsert(channel(1, "watercooler"))
    assert idx.complete("ran", visible=yes) == [2]
    assert idx.complete("water", visible=yes) == [1]
    idx.remove(2)
    idx.remove(2)
    idx.remove(9)
    assert 1 in idx and 2 not in idx
    idx.upsert(channel(1, "watercooler"))  # unchanged
    assert idx.complete("", visible=yes) == [1]
    assert idx.complete("", visible=yes, limit=0) == [1]


# --------------------------------------------------------------------------- property tests

# Pieces that fold together or apart: accents, ß/ss, case, CJK, separators.
PIECES = ["a", "á", "A", "b", "ß", "ss", "S", "o", "ö", "Ø", "山", "田", "ゴ", " ", "-", ".", "_"]


def random_name(rng: random.Random, most: int = 6) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, most)))


def random_user(rng: random.Random, uid: int) -> User:
    return user(
        uid,
        random_name(rng, 4),
        random_name(rng),
        random_name(rng) if rng.random() < 0.7 else "",
        deactivated=rng.random() < 0.1,
    )


def reference_users(
    users: dict[int, User],
    query: str,
    limit: int,
    members: Collection[int],
    recent: Sequence[int],
    exclude: Collection[int],
) -> list[int]:
    """The ranking rules, written the slow and obvious way."""
    q = fold(query)

    def keys(u: User) -> list[str]:
        display = fold(u.display_name)
        return [fold(u.handle), display, *words(display), *words(fold(u.real_name))]

    def order(u: User) -> tuple[bool, str, int]:
        return (not fold(u.handle).startswith(q), fold(u.handle), u.id)

    matching = [
        u
        for u in users.values()
        if not u.deactivated and u.id not in exclude and any(k.startswith(q) for k in keys(u))
    ]
    ids = {u.id for u in matching}
    out: list[int] = []
    tiers = [
        [u.id for u in sorted(matching, key=lambda u: u.id) if q and fold(u.handle) == q],
        [u.id for u in sorted(matching, key=order) if u.id in members],
        [uid for uid in recent if uid in ids],
        [u.id for u in sorted(matching, key=order)],
    ]
    for tier in tiers:
        out.extend(uid for uid in tier if uid not in out)
    return out[: max(1, min(MAX_LIMIT, limit))]


def random_query(rng: random.Random, users: dict[int, User]) -> str:
    r = rng.random()
    if r < 0.1 or not users:
        return ""
    if r < 0.3:
        return random_name(rng, 3)
    u = rng.choice(list(users.values()))
    source = rng.choice([u.handle, u.display_name, u.real_name or u.handle])
    if rng.random() < 0.5:
        source = rng.choice(words(source) or [source])
    return source[: rng.randint(1, max(1, len(source)))]


# Tier 2's two cost decisions forced (scan the members; else stream the name-only matches in
# order or intersect the name range with the members), or None: left to the cost model.
STRATEGIES = [None, (True, False), (False, True), (False, False)]


@pytest.mark.parametrize(
    "strategy", STRATEGIES, ids=["cost-model", "members", "ranges-stream", "ranges-intersect"]
)
@pytest.mark.parametrize("cache", [False, True], ids=["", "tiny-cache"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_users_match_the_reference(
    seed: int,
    cache: bool,
    strategy: tuple[bool, bool] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random users, upserts and removals; every answer equals the reference. ``cache``:
    ranges of 3 rows or more keep their first 4 matches, for at most 40 queries."""
    if strategy is not None:
        scan, stream = strategy
        monkeypatch.setattr(UserIndex, "_scan_members", lambda self, *a: scan)
        monkeypatch.setattr(UserIndex, "_stream_members", lambda self, *a: stream)
    if cache:
        monkeypatch.setattr(autocomplete, "_LONG_RANGE", 3)
        monkeypatch.setattr(autocomplete, "_CACHED", 4)
        monkeypatch.setattr(autocomplete, "_CACHED_QUERIES", 40)
    rng = random.Random(seed)
    users = {uid: random_user(rng, uid) for uid in range(1, 121)}
    idx = UserIndex(users.values())
    next_id = 121
    for _ in range(300):
        r = rng.random()
        if r < 0.15:
            uid = rng.randrange(1, next_id + 1)
            users[uid] = random_user(rng, uid)
            idx.upsert(users[uid])
            next_id = max(next_id, uid + 1)
        elif r < 0.2:
            uid = rng.randrange(1, next_id)
            users.pop(uid, None)
            idx.remove(uid)
        ids = [*users, next_id + 5]  # and an id the index never saw
        size = rng.choice([0, 1, 3, 10, len(ids) // 2, len(ids)])
        members: Collection[int] = set(rng.sample(ids, min(size, len(ids))))
        if rng.random() < 0.3:
            members = list(members)
        recent = [rng.choice(ids) for _ in range(rng.randint(0, 8))]
        exclude = set(rng.sample(ids, rng.randint(0, 2)))
        query = random_query(rng, users)
        limit = rng.choice([1, 2, 5, 10, 50, 60, 0])
        got = idx.complete(
            query, limit=limit, channel_members=members, recent=recent, exclude=exclude
        )
        want = reference_users(users, query, limit, members, recent, exclude)
        assert got == want, (query, limit, sorted(members), recent, exclude)
    assert len(idx) == sum(1 for u in users.values() if not u.deactivated)


def reference_channels(
    channels: dict[int, Channel], query: str, limit: int, visible: Callable[[int], bool]
) -> list[int]:
    q = fold(query)

    def order(c: Channel) -> tuple[bool, bool, str, int]:
        return (c.archived, not fold(c.name).startswith(q), fold(c.name), c.id)

    def match(c: Channel) -> bool:
        name = fold(c.name)
        parts = name.replace("-", " ").replace("_", " ").replace(".", " ").split()
        return any(k.startswith(q) for k in [name, *parts])

    found = [
        c
        for c in channels.values()
        if c.kind in ("public", "private") and visible(c.id) and match(c)
    ]
    return [c.id for c in sorted(found, key=order)][: max(1, min(MAX_LIMIT, limit))]


def not_in(hidden: set[int]) -> Callable[[int], bool]:
    return lambda cid: cid not in hidden


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_channels_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    kinds: list[ChannelKind] = ["public", "public", "private", "dm", "group_dm"]

    def random_channel(cid: int) -> Channel:
        return channel(cid, random_name(rng), kind=rng.choice(kinds), archived=rng.random() < 0.3)

    channels = {cid: random_channel(cid) for cid in range(1, 81)}
    idx = ChannelIndex(channels.values())
    for _ in range(300):
        r = rng.random()
        if r < 0.15:
            cid = rng.randrange(1, 100)
            channels[cid] = random_channel(cid)
            idx.upsert(channels[cid])
        elif r < 0.2:
            cid = rng.randrange(1, 100)
            channels.pop(cid, None)
            idx.remove(cid)
        visible = not_in(set(rng.sample(range(1, 100), rng.randint(0, 50))))
        if rng.random() < 0.15 or not channels:
            query = ""
        else:
            name = rng.choice(list(channels.values())).name
            query = name[rng.randrange(len(name)) :][: rng.randint(1, 3)]
        limit = rng.choice([1, 3, 10, 60])
        got = idx.complete(query, limit=limit, visible=visible)
        assert got == reference_channels(channels, query, limit, visible), (query, limit)
