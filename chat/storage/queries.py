"""Every query the server runs, each a named function over a :class:`Connection`.

Written in PostgreSQL's dialect with ``$n`` parameters only (never string formatting of values);
the SQLite adapter translates. Functions return wire objects (:mod:`chat.wire`) where the domain
shape is the wire shape, and plain values otherwise.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chat import wire
from chat.storage.base import Connection, Record, UniqueViolation

# --------------------------------------------------------------------------- workspaces


async def create_workspace(conn: Connection, name: str, now: int) -> int:
    wid: int = await conn.fetchval(
        "INSERT INTO workspaces (name, created_at) VALUES ($1, $2) RETURNING id", name, now
    )
    return wid


async def get_workspace(conn: Connection, workspace_id: int) -> Record | None:
    return await conn.fetchrow(
        "SELECT id, name, last_event_seq FROM workspaces WHERE id = $1", workspace_id
    )


async def get_workspace_by_name(conn: Connection, name: str) -> Record | None:
    return await conn.fetchrow(
        "SELECT id, name, last_event_seq FROM workspaces WHERE name = $1", name
    )


async def lock_workspace(conn: Connection, workspace_id: int) -> None:
    """Take the workspace row lock first thing in a journal transaction. Every batch of a
    workspace then takes its locks (channel rows, then the workspace row again to number
    events) behind this one, so batches on different nodes are serialized and can never
    wait for each other in opposite orders (no deadlock by design). SQLite: the statement
    is a plain read; ``BEGIN IMMEDIATE`` already serializes writers."""
    await conn.fetchval("SELECT id FROM workspaces WHERE id = $1 FOR UPDATE", workspace_id)


async def allocate_event_seqs(conn: Connection, workspace_id: int, count: int) -> int:
    """Reserve ``count`` event positions; returns the last. Holds the workspace row lock
    until commit, so positions are handed out in commit order across nodes."""
    last: int = await conn.fetchval(
        "UPDATE workspaces SET last_event_seq = last_event_seq + $2 WHERE id = $1"
        " RETURNING last_event_seq",
        workspace_id,
        count,
    )
    return last


async def insert_events(
    conn: Connection, rows: Sequence[tuple[int, int, str, str, str, int]]
) -> None:
    """Rows of (workspace_id, seq, type, audience, payload, created_at)."""
    await conn.executemany(
        "INSERT INTO events (workspace_id, seq, type, audience, payload, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        rows,
    )


async def prunable_workspaces(conn: Connection, keep_events: int) -> list[tuple[int, int]]:
    """(workspace id, highest seq that may be pruned) for the workspaces with more than
    ``keep_events`` events: the last ``keep_events`` of each are always kept."""
    rows = await conn.fetch(
        "SELECT id, last_event_seq - $1 AS bound FROM workspaces WHERE last_event_seq > $1"
        " ORDER BY id",
        keep_events,
    )
    return [(r["id"], r["bound"]) for r in rows]


async def prune_events(
    conn: Connection, workspace_id: int, max_seq: int, created_before: int, limit: int
) -> int:
    """Delete up to ``limit`` of the workspace's oldest events with ``seq <= max_seq`` created
    before ``created_before`` (along the primary key); returns how many."""
    rows = await conn.fetch(
        "DELETE FROM events WHERE workspace_id = $1 AND seq IN (SELECT seq FROM events"
        " WHERE workspace_id = $1 AND seq <= $2 AND created_at < $3 ORDER BY seq LIMIT $4)"
        " RETURNING seq",
        workspace_id,
        max_seq,
        created_before,
        limit,
    )
    return len(rows)


SETUP_META_KEY = "setup_claimed_at"


async def any_workspace(conn: Connection) -> bool:
    found = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM workspaces)")
    return bool(found)


async def claim_setup(conn: Connection, now: int) -> bool:
    """Claim the one-time first setup within the caller's transaction: False when a
    workspace exists, or another setup holds the claim (the ``meta`` row's key decides
    between concurrent ones: the second insert waits for the first to commit, then fails)."""
    if await any_workspace(conn):
        return False
    try:
        async with conn.savepoint():
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2)", SETUP_META_KEY, str(now)
            )
    except UniqueViolation:
        return False
    return True


# --------------------------------------------------------------------------- users

_USER_COLS = "id, workspace_id, handle, display_name, real_name, avatar_url, tz, role, deactivated"
_USER_FIELDS = frozenset(_USER_COLS.split(", "))


def _user(row: Record) -> wire.User:
    return wire.User.model_validate(dict(row))


async def create_user(
    conn: Connection,
    workspace_id: int,
    handle: str,
    display_name: str,
    role: str,
    now: int,
    *,
    real_name: str = "",
    avatar_url: str = "",
    tz: str = "UTC",
    password_hash: str | None = None,
) -> wire.User:
    row = await conn.fetchrow(
        "INSERT INTO users (workspace_id, handle, display_name, real_name, avatar_url, tz,"
        " role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        f" RETURNING {_USER_COLS}",
        workspace_id,
        handle,
        display_name,
        real_name,
        avatar_url,
        tz,
        role,
        password_hash,
        now,
    )
    assert row is not None
    return _user(row)


async def get_user(conn: Connection, user_id: int) -> wire.User | None:
    row = await conn.fetchrow(f"SELECT {_USER_COLS} FROM users WHERE id = $1", user_id)
    return _user(row) if row else None


async def get_login(conn: Connection, workspace_id: int, handle: str) -> Record | None:
    return await conn.fetchrow(
        "SELECT id, password_hash, deactivated FROM users WHERE workspace_id = $1 AND handle = $2",
        workspace_id,
        handle,
    )


async def list_users(
    conn: Connection, workspace_id: int, after_id: int, limit: int
) -> list[wire.User]:
    rows = await conn.fetch(
        f"SELECT {_USER_COLS} FROM users WHERE workspace_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        workspace_id,
        after_id,
        limit,
    )
    return [_user(r) for r in rows]


async def get_users(conn: Connection, workspace_id: int, ids: Sequence[int]) -> list[wire.User]:
    rows = await conn.fetch(
        f"SELECT {_USER_COLS} FROM users WHERE workspace_id = $1 AND id = ANY($2::bigint[])"
        " ORDER BY id",
        workspace_id,
        list(ids),
    )
    return [_user(r) for r in rows]


async def user_ids_by_handles(
    conn: Connection, workspace_id: int, handles: Sequence[str]
) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT id, handle FROM users WHERE workspace_id = $1 AND handle = ANY($2::text[])"
        " AND NOT deactivated",
        workspace_id,
        list(handles),
    )
    return {r["handle"]: r["id"] for r in rows}


async def update_user_profile(
    conn: Connection, user_id: int, changes: dict[str, str]
) -> wire.User | None:
    # Column names come from a fixed allow-list, never from the client.
    allowed = ("display_name", "real_name", "avatar_url", "tz")
    cols = [c for c in allowed if c in changes]
    if not cols:
        return await get_user(conn, user_id)
    sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
    row = await conn.fetchrow(
        f"UPDATE users SET {sets} WHERE id = $1 RETURNING {_USER_COLS}",
        user_id,
        *(changes[c] for c in cols),
    )
    return _user(row) if row else None


async def set_user_role(conn: Connection, user_id: int, role: str) -> wire.User | None:
    row = await conn.fetchrow(
        f"UPDATE users SET role = $2 WHERE id = $1 RETURNING {_USER_COLS}", user_id, role
    )
    return _user(row) if row else None


async def deactivate_user(conn: Connection, user_id: int) -> wire.User | None:
    row = await conn.fetchrow(
        f"UPDATE users SET deactivated = TRUE WHERE id = $1 RETURNING {_USER_COLS}", user_id
    )
    return _user(row) if row else None


# --------------------------------------------------------------------------- sessions


async def create_session(
    conn: Connection, session_id: str, user_id: int, now: int, expires_at: int
) -> None:
    await conn.execute(
        "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        session_id,
        user_id,
        now,
        expires_at,
    )


# A user row (u) with its session's state (s, left-joined: both None without a session).
_USER_AND_SESSION = (
    ", ".join("u." + c for c in _USER_COLS.split(", "))
    + ", s.revoked_at AS session_revoked_at, s.expires_at AS session_expires_at"
)


def _user_and_session(row: Record) -> tuple[wire.User, int | None, int | None, dict[str, Any]]:
    """(user, session revoked_at, session expires_at, the row's other columns)."""
    fields = dict(row)
    revoked_at = fields.pop("session_revoked_at")
    expires_at = fields.pop("session_expires_at")
    rest = {k: fields.pop(k) for k in list(fields) if k not in _USER_FIELDS}
    return _user(fields), revoked_at, expires_at, rest


async def get_actor(
    conn: Connection, user_id: int, session_id: str
) -> tuple[wire.User, int | None, int | None] | None:
    """The user with its session's (revoked_at, expires_at), in one statement; both None
    when the session does not exist or is another user's. None when there is no user."""
    row = await conn.fetchrow(
        f"SELECT {_USER_AND_SESSION} FROM users u"
        " LEFT JOIN sessions s ON s.id = $2 AND s.user_id = u.id WHERE u.id = $1",
        user_id,
        session_id,
    )
    if row is None:
        return None
    user, revoked_at, expires_at, _ = _user_and_session(row)
    return user, revoked_at, expires_at


async def get_meta(conn: Connection, key: str) -> str | None:
    value: str | None = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
    return value


async def delete_meta(conn: Connection, key: str) -> None:
    await conn.execute("DELETE FROM meta WHERE key = $1", key)


async def revoke_session(conn: Connection, session_id: str, now: int) -> int:
    rows = await conn.fetch(
        "UPDATE sessions SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING id",
        session_id,
        now,
    )
    return len(rows)


async def revoke_user_sessions(conn: Connection, user_id: int, now: int) -> int:
    rows = await conn.fetch(
        "UPDATE sessions SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL"
        " RETURNING id",
        user_id,
        now,
    )
    return len(rows)


async def prune_sessions(
    conn: Connection, expired_before: int, revoked_before: int, limit: int
) -> int:
    """Delete up to ``limit`` sessions that expired before ``expired_before`` or were
    revoked before ``revoked_before``; returns how many."""
    rows = await conn.fetch(
        "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE expires_at < $1"
        " OR revoked_at < $2 LIMIT $3) RETURNING id",
        expired_before,
        revoked_before,
        limit,
    )
    return len(rows)


# --------------------------------------------------------------------------- channels

_CHANNEL_COLS = (
    "c.id, c.workspace_id, c.kind, c.name, c.topic, c.purpose, c.archived, c.created_by,"
    " c.created_at, c.last_seq,"
    " (SELECT count(*) FROM channel_members m WHERE m.channel_id = c.id) AS member_count"
)


def _channel(row: Record) -> wire.Channel:
    return wire.Channel.model_validate(dict(row))


async def create_channel(
    conn: Connection,
    workspace_id: int,
    kind: str,
    name: str,
    created_by: int,
    now: int,
    *,
    topic: str = "",
    purpose: str = "",
    dm_key: str | None = None,
) -> int:
    cid: int = await conn.fetchval(
        "INSERT INTO channels (workspace_id, kind, name, topic, purpose, created_by,"
        " created_at, dm_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        workspace_id,
        kind,
        name,
        topic,
        purpose,
        created_by,
        now,
        dm_key,
    )
    return cid


async def get_channel(conn: Connection, channel_id: int) -> wire.Channel | None:
    row = await conn.fetchrow(f"SELECT {_CHANNEL_COLS} FROM channels c WHERE c.id = $1", channel_id)
    return _channel(row) if row else None


async def find_dm(conn: Connection, workspace_id: int, dm_key: str) -> int | None:
    cid: int | None = await conn.fetchval(
        "SELECT id FROM channels WHERE workspace_id = $1 AND dm_key = $2", workspace_id, dm_key
    )
    return cid


async def update_channel(conn: Connection, channel_id: int, changes: dict[str, str]) -> None:
    allowed = ("name", "topic", "purpose")
    cols = [c for c in allowed if c in changes]
    if cols:
        sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
        await conn.execute(
            f"UPDATE channels SET {sets} WHERE id = $1", channel_id, *(changes[c] for c in cols)
        )


async def set_channel_archived(conn: Connection, channel_id: int, archived: bool) -> None:
    await conn.execute("UPDATE channels SET archived = $2 WHERE id = $1", channel_id, archived)


async def next_channel_seq(conn: Connection, channel_id: int) -> int:
    seq: int = await conn.fetchval(
        "UPDATE channels SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
        channel_id,
    )
    return seq


async def add_member(conn: Connection, channel_id: int, user_id: int, now: int) -> bool:
    """True when the user was not a member before. The read marker starts at the channel's
    latest message, so joining does not make the whole history unread."""
    rows = await conn.fetch(
        "INSERT INTO channel_members (channel_id, user_id, joined_at, last_read_seq)"
        " SELECT $1, $2, $3, last_seq FROM channels WHERE id = $1"
        " ON CONFLICT DO NOTHING RETURNING user_id",
        channel_id,
        user_id,
        now,
    )
    return bool(rows)


async def remove_member(conn: Connection, channel_id: int, user_id: int) -> bool:
    rows = await conn.fetch(
        "DELETE FROM channel_members WHERE channel_id = $1 AND user_id = $2 RETURNING user_id",
        channel_id,
        user_id,
    )
    return bool(rows)


async def is_member(conn: Connection, channel_id: int, user_id: int) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM channel_members WHERE channel_id = $1 AND user_id = $2",
        channel_id,
        user_id,
    )
    return found is not None


