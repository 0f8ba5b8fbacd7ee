"""Binding an aiohttp application to ``host:port``: shared by the proxy door and the admin API."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import orjson
from aiohttp import web

from warden.config import Config, parse_listen
from warden.errors import ConfigError
from warden.ingress.connection_cap import ConnectionCap, Refusal

__all__ = [
    "TOO_MANY_CONNECTIONS",
    "Listener",
    "admin_refusal",
    "listen",
    "refusal_response",
]


@dataclass(frozen=True, slots=True)
class Listener:
    """How one listener treats its connections (the ``limits`` section, per listener)."""

    name: str
    """The ``listener`` label of ``warden_connections_refused_total``."""
    shutdown_grace_s: float
    idle_timeout_s: float
    """How long a connection may sit idle, or take to send a request's headers
    (aiohttp's default, an hour, let a client sending a byte now and then hold a
    connection and its file descriptor)."""
    max_connections: int
    """Connections served at once; past it a new one is answered ``503``."""
    refusal: Refusal
    """The response a connection past ``max_connections`` gets, given its request line."""

    @classmethod
    def of(cls, config: Config, name: str, refusal: Refusal) -> Listener:
        """The listener ``name`` as ``config``'s ``limits`` and grace period set it."""
        return cls(
            name=name,
            shutdown_grace_s=config.shutdown_grace_s,
            idle_timeout_s=config.limits.idle_timeout_s,
            max_connections=config.limits.max_connections,
            refusal=refusal,
        )


TOO_MANY_CONNECTIONS = (
    "Warden has too many connections open (limits.max_connections); retry shortly"
)


def refusal_response(body: bytes, *, retry_after_s: int = 1) -> bytes:
    """A whole ``503`` response carrying the JSON ``body``, that closes the connection."""
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def admin_refusal(line: bytes) -> bytes:
    """The admin API's refusal, in its own error shape."""
    del line
    error = {"code": "overloaded", "message": TOO_MANY_CONNECTIONS}
    return refusal_response(orjson.dumps({"error": error}))


class _CappedSite(web.SockSite):
    """A socket site whose connections pass a :class:`ConnectionCap` first."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, cap: ConnectionCap) -> None:
        super().__init__(runner, sock)
        self._cap = cap

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._cap, sock=self._sock, backlog=self._backlog)

    async def stop(self) -> None:
        await super().stop()
        self._cap.close()  # refusals still lingering would outlive the listener


async def listen(app: web.Application, where: str, listener: Listener) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``where``; return its runner (cleanup stops it) and its URL.

    The socket is bound first, so port 0 resolves to a real port to report,
    and a port in use fails as a :class:`ConfigError` naming the address.
    """
    host, port = parse_listen(where)
    runner = web.AppRunner(
        app,
        access_log=None,
        # aiohttp waits this long for a request in progress, then cuts its body and
        # waits as long again for the handler before cancelling it: half the grace
        # each, so a stream still open stops within the grace, as the pod's grace
        # period (the grace plus 10 s) expects.
        shutdown_timeout=listener.shutdown_grace_s / 2,
        handle_signals=False,
        keepalive_timeout=listener.idle_timeout_s,
    )
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        server = runner.server
        assert server is not None  # set up above
        cap = ConnectionCap(
            server, listener.max_connections, listener=listener.name, refusal=listener.refusal
        )
        site = _CappedSite(runner, sock, cap)
        await site.start()
    except OSError as exc:
        sock.close()
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {where}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    return runner, f"http://{shown}:{bound[1]}"
