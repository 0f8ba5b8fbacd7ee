"""``warden policy replay``: re-evaluate recorded decisions against a candidate bundle.

Every decision record written since ADR 0012 carries, in ``decision.input``,
the parts of the policy input the rest of the record does not (budget
counters, the configured mode and risk, the declared tools, the wire type).
:func:`rebuild_input` puts the exact ``input`` document back together from
the record (unsealing personal fields with the log's subject keys), and
:func:`replay` evaluates it with the candidate bundle on the production path
(the authoring child process, as ``warden policy eval`` does) and compares
the effect with the one recorded.

Only decisions the policy made are replayed: one decided before the policy
ran (kill switch, budget cap, validation) would be decided the same way
whatever the bundle says; an approval's follow-up is the same action again.
What cannot be rebuilt exactly is counted and said: records older than ADR
0012 (``no_input``), a door's own input (``door_input``, never recorded: it
may hold credentials), personal fields of an erased subject (``erased``), declared tools named by
digest (``input.tools_sha256``: a response's calls after the first record of
their request) whose record is gone (``tools_unseen``).
A record whose arguments or context were partly redacted is replayed with
``"[redacted]"`` in place and counted as *inexact*.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from warden.audit.record import REDACTED, tools_sha256
from warden.audit.verify import iter_records
from warden.config import PolicyConfig
from warden.model import Effect
from warden.monitor.events import Unsealer
from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S, Child, Crash, init_doc
from warden.policy.authoring.policy_set import PolicySet
from warden.policy.engine import interpret_output

__all__ = [
    "SKIP_REASONS",
    "Change",
    "Rebuilt",
    "ReplayReport",
    "ToolsSeen",
    "rebuild_input",
    "replay",
]

SAMPLES = 5
"""Sample decision ids kept per kind of change."""
REPLAYED_GUARDS = frozenset({"policy", "fallback"})
SKIP_REASONS = {
    "not_policy": "decided before the policy ran (kill switch, budget cap, validation)",
    "no_input": "recorded before records carried the policy input (ADR 0012)",
    "door_input": "a door's own policy input (Envoy ext_authz), which is never recorded",
    "erased": "sealed personal fields whose subject was erased (or whose keys are not here)",
    "redacted": "the arguments were hidden whole (redaction obligation or unsealable subject)",
    "unreadable": "the record is not a decision record Warden can read",
    "tools_unseen": "the declared tools it names by digest are in a record no longer in the log",
}


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """The input rebuilt from one record, or why it cannot be (``skip``, a key of
    :data:`SKIP_REASONS`). ``exact``: nothing in it was redacted."""

    input: Mapping[str, Any] | None
    skip: str | None = None
    exact: bool = True


@dataclass(frozen=True, slots=True)
class Change:
    """One kind of change (``allow`` → ``deny``), how often, and sample decision ids."""

    before: str
    after: str
    count: int
    samples: tuple[str, ...]
    inexact: int = 0

    @property
    def label(self) -> str:
        """``allow→deny``."""
        return f"{self.before}→{self.after}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "change": self.label,
            "before": self.before,
            "after": self.after,
            "count": self.count,
            "inexact": self.inexact,
            "samples": list(self.samples),
        }


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a candidate bundle would have decided differently."""

    revision: str
    recorded_revisions: tuple[str, ...]
    scanned: int
    replayed: int
    inexact: int
    changes: tuple[Change, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)
    errors: int = 0
    """Replayed decisions on which the candidate failed (counted as deny, as the engine would)."""

    @property
    def changed(self) -> int:
        """Replayed decisions whose effect changed."""
        return sum(c.count for c in self.changes)

    @property
    def change_rate(self) -> float:
        """Changed over replayed (0.0 when nothing was replayed)."""
        return self.changed / self.replayed if self.replayed else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``--format json`` prints."""
        return {
            "candidate_revision": self.revision,
            "recorded_revisions": list(self.recorded_revisions),
            "scanned": self.scanned,
            "replayed": self.replayed,
            "changed": self.changed,
            "change_rate": round(self.change_rate, 6),
            "inexact": self.inexact,
            "errors": self.errors,
            "changes": [c.as_dict() for c in self.changes],
            "skipped": dict(self.skipped),
        }


def _redacted_inside(value: Any) -> bool:
    if value == REDACTED:
        return True
    if isinstance(value, Mapping):
        return any(_redacted_inside(v) for v in value.values())
    if isinstance(value, list):
        return any(_redacted_inside(v) for v in value)
    return False


def rebuild_input(
    record: Mapping[str, Any],
    unsealer: Unsealer | None = None,
    tools: Mapping[str, list[Any]] | None = None,
) -> Rebuilt:
    """The policy ``input`` a decision record was decided on (see the module docstring).

    ``tools`` maps the digests of declared-tools lists read from earlier
    records to the lists (:class:`ToolsSeen`), for a record that names them
    by digest.
    """
    action, decision, agent = record.get("action"), record.get("decision"), record.get("agent")
    if not (
        isinstance(action, Mapping) and isinstance(decision, Mapping) and isinstance(agent, Mapping)
    ):
        return Rebuilt(None, "unreadable")
    facts = decision.get("input")
    if not isinstance(facts, Mapping):
        return Rebuilt(None, "no_input")
    if facts.get("view") is not None:
        return Rebuilt(None, "door_input")
    declared = _declared_tools(facts, tools or {})
    if declared is None:
        return Rebuilt(None, "tools_unseen")
    arguments, context = action.get("arguments"), action.get("context")
    answers = action.get("input_responses")  # an MCP retry's, only
    meta = action.get("meta")  # an MCP request's _meta, only
    claims = agent.get("claims")
    path = None
    if isinstance(record.get("sealed"), Mapping):
        sealed = unsealer.fields(record) if unsealer is not None else {}
        if not sealed:
            return Rebuilt(None, "erased")
        arguments = sealed.get("action.arguments", arguments)
        context = sealed.get("action.context", context)
        answers = sealed.get("action.input_responses", answers)
        claims = sealed.get("agent.claims", claims)
        path = sealed.get("action.request.path")
    for value in (claims, arguments, answers, meta):
        if value is not None and not isinstance(value, Mapping):
            return Rebuilt(None, "redacted" if value == REDACTED else "unreadable")
    request = action.get("request") if isinstance(action.get("request"), Mapping) else {}
    assert isinstance(request, Mapping)
    doc: dict[str, Any] = {
        "agent": {
            "id": agent.get("id"),
            "version": agent.get("version", ""),
            "claims": dict(claims or {}),
        },
        "action": {
            "kind": action.get("kind"),
            "type": facts.get("type"),
            "tool": action.get("tool"),
            "arguments": dict(arguments) if arguments is not None else None,
            "protocol": action.get("protocol"),
            "stage": action.get("stage"),
            "model": action.get("model"),
            "upstream": request.get("upstream"),
            "method": request.get("method"),
            "path": path if path is not None else request.get("path"),
            "labels": list(facts.get("labels") or ()),
        },
        "request": {"tools": declared},
        "context": dict(context or {}),
        "budget": dict(facts.get("budget") or {}),
        "history": list(facts.get("history") or ()),
        "session": dict(facts.get("session") or {}),
        "mode": facts.get("mode"),
        "risk": facts.get("risk"),
    }
    if answers is not None:
        doc["action"]["input_responses"] = dict(answers)
    if meta is not None:
        doc["action"]["meta"] = dict(meta)
    exact = not action.get("redacted") and not any(
        _redacted_inside(doc[part]) for part in ("context", "session", "request")
    )
    if _redacted_inside(doc["history"]):
        exact = False  # prior calls' content is not repeated in the record (ADR 0012)
    if any(v is not None and _redacted_inside(v) for v in (arguments, answers, meta)):
        exact = False
    return Rebuilt(doc, None, exact)


def _declared_tools(facts: Mapping[str, Any], seen: Mapping[str, list[Any]]) -> list[Any] | None:
    """``input.request.tools`` of a record: its own list, or the one its digest names."""
    digest = facts.get("tools_sha256")
    if digest is None:
        return list(facts.get("tools") or ())
    return seen.get(str(digest))


def _ts(text: Any) -> float:
    try:
        return dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


class ToolsSeen(dict[str, list[Any]]):
    """Declared-tools lists read from decision records, by digest; the last few hundred."""

    LIMIT = 256

    def read(self, record: Mapping[str, Any]) -> None:
        """Keep the list ``record`` holds in full, if any."""
        decision = record.get("decision")
        facts = decision.get("input") if isinstance(decision, Mapping) else None
        listed = facts.get("tools") if isinstance(facts, Mapping) else None
        if not isinstance(listed, list) or not listed:
            return
        digest = tools_sha256(listed)
        self.pop(digest, None)
        self[digest] = listed
        if len(self) > self.LIMIT:
            del self[next(iter(self))]


def _decisions(
    root: Path, since: float | None, until: float | None, tools: ToolsSeen
) -> Iterator[dict[str, Any]]:
    for _, payload in iter_records(root):
        try:
            record = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("kind") != "decision":
            continue
        tools.read(record)  # before the window too: a call in it may name them
        ts = _ts(record.get("time"))
        if (since is not None and ts < since) or (until is not None and ts >= until):
            continue
        yield record


class _Candidate:
    """The candidate bundle in the authoring child; answers effects, memoised per input."""

    def __init__(self, policy: PolicySet, config: PolicyConfig, timeout_s: float) -> None:
        self._policy = policy
        self._config = config
        self._child = Child(init_doc(policy), timeout_s)
        self._memo: dict[bytes, tuple[str, bool]] = {}

    def close(self) -> None:
        self._child.close()

    def effect(self, doc: Mapping[str, Any]) -> tuple[str, bool]:
        """The candidate's effect for ``doc``, and whether the candidate failed on it."""
        key = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        found = self._memo.get(key)
        if found is None:
            found = self._evaluate(doc)
            self._memo[key] = found
        return found

    def _evaluate(self, doc: Mapping[str, Any]) -> tuple[str, bool]:
        reply = self._child.request(
            {"op": "decide", "query": self._config.query, "input": doc, "repeat": 0}
        )
        if isinstance(reply, Crash) or not reply.get("ok"):
            # The engine denies a failure the input may have caused (see PolicyGuard).
            return Effect.DENY.value, True
        result = interpret_output(str(reply["text"]), self._policy.production)
        if result.error is not None:
            return Effect.DENY.value, True
        if result.effect is None:
            return self._config.default_effect.value, False
        return result.effect.value, False


