"""An approval's display arguments are cut to a readable size; its binding covers the whole call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from warden.admin.auth import Principal
from warden.approvals import Approvals, ApprovalSettings, ApprovalStatus
from warden.approvals.model import hidden_paths
from warden.approvals.shown import MAX_CHARS, MAX_ITEMS, MAX_NAMED, MAX_TEXT, MORE, shorten
from warden.audit.log import AuditLog
from warden.audit.record import arguments_sha256
from warden.config import AuditConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    RequestMeta,
    Stage,
    new_id,
)


def cut(value: Any, where: str = "") -> tuple[Any, list[str]]:
    return shorten(value, where, [MAX_CHARS])


def size(value: Any) -> int:
    return len(orjson.dumps(value))


def test_what_fits_is_kept_as_it_is() -> None:
    value = {"order_id": "A-1", "amount": 450, "items": [1, 2, {"sku": "x"}], "ok": None}
    assert cut(value) == (value, [])


def test_a_long_text_keeps_its_start_and_says_how_much_is_cut() -> None:
    shown, entries = cut({"order_id": "A-1", "note": "n" * 2_000_000})
    assert shown["order_id"] == "A-1"
    assert shown["note"].startswith("n" * MAX_TEXT + "…")
    assert shown["note"].endswith(f"[cut by Warden: {2_000_000 - MAX_TEXT} of 2000000 characters]")
    assert entries == ["cut:/note"]


def test_many_entries_are_cut_after_the_first_ones() -> None:
    shown, entries = cut({"rows": list(range(10_000)), **{f"k{i}": i for i in range(500)}})
    assert shown["rows"][:MAX_ITEMS] == list(range(MAX_ITEMS))
    assert shown["rows"][MAX_ITEMS] == f"[cut by Warden: {10_000 - MAX_ITEMS} more of 10000 items]"
    assert len(shown) == MAX_ITEMS + 1  # the first keys, and the note
    assert shown["[cut by Warden]"] == f"{501 - MAX_ITEMS} more of 501 entries not shown"
    assert entries == ["cut:/rows", "cut:"]  # "cut:": the arguments themselves


def test_the_whole_is_bounded_however_the_agent_shapes_it() -> None:
    shapes: list[Any] = [
        {f"k{i}": "v" * 900 for i in range(MAX_ITEMS)},  # many texts just under the cut
        [[[] for _ in range(MAX_ITEMS)] for _ in range(MAX_ITEMS)],  # empty containers
        {"k" * 5_000_000: 1, "k" * 4_000_000: 2},  # keys, not values
        [[[[["x" * 999] * MAX_ITEMS] * MAX_ITEMS] * 5] * 5],  # deep and wide
    ]
    for value in shapes:
        shown, entries = cut(value)
        assert size(shown) < 4 * MAX_CHARS, str(value)[:50]
        assert entries
        assert len(entries) <= MAX_NAMED + 1
        assert all(len(e) < 300 for e in entries)


def test_two_long_keys_that_start_alike_both_stay() -> None:
    shown, entries = cut({"k" * 3000: 1, "k" * 3001: 2})
    assert sorted(shown.values()) == [1, 2]
    assert len(entries) == 2


def test_a_cut_key_never_takes_the_name_of_another_key() -> None:
    # The budget nearly spent, a long key is cut to 30 characters: the name it gets, and
    # the one the old rule renamed it to, are keys of the call itself.
    named = "k" * 30 + "… [cut by Warden: 2970 of 3000 characters]"
    twin = f"{named} (2)"
    budget = [2 + len(named) + 2 + len(twin) + 2 + 30]
    shown, entries = shorten({named: 1, twin: 2, "k" * 3000: 3}, "", budget)
    assert (shown[named], shown[twin]) == (1, 2)  # each real key shows its own value
    assert sorted(shown.values()) == [1, 2, 3]  # and none is dropped
    assert len(entries) == 1


def test_a_key_named_like_the_note_keeps_its_value() -> None:
    shown, entries = cut({"[cut by Warden]": "mine", **{f"k{i}": i for i in range(MAX_ITEMS)}})
    assert shown["[cut by Warden]"] == "mine"
    assert shown[f"[cut by Warden] ({MAX_ITEMS})"] == f"1 more of {MAX_ITEMS + 1} entries not shown"
    assert entries == ["cut:"]


def test_pointers_escape_slashes_and_tildes() -> None:
    _, entries = cut({"a/b": {"c~d": "x" * (MAX_TEXT + 1)}})
    assert entries == ["cut:/a~1b/c~0d"]


def test_past_the_named_ones_one_entry_says_more_were_cut() -> None:
    _, entries = cut({f"k{i}": "x" * (MAX_TEXT + 1) for i in range(MAX_NAMED + 5)})
    assert len(entries) == MAX_NAMED + 1
    assert entries[-1] == MORE


def test_answers_are_named_under_their_own_prefix_and_share_the_budget() -> None:
    budget = [MAX_CHARS]
    shorten({"a": "x" * 900}, "", budget)
    assert budget[0] < MAX_CHARS - 900
    shown, entries = shorten({"email": {"content": "y" * 5000}}, "input_responses", budget)
    assert entries == ["cut:input_responses/email/content"]
    assert len(shown["email"]["content"]) < 1100


def test_people_read_cut_values_as_hidden_ones() -> None:
    assert hidden_paths(["email", "cut:/note", "cut:", "cut:input_responses/a", MORE]) == [
        "/email",
        "/note (cut: too long to show)",
        "the arguments (cut: too long to show)",
        "answers /a (cut: too long to show)",
        "more values (cut: too long to show)",
    ]


# -- as approvals store them ------------------------------------------------------------


def action(note: str) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent("refunds-bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="http",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "refunds", "/orders/A-1/refunds"),
        tool="issue_refund",
        arguments={"order_id": "A-1", "amount": 300, "customer": note},
    )


def decision() -> Decision:
    return Decision(
        decision_id=new_id("dec"),
        effect=Effect.REQUIRE_APPROVAL,
        reasons=("refunds over 200 need a lead",),
        mode=Mode.ENFORCE,
        guard="policy",
    )


@pytest.fixture
async def approvals(tmp_path: Path) -> AsyncIterator[Approvals]:
    audit = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    service = await Approvals.open(
        f"sqlite:///{tmp_path}/state.db", audit, ApprovalSettings(sweep_interval_s=60)
    )
    yield service
    await service.close()
    await audit.close()


async def test_an_approval_stores_its_arguments_cut_and_binds_the_whole_call(
    approvals: Approvals,
) -> None:
    long = "c" * 2_000_000
    act = action(long)
    opened = await approvals.request(act, decision(), mode="defer")
    stored = await approvals.get(opened.id)
    assert stored is not None
    assert size(stored.arguments) < 2 * MAX_TEXT
    assert stored.arguments["amount"] == 300
    assert "cut:/customer" in stored.redacted
    assert "/customer (cut: too long to show)" in stored.hidden
    assert stored.to_json()["arguments_sha256"] is None  # not all of it is shown
    # The hash and the binding are the whole call's: only it takes the grant.
    assert stored.arguments_sha256 == arguments_sha256(act.arguments)
    assert stored.binding == approvals.binding(
        "refunds-bot", "issue_refund", act.arguments, upstream="refunds", method="POST"
    )
    await approvals.decide(opened.id, Principal("alice", frozenset({"approver"})), True, "")
    same_start = action(long[:-1] + "d")  # what the approver saw, another end
    assert await approvals.take_grant(same_start, decision()) is None
    grant = await approvals.take_grant(action(long), decision())
    assert grant is not None
    assert grant.status is ApprovalStatus.CONSUMED
