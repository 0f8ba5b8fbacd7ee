"""A Responses answer continued after Warden kept one of its calls from the agent.

The provider stores its answer (``store`` defaults to true), calls included,
and refuses a request continuing it (``previous_response_id``) that gives no
output for one of them. The agent never saw the call Warden blocked, so it
cannot answer it: Warden does, with what the agent was told instead. The
official ``openai`` SDK through the base URL, against :class:`MockLLM`, which
keeps answers and checks continuations as the API does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client import REGISTRY

from tests.functional.conftest import make_config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

pytestmark = pytest.mark.timeout(60)

LOOKUP = Call("get_order", {"order_id": "A-1001"}, id="call_lookup")
EXPORT = Call("export_customers", {"format": "csv"}, id="call_export")


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    async with Warden(make_config(tmp_path, llm.url)) as running:
        yield running


@pytest.fixture
async def client(warden: Warden) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=30
    ) as oai:
        yield oai


def _answered() -> float:
    sample = REGISTRY.get_sample_value("warden_refusals_answered_total", {"upstream": "openai"})
    return sample or 0.0


async def _first(client: openai.AsyncOpenAI, *, stream: bool) -> tuple[str, list[Any]]:
    """Ask once; the answer's id and its output items as the SDK gives them."""
    if not stream:
        response = await client.responses.create(model="gpt-4.1", input="where is A-1001?")
        return response.id, list(response.output)
    events = await client.responses.create(model="gpt-4.1", input="where is A-1001?", stream=True)
    async for event in events:
        if event.type == "response.completed":
            return event.response.id, list(event.response.output)
    raise AssertionError("the stream did not complete")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_continuation_answers_the_call_warden_kept_from_the_agent(
    warden: Warden, client: openai.AsyncOpenAI, llm: MockLLM, stream: bool
) -> None:
    llm.script(Reply(tool_calls=[LOOKUP, EXPORT]))
    response_id, output = await _first(client, stream=stream)
    calls = [item for item in output if item.type == "function_call"]
    assert [c.call_id for c in calls] == ["call_lookup"]  # the export never reached the agent
    (note,) = [item for item in output if item.type == "message"]
    told = note.content[0].text
    assert "blocked the tool call `export_customers`" in told
    assert warden.core is not None
    await warden.core.background.drain()  # the answer's chain link is written
    before = _answered()

    # The agent answers the one call it saw, as any agent loop does.
    llm.script(Reply(text="A-1001 ships tomorrow."))
    answer = await client.responses.create(
        model="gpt-4.1",
        previous_response_id=response_id,
        input=[{"type": "function_call_output", "call_id": "call_lookup", "output": "shipped"}],
    )
    assert answer.output_text == "A-1001 ships tomorrow."
    sent = llm.requests[-1].body
    assert sent["input"] == [
        {"type": "function_call_output", "call_id": "call_export", "output": told},
        {"type": "function_call_output", "call_id": "call_lookup", "output": "shipped"},
    ]
    assert _answered() == before + 1


async def test_a_text_continuation_gets_the_output_before_its_message(
    warden: Warden, client: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[EXPORT]))
    first = await client.responses.create(model="gpt-4.1", input="export all customers")
    assert not [item for item in first.output if item.type == "function_call"]
    assert warden.core is not None
    await warden.core.background.drain()
    llm.script(Reply(text="Understood."))
    await client.responses.create(
        model="gpt-4.1", previous_response_id=first.id, input="then just A-1001"
    )
    items = llm.requests[-1].body["input"]
    assert [i["type"] for i in items] == ["function_call_output", "message"]
    assert items[0]["call_id"] == "call_export"
    assert items[1] == {"type": "message", "role": "user", "content": "then just A-1001"}


async def test_nothing_is_added_when_no_call_was_kept_back(
    warden: Warden, client: openai.AsyncOpenAI, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[LOOKUP]))
    first = await client.responses.create(model="gpt-4.1", input="where is A-1001?")
    assert warden.core is not None
    await warden.core.background.drain()
    before = _answered()
    mine: list[Any] = [
        {"type": "function_call_output", "call_id": "call_lookup", "output": "shipped"}
    ]
    llm.script(Reply(text="ok"))
    await client.responses.create(model="gpt-4.1", previous_response_id=first.id, input=mine)
    assert llm.requests[-1].body["input"] == mine
    assert _answered() == before
