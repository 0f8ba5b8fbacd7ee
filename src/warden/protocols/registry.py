"""Which routes an LLM upstream may serve, and which adapter reads each one.

Routes are an allowlist per protocol family. A route is *governed* (its
responses go through an adapter, every tool call in them is decided), *plain*
(known to carry no tool calls: forwarded as one ``llm_call``), or *listed* by
the operator in ``upstreams.<name>.passthrough``. Anything else on an
``openai`` or ``anthropic`` upstream is refused: a response Warden does not
parse could carry a tool call no policy saw. ``http`` upstreams (tool APIs)
forward every route, each one an ``http_call`` decision.

Matching works on the decoded path after the upstream name (the *tail*).
The tail is ``<prefix>/<route>``: the route starts at the first segment that
names one of the family's resources (``chat``, ``responses``, ``models`` ...)
after a prefix that can be a base path (versions, ``openai``, ``api``, Azure's
deployments), so ``v1/chat/completions``, ``chat/completions`` (the base URL
already ends in ``/v1``) and ``openai/deployments/x/chat/completions`` all find
the chat adapter, an id spelled like a resource (``conversations/responses/items``)
finds none, and a resource name hidden in a longer path
(``chat/completions/models``) cannot make a governed route look plain, nor
an id a plain one (``threads/t1/runs/models`` is a run, refused). A gateway's
own base path (``v1/projects/p/locations/l/endpoints/openapi``) belongs in the
upstream's ``base_url``: :func:`past_base` takes it off a path that carries it
(Envoy's ``:path``).

Pass-through patterns (``"GET v1/files"``, ``"POST v1/batches/*"``) are a
method, or ``*`` for any, then a path matched against the whole tail, segment
by segment: ``*`` is exactly one segment, a final ``**`` one or more. They
never open a route under a governed resource (``chat/...``, ``responses/...``,
``messages/...``): those bodies carry tool calls that must be parsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.base import Adapter
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter

__all__ = [
    "METHODS",
    "PassthroughRule",
    "RouteMatch",
    "base_segments",
    "deployment_named",
    "foreign_prefix",
    "match_route",
    "model_api_at",
    "model_route_refusal",
    "past_base",
    "under_governed_resource",
]

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What Warden does with one allowed route.

    ``adapter`` parses the response (``None``: the route carries no tool calls
    and is forwarded as is). ``parse_request``: the request body is the
    adapter's request (model, stream flag, tool results); otherwise it is
    forwarded unread, as for a stored completion fetched by id.
    ``stream_query``: the request asks to stream with ``?stream=true``.
    ``stored_answer``: the path segment (counted from the end, ``-1`` the last)
    naming a stored answer the route fetches, stops or deletes (``GET
    responses/{id}``): the request is in that answer's conversation, and only
    the agent it was made for may make it; calls it returns go on there.
    """

    adapter: Adapter | None
    parse_request: bool = False
    stream_query: bool = False
    passthrough: bool = False
    stored_answer: int | None = None
    metered: bool = False
    """The route is billed by input tokens (embeddings): the request names the model and
    the answer's ``usage.prompt_tokens`` what it cost, for the LLM spend cap."""

    @property
    def billed(self) -> bool:
        """Whether a call on this route may be billed by the provider: a model request,
        embeddings, or a pass-through route Warden does not read. Fetching, updating,
        cancelling or listing what a model call made is not: a spend cap neither
        holds nor charges it (the call that made it was charged)."""
        return self.parse_request or self.metered or self.passthrough

    def __post_init__(self) -> None:
        if self.stored_answer is not None and self.stored_answer >= 0:
            raise ValueError("stored_answer counts from the end of the path: -1 is the last")

    def stored_answer_id(self, segments: Sequence[str]) -> str | None:
        """The id of the stored answer a request on this route names, if it names one."""
        at = self.stored_answer
        if at is None or len(segments) < -at:
            return None
        return segments[at]


@dataclass(frozen=True, slots=True)
class _Rule:
    method: str
    segments: tuple[str, ...]
    match: RouteMatch

    def matches(self, method: str, route: Sequence[str]) -> bool:
        if method != self.method or len(route) != len(self.segments):
            return False
        return _fits(self.segments, route)


