"""Route rules for plain HTTP tool APIs: which request is which tool call (sans-I/O).

An ``http`` upstream with ``routes`` (see ``docs/http-tools.md``) turns each
request that fits a rule into a ``tool_call`` action, so policies, caps and
approvals see ``issue_refund`` with its arguments instead of a bare path::

    routes:
      - {method: POST, path: "/orders/{order_id}/refunds", tool: issue_refund,
         arguments: {order_id: "{order_id}", amount: /amount}}
    unmatched: deny

A path template is literal segments and ``{name}`` segments, each matching
exactly one decoded segment (the ingress decodes the target once, so
``%2D`` and ``-`` match alike and no encoding can cross a ``/``). Rules are
tried in order; the first that fits wins. An argument is ``"{name}"`` (a path
parameter), ``"?name"`` (a query parameter, ``null`` when absent) or an RFC
6901 JSON pointer into the JSON request body (``""`` is the whole body). A
pointer that finds nothing, a query parameter given twice, a body that is not
one unambiguous JSON document (duplicate keys, ``NaN``), or a query parameter
the rule does not name refuses the request with 400: Warden and the tool API
must agree on every value the policy saw, an absent argument would leave a
policy rule undefined rather than false, and a query the policy never saw
(``?amount=9000``, ``?force=true``) is input the service acts on undecided.

Everything here is pure: the ingress reads the request, this module says what
it is, and renders refusals as RFC 9457 problem documents.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol
from urllib.parse import unquote

import orjson

from warden.protocols._wire import keys_fold_apart

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "RESULT_MAX_CHARS",
    "ArgumentSource",
    "RouteRule",
    "RouteSpec",
    "ToolRequest",
    "ToolRequestError",
    "ToolRoutes",
    "bound_body",
    "parse_argument",
    "parse_method",
    "parse_query",
    "parse_template",
    "problem",
    "result_text",
]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
RESULT_MAX_CHARS: Final = 64 * 1024
"""How much of a tool API's response body is kept as the outcome's ``result``."""
PROBLEM_TYPE_BASE: Final = "https://warden.dev/problems/"

_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_PARAM: Final = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# A literal segment as written in YAML: no braces, slashes or control characters.
_LITERAL: Final = re.compile(r"^[^{}/\\\x00-\x20\x7f]+$")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORMAT: Final = re.compile(r"\.[a-z0-9]+$")


class ToolRequestError(ValueError):
    """The request fits a rule but cannot become its action (400, never forwarded)."""

    code = "invalid_tool_request"


def parse_method(value: str) -> str:
    """An HTTP method, upper-cased; raises ``ValueError`` naming the allowed ones."""
    method = value.strip().upper()
    if method not in _METHODS:
        raise ValueError(f"{value!r} is not one of {', '.join(sorted(_METHODS))}")
    return method


def parse_template(path: str) -> tuple[str, ...]:
    """``"/orders/{order_id}/refunds"`` as segments; raises ``ValueError`` saying what is wrong."""
    trimmed = path.strip().strip("/")
    if not trimmed:
        raise ValueError(f"{path!r}: needs at least one segment, e.g. /orders/{{order_id}}")
    segments = tuple(trimmed.split("/"))
    seen: set[str] = set()
    for segment in segments:
        param = _PARAM.match(segment)
        if param is not None:
            if param.group(1) in seen:
                raise ValueError(f"{path!r}: parameter {{{param.group(1)}}} appears twice")
            seen.add(param.group(1))
        elif segment in (".", "..") or not _LITERAL.match(segment):
            raise ValueError(
                f"{path!r}: segment {segment!r} must be a literal name or a whole "
                "'{name}' parameter (letters, digits, _)"
            )
    return segments


def _params(segments: Sequence[str]) -> frozenset[str]:
    return frozenset(m.group(1) for s in segments if (m := _PARAM.match(s)) is not None)


def unescape(text: str, *, plus: bool, what: str) -> str:
    """Go's ``PathUnescape`` / ``QueryUnescape``: a malformed escape is an error.

    The error names ``what`` failed, never the text: a query value may be a
    key (``?key=...``), and the error becomes a recorded decision reason.
    """
    if "%" not in text and (not plus or "+" not in text):
        return text  # nothing to decode (most names and values)
    if _BAD_ESCAPE.search(text):
        raise ValueError(f"invalid URL escape in {what}")
    if plus:
        text = text.replace("+", " ")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 once percent-decoded") from None


def parse_query(raw: str) -> dict[str, list[str]]:
    """Go's ``url.ParseQuery``: ``&``-separated, ``;`` refused, ``+`` is a space.

    Raises ``ValueError`` naming what is malformed (never a value).
    """
    out: dict[str, list[str]] = {}
    for piece in raw.split("&"):
        if not piece:
            continue
        if ";" in piece:
            raise ValueError("invalid semicolon separator in query")
        key, _, value = piece.partition("=")
        name = unescape(key, plus=True, what="a parameter's name")
        out.setdefault(name, []).append(
            unescape(value, plus=True, what=f"the value of {name[:40]!r}")
        )
    return out


@dataclass(frozen=True, slots=True)
class ArgumentSource:
    """Where one argument's value comes from: a path or query parameter, or a body pointer."""

    param: str | None = None
    pointer: tuple[str, ...] | None = None
    """The pointer's unescaped reference tokens (``()`` is the whole body)."""
    query: str | None = None
    """The query parameter's name, decoded."""
    text: str = ""
    """As configured, for messages."""


