"""Structured logs: one JSON object per line on stderr, or plain text for people.

Log lines never carry request bodies or headers, so no credential can reach
them; records carry what auditors need instead. A line logged while a request
is served carries its ``trace_id`` and ``span_id`` (when tracing is on) and
the ``decision_id`` of its latest decision, to find the span and the audit
record it is about.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from warden.ops import tracing
from warden.text import mended

__all__ = ["configure_logging"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class _CorrelationFilter(logging.Filter):
    """Adds the trace, span and decision ids of the current context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in tracing.log_fields().items():
            record.__dict__.setdefault(key, value)
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{key}={record.__dict__[key]}"
            for key in ("trace_id", "decision_id")
            if key in record.__dict__
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except orjson.JSONEncodeError:
            # A lone surrogate an agent sent (a tool name): as U+FFFD the line is still
            # one line of valid UTF-8 JSON, whichever reader parses it.
            return mended(json.dumps(entry, default=str, ensure_ascii=False))


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send Warden's logs to stderr as JSON lines (``fmt="json"``) or text."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_CorrelationFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats what warden_requests_total already counts.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _WithheldDetails) for f in server.filters):
        server.addFilter(_WithheldDetails())


class _WithheldDetails(logging.Filter):
    """aiohttp's server logs a request it cannot parse with the offending bytes, which
    can be a header line holding a key or token: for those, only the error's kind is kept.
    Other errors (a failure in Warden's own handlers) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            # A body aiohttp could not decode (a Content-Encoding it does not have,
            # broken chunks), raised again when it reads the rest after the answer.
            exc = exc.__cause__
        if isinstance(exc, HttpProcessingError):
            kind = type(exc).__name__
            record.msg = (
                "aiohttp could not parse a request (%s); details withheld: "
                "they may hold credentials"
            )
            record.args = (kind,)
            record.exc_info = None
            record.exc_text = None
        return True
