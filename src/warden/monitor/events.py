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
import hashlib
import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from warden.audit.record import REDACTED
from warden.audit.subjects import SubjectKeys
from warden.audit.verify import iter_records
from warden.monitor.windows import Window

__all__ = [
    "APPROVAL",
    "CONVERSATION_KEYS",
    "DECISION",
    "OUTCOME",
    "ApprovalEvent",
    "ApprovalRow",
    "DecisionEvent",
    "DecisionRow",
    "Events",
    "OutcomeEvent",
    "OutcomeRow",
    "Unsealer",
    "collect",
    "event_of",
    "is_trusted",
    "read_events",
    "row_of",
]

CONVERSATION_KEYS = ("session_id", "conversation_id", "thread_id")
"""Context keys (``X-Warden-Context-Session-Id``...) that name a conversation, first found wins."""
_APPROVAL_VERDICTS = {"approval_decided": None, "approval_expired": "expired"}
_MAX_NUMBERS = 32  # numeric arguments kept per action
_MAX_KNOWN = 16_384
"""Argument names :func:`_numbers` remembers the order of (at most ~4 MiB of names)."""
_MAX_NAME_CHARS: Final = 128
"""Longer tool and argument names give no number distribution (they are the agent's)."""


# Each event has a row: a plain tuple of its fields in order (``DecisionEvent(*row)``
# is the event). A busy sidecar's monitor keeps hundreds of thousands of events;
# as rows the garbage collector stops tracking them (a tuple of strings and numbers
# is untracked), so a full collection does not walk them. As dataclasses, 500,000
# decisions and outcomes made each full collection pause the event loop ~230 ms.
DecisionRow = tuple[
    float,
    str,
    str,
    str,
    str,
    str,
    str | None,
    str,
    str,
    int,
    tuple[tuple[str, float], ...],
    str | None,
    bool,
]
"""A :class:`DecisionEvent`'s fields in order."""
OutcomeRow = tuple[float, str, str, str, str, str | None, str, bool, float | None, float, bool]
"""An :class:`OutcomeEvent`'s fields in order."""
ApprovalRow = tuple[float, str, str, str]
"""An :class:`ApprovalEvent`'s fields in order."""
DECISION: Final = 0
OUTCOME: Final = 1
APPROVAL: Final = 2
# Where a field is in its row (the field's position in its dataclass).
TS: Final = 0
D_AGENT: Final = 1
D_VERSION: Final = 2
AGENT: Final = 1
"""A decision's or outcome's agent, at the same place in both kinds of row."""
VERSION: Final = 2
"""A decision's or outcome's agent version, at the same place in both kinds of row."""
D_DECISION_ID: Final = 4
D_KIND: Final = 5
D_TOOL: Final = 6
D_EFFECT: Final = 7
D_ELAPSED_US: Final = 9
D_NUMBERS: Final = 10
D_CONVERSATION: Final = 11
D_FIRST: Final = 12
O_AGENT: Final = 1
O_VERSION: Final = 2
O_DECISION_ID: Final = 3
O_KIND: Final = 4
O_STAGE: Final = 6
O_FAILED: Final = 7
O_COST: Final = 8
O_AGENTS_WORD: Final = 10
A_APPROVAL_ID: Final = 1
A_DECISION_ID: Final = 2
A_VERDICT: Final = 3


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

    def row(self) -> DecisionRow:
        """The fields as a plain tuple, in order."""
        return (
            self.ts,
            self.agent,
            self.version,
            self.action_id,
            self.decision_id,
            self.kind,
            self.tool,
            self.effect,
            self.guard,
            self.elapsed_us,
            self.numbers,
            self.conversation,
            self.first,
        )


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
    agents_word: bool = False
    """The agent reported it of its own action (``reported_by: agent``)."""

    def row(self) -> OutcomeRow:
        """The fields as a plain tuple, in order."""
        return (
            self.ts,
            self.agent,
            self.version,
            self.decision_id,
            self.kind,
            self.tool,
            self.stage,
            self.failed,
            self.cost,
            self.latency_ms,
            self.agents_word,
        )

    @property
    def trusted(self) -> bool:
        """Warden observed it at a tool API it fronts (MCP, HTTP tools), or a runner
        reported it over gRPC, rather than the agent reporting its own tool's result."""
        return is_trusted(self.row())


def is_trusted(outcome: OutcomeRow) -> bool:
    """:attr:`OutcomeEvent.trusted` of a row."""
    return (
        outcome[O_STAGE] == "executed"
        and outcome[O_KIND] != "llm_call"
        and not outcome[O_AGENTS_WORD]
    )


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    """A final verdict on an approval: ``approved``, ``rejected`` or ``expired``."""

    ts: float
    approval_id: str
    decision_id: str
    verdict: str

    def row(self) -> ApprovalRow:
        """The fields as a plain tuple, in order."""
        return (self.ts, self.approval_id, self.decision_id, self.verdict)


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


