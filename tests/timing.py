"""Timeouts for tests that can be stretched on slow machines.

Tests that wait for something (a server to start, a message to arrive) should
not hard-code how long they wait: wrap the number in :func:`scaled` and a slow
CI runner can set ``CHAT_TEST_TIMEOUT_FACTOR=3`` instead of anyone editing tests.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable

TIMEOUT_FACTOR_ENV = "CHAT_TEST_TIMEOUT_FACTOR"


def timeout_factor() -> float:
    """The multiplier from ``CHAT_TEST_TIMEOUT_FACTOR`` (default 1.0).

    Read on every call, so ``monkeypatch.setenv`` works. A value that is not a
    finite number > 0 is a configuration mistake and raises ``ValueError``.
    """
    raw = os.environ.get(TIMEOUT_FACTOR_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_FACTOR_ENV}={raw!r} is not a number") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"{TIMEOUT_FACTOR_ENV}={raw!r} must be a finite number > 0")
    return factor


def scaled(seconds: float) -> float:
    """``seconds`` multiplied by :func:`timeout_factor`."""
    return seconds * timeout_factor()


class Fixed(random.Random):
    """An rng whose random() is always ``value``: jitter (``uniform(a, b)``) is then
    predictable, and a test can wait a hint or a backoff without it."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds
    (pass ``scaled(...)`` to let slow machines stretch it)."""
    limit = timeout
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {limit:.1f}s waiting for {what}"
        await asyncio.sleep(0.01)
