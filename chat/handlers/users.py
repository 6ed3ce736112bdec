"""Users: listing, profiles, roles, deactivation, and session revocation."""

from __future__ import annotations

from chat import wire
from chat.bus import Audience
from chat.errors import ChatError, ErrorCode
from chat.handlers.access import (
    Action,
    actor,
    allowed,
    can_set_role,
    may_act_on,
    require,
    user_audience,
)
from chat.handlers.context import Caller, Services
from chat.journal import Tx
from chat.storage import queries


async def users_list(s: Services, c: Caller, req: wire.UsersList) -> wire.UserPage:
    async with s.db.connection() as conn:
        await actor(conn, c)
        users = await queries.list_users(conn, c.workspace_id, req.cursor, req.limit)
    next_cursor = users[-1].id if len(users) == req.limit else None
    return wire.UserPage(users=users, next_cursor=next_cursor)


async def users_info(s: Services, c: Caller, req: wire.UsersInfo) -> wire.Users:
    async with s.db.connection() as conn:
        await actor(conn, c)
        users = await queries.get_users(conn, c.workspace_id, req.user_ids)
    return wire.Users(users=users)


def _user_event(
    tx: Tx, user: wire.User, kind: str = "user.updated", *, role_was: str | None = None
) -> None:
    tx.emit(
        wire.UserChanged(type=kind, seq=0, workspace_id=tx.workspace_id, ts=tx.now, user=user),
        user_audience(user, role_was=role_was),
    )


async def users_update_profile(
    s: Services, c: Caller, req: wire.UsersUpdateProfile
) -> wire.UserData:
    changes = req.model_dump(
        include={"display_name", "real_name", "avatar_url", "tz"}, exclude_none=True
    )

    async def op(tx: Tx) -> wire.UserData:
        await actor(tx.conn, c)
        user = await queries.update_user_profile(tx.conn, c.user_id, changes)
        assert user is not None
        _user_event(tx, user)
        return wire.UserData(user=user)

    return await s.journal.run(c.workspace_id, op)


async def _target(tx: Tx, me: wire.User, user_id: int) -> wire.User:
    target = await queries.get_user(tx.conn, user_id)
    if target is None or target.workspace_id != me.workspace_id:
        raise ChatError(ErrorCode.USER_NOT_FOUND)
    return target


async def users_set_role(s: Services, c: Caller, req: wire.UsersSetRole) -> wire.UserData:
    async def op(tx: Tx) -> wire.UserData:
        me = await actor(tx.conn, c)
        target = await _target(tx, me, req.user_id)
        if not can_set_role(me, target, req.role):
            raise ChatError(ErrorCode.FORBIDDEN, "you may not give this user that role")
        user = await queries.set_user_role(tx.conn, target.id, req.role)
        assert user is not None
        _user_event(tx, user, role_was=target.role)
        return wire.UserData(user=user)

    return await s.journal.run(c.workspace_id, op)


async def users_deactivate(s: Services, c: Caller, req: wire.UsersDeactivate) -> wire.UserData:
    async def op(tx: Tx) -> wire.UserData:
        me = await actor(tx.conn, c)
        require(me, Action.DEACTIVATE)
        target = await _target(tx, me, req.user_id)
        if not may_act_on(me, target, Action.DEACTIVATE):
            raise ChatError(ErrorCode.FORBIDDEN, "you may not deactivate this user")
        if target.id == me.id:
            raise ChatError(ErrorCode.INVALID_ARGUMENT, "you cannot deactivate yourself")
        user = await queries.deactivate_user(tx.conn, target.id)
        assert user is not None
        await queries.revoke_user_sessions(tx.conn, target.id, tx.now)
        _user_event(tx, user)
        _revoked_event(tx, target.id, None)
        return wire.UserData(user=user)

    return await s.journal.run(c.workspace_id, op)


def _revoked_event(tx: Tx, user_id: int, session_id: str | None) -> None:
    tx.emit(
        wire.SessionRevoked(
            seq=0, workspace_id=tx.workspace_id, ts=tx.now, user_id=user_id, session_id=session_id
        ),
        Audience(user_ids=frozenset({user_id}), revoke_user=user_id, revoke_session=session_id),
    )


async def sessions_revoke(s: Services, c: Caller, req: wire.SessionsRevoke) -> wire.Revoked:
    """Log out: this session, all of your sessions, or (admins) all of someone else's."""

    async def op(tx: Tx) -> wire.Revoked:
        me = await actor(tx.conn, c)
        target_id = req.user_id or me.id
        if target_id != me.id:
            if not allowed(me, Action.REVOKE_OTHERS):
                raise ChatError(ErrorCode.FORBIDDEN, "only admins revoke other users' sessions")
            target = await _target(tx, me, target_id)
            if not may_act_on(me, target, Action.REVOKE_OTHERS):
                raise ChatError(ErrorCode.FORBIDDEN, "you may not revoke this user's sessions")
        if req.all or target_id != me.id:
            count = await queries.revoke_user_sessions(tx.conn, target_id, tx.now)
            _revoked_event(tx, target_id, None)
        else:
            count = await queries.revoke_session(tx.conn, c.session_id, tx.now)
            _revoked_event(tx, target_id, c.session_id)
        return wire.Revoked(revoked=count)

    return await s.journal.run(c.workspace_id, op)
