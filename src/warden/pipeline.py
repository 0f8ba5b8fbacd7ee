"""The guard pipeline: the one place where Warden decides. Pure of wire formats.

Guards run in order (kill switch, budget, policy, approval); each is a small
typed object whose :meth:`Guard.check` returns a final :class:`Decision` or
``None`` to pass the action on. The first final decision wins. An action that
is malformed (a tool call whose arguments are not a JSON object) is denied
before any guard sees it: fail closed. So is one whose policy input the engine
cannot take exactly as the agent's SDK sees it (an integer past 64 bits, a
non-finite float, nesting past :data:`MAX_INPUT_DEPTH`, text JSON cannot
carry, a string or key holding NUL): checked on the whole ``input`` document,
so it holds for arguments, context and claims alike, and an input the agent
crafted never reaches the engine to make it fail (and a fallback apply). And
so is a call whose arguments hold two keys equal but for case
(:func:`keys_fold_apart`), which a Go or .NET tool binds as one: the policy
would check another value than the tool uses. These checks are here, not in a
door, so every front door (adapters, HTTP routes, ext_authz, gRPC) gets them.

The pipeline then records the decision in the audit log, and only returns once
the record is durable, so no action is let through without its record.

A guard that holds something for an action (the budget guard reserves value
against caps) implements :class:`Reserving` instead of just :class:`Guard`:
its :meth:`Reserving.admit` may hand later guards a new :class:`GuardContext`
(the counters the policy sees as ``input.budget``); once the final decision is
known, :meth:`Reserving.decided` lets it release what a denial will not use;
and :meth:`Pipeline.outcome` calls :meth:`Reserving.settle` with the outcome,
saying whether it is ``trusted`` (observed by Warden at a tool API it fronts)
or the agent's own report.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

from warden.audit.record import REDACTED, ApprovalEvidence
from warden.audit.redaction import POLICY_GUARDS
from warden.audit.redaction import resolve as resolve_redactions
from warden.errors import Overloaded, WardenError
from warden.model import (
    Action,
    ActionKind,
    Decision,
    Effect,
    Mode,
    Obligations,
    Outcome,
    new_id,
)
from warden.text import keys_fold_apart, shown_name

__all__ = [
    "MAX_INPUT_DEPTH",
    "POLICY_UNAVAILABLE",
    "UNCHECKED",
    "AuditSink",
    "Guard",
    "GuardContext",
    "Pipeline",
    "Previewing",
    "Reconsidering",
    "Redacting",
    "Reserving",
    "input_problem",
    "policy_facts",
    "policy_input",
]

MAX_INPUT_DEPTH = 64
"""How deep the policy ``input`` document may nest (``input.action.arguments`` is level 3).

Well under orjson's 255 and the engine's own limits, so depth alone can
never make an evaluation fail.
"""
UNCHECKED = "unchecked"
"""The ``error`` of a guard's denial that means it could not make its check (a value a cap
cannot count, another agent's conversation): the policy then decides without the
guard's document (``input.budget``, ``input.session``)."""
_COULD_NOT_CHECK = frozenset({UNCHECKED, "state_unavailable"})
POLICY_UNAVAILABLE = "policy_unavailable"
"""The outcome ``error`` of an approved call denied because the policy could not be asked
about it again (:meth:`Pipeline.reconsider`): it never ran."""
_NOT_CHECKED_AGAIN = "the policy could not check it again, so it is denied"
_INT64 = (-(2**63), 2**63 - 1)  # what the engine takes as an integer, not a rounded float

log = logging.getLogger("warden.pipeline")

_HELD: contextvars.ContextVar[tuple[str, GuardContext] | None] = contextvars.ContextVar(
    "warden_held_context", default=None
)
"""The id of the last decision this task held for approval, and the context the guards
decided it in: :meth:`Pipeline.reconsider` asks the policy again on that very input."""


