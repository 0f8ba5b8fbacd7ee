"""Lifecycle shared by the fake upstreams: a loopback aiohttp server."""

from __future__ import annotations

import asyncio
import ipaddress
from types import TracebackType
from typing import Self

from aiohttp import web

__all__ = ["LoopbackServer"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackServer:
    """An aiohttp server bound to a loopback address, started and stopped explicitly.

    Subclasses add their routes in :meth:`_routes`. Handlers that wait should
    wait on :attr:`_closing` too, so that :meth:`close` never waits for them.
    """

    def __init__(self) -> None:
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start serving on ``host:port`` (a loopback address; port 0 picks a free one)."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        if not _is_loopback(host):
            raise ValueError(f"{type(self).__name__} only binds loopback addresses, not {host!r}")
        self._closing = asyncio.Event()
        app = web.Application()
        self._routes(app)
        # handler_cancellation: a handler that never answers must end when its
        # client goes away, not linger until shutdown.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = f"[{host}]" if ":" in host else host
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop serving; handlers still waiting are released at once. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound port."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the bound host), without a trailing slash."""
        return f"http://{self._host}:{self.port}"
