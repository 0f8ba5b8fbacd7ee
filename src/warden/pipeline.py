"""The guard pipeline: the one place where Warden decides. Pure of wire formats.

Guards run in order (kill switch, budget, policy, approval); each is a small
typed object whose :meth:`Guard.check` returns a final :class:`Decision` or
``None`` to pass the action on. The first final decision wins. An action that
is malformed (a tool call whose arguments are not a JSON object) is denied
before any guard sees it: fail closed.

The pipeline then records the decision in the audit log, and only returns once
the record is durable, so no action is let through without its record.

A guard that holds something for an action (the budget guard reserves value
against caps) implements :class:`Reserving` instead of just :class:`Guard`:
its :meth:`Reserving.admit` may hand later guards a new :class:`GuardContext`
(the counters the policy sees as ``input.budget``); once the final decision is
known, :meth:`Reserving.decided` lets it release what a denial will not use;
and :meth:`Pipeline.outcome` calls :meth:`Reserving.settle` with the outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from warden.model import Action, Decision, Effect, Mode, Outcome, new_id

__all__ = [
    "AuditSink",
    "Guard",
    "GuardContext",
    "Pipeline",
    "Reserving",
    "policy_input",
]

log = logging.getLogger("warden.pipeline")


@dataclass(frozen=True, slots=True)
class GuardContext:
    """What guards may know beyond the action: the configured mode, budget counters."""

    mode: Mode
    risk: str = "write"
    budget: Mapping[str, Any] = field(default_factory=dict)


class Guard(Protocol):
    """One pipeline stage."""

    name: str

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        """Return a final decision, or ``None`` to let the next guard decide."""
        ...


@runtime_checkable
class Reserving(Protocol):
    """A guard that holds something per action until the action's outcome."""

    name: str

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        """Like :meth:`Guard.check`, for callers that do not need the new context."""
        ...

    async def admit(
        self, action: Action, ctx: GuardContext
    ) -> tuple[Decision | None, GuardContext]:
        """Decide or pass, and return the context later guards see."""
        ...

    async def decided(self, action: Action, decision: Decision | None) -> None:
        """The final decision (``None``: it could not be recorded, so none stands)."""
        ...

    async def settle(self, action: Action, outcome: Outcome) -> float | None:
        """What happened to an action that was let through; its cost in USD, if known."""
        ...


class AuditSink(Protocol):
    """Where decisions and outcomes are recorded (``warden.audit.AuditLog``)."""

    async def record_decision(self, action: Action, decision: Decision) -> None:
        """Make the decision record durable before returning."""
        ...

    async def record_outcome(
        self, action: Action, decision_id: str, outcome: Outcome, *, cost: float | None = None
    ) -> None:
        """Record what happened after the action was let through."""
        ...


def policy_input(action: Action, ctx: GuardContext) -> dict[str, Any]:
    """The ``input`` document a Rego policy sees; see docs/policies.md."""
    return {
        "agent": {
            "id": action.agent.id,
            "version": action.agent.version,
            "claims": dict(action.agent.claims),
        },
        "action": {
            "kind": action.kind.value,
            "type": action.wire_type,
            "tool": action.tool,
            "arguments": dict(action.arguments) if action.arguments is not None else None,
            "protocol": action.protocol,
            "stage": action.stage.value,
            "model": action.model,
            "upstream": action.request.upstream,
            "method": action.request.method,
            "path": action.request.path,
        },
        "context": dict(action.context),
        "budget": dict(ctx.budget),
        "mode": ctx.mode.value,
        "risk": ctx.risk,
    }


def _validation_decision(action: Action, mode: Mode) -> Decision | None:
    if action.tool is not None and action.arguments is None:
        return Decision(
            decision_id=new_id("dec"),
            effect=Effect.DENY,
            reasons=("the tool call's arguments are not a JSON object",),
            mode=mode,
            guard="validation",
        )
    return None


class Pipeline:
    """Runs the guards over an action and records the decision."""

    def __init__(
        self,
        guards: Sequence[Guard],
        audit: AuditSink,
        *,
        mode_for: Callable[[str], Mode],
        risk_of: Callable[[str | None], str],
        default_effect: Effect = Effect.DENY,
    ) -> None:
        self._guards = tuple(guards)
        self._reserving = tuple(g for g in self._guards if isinstance(g, Reserving))
        self._audit = audit
        self._mode_for = mode_for
        self._risk_of = risk_of
        self._default_effect = default_effect

    @property
    def guards(self) -> tuple[Guard, ...]:
        """The guards in the order they run."""
        return self._guards

    async def decide(self, action: Action) -> Decision:
        """Decide on one action and make the decision durable in the audit log.

        Raises :class:`warden.errors.AuditError` when the record cannot be
        written: the caller must then not let the action through.
        """
        started = time.perf_counter_ns()
        ctx = GuardContext(mode=self._mode_for(action.agent.id), risk=self._risk_of(action.tool))
        decision = _validation_decision(action, ctx.mode)
        admitted: list[Reserving] = []
        recorded = False
        try:
            if decision is None:
                for guard in self._guards:
                    if guard in self._reserving:
                        assert isinstance(guard, Reserving)
                        admitted.append(guard)
                        decision, ctx = await guard.admit(action, ctx)
                    else:
                        decision = await guard.check(action, ctx)
                    if decision is not None:
                        break
            if decision is None:
                decision = Decision(
                    decision_id=new_id("dec"),
                    effect=self._default_effect,
                    reasons=("no guard decided; the configured default applies",),
                    mode=ctx.mode,
                    guard="default",
                )
            elapsed = (time.perf_counter_ns() - started) // 1000
            decision = dataclasses.replace(decision, elapsed_us=elapsed)
            await self._audit.record_decision(action, decision)
            recorded = True
        finally:
            # Reservations a denial (or a failed record) will not use go back at once.
            for guard in admitted:
                try:
                    await guard.decided(action, decision if recorded else None)
                except Exception:
                    log.exception("guard %s failed to finish a decision", guard.name)
        return decision

    async def outcome(self, action: Action, decision_id: str, outcome: Outcome) -> None:
        """Settle reservations, then record what happened after an allowed action."""
        cost: float | None = None
        for guard in self._reserving:
            try:
                cost = await guard.settle(action, outcome) or cost
            except Exception:
                # The record still matters; an unsettled hold expires later.
                log.exception("guard %s failed to settle an outcome", guard.name)
        await self._audit.record_outcome(action, decision_id, outcome, cost=cost)
