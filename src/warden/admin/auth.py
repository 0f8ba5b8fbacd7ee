"""Bearer-token auth for admin routes, with roles.

Tokens are configured only as their SHA-256 (``admin.tokens``); a request's
token is hashed and compared with every configured hash in constant time, so
neither the comparison nor the loop reveals how close a guess was. Routes opt
in with :func:`requires`::

    app[AUTH] = TokenAuth(config.admin.tokens)

    @requires("admin")
    async def handler(request: web.Request, who: Principal) -> web.Response:
        ...  # who.subject is the token's subject, for audit records

No valid token: 401 with ``WWW-Authenticate: Bearer`` and code
``unauthorized``. A valid token without any of the roles: 403, ``forbidden``.
Routes without :func:`requires` (``/metrics``, ``/healthz``, ``/readyz``) stay
open. :func:`json_errors` gives aiohttp's own errors (unknown route, wrong
method, a body too large or that cannot be decoded) the same JSON shape.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from warden.config import AdminToken
from warden.errors import StateUnavailable, failure_summary

__all__ = [
    "AUTH",
    "BODY_UNREADABLE",
    "Principal",
    "TokenAuth",
    "error_response",
    "hash_token",
    "json_errors",
    "requires",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AuthedHandler = Callable[[web.Request, "Principal"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made an admin request: the token's subject, roles and approver groups."""

    subject: str
    roles: frozenset[str]
    groups: frozenset[str] = frozenset()


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as ``admin.tokens[].sha256`` stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenAuth:
    """Checks bearer tokens against the configured SHA-256 hashes."""

    def __init__(self, tokens: Sequence[AdminToken]) -> None:
        self._tokens = tuple(
            (bytes.fromhex(t.sha256), Principal(t.subject, frozenset(t.roles), frozenset(t.groups)))
            for t in tokens
        )

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization`` header value, or ``None``."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            digest = hashlib.sha256(token.encode("utf-8")).digest()
        except UnicodeEncodeError:
            return None  # bytes that are no text (aiohttp keeps them as surrogates): no token
        found: Principal | None = None
        # Compare with every token, without stopping early, in constant time.
        for expected, who in self._tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = who
        return found


AUTH = web.AppKey("warden_admin_auth", TokenAuth)
"""Where :func:`requires` finds the :class:`TokenAuth` on the admin app."""


def requires(*roles: str) -> Callable[[AuthedHandler], Handler]:
    """Make a route of a handler that runs only for a token holding one of ``roles``.

    The handler gets the caller's :class:`Principal` as its second argument.
    """
    wanted = frozenset(roles)

    def wrap(handler: AuthedHandler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            auth = request.app.get(AUTH)
            who = auth.authenticate(request.headers.get("Authorization")) if auth else None
            if who is None:
                return error_response(
                    401,
                    "unauthorized",
                    "a valid admin bearer token is required",
                    headers={"WWW-Authenticate": 'Bearer realm="warden-admin"'},
                )
            if not who.roles & wanted:
                return error_response(
                    403,
                    "forbidden",
                    f"this route needs the role {' or '.join(sorted(wanted))}",
                )
            return await handler(request, who)

        return guarded

    return wrap


def state_unavailable(
    request: web.Request, exc: BaseException, message: str, logger: logging.Logger
) -> web.Response:
    """``503 state_unavailable`` saying ``message``; the driver's words are logged (their
    type and last line), not sent: they may name the store's host."""
    logger.warning(
        "state store unavailable for %s %s: %s", request.method, request.path, failure_summary(exc)
    )
    return error_response(StateUnavailable.status, StateUnavailable.code, message)


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """The admin API's error body: ``{"error": {"code": ..., "message": ...}}``."""
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


BODY_UNREADABLE = (
    "the request body could not be read as sent (its Content-Encoding or chunked framing)"
)
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx errors in the admin API's shape, as its routes' errors are.

    A body whose ``Content-Encoding`` or chunked framing cannot be decoded is
    ``400 invalid_request`` rather than an internal error and a traceback in the
    log. The console (``/console/``) keeps its own pages.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or request.path.startswith("/console/"):
            raise
        code = _CODES.get(exc.status, "invalid_request")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, headers=allow)
    except web.RequestPayloadError:
        response = error_response(400, "invalid_request", BODY_UNREADABLE)
        response.force_close()  # the rest of the body cannot be read past
        return response
