"""Admission control for connects: take on what can be served in time, hint the rest.

A connect costs the node a handshake, an ``auth`` and a snapshot. In a reconnect storm,
connects that queue longer than their clients wait time out and come back, while the node
still serves the abandoned ones: the storm compounds. So a node takes on at most as many
connects at once as it can finish within ``budget_s`` at the rate it has been finishing them
(and never more than ``max_connecting``), and answers the others at once with a retry hint:
HTTP 503 with ``Retry-After`` and a ``goodbye`` ``overloaded`` body before the upgrade (the
driver, :mod:`chat.server`). The hints are spread (about the time the queue takes to drain,
times a random factor), so the refused clients come back spread out rather than as a second
wave.

The rate is measured only while the node is behind (more connects waiting at the end of a
measurement window than it finished in it): a node that is merely idle has not shown what it
can do, and must not shrink its limit because few clients came. No I/O here; the clock and
the randomness are injected, for the tests.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

# Rate measurement window, and the weight of a new window in the estimate.
WINDOW_S = 0.5
SMOOTHING = 0.5
# Hints, in milliseconds: never so short that the client is back before anything changed,
# never so long that an idle node waits for clients it turned away.
MIN_HINT_MS = 250
MAX_HINT_MS = 30_000


class Admission:
    """Counts the connects in progress on one node (``pending``) and decides on new ones.

    :meth:`admit` is called when a connect arrives (before the upgrade): None means taken on,
    and the caller must call :meth:`finished` exactly once when that connect ends (live,
    refused, failed or abandoned). An int is a refusal: the retry hint, in milliseconds."""

    __slots__ = (
        "_budget_s",
        "_clock",
        "_done",
        "_max",
        "_min_limit",
        "_random",
        "_rate",
        "_window_start",
        "admitted",
        "pending",
        "refused",
    )

    def __init__(
        self,
        *,
        max_connecting: int,
        budget_s: float,
        initial_rate: float = 2_000.0,
        min_limit: int = 64,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._max = max_connecting
        self._budget_s = budget_s
        self._min_limit = min(min_limit, max_connecting)
        self._rate = initial_rate
        self._clock = clock
        self._random = rng
        self._window_start = clock()
        self._done = 0
        self.pending = 0
        self.admitted = 0
        self.refused = 0

    @property
    def rate(self) -> float:
        """Connects finished per second, as last measured under load."""
        return self._rate

    def limit(self) -> int:
        """How many connects may be in progress at once now."""
        return min(self._max, max(self._min_limit, int(self._rate * self._budget_s)))

    def admit(self) -> int | None:
        self._roll(self._clock())
        if self.pending >= self.limit():
            self.refused += 1
            return self.hint_ms()
        self.pending += 1
        self.admitted += 1
        return None

    def finished(self, *, served: bool) -> None:
        """One admitted connect ended; ``served`` when it went live (it counts for the
        rate; a failed or abandoned one does not show what the node can do)."""
        self.pending -= 1
        if served:
            self._done += 1

    def hint_ms(self) -> int:
        """When to come back: about the time the current queue takes to drain, spread by a
        random factor in [0.5, 1) so that those refused together do not return together."""
        drain_s = self.pending / max(self._rate, 1.0)
        hint = drain_s * 1000 * (0.5 + self._random() / 2)
        return int(min(MAX_HINT_MS, max(MIN_HINT_MS, math.ceil(hint))))

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed < WINDOW_S:
            return
        behind = self.pending >= max(self._min_limit, self._done)
        if behind and self._done > 0 and elapsed < 4 * WINDOW_S:
            # More were waiting than finished: the node was working flat out, so what
            # finished is what it can do.
            measured = self._done / elapsed
            self._rate = (1 - SMOOTHING) * self._rate + SMOOTHING * measured
        self._window_start = now
        self._done = 0
