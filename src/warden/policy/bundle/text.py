"""Rego source text as the parser reads it: strings and comments blanked, the package found.

Several readers scan Rego text without parsing it (which package a module is
in, which functions it defines, which input paths it reads). They must read
it as rego-cpp does: a quote inside a comment starts no string, a ``#``
inside a string starts no comment, and whitespace, newlines included, may sit
between any two tokens (``package`` on one line and its name on the next).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["blank", "package_of", "string_end"]

_PACKAGE: Final = re.compile(r"\s*package(?![\w])\s*")
# rego-cpp takes space around a package's dots and brackets (``package limits .counted``
# is ``limits.counted``), and a newline before a dot but not before a bracket.
_REF: Final = re.compile(
    r'[A-Za-z_][A-Za-z0-9_]*(?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*|[ \t]*\[\s*"[^"\n]*"\s*\])*'
)
_PKG_SEGMENT: Final = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)|\[\s*"([^"]*)"\s*\]')


def blank(source: str, fill: str = " ") -> str:
    """Blank out string literals (with ``fill``) and comments, keeping every offset.

    One pass from the start, as the parser reads: a quote inside a comment
    (``# don't``, a lone backtick) starts no string, and a ``#`` inside a
    string starts no comment.
    """
    out = list(source)
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "#":
            end = source.find("\n", i)
            end = n if end < 0 else end
            out[i:end] = " " * (end - i)
            i = end
        elif c in {'"', "`"}:
            end = string_end(source, i)
            out[i:end] = [ch if ch == "\n" else fill for ch in source[i:end]]
            i = end
        else:
            i += 1
    return "".join(out)


def string_end(source: str, start: int) -> int:
    """Where the string literal opening at ``start`` ends (past its closing quote)."""
    if source[start] == "`":
        end = source.find("`", start + 1)
        return len(source) if end < 0 else end + 1
    i = start + 1
    while i < len(source) and source[i] not in '"\n':
        i += 2 if source[i] == "\\" else 1
    return min(i + 1, len(source))


def package_of(source: str) -> tuple[str, int] | None:
    """The package a module declares, as a slash path (``warden/tools``), and the offset
    of its ``package`` keyword; ``None`` if the module does not start with one.

    The declaration is the module's first statement, so it is the first word
    once comments are blanked; a ``package`` line inside a raw string later on
    is not it.
    """
    text = blank(source)
    keyword = _PACKAGE.match(text)
    if keyword is None:
        return None
    ref = _REF.match(source, keyword.end())
    if ref is None:
        return None
    parts = [a or b for a, b in _PKG_SEGMENT.findall(ref.group(0))]
    return "/".join(parts), len(text) - len(text.lstrip())
