"""limits.max_connections: past it, a new connection is answered 503 in the caller's shape.

Each connection holds a file descriptor, which the audit log and the state store
need too: a client opening connections without end made Warden fail its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import openai
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from tests.functional.conftest import make_config
from tests.functional.test_transparent_sdk_functional import transparent_config
from warden.ingress import connection_cap
from warden.server import Warden
from warden.testing import MockLLM

CHAT = "/openai/v1/chat/completions"
GOOD = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = [{"role": "user", "content": "hi"}]


def refused(listener: str) -> float:
    sample = {"listener": listener}
    return REGISTRY.get_sample_value("warden_connections_refused_total", sample) or 0.0


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def request(path: str = CHAT, body: bytes = GOOD) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(
    url: str, raw: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, bytes]:
    """Send ``raw`` on a new connection; return it (kept open) with the status and body."""
    reader, writer = await asyncio.open_connection(*address(url))
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
    except BaseException:
        writer.close()
        raise
    return reader, writer, int(head.split(b" ", 2)[1]), body


@contextlib.asynccontextmanager
async def held(url: str, count: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """``count`` kept-alive connections that each finished one request."""
    writers = []
    try:
        for _ in range(count):
            _, writer, status, _ = await exchange(url, request())
            assert status == 200
            writers.append(writer)
        yield writers
    finally:
        for writer in writers:
            writer.close()


async def test_a_connection_past_the_cap_gets_503_in_each_sdks_shape(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(tmp_path, llm.url, limits={"max_connections": 2})
    async with Warden(config) as w:
        before = refused("proxy")
        async with (
            held(w.proxy_url, 2) as writers,
            openai.AsyncOpenAI(
                base_url=f"{w.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as oai,
            anthropic.AsyncAnthropic(
                base_url=f"{w.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
            ) as ant,
        ):
            with pytest.raises(openai.InternalServerError) as openai_error:
                await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            with pytest.raises(anthropic.InternalServerError) as anthropic_error:
                await ant.messages.create(
                    model="claude-opus-4-1",
                    max_tokens=10,
                    messages=MESSAGES,  # type: ignore[arg-type]
                )
            assert refused("proxy") - before == 2
            # A connection that closes frees its place.
            writers.pop().close()
            async with asyncio.timeout(10):
                while True:
                    try:
                        await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                        break
                    except openai.InternalServerError:
                        await asyncio.sleep(0.05)
    assert openai_error.value.status_code == 503
    assert openai_error.value.response.headers["retry-after"] == "1"
    assert openai_error.value.code == "overloaded"
    assert "limits.max_connections" in openai_error.value.message
    assert anthropic_error.value.status_code == 503
    assert anthropic_error.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    # Refused requests never reached the model: two held, one after the place freed.
    assert len(llm.requests) == 3


async def test_the_admin_listener_has_its_own_cap(tmp_path: Path, llm: MockLLM) -> None:
    config = make_config(tmp_path, llm.url, limits={"max_connections": 1})
    async with Warden(config) as w:
        before = refused("admin")
        first = await exchange(w.admin_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            _, second, status, body = await exchange(
                w.admin_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            second.close()
        finally:
            first[1].close()
        # The proxy listener counts its own connections.
        _, proxy, proxy_status, _ = await exchange(w.proxy_url, request())
        proxy.close()
    assert first[2] == 200
    assert status == 503
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    assert refused("admin") - before == 1
    assert proxy_status == 200


async def test_a_burst_accepted_at_once_never_passes_the_cap(tmp_path: Path, llm: MockLLM) -> None:
    # Connections accepted in one loop pass are registered by aiohttp only on the
    # next: counting registered connections alone let a whole burst in.
    config = make_config(tmp_path, llm.url, limits={"max_connections": 3})
    async with Warden(config) as w:
        results = await asyncio.gather(*(exchange(w.proxy_url, request()) for _ in range(20)))
        for _, writer, _, _ in results:
            writer.close()
    statuses = sorted(status for _, _, status, _ in results)
    assert statuses == [200] * 3 + [503] * 17
    assert len(llm.requests) == 3


async def test_a_refused_request_reads_its_503_whole_even_with_a_large_body(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Closing a socket with unread bytes resets the connection, which can destroy the
    # answer on its way: the refusal reads what the client sends until it closes.
    config = make_config(tmp_path, llm.url, limits={"max_connections": 1})
    big = orjson.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "pad": "x" * 2_000_000})
    async with Warden(config) as w, held(w.proxy_url, 1):
        reader, writer = await asyncio.open_connection(*address(w.proxy_url))
        writer.write(request(body=big))
        async with asyncio.timeout(20):
            await writer.drain()
            answer = await reader.read()
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"Connection: close" in head
    assert orjson.loads(body)["error"]["code"] == "overloaded"


async def test_refusals_past_their_own_bound_are_reset_and_the_proxy_still_serves(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_cap, "MAX_REFUSALS", 2)
    monkeypatch.setattr(connection_cap, "REFUSAL_LINGER_S", 0.5)
    config = make_config(tmp_path, llm.url, limits={"max_connections": 1})
    async with Warden(config) as w:
        async with held(w.proxy_url, 1) as writers:
            # Silent clients: two are answered once the linger expires, the rest reset.
            opened = [await asyncio.open_connection(*address(w.proxy_url)) for _ in range(5)]
            answers = []
            for reader, writer in opened:
                async with asyncio.timeout(10):
                    try:
                        answers.append(await reader.read())
                    except ConnectionResetError:
                        answers.append(b"")
                writer.close()
            writers.pop().close()
        async with asyncio.timeout(10):
            while True:
                # Reset while the refusals above still linger, then refused, then served.
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    _, writer, status, _ = await exchange(w.proxy_url, request())
                    writer.close()
                    if status == 200:
                        break
                await asyncio.sleep(0.05)
    assert [a.startswith(b"HTTP/1.1 503") for a in answers] == [True, True, False, False, False]


async def test_a_stopping_listener_resets_the_refusals_still_lingering(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(tmp_path, llm.url, limits={"max_connections": 1})
    async with Warden(config) as w, held(w.proxy_url, 1):
        silent = await asyncio.open_connection(*address(w.proxy_url))
        await asyncio.sleep(0.1)  # accepted and refused; it waits for a request head
        started = asyncio.get_running_loop().time()
        await w.stop()
        stopped = asyncio.get_running_loop().time() - started
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError):
                assert await silent[0].read() == b""  # reset or closed, no 503 owed
        silent[1].close()
    assert stopped < connection_cap.REFUSAL_LINGER_S


async def idle(url: str, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections that send nothing, accepted by the listener at ``url``."""
    opened = [await asyncio.open_connection(*address(url)) for _ in range(count)]
    await asyncio.sleep(0.3)  # accepted on the listener's side
    return opened


