"""Routes billed by their input alone (embeddings): what the request and answer say.

They carry no tool calls, so no adapter reads them; a spend cap still needs
the model the request names, the request's size (its hold until answered)
and the answer's ``usage.prompt_tokens`` (what it cost). Every door that
forwards one reads them here.
"""

from __future__ import annotations

import orjson

from warden.model import CallSize, Usage
from warden.protocols._wire import token_count, utf8_only

__all__ = ["metered_request", "metered_usage"]


def metered_request(
    body: bytes, deployment: str | None = None, content_type: str = ""
) -> tuple[str | None, CallSize]:
    """The model a metered request names (``None``: none, or not JSON), and its size.

    ``deployment`` (an Azure deployment path's) is the model, whatever the body says.
    Raises :class:`~warden.errors.UnsupportedMedia` for a body declared in a charset
    other than UTF-8: the model it names is priced, and a server decoding by the
    charset could read another.
    """
    utf8_only(content_type)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    named = model if isinstance(model, str) else None
    return deployment or named, CallSize(len(body), 0)


def metered_usage(raw: bytes) -> Usage | None:
    """``usage.prompt_tokens`` of a metered answer; ``None`` if it names none (spent as held)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    tokens = token_count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
    return None if tokens is None else Usage(input_tokens=tokens)
