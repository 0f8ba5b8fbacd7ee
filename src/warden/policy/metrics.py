"""Prometheus metrics for the policy engine, on the default registry.

The engine and guard report through a :class:`PolicyMetrics` object so that
benchmarks and tests can pass :data:`NO_METRICS` and measure the engine alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BUNDLE_INFO",
    "CACHE",
    "EVALUATIONS",
    "EVAL_SECONDS",
    "FALLBACKS",
    "NO_METRICS",
    "OVERLOADED",
    "PROMETHEUS",
    "RELOADS",
    "WORKERS_ALIVE",
    "PolicyMetrics",
]

EVALUATIONS = Counter(
    "warden_policy_evaluations_total",
    "Policy evaluations by result: allow, deny, require_approval, undefined or error.",
    ["result"],
)
EVAL_SECONDS = Histogram(
    "warden_policy_eval_seconds",
    "Time to a policy result, cache hits included.",
    buckets=(
        0.00002,
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
    ),
)
FALLBACKS = Counter(
    "warden_policy_fallbacks_total",
    "Decisions taken by the fail-mode fallback instead of the policy, by reason and tool risk.",
    ["reason", "risk"],
)
RELOADS = Counter(
    "warden_policy_reloads_total",
    "Bundle activations by result: success or failure.",
    ["result"],
)
# Alerts read these with increase(), which takes a series' first sample as its start:
# created at 0 now, so that the first fallback or failed reload is counted.
for _reason in ("crash", "error", "no_policy", "timeout"):
    for _risk in ("read_only", "write", "high"):
        FALLBACKS.labels(reason=_reason, risk=_risk)
for _result in ("success", "failure"):
    RELOADS.labels(result=_result)
BUNDLE_INFO = Gauge(
    "warden_policy_bundle_info",
    "1 for the active bundle revision.",
    ["revision"],
)
CACHE = Counter(
    "warden_policy_cache_total",
    "Decision cache lookups: hit, miss, or bypass (cache off or policy not deterministic).",
    ["result"],
)
OVERLOADED = Counter(
    "warden_policy_overloaded_total",
    "Requests pushed back (503 with Retry-After) because no policy worker was free in time.",
)
WORKERS_ALIVE = Gauge(
    "warden_policy_workers_alive",
    "Policy worker processes ready to evaluate.",
)


class PolicyMetrics:
    """Where the engine reports; this base class reports nothing."""

    def evaluation(self, result: str, seconds: float) -> None:
        """One evaluation finished with ``result`` after ``seconds``."""

    def fallback(self, reason: str, risk: str) -> None:
        """The fallback decided: ``reason`` is the error code without ``policy_``, or
        ``no_policy`` when no bundle is active (``policy_not_ready``; always a deny)."""

    def cache(self, result: str) -> None:
        """A cache lookup: ``hit``, ``miss`` or ``bypass``."""

    def overloaded(self) -> None:
        """A request waited too long for a free worker and was pushed back."""

    def reload(self, result: str) -> None:
        """A bundle activation attempt ended: ``success`` or ``failure``."""

    def active_revision(self, old: str | None, new: str | None) -> None:
        """The active revision changed."""

    def workers_alive(self, count: int) -> None:
        """The number of ready workers changed."""


class _Prometheus(PolicyMetrics):
    def __init__(self) -> None:
        # Resolving a labelled child costs about a microsecond; keep them.
        self._evaluations: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}

    def evaluation(self, result: str, seconds: float) -> None:
        child = self._evaluations.get(result)
        if child is None:
            child = self._evaluations[result] = EVALUATIONS.labels(result=result)
        child.inc()
        EVAL_SECONDS.observe(seconds)

    def fallback(self, reason: str, risk: str) -> None:
        FALLBACKS.labels(reason=reason, risk=risk).inc()

    def cache(self, result: str) -> None:
        child = self._cache.get(result)
        if child is None:
            child = self._cache[result] = CACHE.labels(result=result)
        child.inc()

    def overloaded(self) -> None:
        OVERLOADED.inc()

    def reload(self, result: str) -> None:
        RELOADS.labels(result=result).inc()

    def active_revision(self, old: str | None, new: str | None) -> None:
        if old is not None and old != new:
            with contextlib.suppress(KeyError):
                BUNDLE_INFO.remove(old)
        if new is not None:
            BUNDLE_INFO.labels(revision=new).set(1)

    def workers_alive(self, count: int) -> None:
        WORKERS_ALIVE.set(count)


PROMETHEUS: PolicyMetrics = _Prometheus()
"""Reports to the module-level Prometheus metrics; the default."""
NO_METRICS: PolicyMetrics = PolicyMetrics()
"""Reports nothing; for benchmarks and isolated tests."""
