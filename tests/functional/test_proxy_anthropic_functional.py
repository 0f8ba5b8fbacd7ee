"""The official anthropic SDK through Warden to a real mock upstream, on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply
from warden.testing.raw_upstream import RawReply, RawUpstream

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


UNKNOWN_BY_NAME = """package warden

import rego.v1

default decision := {"effect": "deny", "reason": "not allowed"}

decision := {"effect": "allow"} if input.action.kind == "llm_call"

# An operator allowing screenshots by name, whatever the kind of call.
decision := {"effect": "allow"} if input.action.tool == "computer.screenshot"
"""
TOOLSET_MSG: Any = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 1},
}
# A member whose input names another action: its input is itself a whole tool_use block.
SMUGGLED: Any = {
    "action": "x",
    "type": "tool_use",
    "id": "toolu_2",
    "name": "delete_all",
    "input": {"confirm": True},
}
TOOLSET_BLOCK: Any = {
    "type": "tool_use",
    "id": "toolu_1",
    "name": "screenshot",
    "toolset_name": "computer",
    "input": SMUGGLED,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_allowed_toolset_call_naming_another_action_goes_out_as_decided(
    tmp_path: Path, stream: bool
) -> None:
    """A toolset member whose ``input.action`` is not its name is an unknown call, decided
    on the whole block: allowed, the agent gets that block, never its input as a block."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(UNKNOWN_BY_NAME)
    events: Any = [
        ("message_start", {"type": "message_start", "message": {**TOOLSET_MSG, "content": []}}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {**TOOLSET_BLOCK, "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": json.dumps(SMUGGLED)},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 9},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    async with RawUpstream() as upstream:
        policy = {"bundles": [str(bundle)], "watch": False, "unknown_calls": "policy"}
        config = make_config(tmp_path, upstream.url, policy=policy)
        async with (
            Warden(config) as warden,
            anthropic.AsyncAnthropic(
                base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant", max_retries=0
            ) as claude,
        ):
            if stream:
                upstream.script(RawReply.sse(events))
                async with claude.messages.stream(
                    model=MODEL, max_tokens=100, messages=MESSAGES
                ) as s:
                    content: list[Any] = list((await s.get_final_message()).content)
            else:
                upstream.script(RawReply.json({**TOOLSET_MSG, "content": [TOOLSET_BLOCK]}))
                message = await claude.messages.create(
                    model=MODEL, max_tokens=100, messages=MESSAGES
                )
                content = list(message.content)
    uses = [b for b in content if b.type == "tool_use"]
    # The block as decided: the member, its toolset and the input it came with.
    assert [(u.id, u.name, u.input) for u in uses] == [("toolu_1", "screenshot", SMUGGLED)]
    [decided] = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["kind"] == "unknown_call"
    ]
    assert decided["action"]["tool"] == "computer.screenshot"
    assert decided["action"]["arguments"] == {**TOOLSET_BLOCK, "input": SMUGGLED}
    assert decided["decision"]["enforced"] == "allow"


async def test_a_model_call_whose_calls_cannot_be_decided_keeps_its_outcome(
    tmp_path: Path,
) -> None:
    """A call name no record can carry (a lone surrogate) fails the decision closed;
    the model call it came in was billed, so its usage and outcome are still recorded."""
    bad = {"type": "tool_use", "id": "toolu_1", "name": "safe\ud800", "input": {"q": "x"}}
    usage = {"input_tokens": 5, "output_tokens": 7777}
    async with (
        RawUpstream() as upstream,
        Warden(make_config(tmp_path, upstream.url)) as warden,
        anthropic.AsyncAnthropic(
            base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant", max_retries=0
        ) as claude,
    ):
        upstream.script(RawReply.json({**TOOLSET_MSG, "usage": usage, "content": [bad]}))
        with pytest.raises(anthropic.APIStatusError) as info:
            await claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert info.value.status_code == 503
    [outcome] = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert outcome["action"]["kind"] == "llm_call"
    assert outcome["outcome"]["tokens"]["output"] == 7777
    assert outcome["outcome"]["status"] == 200
    assert outcome["outcome"]["error"] is not None
