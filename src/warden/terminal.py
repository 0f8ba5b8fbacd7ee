"""Text from agents and other people, made safe to print on an operator's terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import unicodedata

__all__ = ["plain", "reader_left"]


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
    """``text`` safe for a terminal: control and format characters as ``\\uXXXX``.

    Tool names, reasons, argument keys and comments come from the agent or
    other people: an escape sequence in them could rewrite the screen (a
    "pending" shown as "approved", rows above erased), a newline or a bidi
    override fake a line. The escapes are JSON's, so escaped JSON stays
    valid JSON. ``keep``: characters left as they are (``"\\n"`` for a
    multi-line document).
    """
    return "".join(
        ch if ch in keep or unicodedata.category(ch) not in ("Cc", "Cf") else _escaped(ch)
        for ch in str(text)
    )


def _escaped(ch: str) -> str:
    # UTF-16 code units, as JSON writes a character past U+FFFF (a surrogate pair).
    units = ch.encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
