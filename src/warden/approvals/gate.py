"""What happens to an action a policy holds for people: a grant, a hold, or a deferral.

The pipeline's guards answer ``require_approval``; this gate turns that into
the final decision the agent gets, and records it:

- a matching approved grant (defer mode) lets the call through once;
- ``hold`` waits for people (or the timeout: never approved by a timeout);
- ``defer`` answers at once, with the approval id, and lets the same call
  through once after it is approved;
- a hold interrupted by Warden stopping is answered as deferred, so the
  approval stays decidable after a restart; a hold whose process died is
  deferred when Warden next starts (:meth:`Approvals.recover`);
- a retry of a call whose hold was lost waits on that same approval again
  rather than raising a second one, and is deferred again if still undecided;
- a hold whose approval was used by another request for the same call (the
  agent's retry at a sibling, while this process was stalled) is refused as
  such: the approval lets one call through, and that one went.

An approved action is checked against kill switches again, its budget is
reserved again, and the decision that lets it through is recorded with the
approval evidence before it goes on. The Governor then asks the policy in
force again (:meth:`warden.pipeline.Pipeline.reconsider`): one reloaded while
the call was held may deny it now.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Final, Protocol

from warden import tasks
from warden.approvals.model import (
    Approval,
    ApprovalConflict,
    ApprovalSettings,
    ApprovalStatus,
    TooManyPending,
)
from warden.approvals.service import Approvals
from warden.config import ApprovalsConfig
from warden.errors import AuditError
from warden.killswitch import KillSwitches
from warden.model import Action, Decision, Effect, Mode, new_id
from warden.pipeline import AuditSink

__all__ = ["ApprovalGate", "approval_settings"]

log = logging.getLogger("warden.approvals")

STATE_UNAVAILABLE: Final = "state_unavailable"
"""The ``error`` of a decision denied because the approval store was unreachable."""


def approval_settings(config: ApprovalsConfig) -> ApprovalSettings:
    """The approvals service's settings from the ``approvals`` config section."""
    hook = config.webhook
    return ApprovalSettings(
        hold_timeout_s=config.hold_timeout_s,
        defer_ttl_s=config.defer_ttl_s,
        mode=config.mode,
        required_approvals=config.required_approvals,
        orphan_after_s=config.orphan_after_s,
        max_pending_per_agent=config.max_pending_per_agent,
        keep_decided_s=config.keep_decided_s,
        bind_context=config.bind_context,
        bind_claims=config.bind_claims,
        webhook_url=hook.url,
        webhook_secret=hook.secret,
        webhook_format=hook.format,
        webhook_tries=hook.tries,
        webhook_backoff_s=hook.backoff_s,
        webhook_timeout_s=hook.timeout_s,
    )


class _Budgets(Protocol):
    async def readmit(self, action: Action, mode: Mode) -> None: ...


