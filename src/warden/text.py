"""Text an agent or an upstream sent, made fit for UTF-8 outputs (records, metrics, spans, logs).

A JSON string may escape a lone surrogate (``"\\ud800"``): valid JSON, but no
character, and UTF-8 cannot hold it. Where Warden must still write what it was
sent (an outcome, a metric label, a span name, a log line), it writes U+FFFD
in its place; where it decides on the text (an action), it refuses it instead.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["has_surrogate", "mended"]

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def mended(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD (the same object when there is none)."""
    return _SURROGATE.sub("\ufffd", text) if has_surrogate(text) else text
