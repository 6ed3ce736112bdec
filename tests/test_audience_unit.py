"""The audience header: every field survives the round trip, and old (unversioned) headers
stored before the format was versioned still parse."""

from __future__ import annotations

import pytest

from chat.bus import Audience, Envelope

FULL = Audience(
    channel_id=7,
    user_ids=frozenset({3, 1}),
    everyone=True,
    presence_of=9,
    joins=(4, 5),
    leaves=(6,),
    revoke_user=2,
    revoke_session="s-1",
    exclude_user=8,
    droppable=True,
    roles=frozenset({"owner", "member"}),
    role_change=(4, "guest", "member"),
)


@pytest.mark.parametrize(
    "audience",
    [
        Audience(),
        Audience(channel_id=1),
        FULL,
        Audience(revoke_user=3),
        Audience(channel_id=2, roles=frozenset({"admin"})),
        Audience(everyone=True, role_change=(1, "member", "admin")),
    ],
)
def test_header_round_trip(audience: Audience) -> None:
    header = audience.header()
    assert header.startswith("1|")
    assert Audience.from_header(header) == audience


def test_unversioned_header_is_version_0() -> None:
    assert Audience.from_header("c5;u1,2;j3") == Audience(
        channel_id=5, user_ids=frozenset({1, 2}), joins=(3,)
    )
    assert Audience.from_header("") == Audience()


@pytest.mark.parametrize("header", ["2|c1", "1|z9", "1|cX"])
def test_unknown_version_or_field_is_refused(header: str) -> None:
    with pytest.raises(ValueError):
        Audience.from_header(header)


def test_plain_is_precomputed_on_the_envelope() -> None:
    plain = Envelope(1, 5, "message.posted", b"{}", Audience(channel_id=3))
    assert plain.plain
    assert not Envelope(1, None, "typing", b"{}", Audience(channel_id=3)).plain
    assert not Envelope(1, 5, "channel.member_joined", b"{}", Audience(3, joins=(4,))).plain


def test_defect_12_role_audiences_are_not_plain() -> None:
    # A plain event goes to channel members only; one that also reaches readers by role
    # (a public channel's metadata) must take the per-recipient path.
    assert not Audience(channel_id=3, roles=frozenset({"member"})).plain
    assert not Audience(channel_id=3, role_change=(1, "guest", "member")).plain
