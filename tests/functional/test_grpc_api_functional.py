"""Warden's gRPC API (issue 12, items 1-3), end to end.

A real Warden with real Rego listens on ``listen.grpc`` (127.0.0.1:0); the
tests drive it with stubs generated from ``proto/warden/v1/governance.proto``,
the standard health and reflection stubs, and :mod:`warden.client`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import orjson
import pytest
import trustme
from google.protobuf import descriptor_pool, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.functional.conftest import audit_records, make_config
from warden.cli import main as warden_cli
from warden.client import (
    ApprovalPending,
    AsyncWardenClient,
    ToolDenied,
    WardenClient,
    govern,
)
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.ingress import grpc_governance
from warden.model import Effect
from warden.server import Warden

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "allowed"}

decision := {"effect": "deny", "reason": "bulk export of customer data is never allowed"} if {
	input.action.tool == "export_customers"
} else := {"effect": "require_approval", "reason": "refunds over 200 need a lead"} if {
	input.action.tool == "issue_refund"
	input.action.arguments.amount > 200
} else := {"effect": "allow", "reason": msg} if {
	input.action.tool == "issue_refund"
	msg := sprintf("refund of %v on order %v (%v via %v)", [
		input.action.arguments.amount, input.action.arguments.order_id,
		input.context.customer_id, input.action.protocol])
}
"""

ADMIN, APPROVER, VIEWER = "admin-token-1", "approver-token-1", "viewer-token-1"
AGENT_KEY = "refunds-bot-key-1"
RUNNER_KEY = "tool-runner-key-1"
RUNNER = (("x-warden-agent", "tool-runner"), ("x-warden-agent-key", RUNNER_KEY))
CAP = {"name": "refunds", "tool": "issue_refund", "value": "amount", "limit": 100}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def grpc_config(tmp_path: Path, **overrides: Any) -> Any:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "policy.rego").write_text(POLICY)
    settings: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", "grpc": "127.0.0.1:0"},
        "policy": {"bundles": [str(bundle)]},
        "admin": {
            "tokens": [
                {"subject": "root", "roles": ["admin"], "sha256": _sha(ADMIN)},
                {"subject": "dana", "roles": ["approver"], "sha256": _sha(APPROVER)},
                {"subject": "vic", "roles": ["viewer"], "sha256": _sha(VIEWER)},
            ]
        },
        "identity": {
            "agents": {
                "refunds-bot": {"key_sha256": [_sha(AGENT_KEY)]},
                "tool-runner": {"key_sha256": [_sha(RUNNER_KEY)]},
            }
        },
        # The tool runner's reports on the sidecar's own agent are trusted.
        "grpc": {"outcome_reporters": {"tool-runner": ["support-triage"]}},
        **overrides,
    }
    return make_config(tmp_path, "http://127.0.0.1:9", **settings)


@pytest.fixture
async def warden(tmp_path: Path) -> AsyncIterator[Warden]:
    async with Warden(grpc_config(tmp_path)) as running:
        yield running


