"""Text from agents and other people, made safe to show a person.

On an operator's terminal, in the console's pages and in a chat message
alike: control and format characters (escape sequences, bidi overrides,
zero-width and tag characters) are written out as ``\\uXXXX``, so what a
person reads is what the call carries.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import unicodedata
from collections.abc import Mapping
from typing import Any

__all__ = ["disguised", "disguised_paths", "plain", "reader_left"]

_ESCAPED = frozenset({"Cc", "Cf", "Zl", "Zp"})
"""Unicode categories :func:`plain` escapes: controls, format characters (bidi,
zero-width, tags) and the line and paragraph separators U+2028 and U+2029."""
UNICODE_15 = (
    (0x0000, 0x001F), (0x007F, 0x009F), (0x00AD, 0x00AD), (0x0600, 0x0605),
    (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891),
    (0x08E2, 0x08E2), (0x180E, 0x180E), (0x200B, 0x200F), (0x2028, 0x202E),
    (0x2060, 0x2064), (0x2066, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)  # fmt: skip
"""The code points of the categories in _ESCAPED in Unicode 15.0 (Python 3.12's), as
ranges: looked up at C speed (a record of megabytes is shown on the console's
event loop) instead of each character's category."""
_EXACT = unicodedata.unidata_version == "15.0.0"
"""Whether UNICODE_15 is this Python's list; if not, each character is looked up."""
_LAYOUT = frozenset("\t\n\r")
"""Control characters that only lay text out: JSON shows them as ``\\t``, ``\\n``, ``\\r``."""
_HIDING = tuple(chr(cp) for lo, hi in UNICODE_15 for cp in range(lo, hi + 1))
_DISGUISING = frozenset(_HIDING) - _LAYOUT


def reader_left() -> int:
    """End a command whose reader closed the pipe (``warden config | head -1``) quietly.

    Python's recipe: point stdout at devnull, so the interpreter's last flush does
    not fail too. The status is Python's own on EPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):  # stdout is no file (captured)
        os.dup2(devnull, sys.stdout.fileno())
    return 1


def plain(text: object, keep: str = "") -> str:
    """``text`` safe to show: control, format and line-separator characters as ``\\uXXXX``.

    Tool names, reasons, argument keys and comments come from the agent or
    other people: an escape sequence in them could rewrite the screen (a
    "pending" shown as "approved", rows above erased), a newline or a bidi
    override fake a line. The escapes are JSON's, so escaped JSON stays
    valid JSON. ``keep``: characters left as they are (``"\\n"`` for a
    multi-line document).

    Not for a value that is sent back (a form's value, a link): the escaped
    text is another string, which would name another tool or agent.
    """
    whole = str(text)
    if whole.isprintable():  # none of them (nor other spaces): checked at C speed
        return whole
    if _EXACT:  # runs of them found by the regex engine
        return _runs(keep).sub(lambda m: "".join(map(_escaped, m[0])), whole)
    return "".join(
        ch if ch in keep or unicodedata.category(ch) not in _ESCAPED else _escaped(ch)
        for ch in whole
    )


@functools.cache  # one per keep: "" and "\n" in practice
def _runs(keep: str) -> re.Pattern[str]:
    spans: list[list[int]] = []  # UNICODE_15 without keep, as ranges: a class of
    for ch in _HIDING:  # single characters makes the regex engine 8 times slower
        if ch in keep:
            continue
        if spans and spans[-1][1] == ord(ch) - 1:
            spans[-1][1] = ord(ch)
        else:
            spans.append([ord(ch), ord(ch)])
    ranges = "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in spans)
    return re.compile(f"[{ranges}]+")


@functools.cache  # bounded: called for the characters of _ESCAPED only
def _escaped(ch: str) -> str:
    # UTF-16 code units, as JSON writes a character past U+FFFF (a surrogate pair).
    units = ch.encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))


def disguised(text: str) -> bool:
    """Whether ``text`` holds a character that :func:`plain` escapes, other than a tab or
    line break: a bidi control, a zero-width or tag character, a terminal control.

    Such a character changes how the text is drawn (``4401-\\u202e8765`` is drawn
    ``4401-5678``) or hides part of it, where it is shown unescaped: in the
    service the call goes to, say.
    """
    if text.isprintable():
        return False
    if _EXACT:
        return not _DISGUISING.isdisjoint(text)
    return any(ch not in _LAYOUT and unicodedata.category(ch) in _ESCAPED for ch in text)


def disguised_paths(value: Any) -> list[str]:
    """JSON pointers of the keys and text values in ``value`` (decoded JSON) that are
    :func:`disguised`, in document order; a key reads ``<pointer> (the name)``."""
    out: list[str] = []
    # A stack, not recursion: an agent chooses how deep its arguments go. A key is
    # pushed as its own entry (a text at "<pointer> (the name)"), just before its value.
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        at, item = todo.pop()
        if isinstance(item, str):
            if disguised(item):
                out.append(at or "(the whole value)")
        elif isinstance(item, Mapping):
            inner: list[tuple[str, Any]] = []
            for key, child in item.items():
                here = f"{at}/{str(key).replace('~', '~0').replace('/', '~1')}"
                inner += [(f"{here} (the name)", str(key)), (here, child)]
            todo.extend(reversed(inner))
        elif isinstance(item, list | tuple):
            todo.extend(reversed([(f"{at}/{i}", child) for i, child in enumerate(item)]))
    return out
