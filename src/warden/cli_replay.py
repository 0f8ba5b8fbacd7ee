"""``warden policy replay``: what a candidate bundle would have decided on recorded traffic.

    warden policy replay --audit ./warden-data/audit --bundle policies/candidate \\
        [--from 7d | --from 2026-11-01] [--to ...] [--max-changes N] [--max-change-rate F] \\
        [--allow-skipped] [--record [DIR] | --admin [URL]]

Prints a table of changed effects (allow→deny, deny→allow, →require_approval...,
and mode changes such as deny→deny (observe), which let the action through)
with counts and sample decision ids. With a threshold set, decisions that
could not be replayed (skipped for any reason but "decided before the policy
ran") fail the run too, unless --allow-skipped. A candidate that reads the
clock (time.now_ns) is evaluated at each record's time. The run can be
written as a ``replay_run`` change record: ``--record [DIR]`` appends it to
the audit log DIR (default: the replayed log), which must not be open in a
running Warden; ``--admin [URL]`` sends it to a running Warden's admin API
(``POST /v1/changes``), which appends it to the log it writes (URL defaults to
``$WARDEN_ADMIN_URL``, else ``http://127.0.0.1:8081``; the token is
``$WARDEN_TOKEN``, role ``admin``). Exit status: 0 within the threshold (or
when none is set), 1 past it or with decisions not replayed (unless
--allow-skipped), 2 when the replay cannot run or the run cannot be recorded
(no token, the API unreachable or refusing: its message is printed). See
docs/monitoring.md and ADR 0012.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from warden.audit.changes import REPLAY_RUN, record_change
from warden.cli_admin import AdminApiError, add_admin_option, admin_base_url
from warden.cli_eval import submit_run
from warden.config import load_config
from warden.errors import AuditError, ConfigError
from warden.monitor.windows import parse_duration, parse_instant
from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.replay import BENIGN_SKIPS, SKIP_REASONS, ReplayReport, replay
from warden.policy.bundle import BundleError

__all__ = ["add_command", "parse_when", "print_report", "replay_record"]


def add_command(sub: Any, config_option: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``replay`` to the ``warden policy`` subcommands."""
    rp = sub.add_parser(
        "replay",
        help="re-evaluate recorded decisions against a candidate bundle (a CI gate)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("--audit", metavar="DIR", help="audit directory (default: audit.dir)")
    rp.add_argument(
        "--bundle",
        action="append",
        required=True,
        metavar="DIR",
        help="the candidate bundle folder or .tar.gz (repeatable)",
    )
    rp.add_argument("--from", dest="since", metavar="WHEN", help="a date, RFC 3339 time or 7d")
    rp.add_argument("--to", dest="until", metavar="WHEN", help="a date, RFC 3339 time or 1h")
    rp.add_argument("--query", help="the decision query (default: policy.query)")
    rp.add_argument(
        "--max-changes",
        type=int,
        metavar="N",
        help="exit 1 when more than N decisions change (default: monitor.replay_max_changes)",
    )
    rp.add_argument(
        "--max-change-rate",
        type=float,
        metavar="FRACTION",
        help="exit 1 when more than this share of replayed decisions change (0.01 = 1%%)",
    )
    rp.add_argument(
        "--allow-skipped",
        action="store_true",
        help="pass even when decisions the candidate might change could not be replayed",
    )
    rp.add_argument("--format", choices=["text", "json"], default="text")
    where = rp.add_mutually_exclusive_group()
    where.add_argument(
        "--record",
        nargs="?",
        const="",
        metavar="DIR",
        help="record the run as a replay_run change record in the audit log DIR "
        "(default: the replayed log)",
    )
    add_admin_option(where)
    rp.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TEST_TIMEOUT_S,
        metavar="SECONDS",
        help=f"time limit per evaluation (default {DEFAULT_TEST_TIMEOUT_S:g})",
    )
    config_option(rp)
    rp.set_defaults(func=run)


def parse_when(text: str | None, now: float) -> float | None:
    """``7d`` (that long before now), a date or an RFC 3339 time, as epoch seconds."""
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except ValueError:
        return parse_instant(text)


