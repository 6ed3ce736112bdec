"""@-mention and #-channel completion from memory: :class:`UserIndex` and :class:`ChannelIndex`.

Flannel keeps each workspace's users and channels in memory, so ``users.autocomplete`` and
``channels.autocomplete`` are answered here, without a query to the chat tier, while a person
types. This module owns only the matching and ranking: pure logic, no I/O, no asyncio. The
caller keeps an index per workspace, feeds it ``upsert``/``remove`` from the workspace's events,
and passes what depends on the caller (the current channel's members, recent contacts, which
channels it may see) to each ``complete`` call.

Matching. A query matches a key when the key starts with it, after both went through
:func:`flannel.text.fold` (NFKD, casefold, combining marks dropped, "ł"/"ø"/"æ"-like letters
spelled plainly, NFC): "jose" finds "José", "zoe" finds "Zoë", "strasse" finds "Straße",
"lukasz" finds "Łukasz", "山田" finds "山田太郎". A user's keys are the
handle, the display name and each of its words, and each word of the real name
(:func:`flannel.text.words`); a channel's keys are its name and the words of its name split on
``-``, ``_``, ``.`` and whitespace.

Ranking of users, each user at most once, ``limit`` clamped to 1..:data:`MAX_LIMIT`:

1. users whose handle equals the query (folded), even when not in the channel;
2. members of the current channel (``channel_members``);
3. people the caller talked to recently (``recent``), in the order given;
4. everyone else.

Within tiers 2 and 4, users whose handle starts with the query come before those matched by
a name word only, then by folded handle, then by id. An empty query matches everyone: tiers
2, 3 and 4, which is what a client shows after typing "@". Deactivated users are not in the
index at all (``upsert`` of a deactivated user removes it), so they are never returned.
Channels: DMs and group DMs are never indexed (they have no #name); live channels before
archived ones; within each, a name that starts with the query before a match on a word, then
by folded name, then by id; only channels for which the caller's ``visible(id)`` is true.

Cost model (N users, K name keys per user, about 3). Keys live in sorted lists searched with
``bisect``: one row per user of (folded handle, sort key, id) and one per name key of (key,
sort key, id), where a user's sort key is one string that orders like (folded handle, id). The
rows whose key starts with the query are one contiguous range, found in O(log NK); call its
length H for handles, R for names. Handles in their range are already in the order tiers 2
and 4 want, so that part stops as soon as ``limit`` users are found. Name-only matches (a name
key starts with the query, the handle does not) must be put in handle order:

- tier 4 takes them in order from the range, heapified (R < 1,024) or sorted (the range comes
  in runs already sorted, one per key, which Timsort merges); both O(R) or about, in C. A long
  range (R >= 1,024: "a", or "김" in a Korean workspace) keeps its first 128 name-only matches,
  filled by the first query that needs them and kept true by ``upsert``/``remove`` (a
  bisect and a short list insert per prefix of a changed key), so later queries cost
  O(limit): a few microseconds instead of a few milliseconds. At most 4,096 queries per
  index are cached (about 1 KB each; the oldest goes first).
- tier 2 takes the cheapest of three ways, by estimates that assume members are spread over
  the index evenly (density = members / N): test each member's keys (one prefix test and
  one substring test over the member's joined keys: O(members)); walk the handle range
  testing membership (about ``limit / density`` steps), then either intersect the name range
  with the member set in C (O(R)) or take name-only matches in order until ``limit`` are
  members (about ``limit / density``, nearly free when cached). A 1-letter query in a
  1,000-member channel of 100,000 tests at most the 1,000 members, not the tens of thousands
  of users whose names start with that letter; in a channel of everyone it stops after
  ``limit`` matches.

``upsert`` touches only the rows whose key changed (a new avatar or time zone costs a dict
lookup and a comparison): each such row is a ``bisect`` and an insert into the sorted
lists, an O(NK) pointer move of a few hundred microseconds at 100,000 users. No query ever
re-sorts the index. Building from many users at once (the constructor) sorts once, O(NK log
NK). ``python -m bench.autocomplete`` measures all of this on a 100,000-user index.
"""

from __future__ import annotations

import bisect
import heapq
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

