"""The shipped alerting rules and dashboard, checked with Prometheus's own ``promtool``.

``helm/warden/files/alerts.yaml`` is the one source of the rules (the Helm
chart renders it into a PrometheusRule); ``tests/data/alerts_test.yaml`` holds
their unit tests. The dashboard's queries are checked as PromQL by promtool
too, and every Warden metric the two name must exist.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import warden.server  # noqa: F401 - registers every metric Warden exports
from tests import prometheus as prom
from warden.approvals.model import ApprovalSettings
from warden.approvals.service import Approvals
from warden.audit.log import AuditLog
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import AuditConfig, BudgetsConfig
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
from warden.monitor.live import _LEVEL_VALUE
from warden.monitor.psi import Level
from warden.ops import metrics
from warden.state import StateStore

PROMTOOL = prom.tool("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=prom.MISSING)

_METRIC = re.compile(r"\bwarden_[a-z0-9_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(  # noqa: S603 - fixed arguments
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


def dashboard_queries() -> list[str]:
    dashboard = json.loads(prom.DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]


def as_promql(grafana_expr: str) -> str:
    """A dashboard query with Grafana's variables filled in as Grafana would."""
    return grafana_expr.replace("$__rate_interval", "5m").replace("$agent", ".*")


def exported_metric_names() -> set[str]:
    """Every sample name Warden's registry can produce, labelled children or not."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }
    for family in REGISTRY.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


# -- promtool ------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", str(prom.ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_the_rule_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(prom.ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    # The check above can fail: a rule with a PromQL error is refused.
    rules = prom.load_rules()
    rules["groups"][0]["rules"][0]["expr"] = "sum by (agent) (rate(warden_decisions_total[10m])"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(broken)).returncode != 0


@needs_promtool
def test_the_end_to_end_variant_differs_only_in_durations(tmp_path: Path) -> None:
    rules = prom.load_rules()
    fast = prom.fast_variant(rules, window="1m", hold="2s")
    variant = tmp_path / "fast.yaml"
    variant.write_text(yaml.safe_dump(fast))
    assert promtool("check", "rules", str(variant)).returncode == 0
    for shipped, changed in zip(prom.alerting_rules(rules), prom.alerting_rules(fast), strict=True):
        assert {k: v for k, v in shipped.items() if k not in ("expr", "for")} == {
            k: v for k, v in changed.items() if k not in ("expr", "for")
        }
        assert re.sub(r"\[\d+[smhd]\]", "[]", shipped["expr"]) == re.sub(
            r"\[\d+[smhd]\]", "[]", changed["expr"]
        )


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_promql(q)}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    file = tmp_path / "dashboard_rules.yaml"
    file.write_text(yaml.safe_dump(as_rules))
    done = promtool("check", "rules", str(file))
    assert done.returncode == 0, done.stdout + done.stderr


# -- content -------------------------------------------------------------------------------


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    doc = prom.OPERATIONS_DOC.read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in doc.splitlines()
        if line.startswith("#")
    }
    alerts = prom.alerting_rules(prom.load_rules())
    assert len(alerts) >= 10
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has no section for {name}"


def test_the_alerts_cover_what_operators_asked_for() -> None:
    names = {r["alert"] for r in prom.alerting_rules(prom.load_rules())}
    assert {
        "WardenDenySpike",
        "WardenApprovalsWaiting",
        "WardenPolicyWorkerRestarts",
        "WardenPolicyFallbacks",
        "WardenAuditNotWritable",
        "WardenAuditWriteErrors",
        "WardenSpendNearCap",
        "WardenKillSwitchActive",
        "WardenNotReady",
        "WardenAgentDrift",
        "WardenChallengerDiverges",
    } <= names


def test_the_drift_alert_fires_at_the_gauges_value_for_act() -> None:
    (rule,) = [
        r for r in prom.alerting_rules(prom.load_rules()) if r["alert"] == "WardenAgentDrift"
    ]
    assert rule["expr"].strip().endswith(f"(warden_drift_level) == {_LEVEL_VALUE[Level.ACT]}")


def test_every_alert_has_a_unit_test() -> None:
    tests: Any = yaml.safe_load(prom.ALERTS_TEST.read_text(encoding="utf-8"))
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", ())
        if case.get("exp_alerts")
    }
    names = {r["alert"] for r in prom.alerting_rules(prom.load_rules())}
    assert names - tested == set(), "alerts never shown firing in tests/data/alerts_test.yaml"


def test_every_metric_the_rules_and_dashboard_name_exists() -> None:
    exported = exported_metric_names()
    named: set[str] = set()
    for rule in prom.alerting_rules(prom.load_rules()):
        named |= set(_METRIC.findall(rule["expr"]))
    for query in dashboard_queries():
        named |= set(_METRIC.findall(query))
    assert named, "no Warden metric named"
    assert named - exported == set()


def test_the_dashboard_is_a_grafana_dashboard_with_unique_panels() -> None:
    dashboard = json.loads(prom.DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"]
    assert dashboard["title"] == "Warden"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("decisions", "latency", "approvals", "spend", "policy"):
        assert topic in titles
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            assert panel["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip()


# -- the metrics the alerts read ---------------------------------------------------------


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_readiness_becomes_gauges_and_restarts_a_counter_that_never_goes_back() -> None:
    before = value("warden_policy_worker_restarts_total") or 0.0
    metrics.observe_readiness(True, {"audit": {"writable": True}, "policy": {"worker_restarts": 0}})
    assert value("warden_ready") == 1
    assert value("warden_audit_writable") == 1
    metrics.observe_readiness(
        False, {"audit": {"writable": False}, "policy": {"worker_restarts": 3}}
    )
    assert value("warden_ready") == 0
    assert value("warden_audit_writable") == 0
    assert value("warden_policy_worker_restarts_total") == before + 3
    # A bundle reload starts the engine's count again: the counter still only grows.
    metrics.observe_readiness(True, {"audit": {"writable": True}, "policy": {"worker_restarts": 1}})
    assert value("warden_policy_worker_restarts_total") == before + 4
    metrics.observe_readiness(True, {"audit": {"writable": True}, "policy": {"worker_restarts": 0}})


@pytest.fixture
async def approvals(tmp_path: Path) -> AsyncIterator[Approvals]:
    audit = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    service = await Approvals.open(
        f"sqlite:///{tmp_path}/state.db", audit, ApprovalSettings(sweep_interval_s=60)
    )
    try:
        yield service
    finally:
        await service.close()
        await audit.close()


async def test_the_oldest_pending_approval_ages_until_it_is_decided(approvals: Approvals) -> None:
    act = Action(
        action_id=new_id("act"),
        agent=Agent("refunds-bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool="issue_refund",
        arguments={"order_id": "A-1", "amount": 900},
    )
    held = Decision(new_id("dec"), Effect.REQUIRE_APPROVAL, ("big",), Mode.ENFORCE, "policy")
    approval = await approvals.request(act, held, mode="defer")
    first = value("warden_approvals_oldest_pending_age_seconds")
    assert first is not None
    assert first > 0
    assert (value("warden_approvals_oldest_pending_age_seconds") or 0) >= first  # grows
    await approvals.cancel_all_for(reason="test over")
    assert (await approvals.get(approval.id)) is not None
    assert value("warden_approvals_oldest_pending_age_seconds") == 0


async def test_each_cap_publishes_its_limit(tmp_path: Path) -> None:
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        BudgetGuard(
            store,
            BudgetsConfig.model_validate(
                {
                    "llm": {"limit_usd": 50, "window": "day"},
                    "caps": [
                        {
                            "name": "refunds_test",
                            "tool": "issue_refund",
                            "value": "amount",
                            "limit": 500,
                            "window": "month",
                        }
                    ],
                }
            ),
            PriceTable.shipped(),
            {"openai": "openai"},
        )
    finally:
        await store.close()
    assert value("warden_budget_limit", cap="llm", window="day") == 50
    assert value("warden_budget_limit", cap="refunds_test", window="month") == 500
