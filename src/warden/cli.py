"""The ``warden`` command: ``serve``, plus the ``policy`` and ``audit`` tool groups."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from warden import __version__
from warden.config import load_config
from warden.errors import ConfigError

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from warden.ops import tracing
    from warden.ops.logging import configure_logging
    from warden.ops.runtime import tune_runtime
    from warden.server import Warden

    configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
        tracing.configure_from_env()  # off unless OTEL_* asks for traces
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        warden = Warden(config, config_source=args.config)
        await warden.start()
        tune_runtime()  # what startup built stays, and more; see warden.ops.runtime
        warden.stop_on_signals()
        print(
            f"warden {__version__}: proxy {warden.proxy_url}  admin {warden.admin_url}",
            file=sys.stderr,
            flush=True,
        )
        await warden.wait_stopped()

    try:
        asyncio.run(run())
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return 2
    finally:
        tracing.shutdown()  # exports the spans still buffered
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return 2
    from warden.config_shown import shown_config

    print(json.dumps(shown_config(config), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; tool groups register themselves."""
    parser = argparse.ArgumentParser(prog="warden", description=__doc__)
    parser.add_argument("--version", action="version", version=f"warden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument(
        "--config", default=os.environ.get("WARDEN_CONFIG"), help="YAML config file (optional)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default="json", choices=["json", "text"])
    serve.set_defaults(func=_serve)

    check = sub.add_parser("config", help="validate a config file and print the effective config")
    check.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"))
    check.set_defaults(func=_check_config)

    from warden import (
        cli_admin,
        cli_approvals,
        cli_audit,
        cli_ca,
        cli_db,
        cli_identity,
        cli_mcp,
        cli_policy,
    )

    cli_policy.register(sub)
    cli_audit.register(sub)
    cli_admin.register(sub)
    cli_approvals.register(sub)
    cli_identity.register(sub)
    cli_mcp.register(sub)
    cli_db.register(sub)
    cli_ca.register(sub)
    from warden import cli_inject

    cli_inject.register(sub)
    from warden import cli_monitor

    cli_monitor.register(sub)
    from warden import cli_init

    cli_init.register(sub)
    from warden import cli_eval

    cli_eval.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``warden`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
