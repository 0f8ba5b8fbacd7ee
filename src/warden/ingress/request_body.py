"""Reading an agent's request body: bounded in size, and in time."""

from __future__ import annotations

import asyncio

from aiohttp import web

from warden.config import LimitsConfig
from warden.errors import BodyTooLarge, RequestTimeout, UnreadableBody

__all__ = ["read_request_body"]


async def read_request_body(request: web.Request, limits: LimitsConfig) -> bytes:
    """The whole body, or :class:`BodyTooLarge` past ``limits.max_body_bytes``, or
    :class:`RequestTimeout` when it has not all arrived within
    ``limits.body_read_timeout_s`` (a client sending a byte now and then would hold
    the connection for as long as it liked), or :class:`UnreadableBody` when aiohttp
    cannot decode it (a ``gzip`` body that is not gzip) or the client left mid-body."""
    limit, timeout_s = limits.max_body_bytes, limits.body_read_timeout_s
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body is over limits.max_body_bytes ({limit} bytes)")
    chunks: list[bytes] = []
    size = 0
    read = request.content.readany  # not iter_any(): no StopAsyncIteration per body
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await read():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(
                        f"request body is over limits.max_body_bytes ({limit} bytes)"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within limits.body_read_timeout_s ({timeout_s:g} s)"
        ) from None
    except web.RequestPayloadError:
        raise UnreadableBody(
            "the request body could not be read as sent (its Content-Encoding or chunked framing)"
        ) from None
    except ConnectionError:
        # The client left mid-body: nobody reads the answer, and it is no fault of Warden's.
        raise UnreadableBody("the client closed the connection before its body arrived") from None
    return b"".join(chunks)
