"""The rows the state repositories read and write, the same for every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

__all__ = [
    "Counter",
    "Hold",
    "KillSwitchRow",
    "ReserveResult",
    "decode_holds",
    "encode_holds",
    "passes",
]


@dataclass(frozen=True, slots=True)
class Hold:
    """Value to hold against one counter: ``limit`` ``None`` means no cap, only counting."""

    counter: str
    window: str
    subject: str
    amount: float
    limit: float | None = None


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter's totals, as read inside a transaction."""

    counter: str
    window: str
    subject: str
    spent: float
    reserved: float


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What a reservation did.

    ``before`` holds each counter's totals before this reservation (in the
    order of the holds). ``over`` lists the holds that would pass their limit;
    when it is not empty and the reservation was not forced, nothing was held.
    """

    reserved: bool
    before: tuple[Counter, ...]
    over: tuple[Hold, ...]


@dataclass(frozen=True, slots=True)
class KillSwitchRow:
    """A kill switch as stored."""

    id: str
    scope: str
    target: str
    reason: str
    created_by: str
    created_at: float
    cleared_by: str | None = None
    cleared_at: float | None = None


def passes(used: float, amount: float, limit: float) -> bool:
    """Whether holding ``amount`` on top of ``used`` passes ``limit``.

    A zero-value hold (an LLM call before its cost is known) is refused once
    the cap is used up, not only when it is passed.
    """
    return used + amount > limit or (amount == 0 and used >= limit)


def encode_holds(holds: Sequence[Hold]) -> str:
    """A reservation's holds as stored (JSON; limits are not kept)."""
    return orjson.dumps([[h.counter, h.window, h.subject, h.amount] for h in holds]).decode()


def decode_holds(raw: str | bytes) -> tuple[Hold, ...]:
    """The holds :func:`encode_holds` stored."""
    return tuple(Hold(str(c), str(w), str(s), float(a)) for c, w, s, a in orjson.loads(raw))
