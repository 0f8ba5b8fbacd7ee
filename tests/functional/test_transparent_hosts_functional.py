"""Transparent mode's host rules through the real proxy: deny, tunnel, pinning, readiness.

Unknown hosts are fake servers on loopback that count every connection they
get; a tunnelled host is an HTTPS server with its own trustme certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx2
import pytest
import trustme
from aiohttp import web
from prometheus_client import REGISTRY

from tests.functional.conftest import audit_records
from tests.functional.test_transparent_sdk_functional import (
    API_KEY,
    MESSAGES,
    export_ca,
    transparent_config,
)
from warden.errors import ConfigError
from warden.ingress import transparent
from warden.ingress.upstream_io import MAX_UPSTREAM_BODY
from warden.server import Warden
from warden.testing import MockLLM, Reply


class CountingServer:
    """A TCP server on loopback that counts the connections it accepts (and says nothing)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def __aenter__(self) -> CountingServer:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def trusted_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def loopback_tunnels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tunnels reach loopback: the only place tests may send traffic, standing in for
    the public hosts a tunnel may go to (Warden refuses loopback otherwise)."""
    real = transparent._why_refused

    def why_refused(address: str, private_allowed: bool) -> str | None:
        if ipaddress.ip_address(address).is_loopback:
            return None
        return real(address, private_allowed)

    monkeypatch.setattr(transparent, "_why_refused", why_refused)


@contextlib.asynccontextmanager
async def https_server(ca: trustme.CA) -> AsyncIterator[int]:
    """An HTTPS server for ``localhost`` with a trustme certificate; yields its port."""

    async def hello(_: web.Request) -> web.Response:
        return web.json_response({"hello": "from the real host"})

    app = web.Application()
    app.router.add_get("/", hello)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_unknown_hosts_are_refused_and_nothing_leaves(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        CountingServer() as fake,
        Warden(transparent_config(tmp_path, llm.url)) as warden,
    ):
        ca = export_ca(warden, tmp_path)
        proxy = f"http://{warden.transparent_address}"
        before = metric(
            "warden_transparent_connections_total",
            host="localhost",
            mode="regular",
            verdict="refused",
        )
        async with httpx2.AsyncClient(
            proxy=proxy, verify=ssl.create_default_context(cafile=ca)
        ) as c:
            for url in (f"https://127.0.0.1:{fake.port}/", f"https://localhost:{fake.port}/"):
                with pytest.raises(httpx2.ProxyError, match="403"):
                    await c.get(url)
            # Plain HTTP through the proxy: the same rule, answered in HTTP. Its
            # query (a key, as Gemini's API takes it) and the rest of its path (where
            # webhooks keep theirs) are not in the log line.
            with caplog.at_level(logging.WARNING, logger="warden.transparent"):
                refused = await c.get(f"http://localhost:{fake.port}/v1/models?key=AIza-s3cret")
                for _ in range(100):  # logged on mitmproxy's thread
                    if any("refused GET" in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.05)
        logged = [r.getMessage() for r in caplog.records if r.name == "warden.transparent"]
        assert any("refused GET /v1/... on localhost" in line for line in logged), logged
        assert not any("s3cret" in line for line in logged)
        assert refused.status_code == 403
        assert refused.json()["code"] == "host_not_governed"
        assert fake.connections == 0
        after = metric(
            "warden_transparent_connections_total",
            host="localhost",
            mode="regular",
            verdict="refused",
        )
        assert after == before + 1
        # A raw CONNECT gets the same 403 (what any client would see).
        reader, writer = await asyncio.open_connection(*warden.transparent_address.split(":"))
        writer.write(f"CONNECT 127.0.0.1:{fake.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status.startswith(b"HTTP/1.1 403")
        assert fake.connections == 0


@pytest.mark.usefixtures("loopback_tunnels")
async def test_a_tunnelled_host_is_never_decrypted(
    tmp_path: Path, llm: MockLLM, trusted_ca: trustme.CA
) -> None:
    cfg = transparent_config(tmp_path, llm.url, transparent={"unknown_hosts": "tunnel"})
    async with https_server(trusted_ca) as port, Warden(cfg) as warden:
        warden_ca = export_ca(warden, tmp_path)
        proxy = f"http://{warden.transparent_address}"
        # Trusting only the host's own CA works: the client talks TLS with the host itself.
        host_only = ssl.create_default_context()
        trusted_ca.configure_trust(host_only)
        async with httpx2.AsyncClient(proxy=proxy, verify=host_only) as c:
            response = await c.get(f"https://localhost:{port}/")
        assert response.json() == {"hello": "from the real host"}
        # Trusting only Warden's CA fails: Warden never presented a certificate of its own.
        warden_only = ssl.create_default_context(cafile=warden_ca)
        async with httpx2.AsyncClient(proxy=proxy, verify=warden_only) as c:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.get(f"https://localhost:{port}/")
        # A governed host is still governed when unknown ones are tunnelled.
        llm.script(Reply(text="governed"))
        async with httpx2.AsyncClient(proxy=proxy, verify=warden_only) as c:
            governed = await c.post(
                "https://api.openai.com/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        assert governed.headers["x-warden-decision-id"].startswith("dec_")
        assert (
            metric(
                "warden_transparent_connections_total",
                host="localhost",
                mode="regular",
                verdict="tunnelled",
            )
            >= 2
        )
    kinds = [
        (r["kind"], r["action"]["request"]["path"])
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision"
    ]
    assert kinds == [("decision", "/v1/chat/completions")]  # nothing about the tunnel


@pytest.mark.usefixtures("loopback_tunnels")
async def test_plain_http_to_a_tunnelled_host_leaves_without_wardens_headers(
    tmp_path: Path, llm: MockLLM
) -> None:
    # An HTTP stack that adds the agent's key to every request must not hand it out.
    seen: list[dict[str, str]] = []

    async def page(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/page", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = transparent_config(tmp_path, llm.url, transparent={"unknown_hosts": "tunnel"})
    try:
        async with Warden(cfg) as warden:
            proxy = f"http://{warden.transparent_address}"
            headers = {"X-Warden-Agent-Key": "wk_secret_1", "x-warden-context-ticket": "T-1"}
            async with httpx2.AsyncClient(proxy=proxy) as c:
                response = await c.get(f"http://127.0.0.1:{port}/page", headers=headers)
    finally:
        await runner.cleanup()
    assert response.text == "ok"
    assert [k for k in seen[0] if k.lower().startswith("x-warden-")] == []


def _tls_through(
    proxy: str, connect: str, ca: Path, sni: str, first: bytes, timeout: float = 10
) -> bytes:
    """CONNECT to ``connect``, then TLS naming ``sni`` (no ALPN) and ``first`` as plaintext;
    what comes back until the proxy closes (or ``timeout``)."""
    host, _, proxy_port = proxy.rpartition(":")
    with socket.create_connection((host, int(proxy_port)), timeout=timeout) as raw:
        raw.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += raw.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(ca))
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(first)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := tls.recv(65536):
                    answer += chunk
            return answer


@pytest.mark.usefixtures("loopback_tunnels")
async def test_a_decrypted_governed_connection_never_leaves_as_raw_bytes(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The agent names a governed host in TLS, so Warden decrypts; plaintext that does not
    # look like HTTP (a leading CRLF, which real servers skip) would make the proxy relay
    # raw bytes to the address the agent connected to: the real API, undecided.
    cfg = transparent_config(tmp_path, llm.url, transparent={"unknown_hosts": "tunnel"})
    request = (
        b"\r\nPOST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    async with CountingServer() as real, Warden(cfg) as warden:
        ca = export_ca(warden, tmp_path)
        await asyncio.to_thread(
            _tls_through,
            warden.transparent_address,
            f"127.0.0.1:{real.port}",
            ca,
            "api.openai.com",
            request,
        )
        assert real.connections == 0
    assert llm.requests == []
    assert not [r for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"]


async def test_a_request_with_trailers_never_stays_in_flight(tmp_path: Path, llm: MockLLM) -> None:
    # mitmproxy cannot read HTTP/1 request trailers and gives the connection up: once
    # the client goes, nothing of it may stay in flight (shutdown would wait for it).
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n"
        b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\nX-Sum: 1\r\n\r\n"
    )
    async with Warden(transparent_config(tmp_path, llm.url)) as warden:
        ca = export_ca(warden, tmp_path)
        proxy, host = warden.transparent_address, "api.openai.com:443"
        answer = await asyncio.to_thread(
            _tls_through, proxy, host, ca, "api.openai.com", request, timeout=1
        )
        assert answer == b""
        door = warden._transparent
        assert door is not None
        assert door._addon is not None
        for _ in range(100):
            if not door._addon._inflight:
                break
            await asyncio.sleep(0.05)
        assert not door._addon._inflight
    assert llm.requests == []


async def test_a_client_that_rejects_the_ca_gets_a_clear_log_line(
    tmp_path: Path, llm: MockLLM, trusted_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    async with Warden(transparent_config(tmp_path, llm.url)) as warden:
        pinned = ssl.create_default_context()
        trusted_ca.configure_trust(pinned)  # trusts (pins) some other CA, not Warden's
        async with httpx2.AsyncClient(
            proxy=f"http://{warden.transparent_address}", verify=pinned
        ) as c:
            with caplog.at_level(logging.WARNING, logger="warden.transparent"):
                with pytest.raises(httpx2.ConnectError):
                    await c.get("https://api.openai.com/v1/models")
                for _ in range(100):  # logged on mitmproxy's thread
                    if any("api.openai.com" in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "warden.transparent"]
    assert any(
        "rejected Warden's certificate for api.openai.com" in line and "pins" in line
        for line in lines
    ), lines
    assert (
        metric("warden_transparent_tls_failures_total", host="api.openai.com", mode="regular") >= 1
    )
    assert llm.requests == []


def h2_headers(stream_id: int, fields: list[tuple[str, str]], *, end_stream: bool) -> bytes:
    """An HTTP/2 HEADERS frame whose fields are HPACK literals (not indexed, no Huffman):
    written by hand, so that no client library checks or trims a value."""
    block = b""
    for name, value in fields:
        block += b"\x00"  # a literal field with a new name, not indexed
        for part in (name.encode(), value.encode()):
            assert len(part) < 127  # its length fits the one-byte prefix
            block += bytes([len(part)]) + part
    flags = 0x4 | (0x1 if end_stream else 0)  # END_HEADERS, END_STREAM
    head = len(block).to_bytes(3, "big") + bytes([0x1, flags]) + stream_id.to_bytes(4, "big")
    return head + block


async def test_an_http2_error_never_puts_a_key_in_the_log(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    # h2 fails a whole connection on a header value with whitespace around it (a key read
    # with its newline), in a message that quotes the value; mitmproxy hands that message
    # to every request in flight on the connection, a governed one here.
    request = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "api.openai.com"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
    ]
    governed = {"host": "api.openai.com", "mode": "regular", "verdict": "governed"}
    async with Warden(transparent_config(tmp_path, llm.url)) as warden:
        context = ssl.create_default_context(cafile=export_ca(warden, tmp_path))
        context.set_alpn_protocols(["h2"])
        host, _, port = warden.transparent_address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        connected = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert connected.startswith(b"HTTP/1.1 200")
        await writer.start_tls(context, server_hostname="api.openai.com")
        before = metric("warden_transparent_requests_total", **governed)
        with caplog.at_level(logging.INFO):
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5))
            key = ("authorization", f"Bearer {API_KEY}")
            writer.write(h2_headers(1, [*request, key], end_stream=False))  # its body to come
            for _ in range(100):
                if metric("warden_transparent_requests_total", **governed) > before:
                    break
                await asyncio.sleep(0.05)
            key = ("authorization", f"Bearer {API_KEY} ")
            writer.write(h2_headers(3, [*request, key], end_stream=True))
            for _ in range(100):  # logged on mitmproxy's thread
                if "failed in transparent mode" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        writer.close()
    assert "api.openai.com failed in transparent mode: HTTP/2 protocol error" in caplog.text
    assert API_KEY not in caplog.text


async def test_readyz_names_the_transparent_listener(tmp_path: Path, llm: MockLLM) -> None:
    async with (
        Warden(transparent_config(tmp_path, llm.url)) as warden,
        aiohttp.ClientSession() as http,
        http.get(f"{warden.admin_url}/readyz") as resp,
    ):
        body = await resp.json()
        address = warden.transparent_address
    assert resp.status == 200
    assert body["transparent"] == {
        "ready": True,
        "listen": address,
        "mode": "regular",
        "unknown_hosts": "deny",
    }


async def test_a_configured_ca_signs_the_host_certificates(
    tmp_path: Path, llm: MockLLM, trusted_ca: trustme.CA
) -> None:
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    trusted_ca.cert_pem.write_to_path(str(cert))
    trusted_ca.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cfg = transparent_config(
        tmp_path, llm.url, transparent={"ca_cert_file": str(cert), "ca_key_file": str(key)}
    )
    llm.script(Reply(text="signed by the configured CA"))
    async with Warden(cfg) as warden:
        assert export_ca(warden, tmp_path).read_bytes() == trusted_ca.cert_pem.bytes()
        context = ssl.create_default_context()
        trusted_ca.configure_trust(context)
        async with httpx2.AsyncClient(
            proxy=f"http://{warden.transparent_address}", verify=context
        ) as c:
            response = await c.post(
                "https://api.openai.com/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES},
            )
    assert response.status_code == 200
    assert "signed by the configured CA" in response.text


async def test_a_listener_in_use_fails_the_start_clearly(tmp_path: Path, llm: MockLLM) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = transparent_config(tmp_path, llm.url, transparent={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError, match="transparent.listen"):
            async with Warden(cfg):
                pass


async def test_a_refused_request_cannot_make_warden_hold_an_endless_body(
    tmp_path: Path, llm: MockLLM
) -> None:
    """A refused request's body is read to answer it, up to a bound, never without end.

    A chunked body that never ends (here: past the bound) is cut with an
    error; Warden keeps serving.
    """
    async with Warden(transparent_config(tmp_path, llm.url)) as warden:
        host, port = warden.transparent_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST http://not-governed.example/upload HTTP/1.1\r\n"
            b"Host: not-governed.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * (1 << 20)
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        sent = 0
        answer = b""
        # What was sent past the bound before the cut reached this side: the socket
        # buffers on both ends (several MB on loopback), more when a loaded machine
        # leaves Warden behind. A body read without end goes far past it.
        margin = 32 << 20
        with contextlib.suppress(ConnectionError):
            while sent <= MAX_UPSTREAM_BODY + margin and not answer:
                writer.write(frame)
                await writer.drain()
                sent += len(chunk)
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(1024), 0.001)
            if not answer:
                answer = await asyncio.wait_for(reader.read(1024), 10)
        writer.close()
        assert sent <= MAX_UPSTREAM_BODY + margin, "the body was read on without end"
        assert not answer.startswith(b"HTTP/1.1 403"), answer[:80]
        # Still serving.
        async with httpx2.AsyncClient(proxy=f"http://{warden.transparent_address}") as c:
            refused = await c.get("http://not-governed.example/v1/models")
        assert refused.status_code == 403
