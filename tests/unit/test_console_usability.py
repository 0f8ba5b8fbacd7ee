"""What the console's pages tell the people using them: health, votes, zones, sessions.

Rendered from plain data, as the routes pass it; the routes themselves are
covered over HTTP in tests/functional/test_console_usability_functional.py.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from tests.unit import test_console_index
from warden.admin.auth import Principal
from warden.approvals.model import Approval, Vote
from warden.audit.index import Bucket, IndexQuery, RecordIndex, Revision
from warden.audit.log import AuditLog
from warden.budgets.guard import CapSpend
from warden.config import AuditConfig
from warden.console import views
from warden.console.charts import decisions_chart
from warden.console.sessions import SessionStore
from warden.killswitch import KillSwitch, Scope
from warden.model import Effect
from warden.testing.audit import sample_action, sample_decision

DANA = Principal("dana", frozenset({"approver"}), frozenset({"support-leads"}))
DORA = Principal("dora", frozenset({"approver"}), frozenset({"support-leads"}))
OLGA = Principal("olga", frozenset({"approver"}), frozenset({"billing"}))
index = test_console_index.index
"""The decision index on both backends: SQLite and the fleet's PostgreSQL."""
READY_DETAIL: dict[str, Any] = {
    "policy": {"ready": True, "revision": "r1"},
    "audit": {"writable": True},
    "stopping": False,
}


def operations(
    health: tuple[bool, dict[str, Any]], caps: list[dict[str, Any]] | None = None, **kw: Any
) -> str:
    return str(views.operations_view((), "csrf", health, caps or [], **kw))


def test_sessions_expire_by_the_monotonic_clock_whatever_the_wall_clock_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wall, steady = [1_800_000_000.0], [5_000.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: steady[0])
    store = SessionStore(8 * 3600)
    sid, _ = store.create(DANA)
    wall[0] -= 86400  # NTP steps the clock back a day...
    wall[0] += 9 * 3600
    steady[0] += 9 * 3600  # ...and 9 real hours pass: the 8 h session is over
    assert store.get(sid) is None
    sid, _ = store.create(DANA)
    wall[0] += 86400  # a clock stepped forward ends no session early
    assert store.get(sid) is not None


def test_health_is_degraded_and_names_the_state_store_when_it_is_down() -> None:
    down = {**READY_DETAIL, "state": {"backend": "postgresql", "up": False}}
    page = operations((True, down))
    assert 'class="degraded" role="status">Degraded: the state store (postgresql)' in page
    assert ">Ready<" not in page
    assert 'class="ready" role="status">Ready<' in operations(
        (True, {**READY_DETAIL, "state": {"backend": "postgresql", "up": True}})
    )
    unshipped = {**READY_DETAIL, "audit": {"writable": True, "ship": {"connected": False}}}
    assert "Degraded: the central audit store is unreachable" in operations((True, unshipped))
    broken = {**READY_DETAIL, "audit": {"writable": False}}
    assert "Not ready: the audit log is not writable." in operations((False, broken))


def test_the_switch_form_suggests_known_targets_and_flags_unseen_ones() -> None:
    page = operations(
        (True, READY_DETAIL),
        known={"agent": ["support-triage"], "upstream": ["openai"]},
        warning="no agent named “x” has been seen",
    )
    assert 'list="switch-targets"' in page
    assert '<option value="support-triage" label="support-triage (agent)">' in page
    assert '<option value="openai" label="openai (upstream)">' in page
    assert "no agent named “x” has been seen" in page


def test_times_and_windows_say_their_zone() -> None:
    chart = decisions_chart([Bucket(start=0.0, effects={"allow": 1}), Bucket(start=3600.0)])
    assert ">01-01 00:00 UTC</text>" in chart
    revisions = [Revision("r1", 3, "2026-12-02T09:00:00.5Z", "2026-12-02T10:00:00Z", 0)]
    risk = str(views.model_risk_view(revisions, None))
    assert "First seen (UTC)" in risk
    assert "2026-12-02 09:00:00 UTC" in risk
    spend = CapSpend("refunds", "day:2026-12-01", "agent:a", 1.0, 0.0, 10.0, "USD")
    page = operations(
        (True, READY_DETAIL),
        caps=[{"name": "refunds", "scope": "x"}],
        spend=[spend],
        timezone="Pacific/Honolulu",
    )
    assert "<td>day:2026-12-01 (Pacific/Honolulu)</td>" in page
    evidence = str(views.evidence_view(IndexQuery(kinds=()), "", None, csrf="c", who=DANA))
    assert 'aria-describedby="period-zone"' in evidence
    assert "Dates are days in UTC" in evidence


