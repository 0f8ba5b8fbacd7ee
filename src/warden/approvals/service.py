"""The approvals service the proxy calls: request, wait, grant, decide, cancel.

Two ways to hold an action for people, chosen per request by ``mode``:

* ``hold``: the proxy calls :meth:`Approvals.request` then
  :meth:`Approvals.wait`, keeping the agent's request open until a person
  decides or the timeout expires the approval (never approves it);
* ``defer``: the proxy answers the agent at once; when the agent retries the
  very same call after approval, :meth:`Approvals.take_grant` lets it
  through exactly once.

Every step is an audit record linked to the decision id: ``approval_requested``,
``approval_notified``, ``approval_decided`` (one per vote), ``approval_expired``,
``approval_cancelled`` (a kill switch, or the erasure of the action's data
subject) and ``approval_executed``.

Several sidecars may share one database: decisions are atomic in SQLite, and
a waiter is woken at once by a decision made in its own process and within
``poll_interval_s`` by one made elsewhere.

A hold is owned by the process keeping its request open
(:mod:`warden.approvals.owner`), and only that process ends it for lack of a
decision, when the hold time has passed on its monotonic clock: the wall
clocks of two sidecars may differ, and either may step. When that process is
gone (killed, even with ``SIGKILL``), the hold becomes a deferral: at start
for owners that are provably dead, and for the others once this process has
seen their heartbeat stand still for ``orphan_after_s``. Each process writes
its heartbeat from a task of its own, so a sweep that takes long (a backlog
of deferrals to expire) never makes it look gone. An agent retrying
the same call then waits on that approval again (:meth:`Approvals.adopt`) or,
once it is approved, passes once. A deferral outlives processes, so its
``expires_at`` is a wall-clock time, checked by whichever sidecar reads it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import rfc8785

from warden import tasks
from warden.admin.auth import Principal
from warden.approvals import metrics
from warden.approvals.model import (
    MAX_COMMENT,
    MODES,
    Approval,
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalSettings,
    ApprovalStatus,
    NotAnApprover,
    SelfApproval,
    TooManyPending,
    Vote,
    rfc3339,
)
from warden.approvals.notify import Delivery, Notifier
from warden.approvals.owner import Heartbeat, Owner, Watch
from warden.approvals.shown import MAX_CHARS, shorten
from warden.approvals.store import (
    ERASED_BY,
    ERASED_REASON,
    ApprovalRepo,
    ApprovalStore,
    ErasedApprovals,
    PagedApprovals,
    PageKey,
    page_key,
)
from warden.audit.record import action_body, arguments_digest, arguments_sha256
from warden.model import Action, Decision, new_id
from warden.ops import metrics as ops_metrics
from warden.pipeline import AuditSink
from warden.state.repos import APPROVALS, ChangeFeed, ErasedSubjects

__all__ = ["Approvals"]

log = logging.getLogger("warden.approvals")

FEED_BACKSTOP_S = 5.0
"""With a change feed, a waiter still re-reads its approval this often."""
EXPIRE_BATCH = 500
"""Deferrals one sweep expires at most (one statement); a backlog takes a few sweeps."""
KILL_SWITCH = "kill_switch"
"""``decided_by`` of approvals rejected because a kill switch was thrown."""
_ANSWERS: Final = "input_responses"
"""Where an MCP retry's answers are in a record, and in ``redacted`` entries."""


def _arguments_hash(arguments: Mapping[str, Any] | None) -> str:
    """The arguments' hash an approval binds to: RFC 8785's where it can write them (an
    auditor recomputes it), else the record's (a whole number past 2**53 - 1, such as a
    64-bit id, which RFC 8785 refuses; that was read as the approval store failing)."""
    return arguments_digest(arguments) or arguments_sha256(None)


