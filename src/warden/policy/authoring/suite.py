"""Eval suites: versioned JSONL scenarios of a proposed tool call and the decision expected.

One scenario per line (blank lines are skipped)::

    {"id": "refund-small", "context": {"customer_id": "C-1"},
     "call": {"tool": "issue_refund", "arguments": {"order_id": "A-1", "amount": 40}},
     "expect": {"effect": "allow"}}

Optional keys: ``description``, ``agent`` (``{"id", "version", "claims"}``),
``model``, ``protocol`` (``openai.chat``), ``budget``, ``session``,
``history``, ``tools`` (the request's declared tools), ``mode``, ``risk``,
``labels``. ``expect`` is compared as decision tables compare
(:func:`~warden.policy.authoring.tables.compare_decision`): ``effect``
equal, ``reason`` a substring, other keys equal; an undefined policy result
is compared as the decision Warden would make (``policy.default_effect``)
unless ``expect`` says ``undefined: true``. The result is read as the proxy
reads it: one it refuses is an ERROR, and an effect it lets through (observe
mode) meets ``effect`` only with ``mode: observe`` expected too.

The input is built by the proxy's own :func:`warden.pipeline.policy_input`
from an :class:`~warden.model.Action`, so a scenario sees exactly the
document live traffic gives the policy, and it runs on the production path
(the modules the engine compiles, the compiled decision query) in the
authoring child process. The suite's identity is the SHA-256 of its bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from warden.model import Action, ActionKind, Agent, Effect, Mode, RequestMeta, Stage
from warden.pipeline import GuardContext, policy_input
from warden.policy.authoring.child import (
    DEFAULT_TEST_TIMEOUT_S,
    Child,
    Crash,
    init_doc,
    parse_output,
)
from warden.policy.authoring.policy_set import PolicySet
from warden.policy.authoring.results import Status
from warden.policy.authoring.tables import compare_decision, enforced, invalid_message

__all__ = [
    "EvalReport",
    "Scenario",
    "ScenarioResult",
    "Suite",
    "SuiteError",
    "load_suite",
    "run_suite",
    "scenario_input",
]

_KEYS = frozenset(
    {
        "id",
        "description",
        "agent",
        "model",
        "protocol",
        "context",
        "call",
        "budget",
        "session",
        "history",
        "tools",
        "mode",
        "risk",
        "labels",
        "expect",
    }
)
_MODES = {m.value: m for m in Mode}
_UPSTREAM = {
    "openai": ("openai", "/v1/chat/completions"),
    "anthropic": ("anthropic", "/v1/messages"),
}


class SuiteError(ValueError):
    """The suite cannot be read: not JSONL, a scenario of the wrong shape, a duplicate id."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One line of a suite: the situation, the proposed call, the decision expected."""

    id: str
    line: int
    raw: Mapping[str, Any]
    expect: Mapping[str, Any]

    @property
    def description(self) -> str:
        """The scenario's description, or ``""``."""
        return str(self.raw.get("description") or "")


@dataclass(frozen=True, slots=True)
class Suite:
    """A loaded suite: its path, content hash and scenarios."""

    path: str
    sha256: str
    scenarios: tuple[Scenario, ...]


