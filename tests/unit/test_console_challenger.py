"""The Model risk view shows the live challenger's divergence, or says it is not configured."""

from __future__ import annotations

from warden.console.views import model_risk_view
from warden.policy.challenger import ChallengerStats, Divergence


def test_without_a_challenger_the_view_says_so() -> None:
    page = str(model_risk_view([], "no drift yet"))
    assert "Not configured: no challenger policy runs" in page


def test_divergence_counts_and_recent_decisions_are_shown_escaped() -> None:
    recent = Divergence(
        decision_id="dec_1",
        agent="<script>x</script>",
        tool="issue_refund",
        champion_revision="rev-1",
        champion_effect="allow",
        challenger_revision="rev-2",
        challenger_effect="require_approval",
    )
    stats = ChallengerStats(
        revision="rev-2",
        evaluated=40,
        diverged=3,
        dropped=1,
        queued=0,
        changes={"allow→require_approval": 3},
        recent=(recent,),
    )
    page = str(model_risk_view([], "no drift yet", stats))
    assert "Not configured" not in page
    assert "40 decisions evaluated, 3 diverged (7.5%), 1 dropped" in page
    assert "<td>allow→require_approval</td><td>3</td>" in page
    assert "<td>dec_1</td>" in page
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
