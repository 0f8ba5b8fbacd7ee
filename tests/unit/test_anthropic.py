"""The Anthropic Messages adapter, checked against recorded bodies and streams.

Rewritten streams are fed to the official ``anthropic`` SDK's own accumulator
and to a real client on an in-memory transport, and rewritten bodies are
validated with its ``Message`` model.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import typing
from collections.abc import Iterable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import ContentBlock, Message, RawMessageStreamEvent
from anthropic.types.beta import BetaContentBlock
from pydantic import TypeAdapter

from tests.unit.streams import (
    ALLOW,
    DENY,
    HOLD,
    OBSERVED_DENY,
    Decide,
    allow_all,
    as_read,
    body,
    data,
    deny_all,
    deny_names,
    encoded,
    events,
    raw,
    replay,
    take,
)
from warden.errors import StreamViolation
from warden.model import ActionKind, Decision, ToolCall, ToolResult, Usage
from warden.protocols._wire import NO_DECISION, loads
from warden.protocols.anthropic import (
    CALL_BLOCKS,
    PASSIVE_BLOCKS,
    AnthropicMessagesAdapter,
    AnthropicStreamRewriter,
)
from warden.protocols.base import Adapter, StreamRewriter, blocked_message
from warden.protocols.sse import SseEvent, SseParser

ADAPTER = AnthropicMessagesAdapter()
EVENT = TypeAdapter[RawMessageStreamEvent](RawMessageStreamEvent)

WEATHER_ID = "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
EMAIL_ID = "toolu_01HqE5rW8tY2uI4oP6aS9dFg"


def event(name: str, payload: dict[str, Any]) -> SseEvent:
    return SseEvent(data=orjson.dumps({"type": name, **payload}).decode(), event=name)


def run(
    source: list[SseEvent], decide: Decide = allow_all
) -> tuple[list[SseEvent], list[ToolCall], AnthropicStreamRewriter]:
    rewriter = ADAPTER.stream_rewriter()
    out: list[SseEvent] = []
    calls: list[ToolCall] = []
    for item in source:
        sent, decided = take(rewriter, rewriter.feed(item), decide)
        out += sent
        calls += decided
    sent, decided = take(rewriter, rewriter.finish(), decide)
    return out + sent, calls + decided, rewriter


def replay_bytes(pieces: Iterable[bytes], decide: Decide) -> bytes:
    return replay(ADAPTER.stream_rewriter(), pieces, decide)


def accumulate(out: list[SseEvent]) -> Message:
    """The final message as the official SDK's stream accumulator builds it."""
    snapshot = None
    buffers: dict[int, bytes] = {}
    for item in out:
        if item.event in ("ping", None):
            continue  # the SDK skips these before parsing
        snapshot = accumulate_event(
            event=EVENT.validate_python(data(item)),
            current_snapshot=snapshot,
            json_bufs=buffers,
        )
    assert snapshot is not None
    return Message.model_validate(snapshot.model_dump())


def sdk_client(payload: bytes) -> anthropic.Anthropic:
    """A real client whose transport answers every request with ``payload``: no sockets."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=payload, headers={"content-type": "text/event-stream"})

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return anthropic.Anthropic(
        api_key="sk-ant-test", base_url="http://warden.test", http_client=http, max_retries=0
    )


def assert_no_trace(output: bytes, calls: list[ToolCall], decision: Decision) -> None:
    """Nothing of a denied call is left but Warden's notice, which names the tool."""
    stripped = output
    for call in calls:
        notice = orjson.dumps(blocked_message(call, decision))[1:-1]
        stripped = stripped.replace(notice, b"")
    for call in calls:
        assert call.call_id.encode() not in output
        assert call.name.encode() not in stripped
        for value in (call.arguments or {}).values():
            assert str(value).encode() not in output


def test_adapter_satisfies_protocol() -> None:
    adapter: Adapter = ADAPTER
    rewriter: StreamRewriter = adapter.stream_rewriter()
    assert adapter.name == "anthropic.messages"
    assert isinstance(rewriter, AnthropicStreamRewriter)


# --- parse_request ------------------------------------------------------------------------


def test_parse_request_reads_model_stream_and_named_tool_results() -> None:
    parsed = ADAPTER.parse_request(body("anthropic_request.json"))
    assert parsed.model == "claude-sonnet-4-20250514"
    assert parsed.stream is True
    assert parsed.tool_results == (
        ToolResult(call_id=WEATHER_ID, content="18°C, light rain", tool="get_weather"),
        ToolResult(
            call_id=EMAIL_ID,
            content="SMTP relay refused.\nCode 550.",
            is_error=True,
            tool="send_email",
        ),
    )


def test_parse_request_names_only_from_earlier_assistant_messages() -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_a", "content": "done"}
    use = {"type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {}}
    parsed = ADAPTER.parse_request(
        {
            "messages": [
                {"role": "user", "content": [result]},
                {"role": "assistant", "content": [use]},
                {"role": "user", "content": [result]},
                {"role": "assistant", "content": [result]},
            ]
        }
    )
    assert parsed.tool_results == (
        ToolResult(call_id="toolu_a", content="done"),
        ToolResult(call_id="toolu_a", content="done", tool="lookup"),
    )


@pytest.mark.parametrize(
    "odd",
    [
        {},
        {"model": ["x"], "stream": 1, "messages": {"role": "user"}},
        {"messages": [None, "x", {"role": "user", "content": "plain text"}]},
        {"messages": [{"role": "user", "content": [None, 3, {"type": "tool_result"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 7}]}]},
        {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": 1}]}]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "c", "content": {"text": "x"}},
                        {"type": "tool_result", "tool_use_id": "c", "content": [{"text": "x"}]},
                        {"type": "tool_result", "tool_use_id": "c", "is_error": "yes"},
                    ],
                }
            ]
        },
    ],
)
def test_parse_request_never_raises_on_odd_shapes(odd: dict[str, Any]) -> None:
    parsed = ADAPTER.parse_request(odd)
    assert parsed.model is None
    assert parsed.stream is False
    for result in parsed.tool_results:
        assert result == ToolResult(call_id="c", content="")


