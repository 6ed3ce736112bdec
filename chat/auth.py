"""Tokens and passwords.

Tokens are JWTs (HS256) naming the user, the workspace and a session id; a session row in the
database makes them revocable. Passwords are hashed with argon2id.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from chat.errors import ChatError, ErrorCode

_hasher = PasswordHasher()  # argon2id with the library's recommended parameters
# Verified against when the user does not exist, so timing does not reveal which handles do.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(8))


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: int
    workspace_id: int
    session_id: str
    expires_at: int  # seconds since the epoch


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(12)


def issue_token(
    secret: str, user_id: int, workspace_id: int, session_id: str, ttl_s: int
) -> tuple[str, TokenClaims]:
    exp = int(time.time()) + ttl_s
    claims = TokenClaims(user_id, workspace_id, session_id, exp)
    token = jwt.encode(
        {"sub": str(user_id), "ws": workspace_id, "sid": session_id, "exp": exp},
        secret,
        algorithm="HS256",
    )
    return token, claims


def verify_token(secret: str, token: str) -> TokenClaims:
    """Check signature and expiry; revocation is the caller's check (it needs the database)."""
    try:
        payload = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub", "sid"]}
        )
        return TokenClaims(
            int(payload["sub"]), int(payload["ws"]), str(payload["sid"]), int(payload["exp"])
        )
    except jwt.ExpiredSignatureError:
        raise ChatError(ErrorCode.TOKEN_EXPIRED) from None
    except (jwt.InvalidTokenError, KeyError, ValueError, TypeError):
        raise ChatError(ErrorCode.INVALID_AUTH) from None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False