async def member_ids(conn: Connection, channel_id: int) -> list[int]:
    rows = await conn.fetch(
        "SELECT user_id FROM channel_members WHERE channel_id = $1 ORDER BY user_id", channel_id
    )
    return [r["user_id"] for r in rows]


async def members_page(conn: Connection, channel_id: int, after_id: int, limit: int) -> list[int]:
    rows = await conn.fetch(
        "SELECT user_id FROM channel_members WHERE channel_id = $1 AND user_id > $2"
        " ORDER BY user_id LIMIT $3",
        channel_id,
        after_id,
        limit,
    )
    return [r["user_id"] for r in rows]


async def list_channels(
    conn: Connection,
    workspace_id: int,
    user_id: int,
    *,
    member_only: bool,
    after_id: int,
    limit: int,
) -> list[wire.Channel]:
    """Channels the user may see: public ones (unless ``member_only``) and its own."""
    rows = await conn.fetch(
        f"SELECT {_CHANNEL_COLS} FROM channels c WHERE c.workspace_id = $1 AND c.id > $3"
        " AND ((c.kind = 'public' AND NOT $4::boolean) OR EXISTS (SELECT 1 FROM"
        " channel_members m WHERE m.channel_id = c.id AND m.user_id = $2))"
        " ORDER BY c.id LIMIT $5",
        workspace_id,
        user_id,
        after_id,
        member_only,
        limit,
    )
    return [_channel(r) for r in rows]


