"""Flagging v0 syntax, removed or missing builtins and engine pitfalls in one module.

The syntax OPA 1.x rejects although this engine accepts it, found by text
alone: the lint never runs the engine. Also the ``redact`` paths written out
in a module that name nothing Warden can mask (:func:`redact_problems`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from warden.audit.record import unmaskable_redactions
from warden.policy.authoring.statements import NAME, TEST_PREFIX, blank, split_statements

__all__ = [
    "CALL",
    "MISSING_BUILTINS",
    "REDACT_HINT",
    "Finding",
    "lint_module",
    "redact_problems",
]


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem ``warden policy check`` reports. ``severity`` is ``error`` or ``warning``."""

    file: str
    line: int
    col: int
    severity: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        text = f"{where}: {self.severity}: {self.message}"
        return text + (f"\n  hint: {self.hint}" if self.hint else "")

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON object."""
        return {
            "file": self.file,
            "row": self.line,
            "col": self.col,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


_V1_HINT = "add `import rego.v1` and write rules in v1 syntax, which OPA 1.x requires"
# Builtins OPA 1.x removed, with what to use instead.
_DEPRECATED = {
    "any": "`some x in xs` or a comprehension",
    "all": "`every x in xs { ... }`",
    "re_match": "regex.match",
    "set_diff": "the `-` operator on sets",
    "net.cidr_overlap": "net.cidr_contains",
    "cast_array": "a comprehension",
    "cast_set": "a set comprehension",
    "cast_string": "format_int or sprintf",
    "cast_boolean": "a comparison",
    "cast_null": "null",
    "cast_object": "an object comprehension",
}
# Builtins this engine lacks: they evaluate to undefined, so a rule using them never holds.
MISSING_BUILTINS = (
    "http.send",
    "net.",
    "json.match_schema",
    "rego.metadata.",
    "strings.render_template",
)
CALL = re.compile(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\(")
_SPRINTF_Q = re.compile(r'sprintf\(\s*"(?:[^"\\\n]|\\.)*%q')
_KV_SOME_IN_COMPREHENSION = re.compile(r"\|\s*some\s+\w+\s*,\s*\w+\s+in\b")
# An input value compared with a number: ``input.action.arguments.amount > 500``.
_INPUT_REF = r"(?:input(?:\.\w+|\[[^\]\n]*\])+|object\.get\(\s*input\b[^)\n]*\))"
_NUMBER = r"-?\d+(?:\.\d+)?"
_WARDENS_NUMBERS = re.compile(r"\binput\.(?:session|budget)\b")
_ORDERED = re.compile(
    rf"(?:{_INPUT_REF}\s*(?:<=|>=|<|>)\s*{_NUMBER}\b)|(?:\b{_NUMBER}\s*(?:<=|>=|<|>)\s*{_INPUT_REF})"
)


def lint_module(path: str, source: str) -> list[Finding]:
    """Flag v0 syntax, removed or missing builtins and engine pitfalls in one module."""
    blanked = blank(source)
    findings: list[Finding] = []

    def at(offset: int) -> tuple[int, int]:
        line = source.count("\n", 0, offset) + 1
        return line, offset - (source.rfind("\n", 0, offset) + 1) + 1

    def add(offset: int, severity: str, message: str, hint: str = "") -> None:
        line, col = at(offset)
        findings.append(Finding(path, line, col, severity, message, hint))

    has_tests = False
    for stmt in split_statements(source):
        text = blanked[stmt.start : stmt.end]
        if stmt.name == "package":
            continue
        if stmt.name == "import":
            if re.match(r"import\s+future\.keywords", text):
                add(stmt.start, "warning", "`import future.keywords` is not needed", _V1_HINT)
            continue
        has_tests = has_tests or stmt.name.startswith(TEST_PREFIX)
        for offset, message in _v0_heads(text):
            add(stmt.start + offset, "error", message, _V1_HINT)
    for match in CALL.finditer(blanked):
        problem = _call_problem(match.group(1))
        if problem is not None:
            add(match.start(), *problem)
    for match in _SPRINTF_Q.finditer(source):
        add(
            match.start(),
            "warning",
            "sprintf on this engine does not know %q: it stays in the text and shifts the values",
            "use %v",
        )
    for match in _KV_SOME_IN_COMPREHENSION.finditer(blanked):
        add(
            match.start(),
            "error",
            "`some k, v in x` inside a comprehension does not parse on this engine",
            "write `some k` and then `v := x[k]`",
        )
    for offset in _unchecked_comparisons(source, blanked):
        add(
            offset,
            "warning",
            'this engine orders every string below every number: "9000" > 500 is false, '
            "so a string where a number was meant passes an upper bound",
            "check the type first: is_number(x); x > 500 (docs/policies.md, engine limits)",
        )
    findings.extend(
        Finding(path, *at(offset), "error", message, REDACT_HINT)
        for offset, written in _redact_literals(source, blanked)
        for message in redact_problems([written])
    )
    if has_tests and not path.endswith("_test.rego"):
        add(
            0,
            "warning",
            "test rules outside a *_test.rego file are compiled into production",
            "move the tests to a file whose name ends in _test.rego",
        )
    return findings


REDACT_HINT = (
    "Warden masks action.arguments, context, action.input_responses and result, "
    "or a dotted path inside one (action.arguments.email, context.customer_email); "
    "see docs/policies.md, the result object"
)
# A redact list written out: `"redact": [` in an object, `redact := [` as a rule.
_REDACT_LIST = re.compile(r'"redact"\s*:\s*\[|(?<![\w.])redact\s*:?=\s*\[')
_REDACT_CONTAINS = re.compile(r"(?<![\w.])redact\s+contains\s+(?=[\"`])")
_LITERAL = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`')


def redact_problems(paths: Iterable[str]) -> list[str]:
    """A sentence for each ``redact`` path that names nothing Warden can mask."""
    return [
        f"redact path {json.dumps(p)} names nothing Warden can mask: the proxy records "
        "that value as it is"
        for p in unmaskable_redactions(paths)
    ]


def _redact_literals(source: str, blanked: str) -> Iterator[tuple[int, str]]:
    """The ``redact`` paths a module writes out as strings, with their offsets.

    Only literal elements of a literal list count; a path built at evaluation
    (``sprintf``, data) is left to the decision tables.
    """
    for match in _REDACT_LIST.finditer(source):
        if blanked[match.start()] != source[match.start()]:
            continue  # in a comment or a string
        start = match.end()
        end = _closing_bracket(blanked, start - 1)
        for item in _LITERAL.finditer(source, start, end):
            before = blanked[start : item.start()].rstrip()
            after = blanked[item.end() : end].lstrip()
            if (before == "" or before.endswith(",")) and (after == "" or after[0] == ","):
                yield item.start(), _literal_text(item.group(0))
    for match in _REDACT_CONTAINS.finditer(source):
        if blanked[match.start()] == source[match.start()]:
            single = _LITERAL.match(source, match.end())
            if single is not None:
                yield single.start(), _literal_text(single.group(0))


def _closing_bracket(blanked: str, at: int) -> int:
    """The offset of the bracket closing the one at ``at`` (the end of text if none)."""
    depth = 0
    for i in range(at, len(blanked)):
        if blanked[i] in "([{":
            depth += 1
        elif blanked[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return len(blanked)


def _literal_text(literal: str) -> str:
    if literal.startswith("`"):
        return literal[1:-1]
    try:
        text = json.loads(literal)
    except ValueError:
        return literal[1:-1]
    return text if isinstance(text, str) else literal[1:-1]


def _unchecked_comparisons(source: str, blanked: str) -> Iterator[int]:
    """Offsets of input values compared with a number in rules that never call ``is_number``.

    A rule that checks a type is trusted to check the one it compares. A
    session's counters and the budget are Warden's own numbers.
    """
    for stmt in split_statements(source):
        text = blanked[stmt.start : stmt.end]
        if "is_number(" in text:
            continue
        for match in _ORDERED.finditer(text):
            if _WARDENS_NUMBERS.search(match.group(0)) is None:
                yield stmt.start + match.start()


def _call_problem(name: str) -> tuple[str, str, str] | None:
    """Severity, message and hint for a call of ``name`` this engine runs unlike OPA 1.x."""
    if name in _DEPRECATED:
        return "error", f"{name} was removed in OPA 1.x", f"use {_DEPRECATED[name]}"
    if name == "trace":
        return (
            "error",
            "trace() does not exist in this engine: the rule fails with an error",
            "use print(...) instead: `warden policy test` shows what it prints (failing "
            "tests, or every test with -v), `warden policy eval` on standard error",
        )
    if name == "json.unmarshal":
        return (
            "warning",
            "json.unmarshal on this engine does not decode escapes: "
            '"\\/etc" stays \\/etc and "\\u0072m" stays \\u0072m, so a check on the '
            "decoded text can be passed by escaping it",
            "decide on the parsed arguments Warden gives (input.action.arguments), or deny "
            "a string holding a backslash before reading it",
        )
    if name == "to_number":
        return (
            "warning",
            'to_number on this engine reads a leading number: "9_000" and "9,000" are 9, '
            '"9000abc" is 9000 (OPA refuses all three)',
            "check the whole text first: regex.match(`^-?[0-9]+(\\.[0-9]+)?$`, s), "
            "or take numbers from JSON bodies (docs/policies.md, engine limits)",
        )
    if name.startswith(MISSING_BUILTINS):
        return (
            "warning",
            f"{name} is not available in this engine; it evaluates to undefined",
            "pass what it would fetch in the input or in data.json",
        )
    return None


def _v0_heads(text: str) -> Iterator[tuple[int, str]]:
    """v0 rule heads in one blanked statement: bodies without ``if``, sets without ``contains``.

    Yields ``(offset in text, message)``.
    """
    for start, head, brace in _heads(text):
        words = NAME.findall(head)
        if not words or words[0] in ("default", "import", "package"):
            continue
        if words[0] != "else" and _SET_HEAD.fullmatch(head.strip()):
            if "if" in words:
                yield (
                    start,
                    (
                        "`p[x] if` makes a set on this engine but an object (p[x] = true) in "
                        "OPA 1.x; write `p contains x if`"
                    ),
                )
            else:
                yield start, "partial set rule without `contains` (v0 syntax)"
        elif brace is not None and "if" not in words:
            yield brace, "rule body without `if` (v0 syntax)"


_SET_HEAD = re.compile(r"[A-Za-z_][\w.]*\s*\[[^\]]*\]\s*(?:if\b.*)?", re.DOTALL)


def _heads(text: str) -> Iterator[tuple[int, str, int | None]]:
    """Each head of a statement (the rule and every ``else``) with its body brace, if any.

    A ``{`` opens a body unless it directly follows ``:=``, ``=`` or ``if``
    (then it is a value or the body of an ``if``).
    """
    depth = 0
    seg_start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if (
            depth == 0
            and text.startswith("else", i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))
        ):
            after = text[i + 4 : i + 5]
            if not (after.isalnum() or after == "_"):
                if i > seg_start:
                    yield from _finish(text, seg_start, i)
                seg_start = i
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == "{":
            if depth == 0:
                prev = text[seg_start:i].rstrip()
                is_value = prev.endswith((":=", "=")) and not prev.endswith(("==", "!="))
                if not is_value:
                    yield seg_start, text[seg_start:i], i
                    i = _skip_block(text, i)
                    seg_start = i
                    continue
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        i += 1
    if seg_start < n and text[seg_start:].strip():
        yield from _finish(text, seg_start, n)


def _finish(text: str, start: int, end: int) -> Iterator[tuple[int, str, int | None]]:
    head = text[start:end]
    if head.strip() and head.strip() != "}":
        yield start, head, None


def _skip_block(text: str, i: int) -> int:
    depth = 0
    while i < len(text):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i
