"""A Slack approval message shows bidi, zero-width and tag characters as ``\\uXXXX``.

Slack draws text as it comes: a right-to-left override in an argument would
draw account ``4401-8765`` as ``4401-5678``, and whoever approves from the
channel approves what they did not read. Rendering only: no sockets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.unit.test_approvals_notify import approval
from warden.approvals.notify import render

# Bidi embeddings, overrides and isolates, zero-width and BOM, a tag character,
# the line separators, a C1 control (CSI).
HIDDEN = [
    *"\u202a\u202b\u202c\u202d\u202e",
    *"\u2066\u2067\u2068\u2069",
    *"\u200b\u200c\u200d\u200e\u200f\u2060\ufeff",
    "\U000e0041",
    *"\u2028\u2029\x9b",
]


def slack(**over: Any) -> dict[str, Any]:
    return render("approval.requested", dataclasses.replace(approval(), **over), "slack", 0)


@pytest.mark.parametrize("ch", HIDDEN, ids=lambda ch: f"U+{ord(ch):04X}")
def test_no_hidden_character_reaches_the_message(ch: str) -> None:
    body = slack(
        tool=f"issue{ch}_refund",
        agent_id=f"refunds{ch}bot",
        arguments={f"acc{ch}ount": f"4401-{ch}8765"},
        reason=f"payouts{ch} need a lead",
        risk=f"high{ch}",
        redacted=(f"/pass{ch}word",),
        comment=f"ok{ch}",
        answers={"ask": f"y{ch}es"},
    )
    blocks = [b.get("text", {}).get("text", "") for b in body["blocks"]]
    assert not any(ch in text for text in [body["text"], *blocks])


def test_an_override_in_an_argument_reads_as_sent() -> None:
    body = slack(arguments={"account": "4401-\u202e8765\u202c", "amount": 9000})
    code = body["blocks"][2]["text"]["text"]
    assert '"account": "4401-\\u202e8765\\u202c"' in code
    assert code.count("\n") == 3  # the JSON's own lines kept: {, two fields, }


def test_a_name_and_a_reason_read_as_sent_a_line_break_as_its_escape() -> None:
    body = slack(
        tool="get_\u202eredro\u202c",
        reason="routine\n*Risk:* none\u2028\u202e",
    )
    headline = body["blocks"][0]["text"]["text"]
    details = body["blocks"][1]["text"]["text"]
    assert "`get_\\u202eredro\\u202c`" in headline
    assert details.startswith("*Reason:* routine\\u000a*Risk:* none\\u2028\\u202e\n")
    assert [line.split(":*")[0] for line in details.split("\n")] == ["*Reason", "*Risk"]


def test_the_json_format_keeps_the_values_as_sent() -> None:
    # For programs, not people: the receiver decides how to show them.
    body = render(
        "approval.requested",
        dataclasses.replace(approval(), arguments={"account": "4401-\u202e8765"}),
        "json",
        0,
    )
    assert body["approval"]["arguments"] == {"account": "4401-\u202e8765"}