@dataclass(frozen=True, slots=True)
class WorkspaceModel:
    """A whole workspace for an edge cache: read as of at least ``seq`` (see
    :func:`workspace_model`)."""

    seq: int
    name: str
    users: list[wire.User]
    channels: list[wire.Channel]
    members: dict[int, list[int]]  # channel -> member user ids
    last_ts: dict[int, int]  # channel -> ts of its latest message (absent: none yet)


async def workspace_model(conn: Connection, workspace_id: int) -> WorkspaceModel | None:
    """Every user, channel and membership of the workspace, in four statements.

    ``seq`` is read first: what follows reflects every event up to it, and maybe some after
    it. That is enough for a cache that then applies the events after ``seq``: every event
    that changes this state carries the state it sets (a user, a channel, who joined or
    left), so applying one the read already reflected changes nothing, and after the last
    one the cache equals the database."""
    ws = await conn.fetchrow(
        "SELECT name, last_event_seq FROM workspaces WHERE id = $1", workspace_id
    )
    if ws is None:
        return None
    users = await conn.fetch(
        f"SELECT {_USER_COLS} FROM users WHERE workspace_id = $1 ORDER BY id", workspace_id
    )
    channels = await conn.fetch(
        f"SELECT {_CHANNEL_COLS},"
        # The channel's latest message (thread replies included): one unique-index probe.
        " (SELECT g.ts FROM messages g WHERE g.channel_id = c.id AND g.seq = c.last_seq)"
        " AS last_ts"
        " FROM channels c WHERE c.workspace_id = $1 ORDER BY c.id",
        workspace_id,
    )
    members = await conn.fetch(
        "SELECT m.channel_id, string_agg(m.user_id::text, ',') AS user_ids"
        " FROM channel_members m JOIN channels c ON c.id = m.channel_id"
        " WHERE c.workspace_id = $1 GROUP BY m.channel_id",
        workspace_id,
    )
    return WorkspaceModel(
        seq=ws["last_event_seq"],
        name=ws["name"],
        users=[_user(r) for r in users],
        channels=[
            wire.Channel.model_validate({k: v for k, v in dict(r).items() if k != "last_ts"})
            for r in channels
        ],
        members={
            r["channel_id"]: sorted(int(u) for u in r["user_ids"].split(",")) for r in members
        },
        last_ts={r["id"]: r["last_ts"] for r in channels if r["last_ts"] is not None},
    )


