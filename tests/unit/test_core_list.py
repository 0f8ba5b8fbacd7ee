"""``Governor.hidden_tools``: which tools an MCP ``tools/list`` answer leaves out for an agent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from warden.config import PolicyConfig
from warden.core import Governor
from warden.errors import Overloaded
from warden.killswitch import KillSwitches, KillSwitchGuard, Scope
from warden.model import Action, Agent, Decision, Effect, Mode, Outcome, Stage, new_id
from warden.pipeline import Guard, GuardContext, Pipeline
from warden.policy.engine import PolicyEngine, PolicyResult
from warden.policy.guard import PolicyGuard
from warden.policy.metrics import PolicyMetrics
from warden.state import StateStore
from warden.testing.memory_audit import MemoryAudit

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "customer-support"
AGENT = Agent("support-triage", "v1")
LISTED = ["search_kb", "issue_refund", "close_account", "export_customers", "delete_database"]


def hidden_count(upstream: str) -> float:
    value = REGISTRY.get_sample_value("warden_mcp_tools_hidden_total", {"upstream": upstream})
    return value or 0.0


class CacheCount(PolicyMetrics):
    """Counts the engine's cache lookups by result."""

    def __init__(self) -> None:
        self.lookups: dict[str, int] = {}

    def cache(self, result: str) -> None:
        self.lookups[result] = self.lookups.get(result, 0) + 1


class Scripted:
    """A policy engine that answers every input with one result, and keeps the inputs."""

    def __init__(self, result: PolicyResult | Exception) -> None:
        self.result = result
        self.revision = "r1"
        self.seen: list[Mapping[str, Any]] = []

    async def evaluate(self, doc: Mapping[str, Any]) -> PolicyResult:
        self.seen.append(doc)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class Reserves:
    """A guard that holds something per action, as the budget guard does."""

    name = "budget"

    def __init__(self) -> None:
        self.asked = 0

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        return (await self.admit(action, ctx))[0]

    async def admit(
        self, action: Action, ctx: GuardContext
    ) -> tuple[Decision | None, GuardContext]:
        self.asked += 1
        return Decision(new_id("dec"), Effect.DENY, ("cap",), ctx.mode, "budget"), ctx

    async def decided(self, action: Action, decision: Decision | None) -> None:
        return None

    async def settle(
        self, action: Action, outcome: Outcome, *, trusted: bool = False
    ) -> float | None:
        return None


def governor(guards: list[Any], audit: MemoryAudit, mode: Mode = Mode.ENFORCE) -> Governor:
    pipeline = Pipeline(
        guards, audit, mode_for=lambda _agent: mode, risk_of=lambda _tool: "read_only"
    )
    return Governor(pipeline)


def scripted_guard(result: PolicyResult | Exception) -> tuple[PolicyGuard, Scripted]:
    engine = Scripted(result)
    guard = PolicyGuard(engine, PolicyConfig(), metrics=PolicyMetrics())  # type: ignore[arg-type]
    return guard, engine


@pytest.fixture
async def shipped() -> AsyncIterator[tuple[PolicyEngine, CacheCount]]:
    counts = CacheCount()
    config = PolicyConfig(bundles=(str(SHIPPED),), workers=1, watch=False, deadline_ms=5000)
    engine = await PolicyEngine.start(config, metrics=counts)
    try:
        yield engine, counts
    finally:
        await engine.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    state = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        yield state
    finally:
        await state.close()


async def test_the_shipped_policy_hides_what_it_denies_by_name_and_records_nothing(
    shipped: tuple[PolicyEngine, CacheCount],
) -> None:
    engine, counts = shipped
    audit = MemoryAudit()
    core = governor([PolicyGuard(engine, engine.config)], audit)
    before = hidden_count("support-tools")
    hidden = await core.hidden_tools(AGENT, "support-tools", LISTED)
    # A refund can be allowed or held depending on its amount, a closure can be
    # approved: only what no arguments could allow is hidden.
    assert hidden == {"export_customers", "delete_database"}
    assert audit.decisions == []
    assert audit.outcomes == []
    assert hidden_count("support-tools") - before == 2
    misses = counts.lookups.get("miss", 0)
    again = await core.hidden_tools(AGENT, "support-tools", LISTED)
    assert again == hidden
    assert counts.lookups.get("miss", 0) == misses  # the second listing is answered by the cache
    assert counts.lookups.get("hit", 0) >= len(LISTED)


