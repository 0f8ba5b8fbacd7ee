"""Transparent mode keeps base-URL mode's limits: idle time between requests, bodies, logs.

``limits.idle_timeout_s`` is how long a connection may sit idle between
requests. mitmproxy's own idle timer also ran while a request waited for its
answer, so a held approval, a slow upstream or a pause in a stream was cut
with a bare connection error (and the SDK sent it again, to be billed again).
A request over mitmproxy's body limit got its HTML page, not the provider's
error; a refused request's whole path (a webhook's secret) was logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.functional.test_transparent_sdk_functional import (
    API_KEY,
    MESSAGES,
    REFUND,
    export_ca,
    oai_transparent,
    transparent_config,
)
from warden.config import Config
from warden.server import Warden
from warden.testing import Fault, MockLLM, Reply

IDLE = {"idle_timeout_s": 1}


def idle_config(tmp_path: Path, llm: MockLLM, **overrides: Any) -> Config:
    """A transparent listener whose connections may be idle for one second."""
    return transparent_config(tmp_path, llm.url, limits=IDLE, **overrides)


@contextlib.asynccontextmanager
async def agent(
    tmp_path: Path, llm: MockLLM, **overrides: Any
) -> AsyncIterator[openai.AsyncOpenAI]:
    """The OpenAI SDK with its default base URL, through a running Warden's proxy."""
    warden = Warden(idle_config(tmp_path, llm, **overrides))
    async with warden, oai_transparent(warden, export_ca(warden, tmp_path)) as client:
        yield client


async def tls_through_proxy(
    warden: Warden, ca: Path, host: str = "api.openai.com"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to ``host`` through the proxy's ``CONNECT``, trusting Warden's CA."""
    proxy_host, port = warden.transparent_address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(proxy_host, int(port))
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
    await writer.start_tls(ssl.create_default_context(cafile=str(ca)), server_hostname=host)
    return reader, writer


async def test_a_slow_answer_outlasts_the_idle_timeout(tmp_path: Path, llm: MockLLM) -> None:
    llm.script(Reply(text="slow answer", fault=Fault("delay", seconds=2.5)))
    async with agent(tmp_path, llm) as client:
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert answer.choices[0].message.content == "slow answer"
    assert len(llm.requests) == 1


async def test_a_pause_in_a_stream_outlasts_the_idle_timeout(tmp_path: Path, llm: MockLLM) -> None:
    llm.script(Reply(text="hi", fault=Fault("slow_stream", seconds=1.3)))
    async with agent(tmp_path, llm) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        text = "".join([c.delta.content or "" async for e in stream for c in e.choices])
    assert text == "hi"


async def test_a_held_call_outlasts_the_idle_timeout(tmp_path: Path, llm: MockLLM) -> None:
    # Nothing is sent to the agent while a non-streaming call is held for approval.
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(
        "package warden\n\nimport rego.v1\n\n"
        'decision := {"effect": "require_approval", "reason": "check it", "hold_timeout_s": 2} '
        'if input.action.kind == "tool_call"\n\n'
        'decision := {"effect": "allow"} if input.action.kind == "llm_call"\n'
    )
    llm.script(Reply(text="Refunding.", tool_calls=[REFUND]))
    held = {"policy": {"bundles": [str(policy)]}, "approvals": {"mode": "hold"}}
    async with agent(tmp_path, llm, **held) as client:
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    message = answer.choices[0].message
    assert not message.tool_calls
    assert "blocked the tool call `issue_refund`" in (message.content or "")


async def test_a_slow_upstream_is_bounded_by_its_own_timeout(tmp_path: Path, llm: MockLLM) -> None:
    llm.script(Reply(text="never", fault=Fault("hang")))
    upstreams = {"openai": {"protocol": "openai", "base_url": llm.url, "timeout_s": 2}}
    async with agent(tmp_path, llm, upstreams=upstreams) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # The provider's own error, as in base-URL mode: not a connection cut by Warden.
    assert failed.value.status_code == 504
    assert failed.value.code == "upstream_timeout"
    assert len(llm.requests) == 1


async def test_the_idle_timeout_counts_again_once_the_answer_is_out(
    tmp_path: Path, llm: MockLLM
) -> None:
    llm.script(Reply(text="slow answer", fault=Fault("delay", seconds=2)))
    async with Warden(idle_config(tmp_path, llm)) as warden:
        reader, writer = await tls_through_proxy(warden, export_ca(warden, tmp_path))
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert b"slow answer" in await reader.readexactly(length)
        # Idle between requests: closed by Warden after limits.idle_timeout_s.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_a_body_over_mitmproxys_limit_gets_the_providers_error(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with Warden(idle_config(tmp_path, llm)) as warden:
        reader, writer = await tls_through_proxy(warden, export_ca(warden, tmp_path))
        # Announced past mitmproxy's 64 MiB limit; the listener answers from the length.
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (70 << 20)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        writer.close()
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"application/json" in head.lower()
    assert b'"code":"body_too_large"' in body
    assert llm.requests == []


async def test_a_refused_requests_path_is_not_logged_past_its_first_segment(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "XXSECRETWEBHOOKTOKENXX"
    urls = (
        f"http://hooks.slack.com/services/T0AAAA/B0BBBB/{secret}",
        f"http://api.telegram.org/bot123456:{secret}/sendMessage?chat_id=1",
        "http://ntfy.sh/SECRETSHORTKEY1",  # a lone short segment: a topic that is a key
    )
    async with Warden(idle_config(tmp_path, llm)) as warden:
        host, port = warden.transparent_address.rsplit(":", 1)
        with caplog.at_level(logging.WARNING, logger="warden.transparent"):
            for url in urls:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(
                    f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
                    "Content-Length: 2\r\n\r\n{}".encode()
                )
                assert (await reader.readline()).startswith(b"HTTP/1.1 403 ")
                writer.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "warden.transparent"]
    refused = [line for line in lines if line.startswith("refused POST")]
    assert refused == [
        "refused POST /services/... on hooks.slack.com: not a governed host",
        "refused POST /... on api.telegram.org: not a governed host",
        "refused POST /... on ntfy.sh: not a governed host",
    ]
    assert not [line for line in lines if secret in line or "SECRETSHORTKEY1" in line]