def _object(value: Any, key: str, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SuiteError(f"{where}: {key} must be an object")
    return value


def load_suite(path: str | Path) -> Suite:
    """Read a JSONL suite; raise :class:`SuiteError` with the line of the first problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SuiteError(f"cannot read {path}: {exc.strerror}") from None
    scenarios: list[Scenario] = []
    seen: set[str] = set()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise SuiteError(f"{where}: not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SuiteError(f"{where}: a scenario must be a JSON object")
        sid, expect = _check(raw, where)
        if sid in seen:
            raise SuiteError(f"{where}: id {sid!r} is used twice")
        seen.add(sid)
        scenarios.append(Scenario(sid, number, raw, expect))
    if not scenarios:
        raise SuiteError(f"{path}: no scenarios")
    return Suite(str(path), hashlib.sha256(data).hexdigest(), tuple(scenarios))


def _check(raw: Mapping[str, Any], where: str) -> tuple[str, Mapping[str, Any]]:
    """The scenario's id and expectation, once its shape is checked."""
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(unknown)}")
    sid = raw.get("id")
    if not isinstance(sid, str) or not sid:
        raise SuiteError(f"{where}: id must be a non-empty string")
    call = _object(raw.get("call"), "call", where)
    if not isinstance(call.get("tool"), str) or not call["tool"]:
        raise SuiteError(f"{where}: call.tool must name the proposed tool")
    _object(call.get("arguments"), "call.arguments", where)
    expect = _object(raw.get("expect"), "expect", where)
    if not expect:
        raise SuiteError(f"{where}: expect must give the expected decision")
    effect = expect.get("effect")
    if effect is not None and effect not in {e.value for e in Effect}:
        raise SuiteError(f"{where}: expect.effect must be allow, deny or require_approval")
    for key in ("context", "agent", "budget", "session"):
        _object(raw.get(key), key, where)
    if raw.get("mode") is not None and raw["mode"] not in _MODES:
        raise SuiteError(f"{where}: mode must be one of {', '.join(sorted(_MODES))}")
    return sid, expect


def scenario_input(
    scenario: Scenario,
    *,
    mode_for: Callable[[str], Mode] = lambda _agent: Mode.ENFORCE,
    risk_of: Callable[[str | None], str] = lambda _tool: "write",
    labels_of: Callable[[str], tuple[str, ...]] = lambda _tool: (),
) -> dict[str, Any]:
    """The policy input live traffic would give for ``scenario`` (``policy_input``).

    ``mode_for``, ``risk_of`` and ``labels_of`` fill what the scenario leaves
    out, from a configuration (``Config.mode_for``, ``Config.risk_of``,
    ``tools.<name>.labels``).
    """
    raw = scenario.raw
    call = raw["call"]
    agent_raw = raw.get("agent") or {}
    agent = Agent(
        id=str(agent_raw.get("id", "default-agent")),
        version=str(agent_raw.get("version", "")),
        claims=dict(agent_raw.get("claims") or {}),
    )
    protocol = str(raw.get("protocol", "openai.chat"))
    upstream, path = _UPSTREAM.get(protocol.split(".", 1)[0], (protocol, "/"))
    tool = str(call["tool"])
    action = Action(
        action_id="act_eval",
        agent=agent,
        kind=ActionKind.TOOL_CALL,
        protocol=protocol,
        stage=Stage.PROPOSED,
        request=RequestMeta(
            method="POST",
            upstream=upstream,
            path=path,
            tools=tuple(raw.get("tools") or ()),
        ),
        tool=tool,
        arguments=dict(call.get("arguments") or {}),
        model=raw.get("model", "gpt-4o"),
        context=dict(raw.get("context") or {}),
        wire_type="function",
    )
    mode = _MODES[raw["mode"]] if raw.get("mode") is not None else mode_for(agent.id)
    ctx = GuardContext(
        mode=mode,
        risk=str(raw.get("risk") or risk_of(tool)),
        budget=dict(raw.get("budget") or {}),
        history=tuple(raw.get("history") or ()),
        session=dict(raw.get("session") or {}),
        labels=tuple(raw.get("labels") or labels_of(tool)),
    )
    return policy_input(action, ctx)


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """How one scenario went: ``PASS``, ``FAIL`` (the decision differs) or ``ERROR``."""

    id: str
    line: int
    status: Status
    message: str = ""
    effect: str | None = None
    """The effect the bundle gave (``None`` on error)."""
    mode: str | None = None
    """The mode the proxy would decide in: the rule's own, else the input's (``None`` on
    error). In ``observe`` an effect other than ``allow`` is recorded, not enforced."""

    @property
    def label(self) -> str:
        """The effect, ``deny (observe)`` when the proxy would let it through, or ``-``."""
        if self.effect is None:
            return "-"
        if self.mode == Mode.OBSERVE and self.effect != Effect.ALLOW:
            return f"{self.effect} ({self.mode})"
        return self.effect

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "line": self.line,
            "status": self.status.value,
            "effect": self.effect,
            "mode": self.mode,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class EvalReport:
    """A suite run against one bundle revision."""

    suite: Suite
    revision: str
    results: tuple[ScenarioResult, ...]

    @property
    def passed(self) -> int:
        """Scenarios that passed."""
        return sum(r.status is Status.PASS for r in self.results)

    @property
    def failed(self) -> int:
        """Scenarios that failed or errored."""
        return len(self.results) - self.passed

    @property
    def ok(self) -> bool:
        """Every scenario passed."""
        return self.failed == 0

    def record_body(self, bundles: Sequence[str]) -> dict[str, Any]:
        """The ``eval_run`` change record (no scenario content, only ids)."""
        return {
            "suite": self.suite.path,
            "suite_sha256": self.suite.sha256,
            "scenarios": len(self.results),
            "passed": self.passed,
            "failed": self.failed,
            "failed_ids": [r.id for r in self.results if r.status is not Status.PASS][:100],
            "bundle_revision": self.revision,
            "bundles": list(bundles),
            "result": "pass" if self.ok else "fail",
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "suite": self.suite.path,
            "suite_sha256": self.suite.sha256,
            "revision": self.revision,
            "passed": self.passed,
            "failed": self.failed,
            "result": "pass" if self.ok else "fail",
            "scenarios": [r.as_dict() for r in self.results],
        }


