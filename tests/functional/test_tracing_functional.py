"""Traces through the real proxy: spans per request and decision, OTLP export, trace continuity.

Warden runs in this process with tracing on (an in-memory exporter, or the
OTLP/HTTP exporter configured by ``OTEL_*`` variables and aimed at a small
aiohttp receiver here), and is driven with the OpenAI SDK. The agent's
``traceparent`` must continue through Warden to the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.functional.conftest import make_config, serving
from warden.ops import tracing
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
MESSAGES: Any = [{"role": "user", "content": "refund order A-1 and export all customers"}]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.fixture
async def traced_warden(
    tmp_path: Path, llm: MockLLM, spans: InMemorySpanExporter
) -> AsyncIterator[Warden]:
    async with Warden(make_config(tmp_path, llm.url)) as running:
        yield running


async def test_spans_per_request_and_decision_continue_the_agents_trace(
    traced_warden: Warden, llm: MockLLM, spans: InMemorySpanExporter
) -> None:
    llm.script(
        Reply(
            tool_calls=[
                Call("search_kb", {"query": "refund policy"}),
                Call("export_customers", {"format": "csv"}),
            ]
        )
    )
    async with openai.AsyncOpenAI(
        base_url=f"{traced_warden.proxy_url}/openai/v1",
        api_key="k",
        max_retries=0,
        default_headers={"traceparent": TRACEPARENT},
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    completion = raw.parse()
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ["search_kb"]

    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}
    (server,) = [s for s in finished if s.kind is SpanKind.SERVER]
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert server.name == "POST /openai"
    request = attrs(server)
    assert request["http.response.status_code"] == 200
    assert request["gen_ai.operation.name"] == "chat"
    assert request["gen_ai.provider.name"] == "openai"
    assert request["gen_ai.request.model"] == "gpt-4o-mini"
    assert request["http.route"] == "/openai"
    assert "url.path" not in request  # an HTTP tool API's path spells its arguments
    assert request["gen_ai.usage.output_tokens"] > 0
    assert request["warden.decision.id"] == raw.headers["X-Warden-Decision-Id"]

    decisions = {
        s.name.removeprefix("warden.decision "): s
        for s in finished
        if s.name.startswith("warden.decision ")
    }
    assert set(decisions) == {"llm_call", "search_kb", "export_customers"}
    for name in ("llm_call", "search_kb", "export_customers"):
        span = decisions[name]
        assert span.kind is SpanKind.INTERNAL
        assert span.parent is not None
        assert span.parent.span_id == server.context.span_id
        assert attrs(span)["warden.policy.revision"]
    assert attrs(decisions["export_customers"])["warden.decision.effect"] == "deny"
    assert attrs(decisions["search_kb"])["warden.decision.effect"] == "allow"
    assert attrs(decisions["search_kb"])["gen_ai.tool.call.id"] == calls[0].id
    blocked = raw.headers["X-Warden-Blocked"]
    assert attrs(decisions["export_customers"])["warden.decision.id"] == blocked

    # The upstream sees the same trace, with Warden's client span as the parent.
    (upstream_span,) = [s for s in finished if s.kind is SpanKind.CLIENT]
    sent = llm.requests[-1].headers["traceparent"]
    assert sent == f"00-{TRACE_ID}-{upstream_span.context.span_id:016x}-01"
    assert upstream_span.parent is not None
    assert upstream_span.parent.span_id == server.context.span_id


async def test_without_tracing_the_agents_traceparent_still_reaches_the_upstream(
    tmp_path: Path, llm: MockLLM
) -> None:
    assert not tracing.enabled()
    async with (
        Warden(make_config(tmp_path, llm.url)) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1",
            api_key="k",
            max_retries=0,
            default_headers={"traceparent": TRACEPARENT},
        ) as client,
    ):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert llm.requests[-1].headers["traceparent"] == TRACEPARENT


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver: protobuf in, the decoded requests kept."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        self.content_types.append(request.content_type)
        return web.Response(body=b"", content_type="application/x-protobuf")


async def test_spans_are_exported_over_otlp_http_as_otel_variables_say(
    tmp_path: Path, llm: MockLLM
) -> None:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        assert tracing.configure_from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "refunds-sidecar"}
        )
        try:
            llm.script(Reply(tool_calls=[Call("export_customers", {"format": "csv"})]))
            async with (
                Warden(make_config(tmp_path, llm.url)) as warden,
                openai.AsyncOpenAI(
                    base_url=f"{warden.proxy_url}/openai/v1",
                    api_key="k",
                    max_retries=0,
                    default_headers={"traceparent": TRACEPARENT},
                ) as client,
            ):
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        finally:
            # The exporter posts from its own thread; flushing waits for it, so not on this loop.
            await asyncio.to_thread(tracing.shutdown)
    finally:
        await receiver.stop()
    assert receiver.requests
    assert set(receiver.content_types) == {"application/x-protobuf"}
    exported = [
        (resource_spans.resource, span)
        for message in receiver.requests
        for resource_spans in message.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    assert {span.trace_id.hex() for _, span in exported} == {TRACE_ID}
    names = {span.name for _, span in exported}
    assert {"POST /openai", "warden.decision export_customers", "POST"} <= names
    resource = {a.key: a.value.string_value for a in exported[0][0].attributes}
    assert resource["service.name"] == "refunds-sidecar"
    denied = next(s for _, s in exported if s.name == "warden.decision export_customers")
    values = {a.key: a.value.string_value for a in denied.attributes}
    assert values["warden.decision.effect"] == "deny"
    assert values["warden.decision.id"].startswith("dec_")


async def test_the_upstream_span_never_carries_a_password_or_query(
    spans: InMemorySpanExporter,
) -> None:
    """``url.full`` of the client span is the origin: no password, query or path.

    A URL may carry a password (``https://svc:TOKEN@host``; Warden refuses one
    in ``base_url``, but the tracing hooks see every client request), a
    request's query a key and its path the call's arguments
    (``/customers/{email}``); spans go to a tracing backend with other
    retention and readers than the audit log.
    """

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/tools/search", ok)
    async with serving(app) as port:
        url = f"http://svc:upstream-s3cret@127.0.0.1:{port}/tools/search?key=q-s3cret"
        async with (
            aiohttp.ClientSession(trace_configs=tracing.client_trace_configs()) as session,
            session.get(url) as resp,
        ):
            assert resp.status == 200
    (span,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert attrs(span)["url.full"] == f"http://127.0.0.1:{port}"


async def test_a_model_name_of_any_length_is_cut_in_spans(
    traced_warden: Warden, llm: MockLLM, spans: InMemorySpanExporter
) -> None:
    """The agent chooses it: 8 MB of it would sit in the export queue for every request."""
    llm.script(Reply(text="Hi."))
    model = "gpt-" + "x" * 100_000
    async with openai.AsyncOpenAI(
        base_url=f"{traced_warden.proxy_url}/openai/v1", api_key="k", max_retries=0
    ) as client:
        await client.chat.completions.create(model=model, messages=MESSAGES)
    finished = spans.get_finished_spans()
    models = [
        str(a["gen_ai.request.model"]) for a in map(attrs, finished) if "gen_ai.request.model" in a
    ]
    assert models
    assert all(m.startswith("gpt-xxx") and len(m) <= 128 for m in models)


def test_spans_from_the_environment_bound_every_attribute() -> None:
    assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "console"})
    try:
        tracer = tracing._tracer()
        assert tracer is not None
        span = tracer.start_span("s", attributes={"a": "x" * 10_000})
        span.end()
        assert isinstance(span, ReadableSpan)
        assert len(attrs(span)["a"]) == 256
    finally:
        tracing.shutdown()