from chat.wire import Channel, User
from flannel.text import fold, words

MAX_LIMIT = 50
DEFAULT_LIMIT = 10

# NUL joins an entry's name keys into one string, so "does any key start with q" is one
# substring search: ("\0" + q) in "\0jose\0garcia"; and it ends the name in a sort key (see
# _sort_key). The wire refuses NUL in names and queries; _key() strips it anyway, so both stay
# exact whatever reaches the index.
_SEP = "\x00"
_ID_DIGITS = 20  # ids are positive 64-bit integers (wire.Id): at most 19 digits

# Channel names split on these into words: "eng-backend_ops.eu" -> eng, backend, ops, eu.
_CHANNEL_WORD_SEP = re.compile(r"[\s\-_.]+")

# The cost model's relative prices, per item, measured with bench/autocomplete.py: a row of a
# range sliced and heapified, or intersected with a set, in C, is 1 (about 30 ns).
_WALK_STEP = 3  # a row of a walk over the handle range: list item, one or two set tests
_MEMBER_TEST = 10  # a channel member's keys tested: dict lookup, prefix and substring tests
_FOUND_STEP = 10  # a member found by intersection, ranked: dict lookup, into a heap
_STREAM_STEP = 15  # a name-only match taken in order: heap pop, id parsed, set tests

# Name ranges of _LONG_RANGE rows or more ("김" in a Korean workspace: a fifth of it) keep
# the sort keys of their first _CACHED name-only matches, for at most _CACHED_QUERIES
# queries: such a query costs O(range) once, then O(limit) until a name under it changes.
_LONG_RANGE = 1024
_CACHED = 128  # MAX_LIMIT and room for the ids a query skips (higher tiers, excluded)
_CACHED_QUERIES = 4096


def clamp_limit(limit: int) -> int:
    """``limit`` within 1..:data:`MAX_LIMIT`."""
    return max(1, min(MAX_LIMIT, limit))


def _key(s: str) -> str:
    k = fold(s)
    return k.replace(_SEP, "") if _SEP in k else k


def _sort_key(name: str, id_: int) -> str:
    """``name`` (folded) then ``id_``, as one string: "ada\0" and 20 digits. NUL sorts below
    every character of a key, so these order like (name, id) tuples, at the price of one
    string comparison instead of a tuple's; and it starts with ``q`` exactly when ``name``
    does."""
    return f"{name}{_SEP}{id_:0{_ID_DIGITS}d}"


def _id_of(sort_key: str) -> int:
    return int(sort_key[-_ID_DIGITS:])


def _prefix_end(q: str) -> str | None:
    """The smallest string above every string that starts with ``q`` (None: there is none)."""
    while q:
        last = ord(q[-1])
        if last < 0x10FFFF:
            return q[:-1] + chr(last + 1)
        q = q[:-1]
    return None


class _SortedKeys:
    """Rows (key, sort key, id) ordered by key then sort key, as three parallel lists: bisect
    compares strings directly, a range of sort keys or ids is one C-level slice, a row costs
    three list slots and no object of its own."""

    __slots__ = ("ids", "keys", "skeys")

    def __init__(self, rows: Iterable[tuple[str, str, int]] = ()) -> None:
        ordered = sorted(rows)
        self.keys: list[str] = [k for k, _, _ in ordered]
        self.skeys: list[str] = [s for _, s, _ in ordered]
        self.ids: list[int] = [i for _, _, i in ordered]

    def _place(self, key: str, skey: str) -> int:
        lo = bisect.bisect_left(self.keys, key)
        hi = bisect.bisect_right(self.keys, key, lo)
        return bisect.bisect_left(self.skeys, skey, lo, hi)

    def add(self, key: str, skey: str, id_: int) -> None:
        i = self._place(key, skey)
        self.keys.insert(i, key)
        self.skeys.insert(i, skey)
        self.ids.insert(i, id_)

    def discard(self, key: str, skey: str) -> None:
        i = self._place(key, skey)
        if i < len(self.keys) and self.keys[i] == key and self.skeys[i] == skey:
            del self.keys[i]
            del self.skeys[i]
            del self.ids[i]

    def prefix(self, q: str) -> tuple[int, int]:
        """The index range of the keys that start with ``q``."""
        lo = bisect.bisect_left(self.keys, q)
        end = _prefix_end(q)
        hi = len(self.keys) if end is None else bisect.bisect_left(self.keys, end, lo)
        return lo, hi

    def exact(self, q: str) -> tuple[int, int]:
        """The index range of the keys equal to ``q``."""
        lo = bisect.bisect_left(self.keys, q)
        return lo, bisect.bisect_right(self.keys, q, lo)

    def ordered(self, lo: int, hi: int) -> Iterator[str]:
        """The sort keys of rows lo..hi, smallest first. A short range is heapified (O(R) in
        C, then a pop per key taken); a long one is sorted: its rows come in runs already
        sorted (one per key), which Timsort merges, and a heap's sifting through that many
        scattered strings costs more."""
        if hi - lo >= _LONG_RANGE:
            yield from sorted(self.skeys[lo:hi])
            return
        heap = self.skeys[lo:hi]
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)


