"""``warden policy replay``: re-evaluate recorded decisions against a candidate bundle.

Every decision record written since ADR 0012 carries, in ``decision.input``,
the parts of the policy input the rest of the record does not (budget
counters, the configured mode and risk, the declared tools, the wire type).
:func:`rebuild_input` puts the exact ``input`` document back together from
the record (unsealing personal fields with the log's subject keys), and
:func:`replay` evaluates it with the candidate bundle on the production path
(the authoring child process, as ``warden policy eval`` does) and compares
what the candidate enforces with what was recorded: the effect and the mode (a
rule's ``"mode": "observe"`` lets the action through whatever its effect).

Only decisions the policy made are replayed: one decided before the policy
ran (kill switch, budget cap, validation) would be decided the same way
whatever the bundle says; an approval's follow-up is the same action again.
What cannot be rebuilt exactly is counted and said: records older than ADR
0012 (``no_input``), a door's own input (``door_input``, never recorded: it
may hold credentials), personal fields of an erased subject (``erased``),
arguments hidden whole (``redacted``, or ``fallback`` when the active bundle
failed on the action), declared tools named by digest
(``input.tools_sha256``: a response's calls after the first record of their
request) whose record is not in the log (``tools_unseen``). Every skip but
``not_policy`` (:data:`BENIGN_SKIPS`) is a decision the candidate might
decide differently: ``warden policy replay`` fails its gate on them unless
told otherwise (``--allow-skipped``).
A record whose arguments or context were partly redacted is replayed with
``"[redacted]"`` in place and counted as *inexact*.

A candidate that reads the clock (``time.now_ns()``: a night, weekend or
freeze window) is replayed at each record's ``time``, not at the time of the
replay: the decision query runs ``with time.now_ns as`` that instant
(:func:`clock_query`). The engine offers no other way to set its clock, so a
candidate whose builtins read the clock themselves
(``io.jwt.decode_verify``, ``crypto.x509.parse_and_verify_certificates``)
has its decisions skipped as ``clock``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from warden.audit.record import REDACTED, tools_sha256
from warden.audit.segments import FRAME_HEADER
from warden.audit.verify import iter_placed_records
from warden.config import PolicyConfig
from warden.model import Effect, Mode
from warden.monitor.events import Unsealer
from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S, Child, Crash, init_doc
from warden.policy.authoring.policy_set import PolicySet
from warden.policy.bundle import Module
from warden.policy.bundle.text import blank
from warden.policy.cache import analyse
from warden.policy.challenger import result_label
from warden.policy.engine import interpret_output, interpret_value
from warden.policy.worker import ENTRY_VARIABLE

__all__ = [
    "BENIGN_SKIPS",
    "SKIP_REASONS",
    "Change",
    "Rebuilt",
    "ReplayReport",
    "ToolsSeen",
    "clock_query",
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
    "fallback": "the active bundle failed on it, so its record hides the arguments",
    "unreadable": "the record is not a decision record Warden can read",
    "tools_unseen": "the declared tools it names by digest are in no record of the log "
    "(retention removed it, or it is from before the log begins)",
    "clock": "the candidate reads the clock in a way replay cannot set to the decision's "
    "time (io.jwt.decode_verify, crypto.x509.parse_and_verify_certificates), or the record "
    "has no readable time",
}
BENIGN_SKIPS = frozenset({"not_policy"})
"""Skips no candidate bundle could decide differently; every other skip is a decision
the replay did not check (``warden policy replay`` fails on them unless ``--allow-skipped``)."""
NOW_KEY = "warden.replay_now_ns"
"""Where the record's time travels to the engine: a key of ``input.budget`` the query
takes out again, so the policy sees the recorded budget exactly. (``with input as``,
which would carry it beside the input, crashes this engine around builtins.)"""


def clock_query(query: str) -> str:
    """``query`` (a ``data.`` reference) evaluated at the instant the input carries in
    ``input.budget`` under :data:`NOW_KEY`; its value is the binding ``result``."""
    return (
        f'now := input.budget["{NOW_KEY}"]; '
        f'budget := object.remove(input.budget, {{"{NOW_KEY}"}}); '
        f"{ENTRY_VARIABLE} := {query} with input.budget as budget with time.now_ns as now"
    )


# Builtins that read the clock themselves: `with time.now_ns` does not reach them.
_OWN_CLOCK = re.compile(
    r"(?<![\w.])(?:io\s*\.\s*jwt\s*\.\s*decode_verify"
    r"|crypto\s*\.\s*x509\s*\.\s*parse_and_verify_certificates[a-z_]*)(?![\w])"
)


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """The input rebuilt from one record, or why it cannot be (``skip``, a key of
    :data:`SKIP_REASONS`). ``exact``: nothing in it was redacted."""

    input: Mapping[str, Any] | None
    skip: str | None = None
    exact: bool = True


@dataclass(frozen=True, slots=True)
class Change:
    """One kind of change (``allow`` → ``deny``), how often, and sample decision ids.

    ``before_mode`` and ``after_mode`` are set only when the candidate changes
    the mode (``deny→deny (observe)``: the action now goes through); both are
    ``""`` when the mode stays.
    """

    before: str
    after: str
    count: int
    samples: tuple[str, ...]
    inexact: int = 0
    before_mode: str = ""
    after_mode: str = ""

    @property
    def label(self) -> str:
        """``allow→deny``, or ``deny→deny (observe)`` when the mode changes."""
        before = result_label(self.before, self.before_mode, self.after_mode)
        return f"{before}→{result_label(self.after, self.after_mode, self.before_mode)}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "change": self.label,
            "before": self.before,
            "after": self.after,
            "before_mode": self.before_mode or None,
            "after_mode": self.after_mode or None,
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
    at_recorded_time: int = 0
    """Replayed decisions evaluated with the clock at the record's time (the candidate
    reads the clock); the rest did not need a clock."""

    @property
    def changed(self) -> int:
        """Replayed decisions whose effect or mode changed."""
        return sum(c.count for c in self.changes)

    @property
    def unreplayed(self) -> int:
        """Skipped decisions the candidate might have decided differently (not benign)."""
        return sum(n for reason, n in self.skipped.items() if reason not in BENIGN_SKIPS)

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
            "at_recorded_time": self.at_recorded_time,
            "changes": [c.as_dict() for c in self.changes],
            "skipped": dict(self.skipped),
            "unreplayed": self.unreplayed,
        }


def _redacted_inside(value: Any) -> bool:
    if isinstance(value, str):
        # Whole, or in part: a URL's password or credential parameter (audit.record).
        return REDACTED in value
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
            return Rebuilt(None, _why_hidden(value, decision))
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


def _why_hidden(value: Any, decision: Mapping[str, Any]) -> str:
    if value != REDACTED:
        return "unreadable"
    # A fallback hides everything: nothing said which fields are personal.
    return "fallback" if decision.get("guard") == "fallback" else "redacted"


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


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _record_ns(record: Mapping[str, Any]) -> int | None:
    """A record's ``time`` in nanoseconds since the epoch (to its microsecond), if readable."""
    try:
        when = dt.datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # the log writes UTC with a Z; a bare time names no instant
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000


