"""The argument names a model request (or an MCP server's listing) declares for each tool.

A request's function tools carry a JSON Schema of their arguments
(``parameters`` / ``input_schema``). A call whose argument ``Amount`` folds to
the declared ``amount`` is read by a Go or .NET tool as ``amount`` (their JSON
binders match names case-blind), while a policy that reads
``input.arguments.amount`` finds nothing there and may allow a refund it would
have held. Such a call is malformed, like one with a key given twice.

The comparison follows the schema down: ``properties`` of nested objects,
and ``items`` of arrays (``refund.Amount`` is refused where ``refund`` declares
``amount``), through local ``$ref`` targets (``#/$defs/Refund``, as pydantic,
zod and FastMCP write nested models) and the branches of ``anyOf``,
``oneOf`` and ``allOf`` (a name any branch declares is declared; a key that
folds to one of them and matches none is refused). A ``$ref`` to another
document is not fetched: its keys keep any spelling. An MCP server
declares its tools in ``tools/list`` answers, which the MCP doors learn from
as they pass. The request's tools are kept as sent and read only when a call
is decided, so a request without calls in its answer costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
        """An argument key that folds to a name ``tool`` declares but is spelled otherwise
        (``refund.Amount`` for one in a nested object)."""
        return _misspelled(self._schema(tool), arguments)

    def _schema(self, tool: str) -> Any:
        for declaration in self.tools:
            if _at(declaration, self.name_at) == tool:
                return _at(declaration, self.schema_at)
        return None


class ListedArguments:
    """The argument names an MCP server lists for its tools, learnt from its ``tools/list`` answers.

    The server's answers are its tools' own declarations; each listing
    replaces what was known of the tools it names (pages add up). At most
    ``limit`` tools are remembered: a call to a tool past them, or to one
    never listed, is taken as it comes.
    """

    def __init__(self, limit: int = MAX_LISTED_TOOLS) -> None:
        self._schemas: dict[str, dict[str, Any]] = {}
        self._limit = limit

    def learn(self, response: Mapping[str, Any]) -> None:
        """Note the ``inputSchema`` of each tool a listing names."""
        result = response.get("result")
        tools = result.get("tools") if isinstance(result, dict) else None
        for tool in tools if isinstance(tools, list) else ():
            if not isinstance(tool, dict):
                continue
            name = tool.get("name")
            schema = tool.get("inputSchema")
            if not isinstance(name, str) or not isinstance(schema, dict):
                continue
            if not isinstance(schema.get("properties"), dict):
                continue
            if name in self._schemas or len(self._schemas) < self._limit:
                self._schemas[name] = schema

    def misspelled(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """An argument key that folds to a name listed for ``tool`` but is spelled otherwise."""
        return _misspelled(self._schemas.get(tool), arguments)


_MAX_DEPTH: Final = 64
"""Schema levels followed (arguments nest no deeper: deeper input is refused earlier)."""

_MAX_VIEWS: Final = 64
"""Schemas one level of arguments is compared with, through ``$ref`` and ``*Of`` branches."""

_BRANCHES: Final = ("allOf", "anyOf", "oneOf")


def _misspelled(schema: Any, value: Any) -> str | None:
    """The first key of ``value`` that folds to a property ``schema`` declares at its level
    but is spelled otherwise, as a dotted path; ``None`` when there is none."""
    if not isinstance(schema, dict):
        return None
    return _first_misspelled(_views(schema, schema), value, schema, 0)


def _first_misspelled(
    views: list[dict[str, Any]], value: Any, root: dict[str, Any], depth: int
) -> str | None:
    """:func:`_misspelled` against every schema ``views`` lists for one level: a name any
    of them declares is declared (``anyOf`` branches, ``allOf`` parts, ``$ref`` targets)."""
    if depth > _MAX_DEPTH or not views:
        return None
    if isinstance(value, list):
        items = _expand([v.get("items") for v in views], root)
        for item in value:
            found = _first_misspelled(items, item, root, depth + 1)
            if found is not None:
                return found
        return None
    if not isinstance(value, Mapping):
        return None
    declared = _declared(views)
    if not declared:
        return None
    folded: set[str] | None = None
    for key, inner in value.items():
        if key in declared:
            if not isinstance(inner, list | Mapping):
                continue  # a scalar has no keys: its schemas need not be expanded
            found = _first_misspelled(_expand(declared[key], root), inner, root, depth + 1)
            if found is not None:
                return f"{key}.{found}"
            continue
        if folded is None:
            folded = {name.casefold() for name in declared if isinstance(name, str)}
        if isinstance(key, str) and key.casefold() in folded:
            return key
    return None


def _declared(views: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each property name the ``views`` declare, with its schema in each that does."""
    declared: dict[str, list[Any]] = {}
    for view in views:
        properties = view.get("properties")
        if isinstance(properties, dict):
            for name, inner in properties.items():
                declared.setdefault(name, []).append(inner)
    return declared


def _expand(schemas: list[Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for schema in schemas:
        out += _views(schema, root, len(out))
        if len(out) >= _MAX_VIEWS:
            break
    return out[:_MAX_VIEWS]


def _views(schema: Any, root: dict[str, Any], already: int = 0) -> list[dict[str, Any]]:
    """``schema`` and every schema it stands for at its own level: local ``$ref`` targets
    (``#/$defs/Refund``, as pydantic and zod write nested models) and the branches of
    ``allOf``, ``anyOf`` and ``oneOf``, each once, at most :data:`_MAX_VIEWS` in all."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    pending: list[Any] = [schema]
    while pending and already + len(out) < _MAX_VIEWS:
        current = pending.pop()
        if not isinstance(current, dict) or id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        ref = current.get("$ref")
        if isinstance(ref, str):
            pending.append(_resolve(root, ref))
        for branch in _BRANCHES:
            parts = current.get(branch)
            if isinstance(parts, list):
                pending.extend(reversed(parts))
    return out


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """The schema a local ``$ref`` (a JSON pointer within the tool's schema) names, if any;
    a reference elsewhere is not fetched."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    value: Any = root
    for escaped in ref[2:].split("/"):
        token = escaped.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict):
            value = value.get(token)
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return None
    return value


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