async def public_channel_id(conn: Connection, workspace_id: int, name: str) -> int | None:
    cid: int | None = await conn.fetchval(
        "SELECT id FROM channels WHERE workspace_id = $1 AND name = $2 AND kind = 'public'"
        " AND dm_key IS NULL",
        workspace_id,
        name,
    )
    return cid


# --------------------------------------------------------------------------- invites

_INVITE_COLS = "id, prefix, role, max_uses, uses, expires_at, created_by, created_at"


def _invite(row: Record) -> wire.Invite:
    return wire.Invite.model_validate(dict(row))


async def create_invite(
    conn: Connection,
    workspace_id: int,
    code_hash: str,
    prefix: str,
    role: str,
    max_uses: int,
    expires_at: int,
    created_by: int,
    now: int,
) -> wire.Invite:
    row = await conn.fetchrow(
        "INSERT INTO invites (workspace_id, code_hash, prefix, role, max_uses, expires_at,"
        " created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        f" RETURNING {_INVITE_COLS}",
        workspace_id,
        code_hash,
        prefix,
        role,
        max_uses,
        expires_at,
        created_by,
        now,
    )
    assert row is not None
    return _invite(row)


# An invite speaks for its creator: it lapses when they are deactivated or no longer an
# owner or admin (the same rule as creating one).
_CREATOR_MAY_INVITE = (
    " AND EXISTS (SELECT 1 FROM users u WHERE u.id = invites.created_by"
    " AND NOT u.deactivated AND u.role IN ('owner', 'admin'))"
)


