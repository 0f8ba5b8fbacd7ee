"""``warden mcp wrap``: govern a stdio MCP server's tool calls.

An agent's MCP configuration launches ``warden mcp wrap --config warden.yaml
-- <command> [args...]`` where it launched ``<command>``. Warden reads the
client on stdin and answers on stdout; the audit log, policy engine and state
come from the config, built as ``warden serve`` builds them, but neither the
proxy nor the admin API listens (see docs/mcp.md).

Every call of one wrap run is in one session (``input.session``): a fresh id
per run, or the one ``--session`` names, so several wraps can share one.

The agent is proved as at every door (docs/identity.md): ``--agent`` names
it as ``X-Warden-Agent`` would, ``WARDEN_AGENT_KEY`` or ``--token-file`` (or
``WARDEN_AGENT_TOKEN``) carry the credential, checked when the wrap starts.
A token is checked again before every tool call, read anew from
``--token-file`` (a rotated file, as Kubernetes projects, is taken up; an
expired token refuses the call). Without any, the agent is the config's
``agent.id``, unless ``identity.require_proof`` asks for proof of that too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from warden.config import Config, load_config
from warden.errors import ConfigError

if TYPE_CHECKING:
    from warden.model import Agent

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mcp wrap`` to the main CLI."""
    parser = subparsers.add_parser("mcp", help="govern MCP servers")
    sub = parser.add_subparsers(dest="mcp_command", required=True, metavar="COMMAND")
    wrap = sub.add_parser(
        "wrap",
        help="run a stdio MCP server as a child and govern its tool calls, resources and prompts",
        usage=(
            "warden mcp wrap [--config FILE] [--name NAME] [--session NAME] [--agent ID] "
            "[--token-file FILE] -- COMMAND [ARGS...]"
        ),
    )
    wrap.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"))
    wrap.add_argument(
        "--name", help="the upstream name policies and kill switches see (default: the command)"
    )
    wrap.add_argument(
        "--session",
        metavar="NAME",
        help="the session every call of this run is counted in, as X-Warden-Session names "
        "one (default: a fresh one per run); wraps naming the same session share its counters",
    )
    wrap.add_argument(
        "--agent",
        metavar="ID",
        help="the agent acting, as X-Warden-Agent names one (default: the config's agent.id); "
        "an id other than agent.id needs WARDEN_AGENT_KEY or a token",
    )
    wrap.add_argument(
        "--token-file",
        metavar="FILE",
        help="a JWT proving the agent, as X-Warden-Agent-Token carries one (default: "
        "WARDEN_AGENT_TOKEN); a proxy key comes from WARDEN_AGENT_KEY, never the command line",
    )
    wrap.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    wrap.add_argument("--log-format", default="json", choices=["json", "text"])
    wrap.add_argument("command", nargs=argparse.REMAINDER, help="the server command, after --")
    wrap.set_defaults(func=_wrap)


def _wrap(args: argparse.Namespace) -> int:
    from warden.ops.runtime import undumpable

    # First, before the server starts: it runs as this user.
    try:
        undumpable()
    except OSError as exc:
        print(f"warden: mcp wrap could not shield itself from the server: {exc}", file=sys.stderr)
        return 2
    from warden.model import new_id
    from warden.ops.logging import configure_logging
    from warden.sessions import MAX_SESSION_ID, usable_session

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("warden: mcp wrap needs a server command after --", file=sys.stderr)
        return 2
    session, source = new_id("ses"), "mcp"
    if args.session is not None:
        named = usable_session(args.session)
        if named is None:
            given = repr(args.session[:40]) + ("..." if len(args.session) > 40 else "")
            print(
                f"warden: --session must be 1 to {MAX_SESSION_ID} printable characters "
                f"(as X-Warden-Session); got {given}",
                file=sys.stderr,
            )
            return 2
        session, source = named, "wrap"
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return 2
    credentials = _credentials(args)
    if isinstance(credentials, str):
        print(f"warden: {credentials}", file=sys.stderr)
        return 2
    token_given = args.token_file is not None or "WARDEN_AGENT_TOKEN" in os.environ
    # stdout is the MCP channel: keep a private copy for it and point fd 1 at
    # stderr, so nothing else (a library, a policy worker) can corrupt it.
    sys.stdout.flush()
    channel = os.dup(1)
    os.dup2(2, 1)
    configure_logging(args.log_level, args.log_format)
    name = args.name or Path(command[0]).name
    try:
        return asyncio.run(
            _run(
                config,
                command,
                name,
                channel,
                (session, source),
                credentials=lambda: _credentials(args),
                token_given=token_given,
            )
        )
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return 2
    except _Unproved as exc:
        print(f"warden: mcp wrap refused the agent: {exc}", file=sys.stderr)
        return 2


