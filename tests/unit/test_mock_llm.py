"""The fake upstreams, driven directly with the official OpenAI and Anthropic SDKs.

If the real SDKs parse what the mock sends, tests that put Warden between the
two exercise the same wire formats agents see in production.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from warden.testing import (
    DEFAULT_TEXT,
    Call,
    Fault,
    MockLLM,
    MockTools,
    Reply,
    anthropic_tools,
    last_user_text,
    openai_tools,
    prompt_tokens,
    responses_tools,
)

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "Where is my order A-1001?"},
]
# The chat stream helper only accumulates strict tools.
STRICT_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_order",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
    },
}
TWO_CALLS = Reply(
    tool_calls=[
        Call("get_order", {"order_id": "A-1001"}),
        Call("get_order", {"order_id": "A-1002", "note": "second of two calls"}),
    ]
)


async def collect(stream: AsyncIterable[object], into: list[object]) -> None:
    async for item in stream:
        into.append(item)


@pytest.fixture
async def llm() -> AsyncIterator[MockLLM]:
    async with MockLLM() as mock:
        yield mock


@pytest.fixture
async def oai(llm: MockLLM) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{llm.url}/v1", api_key="test", max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(llm: MockLLM) -> AsyncIterator[AsyncAnthropic]:
    async with AsyncAnthropic(base_url=llm.url, api_key="test", max_retries=0) as client:
        yield client


# --- OpenAI chat completions ---------------------------------------------------------


async def test_chat_default_reply_echoes_model_and_counts_words(
    llm: MockLLM, oai: AsyncOpenAI
) -> None:
    result = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Warden-Agent": "support-bot"}
    )

    assert result.choices[0].message.content == DEFAULT_TEXT
    assert result.choices[0].finish_reason == "stop"
    assert result.model == "gpt-4o-mini"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 10  # 5 words of system prompt + 5 of user message
    assert result.usage.completion_tokens == 4
    assert result.usage.total_tokens == 14
    [seen] = llm.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == "Bearer test"
    assert seen.headers["X-Warden-Agent"] == "support-bot"
    assert seen.body["messages"] == MESSAGES
    assert json.loads(seen.raw) == seen.body


async def test_chat_parallel_tool_calls(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(TWO_CALLS)

    result = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 2
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert calls[0].id != calls[1].id
    fns = [c.function for c in calls if c.type == "function"]
    assert [f.name for f in fns] == ["get_order", "get_order"]
    assert json.loads(fns[1].arguments) == {"order_id": "A-1002", "note": "second of two calls"}
    assert result.usage is not None
    assert result.usage.completion_tokens == TWO_CALLS.output_tokens


async def test_chat_stream_helper_accumulates_tool_calls_and_usage(
    oai: AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(
        Reply(
            text="Let me look that up.",
            tool_calls=[
                Call("get_order", {"order_id": "A-1001"}, id="call_first"),
                Call("get_order", {"order_id": "A-1002"}),
            ],
        )
    )

    async with oai.chat.completions.stream(
        model="gpt-4o",
        messages=MESSAGES,
        tools=[STRICT_TOOL],
        stream_options={"include_usage": True},
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_completion()

    assert "content.delta" in kinds
    assert kinds.count("tool_calls.function.arguments.done") == 2
    message = final.choices[0].message
    assert message.content == "Let me look that up."
    assert message.tool_calls is not None
    assert [c.id for c in message.tool_calls][0] == "call_first"
    assert [c.function.parsed_arguments for c in message.tool_calls] == [
        {"order_id": "A-1001"},
        {"order_id": "A-1002"},
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None
    assert final.usage.prompt_tokens == 10


async def test_chat_stream_wire_shape(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(TWO_CALLS)

    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    heads = [t for d in deltas for t in d.tool_calls or [] if t.id is not None]
    # Each call is announced once: id, type and name with empty arguments.
    assert [(t.index, t.type, t.function and t.function.arguments) for t in heads] == [
        (0, "function", ""),
        (1, "function", ""),
    ]
    fragments = [
        t for d in deltas for t in d.tool_calls or [] if t.id is None and t.function is not None
    ]
    assert len([f for f in fragments if f.index == 0]) >= 2  # arguments come in pieces
    assert all(f.function is not None and f.function.name is None for f in fragments)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["tool_calls"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_raw_bytes_end_with_done(llm: MockLLM) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{llm.url}/v1/chat/completions", json=body) as response,
    ):
        raw = await response.read()
        content_type = response.headers["Content-Type"]

    assert content_type.startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert '"usage"' not in raw.decode()  # only with stream_options.include_usage


async def test_raw_string_arguments_pass_through_unchanged(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[Call("issue_refund", '{"order_id": "A-1001", "amount": ')]))

    result = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    calls = result.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].type == "function"
    assert calls[0].function.arguments == '{"order_id": "A-1001", "amount": '


# --- OpenAI Responses ----------------------------------------------------------------


async def test_responses_non_stream_with_function_calls(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(Reply(text="Checking both orders.", tool_calls=TWO_CALLS.tool_calls))

    response = await oai.responses.create(
        model="gpt-4.1", input="Where are my orders?", tools=responses_tools(["get_order"])
    )

    assert response.status == "completed"
    assert response.model == "gpt-4.1"
    assert response.output_text == "Checking both orders."
    calls = [item for item in response.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_order", "get_order"]
    assert all(c.call_id.startswith("call_") and c.id and c.id.startswith("fc_") for c in calls)
    assert json.loads(calls[0].arguments) == {"order_id": "A-1001"}
    assert response.usage is not None
    assert response.usage.input_tokens == 4
    assert response.usage.output_tokens == 3 + TWO_CALLS.output_tokens


async def test_responses_stream_events(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(TWO_CALLS)

    stream = await oai.responses.create(
        model="gpt-4.1", input=[{"role": "user", "content": "Orders please"}], stream=True
    )
    events = [event async for event in stream]

    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[1].type == "response.in_progress"
    assert events[-1].type == "response.completed"
    types = [e.type for e in events]
    assert types.count("response.output_item.added") == 2
    assert types.count("response.function_call_arguments.delta") >= 4
    assert types.count("response.function_call_arguments.done") == 2
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.item.type for e in done] == ["function_call", "function_call"]
    final = events[-1]
    assert final.type == "response.completed"
    assert [o.type for o in final.response.output] == ["function_call", "function_call"]
    assert final.response.usage is not None


async def test_responses_stream_helper_final_response(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(Reply(text="One moment.", tool_calls=[Call("get_order", {"order_id": "A-1003"})]))

    async with oai.responses.stream(model="gpt-4.1", input="Refund A-1003") as stream:
        text = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()

    assert "".join(text) == "One moment."
    assert final.output_text == "One moment."
    [call] = [o for o in final.output if o.type == "function_call"]
    assert json.loads(call.arguments) == {"order_id": "A-1003"}


# --- Anthropic Messages --------------------------------------------------------------


async def test_anthropic_non_stream_tool_use(claude: AsyncAnthropic, llm: MockLLM) -> None:
    llm.script(Reply(text="I'll refund that.", tool_calls=[Call("issue_refund", {"amount": 5})]))

    message = await claude.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=1024,
        system="You are a support agent.",
        messages=[{"role": "user", "content": "Refund five dollars please"}],
        tools=anthropic_tools(["issue_refund"]),
    )

    assert message.model == "claude-sonnet-4-6"
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    tool = message.content[1]
    assert tool.type == "tool_use"
    assert tool.id.startswith("toolu_")
    assert (tool.name, tool.input) == ("issue_refund", {"amount": 5})
    assert message.usage.input_tokens == 9
    [seen] = llm.requests
    # This SDK generation sends the key as a bearer token, not x-api-key.
    assert seen.headers["authorization"] == "Bearer test"
    assert "anthropic-version" in seen.headers


async def test_anthropic_stream_helper(claude: AsyncAnthropic, llm: MockLLM) -> None:
    llm.script(Reply(text="Looking now.", tool_calls=TWO_CALLS.tool_calls))

    async with claude.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=1024,
        messages=[{"role": "user", "content": "Where are A-1001 and A-1002?"}],
    ) as stream:
        text = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()

    assert "".join(text) == "Looking now."
    assert final.stop_reason == "tool_use"
    inputs = [b.input for b in final.content if b.type == "tool_use"]
    assert inputs == [{"order_id": "A-1001"}, {"order_id": "A-1002", "note": "second of two calls"}]
    assert final.usage.input_tokens == 5
    expected = Reply(text="Looking now.", tool_calls=TWO_CALLS.tool_calls)
    assert final.usage.output_tokens == expected.output_tokens


async def test_anthropic_raw_event_order(llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1001"})]))
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{llm.url}/v1/messages", json=body) as response,
    ):
        raw = (await response.read()).decode()

    names = [block.split("\n")[0].removeprefix("event: ") for block in raw.split("\n\n") if block]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    partials = [
        json.loads(block.split("\ndata: ")[1])["delta"]["partial_json"]
        for block in raw.split("\n\n")
        if block.startswith("event: content_block_delta")
    ]
    assert partials[0] == ""
    assert json.loads("".join(partials)) == {"order_id": "A-1001"}


# --- models and embeddings -----------------------------------------------------------


async def test_models_list_in_both_formats(oai: AsyncOpenAI, claude: AsyncAnthropic) -> None:
    openai_ids = [m.id async for m in oai.models.list()]
    anthropic_ids = [m.id async for m in claude.models.list()]

    assert "gpt-4o-mini" in openai_ids
    assert "claude-sonnet-4-6" in anthropic_ids


async def test_embeddings_are_deterministic_in_both_encodings(oai: AsyncOpenAI) -> None:
    decoded = await oai.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input="a b", encoding_format="float", dimensions=8
    )

    assert [len(d.embedding) for d in decoded.data] == [1536, 1536]
    assert decoded.data[0].embedding != decoded.data[1].embedding
    assert decoded.usage.prompt_tokens == 3
    assert len(floats.data[0].embedding) == 8
    assert sum(v * v for v in floats.data[0].embedding) == pytest.approx(1.0)


# --- scripting -----------------------------------------------------------------------


async def test_script_queue_then_responder_then_default(oai: AsyncOpenAI, llm: MockLLM) -> None:
    seen: list[str] = []

    def respond(protocol: str, body: dict[str, Any]) -> Reply | None:
        seen.append(protocol)
        text = last_user_text(body)
        return Reply(text=f"You said: {text}") if "echo" in text else None

    llm.script(Reply(text="first"), Reply(text="second"))
    llm.on_request(respond)
    assert llm.pending == 2

    async def ask(text: str) -> str | None:
        result = await oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": text}]
        )
        return result.choices[0].message.content

    assert [await ask("hi"), await ask("hi")] == ["first", "second"]
    assert await ask("echo this") == "You said: echo this"
    assert await ask("anything") == DEFAULT_TEXT
    assert seen == ["openai_chat", "openai_chat"]
    assert llm.pending == 0


async def test_responder_sees_each_protocol(
    oai: AsyncOpenAI, claude: AsyncAnthropic, llm: MockLLM
) -> None:
    seen: list[tuple[str, str]] = []
    llm.on_request(lambda protocol, body: seen.append((protocol, last_user_text(body))))

    await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}])
    await oai.responses.create(model="m", input="two")
    await claude.messages.create(
        model="m",
        max_tokens=16,
        messages=[{"role": "user", "content": [{"type": "text", "text": "three"}]}],
    )

    assert seen == [
        ("openai_chat", "one"),
        ("openai_responses", "two"),
        ("anthropic_messages", "three"),
    ]


def test_prompt_tokens_skip_structural_fields() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "two words"}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "three more words"},
        ]
    }
    assert prompt_tokens(body) == 5


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Fault("status", status=200)
    assert Reply(fault="hang").fault == Fault("hang")


async def test_start_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await MockLLM().start(host="0.0.0.0")


# --- faults --------------------------------------------------------------------------


async def test_status_fault_uses_provider_error_bodies(
    oai: AsyncOpenAI, claude: AsyncAnthropic, llm: MockLLM
) -> None:
    llm.script(
        Reply(fault=Fault("status", status=429, headers={"retry-after": "7"})),
        Reply(fault=Fault("status", status=529)),
    )

    with pytest.raises(openai.RateLimitError) as openai_error:
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(anthropic.APIStatusError) as anthropic_error:
        await claude.messages.create(model="c", max_tokens=16, messages=[])

    assert isinstance(openai_error.value, openai.APIStatusError)
    assert openai_error.value.code == "rate_limit_exceeded"
    assert openai_error.value.response.headers["retry-after"] == "7"
    assert anthropic_error.value.status_code == 529
    assert anthropic_error.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": anthropic_error.value.response.headers["request-id"],
    }


async def test_unknown_path_is_a_provider_404(oai: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        await oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")


async def test_malformed_json_fault(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(Reply(fault="malformed_json"), Reply(text="a b c d e f", fault="malformed_json"))

    with pytest.raises(ValueError, match=r"(?i)json|char"):
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(ValueError, match=r"(?i)json|char"):
        _ = [chunk async for chunk in stream]


async def test_truncate_fault_cuts_the_connection(
    oai: AsyncOpenAI, claude: AsyncAnthropic, llm: MockLLM
) -> None:
    llm.script(
        Reply(text="one two three four five six", fault="truncate"),
        Reply(text="one two three four", fault="truncate"),
        Reply(text="one two three", fault=Fault("truncate", after=3)),
    )

    stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    received: list[object] = []
    with pytest.raises(openai.APIConnectionError):
        await collect(stream, received)
    assert 0 < len(received) < 8  # role chunk, 6 words, finish chunk, [DONE]
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    # The Anthropic SDK lets the transport error escape its streams unwrapped.
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        async with claude.messages.stream(model="c", max_tokens=16, messages=[]) as cut:
            await cut.get_final_message()


async def test_hang_fault_times_out_the_client(llm: MockLLM) -> None:
    llm.script(Reply(fault="hang"))
    async with AsyncOpenAI(
        base_url=f"{llm.url}/v1", api_key="test", max_retries=0, timeout=0.3
    ) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def test_hang_after_some_events_stalls_the_stream(llm: MockLLM) -> None:
    llm.script(Reply(text="a b c d", fault=Fault("hang", after=2)))
    async with AsyncOpenAI(
        base_url=f"{llm.url}/v1", api_key="test", max_retries=0, timeout=0.3
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        received: list[object] = []
        with pytest.raises(openai.APITimeoutError):
            await collect(stream, received)

    assert len(received) == 2


async def test_hang_does_not_block_close() -> None:
    mock = MockLLM()
    await mock.start()
    arrived = asyncio.Event()

    def hang(protocol: str, body: dict[str, Any]) -> Reply:
        arrived.set()
        return Reply(fault="hang")

    mock.on_request(hang)
    async with AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="test", max_retries=0) as client:
        pending = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        )
        await arrived.wait()
        started = time.monotonic()
        await mock.close()
        assert time.monotonic() - started < 0.5
        with pytest.raises(openai.APIError):
            await pending


async def test_delay_and_slow_stream(oai: AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(
        Reply(fault=Fault("delay", seconds=0.2)),
        Reply(text="a b c d", fault=Fault("slow_stream", seconds=0.05)),
    )

    started = time.monotonic()
    await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started >= 0.2

    started = time.monotonic()
    stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    arrivals = [time.monotonic() - started async for _ in stream]
    # role chunk, 4 words, finish chunk: 5 gaps between 6 chunks, none before the first
    assert arrivals[0] < 0.05
    assert arrivals[-1] >= 5 * 0.05


# --- tools ---------------------------------------------------------------------------


async def test_mock_tools_over_http() -> None:
    async with MockTools() as tools, aiohttp.ClientSession() as session:
        async with session.post(f"{tools.url}/tools/get_order", json={"order_id": "A-1001"}) as r:
            assert r.status == 200
            order = await r.json()
        async with session.post(
            f"{tools.url}/tools/issue_refund", json={"order_id": "A-1001", "amount": 100}
        ) as r:
            assert r.status == 422
            refused = await r.json()
        async with session.post(
            f"{tools.url}/tools/issue_refund", json={"order_id": "A-1001", "amount": 20}
        ) as r:
            refund = await r.json()
        async with session.post(f"{tools.url}/tools/launch_rocket", json={}) as r:
            assert r.status == 404
            unknown = await r.json()

    assert order["total"] == 89.0
    assert refused["error"]["code"] == "amount_exceeds_refundable"
    assert refund["refund_id"] == "rf_0001"
    assert refund["refundable_remaining"] == 69.0
    assert unknown["error"]["code"] == "unknown_tool"
    assert [(c.name, c.status) for c in tools.calls] == [
        ("get_order", 200),
        ("issue_refund", 422),
        ("issue_refund", 200),
        ("launch_rocket", 404),
    ]


def test_mock_tools_in_process_and_schemas() -> None:
    tools = MockTools()
    assert tools.call("search_kb", {"query": "refund policy"})[1]["results"][0]["id"] == "kb-101"
    assert tools.call("update_email", {"customer_id": "C-1001", "email": "nope"})[0] == 400
    assert tools.call("close_account", {"customer_id": "C-1003"})[1]["status"] == "closed"
    assert tools.call("apply_credit", {"customer_id": "C-1003", "amount": 5})[0] == 409
    assert tools.call("draft_reply", {"customer_id": "C-1002", "body": "Hi"})[1]["to"] == (
        "grace@example.com"
    )
    assert {t["function"]["name"] for t in openai_tools()} == {
        "search_kb",
        "get_order",
        "get_customer",
        "issue_refund",
        "apply_credit",
        "close_account",
        "update_email",
        "draft_reply",
    }