async def active_invites(conn: Connection, workspace_id: int, now: int) -> list[wire.Invite]:
    """Not revoked, not expired, not used up, its creator still able to invite; newest
    first."""
    rows = await conn.fetch(
        f"SELECT {_INVITE_COLS} FROM invites WHERE workspace_id = $1 AND revoked_at IS NULL"
        f" AND expires_at > $2 AND uses < max_uses{_CREATOR_MAY_INVITE} ORDER BY id DESC"
        " LIMIT 1000",
        workspace_id,
        now,
    )
    return [_invite(r) for r in rows]


async def revoke_invite(conn: Connection, workspace_id: int, invite_id: int, now: int) -> bool:
    """False when the workspace has no such invite (a revoked one is revoked again)."""
    rows = await conn.fetch(
        "UPDATE invites SET revoked_at = COALESCE(revoked_at, $3)"
        " WHERE id = $1 AND workspace_id = $2 RETURNING id",
        invite_id,
        workspace_id,
        now,
    )
    return bool(rows)


async def invite_workspace(conn: Connection, code_hash: str) -> int | None:
    """The workspace of the invite with this code hash, valid or not."""
    wid: int | None = await conn.fetchval(
        "SELECT workspace_id FROM invites WHERE code_hash = $1", code_hash
    )
    return wid


async def use_invite(conn: Connection, workspace_id: int, code_hash: str, now: int) -> str | None:
    """Take one of the invite's sign-ups, in one statement (concurrent sign-ups never
    exceed ``max_uses``): its role, or None when it is unknown, revoked, expired, used up,
    or its creator may no longer invite."""
    role: str | None = await conn.fetchval(
        "UPDATE invites SET uses = uses + 1 WHERE code_hash = $1 AND workspace_id = $2"
        " AND revoked_at IS NULL AND expires_at > $3 AND uses < max_uses"
        f"{_CREATOR_MAY_INVITE} RETURNING role",
        code_hash,
        workspace_id,
        now,
    )
    return role


# --------------------------------------------------------------------------- messages

_MESSAGE_COLS = (
    "id, channel_id, seq, user_id, client_msg_id, text, ts, thread_root_id, reply_count,"
    " latest_reply_ts, edited_ts, deleted, mentions, mention_channel, mention_here"
)


def _message(row: Record, reactions: list[wire.ReactionCount] | None = None) -> wire.Message:
    data: dict[str, Any] = dict(row)
    data["mentions"] = json.loads(data["mentions"])
    data["reactions"] = reactions or []
    return wire.Message.model_validate(data)