def _fits(pattern: Sequence[str], segments: Sequence[str]) -> bool:
    return all(p in ("*", s) for p, s in zip(pattern, segments, strict=True))


def _rule(spec: str, match: RouteMatch) -> _Rule:
    method, _, path = spec.partition(" ")
    return _Rule(method, tuple(path.split("/")), match)


# Adapters hold no per-request state (stream rewriters do), so one each suffices.
_CHAT = OpenAIChatAdapter()
_RESPONSES = OpenAIResponsesAdapter()
_MESSAGES = AnthropicMessagesAdapter()
_PLAIN = RouteMatch(adapter=None)

_RULES: dict[str, tuple[_Rule, ...]] = {
    "openai": (
        _rule("POST chat/completions", RouteMatch(_CHAT, parse_request=True)),
        # A stored completion, fetched or updated later, is a ChatCompletion
        # with the same proposed calls: decided like a fresh one.
        _rule("GET chat/completions/*", RouteMatch(_CHAT)),
        _rule("POST chat/completions/*", RouteMatch(_CHAT)),
        _rule("DELETE chat/completions/*", _PLAIN),
        _rule("POST responses", RouteMatch(_RESPONSES, parse_request=True)),
        _rule("GET responses/*", RouteMatch(_RESPONSES, stream_query=True, stored_answer=-1)),
        _rule("POST responses/*/cancel", RouteMatch(_RESPONSES, stored_answer=-2)),
        # Carries no calls, but ends a stored answer: only its own agent's (sessions).
        _rule("DELETE responses/*", RouteMatch(None, stored_answer=-1)),
        _rule("POST responses/input_tokens", _PLAIN),
        _rule("GET models", _PLAIN),
        _rule("GET models/*", _PLAIN),
        _rule("POST embeddings", RouteMatch(None, metered=True)),
        _rule("POST moderations", _PLAIN),
    ),
    "anthropic": (
        _rule("POST messages", RouteMatch(_MESSAGES, parse_request=True)),
        _rule("POST messages/count_tokens", _PLAIN),
        _rule("GET models", _PLAIN),
        _rule("GET models/*", _PLAIN),
    ),
}
# Resources whose other routes (lists, input items, batches) return tool calls
# in shapes Warden does not parse: refused even when listed as pass-through. On
# every upstream, whatever its family: providers serve each other's shapes
# (Anthropic answers OpenAI's chat/completions, gateways serve both).
_GOVERNED_ROOTS = frozenset({"chat", "responses", "messages"})
_ROOTS: dict[str, frozenset[str]] = {
    family: frozenset(rule.segments[0] for rule in rules) for family, rules in _RULES.items()
}

_PATTERN_SEGMENT = re.compile(r"^(\*|\*\*|[^*/\\\x00-\x20]+)$")


@dataclass(frozen=True, slots=True)
class PassthroughRule:
    """An operator's ``"METHOD path"`` pattern for a route forwarded unparsed."""

    method: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> PassthroughRule:
        """Parse ``"GET v1/files/*"``; raises ``ValueError`` saying what is wrong."""
        method, _, path = spec.strip().partition(" ")
        method = method.upper()
        if method != "*" and method not in METHODS:
            raise ValueError(
                f"{spec!r}: must start with an HTTP method ({', '.join(sorted(METHODS))}) or '*'"
            )
        path = path.strip().strip("/")
        if not path:
            raise ValueError(f"{spec!r}: needs a path after the method, e.g. 'GET v1/files'")
        segments = tuple(path.split("/"))
        for i, segment in enumerate(segments):
            if segment in (".", "..") or not _PATTERN_SEGMENT.match(segment):
                raise ValueError(
                    f"{spec!r}: segment {segment!r} must be a literal name, '*' or a final '**'"
                )
            if segment == "**" and i != len(segments) - 1:
                raise ValueError(f"{spec!r}: '**' may only be the last segment")
        return cls(method, segments)

    def matches(self, method: str, tail: Sequence[str]) -> bool:
        """Whether ``method`` and the decoded tail segments fit this pattern."""
        if self.method not in ("*", method):
            return False
        if self.segments[-1] == "**":
            head = self.segments[:-1]
            if len(tail) <= len(head):
                return False
        else:
            head = self.segments
            if len(tail) != len(head):
                return False
        return _fits(head, tail[: len(head)])


