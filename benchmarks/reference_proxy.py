"""The reference: a bare aiohttp pass-through proxy, the least a Python proxy can do.

It forwards ``/openai/<rest>`` to the upstream over a keep-alive session and
returns the body, with no parsing, policy or audit. Warden's overhead is
reported as a ratio against this, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiohttp import web

_DROP = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))

    async def forward(request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        body = await request.read()
        async with session.request(
            request.method, f"{upstream}/{tail}", data=body, headers=headers
        ) as resp:
            data = await resp.read()
            return web.Response(status=resp.status, body=data, content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/openai/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    print(f"http://127.0.0.1:{sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port, args.upstream))
    except KeyboardInterrupt:
        sys.exit(0)