class Approvals:
    """Human approval of high-impact actions; create with :meth:`open`."""

    def __init__(
        self,
        store: ApprovalRepo,
        audit: AuditSink,
        settings: ApprovalSettings,
        *,
        owner: Owner | None = None,
        feed: ChangeFeed | None = None,
        subjects: Callable[[Action], tuple[str, ...]] | None = None,
    ) -> None:
        """``subjects``: the keyed references of the data subjects an action names
        (:meth:`warden.audit.AuditLog.subject_refs`), kept with its approval for erasure."""
        self._subjects = subjects
        self._store = store
        self._feed = feed
        # Decisions made by other sidecars arrive on the feed; without one, waiters poll.
        self._poll_s = (
            settings.poll_interval_s
            if feed is None
            else max(settings.poll_interval_s, FEED_BACKSTOP_S)
        )
        self._watcher: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[bool]] = set()  # expiries with records under way
        self._audit = audit
        self.settings = settings
        owner = owner if owner is not None else Owner.current()
        # Other owners' heartbeats are timed on this process's own clock (owner.Watch).
        self.owner = owner if owner.watch is not None else dataclasses.replace(owner, watch=Watch())
        self._beats = Heartbeat()
        self._holds: dict[str, float] = {}
        """This process's holds: approval id -> when it runs out, on the monotonic clock."""
        self._notifier = Notifier(settings, self._record_delivery)
        # One event per approval someone in this process waits on; a decision
        # here sets and drops it, so waiters wake at once.
        self._events: dict[str, asyncio.Event] = {}
        # Set (and replaced) on every change made here or seen on the feed.
        self._change = asyncio.Event()
        self._gauge_labels: set[tuple[str, str]] = set()
        self._opening = asyncio.Lock()
        """Held while a new approval is checked for room and stored."""
        self._sweeper: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        state_url: str | ApprovalRepo,
        audit: AuditSink,
        settings: ApprovalSettings,
        *,
        owner: Owner | None = None,
        feed: ChangeFeed | None = None,
        subjects: Callable[[Action], tuple[str, ...]] | None = None,
    ) -> Approvals:
        """Open the approvals table, defer the holds of dead processes, start the sweeper.

        ``state_url`` is a ``sqlite:///`` URL or an open repository (any backend);
        ``feed`` wakes waiters when another sidecar decides.
        """
        store = await ApprovalStore.open(state_url) if isinstance(state_url, str) else state_url
        self = cls(store, audit, settings, owner=owner, feed=feed, subjects=subjects)
        try:
            await self._store.heartbeat(self.owner, self._beats.next())
            recovered = await self.recover()
            if recovered:
                log.warning(
                    "approvals: %d hold(s) of a stopped Warden became deferrals; "
                    "once approved, the agent's retry passes once",
                    recovered,
                )
            await self._refresh_gauge()
        except BaseException:
            await store.close()
            raise
        self._beater = tasks.spawn(self._beat(), name="approval-heartbeat")
        self._sweeper = tasks.spawn(self._sweep(), name="approval-sweep")
        if feed is not None:
            self._watcher = tasks.spawn(self._watch(feed), name="approval-watch")
        return self

    async def close(self) -> None:
        """Stop the sweeper, finish (or cancel) webhook deliveries, close the store."""
        if self._closed:
            return
        self._closed = True
        for task in (self._sweeper, self._beater, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # An expiry the sweep had started gets its record before the log closes.
        await asyncio.gather(*self._settling, return_exceptions=True)
        await self._notifier.close()
        for event in self._events.values():
            event.set()
        try:
            # Holds still open now have no request: without an owner row they
            # are deferred by the next Warden that starts (or sweeps).
            await self._store.release(self.owner)
        except Exception:
            log.warning("approvals: could not release this process's holds", exc_info=True)
        finally:
            await self._store.close()

    async def drain_notifications(self, timeout_s: float = 10.0) -> None:
        """Wait for webhook deliveries in flight (tests, orderly shutdown)."""
        await self._notifier.drain(timeout_s)

    # -- binding -----------------------------------------------------------------

    def binding(
        self,
        agent_id: str,
        tool: str,
        arguments: Mapping[str, Any] | None,
        *,
        upstream: str = "",
        method: str = "",
        context: Mapping[str, Any] | None = None,
        request_sha256: str | None = None,
        input_responses: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        approvers: Sequence[str] = (),
        required_approvals: int | None = None,
    ) -> str:
        """SHA-256 (hex) of the RFC 8785 JSON of agent, tool, the arguments' hash, the
        upstream, the method, the context, the request's hash, an MCP retry's
        answers' hash, the hash of the agent's token claims, and the approvers and
        quorum the policy asked for (each when there are).

        Any change to any argument (an amount, an account) gives another
        binding, and so does the same call to another upstream (a sandbox's
        approval on production), another method on the same path (a
        ``PATCH``'s approval on a ``DELETE``), for another context (the
        same reset for another customer, named by ``X-Warden-Context-*``) or,
        for an HTTP request Warden forwards, any other byte of its path,
        query or body, or other answers to an MCP server's questions: an
        approval never covers a different call. Nor does it cover the same
        call under another token (its claims may name another customer), or
        under a policy that now asks other approvers or more of them: their
        votes were cast under other terms.
        """
        doc: dict[str, Any] = {
            "agent": agent_id,
            "tool": tool,
            "arguments_sha256": _arguments_hash(arguments),
            "upstream": upstream,
            "method": method,
        }
        # Each left out when empty. (Approvals opened before request_sha256 was added
        # do not match a base-URL or ext_authz call again: it is always set there.)
        if context:
            doc["context"] = dict(context)
        if request_sha256:
            doc["request_sha256"] = request_sha256
        if input_responses:
            doc["input_responses_sha256"] = arguments_digest(input_responses)
        if claims:
            doc["claims_sha256"] = arguments_digest(claims)
        if approvers:
            doc["approvers"] = sorted(set(approvers))
        if required_approvals is not None:
            doc["required_approvals"] = required_approvals
        return hashlib.sha256(rfc8785.dumps(doc)).hexdigest()

    def _binding_of(self, action: Action, decision: Decision) -> str:
        request = action.request
        terms = decision.obligations
        return self.binding(
            action.agent.id,
            action.target,
            action.arguments,
            upstream=request.upstream,
            method=request.method,
            context=_bound(action.context, self.settings.bind_context),
            request_sha256=action.request_sha256,
            input_responses=action.input_responses,
            claims=_bound_claims(action.agent.claims, self.settings.bind_claims),
            approvers=terms.approvers,
            required_approvals=terms.required_approvals,
        )

    # -- the proxy's calls ---------------------------------------------------------

    async def request(
        self,
        action: Action,
        decision: Decision,
        *,
        mode: str,
        required_approvals: int | None = None,
    ) -> Approval:
        """Open a pending approval for ``action`` and notify approvers.

        In ``defer`` mode an agent retrying the same call while it is still
        pending gets the existing approval, not a new one. Raises
        :class:`~warden.errors.AuditError` when the request cannot be
        recorded: the proxy must then refuse the action.
        """
        if mode not in MODES:
            raise ValueError(f"approval mode must be hold or defer, not {mode!r}")
        # One at a time in this process: the room check and the insert must not
        # interleave, or the parallel calls of one response all find room.
        async with self._opening:
            approval, created = await self._open(action, decision, mode, required_approvals)
        if not created:
            return approval
        await self._refresh_gauge()
        self._notifier.notify("approval.requested", approval)
        return approval

    async def _open(
        self, action: Action, decision: Decision, mode: str, required_approvals: int | None
    ) -> tuple[Approval, bool]:
        """Record and store a new pending approval: it and ``True``, or a deferral reused."""
        now = time.time()
        binding = self._binding_of(action, decision)
        if mode == "defer":
            existing = await self._store.pending_for(binding, now)
            if existing is not None and existing.mode == "defer":
                return self._shown(existing), False
        await self._check_room(action.agent.id)
        ob = decision.obligations
        ttl = (ob.hold_timeout_s or self.settings.hold_timeout_s) if mode == "hold" else None
        # Approvers see no context: its redactions are the records', not this display's.
        shown = action_body(action, ob.redact, context=False)
        # Only the display is cut to size: the binding and hash above cover the whole call.
        budget = [MAX_CHARS]
        arguments, cut = shorten(
            shown["arguments"] if action.arguments is not None else shown["raw_arguments"],
            "",
            budget,
        )
        answers, cut_answers = shorten(shown.get("input_responses"), _ANSWERS, budget)
        approval = Approval(
            id=new_id("apr"),
            decision_id=decision.decision_id,
            action_id=action.action_id,
            agent_id=action.agent.id,
            tool=action.target,
            arguments=arguments,
            arguments_sha256=_arguments_hash(action.arguments),
            binding=binding,
            mode=mode,
            reason=decision.reason,
            risk=ob.risk,
            approvers=ob.approvers,
            # The configured quorum is the least: a policy may ask more people, not fewer.
            required_approvals=max(required_approvals or 1, self.settings.required_approvals),
            redacted=(*shown["redacted"], *cut, *cut_answers),
            created_at=now,
            expires_at=now + (ttl if ttl is not None else self.settings.defer_ttl_s),
            owner=self.owner.instance if mode == "hold" else None,
            upstream=action.request.upstream,
            method=action.request.method,
            subjects=self._subjects(action) if self._subjects is not None else (),
            answers=answers,
        )
        # Record first: a request on file without a row is harmless; a pending
        # row nobody can prove was requested is not.
        await self._record(
            "approval_requested",
            approval,
            {
                "action_id": approval.action_id,
                "agent": approval.agent_id,
                "tool": approval.tool,
                "mode": approval.mode,
                "reason": approval.reason,
                "risk": approval.risk,
                "approvers": list(approval.approvers),
                "required_approvals": approval.required_approvals,
                "expires_at": rfc3339(approval.expires_at),
            },
        )
        room = self.settings.max_pending_per_agent
        if not await self._store.insert(approval, room=room):
            # Another sidecar opened one for this agent since the check above.
            raise _too_many(action.agent.id, room, room)
        if ttl is not None:
            self._holds[approval.id] = time.monotonic() + ttl
        return approval, True

    async def wait(self, approval_id: str, timeout_s: float, *, expire: bool = True) -> Approval:
        """Wait until the approval is decided, or expire it after ``timeout_s``.

        Returns the approval as it then is: ``approved``, ``rejected`` or
        ``expired`` (also ``consumed`` if someone used it meanwhile; still
        ``pending`` when the service is closing, or at the timeout when not
        ``expire``). A timeout never approves, and expires only a hold of this
        process: one a sibling deferred meanwhile (this process looked gone),
        or that another sidecar holds now, is returned still ``pending``.
        Raises :class:`ApprovalNotFound` for an unknown id.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        try:
            while True:
                event = self._events.setdefault(approval_id, asyncio.Event())
                approval = await self._store.get(approval_id)
                if approval is None:
                    raise ApprovalNotFound(f"no approval {approval_id!r}")
                if approval.status is not ApprovalStatus.PENDING:
                    return approval
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # The event wakes us for decisions made here; the timeout is
                # the poll for decisions made by other sidecars.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(self._poll_s, remaining))
                if self._closed:  # shutting down: the approval stays pending in the store
                    return approval
        finally:
            self._events.pop(approval_id, None)
        if not expire or approval.mode != "hold" or approval.owner != self.owner.instance:
            return approval
        # The update checks again that it is still this process's hold.
        expired = await self._store.expire(approval_id, time.time(), owner=self.owner.instance)
        if expired is None:  # decided, or deferred by a sibling, in the meantime
            final = await self._store.get(approval_id)
            assert final is not None
            return final
        await self._expired(expired)
        return expired

    async def take_grant(self, action: Action, decision: Decision) -> Approval | None:
        """Use a defer-mode approval for exactly this call, once; ``None`` when there is none.

        Matches only an ``approved``, unconsumed, unexpired approval whose
        binding is this agent, tool and arguments (and the approvers and quorum
        ``decision``, the retry's own, asks for), and marks it consumed in
        the same transaction, so two retries (even on two sidecars) cannot
        both pass.
        """
        grant = await self._store.consume_grant(self._binding_of(action, decision), time.time())
        if grant is not None:
            await self._executed(grant, action.action_id)
        return grant

    async def adopt(
        self, action: Action, decision: Decision, hold_timeout_s: float
    ) -> Approval | None:
        """Hold a pending deferral for exactly this call again, if there is one.

        The agent retried a call whose hold was lost (Warden stopped or was
        killed): it waits on that approval instead of raising a second one.
        The caller waits with ``expire=False`` and defers it again when the
        wait ends undecided, so the deferral keeps its time to be decided.
        """
        now = time.time()
        adopted = await self._store.adopt(
            self._binding_of(action, decision), self.owner.instance, now, now + hold_timeout_s
        )
        if adopted is not None:
            # It keeps the deferral's time (never less than the hold's), counted from here on.
            self._holds[adopted.id] = time.monotonic() + max(0.0, adopted.expires_at - now)
        return adopted

    async def recover(self) -> int:
        """Defer the holds of processes that are gone; return how many.

        Runs at :meth:`open` and with every sweep; see :mod:`warden.approvals.owner`.
        """
        now = time.time()
        recovered = await self._store.recover(
            self.owner, now, self.settings.orphan_after_s, now + self.settings.defer_ttl_s
        )
        for approval in recovered:
            await self._record(
                "approval_deferred",
                approval,
                {
                    "reason": "the Warden process holding the request is gone",
                    "status": approval.status.value,
                    "expires_at": rfc3339(approval.expires_at),
                },
            )
        return len(recovered)

    async def defer(self, approval_id: str) -> Approval | None:
        """A hold whose request is gone (Warden stopping, the agent gone) becomes deferred.

        It stays decidable, now for ``defer_ttl_s``; once approved, the same
        call from the same agent passes once. A hold approved as its request
        went (not yet used) becomes that grant at once. ``None`` when it was
        neither pending nor so approved. Recorded (``approval_deferred``), as
        :meth:`recover` records the holds of processes that are gone.
        """
        self._holds.pop(approval_id, None)
        # Not a hold another sidecar adopted since a sibling deferred it (this process
        # looked gone): that one's request is still open there.
        deferred = await self._store.to_defer(
            approval_id, time.time() + self.settings.defer_ttl_s, owner=self.owner.instance
        )
        if deferred is not None:
            await self._record(
                "approval_deferred",
                deferred,
                {
                    "reason": "the request holding it is gone (the agent left, or Warden stopped)",
                    "status": deferred.status.value,
                    "expires_at": rfc3339(deferred.expires_at),
                },
            )
        return deferred

    async def mark_executed(self, approval_id: str, action_id: str | None = None) -> Approval:
        """Consume an approved hold-mode approval as its action goes through.

        Raises :class:`ApprovalConflict` when it is not (or no longer) approved.
        """
        used = await self._store.consume(approval_id, time.time())
        if used is None:
            found = await self._store.get(approval_id)
            if found is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
            raise ApprovalConflict(f"approval {approval_id} is {found.status.value}, not approved")
        await self._executed(used, action_id or used.action_id)
        return used

    # -- people's calls --------------------------------------------------------------

    async def decide(
        self, approval_id: str, who: Principal, approve: bool, comment: str
    ) -> Approval:
        """Record one person's vote; return the approval after it.

        Raises :class:`ApprovalNotFound`; :class:`ApprovalConflict` when it
        is no longer pending (or has just expired), or this person already
        voted; :class:`SelfApproval` when ``who.subject`` is the requesting
        agent; :class:`NotAnApprover` when the decision names approver groups
        and ``who`` is in none of them. A subject belongs to a group when the
        group's name equals its subject or one of its roles.
        """
        if len(comment) > MAX_COMMENT:
            raise ValueError(f"comment is longer than {MAX_COMMENT} characters")
        approval = await self._store.get(approval_id)
        if approval is None:
            raise ApprovalNotFound(f"no approval {approval_id!r}")
        if who.subject == approval.agent_id:
            raise SelfApproval(f"{who.subject} cannot decide its own agent's actions")
        if approval.approvers and not _member(who, approval.approvers):
            groups = ", ".join(approval.approvers)
            raise NotAnApprover(f"{who.subject} is not in the approver groups {groups}")
        if self._hold_ran_out(approval_id):
            # This process's hold, out of time: its waiter is about to expire it.
            expired = await self._expire_hold(approval_id)
            if expired is not None:
                raise ApprovalConflict(f"approval {approval_id} expired before this decision")
        # The quorum configured now, not only the one the approval was opened with: raising
        # approvals.required_approvals holds for approvals already waiting (apply_vote).
        vote = Vote(who.subject, approve, comment, time.time(), self.settings.required_approvals)
        before, after = await self._store.vote(approval_id, vote)
        if after.status is ApprovalStatus.EXPIRED:
            await self._expired(after)
            raise ApprovalConflict(f"approval {approval_id} expired before this decision")
        await self._record(
            "approval_decided",
            after,
            {
                "who": who.subject,
                "roles": sorted(who.roles),
                "verdict": "approved" if approve else "rejected",
                "at": rfc3339(vote.at),
                "comment": comment,
                "status": after.status.value,
                "approvals": len(after.approved_by),
                "required_approvals": after.required_approvals,
            },
        )
        if after.status is not before.status:
            self._finished(after)
            self._notifier.notify(f"approval.{after.status.value}", after)
            await self._refresh_gauge()
        return after

    async def cancel_all_for(
        self,
        *,
        agent: str | None = None,
        tool: str | None = None,
        upstream: str | None = None,
        reason: str,
    ) -> int:
        """Reject the pending approvals of an agent, tool and/or upstream (every one when
        all are None), and the approved ones not used yet.

        For kill switches: held agents are woken and refused, and no grant
        outlives the switch. Returns how many approvals were rejected.
        """
        cancelled = await self._store.cancel(
            agent, tool, KILL_SWITCH, reason, time.time(), upstream=upstream
        )
        for approval in cancelled:
            self._finished(approval)
            self._notifier.notify("approval.rejected", approval)
            await self._record(
                "approval_cancelled",
                approval,
                {"who": KILL_SWITCH, "reason": reason, "at": rfc3339(approval.decided_at or 0)},
            )
        if cancelled:
            await self._refresh_gauge()
        return len(cancelled)

    async def erase(self, erased: ErasedSubjects) -> ErasedApprovals:
        """Erase a data subject from the approvals (GDPR / CCPA erasure).

        Approvals whose display arguments name the subject keep their ids and
        status but lose their arguments and argument hashes; those still
        pending, or approved and not used, are rejected first, as a kill switch
        rejects them: nothing may act for an erased subject, and a held agent
        is woken and refused (see :meth:`ApprovalRepo.erase`).
        """
        done = await self._store.erase(erased, time.time())
        for approval in done.revoked:
            self._finished(approval)
            self._notifier.notify("approval.rejected", approval)
            await self._record(
                "approval_cancelled",
                approval,
                {
                    "who": ERASED_BY,
                    "reason": ERASED_REASON,
                    "at": rfc3339(approval.decided_at or 0),
                },
            )
        if done.revoked:
            await self._refresh_gauge()
        elif done.erased:
            self._changed()
        return done

    async def list(self, status: str | None = None) -> builtins.list[Approval]:
        """Approvals with ``status`` (every one when ``None``), oldest first.

        Raises ``ValueError`` for an unknown status.
        """
        if status is not None and status not in ApprovalStatus.__members__.values():
            raise ValueError(f"unknown approval status {status!r}")
        found = await self._store.list(ApprovalStatus(status) if status is not None else None)
        return [self._shown(a) for a in found]

    async def page(
        self, *, pending: bool, limit: int, after: PageKey | None = None
    ) -> builtins.list[Approval]:
        """At most ``limit`` approvals that sort after ``after``: the pending ones oldest
        first, or (``pending`` false) those that ended or were approved, the last decided
        first. For views that must not read the whole store at once: the next page is
        asked for after the :func:`~warden.approvals.store.page_key` of the last one
        shown, so approvals decided meanwhile make no other skip a page."""
        if isinstance(self._store, PagedApprovals):
            found = await self._store.page(pending=pending, limit=limit, after=after)
        elif pending:  # a store that cannot page reads them all
            found = [
                a
                for a in await self._store.list(ApprovalStatus.PENDING)
                if after is None or page_key(a, pending=True) > after
            ][:limit]
        else:
            ended = [
                a
                for a in await self._store.list()
                if a.status is not ApprovalStatus.PENDING
                and (after is None or page_key(a, pending=False) < after)
            ]
            ended.sort(key=lambda a: page_key(a, pending=False), reverse=True)
            found = ended[:limit]
        return [self._shown(a) for a in found]

    async def pending_count(self) -> int:
        """How many approvals are pending, in the shared store."""
        return sum((await self._store.pending_counts()).values())

    async def get(self, approval_id: str) -> Approval | None:
        """One approval by id, or ``None``."""
        found = await self._store.get(approval_id)
        return self._shown(found) if found is not None else None

    def _shown(self, approval: Approval) -> Approval:
        """A pending approval with the quorum it now needs: its own, or the configured
        one when that was raised since it was opened (see :meth:`decide`)."""
        need = self.settings.required_approvals
        if approval.status is not ApprovalStatus.PENDING or approval.required_approvals >= need:
            return approval
        return dataclasses.replace(approval, required_approvals=need)

    async def pending_for(self, action: Action, decision: Decision) -> Approval | None:
        """The pending approval the gate opened (or reused) for exactly this call, if any.

        For doors that answer a deferred call with its approval's id (the
        gRPC ``Check``, ext_authz): the newest pending one with its binding.
        """
        binding = self._binding_of(action, decision)
        pending = await self._store.list(ApprovalStatus.PENDING)
        return next((a for a in reversed(pending) if a.binding == binding), None)

    async def expire_due(self, *, limit: int = EXPIRE_BATCH) -> int:
        """Expire the approvals whose time ran out; the sweeper calls this.

        This process's holds, once their hold time has passed on its monotonic
        clock (the waiter expires them too; this catches one nobody waits on).
        Deferrals past their ``expires_at`` by this host's wall clock: they
        outlive processes, so no monotonic clock spans them. Never another
        process's hold: its owner counts its time, and when the owner is gone
        :meth:`recover` defers it instead.

        At most ``limit`` deferrals a call (a backlog takes a few sweeps): the
        due ones' ids are read (deferrals not yet due are not), then each is
        expired, checked again by its own update (one adopted meanwhile, another
        sidecar's live hold now, or given more time is left alone), and its
        record queued before the next: a sweep cut short by a stop leaves no
        expiry unrecorded. None while the audit log cannot take their records.
        """
        if not getattr(self._audit, "writable", True):
            return 0  # an expiry is not taken without its record; the next sweep tries
        clock = time.monotonic()
        count = 0
        for approval_id in [aid for aid, ends in self._holds.items() if ends <= clock]:
            if await self._expire_hold(approval_id) is not None:
                count += 1
        now = time.time()
        expired = 0
        for approval_id in await self._store.due_deferrals(now, limit):
            # Shielded, and awaited by close(): a stop while the update is in flight
            # (it commits all the same) must not leave the expiry without its record.
            pair = tasks.spawn(self._expire_deferral(approval_id, now), name="approval-expiry")
            self._settling.add(pair)
            pair.add_done_callback(self._settling.discard)
            if await asyncio.shield(pair):
                expired += 1
        if expired:
            await self._refresh_gauge()
        return count + expired

    async def _expire_deferral(self, approval_id: str, now: float) -> bool:
        approval = await self._store.expire_deferral(approval_id, now)
        if approval is None:
            return False
        await self._expired(approval, gauge=False)
        return True

    async def prune(self) -> int:
        """Delete approvals that ended over ``keep_decided_s`` ago; the sweeper calls this.

        Their display arguments (personal data among them) then leave the
        store; the audit log keeps the approval records, sealed and erasable.
        """
        pruned = await self._store.prune(time.time() - self.settings.keep_decided_s)
        metrics.PRUNED.inc(pruned)
        return pruned

    # -- internals -------------------------------------------------------------------

    def _hold_ran_out(self, approval_id: str) -> bool:
        ends = self._holds.get(approval_id)
        return ends is not None and ends <= time.monotonic()

    async def _expire_hold(self, approval_id: str) -> Approval | None:
        """Expire this process's hold (``None``: it was decided or deferred meanwhile)."""
        self._holds.pop(approval_id, None)
        expired = await self._store.expire(approval_id, time.time(), owner=self.owner.instance)
        if expired is not None:
            await self._expired(expired)
        return expired

    async def _expired(self, approval: Approval, *, gauge: bool = True) -> None:
        self._finished(approval)
        self._notifier.notify("approval.expired", approval)
        await self._record(
            "approval_expired", approval, {"at": rfc3339(approval.decided_at or time.time())}
        )
        if gauge:
            await self._refresh_gauge()

    async def _executed(self, approval: Approval, action_id: str) -> None:
        metrics.OUTCOMES.labels(ApprovalStatus.CONSUMED.value).inc()
        await self._record(
            "approval_executed",
            approval,
            {
                "action_id": action_id,
                "approved_by": list(approval.approved_by),
                "at": rfc3339(approval.consumed_at or time.time()),
            },
        )

    def _finished(self, approval: Approval) -> None:
        """Metrics for a final verdict, and wake this process's waiters."""
        metrics.OUTCOMES.labels(approval.status.value).inc()
        metrics.DECISION_SECONDS.observe(approval.waiting_s())
        self._holds.pop(approval.id, None)
        event = self._events.pop(approval.id, None)
        if event is not None:
            event.set()

    def _changed(self) -> None:
        change, self._change = self._change, asyncio.Event()
        change.set()

    def next_change(self) -> asyncio.Event:
        """An event set at the next change of any approval, here or (with a change
        feed) on another sidecar. Take it before reading, then wait on it: a change
        made while reading is not missed. Without a feed, other sidecars' changes
        are not signalled: callers keep a poll as the backstop."""
        return self._change

    async def _record(self, kind: str, approval: Approval, extra: Mapping[str, Any]) -> None:
        self._changed()  # every change of an approval is recorded, after the store has it
        body = {
            "approval_id": approval.id,
            "decision_id": approval.decision_id,
            # Every record of an approval names its agent and tool: an evidence
            # package for one agent (export --agent) keeps the people's votes.
            "agent": approval.agent_id,
            "tool": approval.tool,
            "arguments_sha256": approval.arguments_sha256,
            "binding": approval.binding,
            **extra,
        }
        await self._audit.append(kind, body)

    async def _record_delivery(self, d: Delivery) -> None:
        await self._audit.append(
            "approval_notified",
            {
                "approval_id": d.approval_id,
                "decision_id": d.decision_id,
                "event": d.event,
                "result": "ok" if d.ok else "failed",
                "attempts": d.attempts,
                "status": d.status,
                "error": d.error,
            },
        )

    async def _check_room(self, agent_id: str) -> None:
        """Raise :class:`TooManyPending` when the agent has its fill of waiting approvals."""
        limit = self.settings.max_pending_per_agent
        if not limit:
            return
        counts = await self._store.pending_counts()  # every sidecar's, from the store
        waiting = sum(n for (agent, _tool), n in counts.items() if agent == agent_id)
        if waiting >= limit:
            raise _too_many(agent_id, waiting, limit)

    async def _refresh_gauge(self) -> None:
        # Read from the shared store, so the gauge counts decisions made by
        # every sidecar, not only this one.
        counts = await self._store.pending_counts()
        shown: dict[tuple[str, str], int] = {}
        for (agent, tool), n in counts.items():
            # Tool names and paths come from agents: bounded like every other label.
            key = (ops_metrics.bounded("agent", agent), ops_metrics.bounded("tool", tool))
            shown[key] = shown.get(key, 0) + n
        for labels in self._gauge_labels - shown.keys():
            with contextlib.suppress(KeyError):
                metrics.PENDING.remove(*labels)  # none waiting: the series goes
        for labels, n in shown.items():
            metrics.PENDING.labels(*labels).set(n)
        self._gauge_labels = set(shown)
        # For the "approvals waiting too long" alert: one row's time, not every row.
        oldest = await self._store.oldest_pending() if counts else None
        ops_metrics.oldest_pending_approval(oldest)

    async def _watch(self, feed: ChangeFeed) -> None:
        # Wake the waiters of an approval another sidecar changed; they re-read it.
        with feed.watch(APPROVALS) as changes:
            while True:
                change = await changes.get()
                self._changed()
                if change.key is None:
                    woken = list(self._events)
                else:
                    woken = [change.key] if change.key in self._events else []
                for approval_id in woken:
                    event = self._events.pop(approval_id, None)
                    if event is not None:
                        event.set()

    def _tick(self) -> float:
        # Well within orphan_after_s: siblings recover holds once they see that stand still.
        return min(self.settings.sweep_interval_s, self.settings.orphan_after_s / 3)

    async def _beat(self) -> None:
        # A task of its own, not a step of the sweep: a sweep that takes long (a backlog
        # of deferrals, a slow audit disk) must not keep the heartbeat still, or
        # siblings would take this process's live holds for lost ones.
        while True:
            await asyncio.sleep(self._tick())
            try:
                await self._store.heartbeat(self.owner, self._beats.next())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("approvals: could not write this process's heartbeat", exc_info=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._tick())
            try:
                await self.recover()
                await self.expire_due()
                await self.prune()
                await self._refresh_gauge()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not expire overdue approvals")


def _member(who: Principal, groups: tuple[str, ...]) -> bool:
    # A token's own groups first; a role or subject of the same name also
    # counts (group "approver" = every token with the approver role).
    return any(g in who.groups or g == who.subject or g in who.roles for g in groups)


def _bound(context: Mapping[str, Any], keys: tuple[str, ...] | None) -> Mapping[str, Any]:
    """The part of ``context`` an approval is bound to (``approvals.bind_context``)."""
    if keys is None:
        return context
    return {k: v for k, v in context.items() if k in keys}


_TOKEN_CLAIMS: Final = frozenset(
    {"exp", "iat", "nbf", "jti", "auth_time", "nonce", "at_hash", "c_hash", "uti", "aio", "rh"}
)
"""Claims that differ from one token to the next for the same agent and grant (RFC 7519,
OpenID Connect; Microsoft Entra ID's ``uti``, ``aio`` and ``rh``)."""


def _bound_claims(claims: Mapping[str, Any], keys: tuple[str, ...] | None) -> Mapping[str, Any]:
    """The token claims an approval is bound to (``approvals.bind_claims``; default: all
    but the token's own times and ids)."""
    if not claims:
        return claims
    if keys is None:
        return {k: v for k, v in claims.items() if k not in _TOKEN_CLAIMS}
    return {k: v for k, v in claims.items() if k in keys}


def _too_many(agent_id: str, waiting: int, limit: int) -> TooManyPending:
    return TooManyPending(
        f"agent {agent_id!r} already has {waiting} approvals waiting "
        f"(approvals.max_pending_per_agent: {limit})"
    )
