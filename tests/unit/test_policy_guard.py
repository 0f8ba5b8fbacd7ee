"""The decision contract: reading policy results, and the guard's decisions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from warden.config import PolicyConfig
from warden.model import Action, ActionKind, Agent, Effect, Mode, RequestMeta, Stage
from warden.pipeline import GuardContext
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
@pytest.mark.parametrize(
    "code", ["policy_timeout", "policy_crash", "policy_error", "policy_not_ready"]
)
async def test_errors_fall_back_by_risk(risk: str, effect: Effect, code: str) -> None:
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
