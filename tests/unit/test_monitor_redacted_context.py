"""A conversation id the records hide is no conversation to the monitor.

A policy's ``redact: ["context"]`` records each context value as ``"[redacted]"``:
read as an id, every such decision would be one and the same conversation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from warden.audit.record import action_body
from warden.monitor import quality
from warden.monitor.events import DecisionEvent, collect
from warden.testing.audit import sample_action


def recorded_context(session: str, redact: list[str] | tuple[str, ...]) -> Any:
    """The ``action.context`` a decision record keeps, through the record writer."""
    action = dataclasses.replace(
        sample_action(), context={"session_id": session, "customer_email": "ann@example.com"}
    )
    return action_body(action, redact)["context"]


def decision(i: int, context: Any) -> dict[str, Any]:
    return {
        "kind": "decision",
        "time": f"2026-11-30T10:00:{i:02d}.000000Z",
        "agent": {"id": "bot", "version": "v1"},
        "action": {"id": f"act_{i}", "kind": "llm_call", "context": context},
        "decision": {"id": f"dec_{i}", "effect": "allow", "guard": "policy", "elapsed_us": 1000},
    }


def outcome(i: int, cost: float) -> dict[str, Any]:
    return {
        "kind": "outcome",
        "time": f"2026-11-30T10:01:{i:02d}.000000Z",
        "agent": {"id": "bot", "version": "v1"},
        "action": {"id": f"act_{i}", "kind": "llm_call", "stage": "proposed"},
        "decision_id": f"dec_{i}",
        "outcome": {"status": 200, "cost": cost, "latency_ms": 5.0},
    }


@pytest.mark.parametrize("redact", [["context"], ["context.session_id"]])
def test_hidden_conversation_ids_are_not_one_conversation(
    redact: list[str] | tuple[str, ...],
) -> None:
    records = [decision(i, recorded_context(f"s-{i}", redact)) for i in range(6)]
    records += [decision(10, recorded_context("s-open", [])), outcome(10, 0.5)]
    records += [outcome(i, 1.0) for i in range(6)]
    events = collect(records)
    hidden = [
        e for e in events.decisions if isinstance(e, DecisionEvent) and e.decision_id != "dec_10"
    ]
    assert [e.conversation for e in hidden] == [None] * 6
    [_, v1] = quality.compute(events)
    assert v1.conversations == 1  # the one whose id is in clear
    assert v1.cost_usd == pytest.approx(6.5)
    assert v1.cost_per_conversation_usd == pytest.approx(0.5)
