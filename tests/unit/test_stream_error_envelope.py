"""Streams that end in an error the agent's SDK raises on, through the stream driver (no sockets).

The openai Python SDK raises ``APIError`` on any event whose data has a
truthy top-level ``error`` (``openai._streaming.Stream``); the TypeScript SDK
also on any event named ``error`` and on an ``error`` JavaScript reads as true
(``{}``, ``[]``; see ``TS_SDK``); the anthropic SDK on an ``event: error``. None
reads anything after. A call in that event, or held when it came, never
reaches the agent: it must never be decided (decided calls hold budget and
wait for a result). What the rewriter sends is read back with the real Python
SDKs over an in-memory transport.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from tests.unit.streams import ALLOW
from warden.errors import StreamViolation, UpstreamError
from warden.model import Decision, ToolCall
from warden.protocols.anthropic import AnthropicStreamRewriter
from warden.protocols.base import StreamRewriter
from warden.protocols.driver import StreamDriver
from warden.protocols.openai_chat import OpenAIChatStreamRewriter
from warden.protocols.openai_responses import OpenAIResponsesStreamRewriter
from warden.protocols.sse import SseEvent

PROVIDER_ERROR = {"message": "upstream says: ignore me", "type": "server_error"}


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def sse(*events: Any) -> bytes:
    """Unnamed events as an upstream writes them: JSON data, or text as it is."""
    return b"".join(SseEvent(e if isinstance(e, str) else compact(e)).encode() for e in events)


def named(*events: tuple[str, Any]) -> bytes:
    return b"".join(SseEvent(compact(data), event=name).encode() for name, data in events)


@dataclass
class Driven:
    """What the agent was sent, what was decided, and how the stream ended."""

    out: bytes = b""
    decided: list[str] = field(default_factory=list)
    ended: Exception | None = None


async def drive(rewriter: StreamRewriter, payload: bytes) -> Driven:
    """``payload`` through the driver in one piece, every call allowed."""
    run = Driven()

    async def decide(calls: Sequence[ToolCall]) -> dict[str, Decision]:
        run.decided += [c.name for c in calls]
        return {c.key: ALLOW for c in calls}

    async def write(data: bytes) -> None:
        run.out += data

    driver = StreamDriver(rewriter, decide, write, keepalive_s=None)
    try:
        await driver.feed(payload)
        await driver.finish()
    except Exception as exc:  # noqa: BLE001 - the test asserts which one
        run.ended = exc
    return run


def transport(payload: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=payload, headers={"content-type": "text/event-stream"})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def openai_client(payload: bytes) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://warden.test/v1",
        http_client=transport(payload),
        max_retries=0,
    )


@dataclass
class Read:
    """What the agent's SDK gave its caller before it stopped, and why it stopped."""

    calls: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    error: str | None = None


def chat_read(payload: bytes) -> Read:
    read = Read()
    stream = openai_client(payload).chat.completions.create(model="m", messages=[], stream=True)
    try:
        for chunk in stream:
            for choice in chunk.choices:
                read.calls += [
                    (t.function and t.function.name) or "" for t in choice.delta.tool_calls or []
                ]
    except openai.APIError as exc:
        read.error = exc.message
    return read


def responses_read(payload: bytes) -> Read:
    read = Read()
    stream = openai_client(payload).responses.create(model="m", input="x", stream=True)
    try:
        for event in stream:
            read.types.append(event.type)
            item = getattr(event, "item", None)
            if event.type == "response.output_item.done" and item is not None:
                read.calls += [item.name] if item.type == "function_call" else []
    except openai.APIError as exc:
        read.error = exc.message
    return read


def anthropic_read(payload: bytes) -> Read:
    read = Read()
    client = anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://warden.test",
        http_client=transport(payload),
        max_retries=0,
    )
    stream = client.messages.create(model="m", max_tokens=10, messages=[], stream=True)
    try:
        for event in stream:
            read.types.append(event.type)
            if event.type == "content_block_start" and event.content_block.type == "tool_use":
                read.calls.append(event.content_block.name)
    except anthropic.APIStatusError as exc:
        read.error = str(exc)
    return read


# --- chat completions ---------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> Any:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
        **extra,
    }


def part(name: str, arguments: str = '{"q":1}', *, index: int = 0) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {"index": index, "id": f"call_{name}", "type": "function", "function": function}


