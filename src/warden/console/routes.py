"""The console's routes: sign-in, the five views, their actions and two JSON feeds.

Mounted at ``/console/`` on the admin listener (:func:`console_app`). Every
response carries a strict Content-Security-Policy and is never cached. Every
state-changing request (POST) must carry the session's CSRF token, and a
request whose ``Origin`` is another site is refused before that. Each view
and each action checks the signed-in person's roles itself, with the same
roles the admin API demands for the same action.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import functools
import re
import secrets
import shutil
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from warden.approvals.model import MAX_COMMENT, ApprovalError
from warden.approvals.store import STORE_ERRORS, PageKey, page_key
from warden.audit.export import ExportError, Selection, export_log, parse_time
from warden.audit.index import MAX_PAGE, IndexQuery, IndexUnavailable
from warden.budgets.guard import CapSpend
from warden.console import views
from warden.console.app import CONSOLE, Console, RecordUnreadable
from warden.console.html import Html
from warden.console.proofs import ProofError
from warden.console.risk import drift_section
from warden.console.sessions import Session, same_token
from warden.console.sso import sso_principal, sso_speaks
from warden.errors import AuditError
from warden.killswitch import (
    MAX_REASON,
    MAX_TARGET,
    KillSwitch,
    KillSwitchNotSaved,
    Scope,
    target_problem,
)
from warden.model import ActionKind
from warden.terminal import plain

__all__ = ["COOKIE", "CSP", "LOGIN_COOKIE", "console_app"]

COOKIE = "warden_console"
LOGIN_COOKIE = "warden_console_login"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send Origin: null
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_OPEN = frozenset({"/login", "/static/console.css", "/static/console.js"})
_SINCE_S = {"15m": 900.0, "1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
_DONE = {
    "approved": "Your approval is recorded.",
    "rejected": "Your rejection is recorded; the agent is told why.",
    "switch-set": "The kill switch is in force.",
    "switch-cleared": "The kill switch is cleared.",
    "erased": "The subject's key is destroyed, and their rows in the state store are erased.",
    "erase-none": "No key for this subject in the log; their rows in the state store are erased.",
    "erase-pending": "The subject's key is destroyed (if there was one), but the state store "
    "could not be reached: Warden erases the subject there at its next checkpoint.",
}
SESSION_KEY = web.RequestKey("console_session", Session)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ViewHandler = Callable[[web.Request, Console, Session], Awaitable[web.StreamResponse]]


def _html(body: Html, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _api_error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _refuse(
    request: web.Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    title: str | None = None,
    hint: Html | None = None,
) -> web.Response:
    session = request.get(SESSION_KEY)
    if request.path.startswith("/console/api/"):
        return _api_error(status, code or ("forbidden" if status == 403 else "refused"), message)
    return _html(
        views.error_view(
            status,
            message,
            session.principal if session else None,
            session.csrf if session else None,
            title=title,
            hint=hint,
        ),
        status,
    )


def _unreadable(request: web.Request, exc: RecordUnreadable) -> web.Response:
    """A record the log holds but cannot give back: damage or an unreadable log, said as
    such (a 404 would make tampering look like a record that never was)."""
    what = "damaged" if exc.damaged else "unreadable"
    return _refuse(
        request,
        exc.status,
        f"The audit log is {what} at record #{exc.seq}: {exc.detail}.",
        code="log_damaged" if exc.damaged else "log_unreadable",
        title=f"The audit log is {what}",
        hint=views.verify_hint(exc.damaged),
    )


def _local(request: web.Request) -> str:
    """The request path below ``/console``."""
    return request.path.removeprefix("/console") or "/"


def _public_url(request: web.Request) -> str | None:
    url: str | None = request.app[CONSOLE].config.console.public_url
    return url


def _same_origin(request: web.Request) -> bool:
    # Browsers send Origin on every POST; a client without one still needs the CSRF token.
    origin = request.headers.get("Origin")
    expected = _public_url(request) or f"{request.scheme}://{request.host}"
    return origin is None or origin == expected


def _cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, ttl: float
) -> None:
    public = _public_url(request)
    response.set_cookie(
        name,
        value,
        max_age=int(ttl),
        path="/console/",
        httponly=True,
        samesite="Strict",
        # Behind a TLS proxy Warden itself is reached over plain HTTP.
        secure=request.secure or (public is not None and public.startswith("https:")),
    )


# -- middlewares -------------------------------------------------------------------------


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer, redirects and errors included."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update({k: v for k, v in _SECURITY_HEADERS.items() if k not in exc.headers})
        raise
    except IndexUnavailable as exc:
        # The index is a cache on the fleet's database: a page, not a crash, while it is down.
        response = _refuse(request, 503, f"the decision index is unavailable right now ({exc})")
    except RecordUnreadable as exc:
        response = _unreadable(request, exc)
    for key, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def _session_of(request: web.Request, console: Console) -> tuple[Session | None, str | None]:
    """The request's session, and the id of one created for it (to set as the cookie)."""
    cookie = request.cookies.get(COOKIE)
    session = console.sessions.get(cookie)
    sso_config = console.config.console.sso
    if not sso_speaks(sso_config, request.remote, request.headers):
        # A session the auth proxy made holds only while the proxy vouches for its
        # person: reached around the proxy, a demoted or removed person's cookie
        # would keep the old roles for the session's life.
        return (None if session is not None and session.via == "sso" else session), None
    # Behind the auth proxy, the person it names is who is signed in: a demoted
    # person, or another one at the same browser, does not carry on in the
    # cookie's session.
    sso = sso_principal(sso_config, request.remote, request.headers)
    if sso is None:
        console.sessions.drop(cookie)
        return None, None
    if session is not None and session.principal == sso:
        return session, None
    # The proxy names this person with other roles now: their other proxy-made
    # sessions (other browsers) end too.
    console.sessions.drop_sso(sso.subject, keep=sso)
    new_id, session = console.sessions.create(sso, via="sso")
    return session, new_id


