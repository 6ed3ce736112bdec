"""Binary service frames (chat/service_frames.py) and the service text frames (chat/wire.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from chat import service_frames as sf
from chat import wire
from chat.bus import Audience, Envelope

ENVS = [
    Envelope(
        7, 41, "message.posted", b'{"type":"message.posted","seq":41}', Audience(channel_id=3)
    ),
    Envelope(
        7,
        42,
        "channel.member_left",
        '{"t":"caf\u00e9 \u5c71"}'.encode(),
        Audience(channel_id=3, leaves=(5,), revoke_user=5, revoke_session="s_x"),
    ),
    Envelope(7, None, "typing", b"{}", Audience(channel_id=3, exclude_user=2, droppable=True)),
]


def test_events_round_trip() -> None:
    workspace_id, got = sf.unpack_events(sf.events(7, ENVS))
    assert workspace_id == 7 and got == ENVS
    assert [e.plain for e in got] == [True, False, False]


def test_replay_chunk_round_trip() -> None:
    rid, got = sf.unpack_replay_chunk(sf.replay_chunk(12, ENVS[:2]), 7)
    assert rid == 12 and got == ENVS[:2]
    assert sf.unpack_replay_chunk(sf.replay_chunk(3, []), 7) == (3, [])


def test_relay_round_trip() -> None:
    frame = b'{"type":"ping","id":"1"}'
    assert sf.unpack_relay(sf.relay(2**32 - 1, frame)) == (2**32 - 1, frame)


@pytest.mark.parametrize(
    ("unpack", "data"),
    [
        (sf.unpack_relay, b""),
        (sf.unpack_relay, b"R\x00\x00"),
        (sf.unpack_relay, b"X" + sf.relay(1, b"{}")[1:]),
        (sf.unpack_events, b"E\x00"),
        (sf.unpack_events, sf.relay(1, b"{}")),
        (sf.unpack_events, sf.events(7, ENVS)[:-1]),  # truncated payload
        (sf.unpack_events, sf.events(7, ENVS)[:15]),  # truncated envelope header
        (sf.unpack_events, b"E" + bytes(8) + bytes(12) + b"\xff\xff\xff\xff"),  # past the end
        (lambda d: sf.unpack_replay_chunk(d, 7), sf.events(7, ENVS)),
    ],
)
def test_malformed_binary_frames_are_refused(
    unpack: Callable[[bytes], object], data: bytes
) -> None:
    with pytest.raises(ValueError):
        unpack(data)


def test_an_unknown_audience_header_is_refused() -> None:
    env = Envelope(1, 1, "x", b"{}", Audience())
    data = sf.events(1, [env]).replace(b"1|", b"9|")
    with pytest.raises(ValueError):
        sf.unpack_events(data)


def test_service_frames_are_strict() -> None:
    auth: dict[str, Any] = {"type": "auth", "id": "1", "token": "t"}
    attach: dict[str, Any] = {"type": "attach", "sid": 1, "request": auth}
    assert isinstance(wire.EDGE_FRAME_ADAPTER.validate_python(attach), wire.Attach)
    login = {"type": "login", "id": "1", "workspace": "acme", "handle": "ada", "password": "p"}
    parsed = wire.EDGE_FRAME_ADAPTER.validate_python({"type": "attach", "sid": 2, "request": login})
    assert isinstance(parsed, wire.Attach) and isinstance(parsed.request, wire.Login)
    for bad in (
        {**attach, "sid": 0},
        {**attach, "sid": 2**32},
        {**attach, "sid": "1"},
        {**attach, "extra": 1},
        {**attach, "request": {**auth, "resume": {"session_id": "s", "seq": 1}}},
        {"type": "subscribe", "rid": 1, "workspace_id": 0},
        {"type": "replay", "rid": 1, "workspace_id": 1, "after": -1, "up_to": 2},
        {"type": "hello"},
    ):
        with pytest.raises(pydantic.ValidationError):
            wire.EDGE_FRAME_ADAPTER.validate_python(bad)


def test_examples_parse() -> None:
    for adapter, union in (
        (wire.EDGE_FRAME_ADAPTER, wire.EdgeFrame),
        (wire.CHAT_SERVICE_FRAME_ADAPTER, wire.ChatServiceFrame),
    ):
        for model in wire.frame_types(union).values():
            assert model.examples, model
            for example in model.examples:
                assert type(adapter.validate_python(example)) is model
