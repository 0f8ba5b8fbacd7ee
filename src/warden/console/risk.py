"""The Model risk view's drift and quality section, from :mod:`warden.monitor`.

Drift compares the last 24 hours with the 7 days before, per agent and agent
version; quality covers the last 24 hours. Both read the log itself (sealed
personal fields stay sealed). With no traffic, the section says so rather
than drawing empty charts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from warden.audit.segments import LogDamaged
from warden.audit.tail import RecordTail
from warden.console.html import Child, Html, tag
from warden.monitor import drift, quality
from warden.monitor.events import Events, collect
from warden.monitor.live import first_seq_since
from warden.monitor.windows import Window, recent, reference_before

__all__ = ["CURRENT_S", "REFERENCE_S", "drift_section"]

CURRENT_S = 86400.0
REFERENCE_S = 7 * 86400.0


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def render(events: Events, now: float) -> Html:
    """Tables of drift (PSI and level per group) and quality figures, or an empty state."""
    current = recent(now, CURRENT_S)
    reference = reference_before(current, REFERENCE_S)
    now_events = events.within(current)
    if not now_events.decisions:
        return tag(
            "p",
            {"class": "empty"},
            "No decisions in the last 24 hours: nothing to measure drift or quality on yet.",
        )
    drifts = drift.compute(events.within(reference).decisions, now_events.decisions)
    qualities = quality.compute(now_events)
    head = ("Agent", "Version", "Level", "Largest PSI", "Distributions")
    drift_rows: list[Child] = [
        tag(
            "tr",
            None,
            tag("td", None, d.agent),
            tag("td", None, d.version),
            tag("td", None, tag("span", {"class": f"level level-{d.level.value}"}, d.level.value)),
            tag("td", None, f"{d.max_psi:.3f}"),
            tag(
                "td",
                None,
                "; ".join(
                    f"{x.name}: {x.level.value} ({x.reference_n}→{x.current_n})"
                    for x in d.distributions
                ),
            ),
        )
        for d in drifts
    ]
    qhead = (
        "Agent",
        "Version",
        "Decisions",
        "Denied",
        "Held",
        "Rejected",
        "Tool errors",
        "p95 latency",
    )
    quality_rows: list[Child] = [
        tag(
            "tr",
            None,
            [
                tag("td", None, v)
                for v in (
                    q.agent,
                    q.version,
                    q.decisions,
                    _pct(q.deny_rate),
                    _pct(q.hold_rate),
                    _pct(q.approval_rejection_rate),
                    _pct(q.tool_error_rate),
                    _ms(q.added_latency_p95_ms),
                )
            ],
        )
        for q in qualities
    ]
    return Html(
        tag("p", {"class": "hint"}, f"Drift: the last 24 hours against {reference.label()}.")
        + tag(
            "table",
            {"aria-label": "Drift per agent"},
            tag("thead", None, tag("tr", None, [tag("th", {"scope": "col"}, h) for h in head])),
            tag("tbody", None, drift_rows),
        )
        + tag(
            "table",
            {"aria-label": "Quality per agent"},
            tag("thead", None, tag("tr", None, [tag("th", {"scope": "col"}, h) for h in qhead])),
            tag("tbody", None, quality_rows),
        )
    )


async def drift_section(root: Path, size: int) -> Html:
    """The section for the audit log at ``root`` (``size`` records written).

    Read and computed in a thread, from the segments that may hold the last
    8 days only: the proxy shares the event loop, and the log grows with
    whatever traffic agents send (300,000 decisions: a 1.5 s stall before).
    """
    if size == 0:
        return tag("p", {"class": "empty"}, "The audit log is empty.")
    try:
        return await asyncio.to_thread(_section, root, size, time.time())
    except (OSError, ValueError, LogDamaged) as exc:
        return tag("p", {"class": "error"}, f"The monitor could not read the log: {exc}")


def _section(root: Path, size: int, now: float) -> Html:
    current = recent(now, CURRENT_S)
    shown = Window(reference_before(current, REFERENCE_S).start, now)
    tail = RecordTail(root, first_seq_since(root, shown.start))

    def records() -> Iterator[dict[str, Any]]:
        while tail.position < size and (stored := tail.read(size)):
            for record in stored:
                try:
                    value = orjson.loads(record.payload)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    yield value

    return render(collect(records()).within(shown), now)
