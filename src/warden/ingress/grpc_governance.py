"""Warden's own gRPC API, ``warden.v1.Governance``: converts, asks the core, answers.

``Check`` turns a request into an :class:`~warden.model.Action` for the
proven agent and calls :meth:`Governor.decide` (the same guards, approvals
and audit record as every door); ``ReportOutcome`` records a trusted
outcome for a decision this process made. The admin calls reuse the admin
API's services (:class:`~warden.approvals.service.Approvals`,
:class:`~warden.killswitch.KillSwitches`) and its bearer tokens and roles.
``TailRecords`` reads the audit log's segments from a position.

Who is asking comes from gRPC metadata: ``x-warden-agent``,
``x-warden-agent-key`` and ``x-warden-agent-token`` for agents (as the HTTP
proxy's headers), ``authorization: Bearer`` for people. Credentials are
never logged, recorded or echoed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from multidict import CIMultiDict

from warden import tasks
from warden.admin.auth import Principal, TokenAuth
from warden.approvals.model import (
    MAX_COMMENT,
    Approval,
    ApprovalConflict,
    ApprovalForbidden,
    ApprovalNotFound,
    ApprovalStatus,
)
from warden.approvals.service import Approvals
from warden.approvals.store import STORE_ERRORS
from warden.audit.segments import LogDamaged
from warden.audit.tail import RecordTail
from warden.config import Config
from warden.core import RESERVED_CALL_IDS
from warden.errors import (
    AuditError,
    Forbidden,
    Overloaded,
    RequestError,
    Unauthenticated,
    WardenError,
)
from warden.grpc_api import ERROR_CODE
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.identity import Identity
from warden.ingress import grpc_messages as msg
from warden.ingress import headers as hdr
from warden.killswitch import (
    MAX_REASON,
    KillSwitches,
    KillSwitchNotSaved,
    Scope,
    target_problem,
)
from warden.model import Action, Agent, Decision, Effect, Outcome, RequestMeta
from warden.sessions import door_conversation
from warden.state.links import Link

if TYPE_CHECKING:
    import grpc.aio

    from warden.core import Governor

__all__ = ["SERVICE_NAME", "GovernanceService", "RecordSource"]

log = logging.getLogger("warden.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Governance"].full_name
_CONVERT_IN_THREAD_BYTES = 256 * 1024
"""An action this large is converted off the event loop (about 85 ms of Python per MiB of
small numbers)."""
OUTCOME_KEY = RESERVED_CALL_IDS[0]
"""Prefix of an allowed ``Check``'s key among the core's call links (``ReportOutcome``)."""
WATCH_BACKSTOP_S = 2.0
"""How often ``WatchApprovals`` re-reads the store when nothing signalled a change."""
TAIL_BACKSTOP_S = 1.0
"""How often a following ``TailRecords`` looks anyway when its source signals writes."""
_TAIL_BATCH = 512

_READERS = frozenset({"approver", "auditor", "viewer", "admin"})
_APPROVERS = frozenset({"approver"})
_ADMINS = frozenset({"admin"})
_SWITCH_READERS = frozenset({"admin", "auditor", "viewer"})
_AUDITORS = frozenset({"auditor", "admin"})
_STATUSES = frozenset(s.value for s in ApprovalStatus)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Context = grpc.aio.ServicerContext[_Req, _Resp]


class RecordSource:
    """Where ``TailRecords`` reads: the audit directory, how many records are written,
    and an event set at the next write, so a follower need not poll."""

    def __init__(
        self,
        directory: Path,
        size: Callable[[], int],
        next_write: Callable[[], asyncio.Event],
    ) -> None:
        self.directory = directory
        self.size = size
        self.next_write = next_write


class GovernanceService:
    """The ``warden.v1.Governance`` service on the gRPC listener (a ``GrpcService``)."""

    service_names: tuple[str, ...] = (SERVICE_NAME,)

    def __init__(
        self,
        config: Config,
        core: Governor,
        *,
        approvals: Approvals,
        killswitches: KillSwitches,
        records: RecordSource,
        auth: TokenAuth | None = None,
    ) -> None:
        self._servicer = _Servicer(
            config,
            core,
            approvals=approvals,
            killswitches=killswitches,
            records=records,
            auth=auth if auth is not None else TokenAuth(config.admin.tokens),
        )

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the servicer."""
        pb_grpc.add_GovernanceServicer_to_server(self._servicer, server)

    async def close(self) -> None:
        """End the streams (``WatchApprovals``, ``TailRecords``) so the listener can stop."""
        self._servicer.closing.set()


