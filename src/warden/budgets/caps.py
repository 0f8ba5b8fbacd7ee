"""Calendar windows, counter subjects and the sentences that explain a cap hit."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from warden.config import CapCustomerConfig
from warden.pointers import pointer_get
from warden.state import Counter, Hold

__all__ = [
    "LLM_COUNTER",
    "MAX_CUSTOMER_CHARS",
    "Uncountable",
    "budget_document",
    "customer_of",
    "customer_subject",
    "over_reason",
    "window_key",
    "windows_closed_before",
]

MAX_CUSTOMER_CHARS = 128
"""Longer customer ids are cut: customers sharing a prefix share a counter (errs on the cap)."""

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


def windows_closed_before(now: datetime) -> dict[str, str]:
    """For each window kind, the key every window closed long ago sorts below.

    Counters of those windows count nothing any more, yet name customers (erasure
    leaves live counters be, so a spent cap is not handed back): they are deleted.
    The cutoffs are two days before ``now``'s UTC day and the month before its
    UTC month, so no sidecar's zone, and no clock a few minutes off, still counts
    in a window deleted. A clock days ahead is the store's to bound: it deletes
    nothing of the day before the newest data it holds, or later (on PostgreSQL,
    the database's clock) (:class:`warden.state.sessions.PruneClock`).
    """
    day = now.astimezone(UTC).date()
    two_days_ago = day - timedelta(days=2)
    month = (day.replace(day=1) - timedelta(days=1)).replace(day=1)
    return {
        "hour": f"hour:{two_days_ago:%Y-%m-%d}",
        "day": f"day:{two_days_ago:%Y-%m-%d}",
        "month": f"month:{month:%Y-%m}",
    }


class Uncountable(ValueError):
    """A value a cap needs is present but cannot be counted; the message says why."""


def customer_of(
    source: CapCustomerConfig,
    action_context: Mapping[str, Any],
    arguments: Mapping[str, Any],
) -> str | None:
    """The customer an action is for, or ``None`` when neither source names one.

    The argument wins over the context: it is what the tool acts on. A JSON
    ``null`` counts as absent. Raises :class:`Uncountable` for a value that is
    present but not a customer id (an object, a boolean, an empty string...):
    reading past it to the context would charge a customer the tool may not
    touch.
    """
    if source.argument is not None:
        found, value = pointer_get(arguments, source.argument)
        if found and value is not None:
            return _customer_id(value, f"the argument at {source.argument}")
    if source.context is not None:
        value = action_context.get(source.context)
        if value is not None:
            return _customer_id(value, f"the context's {source.context}")
    return None


def _customer_id(value: Any, where: str) -> str:
    """A customer id as a backend would read it: one spelling per number.

    Backends normalise what they are given (pydantic reads ``"042"``, ``" 42"``,
    ``"+42"``, ``"4_2"`` and ``"42.0"`` as the integer 42), so keying a counter on
    the text as sent would give one customer a cap per spelling. Case is folded
    where the counter is named (:func:`customer_subject`).
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Uncountable(f"{where} is not a customer id (a non-empty string or an integer)")
    if isinstance(value, int):
        return str(value)[:MAX_CUSTOMER_CHARS]
    text = unicodedata.normalize("NFKC", value).strip()
    if not text or not text.isprintable():
        # A control character is no backend's id, and NUL no PostgreSQL text: its
        # counter could not be stored, which must not read as the store being down.
        raise Uncountable(f"{where} is not a customer id (a non-empty string or an integer)")
    number = _integral(text)
    return (text if number is None else str(number))[:MAX_CUSTOMER_CHARS]


def customer_subject(customer: str) -> str:
    """The counter subject of a customer (from :func:`customer_of`): case folded, as
    many backends compare ids. Ids that are two customers to a strict backend then
    share a counter, which errs on the cap."""
    return f"customer:{customer.casefold()}"


def _integral(text: str) -> int | None:
    """The integer ``text`` spells, as a backend may read it, else ``None``: decimal as
    Python (and so pydantic) parses it, or with a base prefix (``0x2a``, ``0o52``,
    ``0b101010``) as PostgreSQL 16, Go's ``ParseInt(s, 0, 64)`` and JavaScript do."""
    for base in (10, 0):
        try:
            return int(text, base)
        except ValueError:
            pass
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


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
