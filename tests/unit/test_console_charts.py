"""The console's SVG charts: labelled for people and screen readers, values escaped."""

from __future__ import annotations

from warden.audit.index import Bucket
from warden.console.charts import decisions_chart, errors_chart, latency_chart

BUCKETS = [
    Bucket(start=0.0, effects={"allow": 3, "deny": 1}, latency_avg_ms=1.5, latency_max_ms=4.0),
    Bucket(start=60.0, effects={}, errors=2),
    Bucket(
        start=120.0,
        effects={"require_approval": 2, "<weird>": 1},
        latency_avg_ms=2.0,
        latency_max_ms=2.0,
    ),
]


def test_decisions_chart_stacks_one_bar_per_effect_and_says_the_total() -> None:
    svg = decisions_chart(BUCKETS)
    assert 'role="img"' in svg
    assert 'aria-label="Decisions over time: 7 in all, at most 4 in one interval"' in svg
    assert svg.count("<rect") == 4  # allow and deny, then require_approval and the odd one
    assert "effect-other" in svg
    assert "<weird>" not in svg


def test_latency_chart_draws_both_lines_and_names_the_worst() -> None:
    svg = latency_chart(BUCKETS)
    assert svg.count("<polyline") == 2
    assert "worst 4.00 ms" in svg
    assert svg.count("<circle") == 4


def test_errors_chart_and_empty_series() -> None:
    assert errors_chart(BUCKETS).count("<rect") == 1
    assert "Errors over time: 2 in all" in errors_chart(BUCKETS)
    empty = [Bucket(start=0.0)]
    assert "<rect" not in decisions_chart(empty)
    assert "no decisions" in latency_chart(empty)