def _reads_own_clock(modules: tuple[Module, ...]) -> bool:
    """Whether a module may call a builtin that reads the clock past ``with time.now_ns``.

    Searched outside strings and comments, and, in a module with a template
    string (code inside a literal), in its raw text too: a mere mention there
    skips decisions, never replays one at the wrong time.
    """
    for module in modules:
        if _OWN_CLOCK.search(blank(module.source)):
            return True
        if ('$"' in module.source or "$`" in module.source) and _OWN_CLOCK.search(module.source):
            return True
    return False


Where = tuple[Path, int]
"""A record's place in the log: its segment file and the offset of its frame."""


def _listed_tools(record: Mapping[str, Any]) -> list[Any] | None:
    decision = record.get("decision")
    facts = decision.get("input") if isinstance(decision, Mapping) else None
    listed = facts.get("tools") if isinstance(facts, Mapping) else None
    return listed if isinstance(listed, list) and listed else None


class ToolsSeen(Mapping[str, list[Any]]):
    """Declared-tools lists read from decision records, by digest.

    Every list read is found again, however many others followed it: a call's
    record may come long after its request's (a slow answer while the agent
    sends many other requests), and a list forgotten would skip the call. The
    latest few lists are kept; of the others only where their record is
    (:data:`Where`), read back when a call names them, so memory grows with
    the number of lists, not with their size.
    """

    RECENT = 32

    def __init__(self) -> None:
        self._recent: dict[str, list[Any]] = {}
        self._where: dict[str, Where] = {}

    def read(self, record: Mapping[str, Any], where: Where | None = None) -> None:
        """Note the list ``record`` holds in full, if any (``where``: the record's place)."""
        listed = _listed_tools(record)
        if listed is None:
            return
        digest = tools_sha256(listed)
        if where is not None:
            self._where[digest] = where
        self._keep(digest, listed)

    def _keep(self, digest: str, listed: list[Any]) -> None:
        self._recent.pop(digest, None)
        self._recent[digest] = listed
        if len(self._recent) > self.RECENT:
            del self._recent[next(iter(self._recent))]

    def __getitem__(self, digest: str) -> list[Any]:
        listed = self._recent.get(digest)
        if listed is not None:
            return listed
        where = self._where.get(digest)
        listed = _read_back(where, digest) if where is not None else None
        if listed is None:
            raise KeyError(digest)
        self._keep(digest, listed)
        return listed

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._where, *self._recent]))

    def __len__(self) -> int:
        return len(self._where.keys() | self._recent.keys())


