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
``%2D`` and ``-`` match alike and no encoding can cross a ``/``). When a path
fits several rules of its method, the most specific wins: a literal segment
beats a parameter, position by position, as Go 1.22's ServeMux, Spring and
Flask choose. Two rules no request could tell apart (``/orders/{a}`` and
``/orders/{b}``, or ``/a/{x}`` and ``/{y}/b``, which services order
differently) are a configuration error. A ``HEAD`` request fits ``GET`` rules
too (services run the ``GET`` handler for it). An argument is ``"{name}"`` (a
path parameter), ``"?name"`` (a query parameter, ``null`` when absent) or an
RFC 6901 JSON pointer into the JSON request body (``""`` is the whole body),
or ``{pointer: /currency, optional: true}`` for a body field that may be
absent (left out of the arguments then). A required pointer that finds nothing, a query
parameter given twice, a body that is not one unambiguous JSON document
(duplicate keys, ``NaN``), a query parameter the rule does not name, or a
body value no pointer of the rule covers refuses the request with 400: Warden
and the tool API must agree on every value the policy saw, an absent argument
would leave a policy rule undefined rather than false, and a query parameter
or body field the policy never saw (``?force=true``, ``"currency": "KWD"``)
is input the service acts on undecided. A rule that reads nothing from the
body refuses a body, unless it says ``body: unread`` (an upload the policy
decides by path and query alone).
For the same reason a routed upstream never gets a method override
(``X-HTTP-Method-Override``, a ``_method`` field), an encoded body
(``Content-Encoding``), on a rule that reads the query, a body that could
override a query parameter (a form body, or a JSON key named like one), or, on a
``body: unread`` rule, a form field or JSON key named like a path parameter.

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

from warden.protocols._wire import foreign_charset, keys_fold_apart
from warden.text import has_surrogate, shown_name

__all__ = [
    "ABSENT",
    "BODY_MODES",
    "PROBLEM_CONTENT_TYPE",
    "RESULT_MAX_CHARS",
    "ArgumentSource",
    "PointerSpec",
    "RouteRule",
    "RouteSpec",
    "ToolRequest",
    "ToolRequestError",
    "ToolRoutes",
    "bound_body",
    "check_specificity",
    "first_unnamed",
    "may_carry_fields",
    "names_segments",
    "parse_argument",
    "parse_method",
    "parse_query",
    "parse_template",
    "problem",
    "refuse_headers",
    "refuse_method_field",
    "refused_unrun",
    "result_text",
]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
RESULT_MAX_CHARS: Final = 64 * 1024
"""How much of a tool API's response body is kept as the outcome's ``result``."""
PROBLEM_TYPE_BASE: Final = "https://warden.dev/problems/"
BODY_MODES: Final = ("named", "unread")
"""A rule's ``body``: ``named``, every body value is covered by one of its pointers (the
default); ``unread``, the rule reads nothing from the body and forwards any body."""

_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_MEDIA_END: Final = re.compile(r"[;,\s]")
_SPACE: Final = re.compile(r"\s")
_PARAM: Final = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# A literal segment as written in YAML: no braces, slashes or control characters.
_LITERAL: Final = re.compile(r"^[^{}/\\\x00-\x20\x7f]+$")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Headers that make a service run another method than the request line's: Symfony and
# Laravel, Express's method-override, ASP.NET Core's HttpMethodOverride, Rails (Rack).
_OVERRIDE_HEADERS: Final = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override"}
)
# Headers that make a service route another path than the request line's: IIS URL
# Rewrite, and Symfony and Laminas, which trust them.
_PATH_OVERRIDE_HEADERS: Final = frozenset({"x-original-url", "x-rewrite-url"})
# The form, JSON or query field that does the same (Symfony/Laravel, Rails, method-override).
_OVERRIDE_FIELD: Final = "_method"
# PHP reads "." and " " in a form field's name as "_" (".method" is "_method").
_PHP_NAME: Final = str.maketrans({".": "_", " ": "_"})
# A multipart part's Content-Disposition header, and its name parameter (RFC 7578, 2231).
_DISPOSITION: Final = b"content-disposition"
# The rest of a header line, with the lines PHP joins to it (those starting with a space or tab).
# A lone CR stays in the line, as PHP reads it: a space before the next parameter.
_HEADER_REST: Final = re.compile(rb"[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)")
_FOLDED: Final = re.compile(r"\r?\n[ \t]+")
# How many field names a form (query, URL-encoded or multipart body) may have, and how
# long they may be in all, for Warden to read every one of them in bounded time: PHP
# reads 1,000 fields (max_input_vars) and ASP.NET 1,000 (MaxHttpCollectionKeys).
MAX_FORM_FIELDS: Final = 10_000
MAX_FORM_NAME_CHARS: Final = 64 * 1024
_PART_NAME: Final = re.compile(
    r"""(?i)(?:^|[;\s])name(\*?)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^;\s]*)"""
)
# ASP.NET MVC 5 (System.Web's GetHttpMethodOverride) reads the override header's name
# as a form field or query parameter too.
_OVERRIDE_HEADER_FIELDS: Final = frozenset({"x-http-method-override"})


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