def test_parse_request_keeps_only_text_of_a_result() -> None:
    block = {
        "type": "tool_result",
        "tool_use_id": "c",
        "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}},
            {"type": "text", "text": "caption"},
        ],
    }
    parsed = ADAPTER.parse_request({"messages": [{"role": "user", "content": [block]}]})
    assert parsed.tool_results == (ToolResult(call_id="c", content="caption"),)


# --- tool_calls / usage (non-streaming) --------------------------------------------------


def test_tool_calls_from_recorded_body() -> None:
    assert ADAPTER.tool_calls(body("anthropic_tools.json")) == [
        ToolCall(
            call_id=WEATHER_ID,
            name="get_weather",
            raw_arguments='{"city":"Paris"}',
            arguments={"city": "Paris"},
            index=0,
            key="b1",
            wire_type="tool_use",
        ),
        ToolCall(
            call_id=EMAIL_ID,
            name="send_email",
            raw_arguments='{"to":"cfo@example.com","subject":"Q3 payroll export"}',
            arguments={"to": "cfo@example.com", "subject": "Q3 payroll export"},
            index=1,
            key="b2",
            wire_type="tool_use",
        ),
    ]
    assert ADAPTER.tool_calls(body("anthropic_text.json")) == []


def test_tool_call_input_must_be_an_object() -> None:
    content = [
        {"type": "tool_use", "id": "a", "name": "f", "input": ["x"]},
        {"type": "tool_use", "id": "b", "name": "g"},
        {"type": "tool_use", "id": "c", "name": "h", "input": {"big": 2**70}},
        {"type": "tool_use", "id": "d", "name": "i", "input": {"n": 2**64 - 1}},
        {"type": "tool_use", "id": "e", "name": "j", "input": '{"a": 1}'},
    ]
    calls = ADAPTER.tool_calls({"content": content})
    assert [(c.call_id, c.raw_arguments, c.arguments, c.index, c.key) for c in calls] == [
        ("a", '["x"]', None, 0, "b0"),
        ("b", "", None, 1, "b1"),
        # Past 64 bits no policy engine takes it as it is: fail closed.
        ("c", '{"big":1180591620717411303424}', None, 2, "b2"),
        ("d", '{"n":18446744073709551615}', {"n": 2**64 - 1}, 3, "b3"),
        # A string is not an object, even when it holds JSON.
        ("e", '"{\\"a\\": 1}"', None, 4, "b4"),
    ]
    assert ADAPTER.tool_calls({"content": "text"}) == []
    assert ADAPTER.tool_calls({}) == []


def test_usage_from_recorded_bodies() -> None:
    assert ADAPTER.usage(body("anthropic_tools.json")) == Usage(472, 118, 2048)
    assert ADAPTER.usage(body("anthropic_text.json")) == Usage(25, 12, 0)
    assert ADAPTER.usage({}) is None
    # Counts that are no counts: spent as held, never settled at nothing.
    assert ADAPTER.usage({"usage": {"input_tokens": None, "output_tokens": "1"}}) is None
    assert ADAPTER.usage({"usage": {"input_tokens": 5, "output_tokens": -1}}) is None
    assert ADAPTER.usage({"usage": {}}) is None


# --- rewrite (non-streaming) ---------------------------------------------------------------


def decisions_for(response: dict[str, Any], decide: Decide) -> dict[str, Decision]:
    return {call.key: decide(call) for call in ADAPTER.tool_calls(response)}


def test_rewrite_allow_all_keeps_the_body() -> None:
    original = body("anthropic_tools.json")
    out = ADAPTER.rewrite(original, decisions_for(original, allow_all))
    assert out == original
    assert Message.model_validate(out).stop_reason == "tool_use"


def test_rewrite_deny_all_replaces_blocks_with_text() -> None:
    original = body("anthropic_tools.json")
    before = copy.deepcopy(original)
    out = ADAPTER.rewrite(original, decisions_for(original, deny_all))
    assert original == before, "the input must not be mutated"
    calls = ADAPTER.tool_calls(original)
    assert out["content"] == [
        original["content"][0],
        {"type": "text", "text": blocked_message(calls[0], DENY)},
        {"type": "text", "text": blocked_message(calls[1], DENY)},
    ]
    assert out["stop_reason"] == "end_turn"
    message = Message.model_validate(out)
    assert [block.type for block in message.content] == ["text", "text", "text"]
    assert_no_trace(orjson.dumps(out), calls, DENY)


def test_rewrite_mixed_denies_only_the_first() -> None:
    original = body("anthropic_tools.json")
    out = ADAPTER.rewrite(original, decisions_for(original, deny_names("get_weather")))
    weather, email = ADAPTER.tool_calls(original)
    assert out["content"][1] == {"type": "text", "text": blocked_message(weather, DENY)}
    assert out["content"][2] == original["content"][2]
    assert out["stop_reason"] == "tool_use"
    Message.model_validate(out)
    assert ADAPTER.tool_calls(out) == [dataclasses.replace(email, index=0)]
    assert_no_trace(orjson.dumps(out), [weather], DENY)


