"""Upstream keys Warden holds: the agent's SDK carries a placeholder, the upstream sees Warden's.

Real servers on loopback: the openai and anthropic SDKs against the mock LLM,
the official MCP client against the test MCP server, a plain aiohttp client
against an HTTP tool API; ``warden serve`` in a subprocess for the start check.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import httpx2
import openai
import pytest
import trustme
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.functional.conftest import make_config
from tests.functional.test_envoy_authz_functional import BUNDLE as AUTHZ_BUNDLE
from tests.functional.test_envoy_authz_functional import READER
from tests.functional.test_envoy_authz_functional import _request as authz_request
from tests.functional.test_envoy_proc_functional import OPENAI_HOST, Envoy
from warden import credentials
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing._server import LoopbackServer
from warden.testing.mcp_server import StreamableHttpServer

pytestmark = pytest.mark.timeout(60)

HELD = "sk-held-by-warden-7f3a9c"
AGENT_PLACEHOLDER = "sk-agent-placeholder"
MESSAGES: Any = [{"role": "user", "content": "help"}]


def held_config(tmp_path: Path, llm_url: str, **upstreams: dict[str, Any]) -> Any:
    base = {
        "openai": {
            "protocol": "openai",
            "base_url": llm_url,
            "timeout_s": 5,
            "credential": {"env": "WARDEN_TEST_OPENAI_KEY"},
        },
        "anthropic": {
            "protocol": "anthropic",
            "base_url": llm_url,
            "timeout_s": 5,
            "credential": {"env": "WARDEN_TEST_ANTHROPIC_KEY"},
        },
    }
    return make_config(tmp_path, llm_url, upstreams={**base, **upstreams})


def audit_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (tmp_path / "audit").rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_TEST_OPENAI_KEY", HELD)
    monkeypatch.setenv("WARDEN_TEST_ANTHROPIC_KEY", HELD + "-ant")


async def test_sdks_with_a_placeholder_reach_the_provider_with_wardens_key(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    llm.script(
        Reply(text="Looking it up.", tool_calls=[Call("search_kb", {"query": "reset"})]),
        Reply(text="Done."),
        Reply(text="Hi."),
    )
    async with Warden(held_config(tmp_path, llm.url)) as warden:
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key=AGENT_PLACEHOLDER, max_retries=0
        ) as client:
            reply = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert reply.choices[0].message.tool_calls
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
            async for _ in stream:
                pass
        # The anthropic SDK with its key and a bearer token too: neither goes upstream.
        async with anthropic.AsyncAnthropic(
            base_url=f"{warden.proxy_url}/anthropic",
            api_key=AGENT_PLACEHOLDER,
            default_headers={"Authorization": f"Bearer {AGENT_PLACEHOLDER}"},
            max_retries=0,
        ) as claude:
            message = await claude.messages.create(
                model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES
            )
            assert message.content
    openai_sent = [r.headers for r in llm.requests[:2]]
    for headers in openai_sent:
        assert headers.getall("Authorization") == [f"Bearer {HELD}"]
    anthropic_sent = llm.requests[2].headers
    assert anthropic_sent.getall("x-api-key") == [HELD + "-ant"]
    assert "Authorization" not in anthropic_sent
    for request in llm.requests:
        assert AGENT_PLACEHOLDER not in str(dict(request.headers))
    # Never recorded, never logged.
    assert HELD.encode() not in audit_bytes(tmp_path)
    assert HELD not in caplog.text
    assert "identity.require_proof is off" in caplog.text  # the start warns who can use it


async def test_an_mcp_server_sees_wardens_key_for_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with StreamableHttpServer(tmp_path / "calls.jsonl") as server:
        mcp_upstream = {
            "protocol": "mcp",
            "base_url": server.url,
            "timeout_s": 30,
            "credential": {"env": "WARDEN_TEST_MCP_KEY", "header": "X-Api-Key"},
        }
        monkeypatch.setenv("WARDEN_TEST_MCP_KEY", "mcp-held-key")
        config = held_config(tmp_path, "http://127.0.0.1:9", tools=mcp_upstream)
        async with Warden(config) as warden:
            agent = {"X-Api-Key": "agent-forged", "Authorization": "Bearer agent-own"}
            async with (
                httpx2.AsyncClient(headers=agent, timeout=httpx2.Timeout(30)) as http,
                streamable_http_client(f"{warden.proxy_url}/tools", http_client=http) as (rd, wr),
                ClientSession(rd, wr) as session,
            ):
                await session.initialize()
                result = await session.call_tool("search_kb", {"query": "reset password"})
                assert not result.is_error
        seen = server.request_headers
        assert len(seen) >= 3  # initialize, initialized, tools/call (and the DELETE at close)
        for headers in seen:
            assert headers.get("x-api-key") == "mcp-held-key"
            assert "authorization" not in headers
    assert b"mcp-held-key" not in audit_bytes(tmp_path)


class Orders(LoopbackServer):
    """An HTTP tool API that answers 401 unless it gets its own token."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str | None] = []
        self.token = "orders-token-1"

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/orders/{order_id}", self._get)

    async def _get(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization")
        self.tokens.append(token)
        if token != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"order": request.match_info["order_id"]})


