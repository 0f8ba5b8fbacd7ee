"""The budget guard in the pipeline: reserve, expose to the policy, release, settle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY

from warden.budgets.caps import window_key
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import BudgetsConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    Outcome,
    RequestMeta,
    Stage,
    Usage,
    new_id,
)
from warden.pipeline import GuardContext, Pipeline
from warden.state import StateStore

NOW = datetime(2026, 11, 27, 23, 30, tzinfo=ZoneInfo("UTC")).timestamp()
CAPS: dict[str, Any] = {
    "caps": [
        {
            "name": "refunds",
            "tool": "issue_refund",
            "value": "amount",
            "per": ["agent", "customer"],
            "window": "day",
            "limit": 500,
            "over": "deny",
        },
        {
            "name": "credits",
            "tool": "apply_credit",
            "value": "amount",
            "per": "customer",
            "window": "month",
            "limit": 100,
            "over": "require_approval",
        },
    ],
    "llm": {"limit_usd": 1.0, "window": "day"},
}


class Audit:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    async def record_decision(self, action: Action, decision: Decision) -> None:
        self.decisions.append(decision)

    async def record_outcome(
        self, action: Action, decision_id: str, outcome: Outcome, *, cost: float | None = None
    ) -> None:
        pass


class Policy:
    """Stands in for the policy guard: remembers input.budget and answers as told."""

    name = "policy"

    def __init__(self) -> None:
        self.seen: list[Mapping[str, Any]] = []
        self.effect = Effect.ALLOW

    async def check(self, action: Action, ctx: GuardContext) -> Decision:
        self.seen.append(ctx.budget)
        return Decision(new_id("dec"), self.effect, ("policy says so",), ctx.mode, "policy")


def tool(name: str, agent: str = "bot", **args: Any) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent(agent),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool=name,
        arguments=args,
        context={"customer_id": "C-ctx"},
    )


def llm_call(model: str = "gpt-4o-mini") -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent("bot"),
        kind=ActionKind.LLM_CALL,
        protocol="openai.chat",
        stage=Stage.EXECUTED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        model=model,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    s = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    yield s
    await s.close()


def build(
    store: StateStore, config: Mapping[str, Any] = CAPS, mode: Mode = Mode.ENFORCE
) -> tuple[Pipeline, BudgetGuard, Policy]:
    guard = BudgetGuard(
        store,
        BudgetsConfig.model_validate(config),
        PriceTable.shipped(),
        {"openai": "openai"},
        clock=lambda: NOW,
    )
    policy = Policy()
    pipeline = Pipeline(
        [guard, policy], Audit(), mode_for=lambda _: mode, risk_of=lambda _: "write"
    )
    return pipeline, guard, policy


async def spent(store: StateStore, counter: str, window: str, subject: str) -> tuple[float, float]:
    (c,) = await store.counters([(counter, window, subject)])
    return c.spent, c.reserved


DAY = "day:2026-11-27"


async def test_policy_sees_counters_and_allowed_value_is_reserved_then_settled(
    store: StateStore,
) -> None:
    pipeline, _, policy = build(store)
    first = tool("issue_refund", order_id="A-1", amount=120, customer_id="C-1")
    assert (await pipeline.decide(first)).effect is Effect.ALLOW
    assert policy.seen[-1] == {
        "refunds": {
            "day": {
                "agent": {"spent": 0.0, "reserved": 0.0, "limit": 500.0},
                "customer": {"spent": 0.0, "reserved": 0.0, "limit": 500.0},
            }
        }
    }
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 120.0)
    await pipeline.outcome(first, "dec", Outcome(result="refunded"))
    assert await spent(store, "refunds", DAY, "agent:bot") == (120.0, 0.0)
    # The argument names the customer; the context's customer is not charged.
    assert await spent(store, "refunds", DAY, "customer:C-1") == (120.0, 0.0)
    assert await spent(store, "refunds", DAY, "customer:C-ctx") == (0.0, 0.0)

    await pipeline.decide(tool("issue_refund", order_id="A-2", amount=5, customer_id="C-1"))
    assert policy.seen[-1]["refunds"]["day"]["agent"] == {
        "spent": 120.0,
        "reserved": 0.0,
        "limit": 500.0,
    }


async def test_a_policy_denial_releases_the_reservation(store: StateStore) -> None:
    pipeline, _, policy = build(store)
    policy.effect = Effect.DENY
    await pipeline.decide(tool("issue_refund", order_id="A-1", amount=120))
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)


async def test_a_failed_tool_call_releases_on_its_outcome(store: StateStore) -> None:
    pipeline, _, _ = build(store)
    action = tool("issue_refund", order_id="A-1", amount=120)
    await pipeline.decide(action)
    await pipeline.outcome(action, "dec", Outcome(result="card declined", is_error=True))
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)


async def test_over_the_cap_is_denied_with_a_reason_naming_cap_and_window(
    store: StateStore,
) -> None:
    pipeline, _, policy = build(store)
    action = tool("issue_refund", order_id="A-1", amount=480)
    await pipeline.decide(action)
    await pipeline.outcome(action, "dec", Outcome(result="ok"))
    decision = await pipeline.decide(tool("issue_refund", order_id="A-2", amount=50))
    assert decision.effect is Effect.DENY
    assert decision.guard == "budget"
    assert decision.reasons[0] == (
        "refunds cap for this agent: 480.00 of 500.00 USD used today; "
        "this issue_refund of 50.00 would pass it"
    )
    assert len(policy.seen) == 1  # the policy never saw the second one
    assert await spent(store, "refunds", DAY, "agent:bot") == (480.0, 0.0)


async def test_a_cap_can_require_approval_instead(store: StateStore) -> None:
    pipeline, _, _ = build(store)
    ok = await pipeline.decide(tool("apply_credit", customer_id="C-9", amount=80))
    assert ok.effect is Effect.ALLOW
    held = await pipeline.decide(tool("apply_credit", customer_id="C-9", amount=30))
    assert held.effect is Effect.REQUIRE_APPROVAL
    assert "credits cap for customer C-9" in held.reason
    assert "this month" in held.reason
    assert "80.00 of it reserved" in held.reason


async def test_values_that_cannot_be_counted_are_denied(store: StateStore) -> None:
    pipeline, _, _ = build(store)
    for args in ({"amount": "lots"}, {"amount": -5}, {"amount": 5, "currency": "EUR"}, {}):
        decision = await pipeline.decide(tool("issue_refund", order_id="A-1", **args))
        assert decision.effect is Effect.DENY, args
        assert decision.guard == "budget"


async def test_observe_mode_counts_over_the_cap_but_lets_it_through(store: StateStore) -> None:
    pipeline, _, _ = build(store, mode=Mode.OBSERVE)
    decision = await pipeline.decide(tool("issue_refund", order_id="A-1", amount=600))
    assert decision.effect is Effect.DENY
    assert decision.enforced is Effect.ALLOW
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 600.0)


async def test_llm_spend_is_settled_from_usage_and_capped(store: StateStore) -> None:
    pipeline, _, policy = build(store)
    call = llm_call("gpt-4o-mini")
    assert (await pipeline.decide(call)).effect is Effect.ALLOW
    assert policy.seen[-1]["llm"]["day"]["agent"]["limit"] == 1.0
    await pipeline.outcome(call, "dec", Outcome(status=200, usage=Usage(1_000_000, 1_000_000)))
    used, held = await spent(store, "llm", DAY, "agent:bot")
    assert used == pytest.approx(0.75)
    assert held == 0.0
    # An unknown model is priced at the default (15 + 75 per million): over the cap.
    other = llm_call("house-model")
    labels = {"provider": "openai", "model": "house-model"}
    unknown = REGISTRY.get_sample_value("warden_price_unknown_model_total", labels) or 0.0
    await pipeline.decide(other)
    await pipeline.outcome(other, "dec", Outcome(status=200, usage=Usage(20_000, 0)))
    assert REGISTRY.get_sample_value("warden_price_unknown_model_total", labels) == unknown + 1
    denied = await pipeline.decide(llm_call())
    assert denied.effect is Effect.DENY
    assert denied.reason == (
        "LLM spend cap for this agent: 1.05 of 1.00 USD used today; this model call does not fit"
    )


async def test_a_failed_upstream_call_costs_nothing(store: StateStore) -> None:
    pipeline, _, _ = build(store, {"llm": {"limit_usd": 1.0, "estimate_usd": 0.25}})
    call = llm_call()
    await pipeline.decide(call)
    assert await spent(store, "llm", DAY, "agent:bot") == (0.0, 0.25)
    await pipeline.outcome(call, "dec", Outcome(error="upstream_timeout"))
    assert await spent(store, "llm", DAY, "agent:bot") == (0.0, 0.0)


async def test_fifty_concurrent_actions_against_room_for_ten(store: StateStore) -> None:
    pipeline, _, _ = build(store)
    decisions = await asyncio.gather(
        *(pipeline.decide(tool("issue_refund", order_id=f"A-{i}", amount=50)) for i in range(50))
    )
    assert sum(d.effect is Effect.ALLOW for d in decisions) == 10
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 500.0)


async def test_actions_without_caps_touch_no_state(store: StateStore) -> None:
    pipeline, guard, policy = build(store, {})
    await pipeline.decide(tool("search_kb", query="x"))
    await pipeline.decide(llm_call())
    assert policy.seen == [{}, {}]
    assert not guard._held


def test_windows_are_calendar_windows_in_the_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    late = datetime(2026, 11, 27, 23, 30, tzinfo=ZoneInfo("UTC")).astimezone(paris)
    assert window_key("day", late) == "day:2026-11-28"
    assert window_key("month", late) == "month:2026-11"
    assert window_key("hour", late) == "hour:2026-11-28T00+0100"
    with pytest.raises(ValueError, match="window"):
        window_key("week", late)
