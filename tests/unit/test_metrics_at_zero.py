"""Counters the shipped alerts read exist at 0 from the start.

``increase()`` takes a series' first sample as its start: a series that appeared
with its first count (the first failed reload) added nothing, and the alert
never fired.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY

import warden.approvals.metrics
import warden.policy.challenger
import warden.policy.metrics
from tests import prometheus as prom
from warden.errors import error_codes
from warden.ops import metrics

_IMPORTED_FOR_THEIR_SERIES = (
    warden.approvals.metrics,
    warden.policy.challenger,
    warden.policy.metrics,
)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("warden_policy_reloads_total", {"result": "failure"}),
        ("warden_policy_fallbacks_total", {"reason": "timeout", "risk": "high"}),
        ("warden_approval_notifications_total", {"result": "failed"}),
        ("warden_errors_total", {"code": "audit_unavailable"}),
        ("warden_errors_total", {"code": "overloaded"}),
        ("warden_connections_refused_total", {"listener": "proxy"}),
    ],
)
def test_a_series_an_alert_reads_exists_before_its_first_count(
    name: str, labels: dict[str, str]
) -> None:
    assert sample(name, **labels) is not None


def test_every_series_the_shipped_alerts_read_with_increase_is_created_at_start() -> None:
    # Each counter an alert reads through increase() with a fixed label value is one
    # of those created at 0 (the agent counter's series are made per agent).
    rules = prom.alerting_rules(prom.load_rules())
    made_per_agent = {"warden_agent_decisions_total"}
    for rule in rules:
        for name, matchers in re.findall(r"increase\((\w+)(\{[^}]*\})?\[", rule["expr"]):
            if name in made_per_agent:
                continue
            wanted = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
            found = [
                s
                for m in REGISTRY.collect()
                for s in m.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
            ]
            assert found, f"{rule['alert']}: no series of {name}{matchers} before a count"


def test_an_agent_has_every_effect_at_zero_once_expected() -> None:
    metrics.expect_agents(["agent-at-zero"])
    for effect in ("allow", "deny", "require_approval"):
        assert sample("warden_agent_decisions_total", agent="agent-at-zero", effect=effect) == 0
    metrics.count_agent_decision("agent-first-seen", "deny")
    assert sample("warden_agent_decisions_total", agent="agent-first-seen", effect="allow") == 0
    assert sample("warden_agent_decisions_total", agent="agent-first-seen", effect="deny") == 1


def test_error_codes_are_every_classs_code() -> None:
    assert {"audit_unavailable", "overloaded", "route_not_governed", "internal_error"} <= (
        error_codes()
    )


def test_reserved_values_keep_their_label_once_the_budget_is_spent() -> None:
    # One model answer with 500 made-up tool names sent every later new tool, for
    # every agent, to _other: the config's tools are admitted at start.
    metrics.reserve("reserved-kind", ["search_kb"])
    for i in range(metrics.MAX_LABEL_VALUES):
        metrics.bounded("reserved-kind", f"made_up_{i}")
    assert metrics.bounded("reserved-kind", "search_kb") == "search_kb"
    assert metrics.bounded("reserved-kind", "issue_refund") == metrics.OTHER
