"""Caps and fallbacks the agent cannot choose, through the real proxy and the official SDKs.

- a per-customer cap reads the customer from the call's arguments, and a call
  naming none gets the cap's ``missing`` effect instead of skipping it;
- a delivered call stays spent whatever the agent reports about its result;
- an input the engine cannot take, or that makes the policy fail, is denied
  for a ``read_only`` tool too, never given the ``allow`` fallback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_budgets_functional import counter, wait_for
from tests.functional.test_policy_isolation import stack_is_limited, wait_for_pool
from warden.config import PolicyConfig
from warden.policy.engine import PolicyEngine
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "please refund my order"}]
AGENT = "agent:support-triage"
CLAUDE = "claude-sonnet-4-6"
ALLOW_ALL = 'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
# Denies a search with anything but a query, and chokes on what it is asked to parse.
SEARCH_POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {"effect": "deny", "reason": "only a query may be searched"} if {
\tinput.action.tool == "search_kb"
\tsome key, _ in input.action.arguments
\tnot key in {"query", "doc", "n"}
}

decision := {"effect": "deny", "reason": "parsed"} if {
\tinput.action.tool == "search_kb"
\tjson.unmarshal(input.action.arguments.doc)
}

decision := {"effect": "deny", "reason": "never"} if {
\tinput.action.tool == "search_kb"
\tsome a in numbers.range(1, input.action.arguments.n)
\tsome b in numbers.range(1, input.action.arguments.n)
\ta * b == -1
}
"""


def bundle(tmp_path: Path, text: str) -> str:
    root = tmp_path / "bundle"
    root.mkdir(exist_ok=True)
    (root / "policy.rego").write_text(text)
    return str(root)


def oai(warden: Warden, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, **kw
    )


def refund_cap(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "refunds",
        "tool": "issue_refund",
        "value": "amount",
        "per": ["agent", "customer"],
        "limit": 250,
        "over": "deny",
        **overrides,
    }


def decisions_for(tmp_path: Path, tool: str) -> list[dict[str, Any]]:
    return [
        r["decision"]
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "decision" and r.get("action", {}).get("tool") == tool
    ]


# -- a delivered call is spent, whatever the agent reports ------------------------------


async def refunds_reported_failed_openai(warden: Warden, tmp_path: Path, llm: MockLLM) -> int:
    passed = 0
    async with oai(warden) as c:
        for i in range(5):
            refund = Call(
                "issue_refund", {"order_id": f"A-{i}", "amount": 100, "customer_id": "C-1"}
            )
            llm.script(Reply(tool_calls=[refund]))
            first = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            calls = first.choices[0].message.tool_calls or []
            if not calls:
                continue
            passed += 1
            llm.script(Reply(text="Sorry, that failed."))
            history: Any = [
                *MESSAGES,
                first.choices[0].message.model_dump(exclude_none=True),
                # Chat has no error flag; an agent may still send one.
                {
                    "role": "tool",
                    "tool_call_id": calls[0].id,
                    "content": "error: the refund failed",
                    "is_error": True,
                },
            ]
            await c.chat.completions.create(model="gpt-4o-mini", messages=history)
            await wait_for(tmp_path, "refunds", AGENT, lambda v: v[1] == 0)
    return passed


async def refunds_reported_failed_anthropic(warden: Warden, tmp_path: Path, llm: MockLLM) -> int:
    passed = 0
    async with anthropic.AsyncAnthropic(
        base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
    ) as c:
        for i in range(5):
            refund = Call(
                "issue_refund", {"order_id": f"A-{i}", "amount": 100, "customer_id": "C-1"}
            )
            llm.script(Reply(tool_calls=[refund]))
            first = await c.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES)
            uses = [b for b in first.content if b.type == "tool_use"]
            if not uses:
                continue
            passed += 1
            llm.script(Reply(text="Sorry, that failed."))
            history: Any = [
                *MESSAGES,
                {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": uses[0].id,
                            "content": "the refund failed",
                            "is_error": True,
                        }
                    ],
                },
            ]
            await c.messages.create(model=CLAUDE, max_tokens=100, messages=history)
            await wait_for(tmp_path, "refunds", AGENT, lambda v: v[1] == 0)
    return passed


