"""Service credentials: what lets an edge node (Flannel) open a service connection.

A credential is an HS256 JWT with audience ``chat-service``, a key id (``kid``) in its header
and a short expiry, signed with one of the keys both tiers share (``kid=secret``). A chat node
accepts every key in its list at once, so a key is rotated without a restart of both sides in
lockstep: add the new key on the chat tier, switch the edge to it, remove the old one.

It authenticates the connection, never a user: every session carried over it is attached with
that user's own token. User tokens are signed with a different secret and carry no audience,
so neither kind of token passes for the other.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

AUDIENCE = "chat-service"
DEFAULT_TTL_S = 300
# Secrets shorter than this are refused at start-up: an HS256 key should be at least as long
# as its hash (RFC 7518, 3.2), and a short one is a typo more often than a choice.
MIN_SECRET_BYTES = 32
_KID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CredentialError(Exception):
    """A credential that does not open a service connection; the message says why (logged,
    never sent: the refusal is a bare HTTP 401)."""


@dataclass(frozen=True, slots=True)
class ServiceClaims:
    kid: str
    subject: str  # the edge node's name, for logs and metrics
    expires_at: int


def parse_keys(spec: str) -> dict[str, str]:
    """``kid=secret[,kid=secret...]`` to ``{kid: secret}``; empty is no keys. Raises
    ValueError naming the entry at fault (a setting is checked at start-up, not at the
    first connection)."""
    keys: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        kid, eq, secret = entry.partition("=")
        if not eq or not _KID.fullmatch(kid):
            raise ValueError(f"service key {kid!r}: expected kid=secret, kid of [A-Za-z0-9_.-]")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"service key {kid!r}: the secret needs {MIN_SECRET_BYTES}+ bytes")
        if kid in keys:
            raise ValueError(f"service key {kid!r} is listed twice")
        keys[kid] = secret
    return keys


def issue(kid: str, secret: str, subject: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    """A fresh credential; the edge makes one per upstream connect."""
    now = int(time.time())
    return jwt.encode(
        {"aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + ttl_s},
        secret,
        algorithm="HS256",
        headers={"kid": kid},
    )


def verify(keys: dict[str, str], token: str) -> ServiceClaims:
    """Accept a credential signed with one of ``keys``, for our audience, not expired."""
    if not keys:
        raise CredentialError("no service keys are configured")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as exc:
        raise CredentialError(f"malformed: {exc}") from None
    secret = keys.get(kid) if isinstance(kid, str) else None
    if secret is None or not isinstance(kid, str):
        raise CredentialError(f"unknown key id {kid!r}")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            audience=AUDIENCE,
            options={"require": ["aud", "sub", "exp", "iat"]},
        )
    except jwt.InvalidTokenError as exc:
        raise CredentialError(str(exc)) from None
    return ServiceClaims(kid, str(claims["sub"]), int(claims["exp"]))


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