def _metadata(context: Context[Any, Any]) -> CIMultiDict[str]:
    """The call's metadata as case-insensitive headers; binary (``-bin``) values are skipped."""
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out.add(key, value)
    return out


_MAX_DETAILS = 1024
"""A status message echoes the caller's ids: unbounded, a 100 KB id passed the trailers'
size limit and the caller got ``RESOURCE_EXHAUSTED`` instead of the reason."""


async def _abort(context: Context[Any, Any], code: grpc.StatusCode, message: str) -> NoReturn:
    if len(message) > _MAX_DETAILS:
        message = message[: _MAX_DETAILS - 1] + "…"
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


class _Servicer(pb_grpc.GovernanceServicer):
    def __init__(
        self,
        config: Config,
        core: Governor,
        *,
        approvals: Approvals,
        killswitches: KillSwitches,
        records: RecordSource,
        auth: TokenAuth,
    ) -> None:
        self._core = core
        self._approvals = approvals
        self._switches = killswitches
        self._records = records
        self._auth = auth
        self._identity = Identity(config)
        self._reporters = {r: frozenset(a) for r, a in config.grpc.outcome_reporters.items()}
        self.closing = asyncio.Event()

    # -- who is asking -----------------------------------------------------------

    async def _agent(
        self, context: Context[Any, Any], headers: CIMultiDict[str], claimed: str
    ) -> Agent:
        if claimed:
            named = headers.get(hdr.AGENT_HEADER)
            if len(headers.getall(hdr.AGENT_HEADER, ())) > 1:
                # Layers in front may read either copy: refused, as identity refuses it.
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{hdr.AGENT_HEADER} must be sent once",
                )
            if named is not None and named.strip() != claimed:
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"agent_id {claimed!r} is not the agent the metadata names",
                )
            headers = headers.copy()
            headers[hdr.AGENT_HEADER] = claimed
        try:
            return await self._identity.resolve(headers)
        except Unauthenticated as exc:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except Forbidden as exc:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except RequestError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _person(self, context: Context[Any, Any], roles: frozenset[str]) -> Principal:
        who = self._auth.authenticate(_metadata(context).get("authorization"))
        if who is None:
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid admin token is required (metadata authorization: Bearer <token>)",
            )
        if not who.roles & roles:
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this call needs the role {' or '.join(sorted(roles))}",
            )
        return who

    # -- agents ------------------------------------------------------------------

    async def Check(self, request: pb.CheckRequest, context: Context[Any, Any]) -> pb.CheckResponse:
        headers = _metadata(context)
        agent = await self._agent(context, headers, request.agent_id)
        meta = RequestMeta(
            method="Check",
            upstream=msg.DEFAULT_PROTOCOL,
            path=f"/{SERVICE_NAME}/Check",
            headers=hdr.recordable(headers),
            # input.session: counters by x-warden-session metadata, else the request's.
            conversation=door_conversation(headers, request.session_id, "check"),
        )
        context_ = hdr.context_from(headers)
        try:
            if request.action.ByteSize() > _CONVERT_IN_THREAD_BYTES:
                # Protobuf Structs convert slowly in Python: a big one would stall the loop.
                action = await asyncio.to_thread(
                    msg.action_from, request.action, agent, meta, context_
                )
            else:
                action = msg.action_from(request.action, agent, meta, context_)
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        decision = await _decided(context, self._core.decide(action, hold=_hold(request.wait)))
        approval_id = ""
        if decision.enforced is Effect.REQUIRE_APPROVAL:
            approval_id = await self._pending_approval(action, decision)
        elif decision.enforced is Effect.ALLOW:
            # Kept with the core's call links (the state store, batched off this
            # path), so an outcome reported after a restart, or to another
            # sidecar on the same store, still finds its decision.
            key = OUTCOME_KEY + decision.decision_id
            self._core.links.link(key, Link(action, decision.decision_id))
        return msg.check_response(decision, approval_id, agent.id)

    async def _pending_approval(self, action: Action, decision: Decision) -> str:
        """The pending approval the gate opened (or reused) for exactly this call."""
        approval = await self._approvals.pending_for(action, decision)
        return approval.id if approval is not None else ""

    async def ReportOutcome(
        self, request: pb.ReportOutcomeRequest, context: Context[Any, Any]
    ) -> pb.ReportOutcomeResponse:
        agent = await self._agent(context, _metadata(context), "")
        if not 0 <= request.latency_ms < math.inf:  # NaN fails both
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "latency_ms must be a finite number >= 0"
            )
        key = OUTCOME_KEY + request.decision_id
        links = self._core.links
        found, unknown = links.take([key])
        if unknown:  # not in this process's memory: decided before a restart, or elsewhere
            found = await links.take_stored(unknown)
        allowed = found.get(key)
        if allowed is None:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no allowed decision {request.decision_id!r} awaits an outcome "
                "(unknown, already reported, or older than a day)",
            )
        owner = allowed.action.agent.id
        # A runner named for the agent is trusted: its failure releases caps. The
        # agent's own report is its word (budgets.trust_agent_results decides).
        trusted = owner in self._reporters.get(agent.id, ())
        if owner != agent.id and not trusted:
            links.link(key, allowed)  # still the other agent's to report
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"decision {request.decision_id} is agent {owner!r}'s, not {agent.id!r}'s, "
                "and grpc.outcome_reporters does not name it a runner for that agent",
            )
        if request.error and not ERROR_CODE.fullmatch(request.error):
            links.link(key, allowed)
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "error must be a short code ([A-Za-z0-9_.:-], at most 64 characters); "
                "put the details in result, which is sealed with the customer's key",
            )
        outcome = Outcome(
            result=request.result,
            is_error=request.is_error or bool(request.error),
            error=request.error or None,
            latency_ms=request.latency_ms,
            reported_by="runner" if trusted else "agent",
        )
        self._core.outcome(allowed.action, allowed.decision_id, outcome, trusted=trusted)
        return pb.ReportOutcomeResponse()

    # -- approvals ---------------------------------------------------------------

    async def ListApprovals(
        self, request: pb.ListApprovalsRequest, context: Context[Any, Any]
    ) -> pb.ListApprovalsResponse:
        await self._person(context, _READERS)
        if request.status and request.status not in _STATUSES:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"status must be one of {', '.join(sorted(_STATUSES))}",
            )
        found = await self._approvals.list(request.status or None)
        return pb.ListApprovalsResponse(approvals=[msg.approval_message(a) for a in found])

    async def WatchApprovals(
        self, request: pb.WatchApprovalsRequest, context: Context[Any, Any]
    ) -> AsyncIterator[pb.ApprovalEvent]:
        await self._person(context, _READERS)
        await context.send_initial_metadata(())  # the watch is on: the client may act now
        change = self._approvals.next_change()
        known = {a.id: a for a in await self._approvals.list(ApprovalStatus.PENDING.value)}
        for approval in known.values():
            yield _event(pb.ApprovalEvent.KIND_EXISTING, approval)
        # Woken by every change made here and, through the state store's change
        # feed, by other sidecars'; the poll is the backstop for a store without one.
        interval = max(self._approvals.settings.poll_interval_s, WATCH_BACKSTOP_S)
        while not await _changed_or_closing(change, self.closing, interval):
            change = self._approvals.next_change()
            now = {a.id: a for a in await self._approvals.list(ApprovalStatus.PENDING.value)}
            for approval_id, approval in now.items():
                before = known.get(approval_id)
                if before is None:
                    yield _event(pb.ApprovalEvent.KIND_REQUESTED, approval)
                elif len(before.votes) != len(approval.votes):
                    yield _event(pb.ApprovalEvent.KIND_CHANGED, approval)
            for approval_id in known.keys() - now.keys():
                final = await self._approvals.get(approval_id)
                if final is not None:
                    yield _event(pb.ApprovalEvent.KIND_CHANGED, final)
            known = now

    async def DecideApproval(
        self, request: pb.DecideApprovalRequest, context: Context[Any, Any]
    ) -> pb.Approval:
        who = await self._person(context, _APPROVERS)
        if len(request.comment) > MAX_COMMENT:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"comment must be at most {MAX_COMMENT} characters",
            )
        try:
            after = await self._approvals.decide(
                request.approval_id, who, request.approve, request.comment
            )
        except ApprovalNotFound as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except ApprovalConflict as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ApprovalForbidden as exc:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except AuditError as exc:
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the decision is stored but not recorded: {exc}",
            )
        return msg.approval_message(after)

    # -- kill switches -----------------------------------------------------------

    async def SetKillSwitch(
        self, request: pb.SetKillSwitchRequest, context: Context[Any, Any]
    ) -> pb.KillSwitch:
        who = await self._person(context, _ADMINS)
        if request.scope not in {s.value for s in Scope}:
            scopes = ", ".join(s.value for s in Scope)
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"scope must be one of {scopes}"
            )
        scope = Scope(request.scope)
        target = "*" if scope is Scope.GLOBAL else request.target
        if scope is not Scope.GLOBAL and (problem := target_problem(scope, target)) is not None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        reason = request.reason.strip()
        if not reason or len(reason) > MAX_REASON:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"reason must be a non-empty text of at most {MAX_REASON} characters",
            )
        try:
            switch = await self._switches.set(scope, target, reason, who.subject)
        except KillSwitchNotSaved as exc:  # in force here, saved in the background
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except AuditError as exc:
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, f"the switch is set but not recorded: {exc}"
            )
        return msg.kill_switch_message(switch)

    async def ListKillSwitches(
        self, request: pb.ListKillSwitchesRequest, context: Context[Any, Any]
    ) -> pb.ListKillSwitchesResponse:
        await self._person(context, _SWITCH_READERS)
        return pb.ListKillSwitchesResponse(
            kill_switches=[msg.kill_switch_message(s) for s in self._switches.active()]
        )

    async def ClearKillSwitch(
        self, request: pb.ClearKillSwitchRequest, context: Context[Any, Any]
    ) -> pb.KillSwitch:
        who = await self._person(context, _ADMINS)
        if len(request.reason) > MAX_REASON:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"reason must be at most {MAX_REASON} characters",
            )
        try:
            cleared = await self._switches.clear(request.id, who.subject, request.reason)
        except AuditError as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"the switch stays set: {exc}")
        except STORE_ERRORS:
            # Failing closed: a clearing the fleet would not see is no clearing. The
            # driver's words stay out of the answer (they may name its host).
            log.warning("the state store could not clear kill switch %s", request.id)
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the state store is unavailable: the switch stays in force; try again shortly",
            )
        if cleared is None:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"no kill switch {request.id!r} is in force"
            )
        return msg.kill_switch_message(cleared)

    # -- audit ---------------------------------------------------------------------

    async def TailRecords(
        self, request: pb.TailRecordsRequest, context: Context[Any, Any]
    ) -> AsyncIterator[pb.Record]:
        await self._person(context, _AUDITORS)
        await context.send_initial_metadata(())
        tail = RecordTail(self._records.directory, request.from_seq)
        source = self._records
        while True:
            wrote = source.next_write()
            written = source.size()
            if tail.position < written:
                try:
                    batch = await asyncio.to_thread(tail.read, written, _TAIL_BATCH)
                except LogDamaged as exc:
                    log.error("TailRecords: the audit log is damaged: %s", exc)
                    await _abort(context, grpc.StatusCode.DATA_LOSS, str(exc))
                for record in batch:
                    yield msg.record_message(record)
                continue
            if not request.follow or await _changed_or_closing(
                wrote, self.closing, TAIL_BACKSTOP_S
            ):
                return


