"""Warden's exceptions, each with a stable ``code``.

The code is reused in error bodies sent to agents, in log lines and as the
``code`` label of metrics, so it never changes once released::

    WardenError
    ├── ConfigError              config_invalid
    ├── RequestError             (4xx: the agent's request is wrong)
    │   ├── BodyTooLarge         body_too_large
    │   ├── UnreadableBody       invalid_request (the answer closes the connection)
    │   ├── InvalidJSON          invalid_json
    │   ├── UnsupportedMedia     unsupported_media_type
    │   └── UnknownRoute         unknown_route
    │       └── RouteNotGoverned route_not_governed (a route Warden does not parse: listed nowhere)
    ├── UpstreamError            (5xx: the provider failed us)
    │   ├── UpstreamUnavailable  upstream_unavailable  (refused, reset: 502)
    │   ├── UpstreamTimeout      upstream_timeout      (504)
    │   ├── UpstreamProtocol     upstream_bad_response (malformed JSON, truncated stream: 502)
    │   │   └── StreamViolation  upstream_stream_violation (an event touches a decided call)
    │   └── UpstreamRedirect     upstream_redirect     (a 3xx is never relayed: 502)
    ├── Unauthenticated          unauthenticated       (401: no credential, or a bad one)
    ├── Forbidden                forbidden             (403: an agent id not proved)
    ├── PolicyError              policy_error          (bundle or evaluation failed)
    ├── Overloaded               overloaded            (503 + Retry-After: too busy to decide now)
    └── AuditError               audit_unavailable     (the log cannot take records: fail closed)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuditError",
    "BodyTooLarge",
    "ConfigError",
    "Forbidden",
    "InvalidJSON",
    "Overloaded",
    "PolicyError",
    "RequestError",
    "RequestTimeout",
    "RouteNotGoverned",
    "StreamViolation",
    "Unauthenticated",
    "UnknownRoute",
    "UnreadableBody",
    "UnsupportedMedia",
    "UpstreamError",
    "UpstreamProtocol",
    "UpstreamRedirect",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "WardenError",
    "error_codes",
]


class WardenError(Exception):
    """Base of every error Warden raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500


class ConfigError(WardenError):
    """The configuration is invalid; the message names the key."""

    code = "config_invalid"


class RequestError(WardenError):
    """The agent's request cannot be served as sent."""

    code = "invalid_request"
    status = 400


class BodyTooLarge(RequestError):
    """The request body is over ``limits.max_body_bytes``."""

    code = "body_too_large"
    status = 413


class RequestTimeout(RequestError):
    """The request body did not arrive within ``limits.body_read_timeout_s``."""

    code = "request_timeout"
    status = 408


class UnreadableBody(RequestError):
    """The request body cannot be read as sent (an encoding it does not have), or the
    client left before sending it all. The answer closes the connection: what is left
    of the body cannot be read past."""


class InvalidJSON(RequestError):
    """The request body is not the JSON object the API expects."""

    code = "invalid_json"
    status = 400


class UnsupportedMedia(RequestError):
    """The request's content type is not JSON where JSON is required."""

    code = "unsupported_media_type"
    status = 415


class UnknownRoute(RequestError):
    """The path names no configured upstream."""

    code = "unknown_route"
    status = 404


class RouteNotGoverned(UnknownRoute):
    """The route exists on no allowlist: Warden would not parse its responses for tool calls."""

    code = "route_not_governed"
    status = 404


class UpstreamError(WardenError):
    """The upstream API failed; the agent gets a 5xx in the provider's error shape."""

    code = "upstream_error"
    status = 502


class UpstreamUnavailable(UpstreamError):
    """The upstream refused or reset the connection."""

    code = "upstream_unavailable"
    status = 502


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured timeout."""

    code = "upstream_timeout"
    status = 504


class UpstreamProtocol(UpstreamError):
    """The upstream answered with something that is not its documented format."""

    code = "upstream_bad_response"
    status = 502


class StreamViolation(UpstreamProtocol):
    """A stream event touched a call after it was decided, or could not be parsed.

    A decided call's arguments are final: anything later that would change
    what the agent's SDK assembles ends the stream with the provider's error.
    """

    code = "upstream_stream_violation"


class UpstreamRedirect(UpstreamError):
    """The upstream answered with a redirect; relaying it would route the SDK around Warden."""

    code = "upstream_redirect"
    status = 502


class Unauthenticated(WardenError):
    """The agent sent no credential where one is needed, or one that does not verify."""

    code = "unauthenticated"
    status = 401


class Forbidden(WardenError):
    """The agent id is unknown or not proved by the credential sent."""

    code = "forbidden"
    status = 403


class PolicyError(WardenError):
    """A policy bundle could not be loaded or evaluated."""

    code = "policy_error"


class Overloaded(WardenError):
    """Warden cannot decide in time because it is busy, not because of the request.

    Rendered as the provider's own 503 with ``Retry-After``, so the agent's SDK
    backs off and retries; nothing is decided or recorded for the request.
    """

    code = "overloaded"
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """Seconds the agent should wait before retrying (the ``Retry-After`` header)."""


class ShuttingDown(Overloaded):
    """Warden is stopping and takes no new request; the agent's SDK retries (elsewhere)."""

    code = "shutting_down"


class StateUnavailable(WardenError):
    """The state store cannot answer a question a request depends on; Warden fails closed."""

    code = "state_unavailable"
    status = 503


class AuditError(WardenError):
    """The audit log cannot make records durable; Warden fails closed."""

    code = "audit_unavailable"
    status = 503


def failure_summary(exc: BaseException) -> str:
    """What a log may show of a store driver's error: its type and last line, cut to 200
    characters (the lines before may quote a connection string or a statement)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1][:200]}" if lines else type(exc).__name__


def error_codes() -> frozenset[str]:
    """Every stable code a :class:`WardenError` class carries (metrics start each at 0)."""
    codes: set[str] = set()
    todo: list[type[WardenError]] = [WardenError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return frozenset(codes)
