"""The Redis bus: several nodes, one ordered event stream per workspace.

::

    node A journal ─commit─> PostgreSQL (events table: the outbox)
          └─append(seq..)─> Redis stream chat:ws:{id}  (entry id = "{seq}-0")
                                 │ XREAD (one blocking read per node, all its workspaces)
          node A, node B ... <───┘  -> Hub.deliver, in seq order, gaps backfilled from PG

- Entries are added by a Lua script that refuses to leave a hole: if the stream's top is
  below the batch's first seq - 1, the publisher first copies the missing events from the
  event log (PostgreSQL), so the stream is contiguous in seq and every node reads the same
  order. Events committed by a node that died before appending are copied by any other
  node's sweeper (it compares the stream's top with the database's position).
- A reader that sees a jump in seq (Redis restarted and lost the stream) reads the missing
  range from PostgreSQL before delivering: nothing acknowledged is lost, only delayed.
- The stream is the replay window: entries are trimmed once they are both older than
  ``window_s`` and more than ``max_events`` behind the top.
- Typing and presence (ephemeral) go over pub/sub: at-most-once is what they deserve.
- Replay (:class:`chat.replay.ReplayLog`) reads the stream in bounded chunks (``XRANGE ..
  COUNT``) and takes from the event log whatever the stream does not hold: after a Redis
  restart the stream starts over at a later seq, yet a resume inside the window succeeds.
- Every blocking read has a socket timeout above its block time, so a half-open connection
  is noticed; :attr:`RedisBus.healthy` says whether the last read worked (for ``/readyz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat.bus.base import Envelope, Subscriber, raise_if_cancelling
from chat.replay import CHUNK, DatabaseLog
from chat.storage import Database, queries

log = logging.getLogger(__name__)

# The stream reader blocks this long per XREAD; its socket times out well after that, so a
# read that hangs (Redis stopped, a half-open connection) fails and is retried.
READ_BLOCK_MS = 100
_CLOSE_TIMEOUT_S = 2.0
READER_SOCKET_TIMEOUT_S = 5.0

# KEYS[1]: stream. ARGV[1]: the top the batch needs (below it: refuse, say the top).
# ARGV[2..]: seq, type, header, payload, time quadruples, in seq order.
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local top = 0
if #last > 0 then top = tonumber(string.match(last[1][1], '^(%d+)')) end
if top < tonumber(ARGV[1]) then return {0, top} end
local added = 0
for i = 2, #ARGV, 5 do
  local seq = tonumber(ARGV[i])
  if seq > top then
    redis.call('XADD', KEYS[1], ARGV[i] .. '-0', 't', ARGV[i+1], 'h', ARGV[i+2],
               'p', ARGV[i+3], 'ms', ARGV[i+4])
    top = seq
    added = added + 1
  end
end
return {1, top, added}
"""


def stream_key(workspace_id: int) -> str:
    return f"chat:ws:{workspace_id}:events"


def live_channel(workspace_id: int) -> str:
    return f"chat:ws:{workspace_id}:live"


