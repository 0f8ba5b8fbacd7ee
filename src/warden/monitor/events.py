"""Audit records as the small events monitoring works on.

A decision record becomes a :class:`DecisionEvent` (agent and version, tool,
effect, deciding guard, time Warden spent deciding, numeric arguments, the
conversation it belongs to); an outcome record an :class:`OutcomeEvent`; an
approval verdict an :class:`ApprovalEvent`. Sealed personal fields are
unsealed with the log's own subject keys when they are readable, so numeric
arguments of a customer's actions count too; only numbers are kept, never the
arguments themselves. An erased subject's numbers are simply missing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from warden.audit.subjects import SubjectKeys
from warden.audit.verify import iter_records
from warden.monitor.windows import Window

__all__ = [
    "CONVERSATION_KEYS",
    "ApprovalEvent",
    "DecisionEvent",
    "Events",
    "OutcomeEvent",
    "Unsealer",
    "collect",
    "event_of",
    "read_events",
]

CONVERSATION_KEYS = ("session_id", "conversation_id", "thread_id")
"""Context keys (``X-Warden-Context-Session-Id``...) that name a conversation, first found wins."""
_APPROVAL_VERDICTS = {"approval_decided": None, "approval_expired": "expired"}
_MAX_NUMBERS = 32  # numeric arguments kept per action


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """One decision record. ``first``: the action's own decision, not an approval's follow-up."""

    ts: float
    agent: str
    version: str
    action_id: str
    decision_id: str
    kind: str
    tool: str | None
    effect: str
    guard: str
    elapsed_us: int
    numbers: tuple[tuple[str, float], ...] = ()
    """Numeric top-level arguments as ``("issue_refund.amount", 250.0)``."""
    conversation: str | None = None
    first: bool = True


@dataclass(frozen=True, slots=True)
class OutcomeEvent:
    """One outcome record."""

    ts: float
    agent: str
    version: str
    decision_id: str
    kind: str
    tool: str | None
    stage: str
    failed: bool
    cost: float | None
    latency_ms: float

    @property
    def trusted(self) -> bool:
        """Warden observed it at a tool API it fronts (MCP, HTTP tools, gRPC ``ReportOutcome``
        of an executed action), rather than the agent reporting its own tool's result."""
        return self.stage == "executed" and self.kind != "llm_call"


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    """A final verdict on an approval: ``approved``, ``rejected`` or ``expired``."""

    ts: float
    approval_id: str
    decision_id: str
    verdict: str


@dataclass(frozen=True, slots=True)
class Events:
    """Everything monitoring reads from a log, in log order."""

    decisions: tuple[DecisionEvent, ...] = ()
    outcomes: tuple[OutcomeEvent, ...] = ()
    approvals: tuple[ApprovalEvent, ...] = ()

    def within(self, window: Window) -> Events:
        """The events inside ``window``."""
        return Events(
            tuple(e for e in self.decisions if e.ts in window),
            tuple(e for e in self.outcomes if e.ts in window),
            tuple(e for e in self.approvals if e.ts in window),
        )

    def span(self) -> Window | None:
        """From the first event to just after the last, or ``None`` when empty."""
        stamps = [
            *(e.ts for e in self.decisions),
            *(e.ts for e in self.outcomes),
            *(e.ts for e in self.approvals),
        ]
        return Window(min(stamps), max(stamps) + 1e-6) if stamps else None