def test_rewrite_missing_decision_fails_closed_and_observe_lets_through() -> None:
    original = body("anthropic_tools.json")
    out = ADAPTER.rewrite(original, {"b1": ALLOW})
    assert [b["type"] for b in out["content"]] == ["text", "tool_use", "text"]
    assert "no decision was made" in out["content"][2]["text"]
    assert ADAPTER.rewrite(original, {WEATHER_ID: ALLOW, EMAIL_ID: ALLOW}) == ADAPTER.rewrite(
        original, {}
    ), "decisions are keyed by position, never by the upstream's id"
    observed = {"b1": OBSERVED_DENY, "b2": OBSERVED_DENY}
    assert ADAPTER.rewrite(original, observed) == original


def test_rewrite_hold_explains_the_approval() -> None:
    original = body("anthropic_tools.json")
    out = ADAPTER.rewrite(original, {"b1": HOLD, "b2": ALLOW})
    assert "held the tool call `get_weather` for human approval" in out["content"][1]["text"]


def test_rewrite_leaves_odd_bodies_alone() -> None:
    assert ADAPTER.rewrite({}, {}) == {}
    assert ADAPTER.rewrite({"content": "x"}, {}) == {"content": "x"}


# --- streaming ------------------------------------------------------------------------------


def test_text_stream_passes_through_untouched_and_immediately() -> None:
    source = events("anthropic_text.sse")
    rewriter = ADAPTER.stream_rewriter()
    for item in source:
        items = list(rewriter.feed(item))
        assert len(items) == 1
        assert as_read(items[0]) == as_read(item)
    assert list(rewriter.finish()) == []
    assert rewriter.complete
    assert rewriter.model == "claude-sonnet-4-20250514"
    assert rewriter.usage == Usage(25, 12, 0)
    assert encoded(source) == raw("anthropic_text.sse")


@pytest.mark.parametrize("name", ["anthropic_tools.sse", "anthropic_thinking_tool.sse"])
def test_allow_all_stream_gives_the_sdk_the_same_message(name: str) -> None:
    source = events(name)
    out, calls, _ = run(source, allow_all)
    assert accumulate(out) == accumulate(source)
    assert all(call.arguments is not None for call in calls)
    call_events = [e for e in source if data(e).get("index") in {int(c.key[1:]) for c in calls}]
    passive = [e for e in source if e not in call_events]
    assert [as_read(e) for e in out if as_read(e) in [as_read(p) for p in passive]] == [
        as_read(p) for p in passive
    ], "sent as read"


def test_stream_calls_from_recorded_stream() -> None:
    _, calls, rewriter = run(events("anthropic_tools.sse"), allow_all)
    assert calls == [
        ToolCall(
            call_id=WEATHER_ID,
            name="get_weather",
            raw_arguments='{"city":"Paris"}',
            arguments={"city": "Paris"},
            index=0,
            key="b1",
            wire_type="tool_use",
        ),
        ToolCall(
            call_id=EMAIL_ID,
            name="send_email",
            raw_arguments='{"to":"cfo@example.com","subject":"Q3 payroll export"}',
            arguments={"to": "cfo@example.com", "subject": "Q3 payroll export"},
            index=1,
            key="b2",
            wire_type="tool_use",
        ),
    ]
    assert rewriter.usage == Usage(472, 118, 2048)
    assert rewriter.complete


def text_block(index: int, text: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "text_delta", "text": text},
        },
        {"type": "content_block_stop", "index": index},
    ]


def tool_block(index: int, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
    """An allowed call as Warden renders it: the decided input in one delta."""
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": arguments},
        },
        {"type": "content_block_stop", "index": index},
    ]


def test_deny_all_stream() -> None:
    source = events("anthropic_tools.sse")
    out, calls, _ = run(source, deny_all)
    stop = data(source[17])
    stop["delta"]["stop_reason"] = "end_turn"
    expected = [
        *[data(e) for e in source[:6]],
        *text_block(1, blocked_message(calls[0], DENY)),
        *text_block(2, blocked_message(calls[1], DENY)),
        stop,
        data(source[18]),
    ]
    assert [data(e) for e in out] == expected
    assert all(as_read(a) == as_read(b) for a, b in zip(out[:6], source[:6], strict=True))
    assert [e.event for e in out] == [d["type"] for d in expected]

    message = accumulate(out)
    assert message.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [
        ("text", "I'll check the weather and send the export."),
        ("text", blocked_message(calls[0], DENY)),
        ("text", blocked_message(calls[1], DENY)),
    ]
    assert_no_trace(encoded(out), calls, DENY)


def test_mixed_stream_denies_the_first_of_two() -> None:
    source = events("anthropic_tools.sse")
    out, calls, _ = run(source, deny_names("get_weather"))
    weather = calls[0]
    expected = [
        *[data(e) for e in source[:6]],
        *text_block(1, blocked_message(weather, DENY)),
        *tool_block(
            2, EMAIL_ID, "send_email", '{"to":"cfo@example.com","subject":"Q3 payroll export"}'
        ),
        *[data(e) for e in source[17:]],
    ]
    assert [data(e) for e in out] == expected
    assert all(as_read(a) == as_read(b) for a, b in zip(out[12:], source[17:], strict=True))

    message = accumulate(out)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "text", "tool_use"]
    tool = message.content[2]
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == (EMAIL_ID, "send_email", calls[1].arguments)
    assert_no_trace(encoded(out), [weather], DENY)