@pytest.fixture
async def channel(warden: Warden) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(warden.grpc_address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Any:
    return pb_grpc.GovernanceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def check_request(tool: str, wait: bool = False, **arguments: Any) -> pb.CheckRequest:
    args = struct_pb2.Struct()
    args.update(arguments)
    context = struct_pb2.Struct()
    context.update({"customer_id": "C-7"})
    return pb.CheckRequest(action=pb.Action(tool=tool, arguments=args, context=context), wait=wait)


def records_of(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r["kind"] == kind]


def verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert warden_cli(["audit", "verify", "--dir", str(tmp_path / "audit")]) == 0, (
        capsys.readouterr()
    )


async def until[T](probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Probe until ``done`` (bounded, so a broken Warden fails the test instead of hanging it)."""
    for _ in range(1000):
        value = await probe()
        if done(value):
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


# -- Check ------------------------------------------------------------------------------


async def test_allow_and_deny_are_decided_by_the_policy_and_recorded(
    warden: Warden, stub: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = await stub.Check(check_request("issue_refund", amount=40, order_id="A-1"))
    denied = await stub.Check(check_request("export_customers", format="csv"))
    await warden.stop()
    assert allowed.effect == pb.EFFECT_ALLOW
    # Whole numbers reach the policy as integers; context and the default protocol too.
    assert allowed.reason == "refund of 40 on order A-1 (C-7 via grpc)"
    assert allowed.agent_id == "support-triage"
    assert allowed.obligations.mode == pb.MODE_ENFORCE
    assert denied.effect == pb.EFFECT_DENY
    assert denied.reason == "bulk export of customer data is never allowed"
    assert denied.guard == "policy"
    decisions = records_of(tmp_path, "decision")
    assert [d["decision"]["id"] for d in decisions] == [allowed.decision_id, denied.decision_id]
    action = decisions[0]["action"]
    assert (action["kind"], action["tool"], action["protocol"], action["stage"]) == (
        "tool_call",
        "issue_refund",
        "grpc",
        "executed",
    )
    # The context names a customer: the arguments are sealed for that data subject.
    assert decisions[0]["sealed"] is not None
    assert action["arguments"] is None
    verify(tmp_path, capsys)


async def test_bad_requests_get_invalid_argument(stub: Any) -> None:
    code, details = await status_of(stub.Check(pb.CheckRequest(action=pb.Action(tool=""))))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "action.tool is required" in details
    code, details = await status_of(
        stub.Check(pb.CheckRequest(action=pb.Action(kind="teleport", tool="x")))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "action.kind must be one of" in details
    # Only a model's response proposes a hosted MCP approval request: a record of one
    # allowed here would let an approval of any call with that id reach the provider.
    code, details = await status_of(
        stub.Check(pb.CheckRequest(action=pb.Action(kind="mcp_approval_request", tool="kb.x")))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "mcp_approval_request" not in details.partition("one of")[2]
    # A tool named on a model call would be seen as that tool, and counted by no cap.
    for kind in ("llm_call", "http_call"):
        code, details = await status_of(
            stub.Check(pb.CheckRequest(action=pb.Action(kind=kind, tool="issue_refund")))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert f"a {kind} names no tool" in details
    # An id echoed in the reason is cut: 100 KB of it passed the trailers' limit, and the
    # caller got RESOURCE_EXHAUSTED ("Stream removed") instead of why.
    long_id = "dec_" + "x" * 100_000
    code, details = await status_of(
        stub.ReportOutcome(pb.ReportOutcomeRequest(decision_id=long_id))
    )
    assert code is grpc.StatusCode.NOT_FOUND
    assert details.startswith("no allowed decision 'dec_xxx")
    assert len(details) <= 1024


async def test_a_large_action_is_decided_like_any_other(stub: Any) -> None:
    # Past 256 KiB its arguments are converted off the event loop; the answer is the same.
    big = check_request("issue_refund", amount=40, order_id="A-1")
    big.action.arguments.update({f"n{i}": i for i in range(30_000)})
    assert big.action.ByteSize() > 256 * 1024
    decided = await stub.Check(big)
    assert decided.effect == pb.EFFECT_ALLOW
    assert decided.reason == "refund of 40 on order A-1 (C-7 via grpc)"


async def test_agent_identity_is_proven_from_metadata(
    warden: Warden, stub: Any, tmp_path: Path
) -> None:
    request = check_request("issue_refund", amount=40, order_id="A-1")
    # A proxy key proves refunds-bot; agent_id in the request agrees with it.
    request.agent_id = "refunds-bot"
    proven = await stub.Check(request, metadata=(("x-warden-agent-key", AGENT_KEY),))
    assert proven.effect == pb.EFFECT_ALLOW
    assert proven.agent_id == "refunds-bot"
    # A bad key: unauthenticated, and the key is not echoed.
    code, details = await status_of(
        stub.Check(request, metadata=(("x-warden-agent-key", "wrong-key-123"),))
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "wrong-key-123" not in details
    # Another agent's id without proof, or one the metadata contradicts: permission denied.
    code, _ = await status_of(stub.Check(request))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    request.agent_id = "support-triage"
    code, details = await status_of(
        stub.Check(request, metadata=(("x-warden-agent", "refunds-bot"),))
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "not the agent the metadata names" in details
    # Named twice in the metadata, whatever agent_id says: refused, not overwritten.
    twice = (("x-warden-agent", "support-triage"), ("x-warden-agent", "refunds-bot"))
    code, details = await status_of(stub.Check(request, metadata=twice))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "must be sent once" in details
    await warden.stop()
    assert [d["agent"]["id"] for d in records_of(tmp_path, "decision")] == ["refunds-bot"]
    for segment in (tmp_path / "audit" / "segments").iterdir():
        assert AGENT_KEY.encode() not in segment.read_bytes()


async def test_require_approval_without_wait_answers_at_once_then_passes_once(
    warden: Warden, stub: Any
) -> None:
    request = check_request("issue_refund", amount=250, order_id="A-2")
    held = await stub.Check(request)
    assert held.effect == pb.EFFECT_REQUIRE_APPROVAL
    assert held.approval_id.startswith("apr_")
    # The same call again while pending: the same approval, not a second one.
    again = await stub.Check(request)
    assert again.approval_id == held.approval_id
    listed = await stub.ListApprovals(
        pb.ListApprovalsRequest(status="pending"), metadata=bearer(VIEWER)
    )
    assert [a.id for a in listed.approvals] == [held.approval_id]
    assert listed.approvals[0].arguments.struct_value["amount"] == 250
    decided = await stub.DecideApproval(
        pb.DecideApprovalRequest(approval_id=held.approval_id, approve=True, comment="ok"),
        metadata=bearer(APPROVER),
    )
    assert decided.status == "approved"
    assert [(v.by, v.approve) for v in decided.votes] == [("dana", True)]
    passed = await stub.Check(request)
    assert passed.effect == pb.EFFECT_ALLOW
    assert f"approved by dana (approval {held.approval_id})" in passed.reason
    # Once only.
    assert (await stub.Check(request)).effect == pb.EFFECT_REQUIRE_APPROVAL


async def test_require_approval_with_wait_is_held_until_approved_over_http(
    warden: Warden, stub: Any
) -> None:
    checking = asyncio.ensure_future(
        stub.Check(check_request("issue_refund", wait=True, amount=300, order_id="A-3"), timeout=30)
    )
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {APPROVER}"}) as http:
        approval_id = ""
        while not approval_id:
            async with http.get(f"{warden.admin_url}/v1/approvals?status=pending") as resp:
                found = (await resp.json())["approvals"]
            approval_id = found[0]["id"] if found else ""
            if not approval_id:
                await asyncio.sleep(0.02)
        assert not checking.done()  # held while people decide
        async with http.post(f"{warden.admin_url}/v1/approvals/{approval_id}/approve") as resp:
            assert resp.status == 200
    answer = await checking
    assert answer.effect == pb.EFFECT_ALLOW
    assert answer.guard == "approval"
    assert approval_id in answer.reason


async def test_a_waiting_check_past_its_deadline_leaves_the_approval_pending(
    warden: Warden, stub: Any
) -> None:
    request = check_request("issue_refund", wait=True, amount=260, order_id="A-4")
    checking = asyncio.ensure_future(stub.Check(request, timeout=3))

    async def approvals() -> list[Any]:
        listed = await stub.ListApprovals(pb.ListApprovalsRequest(), metadata=bearer(VIEWER))
        return list(listed.approvals)

    held = await until(approvals, bool)
    assert (held[0].status, held[0].mode) == ("pending", "hold")  # wait overrides defer mode
    code, _ = await status_of(checking)
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    # The cancelled handler turns the hold into a deferral: still decidable, passes once.
    after = await until(approvals, lambda found: found[0].mode == "defer")
    assert [(a.id, a.status) for a in after] == [(held[0].id, "pending")]


# -- ReportOutcome -------------------------------------------------------------------------


@asynccontextmanager
async def capped(tmp_path: Path) -> AsyncIterator[tuple[Warden, Any]]:
    """A Warden with the refunds cap of 100 a day, and a Governance stub on its listener."""
    async with (
        Warden(grpc_config(tmp_path, budgets={"caps": [CAP]})) as w,
        grpc.aio.insecure_channel(w.grpc_address) as ch,
    ):
        yield w, pb_grpc.GovernanceStub(ch)


async def test_a_trusted_runners_report_settles_a_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Cap 100 a day: a refund the tool failed releases its 60; one it made counts.
    async with capped(tmp_path) as (w, stub):
        assert w.core is not None
        failed = await stub.Check(check_request("issue_refund", amount=60, order_id="A-F"))
        await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                decision_id=failed.decision_id, result="already refunded", is_error=True
            ),
            metadata=RUNNER,
        )
        await w.core.background.drain()
        made = await stub.Check(check_request("issue_refund", amount=60, order_id="A-5"))
        await stub.ReportOutcome(
            pb.ReportOutcomeRequest(decision_id=made.decision_id, result='{"refund_id": "rf_1"}'),
            metadata=RUNNER,
        )
        await w.core.background.drain()
        over = await stub.Check(check_request("issue_refund", amount=60, order_id="A-6"))
        # Reported once; an unknown id is not found; another agent may not report.
        twice = await status_of(
            stub.ReportOutcome(
                pb.ReportOutcomeRequest(decision_id=made.decision_id), metadata=RUNNER
            )
        )
        other = await stub.Check(
            check_request("issue_refund", amount=1, order_id="A-7"),
            metadata=(("x-warden-agent", "refunds-bot"), ("x-warden-agent-key", AGENT_KEY)),
        )
        not_theirs = await status_of(
            stub.ReportOutcome(pb.ReportOutcomeRequest(decision_id=other.decision_id))
        )
        endless = await status_of(
            stub.ReportOutcome(
                pb.ReportOutcomeRequest(decision_id=other.decision_id, latency_ms=math.inf),
                metadata=RUNNER,
            )
        )
    assert endless[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert (failed.effect, made.effect) == (pb.EFFECT_ALLOW, pb.EFFECT_ALLOW)
    assert over.effect == pb.EFFECT_DENY
    assert over.guard == "budget"
    assert twice[0] is grpc.StatusCode.NOT_FOUND
    assert not_theirs[0] is grpc.StatusCode.PERMISSION_DENIED
    outcomes = {r["decision_id"]: r["outcome"] for r in records_of(tmp_path, "outcome")}
    assert outcomes[failed.decision_id]["is_error"] is True
    assert outcomes[made.decision_id]["is_error"] is False
    assert outcomes[made.decision_id]["reported_by"] == "runner"
    verify(tmp_path, capsys)


async def test_the_agents_own_report_is_its_word_and_releases_nothing(
    tmp_path: Path,
) -> None:
    # The agent reporting its own refund failed must not win back its cap: the
    # refund may well have been made. Only a trusted runner's report releases.
    async with capped(tmp_path) as (w, stub):
        assert w.core is not None
        first = await stub.Check(check_request("issue_refund", amount=60, order_id="A-1"))
        said = pb.ReportOutcomeRequest(decision_id=first.decision_id, result="x", is_error=True)
        await stub.ReportOutcome(said)
        await w.core.background.drain()
        second = await stub.Check(check_request("issue_refund", amount=60, order_id="A-2"))
        small = await stub.Check(check_request("issue_refund", amount=10, order_id="A-3"))
        # A free-text error is refused (it would be stored unsealed); a code is taken.
        wordy = pb.ReportOutcomeRequest(
            decision_id=small.decision_id, error="no refund for jane@example.com"
        )
        refused = await status_of(stub.ReportOutcome(wordy))
        coded = pb.ReportOutcomeRequest(decision_id=small.decision_id, error="order_not_found")
        await stub.ReportOutcome(coded)
    assert first.effect == pb.EFFECT_ALLOW
    assert (second.effect, second.guard) == (pb.EFFECT_DENY, "budget")
    assert small.effect == pb.EFFECT_ALLOW
    assert refused[0] is grpc.StatusCode.INVALID_ARGUMENT
    outcomes = {r["decision_id"]: r["outcome"] for r in records_of(tmp_path, "outcome")}
    assert outcomes[first.decision_id]["is_error"] is True  # recorded all the same
    assert outcomes[first.decision_id]["reported_by"] == "agent"  # and whose word it is


async def test_a_model_call_the_agent_says_failed_stays_spent(tmp_path: Path) -> None:
    # Warden never sees a model call checked over gRPC: it holds estimate_usd, and
    # the agent's word that it failed (or a report with no usage) does not give it back.
    budgets = {"llm": {"limit_usd": 1.0, "estimate_usd": 0.4}}
    llm = pb.CheckRequest(action=pb.Action(kind="llm_call", model="gpt-4o"))
    failed = "upstream_error"
    async with (
        Warden(grpc_config(tmp_path, budgets=budgets)) as w,
        grpc.aio.insecure_channel(w.grpc_address) as ch,
    ):
        assert w.core is not None
        stub: Any = pb_grpc.GovernanceStub(ch)
        checks = []
        # A runner the operator trusts may say it failed: that releases.
        checks.append(await stub.Check(llm))
        said = pb.ReportOutcomeRequest(decision_id=checks[-1].decision_id, error=failed)
        await stub.ReportOutcome(said, metadata=RUNNER)
        await w.core.background.drain()
        # The agent's own word does not, failed or answered without usage.
        checks.append(await stub.Check(llm))
        said = pb.ReportOutcomeRequest(decision_id=checks[-1].decision_id, error=failed)
        await stub.ReportOutcome(said)
        checks.append(await stub.Check(llm))
        await stub.ReportOutcome(pb.ReportOutcomeRequest(decision_id=checks[-1].decision_id))
        await w.core.background.drain()
        checks.append(await stub.Check(llm))
    assert [c.effect for c in checks] == [pb.EFFECT_ALLOW] * 3 + [pb.EFFECT_DENY]
    assert checks[-1].guard == "budget"
    assert "0.80 of 1.00 USD used today" in checks[-1].reason


async def test_an_outcome_reported_after_a_restart_still_finds_its_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The link from an allowed Check to its decision is in the state store: a
    # runner whose sidecar restarted mid-call reports to the new process.
    config = grpc_config(tmp_path, budgets={"caps": [CAP]})
    async with Warden(config) as w, grpc.aio.insecure_channel(w.grpc_address) as ch:
        stub: Any = pb_grpc.GovernanceStub(ch)
        held = await stub.Check(check_request("issue_refund", amount=70, order_id="A-R"))
    assert held.effect == pb.EFFECT_ALLOW
    async with Warden(config) as w, grpc.aio.insecure_channel(w.grpc_address) as ch:
        assert w.core is not None
        stub = pb_grpc.GovernanceStub(ch)
        # The 70 still counts against the cap of 100 across the restart ...
        before = await stub.Check(check_request("issue_refund", amount=50, order_id="A-S"))
        await stub.ReportOutcome(
            pb.ReportOutcomeRequest(decision_id=held.decision_id, result="declined", is_error=True),
            metadata=RUNNER,
        )
        await w.core.background.drain()
        # ... until the runner reports the refund failed, which releases it.
        after = await stub.Check(check_request("issue_refund", amount=50, order_id="A-T"))
        again = await status_of(
            stub.ReportOutcome(
                pb.ReportOutcomeRequest(decision_id=held.decision_id), metadata=RUNNER
            )
        )
    assert (before.effect, before.guard) == (pb.EFFECT_DENY, "budget")
    assert after.effect == pb.EFFECT_ALLOW
    assert again[0] is grpc.StatusCode.NOT_FOUND
    outcomes = {r["decision_id"]: r["outcome"] for r in records_of(tmp_path, "outcome")}
    assert outcomes[held.decision_id]["is_error"] is True
    verify(tmp_path, capsys)


# -- admin auth, kill switches -------------------------------------------------------------


async def test_kill_switches_while_the_state_store_is_locked(tmp_path: Path, stub: Any) -> None:
    # Thrown: in force here at once, and the caller is told the fleet does not see it yet.
    # A saved one cleared: refused, it stays. Both UNAVAILABLE, not an internal error.
    saved = await stub.SetKillSwitch(
        pb.SetKillSwitchRequest(scope="tool", target="issue_refund", reason="incident"),
        metadata=bearer(ADMIN),
    )
    locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        code, details = await status_of(
            stub.SetKillSwitch(
                pb.SetKillSwitchRequest(scope="tool", target="close_account", reason="incident"),
                metadata=bearer(ADMIN),
            )
        )
        refused = await stub.Check(check_request("close_account", account_id="C-7"))
        cleared = await status_of(
            stub.ClearKillSwitch(pb.ClearKillSwitchRequest(id=saved.id), metadata=bearer(ADMIN))
        )
        still = await stub.Check(check_request("issue_refund", amount=1, order_id="A-8"))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "in force on this sidecar only" in details
    assert (refused.effect, refused.guard) == (pb.EFFECT_DENY, "kill_switch")
    assert cleared[0] is grpc.StatusCode.UNAVAILABLE
    assert "stays in force" in cleared[1]
    assert (still.effect, still.guard) == (pb.EFFECT_DENY, "kill_switch")


async def test_admin_calls_need_a_token_with_the_role(stub: Any) -> None:
    code, _ = await status_of(stub.ListKillSwitches(pb.ListKillSwitchesRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    code, _ = await status_of(
        stub.ListKillSwitches(pb.ListKillSwitchesRequest(), metadata=bearer("nope"))
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    code, details = await status_of(
        stub.SetKillSwitch(
            pb.SetKillSwitchRequest(scope="global", reason="x"), metadata=bearer(VIEWER)
        )
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "needs the role admin" in details
    code, _ = await status_of(
        stub.DecideApproval(
            pb.DecideApprovalRequest(approval_id="apr_x", approve=True), metadata=bearer(ADMIN)
        )
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _ = await status_of(
        stub.DecideApproval(
            pb.DecideApprovalRequest(approval_id="apr_x", approve=True), metadata=bearer(APPROVER)
        )
    )
    assert code is grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(
        stub.TailRecords(pb.TailRecordsRequest(), metadata=bearer(VIEWER)).read()
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED


async def test_kill_switches_set_list_clear_and_stop_checks(stub: Any) -> None:
    bad = await status_of(
        stub.SetKillSwitch(
            pb.SetKillSwitchRequest(scope="planet", target="x", reason="r"), metadata=bearer(ADMIN)
        )
    )
    assert bad[0] is grpc.StatusCode.INVALID_ARGUMENT
    switch = await stub.SetKillSwitch(
        pb.SetKillSwitchRequest(scope="tool", target="issue_refund", reason="incident 42"),
        metadata=bearer(ADMIN),
    )
    assert (switch.scope, switch.target, switch.created_by) == ("tool", "issue_refund", "root")
    listed = await stub.ListKillSwitches(pb.ListKillSwitchesRequest(), metadata=bearer(VIEWER))
    assert [s.id for s in listed.kill_switches] == [switch.id]
    refused = await stub.Check(check_request("issue_refund", amount=1, order_id="A-8"))
    assert refused.effect == pb.EFFECT_DENY
    assert refused.guard == "kill_switch"
    assert "incident 42" in refused.reason
    cleared = await stub.ClearKillSwitch(
        pb.ClearKillSwitchRequest(id=switch.id, reason="resolved"), metadata=bearer(ADMIN)
    )
    assert cleared.id == switch.id
    again = await status_of(
        stub.ClearKillSwitch(pb.ClearKillSwitchRequest(id=switch.id), metadata=bearer(ADMIN))
    )
    assert again[0] is grpc.StatusCode.NOT_FOUND
    allowed = await stub.Check(check_request("issue_refund", amount=1, order_id="A-8"))
    assert allowed.effect == pb.EFFECT_ALLOW


# -- streams ---------------------------------------------------------------------------------


async def test_tail_records_streams_from_a_position_and_follows(
    warden: Warden, stub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the backstop a minute away, a new record can only arrive by the write signal.
    monkeypatch.setattr(grpc_governance, "TAIL_BACKSTOP_S", 60.0)
    first = await stub.Check(check_request("issue_refund", amount=1, order_id="A-9"))
    tail = stub.TailRecords(pb.TailRecordsRequest(from_seq=0, follow=True), metadata=bearer(ADMIN))
    seen: list[Any] = []
    while not any(r.kind == "decision" for r in seen):
        seen.append(await tail.read())
    # A record written after the tail caught up arrives on the same stream.
    second = await stub.Check(check_request("export_customers"))
    while not any(second.decision_id.encode() in r.json for r in seen):
        seen.append(await asyncio.wait_for(tail.read(), 10))
    tail.cancel()
    assert [r.seq for r in seen] == list(range(len(seen)))
    decided = [orjson.loads(r.json)["decision"]["id"] for r in seen if r.kind == "decision"]
    assert decided == [first.decision_id, second.decision_id]
    # The bytes are the stored record: its hash is the log's leaf.
    stored = audit_records(tmp_path / "audit")
    assert [orjson.loads(r.json) for r in seen] == stored[: len(seen)]
    # From a later position, without following: just the rest.
    rest = [
        r
        async for r in stub.TailRecords(
            pb.TailRecordsRequest(from_seq=len(seen) - 1), metadata=bearer(ADMIN)
        )
    ]
    assert rest[0].seq == len(seen) - 1
    assert rest[0].json == seen[-1].json


async def test_watch_approvals_streams_a_new_approval_and_its_decision(stub: Any) -> None:
    watch = stub.WatchApprovals(pb.WatchApprovalsRequest(), metadata=bearer(VIEWER))
    # The stream is open (headers sent) before the approval is requested.
    await watch.initial_metadata()
    held = await stub.Check(check_request("issue_refund", amount=500, order_id="A-10"))
    requested = await watch.read()
    assert requested.kind == pb.ApprovalEvent.KIND_REQUESTED
    assert requested.approval.id == held.approval_id
    assert requested.approval.tool == "issue_refund"
    await stub.DecideApproval(
        pb.DecideApprovalRequest(approval_id=held.approval_id, approve=False, comment="no"),
        metadata=bearer(APPROVER),
    )
    changed = await watch.read()
    watch.cancel()
    assert changed.kind == pb.ApprovalEvent.KIND_CHANGED
    assert (changed.approval.status, changed.approval.comment) == ("rejected", "no")


async def test_watch_approvals_is_woken_by_changes_not_by_its_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the backstop poll a minute away, events can only come from the change signal.
    monkeypatch.setattr(grpc_governance, "WATCH_BACKSTOP_S", 60.0)
    async with Warden(grpc_config(tmp_path)) as w, grpc.aio.insecure_channel(w.grpc_address) as ch:
        stub: Any = pb_grpc.GovernanceStub(ch)
        watch = stub.WatchApprovals(pb.WatchApprovalsRequest(), metadata=bearer(VIEWER))
        await watch.initial_metadata()
        held = await stub.Check(check_request("issue_refund", amount=500, order_id="A-11"))
        requested = await asyncio.wait_for(watch.read(), 10)
        # Decided through the HTTP admin API, not the gRPC one.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{w.admin_url}/v1/approvals/{held.approval_id}/approve",
                json={"comment": "ok"},
                headers={"Authorization": f"Bearer {APPROVER}"},
            ) as answer,
        ):
            assert answer.status == 200, await answer.text()
        changed = await asyncio.wait_for(watch.read(), 10)
        watch.cancel()
    assert (requested.kind, requested.approval.id) == (
        pb.ApprovalEvent.KIND_REQUESTED,
        held.approval_id,
    )
    assert (changed.kind, changed.approval.status) == (pb.ApprovalEvent.KIND_CHANGED, "approved")


# -- health, reflection ----------------------------------------------------------------------


async def test_health_reports_each_service_serving(channel: grpc.aio.Channel) -> None:
    health: Any = health_pb2_grpc.HealthStub(channel)
    for service in ("", "warden.v1.Governance", "grpc.health.v1.Health"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    code, _ = await status_of(health.Check(health_pb2.HealthCheckRequest(service="nope.Svc")))
    assert code is grpc.StatusCode.NOT_FOUND


async def test_health_turns_not_serving_when_warden_stops(warden: Warden) -> None:
    async with grpc.aio.insecure_channel(warden.grpc_address) as ch:
        health: Any = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="warden.v1.Governance"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(warden.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await stopping


def _reflect(address: str) -> tuple[list[str], list[str]]:
    with grpc.insecure_channel(address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        governance = pool.FindServiceByName("warden.v1.Governance")
        return services, [m.name for m in governance.methods]


async def test_reflection_describes_the_api(warden: Warden) -> None:
    services, methods = await asyncio.to_thread(_reflect, warden.grpc_address)
    # The Envoy services are listed too when they are served.
    assert {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "warden.v1.Governance",
    } <= set(services)
    assert methods == [
        "Check",
        "ReportOutcome",
        "ListApprovals",
        "WatchApprovals",
        "DecideApproval",
        "SetKillSwitch",
        "ListKillSwitches",
        "ClearKillSwitch",
        "TailRecords",
    ]


# -- TLS ------------------------------------------------------------------------------------


def _tls_files(tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cert": tmp_path / "server.pem", "key": tmp_path / "server.key"}
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    return {k: str(v) for k, v in paths.items()}


async def test_tls_serves_clients_that_trust_the_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = _tls_files(tmp_path, ca)
    async with Warden(grpc_config(tmp_path, grpc={"tls": tls})) as w:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        async with grpc.aio.secure_channel(w.grpc_address, creds) as ch:
            stub: Any = pb_grpc.GovernanceStub(ch)
            answer = await stub.Check(check_request("issue_refund", amount=1, order_id="T"))
        assert answer.effect == pb.EFFECT_ALLOW
        # A plaintext client cannot talk to a TLS listener.
        async with grpc.aio.insecure_channel(w.grpc_address) as plain:
            code, _ = await status_of(
                pb_grpc.GovernanceStub(plain).Check(check_request("x"), timeout=5)
            )
        assert code is grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = _tls_files(tmp_path, ca)
    ca_file = tmp_path / "client-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("agent@example.test")
    config = grpc_config(tmp_path, grpc={"tls": {**tls, "client_ca": str(ca_file)}})
    async with Warden(config) as w:
        async with AsyncWardenClient(
            w.grpc_address,
            root_certificates=ca.cert_pem.bytes(),
            certificate_chain=client.cert_chain_pems[0].bytes(),
            private_key=client.private_key_pem.bytes(),
        ) as with_cert:
            verdict = await with_cert.check("issue_refund", {"amount": 1, "order_id": "M"})
        assert verdict.allowed
        async with AsyncWardenClient(
            w.grpc_address, root_certificates=ca.cert_pem.bytes(), timeout_s=5
        ) as without:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await without.check("issue_refund", {"amount": 1, "order_id": "M"})
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


# -- the Python client and govern ---------------------------------------------------------


async def test_govern_runs_only_allowed_calls_and_records_their_outcome(
    warden: Warden, tmp_path: Path
) -> None:
    ran: list[tuple[str, int]] = []

    def run_sync(address: str) -> tuple[Any, ...]:
        with WardenClient(address, agent="refunds-bot", agent_key=AGENT_KEY) as client:

            @govern(client, context={"customer_id": "C-9"})
            def issue_refund(order_id: str, amount: int) -> dict[str, Any]:
                ran.append((order_id, amount))
                return {"refund_id": f"rf_{order_id}"}

            @govern(client)
            def export_customers(fmt: str = "csv") -> str:
                ran.append(("export", 0))
                return "everything"

            made = issue_refund("A-11", amount=40)
            with pytest.raises(ToolDenied) as denied:
                export_customers()
            with pytest.raises(ApprovalPending) as pending:
                issue_refund("A-12", 900)
            return made, denied.value, pending.value

    made, denied, pending = await asyncio.to_thread(run_sync, warden.grpc_address)
    assert made == {"refund_id": "rf_A-11"}
    assert ran == [("A-11", 40)]  # the denied and held calls never ran
    assert denied.reason == "bulk export of customer data is never allowed"
    assert denied.decision_id.startswith("dec_")
    assert pending.approval_id.startswith("apr_")

    async with AsyncWardenClient(warden.grpc_address) as aclient:

        @govern(aclient, tool="issue_refund")
        async def refund(order_id: str, amount: int) -> str:
            raise RuntimeError(f"order {order_id} is closed")

        with pytest.raises(RuntimeError):
            await refund("A-13", 5)
    assert warden.core is not None
    await warden.core.background.drain()
    await warden.stop()
    decisions = {r["decision"]["id"]: r for r in records_of(tmp_path, "decision")}
    # The allowed sync call (its result is sealed for customer C-9), then the failed async one.
    made_record, failed_record = records_of(tmp_path, "outcome")
    assert made_record["agent"]["id"] == "refunds-bot"
    assert made_record["sealed"] is not None
    assert failed_record["outcome"]["is_error"] is True
    assert failed_record["outcome"]["error"] == "RuntimeError"
    assert failed_record["outcome"]["result"] == "order A-13 is closed"
    made_decision = decisions[made_record["decision_id"]]
    assert made_decision["decision"]["effect"] == "allow"
    assert made_decision["action"]["protocol"] == "python"
    assert decisions[failed_record["decision_id"]]["action"]["arguments"] == {
        "order_id": "A-13",
        "amount": 5,
    }


async def test_govern_refuses_arguments_the_policy_would_read_otherwise(warden: Warden) -> None:
    # The tool acts on what it was given; the policy must decide on the same values.
    ran: list[Any] = []

    def run_sync(address: str) -> tuple[Exception, Exception, Exception]:
        with WardenClient(address, agent="refunds-bot", agent_key=AGENT_KEY) as client:

            @govern(client)
            def issue_refund(order_id: str, amount: Any) -> str:
                ran.append(amount)
                return "refunded"

            # A Decimal is the number it spells (sent as its str(), "900" passed the rule).
            with pytest.raises(ApprovalPending) as held:
                issue_refund("A-21", Decimal("900"))
            # NaN was sent as null, which no rule compares: the refund ran.
            with pytest.raises(ValueError, match="no JSON form") as nan:
                issue_refund("A-22", float("nan"))
            with pytest.raises(TypeError, match="no faithful JSON form") as odd:
                issue_refund("A-23", {900})
            return held.value, nan.value, odd.value

    await asyncio.to_thread(run_sync, warden.grpc_address)
    assert ran == []


async def test_the_client_never_goes_through_a_proxy_from_the_environment(
    warden: Warden, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``http_proxy`` in the agent's environment is for other traffic: the agent key and
    admin token would reach the proxy in clear text through a CONNECT tunnel."""
    connects: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connects.append(await reader.readline())
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for name in ("http_proxy", "https_proxy", "grpc_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        async with AsyncWardenClient(
            warden.grpc_address, agent="refunds-bot", agent_key=AGENT_KEY, timeout_s=10
        ) as client:
            verdict = await client.check("issue_refund", {"amount": 1, "order_id": "P-1"})
        assert verdict.allowed
    finally:
        server.close()
        await server.wait_closed()
    assert connects == []


async def test_govern_refuses_a_client_of_the_wrong_kind() -> None:
    client = AsyncWardenClient("127.0.0.1:9")
    try:
        with pytest.raises(TypeError, match="needs a WardenClient"):

            @govern(client)  # type: ignore[arg-type]
            def tool() -> None:
                return None
    finally:
        await client.close()


async def test_the_client_speaks_for_the_admin_too(warden: Warden) -> None:
    async with AsyncWardenClient(warden.grpc_address, admin_token=ADMIN) as client:
        switch = await client.set_kill_switch("agent", "support-triage", "drill")
        assert [s.id for s in await client.list_kill_switches()] == [switch.id]
        verdict = await client.check("issue_refund", {"amount": 1, "order_id": "A-14"})
        assert verdict.effect is Effect.DENY
        await client.clear_kill_switch(switch.id)
        records = [r async for r in client.tail_records(follow=False)]
        assert [r.kind for r in records].count("killswitch") == 2
