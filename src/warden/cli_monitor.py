"""``warden monitor``: drift, quality and version comparison, read from the audit log.

* ``drift`` compares the current window (``--current 1d``) with the previous
  N days (``--reference 7d``) or a pinned baseline (``--baseline FILE``),
  per agent and version, and prints PSI per distribution;
* ``report --since 7d`` prints the quality figures per agent and version;
* ``baseline --since 14d --out FILE`` pins a reference for ``drift``;
* ``compare --agent X --versions v1,v2`` puts two versions side by side:
  their quality, and the drift of the second against the first.

Defaults come from the ``monitor`` section of the config and ``audit.dir``.
Exit status: 0, or 1 when ``drift --fail-on`` finds that level; 2 when the
command cannot run. See docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from warden.config import Config, load_config
from warden.errors import ConfigError
from warden.monitor import drift, quality
from warden.monitor.baseline import load_baseline, save_baseline
from warden.monitor.compare import compare
from warden.monitor.events import Events, read_events
from warden.monitor.psi import Level
from warden.monitor.windows import Window, parse_duration, parse_instant, recent, reference_before
from warden.terminal import plain

__all__ = ["main", "register"]

_LEVEL_ORDER = {Level.INSUFFICIENT: 0, Level.OK: 0, Level.WATCH: 1, Level.ACT: 2}


def register(subparsers: Any) -> None:
    """Add ``monitor`` and its commands to the ``warden`` parser's subparsers."""
    monitor = subparsers.add_parser(
        "monitor",
        help="drift and quality of agents, from the audit log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(monitor)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``warden monitor`` command, e.g. ``main(["report", "--since", "7d"])``."""
    parser = argparse.ArgumentParser(
        prog="warden monitor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(parser)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit", metavar="DIR", help="audit directory (default: audit.dir)")
    parser.add_argument("--agent", help="only this agent")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument(
        "--config", default=os.environ.get("WARDEN_CONFIG"), help="config file (optional)"
    )


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")

    dr = sub.add_parser("drift", help="PSI of the current window against the reference")
    _common(dr)
    dr.add_argument("--current", metavar="DURATION", help="current window (monitor.current)")
    dr.add_argument("--reference", metavar="DURATION", help="previous N (monitor.reference)")
    dr.add_argument("--baseline", metavar="FILE", help="a pinned baseline (monitor.baseline)")
    dr.add_argument("--min-samples", type=int, metavar="N", help="(monitor.min_samples)")
    dr.add_argument(
        "--fail-on", choices=["watch", "act"], help="exit 1 when any group reaches this level"
    )
    dr.set_defaults(func=_drift)

    rep = sub.add_parser("report", help="quality per agent and version")
    _common(rep)
    rep.add_argument("--since", default="7d", metavar="WHEN", help="7d, a date or a time")
    rep.add_argument("--until", metavar="WHEN", help="end of the window (default: now)")
    rep.set_defaults(func=_report)

    base = sub.add_parser("baseline", help="pin a reference window for drift")
    _common(base)
    base.add_argument("--since", default="7d", metavar="WHEN", help="7d, a date or a time")
    base.add_argument("--until", metavar="WHEN", help="end of the window (default: now)")
    base.add_argument("--out", required=True, metavar="FILE", help="where to write it")
    base.set_defaults(func=_baseline)

    cmp_ = sub.add_parser("compare", help="two versions of an agent side by side")
    _common(cmp_)
    cmp_.add_argument("--versions", required=True, metavar="V1,V2", help="stable,canary")
    cmp_.add_argument("--since", default="7d", metavar="WHEN", help="7d, a date or a time")
    cmp_.add_argument("--until", metavar="WHEN", help="end of the window (default: now)")
    cmp_.add_argument("--min-samples", type=int, metavar="N", help="(monitor.min_samples)")
    cmp_.set_defaults(func=_compare)


class _Usage(Exception):
    pass


def _fail(message: str) -> int:
    print(f"warden monitor: {message}", file=sys.stderr)
    return 2


def _when(text: str | None, now: float) -> float:
    if text is None:
        return now
    try:
        return now - parse_duration(text)
    except ValueError:
        return parse_instant(text)


def _load(args: argparse.Namespace) -> tuple[Config, str, Events]:
    config = load_config(args.config)
    audit_dir = args.audit or config.audit.dir
    return config, audit_dir, read_events(audit_dir)


def _emit(doc: Any, out: TextIO) -> None:
    out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


# --- drift -------------------------------------------------------------------------------------


def _drift(args: argparse.Namespace) -> int:
    try:
        config, _, events = _load(args)
        cfg = config.monitor
        now = time.time()
        current = recent(now, parse_duration(args.current or cfg.current))
        baseline_file = args.baseline or cfg.baseline
        min_n = args.min_samples or cfg.min_samples
        if baseline_file:
            baseline = load_baseline(baseline_file)
            reference: Any = baseline.profiles
            ref_label = f"baseline {baseline_file} ({baseline.window.label()})"
        else:
            ref_window = reference_before(current, parse_duration(args.reference or cfg.reference))
            reference = events.within(ref_window).decisions
            ref_label = ref_window.label()
    except (ConfigError, ValueError, OSError) as exc:
        return _fail(str(exc))
    results = drift.compute(
        reference, events.within(current).decisions, min_samples=min_n, agent=args.agent
    )
    if args.format == "json":
        _emit(
            {
                "current": current.as_dict(),
                "reference": ref_label,
                "groups": [r.as_dict() for r in results],
            },
            sys.stdout,
        )
    else:
        print_drift(results, current, ref_label, sys.stdout)
    if args.fail_on is not None:
        bar = _LEVEL_ORDER[Level(args.fail_on)]
        if any(_LEVEL_ORDER[r.level] >= bar for r in results):
            return 1
    return 0


def print_drift(
    results: Sequence[drift.DriftResult], current: Window, reference: str, out: TextIO
) -> None:
    """The drift table."""
    out.write(f"Drift: current {current.label()} against {reference}\n")
    if not results:
        out.write("No decisions in either window.\n")
        return
    rows = [("agent", "version", "distribution", "psi", "level", "ref n", "cur n")]
    for r in results:
        for d in r.distributions:
            rows.append(
                (
                    r.agent,
                    r.version or "-",
                    d.name,
                    f"{d.psi:.4f}",
                    d.level.value,
                    str(d.reference_n),
                    str(d.current_n),
                )
            )
    _table(rows, out)
    out.write("Levels: ok < 0.1 <= watch < 0.25 <= act (PSI).\n")


# --- report ------------------------------------------------------------------------------------


def _window(args: argparse.Namespace) -> Window:
    now = time.time()
    start, end = _when(args.since, now), _when(args.until, now)
    if end <= start:
        raise ValueError("the window ends before it starts")
    return Window(start, end)


def _report(args: argparse.Namespace) -> int:
    try:
        _, _, events = _load(args)
        window = _window(args)
    except (ConfigError, ValueError, OSError) as exc:
        return _fail(str(exc))
    results = quality.compute(events.within(window), agent=args.agent)
    if args.format == "json":
        _emit({"window": window.as_dict(), "groups": [q.as_dict() for q in results]}, sys.stdout)
    else:
        out = sys.stdout
        out.write(f"Quality {window.label()}\n")
        print_quality(results, out)
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_quality(results: Sequence[quality.Quality], out: TextIO) -> None:
    """The quality table."""
    if not results:
        out.write("No decisions in the window.\n")
        return
    rows = [
        (
            "agent",
            "version",
            "decisions",
            "deny",
            "hold",
            "appr. rejected",
            "tool errors",
            "cost/conv USD",
            "p95 added ms",
        )
    ]
    for q in results:
        rows.append(
            (
                q.agent,
                q.version or "-",
                str(q.decisions),
                _pct(q.deny_rate),
                _pct(q.hold_rate),
                f"{_pct(q.approval_rejection_rate)} of {q.approvals}",
                f"{_pct(q.tool_error_rate)} of {q.trusted_outcomes}",
                _num(q.cost_per_conversation_usd, ".4f"),
                _num(q.added_latency_p95_ms, ".2f"),
            )
        )
    _table(rows, out)


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    # Tool and argument names are the model's: no escape sequence reaches the terminal.
    rows = [[plain(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


# --- baseline ----------------------------------------------------------------------------------


def _baseline(args: argparse.Namespace) -> int:
    try:
        _, audit_dir, events = _load(args)
        window = _window(args)
        chosen = [
            e
            for e in events.within(window).decisions
            if args.agent is None or e.agent == args.agent
        ]
        profiles = drift.profiles(chosen)
        if not profiles:
            raise ValueError(f"no decisions in {window.label()}: nothing to pin")
        save_baseline(args.out, profiles, window, str(audit_dir))
    except (ConfigError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.format == "json":
        _emit({"out": args.out, "window": window.as_dict(), "groups": len(profiles)}, sys.stdout)
    else:
        print(f"Pinned {len(profiles)} group(s) from {window.label()} to {args.out}.")
    return 0


# --- compare -----------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    try:
        if not args.agent:
            raise ValueError("compare needs --agent")
        versions = [v.strip() for v in args.versions.split(",")]
        if len(versions) != 2 or not all(versions):
            raise ValueError("--versions takes two versions: stable,canary")
        config, _, events = _load(args)
        window = _window(args)
    except (ConfigError, ValueError, OSError) as exc:
        return _fail(str(exc))
    doc = compare(
        events.within(window),
        args.agent,
        (versions[0], versions[1]),
        min_samples=args.min_samples or config.monitor.min_samples,
    )
    if args.format == "json":
        _emit({"window": window.as_dict(), **doc.as_dict()}, sys.stdout)
    else:
        out = sys.stdout
        out.write(f"{args.agent}: {versions[0]} against {versions[1]}, {window.label()}\n")
        print_quality(doc.quality, out)
        out.write(f"\nDrift of {versions[1]} against {versions[0]}:\n")
        rows = [("distribution", "psi", "level", f"{versions[0]} n", f"{versions[1]} n")]
        for d in doc.drift.distributions:
            rows.append(
                (d.name, f"{d.psi:.4f}", d.level.value, str(d.reference_n), str(d.current_n))
            )
        _table(rows, out)
    return 0


def print_summary(audit_dir: str | Path, out: TextIO) -> None:
    """A short drift and quality summary of a log (the demo ends with it)."""
    events = read_events(audit_dir)
    span = events.span()
    if span is None:
        out.write("No decisions recorded yet.\n")
        return
    out.write("\nQuality (read back from the audit log):\n\n")
    print_quality(quality.compute(events), out)
    now = time.time()
    current = recent(now, parse_duration("1d"))
    reference = reference_before(current, parse_duration("7d"))
    results = drift.compute(events.within(reference).decisions, events.within(current).decisions)
    out.write("\nDrift of the last day against the 7 days before:\n")
    for r in results:
        worst = max(r.distributions, key=lambda d: d.psi, default=None)
        detail = f" (largest: {worst.name} {worst.psi:.3f})" if worst and r.max_psi else ""
        shown = (
            "not enough history to compare yet"
            if r.level is Level.INSUFFICIENT
            else f"{r.level.value}{detail}"
        )
        out.write(f"  {r.agent} {r.version or '-'}: {shown}\n")
