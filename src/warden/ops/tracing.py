"""OpenTelemetry traces: a span per request and per decision, off unless ``OTEL_*`` says so.

Tracing is configured by the standard variables, read once at start
(:func:`configure_from_env`): it is on when ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp``, ``console``) or, with that unset, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off.
The OTLP exporter speaks HTTP/protobuf and reads its own variables (headers,
timeout, compression), as do the sampler and batch processor
(``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``) and the resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``).

When tracing is off nothing of this runs on the request path: the proxy gets
no middleware, the upstream session no trace hooks, and the core's methods are
not wrapped. When on:

* the proxy listener's middleware continues the agent's W3C ``traceparent``
  in a ``SERVER`` span per request;
* the core's ``decide`` opens an ``INTERNAL`` span per decision with its id,
  effect, mode, deciding guard and the policy revision;
* each upstream request is a ``CLIENT`` span whose context replaces the
  ``traceparent`` forwarded upstream, so the trace continues there.

Spans carry GenAI semantic-convention attributes (``gen_ai.*``) but never a
header, a request body, tool arguments or decision reasons: a trace backend
is not the audit log, and personal data stays out of it.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from warden import __version__
from warden.errors import ConfigError
from warden.model import Action, ActionKind, Decision, Usage
from warden.text import mended

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

__all__ = [
    "DECISION_ID",
    "client_trace_configs",
    "configure",
    "configure_from_env",
    "enabled",
    "instrument",
    "log_fields",
    "proxy_middlewares",
    "shutdown",
]

log = logging.getLogger("warden.tracing")

SCOPE = "warden"
DECISION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "warden_decision_id", default=None
)
"""The id of the last decision made in this request's context, for log lines."""

_state: dict[str, Any] = {"tracer": None, "provider": None}
_SUPPORTED_PROTOCOLS = frozenset({"", "http/protobuf"})
_GEN_AI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}


# -- configuration ---------------------------------------------------------------------------


def enabled() -> bool:
    """Whether tracing is on in this process."""
    return _state["tracer"] is not None


def _tracer() -> Tracer | None:
    tracer: Tracer | None = _state["tracer"]
    return tracer


def configure(provider: TracerProvider) -> None:
    """Trace to ``provider`` from now on (tests pass one with an in-memory exporter)."""
    _state["provider"] = provider
    _state["tracer"] = provider.get_tracer(SCOPE, __version__)


def shutdown() -> None:
    """Export what is still buffered and turn tracing off."""
    provider: TracerProvider | None = _state["provider"]
    _state["tracer"] = _state["provider"] = None
    if provider is not None:
        provider.shutdown()


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if the ``OTEL_*`` variables ask for it; whether it is on.

    Raises :class:`~warden.errors.ConfigError` for a setting Warden cannot
    honour (an unknown exporter, OTLP over gRPC), so a misconfiguration is
    an error at start, not traces silently missing.
    """
    env = os.environ if environ is None else environ
    processors = _processors(env)
    if not processors:
        return False
    # The SDK is loaded only when tracing is on: an untraced process never imports it.
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - only when on
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider  # noqa: PLC0415 - only when on

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
    resource = Resource.create({"service.name": "warden", "service.version": __version__})
    if env.get("OTEL_SERVICE_NAME"):
        resource = resource.merge(Resource({"service.name": env["OTEL_SERVICE_NAME"]}))
    # Every attribute bounded, whatever its source: an agent's 8 MB model name would
    # otherwise sit in the export queue twice per request.
    limits = SpanLimits(max_attribute_length=_MAX_ATTRIBUTE_CHARS)
    provider = TracerProvider(resource=resource, span_limits=limits)
    for processor in processors:
        provider.add_span_processor(processor)
    configure(provider)
    return True


def _processors(env: Mapping[str, str]) -> list[SpanProcessor]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names:
        # Off by default: on only when an OTLP endpoint is given.
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = ["otlp"] if endpoint else []
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415 - only when on
        BatchSpanProcessor,
        ConsoleSpanExporter,
    )

    processors: list[SpanProcessor] = []
    for name in names:
        if name == "none":
            return []
        if name == "otlp":
            processors.append(BatchSpanProcessor(_otlp_exporter(env)))
        elif name == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not supported (use otlp, console or none)"
            )
    return processors


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    if protocol not in _SUPPORTED_PROTOCOLS:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; "
            "Warden exports OTLP over HTTP (http/protobuf)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 - only when on

    # The exporter reads the OTEL_EXPORTER_OTLP_* variables of os.environ itself;
    # an explicit mapping (tests) passes the endpoint through.
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint is None and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()


# -- the proxy listener: a SERVER span per request ------------------------------------------


def proxy_middlewares() -> list[Any]:
    """aiohttp middlewares for the proxy listener: none when tracing is off."""
    return [_request_span] if enabled() else []


@web.middleware
async def _request_span(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    tracer = _tracer()
    if tracer is None:
        return await handler(request)
    parent = propagate.extract(request.headers)
    upstream = _cut(request.path.lstrip("/").partition("/")[0])
    with tracer.start_as_current_span(
        f"{request.method} /{upstream}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            # Not the path: an HTTP tool API's spells its arguments (/customers/{email}).
            "http.route": f"/{upstream}",
            "url.scheme": request.scheme,
            "warden.upstream": upstream,
        },
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


# -- the upstream session: a CLIENT span per upstream request, trace context injected -------


def client_trace_configs() -> list[aiohttp.TraceConfig]:
    """aiohttp trace hooks for the upstream session: none when tracing is off."""
    if not enabled():
        return []
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_upstream_start)
    config.on_request_end.append(_upstream_end)
    config.on_request_exception.append(_upstream_failed)
    return [config]


async def _upstream_start(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
) -> None:
    tracer = _tracer()
    if tracer is None:
        return
    url = params.url
    span = tracer.start_span(
        params.method,
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": params.method,
            "server.address": url.host or "",
            "server.port": url.port or 0,
            # The origin only: a query or a password can carry keys, and an HTTP tool
            # API's path spells its arguments (/customers/{email}).
            "url.full": str(url.origin()),
        },
    )
    ctx.warden_span = span
    # Replaces the traceparent copied from the agent's request: same trace, this span as parent.
    propagate.inject(params.headers, context=trace.set_span_in_context(span))


async def _upstream_end(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
) -> None:
    span = getattr(ctx, "warden_span", None)
    if span is not None:
        span.set_attribute("http.response.status_code", params.response.status)
        if params.response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


async def _upstream_failed(
    _session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestExceptionParams,
) -> None:
    span = getattr(ctx, "warden_span", None)
    if span is not None:
        span.set_attribute("error.type", type(params.exception).__name__)
        span.set_status(Status(StatusCode.ERROR))
        span.end()


# -- the core: a span per decision ----------------------------------------------------------


class _Core(Protocol):
    async def decide(
        self,
        action: Action,
        *,
        hold: str | None = None,
        connected: Callable[[], bool] | None = None,
    ) -> Decision: ...

    @staticmethod
    def count_usage(
        agent: Any, model: str | None, usage: Usage | None, *, billed: bool = True
    ) -> None: ...


def instrument(core: _Core) -> None:
    """Wrap the core's ``decide`` and ``count_usage`` in spans, only when tracing is on.

    Done per instance at construction, so an untraced process runs the
    methods exactly as written, with no check on the decision path.
    """
    if not enabled():
        return
    object.__setattr__(core, "decide", _traced_decide(core.decide))
    object.__setattr__(core, "count_usage", _traced_usage(core.count_usage))


_MAX_NAME = 128
_MAX_ATTRIBUTE_CHARS = 256


def _cut(name: str) -> str:
    """A name the agent chose, as a span name or attribute: at most ``_MAX_NAME`` characters,
    a lone surrogate as U+FFFD (the exporter's protobuf would refuse the whole batch)."""
    return mended(name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 1] + "…")


