"""The server's one lifecycle: doors start with the core, and any close failing skips nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.audit.verify import verify_log
from warden.core import Governor
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply


@asynccontextmanager
async def agent(warden: Warden) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        yield client


class BrokenDoor:
    """A front door whose stop fails."""

    name = "broken"

    def __init__(self) -> None:
        self.core: Governor | None = None
        self.stopped = False

    async def start(self, core: Governor) -> None:
        self.core = core

    async def stop(self) -> None:
        self.stopped = True
        raise RuntimeError("the door would not close")


async def test_a_door_failing_to_stop_does_not_skip_the_final_checkpoint(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    door = BrokenDoor()
    warden = Warden(make_config(tmp_path, llm.url), doors=[door])
    await warden.start()
    assert door.core is warden.core  # the same core the HTTP door calls
    llm.script(Reply(text="Hello."))
    async with agent(warden) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    await warden.stop()
    assert door.stopped
    assert "BrokenDoor failed to stop" in caplog.text  # logged; the others still stop
    report = verify_log(tmp_path / "audit")
    assert report.ok, report.damage
    assert report.records >= 2  # the decision and the outcome of the model call
    assert report.latest_checkpoint == report.records


async def test_a_failed_start_closes_what_was_started(tmp_path: Path, llm: MockLLM) -> None:
    class FailsToStart(BrokenDoor):
        async def start(self, core: Governor) -> None:
            raise RuntimeError("cannot bind")

    warden = Warden(make_config(tmp_path, llm.url), doors=[FailsToStart()])
    with pytest.raises(RuntimeError, match="cannot bind"):
        await warden.start()
    report = verify_log(tmp_path / "audit")
    assert report.ok, report.damage
    # Everything was released: the same directories open again at once.
    async with Warden(make_config(tmp_path, llm.url)) as again:
        assert again.proxy_url


async def test_a_tool_result_sent_after_a_restart_is_linked_to_its_decision(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(tmp_path, llm.url)
    messages: list[Any] = [{"role": "user", "content": "where is my order?"}]
    llm.script(Reply(tool_calls=[Call("search_kb", {"query": "order status"})]), Reply(text="Ok."))
    async with Warden(config) as first:
        async with agent(first) as client:
            got = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        [tool_call] = got.choices[0].message.tool_calls or []
    async with Warden(config) as second, agent(second) as client:
        follow = [
            *messages,
            got.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tool_call.id, "content": "shipped"},
        ]
        await client.chat.completions.create(model="gpt-4o-mini", messages=follow)
    records = audit_records(tmp_path / "audit")
    [decision] = [
        r for r in records if r["kind"] == "decision" and r["action"]["tool"] == "search_kb"
    ]
    [outcome] = [r for r in records if r["kind"] == "outcome" and r["action"]["tool"]]
    assert outcome["decision_id"] == decision["decision"]["id"]
    # The restarted log does not know the decision's redactions: the result is kept as its hash.
    assert outcome["outcome"]["result"] == "[redacted]"
    assert outcome["outcome"]["result_sha256"]
