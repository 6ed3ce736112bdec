"""Administration: workspaces, users, channels, tokens, and synthetic workspaces for load tests.

Changes go through the journal like any request, so the event log stays complete and
numbered; a node running on another process picks them up from the log or the bus.
"""

from __future__ import annotations

import random
from typing import Any

from chat import wire
from chat.auth import hash_password, issue_token, new_session_id
from chat.bus import LocalBus
from chat.config import Settings
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import channel_audience, user_audience
from chat.journal import Journal, Tx, now_ms
from chat.storage import (
    Database,
    UniqueViolation,
    open_database,
    queries,
    secret_key_path,
    token_secret,
)

_FIRST = """
ada grace alan edsger barbara donald ken dennis margaret linus guido bjarne radia frances
john anita leslie tim vint whitfield sophie hedy katherine mary annie evelyn joan jean
niklaus robin yukihiro james brian shafi silvio judea andrew fei rachel
""".split()
_LAST = """
lovelace hopper turing dijkstra liskov knuth thompson ritchie hamilton torvalds rossum
stroustrup perlman allen mccarthy borg lamport berners-lee cerf diffie wilson lamarr johnson
keller easley clarke sammet wirth milner matsumoto gosling kernighan goldwasser micali pearl
tanenbaum li carson
""".split()
_TOPICS = """
general random engineering design product marketing sales support ops infra frontend backend
mobile data ml security releases incidents hiring onboarding social music books coffee pets
travel announcements standup retro planning qa docs legal finance
""".split()