@dataclass(frozen=True, slots=True)
class GuardContext:
    """What guards may know beyond the action: the configured mode, budget counters."""

    mode: Mode
    risk: str = "write"
    budget: Mapping[str, Any] = field(default_factory=dict)
    history: Sequence[Mapping[str, Any]] = ()
    """``input.history``: the conversation's prior tool calls, verified (:mod:`warden.sessions`)."""
    session: Mapping[str, Any] = field(default_factory=dict)
    """``input.session``: the session's id, counters and taints (:mod:`warden.sessions`)."""
    labels: tuple[str, ...] = ()
    """``input.action.labels``: the tool's ``tools.<name>.labels``."""


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

    async def settle(
        self, action: Action, outcome: Outcome, *, trusted: bool = False
    ) -> float | None:
        """What happened to an action that was let through; its cost in USD, if known.

        ``trusted`` says Warden observed the outcome itself (a tool API it
        fronts); otherwise it is the agent's own report.
        """
        ...


@runtime_checkable
class Redacting(Protocol):
    """A guard (the policy) that can name an action's redactions when another stage decided.

    See :mod:`warden.audit.redaction`: without one, or when it answers
    ``None``, every record of such an action hides all arguments and results.
    """

    name: str

    async def redactions(self, action: Action, ctx: GuardContext) -> tuple[str, ...] | None:
        """The policy's ``redact`` list for ``action``, or ``None`` if it cannot say."""
        ...


@runtime_checkable
class Previewing(Protocol):
    """A guard that can say what it would decide without deciding (the policy).

    Used for listings (:meth:`Pipeline.preview`): ``None`` when it cannot
    say for sure, which keeps a listed tool visible.
    """

    name: str

    async def preview(self, action: Action, ctx: GuardContext) -> Decision | None:
        """What the guard would decide for ``action``, or ``None``; nothing is recorded."""
        ...


@runtime_checkable
class Reconsidering(Protocol):
    """A guard (the policy) that can be asked again about a decision already made.

    :meth:`Pipeline.reconsider` asks it about a held call people approved:
    the same evaluation as :meth:`Guard.check`, but not a new decision, so
    nothing that follows decisions (the challenger) is given it again.
    """

    name: str

    async def check_again(self, action: Action, ctx: GuardContext) -> Decision:
        """What the guard says of ``action`` now; raises as :meth:`Guard.check` does."""
        ...


class AuditSink(Protocol):
    """Where everything Warden decides or sees is recorded: the one audit interface.

    :class:`warden.audit.AuditLog` implements it; the pipeline writes
    decisions and outcomes, the approval gate writes decisions settled by
    people, and approvals and kill switches write their events with
    :meth:`append`. Test fakes implement the methods their code calls.
    """

    async def record_decision(
        self, action: Action, decision: Decision, *, approval: ApprovalEvidence | None = None
    ) -> None:
        """Make the decision record durable before returning.

        ``approval``: the approval that settled it, when people did.
        """
        ...

    async def record_outcome(
        self, action: Action, decision_id: str, outcome: Outcome, *, cost: float | None = None
    ) -> None:
        """Record what happened after the action was let through."""
        ...

    async def append(self, kind: str, body: Mapping[str, Any]) -> object:
        """Record any other event (approvals, kill switches) durably; return where it is."""
        ...


def policy_input(action: Action, ctx: GuardContext) -> dict[str, Any]:
    """The ``input`` document a Rego policy sees; see docs/policies.md."""
    agent, request, arguments = action.agent, action.request, action.arguments
    # ``_value_`` rather than ``value``: the enum property costs a Python call each time.
    doc: dict[str, Any] = {
        "agent": {"id": agent.id, "version": agent.version, "claims": dict(agent.claims)},
        "action": {
            "kind": action.kind._value_,
            "type": action.wire_type,
            "tool": action.tool,
            "arguments": dict(arguments) if arguments is not None else None,
            "protocol": action.protocol,
            "stage": action.stage._value_,
            "model": action.model,
            "upstream": request.upstream,
            "method": request.method,
            "path": request.path,
            "labels": list(ctx.labels),
        },
        "request": {"tools": list(request.tools)},
        "context": dict(action.context),
        "budget": dict(ctx.budget),
        "history": list(ctx.history),
        "session": dict(ctx.session),
        "mode": ctx.mode._value_,
        "risk": ctx.risk,
    }
    if action.input_responses is not None:
        # Only an MCP retry has them: every other input stays as it was.
        doc["action"]["input_responses"] = dict(action.input_responses)
    if action.meta is not None:
        doc["action"]["meta"] = dict(action.meta)  # an MCP request's _meta, only
    if action.view is not None:
        # A door's own input shape (OPA-Envoy's); Warden's keys win a clash.
        return {**action.view.input, **doc}
    return doc