async def insert_message(
    conn: Connection,
    *,
    channel_id: int,
    user_id: int,
    client_msg_id: str,
    text: str,
    ts: int,
    thread_root_id: int | None,
    mentions: Sequence[int],
    mention_channel: bool,
    mention_here: bool,
) -> wire.Message | None:
    """Insert with the channel's next position; None when ``client_msg_id`` was used before
    by this user in this channel (the unique constraint decides, and the position is not
    consumed)."""
    try:
        async with conn.savepoint():
            seq = await next_channel_seq(conn, channel_id)
            row = await conn.fetchrow(
                "INSERT INTO messages (channel_id, seq, user_id, client_msg_id, text, ts,"
                " thread_root_id, mentions, mention_channel, mention_here)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                f" RETURNING {_MESSAGE_COLS}",
                channel_id,
                seq,
                user_id,
                client_msg_id,
                text,
                ts,
                thread_root_id,
                json.dumps(list(mentions)),
                mention_channel,
                mention_here,
            )
    except UniqueViolation:
        return None
    assert row is not None
    return _message(row)


async def get_message_by_client_id(
    conn: Connection, channel_id: int, user_id: int, client_msg_id: str
) -> wire.Message | None:
    """The user's message with this ``client_msg_id`` in this channel (the idempotency key is
    per channel and user: never a message from another channel)."""
    row = await conn.fetchrow(
        f"SELECT {_MESSAGE_COLS} FROM messages WHERE channel_id = $1 AND user_id = $2"
        " AND client_msg_id = $3",
        channel_id,
        user_id,
        client_msg_id,
    )
    return (await _with_reactions(conn, [row]))[0] if row else None


async def get_message(conn: Connection, message_id: int) -> wire.Message | None:
    row = await conn.fetchrow(f"SELECT {_MESSAGE_COLS} FROM messages WHERE id = $1", message_id)
    return (await _with_reactions(conn, [row]))[0] if row else None


async def edit_message(
    conn: Connection,
    message_id: int,
    text: str,
    edited_ts: int,
    mentions: Sequence[int],
    mention_channel: bool,
    mention_here: bool,
) -> None:
    await conn.execute(
        "UPDATE messages SET text = $2, edited_ts = $3, mentions = $4, mention_channel = $5,"
        " mention_here = $6 WHERE id = $1",
        message_id,
        text,
        edited_ts,
        json.dumps(list(mentions)),
        mention_channel,
        mention_here,
    )


async def delete_message(conn: Connection, message_id: int, now: int) -> None:
    """Tombstone: the row keeps its position so history and resume stay consistent."""
    await conn.execute(
        "UPDATE messages SET deleted = TRUE, text = '', mentions = '[]', edited_ts = $2"
        " WHERE id = $1",
        message_id,
        now,
    )
    await conn.execute("DELETE FROM mentions WHERE message_id = $1", message_id)
    await conn.execute("DELETE FROM reactions WHERE message_id = $1", message_id)


async def refresh_thread(conn: Connection, root_id: int) -> tuple[int, int | None]:
    """Recount a thread's live replies onto its root; returns (reply_count, latest_reply_ts)."""
    row = await conn.fetchrow(
        "UPDATE messages SET"
        " reply_count = (SELECT count(*) FROM messages r WHERE r.thread_root_id = $1"
        "  AND NOT r.deleted),"
        " latest_reply_ts = (SELECT max(r.ts) FROM messages r WHERE r.thread_root_id = $1"
        "  AND NOT r.deleted)"
        " WHERE id = $1 RETURNING reply_count, latest_reply_ts",
        root_id,
    )
    assert row is not None
    return row["reply_count"], row["latest_reply_ts"]


async def history(
    conn: Connection,
    channel_id: int,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int,
) -> list[wire.Message]:
    """Top-level messages, ascending by seq. ``before`` takes the newest ones below it,
    ``after`` the oldest ones above it (one of them, or neither for the latest page)."""
    if after is not None:
        rows = await conn.fetch(
            f"SELECT {_MESSAGE_COLS} FROM messages WHERE channel_id = $1 AND"
            " thread_root_id IS NULL AND seq > $2 ORDER BY seq ASC LIMIT $3",
            channel_id,
            after,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {_MESSAGE_COLS} FROM messages WHERE channel_id = $1 AND"
            " thread_root_id IS NULL AND seq < $2 ORDER BY seq DESC LIMIT $3",
            channel_id,
            before if before is not None else 2**62,
            limit,
        )
        rows.reverse()
    return await _with_reactions(conn, rows)