_LOST = (
    (re.compile(r"/approvals/[^/]+/decide"), "vote"),
    (re.compile(r"/operations/killswitches"), "switch"),
    (re.compile(r"/operations/killswitches/[^/]+/clear"), "clear"),
    (re.compile(r"/evidence/export"), "export"),
    (re.compile(r"/evidence/erase"), "erase"),
)
"""What a form posted without a session would have done, by its path (the sign-in
form says that it was not)."""
_RETURN = re.compile(r"/console/(?:decisions|approvals|evidence|model-risk|operations)")
"""Where the sign-in form may send someone back to: a view, never another site or path."""


def _wants_page(request: web.Request) -> bool:
    """Whether a browser navigates (a form it submits), rather than a script calling."""
    if request.headers.get("Sec-Fetch-Mode") == "navigate":
        return True
    return "text/html" in request.headers.get("Accept", "")


def _sign_in_again(request: web.Request) -> str:
    """The sign-in form's address for a form posted without a session."""
    local = _local(request)
    if local == "/logout":
        return "/console/login"
    back = "/console/" + local.strip("/").split("/", 1)[0]
    query = {"next": back} if _RETURN.fullmatch(back) else {}
    lost = next((what for path, what in _LOST if path.fullmatch(local)), "form")
    return "/console/login?" + urllib.parse.urlencode({**query, "lost": lost})


def _signed_out(request: web.Request) -> web.Response:
    """The answer to a request without a session: the sign-in form for a page, else 401."""
    if request.method == "GET" and not _local(request).startswith("/api/"):
        raise web.HTTPSeeOther(location="/console/login")
    if request.method == "POST" and _wants_page(request):
        # A form sent after the session ended (a vote typed over a long read): back to
        # the sign-in form, which says nothing was done and leads back to the view.
        raise web.HTTPSeeOther(location=_sign_in_again(request))
    return _refuse(request, 401, "sign in first")


def _return_to(value: object) -> str | None:
    """A sign-in form's ``next``, when it names one of the views."""
    return value if isinstance(value, str) and _RETURN.fullmatch(value) else None


FORM_MAX_BYTES = 64 * 1024
"""A console form's largest body (a sub-app's ``client_max_size`` is not applied:
the admin app's 1 MiB was)."""


async def _read_form(request: web.Request) -> web.Response | None:
    """Read a POST's form once (handlers get it again from aiohttp's cache), or the
    error page: a body without a length or over :data:`FORM_MAX_BYTES`, or one
    that cannot be decoded (a ``Content-Encoding`` it does not have, broken
    multipart, an unknown charset), is refused before anything reads it."""
    length = request.content_length
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        # Browsers never compress forms; the bound below would count compressed bytes.
        return _refuse(request, 415, "a form must not be sent compressed")
    if length is None:
        return _refuse(request, 411, "a form must be sent with its Content-Length")
    if length > FORM_MAX_BYTES:
        return _refuse(request, 413, f"a form may be at most {FORM_MAX_BYTES // 1024} KiB")
    try:
        await request.post()
    except (web.RequestPayloadError, ValueError, LookupError, AssertionError):
        return _refuse(request, 400, "the form could not be read as sent")
    return None


@web.middleware
async def _signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the session (cookie, or a trusted auth proxy) and check CSRF on every POST."""
    console = request.app[CONSOLE]
    if request.method == "POST":
        unread = await _read_form(request)
        if unread is not None:
            return unread
    if _local(request) in _OPEN:
        if request.method == "POST" and not _same_origin(request):
            return _refuse(request, 403, "a cross-site request was refused")
        return await handler(request)
    session, new_id = _session_of(request, console)
    if session is None:
        return _signed_out(request)
    request[SESSION_KEY] = session
    if request.method not in ("GET", "HEAD"):
        if not _same_origin(request):
            return _refuse(request, 403, "a cross-site request was refused")
        form = await request.post()
        given = form.get("csrf")
        if not isinstance(given, str) or not same_token(session.csrf, given):
            return _refuse(
                request, 403, "the form's CSRF token is missing or wrong; reload the page"
            )
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if new_id is not None:
            _cookie(exc, request, COOKIE, new_id, console.sessions.ttl_s)
        raise
    if new_id is not None:
        _cookie(response, request, COOKIE, new_id, console.sessions.ttl_s)
    return response


def _view(slug: str) -> Callable[[ViewHandler], Handler]:
    """A route of the view ``slug``, reachable only by that view's roles."""
    view = next(v for v in views.VIEWS if v.slug == slug)

    def wrap(handler: ViewHandler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            session = request[SESSION_KEY]
            if not view.roles & session.principal.roles:
                return _refuse(
                    request,
                    403,
                    f"the {view.title} view needs the role {' or '.join(sorted(view.roles))}",
                )
            return await handler(request, request.app[CONSOLE], session)

        return guarded

    return wrap


def _requires(session: Session, *roles: str) -> bool:
    return bool(session.principal.roles & set(roles))


def _page(session: Session, title: str, body: Html, active: str, status: int = 200) -> web.Response:
    return _html(
        views.page(title, body, who=session.principal, csrf=session.csrf, active=active), status
    )


def _notice(request: web.Request) -> str:
    return _DONE.get(request.query.get("done", ""), "")


# -- sign-in ----------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.StreamResponse:
    """The sign-in page, with a fresh login nonce in a cookie and the form."""
    console = request.app[CONSOLE]
    nonce = secrets.token_urlsafe(24)
    response = _html(
        views.login_view(
            nonce,
            views.LOST.get(request.query.get("lost", ""), ""),
            sso=console.config.console.sso is not None,
            back=_return_to(request.query.get("next")),
        )
    )
    _cookie(response, request, LOGIN_COOKIE, nonce, 600)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """Sign in with an admin token; on success a session cookie, then the first view."""
    console = request.app[CONSOLE]
    form = await request.post()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    given_nonce = form.get("nonce")
    token = form.get("token")
    back = _return_to(form.get("next"))
    fresh = secrets.token_urlsafe(24)

    def again(message: str, status: int) -> web.Response:
        response = _html(views.login_view(fresh, message, back=back), status)
        _cookie(response, request, LOGIN_COOKIE, fresh, 600)
        return response

    if not nonce or not isinstance(given_nonce, str) or not same_token(nonce, given_nonce):
        return again("The sign-in form expired; please sign in again.", 403)
    if not isinstance(token, str) or not token.strip() or len(token) > 4096:
        return again("Enter your token.", 400)
    who = console.auth.authenticate(f"Bearer {token.strip()}")
    if who is None:
        return again("That token is not valid.", 401)
    session_id, _ = console.sessions.create(who)
    response = web.HTTPSeeOther(location=back or "/console/")
    _cookie(response, request, COOKIE, session_id, console.sessions.ttl_s)
    response.del_cookie(LOGIN_COOKIE, path="/console/")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    """Forget the session and its cookie."""
    request.app[CONSOLE].sessions.drop(request.cookies.get(COOKIE))
    response = web.HTTPSeeOther(location="/console/login")
    response.del_cookie(COOKIE, path="/console/")
    raise response


async def home(request: web.Request) -> web.StreamResponse:
    """The first view the signed-in person may open."""
    session = request[SESSION_KEY]
    allowed = views.allowed_views(session.principal)
    if not allowed:
        return _refuse(request, 403, "your roles open no view of the console")
    raise web.HTTPSeeOther(location=f"/console/{allowed[0].slug}")


async def static(request: web.Request) -> web.StreamResponse:
    """The console's stylesheet and script, shipped in the package."""
    name = request.match_info["name"]
    kind = _STATIC.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    data = resources.files("warden").joinpath("data", "console", name).read_bytes()
    return web.Response(body=data, content_type=kind, charset="utf-8")


# -- Decisions --------------------------------------------------------------------------


def _query(
    params: MultiMapping[str], kinds: tuple[str, ...] = ("decision",)
) -> tuple[IndexQuery, str]:
    since = params.get("since", "24h")
    if since not in _SINCE_S and since != "all":
        since = "24h"
    start = None
    if since in _SINCE_S:
        start = _rfc3339(time.time() - _SINCE_S[since])
    before = _cursor(params.get("before", ""))

    def text(name: str) -> str | None:
        value = (params.get(name) or "").strip()
        return value[:256] or None

    q = IndexQuery(
        kinds=kinds,
        agent=text("agent"),
        tool=text("tool"),
        effect=text("effect"),
        mode=text("mode"),
        start=start,
        before=before,
        limit=50,
    )
    return q, since


def _cursor(raw: str) -> int | None:
    """A paging cursor (a sequence number), or ``None`` when it is not one."""
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else None


def _rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _query_string(params: MultiMapping[str]) -> str:
    keep = [(k, params[k]) for k in ("agent", "tool", "effect", "mode", "since") if params.get(k)]
    return urllib.parse.urlencode(keep)


@_view("decisions")
async def decisions(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """Charts, filters and the table of decisions."""
    await console.refresh()
    q, since = _query(request.query)
    index = console.index
    now = time.time()
    if since in _SINCE_S:
        start = now - _SINCE_S[since]
    else:
        first = await asyncio.to_thread(index.first_time)
        start = first if first is not None else now - 3600
    page_, buckets, agents, tools = await asyncio.gather(
        asyncio.to_thread(index.search, q),
        asyncio.to_thread(index.series, q, start, now + 1, 24),
        asyncio.to_thread(index.distinct, "agent"),
        asyncio.to_thread(index.distinct, "tool"),
    )
    body = views.decisions_view(
        page_,
        q=q,
        since=since,
        buckets=buckets,
        facets={"agent": agents, "tool": tools},
        query_string=_query_string(request.query),
    )
    return _page(session, "Decisions", body, "decisions")


@_view("decisions")
async def decisions_feed(request: web.Request, console: Console, _: Session) -> web.StreamResponse:
    """The decisions table as JSON, for live updates.

    Its texts are as the page shows them (:func:`warden.terminal.plain`): the
    page's script writes them into the table as they come, and an agent's
    bidi override in a tool name or reason would reorder the row it is in.
    """
    await console.refresh()
    q, _since = _query(request.query)
    found = await asyncio.to_thread(console.index.search, q)
    rows = [
        {k: plain(v) if isinstance(v, str) else v for k, v in r.to_json().items()}
        for r in found.rows
    ]
    return _json({"rows": rows, "next_before": found.next_before})


def _seq(request: web.Request) -> int | None:
    raw = request.match_info.get("seq", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else None


APPROVAL_KINDS = (
    "approval_requested",
    "approval_notified",
    "approval_decided",
    "approval_deferred",
    "approval_expired",
    "approval_cancelled",
    "approval_executed",
)
"""The records of an approval's life, each naming the decision that asked for it."""
_ENDED = frozenset(
    {"approval_decided", "approval_expired", "approval_cancelled", "approval_executed"}
)
"""Approval records after the last of which the follow-up decision is written."""
FOLLOW_UP_WINDOW = 1000
"""Records after an approval's last such record searched for its follow-up decision:
Warden writes it at once (the same task), so it is among the first."""
_FOLLOW_UP_READS = 50
"""Candidate follow-ups read back from the log at most, per approval."""


async def _linked(
    console: Console,
    q: IndexQuery,
    keep: Callable[[dict[str, Any]], bool],
    unreadable: list[int],
) -> list[tuple[int, dict[str, Any]]]:
    """The records the index finds for ``q`` that, read from the log, pass ``keep``;
    oldest first. The index is a cache: the log's own record says what it links to."""
    page_ = await asyncio.to_thread(console.index.search, q)
    out: list[tuple[int, dict[str, Any]]] = []
    for row in reversed(page_.rows):
        try:
            got = await console.record(row.seq)
        except RecordUnreadable:
            unreadable.append(row.seq)
            continue
        if got is not None and keep(got[1]):
            out.append((row.seq, got[1]))
    return out


def _field_of(record: dict[str, Any], section: str, name: str) -> Any:
    value = record.get(section)
    return value.get(name) if isinstance(value, dict) else None


def _follows(approval_id: str, held_id: str, record: dict[str, Any]) -> bool:
    """Whether ``record`` is a decision made under ``approval_id`` (not the held one)."""
    return bool(
        _field_of(record, "approval", "id") == approval_id
        and _field_of(record, "decision", "id") != held_id
    )


async def _follow_up(
    console: Console, approval_id: str, held_id: str, ended: int, unreadable: list[int]
) -> tuple[int, dict[str, Any]] | None:
    """The decision made under ``approval_id`` once it ended (its last record: ``ended``).

    Not a search of reasons, where an agent can write any id (a tool named after it):
    the approval guard's decisions written just after ``ended``, oldest first, each
    read back from the log and kept only if it carries this approval."""
    found: list[int] = []
    before: int | None = ended + FOLLOW_UP_WINDOW + 1
    while before is not None:
        q = IndexQuery(
            kinds=("decision",), guard="approval", after=ended, before=before, limit=MAX_PAGE
        )
        page_ = await asyncio.to_thread(console.index.search, q)
        found += [row.seq for row in page_.rows]
        before = page_.next_before
    for seq in sorted(found)[:_FOLLOW_UP_READS]:
        try:
            got = await console.record(seq)
        except RecordUnreadable:
            unreadable.append(seq)
            continue
        if got is not None and _follows(approval_id, held_id, got[1]):
            return seq, got[1]
    return None


@_view("decisions")
async def decision(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """One decision with its reason, policy revision, redacted arguments, approval records,
    follow-up decision and outcome."""
    seq = _seq(request)
    found = await console.record(seq) if seq is not None else None
    if found is None or found[1].get("kind") != "decision":
        return _refuse(request, 404, "no such decision")
    record = found[1]
    decision_id = str(_field_of(record, "decision", "id") or "")
    outcomes: list[tuple[int, dict[str, Any]]] = []
    approvals: list[tuple[int, dict[str, Any]]] = []
    follow_ups: list[tuple[int, dict[str, Any]]] = []
    unreadable: list[int] = []
    if decision_id:
        await console.refresh()
        # By the id exactly, never by text: reasons quote what agents send.
        outcomes = await _linked(
            console,
            IndexQuery(kinds=("outcome",), decision_id=decision_id, limit=5),
            lambda r: r.get("decision_id") == decision_id,
            unreadable,
        )
        approvals = await _linked(
            console,
            IndexQuery(kinds=APPROVAL_KINDS, decision_id=decision_id, limit=50),
            lambda r: _field_of(r, "body", "decision_id") == decision_id,
            unreadable,
        )
        # Each approval's follow-up is the decision written once it ended, carrying it.
        ended: dict[str, int] = {}
        for at, r in approvals:
            approval_id = _field_of(r, "body", "approval_id")
            if isinstance(approval_id, str) and approval_id and r.get("kind") in _ENDED:
                ended[approval_id] = at  # oldest first: the last one stays
        for approval_id, at in list(ended.items())[:5]:
            follow_up = await _follow_up(console, approval_id, decision_id, at, unreadable)
            if follow_up is not None:
                follow_ups.append(follow_up)
    body = views.decision_detail(
        record,
        [r for _, r in outcomes],
        approvals=approvals,
        follow_ups=follow_ups,
        unreadable=unreadable,
    )
    return _page(session, f"Decision {decision_id}", body, "decisions")


_DECISION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@_view("decisions")
async def decision_by_id(request: web.Request, console: Console, _: Session) -> web.StreamResponse:
    """A decision's page found by its id (the Approvals cards link here)."""
    decision_id = request.match_info["id"]
    if _DECISION_ID.fullmatch(decision_id) is None:
        return _refuse(request, 404, "no such decision")
    await console.refresh()
    # The decision id exactly: a search of text would also match reasons an agent wrote.
    found = await asyncio.to_thread(
        console.index.search, IndexQuery(kinds=("decision",), decision_id=decision_id, limit=5)
    )
    for row in found.rows:
        if row.decision_id == decision_id:
            raise web.HTTPSeeOther(location=f"/console/decisions/{row.seq}")
    return _refuse(request, 404, f"no decision {decision_id} is in this Warden's log")


# -- Approvals --------------------------------------------------------------------------


APPROVALS_PAGE = 20
"""Pending approvals one page of the Approvals view shows."""
HISTORY_PAGE = 50
"""Approvals past pending one page of its history shows."""
_STORE_DOWN = "the approval store is unavailable; try again shortly"
_AFTER = re.compile(r"(\d{1,12}(?:\.\d{1,20})?)~([A-Za-z0-9_-]{1,64})")
"""``?after=``: where the previous page ended, ``<time>~<approval id>`` (:func:`_after`)."""


@_view("approvals")
async def approvals(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """The queue a page at a time, oldest first; the history (``?show=history``) on its own
    pages, last decided first. A view reads one page from the store, never all of it.

    The next page starts after the last approval shown (``?after=``), not at a count:
    approvals decided while someone pages move no pending one past the pages read."""
    history = request.query.get("show") == "history"
    after = _page_after(request.query.get("after"))
    size = HISTORY_PAGE if history else APPROVALS_PAGE
    try:
        found = await console.approvals.page(pending=not history, limit=size + 1, after=after)
        waiting = await console.approvals.pending_count()
    except STORE_ERRORS:
        return _refuse(request, 503, _STORE_DOWN)
    shown = found[:size]
    more = len(found) > size
    body = views.approvals_view(
        shown,
        session.csrf,
        session.principal,
        _notice(request),
        history=history,
        waiting=waiting,
        first=after is None,
        next_after=_after(page_key(shown[-1], pending=not history)) if more else None,
    )
    return _page(session, "Approvals", body, "approvals")


def _after(key: PageKey) -> str:
    """The ``?after=`` of the page after the approval whose :func:`page_key` is ``key``."""
    return f"{key[0]!r}~{key[1]}"


def _page_after(given: str | None) -> PageKey | None:
    """``?after=`` read back; ``None`` (the first page) when it is no such value."""
    found = _AFTER.fullmatch(given) if given is not None and len(given) <= 100 else None
    if found is None:
        return None
    at = float(found[1])
    if at > time.time() + 60:
        return None  # past anything stored: a link that would show an empty queue
    return at, found[2]


@_view("approvals")
async def decide(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """Approve or reject with a comment: the API's rules (role, separation of duties, quorum)."""
    if not _requires(session, "approver"):
        return _refuse(request, 403, "approving needs the role approver")
    form = await request.post()
    verdict = form.get("verdict")
    comment = form.get("comment", "")
    if verdict not in ("approve", "reject") or not isinstance(comment, str):
        return _refuse(request, 400, "choose Approve or Reject")
    if len(comment) > MAX_COMMENT:
        return _refuse(request, 400, f"a comment has at most {MAX_COMMENT} characters")
    approval_id = request.match_info["id"]
    try:
        await console.approvals.decide(
            approval_id, session.principal, verdict == "approve", comment.strip()
        )
    except ApprovalError as exc:
        return _refuse(request, exc.status, str(exc))
    except AuditError as exc:
        return _refuse(request, 503, f"the decision is stored but not recorded: {exc}")
    except STORE_ERRORS:
        return _refuse(request, 503, _STORE_DOWN)
    done = "approved" if verdict == "approve" else "rejected"
    raise web.HTTPSeeOther(location=f"/console/approvals?done={done}")


# -- Evidence ---------------------------------------------------------------------------


@_view("evidence")
async def evidence(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """Search records; the evidence-package and erasure forms."""
    params = request.query
    kind = params.get("kind", "")
    searched = any(params.get(k) for k in ("q", "kind", "agent", "tool"))
    text = (params.get("q") or "").strip()[:256] or None
    q = IndexQuery(
        kinds=(kind,) if kind else (),
        agent=(params.get("agent") or "").strip()[:256] or None,
        tool=(params.get("tool") or "").strip()[:256] or None,
        text=text,
        before=_cursor(params.get("before", "")),
        limit=50,
    )
    results = None
    if searched:
        await console.refresh()
        results = await asyncio.to_thread(console.index.search, q)
    body = views.evidence_view(
        q, kind, results, csrf=session.csrf, who=session.principal, message=_notice(request)
    )
    return _page(session, "Evidence", body, "evidence")


@_view("evidence")
async def record_page(
    request: web.Request, console: Console, session: Session
) -> web.StreamResponse:
    """One record as stored, with its inclusion proof checked in the page."""
    seq = _seq(request)
    found = await console.record(seq) if seq is not None else None
    if seq is None or found is None:
        return _refuse(request, 404, "no such record")
    body = views.record_view(views.pretty(found[1]), seq)
    return _page(session, f"Record {found[1].get('id', seq)}", body, "evidence")


@_view("evidence")
async def proof(request: web.Request, console: Console, _: Session) -> web.StreamResponse:
    """The proof of one record, for the page's script to verify."""
    seq = _seq(request)
    if seq is None or seq >= console.audit.size:
        return _api_error(404, "not_found", "no such record")
    latest = await asyncio.to_thread(console.proofs.latest_checkpoint_size)
    if latest <= seq:
        try:
            # Sign a checkpoint now rather than make the auditor wait for the next one.
            await console.audit.checkpoint()
        except AuditError as exc:
            return _api_error(503, exc.code, str(exc))
    try:
        found = await asyncio.to_thread(console.proofs.prove, seq, console.audit.size)
    except ProofError as exc:
        return _api_error(409, "no_proof", str(exc))
    return _json(found.to_json())


def _zip_dir(folder: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder.parent))


def _day(given: str, parsed: str) -> str:
    """The day a period's end names: the date given (its last day, included), not the
    instant it ends at (the next day's midnight), which would name the file a day late."""
    return dt.date.fromisoformat(given).isoformat() if len(given) == 10 else parsed[:10]


@_view("evidence")
async def export(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """An evidence package for a date range, as a zip download."""
    form = await request.post()
    given = {k: str(form.get(k, "")).strip() for k in ("from", "to", "export_agent")}
    try:
        start = parse_time(given["from"])
        end = parse_time(given["to"], end=True)
    except ExportError as exc:
        return _refuse(request, 400, str(exc))
    agent = given["export_agent"][:256] or None
    if console.exporting.locked():
        return _refuse(
            request, 429, "an evidence package is being built already; try again when it is done"
        )
    name = f"evidence-{start[:10]}-{_day(given['to'], end)}"
    empty_ok = form.get("empty") == "ok"
    work = await _work_folder()
    try:
        async with console.exporting:  # built one at a time; sent at the reader's pace
            built = await _export(
                request, console, start, end, work, agent=agent, name=name, empty_ok=empty_ok
            )
        if isinstance(built, web.StreamResponse):
            return built
        if built is None:
            # Not a zip of nothing without a word: the dates or the agent may be wrong.
            body = views.evidence_view(
                IndexQuery(kinds=()),
                "",
                None,
                csrf=session.csrf,
                who=session.principal,
                empty=given,
            )
            return _page(session, "Evidence", body, "evidence")
        return await _send_zip(request, built, f"{name}.zip")
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _work_folder() -> Path:
    """Where a package is built: the system's temporary folder, never the audit log's
    volume (a package about twice the log's size filled it, the log's next write failed,
    and Warden refused every action until restarted). Its size is the chart's
    ``tmpVolume``; a package that does not fit is answered 507."""
    return Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="warden-evidence-"))


async def _send_zip(request: web.Request, archive: Path, filename: str) -> web.StreamResponse:
    """``archive`` streamed from its file, a MiB at a time: a package may be larger than
    the memory the pod has to spare."""
    response = web.StreamResponse(
        headers={
            **_SECURITY_HEADERS,  # sent with the headers, before any middleware sees it
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
    )
    response.content_length = (await asyncio.to_thread(archive.stat)).st_size
    await response.prepare(request)
    with archive.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, 1 << 20):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _export(
    request: web.Request,
    console: Console,
    start: str,
    end: str,
    work: Path,
    *,
    agent: str | None,
    name: str,
    empty_ok: bool = False,
) -> Path | web.StreamResponse | None:
    """The zipped package, built in ``work``; ``None`` when it would hold no records
    (unless ``empty_ok``); an error page when it cannot be built."""
    try:
        # Cover everything written so far, signed now: a period running to today's end
        # is then declared (and provable) up to this moment.
        await console.audit.checkpoint(refresh=True)
    except AuditError as exc:
        return _refuse(request, 503, str(exc))
    out = work / name
    try:
        result = await asyncio.to_thread(
            export_log,
            console.audit.directory,
            out,
            selection=Selection(start=start, end=end, agent=agent),
            fmt="evidence",
        )
        if result.records == 0 and not empty_ok:
            return None
        archive = work / f"{name}.zip"
        await asyncio.to_thread(_zip_dir, out, archive)
    except ExportError as exc:
        return _refuse(request, 409, str(exc))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return _refuse(
            request,
            507,
            f"no room to build the evidence package in {work.parent}: a package takes about "
            "twice the period's log; export a shorter period, or give the temporary folder "
            "more room (the Helm chart's tmpVolume)",
        )
    return archive


@_view("evidence")
async def erase(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """Erase a data subject: key and state store (admins only, as the CLI's erasure)."""
    if not _requires(session, "admin"):
        return _refuse(request, 403, "erasure needs the role admin")
    form = await request.post()
    subject = str(form.get("subject", "")).strip()
    if not subject or len(subject) > 256:
        return _refuse(request, 400, "name the subject (a customer id)")
    try:
        erasure = await console.audit.erase(subject)
    except AuditError as exc:
        return _refuse(request, 503, str(exc))
    done = "erased" if erasure.key_destroyed else "erase-none"
    raise web.HTTPSeeOther(
        location=f"/console/evidence?done={'erase-pending' if erasure.state is None else done}"
    )


# -- Model risk -------------------------------------------------------------------------


@_view("model-risk")
async def model_risk(
    request: web.Request, console: Console, session: Session
) -> web.StreamResponse:
    """Drift and quality per agent, policy revisions."""
    await console.refresh()
    revisions = await asyncio.to_thread(console.index.revisions)
    drift = await drift_section(console.audit.directory, console.audit.size)
    view = views.model_risk_view(revisions, drift, console.challenger())
    return _page(session, "Model risk", view, "model-risk")


# -- Operations -------------------------------------------------------------------------


def _caps(console: Console) -> list[dict[str, Any]]:
    budgets = console.config.budgets
    out: list[dict[str, Any]] = []
    if budgets.llm is not None and budgets.llm.limit_usd is not None:
        llm = budgets.llm
        out.append(
            {
                "name": "llm",
                "scope": f"model calls per {llm.per}",
                "window": llm.window,
                "limit": f"{llm.limit_usd} USD",
                "over": llm.over,
            }
        )
    for cap in budgets.caps:
        out.append(
            {
                "name": cap.name,
                "scope": f"{cap.tool}.{cap.value} per {', '.join(cap.per)}",
                "window": cap.window,
                "limit": f"{cap.limit} {cap.currency}",
                "over": cap.over,
            }
        )
    return out


_KINDS = frozenset(k.value for k in ActionKind)
"""Action kinds: what the index shows as a "tool" for actions that name none (model calls)."""


DOOR_UPSTREAMS = ("grpc", "envoy")
"""The upstreams the doors name themselves, never configured: the gRPC governance API's
checks (``grpc``, ``warden kill upstream grpc`` in docs/grpc.md) and Envoy's ext_authz
without ``ext_authz.upstream`` (``envoy``). The transparent door and Envoy's ext_proc
name configured upstreams only."""


def _configured(console: Console) -> dict[Scope, list[str]]:
    """The agents, tools and upstreams this Warden's configuration names (the doors'
    own upstreams when its gRPC listener serves them)."""
    cfg = console.config
    agents = [cfg.agent.id, *cfg.agents, *cfg.identity.agents]
    if cfg.identity.jwt is not None:
        agents += list(cfg.identity.jwt.agents.values())
    tools = [*cfg.tools, *(r.tool for u in cfg.upstreams.values() for r in u.routes)]
    upstreams = list(cfg.upstreams)
    if cfg.listen.grpc is not None:
        upstreams.append(DOOR_UPSTREAMS[0])
        if cfg.ext_authz.upstream is None:
            upstreams.append(DOOR_UPSTREAMS[1])
    return {
        Scope.AGENT: list(dict.fromkeys(agents)),
        Scope.TOOL: list(dict.fromkeys(tools)),
        Scope.UPSTREAM: list(dict.fromkeys(upstreams)),
    }


async def _known_targets(console: Console) -> dict[Scope, list[str]]:
    """What a switch's Target field suggests: configured names, then those seen in decisions."""
    known = _configured(console)
    try:
        await console.refresh()
        seen_agents, seen_tools = await asyncio.gather(
            asyncio.to_thread(console.index.distinct, "agent"),
            asyncio.to_thread(console.index.distinct, "tool"),
        )
    except IndexUnavailable:
        return known  # the switches still work without the index's suggestions
    known[Scope.AGENT] = list(dict.fromkeys([*known[Scope.AGENT], *seen_agents]))
    tools = [t for t in seen_tools if t not in _KINDS]
    known[Scope.TOOL] = list(dict.fromkeys([*known[Scope.TOOL], *tools]))
    return known


async def _unseen(console: Console, switches: Sequence[KillSwitch]) -> set[str]:
    """The ids of the switches whose target this Warden neither has configured nor has
    seen in a decision: in force, and stopping nothing here until such a one appears."""
    configured = _configured(console)
    out: set[str] = set()
    for s in switches:
        if s.scope is Scope.GLOBAL or s.target in configured.get(s.scope, ()):
            continue
        if s.scope is Scope.UPSTREAM:
            # A door's own name stops its checks even where this Warden does not serve
            # that door: another Warden sharing the state store may.
            if s.target in DOOR_UPSTREAMS:
                continue
            seen = await console.upstreams_seen()
            if seen is None or s.target in seen:
                continue  # None: the log cannot tell now; say nothing rather than wrong
            out.add(s.id)
            continue
        if s.scope is Scope.AGENT:
            q = IndexQuery(kinds=("decision",), agent=s.target, limit=1)
        else:
            q = IndexQuery(kinds=("decision",), tool=s.target, limit=1)
        try:
            found = await asyncio.to_thread(console.index.search, q)
        except IndexUnavailable:
            continue  # cannot tell: say nothing rather than something wrong
        if not found.rows:
            out.add(s.id)
    return out


def _unseen_warning(switch: KillSwitch) -> str:
    if switch.scope is Scope.UPSTREAM:
        # Not "stops nothing": a `warden mcp wrap` sharing the state store takes any name
        # (--name, else its command's), and its decisions are in its own log.
        return (
            f"It is in force, but no upstream named “{switch.target}” is configured here, "
            f"is a door's own ({', '.join(DOOR_UPSTREAMS)}) or has been seen in this "
            "Warden's decisions. It stops only what other processes sharing the state store "
            "send there: an MCP server that `warden mcp wrap` runs under that name (its "
            "--name, else its command's name), or another Warden's upstream of that name. "
            "Check the name, and clear this switch if it is a typo."
        )
    noun = {Scope.AGENT: "agent", Scope.TOOL: "tool"}[switch.scope]
    return (
        f"It is in force, but no {noun} named “{switch.target}” has been seen by this "
        f"Warden: it stops nothing until one by that name appears. Check the name, and "
        f"clear this switch if it is a typo."
    )


@_view("operations")
async def operations(
    request: web.Request, console: Console, session: Session
) -> web.StreamResponse:
    """Kill switches, spend against caps and engine health."""
    switches = console.killswitches.active()
    known = await _known_targets(console)
    unseen = await _unseen(console, switches)
    # The switch just thrown, by id (never text from the address): does it stop anything?
    thrown = next((s for s in switches if s.id == request.query.get("switch")), None)
    warning = _unseen_warning(thrown) if thrown is not None and thrown.id in unseen else ""
    spend: tuple[CapSpend, ...] = ()
    spend_error = ""
    if console.budgets is not None:
        try:
            spend = await console.budgets.spend()
        except Exception as exc:
            # Any store failure: the rest of the view (kill switches above all) still works.
            spend_error = f"The state store cannot be read now, so spend is not shown ({exc})."
            spend_error = spend_error.splitlines()[0][:300]
    body = views.operations_view(
        switches,
        session.csrf,
        console.readiness(),
        _caps(console),
        _notice(request),
        spend=spend,
        spend_error=spend_error,
        known={scope.value: names for scope, names in known.items()},
        unseen=lambda s: s.id in unseen,
        warning=warning,
        timezone=console.config.budgets.timezone,
    )
    return _page(session, "Operations", body, "operations")


@_view("operations")
async def throw_switch(
    request: web.Request, console: Console, session: Session
) -> web.StreamResponse:
    """Throw a kill switch with a reason (admins only, as the API)."""
    if not _requires(session, "admin"):
        return _refuse(request, 403, "kill switches need the role admin")
    form = await request.post()
    scope_raw = form.get("scope")
    if scope_raw not in {s.value for s in Scope}:
        return _refuse(request, 400, "choose a scope")
    scope = Scope(str(scope_raw))
    target = str(form.get("target", "")).strip()
    if scope is Scope.GLOBAL:
        target = "*"
    elif not 1 <= len(target) <= MAX_TARGET:
        return _refuse(request, 400, f"name the {scope.value} (1-{MAX_TARGET} characters)")
    elif (problem := target_problem(scope, target)) is not None:
        return _refuse(request, 400, problem)
    reason = str(form.get("reason", "")).strip()
    if not reason or len(reason) > MAX_REASON:
        return _refuse(request, 400, f"give a reason of at most {MAX_REASON} characters")
    try:
        # Allowed whatever the target: an agent may appear after its switch is thrown.
        # The page then says when it names nothing seen (operations, ?switch=).
        thrown = await console.killswitches.set(scope, target, reason, session.principal.subject)
    except KillSwitchNotSaved as exc:  # in force here, saved in the background
        return _refuse(request, 503, str(exc))
    except AuditError as exc:
        return _refuse(request, 503, f"the switch is set but not recorded: {exc}")
    raise web.HTTPSeeOther(location=f"/console/operations?done=switch-set&switch={thrown.id}")


@_view("operations")
async def clear_switch(
    request: web.Request, console: Console, session: Session
) -> web.StreamResponse:
    """Clear a kill switch, with a reason."""
    if not _requires(session, "admin"):
        return _refuse(request, 403, "kill switches need the role admin")
    form = await request.post()
    reason = str(form.get("reason", "")).strip()[:MAX_REASON]
    try:
        cleared = await console.killswitches.clear(
            request.match_info["id"], session.principal.subject, reason
        )
    except AuditError as exc:
        return _refuse(request, 503, f"the switch stays set: {exc}")
    except STORE_ERRORS:
        # Failing closed: a clearing the fleet would not see is no clearing.
        return _refuse(
            request, 503, "the state store is unavailable: the switch stays in force; try again"
        )
    if cleared is None:
        return _refuse(request, 404, "no such kill switch is in force")
    raise web.HTTPSeeOther(location="/console/operations?done=switch-cleared")


def console_app(console: Console) -> web.Application:
    """The console as an aiohttp sub-app, to mount at ``/console/``."""
    app = web.Application(middlewares=[_headers, _signed_in])
    app[CONSOLE] = console
    r = app.router
    r.add_get("/", home)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/static/{name}", static)
    r.add_get("/decisions", decisions)
    r.add_get("/decisions/{seq}", decision)
    r.add_get("/decisions/id/{id}", decision_by_id)
    r.add_get("/api/decisions", decisions_feed)
    r.add_get("/approvals", approvals)
    r.add_post("/approvals/{id}/decide", decide)
    r.add_get("/evidence", evidence)
    r.add_get("/evidence/records/{seq}", record_page)
    r.add_get("/api/proof/{seq}", proof)
    r.add_post("/evidence/export", export)
    r.add_post("/evidence/erase", erase)
    r.add_get("/model-risk", model_risk)
    r.add_get("/operations", operations)
    r.add_post("/operations/killswitches", throw_switch)
    r.add_post("/operations/killswitches/{id}/clear", clear_switch)
    return app
