"""A burst of requests waits for the policy or is pushed back; it is never decided by fallback.

64 concurrent agent requests through the real proxy, each proposing a tool
call with its own arguments (so every decision is a cache miss and needs a
worker), on the default policy deadline and worker count. Before the deadline
bounded evaluation only, the queue's wait counted against it and requests got
the fallback deny, recorded as their decisions.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.config import DEFAULT_POLICY_DEADLINE_MS, DEFAULT_POLICY_WORKERS
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

# A burst of cache misses on the default deadline: run alone, not beside other tests.
pytestmark = pytest.mark.serial

BURST = 64
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Where is my order?"}
]


async def _ask(client: openai.AsyncOpenAI) -> int:
    try:
        done = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    except openai.APIStatusError as exc:
        return exc.status_code
    assert done.choices[0].message.tool_calls, "an allowed call was taken away"
    return 200


async def test_a_64_connection_burst_gets_no_fallback_decisions(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(
        tmp_path,
        llm.url,
        policy={"deadline_ms": DEFAULT_POLICY_DEADLINE_MS, "workers": DEFAULT_POLICY_WORKERS},
    )
    llm.script(
        *(Reply(tool_calls=[Call("get_order", {"order_id": f"A-{i}"})]) for i in range(BURST))
    )
    async with Warden(config) as warden:
        client = openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1",
            api_key="sk-test",
            max_retries=0,  # a 503 must show here, not be retried away
        )
        async with client:
            statuses = await asyncio.gather(*(_ask(client) for _ in range(BURST)))
    decisions = [
        r["decision"] for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"
    ]
    assert [d for d in decisions if d["guard"] == "fallback"] == []
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 0
    # Every request that went through had both its decisions (the model call,
    # the proposed call) made by the policy itself.
    allowed = [d for d in decisions if d["effect"] == "allow" and d["guard"] == "policy"]
    assert len(allowed) >= 2 * statuses.count(200)


SPIN_POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {"effect": "deny", "reason": "never"} if {
\tinput.action.tool == "spin"
\tsome a in numbers.range(1, input.action.arguments.n)
\tsome b in numbers.range(1, input.action.arguments.n)
\ta * b == -1
}
"""


async def test_a_request_that_cannot_get_a_worker_gets_503_with_retry_after(
    tmp_path: Path, llm: MockLLM
) -> None:
    bundle = tmp_path / "spin"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(SPIN_POLICY)
    config = make_config(
        tmp_path,
        llm.url,
        policy={
            "bundles": [str(bundle)],
            "workers": 1,
            "deadline_ms": 5000,
            "queue_timeout_s": 0.3,
            "watch": False,
        },
    )
    llm.script(
        Reply(tool_calls=[Call("spin", {"n": 300_000})]),
        Reply(tool_calls=[Call("get_order", {"order_id": "A-1"})]),
    )
    async with Warden(config) as warden:
        client = openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        )
        async with client:
            spinning = asyncio.ensure_future(
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            )
            await asyncio.sleep(0.5)  # the spin now holds the only worker
            assert len(llm.requests) == 1
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            except openai.InternalServerError as exc:
                pushed_back = exc
            else:
                raise AssertionError("a request with no free worker was decided")
            spinning.cancel()
    assert pushed_back.status_code == 503
    assert pushed_back.response.headers["Retry-After"] == "1"
    assert "overloaded" in str(pushed_back.body)
    # Busy is never a decision: the pushed-back call has no record at all.
    tools = [
        r["action"]["tool"] for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"
    ]
    assert "get_order" not in tools
