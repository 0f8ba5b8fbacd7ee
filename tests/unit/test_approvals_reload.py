"""A call people approve after a policy reload meets the policy now in force."""

from __future__ import annotations

import dataclasses
from typing import Any

from warden.config import PolicyConfig
from warden.core import Governor
from warden.errors import Overloaded
from warden.model import (
    Action,
    Decision,
    Effect,
    Mode,
    new_id,
)
from warden.pipeline import GuardContext, Pipeline
from warden.policy.engine import PolicyResult
from warden.policy.guard import PolicyGuard
from warden.policy.metrics import PolicyMetrics
from warden.testing.audit import sample_action
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
    """A guard before the policy that gives it ``input.history``, as the session guard does;
    it holds something per action, as the budget guard does (``settled``)."""

    name = "session"

    def __init__(self) -> None:
        self.settled: list[Any] = []

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
        self.settled.append(outcome)


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
    return sample_action(agent="refunds-bot", arguments={"order_id": "A-1", "amount": 450})


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


class Failing(Policy):
    """Holds the call; asked again, it fails as ``failure`` says."""

    def __init__(self, failure: Exception | Decision) -> None:
        super().__init__()
        self.failure = failure

    async def check(self, action: Action, ctx: GuardContext) -> Decision:
        if self.seen:
            if isinstance(self.failure, Exception):
                raise self.failure
            return self.failure
        return await super().check(action, ctx)


def failing(failure: Exception | Decision) -> tuple[Governor, Session, MemoryAudit]:
    audit, session, policy = MemoryAudit(), Session(), Failing(failure)
    pipeline = Pipeline(
        [session, policy], audit, mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write"
    )
    # The approver changes nothing: the policy that held the call is the one asked again.
    gate = Approver(Policy(), Effect.REQUIRE_APPROVAL, "r1", None)
    return Governor(pipeline, gate=gate), session, audit


async def test_a_busy_policy_engine_at_the_recheck_denies_and_gives_back_the_reservation() -> None:
    core, session, audit = failing(Overloaded("the policy engine is busy; retry shortly"))
    decision = await core.decide(refund())  # not the 503: the approval was used
    assert decision.enforced is Effect.DENY
    assert (decision.guard, decision.error) == ("fallback", "overloaded")
    assert decision.reasons == (
        "approved by dana (approval apr_1), but the policy could not check it again, "
        "so it is denied",
        "the policy engine was too busy to answer in time",
    )
    held, denied = (d for _, d in audit.decisions)
    assert denied.decision_id == decision.decision_id
    assert denied.input == held.input
    # The approved decision gets its outcome: it never ran, and what it reserved goes back.
    (stopped,) = audit.outcomes
    assert stopped.decision_id not in (held.decision_id, decision.decision_id)
    assert stopped.outcome.error == "policy_unavailable"
    assert [o.error for o in session.settled] == ["policy_unavailable"]


async def test_a_failing_policy_engine_at_the_recheck_is_not_named_to_the_agent() -> None:
    core, session, audit = failing(RuntimeError("worker 3 died reading /srv/bundle"))
    decision = await core.decide(refund())
    assert decision.enforced is Effect.DENY
    assert (decision.guard, decision.error) == ("fallback", "policy_crash")
    assert "/srv/bundle" not in " ".join(decision.reasons)
    assert decision.reasons[1] == "the policy engine failed to answer"
    assert [o.outcome.error for o in audit.outcomes] == ["policy_unavailable"]
    assert len(session.settled) == 1


async def test_a_policy_timeout_at_the_recheck_is_not_called_a_reload() -> None:
    fallback = Decision(
        new_id("dec"),
        Effect.DENY,
        ("the policy took too long; the fallback for write actions applies (deny)",),
        Mode.ENFORCE,
        "fallback",
        bundle_revision="r1",
        error="policy_timeout",
    )
    core, _, audit = failing(fallback)
    decision = await core.decide(refund())
    assert decision.enforced is Effect.DENY
    assert (decision.guard, decision.error) == ("fallback", "policy_timeout")
    assert decision.reasons == (
        "approved by dana (approval apr_1), but the policy could not check it again, "
        "so it is denied",
        "the policy took too long; the fallback for write actions applies (deny)",
    )
    (stopped,) = audit.outcomes
    assert stopped.outcome.error == "policy_unavailable"


class Engine:
    """The policy engine: holds refunds, then allows them (answers from ``results``)."""

    revision = "r1"

    def __init__(self) -> None:
        self.results = [
            PolicyResult(Effect.REQUIRE_APPROVAL, ("refunds need a person",), revision="r1"),
            PolicyResult(Effect.ALLOW, ("allowed",), revision="r1"),
        ]

    async def evaluate(self, doc: Any, query: str | None = None) -> PolicyResult:
        return self.results.pop(0)


class Challenger:
    def __init__(self) -> None:
        self.offered: list[Decision] = []

    def offer(self, doc: Any, decision: Decision) -> None:
        self.offered.append(decision)


async def test_the_recheck_is_not_offered_to_the_challenger() -> None:
    engine, challenger, audit = Engine(), Challenger(), MemoryAudit()
    policy = PolicyGuard(engine, PolicyConfig(), metrics=PolicyMetrics())  # type: ignore[arg-type]
    policy.challenger = challenger  # type: ignore[assignment]
    pipeline = Pipeline(
        [Session(), policy], audit, mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write"
    )
    gate = Approver(Policy(), Effect.REQUIRE_APPROVAL, "r1", None)
    decision = await Governor(pipeline, gate=gate).decide(refund())
    assert decision.enforced is Effect.ALLOW
    assert not engine.results  # asked twice
    # Only the decision in the log: a second offer would name a decision that is not.
    ((_, held),) = audit.decisions
    assert [d.decision_id for d in challenger.offered] == [held.decision_id]
