"""``warden policy test|eval|check|sign``: the tools a security team uses on bundles.

* ``test [DIR...]`` runs the Rego tests (``test_*`` rules, as ``opa test``)
  and the decision tables of the bundles;
* ``eval --input FILE`` prints the decision for one input, with timings;
* ``check [DIR...]`` reports parse and compile errors and v0 syntax;
* ``sign DIR --key KEY.pem`` writes ``.signatures.json``;
* ``replay --audit DIR --bundle NEW`` re-evaluates recorded decisions against a
  candidate bundle and exits 1 past ``--max-changes`` (a CI gate).

Without DIR the bundles in the configuration are used (``policy.bundles``;
``policies/customer-support`` by default): ``test`` names them, and warns
when the current folder holds modules outside them. Exit status: 0 when all
is well, 1 when a test fails or the check finds errors, 2 when the command
cannot run (unreadable bundle, input or key).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson
import yaml

from warden import cli_replay
from warden.config import Config, load_config
from warden.errors import ConfigError
from warden.policy.authoring.check import check_policy
from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S
from warden.policy.authoring.eval import evaluate_input
from warden.policy.authoring.lint import Finding
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.results import Status, TestReport, TestResult
from warden.policy.authoring.runner import run_tests
from warden.policy.authoring.tables import discover_case_files, load_case_file
from warden.policy.bundle import SIGNATURES_FILE, BundleError, read_bundle_files

__all__ = ["main", "register"]

_RULE = "-" * 80
_DEFAULT_REPEAT = 100


def register(subparsers: Any) -> None:
    """Add ``policy`` and its commands to the ``warden`` parser's subparsers."""
    policy = subparsers.add_parser(
        "policy",
        help="test, evaluate, check and sign Rego policy bundles",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(policy)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``warden policy`` command, e.g. ``main(["test", "policies/customer-support"])``."""
    parser = argparse.ArgumentParser(
        prog="warden policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(parser)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    test = sub.add_parser("test", help="run Rego tests and decision tables")
    test.add_argument("paths", nargs="*", metavar="DIR", help="bundle folders or .tar.gz")
    test.add_argument("-r", "--run", metavar="REGEX", help="only tests whose name matches")
    test.add_argument("-v", "--verbose", action="store_true", help="list every test")
    test.add_argument("--format", choices=["text", "json"], default="text")
    test.add_argument(
        "--cases",
        action="append",
        default=[],
        metavar="FILE",
        help="a decision table to run besides those found in the bundles (repeatable)",
    )
    test.add_argument("--no-cases", action="store_true", help="run only the Rego tests")
    test.add_argument("--query", help="decision query for the tables (default: policy.query)")
    test.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TEST_TIMEOUT_S,
        metavar="SECONDS",
        help=f"time limit per test (default {DEFAULT_TEST_TIMEOUT_S:g})",
    )
    _config_option(test)
    test.set_defaults(func=_test)

    ev = sub.add_parser("eval", help="print the decision for one input document")
    ev.add_argument("--input", required=True, metavar="FILE", help="JSON or YAML; - for stdin")
    ev.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="DIR",
        help="bundle folder or .tar.gz (repeatable; default: policy.bundles)",
    )
    ev.add_argument("--query", help="the query (default: policy.query)")
    ev.add_argument(
        "--repeat",
        type=int,
        default=_DEFAULT_REPEAT,
        metavar="N",
        help=f"evaluate N more times to measure p50/p99 (default {_DEFAULT_REPEAT})",
    )
    _config_option(ev)
    ev.set_defaults(func=_eval)

    check = sub.add_parser("check", help="report parse and compile errors and v0 syntax")
    check.add_argument("paths", nargs="*", metavar="DIR", help="bundle folders or .tar.gz")
    check.add_argument("--query", help="the query to compile (default: policy.query)")
    check.add_argument("--format", choices=["text", "json"], default="text")
    check.add_argument("--strict", action="store_true", help="warnings fail the check too")
    _config_option(check)
    check.set_defaults(func=_check)

    sign = sub.add_parser("sign", help="write .signatures.json for a bundle folder")
    sign.add_argument("path", metavar="DIR", help="the bundle folder")
    sign.add_argument("--key", required=True, metavar="KEY.pem", help="PEM private key")
    sign.add_argument("--key-id", default="default", help="key id put in the signature")
    sign.add_argument(
        "--alg",
        choices=["EdDSA", "ES256", "ES384", "RS256", "PS256"],
        help="signing algorithm (default: from the key type)",
    )
    sign.set_defaults(func=_sign)

    cli_replay.add_command(sub, _config_option)  # in its own module: it reads the audit log


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("WARDEN_CONFIG"),
        help="config file whose policy.bundles and policy.query are the defaults",
    )


def _fail(message: str) -> int:
    print(f"warden policy: {message}", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


# --- test --------------------------------------------------------------------------------------


def _test(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        if args.run:
            re.compile(args.run)
        paths = args.paths or list(config.policy.bundles)
        policy = load_policy_set(paths)
        files = [] if args.no_cases else discover_case_files(policy.folders)
        case_files = [load_case_file(p) for p in [*files, *map(Path, args.cases)]]
    except (ConfigError, BundleError) as exc:
        return _fail(str(exc))
    except re.error as exc:
        return _fail(f"--run: not a regular expression: {exc}")
    if not args.paths:
        _warn_untested_modules_here(policy.folders, paths)
    report = run_tests(
        policy,
        case_files=case_files,
        query=args.query or config.policy.query,
        run=args.run,
        timeout_s=args.timeout,
    )
    if args.format == "json":
        sys.stdout.buffer.write(
            orjson.dumps([r.to_json() for r in report.results], option=orjson.OPT_INDENT_2) + b"\n"
        )
    else:
        if not args.paths:
            # Bundles nobody named: say which, as `check` does.
            print(f"testing {', '.join(paths)} (policy.bundles: no DIR given)")
        _print_report(report, verbose=args.verbose, out=sys.stdout)
    if not report.results:
        print("warden policy: no tests or decision cases found", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


def _warn_untested_modules_here(folders: Sequence[Path], paths: Sequence[str]) -> None:
    """Warn when the current folder holds modules that no bundle tested holds.

    Run inside a bundle being written, ``warden policy test`` would otherwise
    report on the configured bundle alone and pass.
    """
    tested = [folder.resolve() for folder in folders]
    stray = [
        file.name
        for file in sorted(Path.cwd().glob("*.rego"))
        if not file.name.startswith(".")
        and file.is_file()
        and not any(file.resolve().is_relative_to(folder) for folder in tested)
    ]
    if not stray:
        return
    names = ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
    print(
        f"warden policy: warning: {names} in this folder {'is' if len(stray) == 1 else 'are'} "
        "not in the bundle tested "
        f"({', '.join(paths)}); to test this folder's bundle: warden policy test .",
        file=sys.stderr,
    )


def _print_report(report: TestReport, *, verbose: bool, out: TextIO) -> None:
    """Print results as ``opa test`` does: failures (or all, with -v), then counts.

    What a shown test printed (``print()``) follows it, indented, as in ``opa test``.
    """
    shown = [r for r in report.results if verbose or r.status in (Status.FAIL, Status.ERROR)]
    current = None
    for result in shown:
        if result.file != current:
            if current is not None:
                print(file=out)
            print(f"{result.file}:", file=out)
            current = result.file
        print(_result_line(result), file=out)
        if result.message and result.status is not Status.PASS:
            print(f"  {result.message}", file=out)
        if result.hint:
            print(f"  hint: {result.hint}", file=out)
        if result.printed:
            print(file=out)
            for line in result.printed.rstrip("\n").splitlines():
                print(f"  {line}", file=out)
            print(file=out)
    total = len(report.results)
    if not total:
        return
    if shown:
        print(_RULE, file=out)
    for status in Status:
        n = report.count(status)
        if n:
            print(f"{status.value}: {n}/{total}", file=out)


def _result_line(result: TestResult) -> str:
    label = result.name if result.kind == "rego" else f"case {result.name!r} (line {result.line})"
    if result.status is Status.SKIPPED or not result.duration_ns:
        return f"{label}: {result.status.value}"
    return f"{label}: {result.status.value} ({_duration(result.duration_ns)})"


def _duration(ns: int) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1_000_000:.3f}ms"
    return f"{ns / 1000:.1f}µs"


# --- eval --------------------------------------------------------------------------------------


def _eval(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        doc = _read_input(args.input)
        policy = load_policy_set(args.bundle or list(config.policy.bundles))
    except (ConfigError, BundleError, ValueError) as exc:
        return _fail(str(exc))
    query = args.query or config.policy.query
    result = evaluate_input(
        policy,
        doc,
        query=query,
        repeat=max(0, args.repeat),
        decision=query == config.policy.query,
    )
    if result.printed:  # print() output goes to standard error, as with `opa eval`
        sys.stderr.write(result.printed if result.printed.endswith("\n") else result.printed + "\n")
        sys.stderr.flush()
    out = result.to_json(query=query, revision=policy.revision)
    sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    if result.invalid:
        print(
            f"warden policy: the proxy refuses this result ({result.invalid}) and denies the "
            "call as a policy error (guard: fallback)",
            file=sys.stderr,
        )
    return 1 if result.error or result.invalid else 0


def _read_input(name: str) -> Any:
    label = "standard input" if name == "-" else name
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{label}: cannot read the input: {exc}") from None
    try:
        doc = orjson.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{label}: not a JSON or YAML document: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{label}: the input must be an object (see docs/policies.md)")
    return doc


# --- check -------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    paths = args.paths or list(config.policy.bundles)
    findings = check_policy(paths, query=args.query or config.policy.query)
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    if args.format == "json":
        doc = [f.to_json() for f in findings]
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        _print_findings(findings, paths, errors, warnings)
    return 1 if errors or (args.strict and warnings) else 0


def _print_findings(
    findings: list[Finding], paths: Sequence[str], errors: int, warnings: int
) -> None:
    for finding in findings:
        print(finding)
    if findings:
        print(f"{errors} error(s), {warnings} warning(s)")
    else:
        print(f"{', '.join(paths)}: no problems found")


# --- sign --------------------------------------------------------------------------------------


def _sign(args: argparse.Namespace) -> int:
    from warden.policy.bundle.sign import sign_bundle

    try:
        pem = Path(args.key).read_bytes()
    except OSError as exc:
        return _fail(f"{args.key}: cannot read the key: {exc.strerror}")
    try:
        algorithm = args.alg or _algorithm_for(pem)
        signed_at = sign_bundle(args.path, pem, args.key_id, algorithm)
        files = [n for n in read_bundle_files(args.path) if n != SIGNATURES_FILE]
    except (BundleError, ValueError) as exc:
        return _fail(str(exc))
    target = Path(args.path) / SIGNATURES_FILE
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(signed_at))
    print(f"signed {len(files)} files with key {args.key_id!r} ({algorithm}) at {when}: {target}")
    return 0


def _algorithm_for(pem: bytes) -> str:
    """The usual JWT algorithm for a private key's type."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384"}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    raise ValueError("unsupported key type: use an Ed25519, P-256, P-384 or RSA key, or pass --alg")


if __name__ == "__main__":
    sys.exit(main())
