"""A Flannel node: clients connect here; the chat tier is reached over a few service links.

The front door is the chat tier's (:class:`chat.front.Front`: probes, admission control, the
connect sequence, the request loop, heartbeats, drain), and so is the delivery
(:class:`chat.fanout.Hub`, fed once per workspace by the upstream subscription): a client
sees the protocol of docs/protocol.md unchanged. What differs is what each step means:

- the sequence's ``Identify`` and ``TakeSnapshot`` are answered by the chat tier for the
  user's own token (:mod:`flannel.upstream`), its replay comes from the chat tier's log
  through a shared :class:`~chat.replay.ReplayCache` (a storm of resumes reads each range
  upstream once);
- requests the workspace cache can answer (bootstrap, autocomplete, look-ups of users,
  channels and members, presence subscriptions) are answered here; everything else is
  relayed verbatim as the session's user.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chat import metrics, wire
from chat.bus import Envelope
from chat.connect import Connect, Effect, Identify, Live, Snapshot, Subscribe, TakeSnapshot
from chat.errors import ChatError, CloseCode, ErrorCode
from chat.front import Front, serve_until_signalled
from chat.identity import Identity
from chat.journal import now_ms
from chat.peer import Peer
from chat.protocol import ClientProtocol, Close
from chat.replay import CHUNK, ReplayCache
from flannel import answers
from flannel import metrics as flannel_metrics
from flannel.cache import WorkspaceCache
from flannel.config import FlannelSettings
from flannel.upstream import Session, Upstream, UpstreamRefused, UpstreamUnavailable

log = logging.getLogger(__name__)

_ERROR_CODES = {code.value: code for code in ErrorCode}


class UpstreamLog:
    """The chat tier's event log, as :class:`~chat.replay.ReplayCache` reads it."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        # The chat tier says so while the range is read (ReplayLost: the answer is too_old).
        return True

    def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = CHUNK
    ) -> AsyncIterator[Sequence[Envelope]]:
        return self._upstream.replay(workspace_id, after_seq, up_to)


@dataclass(slots=True)
class _Workspace:
    """What this node holds of one workspace."""

    subscribed: asyncio.Future[None] | None = None
    cache: WorkspaceCache | None = None
    loading: asyncio.Future[WorkspaceCache] | None = None
    pending: list[Envelope] = field(default_factory=list)  # events while the cache loads


