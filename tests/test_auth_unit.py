"""Token verification (:func:`chat.auth.verify_token`): the short path for our own tokens
answers exactly what PyJWT answers, for every kind of token, good or bad."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from chat import auth
from chat.auth import TokenClaims, issue_token, verify_token
from chat.errors import ChatError, ErrorCode

SECRET = "a-secret-of-a-reasonable-length-0123456789"
OTHER = "another-secret-of-a-reasonable-length-0123"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(payload: object, secret: str = SECRET, **headers: str) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)  # type: ignore[arg-type]


def answer(check: object, token: str) -> TokenClaims | str:
    try:
        return check(SECRET, token)  # type: ignore[operator,no-any-return]
    except ChatError as exc:
        return exc.code.value


GOOD, CLAIMS = issue_token(SECRET, 7, 3, "s_abc", 3600)
NOW = int(time.time())
HEADER, BODY, SIGNATURE = GOOD.split(".")
TAMPERED = {"sub": "8", "ws": 3, "sid": "s_abc", "exp": NOW + 99}

TOKENS = {
    "ours": GOOD,
    "expired": issue_token(SECRET, 7, 3, "s_abc", -10)[0],
    "another secret": issue_token(OTHER, 7, 3, "s_abc", 3600)[0],
    "tampered payload": ".".join((HEADER, b64(json.dumps(TAMPERED).encode()), SIGNATURE)),
    "tampered signature": f"{HEADER}.{BODY}.{SIGNATURE[:-2]}AA",
    "signature with padding": f"{GOOD}=",
    "no signature": f"{HEADER}.{BODY}.",
    "two parts": f"{HEADER}.{BODY}",
    "four parts": f"{GOOD}.x",
    "alg none": ".".join((b64(b'{"alg":"none","typ":"JWT"}'), BODY, "")),
    "another header": forged({"sub": "7", "ws": 3, "sid": "s", "exp": NOW + 99}, kid="k1"),
    "missing sid": forged({"sub": "7", "ws": 3, "exp": NOW + 99}),
    "missing ws": forged({"sub": "7", "sid": "s", "exp": NOW + 99}),
    "extra claim (nbf in the future)": forged(
        {"sub": "7", "ws": 3, "sid": "s", "exp": NOW + 99, "nbf": NOW + 50}
    ),
    "sub not a number": forged({"sub": "x7", "ws": 3, "sid": "s", "exp": NOW + 99}),
    "ws a string": forged({"sub": "7", "ws": "3", "sid": "s", "exp": NOW + 99}),
    "exp a float": forged({"sub": "7", "ws": 3, "sid": "s", "exp": NOW + 99.5}),
    "payload not an object": f"{HEADER}.{b64(b'[1]')}.{SIGNATURE}",
    "payload not JSON": f"{HEADER}.{b64(b'{')}.{SIGNATURE}",
    "not base64": f"{HEADER}.!!!.{SIGNATURE}",
    "non-ASCII": f"{HEADER}.{BODY}.{SIGNATURE[:-1]}é",
    "empty": "",
    "garbage": "not a token",
}


@pytest.mark.parametrize("name", list(TOKENS))
def test_the_short_path_agrees_with_pyjwt(name: str) -> None:
    token = TOKENS[name]
    assert answer(verify_token, token) == answer(auth._verify_with_pyjwt, token)


def test_our_tokens_take_the_short_path_and_only_they() -> None:
    assert auth._verify_our_shape(SECRET, GOOD) == CLAIMS
    accepted = [n for n, t in TOKENS.items() if auth._verify_our_shape(SECRET, t) is not None]
    assert accepted == ["ours"]


def test_refusals_say_why() -> None:
    assert answer(verify_token, TOKENS["expired"]) == ErrorCode.TOKEN_EXPIRED.value
    assert answer(verify_token, TOKENS["another secret"]) == ErrorCode.INVALID_AUTH.value
    assert answer(verify_token, GOOD) == CLAIMS
