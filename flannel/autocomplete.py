"""@-mention and #-channel completion from memory: :class:`UserIndex` and :class:`ChannelIndex`.

Flannel keeps each workspace's users and channels in memory, so ``users.autocomplete`` and
``channels.autocomplete`` are answered here, without a query to the chat tier, while a person
types. This module owns only the matching and ranking: pure logic, no I/O, no asyncio. The
caller keeps an index per workspace, feeds it ``upsert``/``remove`` from the workspace's events,
and passes what depends on the caller (the current channel's members, recent contacts, which
channels it may see) to each ``complete`` call.

Matching. A query matches a key when the key starts with it, after both went through
:func:`flannel.text.fold` (NFKD, casefold, combining marks dropped, NFC): "jose" finds "José",
"zoe" finds "Zoë", "strasse" finds "Straße", "山田" finds "山田太郎". A user's keys are the
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

Cost model (N users, K keys per user, about 4). Keys live in sorted lists (``bisect``): one of
(folded handle, id), one of (name key, id). The keys that start with the query are one
contiguous range, found in O(log NK). Handles in that range are already in the order tiers 2
and 4 want, so their handle-prefix part stops as soon as ``limit`` users are found. Name-word
matches must be ordered by handle; the index takes the cheaper of two ways:

- tier 2: walk the prefix ranges testing channel membership (expected steps about
  ``limit / density`` while handle matches suffice, plus the name range when they do not) or
  test the keys of each member (one substring test on the member's joined keys). A 1-letter
  query in a 1,000-member channel tests 1,000 members, not the tens of thousands of users
  whose names start with that letter; a 3-letter one walks a range of a few dozen.
- tier 4: collect the name range and take the ``limit`` smallest handles (R steps for a range
  of R keys), or walk all users in handle order and stop at ``limit`` matches (about
  ``limit * N / R`` steps, capped at R, after which it falls back to the range). Either way
  at most about ``sqrt(limit * N)`` steps for a query whose matches are spread like names are.

``upsert`` touches only the keys that changed (a new avatar or time zone costs a dict lookup)
and inserts each changed key with ``bisect.insort`` semantics: O(log NK) to find the place and
an O(NK) pointer move, a few hundred microseconds at 100,000 users. No query ever re-sorts.
Building from many users at once (the constructor) sorts once: O(NK log NK).
``python -m bench.autocomplete`` measures all of this on a 100,000-user index.
"""

from __future__ import annotations

import bisect
import heapq
import re
from collections.abc import Callable, Collection, Iterable, Sequence, Set
from dataclasses import dataclass
from itertools import chain

from chat.wire import Channel, User
from flannel.text import fold, words

MAX_LIMIT = 50
DEFAULT_LIMIT = 10

# Joins an entry's name keys into one string, so "does any key start with q" is one substring
# search: ("\0" + q) in "\0jose\0garcia". The wire refuses NUL in names and queries; _key()
# strips it anyway, so the test stays exact whatever reaches the index.
_SEP = "\x00"

# Channel names split on these into words: "eng-backend_ops.eu" -> eng, backend, ops, eu.
_CHANNEL_WORD_SEP = re.compile(r"[\s\-_.]+")


def clamp_limit(limit: int) -> int:
    """``limit`` within 1..:data:`MAX_LIMIT`."""
    return max(1, min(MAX_LIMIT, limit))


def _key(s: str) -> str:
    k = fold(s)
    return k.replace(_SEP, "") if _SEP in k else k


def _prefix_end(q: str) -> str | None:
    """The smallest string above every string that starts with ``q`` (None: there is none)."""
    while q:
        last = ord(q[-1])
        if last < 0x10FFFF:
            return q[:-1] + chr(last + 1)
        q = q[:-1]
    return None


class _SortedKeys:
    """(key, id) pairs ordered by key then id, kept as two parallel lists so that ``bisect``
    compares strings directly (no tuple per step) and a pair costs two list slots."""

    __slots__ = ("ids", "keys")

    def __init__(self, pairs: Iterable[tuple[str, int]] = ()) -> None:
        ordered = sorted(pairs)
        self.keys: list[str] = [k for k, _ in ordered]
        self.ids: list[int] = [i for _, i in ordered]

    def __len__(self) -> int:
        return len(self.keys)

    def _place(self, key: str, id_: int) -> int:
        lo = bisect.bisect_left(self.keys, key)
        hi = bisect.bisect_right(self.keys, key, lo)
        return bisect.bisect_left(self.ids, id_, lo, hi)

    def add(self, key: str, id_: int) -> None:
        i = self._place(key, id_)
        self.keys.insert(i, key)
        self.ids.insert(i, id_)

    def discard(self, key: str, id_: int) -> None:
        i = self._place(key, id_)
        if i < len(self.keys) and self.ids[i] == id_ and self.keys[i] == key:
            del self.keys[i]
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


