"""Bad agent input and hostile routing: clear 4xx errors, no open proxy, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.functional.conftest import make_config
from warden.server import Warden
from warden.testing import MockLLM

CHAT = "/openai/v1/chat/completions"
GOOD = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


async def post(warden: Warden, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            warden.proxy_url + path,
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        (CHAT, b"{not json", {}, 400, "invalid_json"),
        (CHAT, b"[1, 2]", {}, 400, "invalid_json"),
        (CHAT, GOOD, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        # A server decoding by the charset reads +ACI- as '"': other keys than Warden's.
        (
            CHAT,
            GOOD,
            {"Content-Type": "application/json; charset=utf-7"},
            415,
            "unsupported_media_type",
        ),
        (
            CHAT,
            GOOD,
            {"Content-Type": "application/json; charset*=''utf-7"},  # aiohttp: utf-7
            415,
            "unsupported_media_type",
        ),
        (
            "/openai/v1/embeddings",
            b'{"model": "text-embedding-3-small", "input": "x"}',
            {"Content-Type": "application/json;charset=latin-1"},
            415,
            "unsupported_media_type",
        ),
        ("/nowhere/v1/chat/completions", GOOD, {}, 404, "unknown_route"),
        (CHAT, GOOD, {"X-Warden-Agent": "bad agent"}, 400, "invalid_request"),
        # Labelled gzip and not gzip: a 500 and a traceback.
        (CHAT, GOOD, {"Content-Encoding": "gzip"}, 400, "invalid_request"),
    ],
)
async def test_bad_requests_get_clear_errors(
    warden: Warden,
    llm: MockLLM,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    got, payload = await post(warden, path, body, **headers)
    assert got == status
    assert payload["error"]["code"] == code
    assert payload["error"]["message"]
    assert llm.requests == []  # nothing reached the upstream


async def test_a_gzip_body_is_decided_and_forwarded_inflated(warden: Warden, llm: MockLLM) -> None:
    # The proxy's server inflates it: forwarded still labelled gzip, the provider
    # would inflate plain JSON and refuse the request.
    status, payload = await post(warden, CHAT, gzip.compress(GOOD), **{"Content-Encoding": "gzip"})
    assert status == 200, payload
    assert [r.body for r in llm.requests] == [orjson.loads(GOOD)]
    assert "Content-Encoding" not in llm.requests[0].headers


async def test_a_body_trickled_past_the_read_timeout_is_408(tmp_path: Path, llm: MockLLM) -> None:
    # A byte now and then held the connection, and its file descriptor, for good: a
    # thousand such clients left none for the agents.
    limits = {"body_read_timeout_s": 0.5}
    async with Warden(make_config(tmp_path, llm.url, limits=limits)) as w:
        host, port = w.proxy_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read(4096)
        writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert orjson.loads(rest)["error"]["code"] == "request_timeout"
    assert llm.requests == []


async def test_a_connection_sending_its_headers_a_byte_at_a_time_is_closed(
    tmp_path: Path, llm: MockLLM
) -> None:
    # aiohttp waits an hour for a request's headers by default: each such client held
    # a connection and its file descriptor that long.
    async with Warden(make_config(tmp_path, llm.url, limits={"idle_timeout_s": 0.5})) as w:
        host, port = w.proxy_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                for byte in f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\n".encode() * 100:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    if reader.at_eof():
                        break
            assert await reader.read() == b""
        writer.close()
    assert asyncio.get_running_loop().time() - started < 5


async def test_body_over_the_limit_is_413(tmp_path: Path, llm: MockLLM) -> None:
    async with Warden(make_config(tmp_path, llm.url, limits={"max_body_bytes": 4096})) as w:
        status, payload = await post(w, CHAT, b'{"x": "' + b"a" * 10_000 + b'"}')
        assert status == 413
        assert payload["error"]["code"] == "body_too_large"
        # The proxy still serves.
        status, _ = await post(w, CHAT, GOOD)
        assert status == 200


async def raw_request(warden: Warden, request_line: bytes, host: bytes = b"127.0.0.1") -> bytes:
    """Send one request as raw bytes: HTTP clients would normalise what we test."""
    address, port = warden.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    writer.write(request_line + b"\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize(
    "target",
    [
        b"/openai/v1/../../admin",
        b"/openai/v1/%2e%2e/x",
        b"/openai//v1/models",
        b"/openai/v1/./models",
    ],
)
async def test_dot_segments_and_empty_segments_are_refused(
    warden: Warden, llm: MockLLM, target: bytes
) -> None:
    answer = await raw_request(warden, b"GET " + target + b" HTTP/1.1")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert llm.requests == []


async def test_not_an_open_proxy(warden: Warden, llm: MockLLM) -> None:
    # Absolute-form target, as a forward-proxy client would send it.
    answer = await raw_request(
        warden, b"GET http://example.invalid/openai/v1/models HTTP/1.1", host=b"example.invalid"
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"not a forward proxy" in answer
    connect = await raw_request(
        warden, b"CONNECT example.invalid:443 HTTP/1.1", b"example.invalid:443"
    )
    assert connect.startswith(b"HTTP/1.1 4"), connect[:200]
    # A Host header naming another server changes nothing: the upstream comes from config.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            warden.proxy_url + "/openai/v1/models", headers={"Host": "internal.example"}
        ) as resp,
    ):
        assert resp.status == 200
    assert all(r.path == "/v1/models" for r in llm.requests)


async def test_many_concurrent_bad_and_good_requests(warden: Warden, llm: MockLLM) -> None:
    async def one(i: int) -> int:
        status, _ = await post(warden, CHAT, GOOD if i % 2 else b"{broken")
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(40)))
    assert statuses.count(200) == 20
    assert statuses.count(400) == 20


async def test_path_is_decoded_once_and_query_reaches_the_upstream_as_sent(
    tmp_path: Path,
) -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with Warden(make_config(tmp_path, upstream)) as w:
            answer = await raw_request(
                w, b"GET /openai/v1/models/gpt%2D4o%3amini%20x?after=a%26b&n=2 HTTP/1.1"
            )
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    finally:
        await runner.cleanup()
    # The path goes on in canonical form (the upstream decodes the same model id);
    # the query goes on as sent.
    assert seen == ["/v1/models/gpt-4o:mini%20x?after=a%26b&n=2"]