def _read_back(where: Where, digest: str) -> list[Any] | None:
    """The tools list of the record at ``where``, if it is still there and has ``digest``."""
    path, offset = where
    try:
        with path.open("rb") as f:
            f.seek(offset)
            length, crc = FRAME_HEADER.unpack(f.read(FRAME_HEADER.size))
            payload = f.read(length)
        record = orjson.loads(payload)
    except (OSError, ValueError):  # struct.error and JSONDecodeError are ValueErrors
        return None
    if zlib.crc32(payload) != crc or not isinstance(record, dict):
        return None
    listed = _listed_tools(record)
    return listed if listed is not None and tools_sha256(listed) == digest else None


def _decisions(
    root: Path, since: float | None, until: float | None, tools: ToolsSeen
) -> Iterator[dict[str, Any]]:
    for where, payload in iter_placed_records(root):
        try:
            record = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("kind") != "decision":
            continue
        tools.read(record, where)  # before the window too: a call in it may name them
        ts = _ts(record.get("time"))
        if (since is not None and ts < since) or (until is not None and ts >= until):
            continue
        yield record


def _input_mode(doc: Mapping[str, Any]) -> str:
    return str(doc.get("mode") or Mode.ENFORCE.value)


class _Candidate:
    """The candidate bundle in the authoring child; answers results, memoised per input.

    ``clock``: the candidate calls a clock or random builtin (the decision
    cache's own test, :func:`warden.policy.cache.analyse`), so each input is
    evaluated at its record's time (:func:`clock_query`) and nothing is
    memoised. ``own_clock``: some builtin of it reads a clock that cannot be set.
    """

    def __init__(self, policy: PolicySet, config: PolicyConfig, timeout_s: float) -> None:
        self._policy = policy
        self._config = config
        self._child = Child(init_doc(policy), timeout_s)
        self._memo: dict[bytes, tuple[str, str, bool]] = {}
        self.clock = not analyse(policy.production, policy.data).deterministic
        self.own_clock = self.clock and _reads_own_clock(policy.production)
        self._query = clock_query(config.query) if self.clock else config.query

    def close(self) -> None:
        self._child.close()

    def rebuild(
        self, record: Mapping[str, Any], unsealer: Unsealer, tools: ToolsSeen
    ) -> tuple[Rebuilt, int | None]:
        """The record's input (:func:`rebuild_input`) and, if the candidate reads the
        clock, the instant to evaluate it at; skipped as ``clock`` if there is none."""
        rebuilt = rebuild_input(record, unsealer, tools)
        if rebuilt.input is None or not self.clock:
            return rebuilt, None
        # Replayed now, a clock rule would decide for today, not for the record.
        now_ns = _record_ns(record)
        if self.own_clock or now_ns is None:
            return Rebuilt(None, "clock"), None
        return rebuilt, now_ns

    def effect(self, doc: Mapping[str, Any], now_ns: int | None) -> tuple[str, str, bool]:
        """The candidate's effect and mode for ``doc`` at ``now_ns``, and whether it failed.

        ``now_ns`` is used only when the candidate reads the clock; it must then be set.
        """
        if self.clock:
            assert now_ns is not None
            budget = {**doc.get("budget", {}), NOW_KEY: now_ns}
            return self._evaluate({**doc, "budget": budget}, _input_mode(doc))
        key = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        found = self._memo.get(key)
        if found is None:
            found = self._evaluate(doc, _input_mode(doc))
            self._memo[key] = found
        return found

    def _evaluate(self, doc: Mapping[str, Any], mode: str) -> tuple[str, str, bool]:
        # As PolicyGuard.decide: the rule's own mode, else the input's (the configured one).
        job = {"op": "decide", "query": self._query, "input": doc, "repeat": 0}
        reply = self._child.request(job)
        if isinstance(reply, Crash) or not reply.get("ok"):
            # The engine denies a failure the input may have caused (see PolicyGuard).
            return Effect.DENY.value, mode, True
        text = str(reply["text"])
        if self.clock:
            text = _decision_text(text, self._policy.production)
        result = interpret_output(text, self._policy.production)
        if result.error is not None:
            return Effect.DENY.value, mode, True
        if result.effect is None:
            return self._config.default_effect.value, mode, False
        return result.effect.value, result.mode.value if result.mode else mode, False