class _KnownNames:
    """Per tool, the numeric arguments kept so far and when each was first kept (bounded)."""

    __slots__ = ("count", "tools")

    def __init__(self) -> None:
        self.tools: dict[str, dict[str, int]] = {}
        self.count = 0

    def remember(self, tool: str, names: Iterable[str]) -> None:
        """Give each name not known yet the next rank, while there is room."""
        if self.count >= _MAX_KNOWN:
            return  # nor a new tool's empty entry: tool names are the agent's too
        known = self.tools.setdefault(tool, {})
        for name in names:
            if self.count >= _MAX_KNOWN:
                return
            if name not in known:
                known[name] = self.count
                self.count += 1


_known = _KnownNames()  # process-wide: the monitor and the CLI read the log in order


def _numbers(tool: Any, arguments: Any) -> tuple[tuple[str, float], ...]:
    """The numeric arguments of one action, at most :data:`_MAX_NUMBERS` of them.

    Past the cap, the arguments kept before win: the argument names are the
    agent's, so keeping the first in key order let 32 junk arguments
    (``a00``... ``a31``) push ``amount`` out and hide its drift. ``amount``,
    kept since the reference window (records are read in log order), now
    outranks names an agent adds later, however many. Past
    :data:`_MAX_KNOWN` names, new ones rank after every remembered one, in
    argument order.
    """
    if not isinstance(tool, str) or not isinstance(arguments, Mapping):
        return ()
    if len(tool) > _MAX_NAME_CHARS:
        return ()
    found: list[tuple[str, float]] = []
    for name, value in arguments.items():
        # Names are the agent's: a 2 MiB one would be kept in up to max_events rows.
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and len(name) <= _MAX_NAME_CHARS
        ):
            found.append((name, float(value)))
    known = _known.tools.get(tool)
    if len(found) > _MAX_NUMBERS:
        ranks = known or {}
        best = heapq.nsmallest(
            _MAX_NUMBERS, range(len(found)), key=lambda i: (ranks.get(found[i][0], _MAX_KNOWN), i)
        )
        found = [found[i] for i in sorted(best)]  # in argument order, as below the cap
    if known is None or any(name not in known for name, _ in found):
        _known.remember(tool, (name for name, _ in found))
    return tuple((f"{tool}.{name}", value) for name, value in found)


def _conversation(context: Any) -> str | None:
    if isinstance(context, Mapping):
        for key in CONVERSATION_KEYS:
            value = context.get(key)
            if value == REDACTED:
                # Hidden by a redaction: every such decision would seem one conversation.
                return None
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                return _short(str(value))  # the agent's: kept in every row
    return None


def event_of(
    record: Mapping[str, Any], unsealer: Unsealer | None = None
) -> DecisionEvent | OutcomeEvent | ApprovalEvent | None:
    """The event a stored record makes, or ``None`` for records monitoring does not use."""
    found = row_of(record, unsealer)
    if found is None:
        return None
    what, row = found
    if what == DECISION:
        return DecisionEvent(*row)
    if what == OUTCOME:
        return OutcomeEvent(*row)
    return ApprovalEvent(*row)


def row_of(
    record: Mapping[str, Any], unsealer: Unsealer | None = None
) -> tuple[int, DecisionRow | OutcomeRow | ApprovalRow] | None:
    """:func:`event_of` as ``(DECISION | OUTCOME | APPROVAL, row)``, without the event object."""
    kind = record.get("kind")
    if kind == "decision":
        decision = _decision(record, unsealer)
        return None if decision is None else (DECISION, decision)
    if kind == "outcome":
        outcome = _outcome(record)
        return None if outcome is None else (OUTCOME, outcome)
    if kind in _APPROVAL_VERDICTS:
        body = record.get("body")
        if not isinstance(body, Mapping):
            return None
        verdict = _APPROVAL_VERDICTS[str(kind)] or str(body.get("verdict", ""))
        if verdict not in ("approved", "rejected", "expired"):
            return None
        return APPROVAL, (
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


def _decision(record: Mapping[str, Any], unsealer: Unsealer | None) -> DecisionRow | None:
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
    return (
        _ts(record.get("time")),
        agent,
        version,
        str(action.get("id", "")),
        str(decision.get("id", "")),
        str(action.get("kind", "")),
        _row_tool(tool),
        str(decision.get("effect", "")),
        guard,
        int(decision.get("elapsed_us") or 0),
        _numbers(tool, arguments),
        _conversation(context),
        guard != "approval",
    )


def _row_tool(tool: Any) -> str | None:
    """A tool name as a row keeps it: whole up to :data:`_MAX_NAME_CHARS`, else cut and
    told apart by a digest (the name is the agent's: rows of a megabyte each, up to
    ``max_events`` of them, held the sidecar's memory)."""
    return _short(tool) if isinstance(tool, str) else None


def _short(text: str) -> str:
    """``text`` whole up to :data:`_MAX_NAME_CHARS`, else cut and told apart by a digest."""
    if len(text) <= _MAX_NAME_CHARS:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{text[:64]}…{digest}"


def _outcome(record: Mapping[str, Any]) -> OutcomeRow | None:
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
    return (
        _ts(record.get("time")),
        agent,
        version,
        str(record.get("decision_id", "")),
        str(action.get("kind", "")),
        _row_tool(tool),
        str(action.get("stage", "")),
        failed,
        float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        float(outcome.get("latency_ms") or 0.0),
        outcome.get("reported_by") == "agent",
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
