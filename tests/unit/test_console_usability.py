"""What the console's pages tell the people using them: health, votes, zones, sessions.

Rendered from plain data, as the routes pass it; the routes themselves are
covered over HTTP in tests/functional/test_console_usability_functional.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from warden.admin.auth import Principal
from warden.approvals.model import Approval, Vote
from warden.audit.index import Bucket, IndexQuery, Revision
from warden.budgets.guard import CapSpend
from warden.console import views
from warden.console.charts import decisions_chart
from warden.console.sessions import SessionStore

DANA = Principal("dana", frozenset({"approver"}), frozenset({"support-leads"}))
DORA = Principal("dora", frozenset({"approver"}), frozenset({"support-leads"}))
OLGA = Principal("olga", frozenset({"approver"}), frozenset({"billing"}))
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
