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

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from warden.pointers import pointer_get

__all__ = [
    "MAX_LISTED_TOOLS",
    "MAX_WORK",
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

    def schema(self, tool: str) -> Mapping[str, Any] | None:
        """The ``inputSchema`` the server listed for ``tool``, if Warden saw one."""
        return self._schemas.get(tool)


_MAX_DEPTH: Final = 64
"""Schema levels followed (arguments nest no deeper: deeper input is refused earlier)."""

MAX_WORK: Final = 100_000
"""Schemas and property names one call's arguments may be compared with, through every
level, ``$ref`` target and ``*Of`` branch, each counted once: past it the call is taken as
malformed (:data:`TOO_COMPLEX`), so a pathological schema costs bounded work and never
waves a call through."""

TOO_COMPLEX: Final = "(a schema too complex to compare argument names with)"
"""What :meth:`DeclaredArguments.misspelled` names when the schema passed :data:`MAX_WORK`."""

_BRANCHES: Final = ("allOf", "anyOf", "oneOf")


def _misspelled(schema: Any, value: Any) -> str | None:
    """The first key of ``value`` that folds to a property ``schema`` declares at its level
    but is spelled otherwise, as a dotted path; ``None`` when there is none."""
    if not isinstance(schema, dict):
        return None
    walk = _Walk(schema)
    try:
        return _Level([schema], walk).first_misspelled(value, 0)
    except _TooComplex:
        return TOO_COMPLEX


class _TooComplex(Exception):
    pass


class _Walk:
    """One call's comparison: the tool's schema, the work left (:data:`MAX_WORK`), and each
    schema's folded property names, worked out once however many levels reach it."""

    __slots__ = ("_folded", "_targets", "left", "root")

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.left = MAX_WORK
        self._folded: dict[int, frozenset[str]] = {}
        self._targets: dict[str, Any] = {}

    def resolve(self, ref: str) -> Any:
        """What a ``$ref`` names, looked up once per call (charged by its length)."""
        if ref in self._targets:
            return self._targets[ref]
        self.charge(1 + len(ref) // 32)
        target = self._targets[ref] = _resolve(self.root, ref)
        return target

    def charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _TooComplex

    def folded(self, properties: dict[str, Any]) -> frozenset[str]:
        found = self._folded.get(id(properties))
        if found is None:
            self.charge(len(properties))
            found = frozenset(n.casefold() for n in properties if isinstance(n, str))
            self._folded[id(properties)] = found
        return found


class _Level:
    """One level of a tool's arguments, with every schema it stands for (``anyOf``
    branches, ``allOf`` parts, ``$ref`` targets: a name any of them declares is declared).

    The levels below it are worked out once per call and shared by every value at this
    level: the items of a long array cost a lookup each.
    """

    __slots__ = ("_below", "_folded", "_items", "_names", "_properties", "_views", "_walk")

    def __init__(self, schemas: list[Any], walk: _Walk) -> None:
        self._walk = walk
        self._views = _views(schemas, walk)
        self._properties = [
            props for v in self._views if isinstance(props := v.get("properties"), dict)
        ]
        self._names: Container[str]
        if len(self._properties) == 1:
            self._names = self._properties[0]  # the common case: one schema, read in place
        else:
            for declared in self._properties:
                walk.charge(len(declared))
            self._names = frozenset().union(*self._properties)
        self._folded: frozenset[str] | None = None
        self._below: dict[str, _Level] = {}
        self._items: _Level | None = None

    def first_misspelled(self, value: Any, depth: int) -> str | None:
        if depth > _MAX_DEPTH or not self._views:
            return None
        if isinstance(value, list):
            return self._first_in_items(value, depth)
        properties = self._properties
        if not isinstance(value, Mapping) or not properties:
            return None
        names = self._names
        for key, inner in value.items():
            if key in names:
                if not isinstance(inner, list | Mapping):
                    continue  # a scalar has no keys: the schemas below need not be read
                found = self._below_for(key).first_misspelled(inner, depth + 1)
                if found is not None:
                    return f"{key}.{found}"
                continue
            if isinstance(key, str) and key.casefold() in self._folded_names():
                return key
        return None

    def _folded_names(self) -> frozenset[str]:
        folded = self._folded
        if folded is None:
            parts = [self._walk.folded(declared) for declared in self._properties]
            folded = parts[0] if len(parts) == 1 else frozenset().union(*parts)
            if len(parts) > 1:
                self._walk.charge(len(folded))
            self._folded = folded
        return folded

    def _first_in_items(self, value: list[Any], depth: int) -> str | None:
        items = self._items
        if items is None:
            items = self._items = _Level([v.get("items") for v in self._views], self._walk)
        for item in value:
            if isinstance(item, list | Mapping):
                found = items.first_misspelled(item, depth + 1)
                if found is not None:
                    return found
        return None

    def _below_for(self, key: str) -> _Level:
        below = self._below.get(key)
        if below is None:
            schemas = [declared[key] for declared in self._properties if key in declared]
            below = self._below[key] = _Level(schemas, self._walk)
        return below


def _views(schemas: list[Any], walk: _Walk) -> list[dict[str, Any]]:
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
        walk.charge(1)
        out.append(current)
        ref = current.get("$ref")
        if isinstance(ref, str):
            pending.append(walk.resolve(ref))
        for branch in _BRANCHES:
            parts = current.get(branch)
            if isinstance(parts, list):
                walk.charge(len(parts))
                pending.extend(reversed(parts))
    return out


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """The schema a local ``$ref`` (``#`` and a JSON pointer within the tool's schema)
    names, if any; a reference elsewhere is not fetched."""
    if not ref.startswith("#"):
        return None
    found, value = pointer_get(root, ref[1:])
    return value if found else None


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