def test_thinking_block_passes_through_and_shell_call_is_denied() -> None:
    source = events("anthropic_thinking_tool.sse")
    rewriter = ADAPTER.stream_rewriter()
    for item in source[:5]:
        assert [as_read(e) for e in rewriter.feed(item)] == [as_read(item)], (
            "thinking is sent at once"
        )
    out = list(source[:5])
    sent, calls = take(rewriter, (i for e in source[5:] for i in rewriter.feed(e)), deny_all)
    out += sent
    [call] = calls
    assert call.arguments == {"command": "rm -rf /var/cache/build"}
    message = accumulate(out)
    assert message.stop_reason == "end_turn"
    thinking = message.content[0]
    assert thinking.type == "thinking"
    assert thinking.signature == "EqQBCkYIBRgCIkB1n3Xz0vU8c5pZ2kQ7mA=="
    assert message.content[1].type == "text"
    assert b"rm -rf" not in encoded(out)


def test_stop_reason_is_decided_after_the_last_resolve() -> None:
    source = events("anthropic_thinking_tool.sse")
    for decision, expected in ((ALLOW, "tool_use"), (DENY, "end_turn"), (HOLD, "end_turn")):
        rewriter = ADAPTER.stream_rewriter()
        pending: list[ToolCall] = []
        for item in source[:9]:
            pending += [i for i in rewriter.feed(item) if isinstance(i, ToolCall)]
        [call] = pending
        items = rewriter.feed(source[9])
        assert rewriter.resolve(call, decision)
        [delta] = list(items)
        assert isinstance(delta, SseEvent)
        assert data(delta)["delta"]["stop_reason"] == expected


STREAMS = ["anthropic_text.sse", "anthropic_tools.sse", "anthropic_thinking_tool.sse"]
POLICIES: dict[str, Decide] = {
    "allow": allow_all,
    "deny": deny_all,
    "deny_first": deny_names("get_weather", "run_shell"),
}


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_output_is_independent_of_byte_boundaries(name: str, policy: str) -> None:
    payload = raw(name)
    decide = POLICIES[policy]
    expected = replay_bytes([payload], decide)
    for cut in range(1, len(payload)):
        assert replay_bytes([payload[:cut], payload[cut:]], decide) == expected, cut
    rng = random.Random(f"{name}/{policy}")
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(payload)), rng.randint(2, 40)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        assert replay_bytes(pieces, decide) == expected, cuts
    single = [payload[i : i + 1] for i in range(len(payload))]
    assert replay_bytes(single, decide) == expected


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_official_client_reads_the_rewritten_stream(name: str, policy: str) -> None:
    payload = replay_bytes([raw(name)], POLICIES[policy])
    client = sdk_client(payload)
    with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=64, messages=[]) as s:
        final = s.get_final_message()
    assert Message.model_validate(final.model_dump()) == accumulate(SseParser().feed(payload))
    has_tool = any(block.type == "tool_use" for block in final.content)
    assert final.stop_reason == ("tool_use" if has_tool else "end_turn")


def test_malformed_input_json_gives_no_arguments() -> None:
    source = [
        *events("anthropic_tools.sse")[:7],
        event(
            "content_block_delta",
            {"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{not json"}},
        ),
        event("content_block_stop", {"index": 1}),
    ]
    _, calls, _ = run(source, deny_all)
    [call] = calls
    assert call.raw_arguments == "{not json"
    assert call.arguments is None


def test_tool_without_input_deltas_uses_the_start_input() -> None:
    source = [
        events("anthropic_tools.sse")[0],
        event(
            "content_block_start",
            {
                "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_n", "name": "now", "input": {}},
            },
        ),
        event("content_block_stop", {"index": 0}),
        event(
            "message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}}
        ),
        event("message_stop", {}),
    ]
    out, [call], _ = run(source, allow_all)
    assert (call.raw_arguments, call.arguments) == ("{}", {})
    assert accumulate(out).content[0].type == "tool_use"


def test_truncated_stream_yields_held_calls_on_finish() -> None:
    source = events("anthropic_tools.sse")[:14]
    rewriter = ADAPTER.stream_rewriter()
    fed = [item for e in source for item in rewriter.feed(e)]
    [first] = [item for item in fed if isinstance(item, ToolCall)]
    assert first.name == "get_weather"
    rewriter.resolve(first, ALLOW)
    assert not rewriter.complete
    [held] = list(rewriter.finish())
    assert isinstance(held, ToolCall)
    assert held.name == "send_email"
    assert held.raw_arguments == '{"to": "cfo@exa'
    assert held.arguments is None
    replacement = rewriter.resolve(held, DENY)
    assert [e.event for e in replacement] == [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    ]
    assert b"cfo@" not in encoded(replacement)
    assert list(rewriter.finish()) == []


def test_unclosed_block_is_closed_by_the_next_block_or_message_delta() -> None:
    source = events("anthropic_tools.sse")
    without_stops = [e for i, e in enumerate(source) if i not in (10, 16)]
    rewriter = ADAPTER.stream_rewriter()
    seen: list[str] = []
    for item in without_stops:
        for out in rewriter.feed(item):
            if isinstance(out, ToolCall):
                seen.append(f"{out.name}@{data(item)['type']}")
                rewriter.resolve(out, DENY)
    assert seen == ["get_weather@content_block_start", "send_email@message_delta"]


