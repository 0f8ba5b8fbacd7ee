"""The decision contract: reading policy results, and the guard's decisions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

import pytest

from warden.config import PolicyConfig
from warden.model import Action, ActionKind, Agent, Decision, Effect, Mode, RequestMeta, Stage
from warden.pipeline import (
    MAX_INPUT_DEPTH,
    AuditSink,
    GuardContext,
    Pipeline,
    input_problem,
    policy_input,
)
from warden.policy.engine import PolicyResult, interpret_output
from warden.policy.guard import PolicyGuard
from warden.policy.metrics import PolicyMetrics


def test_undefined() -> None:
    result = interpret_output("undefined")
    assert result.undefined
    assert result.error is None


@pytest.mark.parametrize(("value", "effect"), [("true", Effect.ALLOW), ("false", Effect.DENY)])
def test_boolean_results(value: str, effect: Effect) -> None:
    assert interpret_output(f'{{"expressions":[{value}]}}').effect is effect


def test_full_result_object() -> None:
    text = (
        '{"expressions":[{"effect":"require_approval", "reason":"big refund",'
        ' "approvers":["leads"], "hold_timeout_s":600, "redact":["card"], "mode":"observe",'
        ' "risk":"high", "hold":"defer", "required_approvals":2, "extra":{"ignored":true}}]}'
    )
    result = interpret_output(text)
    assert result.effect is Effect.REQUIRE_APPROVAL
    assert result.reasons == ("big refund",)
    assert result.reason == "big refund"
    assert result.approvers == ("leads",)
    assert result.hold_timeout_s == 600.0
    assert result.redact == ("card",)
    assert result.mode is Mode.OBSERVE
    assert result.risk == "high"
    assert result.hold == "defer"
    assert result.required_approvals == 2


def test_reasons_list() -> None:
    result = interpret_output('{"expressions":[{"effect":"deny", "reasons":["a", "b"]}]}')
    assert result.reasons == ("a", "b")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"allow"', "must be an object or a boolean"),
        ('{"effect":"maybe"}', "effect must be one of"),
        ("{}", "effect must be one of"),
        ('{"effect":"deny", "reason": 3}', "reason must be a string"),
        ('{"effect":"deny", "mode": "loud"}', "mode must be one of"),
        ('{"effect":"deny", "approvers": "leads"}', "approvers must be a list"),
        ('{"effect":"deny", "hold_timeout_s": -1}', "hold_timeout_s must be a positive"),
        ('{"effect":"deny", "hold": "later"}', "hold must be one of"),
        ('{"effect":"deny", "required_approvals": 0}', "required_approvals must be"),
        ('{"effect":"deny", "hold_timeout_s": true}', "hold_timeout_s must be a positive"),
        ('{"effect":"deny", "risk": 1}', "risk must be a string"),
    ],
)
def test_invalid_shapes_are_policy_errors(value: str, message: str) -> None:
    result = interpret_output(f'{{"expressions":[{value}]}}')
    assert result.error == "policy_error"
    assert result.effect is None
    assert message in (result.detail or "")


def test_engine_errors_are_policy_errors() -> None:
    text = "<error>(error\n  (errormsg 48:complete rules must not produce multiple outputs)\n)"
    result = interpret_output(text)
    assert result.error == "policy_error"
    assert "complete rules must not produce multiple outputs" in (result.detail or "")
    assert interpret_output("not json").error == "policy_error"
    assert interpret_output('{"expressions":[1, 2]}').error == "policy_error"


class FakeEngine:
    def __init__(self, result: PolicyResult) -> None:
        self.result = result
        self.revision = "r9"
        self.seen: list[Mapping[str, Any]] = []

    async def evaluate(self, doc: Mapping[str, Any]) -> PolicyResult:
        self.seen.append(doc)
        return self.result


class Recorder(PolicyMetrics):
    def __init__(self) -> None:
        self.fallbacks: list[tuple[str, str]] = []

    def fallback(self, reason: str, risk: str) -> None:
        self.fallbacks.append((reason, risk))


def action_with(arguments: dict[str, Any]) -> Action:
    return dataclasses.replace(action("search_kb"), arguments=arguments)


def action(tool: str = "issue_refund") -> Action:
    return Action(
        action_id="act_1",
        agent=Agent("support-bot", "3"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta(method="POST", upstream="openai", path="/v1/chat/completions"),
        tool=tool,
        arguments={"amount": 30},
    )


async def decide(
    result: PolicyResult, ctx: GuardContext, **config: Any
) -> tuple[Any, Recorder, FakeEngine]:
    engine = FakeEngine(result)
    metrics = Recorder()
    guard = PolicyGuard(engine, PolicyConfig(**config), metrics=metrics)  # type: ignore[arg-type]
    decision = await guard.check(action(), ctx)
    return decision, metrics, engine


async def test_policy_decision_carries_obligations_and_revision() -> None:
    result = PolicyResult(
        effect=Effect.REQUIRE_APPROVAL,
        reasons=("over the limit",),
        approvers=("leads",),
        hold_timeout_s=300.0,
        redact=("card",),
        revision="r9",
        elapsed_us=120,
    )
    decision, metrics, engine = await decide(result, GuardContext(mode=Mode.ENFORCE, risk="high"))
    assert decision.guard == "policy"
    assert decision.effect is Effect.REQUIRE_APPROVAL
    assert decision.reasons == ("over the limit",)
    assert decision.bundle_revision == "r9"
    assert decision.obligations.approvers == ("leads",)
    assert decision.obligations.hold_timeout_s == 300.0
    assert decision.obligations.redact == ("card",)
    assert decision.elapsed_us == 120
    assert metrics.fallbacks == []
    assert engine.seen[0]["action"]["tool"] == "issue_refund"
    assert engine.seen[0]["risk"] == "high"


async def test_policy_mode_overrides_configured_mode() -> None:
    result = PolicyResult(
        effect=Effect.DENY, reasons=("new rule",), mode=Mode.OBSERVE, revision="r9"
    )
    decision, _, _ = await decide(result, GuardContext(mode=Mode.ENFORCE))
    assert decision.mode is Mode.OBSERVE
    assert decision.enforced is Effect.ALLOW
    assert decision.would == "would_deny"
    decision, _, _ = await decide(
        PolicyResult(effect=Effect.DENY, mode=Mode.ENFORCE), GuardContext(mode=Mode.OBSERVE)
    )
    assert decision.enforced is Effect.DENY


async def test_undefined_uses_default_effect() -> None:
    decision, _, _ = await decide(
        PolicyResult(effect=None, revision="r9"),
        GuardContext(mode=Mode.ENFORCE),
        default_effect="allow",
    )
    assert decision.effect is Effect.ALLOW
    assert decision.guard == "policy"
    assert decision.error is None


@pytest.mark.parametrize(
    ("risk", "effect"),
    [
        ("read_only", Effect.ALLOW),
        ("write", Effect.DENY),
        ("high", Effect.DENY),
        ("odd", Effect.DENY),
    ],
)
@pytest.mark.parametrize("code", ["policy_timeout", "policy_crash", "policy_error"])
async def test_errors_the_input_did_not_cause_fall_back_by_risk(
    risk: str, effect: Effect, code: str
) -> None:
    decision, metrics, _ = await decide(
        PolicyResult(effect=None, error=code, detail="secret detail", elapsed_us=50_000),
        GuardContext(mode=Mode.ENFORCE, risk=risk),
    )
    assert decision.guard == "fallback"
    assert decision.effect is effect
    assert decision.error == code
    assert decision.bundle_revision == "r9"
    assert "secret detail" not in decision.reason
    assert metrics.fallbacks == [(code.removeprefix("policy_"), risk)]


@pytest.mark.parametrize("risk", ["read_only", "write", "high"])
@pytest.mark.parametrize("code", ["policy_timeout", "policy_crash", "policy_error"])
async def test_errors_the_input_may_have_caused_are_denied_whatever_the_fallback(
    risk: str, code: str
) -> None:
    decision, metrics, _ = await decide(
        PolicyResult(effect=None, error=code, input_fault=True),
        GuardContext(mode=Mode.ENFORCE, risk=risk),
        fallback={"read_only": "allow", "write": "allow", "high": "require_approval"},
    )
    assert decision.effect is Effect.DENY
    assert decision.guard == "fallback"
    assert decision.error == code
    assert "on this input" in decision.reason
    assert f"not given the fallback for {risk} actions" in decision.reason
    assert metrics.fallbacks == [(code.removeprefix("policy_"), risk)]


# -- the pipeline refuses inputs the engine cannot take as they are ----------------------


def nest(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"n": 2**70}, "input.action.arguments.n is an integer past 64 bits"),
        ({"n": -(2**63) - 1}, "input.action.arguments.n is an integer past 64 bits"),
        ({"a": [1, {"b": 2**64}]}, "input.action.arguments.a[1].b is an integer past 64 bits"),
        ({"x": math.nan}, "input.action.arguments.x is nan, which JSON cannot carry"),
        ({"x": [math.inf]}, "input.action.arguments.x[0] is inf, which JSON cannot carry"),
        ({"x": -math.inf}, "input.action.arguments.x is -inf, which JSON cannot carry"),
        ({"deep": nest(300)}, "input.action.arguments.deep[0][0][0]… nests deeper than 64 levels"),
        ({"s": "\ud800"}, "it cannot be encoded as JSON"),
    ],
)
def test_inputs_the_engine_cannot_take_are_named(arguments: dict[str, Any], problem: str) -> None:
    doc = policy_input(action_with(arguments), GuardContext(mode=Mode.ENFORCE))
    found = input_problem(doc)
    assert found is not None
    assert found.startswith(problem), found


def test_inputs_at_the_bounds_are_taken() -> None:
    # input (1) > action (2) > arguments (3): a list in the arguments may nest 61 more.
    def doc(deep: Any) -> dict[str, Any]:
        arguments = {"max": 2**63 - 1, "min": -(2**63), "f": 1e308, "deep": deep}
        return policy_input(action_with(arguments), GuardContext(mode=Mode.ENFORCE))

    assert input_problem(doc(nest(MAX_INPUT_DEPTH - 3))) is None
    assert "nests deeper than 64 levels" in (input_problem(doc(nest(MAX_INPUT_DEPTH - 2))) or "")


@pytest.mark.parametrize(
    ("where", "value"),
    [("context", {"ticket": 2**80}), ("claims", {"exp": math.inf}), ("claims", {"x": nest(80)})],
)
def test_every_part_of_the_input_is_checked(where: str, value: dict[str, Any]) -> None:
    act = action_with({"ok": 1})
    if where == "context":
        act = dataclasses.replace(act, context=value)
    else:
        act = dataclasses.replace(act, agent=Agent("support-bot", "3", claims=value))
    assert input_problem(policy_input(act, GuardContext(mode=Mode.ENFORCE))) is not None


class Sink:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    async def record_decision(self, action: Action, decision: Decision) -> None:
        self.decisions.append(decision)

    async def record_outcome(
        self, action: Action, decision_id: str, outcome: Any, *, cost: float | None = None
    ) -> None:
        pass


async def test_the_pipeline_denies_them_before_any_guard_or_fallback() -> None:
    # The policy would fail on such input; for a read_only tool the fallback
    # would allow. Validation decides first, so neither happens.
    engine = FakeEngine(PolicyResult(effect=None, error="policy_error"))
    guard = PolicyGuard(engine, PolicyConfig(), metrics=Recorder())  # type: ignore[arg-type]
    sink = Sink()
    pipeline = Pipeline(
        [guard],
        cast("AuditSink", sink),  # a partial sink: this pipeline only records decisions
        mode_for=lambda _: Mode.ENFORCE,
        risk_of=lambda _: "read_only",
    )
    decision = await pipeline.decide(action_with({"query": "x", "n": 2**70}))
    assert decision.effect is Effect.DENY
    assert decision.guard == "validation"
    assert decision.reason == (
        "the policy cannot check this action: input.action.arguments.n is an integer past 64 bits"
    )
    assert engine.seen == []
    assert sink.decisions == [decision]
    # An ordinary input goes on to the policy (and its fallback).
    assert (await pipeline.decide(action_with({"query": "x"}))).guard == "fallback"
    assert len(engine.seen) == 1


@pytest.mark.parametrize(
    ("call_id", "tool"),
    [("call_\x00x", "search_kb"), ("call_\nx", "search_kb"), ("call_1", "search_kb\x00")],
)
async def test_a_call_named_with_a_control_character_is_denied_before_any_guard(
    call_id: str, tool: str
) -> None:
    # No provider names a call so; PostgreSQL cannot store NUL (its write failed the
    # state store's batches for good), and a line break starts lines of its own.
    engine = FakeEngine(PolicyResult(effect=Effect.ALLOW))
    guard = PolicyGuard(engine, PolicyConfig(), metrics=Recorder())  # type: ignore[arg-type]
    sink = Sink()
    pipeline = Pipeline(
        [guard], cast("AuditSink", sink), mode_for=lambda _: Mode.ENFORCE, risk_of=lambda _: ""
    )
    action = dataclasses.replace(action_with({"query": "x"}), call_id=call_id, tool=tool)
    decision = await pipeline.decide(action)
    assert (decision.effect, decision.guard) == (Effect.DENY, "validation")
    assert decision.reason == "the call's id or tool name holds a control character"
    assert engine.seen == []
    fine = dataclasses.replace(action_with({"query": "x"}), call_id="call_1")
    assert (await pipeline.decide(fine)).effect == Effect.ALLOW


async def test_what_cannot_be_checked_is_denied_in_observe_mode_too() -> None:
    # An agent reads a key given twice, or a number past 64 bits, otherwise than the
    # policy would: observe mode passed such calls on, and a rule set to "enforce"
    # never ran for them.
    engine = FakeEngine(PolicyResult(effect=Effect.ALLOW))
    guard = PolicyGuard(engine, PolicyConfig(), metrics=Recorder())  # type: ignore[arg-type]
    pipeline = Pipeline(
        [guard], cast("AuditSink", Sink()), mode_for=lambda _: Mode.OBSERVE, risk_of=lambda _: ""
    )
    decision = await pipeline.decide(action_with({"query": "x", "n": 2**70}))
    assert (decision.guard, decision.enforced) == ("validation", Effect.DENY)
    assert engine.seen == []


@pytest.mark.parametrize("risk", ["read_only", "write", "high"])
async def test_no_active_policy_denies_every_risk(risk: str) -> None:
    # The per-risk fallback is for a policy that failed on one input; with none
    # active (refused at start), a read-only tool the newest release denies passed.
    decision, metrics, _ = await decide(
        PolicyResult(effect=None, error="policy_not_ready", detail="refused: rollback"),
        GuardContext(mode=Mode.ENFORCE, risk=risk),
        fallback={"read_only": "allow", "write": "allow", "high": "allow"},
    )
    assert decision.effect is Effect.DENY
    assert decision.guard == "fallback"
    assert decision.error == "policy_not_ready"
    assert "rollback" not in decision.reason
    assert metrics.fallbacks == [("no_policy", risk)]