def _name_only(q: str, ordered: Iterator[str]) -> Iterator[str]:
    """The sort keys in ``ordered`` (a range's, in order) whose name (a user's handle, a
    channel's name) does not start with ``q``, each once: an entry comes once per key of
    its in the range, and those are adjacent."""
    last = ""
    for skey in ordered:
        if skey != last:
            last = skey
            if not skey.startswith(q):
                yield skey


class _First:
    """The first name-only matches of a query with a long name range: ``skeys`` are the
    smallest sort keys of users matched by a name key but not by the handle, in order;
    ``whole``: there are no others."""

    __slots__ = ("skeys", "whole")

    def __init__(self, skeys: list[str], whole: bool) -> None:
        self.skeys = skeys
        self.whole = whole


# --------------------------------------------------------------------------- users


@dataclass(frozen=True, slots=True)
class _UserKeys:
    handle: str  # folded
    skey: str  # _sort_key(handle, id)
    names: tuple[str, ...]  # folded display name, its words, the real name's words
    joined: str  # _SEP + _SEP.join(names)


def _user_keys(user: User) -> _UserKeys:
    handle = _key(user.handle)
    display = _key(user.display_name)
    names = [display, *words(display), *words(_key(user.real_name))]
    unique = tuple(k for k in dict.fromkeys(names) if k)
    return _UserKeys(handle, _sort_key(handle, user.id), unique, _SEP + _SEP.join(unique))


