"""The approvals service: state machine, store, binding, grants, waits, evidence."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from prometheus_client import REGISTRY

from tests.pg import state_config
from warden.admin.auth import Principal
from warden.approvals import (
    AlreadyVoted,
    ApprovalConflict,
    ApprovalNotFound,
    Approvals,
    ApprovalSettings,
    ApprovalStatus,
    NotAnApprover,
    SelfApproval,
)
from warden.approvals.model import Approval, TooManyPending
from warden.approvals.store import ApprovalRepo, ApprovalStore, PagedApprovals, page_key
from warden.audit import keyed_digest
from warden.audit.export import Selection, export_log
from warden.audit.log import AuditLog
from warden.audit.record import arguments_sha256
from warden.audit.verify import iter_records
from warden.config import AuditConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    Obligations,
    RequestMeta,
    Stage,
    new_id,
)
from warden.state.backend import StateBackend, open_state

ALICE = Principal("alice", frozenset({"approver"}))
BOB = Principal("bob", frozenset({"approver"}))
CAROL = Principal("carol", frozenset({"approver", "finance"}))
SETTINGS = ApprovalSettings(poll_interval_s=0.05, sweep_interval_s=60)


def action(
    amount: float = 10,
    agent: str = "refunds-bot",
    tool: str = "issue_refund",
    upstream: str = "openai",
) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent(agent),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", upstream, "/v1/chat/completions"),
        tool=tool,
        arguments={"order_id": "A-1", "amount": amount, "email": "jo@example.com"},
    )


def decision(**obligations: Any) -> Decision:
    return Decision(
        decision_id=new_id("dec"),
        effect=Effect.REQUIRE_APPROVAL,
        reasons=("refunds over 5 need a person",),
        mode=Mode.ENFORCE,
        guard="policy",
        obligations=Obligations(**obligations),
    )


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    yield log
    await log.close()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


@pytest.fixture
async def approvals(url: str, audit: AuditLog) -> AsyncIterator[Approvals]:
    service = await Approvals.open(url, audit, SETTINGS)
    yield service
    await service.close()


def records(audit: AuditLog, kind: str) -> list[dict[str, Any]]:
    out = []
    for _, raw in iter_records(audit.directory):
        rec = orjson.loads(raw)
        if rec["kind"] == kind:
            out.append(rec["body"])
    return out


async def test_request_stores_a_redacted_pending_approval_and_records_it(
    approvals: Approvals, audit: AuditLog
) -> None:
    act, dec = action(), decision(redact=("action.arguments.email",), risk="high")
    approval = await approvals.request(act, dec, mode="hold")
    assert approval.status is ApprovalStatus.PENDING
    assert approval.id.startswith("apr_")
    assert len(approval.id) > 24
    assert approval.arguments["email"] == "[redacted]"
    assert approval.arguments["amount"] == 10
    assert approval.arguments_sha256 == arguments_sha256(act.arguments)
    assert approval.expires_at == pytest.approx(approval.created_at + 120)
    assert await approvals.get(approval.id) == approval
    assert [a.id for a in await approvals.list("pending")] == [approval.id]
    (body,) = records(audit, "approval_requested")
    assert body["decision_id"] == dec.decision_id
    assert body["approval_id"] == approval.id
    # The record shows no arguments: what it keeps of them is keyed, binding included.
    assert body["arguments_sha256"] == keyed_digest(audit.directory, approval.arguments_sha256)
    assert body["binding"] == keyed_digest(audit.directory, approval.binding)
    with pytest.raises(ValueError, match="status"):
        await approvals.list("maybe")


async def test_an_mcp_retrys_answers_are_shown_to_approvers_redacted(
    approvals: Approvals,
) -> None:
    # The server acts on the answers as on the arguments: approvers see both.
    answers = {"ask": {"action": "accept", "content": {"amount": 900, "email": "jo@x.example"}}}
    act = dataclasses.replace(action(), input_responses=answers)
    dec = decision(redact=("action.input_responses.ask.content.email",))
    approval = await approvals.request(act, dec, mode="defer")
    shown = {"ask": {"action": "accept", "content": {"amount": 900, "email": "[redacted]"}}}
    assert approval.answers == shown
    assert "input_responses.ask.content.email" in approval.redacted
    assert approval.to_json()["answers"] == shown
    assert await approvals.get(approval.id) == approval  # kept by the store
    assert "answers" not in (await approvals.request(action(5), decision(), mode="hold")).to_json()


async def test_a_call_with_a_64_bit_id_can_be_held_and_approved(approvals: Approvals) -> None:
    # RFC 8785 writes no whole number past 2**53 - 1: its hash failed, and the hold
    # read as the approval store being down, so such a call could never be approved.
    big = dataclasses.replace(action(), arguments={"order_id": 2**62 + 1, "amount": 900})
    approval = await approvals.request(big, decision(), mode="defer")
    assert approval.status is ApprovalStatus.PENDING
    other = dataclasses.replace(big, arguments={"order_id": 2**62 + 2, "amount": 900})
    assert approvals.binding("bot", "t", big.arguments) != approvals.binding(
        "bot", "t", other.arguments
    )
    # Nor does the float RFC 8785 writes with the same digits share its binding: a
    # tool reading it gets another id.
    near = {"order_id": 1152921504606847000}
    assert approvals.binding("bot", "t", near) != approvals.binding(
        "bot", "t", {"order_id": float(near["order_id"])}
    )
    await approvals.decide(approval.id, ALICE, True, "ok")
    assert await approvals.take_grant(big, decision()) is not None
    assert await approvals.take_grant(other, decision()) is None


async def test_binding_changes_with_any_argument() -> None:
    service = Approvals.__new__(Approvals)
    base = service.binding("bot", "issue_refund", {"amount": 10, "order": "A"})
    assert base == service.binding("bot", "issue_refund", {"order": "A", "amount": 10})
    assert base != service.binding("bot", "issue_refund", {"amount": 11, "order": "A"})
    assert base != service.binding("other", "issue_refund", {"amount": 10, "order": "A"})
    assert base != service.binding("bot", "close_account", {"amount": 10, "order": "A"})
    assert len(base) == 64
    # A sandbox's approval is not production's, nor a PATCH's a DELETE's.
    call = ("bot", "/repos/acme/app", None)
    sandbox = service.binding(*call, upstream="github-sandbox", method="PATCH")
    assert sandbox != service.binding(*call, upstream="github-prod", method="PATCH")
    assert sandbox != service.binding(*call, upstream="github-sandbox", method="DELETE")
    # The same call for another customer (the context headers) is another call.
    reset: tuple[str, str, dict[str, Any]] = ("bot", "send_password_reset", {})
    for_one = service.binding(*reset, context={"customer_id": "C-1"})
    assert for_one != service.binding(*reset, context={"customer_id": "C-2"})
    assert for_one == service.binding(*reset, context={"customer_id": "C-1"})
    assert service.binding(*reset, context={}) == service.binding(*reset)
    # An MCP retry's answers (a refund's amount the user typed) are part of the call.
    close: tuple[str, str, dict[str, Any]] = ("bot", "refund_asking_amount", {"order": "A"})
    asked = service.binding(*close, input_responses={"a": {"content": {"amount": 20}}})
    assert asked != service.binding(*close, input_responses={"a": {"content": {"amount": 900}}})
    assert asked != service.binding(*close)
    assert service.binding(*close, input_responses={}) == service.binding(*close)


async def test_approve_and_reject_are_final(approvals: Approvals, audit: AuditLog) -> None:
    first = await approvals.request(action(), decision(), mode="hold")
    approved = await approvals.decide(first.id, ALICE, True, "ok by me")
    assert approved.status is ApprovalStatus.APPROVED
    assert approved.decided_by == "alice"
    assert approved.comment == "ok by me"
    assert approved.evidence().approver == "alice"
    with pytest.raises(ApprovalConflict):
        await approvals.decide(first.id, BOB, False, "")
    second = await approvals.request(action(), decision(), mode="hold")
    rejected = await approvals.decide(second.id, BOB, False, "no")
    assert rejected.status is ApprovalStatus.REJECTED
    with pytest.raises(ApprovalConflict):
        await approvals.decide(second.id, ALICE, True, "")
    with pytest.raises(ApprovalNotFound):
        await approvals.decide("apr_nope", ALICE, True, "")
    decided = records(audit, "approval_decided")
    assert [(d["who"], d["verdict"], d["comment"]) for d in decided] == [
        ("alice", "approved", "ok by me"),
        ("bob", "rejected", "no"),
    ]
    keyed = keyed_digest(audit.directory, first.arguments_sha256)
    assert all(d["arguments_sha256"] == keyed for d in decided)
    assert decided[0]["decision_id"] == first.decision_id


async def test_every_approval_record_names_its_agent_and_tool(
    approvals: Approvals, audit: AuditLog, tmp_path: Path
) -> None:
    # An evidence package for one agent selects records by agent: a vote, an
    # expiry or an execution that named none was left out of it.
    first = await approvals.request(action(agent="refunds-bot"), decision(), mode="hold")
    await approvals.decide(first.id, ALICE, False, "no")
    other = await approvals.request(action(agent="other-bot"), decision(), mode="hold")
    await approvals.decide(other.id, BOB, True, "")
    await approvals.mark_executed(other.id)
    kinds = [
        kind
        for _, raw in iter_records(audit.directory)
        if (kind := orjson.loads(raw)["kind"]).startswith("approval")
    ]
    assert set(kinds) == {"approval_requested", "approval_decided", "approval_executed"}
    for kind in set(kinds):
        for body in records(audit, kind):
            assert body["tool"] == "issue_refund"
            mine = body["approval_id"] == first.id
            assert body["agent"] == ("refunds-bot" if mine else "other-bot")
    await audit.checkpoint()
    export_log(audit.directory, tmp_path / "pkg", selection=Selection(agent="refunds-bot"))
    exported = [
        orjson.loads(line)["kind"]
        for line in (tmp_path / "pkg" / "records.jsonl").read_bytes().splitlines()
    ]
    assert [k for k in exported if k.startswith("approval")] == [
        "approval_requested",
        "approval_decided",
    ]
    # The summary lists the person's verdict (it read only an older record kind).
    summary = (tmp_path / "pkg" / "SUMMARY.md").read_text()
    listed = summary.split("## Approvals")[1].split("##")[0]
    assert "| alice | rejected | issue_refund |" in listed


async def test_separation_of_duties_and_approver_groups(approvals: Approvals) -> None:
    approval = await approvals.request(action(agent="alice"), decision(), mode="hold")
    with pytest.raises(SelfApproval):
        await approvals.decide(approval.id, ALICE, True, "")
    grouped = await approvals.request(action(), decision(approvers=("finance",)), mode="hold")
    with pytest.raises(NotAnApprover):
        await approvals.decide(grouped.id, BOB, True, "")
    # Membership by role (carol has the role finance) or by subject (a group named bob).
    assert (await approvals.decide(grouped.id, CAROL, True, "")).status is ApprovalStatus.APPROVED
    by_name = await approvals.request(action(), decision(approvers=("bob",)), mode="hold")
    assert (await approvals.decide(by_name.id, BOB, True, "")).status is ApprovalStatus.APPROVED


async def test_two_required_approvals_need_two_distinct_people(approvals: Approvals) -> None:
    approval = await approvals.request(action(), decision(), mode="hold", required_approvals=2)
    once = await approvals.decide(approval.id, ALICE, True, "")
    assert once.status is ApprovalStatus.PENDING
    assert once.approved_by == ("alice",)
    with pytest.raises(AlreadyVoted):
        await approvals.decide(approval.id, ALICE, True, "")
    twice = await approvals.decide(approval.id, BOB, True, "")
    assert twice.status is ApprovalStatus.APPROVED
    assert twice.approved_by == ("alice", "bob")
    # One rejection rejects even after an approval.
    other = await approvals.request(action(), decision(), mode="hold", required_approvals=2)
    await approvals.decide(other.id, ALICE, True, "")
    assert (await approvals.decide(other.id, BOB, False, "")).status is ApprovalStatus.REJECTED


async def test_pending_approval_survives_a_restart(url: str, audit: AuditLog) -> None:
    first = await Approvals.open(url, audit, SETTINGS)
    approval = await first.request(action(), decision(), mode="hold")
    await first.close()
    second = await Approvals.open(url, audit, SETTINGS)
    try:
        assert [a.id for a in await second.list("pending")] == [approval.id]
        waiter = asyncio.create_task(second.wait(approval.id, 5))
        await asyncio.sleep(0.1)
        await second.decide(approval.id, ALICE, True, "after restart")
        assert (await waiter).status is ApprovalStatus.APPROVED
    finally:
        await second.close()


async def test_wait_returns_on_approve_and_on_reject(approvals: Approvals) -> None:
    for approve, status in ((True, ApprovalStatus.APPROVED), (False, ApprovalStatus.REJECTED)):
        approval = await approvals.request(action(), decision(), mode="hold")
        waiter = asyncio.create_task(approvals.wait(approval.id, 10))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        await approvals.decide(approval.id, ALICE, approve, "")
        done = await asyncio.wait_for(waiter, 1)
        assert done.status is status


async def test_wait_times_out_to_expired_never_approved(
    approvals: Approvals, audit: AuditLog
) -> None:
    approval = await approvals.request(action(), decision(), mode="hold")
    expired = await approvals.wait(approval.id, 0.15)
    assert expired.status is ApprovalStatus.EXPIRED
    with pytest.raises(ApprovalConflict):
        await approvals.decide(approval.id, ALICE, True, "too late")
    assert [b["approval_id"] for b in records(audit, "approval_expired")] == [approval.id]
    with pytest.raises(ApprovalNotFound):
        await approvals.wait("apr_nope", 0.1)


async def test_decision_past_the_hold_timeout_expires_instead(approvals: Approvals) -> None:
    approval = await approvals.request(action(), decision(hold_timeout_s=0.05), mode="hold")
    await asyncio.sleep(0.1)
    with pytest.raises(ApprovalConflict, match="expired"):
        await approvals.decide(approval.id, ALICE, True, "")
    assert (await approvals.get(approval.id)).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]


async def test_wait_sees_a_decision_made_by_another_sidecar(
    url: str, audit: AuditLog, approvals: Approvals
) -> None:
    approval = await approvals.request(action(), decision(), mode="hold")
    waiter = asyncio.create_task(approvals.wait(approval.id, 10))
    other = await Approvals.open(url, audit, SETTINGS)
    try:
        await asyncio.sleep(0.05)
        await other.decide(approval.id, ALICE, True, "from the other sidecar")
    finally:
        await other.close()
    done = await asyncio.wait_for(waiter, 2)
    assert done.status is ApprovalStatus.APPROVED
    assert done.comment == "from the other sidecar"


async def test_a_grant_covers_only_the_terms_it_was_approved_under(
    approvals: Approvals,
) -> None:
    # Approved by one approver while the policy asked any one; the policy now asks
    # two of finance: the old vote is not what the retry's decision needs.
    act = action(amount=10)
    approval = await approvals.request(act, decision(), mode="defer")
    await approvals.decide(approval.id, ALICE, True, "")
    stricter = decision(approvers=("finance",), required_approvals=2)
    assert await approvals.take_grant(act, stricter) is None
    # Nor is a deferral pending under other terms reused: a new one asks finance.
    pending = await approvals.request(action(amount=20), decision(), mode="defer")
    again = await approvals.request(action(amount=20), stricter, mode="defer", required_approvals=2)
    assert again.id != pending.id
    assert (again.approvers, again.required_approvals) == (("finance",), 2)
    assert await approvals.take_grant(act, decision()) is not None  # its own terms


async def test_a_grant_covers_only_the_claims_it_was_approved_for(
    approvals: Approvals,
) -> None:
    def under(**claims: Any) -> Action:
        return dataclasses.replace(action(), agent=Agent("refunds-bot", claims=claims))

    first = under(sub="bot", customer="C-1", exp=100, iat=40, jti="a")
    approval = await approvals.request(first, decision(), mode="defer")
    await approvals.decide(approval.id, ALICE, True, "")
    # The same call under C-2's token (a policy reading the claim names C-2).
    assert await approvals.take_grant(under(sub="bot", customer="C-2", exp=100), decision()) is None
    # A fresh token for the same claims passes: its times and id are its own.
    fresh = under(sub="bot", customer="C-1", exp=900, iat=800, jti="b", uti="u2", aio="x")
    assert await approvals.take_grant(fresh, decision()) is not None


async def test_take_grant_passes_the_exact_call_once(approvals: Approvals, audit: AuditLog) -> None:
    act = action(amount=10)
    assert await approvals.take_grant(act, decision()) is None
    approval = await approvals.request(act, decision(), mode="defer")
    assert approval.expires_at == pytest.approx(approval.created_at + 86400)
    # A retry while pending reuses the approval instead of opening another.
    assert (await approvals.request(act, decision(), mode="defer")).id == approval.id
    assert await approvals.take_grant(act, decision()) is None  # still pending
    await approvals.decide(approval.id, ALICE, True, "")
    assert await approvals.take_grant(action(amount=1000), decision()) is None  # other arguments
    assert await approvals.take_grant(action(agent="other-bot"), decision()) is None
    grant = await approvals.take_grant(act, decision())
    assert grant is not None
    assert grant.id == approval.id
    assert grant.status is ApprovalStatus.CONSUMED
    assert await approvals.take_grant(act, decision()) is None  # once only
    (executed,) = records(audit, "approval_executed")
    assert executed["approval_id"] == approval.id
    assert executed["decision_id"] == approval.decision_id


async def test_hold_approvals_are_not_grants_and_mark_executed_consumes(
    approvals: Approvals,
) -> None:
    act = action()
    approval = await approvals.request(act, decision(), mode="hold")
    await approvals.decide(approval.id, ALICE, True, "")
    assert await approvals.take_grant(act, decision()) is None
    used = await approvals.mark_executed(approval.id, act.action_id)
    assert used.status is ApprovalStatus.CONSUMED
    with pytest.raises(ApprovalConflict):
        await approvals.mark_executed(approval.id)


async def test_concurrent_grants_on_two_sidecars_pass_once(
    url: str, audit: AuditLog, approvals: Approvals
) -> None:
    act = action()
    approval = await approvals.request(act, decision(), mode="defer")
    await approvals.decide(approval.id, ALICE, True, "")
    other = await Approvals.open(url, audit, SETTINGS)
    try:
        got = await asyncio.gather(*(s.take_grant(act, decision()) for s in (approvals, other) * 3))
    finally:
        await other.close()
    assert sum(g is not None for g in got) == 1


async def test_cancel_all_for_rejects_held_approvals_and_wakes_waiters(
    approvals: Approvals, audit: AuditLog
) -> None:
    held = await approvals.request(action(agent="refunds-bot"), decision(), mode="hold")
    other = await approvals.request(action(agent="other-bot"), decision(), mode="hold")
    waiter = asyncio.create_task(approvals.wait(held.id, 10))
    await asyncio.sleep(0.02)
    assert await approvals.cancel_all_for(agent="refunds-bot", reason="incident 4711") == 1
    done = await asyncio.wait_for(waiter, 1)
    assert done.status is ApprovalStatus.REJECTED
    assert done.comment == "incident 4711"
    assert done.decided_by == "kill_switch"
    assert (await approvals.get(other.id)).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    assert await approvals.cancel_all_for(tool="issue_refund", reason="tool off") == 1
    assert len(records(audit, "approval_cancelled")) == 2


async def test_an_upstream_switch_takes_back_that_upstreams_approvals_only(
    approvals: Approvals,
) -> None:
    sandbox = await approvals.request(action(upstream="sandbox"), decision(), mode="defer")
    live = action(upstream="refunds")
    granted = await approvals.request(live, decision(), mode="defer")
    await approvals.decide(granted.id, ALICE, True, "ok")
    assert await approvals.cancel_all_for(upstream="refunds", reason="incident 46") == 1
    assert await approvals.take_grant(live, decision()) is None
    assert (await approvals.get(sandbox.id)).status is ApprovalStatus.PENDING  # type: ignore[union-attr]


async def test_sweeper_expires_overdue_approvals(approvals: Approvals) -> None:
    approval = await approvals.request(action(), decision(hold_timeout_s=0.01), mode="hold")
    await asyncio.sleep(0.05)
    assert await approvals.expire_due() == 1
    assert (await approvals.get(approval.id)).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]


async def test_the_sweeper_deletes_approvals_that_ended_long_ago(url: str, audit: AuditLog) -> None:
    settings = dataclasses.replace(SETTINGS, keep_decided_s=0.05, sweep_interval_s=0.02)
    service = await Approvals.open(url, audit, settings)
    before = REGISTRY.get_sample_value("warden_approvals_pruned_total") or 0.0
    try:
        ended = await service.request(action(), decision(), mode="hold")
        await service.decide(ended.id, BOB, False, "no")
        waiting = await service.request(action(amount=20), decision(), mode="hold")
        for _ in range(100):
            if await service.get(ended.id) is None:
                break
            await asyncio.sleep(0.02)
        assert await service.get(ended.id) is None
        assert await service.get(waiting.id) is not None  # pending: never pruned
        assert REGISTRY.get_sample_value("warden_approvals_pruned_total") == before + 1
        # The audit log keeps the approval's records.
        assert [d["verdict"] for d in records(audit, "approval_decided")] == ["rejected"]
    finally:
        await service.close()


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="mode"):
        ApprovalSettings(mode="maybe")
    with pytest.raises(ValueError, match="http"):
        ApprovalSettings(webhook_url="file:///etc/passwd")
    with pytest.raises(ValueError, match="format"):
        ApprovalSettings(webhook_format="xml")
    with pytest.raises(ValueError, match="required"):
        ApprovalSettings(required_approvals=0)
    with pytest.raises(ValueError, match="keep_decided_s"):
        ApprovalSettings(keep_decided_s=0)


async def test_close_releases_waiters_and_keeps_the_approval_pending(
    url: str, audit: AuditLog
) -> None:
    service = await Approvals.open(url, audit, SETTINGS)
    approval = await service.request(action(), decision(), mode="hold")
    waiter = asyncio.create_task(service.wait(approval.id, 10))
    await asyncio.sleep(0.02)
    await service.close()
    assert (await asyncio.wait_for(waiter, 1)).status is ApprovalStatus.PENDING
    reopened = await Approvals.open(url, audit, SETTINGS)
    try:
        assert (await reopened.get(approval.id)).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    finally:
        await reopened.close()


def _pending_series(agent: str) -> dict[str, float]:
    out = {}
    for metric in REGISTRY.collect():
        if metric.name != "warden_approvals_pending":
            continue
        for sample in metric.samples:
            if sample.labels.get("agent") == agent:
                out[sample.labels["tool"]] = sample.value
    return out


async def test_the_pending_gauge_keeps_short_labels_and_drops_series_that_empty(
    approvals: Approvals,
) -> None:
    # Tool names (and, for plain HTTP calls, paths) come from agents: the gauge
    # must neither carry them whole nor keep a series for every one ever held.
    long_name = "tool_" + "x" * 5000
    asked = action(agent="gauge-bot", tool=long_name)
    held = await approvals.request(asked, decision(), mode="hold")
    series = _pending_series("gauge-bot")
    assert list(series.values()) == [1.0]
    assert all(len(tool) <= 128 for tool in series)
    await approvals.decide(held.id, ALICE, False, "no")
    assert _pending_series("gauge-bot") == {}


async def test_the_pending_limit_holds_for_calls_held_at_the_same_moment(
    url: str, audit: AuditLog
) -> None:
    # The parallel calls of one model response are held together: each must not
    # find room the others are about to take.
    settings = dataclasses.replace(SETTINGS, max_pending_per_agent=3)
    service = await Approvals.open(url, audit, settings)
    try:
        results = await asyncio.gather(
            *(service.request(action(amount=i), decision(), mode="hold") for i in range(20)),
            return_exceptions=True,
        )
    finally:
        await service.close()
    opened = [r for r in results if isinstance(r, Approval)]
    refused = [r for r in results if isinstance(r, TooManyPending)]
    assert (len(opened), len(refused)) == (3, 17)


async def test_a_kill_switch_also_takes_back_an_approval_not_used_yet(
    approvals: Approvals,
) -> None:
    # Approved by a person who was tricked: the operator's kill switch must not
    # leave the grant waiting for the agent's retry once the switch is cleared.
    await _take_back(approvals)


async def _take_back(approvals: Approvals) -> None:
    asked = action()
    deferred = await approvals.request(asked, decision(), mode="defer")
    await approvals.decide(deferred.id, ALICE, True, "looks fine")
    assert await approvals.cancel_all_for(agent="refunds-bot", reason="incident 45") == 1
    assert await approvals.take_grant(asked, decision()) is None
    taken_back = await approvals.get(deferred.id)
    assert taken_back is not None
    assert taken_back.status is ApprovalStatus.REJECTED


async def test_a_raised_quorum_holds_for_approvals_opened_before_it(
    url: str, audit: AuditLog
) -> None:
    before = await Approvals.open(url, audit, SETTINGS)  # approvals.required_approvals: 1
    asked = action()
    opened = await before.request(asked, decision(), mode="defer")
    assert opened.required_approvals == 1
    await before.close()
    raised = dataclasses.replace(SETTINGS, required_approvals=2)
    after = await Approvals.open(url, audit, raised)  # restarted with 2
    try:
        shown = await after.get(opened.id)
        assert shown is not None
        assert shown.required_approvals == 2  # as the API and the console show it
        assert [a.required_approvals for a in await after.list("pending")] == [2]
        once = await after.decide(opened.id, ALICE, True, "")
        assert once.status is ApprovalStatus.PENDING
        assert (len(once.approved_by), once.required_approvals) == (1, 2)
        assert await after.take_grant(asked, decision()) is None  # one vote is not enough
        twice = await after.decide(opened.id, BOB, True, "")
        assert twice.status is ApprovalStatus.APPROVED
        assert await after.take_grant(asked, decision()) is not None
        (_, voted) = records(audit, "approval_decided")
        assert voted["required_approvals"] == 2
    finally:
        await after.close()


async def test_the_configured_quorum_is_the_least_a_policy_can_ask(
    url: str, audit: AuditLog
) -> None:
    service = await Approvals.open(url, audit, dataclasses.replace(SETTINGS, required_approvals=2))
    try:
        fewer = await service.request(
            action(), decision(required_approvals=1), mode="hold", required_approvals=1
        )
        more = await service.request(
            action(amount=20), decision(required_approvals=3), mode="hold", required_approvals=3
        )
    finally:
        await service.close()
    assert (fewer.required_approvals, more.required_approvals) == (2, 3)


@pytest.fixture(params=["sqlite", "postgresql"])
async def sidecar_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[ApprovalRepo]]]:
    """Opens approval stores on one shared database, as sidecars of one fleet do."""
    config = state_config(request, tmp_path)
    opened: list[StateBackend] = []

    async def store() -> ApprovalRepo:
        if request.param == "sqlite":
            return await ApprovalStore.open(config.url)
        opened.append(await open_state(config))
        return opened[-1].approvals

    yield store
    for backend in opened:
        await backend.close()


async def test_a_raised_quorum_is_kept_with_the_approval_for_every_sidecar(
    sidecar_store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    # A rolling change: one sidecar already requires 3 approvals, another still 1.
    lower = await Approvals.open(await sidecar_store(), audit, SETTINGS)
    raised = await Approvals.open(
        await sidecar_store(), audit, dataclasses.replace(SETTINGS, required_approvals=3)
    )
    try:
        opened = await lower.request(action(), decision(), mode="defer")
        assert opened.required_approvals == 1
        once = await raised.decide(opened.id, ALICE, True, "")
        assert (once.status, once.required_approvals) == (ApprovalStatus.PENDING, 3)
        # The lower sidecar counts against the stored quorum, not its own.
        twice = await lower.decide(opened.id, BOB, True, "")
        assert (twice.status, twice.required_approvals) == (ApprovalStatus.PENDING, 3)
        stored = await lower.get(opened.id)
        assert stored is not None
        assert stored.required_approvals == 3
        assert await lower.take_grant(action(), decision()) is None
        thrice = await lower.decide(opened.id, CAROL, True, "")
        assert (thrice.status, len(thrice.approved_by)) == (ApprovalStatus.APPROVED, 3)
    finally:
        await lower.close()
        await raised.close()


async def test_pages_of_pending_and_of_ended_approvals(approvals: Approvals) -> None:
    opened = [await approvals.request(action(amount=i), decision(), mode="hold") for i in range(5)]
    for approval in opened[:2]:
        await approvals.decide(approval.id, ALICE, approval is opened[0], "")
    first = await approvals.page(pending=True, limit=2)
    second = await approvals.page(pending=True, limit=2, after=page_key(first[-1], pending=True))
    assert [a.id for a in first + second] == [a.id for a in opened[2:]]  # oldest first
    ended = await approvals.page(pending=False, limit=10)
    assert [a.id for a in ended] == [opened[1].id, opened[0].id]  # last decided first
    assert await approvals.pending_count() == 3


async def test_a_page_starts_after_the_last_one_shown_whatever_was_decided_since(
    sidecar_store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    service = await Approvals.open(await sidecar_store(), audit, SETTINGS)
    try:
        opened = [
            await service.request(action(amount=i), decision(), mode="defer") for i in range(6)
        ]
        first = await service.page(pending=True, limit=3)
        assert [a.id for a in first] == [a.id for a in opened[:3]]
        for shown in first[:2]:  # others decide what the first page showed
            await service.decide(shown.id, ALICE, False, "")
        after = page_key(first[-1], pending=True)
        second = await service.page(pending=True, limit=3, after=after)
        assert [a.id for a in second] == [a.id for a in opened[3:]]  # none skipped
        ended = await service.page(pending=False, limit=1)
        assert [a.id for a in ended] == [opened[1].id]  # last decided first
        older = await service.page(pending=False, limit=5, after=page_key(ended[-1], pending=False))
        assert [a.id for a in older] == [opened[0].id]
    finally:
        await service.close()


class _Unpaged:
    """A store that cannot read one page (a repository of another backend)."""

    def __init__(self, inner: ApprovalStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "page":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_a_store_that_cannot_page_gives_the_same_pages(url: str, audit: AuditLog) -> None:
    store = cast(ApprovalRepo, _Unpaged(await ApprovalStore.open(url)))
    assert not isinstance(store, PagedApprovals)
    service = await Approvals.open(store, audit, SETTINGS)
    try:
        opened = [
            await service.request(action(amount=i), decision(), mode="hold") for i in range(4)
        ]
        await service.decide(opened[0].id, ALICE, False, "")
        after = page_key(opened[1], pending=True)
        assert [a.id for a in await service.page(pending=True, limit=2, after=after)] == [
            opened[2].id,
            opened[3].id,
        ]
        assert [a.id for a in await service.page(pending=False, limit=5)] == [opened[0].id]
        ended = page_key(opened[0], pending=True)  # before the one that ended
        assert await service.page(pending=False, limit=5, after=ended) == []
    finally:
        await service.close()
