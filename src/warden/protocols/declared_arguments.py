"""The argument names a model request (or an MCP server's listing) declares for each tool.

A request's function tools carry a JSON Schema of their arguments
(``parameters`` / ``input_schema``). A call whose argument ``Amount`` folds to
the declared ``amount`` is read by a Go or .NET tool as ``amount`` (their JSON
binders match names case-blind), while a policy that reads
``input.arguments.amount`` finds nothing there and may allow a refund it would
have held. Such a call is malformed, like one with a key given twice.

Only the top level of ``properties`` is compared: nested schemas are the
tool's own, and the policy sees them whole. An MCP server declares its tools in
``tools/list`` answers, which the MCP doors learn from as they pass. The request's tools are kept as
sent and read only when a call is decided, so a request without calls in its
answer costs nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "MAX_LISTED_TOOLS",
    "DeclaredArguments",
    "ListedArguments",
    "anthropic",
    "openai_chat",
    "openai_responses",
]

MAX_LISTED_TOOLS: Final = 10_000
"""Tools whose listed argument names one MCP upstream's :class:`ListedArguments` keeps."""


@dataclass(frozen=True, slots=True)
class DeclaredArguments:
    """A request's tool declarations, and where each names itself and its arguments.

    ``tools`` are the request's declarations as sent (any of them may be
    malformed: those are skipped). ``name_at`` and ``schema_at`` are the paths,
    within one declaration, to the tool's name and to its arguments' schema.
    """

    tools: Sequence[Any] = ()
    name_at: tuple[str, ...] = ("name",)
    schema_at: tuple[str, ...] = ("parameters",)

    def misspelled(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """An argument key that folds to a name ``tool`` declares but is spelled otherwise."""
        declared = self._names(tool)
        return _misspelled(declared, arguments) if declared else None

    def _names(self, tool: str) -> Mapping[str, Any] | None:
        for declaration in self.tools:
            if _at(declaration, self.name_at) == tool:
                schema = _at(declaration, self.schema_at)
                properties = schema.get("properties") if isinstance(schema, dict) else None
                return properties if isinstance(properties, dict) else None
        return None


class ListedArguments:
    """The argument names an MCP server lists for its tools, learnt from its ``tools/list`` answers.

    The server's answers are its tools' own declarations; each listing
    replaces what was known of the tools it names (pages add up). At most
    ``limit`` tools are remembered: a call to a tool past them, or to one
    never listed, is taken as it comes.
    """

    def __init__(self, limit: int = MAX_LISTED_TOOLS) -> None:
        self._names: dict[str, frozenset[str]] = {}
        self._limit = limit

    def learn(self, response: Mapping[str, Any]) -> None:
        """Note the top-level ``inputSchema`` properties of each tool a listing names."""
        result = response.get("result")
        tools = result.get("tools") if isinstance(result, dict) else None
        for tool in tools if isinstance(tools, list) else ():
            if not isinstance(tool, dict):
                continue
            name = tool.get("name")
            properties = _at(tool, _MCP_PROPERTIES)
            if not isinstance(name, str) or not isinstance(properties, dict):
                continue
            if name in self._names or len(self._names) < self._limit:
                self._names[name] = frozenset(k for k in properties if isinstance(k, str))

    def misspelled(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """An argument key that folds to a name listed for ``tool`` but is spelled otherwise."""
        declared = self._names.get(tool)
        return _misspelled(declared, arguments) if declared else None


def _misspelled(declared: Collection[str], arguments: Mapping[str, Any]) -> str | None:
    for key in arguments:
        if key not in declared:
            folded = key.casefold()
            if any(folded == name.casefold() for name in declared):
                return key
    return None


def _at(value: Any, path: tuple[str, ...]) -> Any:
    for step in path:
        if not isinstance(value, dict):
            return None
        value = value.get(step)
    return value


def openai_chat(body: Mapping[str, Any]) -> DeclaredArguments | None:
    """Chat ``tools`` (``function.name``, ``function.parameters``) and legacy ``functions``."""
    tools = body.get("tools")
    functions = body.get("functions")
    declared: list[Any] = tools if isinstance(tools, list) else []
    if isinstance(functions, list) and functions:
        declared = [*declared, *({"function": f} for f in functions)]
    if not declared:
        return None
    return DeclaredArguments(declared, _CHAT_NAME, _CHAT_SCHEMA)


def openai_responses(body: Mapping[str, Any]) -> DeclaredArguments | None:
    """Responses ``tools`` of type ``function`` (``name``, ``parameters``)."""
    tools = body.get("tools")
    return DeclaredArguments(tools) if isinstance(tools, list) and tools else None


def anthropic(body: Mapping[str, Any]) -> DeclaredArguments | None:
    """Messages ``tools`` (``name``, ``input_schema``)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    return DeclaredArguments(tools, schema_at=_ANTHROPIC_SCHEMA)


_CHAT_NAME: Final = ("function", "name")
_CHAT_SCHEMA: Final = ("function", "parameters")
_ANTHROPIC_SCHEMA: Final = ("input_schema",)
_MCP_PROPERTIES: Final = ("inputSchema", "properties")
