"""Champion and challenger agent versions side by side, in one window. Pure.

:func:`compare` gives both versions' quality figures and the drift of the
second version (the canary) against the first (the stable one) over the same
three distributions as :mod:`warden.monitor.drift`: the question "does the
canary behave like the version we approved?" answered on real traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warden.monitor import drift, quality
from warden.monitor.events import Events

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True, slots=True)
class Comparison:
    """Two versions of one agent: their quality figures and the drift between them."""

    agent: str
    versions: tuple[str, str]
    quality: tuple[quality.Quality, quality.Quality]
    drift: drift.DriftResult
    """The second version's drift, with the first version as the reference."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``warden monitor compare --format json`` prints."""
        return {
            "agent": self.agent,
            "versions": list(self.versions),
            "quality": [q.as_dict() for q in self.quality],
            "drift": self.drift.as_dict(),
        }


def _empty(agent: str, version: str) -> quality.Quality:
    return quality.Quality(agent, version, 0, None, None, 0, None, 0, None, 0, 0.0, None, None)


def compare(
    events: Events,
    agent: str,
    versions: tuple[str, str],
    *,
    min_samples: int = drift.DEFAULT_MIN_SAMPLES,
) -> Comparison:
    """Quality of both versions, and drift of ``versions[1]`` against ``versions[0]``."""
    stable, canary = versions
    by_version = {q.version: q for q in quality.compute(events, agent=agent)}
    pair = (
        by_version.get(stable) or _empty(agent, stable),
        by_version.get(canary) or _empty(agent, canary),
    )
    ours = [e for e in events.decisions if e.agent == agent]
    reference = drift.profiles(e for e in ours if e.version == stable).get(
        (agent, stable)
    ) or drift.Profile(agent, stable, 0)
    current = [e for e in ours if e.version == canary]
    result = drift.compare(reference, current, min_samples=min_samples)
    return Comparison(agent, versions, pair, drift.DriftResult(agent, canary, result.distributions))
