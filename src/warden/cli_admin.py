"""``warden kill|unkill|killswitches``: throw, clear and list kill switches.

These talk to a running Warden's admin API: the URL is ``$WARDEN_ADMIN_URL``
(default ``http://127.0.0.1:8081``) and the bearer token ``$WARDEN_TOKEN``
(a token whose SHA-256 is in ``admin.tokens``, with the role ``admin``)::

    warden kill agent refunds-bot --reason "paying out twice"
    warden kill global --reason "incident 4711"
    warden killswitches
    warden unkill ks_0193c1f2a8b4_5f1c2e9a7d3b

Exit status: 0 done; 1 the API refused (401, 403, 404, 400) or could not
save (503: its message says what holds; a switch thrown while the state store
is down is in force on that sidecar only); 2 no token, or the admin API
cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from warden.terminal import plain

__all__ = [
    "AdminApiError",
    "add_admin_option",
    "admin_base_url",
    "admin_request",
    "admin_token",
    "main",
    "register",
]

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
TIMEOUT_S = 10.0
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class AdminApiError(Exception):
    """The admin API answered an error (``status``), or could not be asked (``status`` 0:
    no token, a bad URL, unreachable). The message is the API's own, for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kill``, ``unkill`` and ``killswitches`` to the main CLI."""
    kill = subparsers.add_parser(
        "kill",
        help="throw a kill switch (global, or for one agent, tool or upstream)",
        description="Stop new actions at once on every sidecar sharing the state store.",
    )
    kill.add_argument("scope", choices=["global", "agent", "tool", "upstream"])
    kill.add_argument("target", nargs="?", help="the agent, tool or upstream name")
    kill.add_argument("--reason", required=True, help="why, for the audit log and the agents")
    kill.set_defaults(func=_kill)

    unkill = subparsers.add_parser("unkill", help="clear a kill switch by id")
    unkill.add_argument("id")
    unkill.add_argument("--reason", default="", help="why it is cleared, for the audit log")
    unkill.set_defaults(func=_unkill)

    listing = subparsers.add_parser("killswitches", help="list the kill switches in force")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    listing.set_defaults(func=_list)


def _kill(args: argparse.Namespace) -> int:
    if args.scope != "global" and not args.target:
        print(f"warden: kill {args.scope} needs the {args.scope}'s name", file=sys.stderr)
        return EXIT_USAGE
    body = {"scope": args.scope, "target": args.target or "*", "reason": args.reason}
    return _run(
        lambda: admin_request("POST", "/v1/killswitches", body),
        lambda out: f"{plain(out['id'])}  {out['scope']} {plain(out['target'])}: set",
    )


def _unkill(args: argparse.Namespace) -> int:
    path = "/v1/killswitches/" + urllib.parse.quote(args.id, safe="")
    if args.reason:
        path += "?" + urllib.parse.urlencode({"reason": args.reason})
    return _run(lambda: admin_request("DELETE", path), lambda out: f"{plain(out['id'])}: cleared")


def _list(args: argparse.Namespace) -> int:
    def show(out: Any) -> str:
        # Targets, reasons and names are people's text (a tool name is the agent's):
        # an escape sequence or bidi override in them must not drive the terminal.
        if args.json:  # still JSON: plain's escapes are JSON's own
            return plain(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode(), keep="\n")
        rows = out.get("killswitches", [])
        if not rows:
            return "no kill switches in force"
        return "\n".join(
            f"{plain(r['id'])}  {plain(r['scope']):<8} {plain(r['target']):<24} "
            f"by {plain(r['created_by'])}: {plain(r['reason'])}"
            for r in rows
        )

    return _run(lambda: admin_request("GET", "/v1/killswitches"), show)


def _run(call: Any, show: Any) -> int:
    try:
        out = call()
    except AdminApiError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.status == 0 else EXIT_REFUSED
    print(show(out))
    return EXIT_OK


def add_admin_option(group: Any) -> None:
    """``--admin [URL]``: record a run through a running Warden's admin API."""
    group.add_argument(
        "--admin",
        nargs="?",
        const="",
        metavar="URL",
        help="record the run through a running Warden's admin API (default: "
        f"$WARDEN_ADMIN_URL or {DEFAULT_ADMIN_URL}; token: $WARDEN_TOKEN)",
    )


def admin_base_url(url: str | None = None) -> str:
    """The admin API's base URL: ``url``, else ``$WARDEN_ADMIN_URL``, else the default."""
    return (url or os.environ.get("WARDEN_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The token goes to the admin URL given and nowhere else: urllib would resend it
    to wherever a redirect points, another host included."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


# No proxy either: an operator's http_proxy is for other traffic, and the token
# would go to it in clear text (the default admin URL is plain HTTP on loopback).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def admin_request(method: str, path: str, body: Any = None, *, base_url: str | None = None) -> Any:
    """Call a running Warden's admin API with ``$WARDEN_TOKEN``; return the decoded answer.

    ``base_url`` as :func:`admin_base_url` resolves it. Raises
    :class:`AdminApiError` on an error answer, or (status 0) when there is no
    token or the API cannot be reached.
    """
    token = admin_token()
    base = admin_base_url(base_url)
    try:
        scheme = urllib.parse.urlsplit(base).scheme
    except ValueError as exc:  # "http://[::1": Invalid IPv6 URL
        raise AdminApiError(0, f"the admin URL {base!r} is not a URL: {exc}") from None
    if scheme not in ("http", "https"):
        raise AdminApiError(0, f"the admin URL must be an http:// or https:// URL, not {base!r}")
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with _OPENER.open(req, timeout=TIMEOUT_S) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            where = exc.headers.get("Location", "elsewhere")
            raise AdminApiError(
                exc.code,
                f"{exc.code}: the admin API at {base} redirects to {where}; the token is not "
                "sent after a redirect: set WARDEN_ADMIN_URL (or --admin) to the final URL",
            ) from None
        raise AdminApiError(exc.code, f"{exc.code}: {_message(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminApiError(0, f"cannot reach the admin API at {base}: {reason}") from None
    except ValueError:
        # http.client's message may quote the header it refused (the token): not shown.
        raise AdminApiError(
            0, f"cannot send a request to the admin API at {base}: the URL or a header is malformed"
        ) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AdminApiError(0, f"the admin API at {base} did not answer JSON") from None


def admin_token() -> str:
    """``$WARDEN_TOKEN`` without surrounding blanks (a pasted token ends in a newline).

    Raises :class:`AdminApiError` (status 0) when it is unset, or holds a character
    a header cannot carry; the message never shows the value.
    """
    token = os.environ.get("WARDEN_TOKEN", "").strip()
    if not token:
        raise AdminApiError(0, "set WARDEN_TOKEN to an admin API token")
    if not (token.isascii() and token.isprintable()):
        raise AdminApiError(
            0,
            "WARDEN_TOKEN holds a control or non-ASCII character (its value is not shown); "
            "set it to the token alone",
        )
    return token


_request = admin_request  # the name warden.cli_approvals imports


def _message(raw: bytes) -> str:
    try:
        return str(orjson.loads(raw)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:200]


def main(argv: list[str] | None = None) -> int:
    """Run the commands on their own (``python -m warden.cli_admin``)."""
    parser = argparse.ArgumentParser(prog="warden")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
