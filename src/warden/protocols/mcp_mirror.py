"""The HTTP headers that mirror an MCP request's body must say what the body says.

From MCP 2026-07-28 (SEP-2243) a streamable HTTP request repeats parts of its
JSON-RPC body in headers, so that load balancers, gateways and rate limiters
can act without parsing the body: ``Mcp-Method`` (the method), ``Mcp-Name``
(the tool or prompt name, or the resource URI) and ``Mcp-Param-<Token>``
(each argument whose schema property carries ``"x-mcp-header": "<Token>"``).
Warden decides on the body. A header that says otherwise could steer whatever
acts on the headers after Warden (a router picking the backend by
``Mcp-Name``, a server that reads a value from its header) to something that
was not decided, so such a request is refused, as the spec requires of
servers, with ``-32020`` (:data:`HEADER_MISMATCH`). A header that is absent is
the server's to require.

``Mcp-Param-*`` headers are checked against the tool's schema as its server
listed it through Warden (:class:`~warden.protocols.declared_arguments.ListedArguments`);
for a tool Warden has not seen listed they cannot be checked, and are refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from multidict import CIMultiDictProxy

from warden.protocols import mcp
from warden.protocols.declared_arguments import ListedArguments
from warden.protocols.mcp import Payload

__all__ = ["HEADER_MISMATCH", "METHOD_HEADER", "NAME_HEADER", "PARAM_PREFIX", "problem"]

HEADER_MISMATCH: Final = -32020
"""The JSON-RPC error code for a mirror header that disagrees with the body (SEP-2243)."""
METHOD_HEADER: Final = "Mcp-Method"
NAME_HEADER: Final = "Mcp-Name"
PARAM_PREFIX: Final = "Mcp-Param-"
_NAMED_BY: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
"""The methods whose ``Mcp-Name`` mirrors a param, and which param."""
_NAMELESS: Final = frozenset(
    {*(m for m in mcp.PASSED if not m.startswith("tasks/")), "completion/complete"}
)
"""Methods MCP defines whose requests name no tool, prompt or resource: an ``Mcp-Name``
on one could only steer a router. (``tasks/*`` name their task; a server's own methods
may name what they define.)"""
_SENTINEL: Final = re.compile(r"=\?base64\?(?P<payload>.*)\?=")
_VISIBLE: Final = re.compile(r"[\x20-\x7e]*")
_UNDERSCORED: Final = re.compile(r"mcp_|mcp-param_")
_MAX_SCHEMA_NODES: Final = 10_000


def problem(
    payload: Payload,
    headers: CIMultiDictProxy[str],
    listed: ListedArguments | None,
) -> str | None:
    """Why the mirror headers of one POST disagree with its body, or ``None`` if they do not.

    ``listed``: what the upstream's ``tools/list`` answers declared, if any.
    """
    names = {k.lower() for k in headers if _mirrors(k)}
    if not names:
        return None  # a client of an earlier revision, or one that sends none: as before
    for name in names:
        if _UNDERSCORED.match(name):
            # CGI-style stacks read Mcp_Name as Mcp-Name; no client writes it. (A token
            # may hold one: Mcp-Param-customer_id is the client's own spelling.)
            return f"the header {name} is spelled with an underscore"
        values = headers.getall(name)
        if len(values) > 1:
            return f"the header {name} appears more than once"
        if not _VISIBLE.fullmatch(values[0]):
            # Raw bytes past ASCII are read as UTF-8 here and as Latin-1 by most
            # routers; a client writes such a value as =?base64?...?=.
            return f"the header {name} holds characters outside printable ASCII"
    if payload.batch:
        return "mirror headers (Mcp-*) describe one message, and this POST carries a batch"
    (message,) = payload.messages
    body = message.body
    if body is None:
        return None  # refused as malformed JSON-RPC anyway
    method = body.get("method")
    said = headers.get(METHOD_HEADER)
    if said is not None and said != method:
        return f"the header {METHOD_HEADER} says {said[:80]!r}, the body's method is {method!r}"
    params = body.get("params")
    params = params if isinstance(params, dict) else {}
    key = _NAMED_BY.get(method) if isinstance(method, str) else None
    named = headers.get(NAME_HEADER)
    if named is not None and key is not None and _decoded(named) != params.get(key):
        return f"the header {NAME_HEADER} does not match the body's {key!r}"
    if named is not None and key is None and (method in _NAMELESS or not message.is_request):
        what = f"a {method!r} request" if message.is_request else "this message"
        return f"the header {NAME_HEADER} names something, and {what} names nothing"
    given = {k.lower(): v for k, v in headers.items() if k.lower().startswith("mcp-param-")}
    if not given:
        return None
    if method != "tools/call":
        return f"Mcp-Param-* headers mirror a tool call's arguments, not a {method!r} request"
    return _params_problem(params, given, listed)


def _params_problem(
    params: Mapping[str, Any], given: Mapping[str, str], listed: ListedArguments | None
) -> str | None:
    tool = params.get("name")
    arguments = params.get("arguments")
    schema = listed.schema(tool) if listed is not None and isinstance(tool, str) else None
    if schema is None:
        return (
            f"Warden has not seen the server list the tool {tool!r}, so it cannot check its "
            "Mcp-Param-* headers against the arguments; list the tools first"
        )
    declared = {f"{PARAM_PREFIX}{token}".lower(): path for path, token in _annotated(schema)}
    for header, raw in given.items():
        path = declared.get(header)
        if path is None:
            return f"the header {header} mirrors no argument the tool's schema annotates"
        value = _at(arguments, path)
        if value is None or _decoded(raw) != _rendered(value):
            return f"the header {header} does not match the argument {'.'.join(path)!r}"
    return None


def _mirrors(header: str) -> bool:
    lower = header.lower().replace("_", "-")
    return lower in ("mcp-method", "mcp-name") or lower.startswith("mcp-param-")


def _decoded(value: str) -> str | None:
    """A header value as the client meant it: ``=?base64?...?=`` unwrapped (canonical only)."""
    match = _SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None  # not what a client writes: it can match nothing
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):  # ValueError: non-ASCII in the payload, bad UTF-8
        return None


def _rendered(value: Any) -> str | None:
    """An argument as a client mirrors it: booleans as ``true``/``false``, other scalars as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        try:
            return str(value)
        except ValueError:  # an integer past the interpreter's digit limit
            return None
    return None


def _at(arguments: Any, path: tuple[str, ...]) -> Any:
    node = arguments
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _annotated(schema: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(property path, token)`` of each ``x-mcp-header`` on a chain of ``properties`` from
    the root: the only places a client mirrors (deeper or branched ones it does not)."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    seen = 0
    while stack and seen < _MAX_SCHEMA_NODES:
        path, node = stack.pop()
        seen += 1
        if not isinstance(node, Mapping):
            continue
        token = node.get("x-mcp-header")
        if path and isinstance(token, str):
            yield path, token
        properties = node.get("properties")
        if isinstance(properties, Mapping):
            stack.extend(((*path, str(k)), v) for k, v in properties.items())