def _effect_of(result: Any) -> str | None:
    if isinstance(result, bool):
        return "allow" if result else "deny"
    if isinstance(result, Mapping) and isinstance(result.get("effect"), str):
        return str(result["effect"])
    return None


def run_suite(
    suite: Suite,
    policy: PolicySet,
    *,
    query: str = "data.warden.decision",
    default_effect: Effect = Effect.DENY,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
    build: Callable[[Scenario], dict[str, Any]] = scenario_input,
) -> EvalReport:
    """Evaluate every scenario of ``suite`` against ``policy`` and compare the decisions."""
    results: list[ScenarioResult] = []
    with Child(init_doc(policy), timeout_s) as child:
        for scenario in suite.scenarios:
            try:
                doc = build(scenario)
            except (TypeError, ValueError) as exc:
                results.append(
                    ScenarioResult(scenario.id, scenario.line, Status.ERROR, f"bad scenario: {exc}")
                )
                continue
            reply = child.request({"op": "decide", "query": query, "input": doc})
            outcome = parse_output(reply, policy.production)
            if outcome.error or isinstance(reply, Crash):
                results.append(
                    ScenarioResult(scenario.id, scenario.line, Status.ERROR, outcome.error)
                )
                continue
            # What the proxy enforces, not only what the policy wrote.
            proxy = enforced(str(reply["text"]), doc, policy.production, default_effect.value)
            if proxy.invalid:
                results.append(
                    ScenarioResult(scenario.id, scenario.line, Status.ERROR, invalid_message(proxy))
                )
                continue
            result, undefined = outcome.result, outcome.undefined
            if undefined and scenario.expect.get("undefined") is not True:
                # What Warden decides when no rule does.
                result, undefined = {"effect": default_effect.value}, False
            problems = compare_decision(scenario.expect, result, undefined=undefined, proxy=proxy)
            status = Status.FAIL if problems else Status.PASS
            results.append(
                ScenarioResult(
                    scenario.id,
                    scenario.line,
                    status,
                    "; ".join(problems),
                    _effect_of(result),
                    None if undefined else proxy.mode,
                )
            )
    return EvalReport(suite, policy.revision, tuple(results))
