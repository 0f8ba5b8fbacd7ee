"""JSON helpers every adapter shares, so all protocols read arguments alike."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import orjson

from warden.model import Decision, Effect, Mode, Usage

__all__ = [
    "NO_DECISION",
    "StreamStatus",
    "dumps",
    "loads",
    "loads_or_none",
    "parse_arguments",
    "token_count",
]

NO_DECISION: Final = Decision(
    decision_id="none",
    effect=Effect.DENY,
    reasons=("no decision was made for this call",),
    mode=Mode.ENFORCE,
    guard="fallback",
)
"""Stands in for a call missing from a decision map: it is removed, fail closed."""


class _DuplicateKeyError(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKeyError("duplicate key")
    return obj


def loads(text: str | bytes) -> Any:
    """Parse a body or event as leniently as the official SDKs do; raises ``ValueError``.

    The SDKs parse with Python's ``json`` module, which takes ``NaN``,
    ``Infinity``, integers past 64 bits, ``1e400`` and lone surrogates. A
    body Warden rejected but an SDK accepts would let a tool call through
    unparsed, so whatever orjson refuses goes to the same stdlib parser, and
    Warden sees the values the SDK will see.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def loads_or_none(text: str) -> Any:
    """Parsed JSON, or ``None`` when ``text`` is not JSON."""
    try:
        return loads(text)
    except (ValueError, RecursionError):
        return None


def dumps(value: Any) -> str:
    """Compact JSON text that an SDK parses back to the same values.

    orjson writes non-finite floats as ``null``; a value parsed leniently by
    :func:`loads` keeps its ``NaN`` or ``Infinity``, and integers past 64
    bits, through the stdlib encoder instead.
    """
    try:
        if not _has_nonfinite(value):
            return orjson.dumps(value).decode()
    except TypeError:
        pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nonfinite(v) for v in value)
    return False


def token_count(value: Any) -> int | None:
    """A token count from the wire, or ``None`` unless a non-negative int."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def parse_arguments(raw: object) -> tuple[str, Mapping[str, Any] | None]:
    """``(raw_arguments, arguments)``; ``arguments`` is ``None`` unless a JSON object.

    Duplicate keys count as malformed: tools disagree on which one wins, so a
    policy could approve a value other than the one the tool would use.
    """
    if isinstance(raw, dict):
        # Some OpenAI-compatible servers send an object instead of a JSON string.
        return dumps(raw), raw
    if not isinstance(raw, str):
        return ("" if raw is None else dumps(raw)), None
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return raw, None
    return raw, value if isinstance(value, dict) else None


class StreamStatus:
    """What every stream rewriter reports; rewriters fill the three fields as events arrive."""

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._model: str | None = None
        self._complete = False

    @property
    def usage(self) -> Usage | None:
        """Token usage the stream reported so far."""
        return self._usage

    @property
    def model(self) -> str | None:
        """The model the stream named."""
        return self._model

    @property
    def complete(self) -> bool:
        """True once the protocol's own end marker was seen (else: truncated)."""
        return self._complete
