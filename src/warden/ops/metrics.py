"""Prometheus metrics for the proxy path, on the default registry.

Label values that agents control (agent ids from a header, tool names a model
made up) go through :func:`bounded`, so a misbehaving client cannot grow the
number of series without limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from warden.errors import error_codes
from warden.text import mended

__all__ = [
    "ADDED_LATENCY",
    "AGENT_DECISIONS",
    "AMBIGUOUS_CALL_IDS",
    "APPROVALS_OLDEST_PENDING_AGE",
    "AUDIT_SHIPPED",
    "AUDIT_SHIP_ERRORS",
    "AUDIT_SHIP_LAG_RECORDS",
    "AUDIT_SHIP_LAG_SECONDS",
    "AUDIT_WRITABLE",
    "BUDGET_LIMIT",
    "CONNECTIONS_REFUSED",
    "CREDENTIAL_RELOADS",
    "DECISIONS",
    "DRIFT_LEVEL",
    "DRIFT_PSI",
    "ERRORS",
    "IDENTITY_FAILURES",
    "INFLIGHT",
    "MCP_DROPPED",
    "MCP_TOOLS_HIDDEN",
    "POLICY_WORKER_RESTARTS",
    "QUALITY_ADDED_LATENCY_P95",
    "QUALITY_COST_PER_CONVERSATION",
    "QUALITY_RATE",
    "READY",
    "REFUSALS_ANSWERED",
    "REQUESTS",
    "STATE_UP",
    "STREAM_VIOLATIONS",
    "TOKENS",
    "UPSTREAM_LATENCY",
    "bounded",
    "child",
    "count_agent_decision",
    "expect_agents",
    "observe_readiness",
    "oldest_pending_approval",
    "reserve",
]

MAX_LABEL_VALUES = 500
MAX_LABEL_CHARS = 128
"""Longer label values are cut (tool names come from agents, up to the body limit)."""
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
AGENT_DECISIONS = Counter(
    "warden_agent_decisions_total",
    "Decisions by agent and effect (allow, deny, require_approval): what alerts on an "
    "agent's denials read. Every effect starts at 0 for a configured agent at start and "
    "for another agent when first seen, so increase() counts the first denials; "
    "warden_decisions_total's series per tool appear only once counted.",
    ["agent", "effect"],
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
    "Tokens reported by providers, by agent, model and direction "
    "(input, output, cached, cache_write).",
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
REFUSALS_ANSWERED = Counter(
    "warden_refusals_answered_total",
    "Outputs Warden added to a Responses request for calls it kept from the agent in the "
    "answer the request continues (the provider keeps those calls and wants an output).",
    ["upstream"],
)
AMBIGUOUS_CALL_IDS = Counter(
    "warden_ambiguous_call_ids_total",
    "Tool call ids seen more than once, so their results are not linked to a decision.",
    ["upstream"],
)
MCP_DROPPED = Counter(
    "warden_mcp_dropped_total",
    "Messages from an MCP server that Warden did not pass to the client: answers under "
    "an id the server was not sent on that stream, messages that are not JSON-RPC.",
    ["reason"],
)
MCP_TOOLS_HIDDEN = Counter(
    "warden_mcp_tools_hidden_total",
    "Tools left out of MCP tools/list answers because the policy denies them in every case.",
    ["upstream"],
)
EXT_PROC_EXTENSIONS = Counter(
    "warden_ext_proc_timeout_extensions_total",
    "ext_proc answers that asked Envoy for more time (override_message_timeout), such as a "
    "tool call held for a person.",
)
CREDENTIAL_RELOADS = Counter(
    "warden_credential_reloads_total",
    "Upstream keys re-read from their file because it changed, by upstream and result "
    "(ok; failed: it could not be read or held no usable key, so the last key stays; "
    "counted once until a read succeeds).",
    ["upstream", "result"],
)
INFLIGHT = Gauge("warden_inflight_requests", "Requests being served right now.")
CONNECTIONS_REFUSED = Counter(
    "warden_connections_refused_total",
    "Connections answered 503 (or reset, when refusals themselves pile up) because the "
    "listener already had limits.max_connections open, by listener (proxy, admin, "
    "transparent; the gRPC listener's own cap closes them uncounted).",
    ["listener"],
)

_seen: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def bounded(kind: str, value: str | None) -> str:
    """Return ``value`` as a label, or ``_other`` once ``kind`` has too many values.

    Values past ``MAX_LABEL_CHARS`` are cut, ending in ``…``. A lone surrogate (a
    tool name a model's answer escaped as ``\\ud800``) becomes U+FFFD: the exposition
    is UTF-8, and one such label would fail every scrape after it.
    """
    if not value:
        return ""
    if len(value) > MAX_LABEL_CHARS:
        value = value[: MAX_LABEL_CHARS - 1] + "…"
    value = mended(value)
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


_EFFECTS = ("allow", "deny", "require_approval")
_agents_seen: set[str] = set()


def expect_agents(agents: Iterable[str]) -> None:
    """Start every effect of each agent's decision counter at 0 (the config's agents, at
    start): a series appearing with its first count is invisible to ``increase()``."""
    for agent in agents:
        label = bounded("agent", agent)
        if label not in _agents_seen:
            _agents_seen.add(label)
            for effect in _EFFECTS:
                AGENT_DECISIONS.labels(label, effect)


def count_agent_decision(agent: str, effect: str) -> None:
    """Count one decision of ``agent`` (a label from :func:`bounded`) by its effect."""
    if agent not in _agents_seen:
        expect_agents((agent,))
    child(AGENT_DECISIONS, agent, effect).inc()


def reserve(kind: str, values: Iterable[str]) -> None:
    """Admit ``values`` of ``kind`` now, before agents can fill its budget: the tools
    the config names keep their own label however many names a model makes up."""
    for value in values:
        bounded(kind, value)


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


# -- for alerts (docs/operations.md): state read when /metrics is scraped -----------------

READY = Gauge("warden_ready", "1 when Warden is ready to serve (what /readyz answers), else 0.")
AUDIT_WRITABLE = Gauge(
    "warden_audit_writable",
    "1 while the audit log takes records; 0 once a write or fsync failed (it stays failed).",
)
POLICY_WORKER_RESTARTS = Counter(
    "warden_policy_worker_restarts_total",
    "Policy worker processes replaced after a crash or a deadline kill.",
)
BUDGET_LIMIT = Gauge(
    "warden_budget_limit",
    "The configured limit of each cap (llm: USD per window), by cap and window.",
    ["cap", "window"],
)
APPROVALS_OLDEST_PENDING_AGE = Gauge(
    "warden_approvals_oldest_pending_age_seconds",
    "Age of the oldest approval still waiting for people, in any sidecar (0 when none).",
)

_oldest_pending: list[float | None] = [None]
APPROVALS_OLDEST_PENDING_AGE.set_function(
    lambda: 0.0 if _oldest_pending[0] is None else max(0.0, time.time() - _oldest_pending[0])
)
_restarts_seen = [0]


def oldest_pending_approval(created_at: float | None) -> None:
    """Remember when the oldest pending approval was created (``None``: none pending).

    The age is worked out when scraped, so it keeps growing between refreshes.
    """
    _oldest_pending[0] = created_at


def observe_readiness(ready: bool, detail: Mapping[str, Any]) -> None:
    """Set the readiness gauges from what ``/readyz`` would answer (called per scrape)."""
    READY.set(1 if ready else 0)
    audit = detail.get("audit")
    AUDIT_WRITABLE.set(1 if isinstance(audit, Mapping) and audit.get("writable") else 0)
    policy = detail.get("policy")
    restarts = policy.get("worker_restarts") if isinstance(policy, Mapping) else None
    if isinstance(restarts, int) and restarts >= 0:
        # The engine counts per bundle generation; a reload starts again from 0.
        seen = _restarts_seen[0]
        POLICY_WORKER_RESTARTS.inc(restarts - seen if restarts >= seen else restarts)
        _restarts_seen[0] = restarts


# -- the central audit store (audit.ship) and the state backend ---------------------------

AUDIT_SHIPPED = Counter(
    "warden_audit_shipped_total",
    "Records and signed checkpoints shipped to the central audit store, by kind.",
    ["kind"],
)
AUDIT_SHIP_ERRORS = Counter(
    "warden_audit_ship_errors_total",
    "Failed shipping attempts, by stage: store (unreachable, refused) or damaged (local log).",
    ["stage"],
)
AUDIT_SHIP_LAG_RECORDS = Gauge(
    "warden_audit_ship_lag_records",
    "Records durable in the local audit log but not yet in the central store.",
)
AUDIT_SHIP_LAG_SECONDS = Gauge(
    "warden_audit_ship_lag_seconds",
    "Seconds since the central store last held every local record (0 when caught up).",
)
STATE_UP = Gauge(
    "warden_state_up",
    "1 while the state backend (approvals, budgets, kill switches) is reachable, else 0.",
)

# Drift and quality (warden.monitor.live): recomputed off the request path every
# ``monitor.interval_s``; label sets that no longer apply are removed.
DRIFT_PSI = Gauge(
    "warden_drift_psi",
    "Population stability index of the current window against the reference, by agent, "
    "version (* for all versions) and distribution (tools, effects, number:<tool>.<arg>).",
    ["agent", "version", "distribution"],
)
DRIFT_LEVEL = Gauge(
    "warden_drift_level",
    "Worst drift level per agent and version: 0 ok, 1 watch (PSI >= 0.1), 2 act (PSI >= 0.25), "
    "-1 too few samples.",
    ["agent", "version"],
)
QUALITY_RATE = Gauge(
    "warden_quality_rate",
    "Quality rates over the current window, by agent, version and rate "
    "(deny, hold, approval_rejection, tool_error).",
    ["agent", "version", "rate"],
)
QUALITY_COST_PER_CONVERSATION = Gauge(
    "warden_quality_cost_per_conversation_usd",
    "Average recorded cost per conversation over the current window, by agent and version.",
    ["agent", "version"],
)
QUALITY_ADDED_LATENCY_P95 = Gauge(
    "warden_quality_added_latency_p95_seconds",
    "95th percentile of the time Warden spent deciding an action over the current window.",
    ["agent", "version"],
)


# Series that alerts read with increase(), which takes a series' first sample as its
# start: created at 0 now, so that the first failure of each kind is counted.
for _code in sorted(error_codes()):
    ERRORS.labels(_code)
for _listener in ("proxy", "admin", "transparent"):
    CONNECTIONS_REFUSED.labels(_listener)