@pytest.mark.parametrize("run", [refunds_reported_failed_openai, refunds_reported_failed_anthropic])
async def test_five_refunds_of_100_reported_failed_pass_a_cap_of_250_twice(
    tmp_path: Path, llm: MockLLM, run: Any
) -> None:
    config = make_config(
        tmp_path,
        llm.url,
        budgets={"caps": [refund_cap()]},
        policy={"bundles": [bundle(tmp_path, ALLOW_ALL)]},
    )
    async with Warden(config) as warden:
        assert await run(warden, tmp_path, llm) == 2
    assert await counter(tmp_path, "refunds", AGENT) == (200.0, 0.0)
    effects = [d["effect"] for d in decisions_for(tmp_path, "issue_refund")]
    assert effects == ["allow", "allow", "deny", "deny", "deny"]


async def test_an_operator_may_opt_in_to_trusting_agents_error_reports(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The same run with budgets.trust_agent_results: each report releases its
    # value, so all five pass: the flag, not an accident, keeps the cap above.
    config = make_config(
        tmp_path,
        llm.url,
        budgets={"caps": [refund_cap()], "trust_agent_results": True},
        policy={"bundles": [bundle(tmp_path, ALLOW_ALL)]},
    )
    async with Warden(config) as warden:
        assert await refunds_reported_failed_anthropic(warden, tmp_path, llm) == 5
    assert await counter(tmp_path, "refunds", AGENT) == (0.0, 0.0)


# -- which customer a cap charges ---------------------------------------------------------


async def test_a_refund_naming_no_customer_needs_approval_not_a_free_pass(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(
        tmp_path,
        llm.url,
        budgets={"caps": [refund_cap(customer={"argument": "/account/id"})]},
        policy={"bundles": [bundle(tmp_path, ALLOW_ALL)]},
    )
    unnamed = Call("issue_refund", {"order_id": "A-1", "amount": 100})
    named = Call("issue_refund", {"order_id": "A-2", "amount": 100, "account": {"id": "C-9"}})
    llm.script(Reply(tool_calls=[unnamed]), Reply(tool_calls=[named]))
    async with Warden(config) as warden, oai(warden) as c:
        first = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not first.choices[0].message.tool_calls
        text = first.choices[0].message.content or ""
        assert "refunds cap: this issue_refund names no customer" in text
        assert "approval" in text
        # The argument, found by its JSON pointer, names the customer charged,
        # whatever the context header says.
        headers = {"X-Warden-Context-Customer-Id": "C-1"}
        second = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers
        )
        (call,) = second.choices[0].message.tool_calls or []
        assert call.type == "function"
        assert call.function.name == "issue_refund"
    assert await counter(tmp_path, "refunds", "customer:c-9") == (0.0, 100.0)
    assert await counter(tmp_path, "refunds", "customer:c-1") == (0.0, 0.0)
    first_record = decisions_for(tmp_path, "issue_refund")[0]
    assert first_record["effect"] == "require_approval"
    assert first_record["guard"] == "budget"


# -- no allow fallback for an input the policy cannot take --------------------------------

NESTED = '{"query": "x", "filter": ' + "[" * 300 + "]" * 300 + "}"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ('{"query": "x", "limit": 1180591620717411303424}', "is an integer past 64 bits"),
        (NESTED, "nests deeper than 64 levels"),
        ('{"query": "x", "limit": NaN}', "which JSON cannot carry"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_an_input_the_engine_cannot_take_is_denied_for_a_read_only_tool(
    tmp_path: Path, llm: MockLLM, raw: str, problem: str, stream: bool
) -> None:
    # search_kb is read_only (fallback: allow), and the policy denies a search
    # with a limit or a filter. Before, the unencodable input made the policy
    # error and the fallback let the call through.
    config = make_config(tmp_path, llm.url, policy={"bundles": [bundle(tmp_path, SEARCH_POLICY)]})
    llm.script(Reply(tool_calls=[Call("search_kb", raw)]))
    async with Warden(config) as warden, oai(warden) as c:
        if stream:
            chunks = await c.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            names = [
                t.function.name
                async for chunk in chunks
                for choice in chunk.choices
                for t in choice.delta.tool_calls or []
                if t.function is not None and t.function.name
            ]
        else:
            done = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            names = [t.type for t in done.choices[0].message.tool_calls or []]
    assert names == []
    (decision,) = decisions_for(tmp_path, "search_kb")
    assert decision["effect"] == "deny"
    assert decision["guard"] == "validation"
    # The adapter may already refuse to parse such arguments, or hand them on
    # for the pipeline to name the problem: either way validation denies.
    reason = decision["reasons"][0]
    assert problem in reason or "integer past 64 bits, NaN or nesting too deep" in reason


@pytest.mark.skipif(not stack_is_limited(), reason="with no stack limit the parser does not crash")
async def test_a_policy_crash_the_input_caused_is_denied_for_a_read_only_tool(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The input is valid JSON the engine takes; what the policy does with it
    # crashes the worker. Then the same input is quarantined: denied again.
    config = make_config(
        tmp_path,
        llm.url,
        # A generous budget: on a busy machine the crash must not turn into a timeout. The
        # usual Linux stack, on which the parser's recursion crashes (Warden's takes it).
        policy={
            "bundles": [bundle(tmp_path, SEARCH_POLICY)],
            "workers": 2,
            "deadline_ms": 15_000,
            "worker_stack_mb": 8,
        },
    )
    crash = Call("search_kb", {"query": "x", "doc": "[" * 30_000 + "]" * 30_000})
    llm.script(Reply(tool_calls=[crash]), Reply(tool_calls=[crash]))
    async with Warden(config) as warden, oai(warden) as c:
        for _ in range(2):
            done = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert not done.choices[0].message.tool_calls
    records = decisions_for(tmp_path, "search_kb")
    assert [(d["effect"], d["guard"], d["error"]) for d in records] == [
        ("deny", "fallback", "policy_crash")
    ] * 2
    assert "not given the fallback for read_only actions (allow)" in records[0]["reasons"][0]


async def test_a_policy_timeout_the_input_caused_is_denied_for_a_read_only_tool(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Room for a loaded machine: the looping worker must get its 300 ms of CPU before
    # the queue bound, or the request is pushed back (503) instead (not this test's subject).
    config = make_config(
        tmp_path,
        llm.url,
        policy={
            "bundles": [bundle(tmp_path, SEARCH_POLICY)],
            "deadline_ms": 300,
            "queue_timeout_s": 30,
        },
    )
    llm.script(Reply(tool_calls=[Call("search_kb", {"query": "x", "n": 10_000_000})]))
    async with Warden(config) as warden, oai(warden) as c:
        done = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not done.choices[0].message.tool_calls
    (decision,) = decisions_for(tmp_path, "search_kb")
    assert (decision["effect"], decision["error"]) == ("deny", "policy_timeout")


async def test_an_input_queued_behind_a_looping_one_is_evaluated_not_blamed(
    tmp_path: Path,
) -> None:
    # One worker, busy with a looping input: the input queued behind it waits
    # (the deadline bounds evaluation, not the queue) and runs on the replacement.
    config = PolicyConfig(
        bundles=(bundle(tmp_path, SEARCH_POLICY),), workers=1, deadline_ms=300, watch=False
    )
    engine = await PolicyEngine.start(config, queue_timeout_s=30)
    try:
        spin = {"action": {"tool": "search_kb", "arguments": {"n": 10_000_000}}}
        queued = {"action": {"tool": "search_kb", "arguments": {"query": "x"}}}
        ran, waited = await asyncio.gather(engine.evaluate(spin), engine.evaluate(queued))
        await wait_for_pool(engine, 1)
    finally:
        await engine.close()
    assert (ran.error, ran.input_fault) == ("policy_timeout", True)
    assert (waited.error, waited.reasons) == (None, ("fine",))
