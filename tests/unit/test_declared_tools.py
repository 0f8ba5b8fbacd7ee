"""``input.request.tools``: the hosted tools a model request declares, without credentials."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from warden.protocols import declared_tools
from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter

SECRET = "s3cret-token"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://kb.example.com/mcp", "https://kb.example.com/mcp"),
        (
            f"https://bot:{SECRET}@KB.example.com:8443/mcp?key={SECRET}#x",
            "https://kb.example.com:8443/mcp",
        ),
        ("HTTPS://[::1]:9/sse", "https://[::1]:9/sse"),
        ("not a url", None),
        ("https://", None),
        ("https://host:99999/", None),
        (7, None),
        ("https://kb.example.com/\ud800", None),
    ],
)
def test_server_urls_keep_scheme_host_port_and_path_only(url: Any, shown: str | None) -> None:
    assert declared_tools.server_url(url) == shown


def test_openai_responses_declarations() -> None:
    body = {
        "model": "gpt-4o",
        "tools": [
            {"type": "function", "name": "get_order", "parameters": {}},
            {"type": "web_search"},
            {
                "type": "mcp",
                "server_label": "kb",
                "server_url": f"https://kb.example.com/mcp?token={SECRET}",
                "headers": {"Authorization": f"Bearer {SECRET}"},
                "authorization": SECRET,
                "allowed_tools": {"tool_names": ["search_kb"], "read_only": True},
                "require_approval": {"never": {"tool_names": ["search_kb"]}, "x": 1},
            },
            {"type": "mcp", "server_label": "mail", "connector_id": "connector_gmail"},
            {
                "type": "mcp",
                "server_label": "odd",
                "server_url": "https://o.example/",
                "allowed_tools": "all",
            },
            "junk",
        ],
    }
    tools = OpenAIResponsesAdapter().parse_request(body).tools
    assert SECRET not in orjson.dumps(tools).decode()
    assert tools == (
        {"type": "web_search", "name": None},
        {
            "type": "mcp",
            "name": "kb",
            "server_label": "kb",
            "server_url": "https://kb.example.com/mcp",
            "connector_id": None,
            "allowed_tools": ["search_kb"],
            "require_approval": {"never": {"tool_names": ["search_kb"]}},
        },
        {
            "type": "mcp",
            "name": "mail",
            "server_label": "mail",
            "server_url": None,
            "connector_id": "connector_gmail",
            "allowed_tools": None,
            "require_approval": None,
        },
        {
            "type": "mcp",
            "name": "odd",
            "server_label": "odd",
            "server_url": "https://o.example/",
            "connector_id": None,
            # Not a list of names: read as the widest (any tool), never as none.
            "allowed_tools": None,
            "require_approval": None,
        },
    )


def test_anthropic_connector_declarations() -> None:
    body = {
        "model": "claude-sonnet-4-6",
        "tools": [
            {"name": "get_order", "input_schema": {}},
            {"type": "web_search_20250305", "name": "web_search"},
            {
                "type": "mcp_toolset",
                "mcp_server_name": "docs",
                "default_config": {"enabled": False},
                "configs": {"read": {"enabled": True}, "write": {"enabled": False}},
            },
        ],
        "mcp_servers": [
            {
                "type": "url",
                "url": "https://kb.example.com/mcp",
                "name": "kb",
                "authorization_token": SECRET,
                "tool_configuration": {"enabled": True, "allowed_tools": ["search_kb"]},
            },
            {
                "type": "url",
                "url": "https://off.example.com/mcp",
                "name": "off",
                "tool_configuration": {"enabled": False},
            },
            {"type": "url", "url": "https://docs.example.com/mcp", "name": "docs"},
            {"type": "url", "url": "https://all.example.com/mcp", "name": "all"},
        ],
    }
    tools = AnthropicMessagesAdapter().parse_request(body).tools
    assert SECRET not in orjson.dumps(tools).decode()
    assert tools[0] == {"type": "web_search_20250305", "name": "web_search"}
    mcp = {t["name"]: t for t in tools if t["type"] == "mcp"}
    assert mcp["kb"]["allowed_tools"] == ["search_kb"]
    assert mcp["kb"]["server_url"] == "https://kb.example.com/mcp"
    assert mcp["off"]["allowed_tools"] == []
    assert mcp["docs"]["allowed_tools"] == ["read"]
    assert mcp["all"]["allowed_tools"] is None


def test_a_request_without_hosted_tools_declares_none() -> None:
    assert OpenAIResponsesAdapter().parse_request({"model": "m", "input": "hi"}).tools == ()
    assert AnthropicMessagesAdapter().parse_request({"model": "m", "messages": []}).tools == ()
