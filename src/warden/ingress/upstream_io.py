"""Reading an upstream's answer and naming what went wrong, for every door that forwards.

The base-URL proxy and the MCP door both read whole upstream bodies with a
size bound and turn transport failures into the :class:`UpstreamError` the
agent sees in its own protocol's shape. One place decides which failure is
which, so every door reports the same fault the same way.
"""

from __future__ import annotations

import logging
from typing import Final

import aiohttp

from warden.errors import UpstreamError, UpstreamProtocol, UpstreamTimeout, UpstreamUnavailable
from warden.protocols.driver import MAX_STREAM_BYTES
from warden.protocols.sse import SseTooLarge

__all__ = ["MAX_UPSTREAM_BODY", "read_body", "upstream_error"]

log = logging.getLogger("warden.proxy")

MAX_UPSTREAM_BODY: Final = MAX_STREAM_BYTES
"""The largest whole upstream answer read; a stream is bounded alike (and per event)."""


async def read_body(resp: aiohttp.ClientResponse, who: str) -> bytes:
    """The whole body of ``resp``, at most :data:`MAX_UPSTREAM_BODY` bytes.

    ``who`` names the upstream in errors, e.g. ``upstream 'openai'``.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        read = resp.content.readany
        while chunk := await read():
            size += len(chunk)
            if size > MAX_UPSTREAM_BODY:
                raise UpstreamProtocol(f"{who} answered over {MAX_UPSTREAM_BODY} bytes")
            chunks.append(chunk)
    except UpstreamError:
        raise
    except Exception as exc:
        raise upstream_error(exc, who) from None
    return b"".join(chunks)


def upstream_error(exc: BaseException, who: str) -> UpstreamError:
    """The agent-facing error for a failure talking to ``who`` (``upstream 'openai'``)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"{who} did not answer in time")
    if isinstance(exc, aiohttp.ClientPayloadError | SseTooLarge):
        return UpstreamProtocol(f"{who} sent a truncated or malformed body")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamProtocol(f"{who} sent a malformed response: {exc.message}")
    if isinstance(exc, RuntimeError) and str(exc) == "Connection closed.":
        # aiohttp's reader when the connection ends inside a body it could not frame
        # (a malformed chunk size): the upstream's fault, not Warden's.
        return UpstreamProtocol(f"{who} closed the connection inside a malformed body")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamUnavailable(f"{who} is unreachable: {type(exc).__name__}")
    log.exception("unexpected upstream failure", exc_info=exc)
    return UpstreamUnavailable(f"{who} failed: {type(exc).__name__}")
