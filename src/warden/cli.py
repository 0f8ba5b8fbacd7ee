"""The ``warden`` command: ``serve``, plus the ``policy`` and ``audit`` tool groups."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from warden import __version__
from warden.errors import ConfigError, WardenError
from warden.terminal import reader_left

if TYPE_CHECKING:
    from warden.config import Config
    from warden.server import Warden

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""Ctrl-C before a command handled it (128 + SIGINT), as shells report it."""
log = logging.getLogger("warden.cli")


class _StopAsked(BaseException):
    """A stop signal arrived before Warden had started. A ``BaseException``, as
    ``KeyboardInterrupt`` is, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _make_room_for_connections(config: Config) -> Config:
    """Raise the open-file limit to what the connection caps need; where the hard limit
    is lower, lower ``limits.max_connections`` to fit it and say so."""
    from warden.ingress.connection_cap import MAX_REFUSALS
    from warden.ops.runtime import raise_open_files
    from warden.server import OWN_DESCRIPTORS, connection_shares, descriptors_needed

    needed = descriptors_needed(config)
    have = raise_open_files(needed)
    if have >= needed:
        return config
    room = have - OWN_DESCRIPTORS - 2 * MAX_REFUSALS
    fits = max(1, room // connection_shares(config))
    log.warning(
        "the open-file limit is %d, below the %d that limits.max_connections (%d per "
        "listener) may need: serving at most %d connections per listener; raise the "
        "limit (ulimit -n; LimitNOFILE) to serve more",
        have,
        needed,
        config.limits.max_connections,
        fits,
    )
    limits = config.limits.model_copy(update={"max_connections": fits})
    return config.model_copy(update={"limits": limits})


def _serve(args: argparse.Namespace) -> int:
    # Until Warden has started (imports, the policy's first compile), a stop signal
    # ends the start-up quietly; once started, Warden stops gracefully on its own.
    stop_signals = _start_up_signals()
    # Ctrl-C raises KeyboardInterrupt already; the others end the process unless caught.
    before = {n: signal.signal(n, _stop_asked) for n in stop_signals if n != signal.SIGINT}
    started: list[bool] = []
    try:
        return _serve_started(args, stop_signals, started)
    except (KeyboardInterrupt, _StopAsked) as stop:
        if started:  # Ctrl-C again while the last spans are exported, after a clean stop
            return EXIT_INTERRUPTED
        return _stopped_during_start_up(
            stop.signum if isinstance(stop, _StopAsked) else signal.SIGINT
        )
    finally:
        for signum, handler in before.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)


def _start_up_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop Warden once started (``Warden.stop_on_signals``)."""
    ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # started under nohup
    return (signal.SIGTERM, signal.SIGINT, *(() if ignored else (signal.SIGHUP,)))


def _stop_asked(signum: int, frame: object) -> None:
    raise _StopAsked(signum)


