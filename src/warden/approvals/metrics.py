"""Prometheus metrics for approvals, on the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["DECISION_SECONDS", "NOTIFICATIONS", "OUTCOMES", "PENDING", "PRUNED"]

PENDING = Gauge(
    "warden_approvals_pending",
    "Approvals waiting for people, by agent and tool (read from the shared store).",
    ["agent", "tool"],
)
DECISION_SECONDS = Histogram(
    "warden_approval_decision_seconds",
    "Time from an approval request to its decision (approved, rejected or expired).",
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 3600, 14400, 86400),
)
OUTCOMES = Counter(
    "warden_approvals_total",
    "Approvals by how they ended: approved, rejected, expired, consumed.",
    ["outcome"],
)
NOTIFICATIONS = Counter(
    "warden_approval_notifications_total",
    "Approval webhook deliveries, by result (ok, failed after every try).",
    ["result"],
)
for _result in ("ok", "failed"):  # at 0 from the start: alerts read increase()
    NOTIFICATIONS.labels(_result)
PRUNED = Counter(
    "warden_approvals_pruned_total",
    "Approvals that ended more than approvals.keep_decided_s ago, deleted from the store.",
)
