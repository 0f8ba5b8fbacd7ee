"""``/v1/changes``: record a CI run in the live audit log (role ``admin``).

* ``POST /v1/changes`` ``{"kind": "eval_run" | "replay_run", "body": {...}}``:
  201 ``{"id": ..., "seq": ...}``, where the change record landed.

``warden eval run --admin`` and ``warden policy replay --admin`` send their
change records here, because a running Warden holds its audit log and the
CLIs cannot open it themselves. Only those two kinds are taken:
``policy_activation`` and ``config_load`` are Warden's own records, never
accepted from outside. The body must have the shape the CLIs write (the keys
they always write, of the right types; further keys are kept as sent), at
most :data:`MAX_BODY_BYTES` encoded, and the record gains ``submitted_by``:
the subject of the token that sent it (a ``submitted_by`` in the body is
replaced). An :class:`AuditError` is ``503 audit_unavailable``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from warden.admin.auth import Principal, error_response, requires
from warden.audit.changes import EVAL_RUN, REPLAY_RUN, ChangeSink
from warden.errors import AuditError

__all__ = ["ACCEPTED_KINDS", "MAX_BODY_BYTES", "add_change_routes", "check_body"]

MAX_BODY_BYTES = 64 * 1024
"""The most a change record's ``body`` may take, encoded as JSON."""
_MAX_REQUEST_BYTES = MAX_BODY_BYTES + 1024
"""The request: the body and its envelope (``kind``, whitespace)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_result(value: Any) -> bool:
    return value in ("pass", "fail")


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _is_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_int(v) for v in value.values())


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


_Check = tuple[Callable[[Any], bool], str]

# The keys `EvalReport.record_body` and `cli_replay.replay_record` always write.
_SHAPES: dict[str, dict[str, _Check]] = {
    EVAL_RUN: {
        "suite": (_is_text, "a text"),
        "suite_sha256": (_is_sha256, "a hex SHA-256"),
        "scenarios": (_is_int, "a count"),
        "passed": (_is_int, "a count"),
        "failed": (_is_int, "a count"),
        "failed_ids": (_is_texts, "a list of texts"),
        "bundle_revision": (_is_text, "a text"),
        "bundles": (_is_texts, "a list of texts"),
        "result": (_is_result, '"pass" or "fail"'),
    },
    REPLAY_RUN: {
        "bundle_revision": (_is_text, "a text"),
        "bundles": (_is_texts, "a list of texts"),
        "recorded_revisions": (_is_texts, "a list of texts"),
        "scanned": (_is_int, "a count"),
        "replayed": (_is_int, "a count"),
        "changed": (_is_int, "a count"),
        "change_rate": (_is_number, "a number"),
        "changes": (_is_counts, "an object of counts"),
        "threshold": (_is_object, "an object"),
        "result": (_is_result, '"pass" or "fail"'),
    },
}
ACCEPTED_KINDS = tuple(sorted(_SHAPES))
"""The change records taken from outside; the rest are Warden's own."""


def check_body(kind: str, body: Mapping[str, Any]) -> str | None:
    """What is wrong with ``body`` as a ``kind`` change record, or ``None`` when nothing is."""
    shape = _SHAPES.get(kind)
    if shape is None:
        return f"kind must be one of {', '.join(ACCEPTED_KINDS)}"
    missing = [key for key in shape if key not in body]
    if missing:
        return f"a {kind} body needs {', '.join(missing)}"
    for key, (ok, what) in shape.items():
        if not ok(body[key]):
            return f"{kind} body.{key} must be {what}"
    return None


def add_change_routes(app: web.Application, audit: ChangeSink) -> None:
    """Mount ``POST /v1/changes`` on the admin app (which must carry ``AUTH``).

    ``audit`` is the running Warden's audit log.
    """

    @requires("admin")
    async def create(request: web.Request, who: Principal) -> web.StreamResponse:
        if (request.content_length or 0) > _MAX_REQUEST_BYTES:
            return _too_large()
        raw = await request.read()
        if len(raw) > _MAX_REQUEST_BYTES:
            return _too_large()
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _invalid("the request must be a JSON object")
        if not isinstance(doc, dict):
            return _invalid("the request must be a JSON object")
        kind = doc.get("kind")
        if not isinstance(kind, str) or kind not in _SHAPES:
            return _invalid(
                f"kind must be one of {', '.join(ACCEPTED_KINDS)}: "
                "activations and config loads are recorded by Warden itself"
            )
        body = doc.get("body")
        if not isinstance(body, dict):
            return _invalid("body must be a JSON object")
        if len(orjson.dumps(body)) > MAX_BODY_BYTES:
            return _too_large()
        problem = check_body(kind, body)
        if problem is not None:
            return _invalid(problem)
        record = {**body, "submitted_by": who.subject}
        try:
            ref = await audit.append(kind, record)
        except AuditError as exc:
            return error_response(503, exc.code, f"the {kind} record was not written: {exc}")
        return web.json_response({"id": ref.id, "seq": ref.seq}, status=201, dumps=_dumps)

    app.router.add_post("/v1/changes", create)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _invalid(message: str) -> web.Response:
    return error_response(400, "invalid_request", message)


def _too_large() -> web.Response:
    return error_response(
        413, "too_large", f"a change record's body may take at most {MAX_BODY_BYTES} bytes"
    )
