"""Getting in: the first setup of an empty installation, invites, and sign-up with one.

``setup`` and ``signup`` are first frames (:mod:`chat.identity` calls :func:`set_up` and
:func:`sign_up` once it has checked the limits and hashed the password); ``invites.*`` are
requests of owners and admins (``access.Action.MANAGE_INVITES``). Every change goes through
the journal, so ``user.created``, ``channel.created`` and ``channel.member_joined`` reach
whoever is live, and the event log stays complete.

An invite code is 192 random bits, URL-safe; only its SHA-256 is stored (a slow hash would
add nothing to a code that cannot be guessed), and the reply to ``invites.create`` is the
only place the code is ever shown.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from chat import wire
from chat.auth import issue_token, new_session_id
from chat.bus import Audience
from chat.config import Settings
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import Action, actor, channel_audience, require, user_audience
from chat.handlers.context import Caller, Services
from chat.journal import Journal, Tx, now_ms
from chat.storage import Connection, Database, UniqueViolation, queries

GENERAL = "general"  # the channel a workspace starts with, and sign-ups join
_HANDLE = re.compile(wire.HANDLE_PATTERN)
PREFIX_CHARS = 6
SET_UP_ALREADY = "this server has a workspace already: sign in, or sign up with an invite"


@dataclass(frozen=True, slots=True)
class NewAccount:
    """A user created by ``setup`` or ``signup``, signed in: its session and token."""

    user: wire.User
    session_id: str
    token: str


# --------------------------------------------------------------------------- pure checks


def check_new_account(handle: str, password: str, display_name: str | None) -> None:
    """What the wire types cannot say: ``invalid_argument`` with a message to show."""
    if not _HANDLE.match(handle):
        raise ChatError(
            ErrorCode.INVALID_ARGUMENT,
            "a handle is 1-80 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    if len(password) < wire.MIN_PASSWORD_CHARS:
        raise ChatError(
            ErrorCode.INVALID_ARGUMENT,
            f"a password has at least {wire.MIN_PASSWORD_CHARS} characters",
        )
    if display_name is not None and not display_name.strip():
        raise ChatError(ErrorCode.INVALID_ARGUMENT, "a display name cannot be blank")


def check_workspace_name(name: str) -> None:
    if not name.strip() or name != name.strip():
        raise ChatError(
            ErrorCode.INVALID_ARGUMENT,
            "a workspace name is not blank and has no leading or trailing spaces",
        )


def new_code() -> str:
    return secrets.token_urlsafe(24)


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


# --------------------------------------------------------------------------- first frames


async def _account(
    tx: Tx, settings: Settings, handle: str, display_name: str | None, role: str, pw_hash: str
) -> NewAccount:
    """The user, its session and token, and ``user.created``."""
    try:
        async with tx.conn.savepoint():
            user = await queries.create_user(
                tx.conn,
                tx.workspace_id,
                handle,
                display_name or handle,
                role,
                tx.now,
                password_hash=pw_hash,
            )
    except UniqueViolation:
        raise ChatError(ErrorCode.NAME_TAKEN, "this handle is taken in the workspace") from None
    session_id = new_session_id()
    token, claims = issue_token(
        settings.secret_key, user.id, tx.workspace_id, session_id, settings.token_ttl_s
    )
    await queries.create_session(tx.conn, session_id, user.id, tx.now, claims.expires_at * 1000)
    tx.emit(
        wire.UserChanged(type="user.created", seq=0, workspace_id=0, ts=0, user=user),
        user_audience(user),
    )
    return NewAccount(user, session_id, token)


async def set_up(journal: Journal, settings: Settings, req: wire.Setup, pw_hash: str) -> NewAccount:
    """The installation's first workspace, its ``#general`` and its owner, at once; or
    ``forbidden`` when a workspace exists (exactly one of concurrent setups wins)."""

    async def create(conn: Connection, now: int) -> int:
        if not await queries.claim_setup(conn, now):
            raise ChatError(ErrorCode.FORBIDDEN, SET_UP_ALREADY)
        return await queries.create_workspace(conn, req.workspace, now)

    async def op(tx: Tx) -> NewAccount:
        account = await _account(tx, settings, req.handle, req.display_name, "owner", pw_hash)
        owner = account.user.id
        cid = await queries.create_channel(
            tx.conn, tx.workspace_id, "public", GENERAL, owner, tx.now
        )
        await queries.add_member(tx.conn, cid, owner, tx.now)
        channel = await queries.get_channel(tx.conn, cid)
        assert channel is not None
        tx.emit(
            wire.ChannelChanged(
                type="channel.created", seq=0, workspace_id=0, ts=0, channel=channel
            ),
            channel_audience(channel, joins=(owner,)),
        )
        return account

    return await journal.found(create, op)


async def invite_workspace(db: Database, code: str) -> int:
    """The workspace a sign-up goes to; ``invalid_invite`` for an unknown code."""
    async with db.connection() as conn:
        wid = await queries.invite_workspace(conn, code_hash(code))
    if wid is None:
        raise ChatError(ErrorCode.INVALID_INVITE)
    return wid


async def sign_up(
    journal: Journal, settings: Settings, workspace_id: int, req: wire.Signup, pw_hash: str
) -> NewAccount:
    """A user with the invite's role, in ``#general`` if the workspace has one. The invite's
    use and the user commit together: a refused handle does not use the invite up."""
    hashed = code_hash(req.invite)

    async def op(tx: Tx) -> NewAccount:
        role = await queries.use_invite(tx.conn, workspace_id, hashed, tx.now)
        if role is None:
            raise ChatError(ErrorCode.INVALID_INVITE)
        account = await _account(tx, settings, req.handle, req.display_name, role, pw_hash)
        user_id = account.user.id
        general = await queries.public_channel_id(tx.conn, workspace_id, GENERAL)
        if general is not None and await queries.add_member(tx.conn, general, user_id, tx.now):
            tx.emit(
                wire.MemberChanged(
                    type="channel.member_joined",
                    seq=0,
                    workspace_id=0,
                    ts=0,
                    channel_id=general,
                    user_id=user_id,
                    by_user_id=user_id,
                ),
                Audience(channel_id=general, joins=(user_id,)),
            )
        return account

    return await journal.run(workspace_id, op)


# --------------------------------------------------------------------------- requests


async def invites_create(s: Services, c: Caller, req: wire.InvitesCreate) -> wire.InviteData:
    code = new_code()

    async def op(tx: Tx) -> wire.InviteData:
        me = await actor(tx.conn, c)
        require(me, Action.MANAGE_INVITES)
        invite = await queries.create_invite(
            tx.conn,
            c.workspace_id,
            code_hash(code),
            code[:PREFIX_CHARS],
            req.role,
            req.max_uses,
            tx.now + req.expires_in_s * 1000,
            me.id,
            tx.now,
        )
        return wire.InviteData(invite=invite.model_copy(update={"code": code}))

    return await s.journal.run(c.workspace_id, op)


async def invites_list(s: Services, c: Caller, req: wire.InvitesList) -> wire.InviteList:
    async with s.db.connection() as conn:
        me = await actor(conn, c)
        require(me, Action.MANAGE_INVITES)
        invites = await queries.active_invites(conn, c.workspace_id, now_ms())
    return wire.InviteList(invites=invites)


async def invites_revoke(s: Services, c: Caller, req: wire.InvitesRevoke) -> wire.Empty:
    async def op(tx: Tx) -> wire.Empty:
        me = await actor(tx.conn, c)
        require(me, Action.MANAGE_INVITES)
        if not await queries.revoke_invite(tx.conn, c.workspace_id, req.invite_id, tx.now):
            raise ChatError(ErrorCode.NOT_FOUND, "no such invite in this workspace")
        return wire.Empty()

    return await s.journal.run(c.workspace_id, op)
