"""Tracing: off by default, on from OTEL_* variables, a span per decision, ids in log lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from warden.core import Governor
from warden.errors import ConfigError
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    RequestMeta,
    Stage,
    Usage,
    new_id,
)
from warden.ops import logging as ops_logging
from warden.ops import tracing
from warden.pipeline import GuardContext, Pipeline
from warden.testing.memory_audit import MemoryAudit

AGENT = Agent("support-triage", "v1", {})
REQUEST = RequestMeta("POST", "openai", "/v1/chat/completions")


class ByName:
    """Denies tools named ``deny*``; answers with a bundle revision like the policy guard."""

    name = "policy"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        effect = Effect.DENY if (action.tool or "").startswith("deny") else Effect.ALLOW
        return Decision(new_id("dec"), effect, ("by name",), ctx.mode, "policy", "rev-7")


def governor() -> Governor:
    pipeline = Pipeline(
        [ByName()], MemoryAudit(), mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write"
    )
    return Governor(pipeline)


def action(tool: str | None, kind: ActionKind = ActionKind.TOOL_CALL) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=AGENT,
        kind=kind,
        protocol="openai.chat",
        stage=Stage.PROPOSED if tool else Stage.EXECUTED,
        request=REQUEST,
        tool=tool,
        call_id="call_1" if tool else None,
        arguments={} if tool else None,
        model="gpt-4o-mini",
    )


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


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "warden"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
    ],
)
def test_tracing_is_off_unless_otel_variables_ask_for_it(environ: dict[str, str]) -> None:
    assert tracing.configure_from_env(environ) is False
    assert not tracing.enabled()
    assert tracing.proxy_middlewares() == []
    assert tracing.client_trace_configs() == []


def test_an_otlp_endpoint_turns_tracing_on() -> None:
    try:
        assert tracing.configure_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
        assert tracing.enabled()
        assert len(tracing.proxy_middlewares()) == 1
        assert len(tracing.client_trace_configs()) == 1
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin' is not supported"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTLP over HTTP",
        ),
    ],
)
def test_a_setting_warden_cannot_honour_is_a_clear_error(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tracing.configure_from_env(environ)
    assert not tracing.enabled()


async def test_untraced_core_methods_are_not_wrapped() -> None:
    core = governor()
    assert "decide" not in vars(core)
    assert "count_usage" not in vars(core)
    decision = await core.decide(action("search_kb"))
    assert decision.effect is Effect.ALLOW


# -- spans -----------------------------------------------------------------------------------


async def test_a_decision_span_carries_the_decision_and_genai_attributes(
    spans: InMemorySpanExporter,
) -> None:
    core = governor()
    decision = await core.decide(action("deny_export"))
    (span,) = spans.get_finished_spans()
    assert span.name == "warden.decision deny_export"
    assert span.kind is SpanKind.INTERNAL
    attrs = dict(span.attributes or {})
    assert attrs["warden.decision.id"] == decision.decision_id
    assert attrs["warden.decision.effect"] == "deny"
    assert attrs["warden.decision.enforced"] == "deny"
    assert attrs["warden.decision.guard"] == "policy"
    assert attrs["warden.policy.revision"] == "rev-7"
    assert attrs["gen_ai.tool.name"] == "deny_export"
    assert attrs["gen_ai.tool.call.id"] == "call_1"
    assert attrs["gen_ai.agent.id"] == "support-triage"
    # No arguments and no reasons: a trace is not the audit log.
    assert not any("argument" in k or "reason" in k for k in attrs)


async def test_the_request_span_gets_the_model_call_facts_and_usage(
    spans: InMemorySpanExporter,
) -> None:
    core = governor()
    provider_tracer = tracing._tracer()
    assert provider_tracer is not None
    with provider_tracer.start_as_current_span("POST /openai", kind=SpanKind.SERVER) as request:
        decision = await core.decide(action(None, ActionKind.LLM_CALL))
        core.count_usage(AGENT, "gpt-4o-mini", Usage(input_tokens=12, output_tokens=3))
    finished = {s.name: s for s in spans.get_finished_spans()}
    server = finished["POST /openai"]
    child = finished["warden.decision llm_call"]
    assert child.parent is not None
    assert child.parent.span_id == request.get_span_context().span_id
    attrs = dict(server.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == 12
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["warden.decision.id"] == decision.decision_id


# -- log lines -------------------------------------------------------------------------------


async def test_log_lines_carry_trace_and_decision_ids(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        ops_logging.configure_logging("info", "json")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        core = governor()
        tracer = tracing._tracer()
        assert tracer is not None
        with tracer.start_as_current_span("request") as span:
            decision = await core.decide(action("search_kb"))
            logging.getLogger("warden.test").warning("upstream was slow")
        logging.getLogger("warden.test").warning("outside any request")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    inside, outside = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["decision_id"] == decision.decision_id
    assert "trace_id" not in outside


def test_a_name_with_a_lone_surrogate_cannot_spoil_a_span_batch() -> None:
    # The exporter's protobuf refuses a string that is not UTF-8, and with it the batch.
    assert tracing._cut("search_kb\ud800") == "search_kb\ufffd"
    assert tracing._cut("x" * 500).endswith("…")


def test_a_log_line_naming_a_lone_surrogate_stays_one_json_line() -> None:
    record = logging.LogRecord(
        "warden.mcp", logging.ERROR, __file__, 1, "refused %s", ("search_kb\ud800",), None
    )
    line = ops_logging._JsonFormatter().format(record)
    assert "\n" not in line
    assert orjson.loads(line)["message"] == "refused search_kb\ufffd"