def _route_start(family: str, tail: Sequence[str]) -> int | None:
    """Where the route starts: the first segment naming one of the family's resources
    after a prefix that can be a base path (:func:`_base_path`).

    Further in, that name is an id in another resource's path: a conversation
    the provider called ``responses`` (``v1/conversations/responses/items``)
    would have its items, calls and all, read as a Responses answer and passed
    on unread.
    """
    # Case-folded: a provider's gateway that ignores path case would serve
    # "Chat/completions" as "chat/completions", so a pass-through rule must not
    # reach it; such a path is refused instead (no governed rule fits it).
    roots = _ROOTS.get(family, frozenset())
    return next(
        (
            i
            for i, segment in enumerate(tail)
            if segment.casefold() in roots and _base_path(tail[:i])
        ),
        None,
    )


_BASE_WORDS: Final = frozenset({"openai", "anthropic", "api"})
_VERSION: Final = re.compile(r"v[0-9]+[a-z0-9]*")


def _base_path(prefix: Sequence[str]) -> bool:
    """Whether ``prefix`` can be the path a model API is served under: versions (``v1``,
    ``v1beta``), ``openai``, ``anthropic``, ``api`` (``api/v1``, ``v1beta/openai``), and
    Azure's ``openai/deployments/<name>``. Anything else holds a resource's name or id."""
    folded = [segment.casefold() for segment in prefix]
    if len(folded) >= 3 and folded[-3:-1] == ["openai", "deployments"]:
        folded = folded[:-2]
    return all(segment in _BASE_WORDS or _VERSION.fullmatch(segment) for segment in folded)


def base_segments(base_url: str) -> list[str]:
    """The path segments of an upstream's ``base_url`` (``https://gw/v1``: ``v1``), decoded."""
    return [unquote(s) for s in urlsplit(base_url).path.split("/") if s]


def past_base(segments: Sequence[str], base: Sequence[str]) -> Sequence[str]:
    """``segments`` without the upstream's base path ``base`` in front (case-blind), as the
    base-URL proxy's tail never carries it; unchanged when they do not start with it."""
    n = len(base)
    if (
        n
        and len(segments) > n
        and all(a.casefold() == b.casefold() for a, b in zip(segments[:n], base, strict=True))
    ):
        return segments[n:]
    return segments


def foreign_prefix(family: str, tail: Sequence[str]) -> Sequence[str] | None:
    """The segments before a resource's name that are not a base path Warden knows (a
    gateway's own, ``v1/projects/p/locations/l/endpoints/openapi``), for the refusal to
    name; ``None`` when there are none."""
    roots = _ROOTS.get(family, frozenset())
    for i, segment in enumerate(tail):
        if segment.casefold() in roots:
            return None if _base_path(tail[:i]) else tail[:i]
    return None


def deployment_named(family: str, tail: Sequence[str], base: Sequence[str] = ()) -> str | None:
    """The deployment an Azure-style path names, whose model runs whatever the body says.

    ``openai/deployments/<name>/chat/completions``: the service runs the
    deployment ``<name>`` and ignores the body's ``model``, so ``<name>`` is
    the model a policy and a spend cap must read. ``None`` for other paths.
    ``base``: the upstream's ``base_url`` path, which may hold the deployment
    (the Azure SDK's own ``base_url`` ends in it); read with ``tail`` first.
    """
    for path in ([*base, *tail], tail) if base else (tail,):
        start = _route_start(family, path)
        if start is not None and start >= 2 and path[start - 2].casefold() == "deployments":
            return path[start - 1]
    return None


def under_governed_resource(tail: Sequence[str]) -> bool:
    """Whether the tail names a route under a resource a family governs (``chat``,
    ``responses``, ``messages``, in any case): never pass-through, on any upstream."""
    return any(segment.casefold() in _GOVERNED_ROOTS for segment in tail)