async def replies(conn: Connection, root_id: int, *, after: int, limit: int) -> list[wire.Message]:
    rows = await conn.fetch(
        f"SELECT {_MESSAGE_COLS} FROM messages WHERE thread_root_id = $1 AND seq > $2"
        " ORDER BY seq ASC LIMIT $3",
        root_id,
        after,
        limit,
    )
    return await _with_reactions(conn, rows)


async def insert_mentions(
    conn: Connection, message_id: int, channel_id: int, seq: int, user_ids: Iterable[int]
) -> None:
    await conn.executemany(
        "INSERT INTO mentions (message_id, user_id, channel_id, seq) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        [(message_id, uid, channel_id, seq) for uid in user_ids],
    )


# --------------------------------------------------------------------------- reactions


async def add_reaction(
    conn: Connection, message_id: int, emoji: str, user_id: int, now: int
) -> bool:
    rows = await conn.fetch(
        "INSERT INTO reactions (message_id, emoji, user_id, created_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING RETURNING user_id",
        message_id,
        emoji,
        user_id,
        now,
    )
    return bool(rows)


async def remove_reaction(conn: Connection, message_id: int, emoji: str, user_id: int) -> bool:
    rows = await conn.fetch(
        "DELETE FROM reactions WHERE message_id = $1 AND emoji = $2 AND user_id = $3"
        " RETURNING user_id",
        message_id,
        emoji,
        user_id,
    )
    return bool(rows)


async def reactions_for(
    conn: Connection, message_ids: Sequence[int]
) -> dict[int, list[wire.ReactionCount]]:
    if not message_ids:
        return {}
    rows = await conn.fetch(
        "SELECT message_id, emoji, user_id FROM reactions WHERE message_id = ANY($1::bigint[])"
        " ORDER BY message_id, emoji, created_at, user_id",
        list(message_ids),
    )
    grouped: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for r in rows:
        grouped[r["message_id"]].setdefault(r["emoji"], []).append(r["user_id"])
    return {
        mid: [wire.ReactionCount(emoji=e, count=len(u), user_ids=u) for e, u in by_emoji.items()]
        for mid, by_emoji in grouped.items()
    }


async def _with_reactions(conn: Connection, rows: Sequence[Record]) -> list[wire.Message]:
    reactions = await reactions_for(conn, [r["id"] for r in rows])
    return [_message(r, reactions.get(r["id"])) for r in rows]


# --------------------------------------------------------------------------- read markers


async def set_read_marker(conn: Connection, channel_id: int, user_id: int, seq: int) -> bool:
    rows = await conn.fetch(
        "UPDATE channel_members SET last_read_seq = $3 WHERE channel_id = $1 AND user_id = $2"
        " RETURNING user_id",
        channel_id,
        user_id,
        seq,
    )
    return bool(rows)


async def unread_counts(conn: Connection, user_id: int) -> list[wire.ChannelCounts]:
    """Per channel of the user: top-level messages by others after the marker, and mentions
    after the marker (thread replies count as mentions, like @-mentions anywhere)."""
    rows = await conn.fetch(
        "SELECT m.channel_id, m.last_read_seq,"
        " (SELECT count(*) FROM messages x WHERE x.channel_id = m.channel_id"
        "  AND x.seq > m.last_read_seq AND x.thread_root_id IS NULL AND NOT x.deleted"
        "  AND x.user_id <> m.user_id) AS unread,"
        " (SELECT count(*) FROM mentions n WHERE n.user_id = m.user_id"
        "  AND n.channel_id = m.channel_id AND n.seq > m.last_read_seq) AS mentions"
        " FROM channel_members m WHERE m.user_id = $1 ORDER BY m.channel_id",
        user_id,
    )
    return [wire.ChannelCounts.model_validate(dict(r)) for r in rows]


async def get_users_any(conn: Connection, ids: Sequence[int]) -> list[wire.User]:
    """Users by id across workspaces (administration only)."""
    rows = await conn.fetch(
        f"SELECT {_USER_COLS} FROM users WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids)
    )
    return [_user(r) for r in rows]


async def events_between(
    conn: Connection, workspace_id: int, after_seq: int, up_to: int
) -> list[Record]:
    """The event log's entries with after_seq < seq <= up_to, in order."""
    return await conn.fetch(
        "SELECT seq, type, audience, payload, created_at FROM events WHERE workspace_id = $1"
        " AND seq > $2 AND seq <= $3 ORDER BY seq",
        workspace_id,
        after_seq,
        up_to,
    )


