"""Who a connecting client is: a token (``auth``) or a handle and password (``login``).

The connect sequence (:mod:`chat.connect`) asks this module for an :class:`Identity` and
nothing else; token checks, password hashing and their limits live here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chat import wire
from chat.auth import issue_token, new_session_id, verify_password, verify_token
from chat.config import Settings
from chat.errors import ChatError, ErrorCode
from chat.journal import now_ms
from chat.storage import Database, queries


@dataclass(slots=True)
class Identity:
    user: wire.User
    workspace_name: str
    session_id: str
    token: str | None  # a new token, after a password login


async def identify(settings: Settings, db: Database, request: wire.Auth | wire.Login) -> Identity:
    """The identity the request proves, or a ChatError saying why not."""
    if isinstance(request, wire.Auth):
        claims = verify_token(settings.secret_key, request.token)
        async with db.connection() as conn:
            row = await queries.get_session(conn, claims.session_id)
            user = await queries.get_user(conn, claims.user_id)
            ws = await queries.get_workspace(conn, claims.workspace_id)
        if row is None or row["user_id"] != claims.user_id or user is None or ws is None:
            raise ChatError(ErrorCode.INVALID_AUTH)
        if row["revoked_at"] is not None:
            raise ChatError(ErrorCode.TOKEN_REVOKED)
        if user.deactivated:
            raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
        return Identity(user, ws["name"], claims.session_id, None)
    async with db.connection() as conn:
        ws = await queries.get_workspace_by_name(conn, request.workspace)
        login = await queries.get_login(conn, ws["id"], request.handle) if ws else None
    # argon2 takes tens of milliseconds of CPU: keep it off the event loop.
    ok = await asyncio.to_thread(
        verify_password, login["password_hash"] if login else None, request.password
    )
    if not ok or login is None or ws is None:
        raise ChatError(ErrorCode.INVALID_AUTH, "unknown workspace, handle or password")
    if login["deactivated"]:
        raise ChatError(ErrorCode.ACCOUNT_INACTIVE)
    session_id = new_session_id()
    token, claims = issue_token(
        settings.secret_key, login["id"], ws["id"], session_id, settings.token_ttl_s
    )
    async with db.transaction() as conn:
        await queries.create_session(
            conn, session_id, login["id"], now_ms(), claims.expires_at * 1000
        )
        user = await queries.get_user(conn, login["id"])
    assert user is not None
    return Identity(user, ws["name"], session_id, token)