class _Unproved(Exception):
    """The agent the wrap would act as was not proved (the identity error's text)."""


def _credentials(args: argparse.Namespace) -> dict[str, str] | str:
    """The identity headers the wrap proves its agent with, or what is wrong with them.

    From the environment and files, never from the command line, which every
    user of the machine can read. The server does not inherit them
    (``WARDEN_*`` is withheld from it).
    """
    from warden.identity import AGENT_KEY_HEADER, AGENT_TOKEN_HEADER
    from warden.ingress.headers import AGENT_HEADER

    headers: dict[str, str] = {}
    if args.agent is not None:
        headers[AGENT_HEADER] = args.agent
    if key := os.environ.get("WARDEN_AGENT_KEY", "").strip():
        headers[AGENT_KEY_HEADER] = key
    token = os.environ.get("WARDEN_AGENT_TOKEN", "").strip()
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            return f"cannot read --token-file {args.token_file}: {why}"
        if not token:
            return f"--token-file {args.token_file} is empty"
    if token:
        headers[AGENT_TOKEN_HEADER] = token
    return headers


async def _run(
    config: Config,
    command: list[str],
    name: str,
    channel: int,
    session: tuple[str, str],
    *,
    credentials: Callable[[], dict[str, str] | str],
    token_given: bool,
) -> int:
    from warden.errors import Unauthenticated, WardenError
    from warden.identity import Identity
    from warden.ingress.mcp_stdio import MAX_LINE, StdioDoor
    from warden.ops.runtime import tune_runtime
    from warden.server import Warden

    identity = Identity(config)

    async def prove() -> Agent:
        # The credentials as they are now: a token file may have been rotated.
        found = credentials()
        if isinstance(found, str):
            raise Unauthenticated(found)
        return await identity.resolve(found)

    try:
        # As every door proves it: an id other than agent.id, or any with require_proof.
        agent = await prove()
    except WardenError as exc:
        raise _Unproved(
            f"{exc} ({exc.status} {exc.code}); the wrap takes a key from WARDEN_AGENT_KEY "
            "and a token from --token-file or WARDEN_AGENT_TOKEN"
        ) from None

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(channel, "wb", 0))
    door = StdioDoor(
        command,
        agent=agent,
        # A token expires (and a file is rotated): proved again for every call, as
        # each request is at the other doors. A key holds while the config does.
        prove=prove if token_given else None,
        upstream=name,
        client_in=reader,
        client_out=out,
        grace_s=config.shutdown_grace_s,
        keepalive_s=config.approvals.keepalive_s,
        # Read once Warden has started (the door starts after the switches load).
        killswitches=lambda: warden.killswitches,
        session=session[0],
        session_source=session[1],
        # A fresh id is this run's alone; one --session names may be shared.
        session_owned=session[1] == "mcp",
        trusts_failures=name in config.budgets.trusted_failures,
        withheld_env=[
            u.credential.env
            for u in config.upstreams.values()
            if u.credential is not None and u.credential.env is not None
        ],
    )
    warden = Warden(config, doors=[door], listeners=False)
    async with warden:
        tune_runtime()  # what startup built stays, and more; see warden.ops.runtime
        warden.stop_on_signals()
        await door.done.wait()
    out.close()
    return door.returncode or 0