async def test_the_policy_sees_a_list_stage_tool_call_by_name_alone() -> None:
    guard, engine = scripted_guard(PolicyResult(effect=Effect.ALLOW, reasons=("ok",)))
    core = governor([guard], MemoryAudit())
    await core.hidden_tools(AGENT, "crm", ["search_kb", "search_kb"])
    (doc,) = engine.seen  # a name listed twice is asked about once
    action = doc["action"]
    assert action["stage"] == Stage.LIST.value == "list"
    assert action["kind"] == "tool_call"
    assert action["protocol"] == "mcp"
    assert action["tool"] == "search_kb"
    assert action["arguments"] is None
    assert action["upstream"] == "crm"
    assert action["method"] == "tools/list"
    assert doc["agent"]["id"] == "support-triage"


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (PolicyResult(effect=Effect.REQUIRE_APPROVAL, reasons=("ask",)), "approval keeps a tool"),
        (PolicyResult(effect=Effect.ALLOW, reasons=("ok",)), "allow keeps a tool"),
        (PolicyResult(effect=None), "a policy that says nothing keeps it"),
        (PolicyResult(effect=None, error="policy_timeout", input_fault=True), "a timeout"),
        (PolicyResult(effect=None, error="policy_not_ready"), "no bundle active"),
        (Overloaded("busy", retry_after_s=1), "a busy engine"),
    ],
)
async def test_only_a_clear_deny_hides_a_tool(result: PolicyResult | Exception, why: str) -> None:
    guard, _ = scripted_guard(result)
    # The configured default and fallback are deny: neither may hide a tool.
    core = governor([guard], MemoryAudit())
    assert await core.hidden_tools(AGENT, "crm", ["issue_refund"]) == frozenset(), why


async def test_a_deny_in_observe_mode_hides_nothing() -> None:
    guard, _ = scripted_guard(PolicyResult(effect=Effect.DENY, reasons=("no",)))
    assert await governor([guard], MemoryAudit()).hidden_tools(AGENT, "crm", ["x"]) == {"x"}
    observed = governor([guard], MemoryAudit(), mode=Mode.OBSERVE)
    assert await observed.hidden_tools(AGENT, "crm", ["x"]) == frozenset()
    rule_observe = PolicyResult(effect=Effect.DENY, reasons=("no",), mode=Mode.OBSERVE)
    guard, _ = scripted_guard(rule_observe)
    assert await governor([guard], MemoryAudit()).hidden_tools(AGENT, "crm", ["x"]) == set()


async def test_guards_that_reserve_are_not_asked() -> None:
    budget = Reserves()
    guard, _ = scripted_guard(PolicyResult(effect=Effect.ALLOW, reasons=("ok",)))
    core = governor([budget, guard], MemoryAudit())
    assert await core.hidden_tools(AGENT, "crm", ["issue_refund"]) == frozenset()
    assert budget.asked == 0


async def test_a_kill_switch_hides_what_it_covers(store: StateStore) -> None:
    switches = KillSwitches(store, None)
    await switches.start()
    try:
        guard, _ = scripted_guard(PolicyResult(effect=Effect.ALLOW, reasons=("ok",)))
        guards: list[Guard] = [KillSwitchGuard(switches), guard]
        core = governor(guards, MemoryAudit())
        names = ["search_kb", "issue_refund"]
        assert await core.hidden_tools(AGENT, "crm", names) == frozenset()
        await switches.set(Scope.TOOL, "issue_refund", "incident 7", "oncall")
        assert await core.hidden_tools(AGENT, "crm", names) == {"issue_refund"}
        await switches.set(Scope.UPSTREAM, "crm", "incident 8", "oncall")
        assert await core.hidden_tools(AGENT, "crm", names) == set(names)
        assert await core.hidden_tools(AGENT, "other", names) == {"issue_refund"}
        other_agent = Agent("faq-bot")
        await switches.set(Scope.AGENT, "faq-bot", "incident 9", "oncall")
        assert await core.hidden_tools(other_agent, "other", names) == set(names)
    finally:
        await switches.close()


async def test_an_empty_listing_asks_nothing() -> None:
    guard, engine = scripted_guard(PolicyResult(effect=Effect.DENY, reasons=("no",)))
    assert await governor([guard], MemoryAudit()).hidden_tools(AGENT, "crm", []) == frozenset()
    assert engine.seen == []
