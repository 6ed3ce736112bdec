"""Who a connecting client is: a token (``auth``) or a handle and password (``login``).

The connect sequence (:mod:`chat.connect`) asks an :class:`Identifier` for an
:class:`Identity` and nothing else; token checks, password hashing and their limits live here.

Password login is the one request that costs real resources before authentication (argon2id:
~200 ms of CPU and 64 MiB per attempt), so it is limited three ways, all in memory per node:

- per client IP and per account (workspace + handle): token buckets of
  ``login_attempts_per_ip`` / ``login_attempts_per_account`` attempts, refilled over
  ``login_window_s``; an attempt takes a token before hashing, a successful one gives the
  IP's back and refills the account's (only failures count);
- hashing runs on its own executor of ``login_hash_concurrency`` threads (never the default
  executor that DNS lookups need), with at most ``login_hash_queue`` attempts waiting;
- past any limit the answer is at once ``rate_limited`` with ``retry_after_ms``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chat import wire
from chat.auth import issue_token, new_session_id, verify_password, verify_token
from chat.config import Settings
from chat.errors import ChatError, ErrorCode
from chat.journal import now_ms
from chat.storage import Database, queries

Clock = Callable[[], float]

# Buckets that have refilled are forgotten once this many keys are tracked.
MAX_TRACKED_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the client proved to be. The user row, the session's state and the account's are
    read afterwards by the connect snapshot, in its one statement."""

    user_id: int
    workspace_id: int
    session_id: str
    token: str | None  # a new token, after a password login


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """Per-key token buckets: ``capacity`` tokens, refilled at ``capacity / window_s`` a
    second. Memory is bounded: full buckets are pruned once ``max_keys`` keys are held."""

    def __init__(
        self, capacity: int, window_s: float, clock: Clock, max_keys: int = MAX_TRACKED_KEYS
    ) -> None:
        self.capacity = capacity
        self._rate = capacity / window_s
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            return _Bucket(float(self.capacity), now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        return bucket

    def wait_ms(self, key: str) -> int:
        """0 if ``key`` has a token now, else the milliseconds until it has one."""
        bucket = self._refilled(key, self._clock())
        if bucket.tokens >= 1:
            return 0
        return max(1, math.ceil((1 - bucket.tokens) / self._rate * 1000))

    def take(self, key: str) -> None:
        now = self._clock()
        bucket = self._refilled(key, now)
        bucket.tokens -= 1
        if key not in self._buckets:
            if len(self._buckets) >= self._max_keys:
                self._prune(now)
            self._buckets[key] = bucket

    def give_back(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(self.capacity, bucket.tokens + 1)

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in [
            k for k, b in self._buckets.items() if self._refilled(k, now).tokens >= self.capacity
        ]:
            del self._buckets[key]
        while len(self._buckets) >= self._max_keys:  # all busy: forget the oldest
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class LoginGuard:
    """The per-IP and per-account login limits (no I/O; an injected clock)."""

    def __init__(
        self, *, per_ip: int, per_account: int, window_s: float, clock: Clock = time.monotonic
    ) -> None:
        self.ip = TokenBuckets(per_ip, window_s, clock)
        self.account = TokenBuckets(per_account, window_s, clock)

    @staticmethod
    def account_key(workspace: str, handle: str) -> str:
        return f"{workspace}\x00{handle}"

    def begin(self, ip: str | None, account: str) -> None:
        """Take a token from both buckets, or refuse with ``rate_limited`` (taking none)."""
        wait = self.account.wait_ms(account)
        if ip is not None:
            wait = max(wait, self.ip.wait_ms(ip))
        if wait:
            raise ChatError(ErrorCode.RATE_LIMITED, "too many login attempts", retry_after_ms=wait)
        self.account.take(account)
        if ip is not None:
            self.ip.take(ip)

    def cancel(self, ip: str | None, account: str) -> None:
        """The attempt was not made after all: give both tokens back."""
        self.account.give_back(account)
        if ip is not None:
            self.ip.give_back(ip)

    def succeeded(self, ip: str | None, account: str) -> None:
        """Only failures count: give the IP its token back and reset the account."""
        self.account.reset(account)
        if ip is not None:
            self.ip.give_back(ip)


class HashPool:
    """Password hashing on its own threads, with a bounded wait queue: beyond it, refuse."""

    def __init__(self, workers: int, queue: int, retry_after_ms: int = 1000) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="login-hash")
        self._limit = workers + queue
        self._pending = 0
        self._retry_after_ms = retry_after_ms

    async def verify(self, password_hash: str | None, password: str) -> bool:
        if self._pending >= self._limit:
            raise ChatError(
                ErrorCode.RATE_LIMITED,
                "too many login attempts",
                retry_after_ms=self._retry_after_ms,
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, verify_password, password_hash, password
            )
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Identifier:
    """One per node: identifies ``auth`` and ``login`` requests, with the login limits.
    ``close()`` shuts the hashing threads down."""

    def __init__(self, settings: Settings, db: Database, *, clock: Clock = time.monotonic) -> None:
        self._settings = settings
        self._db = db
        self.guard = LoginGuard(
            per_ip=settings.login_attempts_per_ip,
            per_account=settings.login_attempts_per_account,
            window_s=settings.login_window_s,
            clock=clock,
        )
        self._hashing = HashPool(settings.login_hash_concurrency, settings.login_hash_queue)

    def close(self) -> None:
        self._hashing.close()

    async def identify(self, request: wire.Auth | wire.Login, *, peer_ip: str | None) -> Identity:
        """The identity the request proves, or a ChatError saying why not."""
        if isinstance(request, wire.Auth):
            return await self._token(request)
        return await self._password(request, peer_ip)

    async def _token(self, request: wire.Auth) -> Identity:
        """The signature and expiry only, no query: connects must be cheap in a storm. The
        session, the user and the account are checked by the connect snapshot."""
        claims = verify_token(self._settings.secret_key, request.token)
        return Identity(claims.user_id, claims.workspace_id, claims.session_id, None)

    async def _password(self, request: wire.Login, peer_ip: str | None) -> Identity:
        account = LoginGuard.account_key(request.workspace, request.handle)
        self.guard.begin(peer_ip, account)
        async with self._db.connection() as conn:
            ws = await queries.get_workspace_by_name(conn, request.workspace)
            login = await queries.get_login(conn, ws["id"], request.handle) if ws else None
        # The dummy hash runs for unknown handles too, so timing does not reveal which exist.
        try:
            ok = await self._hashing.verify(
                login["password_hash"] if login else None, request.password
            )
        except ChatError:  # refused before hashing: not an attempt
            self.guard.cancel(peer_ip, account)
            raise
        if not ok or login is None or ws is None:
            raise ChatError(ErrorCode.INVALID_AUTH, "unknown workspace, handle or password")
        self.guard.succeeded(peer_ip, account)
        if login["deactivated"]:
            raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
        settings = self._settings
        session_id = new_session_id()
        token, claims = issue_token(
            settings.secret_key, login["id"], ws["id"], session_id, settings.token_ttl_s
        )
        async with self._db.transaction() as conn:
            await queries.create_session(
                conn, session_id, login["id"], now_ms(), claims.expires_at * 1000
            )
        return Identity(login["id"], ws["id"], session_id, token)
