"""The OpenAI Chat Completions adapter, checked against recorded bodies and streams.

Rewritten output is also fed to the official ``openai`` SDK's own parsing
(models, the stream accumulator and a client on an in-memory transport), so
"the agent's SDK accepts it" is tested, not assumed.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Iterable
from typing import Any, cast

import httpx2
import openai
import orjson
import pytest
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ParsedChatCompletion

from tests.unit.streams import (
    ALLOW,
    DENY,
    HOLD,
    OBSERVED_DENY,
    Decide,
    allow_all,
    as_read,
    body,
    carries_tool_delta,
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
from warden.protocols._wire import parse_arguments
from warden.protocols.base import Adapter, StreamRewriter, blocked_message
from warden.protocols.openai_chat import (
    OpenAIChatAdapter,
    OpenAIChatStreamRewriter,
    legacy_call_id,
)
from warden.protocols.sse import SseEvent, SseParser

ADAPTER = OpenAIChatAdapter()

WEATHER_ID = "call_8Yq2mWn4TzR1vK7pX3sL0dFh"
EMAIL_ID = "call_Jx5nB0cV9qL2wE8rT4yU6iOp"
SEARCH_ID = "call_Vb3nM6qW9eR2tY5uI8oP1aS4"


def chunk_event(choices: list[dict[str, Any]], **extra: Any) -> SseEvent:
    chunk = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1752840000,
        "model": "gpt-4o-2024-08-06",
        "choices": choices,
        **extra,
    }
    return SseEvent(data=orjson.dumps(chunk).decode())


def tool_delta(
    index: int,
    arguments: str,
    *,
    call_id: str | None = None,
    name: str | None = None,
    choice: int = 0,
    finish: str | None = None,
    **delta: Any,
) -> SseEvent:
    part: dict[str, Any] = {"index": index}
    if call_id is not None:
        part["id"] = call_id
        part["type"] = "function"
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    part["function"] = function
    return chunk_event(
        [
            {
                "index": choice,
                "delta": {**delta, "tool_calls": [part]},
                "logprobs": None,
                "finish_reason": finish,
            }
        ]
    )


def finish_event(reason: str, choice: int = 0) -> SseEvent:
    return chunk_event([{"index": choice, "delta": {}, "logprobs": None, "finish_reason": reason}])


DONE = SseEvent(data="[DONE]")


def run(
    source: list[SseEvent], decide: Decide = allow_all, *, finish: bool = True, choices: int = 1
) -> tuple[list[SseEvent], list[ToolCall], OpenAIChatStreamRewriter]:
    rewriter = ADAPTER.stream_rewriter(choices=choices)
    out: list[SseEvent] = []
    calls: list[ToolCall] = []
    for event in source:
        sent, decided = take(rewriter, rewriter.feed(event), decide)
        out += sent
        calls += decided
    if finish:
        sent, decided = take(rewriter, rewriter.finish(), decide)
        out += sent
        calls += decided
    return out, calls, rewriter


def replay_bytes(pieces: Iterable[bytes], decide: Decide) -> bytes:
    return replay(ADAPTER.stream_rewriter(), pieces, decide)


def accumulate(out: list[SseEvent]) -> ParsedChatCompletion[None]:
    """The final completion as the official SDK's stream accumulator builds it."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for event in out:
        if event.data.startswith("[DONE]"):
            break
        state.handle_chunk(ChatCompletionChunk.model_validate(data(event)))
    return state.get_final_completion()


