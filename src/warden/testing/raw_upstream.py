"""A scripted loopback upstream that answers with exactly the bytes it is given.

Where :class:`~warden.testing.mock_llm.MockLLM` renders well-formed provider
answers, :class:`RawUpstream` plays a misbehaving OpenAI-compatible server:
each :class:`RawReply` names the status, the headers and the body, whole or
as a list of chunks written one by one with optional pauses in between, so a
test can send a ``201`` with a tool call, a ``307``, an event stream split in
the middle of a UTF-8 sequence, or a chunk holding ``NaN``::

    async with RawUpstream() as up:
        up.script(RawReply.sse([("message_start", {...}), ...], chunk_size=7))
        ...  # point Warden's upstream (or an SDK) at up.url

Replies come from the script queue first, then from the ``on_request``
responder, then a ``500`` saying nothing was scripted. Every request is kept
in :attr:`RawUpstream.requests` with its path exactly as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from warden.testing._server import LoopbackServer

__all__ = [
    "RawReply",
    "RawRequest",
    "RawResponder",
    "RawUpstream",
    "json_bytes",
    "split_at",
    "sse_bytes",
]

_SSE_TYPE = "text/event-stream; charset=utf-8"
_JSON_TYPE = "application/json"


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON text the way Python servers write it (``NaN`` and big ints included)."""
    return json.dumps(value, separators=(",", ":")).encode()


def sse_bytes(events: Iterable[tuple[str | None, Any]], *, done: bool = False) -> bytes:
    """Server-sent events: ``(event name or None, data)`` pairs, data a str or JSON value.

    A ``str`` is sent as is (so a test can write ``NaN`` or broken JSON);
    anything else goes through :func:`json_bytes`. ``done`` appends OpenAI's
    ``data: [DONE]`` terminator.
    """
    out = bytearray()
    for name, data in events:
        if name is not None:
            out += f"event: {name}\n".encode()
        text = data if isinstance(data, str) else json_bytes(data).decode()
        out += b"".join(b"data: " + line.encode() + b"\n" for line in text.split("\n"))
        out += b"\n"
    if done:
        out += b"data: [DONE]\n\n"
    return bytes(out)


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (out of range and repeated cuts are ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True, slots=True)
class RawReply:
    """One answer, byte for byte.

    ``body`` is sent whole with a ``Content-Length`` when it is ``bytes``, or
    chunk by chunk (chunked transfer encoding, one write per chunk) when it is
    a sequence. ``delays[i]`` is the pause in seconds before chunk ``i``
    (missing entries mean no pause). ``headers`` are sent as given, repeats
    included, plus ``content_type`` when set (without one, aiohttp sends
    ``application/octet-stream``).
    ``abort`` closes the connection after the last chunk instead of ending the
    body properly (a stream cut off by the upstream).
    """

    status: int = 200
    body: bytes | Sequence[bytes] = b""
    headers: Sequence[tuple[str, str]] = ()
    content_type: str | None = None
    delays: Sequence[float] = ()
    abort: bool = False

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 999:
            raise ValueError(f"status must be a 3-digit HTTP status, got {self.status}")
        if any(d < 0 for d in self.delays):
            raise ValueError("delays must not be negative")
        if not isinstance(self.body, bytes):
            object.__setattr__(self, "body", tuple(self.body))
        object.__setattr__(self, "headers", tuple(self.headers))
        object.__setattr__(self, "delays", tuple(self.delays))

    @classmethod
    def json(cls, value: Any, *, status: int = 200, **kw: Any) -> RawReply:
        """A whole JSON body (``application/json``) encoded by :func:`json_bytes`."""
        return cls(status=status, body=json_bytes(value), content_type=_JSON_TYPE, **kw)

    @classmethod
    def sse(
        cls,
        events: Iterable[tuple[str | None, Any]],
        *,
        status: int = 200,
        done: bool = False,
        cuts: Iterable[int] = (),
        **kw: Any,
    ) -> RawReply:
        """An event stream (``text/event-stream``), split at byte offsets ``cuts``."""
        data = sse_bytes(events, done=done)
        return cls(status=status, body=split_at(data, cuts), content_type=_SSE_TYPE, **kw)

    @property
    def chunks(self) -> tuple[bytes, ...]:
        """The body as the chunks that are written."""
        return (self.body,) if isinstance(self.body, bytes) else tuple(self.body)


@dataclass(frozen=True, slots=True)
class RawRequest:
    """A request as it reached the upstream: ``path`` is the target exactly as sent."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (``None`` when empty or not JSON)."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


RawResponder = Callable[[RawRequest], RawReply | None]
"""Chooses a reply for a request; ``None`` falls through to the default ``500``."""


class RawUpstream(LoopbackServer):
    """A loopback HTTP server answering every method and path with scripted bytes."""

    def __init__(self, on_request: RawResponder | None = None) -> None:
        super().__init__()
        self._queue: deque[RawReply] = deque()
        self.on_request = on_request
        """Called for a request when the script queue is empty."""
        self.requests: list[RawRequest] = []
        """Every request received, in order."""

    def script(self, *replies: RawReply) -> None:
        """Queue replies; each request takes the next one."""
        self._queue.extend(replies)

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    def _reply_for(self, req: RawRequest) -> RawReply:
        if self._queue:
            return self._queue.popleft()
        if self.on_request is not None and (reply := self.on_request(req)) is not None:
            return reply
        return RawReply(
            status=500, body=b"RawUpstream: no reply scripted", content_type="text/plain"
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        req = RawRequest(
            method=request.method,
            path=request.raw_path,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=await request.read(),
        )
        self.requests.append(req)
        reply = self._reply_for(req)
        headers: CIMultiDict[str] = CIMultiDict(reply.headers)
        if reply.content_type is not None:
            headers["Content-Type"] = reply.content_type
        chunks = reply.chunks
        if isinstance(reply.body, bytes) and not reply.delays and not reply.abort:
            return web.Response(status=reply.status, body=reply.body, headers=headers)
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i, chunk in enumerate(chunks):
            if i < len(reply.delays) and reply.delays[i] > 0 and await self._pause(reply.delays[i]):
                return response
            await response.write(chunk)
        if reply.abort:
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless the server closes first (then ``True``: stop writing)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()
