"""The benchmark's upstream: a fixed OpenAI-style chat completion, as cheap as aiohttp allows.

Kept apart from ``warden.testing.MockLLM`` on purpose: the mock records and
scripts every request, and that cost must not blur what the benchmark measures.
Requests that carry ``"tools"`` get a reply with one ``search_kb`` tool call,
unless their model is ``bench-text`` (a text answer). Model ``bench-burst``
gets a tool call with new arguments each time, so every decision about it is
a policy cache miss.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from aiohttp import web

_TEXT = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764115200,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Your order ships tomorrow."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
)
_TOOL = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764115200,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_bench",
                            "type": "function",
                            "function": {"name": "search_kb", "arguments": '{"query": "shipping"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
)


_BURST_MARK = b'\\"shipping\\"'  # inside the arguments string, so escaped
_burst_count = 0


async def chat(request: web.Request) -> web.Response:
    global _burst_count  # noqa: PLW0603 - one counter for the process
    body = await request.read()
    if b'"tools"' not in body or b'"bench-text"' in body:
        reply = _TEXT
    elif b'"bench-burst"' in body:
        _burst_count += 1
        reply = _TOOL.replace(_BURST_MARK, b'\\"shipping %d\\"' % _burst_count)
    else:
        reply = _TOOL
    return web.Response(body=reply, content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
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
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
