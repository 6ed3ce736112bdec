"""docs/protocol.md is generated from chat.wire and chat.errors, and must not drift from them."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from chat import docgen, wire
from chat.errors import CLOSE_DESCRIPTIONS, ERROR_DESCRIPTIONS, CloseCode, ErrorCode

CLIENT_TYPES = wire.frame_types(wire.ClientFrame)
SERVER_TYPES = wire.frame_types(wire.ServerFrame)
CLIENT_MODELS = list(dict.fromkeys(CLIENT_TYPES.values()))
SERVER_MODELS = list(dict.fromkeys(SERVER_TYPES.values()))


@pytest.fixture(scope="module")
def doc() -> str:
    return docgen.render()


def _section(doc: str, title: str) -> str:
    """The text of one ``## title`` section."""
    start = doc.index(f"\n## {title}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end != -1 else len(doc)]


def _heading_names(section: str) -> set[str]:
    """Frame types named by the ``###`` headings of a section (``a / b`` names both)."""
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("### "):
            names.update(part.strip() for part in line[4:].split(" / "))
    return names


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
    + [(m, wire.SERVER_FRAME_ADAPTER) for m in SERVER_MODELS],
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


def _close_reasons_in_source() -> set[tuple[CloseCode, str]]:
    """(code, reason) of every close in chat/ whose reason is a literal or an error code."""
    found: set[tuple[CloseCode, str]] = set()
    for path in Path(docgen.ROOT / "chat").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for code, reason in re.findall(r'CloseCode\.(\w+),\s*"([^"]+)"', text):
            found.add((CloseCode[code], reason))
        for code, error in re.findall(r"CloseCode\.(\w+),\s*ErrorCode\.(\w+)\.value", text):
            found.add((CloseCode[code], ErrorCode[error].value))
    return found


def test_defect_25_every_close_reason_in_the_source_is_documented(doc: str) -> None:
    found = _close_reasons_in_source()
    assert (CloseCode.POLICY_VIOLATION, "auth_timeout") in found  # the scan finds them
    documented = {(code, reason) for code, reason, _, _ in docgen.CLOSE_REASONS}
    assert found - documented == set()
    section = _section(doc, "Close codes")
    for code, reason, _, _ in docgen.CLOSE_REASONS:
        assert f"| {code.value} | `{reason}` |" in section or reason.startswith("the ")


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
