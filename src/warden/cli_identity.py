"""``warden identity``: make proxy keys and check agent credentials offline.

::

    warden identity new-key refunds-bot      # a key for the agent, and the config line
    warden identity hash-key < key.txt       # the SHA-256 to put in config
    warden identity check --config warden.yaml --token-file /var/run/secrets/tokens/warden

``check`` resolves a credential exactly as the proxy would (JWKS included)
and prints the proven agent id and its claims, or why it was refused.

Exit status: 0 done (or proven); 1 refused; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys

import orjson

__all__ = ["register"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
KEY_PREFIX = "wk_"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``identity new-key|hash-key|check`` to the main CLI."""
    parser = subparsers.add_parser("identity", help="agent proxy keys and credential checks")
    sub = parser.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")

    new = sub.add_parser("new-key", help="generate a proxy key for an agent")
    new.add_argument("agent", help="the agent id the key proves")
    new.set_defaults(func=_new_key)

    hashed = sub.add_parser("hash-key", help="print the SHA-256 of a key read from stdin")
    hashed.set_defaults(func=_hash_key)

    check = sub.add_parser("check", help="resolve a credential as the proxy would")
    check.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"))
    check.add_argument("--agent", help="the X-Warden-Agent value to send")
    check.add_argument("--token-file", help="a JWT to send as X-Warden-Agent-Token")
    check.add_argument(
        "--key-stdin", action="store_true", help="read a proxy key from stdin (X-Warden-Agent-Key)"
    )
    check.set_defaults(func=_check)


def _new_key(args: argparse.Namespace) -> int:
    from warden.identity import hash_key

    key = KEY_PREFIX + secrets.token_urlsafe(32)
    print(key)
    print(
        f"# give the key to the agent only; put this in the config:\n"
        f"# identity:\n#   agents:\n#     {args.agent}:\n"
        f"#       key_sha256: [{hash_key(key)}]",
        file=sys.stderr,
    )
    return EXIT_OK


def _hash_key(args: argparse.Namespace) -> int:
    from warden.identity import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("warden: no key on stdin", file=sys.stderr)
        return EXIT_USAGE
    print(hash_key(key))
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from warden.config import load_config
    from warden.errors import ConfigError, WardenError
    from warden.identity import AGENT_KEY_HEADER, AGENT_TOKEN_HEADER, Identity
    from warden.ingress.headers import AGENT_HEADER

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_USAGE
    headers: dict[str, str] = {}
    if args.agent:
        headers[AGENT_HEADER] = args.agent
    if args.key_stdin:
        headers[AGENT_KEY_HEADER] = sys.stdin.readline().strip()
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                headers[AGENT_TOKEN_HEADER] = f.read().strip()
        except OSError as exc:
            print(f"warden: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
    try:
        agent = asyncio.run(Identity(config).resolve(headers))
    except WardenError as exc:
        print(f"refused ({exc.status} {exc.code}): {exc}", file=sys.stderr)
        return EXIT_REFUSED
    out = {"agent": agent.id, "version": agent.version, "claims": dict(agent.claims)}
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK
