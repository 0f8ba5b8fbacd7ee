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
import functools
import re
import secrets
import shutil
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from warden.approvals.model import MAX_COMMENT, ApprovalError
from warden.approvals.store import STORE_ERRORS, PageKey, page_key
from warden.audit.export import ExportError, Selection, export_log, parse_time
from warden.audit.index import IndexQuery, IndexUnavailable
from warden.budgets.guard import CapSpend
from warden.console import views
from warden.console.app import CONSOLE, Console
from warden.console.html import Html
from warden.console.proofs import ProofError
from warden.console.risk import drift_section
from warden.console.sessions import Session, same_token
from warden.console.sso import sso_principal, sso_speaks
from warden.errors import AuditError
from warden.killswitch import MAX_REASON, MAX_TARGET, KillSwitchNotSaved, Scope, target_problem

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


def _refuse(request: web.Request, status: int, message: str) -> web.Response:
    session = request.get(SESSION_KEY)
    if request.path.startswith("/console/api/"):
        return _api_error(status, "forbidden" if status == 403 else "refused", message)
    return _html(
        views.error_view(
            status,
            message,
            session.principal if session else None,
            session.csrf if session else None,
        ),
        status,
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
        if request.method == "GET" and not _local(request).startswith("/api/"):
            raise web.HTTPSeeOther(location="/console/login")
        return _refuse(request, 401, "sign in first")
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
    response = _html(views.login_view(nonce, sso=console.config.console.sso is not None))
    _cookie(response, request, LOGIN_COOKIE, nonce, 600)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """Sign in with an admin token; on success a session cookie, then the first view."""
    console = request.app[CONSOLE]
    form = await request.post()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    given_nonce = form.get("nonce")
    token = form.get("token")
    fresh = secrets.token_urlsafe(24)

    def again(message: str, status: int) -> web.Response:
        response = _html(views.login_view(fresh, message), status)
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
    response = web.HTTPSeeOther(location="/console/")
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
    """The decisions table as JSON, for live updates."""
    await console.refresh()
    q, _since = _query(request.query)
    found = await asyncio.to_thread(console.index.search, q)
    return _json({"rows": [r.to_json() for r in found.rows], "next_before": found.next_before})


def _seq(request: web.Request) -> int | None:
    raw = request.match_info.get("seq", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else None


@_view("decisions")
async def decision(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """One decision with its reason, policy revision, redacted arguments and outcome."""
    seq = _seq(request)
    found = await console.record(seq) if seq is not None else None
    if found is None or found[1].get("kind") != "decision":
        return _refuse(request, 404, "no such decision")
    record = found[1]
    decision_id = str((record.get("decision") or {}).get("id") or "")
    outcomes: list[dict[str, Any]] = []
    if decision_id:
        await console.refresh()
        rows = await asyncio.to_thread(
            console.index.search, IndexQuery(kinds=("outcome",), text=decision_id, limit=5)
        )
        for row in rows.rows:
            got = await console.record(row.seq)
            if got is not None and got[1].get("decision_id") == decision_id:
                outcomes.append(got[1])
    return _page(
        session, f"Decision {decision_id}", views.decision_detail(record, outcomes), "decisions"
    )


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


@_view("evidence")
async def export(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """An evidence package for a date range, as a zip download."""
    form = await request.post()
    try:
        start = parse_time(str(form.get("from", "")))
        end = parse_time(str(form.get("to", "")), end=True)
    except ExportError as exc:
        return _refuse(request, 400, str(exc))
    agent = str(form.get("export_agent", "")).strip()[:256] or None
    if console.exporting.locked():
        return _refuse(
            request, 429, "an evidence package is being built already; try again when it is done"
        )
    async with console.exporting:
        return await _export(request, console, start, end, agent)


async def _export(
    request: web.Request, console: Console, start: str, end: str, agent: str | None
) -> web.StreamResponse:
    try:
        # Cover everything written so far, signed now: a period running to today's end
        # is then declared (and provable) up to this moment.
        await console.audit.checkpoint(refresh=True)
    except AuditError as exc:
        return _refuse(request, 503, str(exc))
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="warden-evidence-"))
    try:
        name = f"evidence-{start[:10]}-{end[:10]}"
        out = work / name
        try:
            await asyncio.to_thread(
                export_log,
                console.audit.directory,
                out,
                selection=Selection(start=start, end=end, agent=agent),
                fmt="evidence",
            )
        except ExportError as exc:
            return _refuse(request, 409, str(exc))
        archive = work / f"{name}.zip"
        await asyncio.to_thread(_zip_dir, out, archive)
        data = await asyncio.to_thread(archive.read_bytes)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return web.Response(
        body=data,
        content_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'},
    )


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


@_view("operations")
async def operations(
    request: web.Request, console: Console, session: Session
) -> web.StreamResponse:
    """Kill switches, spend against caps and engine health."""
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
        console.killswitches.active(),
        session.csrf,
        console.readiness(),
        _caps(console),
        _notice(request),
        spend=spend,
        spend_error=spend_error,
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
        await console.killswitches.set(scope, target, reason, session.principal.subject)
    except KillSwitchNotSaved as exc:  # in force here, saved in the background
        return _refuse(request, 503, str(exc))
    except AuditError as exc:
        return _refuse(request, 503, f"the switch is set but not recorded: {exc}")
    raise web.HTTPSeeOther(location="/console/operations?done=switch-set")


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
