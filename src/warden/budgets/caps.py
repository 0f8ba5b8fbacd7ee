"""Calendar windows, counter subjects and the sentences that explain a cap hit."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from warden.state import Counter, Hold

__all__ = [
    "LLM_COUNTER",
    "budget_document",
    "customer_of",
    "over_reason",
    "window_key",
]

LLM_COUNTER = "llm"
"""The counter name of LLM spend, as policies see it: ``input.budget.llm``."""

_WINDOW_WORDS = {"hour": "this hour", "day": "today", "month": "this month"}


def window_key(window: str, now: datetime) -> str:
    """The calendar window ``now`` falls in: ``day:2026-11-27``, ``month:2026-11``.

    ``now`` must be aware and in the configured zone. Hours carry their UTC
    offset, so the repeated hour when clocks go back is a window of its own.
    """
    if window == "hour":
        return f"hour:{now:%Y-%m-%dT%H%z}"
    if window == "day":
        return f"day:{now:%Y-%m-%d}"
    if window == "month":
        return f"month:{now:%Y-%m}"
    raise ValueError(f"unknown window {window!r}")


def customer_of(action_context: Mapping[str, Any], arguments: Mapping[str, Any]) -> str | None:
    """The customer an action is for: its ``customer_id`` argument, else the context's."""
    for source in (arguments, action_context):
        value = source.get("customer_id")
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)[:128]
    return None


def budget_document(
    entries: list[tuple[str, str, str, Counter, float | None]],
) -> dict[str, Any]:
    """``input.budget``: ``{cap: {window: {agent|customer: {spent, reserved, limit}}}}``.

    ``entries`` are ``(cap, window, per, counter, limit)``; the totals are those
    before this action's own reservation.
    """
    doc: dict[str, Any] = {}
    for cap, window, per, counter, limit in entries:
        doc.setdefault(cap, {}).setdefault(window, {})[per] = {
            "spent": round(counter.spent, 6),
            "reserved": round(counter.reserved, 6),
            "limit": limit,
        }
    return doc


def over_reason(
    *,
    cap: str,
    window: str,
    who: str,
    counter: Counter,
    hold: Hold,
    currency: str,
    what: str,
) -> str:
    """Why an action passes a cap, in words: names the cap, the subject and the window.

    ``refunds cap for this agent: 480.00 of 500.00 USD used today; this
    issue_refund of 50.00 would pass it``.
    """
    assert hold.limit is not None
    used = counter.spent + counter.reserved
    held = (
        f" ({counter.reserved:.2f} of it reserved for actions in flight)"
        if counter.reserved
        else ""
    )
    when = _WINDOW_WORDS[window]
    head = f"{cap} cap for {who}: {used:.2f} of {hold.limit:.2f} {currency} used {when}{held}"
    if hold.amount > 0:
        return f"{head}; {what} of {hold.amount:.2f} would pass it"
    return f"{head}; {what} does not fit"
