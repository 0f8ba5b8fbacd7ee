"""A small scanner for Rego source: top-level statements, with strings and comments blanked.

Enough to find test rules, blank the ones not running, and lint rule heads;
it follows the layout ``opa fmt`` writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "NAME",
    "TEST_PREFIX",
    "TODO_PREFIX",
    "Statement",
    "blank",
    "is_test",
    "keep_only",
    "package_ref",
    "split_statements",
]

TEST_PREFIX = "test_"
TODO_PREFIX = "todo_"
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|#[^\n]*')
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def blank(source: str) -> str:
    """``source`` with strings and comments replaced by spaces (offsets and newlines kept)."""

    def spaces(m: re.Match[str]) -> str:
        text = m.group(0)
        if text.startswith("#"):
            return " " * len(text)
        return text[0] + re.sub(r"[^\n]", " ", text[1:-1]) + text[-1]

    return _STRING_OR_COMMENT.sub(spaces, source)


@dataclass(frozen=True, slots=True)
class Statement:
    """One top-level statement of a module: ``package``, ``import`` or a rule.

    ``name`` is the rule name (``decision``, ``test_refund``), or the keyword
    for ``package`` and ``import``. ``start``/``end`` are offsets into the
    source; ``line`` is 1-based.
    """

    name: str
    start: int
    end: int
    line: int

    def text(self, source: str) -> str:
        """The statement's source text."""
        return source[self.start : self.end]


def split_statements(source: str) -> list[Statement]:
    """Split a module into top-level statements.

    A statement starts at a line that begins, in column 0 and outside any
    bracket, with a name other than ``else``; it runs until the next one.
    This is the layout ``opa fmt`` writes.
    """
    blanked = blank(source)
    starts: list[int] = []
    depth = 0
    line_start = True
    for i, ch in enumerate(blanked):
        if line_start and depth == 0 and (ch.isalpha() or ch == "_"):
            word = NAME.match(blanked, i)
            if word is not None and word.group(0) != "else":
                starts.append(i)
        line_start = ch == "\n"
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
    out: list[Statement] = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(source)
        out.append(
            Statement(_statement_name(blanked, start), start, end, source.count("\n", 0, start) + 1)
        )
    return out


def _statement_name(blanked: str, start: int) -> str:
    words: list[str] = NAME.findall(blanked[start : start + 200])
    if not words:
        return ""
    if words[0] == "default" and len(words) > 1:
        return words[1]
    return words[0]


def is_test(name: str) -> bool:
    return name.startswith((TEST_PREFIX, TODO_PREFIX))


def package_ref(source: str) -> str:
    match = re.search(r"^[ \t]*package[ \t]+([^\s#]+)", blank(source), re.MULTILINE)
    if match is None:
        return ""
    return source[match.start(1) : match.end(1)]


def keep_only(source: str, keep: Iterable[Statement], drop: Iterable[Statement]) -> str:
    """``source`` with the ``drop`` statements blanked (newlines kept, so lines stay right)."""
    kept = {(s.start, s.end) for s in keep}
    chars = list(source)
    for stmt in drop:
        if (stmt.start, stmt.end) in kept:
            continue
        for i in range(stmt.start, stmt.end):
            if chars[i] != "\n":
                chars[i] = " "
    return "".join(chars)
