"""Remote MCP servers declared in model requests, through Warden with the official SDKs.

The OpenAI Responses ``mcp`` tool and Anthropic's MCP connector let the
provider call MCP servers itself. Policies see the declarations in
``input.request.tools`` (without their credentials), so the shipped policy
refuses a request that opens a server not on its allowlist before it reaches
the provider. The provider's ``mcp_call`` items in a response are decided like
any other call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.adversarial.wire import response_body
from tests.functional.conftest import audit_records, make_config
from warden.server import Warden
from warden.testing import MockLLM
from warden.testing.raw_upstream import RawReply, RawUpstream

MODEL = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-6"
KB_URL = "https://kb.support.example.com/mcp"  # on the shipped policy's allowlist
SECRETS = ("ghp-secret-token-1", "kb-bearer-secret-2", "query-key-3", "anthropic-mcp-token-4")


def audit_text(tmp_path: Path) -> str:
    return "\n".join(str(r) for r in audit_records(tmp_path / "audit"))


def llm_decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "decision" and r["action"]["kind"] == "llm_call"
    ]


@pytest.fixture
async def oai(warden: Warden) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def claude(warden: Warden) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


async def test_responses_request_with_an_unapproved_mcp_server_is_refused(
    tmp_path: Path, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.responses.create(
            model=MODEL,
            input="list my repos",
            tools=[
                {
                    "type": "mcp",
                    "server_label": "github",
                    "server_url": "https://mcp.github.example/mcp",
                    "require_approval": "never",
                    "headers": {"Authorization": f"Bearer {SECRETS[0]}"},
                }
            ],
        )
    message = str(refused.value)
    assert "MCP server github (https://mcp.github.example/mcp)" in message
    assert "not approved for support agents" in message
    assert llm.requests == []  # the provider never saw the request
    (decision,) = llm_decisions(tmp_path)
    assert decision["decision"]["effect"] == "deny"
    assert SECRETS[0] not in audit_text(tmp_path)


async def test_a_key_given_twice_reaches_the_provider_as_warden_read_it(
    tmp_path: Path, warden: Warden, llm: MockLLM
) -> None:
    # A provider keeping the first of two "tools" would open the MCP server that Warden,
    # reading the last, never saw: what goes upstream is Warden's own encoding instead.
    hidden = (
        '{"type": "mcp", "server_label": "github", "server_url": '
        '"https://mcp.github.example/mcp", "require_approval": "never"}'
    )
    body = f'{{"model": "{MODEL}", "input": "hi", "tools": [{hidden}], "tools": []}}'.encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{warden.proxy_url}/openai/v1/responses",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
    (sent,) = llm.requests
    assert sent.raw.count(b'"tools"') == 1
    assert sent.body["tools"] == []
    assert b"mcp.github.example" not in sent.raw
    (decision,) = llm_decisions(tmp_path)
    assert decision["decision"]["effect"] == "allow"


async def test_responses_request_with_an_approved_mcp_server_goes_through(
    tmp_path: Path, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    tool: Any = {
        "type": "mcp",
        "server_label": "kb",
        # Credentials in the URL and headers are not what the allowlist compares.
        "server_url": f"https://user:{SECRETS[2]}@kb.support.example.com/mcp?key={SECRETS[2]}",
        "allowed_tools": {"tool_names": ["search_kb"]},
        "require_approval": {"never": {"tool_names": ["search_kb"]}},
        "authorization": SECRETS[1],
    }
    response = await oai.responses.create(model=MODEL, input="find the refund policy", tools=[tool])
    assert response.output_text
    # The request reached the provider as the agent sent it, credentials included.
    (sent,) = llm.requests
    assert sent.body["tools"][0]["authorization"] == SECRETS[1]
    (decision,) = llm_decisions(tmp_path)
    assert decision["decision"]["effect"] == "allow"
    text = audit_text(tmp_path)
    assert not any(secret in text for secret in SECRETS)

    # The same server opened to all its tools is refused: only search_kb is approved.
    del tool["allowed_tools"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.responses.create(model=MODEL, input="anything", tools=[tool])
    assert "any tool of the MCP server kb, but only search_kb, get_article" in str(refused.value)


async def test_anthropic_mcp_connector_is_checked_like_the_openai_tool(
    tmp_path: Path, claude: anthropic.AsyncAnthropic, llm: MockLLM
) -> None:
    messages: Any = [{"role": "user", "content": "help"}]
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await claude.beta.messages.create(
            model=CLAUDE,
            max_tokens=100,
            messages=messages,
            mcp_servers=[
                {
                    "type": "url",
                    "url": "https://mcp.crm.example/sse",
                    "name": "crm",
                    "authorization_token": SECRETS[3],
                }
            ],
            betas=["mcp-client-2025-04-04"],
        )
    assert "MCP server crm (https://mcp.crm.example/sse)" in str(refused.value)
    assert llm.requests == []

    allowed = await claude.beta.messages.create(
        model=CLAUDE,
        max_tokens=100,
        messages=messages,
        mcp_servers=[
            {
                "type": "url",
                "url": KB_URL,
                "name": "kb",
                "authorization_token": SECRETS[3],
                "tool_configuration": {"enabled": True, "allowed_tools": ["search_kb"]},
            }
        ],
        betas=["mcp-client-2025-04-04"],
    )
    assert allowed.content
    # The later connector beta: tools are enabled through an mcp_toolset entry.
    toolset: Any = {
        "type": "mcp_toolset",
        "mcp_server_name": "kb",
        "default_config": {"enabled": False},
        "configs": {"search_kb": {"enabled": True}, "delete_article": {"enabled": True}},
    }
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await claude.beta.messages.create(
            model=CLAUDE,
            max_tokens=100,
            messages=messages,
            mcp_servers=[{"type": "url", "url": KB_URL, "name": "kb"}],
            tools=[toolset],
            betas=["mcp-client-2025-11-20"],
        )
    assert "call delete_article on the MCP server kb" in str(refused.value)
    assert len(llm.requests) == 1
    effects = [d["decision"]["effect"] for d in llm_decisions(tmp_path)]
    assert effects == ["deny", "allow", "deny"]
    assert SECRETS[3] not in audit_text(tmp_path)


async def test_the_providers_mcp_calls_are_decided_like_other_calls(tmp_path: Path) -> None:
    output = [
        {
            "type": "mcp_call",
            "id": "mcp_1",
            "server_label": "kb",
            "name": "delete_article",
            "arguments": '{"article_id": "KB-7"}',
            "output": "deleted",
            "status": "completed",
        }
    ]
    async with RawUpstream() as upstream:
        upstream.script(RawReply.json(response_body(output)))
        async with (
            Warden(make_config(tmp_path, upstream.url)) as warden,
            openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as oai,
        ):
            response = await oai.responses.create(model=MODEL, input="tidy the knowledge base")
    assert [item.type for item in response.output] == ["message"]
    assert "blocked the tool call `kb.delete_article`" in response.output_text
    (call,) = [
        r
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "decision" and r["action"]["kind"] == "mcp_call"
    ]
    assert call["decision"]["effect"] == "deny"
