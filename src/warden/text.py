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
    to case (with Unicode simple folding: U+017F, the long s, is ``s``; ``ß`` is not
    ``ss``) and the last one wins: a policy
    reading ``path`` would decide on a value other than the tool's. The core
    (:mod:`warden.pipeline`) denies every action whose arguments hold such keys, at
    every door; an adapter refuses them while parsing, in its own protocol.
    """
    if len(obj) < 2:
        return True
    return len({_simple_fold(k) if isinstance(k, str) else k for k in obj}) == len(obj)


def _simple_fold(key: str) -> str:
    """``key`` under Unicode simple case folding, one character for one, as Go's
    ``strings.EqualFold`` and .NET's ordinal case-blind compare match keys:
    ``str.casefold`` also folds ``ß`` to ``ss``, so ``Straße`` and ``STRASSE``, two
    keys to every such binder, would be denied as one."""
    if key.isascii():
        return key.lower()
    return "".join(_FOLDED.get(c) or _fold_char(c) for c in key)


def _fold_char(char: str) -> str:
    folded = char.casefold()
    if len(folded) != 1:  # a full folding (ß to ss): its simple folding is lower case
        lower = char.lower()
        folded = lower if len(lower) == 1 else char
    if len(_FOLDED) < 4096:
        _FOLDED[char] = folded
    return folded


_FOLDED: dict[str, str] = {}
