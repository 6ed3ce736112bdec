"""The shared replay cache (:class:`chat.replay.ReplayCache`) over an in-memory log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from chat.bus import Envelope
from chat.replay import ReplayCache, ReplayLost

W = 1


def env(seq: int, size: int = 10) -> Envelope:
    return Envelope(W, seq, "test", b"x" * size)


class Log:
    """Events 1..last of workspace W (the first ``pruned`` gone); counts what it reads."""

    def __init__(self, last: int, pruned: int = 0) -> None:
        self.last = last
        self.pruned = pruned
        self.reads: list[tuple[int, int]] = []
        self.holds_asked = 0
        self.gate: asyncio.Event | None = None

    async def holds(self, workspace_id: int, after_seq: int, up_to: int) -> bool:
        self.holds_asked += 1
        return after_seq >= self.pruned

    async def read(
        self, workspace_id: int, after_seq: int, up_to: int, *, chunk: int = 512
    ) -> AsyncIterator[Sequence[Envelope]]:
        self.reads.append((after_seq, up_to))
        if self.gate is not None:
            await self.gate.wait()
        if after_seq < self.pruned:
            raise ReplayLost("pruned")
        position = after_seq
        while position < up_to:
            end = min(up_to, position + chunk)
            yield [env(s) for s in range(position + 1, end + 1)]
            position = end


async def seqs(cache: ReplayCache, after: int, up_to: int, chunk: int = 512) -> list[int]:
    out: list[int] = []
    async for batch in cache.read(W, after, up_to, chunk=chunk):
        assert 0 < len(batch) <= chunk
        out += [e.seq or 0 for e in batch]
    return out


async def test_a_range_is_read_once_then_served_from_memory() -> None:
    log = Log(100)
    cache = ReplayCache(log)
    assert await seqs(cache, 40, 60) == list(range(41, 61))
    assert await seqs(cache, 45, 60) == list(range(46, 61))
    assert await seqs(cache, 40, 60, chunk=7) == list(range(41, 61))
    assert log.reads == [(40, 60)]
    assert (cache.misses, cache.hits) == (20, 55)


async def test_a_longer_range_reads_only_what_is_missing() -> None:
    """A retry after new events, or a client that was further behind."""
    log = Log(100)
    cache = ReplayCache(log)
    await seqs(cache, 40, 60)
    assert await seqs(cache, 40, 80) == list(range(41, 81))  # newer events
    assert await seqs(cache, 30, 80) == list(range(31, 81))  # older ones
    assert log.reads == [(40, 60), (60, 80), (30, 40)]


async def test_a_disjoint_range_starts_a_new_run() -> None:
    log = Log(100)
    cache = ReplayCache(log)
    await seqs(cache, 10, 20)
    assert await seqs(cache, 50, 60) == list(range(51, 61))
    assert await seqs(cache, 52, 60) == list(range(53, 61))
    assert log.reads == [(10, 20), (50, 60)]


async def test_concurrent_resumes_share_one_read() -> None:
    log = Log(1000)
    log.gate = asyncio.Event()
    cache = ReplayCache(log)
    readers = [asyncio.ensure_future(seqs(cache, 900 + i % 5, 1000)) for i in range(50)]
    await asyncio.sleep(0.01)
    log.gate.set()
    results = await asyncio.gather(*readers)
    for i, result in enumerate(results):
        assert result == list(range(901 + i % 5, 1001))
    # The first read covers (900, 1000]; readers starting before it read what precedes.
    assert log.reads == [(900, 1000)]


async def test_holds_is_answered_from_the_run() -> None:
    log = Log(100, pruned=50)
    cache = ReplayCache(log)
    assert not await cache.holds(W, 10, 100)  # the log's answer
    await seqs(cache, 60, 100)
    asked = log.holds_asked
    assert await cache.holds(W, 70, 100)
    assert log.holds_asked == asked
    assert await cache.holds(W, 100, 100)


async def test_a_lost_range_stays_lost() -> None:
    cache = ReplayCache(Log(100, pruned=50))
    with pytest.raises(ReplayLost):
        await seqs(cache, 10, 100)


async def test_memory_is_bounded_by_dropping_the_oldest() -> None:
    log = Log(1000)
    cache = ReplayCache(log, max_bytes=100)  # ten 10-byte envelopes
    await seqs(cache, 0, 10)
    await seqs(cache, 10, 30)  # extends the run; the oldest go
    log.reads.clear()
    assert await seqs(cache, 20, 30) == list(range(21, 31))
    assert log.reads == []
    assert await seqs(cache, 0, 5) == list(range(1, 6))
    assert log.reads == [(0, 5)]


async def test_a_long_range_is_streamed_not_held() -> None:
    log = Log(1000)
    cache = ReplayCache(log, max_events=100)
    assert await seqs(cache, 0, 1000, chunk=64) == list(range(1, 1001))
    assert await seqs(cache, 0, 1000, chunk=64) == list(range(1, 1001))
    assert log.reads == [(0, 1000), (0, 1000)]
    assert cache.hits == 0


async def test_an_idle_run_expires() -> None:
    now = [0.0]
    log = Log(100)
    cache = ReplayCache(log, ttl_s=30, clock=lambda: now[0])
    await seqs(cache, 40, 60)
    now[0] = 31.0
    await seqs(cache, 40, 60)
    assert log.reads == [(40, 60), (40, 60)]


async def test_live_events_that_follow_the_run_extend_it() -> None:
    log = Log(100)
    cache = ReplayCache(log)
    cache.extend([env(101)])  # no run yet: nothing is started from live events
    assert await seqs(cache, 90, 100) == list(range(91, 101))
    log.last = 105
    cache.extend([env(101), Envelope(W, None, "typing", b"t"), env(102)])
    cache.extend([env(104)])  # a gap: not appended (the run stays contiguous)
    cache.extend([Envelope(W + 1, 103, "test", b"x")])  # another workspace: no run there
    reads = len(log.reads)
    assert await seqs(cache, 95, 102) == list(range(96, 103))
    assert len(log.reads) == reads  # served from memory
    assert await seqs(cache, 100, 105) == list(range(101, 106))
    assert log.reads[-1] == (102, 105)  # only what the run did not hold


async def test_extending_a_run_being_filled_leaves_it_alone() -> None:
    log = Log(100)
    cache = ReplayCache(log)
    assert await seqs(cache, 0, 10) == list(range(1, 11))
    log.gate = asyncio.Event()
    reading = asyncio.ensure_future(seqs(cache, 10, 20))
    await asyncio.sleep(0)
    cache.extend([env(11)])  # the fill holds the lock: skipped
    log.gate.set()
    assert await reading == list(range(11, 21))
    assert await seqs(cache, 0, 20) == list(range(1, 21))