def parse_argument(value: str) -> ArgumentSource:
    """``"{order_id}"``, ``"?limit"`` or an RFC 6901 pointer (``"/amount"``, ``""``).

    Raises ``ValueError`` saying what is wrong.
    """
    param = _PARAM.match(value)
    if param is not None:
        return ArgumentSource(param=param.group(1), text=value)
    if value.startswith("?"):
        if len(value) == 1:
            raise ValueError("'?' must be followed by a query parameter's name, e.g. '?limit'")
        return ArgumentSource(query=value[1:], text=value)
    if value and not value.startswith("/"):
        raise ValueError(
            f"{value!r} must be a path parameter such as '{{order_id}}', a query "
            "parameter such as '?limit' or a JSON pointer into the body such as '/amount'"
        )
    if "~" in value.replace("~0", "").replace("~1", ""):
        raise ValueError(f"{value!r}: '~' in a JSON pointer must be followed by 0 or 1")
    tokens = tuple(t.replace("~1", "/").replace("~0", "~") for t in value.split("/")[1:])
    return ArgumentSource(pointer=tokens, text=value)


class RouteSpec(Protocol):
    """A route rule as configured (``warden.config.HttpRouteConfig``)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def tool(self) -> str: ...
    @property
    def arguments(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One compiled route: method, path template, and how to build the call."""

    method: str
    segments: tuple[str, ...]
    tool: str
    arguments: tuple[tuple[str, ArgumentSource], ...]

    @classmethod
    def compile(cls, method: str, path: str, tool: str, arguments: Mapping[str, str]) -> RouteRule:
        """Check and compile one rule; ``ValueError`` names what is wrong."""
        segments = parse_template(path)
        params = _params(segments)
        sources: list[tuple[str, ArgumentSource]] = []
        for name, value in arguments.items():
            try:
                source = parse_argument(value)
            except ValueError as exc:
                raise ValueError(f"arguments.{name}: {exc}") from None
            if source.param is not None and source.param not in params:
                raise ValueError(
                    f"arguments.{name}: {value!r} names no parameter of path {path!r}"
                    f" (it has {', '.join(sorted(params)) or 'none'})"
                )
            sources.append((name, source))
        return cls(parse_method(method), segments, tool, tuple(sources))

    @property
    def needs_body(self) -> bool:
        """Whether an argument is read from the JSON body."""
        return any(source.pointer is not None for _, source in self.arguments)

    @property
    def query_names(self) -> frozenset[str]:
        """The query parameters the rule names; a request may carry no other."""
        return frozenset(s.query for _, s in self.arguments if s.query is not None)

    def match(self, method: str, segments: Sequence[str]) -> dict[str, str] | None:
        """The path parameters if ``method`` and the decoded ``segments`` fit, else ``None``."""
        if method != self.method or len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, segment in zip(self.segments, segments, strict=True):
            param = _PARAM.match(pattern)
            if param is not None:
                params[param.group(1)] = segment
            elif pattern != segment:
                return None
        return params

    def fits_loosely(self, method: str, segments: Sequence[str]) -> bool:
        """Whether the path fits read as some services read paths: literal segments
        case-blind (ASP.NET), without ``;`` parameters (Tomcat, Spring), and the last
        without a format suffix (Rails' ``.json``, Spring's suffix match)."""
        if method != self.method or len(segments) != len(self.segments):
            return False
        last = len(segments) - 1
        for i, (pattern, segment) in enumerate(zip(self.segments, segments, strict=True)):
            if _PARAM.match(pattern) is not None:
                continue
            read = segment.partition(";")[0].casefold()
            if i == last:
                read = _FORMAT.sub("", read)
            if pattern.casefold() != read:
                return False
        return True

    def build(
        self, params: Mapping[str, str], body: bytes, content_type: str, query: str = ""
    ) -> dict[str, Any]:
        """The call's arguments; :class:`ToolRequestError` when the request cannot supply them.

        ``query``: the raw query string (without ``?``).
        """
        document: Any = None
        if self.needs_body:
            document = parse_body(body, content_type)
        values = self._query(query) if query else {}
        arguments: dict[str, Any] = {}
        for name, source in self.arguments:
            if source.param is not None:
                arguments[name] = params[source.param]
            elif source.query is not None:
                # Query parameters are often optional (a page cursor): an absent one is
                # null, which a policy reads as such (never an undefined rule).
                arguments[name] = values.get(source.query)
            else:
                assert source.pointer is not None
                arguments[name] = resolve_pointer(document, source.pointer, source.text)
        return arguments

    def _query(self, raw: str) -> dict[str, str]:
        try:
            parsed = parse_query(raw)
        except ValueError as exc:
            raise ToolRequestError(f"the query cannot be read: {exc}") from None
        named = self.query_names
        values: dict[str, str] = {}
        for key, given in parsed.items():
            shown = repr(key[:40])
            if key not in named:
                raise ToolRequestError(
                    f"the query parameter {shown} is not named in this route's arguments,"
                    f' so no policy would see it; name it ("?{key[:40]}") or leave it out'
                )
            if len(given) > 1:
                # Services disagree on which one counts (the first, the last, a list).
                raise ToolRequestError(f"the query gives the parameter {shown} twice")
            values[key] = given[0]
        return values


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A request that fits a rule: the tool it calls and the arguments it carries."""

    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolRoutes:
    """The compiled ``routes`` of one upstream, and what to do with a request none fits."""

    rules: tuple[RouteRule, ...]
    unmatched: Literal["deny", "allow"] = "deny"

    @classmethod
    def compile(
        cls, specs: Iterable[RouteSpec], unmatched: Literal["deny", "allow"] = "deny"
    ) -> ToolRoutes:
        """Compile configured rules (already validated at load, so this does not raise)."""
        return cls(
            tuple(RouteRule.compile(s.method, s.path, s.tool, s.arguments) for s in specs),
            unmatched,
        )

    def find(self, method: str, segments: Sequence[str]) -> tuple[RouteRule, dict[str, str]] | None:
        """The first rule ``method segments`` fits, with its path parameters."""
        for rule in self.rules:
            params = rule.match(method, segments)
            if params is not None:
                return rule, params
        return None

    def resolve(
        self, method: str, segments: Sequence[str], body: bytes, content_type: str, query: str = ""
    ) -> ToolRequest | None:
        """The tool call this request is, or ``None`` when no rule fits.

        ``query`` is the raw query string (without ``?``). Raises
        :class:`ToolRequestError` when a rule fits but its arguments cannot be
        read from the request, or the query carries a parameter it does not name.
        """
        found = self.find(method, segments)
        if (found is None or any(";" in s for s in segments)) and any(
            rule.fits_loosely(method, segments) for rule in self.rules
        ):
            # The service may read it as that rule's tool call (or another order id)
            # while Warden reads another call, or none at all.
            raise ToolRequestError(
                "the path fits a route rule only when read case-blind, without ';' "
                "parameters or without a format suffix (.json), as some services read paths; "
                "send it as the rule writes it"
            )
        if found is None:
            return None
        rule, params = found
        return ToolRequest(rule.tool, rule.build(params, body, content_type, query))


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ToolRequestError(f"the JSON body gives the key {key!r} twice")
        obj[key] = value
    if not keys_fold_apart(obj):
        # A Go or .NET tool API would bind either one, case-insensitively.
        raise ToolRequestError("the JSON body gives two keys that differ only in case")
    return obj


def _no_constant(name: str) -> Any:
    raise ToolRequestError(f"the JSON body contains {name}, which is not JSON")


def parse_body(body: bytes, content_type: str) -> Any:
    """The request body as one unambiguous JSON document, or :class:`ToolRequestError`.

    Duplicate keys and ``NaN``/``Infinity`` are refused: parsers disagree on
    them, and the tool API must act on the very values the policy saw.
    """
    if not _is_json(content_type):
        raise ToolRequestError(
            f"this route reads its arguments from a JSON body, but the Content-Type is "
            f"{content_type or 'missing'!r}; send application/json"
        )
    try:
        text = body.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except ToolRequestError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ToolRequestError(f"the request body is not valid JSON: {exc}") from None


def bound_body(body: bytes, content_type: str) -> bytes:
    """The body as an approval binds it: a JSON body by its content, else as sent.

    Keys in another order or other whitespace (a model re-emitting a call) make
    the same request. Only a body every parser reads alike is so rewritten: one
    with a key given twice, keys that differ only in case, a ``NaN``, or an
    integer past 64 bits (``18446744073709551616`` and ``...617`` would meet
    as one float) is bound byte for byte.
    """
    if not body or not _is_json(content_type):
        return body
    try:
        document = parse_body(body, content_type)
    except ToolRequestError:
        return body
    if not _read_alike(document):
        return body
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _read_alike(value: Any) -> bool:
    """No integer past 64 bits and no number past a float's range (``1e400``): parsers
    round those, so two bodies could meet in one canonical form."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            continue
        elif (isinstance(item, int) and abs(item) >= 2**63) or (
            isinstance(item, float) and not math.isfinite(item)
        ):
            return False
    return True


