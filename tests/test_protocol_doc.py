"""docs/protocol.md is generated from chat.wire and chat.errors, and must not drift from them."""

from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from chat import docgen, service_frames, wire
from chat.bus import Audience, Envelope
from chat.errors import CLOSE_DESCRIPTIONS, ERROR_DESCRIPTIONS, CloseCode, ErrorCode

CLIENT_TYPES = wire.frame_types(wire.ClientFrame)
SERVER_TYPES = wire.frame_types(wire.ServerFrame)
EDGE_TYPES = wire.frame_types(wire.EdgeFrame)
CHAT_SERVICE_TYPES = wire.frame_types(wire.ChatServiceFrame)
CLIENT_MODELS = list(dict.fromkeys(CLIENT_TYPES.values()))
SERVER_MODELS = list(dict.fromkeys(SERVER_TYPES.values()))
EDGE_MODELS = list(dict.fromkeys(EDGE_TYPES.values()))
CHAT_SERVICE_MODELS = list(dict.fromkeys(CHAT_SERVICE_TYPES.values()))
# The binary service frames' kind bytes: every one-byte constant of chat.wire.
BINARY_KINDS = {
    value
    for name, value in vars(wire).items()
    if name.isupper() and isinstance(value, bytes) and len(value) == 1
}


@pytest.fixture(scope="module")
def doc() -> str:
    return docgen.render()


def _section(doc: str, title: str) -> str:
    """The text of one ``## title`` section."""
    start = doc.index(f"\n## {title}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end != -1 else len(doc)]


def _part(section: str, title: str) -> str:
    """The text of one ``### title`` part of a section."""
    start = section.index(f"\n### {title}\n")
    end = section.find("\n### ", start + 1)
    return section[start : end if end != -1 else len(section)]


def _heading_names(section: str, level: int = 3) -> set[str]:
    """Frame types named by the headings of a level in a section (``a / b`` names both)."""
    prefix = "#" * level + " "
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith(prefix):
            names.update(part.strip() for part in line[len(prefix) :].split(" / "))
    return names


def _anchors(doc: str) -> set[str]:
    """GitHub's anchors of every heading outside code blocks, a repeated one numbered."""
    seen: dict[str, int] = {}
    fenced = False
    for line in doc.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, 0) + 1
            if seen[slug] > 1:
                seen[f"{slug}-{seen[slug] - 1}"] = 1
    return set(seen)


def test_doc_is_up_to_date(doc: str) -> None:
    on_disk = docgen.DOC_PATH.read_text(encoding="utf-8")
    assert on_disk == doc, "docs/protocol.md is stale: run `python -m chat.docgen`"


def test_render_is_deterministic(doc: str) -> None:
    assert docgen.render() == doc


def test_every_client_frame_type_is_a_heading(doc: str) -> None:
    headings = _heading_names(_section(doc, "Client frames"))
    missing = [t for t in CLIENT_TYPES if t not in headings]
    assert not missing, f"client frame types without a heading: {missing}"


def test_every_server_frame_type_is_a_heading(doc: str) -> None:
    headings = _heading_names(_section(doc, "Server frames"))
    missing = [t for t in SERVER_TYPES if t not in headings]
    assert not missing, f"server frame types without a heading: {missing}"


def test_shared_models_are_documented_once(doc: str) -> None:
    section = _section(doc, "Server frames")
    assert section.count("### reaction.added / reaction.removed\n") == 1
    assert "### reaction.removed\n" not in section
    channel = "### channel.created / channel.updated / channel.archived / channel.unarchived\n"
    assert section.count(channel) == 1


def test_every_error_code_is_documented(doc: str) -> None:
    section = _section(doc, "Error codes")
    for code in ErrorCode:
        assert code in ERROR_DESCRIPTIONS, f"{code!r} has no description"
        assert f"| `{code.value}` | {ERROR_DESCRIPTIONS[code]} |" in section, code


def test_every_close_code_is_documented(doc: str) -> None:
    section = _section(doc, "Close codes")
    for code in CloseCode:
        assert code in CLOSE_DESCRIPTIONS, f"{code!r} has no description"
        assert f"| {code.value} | `{code.name}` |" in section, code


def test_objects_are_discovered(doc: str) -> None:
    headings = {
        line[4:] for line in _section(doc, "Objects").splitlines() if line.startswith("### ")
    }
    for name in ("User", "Channel", "Message", "ReactionCount", "ChannelCounts", "Limits"):
        assert name in headings, f"object {name} is not documented"