class Admin:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.journal = Journal(db, LocalBus())

    @classmethod
    async def open(cls, settings: Settings) -> Admin:
        db = await open_database(settings.database_url, settings.sqlite_path)
        try:
            path = secret_key_path(
                settings.database_url, settings.sqlite_path, settings.secret_key_file
            )
            secret = await token_secret(db, settings.secret_key, path)
        except BaseException:
            await db.close()
            raise
        return cls(settings.model_copy(update={"secret_key": secret}), db)

    async def close(self) -> None:
        await self.journal.close()
        await self.db.close()

    async def workspace_id(self, name: str) -> int:
        async with self.db.connection() as conn:
            row = await queries.get_workspace_by_name(conn, name)
        if row is None:
            raise ChatError(ErrorCode.NOT_FOUND, f"no workspace named {name!r}")
        return int(row["id"])

    async def create_workspace(self, name: str) -> int:
        async with self.db.transaction() as conn:
            try:
                return await queries.create_workspace(conn, name, now_ms())
            except UniqueViolation:
                raise ChatError(ErrorCode.NAME_TAKEN, f"workspace {name!r} exists") from None

    async def create_users(self, workspace_id: int, specs: list[dict[str, Any]]) -> list[wire.User]:
        """Each spec: handle, display_name, role, and optionally real_name, password."""

        async def op(tx: Tx) -> list[wire.User]:
            users = []
            for spec in specs:
                pw = spec.get("password")
                user = await queries.create_user(
                    tx.conn,
                    workspace_id,
                    spec["handle"],
                    spec.get("display_name") or spec["handle"],
                    spec.get("role", "member"),
                    tx.now,
                    real_name=spec.get("real_name", ""),
                    password_hash=hash_password(pw) if pw else None,
                )
                users.append(user)
                tx.emit(
                    wire.UserChanged(type="user.created", seq=0, workspace_id=0, ts=0, user=user),
                    user_audience(user),
                )
            return users

        try:
            return await self.journal.run(workspace_id, op)
        except UniqueViolation:
            raise ChatError(ErrorCode.NAME_TAKEN, "a handle is taken") from None

    async def create_channel(
        self, workspace_id: int, name: str, creator_id: int, member_ids: list[int], private: bool
    ) -> wire.Channel:
        async def op(tx: Tx) -> wire.Channel:
            kind = "private" if private else "public"
            cid = await queries.create_channel(
                tx.conn, workspace_id, kind, name, creator_id, tx.now
            )
            members = sorted({creator_id, *member_ids})
            await tx.conn.executemany(
                "INSERT INTO channel_members (channel_id, user_id, joined_at) VALUES ($1, $2, $3)",
                [(cid, uid, tx.now) for uid in members],
            )
            channel = await queries.get_channel(tx.conn, cid)
            assert channel is not None
            tx.emit(
                wire.ChannelChanged(
                    type="channel.created", seq=0, workspace_id=0, ts=0, channel=channel
                ),
                channel_audience(channel, joins=tuple(members)),
            )
            return channel

        return await self.journal.run(workspace_id, op)

    async def issue_token(self, user_id: int) -> str:
        async with self.db.transaction() as conn:
            user = await queries.get_user(conn, user_id)
            if user is None:
                raise ChatError(ErrorCode.USER_NOT_FOUND)
            sid = new_session_id()
            token, claims = issue_token(
                self.settings.secret_key, user.id, user.workspace_id, sid, self.settings.token_ttl_s
            )
            await queries.create_session(conn, sid, user.id, now_ms(), claims.expires_at * 1000)
        return token

    async def issue_tokens(self, user_ids: list[int]) -> list[str]:
        """Many tokens in one transaction (seeding thousands of users)."""
        tokens, rows = [], []
        now = now_ms()
        async with self.db.connection() as conn:
            users = {u.id: u for u in await queries.get_users_any(conn, user_ids)}
        for uid in user_ids:
            sid = new_session_id()
            token, claims = issue_token(
                self.settings.secret_key,
                uid,
                users[uid].workspace_id,
                sid,
                self.settings.token_ttl_s,
            )
            tokens.append(token)
            rows.append((sid, uid, now, claims.expires_at * 1000))
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO sessions (id, user_id, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4)",
                rows,
            )
        return tokens

    async def seed(
        self, name: str, n_users: int, n_channels: int, *, seed: int = 1, tokens: bool = True
    ) -> dict[str, Any]:
        """A workspace of ``n_users`` with realistic handles; the first is its owner. Every
        user is a member of every seeded channel (the shape load tests want)."""
        rng = random.Random(seed)
        wid = await self.create_workspace(name)
        specs: list[dict[str, Any]] = []
        taken: set[str] = set()
        for i in range(n_users):
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            handle = f"{first}.{last}"
            if handle in taken:
                handle = f"{first}.{last}{i}"
            taken.add(handle)
            specs.append(
                {
                    "handle": handle,
                    "display_name": f"{first.title()} {last.title()}",
                    "real_name": f"{first.title()} {last.title()}",
                    "role": "owner" if i == 0 else "member",
                }
            )
        users: list[wire.User] = []
        for start in range(0, len(specs), 500):
            users += await self.create_users(wid, specs[start : start + 500])
        ids = [u.id for u in users]
        channels = []
        for i in range(n_channels):
            cname = _TOPICS[i] if i < len(_TOPICS) else f"{_TOPICS[i % len(_TOPICS)]}-{i}"
            channels.append(await self.create_channel(wid, cname, ids[0], ids, private=False))
        toks = await self.issue_tokens(ids) if tokens else [""] * len(ids)
        if self.db.dialect == "postgres":
            # A bulk load leaves the planner's statistics stale (a table of thousands of
            # rows still looks empty), and plans from them scan where an index would do:
            # refresh them now, as autovacuum would a little later.
            async with self.db.connection() as conn:
                await conn.execute("ANALYZE users, sessions, channel_members, channels")
        return {
            "workspace_id": wid,
            "users": [
                {"id": u.id, "handle": u.handle, "role": u.role, **({"token": t} if tokens else {})}
                for u, t in zip(users, toks, strict=True)
            ],
            "channels": [{"id": c.id, "name": c.name} for c in channels],
        }