def sdk_client(payload: bytes, content_type: str = "text/event-stream") -> openai.OpenAI:
    """A real client whose transport answers every request with ``payload``: no sockets."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=payload, headers={"content-type": content_type})

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return openai.OpenAI(
        api_key="sk-test", base_url="http://warden.test/v1", http_client=http, max_retries=0
    )


def test_adapter_satisfies_protocol() -> None:
    adapter: Adapter = ADAPTER
    rewriter: StreamRewriter = adapter.stream_rewriter()
    assert adapter.name == "openai.chat"
    assert isinstance(rewriter, OpenAIChatStreamRewriter)


# --- parse_request ------------------------------------------------------------------------


def test_parse_request_reads_model_stream_and_named_tool_results() -> None:
    parsed = ADAPTER.parse_request(body("openai_chat_request.json"))
    assert parsed.model == "gpt-4o"
    assert parsed.stream is True
    assert parsed.tool_results == (
        ToolResult(call_id=WEATHER_ID, content="18°C, light rain", tool="get_weather"),
        ToolResult(call_id=EMAIL_ID, content="Sent.\nMessage id 4412.", tool="send_email"),
    )


def test_parse_request_names_only_from_earlier_assistant_messages() -> None:
    parsed = ADAPTER.parse_request(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "tool", "tool_call_id": "call_a", "content": "early"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_a", "type": "function", "function": {"name": "lookup"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_a", "content": "late"},
                {"role": "tool", "tool_call_id": "call_unknown", "content": "orphan"},
            ],
        }
    )
    assert parsed.stream is False
    assert parsed.tool_results == (
        ToolResult(call_id="call_a", content="early", tool=None),
        ToolResult(call_id="call_a", content="late", tool="lookup"),
        ToolResult(call_id="call_unknown", content="orphan", tool=None),
    )


@pytest.mark.parametrize(
    "odd",
    [
        {},
        {"model": 4, "stream": "true", "messages": "hello"},
        {"messages": None},
        {"messages": [None, 1, "x", [], {"role": 5}]},
        {"messages": [{"role": "assistant", "tool_calls": "call_a"}]},
        {"messages": [{"role": "assistant", "tool_calls": [None, {"id": 3}, {"function": []}]}]},
        {"messages": [{"role": "tool"}, {"role": "tool", "tool_call_id": 12, "content": "x"}]},
        {"messages": [{"role": "tool", "tool_call_id": "c", "content": {"text": "x"}}]},
        {"messages": [{"role": "tool", "tool_call_id": "c", "content": [1, {"text": 2}]}]},
    ],
)
def test_parse_request_never_raises_on_odd_shapes(odd: dict[str, Any]) -> None:
    parsed = ADAPTER.parse_request(odd)
    assert parsed.model is None
    assert parsed.stream is False
    for result in parsed.tool_results:
        assert result.call_id == "c"
        assert result.content == ""


def test_parse_request_skips_non_text_parts() -> None:
    parsed = ADAPTER.parse_request(
        {
            "messages": [
                {
                    "role": "tool",
                    "tool_call_id": "c",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:..."}},
                        {"type": "text", "text": "only this"},
                    ],
                }
            ]
        }
    )
    assert parsed.tool_results == (ToolResult(call_id="c", content="only this"),)


# --- tool_calls / usage (non-streaming) --------------------------------------------------


def test_tool_calls_from_recorded_body() -> None:
    calls = ADAPTER.tool_calls(body("openai_chat_tools.json"))
    assert calls == [
        ToolCall(
            call_id=WEATHER_ID,
            name="get_weather",
            raw_arguments='{"city": "Paris"}',
            arguments={"city": "Paris"},
            index=0,
            key="c0.t0",
            kind=ActionKind.TOOL_CALL,
            wire_type="function",
        ),
        ToolCall(
            call_id=EMAIL_ID,
            name="send_email",
            raw_arguments='{"to": "cfo@example.com", "subject": "Q3 payroll export"}',
            arguments={"to": "cfo@example.com", "subject": "Q3 payroll export"},
            index=1,
            key="c0.t1",
            kind=ActionKind.TOOL_CALL,
            wire_type="function",
        ),
    ]


def test_text_only_body_has_no_tool_calls() -> None:
    assert ADAPTER.tool_calls(body("openai_chat_text.json")) == []


def message_body(message: dict[str, Any], finish: str = "tool_calls") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1752840000,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
    }


def function_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize(
    ("arguments", "expected_raw", "expected"),
    [
        ('{"a": 1}', '{"a": 1}', {"a": 1}),
        ("{not json", "{not json", None),
        ("[1, 2]", "[1, 2]", None),
        ('"text"', '"text"', None),
        ("", "", None),
        ({"a": 1}, '{"a":1}', {"a": 1}),
        (None, "", None),
        (12, "12", None),  # recorded as sent, never parsed as arguments
    ],
)
def test_tool_call_arguments_must_be_a_json_object(
    arguments: Any, expected_raw: str, expected: dict[str, Any] | None
) -> None:
    [call] = ADAPTER.tool_calls(
        message_body({"content": None, "tool_calls": [function_call("c1", "f", arguments)]})
    )
    assert call.raw_arguments == expected_raw
    assert call.arguments == expected


def test_tool_calls_skip_what_they_do_not_understand() -> None:
    odd = {
        "choices": [
            None,
            {"message": None},
            {"message": {"tool_calls": "nope"}},
            {"message": {"tool_calls": [None, 3, function_call("c1", "f", "{}")]}},
        ]
    }
    [call] = ADAPTER.tool_calls(odd)
    # Keyed by position in the list as sent, so a dropped entry shifts nothing.
    assert (call.call_id, call.name, call.index, call.key) == ("c1", "f", 2, "c3.t2")
    assert ADAPTER.tool_calls({}) == []
    assert ADAPTER.tool_calls({"choices": {"0": {}}}) == []


def test_custom_tool_free_text_reaches_the_policy_as_an_input_object() -> None:
    entry = {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** diff"}}
    [call] = ADAPTER.tool_calls(message_body({"content": None, "tool_calls": [entry]}))
    assert (call.name, call.raw_arguments) == ("apply_patch", "*** diff")
    assert call.arguments == {"input": "*** diff"}


def test_custom_tool_input_that_is_not_text_fails_closed() -> None:
    entry = {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": {"a": 1}}}
    [call] = ADAPTER.tool_calls(message_body({"content": None, "tool_calls": [entry]}))
    assert call.arguments is None


def test_legacy_function_call() -> None:
    legacy = message_body(
        {"content": None, "function_call": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        finish="function_call",
    )
    [call] = ADAPTER.tool_calls(legacy)
    assert call == ToolCall(
        call_id=legacy_call_id(0),
        name="get_weather",
        raw_arguments='{"city":"Oslo"}',
        arguments={"city": "Oslo"},
        key="c0.f",
        wire_type="function_call",
    )


def test_usage_from_recorded_bodies() -> None:
    assert ADAPTER.usage(body("openai_chat_tools.json")) == Usage(152, 58, 128)
    assert ADAPTER.usage(body("openai_chat_text.json")) == Usage(19, 9, 0)
    assert ADAPTER.usage({}) is None
    assert ADAPTER.usage({"usage": None}) is None
    # Counts that are no counts: spent as held, never settled at nothing.
    odd = {"usage": {"prompt_tokens": "3", "completion_tokens": -1, "prompt_tokens_details": 5}}
    assert ADAPTER.usage(odd) is None
    assert ADAPTER.usage({"usage": {"prompt_tokens": 7}}) is None
    assert ADAPTER.usage({"usage": {"prompt_tokens": 7.0, "completion_tokens": 1}}) is None
    shaky = {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": 5}
    assert ADAPTER.usage({"usage": shaky}) == Usage(7, 2, 0)


# --- rewrite (non-streaming) ---------------------------------------------------------------


def decisions_for(response: dict[str, Any], decide: Decide) -> dict[str, Decision]:
    return {call.key: decide(call) for call in ADAPTER.tool_calls(response)}


def test_rewrite_allow_all_keeps_the_body() -> None:
    original = body("openai_chat_tools.json")
    out = ADAPTER.rewrite(original, decisions_for(original, allow_all))
    assert out == original
    completion = ChatCompletion.model_validate(out)
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [c.id for c in completion.choices[0].message.tool_calls or []] == [WEATHER_ID, EMAIL_ID]


def test_rewrite_deny_all_removes_calls_and_explains() -> None:
    original = body("openai_chat_tools.json")
    before = copy.deepcopy(original)
    out = ADAPTER.rewrite(original, decisions_for(original, deny_all))
    assert original == before, "the input must not be mutated"
    calls = ADAPTER.tool_calls(original)
    message = out["choices"][0]["message"]
    assert "tool_calls" not in message
    assert message["content"] == "\n".join(blocked_message(c, DENY) for c in calls)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == original["usage"]
    completion = ChatCompletion.model_validate(out)
    assert completion.choices[0].message.tool_calls is None
    assert_no_trace(orjson.dumps(out), calls, DENY)


def test_rewrite_mixed_denies_only_the_first() -> None:
    original = body("openai_chat_tools.json")
    out = ADAPTER.rewrite(original, decisions_for(original, deny_names("get_weather")))
    weather, email = ADAPTER.tool_calls(original)
    message = out["choices"][0]["message"]
    assert message["tool_calls"] == [original["choices"][0]["message"]["tool_calls"][1]]
    assert message["content"] == blocked_message(weather, DENY)
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    completion = ChatCompletion.model_validate(out)
    assert [c.id for c in completion.choices[0].message.tool_calls or []] == [EMAIL_ID]
    assert_no_trace(orjson.dumps(out), [weather], DENY)
    assert ADAPTER.tool_calls(out) == [dataclasses.replace(email, index=0, key="c0.t0")]


def test_rewrite_appends_after_existing_content() -> None:
    original = message_body(
        {"content": "Checking now.", "tool_calls": [function_call("c1", "wipe_disk", "{}")]}
    )
    out = ADAPTER.rewrite(original, {"c0.t0": HOLD})
    [call] = ADAPTER.tool_calls(original)
    text = out["choices"][0]["message"]["content"]
    assert text == f"Checking now.\n{blocked_message(call, HOLD)}"
    assert "held the tool call `wipe_disk` for human approval" in text
    ChatCompletion.model_validate(out)


def test_rewrite_without_a_decision_fails_closed() -> None:
    original = body("openai_chat_tools.json")
    out = ADAPTER.rewrite(original, {"c0.t0": ALLOW})
    message = out["choices"][0]["message"]
    assert [c["id"] for c in message["tool_calls"]] == [WEATHER_ID]
    assert "send_email" in message["content"]
    assert "no decision was made" in message["content"]


def test_rewrite_observe_mode_lets_a_deny_through() -> None:
    original = body("openai_chat_tools.json")
    out = ADAPTER.rewrite(original, {"c0.t0": OBSERVED_DENY, "c0.t1": OBSERVED_DENY})
    assert out == original


def test_rewrite_drops_tool_call_entries_it_cannot_decide() -> None:
    original = message_body({"content": None, "tool_calls": ["junk", 4]})
    out = ADAPTER.rewrite(original, {})
    assert "tool_calls" not in out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "stop"
    broken = message_body({"content": None, "tool_calls": {"id": "x"}})
    assert "tool_calls" not in ADAPTER.rewrite(broken, {})["choices"][0]["message"]


def test_rewrite_empty_tool_calls_key_is_removed() -> None:
    out = ADAPTER.rewrite(message_body({"content": "hi", "tool_calls": []}), {})
    message = out["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "hi"}
    assert out["choices"][0]["finish_reason"] == "stop"


def test_rewrite_text_body_is_unchanged() -> None:
    original = body("openai_chat_text.json")
    assert ADAPTER.rewrite(original, {}) == original


def test_rewrite_legacy_function_call() -> None:
    legacy = message_body(
        {"content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        finish="function_call",
    )
    denied = ADAPTER.rewrite(legacy, {"c0.f": DENY})
    assert "function_call" not in denied["choices"][0]["message"]
    assert denied["choices"][0]["finish_reason"] == "stop"
    ChatCompletion.model_validate(denied)
    allowed = ADAPTER.rewrite(legacy, {"c0.f": ALLOW})
    assert allowed == legacy


def test_rewrite_tolerates_odd_bodies() -> None:
    assert ADAPTER.rewrite({}, {}) == {}
    odd = {"choices": [None, {"message": "x"}, 3]}
    assert ADAPTER.rewrite(odd, {}) == odd


def assert_no_trace(output: bytes, calls: list[ToolCall], decision: Decision) -> None:
    """Nothing of a denied call is left but Warden's notice, which names the tool."""
    notices = [blocked_message(call, decision).encode() for call in calls]
    stripped = output
    for notice in notices:
        stripped = stripped.replace(orjson.dumps(notice.decode())[1:-1], b"")
    for call in calls:
        assert call.call_id.encode() not in output
        assert call.name.encode() not in stripped
        for value in (call.arguments or {}).values():
            assert str(value).encode() not in output
        assert call.raw_arguments.encode() not in output


