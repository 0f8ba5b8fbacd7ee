"""``/v1/killswitches``: set, list and clear kill switches (role ``admin``).

* ``POST /v1/killswitches`` ``{"scope": "global|agent|tool|upstream",
  "target": "...", "reason": "..."}``: 201 with the switch;
* ``GET /v1/killswitches``: 200 ``{"killswitches": [...]}``;
* ``DELETE /v1/killswitches/{id}``: 200 with the cleared switch, 404 when no
  such switch is in force.

When the state store cannot save a switch thrown, the answer is ``503
state_unavailable`` and the switch is in force on this sidecar only (it is
saved in the background); when it cannot save a clearing, ``503
state_unavailable`` and the switch stays in force. Every other failure is the
admin API's JSON error, ``500 internal_error``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from warden.admin.auth import Principal, error_response, requires, state_unavailable
from warden.approvals.store import STORE_ERRORS
from warden.errors import AuditError
from warden.killswitch import (
    MAX_REASON,
    MAX_TARGET,
    KillSwitches,
    KillSwitchNotSaved,
    Scope,
    target_problem,
)

__all__ = ["add_killswitch_routes"]

log = logging.getLogger("warden.killswitch")

_SCOPES = ", ".join(s.value for s in Scope)


def add_killswitch_routes(app: web.Application, switches: KillSwitches) -> None:
    """Mount the kill-switch routes on the admin app (which must carry ``AUTH``)."""

    @requires("admin")
    async def create(request: web.Request, who: Principal) -> web.StreamResponse:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        scope_raw = body.get("scope")
        if scope_raw not in {s.value for s in Scope}:
            return _invalid(f"scope must be one of {_SCOPES}")
        scope = Scope(scope_raw)
        target = body.get("target")
        if scope is Scope.GLOBAL:
            target = "*"
        elif not isinstance(target, str):
            return _invalid(f"target must be the {scope.value}'s name, 1-{MAX_TARGET} characters")
        elif (problem := target_problem(scope, target)) is not None:
            return _invalid(problem)
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
            return _invalid(f"reason must be a non-empty text of at most {MAX_REASON} characters")
        try:
            switch = await switches.set(scope, target, reason.strip(), who.subject)
        except KillSwitchNotSaved as exc:
            # In force here, saved in the background: the caller must know the fleet is not.
            return error_response(exc.status, exc.code, str(exc))
        except AuditError as exc:
            # The switch holds; only its record failed.
            return error_response(503, exc.code, f"the switch is set but not recorded: {exc}")
        except Exception:
            return _internal(request, "throwing the switch failed part way: list the switches")
        return web.json_response(switch.to_json(), status=201, dumps=_dumps)

    @requires("admin", "auditor", "viewer")
    async def listing(_: web.Request, __: Principal) -> web.StreamResponse:
        return web.json_response(
            {"killswitches": [s.to_json() for s in switches.active()]}, dumps=_dumps
        )

    @requires("admin")
    async def clear(request: web.Request, who: Principal) -> web.StreamResponse:
        switch_id = request.match_info["id"]
        reason = request.query.get("reason", "")
        if len(reason) > MAX_REASON:
            return _invalid(f"reason must be at most {MAX_REASON} characters")
        try:
            cleared = await switches.clear(switch_id, who.subject, reason)
        except AuditError as exc:
            return error_response(503, exc.code, f"the switch stays set: {exc}")
        except STORE_ERRORS as exc:
            # Failing closed: a clearing the fleet would not see is no clearing.
            if any(s.id == switch_id for s in switches.active()):
                what = f"could not save the clearing: kill switch {switch_id!r} stays in force"
            else:
                what = f"could not look kill switch {switch_id!r} up"
            message = f"the state store is unavailable and {what}; try again shortly"
            return state_unavailable(request, exc, message, log)
        except Exception:
            return _internal(request, f"clearing kill switch {switch_id!r} failed")
        if cleared is None:
            return error_response(404, "not_found", f"no kill switch {switch_id!r} is in force")
        return web.json_response({**cleared.to_json(), "cleared": True}, dumps=_dumps)

    app.router.add_post("/v1/killswitches", create)
    app.router.add_get("/v1/killswitches", listing)
    app.router.add_delete("/v1/killswitches/{id}", clear)


def _internal(request: web.Request, what: str) -> web.Response:
    """``500 internal_error`` in the admin API's shape, not aiohttp's plain text."""
    log.exception("%s %s failed", request.method, request.path)
    return error_response(500, "internal_error", f"{what} (see Warden's log)")


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _invalid(message: str) -> web.Response:
    return error_response(400, "invalid_request", message)


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _invalid("the body must be a JSON object")
    if not isinstance(body, dict):
        return _invalid("the body must be a JSON object")
    return body
