"""The server process: the event loop (uvloop when it is installed, asyncio's otherwise) and
the garbage collector's settings.

A node holds thousands of connections, each a few hundred objects that live as long as the
connection. CPython's collector makes a full pass over every tracked object whenever the old
generation has grown by a quarter, and while connections pile up in a reconnect storm that
is a pass every few hundred connects, each longer than the last: measured over a storm of
5,000 connects (bench/storm.py), six full passes took 1.5 s of the node's ~4 s of CPU.
So the objects of start-up (modules, schemas: never garbage) are frozen out of every pass,
and a full pass waits for 1,000 collections of the middle generation instead of 10 (about
7 million net allocations; the quarter rule still applies). Cycles in young objects are
collected as before.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# gc.set_threshold: (young, middle, full): the full pass after 1,000 middle ones (default 10).
GC_THRESHOLDS = (700, 10, 1_000)


def tune_gc() -> None:
    """Freeze what exists now (call once start-up has imported everything) and space out
    the full passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T]) -> T:
    tune_gc()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