def run(args: argparse.Namespace) -> int:
    """Run ``warden policy replay``."""
    try:
        config = load_config(args.config)
        policy = load_policy_set(args.bundle)
        now = time.time()
        since, until = parse_when(args.since, now), parse_when(args.until, now)
        audit_dir = args.audit or config.audit.dir
        policy_config = config.policy
        if args.query:
            policy_config = policy_config.model_copy(update={"query": args.query})
        report = replay(
            audit_dir, policy, policy_config, since=since, until=until, timeout_s=args.timeout
        )
    except (ConfigError, BundleError, ValueError, OSError) as exc:
        print(f"warden policy replay: {exc}", file=sys.stderr)
        return 2
    max_changes = args.max_changes
    if max_changes is None:
        max_changes = config.monitor.replay_max_changes
    gated = max_changes is not None or args.max_change_rate is not None
    over = (max_changes is not None and report.changed > max_changes) or (
        args.max_change_rate is not None and report.change_rate > args.max_change_rate
    )
    # A decision not replayed may be one the candidate changes: a gate that
    # ignored it would pass a change it never saw.
    unchecked = gated and report.unreplayed > 0 and not args.allow_skipped
    failed = over or unchecked
    threshold = {
        "max_changes": max_changes,
        "max_change_rate": args.max_change_rate,
        "allow_skipped": args.allow_skipped,
    }
    if args.format == "json":
        doc = report.as_dict()
        doc["threshold"] = threshold
        doc["passed"] = not failed
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print_report(report, audit_dir, sys.stdout)
        _print_verdict(report, max_changes, args.max_change_rate, over, sys.stdout)
        _print_skipped_verdict(report, gated, args.allow_skipped, sys.stdout)
    if args.admin is not None:
        base = admin_base_url(args.admin or None)
        body = replay_record(report, args.bundle, threshold, failed=failed)
        try:
            record_id = submit_run(base, REPLAY_RUN, body)
        except AdminApiError as exc:
            print(
                f"warden policy replay: the run was not recorded by {base}: {exc}",
                file=sys.stderr,
            )
            return 2
        if args.format == "text":
            print(f"recorded as {record_id} by {base}")
    if args.record is not None:
        body = replay_record(report, args.bundle, threshold, failed=failed)
        target = args.record or audit_dir
        try:
            ref = asyncio.run(
                record_change(config.audit.model_copy(update={"dir": target}), REPLAY_RUN, body)
            )
        except AuditError as exc:
            print(
                f"warden policy replay: the run was not recorded in {target}: {exc}",
                file=sys.stderr,
            )
            return 2
        if args.format == "text":
            print(f"recorded as {ref.id} in {target}")
    return 1 if failed else 0


def replay_record(
    report: ReplayReport, bundles: list[str], threshold: dict[str, Any], *, failed: bool
) -> dict[str, Any]:
    """The ``replay_run`` change record: what the candidate changes, no decision content."""
    return {
        "bundle_revision": report.revision,
        "bundles": list(bundles),
        "recorded_revisions": list(report.recorded_revisions),
        "scanned": report.scanned,
        "replayed": report.replayed,
        "changed": report.changed,
        "change_rate": report.change_rate,
        "changes": {c.label: c.count for c in report.changes},
        "skipped": dict(report.skipped),
        "unreplayed": report.unreplayed,
        "inexact": report.inexact,
        "errors": report.errors,
        "threshold": threshold,
        "result": "fail" if failed else "pass",
    }


def print_report(report: ReplayReport, audit_dir: str, out: TextIO) -> None:
    """The human-readable table."""
    recorded = ", ".join(report.recorded_revisions) or "unknown"
    out.write(
        f"Replayed {report.replayed} of {report.scanned} recorded decisions in {audit_dir}\n"
        f"against candidate revision {report.revision or '(none)'} (recorded: {recorded}).\n\n"
    )
    if report.changes:
        width = max(len("change"), *(len(c.label) for c in report.changes))
        out.write(f"{'change':<{width}}  {'count':>7}  {'inexact':>7}  sample decision ids\n")
        for change in report.changes:
            out.write(
                f"{change.label:<{width}}  {change.count:>7}  {change.inexact:>7}  "
                f"{', '.join(change.samples)}\n"
            )
    else:
        out.write("No decision changes.\n")
    if report.inexact:
        out.write(
            f"\n{report.inexact} replayed decision(s) had redacted fields, replayed with "
            '"[redacted]" in place: their result is approximate.\n'
        )
    if report.at_recorded_time:
        out.write(
            f"The candidate may read the clock: {report.at_recorded_time} decision(s) were "
            "replayed at their record's time, not at the time of this replay.\n"
        )
    if report.errors:
        out.write(f"The candidate failed on {report.errors} input(s); counted as deny.\n")
    for reason, n in sorted(report.skipped.items()):
        why = SKIP_REASONS.get(reason, reason)
        if reason in BENIGN_SKIPS:
            out.write(f"Skipped {n}: {why}; no bundle decides these differently.\n")
        else:
            out.write(f"Skipped {n}, not replayed: {why}.\n")


def _print_verdict(
    report: ReplayReport,
    max_changes: int | None,
    max_rate: float | None,
    failed: bool,
    out: TextIO,
) -> None:
    summary = f"\n{report.changed} decision(s) change ({report.change_rate:.1%} of replayed)"
    limits = []
    if max_changes is not None:
        limits.append(f"max {max_changes}")
    if max_rate is not None:
        limits.append(f"max rate {max_rate:.1%}")
    if not limits:
        out.write(f"{summary}; no threshold set.\n")
    else:
        out.write(f"{summary}; threshold {', '.join(limits)}: {'FAIL' if failed else 'pass'}.\n")


def _print_skipped_verdict(report: ReplayReport, gated: bool, allowed: bool, out: TextIO) -> None:
    n = report.unreplayed
    if not n:
        return
    what = f"{n} decision(s) the candidate might decide differently were not replayed"
    if not gated:
        out.write(f"{what}.\n")
    elif allowed:
        out.write(f"{what}; accepted (--allow-skipped).\n")
    else:
        out.write(f"{what}: FAIL (--allow-skipped accepts them).\n")