def model_api_at(tail: Sequence[str]) -> tuple[str, tuple[int, ...]] | None:
    """The model API whose SDK reads tool calls in answers on ``tail``, and the indexes
    of the segments that name it (``messages`` in ``v1/messages``; ``chat`` and
    ``completions``; ``threads`` and ``runs``), or ``None``.

    A ``protocol: http`` upstream forwards its answers unparsed, so these paths are
    refused there (whatever the method: a method override makes one method
    another) unless a route rule writes each of those segments out. ``tail`` is
    the whole path the service gets, the upstream's ``base_url`` path included.
    Read as the laxest server reads a path: each segment case-blind, without ``;``
    parameters, and also without a format suffix (``.json``). After any prefix:

    - ``…/chat/completions…``: OpenAI chat (also the stored completions list);
    - ``…/v1/responses…``, ``…/openai/responses…``, ``/responses…`` at the
      path's start: OpenAI Responses;
    - ``…/v1/threads…``, ``…/threads/<id>/runs…``: Assistants runs;
    - ``…/v1/conversations…``, ``…/conversations/<id>/items…``: conversation
      items, which carry function calls;
    - ``…/v1/messages…``: Anthropic Messages and its batches;
    - ``…:generateContent``, ``…:streamGenerateContent``,
      ``…:batchGenerateContent``, ``…:rawPredict``, ``…:streamRawPredict``:
      Gemini and Vertex;
    - ``…/model/<id>/invoke``, ``…/converse`` (and their streams): Bedrock;
    - ``…/api/chat``, ``…/v1/chat``, ``…/v2/chat`` at the path's end: Ollama and
      Cohere; ``…/agents/completions``: Mistral agents; ``…/v1beta/interactions…``:
      Gemini Interactions;
    - ``…/v1/realtime…``: OpenAI Realtime (a WebSocket); ``…BidiGenerateContent…``:
      Gemini and Vertex Live; ``…/sessions/<id>/…/events|items|turns|subagents…``:
      Anthropic Managed Agents and OpenAI agent sessions; ``…/chatkit…``: OpenAI
      ChatKit.
    """
    read = [segment.partition(";")[0].casefold() for segment in tail]
    for forms in (read, [_stem(segment) for segment in read]):
        found = _model_api_in(forms)
        if found is not None:
            return found
    return None


_FORMAT_SUFFIXES: Final = frozenset({"json", "xml", "html", "htm", "txt", "yaml", "yml"})


def _stem(segment: str) -> str:
    """``messages.json`` as ``messages``: servers that read a format suffix (Rails,
    Spring's suffix match) route it as the bare name."""
    stem, dot, suffix = segment.rpartition(".")
    return stem if dot and stem and suffix in _FORMAT_SUFFIXES else segment


def _model_api_in(read: Sequence[str]) -> tuple[str, tuple[int, ...]] | None:
    for i, segment in enumerate(read):
        before = read[i - 1] if i else ""
        if segment == "chat" and read[i + 1 : i + 2] == ["completions"]:
            return "OpenAI chat completions", (i, i + 1)
        if segment in _V1_ROOTS and (
            before in ("v1", "openai") or (i == 0 and segment == "responses")
        ):
            return _V1_ROOTS[segment], (i,)
        if read[i + 2 : i + 3] == [_NESTED.get(segment)]:
            return _V1_ROOTS[segment], (i, i + 2)
        if segment.endswith(_VERTEX_VERBS) or "bidigeneratecontent" in segment:
            # Gemini Live's and Vertex Live's WebSockets name the verb after a dot, a
            # slash or nothing (...GenerativeService.BidiGenerateContentConstrained).
            return "Gemini or Vertex AI", (i,)
        if (
            segment == "model"
            and read[-1] in _BEDROCK_VERBS
            and (len(read) == i + 3 or _arn_at(read, i + 1))
        ):
            # The model id may be an ARN whose "/" a lax reading took as a separator.
            return "Amazon Bedrock", (i, len(read) - 1)
        if segment == "chat" and before in _CHAT_BASES and not any(read[i + 1 :]):
            return _CHAT_BASES[before], (i,)
        if segment == "sessions" and (at := _session_feed(read, i)) is not None:
            return "agent sessions (Anthropic, OpenAI)", (i, at)
        if segment == "chatkit":
            return "OpenAI ChatKit", (i,)
        if segment == "agents" and read[i + 1 : i + 2] == ["completions"]:
            return "Mistral agents", (i, i + 1)
        if segment == "interactions" and before in ("v1", "v1beta", "v1alpha"):
            return "Gemini Interactions", (i,)
    return None


