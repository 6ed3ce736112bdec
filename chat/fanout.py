"""Local delivery: which of this node's connections receive an event, and handing them the bytes.

The hub keeps, per workspace, the local peers of each user, the channels each local user is a
member of (only for users connected here), and presence subscriptions. It receives envelopes
from the bus, frames each payload once (``framer``: the websocket frame header is the same for
every recipient), and gives the same bytes to every recipient's :class:`Peer`. It does no I/O
of its own, so its rules are unit-tested without sockets.

A peer that attaches first buffers events while the server loads its channels; ``ready()``
then applies the membership snapshot taken at workspace position ``as_of`` and flushes the
buffered events after it, so the client sees every event after ``as_of`` exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chat.bus import Envelope

log = logging.getLogger(__name__)

MAX_SYNC_BUFFER = 10_000


class Peer(Protocol):
    """A delivery target: one authenticated session on this node."""

    user_id: int
    session_id: str

    def send(self, frame: bytes, droppable: bool) -> None:
        """Queue a framed event; never blocks. May drop it (droppable) or cut the peer off."""
        ...

    def revoke(self) -> None:
        """The session was revoked: close the connection."""
        ...


@dataclass(slots=True)
class _Syncing:
    # (event, decided): decided when the user's membership was known at delivery time.
    buffer: list[tuple[Envelope, bool]] = field(default_factory=list)
    overflow: bool = False


@dataclass(slots=True)
class _Workspace:
    peers: dict[int, set[Peer]] = field(default_factory=dict)  # user -> peers
    channel_users: dict[int, set[int]] = field(default_factory=dict)  # channel -> local users
    user_channels: dict[int, set[int]] = field(default_factory=dict)  # local user -> channels
    watchers: dict[int, set[Peer]] = field(default_factory=dict)  # user -> presence watchers
    syncing: dict[Peer, _Syncing] = field(default_factory=dict)


def _identity(payload: bytes) -> bytes:
    return payload


class Hub:
    def __init__(self, framer: Callable[[bytes], bytes] = _identity) -> None:
        self._framer = framer
        self._workspaces: dict[int, _Workspace] = {}
        self.on_first_peer: Callable[[int], None] | None = None
        self.on_last_peer: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ membership of peers

    def attach(self, workspace_id: int, peer: Peer) -> None:
        """Start receiving (buffered) events for the peer; call ``ready()`` next."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = self._workspaces[workspace_id] = _Workspace()
            if self.on_first_peer:
                self.on_first_peer(workspace_id)
        ws.peers.setdefault(peer.user_id, set()).add(peer)
        ws.syncing[peer] = _Syncing()

    def ready(
        self,
        workspace_id: int,
        peer: Peer,
        channel_ids: Iterable[int],
        as_of: int,
        first: bytes | None = None,
    ) -> bool:
        """Apply the user's channel list as of workspace position ``as_of``, send ``first``
        (the auth reply), then the buffered events after ``as_of``. False if the buffer
        overflowed (the caller should close the connection)."""
        ws = self._workspaces[workspace_id]
        sync = ws.syncing.pop(peer)
        uid = peer.user_id
        # Replay the buffer over the snapshot, so each event is judged by the membership
        # the user had when it happened.
        channels = set(channel_ids)
        deliver: list[Envelope] = []
        for env, decided in sync.buffer:
            if env.seq is None or env.seq <= as_of:
                continue
            cid = env.channel_id
            if cid is not None and uid in env.joins:
                channels.add(cid)
            if decided or self._receives(env, uid, channels):
                deliver.append(env)
            if cid is not None and uid in env.leaves:
                channels.discard(cid)
        if uid not in ws.user_channels:
            ws.user_channels[uid] = channels
            for cid in channels:
                ws.channel_users.setdefault(cid, set()).add(uid)
        if first is not None:
            peer.send(first, False)
        if sync.overflow:
            return False
        for env in deliver:
            peer.send(self._framer(env.payload), env.droppable)
        return True

    def detach(self, workspace_id: int, peer: Peer) -> None:
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            return
        ws.syncing.pop(peer, None)
        peers = ws.peers.get(peer.user_id)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del ws.peers[peer.user_id]
                for cid in ws.user_channels.pop(peer.user_id, ()):
                    users = ws.channel_users.get(cid)
                    if users is not None:
                        users.discard(peer.user_id)
                        if not users:
                            del ws.channel_users[cid]
        for uid in list(ws.watchers):
            watchers = ws.watchers[uid]
            watchers.discard(peer)
            if not watchers:
                del ws.watchers[uid]
        if not ws.peers:
            del self._workspaces[workspace_id]
            if self.on_last_peer:
                self.on_last_peer(workspace_id)

    def watch_presence(self, workspace_id: int, peer: Peer, user_ids: Iterable[int]) -> None:
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

    def local_users(self, workspace_id: int) -> set[int]:
        ws = self._workspaces.get(workspace_id)
        return set(ws.peers) if ws else set()

    def peer_count(self) -> int:
        return sum(len(p) for ws in self._workspaces.values() for p in ws.peers.values())

    # ------------------------------------------------------------------ delivery

    def deliver(self, envelopes: Sequence[Envelope]) -> None:
        """Bus subscriber: deliver each envelope to its local recipients, in order."""
        for env in envelopes:
            ws = self._workspaces.get(env.workspace_id)
            if ws is None:
                continue
            self._deliver_one(ws, env)

    def _deliver_one(self, ws: _Workspace, env: Envelope) -> None:
        cid = env.channel_id
        if cid is not None:
            for uid in env.joins:
                if uid in ws.peers and uid in ws.user_channels:
                    ws.user_channels[uid].add(cid)
                    ws.channel_users.setdefault(cid, set()).add(uid)
        frame: bytes | None = None
        for peer in self._recipients(ws, env):
            sync = ws.syncing.get(peer)
            if sync is not None:
                if env.seq is not None:
                    if len(sync.buffer) >= MAX_SYNC_BUFFER:
                        sync.overflow = True
                    else:
                        sync.buffer.append((env, peer.user_id in ws.user_channels))
                continue
            if frame is None:
                frame = self._framer(env.payload)
            peer.send(frame, env.droppable)
        if cid is not None:
            for uid in env.leaves:
                channels = ws.user_channels.get(uid)
                if channels is not None:
                    channels.discard(cid)
                users = ws.channel_users.get(cid)
                if users is not None:
                    users.discard(uid)
                    if not users:
                        del ws.channel_users[cid]
        if env.revoke_user is not None:
            for peer in list(ws.peers.get(env.revoke_user, ())):
                if env.revoke_session is None or peer.session_id == env.revoke_session:
                    peer.revoke()

    def _recipients(self, ws: _Workspace, env: Envelope) -> Iterable[Peer]:
        if env.everyone:
            users: Iterable[int] = list(ws.peers)
        else:
            users = set(env.user_ids)
            if env.channel_id is not None:
                users |= ws.channel_users.get(env.channel_id, set())
                # Users whose membership is not loaded yet: buffered, judged in ready().
                users |= {p.user_id for p in ws.syncing if p.user_id not in ws.user_channels}
        for uid in users:
            if uid == env.exclude_user:
                continue
            yield from list(ws.peers.get(uid, ()))
        if env.presence_of is not None:
            yield from list(ws.watchers.get(env.presence_of, ()))

    @staticmethod
    def _receives(env: Envelope, uid: int, channels: set[int]) -> bool:
        """Whether a user with membership ``channels`` is in the envelope's audience."""
        if uid == env.exclude_user:
            return False
        if env.everyone or uid in env.user_ids:
            return True
        return env.channel_id is not None and env.channel_id in channels
