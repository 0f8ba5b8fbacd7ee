"""A call people approve after a policy reload meets the policy now in force."""

from __future__ import annotations

import dataclasses
from typing import Any

from warden.core import Governor
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
from warden.pipeline import GuardContext, Pipeline
from warden.testing.memory_audit import MemoryAudit


class Policy:
    """The policy guard: answers ``effect`` from bundle revision ``revision``; both can change."""

    name = "policy"

    def __init__(self) -> None:
        self.effect = Effect.REQUIRE_APPROVAL
        self.revision = "r1"
        self.mode: Mode | None = None
        self.seen: list[GuardContext] = []

    async def check(self, action: Action, ctx: GuardContext) -> Decision:
        self.seen.append(ctx)
        return Decision(
            new_id("dec"),
            self.effect,
            (f"{self.effect.value} by {self.revision}",),
            self.mode or ctx.mode,
            "policy",
            bundle_revision=self.revision,
        )


class Session:
    """A guard before the policy that gives it ``input.history``, as the session guard does."""

    name = "session"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        return None

    async def admit(
        self, action: Action, ctx: GuardContext
    ) -> tuple[Decision | None, GuardContext]:
        looked_up = {"tool": "get_order", "arguments": {"order_id": "A-1"}, "verified": True}
        return None, dataclasses.replace(ctx, history=(looked_up,))

    async def decided(self, action: Action, decision: Decision | None) -> None:
        return None

    async def settle(self, action: Action, outcome: Any, *, trusted: bool = False) -> None:
        return None


class Approver:
    """The approval gate, once a person approved: the policy changes while it waits."""

    def __init__(self, policy: Policy, effect: Effect, revision: str, mode: Mode | None) -> None:
        self.policy, self.effect, self.revision, self.mode = policy, effect, revision, mode

    async def settle(
        self, action: Action, decision: Decision, *, connected: Any = None
    ) -> Decision:
        # The reload, while people decide.
        self.policy.effect, self.policy.revision = self.effect, self.revision
        self.policy.mode = self.mode
        return dataclasses.replace(
            decision,
            decision_id=new_id("dec"),
            effect=Effect.ALLOW,
            reasons=("approved by dana (approval apr_1)",),
            guard="approval",
        )


def refund() -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent("refunds-bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool="issue_refund",
        arguments={"order_id": "A-1", "amount": 450},
    )


def governor(
    effect: Effect, revision: str, mode: Mode | None = None
) -> tuple[Governor, Policy, MemoryAudit]:
    audit, policy = MemoryAudit(), Policy()
    pipeline = Pipeline(
        [Session(), policy], audit, mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write"
    )
    return Governor(pipeline, gate=Approver(policy, effect, revision, mode)), policy, audit


async def test_a_reload_that_denies_the_held_call_denies_it_once_approved() -> None:
    core, _, audit = governor(Effect.DENY, "r2")
    decision = await core.decide(refund())
    assert decision.enforced is Effect.DENY
    assert decision.guard == "policy"
    assert decision.bundle_revision == "r2"
    assert decision.reasons[0] == (
        "approved by dana (approval apr_1), but the policy was reloaded while the call was "
        "held (bundle revision r1, now r2) and now denies it"
    )
    assert decision.reasons[1] == "deny by r2"
    # Recorded as a denial on the held call's input, and what the approval reserved goes back.
    held, denied = (d for _, d in audit.decisions)
    assert held.effect is Effect.REQUIRE_APPROVAL
    assert denied.decision_id == decision.decision_id
    assert denied.input == held.input
    (stopped,) = audit.outcomes
    assert stopped.outcome.error == "policy_reloaded"
    assert stopped.decision_id != decision.decision_id  # the approved decision's outcome


async def test_the_policy_is_asked_again_on_the_input_it_held() -> None:
    core, policy, _ = governor(Effect.DENY, "r2")
    await core.decide(refund())
    first, again = policy.seen
    assert again is first  # the very context, with the history's arguments
    assert again.history[0]["arguments"] == {"order_id": "A-1"}


async def test_a_reload_that_keeps_the_data_revision_still_denies() -> None:
    # A bundle's manifest names its revision: a change to its data alone keeps it.
    core, _, _ = governor(Effect.DENY, "r1")
    decision = await core.decide(refund())
    assert decision.enforced is Effect.DENY
    assert "the policy now denies it (bundle revision r1, reloaded or answering" in decision.reason


async def test_a_reload_that_still_holds_or_allows_lets_the_approval_stand() -> None:
    for effect in (Effect.REQUIRE_APPROVAL, Effect.ALLOW):
        core, _, audit = governor(effect, "r2")
        decision = await core.decide(refund())
        assert decision.enforced is Effect.ALLOW
        assert decision.guard == "approval"
        assert len(audit.decisions) == 1  # the hold; the gate records the approval itself
        assert not audit.outcomes


async def test_a_denial_in_observe_mode_lets_the_approval_stand() -> None:
    core, _, _ = governor(Effect.DENY, "r2", Mode.OBSERVE)  # the new rule runs on trial
    decision = await core.decide(refund())
    assert decision.enforced is Effect.ALLOW
    assert decision.guard == "approval"
