"""The binary frames of a service connection (docs/flannel.md): relayed frames and events.

What the edge only forwards travels verbatim in binary frames, so neither tier parses or
re-escapes JSON it does not read: a relayed frame is ``R``, a u32 session number and the
frame's bytes; events are ``E`` (a u64 workspace id) or ``P`` (a u32 replay request number),
then envelopes. An envelope is a u64 ``seq`` (0: ephemeral), the three u32 lengths of its
type, its audience header and its payload, then those three strings. Big-endian throughout.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from chat.bus import Envelope
from chat.bus.base import Audience
from chat.wire import EVENTS, RELAY, REPLAY_CHUNK

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ENVELOPE = struct.Struct(">QIII")  # seq, len(type), len(header), len(payload)
_HEADERS: dict[str, Audience] = {}  # header -> parsed audience: a handful of shapes repeat
_MAX_HEADERS = 4096


class FrameError(ValueError):
    """A binary service frame that is not well formed."""


def relay(sid: int, frame: bytes) -> bytes:
    return RELAY + _U32.pack(sid) + frame


def unpack_relay(data: bytes) -> tuple[int, bytes]:
    if len(data) < 5 or data[:1] != RELAY:
        raise FrameError("not a relayed frame")
    return _U32.unpack_from(data, 1)[0], data[5:]


def events(workspace_id: int, envelopes: Iterable[Envelope]) -> bytes:
    return b"".join([EVENTS, _U64.pack(workspace_id), *map(_pack, envelopes)])


def replay_chunk(rid: int, envelopes: Iterable[Envelope]) -> bytes:
    return b"".join([REPLAY_CHUNK, _U32.pack(rid), *map(_pack, envelopes)])


def unpack_events(data: bytes) -> tuple[int, list[Envelope]]:
    """An ``E`` frame: (workspace_id, envelopes)."""
    if len(data) < 9 or data[:1] != EVENTS:
        raise FrameError("not an events frame")
    workspace_id = _U64.unpack_from(data, 1)[0]
    return workspace_id, _unpack(data, 9, workspace_id)


def unpack_replay_chunk(data: bytes, workspace_id: int) -> tuple[int, list[Envelope]]:
    """A ``P`` frame: (rid, envelopes); the workspace is the one the request named."""
    if len(data) < 5 or data[:1] != REPLAY_CHUNK:
        raise FrameError("not a replay chunk")
    return _U32.unpack_from(data, 1)[0], _unpack(data, 5, workspace_id)


def _pack(env: Envelope) -> bytes:
    kind = env.type.encode()
    header = env.audience.header().encode()
    return b"".join(
        [
            _ENVELOPE.pack(env.seq or 0, len(kind), len(header), len(env.payload)),
            kind,
            header,
            env.payload,
        ]
    )


def _unpack(data: bytes, offset: int, workspace_id: int) -> list[Envelope]:
    out: list[Envelope] = []
    end = len(data)
    view = memoryview(data)
    while offset < end:
        if offset + _ENVELOPE.size > end:
            raise FrameError("truncated envelope")
        seq, n_type, n_header, n_payload = _ENVELOPE.unpack_from(data, offset)
        offset += _ENVELOPE.size
        stop = offset + n_type + n_header + n_payload
        if stop > end:
            raise FrameError("truncated envelope")
        kind = bytes(view[offset : offset + n_type]).decode()
        offset += n_type
        header = bytes(view[offset : offset + n_header]).decode()
        offset += n_header
        payload = bytes(view[offset:stop])
        offset = stop
        audience = _HEADERS.get(header)
        if audience is None:
            audience = Audience.from_header(header)
            if len(_HEADERS) < _MAX_HEADERS:
                _HEADERS[header] = audience
        out.append(Envelope(workspace_id, seq or None, kind, payload, audience))
    return out