# --- streaming ------------------------------------------------------------------------------


def test_text_stream_passes_through_untouched_and_immediately() -> None:
    source = events("openai_chat_text.sse")
    rewriter = ADAPTER.stream_rewriter()
    for event in source:
        items = list(rewriter.feed(event))
        assert len(items) == 1
        assert as_read(items[0]) == as_read(event)
    assert list(rewriter.finish()) == []
    assert rewriter.complete
    assert rewriter.usage == Usage(19, 9, 0)
    assert rewriter.model == "gpt-4o-2024-08-06"
    assert encoded(source) == raw("openai_chat_text.sse")


def released(upstream: SseEvent, index: int, call: ToolCall) -> dict[str, Any]:
    """The chunk an allowed call is sent as: the envelope of the chunk it started in."""
    chunk: dict[str, Any] = data(upstream)
    chunk["usage"] = None
    function = {"name": call.name, "arguments": call.raw_arguments}
    part = {"index": index, "id": call.call_id, "type": "function", "function": function}
    chunk["choices"] = [
        {"index": 0, "delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}
    ]
    return chunk


def test_allow_all_parallel_stream() -> None:
    source = events("openai_chat_parallel_tools.sse")
    out, calls, rewriter = run(source, allow_all)
    assert [(c.call_id, c.name, c.index, c.key) for c in calls] == [
        (WEATHER_ID, "get_weather", 0, "c0.t0"),
        (EMAIL_ID, "send_email", 1, "c0.t1"),
    ]
    assert calls[0].raw_arguments == '{"city": "Paris"}'
    assert calls[0].arguments == {"city": "Paris"}
    assert calls[1].arguments == {"to": "cfo@example.com", "subject": "Q3 payroll export"}

    role_part = data(source[0])
    del role_part["choices"][0]["delta"]["tool_calls"]
    # Each allowed call is one canonical delta, rendered from what was decided.
    assert [data(e) for e in out[:3]] == [
        role_part,
        released(source[0], 0, calls[0]),
        released(source[4], 1, calls[1]),
    ]
    assert out[3:] == source[8:]
    assert all(as_read(a) == as_read(b) for a, b in zip(out[3:], source[8:], strict=True))
    assert rewriter.complete
    assert rewriter.usage == Usage(152, 58, 128)

    final = accumulate(out)
    assert final == accumulate(source)
    assert final.choices[0].finish_reason == "tool_calls"


def test_deny_all_parallel_stream() -> None:
    source = events("openai_chat_parallel_tools.sse")
    out, calls, _ = run(source, deny_all)
    notice = [blocked_message(c, DENY) for c in calls]
    first = data(source[0])
    envelope = {k: v for k, v in first.items() if k != "choices"}

    def content_chunk(text: str) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        return {**envelope, "choices": [choice], "usage": None}

    stop = data(source[8])
    stop["choices"][0]["finish_reason"] = "stop"
    assert [data(e) for e in out[:4]] == [
        {
            **first,
            "choices": [
                {
                    **first["choices"][0],
                    "delta": {"role": "assistant", "content": None, "refusal": None},
                }
            ],
        },
        content_chunk(notice[0]),
        content_chunk("\n" + notice[1]),
        stop,
    ]
    assert as_read(out[4]) == as_read(source[9])
    assert as_read(out[5]) == as_read(source[10])
    assert len(out) == 6

    final = accumulate(out)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content == "\n".join(notice)
    assert_no_trace(encoded(out), calls, DENY)


def test_mixed_stream_denies_the_first_of_two() -> None:
    source = events("openai_chat_parallel_tools.sse")
    out, calls, _ = run(source, deny_names("get_weather"))
    weather, email = calls
    # The allowed call moves from index 1 to 0.
    assert data(out[2]) == released(source[4], 0, email)
    assert as_read(out[3]) == as_read(source[8]), (
        "a call was allowed: the finish reason stays tool_calls"
    )

    final = accumulate(out)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == blocked_message(weather, DENY)
    assert [(t.id, t.function.name) for t in choice.message.tool_calls or []] == [
        (EMAIL_ID, "send_email")
    ]
    assert (choice.message.tool_calls or [])[0].function.arguments == email.raw_arguments
    assert_no_trace(encoded(out), [weather], DENY)


def test_mixed_stream_denies_the_second_of_two() -> None:
    source = events("openai_chat_parallel_tools.sse")
    out, calls, _ = run(source, deny_names("send_email"))
    final = accumulate(out)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [t.id for t in choice.message.tool_calls or []] == [WEATHER_ID]
    assert choice.message.content == blocked_message(calls[1], DENY)
    assert_no_trace(encoded(out), [calls[1]], DENY)


def test_allowed_text_then_tool_stream_keeps_text_and_assembles_alike() -> None:
    source = events("openai_chat_text_then_tool.sse")
    out, calls, rewriter = run(source, allow_all)
    assert [c.name for c in calls] == ["search_docs"]
    assert all(as_read(a) == as_read(b) for a, b in zip(out[:3], source[:3], strict=True))
    assert len(out) == len(source) - 2, "three call fragments became one delta"
    assert all(as_read(a) == as_read(b) for a, b in zip(out[4:], source[6:], strict=True))
    assert accumulate(out) == accumulate(source)
    assert rewriter.usage is None


def test_denied_call_after_text_starts_on_a_new_line() -> None:
    source = events("openai_chat_text_then_tool.sse")
    rewriter = ADAPTER.stream_rewriter()
    # Text is sent by the feed of the event that carried it, not later.
    for event in source[:3]:
        assert [as_read(e) for e in rewriter.feed(event)] == [as_read(event)]
    out = list(source[:3])
    sent, calls = take(rewriter, (i for e in source[3:] for i in rewriter.feed(e)), deny_all)
    out += sent
    [call] = calls
    assert call.arguments == {"query": "refund policy"}
    final = accumulate(out)
    assert (
        final.choices[0].message.content == f"Let me look that up.\n{blocked_message(call, DENY)}"
    )
    assert final.choices[0].finish_reason == "stop"
    assert_no_trace(encoded(out), calls, DENY)


def test_finish_reason_is_decided_after_the_last_resolve() -> None:
    source = events("openai_chat_text_then_tool.sse")
    for decision, expected in ((ALLOW, "tool_calls"), (DENY, "stop")):
        rewriter = ADAPTER.stream_rewriter()
        for event in source[:6]:
            for item in rewriter.feed(event):
                assert isinstance(item, SseEvent)
        items = rewriter.feed(source[6])
        call = next(items)
        assert isinstance(call, ToolCall)
        resolved = rewriter.resolve(call, decision)
        assert resolved
        [finish] = list(items)
        assert isinstance(finish, SseEvent)
        assert data(finish)["choices"][0]["finish_reason"] == expected


def test_observe_mode_stream_assembles_unchanged() -> None:
    source = events("openai_chat_text_then_tool.sse")
    out, _, _ = run(source, lambda call: OBSERVED_DENY)
    assert accumulate(out) == accumulate(source)


def test_require_approval_stream_explains_the_hold() -> None:
    out, calls, _ = run(events("openai_chat_text_then_tool.sse"), lambda call: HOLD)
    content = accumulate(out).choices[0].message.content or ""
    assert "held the tool call `search_docs` for human approval" in content
    assert "(decision dec_2)" in content


STREAMS = [
    "openai_chat_text.sse",
    "openai_chat_parallel_tools.sse",
    "openai_chat_text_then_tool.sse",
]
POLICIES: dict[str, Decide] = {
    "allow": allow_all,
    "deny": deny_all,
    "deny_first": deny_names("get_weather", "search_docs"),
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
    with client.chat.completions.stream(model="gpt-4o", messages=[]) as stream:
        final = stream.get_final_completion()
    assert final == accumulate(SseParser().feed(payload))
    choice = final.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert [t.to_dict()["index"] for t in choice.message.tool_calls] == list(
            range(len(choice.message.tool_calls))
        )
    else:
        assert choice.finish_reason == "stop"


def test_malformed_arguments_give_no_arguments() -> None:
    source = [
        tool_delta(0, "", call_id="call_x", name="f", role="assistant"),
        tool_delta(0, "{not json"),
        finish_event("tool_calls"),
        DONE,
    ]
    out, [call], _ = run(source, deny_all)
    assert call.raw_arguments == "{not json"
    assert call.arguments is None
    assert b"not json" not in encoded(out)


def test_truncated_stream_yields_held_calls_on_finish() -> None:
    source = events("openai_chat_parallel_tools.sse")[:6]
    rewriter = ADAPTER.stream_rewriter()
    fed = [item for event in source for item in rewriter.feed(event)]
    fed_calls = [item for item in fed if isinstance(item, ToolCall)]
    assert [c.name for c in fed_calls] == ["get_weather"]
    rewriter.resolve(fed_calls[0], ALLOW)
    assert not rewriter.complete
    [held] = list(rewriter.finish())
    assert isinstance(held, ToolCall)
    assert held.name == "send_email"
    assert held.raw_arguments == '{"to": "cfo@exa'
    assert held.arguments is None
    assert rewriter.resolve(held, DENY)[0].data.count("send_email") == 1
    assert list(rewriter.finish()) == []


def test_events_without_choices_pass_through() -> None:
    rewriter = ADAPTER.stream_rewriter()
    odd = [
        SseEvent(data='{"object": "keepalive"}'),
        SseEvent(data='{"error": {"message": "boom"}}', event="error"),
        SseEvent(data='{"choices": null, "usage": null}'),
    ]
    for event in odd:
        assert [as_read(e) for e in rewriter.feed(event)] == [as_read(event)]
    assert not rewriter.complete


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "",
        "[1, 2]",
        "null",
        '"chunk"',
        '{"choices": "x"}',
        '{"choices": {"0": {}}}',
        '{"choices": [1, null]}',
        '{"choices": [{"delta": {"content": "no index"}}]}',
        '{"choices": [{"index": "0", "delta": {}}]}',
        '{"choices": [{"index": true, "delta": {}}]}',
        '{"choices": [{"index": 1, "delta": {"content": "choice 1 before 0"}}]}',
        '{"choices": [{"index": -1, "delta": {}}]}',
        '{"choices": [{"index": 0, "delta": "x"}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": {"0": {}}}}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": ["x"]}}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"id": "c", "type": "function"}]}}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0"}]}}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0.0}]}}]}',
        '{"choices": [{"index": 0, "delta": {"function_call": "rm -rf /"}}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [' + "[" * 5000 + "]}]}",
    ],
)
def test_unparseable_or_misshapen_events_violate(text: str) -> None:
    rewriter = ADAPTER.stream_rewriter()
    with pytest.raises(StreamViolation):
        list(rewriter.feed(SseEvent(data=text)))


