"""Prometheus metrics for budgets and kill switches, on the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = [
    "CAP_HITS",
    "KILLSWITCHES_ACTIVE",
    "LLM_SPEND",
    "RESERVED",
    "SPENT",
    "UNKNOWN_MODEL_PRICES",
]

SPENT = Gauge(
    "warden_budget_spent",
    "Settled value in the current window, by cap (llm for model spend), window and agent.",
    ["cap", "window", "agent"],
)
RESERVED = Gauge(
    "warden_budget_reserved",
    "Value held for actions in flight, by cap, window and agent.",
    ["cap", "window", "agent"],
)
CAP_HITS = Counter(
    "warden_budget_cap_hits_total",
    "Actions that would pass a cap, by cap and what the cap does (deny, require_approval).",
    ["cap", "over"],
)
LLM_SPEND = Counter(
    "warden_llm_spend_usd_total",
    "Model spend in USD at the price table, by agent and model.",
    ["agent", "model"],
)
UNKNOWN_MODEL_PRICES = Counter(
    "warden_price_unknown_model_total",
    "Responses priced at the default price because their model is not in the table.",
    ["provider", "model"],
)
KILLSWITCHES_ACTIVE = Gauge(
    "warden_killswitches_active",
    "Kill switches in force, by scope.",
    ["scope"],
)
KILLSWITCHES_READ = Gauge(
    "warden_killswitches_read_timestamp_seconds",
    "When this sidecar last read the kill switches from the state store (Unix time).",
)