def _update(index: _SortedKeys, id_: int, old: Collection[str], new: Collection[str]) -> None:
    for k in old:
        if k not in new:
            index.discard(k, id_)
    for k in new:
        if k not in old:
            index.add(k, id_)


# --------------------------------------------------------------------------- users


@dataclass(frozen=True, slots=True)
class _UserKeys:
    handle: str  # folded
    names: tuple[str, ...]  # folded display name, its words, the real name's words
    joined: str  # _SEP + _SEP.join(names)

    def matches(self, q: str) -> bool:
        return self.handle.startswith(q) or (_SEP + q) in self.joined


def _user_keys(user: User) -> _UserKeys:
    display = _key(user.display_name)
    names = [display, *words(display), *words(_key(user.real_name))]
    unique = tuple(k for k in dict.fromkeys(names) if k)
    return _UserKeys(_key(user.handle), unique, _SEP + _SEP.join(unique))


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
        self._handles = _SortedKeys((e.handle, uid) for uid, e in entries)
        self._names = _SortedKeys((k, uid) for uid, e in entries for k in e.names)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def upsert(self, user: User) -> None:
        """Add ``user`` or replace its keys; a deactivated user is removed. Only keys that
        changed are touched."""
        old = self._users.get(user.id)
        new = None if user.deactivated else _user_keys(user)
        if old == new:
            return
        uid = user.id
        old_handle = (old.handle,) if old is not None else ()
        new_handle = (new.handle,) if new is not None else ()
        _update(self._handles, uid, old_handle, new_handle)
        _update(
            self._names,
            uid,
            frozenset(old.names) if old is not None else frozenset(),
            frozenset(new.names) if new is not None else frozenset(),
        )
        if new is None:
            del self._users[uid]
        else:
            self._users[uid] = new

    def remove(self, user_id: int) -> None:
        """Forget ``user_id`` (no error if it is not indexed)."""
        old = self._users.pop(user_id, None)
        if old is not None:
            self._handles.discard(old.handle, user_id)
            for k in old.names:
                self._names.discard(k, user_id)

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
        channel's members (pass a set: it is tested for membership; another collection is
        copied into one). ``recent``: people the caller talked to recently, most relevant
        first. ``exclude``: ids never returned (e.g. the caller)."""
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
                channel_members if isinstance(channel_members, Set) else frozenset(channel_members)
            )
            self._members_tier(q, members, n, out, seen)
            if len(out) == n:
                return out
        # Past tier 2, every matching member is in ``out``: tier 2 stops only when full.
        for uid in recent:  # tier 3
            if uid not in seen:
                entry = self._users.get(uid)
                if entry is not None and entry.matches(q):
                    out.append(uid)
                    seen.add(uid)
                    if len(out) == n:
                        return out
        self._everyone_tier(q, n, out, seen)  # tier 4
        return out

    # Tier 2 and tier 4 append to ``out`` (and ``seen``) until it holds ``n`` ids.

    def _members_tier(
        self, q: str, members: Set[int], n: int, out: list[int], seen: set[int]
    ) -> None:
        hlo, hhi = self._handles.prefix(q)
        nlo, nhi = self._names.prefix(q) if q else (0, 0)
        if self._scan_members(len(members), n - len(out), hhi - hlo, nhi - nlo):
            cands: list[tuple[int, str, int]] = []
            for uid in members:
                if uid not in seen and (entry := self._users.get(uid)) is not None:
                    if entry.handle.startswith(q):
                        cands.append((0, entry.handle, uid))
                    elif (_SEP + q) in entry.joined:
                        cands.append((1, entry.handle, uid))
            for _, _, uid in heapq.nsmallest(n - len(out), cands):
                out.append(uid)
                seen.add(uid)
            return
        ids = self._handles.ids
        for i in range(hlo, hhi):  # handle-prefix matches, already in order
            uid = ids[i]
            if uid in members and uid not in seen:
                out.append(uid)
                seen.add(uid)
                if len(out) == n:
                    return
        found: set[int] = set()
        ids = self._names.ids
        for i in range(nlo, nhi):  # name-word matches, to be ordered by handle
            uid = ids[i]
            if uid in members and uid not in seen:
                found.add(uid)
        self._take_by_handle(q, found, n, out, seen)

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
        if nlo == nhi:
            return
        if self._walk_handles(n - len(out), nhi - nlo):
            # Users in handle order, but for the handle-prefix range just done: the first
            # matches found are the ones wanted. Capped at the size of the name range.
            needle = _SEP + q
            users = self._users
            got: list[int] = []
            budget = nhi - nlo
            for i in chain(range(hlo), range(hhi, len(handles))):
                budget -= 1
                if budget < 0:
                    break
                uid = handles.ids[i]
                if uid not in seen and needle in users[uid].joined:
                    got.append(uid)
                    if len(out) + len(got) == n:
                        break
            else:
                budget = 0  # walked every user: ``got`` is complete
            if budget >= 0:
                out.extend(got)
                seen.update(got)
                return
        found: set[int] = set()
        ids = self._names.ids
        for i in range(nlo, nhi):
            uid = ids[i]
            if uid not in seen:
                found.add(uid)
        self._take_by_handle(q, found, n, out, seen)

    def _take_by_handle(
        self, q: str, found: Iterable[int], n: int, out: list[int], seen: set[int]
    ) -> None:
        """Append the name-word matches among ``found`` (handle not a prefix match), by
        folded handle then id, until ``out`` holds ``n``."""
        users = self._users
        cands = [(e.handle, uid) for uid in found if not (e := users[uid]).handle.startswith(q)]
        for _, uid in heapq.nsmallest(n - len(out), cands):
            out.append(uid)
            seen.add(uid)

    # The two cost decisions, apart so that tests can force each way.

    def _scan_members(self, members: int, wanted: int, handle_range: int, name_range: int) -> bool:
        """Tier 2: cheaper to test each member's keys than to walk the prefix ranges testing
        membership? Assumes members spread over the ranges like over the whole index."""
        total = len(self._users)
        if total == 0:
            return True
        density = min(1.0, members / total)
        walk = min(float(handle_range), wanted / density)
        if handle_range * density < wanted:  # handle matches will not do: the names too
            walk += name_range
        return members < walk

    def _walk_handles(self, wanted: int, name_range: int) -> bool:
        """Tier 4 name-word matches: cheaper to walk users in handle order until ``wanted``
        matches (about wanted * N / R steps) than to collect the R keys of the range?"""
        return wanted * len(self._users) < name_range * name_range


# --------------------------------------------------------------------------- channels


@dataclass(frozen=True, slots=True)
class _ChannelKeys:
    name: str  # folded
    words: tuple[str, ...]  # words of the folded name, but the name itself
    archived: bool


def _channel_keys(channel: Channel) -> _ChannelKeys:
    name = _key(channel.name)
    parts = (w for w in _CHANNEL_WORD_SEP.split(name) if w and w != name)
    return _ChannelKeys(name, tuple(dict.fromkeys(parts)), channel.archived)


class _ChannelGroup:
    """Sorted keys of the live channels, or of the archived ones."""

    __slots__ = ("names", "words")

    def __init__(self, entries: Iterable[tuple[int, _ChannelKeys]] = ()) -> None:
        listed = list(entries)
        self.names = _SortedKeys((e.name, cid) for cid, e in listed)
        self.words = _SortedKeys((w, cid) for cid, e in listed for w in e.words)

    def add(self, cid: int, entry: _ChannelKeys) -> None:
        self.names.add(entry.name, cid)
        for w in entry.words:
            self.words.add(w, cid)

    def discard(self, cid: int, entry: _ChannelKeys) -> None:
        self.names.discard(entry.name, cid)
        for w in entry.words:
            self.words.discard(w, cid)


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
            self._group(old).discard(channel.id, old)
        self._group(new).add(channel.id, new)
        self._channels[channel.id] = new

    def remove(self, channel_id: int) -> None:
        """Forget ``channel_id`` (no error if it is not indexed)."""
        old = self._channels.pop(channel_id, None)
        if old is not None:
            self._group(old).discard(channel_id, old)

    def complete(
        self, query: str, *, limit: int = DEFAULT_LIMIT, visible: Callable[[int], bool]
    ) -> list[int]:
        """Ids of the channels matching ``query`` that ``visible(id)`` allows, live before
        archived, at most ``limit`` (clamped to 1..MAX_LIMIT). ``visible`` is the caller's
        rule (public, or private and a member); it is called only for matching channels,
        and at most once each."""
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
            tested: set[int] = set()
            cands: list[tuple[str, int]] = []
            for i in range(lo, hi):
                cid = group.words.ids[i]
                if cid not in tested:
                    tested.add(cid)
                    name = self._channels[cid].name
                    if not name.startswith(q) and visible(cid):
                        cands.append((name, cid))
            out.extend(cid for _, cid in heapq.nsmallest(n - len(out), cands))
            if len(out) == n:
                return out
        return out
