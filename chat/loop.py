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
import contextlib
import errno
import gc
import sys
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


# A server that cannot listen says so in one line, not a traceback.
_CANNOT_LISTEN = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def serve(main: Coroutine[Any, Any, object], name: str) -> int:
    """Run a server process until it stops (Ctrl-C included); its exit status."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(main)
    except OSError as exc:
        if exc.errno not in _CANNOT_LISTEN:
            raise
        print(f"{name}: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0
