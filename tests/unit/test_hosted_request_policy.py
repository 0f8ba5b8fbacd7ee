"""What a model request declares, as each adapter parses it, decided by the shipped bundle.

The adapters' ``parse_request`` feeds ``input.request.tools`` (built by
:func:`warden.pipeline.policy_input`) into ``policies/customer-support``: a
request that lets the provider reach something the bundle has not approved is
denied however the request declares it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from warden.model import Action, ActionKind, Agent, Mode, RequestMeta, Stage
from warden.pipeline import GuardContext, policy_input
from warden.policy.authoring import load_policy_set
from warden.policy.worker import Evaluator
from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.base import Adapter
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter

BUNDLE = Path(__file__).resolve().parents[2] / "policies" / "customer-support"
KB_URL = "https://kb.support.example.com/mcp"  # approved, with search_kb and get_article
EVIL = {
    "type": "mcp",
    "server_label": "gh",
    "server_url": "https://mcp.evil.example/mcp",
    "require_approval": "never",
}
ADAPTERS: dict[str, Adapter] = {
    "openai.responses": OpenAIResponsesAdapter(),
    "openai.chat": OpenAIChatAdapter(),
    "anthropic": AnthropicMessagesAdapter(),
}


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    policy = load_policy_set([BUNDLE])
    return Evaluator(
        [(m.path, m.source) for m in policy.production], policy.data, "data.warden.decision"
    )


def decide(evaluator: Evaluator, protocol: str, body: dict[str, Any]) -> dict[str, Any]:
    tools = ADAPTERS[protocol].parse_request(body).tools
    action = Action(
        action_id="act_1",
        agent=Agent("support-triage", "2025-01-15"),
        kind=ActionKind.LLM_CALL,
        protocol=protocol,
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/responses", tools=tools),
        tool=None,
        arguments=None,
        model="gpt-5",
    )
    doc = policy_input(action, GuardContext(mode=Mode.ENFORCE, risk="high", budget={}))
    value: dict[str, Any] = json.loads(evaluator.evaluate(doc))["expressions"][0]
    return value


@pytest.mark.parametrize(
    "item",
    [
        {"type": "additional_tools", "role": "developer", "tools": [EVIL]},
        {"type": "tool_search_output", "call_id": "ts_1", "execution": "client", "tools": [EVIL]},
    ],
    ids=["additional_tools", "tool_search_output"],
)
def test_an_mcp_server_declared_in_an_input_item_is_denied(
    evaluator: Evaluator, item: dict[str, Any]
) -> None:
    body = {"model": "gpt-5", "tools": [], "input": [item, {"role": "user", "content": "hi"}]}
    verdict = decide(evaluator, "openai.responses", body)
    assert verdict["effect"] == "deny"
    assert (
        "MCP server gh (https://mcp.evil.example/mcp), which is not approved" in verdict["reason"]
    )


def test_a_stored_prompt_is_denied_unless_approved(evaluator: Evaluator) -> None:
    body = {"model": "gpt-5", "prompt": {"id": "pmpt_123", "version": "2"}, "input": "hi"}
    verdict = decide(evaluator, "openai.responses", body)
    assert verdict["effect"] == "deny"
    assert "the stored prompt pmpt_123, which is not approved" in verdict["reason"]
    plain = decide(evaluator, "openai.responses", {"model": "gpt-5", "input": "hi"})
    assert plain["effect"] == "allow"


@pytest.mark.parametrize(
    ("protocol", "body"),
    [
        (
            "openai.responses",
            {
                "model": "gpt-5",
                "input": "hi",
                "tools": [
                    {
                        "type": "mcp",
                        "server_label": "kb",
                        "server_url": "https://evil.example\\@kb.support.example.com/mcp",
                        "allowed_tools": ["search_kb"],
                    }
                ],
            },
        ),
        (
            "anthropic",
            {
                "model": "claude",
                "max_tokens": 10,
                "messages": [],
                "mcp_servers": [
                    {
                        "type": "url",
                        "name": "kb",
                        "url": "https://evil.example\\@kb.support.example.com/mcp",
                        "tool_configuration": {"allowed_tools": ["search_kb"]},
                    }
                ],
            },
        ),
    ],
    ids=["responses", "anthropic"],
)
def test_an_approved_host_behind_a_backslash_is_denied(
    evaluator: Evaluator, protocol: str, body: dict[str, Any]
) -> None:
    verdict = decide(evaluator, protocol, body)
    assert verdict["effect"] == "deny"
    assert "MCP server kb (no URL Warden can check), which is not approved" in verdict["reason"]
    # The same server at its plain URL is approved.
    plain = json.loads(json.dumps(body).replace("evil.example\\\\@", ""))
    assert decide(evaluator, protocol, plain)["effect"] == "allow"


def test_two_anthropic_toolsets_for_one_server_are_read_as_any_tool(evaluator: Evaluator) -> None:
    narrow = {
        "type": "mcp_toolset",
        "mcp_server_name": "kb",
        "default_config": {"enabled": False},
        "configs": {"search_kb": {"enabled": True}},
    }
    body = {
        "model": "claude",
        "max_tokens": 10,
        "messages": [],
        "mcp_servers": [{"type": "url", "name": "kb", "url": KB_URL}],
        "tools": [{"type": "mcp_toolset", "mcp_server_name": "kb"}, narrow],
    }
    verdict = decide(evaluator, "anthropic", body)
    assert verdict["effect"] == "deny"
    assert "any tool of the MCP server kb" in verdict["reason"]
    body["tools"] = [narrow]
    assert decide(evaluator, "anthropic", body)["effect"] == "allow"
