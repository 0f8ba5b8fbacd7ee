"""``/v1/approvals``: list, show, approve and reject approvals.

* ``GET /v1/approvals?status=pending|approved|rejected|expired|consumed``
  (roles ``approver``, ``auditor``, ``viewer``, ``admin``): 200
  ``{"approvals": [...]}``, oldest first; every approval when no status;
* ``GET /v1/approvals/{id}`` (same roles): 200 with the approval, 404;
* ``POST /v1/approvals/{id}/approve`` and ``.../reject`` (role ``approver``),
  body ``{"comment": "..."}`` or empty: 200 with the approval after the vote;
  403 ``self_approval`` / ``not_an_approver``; 404 ``not_found``; 409
  ``approval_not_pending`` / ``already_voted``; 400 ``invalid_request``.

Every route answers ``503 state_unavailable`` when the approval store cannot
answer (a SQLite file locked past its busy timeout, PostgreSQL down): try again.

Arguments are shown redacted per the decision's ``redact`` obligations, and
cut to a readable size (:mod:`warden.approvals.shown`).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from warden.admin.auth import (
    AUTH,
    Principal,
    TokenAuth,
    error_response,
    requires,
    state_unavailable,
)
from warden.approvals.model import MAX_COMMENT, ApprovalError, ApprovalStatus
from warden.approvals.service import Approvals
from warden.approvals.store import STORE_ERRORS
from warden.errors import AuditError

__all__ = ["add_approval_routes"]

log = logging.getLogger("warden.approvals")

_STATUSES = ", ".join(s.value for s in ApprovalStatus)


def add_approval_routes(app: web.Application, approvals: Approvals, auth: TokenAuth) -> None:
    """Mount the approval routes on the admin app (setting ``AUTH`` if it is not set)."""
    if AUTH not in app:
        app[AUTH] = auth

    @requires("approver", "auditor", "viewer", "admin")
    async def listing(request: web.Request, _: Principal) -> web.StreamResponse:
        status = request.query.get("status") or None
        if status is not None and status not in {s.value for s in ApprovalStatus}:
            return _invalid(f"status must be one of {_STATUSES}")
        try:
            found = await approvals.list(status)
        except STORE_ERRORS as exc:
            return _unavailable(request, exc)
        return web.json_response({"approvals": [a.to_json() for a in found]}, dumps=_dumps)

    @requires("approver", "auditor", "viewer", "admin")
    async def show(request: web.Request, _: Principal) -> web.StreamResponse:
        approval_id = request.match_info["id"]
        try:
            found = await approvals.get(approval_id)
        except STORE_ERRORS as exc:
            return _unavailable(request, exc)
        if found is None:
            return error_response(404, "not_found", f"no approval {approval_id!r}")
        return web.json_response(found.to_json(), dumps=_dumps)

    async def vote(request: web.Request, who: Principal, approve: bool) -> web.StreamResponse:
        comment = await _comment(request)
        if isinstance(comment, web.Response):
            return comment
        try:
            after = await approvals.decide(request.match_info["id"], who, approve, comment)
        except ApprovalError as exc:
            return error_response(exc.status, exc.code, str(exc))
        except AuditError as exc:
            # The vote is stored; only its record failed.
            return error_response(503, exc.code, f"the decision is stored but not recorded: {exc}")
        except STORE_ERRORS as exc:
            return _unavailable(request, exc)
        return web.json_response(after.to_json(), dumps=_dumps)

    @requires("approver")
    async def approve(request: web.Request, who: Principal) -> web.StreamResponse:
        return await vote(request, who, True)

    @requires("approver")
    async def reject(request: web.Request, who: Principal) -> web.StreamResponse:
        return await vote(request, who, False)

    app.router.add_get("/v1/approvals", listing)
    app.router.add_get("/v1/approvals/{id}", show)
    app.router.add_post("/v1/approvals/{id}/approve", approve)
    app.router.add_post("/v1/approvals/{id}/reject", reject)


def _unavailable(request: web.Request, exc: BaseException) -> web.Response:
    return state_unavailable(
        request, exc, "the approval store is unavailable; try again shortly", log
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _invalid(message: str) -> web.Response:
    return error_response(400, "invalid_request", message)


async def _comment(request: web.Request) -> str | web.Response:
    raw = await request.read()
    if not raw.strip():
        return ""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _invalid("the body must be a JSON object")
    if not isinstance(body, dict):
        return _invalid("the body must be a JSON object")
    comment = body.get("comment", "")
    if comment is None:
        comment = ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        return _invalid(f"comment must be a text of at most {MAX_COMMENT} characters")
    return comment
