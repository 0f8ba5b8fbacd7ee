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
    "MAX_SCHEMAS",
    "TOO_COMPLEX",
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

MAX_SCHEMAS: Final = 4096
"""Schemas one call's arguments may be compared with, through every level, ``$ref`` and
``*Of`` branch: past it the call is taken as malformed (:data:`TOO_COMPLEX`), so a
pathological schema costs bounded work and never waves a call through."""

TOO_COMPLEX: Final = "(a schema too complex to compare argument names with)"
"""What :meth:`DeclaredArguments.misspelled` names when the schema passed :data:`MAX_SCHEMAS`."""

_BRANCHES: Final = ("allOf", "anyOf", "oneOf")


def _misspelled(schema: Any, value: Any) -> str | None:
    """The first key of ``value`` that folds to a property ``schema`` declares at its level
    but is spelled otherwise, as a dotted path; ``None`` when there is none."""
    if not isinstance(schema, dict):
        return None
    budget = _Budget(MAX_SCHEMAS)
    try:
        return _Level([schema], schema, budget).first_misspelled(value, 0)
    except _TooComplex:
        return TOO_COMPLEX


class _TooComplex(Exception):
    pass


class _Budget:
    """Schemas a call may still read (:data:`MAX_SCHEMAS`)."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


class _Level:
    """One level of a tool's arguments, with every schema it stands for (``anyOf``
    branches, ``allOf`` parts, ``$ref`` targets: a name any of them declares is declared).

    What a level declares, and the levels below it, are worked out once per call and
    shared by every value at that level: the items of a long array cost a lookup each.
    """

    __slots__ = ("_below", "_budget", "_declared", "_folded", "_items", "_root", "_views")

    def __init__(self, schemas: list[Any], root: dict[str, Any], budget: _Budget) -> None:
        self._views = _views(schemas, root, budget)
        self._root = root
        self._budget = budget
        self._declared: dict[str, list[Any]] | None = None
        self._folded: frozenset[str] | None = None
        self._below: dict[str, _Level] = {}
        self._items: _Level | None = None

    def first_misspelled(self, value: Any, depth: int) -> str | None:
        if depth > _MAX_DEPTH or not self._views:
            return None
        if isinstance(value, list):
            return self._first_in_items(value, depth)
        if not isinstance(value, Mapping):
            return None
        declared = self._declared
        if declared is None:
            declared = self._declared = _declared(self._views)
        if not declared:
            return None
        for key, inner in value.items():
            if key in declared:
                if not isinstance(inner, list | Mapping):
                    continue  # a scalar has no keys: the schemas below need not be read
                found = self._below_for(key, declared).first_misspelled(inner, depth + 1)
                if found is not None:
                    return f"{key}.{found}"
                continue
            folded = self._folded
            if folded is None:
                folded = self._folded = frozenset(n.casefold() for n in declared)
            if isinstance(key, str) and key.casefold() in folded:
                return key
        return None

    def _first_in_items(self, value: list[Any], depth: int) -> str | None:
        items = self._items
        if items is None:
            items = self._items = _Level(
                [v.get("items") for v in self._views], self._root, self._budget
            )
        for item in value:
            if isinstance(item, list | Mapping):
                found = items.first_misspelled(item, depth + 1)
                if found is not None:
                    return found
        return None

    def _below_for(self, key: str, declared: dict[str, list[Any]]) -> _Level:
        below = self._below.get(key)
        if below is None:
            below = self._below[key] = _Level(declared[key], self._root, self._budget)
        return below


def _declared(views: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each property name the ``views`` declare, with its schema in each that does."""
    declared: dict[str, list[Any]] = {}
    for view in views:
        properties = view.get("properties")
        if isinstance(properties, dict):
            for name, inner in properties.items():
                if isinstance(name, str):
                    declared.setdefault(name, []).append(inner)
    return declared


def _views(schemas: list[Any], root: dict[str, Any], budget: _Budget) -> list[dict[str, Any]]:
    """``schemas`` and every schema they stand for at their own level: local ``$ref``
    targets (``#/$defs/Refund``, as pydantic and zod write nested models) and the
    branches of ``allOf``, ``anyOf`` and ``oneOf``, each once."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    pending: list[Any] = list(reversed(schemas))
    while pending:
        current = pending.pop()
        if not isinstance(current, dict) or id(current) in seen:
            continue
        seen.add(id(current))
        budget.left -= 1
        if budget.left < 0:
            raise _TooComplex
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