def test_ping_and_error_pass_through_unknown_and_unnamed_events_are_dropped() -> None:
    rewriter = ADAPTER.stream_rewriter()
    passed = [
        SseEvent(data='{"type": "ping"}', event="ping"),
        SseEvent(
            data='{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            event="error",
        ),
    ]
    for item in passed:
        assert [as_read(e) for e in rewriter.feed(item)] == [as_read(item)]
    # Some clients (the Vercel AI SDK) read the data's type, not the event's name: a
    # tool_use start named ping, or data no client can read, ends the stream.
    for refused in (
        SseEvent(data="not json", event="ping"),
        SseEvent(
            data='{"type":"content_block_start","index":0,"content_block":'
            '{"type":"tool_use","id":"toolu_1","name":"danger","input":{}}}',
            event="ping",
        ),
        SseEvent(data='{"type":"content_block_delta","index":0}', event="error"),
    ):
        with pytest.raises(StreamViolation):
            list(ADAPTER.stream_rewriter().feed(refused))
    dropped = [
        SseEvent(data='{"type": "future_event", "detail": 1}', event="future_event"),
        SseEvent(data="[1]"),
        SseEvent(data=orjson.dumps(data(events("anthropic_tools.sse")[6])).decode()),
        SseEvent(data="{}", event="content_block_future"),
    ]
    for item in dropped:
        assert list(rewriter.feed(item)) == [], "the SDK never reads it as part of the message"
    assert not rewriter.complete


@pytest.mark.parametrize(
    "bad",
    [
        SseEvent(data="not json", event="message_delta"),
        SseEvent(data="[1]", event="content_block_delta"),
        SseEvent(data='{"no_type": true}', event="content_block_stop"),
        SseEvent(data='{"type": "ping"}', event="content_block_start"),
        SseEvent(data='{"type": "content_block_start"}', event="content_block_delta"),
    ],
)
def test_unparseable_or_mismatched_events_are_violations(bad: SseEvent) -> None:
    rewriter = ADAPTER.stream_rewriter()
    list(rewriter.feed(events("anthropic_tools.sse")[0]))
    with pytest.raises(StreamViolation):
        list(rewriter.feed(bad))


def test_unknown_event_about_a_held_block_is_dropped() -> None:
    source = events("anthropic_tools.sse")
    secret = event("content_block_future", {"index": 1, "leak": "cfo@example.com"})
    stream = [*source[:7], secret, *source[7:]]
    for decide in (allow_all, deny_all):
        out, _, _ = run(stream, decide)
        assert secret not in out
        assert accumulate(out) == accumulate(run(source, decide)[0])


def test_resolve_renders_the_call_handed_out_under_its_key() -> None:
    source = events("anthropic_tools.sse")
    rewriter = ADAPTER.stream_rewriter()
    calls = [i for e in source[:11] for i in rewriter.feed(e) if isinstance(i, ToolCall)]
    [call] = calls
    stranger = ToolCall(call_id=call.call_id, name="x", raw_arguments="{}", arguments={}, key="b7")
    assert rewriter.resolve(stranger, ALLOW) == []
    copy_ = dataclasses.replace(call, name="other", arguments={"city": "Rome"})
    sent = rewriter.resolve(copy_, ALLOW)
    assert [data(e) for e in sent] == tool_block(1, WEATHER_ID, "get_weather", '{"city":"Paris"}')
    assert rewriter.resolve(call, ALLOW) == [], "a call is resolved once"


def test_usage_follows_message_delta_totals() -> None:
    rewriter = ADAPTER.stream_rewriter()
    assert rewriter.usage is None
    list(rewriter.feed(events("anthropic_tools.sse")[0]))
    # message_start's counts are not final (its output is a token or two): not reported.
    assert rewriter.usage is None
    delta = {
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 40, "input_tokens": 480, "cache_read_input_tokens": None},
    }
    list(rewriter.feed(event("message_delta", delta)))
    assert rewriter.usage == Usage(480, 40, 2048)


@pytest.mark.parametrize("counted", ["900000", {}, None, -5])
def test_a_stream_whose_input_count_is_no_count_is_spent_as_held(counted: Any) -> None:
    """message_start's input count no integer, message_delta's output one: no final usage
    (the call stays spent at its hold), as for a whole answer with the same counts."""
    start: dict[str, Any] = {
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": counted, "output_tokens": 1},
        }
    }
    rewriter = ADAPTER.stream_rewriter()
    list(rewriter.feed(event("message_start", start)))
    delta = {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 10}}
    list(rewriter.feed(event("message_delta", delta)))
    assert rewriter.usage is None
    # An input count given by message_delta itself makes it final again.
    rewriter = ADAPTER.stream_rewriter()
    list(rewriter.feed(event("message_start", start)))
    fixed = {
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": 7, "output_tokens": 10},
    }
    list(rewriter.feed(event("message_delta", fixed)))
    assert rewriter.usage == Usage(7, 10, 0)


