"""Local delivery: which of this node's connections receive an event, and handing them the bytes.

The hub keeps, per workspace, the local peers of each user, the channels each local user is a
member of (only for users connected here), and presence subscriptions. It receives envelopes
from the bus, frames each payload once (``framer``: the websocket frame header is the same for
every recipient), and gives the same bytes to every recipient's :class:`Recipient`. It does no I/O
of its own, so its rules are unit-tested without sockets.

A peer that attaches first buffers events while the server loads its channels; ``ready()``
then applies the membership snapshot taken at workspace position ``as_of`` and flushes the
buffered events after it, so the client sees every event after ``as_of`` exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chat.bus import Envelope

log = logging.getLogger(__name__)

MAX_SYNC_BUFFER = 10_000


class Recipient(Protocol):
    """A delivery target: one authenticated session on this node."""

    user_id: int
    session_id: str
    # The user's role, kept current by the hub (``Audience.role_change``): events whose
    # audience names roles (``Audience.roles``) are judged by it.
    role: str
    revoked: bool  # set by revoke(): the connect sequence refuses to go live after it

    def send(self, frame: bytes, droppable: bool) -> None:
        """Queue a framed event; never blocks. May drop it (droppable) or cut the peer off."""
        ...

    def revoke(self) -> None:
        """The session was revoked: close the connection."""
        ...


class Tap(Protocol):
    """A workspace-wide recipient: every envelope of the workspace, unfiltered and in order
    (an edge node's service connection, which applies the visibility rules itself)."""

    def take(self, envelopes: Sequence[Envelope]) -> None:
        """Queue envelopes; never blocks."""
        ...


@dataclass(slots=True)
class _TapState:
    buffer: list[Envelope] | None = field(default_factory=list)  # None once ready
    floor: int = 0  # durable events up to here were sent (the snapshot was ahead of the bus)


@dataclass(slots=True)
class _Syncing:
    # (event, verdict): True when the user's membership was known at delivery time, None
    # when it is judged in ready() against the membership snapshot.
    buffer: list[tuple[Envelope, bool | None]] = field(default_factory=list)
    overflow: bool = False
    role: str = ""  # the peer's role at attach; ready() follows the buffer's role changes


@dataclass(slots=True)
class _Workspace:
    # user -> attached peers (a list: usually one, and a list is a third of a set's size)
    peers: dict[int, list[Recipient]] = field(default_factory=dict)
    user_channels: dict[int, set[int]] = field(default_factory=dict)  # local user -> channels
    # The delivery index: channel -> ready peers of its local members. Kept per peer (not
    # per user) so delivering to a channel is one loop over one set.
    channel_peers: dict[int, set[Recipient]] = field(default_factory=dict)
    ready: set[Recipient] = field(default_factory=set)
    watchers: dict[int, set[Recipient]] = field(default_factory=dict)  # user -> presence watchers
    syncing: dict[Recipient, _Syncing] = field(default_factory=dict)
    # The highest seq delivered here, and peers whose snapshot is ahead of it (the bus lags
    # the database): they must not get events up to their snapshot a second time.
    delivered: int = 0
    floors: dict[Recipient, int] = field(default_factory=dict)
    floor_max: int = 0
    taps: dict[Tap, _TapState] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.peers and not self.taps

    def join(self, uid: int, cid: int) -> None:
        channels = self.user_channels.get(uid)
        if channels is None:  # not tracked here (no ready peer yet): ready() decides
            return
        channels.add(cid)
        for peer in self.peers.get(uid, ()):
            if peer in self.ready:
                self.channel_peers.setdefault(cid, set()).add(peer)

    def leave(self, uid: int, cid: int) -> None:
        channels = self.user_channels.get(uid)
        if channels is None:
            return
        channels.discard(cid)
        peers = self.channel_peers.get(cid)
        if peers is not None:
            peers.difference_update(self.peers.get(uid, ()))
            if not peers:
                del self.channel_peers[cid]


def _identity(payload: bytes) -> bytes:
    return payload


class Hub:
    def __init__(self, framer: Callable[[bytes], bytes] = _identity) -> None:
        self._framer = framer
        self._workspaces: dict[int, _Workspace] = {}
        self._tapped: set[int] = set()  # workspaces with taps
        self.on_last_peer: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ membership of peers

    def attach(self, workspace_id: int, peer: Recipient) -> None:
        """Start receiving (buffered) events for the peer; call ``ready()`` next."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = self._workspaces[workspace_id] = _Workspace()
        ws.peers.setdefault(peer.user_id, []).append(peer)
        ws.syncing[peer] = _Syncing(role=peer.role)

    def ready(
        self,
        workspace_id: int,
        peer: Recipient,
        channel_ids: Iterable[int],
        as_of: int,
        role: str | None = None,
    ) -> bool:
        """Apply the user's channel list (and ``role``, when given) as of workspace position
        ``as_of``, then send the buffered events after ``as_of`` (the caller sent its reply
        first). False if the buffer overflowed (the caller should close the connection)."""
        ws = self._workspaces[workspace_id]
        sync = ws.syncing.pop(peer)
        uid = peer.user_id
        # Replay the buffer over the snapshot, so each event is judged by the membership
        # the user had when it happened.
        channels = set(channel_ids)
        role = sync.role if role is None else role
        deliver: list[Envelope] = []
        for env, decided in sync.buffer:
            change = env.audience.role_change
            if change is not None and change[0] == uid:
                role = change[2]
            if env.seq is None or env.seq <= as_of:
                continue
            cid = env.audience.channel_id
            if cid is not None and uid in env.audience.joins:
                channels.add(cid)
            if decided if decided is not None else receives(env, uid, role, channels):
                deliver.append(env)
            if cid is not None and uid in env.audience.leaves:
                channels.discard(cid)
        peer.role = role
        if uid not in ws.user_channels:
            ws.user_channels[uid] = channels
        ws.ready.add(peer)
        for cid in ws.user_channels[uid]:
            ws.channel_peers.setdefault(cid, set()).add(peer)
        if sync.overflow:
            return False
        for env in deliver:
            peer.send(self._framer(env.payload), env.audience.droppable)
        if as_of > ws.delivered:
            ws.floors[peer] = as_of
            ws.floor_max = max(ws.floor_max, as_of)
        return True

    def detach(self, workspace_id: int, peer: Recipient) -> None:
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            return
        ws.syncing.pop(peer, None)
        ws.ready.discard(peer)
        ws.floors.pop(peer, None)
        uid = peer.user_id
        for cid in ws.user_channels.get(uid, ()):
            peers = ws.channel_peers.get(cid)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del ws.channel_peers[cid]
        user_peers = ws.peers.get(uid)
        if user_peers is not None and peer in user_peers:
            user_peers.remove(peer)
            if not user_peers:
                del ws.peers[uid]
                ws.user_channels.pop(uid, None)
        for watched in list(ws.watchers):
            watchers = ws.watchers[watched]
            watchers.discard(peer)
            if not watchers:
                del ws.watchers[watched]
        self._drop_if_empty(workspace_id, ws)

    def _drop_if_empty(self, workspace_id: int, ws: _Workspace) -> None:
        if ws.empty:
            del self._workspaces[workspace_id]
            if self.on_last_peer:
                self.on_last_peer(workspace_id)

    # ------------------------------------------------------------------ taps

    def attach_tap(self, workspace_id: int, tap: Tap) -> None:
        """Start buffering the workspace's events for ``tap``; call :meth:`ready_tap` next."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = self._workspaces[workspace_id] = _Workspace()
        ws.taps[tap] = _TapState()
        self._tapped.add(workspace_id)

    def ready_tap(self, workspace_id: int, tap: Tap, as_of: int) -> None:
        """Hand ``tap`` the buffered durable events after ``as_of`` (the caller sent those up
        to it); every later event follows live, each once."""
        state = self._workspaces[workspace_id].taps[tap]
        buffered, state.buffer = state.buffer or [], None
        state.floor = as_of
        after = [env for env in buffered if env.seq is not None and env.seq > as_of]
        if after:
            tap.take(after)

    def detach_tap(self, workspace_id: int, tap: Tap) -> None:
        ws = self._workspaces.get(workspace_id)
        if ws is None or ws.taps.pop(tap, None) is None:
            return
        if not ws.taps:
            self._tapped.discard(workspace_id)
        self._drop_if_empty(workspace_id, ws)

    def _feed_taps(self, envelopes: Sequence[Envelope]) -> None:
        by_workspace: dict[int, list[Envelope]] = {}
        for env in envelopes:
            if env.workspace_id in self._tapped:
                by_workspace.setdefault(env.workspace_id, []).append(env)
        for workspace_id, envs in by_workspace.items():
            for tap, state in self._workspaces[workspace_id].taps.items():
                if state.buffer is not None:
                    state.buffer.extend(envs)
                    continue
                floor = state.floor
                if floor:
                    # The tap started from a snapshot ahead of the bus: skip what it had.
                    fresh = [e for e in envs if e.seq is None or e.seq > floor]
                    if any(e.seq is not None for e in fresh):
                        state.floor = 0  # the bus has passed it (it delivers in order)
                    if fresh:
                        tap.take(fresh)
                    continue
                tap.take(envs)

    def watch_presence(self, workspace_id: int, peer: Recipient, user_ids: Iterable[int]) -> None:
        """Replace the set of users whose presence the peer receives."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            return
        wanted = set(user_ids)
        for uid in list(ws.watchers):
            if uid not in wanted:
                ws.watchers[uid].discard(peer)
                if not ws.watchers[uid]:
                    del ws.watchers[uid]
        for uid in wanted:
            ws.watchers.setdefault(uid, set()).add(peer)

    # ------------------------------------------------------------------ delivery

    def deliver(self, envelopes: Sequence[Envelope]) -> None:
        """Bus subscriber: deliver each envelope to its local recipients, in order.

        Consecutive plain channel events for the same channel (a burst of messages, which
        the journal commits together) go out as one write per recipient: the frames are
        joined once and each connection gets one ``write`` (one syscall) for the run.
        """
        if self._tapped:
            self._feed_taps(envelopes)
        i, n = 0, len(envelopes)
        while i < n:
            env = envelopes[i]
            ws = self._workspaces.get(env.workspace_id)
            j = i + 1
            if env.plain:
                while (
                    j < n
                    and envelopes[j].plain
                    and envelopes[j].audience.channel_id == env.audience.channel_id
                    and envelopes[j].workspace_id == env.workspace_id
                ):
                    j += 1
            if ws is not None:
                if j - i > 1 and not ws.floors:
                    self._deliver_run(ws, envelopes[i:j])
                else:
                    for one in envelopes[i:j]:
                        self._deliver_one(ws, one)
            i = j

    def _deliver_run(self, ws: _Workspace, run: Sequence[Envelope]) -> None:
        assert run[0].audience.channel_id is not None
        targets = ws.channel_peers.get(run[0].audience.channel_id, ())
        if targets:
            framer = self._framer
            frames = b"".join([framer(env.payload) for env in run])
            for peer in targets:
                peer.send(frames, False)
        if ws.syncing:
            for env in run:
                self._buffer(ws, env)
        ws.delivered = max(ws.delivered, run[-1].seq or 0)

    def _deliver_one(self, ws: _Workspace, env: Envelope) -> None:
        audience = env.audience
        cid = audience.channel_id
        if cid is not None:
            for uid in audience.joins:
                ws.join(uid, cid)
        change = audience.role_change
        if change is not None:
            # Before delivery: the event that changes a role is judged by the new one.
            for peer in ws.peers.get(change[0], ()):
                peer.role = change[2]
        targets: Collection[Recipient] = ()
        if audience.everyone:
            targets = ws.ready
        elif cid is not None:
            targets = ws.channel_peers.get(cid, ())
        if audience.roles and not audience.everyone:
            roles = audience.roles
            targets = {p for p in ws.ready if p.role in roles}.union(targets)
        if audience.user_ids or audience.presence_of is not None:
            extra = {p for uid in audience.user_ids for p in ws.peers.get(uid, ()) if p in ws.ready}
            if audience.presence_of is not None:
                extra.update(ws.watchers.get(audience.presence_of, ()))
            targets = extra.union(targets)
        seq = env.seq
        if seq is not None:
            if ws.floors:
                if seq <= ws.floor_max:
                    targets = [p for p in targets if ws.floors.get(p, 0) < seq]
                else:
                    ws.floors.clear()
            ws.delivered = max(ws.delivered, seq)
        if targets:
            # The hot loop: one frame, the same bytes to every peer.
            frame = self._framer(env.payload)
            droppable = audience.droppable
            excluded = audience.exclude_user
            if excluded is None:
                for peer in targets:
                    peer.send(frame, droppable)
            else:
                for peer in targets:
                    if peer.user_id != excluded:
                        peer.send(frame, droppable)
        if ws.syncing and env.seq is not None:
            self._buffer(ws, env)
        if cid is not None:
            for uid in audience.leaves:
                ws.leave(uid, cid)
        if audience.revoke_user is not None:
            for peer in list(ws.peers.get(audience.revoke_user, ())):
                if audience.revoke_session in (None, peer.session_id):
                    peer.revoke()

    def _buffer(self, ws: _Workspace, env: Envelope) -> None:
        """Keep a durable event for peers between attach and ready. For users whose
        membership is known here the verdict is taken now; for the others, in ready()."""
        for peer, sync in ws.syncing.items():
            channels = ws.user_channels.get(peer.user_id)
            decided: bool | None = None
            if channels is not None:
                if not receives(env, peer.user_id, peer.role, channels):
                    continue
                decided = True
            if len(sync.buffer) >= MAX_SYNC_BUFFER:
                sync.overflow = True
            else:
                sync.buffer.append((env, decided))


def receives(env: Envelope, uid: int, role: str, channels: set[int]) -> bool:
    """Whether a user with ``role`` and membership ``channels`` is in the envelope's
    audience."""
    audience = env.audience
    if uid == audience.exclude_user:
        return False
    if audience.everyone or uid in audience.user_ids or role in audience.roles:
        return True
    cid = audience.channel_id
    return cid is not None and (cid in channels or uid in audience.leaves)
