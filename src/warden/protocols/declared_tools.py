"""The tools a model request lets the provider run on its own side, for ``input.request.tools``.

A model request can declare remote MCP servers the provider calls itself
(the OpenAI Responses ``mcp`` tool, Anthropic's MCP connector) and other
hosted tools (web search, code execution). The calls they lead to happen at
the provider, so the one point where Warden can refuse them in advance is the
request: policies see the declarations in ``input.request.tools``. Function
tools the agent runs itself are not listed: each of their calls is decided
when the model proposes it.

Every remote MCP server becomes one entry of the same shape, whatever the
provider::

    {"type": "mcp", "name": "kb", "server_label": "kb",
     "server_url": "https://kb.example.com/mcp", "connector_id": null,
     "allowed_tools": ["search_kb"], "require_approval": "never"}

``allowed_tools`` is ``null`` when the request lets the model use every tool
of the server. Other hosted tools are ``{"type": ..., "name": ...}``.

Only these fields are read; credentials are never copied: not the
``authorization`` / ``authorization_token`` / ``headers`` of a declaration,
nor the user name, password, query or fragment of ``server_url`` (a URL
carrying a key in its query is shown without it, so an allowlist names
``scheme://host[:port]/path``). A value of the wrong type, or text JSON
cannot carry, is ``null``: a policy that allows by list then refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["anthropic", "openai_responses", "server_url"]

type Declared = tuple[dict[str, Any], ...]

# Responses tools the agent runs itself: decided when the model proposes a call.
_OPENAI_AGENT_TOOLS = frozenset({"function", "custom"})


def openai_responses(body: Mapping[str, Any]) -> Declared:
    """The hosted tools of an OpenAI Responses request (``tools``)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return ()
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind == "mcp":
            label = _text(tool.get("server_label"))
            out.append(
                _mcp(
                    label,
                    tool.get("server_url"),
                    connector_id=_text(tool.get("connector_id")),
                    allowed_tools=_openai_allowed(tool.get("allowed_tools", None)),
                    require_approval=_require_approval(tool.get("require_approval")),
                )
            )
        elif kind not in _OPENAI_AGENT_TOOLS:
            out.append({"type": _text(kind), "name": _text(tool.get("name"))})
    return tuple(out)


def anthropic(body: Mapping[str, Any]) -> Declared:
    """The MCP servers (``mcp_servers``, MCP connector beta) and typed tools of a Messages request.

    Tools are allowed through the server's ``tool_configuration`` (the first
    connector beta) or an ``mcp_toolset`` entry in ``tools`` (the later one);
    a toolset whose ``default_config`` disables tools allows only those its
    ``configs`` enable.
    """
    toolsets: dict[str, list[str] | None] = {}
    out: list[dict[str, Any]] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind == "mcp_toolset":
            server = _text(tool.get("mcp_server_name"))
            if server is not None:
                toolsets[server] = _toolset_allowed(tool)
        elif kind is not None and kind != "custom":
            out.append({"type": _text(kind), "name": _text(tool.get("name"))})
    servers = body.get("mcp_servers")
    for server in servers if isinstance(servers, list) else ():
        if not isinstance(server, dict):
            continue
        name = _text(server.get("name"))
        if name is not None and name in toolsets:
            allowed = toolsets[name]
        else:
            allowed = _connector_allowed(server.get("tool_configuration"))
        out.append(_mcp(name, server.get("url"), allowed_tools=allowed))
    return tuple(out)


def server_url(value: object) -> str | None:
    """``scheme://host[:port]/path`` of a URL: no user, password, query or fragment."""
    text = _text(value)
    if text is None:
        return None
    try:
        parts = urlsplit(text.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme.lower()}://{netloc}{parts.path}"


def _mcp(
    label: str | None,
    url: object,
    *,
    connector_id: str | None = None,
    allowed_tools: list[str] | None,
    require_approval: Any = None,
) -> dict[str, Any]:
    return {
        "type": "mcp",
        "name": label,
        "server_label": label,
        "server_url": server_url(url),
        "connector_id": connector_id,
        "allowed_tools": allowed_tools,
        "require_approval": require_approval,
    }


def _openai_allowed(value: object) -> list[str] | None:
    """``allowed_tools``: a list of names, or a filter ``{tool_names, read_only}``."""
    if isinstance(value, list):
        return _names(value)
    if isinstance(value, dict) and "tool_names" in value:
        return _names(value["tool_names"])
    # Absent, or a filter on something else (read_only): any tool may be called.
    return None


def _require_approval(value: object) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for when in ("always", "never"):
            rule = value.get(when)
            if isinstance(rule, dict):
                out[when] = {"tool_names": _names(rule.get("tool_names"))}
        return out
    return None


def _connector_allowed(config: object) -> list[str] | None:
    if not isinstance(config, dict):
        return None
    if config.get("enabled") is False:
        return []
    if "allowed_tools" in config:
        return _names(config["allowed_tools"])
    return None


def _toolset_allowed(toolset: Mapping[str, Any]) -> list[str] | None:
    default = toolset.get("default_config")
    configs = toolset.get("configs")
    if not (isinstance(default, dict) and default.get("enabled") is False):
        return None  # every tool the server has, except any disabled one by one
    enabled = [
        name
        for name, config in (configs.items() if isinstance(configs, dict) else ())
        if isinstance(config, dict) and config.get("enabled") is True
    ]
    return _names(enabled)


def _names(value: object) -> list[str] | None:
    """Tool names, or ``None`` (read as: any tool) when they are not a list of text."""
    if not isinstance(value, list):
        return None
    names = [name for item in value if (name := _text(item)) is not None]
    return names if len(names) == len(value) else None


def _text(value: object) -> str | None:
    """``value`` when it is text the policy engine can take exactly (no lone surrogates)."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value