async def test_a_chat_call_in_a_chunk_with_an_error_is_never_decided() -> None:
    upstream = sse(
        chunk({"role": "assistant", "tool_calls": [part("lookup")]}, error=PROVIDER_ERROR),
        chunk(finish="tool_calls"),
        "[DONE]",
    )
    assert chat_read(upstream).error == PROVIDER_ERROR["message"]  # what the agent would get

    run = await drive(OpenAIChatStreamRewriter(), upstream)

    assert run.decided == []  # was decided, allowed and recorded as delivered
    assert type(run.ended) is UpstreamError
    assert b"lookup" not in run.out
    read = chat_read(run.out)
    assert read.error == PROVIDER_ERROR["message"]
    assert read.calls == []


async def test_a_chat_call_held_when_the_error_comes_is_dropped_undecided() -> None:
    upstream = sse(
        chunk({"role": "assistant", "tool_calls": [part("lookup", '{"q":')]}),
        {"error": PROVIDER_ERROR},
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "tool_calls"),
        "[DONE]",
    )
    run = await drive(OpenAIChatStreamRewriter(), upstream)

    assert run.decided == []  # was decided at the finish chunk the agent never read
    assert type(run.ended) is UpstreamError
    assert chat_read(run.out) == Read(error=PROVIDER_ERROR["message"])


async def test_chat_calls_decided_before_the_error_reach_the_agent_before_it() -> None:
    upstream = sse(
        chunk({"role": "assistant", "tool_calls": [part("lookup")]}, "tool_calls"),
        {"error": PROVIDER_ERROR},
    )
    run = await drive(OpenAIChatStreamRewriter(), upstream)

    assert run.decided == ["lookup"]
    assert type(run.ended) is UpstreamError
    assert chat_read(run.out) == Read(calls=["lookup"], error=PROVIDER_ERROR["message"])


# The TypeScript SDK's rule, one event at a time. CI has no node, so it is written
# down here: npm ``openai`` 7.59, ``core/streaming.js``, ``Stream.fromSSEResponse``
# (legacy mode, after its ``[DONE]`` test) throws on ``sse.event === 'error'``, then on
# ``data && data.error`` (JavaScript truthiness), and nothing after is read. Each row
# was checked by running that function on the event. (event name, the ``error``
# member's JSON text or None when absent, whether the TypeScript SDK throws.) What
# the Python SDK does is not written down: each test asks it.
TS_SDK: list[tuple[str | None, str | None, bool]] = [
    (None, None, False),
    (None, "null", False),
    (None, "false", False),
    (None, "0", False),
    (None, "-0", False),
    (None, "0.0", False),
    (None, "0e9", False),
    (None, '""', False),
    (None, "{}", True),  # Python reads {} and [] as false: it reads on
    (None, "[]", True),
    (None, '"0"', True),
    (None, '" "', True),
    (None, '"x"', True),
    (None, "1", True),
    (None, "true", True),
    (None, "[0]", True),
    (None, '{"code":null}', True),
    (None, '{"message":"x"}', True),
    (None, "NaN", True),  # JSON.parse refuses it: a SyntaxError, no event read
    ("error", None, True),  # the name alone, whatever the data
    ("error", "null", True),
    ("error", "{}", True),
    ("Error", None, False),  # names are compared exactly
    ("error ", None, False),
    ("errors", None, False),
    ("message", "{}", True),
]


def with_error(data: dict[str, Any], error: str | None) -> str:
    """``data`` as JSON text, with an ``error`` member written as given (``-0``, ``NaN``)."""
    text = compact(data)
    return text if error is None else f'{text[:-1]},"error":{error}}}'


def one(name: str | None, text: str) -> bytes:
    return SseEvent(text, event=name).encode()


@pytest.mark.parametrize(("name", "error", "ts_raises"), TS_SDK, ids=repr)
async def test_a_chat_chunk_ends_the_stream_where_either_sdk_stops(
    name: str | None, error: str | None, ts_raises: bool
) -> None:
    finished = chunk({"role": "assistant", "tool_calls": [part("lookup")]}, "tool_calls")
    upstream = one(name, with_error(finished, error)) + sse("[DONE]")
    python_raises = chat_read(upstream).error is not None
    ends = python_raises or ts_raises  # both SDKs agree on what Warden decides

    rewriter = OpenAIChatStreamRewriter()
    run = await drive(rewriter, upstream)

    assert rewriter.failed is ends
    assert type(run.ended) is (UpstreamError if ends else type(None))
    assert run.decided == ([] if ends else ["lookup"])
    assert chat_read(run.out).calls == run.decided  # no SDK reads a call Warden did not decide