def policy_facts(action: Action, ctx: GuardContext) -> dict[str, Any]:
    """What :func:`policy_input` holds that the decision record does not otherwise carry.

    Recorded as ``decision.input`` (ADR 0012) so a recorded decision can be
    re-evaluated on exactly the input it had. A key added to
    :func:`policy_input` must be added here too (or be rebuilt from the record's
    other fields); ``tests/unit/test_monitor_replay_input.py`` checks the two agree.
    A door's own input (:class:`~warden.model.PolicyView`) may carry credentials
    and is never recorded: only its query is named.
    """
    facts: dict[str, Any] = {
        "type": action.wire_type,
        "labels": list(ctx.labels),
        "tools": list(action.request.tools),
        "budget": dict(ctx.budget),
        "session": dict(ctx.session),
        "history": [_history_shape(entry) for entry in ctx.history],
        "mode": ctx.mode._value_,
        "risk": ctx.risk,
    }
    if action.view is not None:
        facts["view"] = action.view.query
    return facts


def _history_shape(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A history entry without the conversation's content (ADR 0012).

    Prior arguments and results are the agent's conversation: they are in
    the log already, in the prior call's own records, redacted and sealed
    there; here they read ``"[redacted]"`` (replay counts the input inexact).
    So does a result's digest: a plain SHA-256 of a short result (a name and a
    date of birth) is found by hashing guesses, and no erasure reaches it here.
    """
    shaped = dict(entry)
    if shaped.get("arguments") is not None:
        shaped["arguments"] = REDACTED
    result = shaped.get("result")
    if isinstance(result, Mapping):
        hidden = {n: REDACTED for n in ("content", "digest") if result.get(n) is not None}
        if hidden:
            shaped["result"] = {**result, **hidden}
    return shaped


def input_problem(doc: Any) -> str | None:
    """Why the engine cannot take ``doc`` exactly as given, or ``None`` if it can.

    Refused: integers outside 64 bits (the engine would round them), NaN and
    infinities (JSON writes them as ``null``), nesting past
    :data:`MAX_INPUT_DEPTH`, strings and keys holding NUL (the engine reads C
    strings: ``"ok\u0000/../../etc/shadow"`` would be read as ``"ok"``, or fail),
    and anything orjson cannot encode (lone surrogates, keys that are not
    strings). The answer names where.
    """
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(doc, 1, ("input",))]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_INPUT_DEPTH:
                return f"{_where(path)} nests deeper than {MAX_INPUT_DEPTH} levels"
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and "\x00" in key:
                    return f"a key of {_where(path)} {_NUL_PROBLEM}"
                stack.append((item, depth + 1, (*path, _step(key))))
        elif isinstance(value, str):
            if "\x00" in value:
                return f"{_where(path)} {_NUL_PROBLEM}"
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
            return f"{_where(path)} is an integer past 64 bits"
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{_where(path)} is {value}, which JSON cannot carry"
    try:
        orjson.dumps(doc)
    except TypeError as exc:
        return f"it cannot be encoded as JSON ({exc})"
    return None


def _fits(value: Any, depth: int) -> bool:
    """Whether :func:`input_problem` finds nothing in ``value``'s numbers and nesting.

    The cheap test every action takes (no paths are built); only a value
    that fails it is walked again by :func:`input_problem` to say where.
    ``depth`` is ``value``'s own level in the ``input`` document.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(_INT64[0] <= value <= _INT64[1])
    if kind is float:
        return math.isfinite(value)
    if kind is dict or isinstance(value, Mapping):
        items: Any = value.values()
    elif kind is list or kind is tuple or isinstance(value, list | tuple):
        items = value
    elif isinstance(value, bool):
        return True
    elif isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    elif isinstance(value, float):
        return math.isfinite(value)
    else:
        return True  # orjson decides (the caller encodes the whole input)
    if depth > MAX_INPUT_DEPTH:
        return False
    deeper = depth + 1
    # A loop, not all() over a generator: every action walks this, and it is faster.
    for item in items:  # noqa: SIM110
        if type(item) is not str and not _fits(item, deeper):
            return False
    return True


