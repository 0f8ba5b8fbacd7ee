"""The core's validation: what every door's action is checked for before any guard runs.

Keys equal but for case and NUL were refused only by the adapters that parse
arguments (chat, Responses, Messages, MCP); a door that hands the core parsed
values (gRPC ``Check``, HTTP tool routes, ext_authz) had the policy decide them,
or fail on them. These tests drive :class:`~warden.pipeline.Pipeline` with
actions as those doors build them, in observe mode (where a fallback's denial
would only be observed), and the policy guard at a door with its own query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import pytest

from warden.audit.redaction import REDACT_ALL
from warden.config import PolicyConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    PolicyView,
    RequestMeta,
    Stage,
)
from warden.pipeline import AuditSink, GuardContext, Pipeline, input_problem, policy_input
from warden.pipeline import _action_fits as action_fits
from warden.policy.engine import PolicyResult
from warden.policy.guard import PolicyGuard
from warden.policy.metrics import PolicyMetrics


class Engine:
    """Answers the policy's decision, or a door's own query; records what it was asked."""

    def __init__(self, main: PolicyResult, view: PolicyResult | None = None) -> None:
        self.main, self.view = main, view
        self.revision = "r1"
        self.seen: list[tuple[str | None, Mapping[str, Any]]] = []

    async def evaluate(self, doc: Mapping[str, Any], *, query: str | None = None) -> PolicyResult:
        self.seen.append((query, doc))
        if query is None:
            return self.main
        assert self.view is not None
        return self.view


class Quiet(PolicyMetrics):
    def __init__(self) -> None:
        pass

    def fallback(self, reason: str, risk: str) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    async def record_decision(self, action: Action, decision: Decision, **_: Any) -> None:
        self.decisions.append(decision)


def _guard(engine: Engine) -> PolicyGuard:
    return PolicyGuard(engine, PolicyConfig(), metrics=Quiet())  # type: ignore[arg-type]


def _pipeline(engine: Engine, mode: Mode = Mode.OBSERVE) -> tuple[Pipeline, Sink]:
    sink = Sink()
    pipeline = Pipeline(
        [_guard(engine)],
        cast("AuditSink", sink),
        mode_for=lambda _: mode,
        # A read-only tool: the fallback would allow what the policy fails on.
        risk_of=lambda _: "read_only",
    )
    return pipeline, sink


def _action(
    arguments: Mapping[str, Any] | None,
    *,
    protocol: str = "grpc",
    context: Mapping[str, Any] | None = None,
    claims: Mapping[str, Any] | None = None,
) -> Action:
    """A call as the gRPC door builds it: arguments parsed by the door, not an adapter."""
    return Action(
        action_id="act_1",
        agent=Agent("support-bot", "1", claims=claims or {}),
        kind=ActionKind.TOOL_CALL,
        protocol=protocol,
        stage=Stage.EXECUTED,
        request=RequestMeta(method="Check", upstream="grpc", path=""),
        tool="issue_refund",
        arguments=arguments,
        context=context or {},
    )


FOLDED = [
    ({"order_id": "A-1", "amount": 50, "Amount": 5000}, "input.action.arguments"),
    ({"order_id": "A-1", "meta": {"note": "a", "NOTE": "b"}}, "input.action.arguments.meta"),
    ({"items": [{"sku": "x"}, {"sku": "x", "SKU": "y"}]}, "input.action.arguments.items[1]"),
    # Go folds Unicode too: the long s (U+017F) binds to "s".
    ({"s": "ok", "\u017f": "/etc/shadow"}, "input.action.arguments"),
]


@pytest.mark.parametrize(("arguments", "where"), FOLDED)
@pytest.mark.parametrize("protocol", ["grpc", "http", "envoy_authz"])
async def test_keys_equal_but_for_case_are_denied_in_the_core_in_every_mode(
    arguments: dict[str, Any], where: str, protocol: str
) -> None:
    engine = Engine(PolicyResult(effect=Effect.ALLOW))
    pipeline, sink = _pipeline(engine)
    decision = await pipeline.decide(_action(arguments, protocol=protocol))
    assert (decision.guard, decision.enforced, decision.mode) == (
        "validation",
        Effect.DENY,
        Mode.ENFORCE,
    )
    assert decision.reason.startswith(f"{where} holds two keys equal but for case")
    assert engine.seen == []  # no guard ran
    assert decision.obligations.redact == REDACT_ALL
    assert sink.decisions == [decision]
    # Keys in another case that clash with none go on to the policy.
    fine = {"OrderId": "A-1", "amount": 50, "meta": {"Note": "a"}, "list": [{"a": 1}, {"A": 2}]}
    allowed = await pipeline.decide(_action(fine, protocol=protocol))
    assert (allowed.guard, allowed.effect) == ("policy", Effect.ALLOW)
    assert len(engine.seen) == 1


NUL = [
    ({"order_id": "A-1001\x00; DROP", "amount": 5}, {}, {}, "input.action.arguments.order_id"),
    ({"order_id": "A-1", "n\x00te": 1}, {}, {}, "a key of input.action.arguments"),
    ({"order_id": "A-1", "tags": ["ok", "x\x00y"]}, {}, {}, "input.action.arguments.tags[1]"),
    ({"order_id": "A-1"}, {"customer_id": "C-1\x00"}, {}, "input.context.customer_id"),
    ({"order_id": "A-1"}, {}, {"team": "ops\x00"}, "input.agent.claims.team"),
]


@pytest.mark.parametrize(("arguments", "context", "claims", "where"), NUL)
async def test_nul_anywhere_in_the_input_is_denied_before_the_engine_in_every_mode(
    arguments: dict[str, Any], context: dict[str, Any], claims: dict[str, Any], where: str
) -> None:
    # The engine fails on NUL: the fallback (allow, for this read-only tool) applied in
    # enforce mode, and in observe mode the failure was only observed. Now neither.
    engine = Engine(PolicyResult(effect=None, error="policy_error", input_fault=True))
    pipeline, _ = _pipeline(engine)
    action = _action(arguments, context=context, claims=claims)
    assert not action_fits(action)
    decision = await pipeline.decide(action)
    assert (decision.guard, decision.enforced, decision.mode) == (
        "validation",
        Effect.DENY,
        Mode.ENFORCE,
    )
    assert decision.reason == (
        f"the policy cannot check this action: {where} holds NUL (\\u0000), "
        "which the policy engine would read cut short"
    )
    assert engine.seen == []


def test_nul_is_found_where_the_fast_check_and_the_full_walk_agree() -> None:
    ctx = GuardContext(mode=Mode.ENFORCE)
    # Text that spells the escape out holds no NUL: the fast check walks it and passes it.
    spelled = _action({"note": "\\u0000", "k\\u0000": "\\\\u0000"})
    assert action_fits(spelled)
    assert input_problem(policy_input(spelled, ctx)) is None
    nul: dict[str, Any] = {"x": {"y": "\x00"}}
    for part, odd in (
        ("input_responses", dataclasses.replace(_action({"a": 1}), input_responses=nul)),
        ("meta", dataclasses.replace(_action({"a": 1}), meta=nul)),
    ):
        assert not action_fits(odd)
        assert input_problem(policy_input(odd, ctx)) == (
            f"input.action.{part}.x.y holds NUL (\\u0000), which the policy engine would read "
            "cut short"
        )


def _view(tool: str | None, *, problem: str | None = None, rule: bool = False) -> Action:
    base = _action({"customer_id": "C-1", "email": "ann@example.com"}, protocol="envoy_authz")
    return dataclasses.replace(
        base,
        kind=ActionKind.TOOL_CALL if tool else ActionKind.HTTP_CALL,
        tool=tool,
        arguments=base.arguments if tool else None,
        view=PolicyView(
            query="data.envoy.authz.allow",
            input={"parsed_body": {"email": "ann@example.com"}},
            read=lambda value: (bool(value), None),
            problem=problem,
            problem_is_rule=rule,
        ),
    )


async def test_a_door_query_deciding_a_tool_call_records_the_policys_redactions() -> None:
    main = PolicyResult(effect=Effect.DENY, redact=("action.arguments.email",))
    engine = Engine(main, view=PolicyResult(effect=None, value=True, defined=True))
    pipeline, sink = _pipeline(engine, Mode.ENFORCE)
    decision = await pipeline.decide(_view("update_email"))
    # The door's query decides (its effect stands); the policy's decision names the fields.
    assert (decision.guard, decision.effect) == ("policy", Effect.ALLOW)
    assert decision.obligations.redact == ("action.arguments.email",)
    assert sink.decisions == [decision]
    queries = [query for query, _ in engine.seen]
    assert queries == ["data.envoy.authz.allow", None]
    # Asked over the input the door's query saw.
    assert engine.seen[0][1] == engine.seen[1][1]
    # A request that is no tool call has no fields to name: nothing more is asked.
    engine.seen.clear()
    other = await pipeline.decide(_view(None))
    assert (other.guard, other.obligations.redact) == ("policy", ())
    assert [query for query, _ in engine.seen] == ["data.envoy.authz.allow"]


async def test_a_door_query_redacts_everything_when_the_policy_cannot_name_fields() -> None:
    failing = PolicyResult(effect=None, error="policy_error", input_fault=True)
    engine = Engine(failing, view=PolicyResult(effect=None, value=True, defined=True))
    pipeline, _ = _pipeline(engine, Mode.ENFORCE)
    decision = await pipeline.decide(_view("update_email"))
    assert (decision.guard, decision.effect) == ("policy", Effect.ALLOW)
    assert decision.obligations.redact == REDACT_ALL


async def test_nul_in_a_door_input_is_refused_before_a_doors_rule_in_every_mode() -> None:
    # `unmatched: deny` is a rule, which observe mode lets through; a body the policy
    # engine cannot read is not.
    engine = Engine(PolicyResult(effect=Effect.ALLOW), view=PolicyResult(effect=None, value=True))
    pipeline, _ = _pipeline(engine)
    ruled = _view(None, problem="POST /x fits no rule (unmatched: deny)", rule=True)
    plain = await pipeline.decide(ruled)
    assert (plain.guard, plain.mode, plain.enforced) == ("validation", Mode.OBSERVE, Effect.ALLOW)
    assert ruled.view is not None
    nul = dataclasses.replace(
        ruled, view=dataclasses.replace(ruled.view, input={"parsed_body": {"q": "x\x00y"}})
    )
    decision = await pipeline.decide(nul)
    assert (decision.guard, decision.mode, decision.enforced) == (
        "validation",
        Mode.ENFORCE,
        Effect.DENY,
    )
    assert "input.parsed_body.q holds NUL" in decision.reason
    assert engine.seen == []