@pytest.mark.parametrize(("name", "error", "ts_raises"), TS_SDK, ids=repr)
async def test_a_responses_event_ends_the_stream_where_either_sdk_stops(
    name: str | None, error: str | None, ts_raises: bool
) -> None:
    upstream = one(
        name, with_error(item_event("response.output_item.done", 1, FUNCTION_CALL), error)
    )
    python_raises = responses_read(upstream).error is not None
    ends = python_raises or ts_raises

    rewriter = OpenAIResponsesStreamRewriter()
    run = await drive(rewriter, upstream)

    assert rewriter.failed is ends
    # Else cut short (no terminal event): another error, after the call was decided.
    assert (type(run.ended) is UpstreamError) is ends
    assert run.decided == ([] if ends else ["lookup"])
    read = responses_read(run.out)
    assert read.calls == run.decided
    if ends and not python_raises:
        # The Python SDK reads on past it: it gets an error event, never the item.
        assert read.types == ["error"]


async def test_a_chat_chunk_named_error_goes_on_with_its_choices_emptied() -> None:
    finished = chunk({"role": "assistant", "tool_calls": [part("lookup")]}, "tool_calls")
    upstream = named(("error", finished)) + sse(chunk(finish="stop"), "[DONE]")
    assert chat_read(upstream).calls == ["lookup"]  # the Python SDK reads it as a chunk

    run = await drive(OpenAIChatStreamRewriter(), upstream)

    assert run.decided == []  # was allowed: the TypeScript agent never got it
    assert type(run.ended) is UpstreamError
    assert run.out == named(("error", {**finished, "choices": []}))
    assert chat_read(run.out) == Read()


@pytest.mark.parametrize(
    "late",
    [sse({"error": PROVIDER_ERROR}), named(("error", {"error": PROVIDER_ERROR}))],
    ids=["error member", "named error"],
)
async def test_a_chat_error_after_done_ends_nothing(late: bytes) -> None:
    upstream = sse(chunk({"role": "assistant", "tool_calls": [part("lookup")]}, "tool_calls"))
    upstream += sse("[DONE]") + late
    assert chat_read(upstream) == Read(calls=["lookup"])  # the SDK stopped at [DONE]

    rewriter = OpenAIChatStreamRewriter()
    run = await drive(rewriter, upstream)

    assert not rewriter.failed
    assert run.ended is None  # was UpstreamError: the answer recorded as upstream_error
    assert rewriter.complete
    assert run.decided == ["lookup"]
    assert chat_read(run.out) == Read(calls=["lookup"])


def test_a_chat_call_delta_after_the_error_is_a_violation() -> None:
    rewriter = OpenAIChatStreamRewriter()
    assert list(rewriter.feed(SseEvent(json.dumps({"error": PROVIDER_ERROR})))) != []
    later = SseEvent(json.dumps(chunk({"tool_calls": [part("lookup")]})))
    with pytest.raises(StreamViolation):
        list(rewriter.feed(later))
    assert list(rewriter.finish()) == []


async def test_the_driver_writes_nothing_the_upstream_sent_after_the_error() -> None:
    upstream = sse(chunk({"content": "one"}), {"error": PROVIDER_ERROR}, chunk({"content": "two"}))
    run = await drive(OpenAIChatStreamRewriter(), upstream)
    assert b"one" in run.out
    assert b"two" not in run.out
    assert run.out.endswith(sse({"error": PROVIDER_ERROR}))
    assert type(run.ended) is UpstreamError


# --- responses ----------------------------------------------------------------------

FUNCTION_CALL = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "lookup",
    "arguments": '{"q":1}',
    "status": "completed",
}


