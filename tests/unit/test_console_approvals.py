"""The approvals view shows approvers what the held action would do."""

from __future__ import annotations

import dataclasses
import time

from warden.admin.auth import Principal
from warden.approvals.model import Approval
from warden.console.views import approvals_view


def held(**changes: object) -> Approval:
    now = time.time()
    base = Approval(
        id="apr_1",
        decision_id="dec_1",
        action_id="act_1",
        agent_id="support-triage",
        tool="refund_asking_amount",
        arguments={"order_id": "A-1001"},
        arguments_sha256="ab" * 32,
        binding="cd" * 32,
        mode="defer",
        reason="a refund above 100 needs a support lead",
        created_at=now,
        expires_at=now + 600,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


LEAD = Principal("lead", frozenset({"approver"}))


def test_an_mcp_retrys_answers_are_shown_beside_the_arguments() -> None:
    answered = held(answers={"amount": {"action": "accept", "content": {"amount": 900}}})
    page = str(approvals_view([answered], [], "csrf", LEAD))
    assert 'aria-label="Answers"' in page
    assert "&quot;amount&quot;: 900" in page  # escaped, as every value the page shows
    assert 'aria-label="Arguments"' in page
    # Every other approval shows its arguments only.
    assert 'aria-label="Answers"' not in str(approvals_view([held()], [], "csrf", LEAD))
