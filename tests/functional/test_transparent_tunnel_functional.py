"""``unknown_hosts: tunnel`` is not an open proxy: a tunnel goes to a public address only.

Warden's own admin listener, loopback servers and names that resolve to
loopback are refused, whether asked for by ``CONNECT`` or by plain HTTP, and
the address checked is the address connected to. Tests may only send traffic
to loopback, so that a public address is allowed is shown by the unit tests of
the classifier (tests/unit/test_transparent_rules.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
import pytest

from tests.functional.conftest import audit_records
from tests.functional.test_transparent_hosts_functional import CountingServer, metric
from tests.functional.test_transparent_sdk_functional import MESSAGES, transparent_config
from warden.ingress import transparent
from warden.server import Warden
from warden.testing import MockLLM, Reply

# A public address (example.com's, once): what a rebinding name first answers. Nothing
# ever connects to it, the check that follows turns the name down.
PUBLIC = "93.184.215.14"


def tunnel_config(tmp_path: Path, llm: MockLLM, **section: Any) -> Any:
    return transparent_config(tmp_path, llm.url, transparent={"unknown_hosts": "tunnel", **section})


async def raw_connect(proxy: str, target: str) -> tuple[bytes, bytes]:
    """``CONNECT target``, then ``GET /metrics`` in the tunnel: the status line of each
    (empty when the proxy closed the connection instead)."""
    host, _, port = proxy.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        while await asyncio.wait_for(reader.readline(), 10) not in (b"\r\n", b""):
            pass  # the rest of the CONNECT answer's head
        inner = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await writer.drain()
            inner = await asyncio.wait_for(reader.readline(), 10)
        return status, inner
    finally:
        writer.close()


async def test_connect_to_wardens_own_admin_listener_is_refused(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async with Warden(tunnel_config(tmp_path, llm)) as warden:
        admin_port = urlsplit(warden.admin_url).port
        before = metric(
            "warden_transparent_connections_total",
            host="127.0.0.1",
            mode="regular",
            verdict="refused",
        )
        with caplog.at_level(logging.WARNING, logger="warden.transparent"):
            # An address, an IPv6 one, and a name that resolves to loopback.
            for target in (
                f"127.0.0.1:{admin_port}",
                f"[::1]:{admin_port}",
                f"localhost:{admin_port}",
            ):
                status, inner = await raw_connect(warden.transparent_address, target)
                assert status.startswith(b"HTTP/1.1 403"), (target, status)
                assert not inner.startswith(b"HTTP/1.1 200"), (target, inner)
        after = metric(
            "warden_transparent_connections_total",
            host="127.0.0.1",
            mode="regular",
            verdict="refused",
        )
    assert after == before + 1
    logged = [r.getMessage() for r in caplog.records if r.name == "warden.transparent"]
    assert any(
        f"refused CONNECT to 127.0.0.1:{admin_port}" in line and "is loopback" in line
        for line in logged
    ), logged


async def test_plain_http_to_loopback_is_refused(tmp_path: Path, llm: MockLLM) -> None:
    async with (
        CountingServer() as fake,
        Warden(tunnel_config(tmp_path, llm)) as warden,
        httpx2.AsyncClient(proxy=f"http://{warden.transparent_address}") as client,
    ):
        before = metric(
            "warden_transparent_requests_total", host="127.0.0.1", mode="regular", verdict="refused"
        )
        for url in (
            f"http://127.0.0.1:{fake.port}/",
            f"{warden.admin_url}/metrics",
            f"http://localhost:{fake.port}/",
        ):
            refused = await client.get(url)
            assert refused.status_code == 403, url
            assert refused.json()["code"] == "destination_not_allowed"
            detail = refused.json()["detail"]
            assert urlsplit(url).hostname in detail
        # The agent is not told what a name resolves to (the log line says it).
        assert "127.0.0.1" not in detail
        assert "::1" not in detail
        after = metric(
            "warden_transparent_requests_total", host="127.0.0.1", mode="regular", verdict="refused"
        )
    assert after == before + 2
    assert fake.connections == 0


async def test_private_networks_open_up_but_loopback_stays_refused(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        CountingServer() as fake,
        Warden(tunnel_config(tmp_path, llm, tunnel_private_networks=True)) as warden,
        httpx2.AsyncClient(proxy=f"http://{warden.transparent_address}") as client,
    ):
        refused = await client.get(f"http://127.0.0.1:{fake.port}/")
    assert refused.status_code == 403
    assert fake.connections == 0


def _tls_hello_through(proxy: str, target: str, sni: str) -> bytes:
    """CONNECT, then a TLS handshake naming ``sni``: the CONNECT answer's status line."""
    host, _, port = proxy.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += raw.recv(4096)
        if head.startswith(b"HTTP/1.1 200"):
            with contextlib.suppress(OSError):
                ssl.create_default_context().wrap_socket(raw, server_hostname=sni).close()
        return head.split(b"\r\n", 1)[0]