def held(**changes: Any) -> Approval:
    now = time.time()
    base = Approval(
        id="apr_1",
        decision_id="dec_1",
        action_id="act_1",
        agent_id="support-triage",
        tool="issue_refund",
        arguments={"order_id": "A-1"},
        arguments_sha256="ab" * 32,
        binding="cd" * 32,
        mode="defer",
        reason="above 100",
        created_at=now,
        expires_at=now + 600,
        approvers=("support-leads",),
        required_approvals=2,
    )
    return dataclasses.replace(base, **changes)


def test_a_quorum_card_shows_the_votes_and_offers_no_vote_the_service_would_refuse() -> None:
    voted = held(votes=(Vote("dana", True, "looks right", time.time()),))
    mine = str(views.approvals_view([voted], "csrf", DANA))
    assert "dana approved at " in mine
    assert ": looks right" in mine
    assert 'value="approve"' not in mine
    assert "You approved this; it waits for 1 more approval(s) from others." in mine
    # Another lead still votes; someone outside the policy's group is told why not.
    assert 'value="approve"' in str(views.approvals_view([voted], "csrf", DORA))
    outside = str(views.approvals_view([voted], "csrf", OLGA))
    assert 'value="approve"' not in outside
    assert "Only members of support-leads may decide this" in outside
    own = Principal("support-triage", frozenset({"approver"}), frozenset({"support-leads"}))
    assert "your own agent" in str(views.approvals_view([held()], "csrf", own))
    # The card names the approval and links its decision.
    fresh = str(views.approvals_view([held()], "csrf", DORA))
    assert "Votes</dt><dd>none yet" in fresh
    assert '<a href="/console/decisions/id/dec_1">dec_1</a>' in fresh


def test_a_form_posted_after_the_session_ended_is_said_not_done() -> None:
    page = str(views.login_view("n", views.LOST["vote"], back="/console/approvals"))
    assert "it was NOT recorded" in page
    assert '<input type="hidden" name="next" value="/console/approvals"/>' in page


async def test_ids_are_looked_up_exactly_never_as_text_of_a_reason(
    tmp_path: Path, index: RecordIndex
) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root)))
    try:
        held = sample_decision(Effect.REQUIRE_APPROVAL)
        await log.record_decision(sample_action(0), held)
        for i in range(6):  # an agent's tool named after the id, quoted by the denial
            quoted = (f"{held.decision_id} is not in the catalogue",)
            await log.record_decision(
                sample_action(i + 1), sample_decision(Effect.DENY, reasons=quoted)
            )
        follow = dataclasses.replace(sample_decision(), guard="approval")
        await log.record_decision(sample_action(7), follow)
        size = log.size
    finally:
        await log.close()
    index.catch_up(root, size)
    assert len(index.search(IndexQuery(text=held.decision_id)).rows) == 7
    [found] = index.search(IndexQuery(decision_id=held.decision_id, limit=5)).rows
    assert (found.seq, found.decision_id) == (0, held.decision_id)
    window = index.search(IndexQuery(guard="approval", after=0, before=size)).rows
    assert [r.decision_id for r in window] == [follow.decision_id]
    assert index.search(IndexQuery(guard="approval", after=found.seq + 7)).rows == ()


def test_an_upstream_switch_is_marked_as_none_here_and_a_deferral_is_a_step() -> None:
    switch = KillSwitch(
        id="ks_1",
        scope=Scope.UPSTREAM,
        target="opneai",
        reason="typo",
        created_by="ada",
        created_at=0.0,
    )
    page = str(
        views.operations_view((switch,), "csrf", (True, READY_DETAIL), [], unseen=lambda _: True)
    )
    assert 'opneai <span class="warn">(no such upstream here)</span>' in page
    record = {"kind": "decision", "decision": {"id": "dec_1", "effect": "require_approval"}}
    deferral = {
        "kind": "approval_deferred",
        "time": "2026-12-02T09:00:00Z",
        "body": {"approval_id": "apr_1", "decision_id": "dec_1", "reason": "the agent left"},
    }
    detail = str(views.decision_detail(record, [], approvals=[(5, deferral)]))
    assert (
        "<td>deferred</td><td>apr_1</td><td></td><td>deferred</td><td>the agent left</td>" in detail
    )