def _hold(wait: bool) -> str:
    return "hold" if wait else "defer"


def _event(kind: pb.ApprovalEvent.Kind, approval: Approval) -> pb.ApprovalEvent:
    return pb.ApprovalEvent(kind=kind, approval=msg.approval_message(approval))


async def _changed_or_closing(
    change: asyncio.Event, closing: asyncio.Event, seconds: float
) -> bool:
    """Wait for ``change`` (at most ``seconds``); whether the service is closing."""
    if closing.is_set() or change.is_set():
        return closing.is_set()
    changed = tasks.spawn(change.wait(), name="approvals-changed", awaited=True)
    stopping = tasks.spawn(closing.wait(), name="closing", awaited=True)
    try:
        await asyncio.wait(
            {changed, stopping}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        changed.cancel()
        stopping.cancel()
    return closing.is_set()


async def _decided(context: Context[Any, Any], deciding: Awaitable[Decision]) -> Decision:
    """The core's decision, or the call ended with the status the failure means."""
    try:
        return await deciding
    except AuditError as exc:
        # Fail closed: no decision on record means no answer that lets anything run.
        await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
    except Overloaded as exc:
        await _abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"{exc} (retry after {exc.retry_after_s} s)",
        )
    except WardenError as exc:
        log.warning("Check failed: %s: %s", exc.code, exc)
        await _abort(context, grpc.StatusCode.INTERNAL, f"{exc.code}: {exc}")
    except Exception:
        log.exception("Check failed")
        await _abort(context, grpc.StatusCode.INTERNAL, "Warden internal error")
