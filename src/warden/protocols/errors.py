"""Error bodies in each provider's own shape, so the official SDKs raise their usual errors.

An agent talking to Warden uses an unchanged OpenAI or Anthropic SDK. When
Warden itself refuses or fails a request, the error must parse as that
provider's error, or the SDK would report a confusing decoding failure
instead of the reason. Mid-stream, the status line is already sent, so the
error travels as an SSE event that the SDK turns into an exception.
"""

from __future__ import annotations

from typing import Any

import orjson

from warden.protocols.sse import SseEvent

__all__ = ["render_error", "render_stream_error"]

# OpenAI reports most client errors (even unknown routes) as invalid_request_error;
# its SDK picks the exception class from the status, not from the type.
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}

# The types Anthropic documents for each status; 413 is ``request_too_large``.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _error_type(family: str, status: int) -> str:
    table = _ANTHROPIC_TYPES if family == "anthropic" else _OPENAI_TYPES
    found = table.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def _body(family: str, error_type: str, code: str, message: str) -> dict[str, Any]:
    if family == "anthropic":
        # Anthropic's error object has no code field; the message carries the meaning.
        return {"type": "error", "error": {"type": error_type, "message": message}}
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def render_error(family: str, status: int, code: str, message: str) -> bytes:
    """A JSON error body for an HTTP response with ``status``.

    ``family`` ``anthropic`` gets Anthropic's shape; any other family
    (``openai``, plain ``http`` upstreams) gets OpenAI's, which is also the
    common JSON error shape. ``code`` is Warden's stable error code, kept in
    OpenAI's ``code`` field. Never raises: it runs on error paths.
    """
    return orjson.dumps(_body(family, _error_type(family, status), code, message))


def render_stream_error(family: str, code: str, message: str) -> bytes:
    """One SSE event that makes the provider's SDK raise in the middle of a stream.

    The OpenAI SDK raises ``APIError`` for a data chunk that is an object with
    an ``error`` key; the Anthropic SDK raises for an ``event: error`` whose
    data is an error body. Families other than ``anthropic`` get the OpenAI form.
    """
    body = orjson.dumps(_body(family, "api_error", code, message)).decode()
    name = "error" if family == "anthropic" else None
    return SseEvent(data=body, event=name).encode()