def test_usage_counts_cache_writes_apart_from_input() -> None:
    # Anthropic's input_tokens leaves out what was written to the prompt cache.
    body = {
        "usage": {
            "input_tokens": 12,
            "output_tokens": 3,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 190_000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 0,
                "ephemeral_1h_input_tokens": 190_000,
            },
        }
    }
    assert ADAPTER.usage(body) == Usage(
        12, 3, 0, cache_write_tokens=0, cache_write_1h_tokens=190_000
    )
    body["usage"].pop("cache_creation")
    assert ADAPTER.usage(body) == Usage(12, 3, 0, cache_write_tokens=190_000)
    # Streamed: message_start's counts, then message_delta's running totals.
    rewriter = ADAPTER.stream_rewriter()
    start = events("anthropic_text.sse")[0]
    list(rewriter.feed(start))
    assert rewriter.usage is None  # not final yet
    delta = {
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 9, "cache_creation_input_tokens": 5_000},
    }
    list(rewriter.feed(event("message_delta", delta)))
    assert rewriter.usage == Usage(25, 9, 0, cache_write_tokens=5_000)


def test_sdk_accepts_the_recorded_streams_unchanged() -> None:
    message = accumulate(events("anthropic_tools.sse"))
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    text = accumulate(events("anthropic_text.sse"))
    assert text.content[0].type == "text"
    assert text.content[0].text == "The café opens at 8 am ☕"


# --- airtight: every block type, keyed by position, rendered from the decision ----------------


def sdk_block_types(union: Any) -> set[str]:
    """The ``type`` literals of a discriminated union of the SDK's block models."""
    found: set[str] = set()
    for member in typing.get_args(typing.get_args(union)[0]):
        literal = member.model_fields["type"].annotation
        found.update(typing.get_args(literal))
    return found


@pytest.mark.parametrize("union", [ContentBlock, BetaContentBlock])
def test_every_sdk_block_type_is_classified(union: Any) -> None:
    """A block type the SDK can parse is either known passive or a call: fails on an SDK update."""
    types = sdk_block_types(union)
    assert "tool_use" in types
    assert types <= PASSIVE_BLOCKS | set(CALL_BLOCKS)
    assert not PASSIVE_BLOCKS & set(CALL_BLOCKS)


