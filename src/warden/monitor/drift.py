"""Drift per agent and agent version: PSI of a current window against a reference.

Three distributions are compared for each ``(agent, version)`` group, and for
each agent over all its versions (version ``*``):

* ``tools``: the mix of tools (or action kinds, for model calls) it used;
* ``effects``: the mix of decision effects (``allow``, ``deny``,
  ``require_approval``) the policy gave it;
* ``number:<tool>.<argument>``: each numeric argument (refund amounts...),
  binned at the reference's deciles. One the reference had that the current
  window's calls of the tool no longer carry (renamed, sent as text, pushed
  out) is a shift too, not a lack of samples (:func:`compare`).

Only an action's own decision counts (not an approval's follow-up). The
reference is a :class:`Profile` built from the reference window's events, or
a pinned baseline (:mod:`warden.monitor.baseline`). Pure: callers read the
events (:func:`warden.monitor.events.read_events`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from warden.monitor.events import (
    D_AGENT,
    D_EFFECT,
    D_FIRST,
    D_KIND,
    D_NUMBERS,
    D_TOOL,
    D_VERSION,
    DecisionEvent,
    DecisionRow,
)
from warden.monitor.psi import Histogram, Level, level_of, psi, psi_counts, quantile_edges

__all__ = [
    "ALL_VERSIONS",
    "DEFAULT_MIN_SAMPLES",
    "Distribution",
    "DriftResult",
    "Profile",
    "compute",
    "profiles",
]

ALL_VERSIONS = "*"
"""The ``version`` of a group that covers every version of an agent."""
DEFAULT_MIN_SAMPLES = 30
"""Fewer decisions than this on either side: the level is ``insufficient``."""
MAX_NUMBERS = 20
"""Numeric arguments compared per group (the most frequent in the reference)."""


@dataclass(frozen=True, slots=True)
class Profile:
    """What one group did in a window: counts per tool and effect, binned numbers."""

    agent: str
    version: str
    decisions: int
    tools: Mapping[str, int] = field(default_factory=dict)
    effects: Mapping[str, int] = field(default_factory=dict)
    numbers: Mapping[str, Histogram] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (a pinned baseline stores these)."""
        return {
            "agent": self.agent,
            "version": self.version,
            "decisions": self.decisions,
            "tools": dict(self.tools),
            "effects": dict(self.effects),
            "numbers": {
                k: {"edges": list(h.edges), "counts": list(h.counts)}
                for k, h in sorted(self.numbers.items())
            },
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Profile:
        """Read :meth:`as_dict`'s form; ``ValueError`` when it is not one."""
        try:
            numbers = {
                str(k): Histogram(
                    tuple(float(e) for e in v["edges"]), tuple(int(c) for c in v["counts"])
                )
                for k, v in dict(doc.get("numbers") or {}).items()
            }
            for key, hist in numbers.items():
                if len(hist.counts) != len(hist.edges) + 1:
                    raise ValueError(f"the bins of {key} do not match their edges")
            return cls(
                agent=str(doc["agent"]),
                version=str(doc.get("version", "")),
                decisions=int(doc["decisions"]),
                tools={str(k): int(v) for k, v in dict(doc.get("tools") or {}).items()},
                effects={str(k): int(v) for k, v in dict(doc.get("effects") or {}).items()},
                numbers=numbers,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a drift profile: {exc}") from None


@dataclass(frozen=True, slots=True)
class Distribution:
    """One distribution's drift: its PSI, level and sample sizes."""

    name: str
    psi: float
    level: Level
    reference_n: int
    current_n: int

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "name": self.name,
            "psi": round(self.psi, 6),
            "level": self.level.value,
            "reference_n": self.reference_n,
            "current_n": self.current_n,
        }


@dataclass(frozen=True, slots=True)
class DriftResult:
    """Drift of one group: each distribution, and the worst level among them."""

    agent: str
    version: str
    distributions: tuple[Distribution, ...]

    @property
    def level(self) -> Level:
        """The worst level of any distribution (``insufficient`` only if all are)."""
        levels = {d.level for d in self.distributions}
        for level in (Level.ACT, Level.WATCH, Level.OK):
            if level in levels:
                return level
        return Level.INSUFFICIENT

    @property
    def max_psi(self) -> float:
        """The largest PSI among distributions with enough samples (0.0 if none)."""
        return max(
            (d.psi for d in self.distributions if d.level is not Level.INSUFFICIENT), default=0.0
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``warden monitor drift --format json`` prints."""
        return {
            "agent": self.agent,
            "version": self.version,
            "level": self.level.value,
            "max_psi": round(self.max_psi, 6),
            "distributions": [d.as_dict() for d in self.distributions],
        }


AnyDecision = DecisionEvent | DecisionRow
"""A decision as an event or as its row (what the live monitor keeps)."""


def _rows(events: Iterable[AnyDecision]) -> Iterator[DecisionRow]:
    for event in events:
        yield event.row() if isinstance(event, DecisionEvent) else event


def _tool_label(row: DecisionRow) -> str:
    tool = row[D_TOOL]
    return tool if tool is not None else f"({row[D_KIND]})"


def _groups(events: Iterable[AnyDecision]) -> dict[tuple[str, str], list[DecisionRow]]:
    groups: dict[tuple[str, str], list[DecisionRow]] = defaultdict(list)
    for row in _rows(events):
        if not row[D_FIRST]:
            continue
        groups[(row[D_AGENT], row[D_VERSION])].append(row)
        groups[(row[D_AGENT], ALL_VERSIONS)].append(row)
    return groups


def _values(rows: Sequence[DecisionRow]) -> dict[str, list[float]]:
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for key, value in row[D_NUMBERS]:
            values[key].append(value)
    return values


def _profile(agent: str, version: str, rows: Sequence[DecisionRow], bins: int) -> Profile:
    values = _values(rows)
    frequent = sorted(values, key=lambda k: (-len(values[k]), k))[:MAX_NUMBERS]
    numbers = {}
    for key in frequent:
        edges = quantile_edges(values[key], bins)
        numbers[key] = Histogram(edges, ()).rebin(values[key])
    return Profile(
        agent=agent,
        version=version,
        decisions=len(rows),
        tools=dict(Counter(_tool_label(r) for r in rows)),
        effects=dict(Counter(r[D_EFFECT] for r in rows)),
        numbers=numbers,
    )


def profiles(events: Iterable[AnyDecision], *, bins: int = 10) -> dict[tuple[str, str], Profile]:
    """Profiles of every group in ``events`` (per version, and ``*`` per agent)."""
    return {
        key: _profile(key[0], key[1], group, bins) for key, group in sorted(_groups(events).items())
    }


def compare(
    reference: Profile,
    current: Iterable[AnyDecision],
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> DriftResult:
    """Drift of one group's current events against its reference profile.

    A numeric argument with enough samples in the reference and none in a
    current window with enough calls of its tool has not gone quiet: the
    calls stopped carrying it as a number. It reads as all the current
    values in a bin the reference never had (:func:`_vanished`), so at
    ``act``, rather than ``insufficient``, which no alert fires on.
    """
    events = [r for r in _rows(current) if r[D_FIRST]]
    enough = reference.decisions >= min_samples and len(events) >= min_samples
    tools = Counter(_tool_label(r) for r in events)
    effects = Counter(r[D_EFFECT] for r in events)
    n = (reference.decisions, len(events))
    dists = [
        _dist("tools", reference=reference.tools, current=tools, n=n, enough=enough),
        _dist("effects", reference=reference.effects, current=effects, n=n, enough=enough),
    ]
    values = _values(events)
    calls = Counter(r[D_TOOL] for r in events if r[D_TOOL] is not None)
    for key, ref_hist in sorted(reference.numbers.items()):
        cur_hist = ref_hist.rebin(values.get(key, ()))
        ok = ref_hist.total >= min_samples and cur_hist.total >= min_samples
        value = ref_hist.psi(cur_hist)
        gone = cur_hist.total == 0 and ref_hist.total >= min_samples
        if gone and _calls_of(key, calls) >= min_samples:
            value, ok = _vanished(ref_hist), True
        dists.append(
            Distribution(
                f"number:{key}",
                value,
                level_of(value, enough=ok),
                ref_hist.total,
                cur_hist.total,
            )
        )
    return DriftResult(reference.agent, reference.version, tuple(dists))


def _calls_of(key: str, calls: Mapping[str, int]) -> int:
    """The current calls of the tool of a ``<tool>.<argument>`` key (a tool may hold a dot)."""
    return sum(n for tool, n in calls.items() if key.startswith(f"{tool}."))


def _vanished(reference: Histogram) -> float:
    """PSI of a current window whose values all fell outside the reference's bins."""
    total = reference.total
    return psi([c / total for c in reference.counts] + [0.0], [0.0] * len(reference.counts) + [1.0])


def _dist(
    name: str,
    *,
    reference: Mapping[str, int],
    current: Mapping[str, int],
    n: tuple[int, int],
    enough: bool,
) -> Distribution:
    value = psi_counts(reference, current)
    return Distribution(name, value, level_of(value, enough=enough), n[0], n[1])


def compute(
    reference: Iterable[AnyDecision] | Mapping[tuple[str, str], Profile],
    current: Iterable[AnyDecision],
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    bins: int = 10,
    agent: str | None = None,
) -> list[DriftResult]:
    """Drift of every group seen in either window (the console's entry point).

    ``reference``: the reference window's events, or pinned profiles (a
    baseline). A group without a reference (a new agent or version) or
    without current traffic is reported with ``insufficient`` levels.
    ``agent``: only that agent's groups.
    """
    refs = dict(reference) if isinstance(reference, Mapping) else profiles(reference, bins=bins)
    cur_groups = _groups(current)
    keys = sorted(set(refs) | set(cur_groups))
    results = []
    for key in keys:
        if agent is not None and key[0] != agent:
            continue
        ref = refs.get(key) or Profile(key[0], key[1], 0)
        results.append(compare(ref, cur_groups.get(key, []), min_samples=min_samples))
    return results