@pytest.mark.parametrize(
    ("model", "adapter"),
    [(m, wire.CLIENT_FRAME_ADAPTER) for m in CLIENT_MODELS]
    + [(m, wire.SERVER_FRAME_ADAPTER) for m in SERVER_MODELS]
    + [(m, wire.EDGE_FRAME_ADAPTER) for m in EDGE_MODELS]
    + [(m, wire.CHAT_SERVICE_FRAME_ADAPTER) for m in CHAT_SERVICE_MODELS],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_frame_examples_validate(model: type[wire.Frame], adapter: Any, doc: str) -> None:
    assert model.examples, f"{model.__name__} has no examples"
    for example in model.examples:
        model.model_validate(example)
        parsed = adapter.validate_json(json.dumps(example))
        assert type(parsed) is model, f"{example} parses as {type(parsed).__name__}"
        assert json.dumps(example, ensure_ascii=False) in doc, f"{example} is not in the doc"


def test_reply_data_examples_validate() -> None:
    for data_model in set(wire.REPLIES.values()):
        for example in data_model.examples:
            data_model.model_validate(example)


def test_every_request_type_has_a_reply_model() -> None:
    missing = [t for t in CLIENT_TYPES if t not in wire.REPLIES]
    assert not missing, f"request types without an entry in wire.REPLIES: {missing}"
    stale = [t for t in wire.REPLIES if t not in CLIENT_TYPES]
    assert not stale, f"wire.REPLIES entries that are not client frame types: {stale}"


def test_broken_example_fails_render(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.Ping, "examples", [{"type": "ping"}])  # no id
    with pytest.raises(docgen.DocError, match=r"Ping\.examples\[0\] does not validate"):
        docgen.render()


def test_missing_example_fails_render(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.Goodbye, "examples", [])
    with pytest.raises(docgen.DocError, match="Goodbye has no examples"):
        docgen.render()


def test_check_reports_a_stale_file(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "protocol.md"
    assert docgen.main(["--check", "--output", str(path)]) == 1  # missing
    assert docgen.main(["--output", str(path)]) == 0
    assert docgen.main(["--check", "--output", str(path)]) == 0
    path.write_text("# stale\n", encoding="utf-8")
    capsys.readouterr()
    assert docgen.main(["--check", "--output", str(path)]) == 1
    assert "out of date" in capsys.readouterr().err


def _close_reasons_in(path: Path) -> set[tuple[CloseCode, str]]:
    """(code, reason) of every close in a file whose reason is a literal or an error code."""
    found: set[tuple[CloseCode, str]] = set()
    text = path.read_text(encoding="utf-8")
    for code, reason in re.findall(r'CloseCode\.(\w+),\s*"([^"]+)"', text):
        found.add((CloseCode[code], reason))
    for code, error in re.findall(r"CloseCode\.(\w+),\s*ErrorCode\.(\w+)\.value", text):
        found.add((CloseCode[code], ErrorCode[error].value))
    return found


def _close_reasons_in_source() -> set[tuple[CloseCode, str]]:
    """(code, reason) of every close in chat/ whose reason is a literal or an error code."""
    found: set[tuple[CloseCode, str]] = set()
    for path in Path(docgen.ROOT / "chat").rglob("*.py"):
        found |= _close_reasons_in(path)
    return found


def test_defect_25_every_close_reason_in_the_source_is_documented(doc: str) -> None:
    found = _close_reasons_in_source()
    assert (CloseCode.POLICY_VIOLATION, "auth_timeout") in found  # the scan finds them
    assert (CloseCode.POLICY_VIOLATION, "invalid_service_frame") in found
    documented = {(code, reason) for code, reason, _, _ in docgen.CLOSE_REASONS}
    service = {(code, reason) for code, reason, _, _ in docgen.SERVICE_CLOSE_REASONS}
    assert found - documented - service == set()
    # A service connection's reasons are listed where an edge's author reads them.
    assert _close_reasons_in(docgen.ROOT / "chat" / "service.py") - service == set()
    section = _section(doc, "Close codes")
    for code, reason, _, _ in docgen.CLOSE_REASONS:
        assert f"| {code.value} | `{reason}` |" in section or reason.startswith("the ")
    section = _part(_section(doc, docgen.SERVICE_TITLE), "Service close reasons")
    for code, reason, _, _ in docgen.SERVICE_CLOSE_REASONS:
        assert f"| {code.value} | `{reason}` |" in section


def test_defect_25_every_1008_reason_is_documented(doc: str) -> None:
    # The reason of a refused first frame or auth is the error code (ClientProtocol.fail,
    # chat/connect.py), so each of these codes is a 1008 reason.
    reasons = {r for c, r, _, _ in docgen.CLOSE_REASONS if c is CloseCode.POLICY_VIOLATION}
    for code in (
        "auth_timeout",
        "not_authenticated",
        "invalid_json",
        "invalid_frame",
        "unknown_type",
        "invalid_auth",
        "token_expired",
        "token_revoked",
        "account_inactive",
        "rate_limited",
    ):
        assert code in reasons, code


def test_defect_25_flooding_is_stated_in_numbers(doc: str) -> None:
    from chat.config import Settings

    n = Settings.model_fields["rate_limit_disconnect_after"].default
    assert "sustained flooding" not in doc
    assert f"tolerates {n}" in " ".join(doc.split())
    assert f"({n + 1} refusals in 10 seconds)" in " ".join(doc.split())


@pytest.mark.parametrize(
    "statement",
    [
        "you receive your own `message.posted`",
        "Public channels you are not in.",
        "your own messages are never unread",
        "backwards as well as forwards",
        "past the channel's last message is clamped",
        "idempotent per channel and per user",
        "with different content is refused",
        "A **binary** frame is refused with an `error` `invalid_frame`",
        "503 `draining`",
        "`/healthz` answers 200 `ok` while the process runs, draining included",
        "nested deeper than 32 levels",
        "U+0000-U+0008, U+000B, U+000C, U+000E-U+001F are refused",
    ],
)
def test_defect_25_previously_unstated_rules_are_stated(doc: str, statement: str) -> None:
    assert statement in " ".join(doc.split())


def test_defect_25_reply_to_null_rule_matches_the_server(doc: str) -> None:
    from chat.protocol import ClientProtocol, Close, Send

    text = " ".join(doc.split())
    assert "(not JSON, not an object, unknown `type`, bad fields) gets an `error` with" not in text
    assert "even when the frame is otherwise wrong (unknown `type`" in text
    # What the doc says, checked against the protocol: an unknown type with a usable id is
    # answered naming it; a bad field too; an unusable id gets null.
    p = ClientProtocol(now=0.0)
    p.receive(json.dumps({"type": "auth", "id": "a", "token": "t"}), 0.0)
    p.authenticated()
    cases = {
        json.dumps({"type": "nope", "id": "u"}): "u",
        json.dumps({"type": "ping", "id": "f", "x": 1}): "f",
        json.dumps({"type": "ping", "id": "i" * 65}): None,
        json.dumps({"type": "ping", "id": 5}): None,
        "[1]": None,
    }
    for frame, reply_to in cases.items():
        verdict = p.receive(frame, 0.0)
        assert isinstance(verdict, Send) and not isinstance(verdict, Close)
        assert json.loads(verdict.frame)["reply_to"] == reply_to, frame


def test_defect_25_admin_help_describes_every_subcommand() -> None:
    from chat.__main__ import _parser

    def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    admin = subcommands(_parser()).choices["admin"]
    commands = subcommands(admin)
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(helps) == set(commands.choices)
    assert all(helps.values()), helps


@pytest.mark.parametrize("doc_path", ["README.md", "bench/README.md", "docs/architecture.md"])
def test_defect_25_docs_name_no_path_from_a_developer_machine(doc_path: str) -> None:
    text = (docgen.ROOT / doc_path).read_text(encoding="utf-8")
    assert re.findall(r"(?<![\w.~-])/(?:work|home|Users|root|tmp)/\S*", text) == []


# --------------------------------------------------------------------------- service connections


def test_links_resolve(doc: str) -> None:
    anchors = _anchors(doc)
    links = set(re.findall(r"\]\(#([^)]+)\)", doc))
    assert links - anchors == set()
    # The service section links to the objects it shares with client frames, and to its own.
    section = _section(doc, docgen.SERVICE_TITLE)
    assert "[`User`](#user)" in section and "[`Channel`](#channel)" in section
    assert "[`Membership`](#membership)" in section and "\n#### Membership\n" in section
    assert "[`Auth`](#auth)" in section and "[`Login`](#login)" in section
    assert "### User\n" in _section(doc, "Objects")


def test_service_section_is_last_and_says_how_to_connect(doc: str) -> None:
    assert doc.rindex("\n## ") == doc.index(f"\n## {docgen.SERVICE_TITLE}\n")
    text = " ".join(_section(doc, docgen.SERVICE_TITLE).split())
    for statement in (
        "Edge nodes such as Flannel",
        "`/service`",
        "`Authorization: Bearer <service credential>`",
        "refused before the upgrade with HTTP 401",
        "[docs/flannel.md](flannel.md)",
    ):
        assert statement in text, statement
    assert "`/service`, which is for edge nodes only" in " ".join(doc.split())


def test_every_edge_frame_type_is_documented(doc: str) -> None:
    part = _part(_section(doc, docgen.SERVICE_TITLE), "Edge to chat")
    headings = _heading_names(part, level=4)
    assert [t for t in EDGE_TYPES if t not in headings] == []
    assert [t for t in EDGE_TYPES if f"| [`{t}`](#" not in part] == []  # in the table too


def test_every_chat_service_frame_type_is_documented(doc: str) -> None:
    part = _part(_section(doc, docgen.SERVICE_TITLE), "Chat to edge")
    headings = _heading_names(part, level=4)
    assert [t for t in CHAT_SERVICE_TYPES if t not in headings] == []
    assert [t for t in CHAT_SERVICE_TYPES if f"| [`{t}`](#" not in part] == []


def test_every_binary_frame_kind_is_documented(doc: str) -> None:
    assert {wire.RELAY, wire.EVENTS, wire.REPLAY_CHUNK} <= BINARY_KINDS  # the scan finds them
    assert {kind for kind, _, _, _ in docgen.BINARY_FRAMES} == BINARY_KINDS
    part = _part(_section(doc, docgen.SERVICE_TITLE), "Binary frames")
    for kind in BINARY_KINDS:
        assert f"| `{kind.decode()}` (0x{kind.hex()}) |" in part
        assert f"``{kind.decode()}``" in (service_frames.__doc__ or "")


def test_binary_layout_is_what_service_frames_packs() -> None:
    """The layout the doc gives, read back from frames chat.service_frames packs."""
    posted = Envelope(7, 41, "message.posted", b'{"type":"message.posted"}', Audience(channel_id=3))
    typing = Envelope(7, None, "typing", '{"t":"caf\u00e9"}'.encode(), Audience(droppable=True))

    def envelopes(data: bytes, offset: int) -> list[tuple[int, str, str, bytes]]:
        # seq u64, then three u32 lengths (type, header, payload), then those bytes.
        out = []
        while offset < len(data):
            seq, n_type, n_header, n_payload = struct.unpack_from(">QIII", data, offset)
            offset += 20
            kind = data[offset : offset + n_type].decode()
            header = data[offset + n_type : offset + n_type + n_header].decode()
            offset += n_type + n_header
            out.append((seq, kind, header, data[offset : offset + n_payload]))
            offset += n_payload
        return out

    expected = [
        (41, "message.posted", posted.audience.header(), posted.payload),
        (0, "typing", typing.audience.header(), typing.payload),
    ]
    events = service_frames.events(2**40, [posted, typing])
    assert events[:1] == b"E" and struct.unpack_from(">Q", events, 1) == (2**40,)
    assert envelopes(events, 9) == expected
    chunk = service_frames.replay_chunk(3, [posted, typing])
    assert chunk[:1] == b"P" and struct.unpack_from(">I", chunk, 1) == (3,)
    assert envelopes(chunk, 5) == expected
    frame = b'{"type":"ping","id":"1"}'
    relayed = service_frames.relay(2**32 - 1, frame)
    assert relayed[:1] == b"R" and struct.unpack_from(">I", relayed, 1) == (2**32 - 1,)
    assert relayed[5:] == frame


def test_service_answers_name_real_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = dict(docgen.SERVICE_ANSWERS)
    del answers["load"]
    monkeypatch.setattr(docgen, "SERVICE_ANSWERS", answers)
    with pytest.raises(docgen.DocError, match="no answer for \\['load'\\]"):
        docgen.render()
    monkeypatch.setattr(docgen, "SERVICE_ANSWERS", {**answers, "load": "`unloaded`"})
    with pytest.raises(docgen.DocError, match="unknown frames \\['unloaded'\\]"):
        docgen.render()


def test_broken_service_example_fails_render(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.Detach, "examples", [{"type": "detach", "sid": 0}])
    with pytest.raises(docgen.DocError, match=r"Detach\.examples\[0\] does not validate"):
        docgen.render()