class UserIndex:
    """The active users of one workspace, for @-mention completion (see the module docstring
    for the rules and the costs)."""

    def __init__(self, users: Iterable[User] = ()) -> None:
        """Index ``users`` at once (one sort). A user given twice counts as its last copy."""
        self._users: dict[int, _UserKeys] = {}
        for user in users:
            if user.deactivated:
                self._users.pop(user.id, None)
            else:
                self._users[user.id] = _user_keys(user)
        entries = self._users.items()
        self._handles = _SortedKeys((e.handle, e.skey, uid) for uid, e in entries)
        self._names = _SortedKeys((k, e.skey, uid) for uid, e in entries for k in e.names)
        # For a query whose name range is long (_LONG_RANGE rows or more): its first
        # name-only matches, filled by the first such query, kept true by _recache.
        self._first: dict[str, _First] = {}

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def upsert(self, user: User) -> None:
        """Add ``user`` or replace its keys; a deactivated user is removed. Only rows whose
        key changed are moved."""
        old = self._users.get(user.id)
        new = None if user.deactivated else _user_keys(user)
        if old == new:
            return
        uid = user.id
        if old is not None and (new is None or new.skey != old.skey):
            self.remove(uid)  # the handle changed: every row's sort key did
            old = None
        if new is None:
            return
        self._users[uid] = new
        if old is None:
            self._handles.add(new.handle, new.skey, uid)
        for k in old.names if old is not None else ():
            if k not in new.names:
                self._names.discard(k, new.skey)
                self._recache(k, new.skey, new)
        for k in new.names:
            if old is None or k not in old.names:
                self._names.add(k, new.skey, uid)
                self._recache(k, new.skey, new)

    def remove(self, user_id: int) -> None:
        """Forget ``user_id`` (no error if it is not indexed)."""
        old = self._users.pop(user_id, None)
        if old is not None:
            self._handles.discard(old.handle, old.skey)
            for k in old.names:
                self._names.discard(k, old.skey)
                self._recache(k, old.skey, None)

    def _recache(self, key: str, skey: str, now: _UserKeys | None) -> None:
        """A name row (``key``, ``skey``) came or went; ``now``: the user's keys after the
        change (None: removed). Brings the cached first matches of every prefix of ``key``
        up to date: O(len(key)) dict lookups, a bisect and a short list insert or delete."""
        if not self._first:
            return
        for i in range(1, len(key) + 1):
            p = key[:i]
            first = self._first.get(p)
            if first is None:
                continue
            wanted = now is not None and not now.handle.startswith(p) and _SEP + p in now.joined
            skeys = first.skeys
            j = bisect.bisect_left(skeys, skey)
            there = j < len(skeys) and skeys[j] == skey
            if wanted and not there and (first.whole or skey < skeys[-1]):
                skeys.insert(j, skey)  # the smallest len(skeys) still, whole or not
                if len(skeys) > _CACHED:
                    skeys.pop()
                    first.whole = False
            elif there and not wanted:
                del skeys[j]
                if not first.whole and len(skeys) < max(1, _CACHED // 2):
                    del self._first[p]  # too few left to answer from: filled again if asked

    def complete(
        self,
        query: str,
        *,
        limit: int = DEFAULT_LIMIT,
        channel_members: Collection[int] = (),
        recent: Sequence[int] = (),
        exclude: Collection[int] = (),
    ) -> list[int]:
        """Ids of the users matching ``query``, best first (the tiers of the module docstring),
        at most ``limit`` (clamped to 1..MAX_LIMIT). ``channel_members``: the current
        channel's members (pass a set or frozenset; another collection is copied into one).
        ``recent``: people the caller talked to recently, most relevant first. ``exclude``:
        ids never returned (e.g. the caller)."""
        n = clamp_limit(limit)
        q = _key(query)
        out: list[int] = []
        seen: set[int] = set(exclude)  # excluded or already in ``out``
        handles = self._handles
        if q:  # tier 1: the exact handle
            lo, hi = handles.exact(q)
            for i in range(lo, hi):
                uid = handles.ids[i]
                if uid not in seen:
                    out.append(uid)
                    seen.add(uid)
                    if len(out) == n:
                        return out
        if channel_members:  # tier 2
            members = (
                channel_members
                if isinstance(channel_members, set | frozenset)
                else frozenset(channel_members)
            )
            self._members_tier(q, members, n, out, seen)
            if len(out) == n:
                return out
        # Past tier 2, every matching member is in ``out``: tier 2 stops only when full.
        needle = _SEP + q
        for uid in recent:  # tier 3
            e = self._users.get(uid)
            if e is not None and uid not in seen and (e.handle.startswith(q) or needle in e.joined):
                out.append(uid)
                seen.add(uid)
                if len(out) == n:
                    return out
        self._everyone_tier(q, n, out, seen)  # tier 4
        return out

    # Tier 2 and tier 4 append to ``out`` (and ``seen``) until it holds ``n`` ids.

    def _members_tier(
        self, q: str, members: set[int] | frozenset[int], n: int, out: list[int], seen: set[int]
    ) -> None:
        handles, names = self._handles, self._names
        hlo, hhi = handles.prefix(q)
        nlo, nhi = names.prefix(q) if q else (0, 0)
        if self._scan_members(len(members), n - len(out), hhi - hlo, nhi - nlo, q):
            needle = _SEP + q
            cands: list[tuple[int, str]] = []
            for uid in members:
                if uid not in seen and (e := self._users.get(uid)) is not None:
                    if e.handle.startswith(q):
                        cands.append((0, e.skey))
                    elif needle in e.joined:
                        cands.append((1, e.skey))
            for _, skey in heapq.nsmallest(n - len(out), cands):
                uid = _id_of(skey)
                out.append(uid)
                seen.add(uid)
            return
        ids = handles.ids
        for i in range(hlo, hhi):  # handle-prefix matches, already in order
            uid = ids[i]
            if uid in members and uid not in seen:
                out.append(uid)
                seen.add(uid)
                if len(out) == n:
                    return
        if nlo == nhi:
            return
        # Name-only matches. Every handle-prefix member is in ``seen`` by now.
        if self._stream_members(len(members), n - len(out), nhi - nlo, q):
            for skey in self._name_only(q, nlo, nhi):
                uid = _id_of(skey)
                if uid in members and uid not in seen:
                    out.append(uid)
                    seen.add(uid)
                    if len(out) == n:
                        return
            return
        found = members.intersection(names.ids[nlo:nhi]) - seen
        users = self._users
        for skey in heapq.nsmallest(n - len(out), [users[uid].skey for uid in found]):
            uid = _id_of(skey)
            out.append(uid)
            seen.add(uid)

    def _everyone_tier(self, q: str, n: int, out: list[int], seen: set[int]) -> None:
        handles = self._handles
        hlo, hhi = handles.prefix(q)
        for i in range(hlo, hhi):  # handle-prefix matches, already in order
            uid = handles.ids[i]
            if uid not in seen:
                out.append(uid)
                seen.add(uid)
                if len(out) == n:
                    return
        if not q:
            return  # the empty query matched every handle above
        nlo, nhi = self._names.prefix(q)
        for skey in self._name_only(q, nlo, nhi):
            uid = _id_of(skey)
            if uid not in seen:
                out.append(uid)
                seen.add(uid)
                if len(out) == n:
                    return

    def _name_only(self, q: str, lo: int, hi: int) -> Iterator[str]:
        """The name-only matches of ``q`` (name rows lo..hi), smallest sort key first. A long
        range answers from its cached first _CACHED, filling them if needed."""
        if hi - lo < _LONG_RANGE:
            yield from _name_only(q, self._names.ordered(lo, hi))
            return
        first = self._first.get(q)
        if first is None:
            skeys = list(islice(_name_only(q, self._names.ordered(lo, hi)), _CACHED + 1))
            first = _First(skeys[:_CACHED], len(skeys) <= _CACHED)
            if len(self._first) >= _CACHED_QUERIES:
                del self._first[next(iter(self._first))]  # the oldest
            self._first[q] = first
        yield from first.skeys
        if not first.whole:  # rare: more wanted than cached (many skipped or not members)
            last = first.skeys[-1]
            for skey in _name_only(q, self._names.ordered(lo, hi)):
                if skey > last:
                    yield skey

    # The cost decisions of tier 2, apart so that tests can force each way. Units: one row of
    # a range sliced and heapified, or intersected, in C; _WALK_STEP etc. are loops in Python.

    def _scan_members(
        self, members: int, wanted: int, handle_range: int, name_range: int, q: str
    ) -> bool:
        """Cheaper to test each member's keys than to use the ranges (walk the handle range
        testing membership until ``wanted``, then the name-only matches)? Assumes members
        are spread over the ranges as over the whole index."""
        total = len(self._users)
        if total == 0:
            return True
        density = min(1.0, members / total)
        ranges = _WALK_STEP * min(float(handle_range), wanted / density)
        if handle_range * density < wanted:  # handle matches will not do: the names too
            ranges += min(
                self._stream_cost(density, wanted, name_range, q),
                self._intersect_cost(density, name_range),
            )
        return _MEMBER_TEST * members < ranges

    def _stream_members(self, members: int, wanted: int, name_range: int, q: str) -> bool:
        """For the name-only matches: cheaper to go through them in order testing membership
        until ``wanted`` than to intersect the whole name range with the members?"""
        density = min(1.0, members / max(1, len(self._users)))
        stream = self._stream_cost(density, wanted, name_range, q)
        return stream < self._intersect_cost(density, name_range)

    def _stream_cost(self, density: float, wanted: int, name_range: int, q: str) -> float:
        setup = 0 if name_range >= _LONG_RANGE and q in self._first else name_range
        return setup + _STREAM_STEP * min(float(name_range), wanted / density)

    @staticmethod
    def _intersect_cost(density: float, name_range: int) -> float:
        return name_range + _FOUND_STEP * name_range * density


# --------------------------------------------------------------------------- channels


@dataclass(frozen=True, slots=True)
class _ChannelKeys:
    name: str  # folded
    skey: str  # _sort_key(name, id)
    words: tuple[str, ...]  # words of the folded name, but the name itself
    archived: bool


def _channel_keys(channel: Channel) -> _ChannelKeys:
    name = _key(channel.name)
    parts = (w for w in _CHANNEL_WORD_SEP.split(name) if w and w != name)
    return _ChannelKeys(
        name, _sort_key(name, channel.id), tuple(dict.fromkeys(parts)), channel.archived
    )


class _ChannelGroup:
    """Sorted keys of the live channels, or of the archived ones."""

    __slots__ = ("names", "words")

    def __init__(self, entries: Iterable[tuple[int, _ChannelKeys]] = ()) -> None:
        listed = list(entries)
        self.names = _SortedKeys((e.name, e.skey, cid) for cid, e in listed)
        self.words = _SortedKeys((w, e.skey, cid) for cid, e in listed for w in e.words)

    def add(self, cid: int, entry: _ChannelKeys) -> None:
        self.names.add(entry.name, entry.skey, cid)
        for w in entry.words:
            self.words.add(w, entry.skey, cid)

    def discard(self, entry: _ChannelKeys) -> None:
        self.names.discard(entry.name, entry.skey)
        for w in entry.words:
            self.words.discard(w, entry.skey)


class ChannelIndex:
    """The named (public and private) channels of one workspace, for #-channel completion.
    DMs and group DMs are never indexed."""

    def __init__(self, channels: Iterable[Channel] = ()) -> None:
        """Index ``channels`` at once (one sort). A channel given twice counts as its last
        copy."""
        self._channels: dict[int, _ChannelKeys] = {}
        for channel in channels:
            if channel.kind in ("dm", "group_dm"):
                self._channels.pop(channel.id, None)
            else:
                self._channels[channel.id] = _channel_keys(channel)
        entries = self._channels.items()
        self._live = _ChannelGroup((cid, e) for cid, e in entries if not e.archived)
        self._archived = _ChannelGroup((cid, e) for cid, e in entries if e.archived)

    def __len__(self) -> int:
        return len(self._channels)

    def __contains__(self, channel_id: object) -> bool:
        return channel_id in self._channels

    def _group(self, entry: _ChannelKeys) -> _ChannelGroup:
        return self._archived if entry.archived else self._live

    def upsert(self, channel: Channel) -> None:
        """Add ``channel`` or replace its keys (renamed, archived, unarchived). A DM or group
        DM is not indexed (removed if it was)."""
        if channel.kind in ("dm", "group_dm"):
            self.remove(channel.id)
            return
        new = _channel_keys(channel)
        old = self._channels.get(channel.id)
        if old == new:
            return
        if old is not None:
            self._group(old).discard(old)
        self._group(new).add(channel.id, new)
        self._channels[channel.id] = new

    def remove(self, channel_id: int) -> None:
        """Forget ``channel_id`` (no error if it is not indexed)."""
        old = self._channels.pop(channel_id, None)
        if old is not None:
            self._group(old).discard(old)

    def complete(
        self, query: str, *, limit: int = DEFAULT_LIMIT, visible: Callable[[int], bool]
    ) -> list[int]:
        """Ids of the channels matching ``query`` that ``visible(id)`` allows, live before
        archived, at most ``limit`` (clamped to 1..MAX_LIMIT). ``visible`` is the caller's
        rule (public, or private and a member); it is called only for matching channels,
        at most once each, and not past the last one returned."""
        n = clamp_limit(limit)
        q = _key(query)
        out: list[int] = []
        for group in (self._live, self._archived):
            names = group.names
            lo, hi = names.prefix(q)
            for i in range(lo, hi):  # name-prefix matches, already in order
                cid = names.ids[i]
                if visible(cid):
                    out.append(cid)
                    if len(out) == n:
                        return out
            if not q:
                continue
            lo, hi = group.words.prefix(q)
            for skey in _name_only(q, group.words.ordered(lo, hi)):  # word-only matches
                cid = _id_of(skey)
                if visible(cid):
                    out.append(cid)
                    if len(out) == n:
                        return out
        return out