async def test_a_name_that_rebinds_to_loopback_is_refused_at_connect(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS answers a public address to the ``CONNECT`` check, loopback a moment later:
    ``server_connect`` resolves again and opens nothing."""
    real = transparent._resolve
    answers = [[PUBLIC]]

    async def rebinding(host: str, port: int) -> list[str]:
        return answers.pop() if answers else await real(host, port)

    monkeypatch.setattr(transparent, "_resolve", rebinding)
    async with CountingServer() as fake, Warden(tunnel_config(tmp_path, llm)) as warden:
        status = await asyncio.to_thread(
            _tls_hello_through, warden.transparent_address, f"localhost:{fake.port}", "localhost"
        )
    assert status.startswith(b"HTTP/1.1 200")  # the first check was fooled
    assert fake.connections == 0


async def test_the_connection_goes_to_the_address_checked(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warden connects to the address it resolved and checked, not to the name again:
    ``localhost`` is made to resolve to 127.0.0.2 for the check (let through here, as
    a public address would be), where alone a server listens."""
    real_why = transparent._why_refused

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "localhost"
        return ["127.0.0.2"]

    def why_refused(address: str, private_allowed: bool) -> str | None:
        return None if address == "127.0.0.2" else real_why(address, private_allowed)

    monkeypatch.setattr(transparent, "_resolve", resolve)
    monkeypatch.setattr(transparent, "_why_refused", why_refused)
    async with CountingServer("127.0.0.2") as fake, Warden(tunnel_config(tmp_path, llm)) as warden:
        status = await asyncio.to_thread(
            _tls_hello_through, warden.transparent_address, f"localhost:{fake.port}", "localhost"
        )
        for _ in range(100):
            if fake.connections:
                break
            await asyncio.sleep(0.05)
    assert status.startswith(b"HTTP/1.1 200")
    assert fake.connections == 1


async def post_through(proxy: str, target: str) -> bytes:
    """``CONNECT target``, then a chat completion in plain HTTP: all that comes back."""
    host, _, port = proxy.rpartition(":")
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                answer += chunk
        return answer
    finally:
        writer.close()


async def test_a_governed_address_is_governed_however_it_is_written(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hosts`` lists the API by its address (127.0.0.1 stands in for it, let through as a
    public address would be): any other spelling of it is governed, and a name that
    resolves to it is refused; neither reaches the API undecided."""
    real_why = transparent._why_refused

    def why_refused(address: str, private_allowed: bool) -> str | None:
        loopback = ipaddress.ip_address(address).is_loopback
        return None if loopback else real_why(address, private_allowed)

    monkeypatch.setattr(transparent, "_why_refused", why_refused)
    hosts = {"api.openai.com": "openai", "127.0.0.1": "openai"}
    forms = ("2130706433", "0x7f000001", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]")
    llm.script(*(Reply(text="governed") for _ in forms))
    async with (
        CountingServer() as api,
        Warden(tunnel_config(tmp_path, llm, hosts=hosts)) as warden,
        httpx2.AsyncClient(proxy=f"http://{warden.transparent_address}") as client,
    ):
        for form in forms:
            answer = await post_through(warden.transparent_address, f"{form}:{api.port}")
            assert b"x-warden-decision-id: dec_" in answer.lower(), (form, answer[:300])
        # A name for the address (an alias of the API): by CONNECT and by plain HTTP.
        status, _ = await raw_connect(warden.transparent_address, f"localhost:{api.port}")
        assert status.startswith(b"HTTP/1.1 403"), status
        refused = await client.get(f"http://localhost:{api.port}/")
        assert refused.status_code == 403
        assert "address of a governed host" in refused.json()["detail"]
    assert api.connections == 0
    decisions = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"]
    assert len(decisions) == len(forms)


async def test_names_that_never_resolve_do_not_hold_governed_calls(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent naming hosts whose name server never answers holds only the tunnel
    lookups' own threads: a governed call, whose upstream is reached by name, goes on at
    once; past the bound on lookups in flight a tunnel is refused, not queued."""
    answered = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".slow.test"):
            answered.wait(30)  # the system resolver waiting on a silent name server
            raise socket.gaierror(socket.EAI_AGAIN, "no answer")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    by_name = llm.url.replace("127.0.0.1", "localhost")  # the upstream needs a lookup
    config = transparent_config(tmp_path, by_name, transparent={"unknown_hosts": "tunnel"})
    refused = metric("warden_transparent_lookups_refused_total")
    try:
        async with Warden(config) as warden:
            host, _, port = warden.transparent_address.rpartition(":")
            writers = []
            for i in range(transparent._LOOKUPS_QUEUED + 8):
                _, writer = await asyncio.open_connection(host, int(port))
                target = f"x{i}.slow.test:443"
                writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                writers.append(writer)
            for _ in range(100):
                if metric("warden_transparent_lookups_refused_total") > refused:
                    break
                await asyncio.sleep(0.05)
            assert metric("warden_transparent_lookups_refused_total") > refused
            async with openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as client:
                llm.script(Reply(text="on time"))
                answer = await asyncio.wait_for(
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES), 3
                )
            assert answer.choices[0].message.content == "on time"
            for writer in writers:
                writer.close()
    finally:
        answered.set()