def names_segments(
    routes: ToolRoutes | None, method: str, segments: Sequence[str], at: Sequence[int]
) -> bool:
    """Whether a rule of ``routes`` fits ``method segments`` and writes out each segment
    at the indexes ``at``, none by a ``{parameter}``: ``/messages/{id}`` names
    ``messages`` in ``messages/123``; ``/{channel}`` fits ``messages`` without naming
    it, and ``/chat/{room}`` names ``chat`` but not ``completions``. An index below 0
    is in the upstream's base path, which no rule names."""
    if routes is None or not at or min(at) < 0:
        return False
    found = routes.find(method, segments)
    if found is None:
        return False
    written = found[0].segments
    return all(i < len(written) and _PARAM.match(written[i]) is None for i in at)


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
            unescape(value, plus=True, what=f"the value of {_named(name, 'a parameter')}")
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
    optional: bool = False
    """A pointer that finds nothing leaves the argument out (else it refuses the request)."""


class PointerSpec(Protocol):
    """An argument's mapping form (``warden.config.HttpRouteArgument``):
    ``{pointer: /currency, optional: true}``."""

    @property
    def pointer(self) -> str: ...
    @property
    def optional(self) -> bool: ...


def parse_argument(value: str | PointerSpec) -> ArgumentSource:
    """``"{order_id}"``, ``"?limit"``, an RFC 6901 pointer (``"/amount"``, ``""``), or
    the mapping form of a pointer (:class:`PointerSpec`).

    Raises ``ValueError`` saying what is wrong.
    """
    if not isinstance(value, str):
        if value.pointer and not value.pointer.startswith("/"):
            # Only a body field can be absent: a path parameter never is, and a query
            # parameter already reads null when absent.
            raise ValueError(
                f"pointer: {value.pointer!r} must be a JSON pointer into the body such as "
                "'/currency' (path parameters are always there, and query parameters "
                "already read null when absent)"
            )
        try:
            source = parse_argument(value.pointer)
        except ValueError as exc:
            raise ValueError(f"pointer: {exc}") from None
        return ArgumentSource(pointer=source.pointer, text=source.text, optional=value.optional)
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
    def arguments(self) -> Mapping[str, str | PointerSpec]: ...
    @property
    def body(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One compiled route: method, path template, and how to build the call."""

    method: str
    segments: tuple[str, ...]
    tool: str
    arguments: tuple[tuple[str, ArgumentSource], ...]
    body: str = "named"
    """One of :data:`BODY_MODES`."""

    @classmethod
    def compile(
        cls,
        method: str,
        path: str,
        tool: str,
        arguments: Mapping[str, str | PointerSpec],
        body: str = "named",
    ) -> RouteRule:
        """Check and compile one rule; ``ValueError`` names what is wrong."""
        if body not in BODY_MODES:
            raise ValueError(f"body: {body!r} is not one of {', '.join(BODY_MODES)}")
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
            if source.pointer is not None and body == "unread":
                # A rule reading some fields and forwarding the rest unread would let
                # the service act on values no policy saw.
                raise ValueError(
                    f"arguments.{name}: {source.text!r} reads the body, and body: unread "
                    "forwards body fields no argument names; name every body field the "
                    "service reads (and drop body: unread), or read nothing from the body"
                )
            sources.append((name, source))
        return cls(parse_method(method), segments, tool, tuple(sources), body)

    @property
    def needs_body(self) -> bool:
        """Whether an argument is read from the JSON body."""
        return any(source.pointer is not None for _, source in self.arguments)

    @property
    def checks_body(self) -> bool:
        """Whether every value of a request's body must be under a pointer of the rule
        (``body: named``; a rule with no body pointer then refuses any body)."""
        return self.body != "unread"

    @property
    def shown(self) -> str:
        """The rule as refusals name it: ``POST /orders/{order_id}/refunds (issue_refund)``."""
        return f"{self.method} {self.template} ({self.tool[:60]})"

    @property
    def query_names(self) -> frozenset[str]:
        """The query parameters the rule names; a request may carry no other."""
        return frozenset(s.query for _, s in self.arguments if s.query is not None)

    @property
    def path_names(self) -> frozenset[str]:
        """The parameters of the rule's path template (``order_id`` in ``/orders/{order_id}``)."""
        return _params(self.segments)

    def serves(self, method: str) -> bool:
        """Whether a request with ``method`` may fit: its own, and ``HEAD`` for ``GET``.

        Flask, Go, Spring, Rails and Express run a ``GET`` handler for ``HEAD``.
        """
        return method == self.method or (method == "HEAD" and self.method == "GET")

    @property
    def template(self) -> str:
        """The path template, as messages show it."""
        return "/" + "/".join(self.segments)

    @property
    def rank(self) -> tuple[int, ...]:
        """Lower is more specific: per segment, 0 for literal text and 1 for a parameter."""
        return tuple(0 if _PARAM.match(p) is None else 1 for p in self.segments)

    def match(self, method: str, segments: Sequence[str]) -> dict[str, str] | None:
        """The path parameters if ``method`` and the decoded ``segments`` fit, else ``None``."""
        if not self.serves(method) or len(segments) != len(self.segments):
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
        one read as any stem before a dot (Rails' ``.json``, Spring's suffix match, which
        also runs ``refunds.`` and ``refunds.tar.gz`` as ``refunds``)."""
        if not self.serves(method) or len(segments) != len(self.segments):
            return False
        last = len(segments) - 1
        for i, (pattern, segment) in enumerate(zip(self.segments, segments, strict=True)):
            if _PARAM.match(pattern) is not None:
                continue
            read = segment.partition(";")[0].casefold()
            wanted = pattern.casefold()
            if i == last and "." in read:
                stems = {read[:at] for at, char in enumerate(read) if char == "."}
                if wanted != read and wanted not in stems:
                    return False
            elif wanted != read:
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
        if self.query_names and body:
            self._no_body_over_query(document, body, content_type)
        if body and not self.checks_body and self.path_names:
            # A rule that reads the body refuses a key no pointer names, and one that
            # names none refuses any body: only an unread body can carry one unseen.
            self._no_body_over_path(body, content_type)
        if body and not self.needs_body and self.checks_body:
            self._unread_body(body, content_type)
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
                value = resolve_pointer(
                    document, source.pointer, source.text, optional=source.optional
                )
                if value is not ABSENT:
                    arguments[name] = value
        if self.needs_body:
            self._every_field_named(document)
        return arguments

    def _every_field_named(self, document: Any) -> None:
        """Refuse a body with a value no pointer of the rule covers.

        Every body field is an argument, as every query parameter is: a field the
        policy never saw (``"currency": "KWD"`` beside a named ``/amount``) is input
        the service acts on undecided.
        """
        pointers = [s.pointer for _, s in self.arguments if s.pointer is not None]
        path = first_unnamed(document, pointers)
        if path is None:
            return
        raise ToolRequestError(
            f"the JSON body has {_shown_pointer(path, document)}, which no argument of the rule "
            f"{self.shown} names, so no policy would see it; name it in the rule's arguments "
            "(a pointer covers everything under it; {pointer: ..., optional: true} for a "
            "field that may be absent) or leave it out"
        )

    def _unread_body(self, body: bytes, content_type: str) -> None:
        """Refuse a body with any value on a rule that reads nothing from it (unless
        ``body: unread``); an empty JSON object or array passes."""
        what = "a body"
        if _is_json(content_type):
            try:
                document = parse_body(body, content_type)
            except ToolRequestError:
                document = None
            if isinstance(document, (dict, list)):
                if not document:
                    return  # {} or []: no value for a policy to miss (generated clients send {})
                first = next(iter(document)) if isinstance(document, dict) else "0"
                what = f"a body with {_shown_pointer((first,), document)}"
        raise ToolRequestError(
            f"the request carries {what}, and the rule {self.shown} reads no argument from "
            "the body, so no policy would see it; send no body, name its fields in the "
            "rule's arguments, or set body: unread on the rule to forward a body the "
            "policy does not read"
        )

    def _no_body_over_query(self, document: Any, body: bytes, content_type: str) -> None:
        """Refuse a body a service could read a query argument from instead of the query.

        Go's ``r.FormValue``, PHP/Laravel's ``input()`` and Rails' ``params`` merge
        the query with a form body (the body wins; Flask's ``request.values`` lets the
        query win), and Laravel and Rails merge a JSON body's top-level keys too.
        So on a rule that reads ``?amount`` the service could act on a body's
        ``amount`` while the policy saw the query's (or ``null``).
        """
        named = sorted(self.query_names)
        shown = ", ".join(f"?{n[:40]}" for n in named)
        if not _is_json(content_type):
            raise ToolRequestError(
                f"this route reads {shown} from the query, and a {_media(content_type)} body "
                "could carry the same fields (services such as Go's FormValue and Laravel "
                "read a form field over the query parameter); send no body or a JSON body"
            )
        if document is None:
            document = parse_body(body, content_type)
        if not isinstance(document, dict):
            return
        folded = {n.casefold(): n for n in named}
        for key in document:
            query_name = folded.get(key.casefold())
            if query_name is not None:
                raise ToolRequestError(
                    f"the JSON body has a top-level key {key[:40]!r} and this route reads "
                    f"?{query_name[:40]} from the query; services such as Laravel and Rails "
                    "merge the two (the body's value wins), so send the value in one place only"
                )

    def _no_body_over_path(self, body: bytes, content_type: str) -> None:
        """Refuse an unread body a service could read a path argument from instead of the path.

        ASP.NET MVC's model binding (without ``[ApiController]``) reads a form field
        before the route value of the same name, Spring's ``@ModelAttribute`` too, and
        Laravel's ``$request->ticket_id`` a form field or JSON top-level key before the
        route parameter. So on ``PUT /tickets/{ticket_id}/draft`` with ``body: unread``
        the service could act on the body's ``ticket_id`` while the policy saw the
        path's. Forms are read by field name, as those services spell it
        (:func:`_form_field_for`); other bodies (an upload's bytes) carry no field.
        """
        found = _field_named(self.path_names, body, content_type)
        if found is None:
            return
        where, name = found
        raise ToolRequestError(
            f"the {where} has a field named like the path parameter {{{name}}} of the rule "
            f"{self.shown}; services such as ASP.NET MVC and Laravel read a body field over "
            "the route value of the same name (the body's value wins), so send the value in "
            "the path only"
        )

    def _query(self, raw: str) -> dict[str, str]:
        try:
            parsed = parse_query(raw)
        except ValueError as exc:
            raise ToolRequestError(f"the query cannot be read: {exc}") from None
        named = self.query_names
        values: dict[str, str] = {}
        for key, given in parsed.items():
            # Named only when it is an identifier: reasons are recorded in clear.
            shown = _named(key, "")
            if key not in named:
                raise ToolRequestError(
                    f"the query parameter {shown} is not named in this route's arguments, so "
                    f'no policy would see it; name it ("?{key}") or leave it out'
                    if shown
                    else "a query parameter is not named in this route's arguments, so no "
                    "policy would see it; name it or leave it out"
                )
            if len(given) > 1:
                # Services disagree on which one counts (the first, the last, a list).
                which = f"the parameter {shown}" if shown else "a parameter"
                raise ToolRequestError(f"the query gives {which} twice")
            values[key] = given[0]
        return values


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A request that fits a rule: the tool it calls and the arguments it carries."""

    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolRoutes:
    """The compiled ``routes`` of one upstream, and what to do with a request none fits.

    Raises ``ValueError`` when two rules could fit one request and neither is more
    specific (see :func:`check_specificity`).
    """

    rules: tuple[RouteRule, ...]
    unmatched: Literal["deny", "allow"] = "deny"

    def __post_init__(self) -> None:
        check_specificity(self.rules)

    @classmethod
    def compile(
        cls, specs: Iterable[RouteSpec], unmatched: Literal["deny", "allow"] = "deny"
    ) -> ToolRoutes:
        """Compile configured rules (already validated at load, so this does not raise)."""
        return cls(
            tuple(RouteRule.compile(s.method, s.path, s.tool, s.arguments, s.body) for s in specs),
            unmatched,
        )

    def find(self, method: str, segments: Sequence[str]) -> tuple[RouteRule, dict[str, str]] | None:
        """The most specific rule ``method segments`` fits, with its path parameters.

        Literal segments beat parameters, position by position (``/orders/export``
        over ``/orders/{order_id}``), as Go 1.22's ServeMux, Spring and Flask pick
        the handler; the rules were checked so that this never has to guess.
        """
        found: tuple[RouteRule, dict[str, str]] | None = None
        for rule in self.rules:
            params = rule.match(method, segments)
            if params is not None and (found is None or rule.rank < found[0].rank):
                found = rule, params
        return found

    def resolve(
        self,
        method: str,
        segments: Sequence[str],
        body: bytes,
        content_type: str,
        query: str = "",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ToolRequest | None:
        """The tool call this request is, or ``None`` when no rule fits.

        ``query`` is the raw query string (without ``?``); ``headers`` the request's
        headers (any case). Raises :class:`ToolRequestError` when the request asks the
        service for another method than its own (``X-HTTP-Method-Override``, a
        ``_method`` field) or has an encoded body, whether or not a rule fits; or when
        a rule fits but its arguments cannot be read from the request, or the query
        carries a parameter it does not name.
        """
        if method != method.upper():
            # Over HTTP/2 Envoy passes any case; ASP.NET Core and Werkzeug route it
            # as the upper-case method, which a rule would have decided.
            raise ToolRequestError(
                f"the request method {method[:20]!r} is not in upper case, and services "
                f"read methods in any case; send it as {method[:20].upper()!r}"
            )
        if "," in content_type or _SPACE.search(content_type.partition(";")[0].strip()):
            # Two media types (or two Content-Type headers Envoy joined): Rack and PHP
            # take the first (PHP cutting at a space too), and would read a form
            # Warden did not look into.
            raise ToolRequestError(
                "the request names more than one media type (Content-Type: "
                f"{content_type[:60]}); send one"
            )
        if headers is not None:
            refuse_headers(headers)
        refuse_method_field(query, body, content_type)
        refuse_charset(content_type)
        found = self.find(method, segments)
        loose = any(";" in s for s in segments)
        if any(
            rule.fits_loosely(method, segments)
            # A rule the path fits exactly lost to a more specific one, as in the
            # service's router; any other a service may read the path as is a guess.
            and (loose or rule.match(method, segments) is None)
            for rule in self.rules
        ):
            # The service may read it as that rule's tool call (or another order id)
            # while Warden reads another call, or none at all.
            raise ToolRequestError(
                "the path fits a route rule only when read case-blind, without ';' "
                "parameters or without a suffix after a dot (.json, .tar.gz, a trailing '.'), "
                "as some services read paths; send it as the rule writes it"
            )
        if found is None:
            return None
        rule, params = found
        return ToolRequest(rule.tool, rule.build(params, body, content_type, query))


def check_specificity(rules: Sequence[RouteRule]) -> None:
    """``ValueError`` naming two rules a request could fit when neither is more specific.

    A rule is more specific than another when every path it fits, the other fits
    too (a literal where the other has a parameter); the request is then that
    rule's call, whatever the order. Rules that fit exactly the same paths
    (``/orders/{a}``, ``/orders/{b}``) leave it to order, and rules that overlap
    otherwise (``/a/{x}`` and ``/{y}/b`` both fit ``/a/b``) leave it to the
    service's router, and routers differ (Go refuses them, Spring counts
    parameters, Flask takes the leftmost literal): either way Warden would guess
    which tool the service runs. Such an overlap is fine when a third rule fits
    exactly the paths both fit (``/a/b``): it is more specific than either.
    ``HEAD`` requests fit ``GET`` rules too, so ``HEAD`` and ``GET`` rules are
    checked against each other.
    """
    shapes = [(_shape(rule.segments), _methods(rule)) for rule in rules]
    for i, one in enumerate(rules):
        for j in range(i + 1, len(rules)):
            other = rules[j]
            methods = shapes[i][1] & shapes[j][1]  # the methods a request fitting both has
            if not methods or len(one.segments) != len(other.segments):
                continue
            shared: list[str | None] = []  # the paths both fit: a literal, or None for any
            one_within = other_within = True  # every path one fits, other fits (and back)
            for a, b in zip(shapes[i][0], shapes[j][0], strict=True):
                if a is not None and b is not None and a != b:
                    break  # no path fits both
                one_within &= b is None or a is not None
                other_within &= a is None or b is not None
                shared.append(a if a is not None else b)
            else:
                if one_within != other_within:
                    continue  # one is more specific: it wins wherever both fit
                both = tuple(shared)
                if not one_within and any(s == both and methods <= m for s, m in shapes):
                    continue  # a third rule fits just the paths both fit, and wins there
                how = (
                    "fit exactly the same paths"
                    if one_within
                    else (
                        "both fit a path such as "
                        f"{'/' + '/'.join(x if x is not None else 'x' for x in both)!r}"
                    )
                )
                raise ValueError(
                    f"routes.{i} ({one.method} {one.template}, tool {one.tool!r}) and "
                    f"routes.{j} ({other.method} {other.template}, tool {other.tool!r}) {how}, "
                    "and neither is more specific (a literal segment where the other has a "
                    "parameter), so which tool a request calls would be a guess; remove one, "
                    "make one more specific, or add a rule for the paths both fit"
                )


def _shape(segments: Sequence[str]) -> tuple[str | None, ...]:
    """A template's literal segments, and ``None`` for each parameter."""
    return tuple(None if _PARAM.match(s) is not None else s for s in segments)


def _methods(rule: RouteRule) -> frozenset[str]:
    """The request methods that may fit ``rule``."""
    return frozenset((rule.method, "HEAD")) if rule.method == "GET" else frozenset((rule.method,))


def refuse_headers(headers: Mapping[str, str]) -> None:
    """:class:`ToolRequestError` for a method override header or an encoded body.

    A service behind Symfony, Laravel, Express's method-override, ASP.NET
    Core's ``HttpMethodOverride`` or Rails runs the method such a header names
    (a ``POST`` decided as a refund runs as a ``DELETE``). An encoded body
    (``Content-Encoding: gzip``) is one Warden would decide on in another form
    than the service reads: the proxy's server inflates the codings it knows
    and leaves the others, Envoy passes it encoded, and a service may inflate
    it (Express's body-parser) or not. Refused either way, so that the bytes
    decided on are the bytes the service acts on.
    """
    types = 0
    for name, value in headers.items():
        # CGI and WSGI servers (and the frameworks behind them) read ``X_HTTP_Method_Override``
        # as ``X-HTTP-Method-Override``: both arrive as ``HTTP_X_HTTP_METHOD_OVERRIDE``.
        lower = name.lower().replace("_", "-")
        if lower == "content-type":
            types += 1
            if types > 1:
                raise ToolRequestError(
                    "the request has Content-Type twice, which services read differently; send one"
                )
        if lower in _OVERRIDE_HEADERS:
            raise ToolRequestError(
                f"the request carries {name}, which makes services (Symfony, Laravel, Express, "
                "ASP.NET, Rails) run another method than the one Warden decides on; send the "
                "request with that method instead"
            )
        if lower in _PATH_OVERRIDE_HEADERS:
            raise ToolRequestError(
                f"the request carries {name}, which makes services (IIS, Symfony, Laminas) "
                "route another path than the one Warden decides on; send the request to that "
                "path instead"
            )
        if lower == "content-encoding" and any(
            token.strip().lower() not in ("", "identity") for token in value.split(",")
        ):
            raise ToolRequestError(
                f"the request body is encoded (Content-Encoding: {value[:40]}), so the service "
                "could act on other bytes than Warden decides on; send it unencoded"
            )


def refuse_charset(content_type: str) -> None:
    """:class:`ToolRequestError` for a ``content_type`` whose body a service might read
    other than as UTF-8 (:func:`~warden.protocols._wire.foreign_charset`).

    Warden reads a body as UTF-8; aiohttp's ``request.json()`` decodes it by the
    charset named, so under ``charset=utf-7`` the bytes ``+ACI-`` close a string
    Warden read whole and a second ``amount`` appears.
    """
    refusal = foreign_charset(content_type)
    if refusal is not None:
        raise ToolRequestError(
            f"{refusal}, and services decode such a body differently; send it as UTF-8 "
            "(charset=utf-8, or none)"
        )


def refuse_method_field(query: str, body: bytes, content_type: str) -> None:
    """:class:`ToolRequestError` for a ``_method`` field (any case) in the query or body.

    Symfony and Laravel run the method a ``_method`` form field, JSON key or
    query parameter names; Rails the one a form field names (a form being also
    a ``POST`` without a ``Content-Type``). Checked in the query, in a form
    body (URL-encoded or multipart) and in a JSON body's top-level object.
    """
    where = _method_field_in(query, body, content_type)
    if where is None:
        return
    raise ToolRequestError(
        f"the {where} has a {_OVERRIDE_FIELD!r} field (or X-HTTP-Method-Override), which makes "
        "services (Symfony, Laravel, Rails, ASP.NET) run the method it names instead of the "
        "one Warden decides on; send the request with that method instead"
    )


def _method_field_in(query: str, body: bytes, content_type: str) -> str | None:
    """Where a ``_method`` field is (``query``, a JSON or form body), or ``None``.

    A body is looked at as every reader that may take it would: as JSON when
    the type says JSON anywhere (Laravel), and as a form when its media type
    is a form's or missing, both if both hold.
    """
    if query and _has_method_field(query):
        return "query"
    if not body or not _may_name_method(body):
        return None
    if _read_as_json(content_type) and any(
        k.casefold() == _OVERRIDE_FIELD for k in _top_level_keys(body)
    ):
        return "JSON body's top-level object"
    media = _media_type(content_type)
    if media in ("", "application/x-www-form-urlencoded"):
        if _has_method_field(body.decode("utf-8", errors="replace")):
            return "form body"
    elif media == "multipart/form-data" and any(_is_method_name(n) for n in _part_names(body)):
        return "form body"
    return None


def may_carry_fields(content_type: str) -> bool:
    """Whether a body of this type could carry a ``_method`` field (or fields a service
    merges with the query): JSON, a form, or no type at all (Rails reads that as a form)."""
    media = _media_type(content_type)
    return media in (
        "",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ) or _read_as_json(content_type)


def _may_name_method(body: bytes) -> bool:
    """Whether the body could spell ``_method`` at all (escaped, encoded or in any case)."""
    # The word, an escape ("%5F", "\u005f", a part name's "\t" that aiohttp and Werkzeug
    # read as "t") or both. bytes.lower() and find: ten times a case-blind expression's speed.
    return b"%" in body or b"\\" in body or b"method" in body.lower()


def _is_method_name(name: str) -> bool:
    """``_method`` as PHP and Rails read a form field's name: in any case, ``.method``,
    `` method``, ``_method[]``, ``[method`` and ``_method%00x`` (PHP cuts at a NUL) too;
    and ``X-HTTP-Method-Override``, as ASP.NET MVC 5 reads a field."""
    read = name.lstrip(" ").partition("\x00")[0].casefold().translate(_PHP_NAME)
    head = read.partition("[")[0]
    return (
        head == _OVERRIDE_FIELD
        or read.replace("[", "_", 1) == _OVERRIDE_FIELD
        or head in _OVERRIDE_HEADER_FIELDS
    )


def _has_method_field(text: str) -> bool:
    """Whether a query or URL-encoded form names ``_method`` (``&`` or ``;`` separated)."""
    return any(_is_method_name(name) for name in _form_names(text))


def _form_names(text: str) -> list[str]:
    """The field names of a query or URL-encoded form (``&`` or ``;`` separated), decoded once.

    :class:`ToolRequestError` past :data:`MAX_FORM_FIELDS` fields or
    :data:`MAX_FORM_NAME_CHARS` of names: reading more would hold the proxy.
    """
    if text.count("&") + text.count(";") >= MAX_FORM_FIELDS:
        raise _too_many_fields()
    names: list[str] = []
    total = 0
    for piece in re.split(r"[&;]", text):
        name = piece.partition("=")[0]
        if name:
            total += len(name)
            if total > MAX_FORM_NAME_CHARS:
                raise _too_many_fields()
            names.append(unquote(name.replace("+", " "), errors="replace"))
    return names


def _too_many_fields() -> ToolRequestError:
    return ToolRequestError(
        f"the form has more than {MAX_FORM_FIELDS:,} fields, or field names longer than "
        f"{MAX_FORM_NAME_CHARS // 1024} KiB in all; Warden reads every field name (a "
        "'_method' field or one named like a path argument changes what the service does) "
        "and refuses a form it cannot read in bounded time; send fewer fields, the data as "
        "JSON, or an upload with its own Content-Type"
    )


def _field_named(names: frozenset[str], body: bytes, content_type: str) -> tuple[str, str] | None:
    """Where ``body`` has a field a service may bind to one of ``names``, and which name.

    Read as :func:`_method_field_in` reads a body: a JSON top-level key when a
    framework may take it as JSON (Laravel), form fields when its media type is a
    form's or missing (Rails, PHP), multipart part names. ``None`` for other types.
    """
    folded = {_fold(n): n for n in names}
    if _read_as_json(content_type):
        for key in _top_level_keys(body):
            if (name := folded.get(_fold(key))) is not None:
                return "JSON body's top-level object", name
    media = _media_type(content_type)
    if media in ("", "application/x-www-form-urlencoded"):
        fields = _form_names(body.decode("utf-8", errors="replace"))
    elif media == "multipart/form-data":
        fields = _part_names(body)
    else:
        return None
    for field in fields:
        if (name := _form_field_for(field, folded)) is not None:
            return "form body", name
    return None


def _form_field_for(field: str, folded: Mapping[str, str]) -> str | None:
    """The name of ``folded`` (keys folded by :func:`_fold`) a service may bind a form
    ``field`` to: PHP reads ``ticket.id``, ``ticket id``, ``ticket[id`` and
    ``ticket_id%00x`` (a C string, cut at the NUL) as ``ticket_id``, and ``ticket_id[]``
    as an array of it; ASP.NET binds ``x.ticket_id``, ``x[ticket_id]`` and
    ``[0].ticket_id`` to a property ``ticket_id``, case-blind."""
    read = _fold(field.lstrip(" "))
    php = read.translate(_PHP_NAME).partition("\x00")[0]
    for candidate in (read, php, php.replace("[", "_", 1), *re.split(r"[.\[\]]", read)):
        if (name := folded.get(candidate)) is not None:
            return name
    return None


def _fold(name: str) -> str:
    """``name`` compared case-blind as loosely as any service does: upper-cased first,
    as ASP.NET's ordinal ignore-case does (U+0131, a dotless i, is ``I``), then folded."""
    return name.upper().casefold()


def _part_names(body: bytes) -> list[str]:
    """The ``name`` of every part of a multipart body, as sent, encoded (``name*``) or not.

    Bounded as :func:`_form_names` is (:class:`ToolRequestError` past it).
    """
    names: list[str] = []
    total = 0
    for header in _dispositions(body):
        for match in _PART_NAME.finditer(header):
            star, raw = match.groups()
            total += len(raw)
            if len(names) >= 2 * MAX_FORM_FIELDS or total > MAX_FORM_NAME_CHARS:
                raise _too_many_fields()
            # PHP reads name='x' as name="x" (rfc1867.c php_ap_getword_conf).
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'"
            value = raw[1:-1] if quoted else raw
            value = re.sub(r"\\(.)", r"\1", value)
            if star:
                value = value.rpartition("'")[2]  # RFC 2231: charset'language'value
            names.append(value)
            names.append(unquote(value, errors="replace"))
    return names


def _dispositions(body: bytes) -> Iterable[str]:
    """The value of every ``Content-Disposition`` header line of a multipart body, in any
    case and indented or not, with the lines PHP joins to it (a line starting with a space
    or tab) joined. Found with ``bytes.find``: a regular expression tried at every line
    start takes about a second on 10 MiB of empty lines."""
    lowered = body.lower()
    at = lowered.find(_DISPOSITION)
    found = 0
    while at >= 0:
        start = at
        while start > 0 and body[start - 1] in b" \t":
            start -= 1
        end = at + len(_DISPOSITION)
        rest = _HEADER_REST.match(body, end) if start == 0 or body[start - 1] in b"\r\n" else None
        if rest is not None:
            found += 1
            if found > MAX_FORM_FIELDS:
                raise _too_many_fields()
            yield _FOLDED.sub(" ", rest.group(1).decode("latin-1"))
            end = rest.end()
        at = lowered.find(_DISPOSITION, end)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's members, in order and duplicates kept."""


def _top_level_keys(body: bytes) -> list[str]:
    """The keys of a JSON body's top-level object (none if it is not one)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return []
    try:
        # orjson first: a second for 10 MiB of small objects in Python's parser. A key
        # given twice is the same name twice, so its dict's keys are every name sent.
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass  # what Python's parser reads besides (NaN, a lone surrogate), some services read
    else:
        return list(parsed) if isinstance(parsed, dict) else []
    try:
        document = json.loads(text, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return []
    return [key for key, _ in document] if isinstance(document, _Pairs) else []


def _media_type(content_type: str) -> str:
    """The media type as PHP reads it: up to the first ``;``, ``,`` or whitespace."""
    return _MEDIA_END.split(content_type.strip(), maxsplit=1)[0].lower()


def _media(content_type: str) -> str:
    media = content_type.partition(";")[0].strip()
    return repr(media[:60]) if media else "non-JSON"


def _read_as_json(content_type: str) -> bool:
    """Whether a framework may read the body as JSON: Laravel does when the whole
    ``Content-Type`` value, parameters included, contains ``/json`` or ``+json``
    (``text/json``, ``application/json-seq``, ``text/plain; x=/json``)."""
    lowered = content_type.lower()
    return "/json" in lowered or "+json" in lowered


def _is_json(content_type: str) -> bool:
    media = _media_type(content_type)
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _named(name: str, otherwise: str) -> str:
    """``name`` quoted, if a reason may show it (reasons are not sealed: a key may be an
    e-mail address); else ``otherwise``."""
    shown = shown_name(name)
    return repr(shown) if shown is not None else otherwise


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ToolRequestError(f"the JSON body gives {_named(key, 'a key')} twice")
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
        document = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except ToolRequestError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ToolRequestError(f"the request body is not valid JSON: {exc}") from None
    if "\\u" in text and _has_surrogate(document):
        # ``"\ud800"`` is valid JSON but no character: Go reads it as U+FFFD, Python
        # keeps it, and it cannot be recorded as UTF-8.
        raise ToolRequestError("the JSON body escapes a lone surrogate (\\ud800-\\udfff)")
    return document


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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


ABSENT: Final = object()
"""What an optional pointer finds when the body leaves its field out: the argument is
left out too, so the policy sees the body's shape (``object.get`` defaults apply), and
an explicit ``null`` stays ``null``."""


def resolve_pointer(
    document: Any, tokens: Sequence[str], text: str, *, optional: bool = False
) -> Any:
    """The value at an RFC 6901 pointer; :class:`ToolRequestError` naming it when absent,
    or :data:`ABSENT` then if ``optional``."""
    value = document
    for step in tokens:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif (
            isinstance(value, list)
            # RFC 6901: an index is "0" or digits without a leading zero; "-" is past the end.
            and step.isascii()
            and step.isdigit()
            and (step == "0" or step[0] != "0")
            and int(step) < len(value)
        ):
            value = value[int(step)]
        elif optional:
            return ABSENT
        else:
            raise ToolRequestError(f"the JSON body has no value at {text!r}")
    return value


def first_unnamed(document: Any, pointers: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The path of the first value of ``document`` (in document order) that no pointer
    covers, or ``None``; a pointer covers the value it finds and all within it.

    A value on the way to a pointer is looked into; one that cannot be (a string
    where ``/meta/note`` goes on, an empty list where ``/lines/0`` goes on) is not
    covered: the policy saw none of it.
    """
    covered = set(pointers)
    on_way = {p[:i] for p in covered for i in range(len(p))}
    stack: list[tuple[tuple[str, ...], Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if path in covered:
            continue
        if path not in on_way:
            return path
        if path and not value and isinstance(value, (dict, list)):
            # An empty list or object where a pointer goes on: the policy reads the
            # argument as absent, while the service may read "none" (no lines) apart
            # from "left out" (all lines). Only the whole body may be empty.
            return path
        if isinstance(value, dict):
            children = [((*path, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            children = [((*path, str(i)), item) for i, item in enumerate(value)]
        else:
            return path
        stack.extend(reversed(children))
    return None


def _shown_pointer(path: Sequence[str], document: Any) -> str:
    """A body value's pointer as a reason may show it (reasons are recorded in clear):
    ``a value at '/currency'``, or, where a key does not read as an identifier (it may
    be an e-mail address, or digits: a PIN), the field it is in: ``a field under
    '/customers' ...``. ``path`` leads into ``document``, which says which tokens are
    list indices."""
    shown: list[str] = []
    value = document
    for token in path:
        # An index into a list is shown; a longer run of digits may be a phone number.
        index = isinstance(value, list) and token.isdigit() and len(token) <= 6
        if index:
            value = value[int(token)]
        else:
            value = value.get(token) if isinstance(value, dict) else None
            if shown_name(token) is None:
                where = f"under {'/'.join(['', *shown])!r}" if shown else "at the top level"
                return f"a field {where} whose name is not shown"
        shown.append(token)  # an identifier or index: no '/' or '~' to escape
    if not shown:
        return "a value at '' (the whole body)"
    return f"a value at {'/'.join(['', *shown])!r}"


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


_REFUSED_UNRUN = frozenset(
    {400, 401, 402, 403, 404, 405, 409, 410, 411, 412, 413, 414, 415, 417, 422, 423, 428, 429, 431}
)
"""Statuses that refuse a request as it came, before its handler acts. Not 406: Spring
and ASP.NET run the handler, then find no format the agent's ``Accept`` takes; nor a
gateway's 408 or 499, given after forwarding; nor 424, after a step that acted."""


def refused_unrun(status: int) -> bool:
    """Whether a tool API's answer of ``status`` shows the call did not run.

    Only a refusal of the request as it came (:data:`_REFUSED_UNRUN`) does. A
    5xx may come after the action (a refund made, then a gateway's 504, a 503
    on a reset), and so may a 406 or a gateway's 408 or 499: those leave the
    call spent.
    """
    return status in _REFUSED_UNRUN


def result_text(body: bytes) -> str:
    """A tool API's response body as the outcome's recorded ``result`` (bounded, never raises)."""
    return body[: RESULT_MAX_CHARS * 4].decode("utf-8", errors="replace")[:RESULT_MAX_CHARS]