def _action_fits(action: Action) -> bool:
    """The fast form of ``input_problem(policy_input(action, ctx)) is None``.

    Checks only what the agent controls (claims, arguments, an MCP request's
    answers and ``_meta``, context and the strings), where :func:`policy_input` puts them,
    without building the document: the policy guard builds it once, later.
    The rest of the input (budget, mode, risk) is Warden's own.
    """
    agent, request, arguments = action.agent, action.request, action.arguments
    claims, context = agent.claims, action.context
    if not (_fits(claims, 3) and _fits(context, 2)):
        return False
    if arguments is not None and not _fits(arguments, 3):
        return False
    for extra in (action.input_responses, action.meta):  # an MCP request's, only
        if extra is not None and not (_fits(extra, 3) and _encodes(extra)):
            return False
    given = (
        (agent.id, agent.version, action.tool, action.wire_type, action.protocol),
        (action.model, request.upstream, request.method, request.path),
        claims if type(claims) is dict else dict(claims),
        context if type(context) is dict else dict(context),
        arguments if arguments is None or type(arguments) is dict else dict(arguments),
    )
    try:
        encoded = orjson.dumps(given)
    except TypeError:
        return False
    # orjson writes NUL as an escape; only text that spells one out is walked again.
    return _NUL_ESCAPE not in encoded or not _holds_nul(given)


def _encodes(value: Mapping[str, Any]) -> bool:
    """Whether orjson encodes ``value`` and no string or key in it holds NUL."""
    try:
        encoded = orjson.dumps(value if type(value) is dict else dict(value))
    except TypeError:
        return False
    return _NUL_ESCAPE not in encoded or not _holds_nul(value)


_NUL_ESCAPE = b"\\u0000"
_NUL_PROBLEM = "holds NUL (\\u0000), which the policy engine would read cut short"


