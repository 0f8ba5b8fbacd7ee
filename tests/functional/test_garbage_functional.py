"""Governed requests are freed as they end, not left to the garbage collector.

An object in a reference cycle waits for a collector pass, and a busy sidecar's
passes then pause every request: each request's leftovers must go by
reference counting alone.
"""

from __future__ import annotations

import gc
from typing import Any

import openai

from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "help"}]
SESSION = {"X-Warden-Session": "conv-garbage-1"}


async def _round(oai: openai.AsyncOpenAI, llm: MockLLM) -> None:
    llm.script(Reply(text="Let me look.", tool_calls=[Call("search_kb", {"query": "reset"})]))
    await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    llm.script(Reply(text="Exporting.", tool_calls=[Call("export_customers", {"format": "csv"})]))
    await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    llm.script(Reply(text="Your order ships tomorrow."))
    await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def _warden_objects(found: list[Any]) -> list[str]:
    # The test's own fakes (warden.testing) are not the sidecar's concern.
    return sorted(
        {
            type(o).__qualname__
            for o in found
            if type(o).__module__.startswith("warden.")
            and not type(o).__module__.startswith("warden.testing")
        }
    )


async def test_allowed_denied_and_text_answers_leave_no_cycles(
    warden: Warden, llm: MockLLM
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1",
        api_key="sk-test-secret-123",
        max_retries=0,
        default_headers=SESSION,
    ) as oai:
        await _round(oai, llm)  # first use: caches and lazy imports are not garbage
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                await _round(oai, llm)
            gc.collect()
            left = _warden_objects(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []
