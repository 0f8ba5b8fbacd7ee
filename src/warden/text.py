"""Text an agent or an upstream sent, made fit for UTF-8 outputs (records, metrics, spans, logs).

A JSON string may escape a lone surrogate (``"\\ud800"``): valid JSON, but no
character, and UTF-8 cannot hold it. Where Warden must still write what it was
sent (an outcome, a metric label, a span name, a log line), it writes U+FFFD
in its place; where it decides on the text (an action), it refuses it instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["has_surrogate", "keys_fold_apart", "mended", "shown_name"]

_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}")


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def mended(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD (the same object when there is none)."""
    return _SURROGATE.sub("\ufffd", text) if has_surrogate(text) else text


def shown_name(name: str) -> str | None:
    """An agent's key as a reason may name it: itself when it reads as an identifier
    (``customer_id``), else ``None``.

    Reasons are recorded in clear, where erasing a data subject cannot reach them,
    and an agent's keys may be personal data (a map keyed by e-mail address).
    """
    return name if _IDENTIFIER.fullmatch(name) else None


def keys_fold_apart(obj: Mapping[Any, Any]) -> bool:
    """True unless two keys of ``obj`` are equal but for case (``path`` and ``PATH``).

    Go's ``encoding/json`` and .NET's default binder match keys without regard
    to case (with Unicode folding: U+017F, the long s, is ``s``) and the last one wins: a policy
    reading ``path`` would decide on a value other than the tool's. The core
    (:mod:`warden.pipeline`) denies every action whose arguments hold such keys, at
    every door; an adapter refuses them while parsing, in its own protocol.
    """
    if len(obj) < 2:
        return True
    return len({k.casefold() if isinstance(k, str) else k for k in obj}) == len(obj)
