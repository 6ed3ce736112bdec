"""Service credentials (chat/credentials.py): who may open a service connection."""

from __future__ import annotations

import time

import jwt
import pytest

from chat import credentials
from chat.auth import issue_token
from chat.credentials import CredentialError

KEY = "k" * 32
OTHER = "o" * 32


def test_round_trip() -> None:
    token = credentials.issue("2026a", KEY, "flannel-1")
    claims = credentials.verify({"2026a": KEY}, token)
    assert (claims.kid, claims.subject) == ("2026a", "flannel-1")
    assert claims.expires_at > time.time()


def test_rotation_accepts_every_listed_key() -> None:
    keys = {"old": KEY, "new": OTHER}
    assert credentials.verify(keys, credentials.issue("old", KEY, "f")).kid == "old"
    assert credentials.verify(keys, credentials.issue("new", OTHER, "f")).kid == "new"
    # the old key removed: its credentials stop working
    with pytest.raises(CredentialError, match="unknown key id"):
        credentials.verify({"new": OTHER}, credentials.issue("old", KEY, "f"))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not a jwt",
        credentials.issue("a", OTHER, "f"),  # forged: right kid, wrong secret
        credentials.issue("a", KEY, "f", ttl_s=-10),  # expired
        jwt.encode({"aud": "chat-service", "sub": "f", "exp": 2**40}, KEY),  # no kid, no iat
        jwt.encode({"aud": "other", "sub": "f", "iat": 1, "exp": 2**40}, KEY, headers={"kid": "a"}),
        jwt.encode({"sub": "f", "iat": 1, "exp": 2**40}, KEY, headers={"kid": "a"}),  # no aud
        jwt.encode(
            {"aud": "chat-service", "sub": "f", "iat": 1, "exp": 2**40},
            KEY * 2,  # HS512 (which wants a 64-byte key): only HS256 is accepted
            algorithm="HS512",
            headers={"kid": "a"},
        ),
    ],
)
def test_refused(token: str) -> None:
    with pytest.raises(CredentialError):
        credentials.verify({"a": KEY}, token)


def test_a_user_token_is_not_a_service_credential() -> None:
    # Even signed with the very same secret: no kid, no audience.
    token, _ = issue_token(KEY, 1, 1, "s_x", 3600)
    with pytest.raises(CredentialError):
        credentials.verify({"a": KEY}, token)


def test_no_keys_refuses_everyone() -> None:
    with pytest.raises(CredentialError, match="no service keys"):
        credentials.verify({}, credentials.issue("a", KEY, "f"))


def test_parse_keys() -> None:
    assert credentials.parse_keys("") == {}
    assert credentials.parse_keys(f"a={KEY}, b={OTHER}") == {"a": KEY, "b": OTHER}
    for bad in (f"={KEY}", "a=short", f"a={KEY},a={OTHER}", KEY, f"a b={KEY}"):
        with pytest.raises(ValueError):
            credentials.parse_keys(bad)


def test_bearer() -> None:
    assert credentials.bearer("Bearer abc") == "abc"
    assert credentials.bearer("bearer  abc ") == "abc"
    for bad in (None, "", "Bearer", "Basic abc", "abc"):
        assert credentials.bearer(bad) is None