class Unsealer:
    """Reads sealed personal fields with the log's subject keys, if they are readable here."""

    def __init__(self, root: Path) -> None:
        keys: SubjectKeys | None = None
        if (root / "keys").is_dir():
            try:
                keys = SubjectKeys.open(root, create=False)
            except OSError:
                keys = None
        self._keys = keys

    def fields(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """The record's sealed fields (``{"action.arguments": ...}``), or ``{}``."""
        if self._keys is None or not isinstance(record.get("sealed"), Mapping):
            return {}
        try:
            return self._keys.unseal(record) or {}
        except (OSError, ValueError):
            return {}


def _ts(text: Any) -> float:
    try:
        return dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def _numbers(tool: Any, arguments: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(tool, str) or not isinstance(arguments, Mapping):
        return ()
    found: list[tuple[str, float]] = []
    for name, value in arguments.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            found.append((f"{tool}.{name}", float(value)))
            if len(found) >= _MAX_NUMBERS:
                break
    return tuple(found)


def _conversation(context: Any) -> str | None:
    if isinstance(context, Mapping):
        for key in CONVERSATION_KEYS:
            value = context.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                return str(value)
    return None


def event_of(
    record: Mapping[str, Any], unsealer: Unsealer | None = None
) -> DecisionEvent | OutcomeEvent | ApprovalEvent | None:
    """The event a stored record makes, or ``None`` for records monitoring does not use."""
    kind = record.get("kind")
    if kind == "decision":
        return _decision(record, unsealer)
    if kind == "outcome":
        return _outcome(record)
    if kind in _APPROVAL_VERDICTS:
        body = record.get("body")
        if not isinstance(body, Mapping):
            return None
        verdict = _APPROVAL_VERDICTS[str(kind)] or str(body.get("verdict", ""))
        if verdict not in ("approved", "rejected", "expired"):
            return None
        return ApprovalEvent(
            _ts(record.get("time")),
            str(body.get("approval_id", "")),
            str(body.get("decision_id", "")),
            verdict,
        )
    return None


def _agent(record: Mapping[str, Any]) -> tuple[str, str]:
    agent = record.get("agent")
    if not isinstance(agent, Mapping):
        return "", ""
    return str(agent.get("id", "")), str(agent.get("version", "") or "")


def _decision(record: Mapping[str, Any], unsealer: Unsealer | None) -> DecisionEvent | None:
    action, decision = record.get("action"), record.get("decision")
    if not isinstance(action, Mapping) or not isinstance(decision, Mapping):
        return None
    agent, version = _agent(record)
    arguments, context = action.get("arguments"), action.get("context")
    if (arguments is None or context is None) and unsealer is not None:
        sealed = unsealer.fields(record)
        arguments = sealed.get("action.arguments", arguments)
        context = sealed.get("action.context", context)
    tool = action.get("tool")
    guard = str(decision.get("guard", ""))
    return DecisionEvent(
        ts=_ts(record.get("time")),
        agent=agent,
        version=version,
        action_id=str(action.get("id", "")),
        decision_id=str(decision.get("id", "")),
        kind=str(action.get("kind", "")),
        tool=tool if isinstance(tool, str) else None,
        effect=str(decision.get("effect", "")),
        guard=guard,
        elapsed_us=int(decision.get("elapsed_us") or 0),
        numbers=_numbers(tool, arguments),
        conversation=_conversation(context),
        first=guard != "approval",
    )


def _outcome(record: Mapping[str, Any]) -> OutcomeEvent | None:
    action, outcome = record.get("action"), record.get("outcome")
    if not isinstance(action, Mapping) or not isinstance(outcome, Mapping):
        return None
    agent, version = _agent(record)
    status = outcome.get("status")
    failed = bool(
        outcome.get("is_error")
        or outcome.get("error")
        or (isinstance(status, int) and not isinstance(status, bool) and status >= 400)
    )
    cost = outcome.get("cost")
    tool = action.get("tool")
    return OutcomeEvent(
        ts=_ts(record.get("time")),
        agent=agent,
        version=version,
        decision_id=str(record.get("decision_id", "")),
        kind=str(action.get("kind", "")),
        tool=tool if isinstance(tool, str) else None,
        stage=str(action.get("stage", "")),
        failed=failed,
        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        latency_ms=float(outcome.get("latency_ms") or 0.0),
    )


def collect(records: Iterable[Mapping[str, Any]], unsealer: Unsealer | None = None) -> Events:
    """Events of decoded records, in order."""
    decisions: list[DecisionEvent] = []
    outcomes: list[OutcomeEvent] = []
    approvals: list[ApprovalEvent] = []
    for record in records:
        event = event_of(record, unsealer)
        if isinstance(event, DecisionEvent):
            decisions.append(event)
        elif isinstance(event, OutcomeEvent):
            outcomes.append(event)
        elif isinstance(event, ApprovalEvent):
            approvals.append(event)
    return Events(tuple(decisions), tuple(outcomes), tuple(approvals))


def _decoded(root: Path) -> Iterator[dict[str, Any]]:
    for _, payload in iter_records(root):
        try:
            record = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def read_events(root: Path | str, window: Window | None = None, *, unseal: bool = True) -> Events:
    """The events of an audit directory (optionally only those inside ``window``).

    Reads the log as stored, up to its first damaged frame; run
    ``warden audit verify`` for evidence that it is intact.
    """
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"no audit log at {path}")
    events = collect(_decoded(path), Unsealer(path) if unseal else None)
    return events.within(window) if window is not None else events