class ApprovalGate:
    """Settles ``require_approval`` decisions; one per Warden."""

    def __init__(
        self,
        approvals: Approvals,
        settings: ApprovalsConfig,
        audit: AuditSink,
        *,
        killswitches: KillSwitches | None = None,
        budgets: _Budgets | None = None,
    ) -> None:
        self.approvals = approvals
        self._settings = settings
        self._audit = audit
        self._killswitches = killswitches
        self._budgets = budgets
        self._stopping = asyncio.Event()

    def stop_holding(self) -> None:
        """Warden is stopping: holds end now and are answered as deferred."""
        self._stopping.set()

    async def settle(
        self,
        action: Action,
        decision: Decision,
        *,
        connected: Callable[[], bool] | None = None,
    ) -> Decision:
        """The final decision for ``action``; ``decision`` unchanged unless it awaits people.

        ``connected``: whether the caller is still there (polled while holding).

        When the approval store cannot be reached, the action is denied (and
        that decision recorded): no one could approve it, and nothing may pass
        unapproved. Only a failure of the audit log itself propagates.
        """
        if decision.enforced is not Effect.REQUIRE_APPROVAL:
            return decision
        try:
            return await self._settle(action, decision, connected)
        except AuditError:
            raise
        except TooManyPending as exc:
            full = dataclasses.replace(
                _follow(decision, Effect.DENY, (*decision.reasons, f"{exc}; denied")),
                error=TooManyPending.code,
            )
            await self._audit.record_decision(action, full)
            return full
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            log.warning(
                "approval store unavailable; action %s denied: %s",
                action.action_id,
                f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__,
            )
        why = "the approval store is unavailable, so no one can approve this now; denied"
        denied = dataclasses.replace(
            _follow(decision, Effect.DENY, (*decision.reasons, why)), error=STATE_UNAVAILABLE
        )
        await self._audit.record_decision(action, denied)
        return denied

    async def _settle(
        self, action: Action, decision: Decision, connected: Callable[[], bool] | None
    ) -> Decision:
        how = decision.obligations.hold or self._settings.mode
        grant = await self.approvals.take_grant(action, decision)
        if grant is not None:
            return await self._approved(action, decision, grant)
        # The policy's quorum; the service keeps approvals.required_approvals as the least.
        required = decision.obligations.required_approvals
        if how == "defer" or self._stopping.is_set():
            approval = await self.approvals.request(
                action, decision, mode="defer", required_approvals=required
            )
            return _pending(decision, approval)
        timeout = decision.obligations.hold_timeout_s or self._settings.hold_timeout_s
        adopted = await self.approvals.adopt(action, decision, timeout)
        approval = adopted or await self.approvals.request(
            action, decision, mode="hold", required_approvals=required
        )
        try:
            # An adopted approval was a deferral: the wait must not expire it.
            approval = await self._wait(
                approval, timeout, expire=adopted is None, connected=connected
            )
        except asyncio.CancelledError:
            # The agent went away: the approval stays decidable, as a deferral.
            await asyncio.shield(self.approvals.defer(approval.id))
            raise
        gone = connected is not None and not connected()
        if approval.status is ApprovalStatus.APPROVED and not gone:
            try:
                await self.approvals.mark_executed(approval.id, action.action_id)
            except ApprovalConflict:
                # Used (or revoked) since the wait saw it approved: say which.
                approval = await self.approvals.get(approval.id) or approval
                return await self._refused(action, decision, approval)
            return await self._approved(action, decision, approval)
        if approval.status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED):
            # Undecided (Warden stopping, the caller gone), or approved as its caller left:
            # a deferral, or a grant the retry takes. Approved meanwhile, a pending
            # hold becomes that grant too (the store moves either), never stranded.
            deferred = await self.approvals.defer(approval.id)
            return _pending(decision, deferred or approval)
        return await self._refused(action, decision, approval)

    async def _wait(
        self,
        approval: Approval,
        timeout_s: float,
        *,
        expire: bool,
        connected: Callable[[], bool] | None = None,
    ) -> Approval:
        waiting = tasks.spawn(
            self.approvals.wait(approval.id, timeout_s, expire=expire),
            name="approval-wait",
            awaited=True,
        )
        stopping = tasks.spawn(self._stopping.wait(), name="approval-stopping", awaited=True)
        ends = {waiting, stopping}
        if connected is not None:
            ends.add(tasks.spawn(_left(connected), name="approval-caller", awaited=True))
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                if not end.done():
                    end.cancel()
        if waiting.done() and not waiting.cancelled():
            return waiting.result()
        return approval  # still pending: Warden is stopping, or the caller left

    async def _approved(self, action: Action, held: Decision, approval: Approval) -> Decision:
        who = ", ".join(v.subject for v in approval.votes if v.approve) or approval.decided_by
        switch = self._killswitches.check(action) if self._killswitches is not None else None
        if switch is not None:
            decision = _follow(held, Effect.DENY, (f"approved, but {switch.message}",))
        else:
            decision = _follow(held, Effect.ALLOW, (f"approved by {who} (approval {approval.id})",))
            if self._budgets is not None:
                await self._budgets.readmit(action, held.mode)
        await self._audit.record_decision(action, decision, approval=approval.evidence())
        return decision

    async def _refused(self, action: Action, held: Decision, approval: Approval) -> Decision:
        if approval.status is ApprovalStatus.EXPIRED:
            why = f"no one approved it within the hold time (approval {approval.id})"
        elif approval.status is ApprovalStatus.CONSUMED:
            # Approved, and the one call it lets through was another request of this call
            # (the agent's retry, at a sibling while this process was stalled).
            who = ", ".join(approval.approved_by) or approval.decided_by or "an approver"
            why = (
                f"approved by {who}, but that approval was already used by another "
                f"request for the same call; it lets one call through (approval {approval.id})"
            )
        elif approval.status is ApprovalStatus.REJECTED:
            by = approval.decided_by or "an approver"
            note = f": {approval.comment}" if approval.comment else ""
            why = f"rejected by {by}{note} (approval {approval.id})"
        else:
            why = f"approval {approval.id} is {approval.status.value}, not approved"
        decision = _follow(held, Effect.DENY, (*held.reasons, why))
        await self._audit.record_decision(action, decision, approval=approval.evidence())
        return decision


_CALLER_POLL_S: Final = 0.25


async def _left(connected: Callable[[], bool]) -> None:
    """Returns once the caller is gone. Polled: aiohttp tells a handler nothing of a
    closed connection unless every handler is cancelled with it."""
    while connected():  # noqa: ASYNC110 - no event exists to wait on (see above)
        await asyncio.sleep(_CALLER_POLL_S)


def _follow(held: Decision, effect: Effect, reasons: tuple[str, ...]) -> Decision:
    """A new decision that follows a held one; the approval guard made it."""
    return dataclasses.replace(
        held, decision_id=new_id("dec"), effect=effect, reasons=reasons, guard="approval"
    )


def _pending(decision: Decision, approval: Approval) -> Decision:
    note = (
        f"approval {approval.id} is pending; once a person approves it, "
        "the same call from this agent passes once"
    )
    return dataclasses.replace(decision, reasons=(*decision.reasons, note))