_SESSION_FEEDS: Final = frozenset({"events", "items", "turns", "subagents"})


def _arn_at(read: Sequence[str], i: int) -> bool:
    """Whether a model id starting at ``i`` is an ARN (an inference profile's), whose
    ``/`` a lax reading split into more segments."""
    return i < len(read) and read[i].startswith("arn:")


def _session_feed(read: Sequence[str], i: int) -> int | None:
    """Where an agent session's feed of calls the client runs is named after ``sessions``
    at ``i``: ``sessions/<id>/events`` (Anthropic Managed Agents, and ``threads/<id>/
    events`` in it), ``sessions/<id>/items|turns|subagents`` (OpenAI agent sessions)."""
    if read[i + 2 : i + 3] and read[i + 2] in _SESSION_FEEDS:
        return i + 2
    if read[i + 2 : i + 3] == ["threads"] and read[i + 4 : i + 5] == ["events"]:
        return i + 4
    return None


_CHAT_BASES: Final = {"api": "Ollama chat", "v1": "Cohere chat", "v2": "Cohere chat"}
"""Chat routes at the end of a path whose answers carry tool calls: Ollama's
``/api/chat`` and Cohere's ``/v1/chat`` and ``/v2/chat``."""


_NESTED: Final = {"threads": "runs", "conversations": "items"}
"""Routes named wherever they sit (a gateway serving them at its root): their own
resource under an id (``threads/<id>/runs``)."""


def model_route_refusal(
    prefix: str, upstream: str | None, method: str, tail: Sequence[str], api: str
) -> str:
    """Why ``method prefix+tail`` on the tool upstream ``upstream`` is refused, and what
    to do (:func:`model_api_at` named ``api``)."""
    path = prefix + "/".join(tail)
    where = f"upstreams.{upstream}.routes" if upstream else "the routes of ext_authz.upstream"
    return (
        f"{method} {path} is a route of the {api} API, whose answers carry tool calls "
        "that Warden does not read on a protocol: http upstream. Configure the model "
        "API as an upstream of its own (protocol: openai or anthropic), or, if this is "
        f"a tool API's route, name it in {where}, writing out the segment that names "
        "the model API's resource (/messages/{id} does; /{channel} does not)"
    )


_V1_ROOTS: Final = {
    "responses": "OpenAI Responses",
    "threads": "OpenAI Assistants",
    "conversations": "OpenAI Conversations",
    "messages": "Anthropic Messages",
    "realtime": "OpenAI Realtime",
}
_VERTEX_VERBS: Final = (
    ":generatecontent",
    ":batchgeneratecontent",
    ":streamgeneratecontent",
    ":rawpredict",
    ":streamrawpredict",
)
_BEDROCK_VERBS: Final = frozenset(
    {
        "invoke",
        "invoke-with-response-stream",
        "invoke-with-bidirectional-stream",
        "converse",
        "converse-stream",
    }
)


def match_route(
    family: str,
    method: str,
    tail: Sequence[str],
    passthrough: Sequence[PassthroughRule] = (),
) -> RouteMatch | None:
    """The route ``method tail`` on an upstream of ``family``, or ``None``: refuse it.

    ``tail`` is the decoded path after the upstream name, as segments.
    """
    if family == "http":
        return _PLAIN
    rules = _RULES.get(family)
    if rules is None:
        return None
    start = _route_start(family, tail)
    if start is not None:
        route = tail[start:]
        for rule in rules:
            if rule.matches(method, route):
                return rule.match
    if under_governed_resource(tail):
        return None
    if any(rule.matches(method, tail) for rule in passthrough):
        return RouteMatch(adapter=None, passthrough=True)
    return None
