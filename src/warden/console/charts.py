"""Charts as hand-drawn SVG: no script, no CDN, every label escaped.

Each chart is an ``<svg role="img">`` with an ``aria-label`` that says in
words what it shows (for screen readers and tests), a ``<title>`` per bar or
point, and colours from CSS classes in ``console.css``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from warden.audit.index import Bucket
from warden.budgets.caps import LLM_COUNTER
from warden.budgets.guard import CapSpend
from warden.console.html import Html, join, tag

__all__ = ["cap_label", "decisions_chart", "errors_chart", "latency_chart", "spend_chart"]

WIDTH = 640
HEIGHT = 180
_LEFT = 44
_BOTTOM = 22
_TOP = 10
_EFFECTS = ("allow", "require_approval", "deny")


def _clock(epoch: float) -> str:
    # The zone said: a browser elsewhere would otherwise read these as its own times.
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%m-%d %H:%M UTC")


def _frame(label: str, top: float, unit: str, buckets: Sequence[Bucket], body: Html) -> Html:
    plot_h = HEIGHT - _BOTTOM - _TOP
    axis = [
        tag(
            "line", {"x1": _LEFT, "y1": _TOP, "x2": _LEFT, "y2": HEIGHT - _BOTTOM, "class": "axis"}
        ),
        tag(
            "line",
            {
                "x1": _LEFT,
                "y1": HEIGHT - _BOTTOM,
                "x2": WIDTH,
                "y2": HEIGHT - _BOTTOM,
                "class": "axis",
            },
        ),
        tag(
            "text",
            {"x": _LEFT - 4, "y": _TOP + 8, "class": "tick", "text-anchor": "end"},
            _num(top),
        ),
        tag(
            "text",
            {"x": _LEFT - 4, "y": HEIGHT - _BOTTOM, "class": "tick", "text-anchor": "end"},
            "0",
        ),
        tag("text", {"x": 4, "y": _TOP + plot_h / 2, "class": "tick"}, unit),
    ]
    if buckets:
        axis.append(
            tag("text", {"x": _LEFT, "y": HEIGHT - 6, "class": "tick"}, _clock(buckets[0].start))
        )
        axis.append(
            tag(
                "text",
                {"x": WIDTH - 2, "y": HEIGHT - 6, "class": "tick", "text-anchor": "end"},
                _clock(_end(buckets)),
            )
        )
    return tag(
        "svg",
        {
            "viewBox": f"0 0 {WIDTH} {HEIGHT}",
            "role": "img",
            "aria-label": label,
            "class": "chart",
        },
        tag("title", None, label),
        axis,
        body,
    )


def _end(buckets: Sequence[Bucket]) -> float:
    """Where the last slice ends (slices are of equal width)."""
    if len(buckets) < 2:
        return buckets[-1].start
    return buckets[-1].start + (buckets[-1].start - buckets[0].start) / (len(buckets) - 1)


def _num(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2f}"


def _slot(buckets: Sequence[Bucket]) -> float:
    return (WIDTH - _LEFT) / max(len(buckets), 1)


def decisions_chart(buckets: Sequence[Bucket]) -> Html:
    """Stacked bars: decisions per time slice by effect."""
    total = sum(b.total for b in buckets)
    top = max([b.total for b in buckets] + [1])
    plot_h = HEIGHT - _BOTTOM - _TOP
    slot = _slot(buckets)
    bars: list[Html] = []
    for i, b in enumerate(buckets):
        y: float = HEIGHT - _BOTTOM
        others = {k: v for k, v in b.effects.items() if k not in _EFFECTS}
        parts = [(e, b.effects.get(e, 0)) for e in _EFFECTS] + [("other", sum(others.values()))]
        for effect, count in parts:
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            bars.append(
                tag(
                    "rect",
                    {
                        "x": f"{_LEFT + i * slot + 1:.1f}",
                        "y": f"{y:.1f}",
                        "width": f"{max(slot - 2, 1):.1f}",
                        "height": f"{h:.1f}",
                        "class": f"bar effect-{effect}",
                    },
                    tag("title", None, f"{_clock(b.start)}: {count} {effect}"),
                )
            )
    label = f"Decisions over time: {total} in all, at most {top} in one interval"
    return _frame(label, top, "n", buckets, join(bars))


def latency_chart(buckets: Sequence[Bucket]) -> Html:
    """Lines: average and worst added latency (the decision's own time) per slice, in ms."""
    values = [b.latency_max_ms for b in buckets if b.latency_max_ms is not None]
    top = max([*values, 0.001])
    plot_h = HEIGHT - _BOTTOM - _TOP
    slot = _slot(buckets)
    lines: list[Html] = []
    for name, pick in (("avg", "latency_avg_ms"), ("max", "latency_max_ms")):
        points = []
        dots: list[Html] = []
        for i, b in enumerate(buckets):
            v = getattr(b, pick)
            if v is None:
                continue
            x = _LEFT + (i + 0.5) * slot
            y = HEIGHT - _BOTTOM - plot_h * v / top
            points.append(f"{x:.1f},{y:.1f}")
            dots.append(
                tag(
                    "circle",
                    {"cx": f"{x:.1f}", "cy": f"{y:.1f}", "r": 2.5, "class": f"dot lat-{name}"},
                    tag("title", None, f"{_clock(b.start)}: {name} {v:.2f} ms"),
                )
            )
        if points:
            lines.append(
                tag(
                    "polyline", {"points": " ".join(points), "class": f"line lat-{name}"}, void=True
                )
            )
        lines.extend(dots)
    worst = f"{max(values):.2f} ms" if values else "no decisions"
    label = f"Added latency over time (average and worst, ms): worst {worst}"
    return _frame(label, top, "ms", buckets, join(lines))


def errors_chart(buckets: Sequence[Bucket]) -> Html:
    """Bars: decisions and outcomes that carry an error, per slice."""
    total = sum(b.errors for b in buckets)
    top = max([b.errors for b in buckets] + [1])
    plot_h = HEIGHT - _BOTTOM - _TOP
    slot = _slot(buckets)
    bars = [
        tag(
            "rect",
            {
                "x": f"{_LEFT + i * slot + 1:.1f}",
                "y": f"{HEIGHT - _BOTTOM - plot_h * b.errors / top:.1f}",
                "width": f"{max(slot - 2, 1):.1f}",
                "height": f"{plot_h * b.errors / top:.1f}",
                "class": "bar errors",
            },
            tag("title", None, f"{_clock(b.start)}: {b.errors} errors"),
        )
        for i, b in enumerate(buckets)
        if b.errors
    ]
    return _frame(f"Errors over time: {total} in all", top, "n", buckets, join(bars))


def cap_label(row: CapSpend) -> str:
    """``refunds, agent:support-triage``: which cap, whose counter."""
    name = "LLM spend" if row.cap == LLM_COUNTER else row.cap
    return f"{name}, {row.subject or 'no use yet'}"


def _money(value: float, currency: str) -> str:
    return f"{value:,.2f} {currency}"


def spend_chart(rows: Sequence[CapSpend]) -> Html:
    """Horizontal bars: per cap and subject, spent then reserved, on a track as long as the limit.

    An uncapped counter's bar fills its track (there is no limit to measure
    against); use over a limit (observe mode) fills it and is marked ``over``.
    """
    row_h, label_w, top = 24, 260, 6
    height = top * 2 + row_h * max(len(rows), 1)
    track_w = WIDTH - label_w - 8
    parts: list[Html] = []
    said: list[str] = []
    for i, row in enumerate(rows):
        y = top + i * row_h
        scale = row.limit if row.limit else max(row.used, 1e-9)
        spent_w = track_w * min(row.spent / scale, 1.0)
        reserved_w = max(0.0, min(track_w * row.reserved / scale, track_w - spent_w))
        over = row.limit is not None and row.used > row.limit
        against = (
            f" of {_money(row.limit, row.currency)} ({row.used / row.limit:.0%})"
            if row.limit
            else " (no limit)"
        )
        summary = (
            f"{cap_label(row)}: spent {_money(row.spent, row.currency)}, "
            f"reserved {_money(row.reserved, row.currency)}{against}"
        )
        said.append(summary)
        parts.append(
            tag(
                "g",
                {"class": "spend over" if over else "spend"},
                tag("title", None, summary),
                tag("text", {"x": 4, "y": f"{y + 15:.1f}", "class": "tick"}, cap_label(row)[:40]),
                tag(
                    "rect",
                    {
                        "x": label_w,
                        "y": y + 4,
                        "width": track_w,
                        "height": row_h - 8,
                        "class": "track",
                    },
                ),
                tag(
                    "rect",
                    {
                        "x": label_w,
                        "y": y + 4,
                        "width": f"{spent_w:.1f}",
                        "height": row_h - 8,
                        "class": "bar spent",
                    },
                ),
                tag(
                    "rect",
                    {
                        "x": f"{label_w + spent_w:.1f}",
                        "y": y + 4,
                        "width": f"{reserved_w:.1f}",
                        "height": row_h - 8,
                        "class": "bar reserved",
                    },
                ),
            )
        )
    label = "Spend against caps: " + ("; ".join(said) if said else "no caps are configured")
    return tag(
        "svg",
        {
            "viewBox": f"0 0 {WIDTH} {height}",
            "role": "img",
            "aria-label": label,
            "class": "chart spend-chart",
        },
        tag("title", None, "Spend against caps"),
        join(parts),
    )