class Edge(Front):
    """One Flannel node."""

    def __init__(self, settings: FlannelSettings) -> None:
        super().__init__(settings)
        self.settings = settings
        self.upstream = Upstream(
            settings.upstream,
            connections=settings.upstream_connections,
            key=settings.key,
            node_id=settings.node_id,
            timeout_s=settings.upstream_timeout_s,
            load_timeout_s=settings.upstream_load_timeout_s,
            backoff_s=settings.upstream_backoff_s,
            backoff_cap_s=settings.upstream_backoff_cap_s,
            ping_interval_s=settings.ping_interval_s,
        )
        self.replay = ReplayCache(UpstreamLog(self.upstream))
        self._sessions: dict[Peer, Session] = {}
        self._workspaces: dict[int, _Workspace] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, no client: LRU order
        self.hub.on_last_peer = self._last_peer
        self.loads = 0  # upstream workspace loads, for tests and metrics

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.upstream.start()
        await self._listen()
        metrics.CONNECTING.set_function(lambda: self.admission.pending)
        flannel_metrics.UPSTREAM_CONNECTIONS.set_function(lambda: self.upstream.connected)
        flannel_metrics.CACHED_WORKSPACES.set_function(
            lambda: sum(w.cache is not None for w in self._workspaces.values())
        )
        flannel_metrics.CACHED_USERS.set_function(self._cached_users)
        log.info(
            "listening",
            extra={
                "host": self.settings.host,
                "port": self.port,
                "upstream": self.settings.upstream,
            },
        )

    async def stop(self) -> None:
        if await self._close_front():
            await self.upstream.close()
            log.info("stopped")

    async def _problem(self) -> str | None:
        # A blip (a chat node or the load balancer in front of the chat tier restarting)
        # cuts every Flannel node's links at once: reporting it would move workspaces
        # between Flannel nodes for nothing (each a cold cache, one load each), while the
        # links come back within a second. Clients wait for the link meanwhile.
        if self.upstream.down_for() > self.settings.upstream_grace_s:
            return "upstream unavailable"
        return None

    # ------------------------------------------------------------------ the connect sequence

    async def _perform(self, peer: Peer, sequence: Connect, action: Effect | None) -> list[Effect]:
        if isinstance(action, Identify):
            return await self._identify(peer, sequence, action.request)
        if isinstance(action, Subscribe):
            await self._subscribe(action.workspace_id)
            return sequence.subscribed()
        if isinstance(action, TakeSnapshot):
            taken = await self.upstream.snapshot(self._sessions[peer])
            refusal = _ERROR_CODES.get(taken.refusal or "", ErrorCode.INVALID_AUTH)
            if taken.user is not None:
                peer.role = taken.user.role
            snapshot = Snapshot(
                taken.as_of,
                frozenset(taken.channel_ids),
                taken.user,
                taken.workspace_name,
                refusal if taken.refusal is not None else None,
            )
            return sequence.snapshot_taken(snapshot)
        return await self._perform_replay(peer, sequence, action)

    async def _identify(
        self, peer: Peer, sequence: Connect, request: wire.FirstFrame
    ) -> list[Effect]:
        address = peer.ws.remote_address
        try:
            session, attached = await self.upstream.attach(
                request,
                client_ip=str(address[0]) if address else None,
                on_frame=lambda frame: self._relayed(peer, frame),
                on_closed=lambda code, reason: self._closed_upstream(peer, code, reason),
            )
        except UpstreamRefused as exc:
            if exc.code == "overloaded":
                # The chat tier's admission control: the client comes back later, as from a
                # chat node (goodbye + 1013).
                hint = wire.Goodbye(
                    reason="overloaded", reconnect_after_ms=exc.retry_after_ms or 1000
                )
                return [Close(CloseCode.TRY_AGAIN_LATER, "overloaded", wire.dump(hint))]
            code = _ERROR_CODES.get(exc.code, ErrorCode.INVALID_AUTH)
            raise ChatError(code, exc.message, retry_after_ms=exc.retry_after_ms) from None
        self._sessions[peer] = session
        peer.user_id, peer.workspace_id = attached.user_id, attached.workspace_id
        peer.session_id = attached.session_id
        identity = Identity(
            attached.user_id, attached.workspace_id, attached.session_id, attached.token
        )
        return sequence.identified(identity)

    async def _went_live(self, peer: Peer, live: Live) -> None:
        session = self._sessions.get(peer)
        if session is not None:
            await self.upstream.live(session)

    async def _ended(self, peer: Peer, was_live: bool) -> None:
        session = self._sessions.pop(peer, None)
        if session is not None:
            await self.upstream.detach(session)

    # ------------------------------------------------------------------ workspaces

    async def _subscribe(self, workspace_id: int) -> None:
        """The workspace's events reach this node once, however many clients arrive."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = self._workspaces[workspace_id] = _Workspace()
        self._idle.pop(workspace_id, None)
        if ws.subscribed is None or (ws.subscribed.done() and ws.subscribed.exception()):
            ws.subscribed = asyncio.ensure_future(self._start_workspace(workspace_id, ws))
        await asyncio.shield(ws.subscribed)

    async def _start_workspace(self, workspace_id: int, ws: _Workspace) -> None:
        after = ws.cache.seq if ws.cache is not None else None
        await self.upstream.subscribe(
            workspace_id,
            lambda envelopes: self._deliver(ws, envelopes),
            lambda: self._gap(workspace_id),
            after=after,
        )
        if ws.cache is None and ws.loading is None:
            ws.loading = asyncio.ensure_future(self._load(workspace_id, ws))
            ws.loading.add_done_callback(_log_failure)

    def _deliver(self, ws: _Workspace, envelopes: list[Envelope]) -> None:
        self.hub.deliver(envelopes)
        self.replay.extend(envelopes)
        if ws.cache is not None:
            ws.cache.apply(envelopes)
        elif ws.loading is not None:
            ws.pending.extend(envelopes)

    async def _load(self, workspace_id: int, ws: _Workspace) -> WorkspaceCache:
        """One upstream load per workspace, shared by every request waiting for it."""
        self.loads += 1
        flannel_metrics.WORKSPACE_LOADS.inc()
        loaded = await self.upstream.load(workspace_id)
        cache = WorkspaceCache.from_loaded(loaded)
        cache.apply([e for e in ws.pending if e.seq is not None and e.seq > cache.seq])
        ws.pending.clear()
        ws.cache = cache
        self._evict()
        return cache

    async def cache(self, workspace_id: int) -> WorkspaceCache:
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            raise ChatError(ErrorCode.UNAVAILABLE, "The workspace is not served here.")
        if ws.cache is not None:
            return ws.cache
        if ws.loading is None or (ws.loading.done() and ws.loading.exception()):
            ws.loading = asyncio.ensure_future(self._load(workspace_id, ws))
        return await asyncio.shield(ws.loading)

    def _gap(self, workspace_id: int) -> None:
        """Events of the workspace were lost to this node (an upstream resubscribe was too
        late): what it derived is stale. Clients resume (their resume answers the truth)."""
        ws = self._workspaces.get(workspace_id)
        if ws is not None:
            ws.cache, ws.loading = None, None
            ws.pending.clear()
        for peer in list(self._peers):
            if peer.workspace_id == workspace_id:
                peer.close(CloseCode.SLOW_CONSUMER, "replay_lost")

    def _last_peer(self, workspace_id: int) -> None:
        """No client of the workspace is left here: stop its events; keep its cache while
        memory allows (a returning client catches it up from where it stopped)."""
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            return
        ws.subscribed = None
        self.spawn(self.upstream.unsubscribe(workspace_id))
        if ws.cache is None:
            del self._workspaces[workspace_id]
            return
        self._idle[workspace_id] = None
        self._evict()

    def _cached_users(self) -> int:
        return sum(len(w.cache.users) for w in self._workspaces.values() if w.cache is not None)

    def _evict(self) -> None:
        bound = self.settings.cache_max_users
        total = self._cached_users()
        while total > bound and self._idle:
            workspace_id, _ = self._idle.popitem(last=False)
            ws = self._workspaces.pop(workspace_id, None)
            if ws is not None and ws.cache is not None:
                total -= len(ws.cache.users)

    # ------------------------------------------------------------------ requests

    async def _dispatch(
        self, peer: Peer, protocol: ClientProtocol, request: wire.Request, text: str
    ) -> None:
        if isinstance(request, wire.Ping):
            peer.requests.release()
            self._reply(peer, protocol.reply(request.id, wire.Pong(server_time=now_ms())))
            return
        if isinstance(request, wire.PresenceSubscribe):
            # Presence events reach this node for the whole workspace: who watches whom is
            # kept here, by the hub; who is active now, the chat tier says.
            self.hub.watch_presence(peer.workspace_id, peer, request.user_ids)
            self.spawn(self._respond(peer, protocol, request, self._presence(peer, request)))
            return
        answer = _LOCAL.get(type(request))
        if answer is not None:
            self.spawn(self._answer(peer, protocol, request, answer))
            return
        session = self._sessions.get(peer)
        try:
            if session is None:
                raise UpstreamUnavailable("no session")
            await self.upstream.relay(session, request.id, text)
        except UpstreamUnavailable:
            peer.requests.release()
            unavailable = ChatError(ErrorCode.UNAVAILABLE, retry_after_ms=1000)
            self._apply(peer, protocol.fail(request.id, unavailable))

    async def _answer(
        self, peer: Peer, protocol: ClientProtocol, request: wire.Request, answer: _Answer
    ) -> None:
        await self._respond(peer, protocol, request, self._from_cache(peer, request, answer))

    async def _from_cache(self, peer: Peer, request: wire.Request, answer: _Answer) -> wire.Data:
        session = self._sessions.get(peer)
        if session is not None and 0 < session.expires_at <= time.time():
            # The chat tier refuses a relayed request past expiry; so does the cache.
            raise ChatError(ErrorCode.TOKEN_EXPIRED)
        cache = await self.cache(peer.workspace_id)
        data: wire.Data = await answer(self, peer, cache, request)
        return data

    async def _presence(self, peer: Peer, request: wire.PresenceSubscribe) -> wire.PresenceSnapshot:
        """Who of the watched users is active now; with the chat tier out of reach, nobody
        (the watch is in place: changes still arrive as events)."""
        session = self._sessions.get(peer)
        if session is None:
            return wire.PresenceSnapshot(active=[])
        try:
            frame = await self.upstream.request(
                session, {"type": "presence.subscribe", "user_ids": request.user_ids}
            )
        except UpstreamUnavailable:
            return wire.PresenceSnapshot(active=[])
        if frame.get("type") != "reply":
            return wire.PresenceSnapshot(active=[])
        return wire.PresenceSnapshot.model_validate(frame["data"])

    def _relayed(self, peer: Peer, frame: bytes) -> None:
        """A reply or error from the chat tier to one of this client's requests."""
        self._reply(peer, frame)
        peer.requests.release()

    def _closed_upstream(self, peer: Peer, code: int, reason: str) -> None:
        if reason == ErrorCode.TOKEN_REVOKED.value:
            peer.revoke()
        else:
            peer.close_when_idle(CloseCode(code), reason)

    async def counts(self, peer: Peer) -> list[wire.ChannelCounts]:
        """The caller's unread and mention counts (not cached: they are per user)."""
        session = self._sessions.get(peer)
        if session is None:
            raise ChatError(ErrorCode.UNAVAILABLE, retry_after_ms=1000)
        frame = await self.upstream.request(session, {"type": "reads.counts"})
        if frame.get("type") != "reply":
            code = _ERROR_CODES.get(str(frame.get("code")), ErrorCode.UNAVAILABLE)
            raise ChatError(code, str(frame.get("message", "")))
        return wire.Counts.model_validate(frame["data"]).channels


