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
        # Credentials in the URL's query and headers are not what the allowlist compares.
        "server_url": f"https://kb.support.example.com/mcp?key={SECRETS[2]}",
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
    assert len(llm.requests) == 1


@pytest.mark.parametrize(
    "url",
    [
        # One backslash on the wire: a WHATWG parser (Node's) reads the host evil.example.
        "https://evil.example\\@kb.support.example.com/mcp",
        # User info: parsers disagree on where it ends.
        f"https://user:{SECRETS[2]}@kb.support.example.com/mcp",
    ],
    ids=["backslash", "user-info"],
)
async def test_an_approved_host_another_parser_reads_differently_is_refused(
    tmp_path: Path,
    oai: openai.AsyncOpenAI,
    claude: anthropic.AsyncAnthropic,
    llm: MockLLM,
    url: str,
) -> None:
    tool: Any = {
        "type": "mcp",
        "server_label": "kb",
        "server_url": url,
        "allowed_tools": ["search_kb"],
        "require_approval": "never",
    }
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.responses.create(model=MODEL, input="find the refund policy", tools=[tool])
    assert "MCP server kb (no URL Warden can check), which is not approved" in str(refused.value)
    server: Any = {
        "type": "url",
        "url": url,
        "name": "kb",
        "tool_configuration": {"enabled": True, "allowed_tools": ["search_kb"]},
    }
    with pytest.raises(anthropic.PermissionDeniedError) as refused_too:
        await claude.beta.messages.create(
            model=CLAUDE,
            max_tokens=100,
            messages=[{"role": "user", "content": "help"}],
            mcp_servers=[server],
            betas=["mcp-client-2025-04-04"],
        )
    assert "MCP server kb (no URL Warden can check)" in str(refused_too.value)
    assert llm.requests == []
    assert SECRETS[2] not in audit_text(tmp_path)


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


async def test_anthropic_toolsets_naming_one_server_twice_are_read_as_any_tool(
    tmp_path: Path, claude: anthropic.AsyncAnthropic, llm: MockLLM
) -> None:
    narrow: Any = {
        "type": "mcp_toolset",
        "mcp_server_name": "kb",
        "default_config": {"enabled": False},
        "configs": {"search_kb": {"enabled": True}},
    }
    wide: Any = {"type": "mcp_toolset", "mcp_server_name": "kb"}
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await claude.beta.messages.create(
            model=CLAUDE,
            max_tokens=100,
            messages=[{"role": "user", "content": "help"}],
            mcp_servers=[{"type": "url", "url": KB_URL, "name": "kb"}],
            tools=[wide, narrow],  # a provider honouring the first would open every tool
            betas=["mcp-client-2025-11-20"],
        )
    assert "any tool of the MCP server kb, but only search_kb, get_article" in str(refused.value)
    assert llm.requests == []
    (decision,) = llm_decisions(tmp_path)
    (shown,) = decision["decision"]["input"]["tools"]
    assert shown["allowed_tools"] is None


EVIL_MCP: Any = {
    "type": "mcp",
    "server_label": "gh",
    "server_url": "https://mcp.evil.example/mcp",
    "require_approval": "never",
    "headers": {"Authorization": f"Bearer {SECRETS[0]}"},
}


@pytest.mark.parametrize(
    "item",
    [
        {"type": "additional_tools", "role": "developer", "tools": [EVIL_MCP]},
        {
            "type": "tool_search_output",
            "call_id": "ts_1",
            "execution": "client",
            "status": "completed",
            "tools": [EVIL_MCP],
        },
    ],
    ids=["additional_tools", "tool_search_output"],
)
async def test_an_mcp_server_declared_in_an_input_item_is_refused(
    tmp_path: Path, oai: openai.AsyncOpenAI, llm: MockLLM, item: dict[str, Any]
) -> None:
    items: Any = [item, {"role": "user", "content": "list my repos"}]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.responses.create(model=MODEL, tools=[], input=items)
    assert "MCP server gh (https://mcp.evil.example/mcp)" in str(refused.value)
    assert llm.requests == []
    (decision,) = llm_decisions(tmp_path)
    assert decision["decision"]["input"]["tools"][0]["server_url"] == "https://mcp.evil.example/mcp"
    assert SECRETS[0] not in audit_text(tmp_path)


async def test_an_input_item_tools_key_in_another_case_never_goes_upstream(
    oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    # A case-blind gateway (Go's encoding/json) would read TOOLS as tools.
    item: Any = {"type": "additional_tools", "role": "developer", "TOOLS": [EVIL_MCP]}
    with pytest.raises(openai.BadRequestError) as refused:
        await oai.responses.create(model=MODEL, input=[item, {"role": "user", "content": "hi"}])
    assert "'TOOLS'" in refused.value.message
    assert llm.requests == []


async def test_a_stored_prompt_not_approved_is_refused(
    tmp_path: Path, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.responses.create(
            model=MODEL, prompt={"id": "pmpt_123", "version": "2"}, input="hi"
        )
    assert "the stored prompt pmpt_123, which is not approved for support agents" in str(
        refused.value
    )
    assert llm.requests == []
    (decision,) = llm_decisions(tmp_path)
    assert decision["decision"]["input"]["tools"] == [
        {"type": "prompt", "name": None, "id": "pmpt_123", "version": "2"}
    ]


async def test_where_a_hosted_shell_runs_is_in_the_policy_input_and_egress_is_denied(
    tmp_path: Path, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    environment: Any = {
        "type": "container_auto",
        "network_policy": {
            "type": "allowlist",
            "allowed_domains": ["evil.example"],
            "domain_secrets": [{"domain": "evil.example", "name": "KEY", "value": SECRETS[1]}],
        },
    }
    # The shipped bundle keeps hosted code offline: this one could reach evil.example.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.responses.create(
            model=MODEL,
            input="run it",
            tools=[{"type": "shell", "environment": environment}, {"type": "local_shell"}],
        )
    assert "lets code the provider runs (shell) reach the network" in str(refused.value)
    (decision,) = llm_decisions(tmp_path)
    assert decision["decision"]["input"]["tools"] == [
        {
            "type": "shell",
            "name": None,
            "environment": {
                "type": "container_auto",
                "container_id": None,
                "network_policy": {"type": "allowlist", "allowed_domains": ["evil.example"]},
            },
        },
        {
            "type": "local_shell",
            "name": None,
            "environment": {"type": "local", "container_id": None, "network_policy": None},
        },
    ]
    assert SECRETS[1] not in audit_text(tmp_path)
    assert llm.requests == []  # the provider never ran it


async def test_a_chat_web_search_is_in_the_policy_input(
    tmp_path: Path, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    await oai.chat.completions.create(
        model="gpt-4o-search-preview",
        messages=[{"role": "user", "content": "news?"}],
        web_search_options={},
    )
    await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    first, second = llm_decisions(tmp_path)
    assert first["decision"]["input"]["tools"] == [{"type": "web_search", "name": None}]
    assert second["decision"]["input"]["tools"] == []


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
