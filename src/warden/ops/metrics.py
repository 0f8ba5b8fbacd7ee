"""Prometheus metrics for the proxy path, on the default registry.

Label values that agents control (agent ids from a header, tool names a model
made up) go through :func:`bounded`, so a misbehaving client cannot grow the
number of series without limit.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ADDED_LATENCY",
    "AMBIGUOUS_CALL_IDS",
    "DECISIONS",
    "ERRORS",
    "IDENTITY_FAILURES",
    "INFLIGHT",
    "REQUESTS",
    "STREAM_VIOLATIONS",
    "TOKENS",
    "UPSTREAM_LATENCY",
    "bounded",
    "child",
]

MAX_LABEL_VALUES = 500
OTHER = "_other"

# Sub-millisecond buckets: Warden's own overhead is measured in microseconds.
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter(
    "warden_requests_total",
    "Requests proxied, by upstream and the status code returned to the agent.",
    ["upstream", "status"],
)
DECISIONS = Counter(
    "warden_decisions_total",
    "Decisions, by agent, tool (or action kind), effect, mode and deciding guard.",
    ["agent", "tool", "effect", "mode", "guard"],
)
UPSTREAM_LATENCY = Histogram(
    "warden_upstream_latency_seconds",
    "Time from sending a request upstream to the end of its response.",
    ["upstream"],
    buckets=_UPSTREAM_BUCKETS,
)
ADDED_LATENCY = Histogram(
    "warden_added_latency_seconds",
    "Time Warden itself added to a request: deciding, recording, rewriting.",
    ["upstream"],
    buckets=_FAST_BUCKETS,
)
TOKENS = Counter(
    "warden_tokens_total",
    "Tokens reported by providers, by agent, model and direction (input, output, cached).",
    ["agent", "model", "direction"],
)
ERRORS = Counter(
    "warden_errors_total",
    "Errors by stable error code (see warden.errors).",
    ["code"],
)
IDENTITY_FAILURES = Counter(
    "warden_identity_failures_total",
    "Requests refused because the agent did not prove its id, by reason (a fixed set).",
    ["reason"],
)
STREAM_VIOLATIONS = Counter(
    "warden_stream_violations_total",
    "Governed streams cut because an event could not be parsed or touched a decided call.",
    ["upstream"],
)
AMBIGUOUS_CALL_IDS = Counter(
    "warden_ambiguous_call_ids_total",
    "Tool call ids seen more than once, so their results are not linked to a decision.",
    ["upstream"],
)
INFLIGHT = Gauge("warden_inflight_requests", "Requests being served right now.")

_seen: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def bounded(kind: str, value: str | None) -> str:
    """Return ``value`` as a label, or ``_other`` once ``kind`` has too many values."""
    if not value:
        return ""
    values = _seen.get(kind)
    if values is not None and value in values:
        return value
    with _seen_lock:
        values = _seen.setdefault(kind, set())
        if value in values:
            return value
        if len(values) >= MAX_LABEL_VALUES:
            return OTHER
        values.add(value)
        return value


_MAX_CHILDREN = 10_000
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Counter | Gauge | Histogram, *values: str) -> Any:
    """``metric.labels(*values)``, resolved once and then kept.

    ``labels()`` validates and locks on every call (about a microsecond, several
    times per request); the child it returns never changes, so keep it. Values
    agents control must still go through :func:`bounded` first. Not for a
    metric whose children are ever ``remove()``d: the memo would keep a stale
    one. Past ``_MAX_CHILDREN`` distinct children the memo starts over.
    """
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        if len(_children) >= _MAX_CHILDREN:
            _children.clear()
        found = _children[key] = metric.labels(*values)
    return found