_Answer = Callable[[Edge, Peer, WorkspaceCache, Any], Any]


async def _bootstrap(edge: Edge, peer: Peer, cache: WorkspaceCache, req: wire.Bootstrap) -> Any:
    parts = set(req.parts or ("user", "workspace", "channels", "users"))
    counts = await edge.counts(peer) if "channels" in parts else []
    return answers.bootstrap(cache, peer.user_id, req.parts, counts)


async def _from_cache(edge: Edge, peer: Peer, cache: WorkspaceCache, req: Any) -> Any:
    return _PURE[type(req)](cache, peer.user_id, req)


_PURE: dict[type[wire.Request], Callable[[WorkspaceCache, int, Any], wire.Data]] = {
    wire.UsersInfo: answers.users_info,
    wire.ChannelsInfo: answers.channels_info,
    wire.ChannelsMembers: answers.channels_members,
    wire.UsersAutocomplete: answers.users_autocomplete,
    wire.ChannelsAutocomplete: answers.channels_autocomplete,
}
_LOCAL: dict[type[wire.Request], _Answer] = {
    wire.Bootstrap: _bootstrap,
    **{kind: _from_cache for kind in _PURE},
}


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("workspace load failed", extra={"error": repr(future.exception())})


async def run(settings: FlannelSettings) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully."""
    await serve_until_signalled(Edge(settings))
