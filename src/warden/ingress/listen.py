"""Binding an aiohttp application to ``host:port``: shared by the proxy door and the admin API."""

from __future__ import annotations

import socket

from aiohttp import web

from warden.config import parse_listen
from warden.errors import ConfigError

__all__ = ["listen"]


async def listen(
    app: web.Application, where: str, *, shutdown_grace_s: float, idle_timeout_s: float
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``where``; return its runner (cleanup stops it) and its URL.

    The socket is bound first, so port 0 resolves to a real port to report,
    and a port in use fails as a :class:`ConfigError` naming the address.
    ``idle_timeout_s``: how long a connection may sit idle, or take to send a
    request's headers (aiohttp's default, an hour, let a client sending a byte
    now and then hold a connection and its file descriptor).
    """
    host, port = parse_listen(where)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_grace_s,
        handle_signals=False,
        keepalive_timeout=idle_timeout_s,
    )
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        site = web.SockSite(runner, sock)
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
