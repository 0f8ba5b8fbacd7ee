"""The population stability index (PSI) and the binning it needs. Pure.

``PSI = sum((a_i - e_i) * ln(a_i / e_i))`` over bins, where ``e_i`` is the
share of the reference in bin ``i`` and ``a_i`` the share of the current
window. A bin empty on one side would make the logarithm infinite, so a share
of zero counts as :data:`EMPTY_SHARE` (the usual convention); the result is
always finite. Under 0.1 is stable, 0.1 to 0.25 worth watching, 0.25 and over
a shift to act on.

Bin edges are round numbers (:func:`quantile_edges`), not the recorded values
they fall between: a pinned baseline keeps them after the log's records are
gone, and after a customer's erasure.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Final

__all__ = [
    "ACT",
    "EDGE_DIGITS",
    "EMPTY_SHARE",
    "WATCH",
    "Histogram",
    "Level",
    "bin_values",
    "level_of",
    "psi",
    "psi_counts",
    "quantile_edges",
]

WATCH = 0.1
"""PSI at or above this: the distribution moved; watch it."""
ACT = 0.25
"""PSI at or above this: a significant shift; act on it."""
EMPTY_SHARE = 1e-4
"""The share an empty bin counts as, so ``ln(a/e)`` stays finite."""
EDGE_DIGITS: Final = 3
"""Significant figures of a bin edge, at most."""


class Level(enum.StrEnum):
    """How far a distribution moved, by the PSI thresholds."""

    OK = "ok"
    WATCH = "watch"
    ACT = "act"
    INSUFFICIENT = "insufficient"
    """Too few samples on one side for the figure to mean anything."""


def level_of(value: float, *, enough: bool = True) -> Level:
    """The level of a PSI value (``enough``: both windows had the minimum sample)."""
    if not enough:
        return Level.INSUFFICIENT
    if value >= ACT:
        return Level.ACT
    if value >= WATCH:
        return Level.WATCH
    return Level.OK


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """PSI of two share vectors of the same length (each summing to 1, or all zero)."""
    if len(expected) != len(actual):
        raise ValueError("the two distributions must have the same bins")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e_share = e if e > 0 else EMPTY_SHARE
        a_share = a if a > 0 else EMPTY_SHARE
        if e <= 0 and a <= 0:
            continue  # empty on both sides: contributes nothing
        total += (a_share - e_share) * math.log(a_share / e_share)
    return total


def _shares(counts: Sequence[float]) -> list[float]:
    n = float(sum(counts))
    return [c / n for c in counts] if n > 0 else [0.0 for _ in counts]


def psi_counts(reference: Mapping[str, float], current: Mapping[str, float]) -> float:
    """PSI of two categorical distributions given as counts, over the union of categories.

    0.0 when either side is empty (there is nothing to compare).
    """
    keys = sorted(set(reference) | set(current))
    ref = [float(reference.get(k, 0)) for k in keys]
    cur = [float(current.get(k, 0)) for k in keys]
    if sum(ref) <= 0 or sum(cur) <= 0:
        return 0.0
    return psi(_shares(ref), _shares(cur))


@dataclass(frozen=True, slots=True)
class Histogram:
    """A binned numeric distribution.

    ``edges`` are the upper bounds (inclusive) of every bin but the last, so
    there are ``len(edges) + 1`` bins: ``(-inf, e0], (e0, e1], ... (e_last, inf)``.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        """How many values were binned."""
        return sum(self.counts)

    def rebin(self, values: Iterable[float]) -> Histogram:
        """Other values in these bins (the current window in the reference's bins)."""
        return bin_values(values, self.edges)

    def psi(self, current: Histogram) -> float:
        """PSI of ``current`` (binned with the same edges) against this histogram."""
        if current.edges != self.edges:
            raise ValueError("the histograms have different bins")
        if self.total == 0 or current.total == 0:
            return 0.0
        return psi(_shares(self.counts), _shares(current.counts))


def quantile_edges(values: Sequence[float], bins: int = 10) -> tuple[float, ...]:
    """Bin edges at the reference's quantiles (deciles by default), duplicates merged.

    A value equal to an edge falls in the bin below it. Fewer distinct values
    than bins give fewer edges (one bin per distinct value at most).

    Each edge is the roundest number (fewest significant figures, at most
    :data:`EDGE_DIGITS`) between the quantile's value and the next larger
    value, so the reference falls in the same bins as with the value itself;
    where no such number lies between them (a phone number or an account id
    sent as a number, next to another), the value rounded to
    :data:`EDGE_DIGITS` figures. The values are the arguments of customers'
    calls, unsealed to be counted: an edge must not keep one of them exactly
    (a pinned baseline outlives the records, and their subject's erasure).
    """
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite or bins < 2:
        return ()
    edges: list[float] = []
    n = len(finite)
    for i in range(1, bins):
        low = finite[min(n - 1, (i * n) // bins)]
        if low >= finite[-1]:
            continue
        edge = _round_edge(low, finite[bisect.bisect_right(finite, low)])
        if edge < finite[-1] and (not edges or edge > edges[-1]):
            edges.append(edge)
    return tuple(edges)


def _round_edge(low: float, high: float) -> float:
    """The roundest number in ``[low, high)`` of at most :data:`EDGE_DIGITS` significant
    figures, or ``low`` rounded to that many."""
    if low <= 0.0 < high:
        return 0.0
    exact = Decimal(repr(low))
    for digits in range(1, EDGE_DIGITS + 1):
        step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
        edge = float(exact.quantize(step, rounding=ROUND_CEILING)) + 0.0
        if low <= edge < high:
            return edge
    return float(f"{low:.{EDGE_DIGITS}g}") + 0.0


def bin_values(values: Iterable[float], edges: Sequence[float]) -> Histogram:
    """Count ``values`` into the bins that ``edges`` define (non-finite values are dropped)."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        if math.isfinite(v):
            counts[bisect.bisect_left(edges, v)] += 1
    return Histogram(tuple(edges), tuple(counts))