@pytest.mark.parametrize(
    ("block", "kind"),
    [
        ({"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}, ActionKind.TOOL_CALL),
        (
            {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {"q": "x"}},
            ActionKind.HOSTED_TOOL_CALL,
        ),
        (
            {"type": "mcp_tool_use", "id": "m", "name": "f", "server_name": "crm", "input": {}},
            ActionKind.MCP_CALL,
        ),
    ],
)
def test_each_call_block_type_is_decided_with_its_kind(
    block: dict[str, Any], kind: ActionKind
) -> None:
    response = {"content": [{"type": "text", "text": "hi"}, block], "stop_reason": "tool_use"}
    [call] = ADAPTER.tool_calls(response)
    assert (call.key, call.kind, call.wire_type, call.name) == (
        "b1",
        kind,
        block["type"],
        block["name"],
    )
    assert call.arguments == block["input"]
    denied = ADAPTER.rewrite(response, {"b1": DENY})
    assert denied["content"][1] == {"type": "text", "text": blocked_message(call, DENY)}
    assert ADAPTER.rewrite(response, {"b1": ALLOW})["content"][1] == block


@pytest.mark.parametrize("passive", sorted(PASSIVE_BLOCKS))
def test_passive_blocks_are_not_calls(passive: str) -> None:
    block = {"type": passive, "name": "export_customers", "input": {"scope": "every-customer"}}
    response = {"content": [block]}
    assert ADAPTER.tool_calls(response) == []
    assert ADAPTER.rewrite(response, {})["content"][0] is block


@pytest.mark.parametrize(
    "block",
    [
        {"type": "tool_call", "id": "x", "name": "export_customers", "input": {}},
        {"type": "Tool_use", "name": "f", "input": {}},
        {"type": "computer_use", "action": "click"},
        {"name": "f", "input": {}},
        {"type": 3},
        None,
        "tool_use",
        ["tool_use"],
    ],
)
def test_unknown_blocks_are_unknown_calls_denied_or_rendered_whole(block: Any) -> None:
    response = {"content": [block], "stop_reason": "tool_use"}
    [call] = ADAPTER.tool_calls(response)
    assert (call.key, call.kind) == ("b0", ActionKind.UNKNOWN_CALL)
    if isinstance(block, dict):
        assert call.arguments == block
    else:
        assert call.arguments is None
    out = ADAPTER.rewrite(response, {})
    assert out["content"] == [{"type": "text", "text": blocked_message(call, NO_DECISION)}]
    assert out["stop_reason"] == "end_turn"
    allowed = ADAPTER.rewrite(response, {"b0": ALLOW})
    assert allowed["content"] == [block]


def test_duplicate_and_missing_ids_are_decided_by_position() -> None:
    content = [
        {"type": "tool_use", "id": "same", "name": "search_kb", "input": {"q": "a"}},
        {"type": "tool_use", "id": "same", "name": "export_customers", "input": {}},
        {"type": "tool_use", "name": "search_kb", "input": {"q": "b"}},
        {"type": "tool_use", "name": "export_customers", "input": {}},
    ]
    response = {"content": content, "stop_reason": "tool_use"}
    calls = ADAPTER.tool_calls(response)
    assert [c.key for c in calls] == ["b0", "b1", "b2", "b3"]
    decisions = decisions_for(response, deny_names("export_customers"))
    out = ADAPTER.rewrite(response, decisions)
    kinds = [(b["type"], b.get("name")) for b in out["content"]]
    assert kinds == [
        ("tool_use", "search_kb"),
        ("text", None),
        ("tool_use", "search_kb"),
        ("text", None),
    ]
    assert b"export_customers" not in orjson.dumps(
        [b for b in out["content"] if b["type"] != "text"]
    )


def test_allowed_call_is_rendered_from_the_decision_not_replayed() -> None:
    block = {
        "type": "tool_use",
        "id": "t",
        "name": "refund",
        "input": {"amount": 5},
        "caller": {"type": "direct"},
        "function": {"name": "export_customers", "arguments": "{}"},
        "arguments": {"amount": 5000},
    }
    response = {"content": [block], "stop_reason": "tool_use"}
    [call] = ADAPTER.tool_calls(response)
    assert (call.name, call.arguments) == ("refund", {"amount": 5})
    out = ADAPTER.rewrite(response, {"b0": ALLOW})
    assert out["content"] == [
        {
            "type": "tool_use",
            "id": "t",
            "name": "refund",
            "input": {"amount": 5},
            "caller": {"type": "direct"},
        }
    ]
    assert Message.model_validate(
        out
        | {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "x",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"a": NaN}',
        '{"a": Infinity}',
        '{"a": -Infinity}',
        '{"a": 1e400}',
        '{"a": 123456789012345678901234567890}',
        '{"a": ' + "[" * 70 + "]" * 70 + "}",
    ],
)
def test_lenient_literals_in_a_body_fail_closed(text: str) -> None:
    block = '{"type": "tool_use", "id": "t", "name": "f", "input": ' + text + "}"
    response = loads('{"content": [' + block + '], "stop_reason": "tool_use"}')
    [call] = ADAPTER.tool_calls(response)
    assert call.arguments is None
    out = ADAPTER.rewrite(response, {"b0": ALLOW})
    assert out["content"][0]["type"] == "tool_use", "observe or allow: sent as it came"


# --- airtight streams --------------------------------------------------------------------------


def message_start(content: list[Any] | None = None) -> SseEvent:
    message = data(events("anthropic_tools.sse")[0])["message"]
    return event("message_start", {"message": {**message, "content": content or []}})


def tool_start(index: int, name: str = "f", block_type: str = "tool_use", **extra: Any) -> SseEvent:
    block = {"type": block_type, "id": f"toolu_{index}", "name": name, "input": {}, **extra}
    return event("content_block_start", {"index": index, "content_block": block})


def input_delta(index: int, partial: str) -> SseEvent:
    return event(
        "content_block_delta",
        {"index": index, "delta": {"type": "input_json_delta", "partial_json": partial}},
    )


def stop(index: int) -> SseEvent:
    return event("content_block_stop", {"index": index})


END = [
    event("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}}),
    event("message_stop", {}),
]


def feed_all(source: list[SseEvent], decide: Decide = allow_all) -> list[SseEvent]:
    return run(source, decide)[0]


def test_tool_use_inside_message_start_is_decided() -> None:
    inside = {
        "type": "tool_use",
        "id": "toolu_in",
        "name": "export_customers",
        "input": {"scope": "every-customer"},
    }
    text = {"type": "text", "text": "hello"}
    source = [message_start([text, inside]), *text_block_events(2, "more"), *END]
    rewriter = ADAPTER.stream_rewriter()
    items = list(rewriter.feed(source[0]))
    [call] = [i for i in items if isinstance(i, ToolCall)]
    assert (call.key, call.name) == ("b1", "export_customers")
    assert call.arguments == {"scope": "every-customer"}
    assert isinstance(items[0], ToolCall), "nothing is sent before the decision"

    out, calls, _ = run(source, deny_all)
    message = accumulate(out)
    assert [b.type for b in message.content] == ["text", "text", "text"]
    notice = message.content[1]
    assert notice.type == "text"
    assert notice.text == blocked_message(calls[0], DENY)
    assert message.stop_reason == "end_turn"
    assert b"every-customer" not in out[0].data.encode()

    out, _, _ = run(source, allow_all)
    message = accumulate(out)
    tool = message.content[1]
    assert tool.type == "tool_use"
    assert tool.input == {"scope": "every-customer"}


def text_block_events(index: int, text: str) -> list[SseEvent]:
    return [
        event(d["type"], {k: v for k, v in d.items() if k != "type"})
        for d in text_block(index, text)
    ]


def drive(source: list[SseEvent], decide: Decide, sent: list[SseEvent]) -> None:
    """Feed ``source`` as the ingress does, adding each event to ``sent`` as it is yielded."""
    rewriter = ADAPTER.stream_rewriter()
    for item in source:
        for out in rewriter.feed(item):
            sent += rewriter.resolve(out, decide(out)) if isinstance(out, ToolCall) else [out]


@pytest.mark.parametrize(
    "late",
    [
        # A late input delta: after the stop, after another block started, after message_delta.
        [input_delta(0, '{"amount": 5}'), stop(0), input_delta(0, "")],
        [input_delta(0, '{"amount": 5}'), stop(0), *text_block_events(1, "x"), input_delta(0, "0")],
        [input_delta(0, '{"amount": 5}'), *text_block_events(1, "x"), input_delta(0, "0")],
        [input_delta(0, '{"amount": 5}'), END[0], input_delta(0, "000")],
        [input_delta(0, '{"amount": 5}'), END[0], *text_block_events(1, "x")],
        # A second start or stop at a decided index; a start off the next index.
        [input_delta(0, '{"amount": 5}'), stop(0), tool_start(0)],
        [input_delta(0, '{"amount": 5}'), stop(0), stop(0)],
        [input_delta(0, '{"amount": 5}'), stop(0), tool_start(2)],
        [input_delta(0, '{"amount": 5}'), stop(0), input_delta(1, "{}")],
        # Text appended to the notice that replaced a denied call.
        [
            input_delta(0, '{"amount": 5}'),
            stop(0),
            event(
                "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ok"}}
            ),
        ],
    ],
)
def test_events_touching_a_decided_call_are_violations(late: list[SseEvent]) -> None:
    source = [message_start(), tool_start(0, "refund"), *late]
    for decide in (allow_all, deny_all):
        sent: list[SseEvent] = []
        with pytest.raises(StreamViolation):
            drive(source, decide, sent)
        assert b"000" not in encoded(sent)


