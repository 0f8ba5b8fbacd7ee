"""Quality figures per agent and agent version, from the audit log's events. Pure.

For each ``(agent, version)`` group, and each agent over all versions (``*``):

* **deny rate** and **hold rate**: the share of actions the policy denied or
  sent for approval (the action's own decision; observe mode counts what
  the policy said, not what was enforced);
* **approval-rejection rate**: of the approvals that reached a verdict,
  the share rejected or left to expire;
* **tool error rate**, from trusted outcomes only: results Warden observed
  at a tool API it fronts (``stage: executed``), never an agent's own report;
* **cost per conversation**: the cost recorded on outcomes (model calls
  priced from ``prices``), summed per conversation (``context.session_id``,
  ``conversation_id`` or ``thread_id``), averaged over conversations;
* **p95 added latency**: the 95th percentile of the time Warden spent
  deciding an action (``decision.elapsed_us``: guards, policy, the durable
  record; a wait for a person is not included).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from warden.monitor.drift import ALL_VERSIONS
from warden.monitor.events import (
    A_APPROVAL_ID,
    A_DECISION_ID,
    A_VERDICT,
    D_AGENT,
    D_CONVERSATION,
    D_DECISION_ID,
    D_EFFECT,
    D_ELAPSED_US,
    D_FIRST,
    D_VERSION,
    O_AGENT,
    O_COST,
    O_DECISION_ID,
    O_FAILED,
    O_VERSION,
    ApprovalRow,
    DecisionRow,
    Events,
    OutcomeRow,
    is_trusted,
)

__all__ = ["Quality", "compute", "compute_rows", "p95"]


@dataclass(frozen=True, slots=True)
class Quality:
    """The quality figures of one group; a rate is ``None`` when nothing was there to count."""

    agent: str
    version: str
    decisions: int
    deny_rate: float | None
    hold_rate: float | None
    approvals: int
    approval_rejection_rate: float | None
    trusted_outcomes: int
    tool_error_rate: float | None
    conversations: int
    cost_usd: float
    cost_per_conversation_usd: float | None
    added_latency_p95_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``warden monitor report --format json`` prints."""
        return {
            "agent": self.agent,
            "version": self.version,
            "decisions": self.decisions,
            "deny_rate": _round(self.deny_rate),
            "hold_rate": _round(self.hold_rate),
            "approvals": self.approvals,
            "approval_rejection_rate": _round(self.approval_rejection_rate),
            "trusted_outcomes": self.trusted_outcomes,
            "tool_error_rate": _round(self.tool_error_rate),
            "conversations": self.conversations,
            "cost_usd": round(self.cost_usd, 6),
            "cost_per_conversation_usd": _round(self.cost_per_conversation_usd),
            "added_latency_p95_ms": _round(self.added_latency_p95_ms),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile by nearest rank, or ``None`` for no values."""
    if not values:
        return None
    rank = max(1, math.ceil(0.95 * len(values)))
    # The (n - rank + 1)-th largest, by a heap of that many: its loop is Python, which
    # a thread hands back to the event loop within the switch interval. A sort of a busy
    # window's hundreds of thousands of latencies kept the interpreter 20-40 ms in C.
    return heapq.nlargest(len(values) - rank + 1, values)[-1]


@dataclass
class _Acc:
    decisions: int = 0
    denied: int = 0
    held: int = 0
    approvals: int = 0
    rejected: int = 0
    trusted: int = 0
    failed: int = 0
    cost: float = 0.0
    conversation_cost: float = 0.0
    elapsed: list[float] = field(default_factory=list)
    conversations: set[str] = field(default_factory=set)

    def quality(self, agent: str, version: str) -> Quality:
        n_conv = len(self.conversations)
        return Quality(
            agent=agent,
            version=version,
            decisions=self.decisions,
            deny_rate=_rate(self.denied, self.decisions),
            hold_rate=_rate(self.held, self.decisions),
            approvals=self.approvals,
            approval_rejection_rate=_rate(self.rejected, self.approvals),
            trusted_outcomes=self.trusted,
            tool_error_rate=_rate(self.failed, self.trusted),
            conversations=n_conv,
            cost_usd=self.cost,
            cost_per_conversation_usd=self.conversation_cost / n_conv if n_conv else None,
            added_latency_p95_ms=p95(self.elapsed),
        )


def _keys(agent: str, version: str) -> tuple[tuple[str, str], tuple[str, str]]:
    return (agent, version), (agent, ALL_VERSIONS)


def compute(events: Events, *, agent: str | None = None) -> list[Quality]:
    """Quality of every group in ``events`` (the console's entry point), sorted by group."""
    return compute_rows(
        [d.row() for d in events.decisions],
        [o.row() for o in events.outcomes],
        [a.row() for a in events.approvals],
        agent=agent,
    )


def compute_rows(
    decisions: Iterable[DecisionRow],
    outcomes: Iterable[OutcomeRow],
    approvals: Iterable[ApprovalRow],
    *,
    agent: str | None = None,
) -> list[Quality]:
    """:func:`compute` of events kept as rows (the live monitor's), in log order."""
    accs: dict[tuple[str, str], _Acc] = defaultdict(_Acc)
    by_decision: dict[str, DecisionRow] = {}
    for d in decisions:
        if d[D_FIRST]:
            by_decision[d[D_DECISION_ID]] = d
            for key in _keys(d[D_AGENT], d[D_VERSION]):
                _add_decision(accs[key], d)
    verdicts: dict[str, tuple[str, str]] = {}
    for a in approvals:
        verdicts[a[A_APPROVAL_ID]] = (a[A_DECISION_ID], a[A_VERDICT])  # the last verdict stands
    for decision_id, verdict in verdicts.values():
        held = by_decision.get(decision_id)
        if held is not None:
            for key in _keys(held[D_AGENT], held[D_VERSION]):
                accs[key].approvals += 1
                accs[key].rejected += verdict in ("rejected", "expired")
    for o in outcomes:
        source = by_decision.get(o[O_DECISION_ID])
        attributed = source is not None and source[D_CONVERSATION] is not None
        for key in _keys(o[O_AGENT], o[O_VERSION]):
            _add_outcome(accs[key], o, attributed=attributed)
    return [
        acc.quality(*key) for key, acc in sorted(accs.items()) if agent is None or key[0] == agent
    ]


def _add_decision(acc: _Acc, d: DecisionRow) -> None:
    acc.decisions += 1
    acc.denied += d[D_EFFECT] == "deny"
    acc.held += d[D_EFFECT] == "require_approval"
    acc.elapsed.append(d[D_ELAPSED_US] / 1000)
    conversation = d[D_CONVERSATION]
    if conversation is not None:
        acc.conversations.add(conversation)


def _add_outcome(acc: _Acc, o: OutcomeRow, *, attributed: bool) -> None:
    if is_trusted(o):
        acc.trusted += 1
        acc.failed += o[O_FAILED]
    cost = o[O_COST]
    if cost is not None:
        acc.cost += cost
        if attributed:
            acc.conversation_cost += cost
