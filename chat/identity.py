"""Who a connecting client is: a token (``auth``) or a handle and password (``login``); or
who it becomes: a new account with an invite (``signup``), or the first workspace's owner
(``setup``, :mod:`chat.handlers.invites` creates both).

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

``signup`` and ``setup`` hash a new password: they take the same tokens (the account key is
the invite, or the one setup) and the same hashing threads; a refused one (a bad invite, a
taken handle) counts as a failure, so invite codes cannot be tried fast.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from chat import wire
from chat.auth import hash_password, issue_token, new_session_id, verify_password, verify_token
from chat.config import Settings
from chat.errors import ChatError, ErrorCode
from chat.handlers import invites
from chat.journal import Journal, now_ms
from chat.storage import Database, queries

Clock = Callable[[], float]
T = TypeVar("T")

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
        return await self._run(verify_password, password_hash, password)

    async def hash(self, password: str) -> str:
        return await self._run(hash_password, password)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pending >= self._limit:
            raise ChatError(
                ErrorCode.RATE_LIMITED,
                "too many login attempts",
                retry_after_ms=self._retry_after_ms,
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Identifier:
    """One per node: identifies ``auth`` and ``login`` requests, with the login limits, and
    creates the accounts of ``signup`` and ``setup`` (through ``journal``; without one they
    are refused ``unavailable``). ``close()`` shuts the hashing threads down.
    ``on_setup`` is called once a setup succeeded, or was refused because a workspace
    exists: the node stops announcing ``setup_required``."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        journal: Journal | None = None,
        clock: Clock = time.monotonic,
        on_setup: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._journal = journal
        self._on_setup = on_setup
        self.guard = LoginGuard(
            per_ip=settings.login_attempts_per_ip,
            per_account=settings.login_attempts_per_account,
            window_s=settings.login_window_s,
            clock=clock,
        )
        self._hashing = HashPool(settings.login_hash_concurrency, settings.login_hash_queue)

    def close(self) -> None:
        self._hashing.close()

    async def identify(self, request: wire.FirstFrame, *, peer_ip: str | None) -> Identity:
        """The identity the request proves (or creates), or a ChatError saying why not."""
        if isinstance(request, wire.Auth):
            return await self._token(request)
        if isinstance(request, wire.Login):
            return await self._password(request, peer_ip)
        if isinstance(request, wire.Signup):
            return await self._signup(request, peer_ip)
        return await self._setup(request, peer_ip)

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

    def _journal_or_refuse(self) -> Journal:
        if self._journal is None:
            raise ChatError(ErrorCode.UNAVAILABLE, "sign-up is not served here")
        return self._journal

    async def _signup(self, request: wire.Signup, peer_ip: str | None) -> Identity:
        invites.check_new_account(request.handle, request.password, request.display_name)
        journal = self._journal_or_refuse()
        account = LoginGuard.account_key("\x00signup", invites.code_hash(request.invite))
        self.guard.begin(peer_ip, account)
        # An unknown code is refused before hashing, but counts as a failed attempt.
        workspace_id = await invites.invite_workspace(self._db, request.invite)
        pw_hash = await self._hash_new(request.password, peer_ip, account)
        created = await invites.sign_up(journal, self._settings, workspace_id, request, pw_hash)
        self.guard.succeeded(peer_ip, account)
        return Identity(created.user.id, workspace_id, created.session_id, created.token)

    async def _setup(self, request: wire.Setup, peer_ip: str | None) -> Identity:
        invites.check_workspace_name(request.workspace)
        invites.check_new_account(request.handle, request.password, request.display_name)
        journal = self._journal_or_refuse()
        if not self._settings.open_setup:
            raise ChatError(ErrorCode.FORBIDDEN, "setup is disabled on this server")
        account = LoginGuard.account_key("\x00setup", "")
        self.guard.begin(peer_ip, account)
        try:
            async with self._db.connection() as conn:
                if await queries.any_workspace(conn):  # cheap, before hashing
                    raise ChatError(ErrorCode.FORBIDDEN, invites.SET_UP_ALREADY)
            pw_hash = await self._hash_new(request.password, peer_ip, account)
            # The claim in the transaction decides between concurrent setups.
            created = await invites.set_up(journal, self._settings, request, pw_hash)
        except ChatError as exc:
            if exc.code is ErrorCode.FORBIDDEN:
                self.guard.cancel(peer_ip, account)  # not a guess at anything
                if self._on_setup is not None:
                    self._on_setup()
            raise
        self.guard.succeeded(peer_ip, account)
        if self._on_setup is not None:
            self._on_setup()
        user = created.user
        return Identity(user.id, user.workspace_id, created.session_id, created.token)

    async def _hash_new(self, password: str, peer_ip: str | None, account: str) -> str:
        """Hash a new password; a refusal before hashing (the pool is full) is no attempt."""
        try:
            return await self._hashing.hash(password)
        except ChatError:
            self.guard.cancel(peer_ip, account)
            raise