async def event_time(conn: Connection, workspace_id: int, seq: int) -> int | None:
    created: int | None = await conn.fetchval(
        "SELECT created_at FROM events WHERE workspace_id = $1 AND seq = $2", workspace_id, seq
    )
    return created


async def event_positions(conn: Connection, workspace_ids: Sequence[int]) -> dict[int, int]:
    """The event position of each workspace, in one query."""
    rows = await conn.fetch(
        "SELECT id, last_event_seq FROM workspaces WHERE id = ANY($1::bigint[])",
        list(workspace_ids),
    )
    return {r["id"]: r["last_event_seq"] for r in rows}


# --------------------------------------------------------------------------- bus and replay


async def events_range(
    conn: Connection, workspace_id: int, after_seq: int, up_to: int, limit: int
) -> list[Record]:
    """At most ``limit`` event log entries with after_seq < seq <= up_to, in order: replay
    and catch-up read in bounded chunks."""
    return await conn.fetch(
        "SELECT seq, type, audience, payload, created_at FROM events WHERE workspace_id = $1"
        " AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
        workspace_id,
        after_seq,
        up_to,
        limit,
    )


async def notify_events(conn: Connection, workspace_id: int, last_seq: int) -> None:
    """PostgreSQL only: tell every listening node, at commit, that the workspace's log
    moved to ``last_seq`` (chat/storage/changes.py listens)."""
    await conn.execute("SELECT pg_notify('chat_events', $1)", f"{workspace_id}:{last_seq}")


@dataclass(frozen=True, slots=True)
class ConnectState:
    """What one connecting session's snapshot read: the workspace position, and as of it the
    user, the user's channels and whether the session may be used."""

    as_of: int  # the workspace's event position
    user: wire.User | None  # None: no such user in the workspace
    workspace_name: str
    channel_ids: frozenset[int]
    session: str  # "ok", or why not: "revoked", "expired", "missing", "inactive"


async def connect_snapshots(
    conn: Connection, workspace_id: int, sessions: Sequence[tuple[int, str]], now: int
) -> list[ConnectState]:
    """The snapshot of each (user_id, session_id) connecting to one workspace, in order, read
    in ONE statement, so all come from the same instant: a revocation or membership change
    either shows here or commits after ``as_of`` (and arrives as an event). A storm's
    concurrent connects share it (:class:`chat.snapshots.SnapshotReader`)."""
    rows = await conn.fetch(
        f"SELECT w.last_event_seq, w.name AS workspace_name, {_USER_AND_SESSION},"
        " s.id AS session_id,"
        " (SELECT string_agg(m.channel_id::text, ',') FROM channel_members m"
        "  WHERE m.user_id = u.id) AS channel_ids"
        " FROM workspaces w"
        " JOIN users u ON u.workspace_id = w.id AND u.id = ANY($2::bigint[])"
        " LEFT JOIN sessions s ON s.user_id = u.id AND s.id = ANY($3::text[])"
        " WHERE w.id = $1",
        workspace_id,
        sorted({user_id for user_id, _ in sessions}),
        sorted({session_id for _, session_id in sessions}),
    )
    as_of, name = 0, ""
    users: dict[int, tuple[wire.User, frozenset[int]]] = {}
    found: dict[str, tuple[int, int | None, int]] = {}  # session -> (user, revoked, expires)
    for row in rows:
        user, revoked_at, expires_at, rest = _user_and_session(row)
        as_of, name = int(rest["last_event_seq"]), rest["workspace_name"]
        if user.id not in users:
            channels = rest["channel_ids"]
            ids = frozenset(int(c) for c in channels.split(",")) if channels else frozenset()
            users[user.id] = (user, ids)
        if rest["session_id"] is not None and expires_at is not None:
            found[rest["session_id"]] = (user.id, revoked_at, expires_at)
    out = []
    for user_id, session_id in sessions:
        user_channels = users.get(user_id)
        session = found.get(session_id)
        if user_channels is None or session is None or session[0] != user_id:
            out.append(ConnectState(as_of, None, name, frozenset(), "missing"))
            continue
        user, channel_ids = user_channels
        _, revoked_at, expires_at = session
        if revoked_at is not None:
            state = "revoked"
        elif expires_at <= now:
            state = "expired"
        elif user.deactivated:
            state = "inactive"
        else:
            state = "ok"
        out.append(ConnectState(as_of, user, name, channel_ids, state))
    return out
