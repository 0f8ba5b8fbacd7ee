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
of the server, and also when more than one configuration names the server
(two Anthropic ``mcp_toolset`` entries, or a toolset beside the server's own
``tool_configuration``): which one the provider honours is not Warden's to
guess. Other hosted tools are ``{"type": ..., "name": ...}``; the ones that
run code (``shell``, ``local_shell``, ``code_interpreter``) add where::

    {"type": "shell", "name": null,
     "environment": {"type": "container_auto", "container_id": null,
                     "network_policy": {"type": "allowlist",
                                        "allowed_domains": ["pypi.org"]}}}

A Responses request declares tools in ``tools``, in any ``input`` item that
carries a ``tools`` list (``additional_tools``, ``tool_search_output``, or a
type Warden does not know; an ``mcp_list_tools`` item's ``tools`` list what a
server offered, so only an entry there with a ``type`` counts), and through a
stored prompt (``prompt``), which can bring its own::

    {"type": "prompt", "name": null, "id": "pmpt_123", "version": "2"}

A Chat Completions request with ``web_search_options`` searches the web at
the provider: ``{"type": "web_search", "name": null}``.

Only these fields are read; credentials are never copied: not the
``authorization`` / ``authorization_token`` / ``headers`` of a declaration,
nor a container's ``domain_secrets``, nor the query or fragment of
``server_url`` (a URL carrying a key in its query is shown without it, so an
allowlist names ``scheme://host[:port]/path``). A URL another parser could
read another host from (user info, a backslash, whitespace, control
characters), or that is not ``http(s)``, is ``null``. A value of the wrong
type, or text JSON cannot carry, is ``null``: a policy that allows by list
then refuses it.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from warden.errors import InvalidJSON

__all__ = ["anthropic", "openai_chat", "openai_responses", "server_url"]

type Declared = tuple[dict[str, Any], ...]

# Responses tools the agent runs itself: decided when the model proposes a call.
_OPENAI_AGENT_TOOLS: Final = frozenset({"function", "custom"})

# An input item whose ``tools`` list what a server offers, not tools it declares.
_TOOL_LISTINGS: Final = frozenset({"mcp_list_tools"})

# How deep a tool's own ``tools`` (a namespace's) are read for hosted tools.
_MAX_TOOL_DEPTH: Final = 4

_HTTP_SCHEMES: Final = frozenset({"http", "https"})


def openai_responses(body: Mapping[str, Any]) -> Declared:
    """The hosted tools of an OpenAI Responses request.

    From ``tools``, from every ``input`` item carrying a ``tools`` list, and
    the stored ``prompt``. An input item whose ``tools`` is there but not a
    list is refused (:class:`InvalidJSON`): what the provider makes of it
    cannot be shown.
    """
    out = _openai_tools(body.get("tools"))
    items = body.get("input")
    for item in items if isinstance(items, list) else ():
        tools = item.get("tools") if isinstance(item, dict) else None
        if tools is None:
            continue
        if not isinstance(tools, list):
            raise InvalidJSON("the request has an input item whose tools is not a list")
        if item.get("type") in _TOOL_LISTINGS:
            # What a server offered ({name, input_schema}): only an entry with a type declares.
            tools = [tool for tool in tools if isinstance(tool, dict) and "type" in tool]
        out.extend(_openai_tools(tools))
    prompt = body.get("prompt")
    if prompt is not None:
        out.append(_prompt(prompt))
    return tuple(out)


def openai_chat(body: Mapping[str, Any]) -> Declared:
    """The hosted tools of a Chat Completions request: ``web_search_options`` (any value)."""
    if "web_search_options" in body:
        return ({"type": "web_search", "name": None},)
    return ()


def _openai_tools(tools: object, depth: int = 0) -> list[dict[str, Any]]:
    """The entries for a Responses ``tools`` list (top level, or an input item's)."""
    out: list[dict[str, Any]] = []
    if not isinstance(tools, list):
        return out
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
            entry: dict[str, Any] = {"type": _text(kind), "name": _text(tool.get("name"))}
            if kind in _EXECUTION:
                entry["environment"] = _EXECUTION[kind](tool)
            out.append(entry)
        # A namespace groups function tools; anything hosted inside one is shown too.
        if depth < _MAX_TOOL_DEPTH:
            out.extend(_openai_tools(tool.get("tools"), depth + 1))
    return out


def _prompt(prompt: object) -> dict[str, Any]:
    """A stored prompt: it can bring tools and instructions the request does not show."""
    fields = prompt if isinstance(prompt, dict) else {}
    return {
        "type": "prompt",
        "name": None,
        "id": _text(fields.get("id")),
        "version": _text(fields.get("version")),
    }


def _environment(
    kind: str | None, container_id: object = None, network: object = None
) -> dict[str, Any]:
    return {
        "type": kind,
        "container_id": _text(container_id),
        "network_policy": _network_policy(network),
    }


def _local_shell(tool: Mapping[str, Any]) -> dict[str, Any]:
    return _environment("local")


def _shell(tool: Mapping[str, Any]) -> dict[str, Any]:
    """``environment``: ``local``, ``container_auto`` or ``container_reference``, as sent."""
    env = tool.get("environment")
    if not isinstance(env, dict):
        return _environment(None)  # none named (or unreadable): the provider's default
    return _environment(_text(env.get("type")), env.get("container_id"), env.get("network_policy"))


def _code_interpreter(tool: Mapping[str, Any]) -> dict[str, Any]:
    """``container``: a container's id, or ``{"type": "auto", ...}`` for a new one."""
    container = tool.get("container")
    if isinstance(container, str):
        return _environment("container_reference", container)
    if isinstance(container, dict) and container.get("type") == "auto":
        return _environment("container_auto", None, container.get("network_policy"))
    return _environment(None)


_EXECUTION: Final = {
    "local_shell": _local_shell,
    "shell": _shell,
    "code_interpreter": _code_interpreter,
}
"""The hosted tools that run code, and where each says it runs."""


def _network_policy(value: object) -> dict[str, Any] | None:
    """``{"type", "allowed_domains"}``; ``None`` when the request sets none.

    ``allowed_domains`` is ``[]`` for ``disabled`` without a list, and
    ``null`` (any) when it is not a list of text. ``domain_secrets`` are
    credentials, never read.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        return {"type": None, "allowed_domains": None}
    kind = _text(value.get("type"))
    if "allowed_domains" in value:
        domains = _names(value["allowed_domains"])
    else:
        domains = [] if kind == "disabled" else None
    return {"type": kind, "allowed_domains": domains}


def anthropic(body: Mapping[str, Any]) -> Declared:
    """The MCP servers (``mcp_servers``, MCP connector beta) and typed tools of a Messages request.

    Tools are allowed through the server's ``tool_configuration`` (the first
    connector beta) or an ``mcp_toolset`` entry in ``tools`` (the later one);
    a toolset whose ``default_config`` disables tools allows only those its
    ``configs`` enable. A server named by more than one configuration (two
    toolsets, a toolset and a ``tool_configuration``, or two ``mcp_servers``
    entries) allows any tool: the provider may honour any of them, or merge
    them.
    """
    toolsets: dict[str, list[list[str] | None]] = {}
    out: list[dict[str, Any]] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind == "mcp_toolset":
            named = _text(tool.get("mcp_server_name"))
            if named is not None:
                toolsets.setdefault(named, []).append(_toolset_allowed(tool))
        elif kind is not None and kind != "custom":
            out.append({"type": _text(kind), "name": _text(tool.get("name"))})
    given = body.get("mcp_servers")
    servers = [s for s in given if isinstance(s, dict)] if isinstance(given, list) else []
    entries = Counter(_text(server.get("name")) for server in servers)
    configured = Counter(
        _text(server.get("name"))
        for server in servers
        if server.get("tool_configuration") is not None
    )
    for server in servers:
        name = _text(server.get("name"))
        sets = toolsets.get(name, []) if name is not None else []
        allowed: list[str] | None
        if entries[name] > 1 or len(sets) + configured[name] > 1:
            allowed = None  # more than one configuration: any of them may be the one used
        elif sets:
            allowed = sets[0]
        else:
            allowed = _connector_allowed(server.get("tool_configuration"))
        out.append(_mcp(name, server.get("url"), allowed_tools=allowed))
    return tuple(out)


def server_url(value: object) -> str | None:
    """``scheme://host[:port]/path`` of an ``http(s)`` URL: no query or fragment.

    ``None`` for a URL whose host another parser could read differently:
    one with user info (``@`` before the host), a backslash (WHATWG parsers,
    Node's among them, read it as ``/``: ``https://evil.example\\@kb.example``
    is ``evil.example`` to them and ``kb.example`` to Python), whitespace,
    control or invisible formatting characters, or ``%`` in the host; and for
    any scheme but ``http`` and ``https``.
    """
    text = _text(value)
    if text is None or not _plain(text):
        return None
    try:
        parts = urlsplit(text)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _HTTP_SCHEMES or not host or "@" in parts.netloc or "%" in host:
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{scheme}://{netloc}{parts.path}"


def _plain(text: str) -> bool:
    """No backslash, whitespace, control or format character (``Cc``, ``Cf``) in ``text``."""
    return not any(
        c == "\\" or c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text
    )


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