def _stopped_during_start_up(signum: int) -> int:
    """One line, and the exit status Warden has when stopped once started (SIGTERM and
    SIGHUP: 0), except for Ctrl-C: 130, the shell's convention for an interrupted command."""
    name = signal.Signals(signum).name
    print(f"warden: {name} during start-up: stopped before serving", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 0


def _serve_started(
    args: argparse.Namespace, stop_signals: Sequence[signal.Signals], started: list[bool]
) -> int:
    from warden.config import load_config
    from warden.ops import tracing
    from warden.ops.logging import configure_logging
    from warden.ops.runtime import tune_runtime
    from warden.server import Warden

    configure_logging(args.log_level, args.log_format)
    _warn_if_config_left_out(args.config)
    config = load_config(args.config)
    _check_files(config)
    _warn_if_nobody_decides(config)
    config = _make_room_for_connections(config)
    tracing.configure_from_env()  # off unless OTEL_* asks for traces
    stopped_by: list[int] = []

    async def run() -> None:
        # A signal cancels the start-up; Warden.start stops what it had started.
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()

        def stop_start_up(signum: int) -> None:
            if not stopped_by:  # a second signal must not cut the clean-up short
                stopped_by.append(signum)
                main.cancel()

        for signum in stop_signals:
            loop.add_signal_handler(signum, stop_start_up, signum)
        warden = Warden(config, config_source=args.config)
        try:
            await warden.start()
        except asyncio.CancelledError:
            if stopped_by:
                return
            raise
        if stopped_by:  # the signal came as the start ended, and did not cut it short
            await warden.stop()
            return
        started.append(True)
        tune_runtime()  # what startup built stays, and more; see warden.ops.runtime
        warden.stop_on_signals()  # in place of the start-up's handlers
        print(_banner(warden), file=sys.stderr, flush=True)
        await warden.wait_stopped()

    try:
        asyncio.run(run())
    finally:
        tracing.shutdown()  # exports the spans still buffered
    if stopped_by:
        return _stopped_during_start_up(stopped_by[0])
    return 0


def _warn_if_config_left_out(given: str | None) -> None:
    """Warden reads only the file ``--config`` (or ``WARDEN_CONFIG``) names: say so when
    ``warden init``'s ``./warden.yaml`` is here and would be ignored."""
    if given is None and Path("warden.yaml").is_file():
        log.warning(
            "./warden.yaml is not read: no --config was given, so the defaults apply; "
            "start with --config warden.yaml to use it"
        )


def _banner(warden: Warden) -> str:
    """What ``warden serve`` prints once started: where it listens, and what a first look
    would miss (nothing is blocked in observe mode; not ready, and why)."""
    from warden.model import Mode

    lines = [f"warden {__version__}: proxy {warden.proxy_url}  admin {warden.admin_url}"]
    if warden.grpc_address:
        lines[0] += f"  grpc {warden.grpc_address}"
    if warden.transparent_address:
        lines[0] += f"  transparent {warden.transparent_address}"
    config = warden.config
    agents = {config.agent.id, *config.agents}
    # Agents whose own mode differs from the global one (which agents not named here get).
    apart = sorted(a for a in agents if config.mode_for(a) is not config.mode)
    if config.mode is Mode.OBSERVE:
        # Validation holds in every mode (docs/policies.md): "nothing" would overstate it.
        enforced = f" (enforced for {', '.join(apart)})" if apart else ""
        lines.append(
            f"warden: mode observe: decisions are recorded, the policy blocks nothing{enforced}; "
            "kill switches still block, and calls Warden cannot check exactly are denied"
        )
    elif apart:
        names = ", ".join(apart)
        lines.append(f"warden: observe mode for {names}: the policy blocks none of theirs")
    ready, detail = warden.readiness()
    if not ready:
        policy = detail.get("policy", {})
        why = []
        if not policy.get("ready"):
            error = policy.get("last_error")
            why.append(f"no policy bundle is active ({error})" if error else "no policy bundle")
        if not detail.get("audit", {}).get("writable"):
            why.append("the audit log is not writable")
        shown = "; ".join(why) or "see /readyz"
        lines.append(f"warden: NOT READY: {shown} (/readyz answers 503 until it is)")
    return "\n".join(lines)


def _check_files(config: Config) -> None:
    """Refuse to start, naming the setting, where a file or folder cannot be used.

    Deeper down these fail as a bare ``[Errno 17] File exists: 'data'``. Only
    looked at, never created: the audit log makes its folders with its own modes.
    """
    key_file = config.audit.signing_key_file
    if key_file is not None and not Path(key_file).is_file():
        # Only looked at: a key a secrets helper serves once (a FIFO) is read by the log.
        raise ConfigError(
            f"audit.signing_key_file: {key_file} is not a file (leave the setting out to "
            "have Warden generate a key in audit.dir)"
        )
    if key_file is not None and Path(key_file).is_file() and not os.access(key_file, os.R_OK):
        raise ConfigError(f"audit.signing_key_file: no permission to read {key_file}")
    problem = _not_creatable(Path(config.audit.dir))
    if problem:
        raise ConfigError(f"audit.dir: cannot create {config.audit.dir}: {problem}")
    if config.state.url.startswith("sqlite:///"):
        from warden.state.base import sqlite_path

        problem = _not_creatable(sqlite_path(config.state.url).parent)
        if problem:
            raise ConfigError(f"state.url: cannot create the SQLite database's folder: {problem}")


def _not_creatable(folder: Path) -> str | None:
    """Why ``folder`` can neither be used nor made, judged at its nearest existing ancestor."""
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        return f"{nearest} is a file, not a folder"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"no permission to write in {nearest}"
    return None


def _warn_if_nobody_decides(config: Config) -> None:
    """Say so at start when no one could decide an approval a policy asks for.

    Besides the role, the approver groups the active bundle's data names
    (``data.warden.approvals.approvers``, as the shipped bundle's rules read them)
    are checked, from its files alone: bundles from ``policy.bundle_url`` are not
    fetched for it, and groups a rule names in Rego are not seen.
    """
    approvers = [t for t in config.admin.tokens if "approver" in t.roles]
    sso = config.console.sso if config.console.enabled else None
    if sso is not None and any("approver" in roles for roles in sso.roles.values()):
        return  # people signing in through SSO can decide
    needed = config.approvals.required_approvals
    subjects = {t.subject for t in approvers}
    if len(subjects) < needed:
        have = (
            f"admin.tokens has {len(subjects)} approver(s), approvals.required_approvals "
            f"asks {needed}"
            if subjects
            else "no admin token has the approver role (admin.tokens)"
        )
        log.warning(
            "approvals: nobody can decide the approvals a policy asks for: %s and console.sso "
            "gives the role to no group; a held action waits out its hold time and is then "
            "refused. Add an approver token: docs/admin-api.md",
            have,
        )
        return
    if config.policy.bundle_url is not None:
        return  # the active bundle is the server's, known once fetched
    from warden.cli_init import approver_groups

    groups = approver_groups(config.policy.bundles)
    if groups is None:
        return  # none named in data (or unreadable: the engine says why)
    # Membership as the approval service counts it: a group, the subject or a role.
    members = {
        t.subject
        for t in approvers
        if any(g in t.groups or g == t.subject or g in t.roles for g in groups)
    }
    if len(members) >= needed:
        return
    names = ", ".join(groups)
    log.warning(
        "approvals: %s in the approver groups %s, where the policy's data sends held "
        "actions (warden.approvals.approvers in %s); such an action waits out its hold "
        "time and is then refused. Add the group to approver tokens "
        "(admin.tokens: groups: [%s])",
        f"only {len(members)} approver token(s) of the {needed} approvals.required_approvals "
        "asks are"
        if members
        else "no approver token is",
        names,
        ", ".join(config.policy.bundles),
        names,
    )


def _check_config(args: argparse.Namespace) -> int:
    from warden.config import load_config

    if args.config is None and Path("warden.yaml").is_file():
        print(
            "warden: ./warden.yaml is not read: no --config was given, so these are the "
            "defaults; add --config warden.yaml to check it",
            file=sys.stderr,
        )
    config = load_config(args.config)  # a ConfigError is main's to print
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
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while the commands load (seconds on a busy machine) or before one
        # handles it: the shell's status, and no traceback.
        print("warden: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        return reader_left()
    except (WardenError, OSError) as exc:
        print(f"warden: {_described(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _described(exc: BaseException) -> str:
    """The error in a line: ``[Errno 13] Permission denied: 'x'`` as ``x: permission denied``."""
    if isinstance(exc, OSError) and exc.strerror:
        what = exc.strerror[:1].lower() + exc.strerror[1:]
        return f"{exc.filename}: {what}" if exc.filename is not None else what
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
