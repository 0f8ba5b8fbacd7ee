"""The base-URL reverse proxy: ``/<upstream>/<rest>`` to ``<base_url>/<rest>``.

This edge only converts. It reads and bounds the agent's request, asks the
adapter what the request and response contain, asks the core
(:class:`~warden.core.Governor`) for decisions, and writes what the adapter
renders, streams through the one :class:`~warden.protocols.driver.StreamDriver`.
It never decides itself.

Only upstreams named in the configuration are reachable: the target host comes
from ``base_url`` alone, never from the request (no open proxy, no SSRF). On
LLM upstreams only allowlisted routes are (see :mod:`warden.protocols.registry`).

The request target is percent-decoded exactly once. Routing, the policy's
``input.action.path`` and the upstream all see that one decoded path (the
upstream gets it re-encoded canonically), so no encoding trick can make
Warden and the upstream disagree on which route was asked for.

Which responses are parsed follows what the official SDKs read, not the
response's content type: a governed request that asked to stream is read as
SSE, any other 2xx on a governed route must be a JSON object, and a 3xx is
never relayed (the SDKs follow redirects, which would route around Warden).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web
from yarl import URL

from warden.budgets.prices import OutputBounds, PriceTable
from warden.config import Config, UpstreamConfig
from warden.core import Governor, Turn
from warden.credentials import Credentials
from warden.errors import (
    AuditError,
    Overloaded,
    RequestError,
    RouteNotGoverned,
    StreamViolation,
    UnknownRoute,
    UnreadableBody,
    UnsupportedMedia,
    UpstreamError,
    UpstreamProtocol,
    UpstreamRedirect,
    WardenError,
)
from warden.identity import Identity
from warden.ingress import headers as hdr
from warden.ingress import off_loop
from warden.ingress.door_mark import door_of
from warden.ingress.listen import TOO_MANY_CONNECTIONS, Listener, listen, refusal_response
from warden.ingress.mcp_http import McpHttp
from warden.ingress.request_body import read_request_body
from warden.ingress.upstream_io import read_body, upstream_error
from warden.killswitch import KillSwitches
from warden.model import (
    Action,
    ActionKind,
    Agent,
    CallSize,
    Conversation,
    Decision,
    Effect,
    Mode,
    Outcome,
    RequestMeta,
    Stage,
    ToolCall,
    Usage,
    new_id,
    request_sha256,
)
from warden.ops import metrics, tracing
from warden.protocols import _wire, http_tool, metered
from warden.protocols.base import Adapter, StreamRewriter, bounded, response_id
from warden.protocols.declared_arguments import DeclaredArguments
from warden.protocols.driver import StreamDriver
from warden.protocols.errors import render_error, render_stream_error
from warden.protocols.http_tool import names_segments
from warden.protocols.registry import (
    PassthroughRule,
    RouteMatch,
    base_segments,
    deployment_named,
    foreign_prefix,
    match_route,
    model_api_at,
    model_route_refusal,
    under_governed_resource,
)
from warden.sessions import conversation_of, door_conversation, stored_answer_conversation
from warden.state.sessions import SessionRepo

__all__ = ["HttpDoor", "ProxyApp", "build_proxy_app"]

log = logging.getLogger("warden.proxy")

# How long a stream may wait for data before kill switches are checked again.
_KILL_CHECK_S = 0.25
_CLIENT_GONE = "client_disconnected"
_JSON = "application/json"
_SSE = "text/event-stream"
# A "%" not starting a two-digit escape: the target is malformed, not literal.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ROUTE_CACHE_SIZE = 1024
# RFC 3986 pchar: what a path segment keeps literal, as the SDKs encode it.
_PCHAR_SAFE = "!$&'()*+,;=:@"


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    upstream: UpstreamConfig
    segments: tuple[str, ...]
    """The decoded path after the upstream name, one entry per segment."""
    match: RouteMatch
    # Derived once per route (routes are cached), not once per request:
    path: str = field(init=False)
    """The decoded path after the upstream name, as policies see it."""
    forward_path: str = field(init=False)
    """The same path re-encoded canonically for the upstream: decoded once, never twice."""
    timeout: aiohttp.ClientTimeout = field(init=False)
    """The upstream request's timeouts."""
    deployment: str | None = field(init=False)
    """The deployment an Azure-style path names: the model that runs, whatever the body says."""

    def __post_init__(self) -> None:
        derived = {
            "deployment": deployment_named(
                self.upstream.protocol, self.segments, base_segments(self.upstream.base_url)
            ),
            "path": "/" + "/".join(self.segments),
            "forward_path": "/".join(quote(s, safe=_PCHAR_SAFE) for s in self.segments),
            "timeout": aiohttp.ClientTimeout(
                total=None,
                connect=self.upstream.connect_timeout_s,
                sock_read=self.upstream.timeout_s,
            ),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def family(self) -> str:
        return self.upstream.protocol


@dataclass(frozen=True, slots=True)
class _Call:
    """Who is asking, for what: everything per request that actions share."""

    route: _Route
    turn: Turn
    adapter: Adapter | None
    hide_usage: bool = False
    choices: int = 1
    """How many answers the request asked for (OpenAI's ``n``)."""
    stream: bool = False
    """The agent's request asked for a stream (body ``stream: true`` or ``?stream=true``)."""
    tool: http_tool.ToolRequest | None = None
    """The tool call a route rule made of the request: the upstream executes it, so its
    whole answer is the trusted outcome."""
    connected: Callable[[], bool] | None = None
    """Whether the agent is still there: a hold whose agent left becomes a deferral."""

    @property
    def agent(self) -> Agent:
        return self.turn.agent


class HttpDoor:
    """The base-URL proxy as a front door: listens on ``listen.proxy`` once started."""

    name = "http"

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        *,
        killswitches: KillSwitches | None = None,
        credentials: Credentials | None = None,
        mcp_owners: SessionRepo | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        """``credentials``: the upstream keys Warden holds in place of the agent's;
        ``mcp_owners``: where the agent that opened each MCP session is kept;
        ``prices``: the budget guard's price table (``None``: ``prices.file`` is read)."""
        self._config = config
        self._session = session
        self._killswitches = killswitches
        self._credentials = credentials if credentials is not None else Credentials.none()
        self._mcp_owners = mcp_owners
        self._prices = prices
        self._runner: web.AppRunner | None = None
        self._proxy: ProxyApp | None = None
        self.url = ""
        """Where it listens, e.g. ``http://127.0.0.1:8787`` (set by :meth:`start`)."""

    async def start(self, core: Governor) -> None:
        """Listen; every request is decided by ``core``."""
        proxy = ProxyApp(
            self._config,
            core,
            self._session,
            killswitches=self._killswitches,
            credentials=self._credentials,
            mcp_owners=self._mcp_owners,
            prices=self._prices,
        )
        self._proxy = proxy
        app = build_proxy_app(proxy, self._config.limits.max_body_bytes)
        listener = Listener.of(self._config, "proxy", _refusal(self._config.upstreams))
        self._runner, self.url = await listen(app, self._config.listen.proxy, listener)

    async def stop(self) -> None:
        """Stop accepting, then wait (up to the grace period) for requests in flight."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._proxy is not None:
            await self._proxy.mcp.close()  # cancellations still being sent to MCP servers


class ProxyApp:
    """Serves the proxy listener: HTTP in, :class:`~warden.core.Governor` calls, HTTP out."""

    def __init__(
        self,
        config: Config,
        core: Governor,
        session: aiohttp.ClientSession,
        *,
        killswitches: KillSwitches | None = None,
        credentials: Credentials | None = None,
        mcp_owners: SessionRepo | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        self._config = config
        self._core = core
        self._session = session
        self._killswitches = killswitches
        self._credentials = credentials = (
            credentials if credentials is not None else Credentials.none()
        )
        self._identity = Identity(config)
        self._passthrough = {
            name: tuple(PassthroughRule.parse(spec) for spec in upstream.passthrough)
            for name, upstream in config.upstreams.items()
        }
        self._tool_routes = {
            name: http_tool.ToolRoutes.compile(upstream.routes, upstream.unmatched)
            for name, upstream in config.upstreams.items()
            if upstream.routes
        }
        self._routes: dict[tuple[str, str], _Route] = {}
        self._bounds = OutputBounds(
            config.budgets.llm, prices or PriceTable.load(config.prices.file)
        )
        # ``protocol: mcp`` upstreams: the MCP streamable HTTP transport (its own door logic).
        self.mcp = McpHttp(
            config,
            core,
            session,
            identify=self._identity.resolve,
            killswitches=killswitches,
            credentials=credentials,
            owners=mcp_owners,
        )

    # -- entry ---------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one agent request; every failure becomes a protocol-shaped error."""
        started = time.perf_counter()
        metrics.INFLIGHT.inc()
        family = "openai"
        upstream_name = "_unknown"
        try:
            route = self._route(request)
            family, upstream_name = route.family, route.name
            if route.family == "mcp":
                response = await self.mcp.handle(
                    request, route.name, route.upstream, route.forward_path
                )
            else:
                response = await self._serve(request, route, started)
        except ModelRouteRefused as exc:
            # A tool upstream's refusal is a problem document; its "error" member is
            # what a model API's SDK, pointed here by mistake, shows as the message.
            error = {"message": str(exc), "type": "invalid_request_error", "code": exc.code}
            response = _problem(
                exc.status, exc.code, "Not governed by Warden", str(exc), extra={"error": error}
            )
        except WardenError as exc:
            response = self._error(family, exc.status, exc.code, str(exc))
            if isinstance(exc, UnreadableBody):
                response.force_close()  # the rest of the body cannot be read past
            if isinstance(exc, Overloaded):
                # The SDKs honour Retry-After on a 503 and back off before retrying.
                response.headers["Retry-After"] = str(exc.retry_after_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            response = self._error(family, 500, "internal_error", "Warden internal error")
        finally:
            metrics.INFLIGHT.dec()
        metrics.child(metrics.REQUESTS, upstream_name, str(response.status)).inc()
        return response

    def _route(self, request: web.Request) -> _Route:
        if request.method == "CONNECT" or _absolute_form(request):
            raise RequestError(
                "Warden's base-URL listener is not a forward proxy; "
                "send requests to /<upstream>/<path>"
            )
        # A route depends only on the method and the path as sent.
        key = (request.method, request.raw_path.partition("?")[0])
        cached = self._routes.get(key)
        if cached is not None:
            return cached
        name, *tail = _decode_path(key[1])
        upstream = self._config.upstreams.get(name)
        if upstream is None:
            known = ", ".join(sorted(self._config.upstreams)) or "none"
            raise UnknownRoute(f"no upstream named {name!r} (configured: {known})")
        match = (
            RouteMatch(adapter=None)  # every path of an MCP upstream is its MCP endpoint
            if upstream.protocol == "mcp"
            else match_route(
                upstream.protocol, request.method, tail, self._passthrough.get(name, ())
            )
        )
        if match is None:
            raise _not_governed(name, request.method, tail, upstream.protocol)
        if upstream.protocol == "http":
            self._refuse_model_api(name, request.method, tail)
        route = _Route(name=name, upstream=upstream, segments=tuple(tail), match=match)
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()  # paths carrying ids churn; the common few come back at once
        self._routes[key] = route
        return route

    def _refuse_model_api(self, name: str, method: str, tail: list[str]) -> None:
        """A model API's route on a ``protocol: http`` upstream, unless a route rule names
        it: its answers go back unparsed, and the SDK would read the tool calls in them."""
        upstream = self._config.upstreams[name]
        base = base_segments(upstream.base_url)
        found = model_api_at([*base, *tail])
        if found is None:
            return
        api, at = found
        rules = self._tool_routes.get(name)
        if names_segments(rules, method, tail, [i - len(base) for i in at]):
            return
        raise ModelRouteRefused(model_route_refusal(f"/{name}/", name, method, tail, api))

    # -- request -------------------------------------------------------------

    def _written_bounds(
        self, agent: Agent, provider: str, model: str | None
    ) -> tuple[int | None, int | None]:
        """The output and hosted-call bounds a model request is sent with: those a spend
        cap holds it at. None in observe mode, which enforces no cap: a shadow run
        sends the request as the agent wrote it."""
        if self._config.mode_for(agent.id) is not Mode.ENFORCE:
            return None, None
        return self._bounds.written(provider, model), self._bounds.tool_calls

    async def _serve(
        self, request: web.Request, route: _Route, started: float
    ) -> web.StreamResponse:
        agent = await self._identity.resolve(request.headers)
        body = await read_request_body(request, self._config.limits)
        adapter = route.match.adapter
        model: str | None = None
        hide_usage = False
        stream = route.match.stream_query and _stream_asked(request)
        declared: tuple[dict[str, Any], ...] = ()
        arguments: DeclaredArguments | None = None
        conversation: Conversation | None = None
        outgoing: Mapping[str, Any] | None = None  # the model request as it goes upstream
        size: CallSize | None = None
        if adapter is not None and route.match.parse_request:
            parsed_body = _parse_json_request(request, body)
            parsed = adapter.parse_request(parsed_body)
            # input.history and input.session (warden.sessions), read once per request.
            conversation = conversation_of(
                adapter.name, parsed_body, request.headers, self._config.sessions
            )
            model = route.deployment or parsed.model
            stream = parsed.stream
            declared = parsed.tools  # hosted MCP servers and tools: input.request.tools
            arguments = parsed.arguments
            self._core.record_results(agent, parsed.tool_results)
            prepared = adapter.prepare_request(parsed_body)
            outgoing = parsed_body
            if prepared is not None:
                outgoing = prepared
                hide_usage = True
            outgoing, bound, hosted = bounded(
                adapter, outgoing, parsed, *self._written_bounds(agent, route.family, model)
            )
            # What was decided on is what is sent: a key given twice reaches the
            # provider once, as Warden read it, whatever its own parser keeps.
            body = _wire.request_bytes(outgoing)
            size = CallSize(len(body), bound, parsed.choices, parsed.rate, hosted, parsed.continued)
        elif route.match.metered:
            model, size = metered.metered_request(
                body, route.deployment, request.headers.get("Content-Type", "")
            )
        tool, refused = await self._tool_request(request, route, body)
        if refused is not None:
            return refused
        if conversation is None:
            conversation = _unread_conversation(request, route)
        call = _Call(
            route=route,
            turn=Turn(
                agent=agent,
                request=RequestMeta(
                    method=request.method,
                    upstream=route.name,
                    path=route.path,
                    headers=hdr.recordable(request.headers),
                    tools=declared,
                    door=door_of(request.headers),
                    conversation=conversation,
                ),
                context=hdr.context_from(request.headers),
                model=model,
                declared=arguments,
            ),
            adapter=adapter,
            hide_usage=hide_usage,
            choices=size.choices if size is not None and size.choices else 1,
            stream=stream,
            tool=tool,
            connected=lambda: request.transport is not None,
        )
        if tool is not None:
            kind = ActionKind.TOOL_CALL
        elif route.family == "http":
            kind = ActionKind.HTTP_CALL
        else:
            kind = ActionKind.LLM_CALL
        action = Action(
            action_id=new_id("act"),
            agent=agent,
            kind=kind,
            protocol=adapter.name if adapter is not None else route.family,
            stage=Stage.EXECUTED,
            request=call.turn.request,
            model=model,
            context=call.turn.context,
            tool=tool.tool if tool is not None else None,
            arguments=tool.arguments if tool is not None else None,
            size=size if kind is ActionKind.LLM_CALL else None,
            # What an approval covers: the path and query as forwarded, the body as decided on.
            request_sha256=request_sha256(
                request.method, route.path + _query(request), await _bound(request, kind, body)
            ),
        )
        decision = await self._core.decide(action, connected=call.connected)
        if decision.enforced is not Effect.ALLOW and tool is not None:
            return _refused_call(decision)
        if decision.enforced is not Effect.ALLOW:
            return self._error(
                route.family,
                403,
                "denied",
                f"Warden denied this request: {decision.reason} (decision {decision.decision_id})",
                decision_id=decision.decision_id,
            )
        if outgoing is not None and adapter is not None:
            continued = self._core.continued(call.turn, adapter, outgoing)
            if continued is not None:
                body = _wire.request_bytes(continued)
        pre = time.perf_counter() - started
        return await self._forward(request, call, action, decision, body=body, pre_s=pre)

    async def _tool_request(
        self, request: web.Request, route: _Route, body: bytes
    ) -> tuple[http_tool.ToolRequest | None, web.Response | None]:
        """The tool call a plain HTTP route rule makes of the request, or the refusal."""
        tool_routes = self._tool_routes.get(route.name)
        if tool_routes is None:
            return None, None
        try:
            tool = await off_loop.read(
                len(body),
                partial(
                    tool_routes.resolve,
                    request.method,
                    route.segments,
                    body,
                    request.headers.get("Content-Type", ""),
                    request.rel_url.raw_query_string,
                    # Method overrides and Content-Encoding: aiohttp has inflated a gzip
                    # body, which would go on labelled gzip (refused, not relabelled).
                    headers=request.headers,
                ),
            )
        except http_tool.ToolRequestError as exc:
            return None, _problem(400, exc.code, "Invalid tool request", str(exc))
        if tool is None and tool_routes.unmatched == "deny":
            return None, _problem(
                404,
                RouteNotGoverned.code,
                "Route not governed",
                f"{request.method} {route.path} fits no rule in upstreams.{route.name}.routes"
                " (unmatched: deny)",
            )
        return tool, None

    async def _forward(
        self,
        request: web.Request,
        call: _Call,
        action: Action,
        decision: Decision,
        *,
        body: bytes,
        pre_s: float,
    ) -> web.StreamResponse:
        upstream = call.route.upstream
        # The decoded path, re-encoded: the upstream decodes to what Warden routed on.
        target = upstream.base_url + "/" + call.route.forward_path
        url = URL(target + _query(request), encoded=True)
        timeout = call.route.timeout
        sent = time.perf_counter()
        try:
            upstream_resp = await self._session.request(
                request.method,
                url,
                data=body if body else None,
                headers=hdr.request_headers(
                    request.headers, self._credentials.get(call.route.name)
                ),
                timeout=timeout,
                allow_redirects=False,
            )
        except asyncio.CancelledError:
            # Cut when Warden's stop outlasted its grace, the call sent and unanswered:
            # it may have run (or been billed), so its hold is settled as spent.
            outcome = Outcome(error="shutdown", latency_ms=_ms(sent))
            self._core.outcome(action, decision, outcome, trusted=False)
            raise
        except Exception as exc:
            error = _upstream_error(exc, call.route.name)
            # Only a model call that never reached the provider is not billed; one that
            # timed out or was cut may have been (a tool API's may have run either way).
            unsent = action.kind is ActionKind.LLM_CALL and isinstance(
                exc, aiohttp.ClientConnectorError
            )
            self._core.outcome(
                action, decision, Outcome(error=error.code, latency_ms=_ms(sent)), trusted=unsent
            )
            raise error from None
        try:
            status = upstream_resp.status
            refused = _refused_status(status, call.route.name)
            if refused is not None:
                self._core.outcome(
                    action,
                    decision,
                    Outcome(status=status, error=refused.code, latency_ms=_ms(sent)),
                    trusted=action.kind is ActionKind.LLM_CALL,
                )
                raise refused
            content_type = upstream_resp.headers.get("Content-Type", "")
            is_sse = content_type.lower().startswith(_SSE)
            success = 200 <= status < 300
            # Errors (4xx, 5xx) pass as they are: the SDKs raise them, reading no calls.
            adapter = call.adapter if success else None
            # The SDK picks stream-or-not from its request, never from the content type:
            # an event stream answering a request that asked for none goes the whole
            # path, whose parse fails (502) as the SDK's would. Routes without an
            # adapter (pass-through, tool APIs) are relayed as labelled.
            if success and (call.stream if adapter is not None else is_sse):
                return await self._stream(
                    request,
                    call,
                    action,
                    decision,
                    adapter=adapter,
                    upstream_resp=upstream_resp,
                    sent=sent,
                    pre_s=pre_s,
                )
            return await self._whole(
                call,
                action,
                decision,
                adapter=adapter,
                upstream_resp=upstream_resp,
                sent=sent,
                pre_s=pre_s,
            )
        finally:
            upstream_resp.release()

    # -- whole responses -----------------------------------------------------

    async def _whole(
        self,
        call: _Call,
        action: Action,
        decision: Decision,
        *,
        adapter: Adapter | None,
        upstream_resp: aiohttp.ClientResponse,
        sent: float,
        pre_s: float,
    ) -> web.StreamResponse:
        try:
            raw = await read_body(upstream_resp, f"upstream {call.route.name!r}")
        except asyncio.CancelledError:
            # Cut when Warden's stop outlasted its grace: answered, not read whole.
            outcome = Outcome(status=upstream_resp.status, error="shutdown", latency_ms=_ms(sent))
            self._core.outcome(action, decision, outcome, trusted=False)
            raise
        except UpstreamError as exc:
            # Answered (its status says whether it was billed), then not read whole.
            self._core.outcome(
                action,
                decision,
                Outcome(status=upstream_resp.status, error=exc.code, latency_ms=_ms(sent)),
                trusted=action.kind is ActionKind.LLM_CALL,
            )
            raise
        upstream_s = time.perf_counter() - sent
        metrics.child(metrics.UPSTREAM_LATENCY, call.route.name).observe(upstream_s)
        post_started = time.perf_counter()
        headers = hdr.response_headers(upstream_resp.headers)
        headers[hdr.DECISION_HEADER] = decision.decision_id
        usage: Usage | None = None
        if call.route.match.metered and 200 <= upstream_resp.status < 300:
            usage = metered.metered_usage(raw)
        if adapter is not None:
            # Parsed as leniently as the SDKs parse it, whatever the content type
            # says; the agent then gets exactly what was parsed and decided.
            body, problem = _decidable(adapter, raw)
            if body is None:
                self._core.outcome(
                    action,
                    decision,
                    Outcome(
                        status=upstream_resp.status,
                        error=UpstreamProtocol.code,
                        latency_ms=upstream_s * 1e3,
                    ),
                )
                raise UpstreamProtocol(
                    f"upstream {call.route.name!r} answered {upstream_resp.status} with {problem}"
                )
            usage = adapter.usage(body)
            if _hung_up(call):
                # Nobody is left to deliver the answer to: its calls are not decided, and
                # hold no budget for an agent that will never run them.
                return self._unheard(
                    call,
                    action,
                    decision,
                    status=upstream_resp.status,
                    upstream_s=upstream_s,
                    usage=usage,
                )
            calls = adapter.tool_calls(body)
            if calls:
                try:
                    decisions = await self._core.decide_calls(
                        call.turn, calls, adapter.name, connected=call.connected
                    )
                except BaseException as exc:
                    # The model call ran and is billed: its usage and outcome stand even
                    # when its calls could not be decided (the agent gets none of them).
                    self._core.count_usage(
                        call.agent, call.turn.model, usage, billed=call.route.match.billed
                    )
                    failed = Outcome(
                        status=upstream_resp.status,
                        error=getattr(exc, "code", None) or "undecided",
                        latency_ms=upstream_s * 1e3,
                        usage=usage,
                    )
                    self._core.outcome(action, decision, failed, trusted=True)
                    raise
                if _hung_up(call):
                    # Gone while they were decided (a hold turned deferral, a slow store):
                    # the calls allowed never reach it, so what they reserved goes back.
                    return self._unheard(
                        call,
                        action,
                        decision,
                        status=upstream_resp.status,
                        upstream_s=upstream_s,
                        usage=usage,
                        undelivered=(calls, decisions),
                    )
                # Always rendered from the decisions: allowed calls go out in the
                # canonical form of what was decided, not as the upstream wrote them.
                body = adapter.rewrite(body, decisions)
                blocked = [
                    d.decision_id for d in decisions.values() if d.enforced is not Effect.ALLOW
                ]
                if blocked:
                    headers[hdr.BLOCKED_HEADER] = ", ".join(blocked)
            self._core.record_response(call.turn, response_id(adapter, body))
            raw = _wire.dumps(body).encode()
            headers["Content-Type"] = _JSON
        self._core.count_usage(call.agent, call.turn.model, usage, billed=call.route.match.billed)
        outcome = Outcome(status=upstream_resp.status, latency_ms=upstream_s * 1e3, usage=usage)
        trusted = action.kind is ActionKind.LLM_CALL  # the provider's answer, seen by Warden
        if call.tool is not None:
            # The tool API's own answer. Only a refusal it gave before acting releases
            # the call's hold; after a 5xx the refund may have been made.
            outcome = dataclasses.replace(
                outcome,
                result=http_tool.result_text(raw),
                is_error=not 200 <= upstream_resp.status < 300,
            )
            trusted = 200 <= upstream_resp.status < 300 or http_tool.refused_unrun(
                upstream_resp.status
            )
        self._core.outcome(action, decision, outcome, trusted=trusted)
        metrics.child(metrics.ADDED_LATENCY, call.route.name).observe(
            pre_s + time.perf_counter() - post_started
        )
        return web.Response(status=upstream_resp.status, body=raw, headers=headers)

    def _unheard(
        self,
        call: _Call,
        action: Action,
        decision: Decision,
        *,
        status: int,
        upstream_s: float,
        usage: Usage | None,
        undelivered: tuple[Sequence[ToolCall], Mapping[str, Decision]] | None = None,
    ) -> web.Response:
        """The agent hung up before its answer was decided: the model call's outcome is
        recorded as a stream's cut is (billed as answered, error ``client_disconnected``),
        and the ``undelivered`` calls allowed meanwhile release what they reserved."""
        if undelivered is not None:
            self._release_undelivered(call, *undelivered)
        self._core.count_usage(call.agent, call.turn.model, usage, billed=call.route.match.billed)
        outcome = Outcome(
            status=status, latency_ms=upstream_s * 1e3, usage=usage, error=_CLIENT_GONE
        )
        self._core.outcome(action, decision, outcome, trusted=action.kind is ActionKind.LLM_CALL)
        metrics.child(metrics.ERRORS, _CLIENT_GONE).inc()
        # Nobody reads it; the requests metric counts it as nginx's "client closed request".
        return web.Response(status=499)

    def _release_undelivered(
        self, call: _Call, calls: Sequence[ToolCall], decisions: Mapping[str, Decision]
    ) -> None:
        """Record the allowed ``calls`` as never delivered, releasing what they reserved.

        Found by their links (an allowed call is linked by its id): a call without an
        id, or with one given twice, keeps its hold until the reservation expires.
        """
        ids = [c.call_id for c in calls if c.call_id and decisions[c.key].enforced is Effect.ALLOW]
        if not ids:
            return
        linked, _ = self._core.links.take(ids, agent=call.agent.id)
        gone = Outcome(error=_CLIENT_GONE, is_error=True)
        for link in linked.values():
            # Warden saw the agent go: the call never reached it, so nothing ran.
            self._core.outcome(link.action, link.decision_id, gone, trusted=True)

    # -- streams -------------------------------------------------------------

    async def _stream(
        self,
        request: web.Request,
        call: _Call,
        action: Action,
        decision: Decision,
        *,
        adapter: Adapter | None,
        upstream_resp: aiohttp.ClientResponse,
        sent: float,
        pre_s: float,
    ) -> web.StreamResponse:
        headers = hdr.response_headers(upstream_resp.headers)
        headers[hdr.DECISION_HEADER] = decision.decision_id
        if adapter is not None:
            headers["Content-Type"] = _SSE  # what Warden writes, whatever the upstream said
        response = web.StreamResponse(status=upstream_resp.status, headers=headers)
        rewriter = (
            adapter.stream_rewriter(hide_usage=call.hide_usage, choices=call.choices)
            if adapter is not None
            else None
        )
        error: str | None = None
        try:
            # Inside: an agent gone before the answer's headers reach it is an outcome too.
            await response.prepare(request)
            metrics.child(metrics.ADDED_LATENCY, call.route.name).observe(pre_s)
            await self._pump(call, rewriter, upstream_resp, response)
        except asyncio.CancelledError:
            # Cut when Warden's stop outlasted its grace: the call ran, so its outcome
            # (what was read of it) is recorded and its hold settled, not left to expire.
            error = "shutdown"
            raise
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            error = _CLIENT_GONE
        except _Killed as killed:
            error = "killed"
            await _try_write(response, render_stream_error(call.route.family, error, str(killed)))
        except (AuditError, Overloaded) as exc:
            # Warden's own failures keep their code: the agent is told what happened.
            error = exc.code
            await _try_write(response, render_stream_error(call.route.family, exc.code, str(exc)))
        except Exception as exc:
            # A StreamViolation (or any failure) from the rewriter lands here too:
            # the stream ends with the provider's error event, never unparsed.
            upstream_error = _upstream_error(exc, call.route.name)
            error = upstream_error.code
            if isinstance(upstream_error, StreamViolation):
                metrics.child(metrics.STREAM_VIOLATIONS, call.route.name).inc()
                log.warning("stream from %r cut: %s", call.route.name, upstream_error)
            await _try_write(
                response, render_stream_error(call.route.family, error, str(upstream_error))
            )
        finally:
            self._stream_outcome(
                call,
                action,
                decision,
                rewriter=rewriter,
                upstream_resp=upstream_resp,
                sent=sent,
                error=error,
            )
        await _try_write_eof(response)
        return response

    def _stream_outcome(
        self,
        call: _Call,
        action: Action,
        decision: Decision,
        *,
        rewriter: StreamRewriter | None,
        upstream_resp: aiohttp.ClientResponse,
        sent: float,
        error: str | None,
    ) -> None:
        upstream_s = time.perf_counter() - sent
        metrics.child(metrics.UPSTREAM_LATENCY, call.route.name).observe(upstream_s)
        usage = rewriter.usage if rewriter is not None else None
        model = (rewriter.model if rewriter is not None else None) or call.turn.model
        # Cut or not: the answer is the agent's, and its calls decided so far are history.
        self._core.record_response(call.turn, getattr(rewriter, "response_id", None))
        self._core.count_usage(call.agent, model, usage, billed=call.route.match.billed)
        self._core.outcome(
            action,
            decision,
            Outcome(
                status=upstream_resp.status, latency_ms=upstream_s * 1e3, usage=usage, error=error
            ),
            # A model call's stream, seen by Warden. A tool API's 2xx stream acted
            # whether or not it was read to the end: its cut never releases the hold.
            trusted=action.kind is ActionKind.LLM_CALL,
        )
        if error is not None:
            metrics.child(metrics.ERRORS, error).inc()

    async def _pump(
        self,
        call: _Call,
        rewriter: StreamRewriter | None,
        upstream_resp: aiohttp.ClientResponse,
        response: web.StreamResponse,
    ) -> None:
        """Copy the upstream stream to the agent through the rewriter, if any; raise to cut it."""
        if rewriter is None:
            while chunk := await self._next_chunk(upstream_resp, call):
                await response.write(chunk)
            return
        adapter = call.adapter
        assert adapter is not None
        driver = StreamDriver(
            rewriter,
            lambda calls: self._core.decide_calls(
                call.turn, calls, adapter.name, connected=call.connected
            ),
            response.write,
            keepalive_s=self._config.approvals.keepalive_s,
            on_answer_id=lambda answer: self._core.answer_started(call.turn, answer),
            recheck=lambda tools: self._stop_if_killed(call, tools),
        )
        while chunk := await self._next_chunk(upstream_resp, call):
            await driver.feed(chunk)
        await driver.finish()

    def _stop_if_killed(self, call: _Call, tools: Sequence[str]) -> None:
        """Cut the stream when a switch now covers a call it allowed (:class:`StreamDriver`)."""
        switches = self._killswitches
        if switches is not None and (
            switch := switches.covering(call.agent.id, call.route.name, tools)
        ):
            raise _Killed(switch.message)

    async def _next_chunk(self, resp: aiohttp.ClientResponse, call: _Call) -> bytes:
        """The next upstream chunk (``b""`` at the end), unless a kill switch stops the agent."""
        if self._killswitches is None:
            return await resp.content.readany()
        while True:
            switch = self._killswitches.is_killed(call.agent.id, call.route.name)
            if switch is not None:
                raise _Killed(switch.message)
            try:
                return await asyncio.wait_for(resp.content.readany(), _KILL_CHECK_S)
            except aiohttp.ServerTimeoutError:
                raise  # the upstream's own read timeout
            except TimeoutError:
                continue  # no data for a moment: look at the switches again

    @staticmethod
    def _error(
        family: str, status: int, code: str, message: str, *, decision_id: str | None = None
    ) -> web.Response:
        metrics.child(metrics.ERRORS, code).inc()
        headers = {"Content-Type": _JSON}
        if decision_id is not None:
            headers[hdr.DECISION_HEADER] = decision_id
        return web.Response(
            status=status, body=render_error(family, status, code, message), headers=headers
        )


def _hung_up(call: _Call) -> bool:
    """Whether the agent's connection closed (a transport check: no task, no I/O)."""
    return call.connected is not None and not call.connected()


async def _bound(request: web.Request, kind: ActionKind, body: bytes) -> bytes:
    """The body as an approval binds it: a model request as Warden encodes it, a tool
    API's as sent (JSON by its content, :func:`~warden.protocols.http_tool.bound_body`)."""
    if kind is ActionKind.LLM_CALL:
        return body
    content_type = request.headers.get("Content-Type", "")
    return await off_loop.read(len(body), partial(http_tool.bound_body, body, content_type))


def _query(request: web.Request) -> str:
    """``?`` and the query as the agent sent it (forwarded unchanged), or ``""``."""
    query = request.rel_url.raw_query_string
    return "?" + query if query else ""


def _problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    decision_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """An RFC 9457 problem response, for tool routes of plain HTTP upstreams."""
    metrics.child(metrics.ERRORS, code).inc()
    headers = {"Content-Type": http_tool.PROBLEM_CONTENT_TYPE}
    if decision_id is not None:
        headers[hdr.DECISION_HEADER] = decision_id
    body = http_tool.problem(status, code, title, detail, decision_id=decision_id, extra=extra)
    return web.Response(status=status, body=body, headers=headers)


def _refused_call(decision: Decision) -> web.Response:
    held = decision.enforced is Effect.REQUIRE_APPROVAL
    return _problem(
        403,
        "approval_required" if held else "denied",
        "Held for approval by Warden" if held else "Denied by Warden",
        decision.reason,
        decision_id=decision.decision_id,
    )


class _Killed(Exception):
    """A kill switch stopped the agent while its response was streaming."""


def build_proxy_app(proxy: ProxyApp, max_body_bytes: int) -> web.Application:
    """The aiohttp application for the proxy listener: one catch-all route."""
    # The proxy bounds bodies itself while streaming them in; aiohttp's own
    # limit only applies to request.read(), which the proxy does not use.
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=tracing.proxy_middlewares(),  # none unless tracing is on
    )
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def _absolute_form(request: web.Request) -> bool:
    # raw_path is the request target as sent. Origin-form starts with "/";
    # an absolute-form target ("GET http://elsewhere/ HTTP/1.1") is what a
    # forward proxy receives, and this listener is not one.
    return not request.raw_path.startswith("/")


class ModelRouteRefused(RouteNotGoverned):
    """A model API's route on a ``protocol: http`` upstream that no route rule names."""


def _refusal(upstreams: Mapping[str, UpstreamConfig]) -> Callable[[bytes], bytes]:
    """The 503 for a connection past ``limits.max_connections``, in the shape of the
    upstream its request line names (OpenAI's when it names none)."""

    def refuse(line: bytes) -> bytes:
        parts = line.split(b" ")
        target = parts[1].decode("latin-1") if len(parts) == 3 else ""
        name = unquote(target.removeprefix("/").partition("/")[0].partition("?")[0])
        upstream = upstreams.get(name)
        family = upstream.protocol if upstream is not None else "openai"
        if family == "mcp":
            error = {
                "code": -32000,
                "message": TOO_MANY_CONNECTIONS,
                "data": {"warden": "overloaded"},
            }
            body = _wire.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
        else:
            body = render_error(family, 503, "overloaded", TOO_MANY_CONNECTIONS)
        return refusal_response(body)

    return refuse


def _decode_path(raw_path: str) -> list[str]:
    """The request path's segments, each percent-decoded exactly once, or ``RequestError``.

    Checked after decoding, so an encoded form cannot slip past: no empty,
    ``.`` or ``..`` segment (nor one before a ``;``: ``..;``), no slash or
    backslash inside a segment (``%2F``, ``%5C``), no NUL or other control
    character.
    """
    segments: list[str] = []
    for raw in raw_path.removeprefix("/").split("/"):
        if _BAD_ESCAPE.search(raw) or "#" in raw:
            raise RequestError("path has a malformed percent-escape")
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise RequestError("path is not UTF-8 once percent-decoded") from None
        # Tomcat and Spring drop ";" parameters before resolving: "..;" is ".." to them.
        if segment.partition(";")[0] in ("", ".", ".."):
            raise RequestError("path must not contain '.', '..' or empty segments")
        if "/" in segment or "\\" in segment:
            raise RequestError("path must not contain encoded slashes or backslashes")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
            raise RequestError("path must not contain NUL or other control characters")
        segments.append(segment)
    return segments


def _stream_asked(request: web.Request) -> bool:
    """Whether a route that streams on request (``GET responses/{id}``) is asked to."""
    return any(v.strip().lower() in ("true", "1") for v in request.query.getall("stream", ()))


def _not_governed(
    name: str, method: str, tail: Sequence[str], family: str = ""
) -> RouteNotGoverned:
    path = "/".join(tail)
    what = f"Warden does not govern {method} /{name}/{path}: it does not parse its responses"
    prefix = foreign_prefix(family, tail)
    if prefix is not None:
        # A gateway's own base path, or an id spelled like a resource: say which, so a
        # user with the first knows where it goes.
        return RouteNotGoverned(
            f"{what}: /{'/'.join(prefix)} is not a base path Warden knows (versions, "
            f"openai, anthropic, api, openai/deployments/<name>). If it is the provider's "
            f"or gateway's own, put it in upstreams.{name}.base_url"
        )
    if under_governed_resource(tail):
        return RouteNotGoverned(f"{what}, and this resource carries tool calls, so it is refused")
    return RouteNotGoverned(
        f"{what} for tool calls. To forward it unparsed, list it in "
        f'upstreams.{name}.passthrough (e.g. "{method} {path}")'
    )


# The Envoy ext_proc door (warden.ingress.envoy_proc) routes paths exactly the same way.
decode_path = _decode_path
not_governed = _not_governed


def _refused_status(status: int, name: str) -> UpstreamError | None:
    """A 502 for statuses never relayed: redirects (the SDKs follow them) and odd ones."""
    if 300 <= status < 400:
        return UpstreamRedirect(
            f"upstream {name!r} answered with a redirect ({status}); Warden never relays "
            "redirects, which would send the agent around it"
        )
    if not 200 <= status < 600:
        return UpstreamProtocol(f"upstream {name!r} answered with status {status}")
    return None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = _wire.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _decidable(adapter: Adapter, raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """A response body Warden can decide on, or ``None`` and why not (for the error)."""
    body = _json_object(raw)
    if body is None:
        return None, "a body that is not a JSON object"
    problem = adapter.problem(body)
    if problem is not None:
        return None, problem
    return body, ""


def _unread_conversation(request: web.Request, route: _Route) -> Conversation | None:
    """The conversation of a request whose body is not a model request."""
    answer = route.match.stored_answer_id(route.segments)
    if answer is not None:
        # A stored (background) answer fetched by id: in the conversation that asked for it.
        return stored_answer_conversation(request.headers, answer)
    # Plain HTTP tools and unparsed bodies carry no conversation, but a request
    # may still name its session: input.session counts it.
    return door_conversation(request.headers)


def _parse_json_request(request: web.Request, body: bytes) -> dict[str, Any]:
    if request.content_type != _JSON:
        raise UnsupportedMedia(
            f"expected Content-Type application/json, got {request.content_type!r}"
        )
    _wire.utf8_only(request.headers.get("Content-Type", ""))
    return _wire.request_object(body)


def _upstream_error(exc: BaseException, name: str) -> UpstreamError:
    return upstream_error(exc, f"upstream {name!r}")


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3


# The agent may have gone away; what it would have read is recorded anyway.
_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError)


async def _try_write(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(*_GONE):
        await response.write(data)


async def _try_write_eof(response: web.StreamResponse) -> None:
    with contextlib.suppress(*_GONE):
        await response.write_eof()