def _traced_decide(
    decide: Callable[..., Awaitable[Decision]],
) -> Callable[..., Awaitable[Decision]]:
    @functools.wraps(decide)
    async def traced(
        action: Action, *, hold: str | None = None, connected: Callable[[], bool] | None = None
    ) -> Decision:
        tracer = _tracer()
        if tracer is None:
            return await decide(action, hold=hold, connected=connected)
        request_span = trace.get_current_span()
        with tracer.start_as_current_span(
            f"warden.decision {_cut(action.tool or action.kind.value)}",
            kind=SpanKind.INTERNAL,
            attributes=dict(_action_attributes(action)),
        ) as span:
            decision = await decide(action, hold=hold, connected=connected)
            span.set_attributes(dict(_decision_attributes(decision)))
        if action.tool is None:
            # The request's own action (a model call, an HTTP call): its facts
            # belong on the request span too.
            request_span.set_attributes(dict(_action_attributes(action)))
            request_span.set_attribute("warden.decision.id", decision.decision_id)
            request_span.set_attribute("warden.decision.effect", decision.effect.value)
        return decision

    return traced


def _traced_usage(count: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(count)
    def traced(agent: Any, model: str | None, usage: Usage | None, *, billed: bool = True) -> None:
        count(agent, model, usage, billed=billed)
        if usage is not None:
            span = trace.get_current_span()
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)

    return traced


def _action_attributes(action: Action) -> Iterator[tuple[str, Any]]:
    yield "gen_ai.agent.id", action.agent.id
    yield "warden.action.kind", action.kind.value
    yield "warden.action.stage", action.stage.value
    yield "warden.upstream", action.request.upstream
    provider = _GEN_AI_PROVIDERS.get(action.protocol.partition(".")[0])
    if action.kind is ActionKind.LLM_CALL:
        yield "gen_ai.operation.name", "chat"
        if provider is not None:
            yield "gen_ai.provider.name", provider
            yield "gen_ai.system", provider  # the older name, still read by many backends
        if action.model:
            yield "gen_ai.request.model", _cut(action.model)
    if action.tool is not None:
        yield "gen_ai.tool.name", _cut(action.tool)
        if action.call_id:
            yield "gen_ai.tool.call.id", _cut(action.call_id)
        if action.kind is ActionKind.TOOL_CALL:
            yield "gen_ai.tool.type", "function"


def _decision_attributes(decision: Decision) -> Iterator[tuple[str, Any]]:
    yield "warden.decision.id", decision.decision_id
    yield "warden.decision.effect", decision.effect.value
    yield "warden.decision.enforced", decision.enforced.value
    yield "warden.decision.mode", decision.mode.value
    yield "warden.decision.guard", decision.guard
    if decision.bundle_revision:
        yield "warden.policy.revision", decision.bundle_revision
    if decision.error:
        yield "warden.decision.error", decision.error


# -- log lines ------------------------------------------------------------------------------


def log_fields() -> dict[str, str]:
    """The trace, span and decision ids of the current context, for a log line."""
    fields: dict[str, str] = {}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        fields["trace_id"] = format(span_context.trace_id, "032x")
        fields["span_id"] = format(span_context.span_id, "016x")
    decision_id = DECISION_ID.get()
    if decision_id:
        fields["decision_id"] = decision_id
    return fields
