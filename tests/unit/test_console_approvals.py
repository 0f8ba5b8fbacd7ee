"""The approvals view shows approvers what the held action would do."""

from __future__ import annotations

import dataclasses
import time

from warden.admin.auth import Principal
from warden.approvals.model import Approval, ApprovalStatus
from warden.console import routes
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
    page = str(approvals_view([answered], "csrf", LEAD))
    assert 'aria-label="Answers"' in page
    assert "&quot;amount&quot;: 900" in page  # escaped, as every value the page shows
    assert 'aria-label="Arguments"' in page
    # Every other approval shows its arguments only.
    assert 'aria-label="Answers"' not in str(approvals_view([held()], "csrf", LEAD))


def test_the_queue_is_one_page_with_links_to_the_first_and_the_next() -> None:
    after = "1764650000.25~apr_1"
    page = str(approvals_view([held()], "csrf", LEAD, waiting=41, first=False, next_after=after))
    assert "Waiting (41)" in page  # every pending one is counted, one page is shown
    assert page.count('<article class="approval"') == 1
    assert 'href="/console/approvals" rel="first"' in page
    assert f'href="/console/approvals?after={after}" rel="next"' in page
    assert "Approval history" not in page  # the history is a page of its own
    alone = str(approvals_view([held()], "csrf", LEAD, waiting=1))
    assert 'rel="next"' not in alone
    assert 'rel="first"' not in alone


def test_the_history_is_a_table_without_vote_buttons() -> None:
    ended = held(status=ApprovalStatus.REJECTED, decided_at=time.time(), comment="duplicate")
    after = "1764650000.5~apr_1"
    page = str(approvals_view([ended], "csrf", LEAD, history=True, waiting=3, next_after=after))
    assert 'aria-label="Approval history"' in page
    assert "duplicate" in page
    assert "Approve" not in page
    assert f'href="/console/approvals?show=history&amp;after={after}" rel="next"' in page
    assert 'rel="first"' not in page
    later = str(approvals_view([ended], "csrf", LEAD, history=True, waiting=3, first=False))
    assert 'href="/console/approvals?show=history" rel="first"' in later
    assert "Waiting (3)" in page  # the tab still says how many wait


def test_a_value_cut_for_length_is_named_before_the_arguments() -> None:
    cut = held(arguments={"note": "n… [cut by Warden: 5 of 6 characters]"}, redacted=("cut:/note",))
    page = str(approvals_view([cut], "csrf", LEAD))
    assert "<code>/note (cut: too long to show)</code>" in page
    assert "too long to show). Reject the call" in page


def test_a_page_cursor_past_anything_stored_opens_the_first_page() -> None:
    # A link carrying a time in the future showed "Waiting (3)" beside an empty queue.
    assert routes._page_after("999999999999~zzz") is None
    assert routes._page_after("1700000000.5~apr_1") == (1700000000.5, "apr_1")