def test_a_call_in_a_chunk_that_cannot_be_parsed_is_never_forwarded() -> None:
    # A chunk that orjson refuses but the SDK's json parses, with a stray byte after it.
    rewriter = ADAPTER.stream_rewriter()
    bad = tool_delta(0, '{"x": 1}', call_id="c", name="wipe").data + " }"
    with pytest.raises(StreamViolation):
        list(rewriter.feed(SseEvent(data=bad)))


def test_chunk_with_content_and_tool_delta_keeps_the_content() -> None:
    mixed = tool_delta(0, '{"q": 1}', call_id="call_m", name="lookup", content="Sure.")
    rewriter = ADAPTER.stream_rewriter()
    [sent] = list(rewriter.feed(mixed))
    assert isinstance(sent, SseEvent)
    assert data(sent)["choices"][0]["delta"] == {"content": "Sure."}
    out, calls = take(rewriter, rewriter.feed(finish_event("tool_calls")), deny_all)
    [call] = calls
    final = accumulate([sent, *out])
    assert final.choices[0].message.content == f"Sure.\n{blocked_message(call, DENY)}"
    assert final.choices[0].finish_reason == "stop"


def test_tool_delta_and_finish_in_one_chunk() -> None:
    source = [
        tool_delta(0, "", call_id="call_a", name="first", role="assistant"),
        tool_delta(1, '{"n": 2}', call_id="call_b", name="second", finish="tool_calls"),
        DONE,
    ]
    rewriter = ADAPTER.stream_rewriter()
    take(rewriter, rewriter.feed(source[0]), allow_all)
    items = list(rewriter.feed(source[1]))
    kinds = [type(item).__name__ for item in items]
    assert kinds == ["ToolCall", "ToolCall", "SseEvent"]
    for policy, reason in ((allow_all, "tool_calls"), (deny_names("second"), "tool_calls")):
        out, _, _ = run(source, policy)
        assert accumulate(out).choices[0].finish_reason == reason
    out, _, _ = run(source, deny_all)
    final = accumulate(out)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None


