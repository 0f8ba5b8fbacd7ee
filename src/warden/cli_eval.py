"""``warden eval run``: run an eval suite against a bundle, a CI gate for policy changes.

    warden eval run policies/customer-support-evals/suite.jsonl \\
        --bundle policies/customer-support [--audit DIR | --record | --admin [URL]] \\
        [--format json]

Each scenario (a JSONL line: the context, the tool call the model proposes and
the decision expected) is evaluated on the production path and reported PASS,
FAIL or ERROR. The suite's SHA-256 is printed, and the run can be written as
an ``eval_run`` change record: with ``--audit DIR`` (or ``--record``: the
configured ``audit.dir``) into that audit log, which must not be open in a
running Warden; with ``--admin [URL]`` through a running Warden's admin API
(``POST /v1/changes``) into the log it writes. URL defaults to
``$WARDEN_ADMIN_URL``, else ``http://127.0.0.1:8081``; the token is
``$WARDEN_TOKEN`` (role ``admin``), and the record names its subject. Exit
status: 0 when every scenario passes, 1 when any fails, 2 when the suite
cannot run or the run cannot be recorded (no token, the API unreachable or
refusing: its message is printed). See docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from warden.audit.changes import EVAL_RUN, record_change
from warden.cli_admin import AdminApiError, add_admin_option, admin_base_url, admin_request
from warden.config import Config, load_config
from warden.errors import AuditError, ConfigError
from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.results import Status
from warden.policy.authoring.suite import (
    EvalReport,
    Scenario,
    SuiteError,
    load_suite,
    run_suite,
    scenario_input,
)
from warden.policy.bundle import BundleError

__all__ = ["main", "print_report", "record_run", "register", "submit_run"]


def register(subparsers: Any) -> None:
    """Add ``eval`` and its ``run`` command to the ``warden`` parser's subparsers."""
    group = subparsers.add_parser(
        "eval",
        help="eval suites: scenarios and the decisions expected of a bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(group)


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a suite against a bundle; exit 1 when any scenario fails")
    run.add_argument("suite", metavar="SUITE", help="the suite (JSONL)")
    run.add_argument(
        "--bundle",
        action="append",
        metavar="DIR",
        help="bundle folder or .tar.gz (repeatable; default: policy.bundles)",
    )
    run.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"), help="config file")
    run.add_argument("--query", help="the decision query (default: policy.query)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--audit", metavar="DIR", help="record the run in this audit log")
    where.add_argument(
        "--record", action="store_true", help="record the run in the configured audit.dir"
    )
    add_admin_option(where)
    run.add_argument("--format", choices=["text", "json"], default="text")
    run.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TEST_TIMEOUT_S,
        metavar="SECONDS",
        help=f"time limit per evaluation (default {DEFAULT_TEST_TIMEOUT_S:g})",
    )
    run.set_defaults(func=_run)


def _builder(config: Config) -> Any:
    """Fill what a scenario leaves out from the configuration, as the proxy would."""

    def labels_of(tool: str) -> tuple[str, ...]:
        entry = config.tools.get(tool)
        return entry.labels if entry is not None else ()

    def build(scenario: Scenario) -> dict[str, Any]:
        return scenario_input(
            scenario, mode_for=config.mode_for, risk_of=config.risk_of, labels_of=labels_of
        )

    return build


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        bundles = list(args.bundle or config.policy.bundles)
        policy = load_policy_set(bundles)
        suite = load_suite(args.suite)
        report = run_suite(
            suite,
            policy,
            query=args.query or config.policy.query,
            default_effect=config.policy.default_effect,
            timeout_s=args.timeout,
            build=_builder(config),
        )
    except (ConfigError, BundleError, SuiteError, OSError) as exc:
        print(f"warden eval run: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print_report(report, sys.stdout)
    if args.admin is not None:
        base = admin_base_url(args.admin or None)
        try:
            record_id = submit_run(base, EVAL_RUN, report.record_body(bundles))
        except AdminApiError as exc:
            print(f"warden eval run: the run was not recorded by {base}: {exc}", file=sys.stderr)
            return 2
        if args.format == "text":
            print(f"recorded as {record_id} by {base}")
        return 0 if report.ok else 1
    audit_dir = args.audit or (config.audit.dir if args.record else None)
    if audit_dir is not None:
        try:
            record_id = record_run(config, audit_dir, report, bundles)
        except AuditError as exc:
            print(
                f"warden eval run: the run was not recorded in {audit_dir}: {exc}", file=sys.stderr
            )
            return 2
        if args.format == "text":
            print(f"recorded as {record_id} in {audit_dir}")
    return 0 if report.ok else 1


def record_run(config: Config, audit_dir: str, report: EvalReport, bundles: Sequence[str]) -> str:
    """Append the ``eval_run`` change record to the log in ``audit_dir``; return its id.

    Raises :class:`AuditError` when the log cannot be opened or written (a
    running Warden holds it: send the record to that Warden instead, with
    :func:`submit_run`, or record into a CI log of its own).
    """
    audit = config.audit.model_copy(update={"dir": audit_dir})
    ref = asyncio.run(record_change(audit, EVAL_RUN, report.record_body(bundles)))
    return ref.id


def submit_run(base_url: str, kind: str, body: dict[str, Any]) -> str:
    """Send a change record to the admin API at ``base_url`` (``POST /v1/changes``); its id.

    Raises :class:`AdminApiError` when there is no token, the API cannot be
    reached, or it refuses the record.
    """
    out = admin_request("POST", "/v1/changes", {"kind": kind, "body": body}, base_url=base_url)
    if not isinstance(out, dict) or not isinstance(out.get("id"), str):
        raise AdminApiError(0, f"the admin API at {base_url} answered without a record id")
    return str(out["id"])


def print_report(report: EvalReport, out: TextIO) -> None:
    """One line per scenario, then the summary."""
    out.write(
        f"suite {report.suite.path}  sha256 {report.suite.sha256}\n"
        f"bundle revision {report.revision}\n\n"
    )
    width = max(len(r.id) for r in report.results)
    for result in report.results:
        line = f"{result.status.value:<5}  {result.id:<{width}}  {result.label}"
        if result.status is not Status.PASS:
            line += f"\n       line {result.line}: {result.message}"
        out.write(line + "\n")
    verdict = "PASS" if report.ok else "FAIL"
    out.write(
        f"\n{report.passed} passed, {report.failed} failed of {len(report.results)}: {verdict}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``warden eval`` on its own: ``main(["run", "suite.jsonl", "--bundle", "b"])``."""
    parser = argparse.ArgumentParser(prog="warden eval", description=__doc__)
    _add_commands(parser)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
