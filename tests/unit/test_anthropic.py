"""The Anthropic Messages adapter, checked against recorded bodies and streams.

Rewritten streams are fed to the official ``anthropic`` SDK's own accumulator
and to a real client on an in-memory transport, and rewritten bodies are
validated with its ``Message`` model.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Iterable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from tests.unit.streams import (
    ALLOW,
    DENY,
    HOLD,
    OBSERVED_DENY,
    Decide,
    allow_all,
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
from warden.model import Decision, ToolCall, ToolResult, Usage
from warden.protocols.anthropic import AnthropicMessagesAdapter, AnthropicStreamRewriter
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
        ),
        ToolCall(
            call_id=EMAIL_ID,
            name="send_email",
            raw_arguments='{"to":"cfo@example.com","subject":"Q3 payroll export"}',
            arguments={"to": "cfo@example.com", "subject": "Q3 payroll export"},
            index=1,
        ),
    ]
    assert ADAPTER.tool_calls(body("anthropic_text.json")) == []


def test_tool_call_input_must_be_an_object() -> None:
    content = [
        {"type": "tool_use", "id": "a", "name": "f", "input": ["x"]},
        {"type": "tool_use", "id": "b", "name": "g"},
        {"type": "tool_use", "id": "c", "name": "h", "input": {"big": 2**70}},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        "junk",
    ]
    calls = ADAPTER.tool_calls({"content": content})
    assert [(c.call_id, c.raw_arguments, c.arguments, c.index) for c in calls] == [
        ("a", '["x"]', None, 0),
        ("b", "null", None, 1),
        ("c", '{"big":1180591620717411303424}', {"big": 2**70}, 2),
    ]
    assert ADAPTER.tool_calls({"content": "text"}) == []
    assert ADAPTER.tool_calls({}) == []


def test_usage_from_recorded_bodies() -> None:
    assert ADAPTER.usage(body("anthropic_tools.json")) == Usage(472, 118, 2048)
    assert ADAPTER.usage(body("anthropic_text.json")) == Usage(25, 12, 0)
    assert ADAPTER.usage({}) is None
    assert ADAPTER.usage({"usage": {"input_tokens": None, "output_tokens": "1"}}) == Usage()


# --- rewrite (non-streaming) ---------------------------------------------------------------


def decisions_for(response: dict[str, Any], decide: Decide) -> dict[str, Decision]:
    return {call.call_id: decide(call) for call in ADAPTER.tool_calls(response)}


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
    assert out["content"][2] is original["content"][2]
    assert out["stop_reason"] == "tool_use"
    Message.model_validate(out)
    assert ADAPTER.tool_calls(out) == [dataclasses.replace(email, index=0)]
    assert_no_trace(orjson.dumps(out), [weather], DENY)


def test_rewrite_missing_decision_fails_closed_and_observe_lets_through() -> None:
    original = body("anthropic_tools.json")
    out = ADAPTER.rewrite(original, {WEATHER_ID: ALLOW})
    assert [b["type"] for b in out["content"]] == ["text", "tool_use", "text"]
    assert "no decision was made" in out["content"][2]["text"]
    observed = {WEATHER_ID: OBSERVED_DENY, EMAIL_ID: OBSERVED_DENY}
    assert ADAPTER.rewrite(original, observed) == original


def test_rewrite_hold_explains_the_approval() -> None:
    original = body("anthropic_tools.json")
    out = ADAPTER.rewrite(original, {WEATHER_ID: HOLD, EMAIL_ID: ALLOW})
    assert "held the tool call `get_weather` for human approval" in out["content"][1]["text"]


def test_rewrite_leaves_server_tools_and_odd_bodies_alone() -> None:
    server = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
    original = {"content": [server, None], "stop_reason": "end_turn"}
    assert ADAPTER.rewrite(original, {}) == original
    assert ADAPTER.rewrite({}, {}) == {}
    assert ADAPTER.rewrite({"content": "x"}, {}) == {"content": "x"}


# --- streaming ------------------------------------------------------------------------------


def test_text_stream_passes_through_untouched_and_immediately() -> None:
    source = events("anthropic_text.sse")
    rewriter = ADAPTER.stream_rewriter()
    for item in source:
        items = list(rewriter.feed(item))
        assert len(items) == 1
        assert items[0] is item
    assert list(rewriter.finish()) == []
    assert rewriter.complete
    assert rewriter.model == "claude-sonnet-4-20250514"
    assert rewriter.usage == Usage(25, 12, 0)
    assert encoded(source) == raw("anthropic_text.sse")


@pytest.mark.parametrize("name", ["anthropic_tools.sse", "anthropic_thinking_tool.sse"])
def test_allow_all_stream_is_byte_identical(name: str) -> None:
    source = events(name)
    out, calls, _ = run(source, allow_all)
    assert all(a is b for a, b in zip(out, source, strict=True))
    assert encoded(out) == raw(name)
    assert accumulate(out) == accumulate(source)
    assert all(call.arguments is not None for call in calls)


def test_stream_calls_from_recorded_stream() -> None:
    _, calls, rewriter = run(events("anthropic_tools.sse"), allow_all)
    assert calls == [
        ToolCall(
            call_id=WEATHER_ID,
            name="get_weather",
            raw_arguments='{"city": "Paris"}',
            arguments={"city": "Paris"},
            index=0,
        ),
        ToolCall(
            call_id=EMAIL_ID,
            name="send_email",
            raw_arguments='{"to": "cfo@example.com", "subject": "Q3 payroll export"}',
            arguments={"to": "cfo@example.com", "subject": "Q3 payroll export"},
            index=1,
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
    assert all(a is b for a, b in zip(out[:6], source[:6], strict=True))
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
        *[data(e) for e in source[11:]],
    ]
    assert [data(e) for e in out] == expected
    assert all(a is b for a, b in zip(out[9:], source[11:], strict=True))

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
        assert list(rewriter.feed(item)) == [item], "thinking is sent at once"
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


def test_ping_error_unknown_and_unparseable_events_pass_through() -> None:
    rewriter = ADAPTER.stream_rewriter()
    odd = [
        SseEvent(data='{"type": "ping"}', event="ping"),
        SseEvent(
            data='{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            event="error",
        ),
        SseEvent(data='{"type": "future_event", "detail": 1}', event="future_event"),
        SseEvent(data="not json", event="message_delta"),
        SseEvent(data="[1]"),
        SseEvent(data='{"no_type": true}'),
        SseEvent(data='{"type": "content_block_delta", "index": 9, "delta": {}}'),
    ]
    for item in odd:
        assert list(rewriter.feed(item)) == [item]
    assert not rewriter.complete


def test_unknown_event_about_a_held_block_is_held_with_it() -> None:
    source = events("anthropic_tools.sse")
    secret = event("content_block_future", {"index": 1, "leak": "cfo@example.com"})
    stream = [*source[:7], secret, *source[7:]]
    out, _, _ = run(stream, deny_names("get_weather"))
    assert b"cfo@example.com" not in b"".join(e.encode() for e in out[:12])
    out, _, _ = run(stream, allow_all)
    assert secret in out


def test_resolve_accepts_an_equal_copy_and_ignores_unknown_calls() -> None:
    source = events("anthropic_tools.sse")
    rewriter = ADAPTER.stream_rewriter()
    calls = [i for e in source[:11] for i in rewriter.feed(e) if isinstance(i, ToolCall)]
    [call] = calls
    stranger = ToolCall(call_id="toolu_x", name="x", raw_arguments="{}", arguments={})
    assert rewriter.resolve(stranger, ALLOW) == []
    assert rewriter.resolve(dataclasses.replace(call), ALLOW) == source[6:11]
    assert rewriter.resolve(call, ALLOW) == []


def test_usage_follows_message_delta_totals() -> None:
    rewriter = ADAPTER.stream_rewriter()
    assert rewriter.usage is None
    list(rewriter.feed(events("anthropic_tools.sse")[0]))
    assert rewriter.usage == Usage(472, 2, 2048)
    delta = {
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 40, "input_tokens": 480, "cache_read_input_tokens": None},
    }
    list(rewriter.feed(event("message_delta", delta)))
    assert rewriter.usage == Usage(480, 40, 2048)


def test_sdk_accepts_the_recorded_streams_unchanged() -> None:
    message = accumulate(events("anthropic_tools.sse"))
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    text = accumulate(events("anthropic_text.sse"))
    assert text.content[0].type == "text"
    assert text.content[0].text == "The café opens at 8 am ☕"
