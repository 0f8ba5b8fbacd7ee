"""``input.request.tools``: the hosted tools a model request declares, without credentials."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from warden.errors import InvalidJSON
from warden.protocols import declared_tools
from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter

SECRET = "s3cret-token"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://kb.example.com/mcp", "https://kb.example.com/mcp"),
        (f"https://KB.example.com:8443/mcp?key={SECRET}#x", "https://kb.example.com:8443/mcp"),
        ("HTTPS://[::1]:9/sse", "https://[::1]:9/sse"),
        ("http://kb.example.com/mcp?@evil.example", "http://kb.example.com/mcp"),
        ("not a url", None),
        ("https://", None),
        ("https://host:99999/", None),
        (7, None),
        ("https://kb.example.com/\ud800", None),
    ],
)
def test_server_urls_keep_scheme_host_port_and_path_only(url: Any, shown: str | None) -> None:
    assert declared_tools.server_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        # One backslash on the wire: WHATWG parsers (Node's) read the host evil.example,
        # Python's urlsplit kb.support.example.com.
        "https://evil.example\\@kb.support.example.com/mcp",
        "https://kb.support.example.com\\evil/mcp",
        # User info: where it ends is what parsers disagree on (and it holds credentials).
        f"https://bot:{SECRET}@kb.support.example.com/mcp",
        "https://evil.example@kb.support.example.com/mcp",
        "https://@kb.support.example.com/mcp",
        # Whitespace, control and invisible characters, anywhere.
        " https://kb.support.example.com/mcp",
        "https://kb.support.example.com/mcp ",
        "https://kb.support.example.com\t.evil.example/mcp",
        "https://kb.support.example.com/m\ncp",
        "https://kb.support.example.com\x00.evil.example/mcp",
        "https://kb.support.example.com\x7f/mcp",
        "https://kb.support.example.com\x85/mcp",
        "https://kb.support.example.com\u00a0/mcp",
        "https://kb.support.example.com\u200b.evil.example/mcp",
        "https://kb.support.example.com\u202e/mcp",
        # Escapes in the host, which WHATWG decodes and Python does not.
        "https://kb%2esupport.example.com/mcp",
        # Not http(s).
        "ftp://kb.support.example.com/mcp",
        "javascript://kb.support.example.com/%0aalert(1)",
        "file://kb.support.example.com/mcp",
        "wss://kb.support.example.com/mcp",
    ],
)
def test_a_url_parsers_could_read_differently_is_null(url: str) -> None:
    assert declared_tools.server_url(url) is None


def test_every_hosted_mcp_url_field_is_checked() -> None:
    bad = "https://evil.example\\@kb.support.example.com/mcp"
    responses = OpenAIResponsesAdapter().parse_request(
        {"model": "m", "tools": [{"type": "mcp", "server_label": "kb", "server_url": bad}]}
    )
    claude = AnthropicMessagesAdapter().parse_request(
        {"model": "m", "messages": [], "mcp_servers": [{"type": "url", "name": "kb", "url": bad}]}
    )
    assert [t["server_url"] for t in (*responses.tools, *claude.tools)] == [None, None]


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


# --- Responses: tools declared in input items --------------------------------

EVIL_MCP = {
    "type": "mcp",
    "server_label": "gh",
    "server_url": "https://mcp.evil.example/mcp",
    "require_approval": "never",
    "headers": {"Authorization": f"Bearer {SECRET}"},
}


def responses_tools(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return OpenAIResponsesAdapter().parse_request({"model": "gpt-5", **body}).tools


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
        {"type": "tools_of_a_later_api", "tools": [EVIL_MCP]},  # a type Warden does not know
        {"tools": [EVIL_MCP]},  # no type at all
    ],
    ids=["additional_tools", "tool_search_output", "unknown-type", "no-type"],
)
def test_tools_declared_in_an_input_item_are_shown_like_top_level_ones(
    item: dict[str, Any],
) -> None:
    shown = responses_tools({"tools": [], "input": [item, {"role": "user", "content": "hi"}]})
    assert shown == responses_tools({"tools": [EVIL_MCP], "input": "hi"})
    assert shown[0]["server_url"] == "https://mcp.evil.example/mcp"
    assert SECRET not in orjson.dumps(shown).decode()


def test_input_item_tools_follow_the_top_level_ones_in_order() -> None:
    kb = {"type": "mcp", "server_label": "kb", "server_url": "https://kb.example.com/mcp"}
    body = {
        "tools": [{"type": "web_search"}],
        "input": [
            {"role": "user", "content": "hi"},
            {
                "type": "additional_tools",
                "role": "developer",
                "tools": [{"type": "function", "name": "f", "parameters": {}}, kb],
            },
            {
                "type": "tool_search_output",
                "tools": [{"type": "code_interpreter", "container": "c1"}],
            },
            {"type": "additional_tools", "role": "developer", "tools": None},
            "junk",
        ],
    }
    assert [(t["type"], t["name"]) for t in responses_tools(body)] == [
        ("web_search", None),
        ("mcp", "kb"),
        ("code_interpreter", None),
    ]


def test_a_namespace_is_read_for_hosted_tools_inside_it() -> None:
    namespace = {
        "type": "namespace",
        "name": "crm",
        "description": "CRM",
        "tools": [{"type": "function", "name": "lookup"}, EVIL_MCP],
    }
    item = {"type": "tool_search_output", "tools": [namespace]}
    shown = responses_tools({"input": [item]})
    assert [(t["type"], t["name"]) for t in shown] == [("namespace", "crm"), ("mcp", "gh")]


def test_an_mcp_tool_listing_in_input_declares_only_entries_with_a_type() -> None:
    # The tools a server listed earlier, replayed: the server itself is declared in tools.
    listing = {
        "type": "mcp_list_tools",
        "id": "mcpl_1",
        "server_label": "kb",
        "tools": [{"name": "search_kb", "input_schema": {}, "annotations": None}],
    }
    assert responses_tools({"input": [listing]}) == ()
    # A listing entry has no type: one that has is a declaration, whatever the item says.
    listing["tools"] = [*listing["tools"], EVIL_MCP]
    assert [t["server_label"] for t in responses_tools({"input": [listing]})] == ["gh"]
    with pytest.raises(InvalidJSON):
        responses_tools({"input": [{**listing, "tools": {"search_kb": {}}}]})


@pytest.mark.parametrize("tools", [{"0": EVIL_MCP}, "mcp", 7, True])
def test_an_input_item_whose_tools_is_not_a_list_is_refused(tools: Any) -> None:
    with pytest.raises(InvalidJSON, match="tools is not a list"):
        responses_tools({"input": [{"type": "additional_tools", "tools": tools}]})


@pytest.mark.parametrize(
    "body",
    [
        {"input": [{"type": "additional_tools", "role": "developer", "TOOLS": [EVIL_MCP]}]},
        {"input": [{"type": "additional_tools", "Tools": [EVIL_MCP]}]},
        {"input": [{"type": "additional_tools", "tools": [{**EVIL_MCP, "SERVER_URL": "x"}]}]},
        {"input": [{"TYPE": "additional_tools", "tools": []}]},
        {
            "input": [
                {"type": "tool_search_output", "tools": [{"type": "mcp", "Allowed_Tools": []}]}
            ]
        },
        # An approval a case-blind gateway reads as yes, or as another request's.
        {
            "input": [
                {
                    "type": "mcp_approval_response",
                    "approval_request_id": "mcpr_1",
                    "approve": False,
                    "Approve": True,
                }
            ]
        },
        {"input": [{"type": "mcp_approval_response", "APPROVAL_REQUEST_ID": "mcpr_9"}]},
        {"input": [{"type": "mcp_approval_request", "id": "mcpr_1", "Arguments": "{}"}]},
    ],
    ids=[
        "TOOLS",
        "Tools",
        "SERVER_URL",
        "TYPE",
        "Allowed_Tools",
        "Approve",
        "APPROVAL_REQUEST_ID",
        "Arguments",
    ],
)
def test_an_input_item_key_spelled_in_another_case_is_refused(body: dict[str, Any]) -> None:
    # A case-blind gateway (Go's encoding/json) would read it as the key Warden did not.
    with pytest.raises(InvalidJSON, match="case-blind"):
        responses_tools(body)


# --- Responses: a stored prompt ----------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "shown"),
    [
        ({"id": "pmpt_123", "version": "2"}, {"id": "pmpt_123", "version": "2"}),
        ({"id": "pmpt_123", "variables": {"city": "Paris"}}, {"id": "pmpt_123", "version": None}),
        ({"id": "pmpt_123", "version": 2}, {"id": "pmpt_123", "version": None}),
        ({"id": 123}, {"id": None, "version": None}),
        ({}, {"id": None, "version": None}),
        ("pmpt_123", {"id": None, "version": None}),
        ([{"id": "pmpt_123"}], {"id": None, "version": None}),
    ],
)
def test_a_stored_prompt_is_shown(prompt: Any, shown: dict[str, Any]) -> None:
    assert responses_tools({"prompt": prompt, "input": "hi"}) == (
        {"type": "prompt", "name": None, **shown},
    )


def test_a_request_without_a_prompt_shows_none() -> None:
    assert responses_tools({"prompt": None, "input": "hi"}) == ()


@pytest.mark.parametrize(
    "body",
    [
        {"PROMPT": {"id": "pmpt_1"}},
        {"Prompt": {"id": "pmpt_1"}},
        {"prompt": {"id": "a", "ID": "b"}},
    ],
    ids=["PROMPT", "Prompt", "ID"],
)
def test_a_prompt_key_spelled_in_another_case_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidJSON, match="case-blind"):
        responses_tools({**body, "input": "hi"})


# --- Responses: where code runs ----------------------------------------------


def _env(kind: Any, container_id: Any = None, network: Any = None) -> dict[str, Any]:
    return {"type": kind, "container_id": container_id, "network_policy": network}


@pytest.mark.parametrize(
    ("tool", "environment"),
    [
        ({"type": "local_shell"}, _env("local")),
        ({"type": "shell", "environment": {"type": "local"}}, _env("local")),
        ({"type": "shell"}, _env(None)),  # none named: the provider's default, not assumed
        ({"type": "shell", "environment": "container_auto"}, _env(None)),
        (
            {
                "type": "shell",
                "environment": {
                    "type": "container_auto",
                    "network_policy": {
                        "type": "allowlist",
                        "allowed_domains": ["evil.example"],
                        "domain_secrets": [
                            {"domain": "evil.example", "name": "K", "value": SECRET}
                        ],
                    },
                },
            },
            _env(
                "container_auto", None, {"type": "allowlist", "allowed_domains": ["evil.example"]}
            ),
        ),
        (
            {"type": "shell", "environment": {"type": "container_auto"}},
            _env("container_auto"),
        ),
        (
            {
                "type": "shell",
                "environment": {"type": "container_auto", "network_policy": {"type": "disabled"}},
            },
            _env("container_auto", None, {"type": "disabled", "allowed_domains": []}),
        ),
        (
            {
                "type": "shell",
                "environment": {
                    "type": "container_auto",
                    "network_policy": {"type": "allowlist", "allowed_domains": "evil.example"},
                },
            },
            _env("container_auto", None, {"type": "allowlist", "allowed_domains": None}),
        ),
        (
            {"type": "shell", "environment": {"type": "container_auto", "network_policy": "open"}},
            _env("container_auto", None, {"type": None, "allowed_domains": None}),
        ),
        (
            {
                "type": "shell",
                "environment": {"type": "container_reference", "container_id": "cntr_1"},
            },
            _env("container_reference", "cntr_1"),
        ),
        (
            {"type": "code_interpreter", "container": "cntr_2"},
            _env("container_reference", "cntr_2"),
        ),
        (
            {
                "type": "code_interpreter",
                "container": {
                    "type": "auto",
                    "file_ids": ["file_1"],
                    "network_policy": {"type": "allowlist", "allowed_domains": ["pypi.org"]},
                },
            },
            _env("container_auto", None, {"type": "allowlist", "allowed_domains": ["pypi.org"]}),
        ),
        ({"type": "code_interpreter", "container": {"type": "local"}}, _env(None)),
        ({"type": "code_interpreter"}, _env(None)),
    ],
)
def test_where_a_hosted_code_tool_runs_is_shown(
    tool: dict[str, Any], environment: dict[str, Any]
) -> None:
    (shown,) = responses_tools({"tools": [tool], "input": "x"})
    assert shown == {"type": tool["type"], "name": None, "environment": environment}
    assert SECRET not in orjson.dumps(shown).decode()


def test_other_hosted_tools_keep_their_shape() -> None:
    assert responses_tools({"tools": [{"type": "web_search"}], "input": "x"}) == (
        {"type": "web_search", "name": None},
    )


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "shell", "ENVIRONMENT": {"type": "container_auto"}},
        {"type": "shell", "environment": {"type": "container_auto", "Network_Policy": {}}},
        {
            "type": "shell",
            "environment": {
                "type": "container_auto",
                "network_policy": {
                    "type": "allowlist",
                    "allowed_domains": [],
                    "ALLOWED_DOMAINS": ["x"],
                },
            },
        },
        {"type": "code_interpreter", "CONTAINER": {"type": "auto"}},
        {"type": "code_interpreter", "container": {"TYPE": "auto", "type": "auto"}},
        {"type": "shell", "environment": {"type": "container_reference", "Container_Id": "c"}},
    ],
)
def test_an_environment_key_spelled_in_another_case_is_refused(tool: dict[str, Any]) -> None:
    with pytest.raises(InvalidJSON, match="case-blind"):
        responses_tools({"tools": [tool], "input": "x"})


# --- Chat Completions: web search at the provider ----------------------------


@pytest.mark.parametrize("options", [{}, None, {"search_context_size": "low"}, "yes"])
def test_chat_web_search_options_declare_a_web_search(options: Any) -> None:
    body = {"model": "gpt-4o-search-preview", "messages": [], "web_search_options": options}
    assert OpenAIChatAdapter().parse_request(body).tools == ({"type": "web_search", "name": None},)


def test_a_chat_request_without_web_search_declares_nothing() -> None:
    assert OpenAIChatAdapter().parse_request({"model": "m", "messages": []}).tools == ()


def test_chat_web_search_options_spelled_in_another_case_is_refused() -> None:
    with pytest.raises(InvalidJSON, match="WEB_SEARCH_OPTIONS"):
        OpenAIChatAdapter().parse_request({"model": "m", "messages": [], "WEB_SEARCH_OPTIONS": {}})


# --- Anthropic: one server, several configurations ---------------------------

KB = {"type": "url", "name": "kb", "url": "https://kb.example.com/mcp"}


def _toolset(*enabled: str, server: str = "kb") -> dict[str, Any]:
    if not enabled:
        return {"type": "mcp_toolset", "mcp_server_name": server}
    return {
        "type": "mcp_toolset",
        "mcp_server_name": server,
        "default_config": {"enabled": False},
        "configs": {name: {"enabled": True} for name in enabled},
    }


def claude_allowed(servers: list[Any], tools: list[Any]) -> dict[str | None, Any]:
    body = {"model": "m", "messages": [], "mcp_servers": servers, "tools": tools}
    shown = AnthropicMessagesAdapter().parse_request(body).tools
    return {t["name"]: t["allowed_tools"] for t in shown if t["type"] == "mcp"}


@pytest.mark.parametrize(
    ("servers", "tools"),
    [
        # Whichever toolset the provider honours (or a merge), not just the last one.
        ([KB], [_toolset(), _toolset("search_kb")]),
        ([KB], [_toolset("search_kb"), _toolset()]),
        ([KB], [_toolset("search_kb"), _toolset("search_kb")]),
        # A toolset beside the server's own tool_configuration.
        ([{**KB, "tool_configuration": {"allowed_tools": ["search_kb"]}}], [_toolset("search_kb")]),
        # Two servers of one name.
        ([{**KB, "tool_configuration": {"allowed_tools": ["search_kb"]}}, KB], []),
        ([KB, {**KB, "url": "https://other.example/mcp"}], [_toolset("search_kb")]),
    ],
)
def test_a_server_named_by_several_configurations_allows_any_tool(
    servers: list[Any], tools: list[Any]
) -> None:
    body = {"model": "m", "messages": [], "mcp_servers": servers, "tools": tools}
    shown = [t for t in AnthropicMessagesAdapter().parse_request(body).tools if t["type"] == "mcp"]
    assert shown
    assert all(t["allowed_tools"] is None for t in shown)


def test_one_configuration_per_server_still_narrows_its_tools() -> None:
    docs = {"type": "url", "name": "docs", "url": "https://docs.example.com/mcp"}
    allowed = claude_allowed(
        [KB, docs, {**docs, "name": "old", "tool_configuration": {"allowed_tools": ["read"]}}],
        [_toolset("search_kb"), _toolset("read", server="docs"), _toolset("x", server="absent")],
    )
    assert allowed == {"kb": ["search_kb"], "docs": ["read"], "old": ["read"]}
