"""Approvers are told plainly which argument values they cannot see, on a safe terminal."""

from __future__ import annotations

import sys
import unicodedata
from typing import Any

import orjson
import pytest

from warden import cli, cli_admin, cli_approvals, terminal
from warden.approvals.model import hidden_paths
from warden.terminal import disguised, disguised_paths


def test_hidden_paths_word_policy_paths_and_masked_pointers_alike() -> None:
    redacted = [
        "email",
        "customer.phone",
        "/email",  # masked and redacted: named once
        "/note/x_credential_hint",
        "input_responses.ask.content.email",
        "input_responses/ask/content/api_key",
    ]
    assert hidden_paths(redacted) == [
        "/email",
        "/customer/phone",
        "/note/x_credential_hint",
        "answers /ask/content/email",
        "answers /ask/content/api_key",
    ]
    assert hidden_paths(["arguments", "input_responses"]) == ["all arguments", "all answers"]
    assert hidden_paths([]) == []


def approval(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "apr_1",
        "status": "pending",
        "mode": "defer",
        "agent": "support-triage",
        "tool": "account_update",
        "reason": "account changes need a person",
        "risk": "high",
        "approvers": [],
        "approvals": 0,
        "required_approvals": 1,
        "waiting_s": 3.0,
        "arguments_sha256": "ab" * 32,
        "arguments": {
            "user_id": "ceo",
            "password_reset_email": "[redacted]",
            "note": {"x_credential_hint": "[redacted]"},
        },
        "redacted": ["/password_reset_email", "/note/x_credential_hint"],
        "votes": [],
    }
    return {**base, **over}


def show(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], out: Any, *extra: str
) -> str:
    monkeypatch.setattr(cli_approvals, "_request", lambda *_a, **_k: out)
    assert cli_approvals.main(["approvals", *extra]) == 0
    return capsys.readouterr().out


def test_show_names_the_hidden_paths_before_the_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = show(monkeypatch, capsys, approval(), "show", "apr_1")
    assert "hidden      2 value(s) you cannot see; reject if you need them:" in text
    assert "              /password_reset_email\n" in text
    assert "              /note/x_credential_hint\n" in text
    assert text.index("hidden") < text.index("arguments   ")
    listed = show(monkeypatch, capsys, {"approvals": [approval()]}, "list")
    assert "[2 hidden]" in listed
    # Nothing hidden, no such line.
    assert "hidden" not in show(monkeypatch, capsys, approval(redacted=[]), "show", "apr_1")


def test_agent_text_cannot_drive_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sneaky = approval(
        tool="account_update\x1b[2K\rsearch_kb",
        reason="routine\nstatus      approved\u202e",
        arguments={"k\x9b": "v\u202e\U000e0001"},
        votes=[{"verdict": "rejected", "by": "bob", "comment": "no\x1b]0;t\x07"}],
    )
    text = show(monkeypatch, capsys, sneaky, "show", "apr_1")
    assert not any(ch in text for ch in "\x1b\r\x07\x9b\u202e\U000e0001")
    assert "tool        account_update\\u001b[2K\\u000dsearch_kb\n" in text
    assert "reason      routine\\u000astatus      approved\\u202e\n" in text
    assert "\nstatus      approved" not in text
    listed = show(monkeypatch, capsys, {"approvals": [sneaky]}, "list")
    assert "\x1b" not in listed
    assert "routine\\u000astatus" in listed
    # --json stays valid JSON with the same values: the escapes are JSON's own.
    raw = show(monkeypatch, capsys, sneaky, "show", "apr_1", "--json")
    assert "\x9b" not in raw
    assert "\u202e" not in raw
    assert orjson.loads(raw)["arguments"] == {"k\x9b": "v\u202e\U000e0001"}


def test_texts_drawn_otherwise_than_they_read_are_named_by_pointer() -> None:
    # What the console's card names, to say: these read differently elsewhere.
    arguments = {
        "account": "4401-\u202e8765\u202c",
        "memo": "two\nlines\tand a tab",  # layout, shown as \n and \t: nothing to say
        "pay\u200bee": "ACME",
        "items": [{"sku": "ok"}, {"sku": "x\U000e0041"}],
        "a/b~c": "\x1b[2K",
    }
    assert disguised_paths(arguments) == [
        "/account",
        "/pay\u200bee (the name)",
        "/items/1/sku",
        "/a~1b~0c",
    ]
    assert disguised_paths("\u2066") == ["(the whole value)"]
    assert disguised_paths({"amount": 10, "ok": None}) == []
    assert not disguised("line\r\n\ttab")
    assert disguised("para\u2029graph")


def test_kill_switch_targets_and_reasons_cannot_drive_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tool name is the agent's; a reason and a name are people's.
    switch = {
        "id": "ks_1",
        "scope": "tool",
        "target": "get_\u202eredro\u202c",
        "reason": "incident\x1b[2K\rall clear",
        "created_by": "ada\u2066",
    }
    monkeypatch.setattr(cli_admin, "admin_request", lambda *_a, **_k: {"killswitches": [switch]})
    assert cli.main(["killswitches"]) == 0
    text = capsys.readouterr().out
    assert not any(ch in text for ch in "\x1b\r\u202e\u202c\u2066")
    assert "get_\\u202eredro\\u202c" in text
    assert "by ada\\u2066: incident\\u001b[2K\\u000dall clear\n" in text
    assert cli.main(["killswitches", "--json"]) == 0
    raw = capsys.readouterr().out
    assert "\u202e" not in raw
    assert orjson.loads(raw)["killswitches"] == [switch]  # still JSON, the same values


@pytest.mark.skipif(unicodedata.unidata_version != "15.0.0", reason="UNICODE_15 is for 15.0")
def test_the_table_of_hidden_characters_is_this_pythons_unicode() -> None:
    # plain() looks them up in a table rather than asking each character's category:
    # a character the table missed would be drawn, not escaped.
    escaped = {"Cc", "Cf", "Zl", "Zp"}
    wanted = {cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) in escaped}
    assert {cp for lo, hi in terminal.UNICODE_15 for cp in range(lo, hi + 1)} == wanted