def replay(
    root: Path | str,
    policy: PolicySet,
    config: PolicyConfig,
    *,
    since: float | None = None,
    until: float | None = None,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
) -> ReplayReport:
    """Re-evaluate the decisions recorded in ``root`` (within ``[since, until)``) with ``policy``.

    ``config`` gives the query and the default effect, as in production.
    """
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"no audit log at {path}")
    unsealer = Unsealer(path)
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    revisions: dict[str, None] = {}
    samples: dict[tuple[str, str], list[str]] = defaultdict(list)
    counts: Counter[tuple[str, str]] = Counter()
    inexact_changes: Counter[tuple[str, str]] = Counter()
    scanned = replayed = inexact = errors = 0
    candidate = _Candidate(policy, config, timeout_s)
    tools = ToolsSeen()
    try:
        for record in _decisions(path, since, until, tools):
            action, decision = record.get("action"), record.get("decision")
            if not isinstance(action, Mapping) or not isinstance(decision, Mapping):
                skipped["unreadable"] += 1
                continue
            action_id = str(action.get("id", ""))
            if action_id in seen:
                continue  # an approval's follow-up: the action's own decision came first
            seen.add(action_id)
            scanned += 1
            if decision.get("guard") not in REPLAYED_GUARDS:
                skipped["not_policy"] += 1
                continue
            rebuilt = rebuild_input(record, unsealer, tools)
            if rebuilt.input is None:
                skipped[rebuilt.skip or "unreadable"] += 1
                continue
            revisions[str(decision.get("bundle_revision", ""))] = None
            replayed += 1
            inexact += not rebuilt.exact
            after, failed = candidate.effect(rebuilt.input)
            errors += failed
            before = str(decision.get("effect", ""))
            if after != before:
                key = (before, after)
                counts[key] += 1
                inexact_changes[key] += not rebuilt.exact
                if len(samples[key]) < SAMPLES:
                    samples[key].append(str(decision.get("id", "")))
    finally:
        candidate.close()
    changes = tuple(
        Change(before, after, n, tuple(samples[(before, after)]), inexact_changes[(before, after)])
        for (before, after), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return ReplayReport(
        revision=policy.revision,
        recorded_revisions=tuple(r for r in revisions if r),
        scanned=scanned,
        replayed=replayed,
        inexact=inexact,
        changes=changes,
        skipped=dict(skipped),
        errors=errors,
    )