def test_a_choice_beyond_the_requests_n_is_a_violation() -> None:
    # LangChain reads choices[0] of every chunk: choice 1's call (its index renumbered
    # to 0 as well) would merge into choice 0's, a call ("dan" + "ger_wipe") no one decided.
    source = [
        tool_delta(0, '{"path": "/"}', call_id="call_1", name="dan", choice=0, role="assistant"),
        tool_delta(0, "{}", call_id="call_1", name="ger_wipe", choice=1, role="assistant"),
        DONE,
    ]
    with pytest.raises(StreamViolation, match="choice 1 in an answer to a request for 1"):
        run(source)
    out, calls, _ = run(source, choices=2)
    assert [c.name for c in calls] == ["dan", "ger_wipe"]


def test_two_choices_are_decided_and_renumbered_separately() -> None:
    source = [
        tool_delta(0, '{"a": 0}', call_id="call_c0", name="zero", choice=0, role="assistant"),
        tool_delta(0, "", call_id="call_c1a", name="one_a", choice=1, role="assistant"),
        tool_delta(0, '{"a": 1}', choice=1),
        tool_delta(1, '{"b": 1}', call_id="call_c1b", name="one_b", choice=1),
        finish_event("tool_calls", choice=0),
        finish_event("tool_calls", choice=1),
        DONE,
    ]
    out, calls, _ = run(source, deny_names("zero", "one_a"), choices=2)
    # Each call closes when its own choice moves on, whatever the other choice does.
    assert [(c.name, c.index) for c in calls] == [("one_a", 0), ("zero", 0), ("one_b", 1)]
    final = accumulate(out)
    zero, one = final.choices
    assert zero.finish_reason == "stop"
    assert zero.message.tool_calls is None
    assert one.finish_reason == "tool_calls"
    assert [(t.to_dict()["index"], t.id) for t in one.message.tool_calls or []] == [(0, "call_c1b")]