@pytest.mark.parametrize(
    "bad",
    [
        [tool_start(0)],  # before message_start
        [message_start(), message_start()],
        [message_start(), *END, *text_block_events(0, "x")],
        [
            message_start(),
            event("content_block_start", {"index": "0", "content_block": {"type": "text"}}),
        ],
        [message_start(), event("content_block_delta", {"index": 0, "delta": {}})],
        [message_start(), tool_start(0), event("content_block_delta", {"index": 0, "delta": "x"})],
        [
            message_start(),
            tool_start(0),
            event("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta"}}),
        ],
        [event("message_start", {"message": {"content": {"type": "tool_use"}}})],
        [event("message_start", {"message": None})],
    ],
)
def test_out_of_order_or_misshapen_events_are_violations(bad: list[SseEvent]) -> None:
    with pytest.raises(StreamViolation):
        run(bad, allow_all)


def test_allowed_streamed_call_is_released_as_one_canonical_delta() -> None:
    source = [
        message_start(),
        # A decoy input in the start: the SDK replaces it with the deltas' JSON.
        event(
            "content_block_start",
            {
                "index": 0,
                "content_block": {
                    "type": "tool_use",
                    "id": "t",
                    "name": "refund",
                    "input": {"amount": 1},
                    "extra": "decoy",
                },
            },
        ),
        input_delta(0, ""),
        input_delta(0, '{ "amount" :'),
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x"}}),
        input_delta(0, " 5 }"),
        stop(0),
        *END,
    ]
    out, [call], _ = run(source, allow_all)
    assert (call.raw_arguments, call.arguments) == ('{"amount":5}', {"amount": 5})
    assert [data(e) for e in out[1:4]] == tool_block(0, "t", "refund", '{"amount":5}')
    tool = accumulate(out).content[0]
    assert tool.type == "tool_use"
    assert tool.input == {"amount": 5}


@pytest.mark.parametrize(
    ("block_type", "kind"),
    [
        ("server_tool_use", ActionKind.HOSTED_TOOL_CALL),
        ("mcp_tool_use", ActionKind.MCP_CALL),
        ("tool_invocation", ActionKind.UNKNOWN_CALL),
    ],
)
def test_other_streamed_call_types_are_held_and_decided(block_type: str, kind: ActionKind) -> None:
    source = [
        message_start(),
        tool_start(0, "web_search", block_type),
        input_delta(0, '{"q": "x"}'),
        stop(0),
        *END,
    ]
    rewriter = ADAPTER.stream_rewriter()
    assert [i for i in rewriter.feed(source[0])] == [source[0]]
    assert list(rewriter.feed(source[1])) == [], "held"
    assert list(rewriter.feed(source[2])) == []
    [call] = list(rewriter.feed(source[3]))
    assert isinstance(call, ToolCall)
    assert (call.key, call.kind, call.wire_type) == ("b0", kind, block_type)
    out = rewriter.resolve(call, DENY)
    assert b"web_search" not in encoded(out).replace(
        orjson.dumps(blocked_message(call, DENY))[1:-1], b""
    )


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", "1e400", "123456789012345678901234567890"]
)
def test_lenient_literals_in_streams_parse_and_fail_closed(literal: str) -> None:
    delta = input_delta(0, '{"a": ' + literal + "}")
    usage = SseEvent(
        data='{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":'
        + literal
        + "}}",
        event="message_delta",
    )
    out, [call], rewriter = run(
        [message_start(), tool_start(0), delta, stop(0), usage, END[1]], allow_all
    )
    assert call.arguments is None
    assert rewriter.complete


def test_lone_surrogates_are_written_escaped_and_read_back() -> None:
    start = SseEvent(
        data='{"type":"content_block_start","index":0,"content_block":'
        '{"type":"tool_use","id":"t","name":"f\\ud800","input":{}}}',
        event="content_block_start",
    )
    out, [call], _ = run([message_start(), start, stop(0), *END], deny_all)
    assert call.name == "f\ud800"
    payload = encoded(out)  # would raise if a lone surrogate were written raw
    client = sdk_client(payload)
    with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=64, messages=[]) as s:
        message = s.get_final_message()
    notice = message.content[0]
    assert notice.type == "text"
    assert notice.text == blocked_message(call, DENY)


def test_events_with_no_data_are_dropped() -> None:
    rewriter = ADAPTER.stream_rewriter()
    list(rewriter.feed(message_start()))
    assert list(rewriter.feed(SseEvent(data="", event="content_block_delta"))) == []


def test_an_event_goes_on_as_warden_read_it_not_as_the_upstream_wrote_it() -> None:
    rewriter = ADAPTER.stream_rewriter()
    start = events("anthropic_text.sse")[0]
    list(rewriter.feed(start))
    block = (
        '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use",'
        '"id":"toolu_1","name":"danger","input":{}},"content_block":{"type":"text","text":""}}'
    )
    (out,) = rewriter.feed(SseEvent(data=block, event="content_block_start"))
    assert isinstance(out, SseEvent)
    assert "danger" not in out.data