@asynccontextmanager
async def orders_api() -> AsyncIterator[Orders]:
    async with Orders() as server:
        yield server


async def test_a_rotated_key_file_is_used_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(credentials, "CHECK_INTERVAL_S", 0.05)
    key_file = tmp_path / "orders.key"
    key_file.write_text("orders-token-1\n")
    routes = [{"method": "GET", "path": "/orders/{order_id}", "tool": "get_order"}]
    async with orders_api() as orders:
        upstream = {
            "protocol": "http",
            "base_url": orders.url,
            "timeout_s": 5,
            "routes": routes,
            "credential": {"file": str(key_file)},
        }
        config = held_config(tmp_path, "http://127.0.0.1:9", orders=upstream)
        async with Warden(config) as warden, aiohttp.ClientSession() as http:

            async def get_order() -> int:
                url = f"{warden.proxy_url}/orders/orders/A-1001"
                async with http.get(url, headers={"Authorization": "Bearer nope"}) as resp:
                    return resp.status

            assert await get_order() == 200
            # The Secret is rotated: the API takes only the new token, Warden follows.
            orders.token = "orders-token-2"
            key_file.write_text("orders-token-2\n")
            for _ in range(100):
                if await get_order() == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the rotated key was never used")
            # Emptied by mistake: the last key stays in use.
            key_file.write_text("")
            await asyncio.sleep(0.3)
            assert await get_order() == 200
    assert "Bearer nope" not in orders.tokens
    assert set(orders.tokens) <= {"Bearer orders-token-1", "Bearer orders-token-2"}
    assert "orders-token" not in caplog.text
    assert "the last key stays in use" in caplog.text


ENVOY = "envoy.mesh.test"
"""The name of Envoy's client certificate, as ``grpc.envoy_peers`` gives it."""


