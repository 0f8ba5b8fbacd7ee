"""An in-memory :class:`~warden.pipeline.AuditSink` for tests and demos: keeps what it gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warden.audit.record import ApprovalEvidence
from warden.model import Action, Decision, Outcome

__all__ = ["MemoryAudit", "RecordedOutcome"]


@dataclass(frozen=True, slots=True)
class RecordedOutcome:
    """One :meth:`MemoryAudit.record_outcome` call."""

    action: Action
    decision_id: str
    outcome: Outcome
    cost: float | None = None


class MemoryAudit:
    """Records decisions, outcomes and events in lists; never fails unless told to."""

    def __init__(self) -> None:
        self.decisions: list[tuple[Action, Decision]] = []
        self.outcomes: list[RecordedOutcome] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail: BaseException | None = None
        """Raised by every record call while set (e.g. an ``AuditError``)."""

    async def record_decision(
        self, action: Action, decision: Decision, *, approval: ApprovalEvidence | None = None
    ) -> None:
        """Keep the decision."""
        if self.fail is not None:
            raise self.fail
        self.decisions.append((action, decision))

    async def record_outcome(
        self, action: Action, decision_id: str, outcome: Outcome, *, cost: float | None = None
    ) -> None:
        """Keep the outcome."""
        if self.fail is not None:
            raise self.fail
        self.outcomes.append(RecordedOutcome(action, decision_id, outcome, cost))

    async def append(self, kind: str, body: Mapping[str, Any]) -> None:
        """Keep the event."""
        if self.fail is not None:
            raise self.fail
        self.events.append((kind, dict(body)))
