"""Compiling a bundle's modules with the engine, as the workers do; reporting what fails.

Importing this module loads the engine (:mod:`warden.policy.rego`), so the
proxy process never imports it: workers compile, and so do the ahead-of-time
checks (``load_bundle(check_syntax=True)``, ``warden policy check``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from warden.policy import rego
from warden.policy.bundle.diagnostics import describe_rego_error, display_path, line_col
from warden.policy.bundle.model import BundleError, Module
from warden.policy.bundle.text import blank

__all__ = [
    "ENGINE_CALLS",
    "check_engine_faults",
    "check_syntax",
    "compile_bundle",
    "compile_check",
    "engine_function",
]

_CALL = re.compile(r"(?<![\w.\"])([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\(")
_HEAD = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.MULTILINE)


# What rego-cpp gets wrong beyond repair by a policy's author: refused when a bundle
# loads, with what to write instead (docs/policies.md, engine limits). Matched in
# blanked text (strings and comments gone), with any space or line break between a
# name's parts as the parser takes them, and as a reference too (`with f as rem`).
# `name`: a builtin a function the bundle defines of that name stands in for.
@dataclass(frozen=True, slots=True)
class _Fault:
    pattern: re.Pattern[str]
    problem: str
    hint: str
    name: str | None = None


_EXACT = "write a - b * floor(a / b) instead, which it computes exactly"
_BY_HAND = "every x in xs { x <= 500 } for a bound, or compare the values one by one"
_ENGINE_FAULTS = (
    _Fault(
        re.compile(r"%"),
        "the % operator gives wrong remainders on this engine (74 % 7 is 6)",
        _EXACT,
    ),
    _Fault(
        re.compile(r"(?<![\w.\"])rem\s*\(|\bas\s+rem\b"),
        "rem, the builtin behind %, gives wrong remainders on this engine (rem(74, 7) is 6)",
        _EXACT,
        "rem",
    ),
    # These two corrupt the heap: the worker aborts (free(): invalid pointer) on
    # evaluations that reach them, depending on its layout, so a test can pass.
    _Fault(
        re.compile(r"(?<![\w.\"])time\s*\.\s*weekday\b|(?<![\w.\"])time\s*\["),
        "time.weekday crashes this engine",
        "compute the day instead: with d := floor(ns / 86400000000000) + 4, "
        "d - 7 * floor(d / 7) is 0 on a Sunday (UTC)",
    ),
    _Fault(
        re.compile(r"(?<![\w.\"])time\s*\.\s*(?:date|clock)\s*\(\s*\["),
        "the time-zone form of time.date and time.clock ([ns, zone]) crashes this engine",
        "add the zone's offset to the nanoseconds and pass them alone",
    ),
    # These compare numbers as text: max([401, 1933]) is 401, so `max(amounts) <= 500`
    # allows 1933 (sort too, which stays allowed: it orders strings right).
    _Fault(
        re.compile(r"(?<![\w.\"])max\s*\(|\bas\s+max\b"),
        "max compares numbers as text on this engine (max([401, 1933]) is 401)",
        _BY_HAND,
        "max",
    ),
    _Fault(
        re.compile(r"(?<![\w.\"])min\s*\(|\bas\s+min\b"),
        "min compares numbers as text on this engine (min([100, 20]) is 100)",
        _BY_HAND,
        "min",
    ),
    _Fault(
        re.compile(r"(?<![\w.\"])semver\s*(?:\.\s*compare\b|\[)"),
        "semver.compare is wrong on this engine (1.10.0 is below 1.9.0)",
        "compare the numeric parts yourself, or put the versions allowed in data",
    ),
)
# Regular expressions are ECMAScript (std::regex) here, not RE2: these RE2 forms make
# regex.match undefined or silently false, so `deny if regex.match("(?i)drop", x)`
# never denies. Checked in pattern literals: the first argument, or regex.replace's
# second; `regex[...]` (a builtin by name) is refused, as its pattern cannot be found.
_LITERAL = r"(\"(?:[^\"\\\n]|\\.)*\"|`[^`]*`)"
_REGEX_CALL = re.compile(
    r"regex\s*\.\s*(?:replace\s*\(\s*(?:[^,()\"`]|\([^()]*\)|" + _LITERAL + r")+,\s*"
    r"|\w+\s*\(\s*)" + _LITERAL
)
# After an even run of backslashes: `\\AppData` and `\(?s\)` are literal text.
_RE2_ONLY = re.compile(r"(?<!\\)(?:\\\\)*(\(\?[a-zA-Z<-]|\\[zQpPA])")
_REGEX_BY_NAME = re.compile(r"(?<![\w.\"])regex\s*\[")
# A function a package defines: a rule head, at the start of a line (an indented
# `max(xs) = m` is a call in a body), `name(args) :=`, `= ...`, `if` or `{`.
_DEFINITION = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]*)\s*\([^()\n]*\)\s*(?::=|=(?!=)|if\b|\{)", re.MULTILINE
)
_PACKAGE = re.compile(r"^[ \t]*package\s+([^\s#]+)", re.MULTILINE)
# Calls the engine evaluates itself, outside its builtin table (``is_builtin`` says no).
# print writes its arguments to the evaluating process's standard output, as OPA's
# does, and never fails the rule: the authoring child shows it, workers discard it.
ENGINE_CALLS = frozenset({"print"})
_KEYWORDS = frozenset(
    {
        "if",
        "not",
        "some",
        "every",
        "with",
        "in",
        "contains",
        "else",
        "default",
        "import",
        "package",
        "as",
        "and",
        "or",
        "set",
        "true",
        "false",
        "null",
    }
)


def check_syntax(modules: Sequence[Module], label: str) -> None:
    """Parse each module on its own; raise :class:`BundleError` at the first syntax error."""
    for module in modules:
        try:
            rego.parse_check(module.path, module.source)
        except rego.RegoError as exc:
            raise BundleError(
                "\n".join(describe_rego_error(str(exc), [module], label=label))
            ) from None


def _rego_string(literal: str) -> str:
    """The text of a double-quoted Rego string literal (JSON's escapes)."""
    try:
        text = orjson.loads(literal)
    except orjson.JSONDecodeError:
        return literal[1:-1]
    return text if isinstance(text, str) else literal[1:-1]


def _package_of(text: str) -> str:
    found = _PACKAGE.search(text)
    return found.group(1) if found is not None else ""


def check_engine_faults(
    modules: Sequence[Module], label: str = "", cleaned: Mapping[str, str] | None = None
) -> None:
    """Raise :class:`BundleError` at the first thing the engine gets wrong (``_ENGINE_FAULTS``).

    A zone passed to ``time.date`` or ``time.clock`` through a variable is not
    seen here (docs/policies.md, engine limits).
    """
    texts = {m.path: cleaned[m.path] if cleaned is not None else blank(m.source) for m in modules}
    # Per package: a function `max` in another package does not stand in for the
    # builtin here, where an unqualified `max(...)` is the builtin.
    defined: dict[str, set[str]] = {}
    for module in modules:
        text = texts[module.path]
        defined.setdefault(_package_of(text), set()).update(_DEFINITION.findall(text))

    def refuse(module: Module, at: int, problem: str, hint: str) -> None:
        line, col = line_col(module.source, len(module.source[:at].encode()))
        raise BundleError(f"{display_path(label, module.path)}:{line}:{col}: {problem}; {hint}")

    for module in modules:
        text = texts[module.path]
        own = defined[_package_of(text)]
        for fault in _ENGINE_FAULTS:
            if fault.name is not None and fault.name in own:
                continue  # this package's own function of that name
            if (found := fault.pattern.search(text)) is not None:
                refuse(module, found.start(), fault.problem, fault.hint)
        if (by_name := _REGEX_BY_NAME.search(text)) is not None:
            refuse(
                module,
                by_name.start(),
                "regex[...] names a regular-expression builtin whose pattern this check "
                "cannot read (this engine takes ECMAScript, not RE2)",
                "call it as regex.match(...) with the pattern written out",
            )
        for call in _REGEX_CALL.finditer(module.source):
            if not text[call.start()].strip():
                continue  # inside a comment or a string
            literal = call.group(2)
            pattern = literal[1:-1] if literal[0] == "`" else _rego_string(literal)
            if (re2 := _RE2_ONLY.search(pattern)) is not None:
                refuse(
                    module,
                    call.start(2),
                    f"the pattern {literal[:40]} uses {re2.group(1)!r}, which this engine's "
                    "regular expressions (ECMAScript, not RE2) do not take",
                    "write (?i) as [Dd][Rr][Oo][Pp] or lower() the value first, \\z as $, "
                    "and \\p{...} as explicit ranges",
                )


def engine_function(interp: rego.Interpreter, name: str) -> bool:
    """Whether the engine evaluates a call of ``name``: a builtin, or one of ``ENGINE_CALLS``.

    The one rule ``warden policy check`` and the loader share for calls the
    bundle does not define.
    """
    return name in ENGINE_CALLS or interp.is_builtin(name)


def _check_functions(interp: rego.Interpreter, modules: Sequence[Module], label: str) -> None:
    """Refuse calls to functions that are neither built in nor defined in the bundle,
    and calls the engine crashes on (``_ENGINE_FAULTS``).

    regopy only reports these when the call is evaluated; OPA reports them at
    compile time, and so do we. The scan is deliberately lenient: any name
    that heads a line anywhere in the bundle counts as defined.
    """
    cleaned = {m.path: blank(m.source) for m in modules}
    check_engine_faults(modules, label, cleaned)
    defined = {name for text in cleaned.values() for name in _HEAD.findall(text)}
    known: dict[str, bool] = {}
    for module in modules:
        text = cleaned[module.path]
        for match in _CALL.finditer(text):
            name = match.group(1)
            if name in _KEYWORDS or name.rsplit(".", 1)[-1] in defined:
                continue
            if name not in known:
                known[name] = engine_function(interp, name)
            if not known[name]:
                line, col = line_col(module.source, len(module.source[: match.start()].encode()))
                raise BundleError(
                    f"{display_path(label, module.path)}:{line}:{col}: unknown function {name}"
                    " (not a builtin available in this engine, nor defined in the bundle)"
                )


def compile_bundle(
    modules: Sequence[Module], data: Mapping[str, Any], query: str, *, label: str = ""
) -> rego.CompiledQuery:
    """Compile modules and data for ``query``, for a :class:`warden.policy.rego.Evaluator`.

    Raises :class:`BundleError` as :func:`compile_check` does.
    """
    interp = rego.Interpreter()
    for module in modules:
        try:
            interp.add_module(module.path, module.source)
        except rego.RegoError as exc:
            raise BundleError(
                "\n".join(describe_rego_error(str(exc), modules, label=label))
            ) from None
    _check_functions(interp, modules, label)
    try:
        interp.add_data_json(orjson.dumps(data).decode())
    except rego.RegoError as exc:
        raise BundleError(f"{label or 'data'}: data rejected by the engine: {exc}") from None
    try:
        compiled = interp.build(query)
    except rego.RegoError as exc:
        detail = "; ".join(m.split(": ", 1)[-1] for m in describe_rego_error(str(exc), modules))
        raise BundleError(f"query {query!r}: {detail}") from None
    if not compiled.ok:
        lines = [
            line
            for text in compiled.errors()
            for line in describe_rego_error(text, modules, label=label)
        ]
        raise BundleError(
            "\n".join(lines or [f"{label or 'policy'}: the bundle failed to compile"])
        )
    return compiled


def compile_check(
    modules: Sequence[Module], data: Mapping[str, Any], query: str, *, label: str = ""
) -> None:
    """Compile the modules and data for ``query`` as the engine will; raise on errors.

    Raises :class:`BundleError` whose message has one ``file:line:col: message``
    line per problem: syntax errors, calls to unknown functions, and rule
    conflicts the compiler detects (e.g. a set rule and a complete rule of the
    same name). Runs in the calling process and takes a few milliseconds per
    module; it never evaluates the policy.

    Caution: rego-cpp aborts the whole process when compiling some constructs
    (a builtin called under ``with input as``); the engine therefore compiles
    in its worker processes, never in the proxy.
    """
    compile_bundle(modules, data, query, label=label)
