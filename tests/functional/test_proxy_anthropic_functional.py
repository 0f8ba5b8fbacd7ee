"""The official anthropic SDK through Warden to a real mock upstream, on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest

from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply

MODEL = "claude-sonnet-4-6"
MESSAGES: Any = [{"role": "user", "content": "help"}]
KB = Call("search_kb", {"query": "reset password"})
EXPORT = Call("export_customers", {"format": "csv"})
CLOSE = Call("close_account", {"customer_id": "C-1001"})


@pytest.fixture
async def claude(warden: Warden) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-secret-9", max_retries=0
    ) as client:
        yield client


async def test_text_and_allowed_tool_use(claude: anthropic.AsyncAnthropic, llm: MockLLM) -> None:
    llm.script(Reply(text="Looking it up.", tool_calls=[KB]))
    message = await claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].type == "text"
    assert message.content[0].text == "Looking it up."
    # The agent's key went upstream (this SDK sends it as a bearer token or x-api-key).
    sent = llm.requests[-1].headers
    assert "sk-ant-secret-9" in (sent.get("x-api-key", "") + sent.get("Authorization", ""))


async def test_denied_tool_use_becomes_text_and_end_turn(
    claude: anthropic.AsyncAnthropic, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[EXPORT]))
    raw = await claude.messages.with_raw_response.create(
        model=MODEL, max_tokens=100, messages=MESSAGES
    )
    message = await raw.parse()
    assert message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text"
    assert "blocked the tool call `export_customers`" in message.content[0].text
    assert raw.headers["x-warden-blocked"] in message.content[0].text


async def test_stream_parallel_mixed(claude: anthropic.AsyncAnthropic, llm: MockLLM) -> None:
    llm.script(Reply(text="On it.", tool_calls=[CLOSE, KB]))
    async with claude.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    tool_uses = [b for b in final.content if b.type == "tool_use"]
    texts = " ".join(b.text for b in final.content if b.type == "text")
    assert [t.name for t in tool_uses] == ["search_kb"]
    assert tool_uses[0].input == {"query": "reset password"}
    assert "held the tool call `close_account` for human approval" in texts
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens > 0


async def test_stream_all_denied_is_end_turn(
    claude: anthropic.AsyncAnthropic, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[EXPORT]))
    async with claude.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert all(b.type == "text" for b in final.content)


async def test_upstream_error_keeps_anthropic_shape(
    claude: anthropic.AsyncAnthropic, llm: MockLLM
) -> None:
    llm.script(Reply(fault=Fault("malformed_json")))
    with pytest.raises(anthropic.APIStatusError) as info:
        await claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert info.value.status_code == 502
    body: Any = info.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error"


async def test_mid_stream_truncation_raises_in_the_sdk(
    claude: anthropic.AsyncAnthropic, llm: MockLLM
) -> None:
    llm.script(Reply(text="one two three four five", fault=Fault("truncate", after=3)))
    with pytest.raises(anthropic.APIError):
        async with claude.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
            await stream.get_final_message()