def resolve_pointer(document: Any, tokens: Sequence[str], text: str) -> Any:
    """The value at an RFC 6901 pointer; :class:`ToolRequestError` naming it when absent."""
    value = document
    for step in tokens:
        if isinstance(value, dict):
            if step not in value:
                raise ToolRequestError(f"the JSON body has no value at {text!r}")
            value = value[step]
        elif isinstance(value, list):
            # RFC 6901: an index is "0" or digits without a leading zero; "-" is past the end.
            if not (step.isascii() and step.isdigit() and (step == "0" or step[0] != "0")):
                raise ToolRequestError(f"the JSON body has no value at {text!r}")
            index = int(step)
            if index >= len(value):
                raise ToolRequestError(f"the JSON body has no value at {text!r}")
            value = value[index]
        else:
            raise ToolRequestError(f"the JSON body has no value at {text!r}")
    return value


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    decision_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """An RFC 9457 problem document (``application/problem+json``).

    ``code`` is Warden's stable error code, also in ``type``'s last segment;
    ``decision_id`` names the audit record of a decided request.
    """
    doc: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if decision_id is not None:
        doc["decision_id"] = decision_id
    if extra:
        doc.update(extra)
    return orjson.dumps(doc)


def result_text(body: bytes) -> str:
    """A tool API's response body as the outcome's recorded ``result`` (bounded, never raises)."""
    return body[: RESULT_MAX_CHARS * 4].decode("utf-8", errors="replace")[:RESULT_MAX_CHARS]