def test_a_second_id_at_the_same_index_extends_the_call_as_the_sdk_does() -> None:
    # The SDK concatenates every string of one index: it runs ONE call,
    # named "alphabeta", so that is what is decided (and it is not JSON).
    source = [
        tool_delta(0, '{"x": 1}', call_id="call_1", name="alpha", role="assistant"),
        tool_delta(0, '{"x": 2}', call_id="call_2", name="beta"),
        finish_event("tool_calls"),
        DONE,
    ]
    assert [
        (t.id, t.function.name, t.function.arguments)
        for t in accumulate(source).choices[0].message.tool_calls or []
    ] == [("call_1call_2", "alphabeta", '{"x": 1}{"x": 2}')]
    out, calls, _ = run(source, allow_all)
    assert [(c.call_id, c.name, c.raw_arguments, c.arguments, c.key) for c in calls] == [
        ("call_1call_2", "alphabeta", '{"x": 1}{"x": 2}', None, "c0.t0")
    ]
    out, calls, _ = run(source, deny_names("alphabeta"))
    assert accumulate(out).choices[0].message.tool_calls is None
    assert_no_trace(encoded(out), calls, DENY)


@pytest.mark.parametrize(
    "late",
    [
        tool_delta(0, ', "recursive": true}'),  # after another call started
        tool_delta(0, "", call_id="call_9", name="rm"),  # a second start at the position
        tool_delta(1, "{}", call_id="call_3", name="ls"),  # after the choice finished
        chunk_event([{"index": 0, "delta": {"function_call": {"arguments": "{}"}}}]),
    ],
)
def test_a_delta_touching_a_decided_call_violates(late: SseEvent) -> None:
    rewriter = ADAPTER.stream_rewriter()
    source = [
        tool_delta(0, '{"path": "/tmp"}', call_id="call_1", name="rm", role="assistant"),
        tool_delta(1, "{}", call_id="call_2", name="ls"),
        chunk_event([{"index": 0, "delta": {"function_call": {"name": "f", "arguments": "{}"}}}]),
        finish_event("tool_calls"),
    ]
    out: list[SseEvent] = []
    for event in source:
        out += take(rewriter, rewriter.feed(event), allow_all)[0]
    with pytest.raises(StreamViolation):
        take(rewriter, rewriter.feed(late), allow_all)
    assert b"recursive" not in encoded(out)


def test_a_call_after_done_violates() -> None:
    rewriter = ADAPTER.stream_rewriter()
    list(rewriter.feed(DONE))
    with pytest.raises(StreamViolation):
        list(rewriter.feed(tool_delta(0, "{}", call_id="c", name="late", role="assistant")))


def test_legacy_function_call_stream() -> None:
    source = [
        chunk_event(
            [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "content": None,
                        "function_call": {"name": "get_weather", "arguments": ""},
                    },
                    "finish_reason": None,
                }
            ]
        ),
        chunk_event([{"index": 0, "delta": {"function_call": {"arguments": '{"city":'}}}]),
        chunk_event([{"index": 0, "delta": {"function_call": {"arguments": '"Oslo"}'}}}]),
        finish_event("function_call"),
        DONE,
    ]
    out, [call], _ = run(source, deny_all)
    assert call.call_id == legacy_call_id(0)
    assert call.arguments == {"city": "Oslo"}
    final = accumulate(out)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.function_call is None
    assert b"Oslo" not in encoded(out)
    out, _, _ = run(source, allow_all)
    final = accumulate(out)
    assert final.choices[0].finish_reason == "function_call"
    fc = final.choices[0].message.function_call
    assert fc is not None
    assert (fc.name, fc.arguments) == ("get_weather", '{"city":"Oslo"}')


def test_resolve_goes_by_key_and_renders_what_was_yielded() -> None:
    source = events("openai_chat_text_then_tool.sse")
    rewriter = ADAPTER.stream_rewriter()
    items = [item for event in source[:6] for item in rewriter.feed(event)]
    assert not any(isinstance(i, ToolCall) for i in items)
    [call] = [i for i in rewriter.feed(source[6]) if isinstance(i, ToolCall)]
    stranger = ToolCall(call_id="call_nobody", name="x", raw_arguments="{}", arguments={})
    assert rewriter.resolve(stranger, ALLOW) == []
    # A copy with other values cannot change what the agent receives.
    forged = dataclasses.replace(call, name="other", raw_arguments='{"query": "x"}')
    [sent] = rewriter.resolve(forged, ALLOW)
    [part] = data(sent)["choices"][0]["delta"]["tool_calls"]
    assert part["function"] == {"name": call.name, "arguments": call.raw_arguments}
    assert rewriter.resolve(call, ALLOW) == [], "a call is released once"


def test_usage_and_model_tracking() -> None:
    rewriter = ADAPTER.stream_rewriter()
    assert rewriter.usage is None
    assert rewriter.model is None
    for event in events("openai_chat_parallel_tools.sse")[:3]:
        list(rewriter.feed(event))
    assert rewriter.model == "gpt-4o-2024-08-06"
    assert rewriter.usage is None


def test_sdk_accepts_the_recorded_streams_unchanged() -> None:
    final = accumulate(events("openai_chat_parallel_tools.sse"))
    assert [t.function.name for t in final.choices[0].message.tool_calls or []] == [
        "get_weather",
        "send_email",
    ]
    text = accumulate(events("openai_chat_text.sse"))
    assert text.choices[0].message.content == "The café opens at 8 am ☕"


def test_duplicate_argument_keys_count_as_malformed() -> None:
    # Tools disagree on which duplicate wins; the policy must not see another value.
    raw, parsed = parse_arguments('{"amount": 10, "amount": 10000}')
    assert raw == '{"amount": 10, "amount": 10000}'
    assert parsed is None


