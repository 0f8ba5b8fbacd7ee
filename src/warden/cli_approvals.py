"""``warden approvals list|show|approve|reject``: the approvals queue from a terminal.

These talk to a running Warden's admin API like ``warden kill``: the URL is
``$WARDEN_ADMIN_URL`` (default ``http://127.0.0.1:8081``) and the bearer
token ``$WARDEN_TOKEN`` (role ``approver`` to decide; ``viewer``,
``auditor`` or ``admin`` to list)::

    warden approvals list                      # pending ones
    warden approvals list --status approved
    warden approvals show apr_0193c1f2a8b4_5f1c2e9a7d3b
    warden approvals approve apr_0193c1f2a8b4_5f1c2e9a7d3b --comment "customer confirmed"
    warden approvals reject apr_0193c1f2a8b4_5f1c2e9a7d3b --comment "duplicate refund"

Exit status: 0 done; 1 the API refused (401, 403, 404, 409, 400); 2 no
token, or the admin API cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import orjson

from warden.approvals.model import hidden_paths, rfc3339
from warden.cli_admin import _request, _run
from warden.terminal import plain

__all__ = ["main", "register"]

_STATUSES = ["pending", "approved", "rejected", "expired", "consumed", "all"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``approvals`` with its ``list``, ``show``, ``approve`` and ``reject`` commands."""
    group = subparsers.add_parser(
        "approvals",
        help="list and decide actions waiting for human approval",
        description="The approvals queue of a running Warden (its admin API).",
    )
    sub = group.add_subparsers(dest="approvals_command", required=True, metavar="COMMAND")

    listing = sub.add_parser("list", help="list approvals (pending ones by default)")
    listing.add_argument("--status", choices=_STATUSES, default="pending")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    listing.set_defaults(func=_list)

    show = sub.add_parser("show", help="show one approval with its arguments and votes")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    show.set_defaults(func=_show)

    for verb, help_text in (("approve", "approve an action"), ("reject", "reject an action")):
        cmd = sub.add_parser(verb, help=help_text)
        cmd.add_argument("id")
        cmd.add_argument("--comment", default="", help="why, for the audit log (≤ 2000 chars)")
        cmd.set_defaults(func=_decide, verb=verb)


def _json(value: Any) -> str:
    # orjson escapes only C0 controls; DEL, C1 and bidi overrides pass in UTF-8.
    return plain(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode(), keep="\n")


def _path(approval_id: str) -> str:
    return "/v1/approvals/" + urllib.parse.quote(approval_id, safe="")


def _list(args: argparse.Namespace) -> int:
    path = "/v1/approvals"
    if args.status != "all":
        path += "?" + urllib.parse.urlencode({"status": args.status})

    def show(out: Any) -> str:
        if args.json:
            return _json(out)
        rows = out.get("approvals", [])
        if not rows:
            return f"no {args.status} approvals" if args.status != "all" else "no approvals"
        return "\n".join(_line(r) for r in rows)

    return _run(lambda: _request("GET", path), show)


def _line(r: Mapping[str, Any]) -> str:
    votes = f"{r['approvals']}/{r['required_approvals']}"
    hidden = len(hidden_paths(r.get("redacted") or ()))
    return (
        f"{plain(r['id'])}  {r['status']:<8} {plain(r['agent']):<20} "
        f"{plain(r['tool'] or '-'):<20} {votes:>5}  {r['waiting_s']:>8.0f}s  "
        f"{plain(r['reason'])}{f'  [{hidden} hidden]' if hidden else ''}"
    )


def _show(args: argparse.Namespace) -> int:
    def show(out: Any) -> str:
        if args.json:
            return _json(out)
        lines = [
            f"id          {plain(out['id'])}",
            f"status      {out['status']} ({out['mode']})",
            f"agent       {plain(out['agent'])}",
            f"tool        {plain(out['tool'] or '-')}",
            # The same call to a sandbox and to production are two approvals: say which.
            f"upstream    {plain(out.get('upstream') or '-')}",
            f"method      {plain(out.get('method') or '-')}",
            f"reason      {plain(out['reason'])}",
            f"risk        {plain(out['risk'] or '-')}",
            f"approvers   {plain(', '.join(out['approvers']) or 'any approver')}",
            f"approvals   {out['approvals']}/{out['required_approvals']}",
            f"waiting     {out['waiting_s']:.0f}s",
            f"expires     {_expiry(out)}",
            f"args sha256 {out['arguments_sha256'] or '- (withheld: values are hidden)'}",
        ]
        hidden = hidden_paths(out.get("redacted") or ())
        if hidden:
            # Plainly, before the arguments: "[redacted]" in them is easy to read past,
            # and the agent chooses which keys look like credentials.
            lines.append(
                f"hidden      {len(hidden)} value(s) you cannot see; reject if you need them:"
            )
            lines += [f"              {plain(path)}" for path in hidden]
        lines.append("arguments   " + _json(out["arguments"]).replace("\n", "\n            "))
        if out.get("answers") is not None:
            lines.append("answers     " + _json(out["answers"]).replace("\n", "\n            "))
        lines += [
            f"vote        {v['verdict']} by {plain(v['by'])}"
            + (f": {plain(v['comment'])}" if v["comment"] else "")
            for v in out["votes"]
        ]
        return "\n".join(lines)

    return _run(lambda: _request("GET", _path(args.id)), show)


def _expiry(out: Mapping[str, Any]) -> str:
    """When the approval expires (UTC), and how soon while that is to come: undecided, or
    an approved grant not taken by then, it lets nothing through."""
    at = out.get("expires_at")
    if not isinstance(at, int | float):
        return "-"
    left = at - time.time()
    return f"{rfc3339(at)} (in {left:.0f}s)" if left > 0 else rfc3339(at)


def _decide(args: argparse.Namespace) -> int:
    return _run(
        lambda: _request("POST", f"{_path(args.id)}/{args.verb}", {"comment": args.comment}),
        lambda out: (
            f"{out['id']}: {out['status']} "
            f"({out['approvals']}/{out['required_approvals']} approvals)"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the commands on their own (``python -m warden.cli_approvals``)."""
    parser = argparse.ArgumentParser(prog="warden")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
