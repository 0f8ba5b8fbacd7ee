"""Decision tables: cases of an input and the decision fields expected for it.

Decision tables are YAML or JSON files of cases (``*_cases.yaml`` anywhere in
a bundle folder, or any file under a ``decisions/`` folder). They run on the
production path -- the modules the engine compiles, evaluated with the
compiled decision query -- so they can test any rule, and compliance staff
can read them. :func:`warden.policy.authoring.runner.run_tests` runs them.

A result of the decision query is read as the proxy reads it
(:func:`enforced`): one the proxy refuses (``"approvers": "leads"``, not a
list) is an error whatever ``expect`` says, and an effect other than
``allow`` in observe mode (the rule's own ``"mode": "observe"``, else
``input.mode``) lets the call through, so it meets an ``effect`` expectation
only when ``expect`` says ``mode: observe`` too. A ``redact`` path that names
nothing Warden can mask fails the case, even when ``expect`` lists it: the
proxy records that value as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from warden.audit.record import unmaskable_redactions
from warden.model import Effect, Mode
from warden.policy.authoring.lint import REDACT_HINT
from warden.policy.bundle import BundleError, Module
from warden.policy.engine import interpret_output

__all__ = [
    "CaseFile",
    "DecisionCase",
    "Enforced",
    "compare_decision",
    "discover_case_files",
    "enforced",
    "load_case_file",
    "unmaskable_message",
]

_CASE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class DecisionCase:
    """One row of a decision table: an input and the decision fields expected for it."""

    name: str
    input: Mapping[str, Any]
    expect: Mapping[str, Any]
    line: int = 0


@dataclass(frozen=True, slots=True)
class CaseFile:
    """A decision table file: its cases and, optionally, the query they are for."""

    path: str
    cases: tuple[DecisionCase, ...]
    query: str | None = None


def discover_case_files(folders: Iterable[Path]) -> list[Path]:
    """Decision tables in bundle folders: ``*_cases.{yaml,yml,json}`` and ``decisions/*``."""
    found: dict[Path, None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix not in _CASE_SUFFIXES:
                continue
            rel = path.relative_to(folder).parts
            if any(p.startswith(".") for p in rel):
                continue
            if path.stem.endswith("_cases") or "decisions" in rel[:-1]:
                found[path] = None
    return list(found)


def load_case_file(path: str | Path) -> CaseFile:
    """Read a decision table; raise :class:`BundleError` naming the file on any problem.

    The file is a mapping with ``cases`` (a list) and optional ``query`` and
    ``defaults`` (``defaults.input`` is merged under every case's input), or
    just the list of cases. Each case has ``name``, ``input`` and ``expect``.
    """
    p = Path(path)
    label = p.as_posix()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{label}: cannot read: {exc}") from None
    try:
        doc = orjson.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{label}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        raise BundleError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if isinstance(doc, list):
        doc = {"cases": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise BundleError(f"{label}: a decision table needs a list of cases (under `cases:`)")
    query = doc.get("query")
    if query is not None and not isinstance(query, str):
        raise BundleError(f"{label}: query must be text such as data.warden.decision")
    defaults_doc = doc.get("defaults") or {}
    defaults = defaults_doc.get("input", {}) if isinstance(defaults_doc, dict) else None
    if not isinstance(defaults, dict):
        raise BundleError(f"{label}: defaults.input must be a mapping")
    lines = _case_lines(text) if p.suffix != ".json" else []
    cases = []
    for index, raw in enumerate(doc["cases"]):
        line = lines[index] if index < len(lines) else 0
        case = _case(raw, index, f"{label}:{line}" if line else f"{label} (case {index + 1})")
        line = line or _find_line(text, case.name)
        cases.append(DecisionCase(case.name, _deep_merge(defaults, case.input), case.expect, line))
    return CaseFile(label, tuple(cases), query)


def _case(raw: Any, index: int, where: str) -> DecisionCase:
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: a case must be a mapping with name, input and expect")
    name = raw.get("name") or f"case {index + 1}"
    inp, expect = raw.get("input", {}), raw.get("expect")
    if not isinstance(inp, dict):
        raise BundleError(f"{where}: input must be a mapping")
    if not isinstance(expect, dict) or not expect:
        raise BundleError(f"{where}: expect must name at least one decision field")
    empty = [k for k, v in expect.items() if v is None]
    if empty:
        raise BundleError(
            f"{where}: expect.{empty[0]} has no value (in a YAML {{...}} mapping, "
            "put text that contains a comma in quotes)"
        )
    return DecisionCase(str(name), inp, expect)


def _case_lines(text: str) -> list[int]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    node = root
    if isinstance(root, yaml.MappingNode):
        node = next((v for k, v in root.value if getattr(k, "value", None) == "cases"), None)
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def _find_line(text: str, needle: str) -> int:
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 0


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class Enforced:
    """What the proxy makes of a decision query's result (as ``PolicyGuard.decide``).

    ``effect`` is ``None`` when the policy is undefined (the proxy then applies
    ``policy.default_effect``) or when the proxy refuses the result: ``invalid``
    then says why (it denies the call as a ``policy_error``, ``guard: fallback``).
    ``mode`` is the rule's own mode, else the input's; ``own_mode`` says which.
    ``unmaskable``: the ``redact`` paths the proxy cannot apply (their values are
    recorded as they are).
    """

    effect: str | None
    mode: str
    own_mode: bool = False
    invalid: str = ""
    unmaskable: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``deny``, or ``deny (observe)`` when the proxy lets that effect through."""
        if self.effect is None or not self.passes_through:
            return self.effect or "undefined"
        return f"{self.effect} ({self.mode})"

    @property
    def passes_through(self) -> bool:
        """Whether the proxy lets the call through although the effect is not ``allow``."""
        return self.mode == Mode.OBSERVE and self.effect not in (None, Effect.ALLOW)


def input_mode(doc: Mapping[str, Any]) -> str:
    """The mode the proxy decides ``doc`` in when the rule gives none (``input.mode``)."""
    return Mode.OBSERVE.value if doc.get("mode") == Mode.OBSERVE else Mode.ENFORCE.value


def enforced(
    text: str, doc: Mapping[str, Any], modules: tuple[Module, ...] = (), default: str = ""
) -> Enforced:
    """The proxy's reading of the engine's output ``text`` for input ``doc``.

    ``default``: the effect the proxy applies when the policy is undefined (the
    configured ``policy.default_effect``); ``""`` leaves it undefined.
    """
    mode = input_mode(doc)
    result = interpret_output(text, modules)
    if result.error is not None:
        return Enforced(None, mode, invalid=result.detail or result.error)
    if result.effect is None:
        return Enforced(default or None, mode)
    unmaskable = tuple(unmaskable_redactions(result.redact))
    if result.mode is None:
        return Enforced(result.effect.value, mode, unmaskable=unmaskable)
    return Enforced(result.effect.value, result.mode.value, own_mode=True, unmaskable=unmaskable)


def unmaskable_message(paths: Iterable[str]) -> str:
    """Why ``redact`` paths that name nothing Warden can mask are a problem."""
    named = ", ".join(_show(p) for p in paths)
    return (
        f"redact names {named}, which Warden cannot mask: the proxy records that value "
        f"as it is. {REDACT_HINT}"
    )


def invalid_message(proxy: Enforced) -> str:
    """Why a result the proxy refuses fails a case or scenario, whatever it expected."""
    return (
        f"the proxy refuses this result ({proxy.invalid}) and denies the call as a "
        "policy error (guard: fallback)"
    )


def compare_decision(
    expect: Mapping[str, Any],
    result: Any,
    *,
    undefined: bool,
    proxy: Enforced | None = None,
) -> list[str]:
    """What differs between a decision and its expectation, as sentences (empty: it matches).

    ``effect`` must be equal (a bare ``true``/``false`` result counts as
    ``allow``/``deny``); ``reason`` must occur in the reason (or in one of
    ``reasons``); ``undefined: true`` expects no decision; every other key
    must equal the result's field of that name.

    ``proxy`` (:func:`enforced`, for the decision query) adds what the proxy
    enforces: ``mode`` is compared with the mode the decision is made in (the
    rule's own, else the input's), an effect other than ``allow`` in observe
    mode, which the proxy lets through, meets an ``effect`` expectation only
    when ``expect`` says ``mode: observe`` too, and a ``redact`` path the proxy
    cannot apply is a problem whatever ``expect`` says.
    """
    if expect.get("undefined") is True:
        return [] if undefined else [f"expected no decision (undefined), got {_show(result)}"]
    if undefined:
        return ["expected a decision, but the policy is undefined for this input"]
    fields: Mapping[str, Any]
    if isinstance(result, bool):
        fields = {"effect": "allow" if result else "deny"}
    elif isinstance(result, Mapping):
        fields = result
    else:
        return [f"expected a decision object, got {_show(result)}"]
    problems = [] if proxy is None else _enforcement_problems(expect, proxy)
    for key, want in expect.items():
        if key == "undefined" or (key == "mode" and proxy is not None):
            continue
        if key == "reason":
            reasons = [fields.get("reason"), *(fields.get("reasons") or [])]
            texts = [r for r in reasons if isinstance(r, str)]
            if not any(str(want) in r for r in texts):
                got = "; ".join(texts) or "no reason"
                problems.append(f"expected the reason to contain {want!r}, got {got!r}")
        elif key not in fields:
            problems.append(f"expected {key} {_show(want)}, the decision has no {key}")
        elif fields[key] != want:
            problems.append(f"expected {key} {_show(want)}, got {_show(fields[key])}")
    return problems


def _enforcement_problems(expect: Mapping[str, Any], proxy: Enforced) -> list[str]:
    """The mode expected against the mode decided in, and an expected effect the proxy
    would not enforce (observe mode lets the call through)."""
    problems = [unmaskable_message(proxy.unmaskable)] if proxy.unmaskable else []
    if "mode" in expect and expect["mode"] != proxy.mode:
        source = "the rule's own" if proxy.own_mode else "input.mode; the rule gives none"
        problems.append(
            f"expected mode {_show(expect['mode'])}, got {_show(proxy.mode)} ({source})"
        )
    want = expect.get("effect")
    if want == proxy.effect and proxy.passes_through and "mode" not in expect:
        source = '"mode": "observe" in the result' if proxy.own_mode else "input.mode is observe"
        problems.append(
            f"expected effect {_show(want)}, got {_show(proxy.label)}: in observe mode "
            f"({source}) the proxy records the decision and lets the call through; add "
            "mode: observe to expect if that is intended"
        )
    return problems


def _show(value: Any) -> str:
    return orjson.dumps(value).decode()