@pytest.mark.parametrize(
    "raw_text",
    [
        '{"path": "/tmp/ok", "PATH": "/etc/shadow"}',
        '{"opts": {"mode": "read", "Mode": "write"}}',
        '{"\u017fecret": 1, "secret": 2}',  # U+017F folds to "s", as Go folds it
    ],
)
def test_keys_equal_but_for_case_count_as_malformed(raw_text: str) -> None:
    """Go's encoding/json binds keys case-insensitively, the last winning: the tool could
    read /etc/shadow where the policy read /tmp/ok."""
    assert parse_arguments(raw_text)[1] is None
    assert parse_arguments({"k": 1, "K": 2})[1] is None  # an object sent as one, too


# --- issue 9: every call decided, by position, under the field the SDK dispatches on -------


@pytest.mark.parametrize(
    ("raw_text", "why"),
    [
        ('{"a": NaN}', "NaN"),
        ('{"a": -Infinity}', "infinity"),
        ('{"a": 1e400}', "overflows to infinity"),
        ('{"a": 18446744073709551616}', "past unsigned 64 bits"),
        ('{"a": -9223372036854775809}', "below signed 64 bits"),
        ('{"a": "\\ud800"}', "a lone surrogate"),
        # The policy engine reads C strings: it would see "ok" and "amount" here.
        ('{"path": "ok\\u0000/../../etc/shadow"}', "NUL in a value"),
        ('{"amount\\u0000": 5, "amount": 5000}', "NUL in a key"),
        ('{"a": ' + "[" * 64 + "]" * 64 + "}", "65 levels deep"),
        ('{"a": 1, "a": 2}', "duplicate keys"),
    ],
)
def test_arguments_a_policy_cannot_take_fail_closed(raw_text: str, why: str) -> None:
    raw_out, parsed = parse_arguments(raw_text)
    assert raw_out == raw_text, why
    assert parsed is None, why


def test_arguments_at_the_limits_are_kept() -> None:
    deep = '{"a": ' + "[" * 63 + "]" * 63 + "}"
    edges = '{"u": 18446744073709551615, "s": -9223372036854775808, "f": 1.5e300}'
    assert parse_arguments(deep)[1] is not None
    assert parse_arguments(edges)[1] == {"u": 2**64 - 1, "s": -(2**63), "f": 1.5e300}
    assert parse_arguments({"a": float("nan")})[1] is None  # an object sent as an object


def test_each_call_type_is_read_from_the_field_the_sdk_dispatches_on() -> None:
    entries = [
        # A custom call with a decoy function object: the SDK runs the custom tool.
        {
            "id": "c",
            "type": "custom",
            "custom": {"name": "wipe_disk", "input": '{"all": true}'},
            "function": {"name": "search_kb", "arguments": "{}"},
        },
        # A function call with a decoy custom object.
        {
            "id": "f",
            "type": "function",
            "function": {"name": "search_kb", "arguments": '{"q": 1}'},
            "custom": {"name": "wipe_disk", "input": "{}"},
        },
        # No type at all: the SDK builds a function tool call from it.
        {"id": "n", "function": {"name": "lookup", "arguments": "{}"}},
        # A type Warden does not know: decided as an unknown call.
        {"id": "m", "type": "mcp", "mcp": {"name": "drop_table", "arguments": "{}"}},
    ]
    calls = ADAPTER.tool_calls(message_body({"content": None, "tool_calls": entries}))
    assert [(c.key, c.kind, c.wire_type, c.name, c.raw_arguments) for c in calls] == [
        ("c0.t0", ActionKind.CUSTOM_TOOL_CALL, "custom", "wipe_disk", '{"all": true}'),
        ("c0.t1", ActionKind.TOOL_CALL, "function", "search_kb", '{"q": 1}'),
        ("c0.t2", ActionKind.TOOL_CALL, "function", "lookup", "{}"),
        ("c0.t3", ActionKind.UNKNOWN_CALL, "mcp", "drop_table", orjson.dumps(entries[3]).decode()),
    ]
    assert calls[3].arguments == entries[3]


def test_allowed_calls_are_rendered_from_the_decision_without_decoys() -> None:
    entries = [
        {
            "id": "c",
            "type": "custom",
            "custom": {"name": "patch", "input": '{"file": "a"}'},
            "function": {"name": "search_kb", "arguments": "{}"},
            "x_vendor": {"note": "dropped"},
        },
        {"id": "n", "function": {"name": "lookup", "arguments": {"q": 1}}},
        {"id": "m", "type": "mcp", "mcp": {"name": "tool", "arguments": "{}"}},
    ]
    original = message_body({"content": None, "tool_calls": entries})
    out = ADAPTER.rewrite(original, decisions_for(original, allow_all))
    assert out["choices"][0]["message"]["tool_calls"] == [
        {"id": "c", "type": "custom", "custom": {"name": "patch", "input": '{"file": "a"}'}},
        {"id": "n", "type": "function", "function": {"name": "lookup", "arguments": '{"q":1}'}},
        entries[2],  # an allowed unknown call is exactly the entry that was decided
    ]
    # Parsed as the client does (an unknown type is no model a strict parse accepts).
    completion = cast(ChatCompletion, construct_type(type_=ChatCompletion, value=out))
    assert [t.type for t in completion.choices[0].message.tool_calls or []] == [
        "custom",
        "function",
        "mcp",
    ]


def test_calls_sharing_an_id_or_having_none_are_decided_one_by_one() -> None:
    entries = [
        function_call("call_same", "search_kb", '{"q": "x"}'),
        function_call("call_same", "export_customers", "{}"),
        {"type": "function", "function": {"name": "search_kb", "arguments": "{}"}},
        {"type": "function", "function": {"name": "export_customers", "arguments": "{}"}},
    ]
    original = message_body({"content": None, "tool_calls": entries})
    calls = ADAPTER.tool_calls(original)
    assert [c.key for c in calls] == ["c0.t0", "c0.t1", "c0.t2", "c0.t3"]
    out = ADAPTER.rewrite(original, decisions_for(original, deny_names("export_customers")))
    kept = out["choices"][0]["message"]["tool_calls"]
    assert [t["function"]["name"] for t in kept] == ["search_kb", "search_kb"]
    assert "export_customers" not in orjson.dumps(kept).decode()