def item_event(kind: str, seq: int, item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": kind, "sequence_number": seq, "output_index": 0, "item": item, **extra}


async def test_a_responses_call_in_an_event_with_an_error_is_never_decided() -> None:
    upstream = sse(
        item_event("response.output_item.done", 1, FUNCTION_CALL, error=PROVIDER_ERROR),
        item_event("response.output_item.done", 2, FUNCTION_CALL),
    )
    assert responses_read(upstream).error == PROVIDER_ERROR["message"]

    run = await drive(OpenAIResponsesStreamRewriter(), upstream)

    assert run.decided == []  # was decided, allowed and recorded as delivered
    assert type(run.ended) is UpstreamError
    assert b"lookup" not in run.out
    assert run.out == sse(
        {"type": "response.output_item.done", "sequence_number": 1, "error": PROVIDER_ERROR}
    )
    assert responses_read(run.out) == Read(error=PROVIDER_ERROR["message"])


async def test_a_responses_call_held_when_the_error_comes_is_dropped_undecided() -> None:
    started = {**FUNCTION_CALL, "arguments": "", "status": "in_progress"}
    upstream = sse(
        item_event("response.output_item.added", 1, started),
        {"type": "error", "sequence_number": 2, "error": PROVIDER_ERROR},
        item_event("response.output_item.done", 3, FUNCTION_CALL),
    )
    rewriter = OpenAIResponsesStreamRewriter()
    run = await drive(rewriter, upstream)

    assert run.decided == []
    assert type(run.ended) is UpstreamError
    assert responses_read(run.out) == Read(error=PROVIDER_ERROR["message"])
    assert list(rewriter.finish()) == []  # not decided at the end either


async def test_openais_named_responses_error_event_reaches_the_agent_and_ends_the_stream() -> None:
    error = {"type": "error", "sequence_number": 1, "code": "x", "message": "m", "param": None}
    done = item_event("response.output_item.done", 2, FUNCTION_CALL)
    upstream = named(("error", error), ("response.output_item.done", done))
    # The Python SDK hands it to its caller and reads on; the TypeScript SDK throws on it.
    assert responses_read(upstream) == Read(
        calls=["lookup"], types=["error", "response.output_item.done"]
    )

    rewriter = OpenAIResponsesStreamRewriter()
    run = await drive(rewriter, upstream)

    assert rewriter.failed
    assert run.decided == []  # was allowed: the TypeScript agent never got it
    assert type(run.ended) is UpstreamError
    assert run.out == named(("error", error))  # the error event itself, as it came
    assert responses_read(run.out) == Read(types=["error"])
    assert list(rewriter.finish()) == []


async def test_a_responses_error_event_the_sdks_yield_passes_and_the_stream_goes_on() -> None:
    # Unnamed and without an ``error`` member: neither SDK raises on it.
    error = {"type": "error", "sequence_number": 1, "code": "x", "message": "m", "param": None}
    upstream = sse(error, item_event("response.output_item.done", 2, FUNCTION_CALL))
    read = responses_read(upstream)
    assert read.error is None  # the SDK gives it to its caller like any event
    assert read.types == ["error", "response.output_item.done"]

    rewriter = OpenAIResponsesStreamRewriter()
    run = await drive(rewriter, upstream)

    assert not rewriter.failed
    assert run.decided == ["lookup"]
    read = responses_read(run.out)
    assert read.calls == ["lookup"]
    assert read.types[0] == "error"
    assert read.error is None


# --- anthropic ----------------------------------------------------------------------

MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}
TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def anthropic_start() -> list[tuple[str, Any]]:
    return [
        ("message_start", {"type": "message_start", "message": MESSAGE}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": TOOL_USE},
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"q":1}'},
            },
        ),
    ]


async def test_an_anthropic_call_held_when_an_error_event_comes_is_dropped_undecided() -> None:
    upstream = named(
        *anthropic_start(),
        ("error", OVERLOADED),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_stop", {"type": "message_stop"}),
    )
    assert anthropic_read(upstream).error is not None

    rewriter = AnthropicStreamRewriter()
    run = await drive(rewriter, upstream)

    assert run.decided == []  # was decided at its stop, after the agent's SDK had raised
    assert type(run.ended) is UpstreamError
    assert b"lookup" not in run.out
    read = anthropic_read(run.out)
    assert read.calls == []
    assert read.types == ["message_start"]
    assert read.error is not None
    assert "Overloaded" in read.error
    assert list(rewriter.finish()) == []


def test_anthropic_events_after_an_error_are_a_violation_but_pings_pass() -> None:
    rewriter = AnthropicStreamRewriter()
    for name, data in (*anthropic_start(), ("error", OVERLOADED)):
        sent = list(rewriter.feed(SseEvent(compact(data), event=name)))
        assert all(isinstance(item, SseEvent) for item in sent)
    assert rewriter.failed
    ping = SseEvent('{"type":"ping"}', event="ping")
    assert list(rewriter.feed(ping)) == [ping]
    stop = SseEvent('{"type": "content_block_stop", "index": 0}', event="content_block_stop")
    with pytest.raises(StreamViolation):
        list(rewriter.feed(stop))
    assert list(rewriter.finish()) == []
