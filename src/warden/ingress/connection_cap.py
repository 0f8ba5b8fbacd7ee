"""A bound on the connections one listener serves at once.

Each open connection holds a file descriptor, and the audit log, the state
store and the upstream pool need descriptors of their own: a client opening
connections without end would make Warden fail its own writes (and so deny
every call) long before it ran out of memory. Past ``limits.max_connections``
a new connection is answered ``503`` with ``Retry-After`` in the caller's
shape and closed; the connections already open are served as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from warden.ops import metrics

__all__ = ["MAX_REFUSALS", "REFUSAL_LINGER_S", "ConnectionCap"]

REFUSAL_LINGER_S = 2.0
"""How long a refused connection may take to send its request's head, and then to
close after reading the 503 (closing with unread bytes would reset the connection
and could lose the answer)."""
MAX_REFUSALS = 64
"""Refused connections still being answered; past it, more are reset at once, so
refusing holds a bounded number of descriptors too."""
_MAX_HEAD = 16 * 1024
"""Bytes of a refused request read for its request line; the rest is discarded."""

Refusal = Callable[[bytes], bytes]
"""Given a refused request's request line (maybe empty), the whole HTTP response."""


class ConnectionCap:
    """A protocol factory for ``loop.create_server``: aiohttp's handler, or a refusal.

    ``server`` is the aiohttp low-level server of an app runner; ``limit`` the
    connections it may hold at once. A connection is counted from the moment its
    handler is handed out (before aiohttp registers it a loop pass later), so a
    burst accepted in one pass cannot overshoot the limit.
    """

    def __init__(self, server: web.Server, limit: int, *, listener: str, refusal: Refusal) -> None:
        self._server = server
        self._limit = limit
        self._refusal = refusal
        self._accepting = 0
        self._refusing: set[_Refuse] = set()
        self._refused = metrics.child(metrics.CONNECTIONS_REFUSED, listener)

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) + self._accepting < self._limit:
            self._accepting += 1
            # aiohttp registers the connection in a callback the transport schedules
            # after this call returns; two hops run after it, so the connection is
            # counted twice for a moment rather than not at all.
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._accepted)
            return self._server()
        self._refused.inc()
        if len(self._refusing) >= MAX_REFUSALS:
            return _Reset()
        refuse = _Refuse(self._refusal, self._refusing.discard)
        self._refusing.add(refuse)
        return refuse

    def close(self) -> None:
        """Reset the refused connections still lingering (the listener stops)."""
        for refuse in list(self._refusing):
            refuse.abort()

    def _accepted(self) -> None:
        self._accepting -= 1


class _Reset(asyncio.Protocol):
    """Closes at once: refusals are themselves too many to answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:  # pragma: no cover - TCP transports are write transports
            transport.close()


class _Refuse(asyncio.Protocol):
    """Reads a request's head, answers the refusal, and closes once the client has read it."""

    def __init__(self, refusal: Refusal, done: Callable[[_Refuse], None]) -> None:
        self._refusal = refusal
        self._done: Callable[[_Refuse], None] | None = done
        self._head = b""
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self._expire)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # the rest of the request: read so that closing does not reset
        self._head += data[: _MAX_HEAD - len(self._head)]
        if b"\r\n\r\n" in self._head or len(self._head) >= _MAX_HEAD:
            self._answer()

    def eof_received(self) -> bool:
        if not self._answered:
            self._answer()
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        done, self._done = self._done, None
        if done is not None:
            done(self)

    def abort(self) -> None:
        """Reset the connection now (its listener stops)."""
        if self._transport is not None:
            self._transport.abort()
        elif self._done is not None:  # never connected: nothing will call connection_lost
            done, self._done = self._done, None
            done(self)

    def _answer(self) -> None:
        self._answered = True
        assert self._transport is not None
        line = self._head.partition(b"\r\n")[0]
        self._transport.write(self._refusal(line))
        if self._transport.can_write_eof():
            self._transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self._close)

    def _expire(self) -> None:
        if not self._answered:
            self._answer()  # a client that never finished its head still gets the reason
        else:
            self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