def test_same_index_in_two_choices_is_two_calls() -> None:
    def choice(index: int, name: str) -> dict[str, Any]:
        message = {"role": "assistant", "tool_calls": [function_call("call_1", name, "{}")]}
        return {"index": 0, "message": message, "finish_reason": "tool_calls"}

    original = {"choices": [choice(0, "search_kb"), choice(1, "export_customers")]}
    out = ADAPTER.rewrite(original, decisions_for(original, deny_names("export_customers")))
    assert "tool_calls" in out["choices"][0]["message"]
    assert "tool_calls" not in out["choices"][1]["message"]
    assert out["choices"][1]["finish_reason"] == "stop"


def custom_delta(index: int, **part: Any) -> SseEvent:
    return chunk_event(
        [{"index": 0, "delta": {"tool_calls": [{"index": index, **part}]}, "finish_reason": None}]
    )


def test_streamed_custom_call_with_a_decoy_is_decided_as_the_custom_call() -> None:
    source = [
        custom_delta(
            0,
            id="call_c",
            type="custom",
            custom={"name": "wipe_disk", "input": '{"all"'},
            function={"name": "search_kb", "arguments": "{}"},
        ),
        custom_delta(0, custom={"input": ": true}"}),
        finish_event("tool_calls"),
        DONE,
    ]
    out, [call], _ = run(source, deny_names("wipe_disk"))
    assert (call.kind, call.name, call.arguments) == (
        ActionKind.CUSTOM_TOOL_CALL,
        "wipe_disk",
        {"input": '{"all": true}'},
    )
    assert accumulate(out).choices[0].message.tool_calls is None
    assert b"search_kb" not in encoded(out), "the decoy is not replayed either"
    out, _, _ = run(source, allow_all)
    [sent] = [e for e in out if carries_tool_delta(e)]
    assert data(sent)["choices"][0]["delta"]["tool_calls"] == [
        {
            "index": 0,
            "id": "call_c",
            "type": "custom",
            "custom": {"name": "wipe_disk", "input": '{"all": true}'},
        }
    ]


def test_streamed_unknown_type_is_an_unknown_call() -> None:
    source = [
        custom_delta(0, id="call_m", type="mcp", mcp={"name": "drop_table", "arguments": "{}"}),
        finish_event("tool_calls"),
        DONE,
    ]
    out, [call], _ = run(source, lambda c: DENY if c.kind is ActionKind.UNKNOWN_CALL else ALLOW)
    assert (call.kind, call.wire_type, call.name) == (ActionKind.UNKNOWN_CALL, "mcp", "drop_table")
    assert b"drop_table" not in encoded(out).replace(blocked_message(call, DENY).encode(), b"")
    assert accumulate(out).choices[0].finish_reason == "stop"


def test_a_chunk_with_lenient_literals_is_parsed_and_its_call_held() -> None:
    # Python-based compatible servers write NaN; the SDK parses it and would run the call.
    text = tool_delta(0, '{"amount": 5000}', call_id="c", name="refund", role="assistant").data
    text = text[:-1] + ',"x_score":NaN,"x_big":1e400,"x_id":123456789012345678901234567890}'
    out, [call], _ = run([SseEvent(data=text), finish_event("tool_calls"), DONE], deny_all)
    assert call.arguments == {"amount": 5000}
    assert b"5000" not in encoded(out)
    assert accumulate(out).choices[0].message.tool_calls is None


def test_allowed_streamed_call_is_one_canonical_delta_of_the_decided_values() -> None:
    source = [
        tool_delta(0, '{"amount"', call_id="call_", name="ref", role="assistant"),
        tool_delta(0, ": 5}", call_id="x", name="und"),  # strings concatenate, as in the SDK
        finish_event("tool_calls"),
        DONE,
    ]
    out, [call], _ = run(source, allow_all)
    assert (call.call_id, call.name, call.raw_arguments) == ("call_x", "refund", '{"amount": 5}')
    sent = [data(e)["choices"][0]["delta"] for e in out if carries_tool_delta(e)]
    assert sent == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_x",
                    "type": "function",
                    "function": {"name": "refund", "arguments": '{"amount": 5}'},
                }
            ]
        }
    ]
    [tool] = accumulate(out).choices[0].message.tool_calls or []
    assert (tool.id, tool.function.name, tool.function.arguments) == (
        call.call_id,
        call.name,
        call.raw_arguments,
    )


def test_a_choice_whose_first_chunk_is_only_a_call_keeps_its_slot() -> None:
    # The SDK appends a choice it has not seen; if choice 1's first chunk were dropped,
    # choice 2 would take its slot and their calls would merge.
    source = [
        chunk_event([{"index": 0, "delta": {"role": "assistant", "content": "a"}}]),
        tool_delta(0, "{}", call_id="call_1", name="one", choice=1),
        chunk_event([{"index": 2, "delta": {"role": "assistant", "content": "b"}}]),
        tool_delta(0, "{}", call_id="call_2", name="two", choice=2),
        finish_event("tool_calls", choice=1),
        finish_event("tool_calls", choice=2),
        DONE,
    ]
    out, calls, _ = run(source, allow_all, choices=3)
    assert [c.key for c in calls] == ["c1.t0", "c2.t0"]
    final = accumulate(out)
    assert [[t.function.name for t in c.message.tool_calls or []] for c in final.choices] == [
        [],
        ["one"],
        ["two"],
    ]


def test_a_chunk_goes_on_as_warden_read_it_not_as_the_upstream_wrote_it() -> None:
    # A key given twice: Warden (like Python and JavaScript) keeps the last, a plain text
    # delta; Go's encoding/json merges both objects and would read the tool call too.
    call = '{"tool_calls":[{"index":0,"id":"call_x","type":"function",' + (
        '"function":{"name":"danger_wipe","arguments":"{}"}}]}'
    )
    chunk = (
        '{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
        '"choices":[{"index":0,"delta":' + call + ',"delta":{"content":"Sure."},'
        '"finish_reason":null}]}'
    )
    (out,) = ADAPTER.stream_rewriter().feed(SseEvent(data=chunk))
    assert isinstance(out, SseEvent)
    assert "danger_wipe" not in out.data
    assert data(out)["choices"][0]["delta"] == {"content": "Sure."}