def _seq(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def _decode(workspace_id: int, entry_id: bytes, fields: dict[bytes, bytes]) -> Envelope:
    return Envelope.from_header(
        workspace_id, _seq(entry_id), fields[b"t"].decode(), fields[b"h"].decode(), fields[b"p"]
    )


class RedisBus:
    def __init__(
        self,
        url: str,
        db: Database,
        *,
        window_s: float,
        max_events: int,
        sweep_interval_s: float = 1.0,
    ) -> None:
        self._url = url
        self._db = db
        self._window_s = window_s
        self._max_events = max_events
        self._sweep_interval = sweep_interval_s
        # redis-py types replies loosely (bytes | str | None): Any, decoded explicitly below.
        # A restarted Redis drops our connections: retry a command on a fresh one.
        self._redis: Any = aioredis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._reader_redis: Any = aioredis.from_url(
            url, socket_timeout=READER_SOCKET_TIMEOUT_S, socket_connect_timeout=2
        )
        self._append = self._redis.register_script(_APPEND)
        self._subscribers: defaultdict[int, list[Subscriber]] = defaultdict(list)
        self._positions: dict[int, int] = {}  # workspace -> last seq delivered here
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._db_log = DatabaseLog(db, window_s, max_events)
        self._healthy = False
        self._closing = False

    @property
    def healthy(self) -> bool:
        """Whether the last stream read succeeded: the node's ``/readyz`` reports it."""
        return self._healthy

    @property
    def client(self) -> Any:
        """The (non-blocking) Redis client, for others that share this Redis."""
        return self._redis

    async def start(self) -> None:
        await self._redis.ping()
        self._healthy = True
        self._pubsub = self._reader_redis.pubsub(ignore_subscribe_messages=True)
        self._tasks = [
            asyncio.create_task(self._read_streams(), name="redis-streams"),
            asyncio.create_task(self._read_live(), name="redis-live"),
            asyncio.create_task(self._sweep(), name="redis-sweeper"),
        ]

    async def close(self) -> None:
        """Stop the reader, live and sweeper tasks, then the clients; bounded in time.

        The loops see ``_closing`` and end after their current command (a blocked XREAD
        returns within ``READ_BLOCK_MS``). Cancelling is the fallback, not the way: a
        cancellation that lands inside redis-py's read while its socket timeout fires can
        come out as a TimeoutError that its own retry swallows, and the task then reads on."""
        self._closing = True
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=READ_BLOCK_MS / 1000 + 1.0)
            for task in pending:
                task.cancel()
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT_S)
                for task in stuck:
                    log.error("redis bus task did not stop", extra={"task": task.get_name()})
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await asyncio.wait_for(self._pubsub.aclose(), _CLOSE_TIMEOUT_S)
        for client in (self._redis, self._reader_redis):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _CLOSE_TIMEOUT_S)

    # ------------------------------------------------------------------ publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        durable: defaultdict[int, list[Envelope]] = defaultdict(list)
        for env in envelopes:
            if env.seq is None:
                await self._redis.publish(
                    live_channel(env.workspace_id),
                    env.type + "\n" + env.audience.header() + "\n" + env.payload.decode(),
                )
            else:
                durable[env.workspace_id].append(env)
        for workspace_id, batch in durable.items():
            await self.append(workspace_id, batch)

    async def append(self, workspace_id: int, batch: Sequence[Envelope]) -> None:
        """Add a batch (contiguous seqs, from the journal or the event log) to the stream,
        first copying from the log whatever the stream is missing before it."""
        first = batch[0].seq
        assert first is not None
        now = str(int(time.time() * 1000))
        args: list[Any] = [first - 1]
        for env in batch:
            args += [env.seq, env.type, env.audience.header(), env.payload, now]
        ok, top, *_ = await self._append(keys=[stream_key(workspace_id)], args=args)
        if ok:
            return
        # A hole between the stream's top and this batch: fill it from the event log, but
        # never more than the window (after a Redis restart the stream starts over).
        start = max(int(top), first - 1 - self._max_events)
        async with self._db.connection() as conn:
            rows = await queries.events_between(conn, workspace_id, start, first - 1)
        missing = [Envelope.from_record(workspace_id, r) for r in rows]
        args = [min(int(top), start)]
        for env in [*missing, *batch]:
            args += [env.seq, env.type, env.audience.header(), env.payload, now]
        await self._append(keys=[stream_key(workspace_id)], args=args)

    # ------------------------------------------------------------------ subscribing

    async def subscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        """Deliver this workspace's events from the stream's current top on. Call before
        taking a snapshot: every event after the snapshot is then read."""
        if subscriber in self._subscribers[workspace_id]:
            return
        if workspace_id not in self._positions:
            top = await self._top(workspace_id)
            if workspace_id not in self._positions:
                self._positions[workspace_id] = top
                await self._pubsub.subscribe(live_channel(workspace_id))
        if subscriber not in self._subscribers[workspace_id]:  # checked again after awaits
            self._subscribers[workspace_id].append(subscriber)

    def unsubscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        subs = self._subscribers.get(workspace_id)
        if subs and subscriber in subs:
            subs.remove(subscriber)
        if not subs:
            self._subscribers.pop(workspace_id, None)
            self._positions.pop(workspace_id, None)
            if self._pubsub is not None:
                task = asyncio.ensure_future(self._pubsub.unsubscribe(live_channel(workspace_id)))
                task.add_done_callback(lambda t: t.exception())

    async def _top(self, workspace_id: int) -> int:
        try:
            last = await self._redis.xrevrange(stream_key(workspace_id), count=1)
        except RedisError:
            last = []
        if last:
            return _seq(last[0][0])
        # No stream (new workspace, or Redis lost it): the database knows where we are.
        async with self._db.connection() as conn:
            row = await queries.get_workspace(conn, workspace_id)
        return int(row["last_event_seq"]) if row else 0

    async def _read_streams(self) -> None:
        backoff = 0.1
        while not self._closing:
            if not self._positions:
                await asyncio.sleep(0.05)
                continue
            streams = {stream_key(w): f"{p}-0" for w, p in self._positions.items()}
            try:
                # A short block, so workspaces subscribed meanwhile join the next read.
                response = await self._reader_redis.xread(streams, count=1000, block=READ_BLOCK_MS)
                self._healthy = True
                backoff = 0.1
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                self._healthy = False
                log.warning("redis read failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for key, entries in response or ():
                workspace_id = int(key.decode().split(":")[2])
                await self._deliver(workspace_id, entries)

    async def _deliver(
        self, workspace_id: int, entries: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> None:
        position = self._positions.get(workspace_id)
        if position is None:
            return
        batch: list[Envelope] = []
        for entry_id, fields in entries:
            seq = _seq(entry_id)
            if seq <= position:
                continue
            if seq > position + 1:
                # The stream lost entries (Redis restarted): the event log has them.
                async with self._db.connection() as conn:
                    rows = await queries.events_between(conn, workspace_id, position, seq - 1)
                batch += [Envelope.from_record(workspace_id, r) for r in rows]
            batch.append(_decode(workspace_id, entry_id, fields))
            position = seq
        if workspace_id not in self._positions:
            return  # unsubscribed while we read the log
        self._positions[workspace_id] = position
        if batch:
            for subscriber in list(self._subscribers.get(workspace_id, ())):
                try:
                    subscriber(batch)
                except Exception:
                    log.exception("subscriber failed")

    async def _read_live(self) -> None:
        while not self._closing:
            if not self._positions:
                await asyncio.sleep(0.05)
                continue
            try:
                message = await self._pubsub.get_message(timeout=0.5)
            except (RedisError, OSError, RuntimeError):
                raise_if_cancelling()
                await asyncio.sleep(0.5)
                continue
            if not message or message.get("type") != "message":
                continue
            workspace_id = int(message["channel"].decode().split(":")[2])
            kind, header, payload = message["data"].split(b"\n", 2)
            env = Envelope.from_header(workspace_id, None, kind.decode(), header.decode(), payload)
            for subscriber in list(self._subscribers.get(workspace_id, ())):
                with contextlib.suppress(Exception):
                    subscriber([env])

    # ------------------------------------------------------------------ repair and trim

    async def _sweep(self) -> None:
        """Copy committed events the stream is missing (their node died between commit and
        append, or Redis was down), and trim the streams to the window. One database query
        and one Redis round trip per sweep, however many workspaces the node serves."""
        behind: dict[int, int] = {}
        rounds = 0
        while not self._closing:
            await asyncio.sleep(self._sweep_interval)
            rounds += 1
            workspaces = list(self._positions)
            if not workspaces:
                continue
            try:
                await self._repair(workspaces, behind)
                if rounds % 10 == 0:
                    for workspace_id in workspaces:
                        await self._trim(workspace_id)
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                log.warning("sweep failed", extra={"error": str(exc)})
            except Exception:
                raise_if_cancelling()
                log.exception("sweep failed")

    async def _repair(self, workspaces: list[int], behind: dict[int, int]) -> None:
        async with self._db.connection() as conn:
            db_tops = await queries.event_positions(conn, workspaces)
        async with self._redis.pipeline(transaction=False) as pipe:
            for workspace_id in workspaces:
                pipe.xrevrange(stream_key(workspace_id), count=1)
            lasts = await pipe.execute()
        for workspace_id, last in zip(workspaces, lasts, strict=True):
            db_top = db_tops.get(workspace_id, 0)
            top = _seq(last[0][0]) if last else 0
            if top >= db_top:
                behind.pop(workspace_id, None)
            elif behind.get(workspace_id) != top:
                behind[workspace_id] = top  # maybe an append in flight: look again next time
            else:
                # Behind for two sweeps in a row: copy from the log.
                behind.pop(workspace_id, None)
                start = max(top, db_top - self._max_events)
                async with self._db.connection() as conn:
                    rows = await queries.events_between(conn, workspace_id, start, db_top)
                if rows:
                    log.info("stream repaired", extra={"workspace_id": workspace_id, "from": start})
                    envelopes = [Envelope.from_record(workspace_id, r) for r in rows]
                    await self.append(workspace_id, envelopes)

    async def _trim(self, workspace_id: int) -> None:
        key = stream_key(workspace_id)
        last = await self._redis.xrevrange(key, count=1)
        if not last:
            return
        candidate = _seq(last[0][0]) - self._max_events + 1
        if candidate <= 1:
            return
        entry = await self._redis.xrange(key, min=f"{candidate}-0", count=1)
        cutoff = (time.time() - self._window_s) * 1000
        if entry and int(entry[0][1][b"ms"]) < cutoff:
            await self._redis.xtrim(key, minid=f"{candidate}-0", approximate=False)

    # ------------------------------------------------------------------ replay

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        """The stream holds the first missed event, or else the event log decides by the
        window rule (the stream may have lost what the window still covers)."""
        if after_seq >= up_to:
            return True
        first = f"{after_seq + 1}-0"
        try:
            entry = await self._redis.xrange(stream_key(workspace_id), min=first, max=first)
        except (RedisError, OSError):
            raise_if_cancelling()
            entry = []
        if entry:
            return True
        return await self._db_log.holds(workspace_id, after_seq, up_to)

    async def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = CHUNK
    ) -> AsyncIterator[Sequence[Envelope]]:
        """From the stream where it holds the range, else from the event log, in chunks of
        at most ``chunk`` (one ``XRANGE .. COUNT`` or one query each)."""
        key = stream_key(workspace_id)
        position = after_seq
        while position < up_to:
            try:
                entries = await self._redis.xrange(
                    key, min=f"{position + 1}-0", max=f"{up_to}-0", count=chunk
                )
            except (RedisError, OSError):
                raise_if_cancelling()
                entries = []
            batch: list[Envelope] = []
            for entry_id, fields in entries:
                if _seq(entry_id) != position + 1 + len(batch):
                    break
                batch.append(_decode(workspace_id, entry_id, fields))
            if not batch:
                # Not in the stream (lost, trimmed, or not yet appended): the log has it,
                # up to where the stream takes over again.
                resumes = _seq(entries[0][0]) - 1 if entries else up_to
                batch = await self._db_log.chunk(
                    workspace_id, position, min(resumes, position + chunk)
                )
            position += len(batch)
            yield batch
