"""The budget guard in the pipeline: reserve, expose to the policy, release, settle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from warden.budgets.caps import window_key
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import BudgetsConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    CallSize,
    Decision,
    Effect,
    Mode,
    Obligations,
    Outcome,
    RequestMeta,
    Stage,
    Usage,
    new_id,
)
from warden.pipeline import AuditSink, GuardContext, Pipeline
from warden.pointers import pointer_get
from warden.protocols import mcp
from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter
from warden.state import StateStore

NOW = datetime(2026, 11, 27, 23, 30, tzinfo=ZoneInfo("UTC")).timestamp()
REFUNDS: dict[str, Any] = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent", "customer"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}
CAPS: dict[str, Any] = {
    "caps": [
        REFUNDS,
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
        self.obligations = Obligations()
        self.mode: Mode | None = None  # a rule's own "mode", else the agent's

    async def check(self, action: Action, ctx: GuardContext) -> Decision:
        self.seen.append(ctx.budget)
        return Decision(
            new_id("dec"),
            self.effect,
            ("policy says so",),
            self.mode or ctx.mode,
            "policy",
            obligations=self.obligations,
        )


def tool(
    name: str,
    agent: str = "bot",
    *,
    context: Mapping[str, Any] | None = None,
    kind: ActionKind = ActionKind.TOOL_CALL,
    **args: Any,
) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent(agent),
        kind=kind,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool=name,
        arguments=args,
        context={"customer_id": "C-ctx"} if context is None else context,
    )


def llm_call(model: str = "gpt-4o-mini", size: CallSize | None = None) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent("bot"),
        kind=ActionKind.LLM_CALL,
        protocol="openai.chat",
        stage=Stage.EXECUTED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        model=model,
        size=size,
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
        [guard, policy],
        cast("AuditSink", Audit()),  # a partial sink: this pipeline only records decisions
        mode_for=lambda _: mode,
        risk_of=lambda _: "write",
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
    assert await spent(store, "refunds", DAY, "customer:c-1") == (120.0, 0.0)
    assert await spent(store, "refunds", DAY, "customer:c-ctx") == (0.0, 0.0)

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


async def test_the_agents_own_error_report_does_not_release_a_delivered_call(
    store: StateStore,
) -> None:
    pipeline, _, _ = build(store)
    action = tool("issue_refund", order_id="A-1", amount=120)
    await pipeline.decide(action)
    await pipeline.outcome(action, "dec", Outcome(result="card declined", is_error=True))
    assert await spent(store, "refunds", DAY, "agent:bot") == (120.0, 0.0)


async def test_a_trusted_failure_releases_a_delivered_call(store: StateStore) -> None:
    pipeline, _, _ = build(store)
    failed = tool("issue_refund", order_id="A-1", amount=120)
    await pipeline.decide(failed)
    await pipeline.outcome(failed, "dec", Outcome(status=502, error="declined"), trusted=True)
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)
    # A trusted success is spent like any other.
    done = tool("issue_refund", order_id="A-2", amount=70)
    await pipeline.decide(done)
    await pipeline.outcome(done, "dec", Outcome(status=200), trusted=True)
    assert await spent(store, "refunds", DAY, "agent:bot") == (70.0, 0.0)


async def test_a_refund_a_server_goes_on_with_as_a_task_stays_spent(store: StateStore) -> None:
    # The MCP server's answer is a task handle (a shape a client extension claims): the
    # refund runs on there, so its reservation is spent, never released as a failure.
    pipeline, _, _ = build(store)
    action = tool("issue_refund", order_id="A-1", amount=120)
    await pipeline.decide(action)
    task = {"resultType": "task", "task": {"taskId": "t1", "status": "working"}}
    outcome = mcp.result_outcome({"jsonrpc": "2.0", "id": 1, "result": task})
    await pipeline.outcome(action, "dec", outcome, trusted=True)  # as both MCP doors do
    assert await spent(store, "refunds", DAY, "agent:bot") == (120.0, 0.0)


async def test_an_outcome_after_a_restart_settles_through_the_store(store: StateStore) -> None:
    # A guard that did not make the reservation (a restarted process, another
    # sidecar on the same store) still settles it when the outcome comes.
    pipeline, _, _ = build(store)
    failed = tool("issue_refund", order_id="A-1", amount=120)
    done = tool("issue_refund", order_id="A-2", amount=70)
    await pipeline.decide(failed)
    await pipeline.decide(done)
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 190.0)
    restarted, _, _ = build(store)
    await restarted.outcome(failed, "dec", Outcome(error="declined"), trusted=True)
    await restarted.outcome(done, "dec", Outcome(status=200), trusted=True)
    assert await spent(store, "refunds", DAY, "agent:bot") == (70.0, 0.0)
    # Settled once: a repeated report changes nothing.
    await restarted.outcome(done, "dec", Outcome(error="declined"), trusted=True)
    assert await spent(store, "refunds", DAY, "agent:bot") == (70.0, 0.0)


async def test_operators_may_opt_in_to_trusting_agents_results(store: StateStore) -> None:
    pipeline, _, _ = build(store, {**CAPS, "trust_agent_results": True})
    action = tool("issue_refund", order_id="A-1", amount=120)
    await pipeline.decide(action)
    await pipeline.outcome(action, "dec", Outcome(result="card declined", is_error=True))
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)


async def test_five_reported_failures_of_100_against_250_pass_twice(store: StateStore) -> None:
    pipeline, _, _ = build(store, {"caps": [{**REFUNDS, "limit": 250}]})
    passed = 0
    for i in range(5):
        action = tool("issue_refund", order_id=f"A-{i}", amount=100)
        if (await pipeline.decide(action)).effect is Effect.ALLOW:
            passed += 1
            await pipeline.outcome(action, "dec", Outcome(result="error", is_error=True))
    assert passed == 2
    assert await spent(store, "refunds", DAY, "agent:bot") == (200.0, 0.0)


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
    assert "credits cap for this customer" in held.reason
    assert "C-9" not in held.reason  # reasons are not sealed: no customer id in them
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


async def test_in_observe_mode_a_rule_that_enforces_still_applies_past_the_cap(
    store: StateStore,
) -> None:
    # The cap's denial acts on nothing in observe mode: it ended the guards' loop, so
    # a policy rule's own "mode": "enforce" never ran, and once a window's cap was
    # passed every refund the rule denies went out.
    pipeline, _, policy = build(store, mode=Mode.OBSERVE)
    policy.effect, policy.mode = Effect.DENY, Mode.ENFORCE
    decision = await pipeline.decide(tool("issue_refund", order_id="A-1", amount=600))
    assert (decision.effect, decision.enforced, decision.guard) == (
        Effect.DENY,
        Effect.DENY,
        "policy",
    )
    # A cap that cannot count the call gives the policy no budget document: a rule that
    # enforces decided blind (the agent picks the currency), so the denial stands.
    policy.effect, policy.mode = Effect.ALLOW, Mode.ENFORCE
    euros = tool("issue_refund", order_id="A-3", amount=450, currency="eur")
    decision = await pipeline.decide(euros)
    assert (decision.enforced, decision.guard) == (Effect.DENY, "budget")
    assert policy.seen[-1] == {}
    # So does a call naming no customer for a per-customer cap (no customer counter).
    strict, _, blind = build(
        store, {"caps": [{**REFUNDS, "customer": {"missing": "deny"}}]}, mode=Mode.OBSERVE
    )
    blind.effect, blind.mode = Effect.ALLOW, Mode.ENFORCE
    nameless = await strict.decide(tool("issue_refund", order_id="A-4", amount=5, context={}))
    assert (nameless.enforced, nameless.guard) == (Effect.DENY, "budget")
    # A rule that lets it through: the cap's would-be denial is what is recorded.
    policy.effect, policy.mode = Effect.ALLOW, None
    decision = await pipeline.decide(tool("issue_refund", order_id="A-2", amount=600))
    assert (decision.effect, decision.enforced, decision.guard) == (
        Effect.DENY,
        Effect.ALLOW,
        "budget",
    )


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
    # Seen by Warden (the proxy): released. The agent's word alone would not be.
    await pipeline.outcome(call, "dec", Outcome(error="upstream_timeout"), trusted=True)
    assert await spent(store, "llm", DAY, "agent:bot") == (0.0, 0.0)


async def test_an_answered_call_whose_usage_never_came_is_spent_at_its_estimate(
    store: StateStore,
) -> None:
    # The agent hung up mid-stream (or asked for a background response): the
    # provider billed it, and the estimate stays spent instead of going back to 0.
    pipeline, _, _ = build(store, {"llm": {"limit_usd": 1.0, "estimate_usd": 0.25}})
    call = llm_call()
    await pipeline.decide(call)
    await pipeline.outcome(
        call, "dec", Outcome(status=200, error="client_disconnected"), trusted=True
    )
    assert await spent(store, "llm", DAY, "agent:bot") == (0.25, 0.0)
    refused = llm_call()
    await pipeline.decide(refused)
    await pipeline.outcome(
        refused, "dec", Outcome(status=429, error="upstream_error"), trusted=True
    )
    assert await spent(store, "llm", DAY, "agent:bot") == (0.25, 0.0)


async def test_model_calls_in_flight_together_hold_what_each_can_cost(store: StateStore) -> None:
    # Thirty calls at once, each able to cost 3 USD (o1 at 60 USD per million
    # output tokens, 50,000 of them), against a cap of 5: held at 0, all thirty
    # would pass, and 90 USD be spent.
    pipeline, _, _ = build(store, {"llm": {"limit_usd": 5.0}})
    big = CallSize(input_bytes=0, max_output_tokens=50_000)
    calls = [llm_call("o1", big) for _ in range(30)]
    decisions = await asyncio.gather(*(pipeline.decide(call) for call in calls))
    assert sum(d.effect is Effect.ALLOW for d in decisions) == 1
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx((0.0, 3.0))
    denied = next(d for d in decisions if d.effect is Effect.DENY)
    assert "this model call of 3.00 would pass it" in denied.reason
    # Settled to what it cost, the room comes back.
    allowed = calls[[d.effect for d in decisions].index(Effect.ALLOW)]
    await pipeline.outcome(allowed, "dec", Outcome(status=200, usage=Usage(10, 100)))
    used, held = await spent(store, "llm", DAY, "agent:bot")
    assert (used, held) == pytest.approx(((10 * 15 + 100 * 60) / 1e6, 0.0))


async def test_an_answer_cut_short_is_spent_at_its_hold(store: StateStore) -> None:
    # The agent hangs up mid-stream: no final usage reached Warden (the stream rewriters
    # report only final counts), and the provider bills what it generated: the hold stays.
    pipeline, _, _ = build(store, {"llm": {"limit_usd": 100.0}})
    size = CallSize(input_bytes=0, max_output_tokens=12_500)
    cut = llm_call("o1", size)
    await pipeline.decide(cut)
    seen = Outcome(status=200, error="client_disconnected")
    await pipeline.outcome(cut, "dec", seen, trusted=True)
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx((0.75, 0.0))
    # With its final usage (read to its end, whoever hung up after), it costs that.
    whole = llm_call("o1", size)
    await pipeline.decide(whole)
    read = Outcome(status=200, error="client_disconnected", usage=Usage(10, 1))
    await pipeline.outcome(whole, "dec", read, trusted=True)
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx(
        (0.75 + (10 * 15 + 60) / 1e6, 0.0)
    )


async def test_a_model_call_that_may_have_been_billed_stays_spent(store: StateStore) -> None:
    # A timeout or an agent gone before the answer's headers: the provider may have
    # generated (and billed) it all. Only an answer's error status, or a connection
    # never made, releases (the doors pass trusted only then).
    pipeline, _, _ = build(store, {"llm": {"limit_usd": 100.0}})
    size = CallSize(input_bytes=0, max_output_tokens=12_500)
    timed_out = llm_call("o1", size)
    await pipeline.decide(timed_out)
    await pipeline.outcome(timed_out, "dec", Outcome(error="upstream_timeout"))
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx((0.75, 0.0))
    refused = llm_call("o1", size)
    await pipeline.decide(refused)
    await pipeline.outcome(
        refused, "dec", Outcome(status=529, error="upstream_error"), trusted=True
    )
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx((0.75, 0.0))


async def test_a_model_call_is_held_at_its_input_output_and_answers(store: StateStore) -> None:
    pipeline, _, _ = build(store, {"llm": {"limit_usd": 100.0, "unbounded_output_tokens": 1000}})
    # gpt-4o-mini: 0.15 USD per million input tokens, 0.60 per million output.
    sized = llm_call(size=CallSize(input_bytes=4_000, max_output_tokens=500, choices=3))
    await pipeline.decide(sized)
    held = (1_000 * 0.15 + 500 * 3 * 0.60) / 1e6
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx((0.0, held))
    unbounded = llm_call(size=CallSize(input_bytes=0))
    await pipeline.decide(unbounded)
    more = held + 1_000 * 0.60 / 1e6
    assert await spent(store, "llm", DAY, "agent:bot") == pytest.approx((0.0, more))


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


# -- which customer a per-customer cap charges ------------------------------------------

NESTED: dict[str, Any] = {
    "caps": [
        {
            **REFUNDS,
            "value": "/refund/amount",
            "customer": {"argument": "/account/customer", "context": "customer_id"},
        }
    ]
}


async def test_the_customer_comes_from_the_arguments_by_json_pointer(store: StateStore) -> None:
    pipeline, _, _ = build(store, NESTED)
    action = tool("issue_refund", account={"customer": "C-7"}, refund={"amount": 40})
    assert (await pipeline.decide(action)).effect is Effect.ALLOW
    assert await spent(store, "refunds", DAY, "customer:c-7") == (0.0, 40.0)
    assert await spent(store, "refunds", DAY, "customer:c-ctx") == (0.0, 0.0)


async def test_the_currency_beside_a_nested_value_is_checked(store: StateStore) -> None:
    # 400 GBP counted as 400 USD would be a cap that holds in the wrong money.
    pipeline, _, _ = build(store, NESTED)
    customer = {"customer": "C-7"}
    for refund in ({"amount": 40, "currency": "GBP"}, {"amount": 40, "currency": {"code": "USD"}}):
        action = tool("issue_refund", account=customer, refund=refund)
        decision = await pipeline.decide(action)
        assert (decision.effect, decision.guard) == (Effect.DENY, "budget"), refund
        assert "it counts USD" in decision.reason
    fine = tool("issue_refund", account=customer, refund={"amount": 40, "currency": "usd"})
    assert (await pipeline.decide(fine)).effect is Effect.ALLOW
    wrong_top = tool("issue_refund", account=customer, refund={"amount": 1}, currency=7)
    assert (await pipeline.decide(wrong_top)).effect is Effect.DENY


async def test_without_the_argument_the_context_names_the_customer(store: StateStore) -> None:
    pipeline, _, _ = build(store, NESTED)
    action = tool("issue_refund", refund={"amount": 40})
    assert (await pipeline.decide(action)).effect is Effect.ALLOW
    assert await spent(store, "refunds", DAY, "customer:c-ctx") == (0.0, 40.0)


async def test_when_argument_and_context_disagree_the_argument_is_charged(
    store: StateStore,
) -> None:
    # The argument is what the tool acts on: filling the customer C-1 is
    # talking to cannot keep a refund to C-2 from counting against C-2.
    pipeline, _, _ = build(store, {"caps": [{**REFUNDS, "limit": 100}]})
    first = tool("issue_refund", customer_id="C-2", amount=80, context={"customer_id": "C-1"})
    assert (await pipeline.decide(first)).effect is Effect.ALLOW
    await pipeline.outcome(first, "dec", Outcome(result="ok"))
    second = tool("issue_refund", customer_id="C-2", amount=30, context={"customer_id": "C-3"})
    decision = await pipeline.decide(second)
    assert decision.effect is Effect.DENY
    assert "refunds cap for this customer" in decision.reason
    assert await spent(store, "refunds", DAY, "customer:c-1") == (0.0, 0.0)


@pytest.mark.parametrize(
    ("missing", "effect"),
    [
        (None, Effect.REQUIRE_APPROVAL),
        ("require_approval", Effect.REQUIRE_APPROVAL),
        ("deny", Effect.DENY),
    ],
)
async def test_a_call_naming_no_customer_gets_the_caps_missing_effect(
    store: StateStore, missing: str | None, effect: Effect
) -> None:
    cap = {**REFUNDS, "customer": {"missing": missing}} if missing else REFUNDS
    pipeline, _, policy = build(store, {"caps": [cap]})
    decision = await pipeline.decide(tool("issue_refund", amount=40, context={}))
    assert decision.effect is effect
    assert decision.guard == "budget"
    assert decision.reason.startswith("refunds cap: this issue_refund names no customer")
    assert "argument /customer_id or context customer_id" in decision.reason
    # A hold is not the last word: the policy still runs (and may deny); a denial is.
    assert len(policy.seen) == (0 if effect is Effect.DENY else 1)
    # Nothing stays reserved for a call that is not going through.
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)


@pytest.mark.parametrize("over", [False, True])  # over the cap, or naming no customer
async def test_a_policy_denial_wins_over_a_caps_hold(store: StateStore, over: bool) -> None:
    cap = {**REFUNDS, "limit": 100, "over": "require_approval"}
    pipeline, _, policy = build(store, {"caps": [cap]})
    policy.effect = Effect.DENY
    if over:
        action = tool("issue_refund", customer_id="C-1", amount=5000)
    else:
        action = tool("issue_refund", amount=40, context={})
    decision = await pipeline.decide(action)
    assert (decision.effect, decision.guard, decision.reasons) == (
        Effect.DENY,
        "policy",
        ("policy says so",),
    )
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)


@pytest.mark.parametrize("effect", [Effect.DENY, Effect.REQUIRE_APPROVAL, Effect.ALLOW])
async def test_a_trial_verdict_neither_lifts_nor_shapes_a_caps_hold(
    store: StateStore, effect: Effect
) -> None:
    # The policy's rule runs in observe mode (a trial): enforced, the cap's hold stands.
    cap = {**REFUNDS, "limit": 100, "over": "require_approval"}
    pipeline, _, policy = build(store, {"caps": [cap]})
    policy.effect, policy.mode = effect, Mode.OBSERVE
    policy.obligations = Obligations(approvers=("anyone-at-all",))
    decision = await pipeline.decide(tool("issue_refund", customer_id="C-1", amount=5000))
    assert decision.enforced is Effect.REQUIRE_APPROVAL
    assert (decision.guard, decision.mode) == ("budget", Mode.ENFORCE)
    assert decision.obligations.approvers == ()
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 0.0)


async def test_a_caps_hold_takes_the_policys_approvers_and_quorum(store: StateStore) -> None:
    cap = {**REFUNDS, "limit": 100, "over": "require_approval"}
    pipeline, _, policy = build(store, {"caps": [cap]})
    policy.effect = Effect.REQUIRE_APPROVAL
    policy.obligations = Obligations(approvers=("support-leads",), required_approvals=2)
    decision = await pipeline.decide(tool("issue_refund", customer_id="C-1", amount=400))
    assert decision.effect is Effect.REQUIRE_APPROVAL
    assert decision.reasons[-1] == "policy says so"
    assert "refunds cap" in decision.reasons[0]
    assert decision.obligations.approvers == ("support-leads",)
    assert decision.obligations.required_approvals == 2


async def test_an_approved_call_naming_no_customer_still_counts_for_the_agent(
    store: StateStore,
) -> None:
    pipeline, guard, _ = build(store)
    action = tool("issue_refund", amount=40, context={})
    assert (await pipeline.decide(action)).effect is Effect.REQUIRE_APPROVAL
    await guard.readmit(action, Mode.ENFORCE)
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 40.0)


async def test_an_agent_cap_over_its_limit_outranks_a_missing_customer(
    store: StateStore,
) -> None:
    pipeline, _, _ = build(store, {"caps": [{**REFUNDS, "limit": 30}]})
    decision = await pipeline.decide(tool("issue_refund", amount=40, context={}))
    assert decision.effect is Effect.DENY
    assert decision.reasons[0].startswith("refunds cap for this agent")
    assert decision.reasons[1].startswith("refunds cap: this issue_refund names no customer")


@pytest.mark.parametrize(
    "value", [{"id": "C-1"}, True, "", 1.5, ["C-1"], "C-\n1"]
)  # NUL: the core refuses it first
async def test_a_customer_argument_that_is_not_an_id_is_denied(
    store: StateStore, value: Any
) -> None:
    # Falling through to the context would charge a customer the tool may not touch.
    pipeline, _, _ = build(store)
    decision = await pipeline.decide(tool("issue_refund", amount=10, customer_id=value))
    assert decision.effect is Effect.DENY
    assert "refunds cap: the argument at /customer_id is not a customer id" in decision.reason


async def test_every_spelling_of_one_customer_id_shares_its_counter(store: StateStore) -> None:
    # A backend reads "042", " 42", "+42", "4_2" and "42.0" as the customer 42
    # (pydantic does), and many compare ids without case: one cap, not one per spelling.
    pipeline, _, _ = build(store, {"caps": [{**REFUNDS, "per": ["customer"], "limit": 100}]})
    first = tool("issue_refund", amount=90, customer_id=42)
    assert (await pipeline.decide(first)).effect is Effect.ALLOW
    spellings = ("042", " 42", "+42", "4_2", "42.0", "４２", "4.2e1", "0x2A", "0x002a", "0o52")
    for spelling in (*spellings, "0b101010"):
        again = tool("issue_refund", amount=90, customer_id=spelling)
        decision = await pipeline.decide(again)
        assert decision.effect is Effect.DENY, spelling
        assert "refunds cap for this customer" in decision.reason
    named = tool("issue_refund", amount=90, customer_id="C-7")
    assert (await pipeline.decide(named)).effect is Effect.ALLOW
    for spelling in ("c-7", " C-7 ", "Ｃ-7"):
        decision = await pipeline.decide(tool("issue_refund", amount=90, customer_id=spelling))
        assert decision.effect is Effect.DENY, spelling
    assert await spent(store, "refunds", DAY, "customer:42") == (0.0, 90.0)
    assert await spent(store, "refunds", DAY, "customer:c-7") == (0.0, 90.0)
    # Not every number-like id is a number: these stay themselves.
    for other in ("42.5", "nan", "inf", "0x2g"):
        decision = await pipeline.decide(tool("issue_refund", amount=90, customer_id=other))
        assert decision.effect is Effect.ALLOW, other


async def test_a_null_customer_argument_counts_as_absent(store: StateStore) -> None:
    pipeline, _, _ = build(store)
    action = tool("issue_refund", amount=10, customer_id=None)
    assert (await pipeline.decide(action)).effect is Effect.ALLOW
    assert await spent(store, "refunds", DAY, "customer:c-ctx") == (0.0, 10.0)


async def test_a_capped_tool_is_counted_whatever_kind_of_call_names_it(
    store: StateStore,
) -> None:
    pipeline, _, _ = build(store, {"caps": [{**REFUNDS, "limit": 50}]})
    custom = tool("issue_refund", kind=ActionKind.CUSTOM_TOOL_CALL, amount=60, customer_id="C-1")
    assert (await pipeline.decide(custom)).effect is Effect.DENY
    mcp = tool("issue_refund", kind=ActionKind.MCP_CALL, amount=20, customer_id="C-1")
    assert (await pipeline.decide(mcp)).effect is Effect.ALLOW
    assert await spent(store, "refunds", DAY, "agent:bot") == (0.0, 20.0)


@pytest.mark.parametrize(
    ("pointer", "found", "value"),
    [
        ("", True, {"a": [10, {"b/c": 1, "d~e": 2}], "": 3}),
        ("/a/0", True, 10),
        ("/a/1/b~1c", True, 1),
        ("/a/1/d~0e", True, 2),
        ("/", True, 3),
        ("/a/01", False, None),
        ("/a/2", False, None),
        ("/a/-", False, None),
        ("/a/0/x", False, None),
        ("/missing", False, None),
    ],
)
def test_json_pointers_resolve_as_rfc_6901_says(pointer: str, found: bool, value: Any) -> None:
    doc = {"a": [10, {"b/c": 1, "d~e": 2}], "": 3}
    assert pointer_get(doc, pointer) == (found, value)


@pytest.mark.parametrize("pointer", ["customer_id", "/a~2", "/a~"])
def test_malformed_pointers_are_refused_at_start(pointer: str) -> None:
    cap = {**REFUNDS, "customer": {"argument": pointer}}
    with pytest.raises(ValidationError, match="JSON pointer"):
        BudgetsConfig.model_validate({"caps": [cap]})


@pytest.mark.parametrize(
    ("adapter", "body", "bound", "choices"),
    [
        (OpenAIChatAdapter(), {"max_completion_tokens": 300, "max_tokens": 9, "n": 2}, 300, 2),
        (OpenAIChatAdapter(), {"max_completion_tokens": 9, "max_tokens": 300}, 300, 1),
        (OpenAIChatAdapter(), {"max_tokens": 9}, 9, 1),
        (OpenAIChatAdapter(), {"max_tokens": True, "n": -1}, None, 1),
        (OpenAIResponsesAdapter(), {"max_output_tokens": 700}, 700, 1),
        (AnthropicMessagesAdapter(), {"max_tokens": 1024}, 1024, 1),
        (AnthropicMessagesAdapter(), {}, None, 1),
    ],
)
def test_each_model_api_states_its_output_bound_and_answers(
    adapter: Any, body: dict[str, Any], bound: int | None, choices: int
) -> None:
    parsed = adapter.parse_request({"model": "m", "messages": [], **body})
    assert (parsed.max_output_tokens, parsed.choices) == (bound, choices)
