"""Admission control for connects: take on what can be served in time, hint the rest.

A connect costs the node a handshake, an ``auth`` and a snapshot. In a reconnect storm,
connects that queue longer than their clients wait time out and come back, while the node
still serves the abandoned ones: the storm compounds. So a node takes on at most as many
connects at once as it can finish within ``budget_s`` at the rate it has been finishing them
(and never more than ``max_connecting``), and answers the others at once with a retry hint:
HTTP 503 with ``Retry-After`` and a ``goodbye`` ``overloaded`` body before the upgrade (the
driver, :mod:`chat.server`).

A hint is an appointment: refused clients are given distinct times, after the queue ahead of
them has drained and spaced at the rate the node serves, so that they come back as it has
room (clients add up to as much again in jitter, so the spacing allows for that). Short or
equal hints would bring the refused back together, to be refused again, each refusal costing
the node a handshake: the storm would compound.

The queue a node sees is not the whole queue: connections wait in the kernel's listen queue
before the node accepts them, and a node that falls behind could serve every connect it
takes on and still have its clients time out there. So :meth:`Admission.admit` is also told
how long the connection already waited (the kernel knows: :func:`chat.transport.waited_s`);
past ``max_wait_s`` it is sent away with an appointment too. Refusing is cheap (no upgrade,
no query), so the queue drains fast and the connects that are served are fresh ones.

The rate is what the node finishes per second of its own CPU time (connects per CPU
second, over half-second windows with enough connects to tell): it is what a fully busy node
would do, whether the node is busy now or not. (Connects finished per second of wall time
would only say how many came: a node that hints clients to come at the rate it believes it
can serve would then measure exactly that rate, and never learn that it could do more, nor
recover after a slow spell. That ratchet was measured: a storm of 5,000 that went on for
minutes.) All the CPU the node spends counts against its connects (fan-out, refusals, the
collector), so the estimate errs low, and under load that work is real. No I/O here; the
clocks are injected, for the tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Rate measurement window, the connects a window needs to count, and the weight of a new
# window in the estimate.
WINDOW_S = 0.5
MIN_SAMPLE = 20
SMOOTHING = 0.5
# Hints, in milliseconds: never so short that the client is back before anything changed,
# never so long that an idle node waits for clients it turned away.
MIN_HINT_MS = 250
MAX_HINT_MS = 30_000
# A node is assumed to finish at least this many connects a second, however slow it looked.
MIN_RATE = 50.0
# Clients wait a hint plus up to as much again (1.5x on average): appointments are spaced
# that much tighter, so that returns arrive at about the rate the node serves.
CLIENT_STRETCH = 1.5


class Admission:
    """Counts the connects in progress on one node (``pending``) and decides on new ones.

    :meth:`admit` is called when a connect arrives (before the upgrade): None means taken on,
    and the caller must call :meth:`finished` exactly once when that connect ends (live,
    refused, failed or abandoned). An int is a refusal: the retry hint, in milliseconds."""

    __slots__ = (
        "_budget_s",
        "_clock",
        "_cpu_clock",
        "_cpu_start",
        "_done",
        "_max",
        "_max_wait_s",
        "_min_limit",
        "_next_slot",
        "_rate",
        "_window_start",
        "admitted",
        "pending",
        "refused",
        "stale",
    )

    def __init__(
        self,
        *,
        max_connecting: int,
        budget_s: float,
        max_wait_s: float = math.inf,
        initial_rate: float = 2_000.0,
        min_limit: int = 64,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._max = max_connecting
        self._budget_s = budget_s
        self._max_wait_s = max_wait_s
        self._min_limit = min(min_limit, max_connecting)
        self._rate = initial_rate
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._window_start = clock()
        self._cpu_start = cpu_clock()
        self._next_slot = 0.0
        self._done = 0
        self.pending = 0
        self.admitted = 0
        self.refused = 0
        self.stale = 0  # of the refused: because they had waited too long already

    @property
    def rate(self) -> float:
        """Connects the node finishes per second of CPU, as last measured."""
        return self._rate

    def limit(self) -> int:
        """How many connects may be in progress at once now."""
        rate = max(self._rate, MIN_RATE)
        return min(self._max, max(self._min_limit, int(rate * self._budget_s)))

    def admit(self, waited_s: float = 0.0) -> int | None:
        """None: taken on. Else the retry hint (ms). ``waited_s``: how long the connection
        had waited before it reached the node's code."""
        now = self._clock()
        self._roll(now)
        if waited_s >= self._max_wait_s:
            self.refused += 1
            self.stale += 1
            return self.hint_ms()
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
        """An appointment for a client sent away: the next free slot once half the queue
        now in progress has drained (by then there is room), slots spaced at the rate the
        node serves. Each call takes a slot."""
        now = self._clock()
        rate = max(self._rate, MIN_RATE)
        room_at = now + self.pending / 2 / rate
        self._next_slot = max(self._next_slot, room_at) + 1 / (rate * CLIENT_STRETCH)
        hint = (self._next_slot - now) * 1000
        return int(min(MAX_HINT_MS, max(MIN_HINT_MS, math.ceil(hint))))

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed < WINDOW_S:
            return
        cpu_now = self._cpu_clock()
        cpu = cpu_now - self._cpu_start
        if self._done >= MIN_SAMPLE and cpu > 0:
            measured = self._done / cpu
            self._rate = (1 - SMOOTHING) * self._rate + SMOOTHING * measured
        self._window_start = now
        self._cpu_start = cpu_now
        self._done = 0
