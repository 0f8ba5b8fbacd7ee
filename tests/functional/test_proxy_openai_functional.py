"""The official openai SDK through Warden to a real mock upstream, on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.sdk_calls import function_calls
from warden.identity import hash_key
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply

REFUND_SMALL = Call("issue_refund", {"order_id": "A-1001", "amount": 25, "currency": "USD"})
EXPORT = Call("export_customers", {"format": "csv"})
KB = Call("search_kb", {"query": "reset password"})
MESSAGES: Any = [{"role": "user", "content": "help"}]


def client(warden: Warden, **kw: Any) -> openai.AsyncOpenAI:
    """An SDK client pointed at Warden; use it as ``async with``."""
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test-secret-123", max_retries=0, **kw
    )


@pytest.fixture
async def oai(warden: Warden) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(warden) as c:
        yield c


async def test_text_passes_unchanged_and_credentials_go_upstream_only(
    tmp_path: Path, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    llm.script(Reply(text="Your order ships tomorrow."))
    # Another agent than the sidecar's own proves its id with a proxy key.
    identity = {"agents": {"refunds-bot": {"key_sha256": [hash_key("wk-refunds-key-123")]}}}
    agent = {"X-Warden-Agent": "refunds-bot", "X-Warden-Agent-Key": "wk-refunds-key-123"}
    async with (
        Warden(make_config(tmp_path, llm.url, identity=identity)) as warden,
        client(warden, default_headers=agent) as c,
    ):
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Your order ships tomorrow."
    assert completion.choices[0].finish_reason == "stop"
    assert raw.headers["x-warden-decision-id"].startswith("dec_")
    sent = llm.requests[-1]
    assert sent.headers["Authorization"] == "Bearer sk-test-secret-123"
    assert "X-Warden-Agent" not in sent.headers
    assert "X-Warden-Agent-Key" not in sent.headers
    recs = records()
    assert any(r.get("agent", {}).get("id") == "refunds-bot" for r in recs)
    assert "sk-test-secret-123" not in json.dumps(recs)
    assert "wk-refunds-key-123" not in json.dumps(recs)


async def test_parallel_tool_calls_denied_one_is_removed(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(text="Let me help.", tool_calls=[KB, EXPORT]))
    raw = await oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    message = raw.parse().choices[0].message
    assert [c.function.name for c in function_calls(message)] == ["search_kb"]
    assert message.content is not None
    assert "blocked the tool call `export_customers`" in message.content
    assert "bulk" in message.content  # the policy's own reason
    blocked = raw.headers["x-warden-blocked"]
    assert blocked.startswith("dec_")
    assert blocked in message.content
    assert raw.parse().choices[0].finish_reason == "tool_calls"
    # The arguments of the denied call reached the agent in no form.
    assert '"format"' not in raw.http_response.text


async def test_all_calls_denied_finishes_as_stop(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[EXPORT, Call("delete_everything", {})]))
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert "delete_everything" in (choice.message.content or "")
    assert "not in the customer-support tool catalogue" in (choice.message.content or "")


async def test_held_for_approval_is_not_delivered(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1004", "amount": 400})]))
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    choice = completion.choices[0]
    assert not choice.message.tool_calls
    assert "for human approval" in (choice.message.content or "")


async def test_malformed_arguments_are_denied(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[Call("search_kb", '{"query": "x"')]))
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert not completion.choices[0].message.tool_calls
    assert "not a JSON object" in (completion.choices[0].message.content or "")


async def test_stream_text_flows_and_denied_calls_are_replaced(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(text="Checking your order now.", tool_calls=[REFUND_SMALL, EXPORT]))
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text = ""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    entry["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    assert text.startswith("Checking your order now.")
    assert "blocked the tool call `export_customers`" in text
    assert list(calls) == [0]
    assert calls[0]["name"] == "issue_refund"
    assert json.loads(calls[0]["arguments"])["amount"] == 25
    assert finish == "tool_calls"
    assert usage is not None
    assert usage.completion_tokens > 0


async def test_stream_all_denied_finish_reason_is_stop(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[EXPORT]))
    async with oai.chat.completions.stream(model="gpt-4o-mini", messages=MESSAGES) as s:
        final = await s.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls
    assert "export_customers" in (final.choices[0].message.content or "")


async def test_text_reaches_the_agent_before_the_stream_ends(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    # The upstream sends its first events and then stalls: if Warden held text
    # back until the end, the agent would see nothing and this would time out.
    llm.script(Reply(text="one two three four five six", fault=Fault("hang", after=3)))
    stream = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    received = ""
    async with asyncio.timeout(4):
        async for chunk in stream:
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if received:
                break
    assert received
    await stream.close()


async def test_responses_api_streaming_and_not(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    c = oai
    llm.script(Reply(text="Here you go.", tool_calls=[KB, EXPORT]))
    response = await c.responses.create(model="gpt-4o-mini", input="help")
    kinds = [item.type for item in response.output]
    assert kinds.count("function_call") == 1
    assert "blocked the tool call `export_customers`" in response.output_text

    llm.script(Reply(text="Here you go.", tool_calls=[KB, EXPORT]))
    async with c.responses.stream(model="gpt-4o-mini", input="help") as stream:
        final = await stream.get_final_response()
    names = [item.name for item in final.output if item.type == "function_call"]
    assert names == ["search_kb"]
    assert "blocked the tool call `export_customers`" in final.output_text


async def test_tool_results_are_recorded_as_outcomes(
    warden: Warden,
    oai: openai.AsyncOpenAI,
    llm: MockLLM,
    records: Callable[[], list[dict[str, Any]]],
) -> None:
    c = oai
    llm.script(Reply(tool_calls=[KB]), Reply(text="Reset it from the login page."))
    first = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    call = (first.choices[0].message.tool_calls or [])[0]
    history: Any = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "KB-17: use the reset link"},
    ]
    await c.chat.completions.create(model="gpt-4o-mini", messages=history)
    await warden.stop()
    recs = records()
    decision = next(r for r in recs if r.get("action", {}).get("tool") == "search_kb")
    outcomes = [
        r
        for r in recs
        if r.get("kind") == "outcome" and r.get("decision_id") == decision["decision"]["id"]
    ]
    assert len(outcomes) == 1
    assert "KB-17" in json.dumps(outcomes[0])


async def test_observe_mode_lets_denied_calls_through(tmp_path: Any, llm: MockLLM) -> None:
    async with Warden(make_config(tmp_path, llm.url, mode="observe")) as w:
        llm.script(Reply(tool_calls=[EXPORT]))
        async with client(w) as c:
            completion = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert [c.function.name for c in function_calls(completion.choices[0].message)] == [
            "export_customers"
        ]
    recs = audit_records(tmp_path / "audit")
    export = next(r for r in recs if r.get("action", {}).get("tool") == "export_customers")
    assert export["decision"]["effect"] == "deny"
    assert export["decision"]["mode"] == "observe"


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault("status", status=500), 500, None),
        (Fault("malformed_json"), 502, "upstream_bad_response"),
        (Fault("truncate"), 502, "upstream_bad_response"),
        (Fault("hang"), 504, "upstream_timeout"),
    ],
)
async def test_upstream_faults_become_provider_errors(
    tmp_path: Any, llm: MockLLM, fault: Fault, status: int, code: str | None
) -> None:
    config = make_config(
        tmp_path,
        llm.url,
        upstreams={"openai": {"protocol": "openai", "base_url": llm.url, "timeout_s": 1}},
    )
    async with Warden(config) as w, client(w) as c:
        llm.script(Reply(text="hello", fault=fault))
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert info.value.status_code == status
        if code is not None:
            assert info.value.code == code
        # The proxy still serves after the fault.
        llm.script(Reply(text="fine"))
        ok = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert ok.choices[0].message.content == "fine"


async def test_truncated_stream_ends_with_an_error_event(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(text="one two three four five six seven", fault=Fault("truncate", after=3)))
    stream = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="ended before it was complete|truncated"):
        async for _ in stream:
            pass


_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: "


async def _malformed_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a stream with a bad chunk size after one event, and a JSON answer shorter
    than its Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    streamed = b'"stream":true' in (await reader.readexactly(length)).replace(b" ", b"")
    if streamed:
        event = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
        event += b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}]}\n\n'
        writer.write(_CHUNKED + b"text/event-stream\r\n\r\n%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(0.2)  # the event is read and passed on; then a bad chunk size
        writer.write(b"zz\r\ngarbage\r\n")
    else:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 90\r\n\r\n{"
        )
    await writer.drain()
    writer.close()


async def test_a_malformed_upstream_body_is_named_by_its_upstream(tmp_path: Any) -> None:
    # Named by the upstream's name, not its host (which the agent need not learn), and
    # a malformed chunk is the upstream's bad answer, not Warden's failure.
    server = await asyncio.start_server(_malformed_upstream, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with Warden(make_config(tmp_path, url)) as w, client(w) as c:
            with pytest.raises(openai.APIStatusError) as whole:
                await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            stream = await c.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            with pytest.raises(openai.APIError) as streamed:
                async for _ in stream:
                    pass
    finally:
        server.close()
        await server.wait_closed()
    assert whole.value.code == "upstream_bad_response"
    assert "upstream 'openai'" in whole.value.message
    assert "127.0.0.1" not in whole.value.message
    assert streamed.value.code == "upstream_bad_response"
    assert "upstream 'openai'" in streamed.value.message


async def test_unreachable_upstream_is_502(tmp_path: Any) -> None:
    # A port held but not listening refuses connections, and (unlike a port
    # just closed) no other test can start listening on it meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        async with Warden(make_config(tmp_path, url)) as w, client(w) as c:
            with pytest.raises(openai.APIStatusError) as info:
                await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unavailable"


async def test_passthrough_routes_work(
    warden: Warden, oai: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    models = await oai.models.list()
    assert any(m.id == "gpt-4o-mini" for m in models.data)
    emb = await oai.embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(emb.data[0].embedding) > 0


async def test_policy_redaction_keeps_personal_data_out_of_the_record(
    warden: Warden,
    oai: openai.AsyncOpenAI,
    llm: MockLLM,
    records: Callable[[], list[dict[str, Any]]],
) -> None:
    # The shipped policy asks to redact action.arguments.email for update_email.
    new_email = "jane.doe.private@example.org"
    llm.script(Reply(tool_calls=[Call("update_email", {"customer_id": "C-1", "email": new_email})]))
    await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await warden.stop()
    recs = records()
    decision = next(r for r in recs if r.get("action", {}).get("tool") == "update_email")
    assert decision["decision"]["effect"] == "require_approval"
    assert decision["action"]["arguments"]["customer_id"] == "C-1"
    assert new_email not in json.dumps(recs)


async def test_streamed_usage_is_counted_even_when_the_agent_did_not_ask(
    warden: Warden,
    oai: openai.AsyncOpenAI,
    llm: MockLLM,
    records: Callable[[], list[dict[str, Any]]],
) -> None:
    llm.script(Reply(text="three short words"))
    stream = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    # The agent's stream is what it asked for: no usage-only chunk at the end.
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    # Upstream was asked for usage, and Warden recorded it.
    assert llm.requests[-1].body["stream_options"] == {"include_usage": True}
    await warden.stop()
    outcome = next(r for r in records() if r.get("kind") == "outcome")
    assert outcome["outcome"]["tokens"]["output"] > 0