class Mesh:
    """mTLS for Warden's gRPC listener: a CA, Warden's certificate, and clients' channels."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1")
        paths = {k: tmp_path / f"grpc-{k}.pem" for k in ("cert", "key", "client_ca")}
        server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
        server.private_key_pem.write_to_path(str(paths["key"]))
        self.ca.cert_pem.write_to_path(str(paths["client_ca"]))
        self.grpc = {"tls": {k: str(v) for k, v in paths.items()}, "envoy_peers": [ENVOY]}

    def channel(self, address: str, name: str) -> grpc.aio.Channel:
        """A channel whose client certificate is named ``name``."""
        client = self.ca.issue_cert(name)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem.bytes(),
            private_key=client.private_key_pem.bytes(),
            certificate_chain=client.cert_chain_pems[0].bytes(),
        )
        return grpc.aio.secure_channel(address, creds)


async def test_envoy_is_told_to_send_wardens_key_through_the_mesh(
    tmp_path: Path, llm: MockLLM
) -> None:
    llm.script(Reply(text="Hi."))
    mesh = Mesh(tmp_path)
    config = held_config(tmp_path, llm.url)
    config = config.model_copy(
        update={
            "listen": config.listen.model_copy(update={"grpc": "127.0.0.1:0"}),
            "grpc": config.grpc.model_validate({**config.grpc.model_dump(), **mesh.grpc}),
        }
    )
    async with Warden(config) as warden, mesh.channel(warden.grpc_address, ENVOY) as channel:
        envoy = Envoy(ext_proc_grpc.ExternalProcessorStub(channel), llm.url)
        # Envoy hands headers over in lower case, as HTTP/2 carries them.
        agent = {"authorization": f"Bearer {AGENT_PLACEHOLDER}", "openai-project": "proj-x"}
        ask = {"model": "gpt-4.1", "messages": MESSAGES}
        answer = await envoy.request(OPENAI_HOST, "/v1/chat/completions", ask, headers=agent)
        assert answer.status == 200
    sent = llm.requests[-1].headers
    assert sent.getall("Authorization") == [f"Bearer {HELD}"]
    assert "OpenAI-Project" not in sent


@pytest.mark.parametrize("caller", ["agent certificate", "plaintext"])
async def test_only_a_named_envoy_is_told_wardens_key(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture, caller: str
) -> None:
    """An agent with a client certificate of the same CA (for the Governance API), or any
    caller of a listener without mTLS, speaks ext_proc and ext_authz just as well."""
    caplog.set_level(logging.WARNING, logger="warden")
    mesh = Mesh(tmp_path)
    config = held_config(tmp_path, llm.url)
    grpc_section = mesh.grpc if caller == "agent certificate" else {}
    config = config.model_copy(
        update={
            "listen": config.listen.model_copy(update={"grpc": "127.0.0.1:0"}),
            "grpc": config.grpc.model_validate({**config.grpc.model_dump(), **grpc_section}),
        }
    )
    async with Warden(config) as warden:
        if caller == "plaintext":
            channel = grpc.aio.insecure_channel(warden.grpc_address)
        else:
            channel = mesh.channel(warden.grpc_address, "refunds-bot.agents.test")
        async with channel:
            envoy = Envoy(ext_proc_grpc.ExternalProcessorStub(channel), llm.url)
            ask = {"model": "gpt-4.1", "messages": MESSAGES}
            answer = await envoy.request(OPENAI_HOST, "/v1/chat/completions", ask)
    assert answer.status == 403
    assert HELD not in repr(answer)
    assert "grpc.envoy_peers" in answer.body.decode()
    assert llm.requests == []
    if caller == "plaintext":
        assert "grpc.envoy_peers names no Envoy" in caplog.text


async def test_envoy_ext_authz_forwards_an_allowed_request_with_wardens_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_TEST_ORDERS_KEY", "orders-held-key")
    mesh = Mesh(tmp_path)
    orders = {
        "protocol": "http",
        "base_url": "http://127.0.0.1:9",
        "credential": {"env": "WARDEN_TEST_ORDERS_KEY"},
    }
    config = make_config(
        tmp_path,
        "http://127.0.0.1:9",
        listen={"grpc": "127.0.0.1:0"},
        grpc=mesh.grpc,
        upstreams={"orders": orders},
        ext_authz={"upstream": "orders"},
        policy={"bundles": [str(AUTHZ_BUNDLE)], "workers": 1, "watch": False},
    )
    agent = {**READER, "x-api-key": "agent-own"}
    async with Warden(config) as warden:
        async with mesh.channel(warden.grpc_address, ENVOY) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            checks = [stub.Check(authz_request("GET", "/orders/A-1", agent)) for _ in range(2)]
            answers = [await check for check in checks]
        async with mesh.channel(warden.grpc_address, "refunds-bot.agents.test") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            refused = await stub.Check(authz_request("GET", "/orders/A-1", agent))
    for answer in answers:  # the second from the rendered allow Warden keeps
        ok = answer.ok_response
        put = {o.header.key: (o.header.value, o.append_action) for o in ok.headers}
        overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        assert put["authorization"] == ("Bearer orders-held-key", overwrite)
        assert put["x-user-role"][0] == "reader"  # the policy's own headers stay
        assert "x-api-key" in ok.headers_to_remove
        assert "authorization" not in ok.headers_to_remove
    assert refused.denied_response.status.code == 403
    assert "orders-held-key" not in str(refused)
    assert "grpc.envoy_peers" in refused.denied_response.body


async def test_serve_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    config = tmp_path / "warden.yaml"
    credential = {"env": "NOPE_KEY"}
    upstream = {"protocol": "openai", "base_url": "http://127.0.0.1:9", "credential": credential}
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                "upstreams": {"openai": upstream},
                "audit": {"dir": str(tmp_path / "audit")},
                "state": {"url": f"sqlite:///{tmp_path}/state.db"},
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden.cli",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    said, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, said.decode()
    assert "upstreams.openai.credential.env: NOPE_KEY is not set" in said.decode()
    assert not (tmp_path / "audit").exists()  # nothing was opened