def _holds_nul(value: Any) -> bool:
    """Whether a string or key in ``value`` (nested no deeper than orjson encodes) holds NUL."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any((isinstance(k, str) and "\x00" in k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


def _folded_at(value: Any) -> tuple[str, ...] | None:
    """Where below ``value`` an object's keys are equal but for case; ``None``: nowhere.

    Walks objects and lists only; the caller has bounded their nesting.
    """
    kind = type(value)
    if kind is dict or isinstance(value, Mapping):
        if not keys_fold_apart(value):
            return ()
        pairs: Any = value.items()
    elif kind is list or kind is tuple or isinstance(value, list | tuple):
        pairs = enumerate(value)
    else:
        return None
    for key, item in pairs:
        kind = type(item)
        if kind is str or kind is int or kind is float or kind is bool or item is None:
            continue
        below = _folded_at(item)
        if below is not None:
            return (_step(key), *below)
    return None


def _folded_keys(action: Action) -> str | None:
    """Where the action's arguments (or an MCP request's answers or ``_meta``) hold two
    keys equal but for case, as :func:`input_problem` names places; ``None``: nowhere."""
    for name, value in (
        ("arguments", action.arguments),
        ("input_responses", action.input_responses),
        ("meta", action.meta),
    ):
        if value is not None and (below := _folded_at(value)) is not None:
            return _where(("input", "action", name, *below))
    return None


def _step(key: object) -> str:
    # A key that is no identifier is not named: reasons are not sealed.
    return f"[{key}]" if isinstance(key, int) else shown_name(str(key)) or "<key>"


def _where(path: tuple[str, ...]) -> str:
    shown = path if len(path) <= 8 else (*path[:7], "…")
    return ".".join(shown).replace(".[", "[").replace(".…", "…")


def _validation_decision(
    action: Action, ctx: GuardContext, *, unknown_to_policy: bool = False
) -> Decision | None:
    reason = None
    ruled = False  # a door's configured rule refused it, not Warden
    if action.kind is ActionKind.UNKNOWN_CALL and not unknown_to_policy:
        reason = (
            f"the response carried a call-like item of a type Warden does not know "
            f"({action.wire_type or 'no type'!r}); such items are denied "
            "(policy.unknown_calls: deny)"
        )
    elif (
        action.view is not None
        and action.view.problem is not None
        and not action.view.problem_is_rule
    ):
        reason = f"the request cannot be checked: {action.view.problem}"
    elif (
        action.view is not None
        and not (_fits(action.view.input, 1) and _encodes(action.view.input))
        and (problem := input_problem(policy_input(action, ctx))) is not None
    ):
        # Before a door's rule: what cannot be checked is refused in every mode, which
        # a rule's denial (unmatched: deny) is not.
        reason = f"the policy cannot check this request: {problem}"
    elif action.view is not None and action.view.problem is not None:
        reason, ruled = f"the request cannot be checked: {action.view.problem}", True
    elif (action.call_id is not None and not action.call_id.isprintable()) or (
        action.tool is not None and not action.tool.isprintable()
    ):
        # No provider or tool server names a call so; PostgreSQL cannot store NUL, and
        # a line break in a name starts lines of its own in what Warden writes.
        reason = "the call's id or tool name holds a control character"
    elif action.tool is not None and action.arguments is None:
        reason = (
            "the tool call's arguments are not a JSON object a policy can check exactly as "
            "sent (malformed, a key given twice or spelled otherwise than the tool's schema "
            "declares it, or a value such as an integer past 64 bits, "
            "NaN or nesting too deep)"
        )
    elif (
        not _action_fits(action)
        and (problem := input_problem(policy_input(action, ctx))) is not None
    ):
        reason = f"the policy cannot check this action: {problem}"
    elif (where := _folded_keys(action)) is not None:
        reason = (
            f"{where} holds two keys equal but for case, which Go and .NET tools bind as "
            "one: a policy would check another value than the tool may use"
        )
    if reason is None:
        return None
    # Enforced in every mode, as a kill switch is: what Warden cannot check is never
    # passed through, and observe mode would pass it to an agent reading it otherwise.
    # Not a door's configured rule (ext_authz `unmatched: deny`), which observe mode
    # and dry_run let through as any rule.
    return Decision(
        decision_id=new_id("dec"),
        effect=Effect.DENY,
        reasons=(reason,),
        mode=ctx.mode if ruled else Mode.ENFORCE,
        guard="validation",
    )


def _settled(
    decision: Decision | None,
    held: Decision | None,
    observed: Decision | None,
    unchecked: Decision | None,
) -> Decision | None:
    """What the guards decided: the last guard's ``decision``, an enforced or observed
    hold, or the first ``observed`` denial; ``unchecked``, the first of them a check
    could not make."""
    if decision is not None and decision.effect is Effect.DENY:
        return decision  # enforced: observe-mode denials were passed over
    if held is not None and held.mode is Mode.ENFORCE:
        return held
    if observed is not None:
        if unchecked is not None and decision is not None and decision.mode is Mode.ENFORCE:
            # A rule that enforces allowed it, deciding without what a check would have
            # given it (an agent provokes a cap it cannot count to empty input.budget):
            # that check's denial stands, enforced.
            return dataclasses.replace(unchecked, mode=Mode.ENFORCE)
        return observed  # what would have been done: the first denial
    if held is not None and (decision is None or decision.effect is Effect.ALLOW):
        return held
    return decision


def _joined(first: Decision, later: Decision) -> Decision:
    """Two guards' holds as one decision: every reason; the later guard's name, revision
    and approvers (the policy runs last and names them); the larger quorum, the shorter
    hold time, and every redaction."""
    a, b = first.obligations, later.obligations
    quorum = [n for n in (a.required_approvals, b.required_approvals) if n is not None]
    timeouts = [t for t in (a.hold_timeout_s, b.hold_timeout_s) if t is not None]
    obligations = dataclasses.replace(
        b,
        redact=tuple(dict.fromkeys((*a.redact, *b.redact))),
        approvers=b.approvers or a.approvers,
        hold_timeout_s=min(timeouts) if timeouts else None,
        risk=b.risk or a.risk,
        hold=b.hold or a.hold,
        required_approvals=max(quorum) if quorum else None,
    )
    return dataclasses.replace(
        later,
        reasons=(*first.reasons, *later.reasons),
        obligations=obligations,
        # Enforced if either is: an agent in observe mode still has its trial holds joined.
        mode=Mode.ENFORCE if Mode.ENFORCE in (first.mode, later.mode) else later.mode,
    )


def _timed(d: Decision, elapsed_us: int, facts: Mapping[str, Any] | None = None) -> Decision:
    """``d`` with ``elapsed_us`` (and the input ``facts``) set; ``dataclasses.replace``
    costs several times more."""
    return Decision(
        d.decision_id,
        d.effect,
        d.reasons,
        d.mode,
        d.guard,
        d.bundle_revision,
        d.obligations,
        d.error,
        elapsed_us,
        facts if facts is not None else d.input,
    )


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
        unknown_calls_to_policy: bool = False,
    ) -> None:
        self._guards = tuple(guards)
        self._reserving = tuple(g for g in self._guards if isinstance(g, Reserving))
        # Each guard with its Reserving face, if any: found once, since an
        # isinstance check against a runtime protocol costs microseconds a call.
        self._steps: tuple[tuple[Guard, Reserving | None], ...] = tuple(
            (g, g if isinstance(g, Reserving) else None) for g in self._guards
        )
        self._redacting = next((g for g in self._guards if isinstance(g, Redacting)), None)
        # Asked again about a call people approved after a policy reload (reconsider).
        self._policy = next((g for g in self._guards if g.name == "policy"), None)
        # Asked again once the others decided, with no await until the record: what
        # it says then (a kill switch thrown while the policy ran) is what stands.
        self._last_word = tuple(g for g in self._guards if getattr(g, "last_word", False))
        self._audit = audit
        self._mode_for = mode_for
        self._risk_of = risk_of
        self._default_effect = default_effect
        self._unknown_to_policy = unknown_calls_to_policy

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
        if action.view is not None and action.view.observe:
            ctx = GuardContext(mode=Mode.OBSERVE, risk=ctx.risk)  # ext_authz dry_run
        decision = _validation_decision(action, ctx, unknown_to_policy=self._unknown_to_policy)
        admitted: list[Reserving] = []
        recorded = False
        try:
            if decision is None:
                decision, ctx = await self._guarded(action, ctx, admitted)
            if decision is None:
                decision = Decision(
                    decision_id=new_id("dec"),
                    effect=self._default_effect,
                    reasons=("no guard decided; the configured default applies",),
                    mode=ctx.mode,
                    guard="default",
                )
            # What is enforced, not what the policy said: an observe-mode denial lets
            # the action through, and a switch stops it all the same.
            if decision.enforced is not Effect.DENY and self._last_word:
                decision = await self._last_said(action, ctx, decision)
            if decision.guard not in POLICY_GUARDS or decision.error is not None:
                # Every record of the action redacts what the policy asks, whoever
                # decided (a policy decision already carries the policy's list).
                source, final_ctx = self._redacting, ctx
                ask = (lambda: source.redactions(action, final_ctx)) if source is not None else None
                decision = await resolve_redactions(decision, ask)
            elapsed = (time.perf_counter_ns() - started) // 1000
            decision = _timed(decision, elapsed, policy_facts(action, ctx))
            if decision.enforced is Effect.REQUIRE_APPROVAL:
                _HELD.set((decision.decision_id, ctx))  # for reconsider, in this task
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

    async def _guarded(
        self, action: Action, ctx: GuardContext, admitted: list[Reserving]
    ) -> tuple[Decision | None, GuardContext]:
        """The guards' decision, ``None`` if none decided; ``admitted`` gets each reserving
        guard asked (its reservation is settled whatever is decided)."""
        held: Decision | None = None
        observed: Decision | None = None
        unchecked: Decision | None = None
        decision: Decision | None = None
        for guard, reserving in self._steps:
            if reserving is not None:
                admitted.append(reserving)
                decision, ctx = await reserving.admit(action, ctx)
            else:
                decision = await guard.check(action, ctx)
            if decision is None:
                continue
            if held is not None and held.mode is Mode.ENFORCE and decision.mode is Mode.OBSERVE:
                # A trial verdict ("mode": "observe") neither lifts nor shapes an
                # enforced hold: what is applied is the hold.
                decision = None
                continue
            if decision.effect is Effect.DENY and decision.mode is Mode.OBSERVE:
                # A denial in observe mode acts on nothing: a later guard's enforced
                # verdict (a policy rule's "mode": "enforce") still applies. Else a cap
                # passed in observe mode, or a would-be denial the agent provokes,
                # switched such a rule off.
                observed = observed or decision
                if unchecked is None and decision.error in _COULD_NOT_CHECK:
                    unchecked = decision  # any of them, not only the first denial
                decision = None
                continue
            if decision.effect is not Effect.REQUIRE_APPROVAL:
                break
            # A hold is not the last word: a later guard's denial still wins, and
            # the policy's approvers and quorum bind a cap's hold too.
            held = decision if held is None else _joined(held, decision)
            decision = None
        return _settled(decision, held, observed, unchecked), ctx

    async def recheck(self, action: Action, decision: Decision) -> Decision:
        """``decision`` once recorded, unless a guard with the last word now says otherwise.

        A kill switch thrown while the decision was written (its ``fdatasync``)
        or held for approval: the denial is recorded and returned, and what the
        allowed decision reserved goes back (the action never ran).
        """
        if decision.enforced is not Effect.ALLOW or not self._last_word:
            return decision  # a held one does not act: its approval meets the switch
        ctx = GuardContext(mode=decision.mode, risk=self._risk_of(action.tool))
        late = await self._last_said(action, ctx, decision)
        if late is decision:
            return decision
        # The action's redactions hold for this record too (warden.audit.redaction).
        late = dataclasses.replace(
            late, obligations=Obligations(redact=decision.obligations.redact)
        )
        await self._audit.record_decision(action, late)
        stopped = Outcome(error="killed", result=late.reason, is_error=True)
        await self.outcome(action, decision.decision_id, stopped, trusted=True)
        return late

    async def reconsider(self, action: Action, held: Decision, approved: Decision) -> Decision:
        """``approved``, unless the policy in force now denies the call ``held`` waited for.

        People approve a held call minutes after it was decided, and the bundle
        may have been reloaded meanwhile (an emergency rule, a lower ceiling in
        its data; a reload need not change the revision its manifest names).
        So the policy is asked again, on the very input ``held`` was decided on
        (the guards' context :meth:`decide` kept in this task; else the facts
        ``held`` recorded, as ``warden policy replay`` rebuilds them), as a
        question, not a new decision (:class:`Reconsidering`: the challenger
        is not offered it again). An enforced denial is recorded and returned,
        naming both revisions, and what the approval reserved goes back (the
        action never ran): outcome ``policy_reloaded``. A hold or an allow
        leaves the approval standing; so does the same answer from the same
        bundle, which the decision cache gives without evaluating.

        Fails closed: when the policy cannot answer (the engine busy or failing,
        or its fallback denying after a timeout or an error), the call is
        denied all the same, the denial says so (``guard="fallback"``, the
        failure's code as ``error``), and what was reserved goes back (outcome
        ``policy_unavailable``). The approval is used either way: a retry asks
        people again.
        """
        if (
            approved.guard != "approval"
            or approved.enforced is not Effect.ALLOW
            or self._policy is None
            or action.view is not None
        ):
            return approved
        kept = _HELD.get()
        ctx = kept[1] if kept is not None and kept[0] == held.decision_id else None
        try:
            now = await self._ask_again(
                self._policy, action, ctx or self._held_context(action, held)
            )
        except Exception as exc:  # Overloaded, a failing engine: denied, fail closed
            return await self._unanswered(action, held, approved, exc)
        if now is None or now.enforced is not Effect.DENY:
            return approved
        if now.error is not None:  # the fallback's denial: the policy could not run it
            log.warning(
                "approved action %s denied: the policy could not check it again (%s)",
                action.action_id,
                now.error,
            )
            return await self._withdrawn(
                action, held, approved, now, why=_NOT_CHECKED_AGAIN, error=POLICY_UNAVAILABLE
            )
        was, is_ = held.bundle_revision or "none", now.bundle_revision or "none"
        if was != is_:
            change = (
                "the policy was reloaded while the call was held "
                f"(bundle revision {was}, now {is_}) and now denies it"
            )
        else:  # the manifest's revision stays when only the bundle's data changed
            change = (
                f"the policy now denies it (bundle revision {is_}, reloaded or answering "
                "otherwise since the call was held)"
            )
        return await self._withdrawn(
            action, held, approved, now, why=change, error="policy_reloaded"
        )

    @staticmethod
    async def _ask_again(policy: Guard, action: Action, ctx: GuardContext) -> Decision | None:
        """The policy's answer now, as a question (:class:`Reconsidering`) when it can."""
        if isinstance(policy, Reconsidering):
            return await policy.check_again(action, ctx)
        return await policy.check(action, ctx)

    async def _unanswered(
        self, action: Action, held: Decision, approved: Decision, exc: Exception
    ) -> Decision:
        """The denial of an approved call the policy could not be asked about again."""
        busy = isinstance(exc, Overloaded)
        code = exc.code if isinstance(exc, WardenError) else "policy_crash"
        lines = str(exc).strip().splitlines()
        log.warning(
            "approved action %s denied: the policy could not check it again: %s",
            action.action_id,
            f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__,
        )
        # Not the exception's text: it may name what the agent has no business knowing.
        failed = Decision(
            decision_id=new_id("dec"),
            effect=Effect.DENY,
            reasons=(
                "the policy engine was too busy to answer in time"
                if busy
                else "the policy engine failed to answer",
            ),
            mode=approved.mode,
            guard="fallback",
            bundle_revision=held.bundle_revision,
            error=code,
        )
        return await self._withdrawn(
            action, held, approved, failed, why=_NOT_CHECKED_AGAIN, error=POLICY_UNAVAILABLE
        )

    async def _withdrawn(
        self,
        action: Action,
        held: Decision,
        approved: Decision,
        now: Decision,
        *,
        why: str,
        error: str,
    ) -> Decision:
        """Record ``now``'s denial of the approved call (``why``, after the approval), and
        the approved decision's outcome ``error``: the action never ran, its reservation
        goes back."""
        redact = tuple(dict.fromkeys((*held.obligations.redact, *now.obligations.redact)))
        denied = dataclasses.replace(
            now,
            reasons=(f"{approved.reason}, but {why}", *now.reasons),
            obligations=Obligations(redact=redact),
            input=held.input,
        )
        await self._audit.record_decision(action, denied)
        stopped = Outcome(error=error, result=denied.reason, is_error=True)
        await self.outcome(action, approved.decision_id, stopped, trusted=True)
        return denied

    def _held_context(self, action: Action, held: Decision) -> GuardContext:
        """The guards' context ``held`` was decided in, from the facts it recorded."""
        facts = held.input or {}
        mode = facts.get("mode")
        return GuardContext(
            mode=Mode(mode) if mode in list(Mode) else self._mode_for(action.agent.id),
            risk=str(facts.get("risk") or self._risk_of(action.tool)),
            budget=dict(facts.get("budget") or {}),
            history=tuple(facts.get("history") or ()),
            session=dict(facts.get("session") or {}),
            labels=tuple(facts.get("labels") or ()),
        )

    async def _last_said(self, action: Action, ctx: GuardContext, decision: Decision) -> Decision:
        """``decision``, unless a guard with the last word now says otherwise."""
        for guard in self._last_word:
            if guard.name != decision.guard and (late := await guard.check(action, ctx)):
                return late
        return decision

    async def preview(self, action: Action) -> Decision | None:
        """What the guards would say about ``action``, without reserving or recording anything.

        For listings (``stage: list``), which are not actions: a guard that
        implements :class:`Previewing` is asked through it, other guards
        through :meth:`Guard.check`, and guards that hold something per
        action (budgets) are skipped. ``None`` when no guard decided, or the
        policy could not take the input: the caller keeps what it lists.
        """
        if not _action_fits(action):
            return None
        ctx = GuardContext(mode=self._mode_for(action.agent.id), risk=self._risk_of(action.tool))
        for guard, reserving in self._steps:
            if reserving is not None:
                continue
            if isinstance(guard, Previewing):
                decision = await guard.preview(action, ctx)
            else:
                decision = await guard.check(action, ctx)
            if decision is not None:
                return decision
        return None

    async def outcome(
        self, action: Action, decision_id: str, outcome: Outcome, *, trusted: bool = False
    ) -> None:
        """Settle reservations, then record what happened after an allowed action.

        ``trusted``: Warden saw the outcome itself, at a tool API it fronts.
        An agent's report of its own tool's result is not trusted: it cannot
        release what a delivered call reserved (see ``budgets.trust_agent_results``).
        """
        cost: float | None = None
        for guard in self._reserving:
            try:
                settled = await guard.settle(action, outcome, trusted=trusted)
                if settled is not None:  # 0.0 is a cost too: a released call's
                    cost = settled
            except Exception:
                # The record still matters; an unsettled hold expires later.
                log.exception("guard %s failed to settle an outcome", guard.name)
        await self._audit.record_outcome(action, decision_id, outcome, cost=cost)