async def test_the_grpc_listener_has_the_cap_too(tmp_path: Path, llm: MockLLM) -> None:
    # gRPC took any number of connections: idle ones used up the descriptors the
    # proxy needed to accept, and agents timed out.
    config = make_config(
        tmp_path, llm.url, listen={"grpc": "127.0.0.1:0"}, limits={"max_connections": 2}
    )

    async def check(channel: grpc.aio.Channel) -> bool:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return True

    async with Warden(config) as w:
        # A connection of its own per channel, as separate clients have.
        own = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(w.grpc_address, options=own) for _ in range(3)]
        try:
            served = [await check(channel) for channel in channels]
            raw_reader, raw_writer = await asyncio.open_connection(
                *address("http://" + w.grpc_address)
            )
            async with asyncio.timeout(10):
                closed = await raw_reader.read() == b""
            raw_writer.close()
            await channels[0].close()
            for _ in range(100):  # the freed place is seen once gRPC closes its side
                if freed := await check(channels[2]):
                    break
                await asyncio.sleep(0.1)
        finally:
            for channel in channels:
                await channel.close()
    assert served == [True, True, False]
    assert closed
    assert freed


async def test_the_transparent_listener_has_the_cap_too(tmp_path: Path, llm: MockLLM) -> None:
    config = transparent_config(tmp_path, llm.url, limits={"max_connections": 2})
    async with Warden(config) as w:
        url = "http://" + w.transparent_address
        before = refused("transparent")
        held_open = await idle(url, 2)
        reader, writer = await asyncio.open_connection(*address(url))
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""  # closed at once
        writer.close()
        assert refused("transparent") - before == 1
        for _, other in held_open:
            other.close()
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection(*address(url))
        writer.write(b"GET http://unknown.example/ HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n")
        writer.close()
    assert answer.startswith(b"HTTP/1.1 ")


async def test_a_client_leaving_mid_body_is_no_internal_error(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async with Warden(make_config(tmp_path, llm.url)) as w:
        for _ in range(3):
            reader, writer = await asyncio.open_connection(*address(w.proxy_url))
            writer.write(request()[:-10])  # the body's last bytes never come
            await writer.drain()
            writer.transport.abort()
        await asyncio.sleep(0.3)
        _, writer, status, _ = await exchange(w.proxy_url, request())
        writer.close()
    assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_unreadable_body_is_answered_with_the_connection_closed(
    tmp_path: Path, llm: MockLLM
) -> None:
    # aiohttp cannot read past the rest of the body: the answer said keep-alive, and
    # the client's next request on the connection failed.
    async with Warden(make_config(tmp_path, llm.url)) as w:
        raw = request().replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n", 1)
        reader, writer, status, _ = await exchange(w.proxy_url, raw)
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert status == 400
    assert rest == b""  # closed after the answer, as its Connection header says


async def test_idle_clients_leave_the_transparent_listener_after_the_idle_timeout(
    tmp_path: Path, llm: MockLLM
) -> None:
    # mitmproxy's own timeout (600 s) kept idle clients' places under the cap.
    limits = {"max_connections": 2, "idle_timeout_s": 1}
    async with Warden(transparent_config(tmp_path, llm.url, limits=limits)) as w:
        url = "http://" + w.transparent_address
        held_open = await idle(url, 2)
        try:
            await asyncio.sleep(2.5)
            reader, writer = await asyncio.open_connection(*address(url))
            writer.write(b"GET http://unknown.example/ HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
            try:
                async with asyncio.timeout(10):
                    answer = await reader.readuntil(b"\r\n")
            finally:
                writer.close()
        finally:
            for _, other in held_open:
                other.close()
    assert answer.startswith(b"HTTP/1.1 ")
