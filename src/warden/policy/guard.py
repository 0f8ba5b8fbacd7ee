"""The policy stage of the guard pipeline.

It sends :func:`warden.pipeline.policy_input` to the engine and always returns
a final decision:

* the policy's effect, reasons and obligations, in the policy's own ``mode``
  if it gave one (so a new rule can run in observe mode), else the configured
  mode;
* ``policy.default_effect`` when the policy is undefined for the input;
* deny, whatever the fallback, when no policy is active (``policy_not_ready``:
  no bundle was activated since start, as when the configured one is refused
  for its signature, as a rollback, or for not compiling): the fallback is
  for a policy that exists but could not answer one input, not a policy of
  its own. ``guard="fallback"``, counted with reason ``no_policy``;
* the fallback for the tool's risk class (``policy.fallback``; deny when the
  class is not listed) when the active policy could not run the input at all
  (no worker was running or free by the deadline), with ``guard="fallback"``
  and the error code;
* deny, whatever the fallback, when the failure may be the input's own doing
  (it errored, crashed or timed out while running, or is quarantined after
  doing so): an agent must not be able to pick the fallback by crafting
  arguments the policy chokes on. Also ``guard="fallback"`` with the code.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from warden.audit.record import unmaskable_redactions
from warden.audit.redaction import REDACT_ALL
from warden.config import PolicyConfig
from warden.model import Action, Decision, Effect, Obligations, PolicyView, new_id
from warden.ops import tracing
from warden.pipeline import GuardContext, policy_input
from warden.policy.challenger import Challenger
from warden.policy.engine import PolicyEngine, PolicyResult
from warden.policy.metrics import PROMETHEUS, PolicyMetrics

__all__ = ["PolicyGuard"]

log = logging.getLogger("warden.policy")

_REDACT_CHECKED: set[tuple[str, tuple[str, ...]]] = set()
"""(bundle revision, ``redact`` list) pairs read already: a decision cache hit must not
pay for reading its list again."""
_REDACT_WARNED: set[tuple[str, str]] = set()
"""(bundle revision, path) pairs warned of: one line each."""
_REDACT_MEMO_MAX = 1024

_WHY = {
    "policy_timeout": "the policy took too long",
    "policy_crash": "the policy engine failed",
    "policy_error": "the policy returned an error",
    "policy_not_ready": "no policy bundle is active",
}
_NO_POLICY = "policy_not_ready"
_NO_POLICY_REASON = (
    "no policy is active: no bundle could be activated since this sidecar started "
    "(the configured one was refused or is missing; its operator sees why in /readyz), "
    "so every action is denied"
)


def _metric_reason(code: str) -> str:
    """The ``reason`` label of ``warden_policy_fallbacks_total`` for an error code."""
    return "no_policy" if code == _NO_POLICY else code.removeprefix("policy_")


class PolicyGuard:
    """Asks the policy engine about every action; see the module docstring."""

    name = "policy"

    def __init__(
        self,
        engine: PolicyEngine,
        config: PolicyConfig,
        *,
        metrics: PolicyMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics if metrics is not None else PROMETHEUS
        self.challenger: Challenger | None = None
        """The live challenger (``policy.challenger``), given each policy decision's input."""

    async def check(self, action: Action, ctx: GuardContext) -> Decision:
        """Evaluate the policy for ``action``; never returns ``None``.

        A door's own query (ext_authz) names no redactions: for a tool call it
        decides, the ``redact`` list is asked of the policy's decision as
        :meth:`redactions` asks it when another stage decides, so the call's
        records hide what they hide at every other door (every field, when the
        policy cannot say).
        """
        # The decision's id before its evaluation: the engine's log lines (a policy
        # failing) name the decision they concern, not the request's one before.
        decision_id = new_id("dec")
        tracing.DECISION_ID.set(decision_id)
        if action.view is not None:
            view = action.view
            result = await self.engine.evaluate(policy_input(action, ctx), query=view.query)
            decision = self.decide_view(result, view, ctx, decision_id)
            if action.tool is None or decision.error is not None:
                return decision  # a failure's record hides everything (warden.audit.redaction)
            redact = await self.redactions(action, ctx)
            return replace(
                decision,
                obligations=replace(
                    decision.obligations, redact=REDACT_ALL if redact is None else redact
                ),
            )
        doc = policy_input(action, ctx)
        result = await self.engine.evaluate(doc)
        decision = self.decide(result, ctx, decision_id)
        if self.challenger is not None:
            self.challenger.offer(doc, decision)  # queued, never awaited
        return decision

    async def check_again(self, action: Action, ctx: GuardContext) -> Decision:
        """What :meth:`check` would answer now, for a call decided before (an approved
        call, :meth:`warden.pipeline.Pipeline.reconsider`). Not a decision of its own:
        the challenger, which was offered the first, is not offered it again."""
        return self.decide(await self.engine.evaluate(policy_input(action, ctx)), ctx)

    async def preview(self, action: Action, ctx: GuardContext) -> Decision | None:
        """The policy's own answer for ``action``, or ``None`` when it gave none.

        For listings (:meth:`warden.pipeline.Pipeline.preview`): neither the
        configured default (the policy said nothing) nor the fallback (it
        failed) is the policy denying a tool in every case, so both are
        ``None``. Uses the decision cache like :meth:`check`.
        """
        result = await self.engine.evaluate(policy_input(action, ctx))
        if result.error is not None or result.effect is None:
            return None
        return self.decide(result, ctx)

    async def redactions(self, action: Action, ctx: GuardContext) -> tuple[str, ...] | None:
        """The policy's ``redact`` list for an action another stage decided.

        Only the obligation is used (see :mod:`warden.audit.redaction`);
        ``None`` when the policy cannot answer, so every field is redacted.
        For a tool call at a door with its own query (ext_authz routes), the
        policy's decision (``policy.query``) is asked over the same input that
        query saw; any other request there is no tool call with fields to name.
        """
        if action.view is not None and action.tool is None:
            return None  # a door's own query names no redactions: hide every field
        result = await self.engine.evaluate(policy_input(action, ctx))
        if result.error is not None:
            return None
        _warn_unmaskable(result)
        return result.redact

    def decide_view(
        self,
        result: PolicyResult,
        view: PolicyView,
        ctx: GuardContext,
        decision_id: str | None = None,
    ) -> Decision:
        """The decision for a door's own query (:class:`~warden.model.PolicyView`).

        Fails closed, whatever ``policy.fallback`` says: a policy that cannot
        run, a query that is undefined for the input, and a value the door's
        ``read`` refuses all deny. The value goes to the door as
        ``obligations.result``.
        """
        revision = result.revision or self.engine.revision or ""
        error: str | None = None
        rendered: Any = None
        if result.error is not None:
            self.metrics.fallback(_metric_reason(result.error), ctx.risk)
            why = _WHY.get(result.error, "the policy could not decide")
            effect, reason, error = Effect.DENY, f"{why}; {view.query} denies", result.error
        elif not result.defined:
            effect, reason = Effect.DENY, f"{view.query} is undefined for this request; denied"
        else:
            try:
                allowed, rendered = view.read(result.value)
            except ValueError as exc:
                self.metrics.fallback("error", ctx.risk)
                effect, error = Effect.DENY, "policy_error"
                reason = f"the value of {view.query} is not a usable result ({exc}); denied"
            else:
                effect = Effect.ALLOW if allowed else Effect.DENY
                given = result.value.get("reason") if isinstance(result.value, dict) else None
                reason = (
                    given
                    if isinstance(given, str) and given
                    else ("the policy allows it" if allowed else "the policy denies it")
                )
        return Decision(
            decision_id=decision_id or new_id("dec"),
            effect=effect,
            reasons=(reason,),
            mode=ctx.mode,
            guard="policy" if error is None else "fallback",
            bundle_revision=revision,
            obligations=Obligations(result=rendered),
            error=error,
            elapsed_us=result.elapsed_us,
        )

    def decide(
        self, result: PolicyResult, ctx: GuardContext, decision_id: str | None = None
    ) -> Decision:
        """The decision for a policy result in this context (``decision_id``: its id,
        if minted before the evaluation)."""
        if result.error is not None:
            fallback = self.config.fallback.get(ctx.risk, Effect.DENY)
            self.metrics.fallback(_metric_reason(result.error), ctx.risk)
            why = _WHY.get(result.error, "the policy could not decide")
            if result.error == _NO_POLICY:
                # Not a policy failing on one input: there are no rules at all, and an
                # allow fallback would let through what the newest release denies.
                effect, reason = Effect.DENY, _NO_POLICY_REASON
            elif result.input_fault and fallback is not Effect.DENY:
                effect = Effect.DENY
                reason = (
                    f"{why} on this input; a failure the input may have caused is denied, "
                    f"not given the fallback for {ctx.risk} actions ({fallback.value})"
                )
            else:
                effect = fallback
                reason = f"{why}; the fallback for {ctx.risk} actions applies ({effect.value})"
            return Decision(
                decision_id=decision_id or new_id("dec"),
                effect=effect,
                reasons=(reason,),
                mode=ctx.mode,
                guard="fallback",
                bundle_revision=result.revision or self.engine.revision or "",
                error=result.error,
                elapsed_us=result.elapsed_us,
            )
        if result.effect is None:
            return Decision(
                decision_id=decision_id or new_id("dec"),
                effect=self.config.default_effect,
                reasons=("no policy rule decided; the configured default applies",),
                mode=ctx.mode,
                guard="policy",
                bundle_revision=result.revision,
                elapsed_us=result.elapsed_us,
            )
        _warn_unmaskable(result)
        return Decision(
            decision_id=decision_id or new_id("dec"),
            effect=result.effect,
            reasons=result.reasons,
            mode=result.mode if result.mode is not None else ctx.mode,
            guard="policy",
            bundle_revision=result.revision,
            obligations=Obligations(
                redact=result.redact,
                approvers=result.approvers,
                hold_timeout_s=result.hold_timeout_s,
                risk=result.risk,
                hold=result.hold,
                required_approvals=result.required_approvals,
            ),
            elapsed_us=result.elapsed_us,
        )


def _warn_unmaskable(result: PolicyResult) -> None:
    """Warn once per bundle revision of each ``redact`` path Warden cannot mask.

    The records list such paths in ``obligations.redact_not_applied``; the line
    names the path and the revision only, never a value of the input.
    """
    listed = (result.revision, result.redact)
    if not result.redact or listed in _REDACT_CHECKED:
        return
    if len(_REDACT_CHECKED) < _REDACT_MEMO_MAX:
        _REDACT_CHECKED.add(listed)
    for path in unmaskable_redactions(result.redact):
        key = (result.revision, path)
        if key in _REDACT_WARNED or len(_REDACT_WARNED) >= _REDACT_MEMO_MAX:
            continue
        _REDACT_WARNED.add(key)
        log.warning(
            "policy revision %s asks to redact %r, which names nothing Warden can mask: "
            "the records keep that value as it was (docs/policies.md lists what can be "
            "redacted)",
            result.revision or "(none)",
            path[:200],
        )