def _decision_text(text: str, modules: tuple[Module, ...]) -> str:
    """The output of :func:`clock_query` as the plain decision query's output text."""
    bound = interpret_value(text, modules)
    if bound.error is not None or not bound.defined:
        return text  # an error or "undefined" reads the same for both queries
    try:
        return orjson.dumps({"expressions": [bound.value]}).decode()
    except TypeError:  # an integer past 64 bits, which Rego keeps exactly
        return json.dumps({"expressions": [bound.value]})


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
    # By (effect before, effect after, mode before, mode after); modes "" when unchanged.
    samples: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    counts: Counter[tuple[str, str, str, str]] = Counter()
    inexact_changes: Counter[tuple[str, str, str, str]] = Counter()
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
            rebuilt, now_ns = candidate.rebuild(record, unsealer, tools)
            if rebuilt.input is None:
                skipped[rebuilt.skip or "unreadable"] += 1
                continue
            revisions[str(decision.get("bundle_revision", ""))] = None
            replayed += 1
            inexact += not rebuilt.exact
            after, after_mode, failed = candidate.effect(rebuilt.input, now_ns)
            errors += failed
            before = str(decision.get("effect", ""))
            # What was enforced: an observe-mode result lets the action through.
            before_mode = str(decision.get("mode") or _input_mode(rebuilt.input))
            if (after, after_mode) != (before, before_mode):
                modes = (before_mode, after_mode) if after_mode != before_mode else ("", "")
                key = (before, after, *modes)
                counts[key] += 1
                inexact_changes[key] += not rebuilt.exact
                if len(samples[key]) < SAMPLES:
                    samples[key].append(str(decision.get("id", "")))
    finally:
        candidate.close()
    changes = tuple(
        Change(key[0], key[1], n, tuple(samples[key]), inexact_changes[key], key[2], key[3])
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
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
        at_recorded_time=replayed if candidate.clock else 0,
    )
