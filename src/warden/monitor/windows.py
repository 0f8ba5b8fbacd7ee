"""Time windows for monitoring: durations such as ``7d`` and the windows they make. Pure."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

__all__ = ["Window", "parse_duration", "parse_instant", "recent", "reference_before"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``24h``, ``7d`` or ``2w``; ``ValueError`` for anything else."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30m, 24h, 7d or 2w")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def parse_instant(text: str) -> float:
    """Epoch seconds of an RFC 3339 time or a date (``2026-11-30``, UTC midnight)."""
    value = text.strip()
    try:
        if len(value) == 10:
            when = dt.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        else:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (2026-11-30) or RFC 3339 time") from None
    return when.timestamp()


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time window ``[start, end)`` in epoch seconds."""

    start: float
    end: float

    def __contains__(self, ts: object) -> bool:
        return isinstance(ts, int | float) and self.start <= ts < self.end

    def label(self) -> str:
        """``2026-11-23T00:00:00Z..2026-11-30T00:00:00Z``."""
        return f"{_iso(self.start)}..{_iso(self.end)}"

    def as_dict(self) -> dict[str, str]:
        """The JSON form."""
        return {"from": _iso(self.start), "to": _iso(self.end)}


def recent(now: float, length_s: float) -> Window:
    """The window of the last ``length_s`` seconds up to ``now``."""
    return Window(now - length_s, now)


def reference_before(current: Window, length_s: float) -> Window:
    """The ``length_s`` seconds just before ``current``: the previous N days."""
    return Window(current.start - length_s, current.start)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
