"""Keys equal but for case, through real doors: decided as malformed, never passed on.

Go's ``encoding/json`` (and .NET's default binder) read JSON keys without
regard to case, the last one winning; a policy that read ``path`` must not let
a tool run on ``PATH``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pydantic

from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "show me the log"}]


async def test_a_tool_call_with_case_variant_keys_is_blocked(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    shadow = '{"path": "/tmp/ok.log", "PATH": "/etc/shadow"}'
    llm.script(Reply(tool_calls=[Call("search_kb", shadow), Call("search_kb", {"query": "ok"})]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        got = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    calls = got.choices[0].message.tool_calls or []
    assert [c.function.arguments for c in calls if c.type == "function"] == ['{"query":"ok"}']
    decisions = [
        r["decision"]
        for r in records()
        if r["kind"] == "decision" and r["action"]["tool"] == "search_kb"
    ]
    assert [d["effect"] for d in decisions] == ["deny", "allow"]


REFUND_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["order_id", "amount"],
}


def refund_decisions(records: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        r["decision"]
        for r in records()
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]


async def test_an_argument_spelled_otherwise_than_declared_is_denied(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    # A policy reading input.arguments.amount finds nothing under "Amount", while
    # a Go tool binds it to amount: a refund of 5,000 would pass unheld.
    llm.script(
        Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "Amount": 5000})]),
        Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 20})]),
    )
    tools: Any = [
        {"type": "function", "function": {"name": "issue_refund", "parameters": REFUND_SCHEMA}}
    ]
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        bent = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=tools
        )
        exact = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=tools
        )
    assert not bent.choices[0].message.tool_calls
    assert "spelled otherwise than the tool's schema" in (bent.choices[0].message.content or "")
    assert [c.type for c in exact.choices[0].message.tool_calls or ()] == ["function"]
    first, second = refund_decisions(records)
    assert (first["effect"], first["guard"]) == ("deny", "validation")
    assert second["effect"] == "allow"


async def test_a_streamed_anthropic_call_is_checked_against_its_input_schema(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    llm.script(Reply(tool_calls=[Call("issue_refund", {"ORDER_ID": "A-1", "amount": 20})]))
    async with (
        anthropic.AsyncAnthropic(
            base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
        ) as client,
        client.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=100,
            messages=MESSAGES,
            tools=[{"name": "issue_refund", "input_schema": REFUND_SCHEMA}],
        ) as stream,
    ):
        message = await stream.get_final_message()
    assert [b.type for b in message.content if b.type == "tool_use"] == []
    [decision] = refund_decisions(records)
    assert (decision["effect"], decision["guard"]) == ("deny", "validation")


async def test_a_nested_argument_spelled_otherwise_than_declared_is_denied(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    nested = {
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "refund": {"type": "object", "properties": {"amount": {"type": "number"}}},
        },
    }
    llm.script(
        Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "refund": {"Amount": 5000}})])
    )
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        tools: Any = [
            {"type": "function", "function": {"name": "issue_refund", "parameters": nested}}
        ]
        bent = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=tools
        )
    assert not bent.choices[0].message.tool_calls
    assert "spelled otherwise than the tool's schema" in (bent.choices[0].message.content or "")
    [decision] = refund_decisions(records)
    assert (decision["effect"], decision["guard"]) == ("deny", "validation")


class _Refund(pydantic.BaseModel):
    amount: float
    currency: str


class _IssueRefund(pydantic.BaseModel):
    order_id: str
    refund: _Refund


async def test_a_nested_model_the_sdk_declares_by_ref_is_compared_too(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    # The SDK's pydantic helper declares nested models under $defs, by $ref.
    tool = openai.pydantic_function_tool(_IssueRefund, name="issue_refund")
    parameters: Any = tool["function"].get("parameters")
    assert parameters["properties"]["refund"] == {"$ref": "#/$defs/_Refund"}
    bent_args = {"order_id": "A-1", "refund": {"Amount": 5000, "currency": "EUR"}}
    llm.script(Reply(tool_calls=[Call("issue_refund", bent_args)]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        bent = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=[tool]
        )
    assert not bent.choices[0].message.tool_calls
    assert "spelled otherwise than the tool's schema" in (bent.choices[0].message.content or "")
    [decision] = refund_decisions(records)
    assert (decision["effect"], decision["guard"]) == ("deny", "validation")


async def test_undeclared_and_nested_keys_keep_any_spelling(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    # Only names that fold to a declared property are compared ("meta" is not declared).
    args = {"order_id": "A-1", "amount": 20, "Note": "x", "meta": {"Amount": 1}}
    llm.script(Reply(tool_calls=[Call("issue_refund", args)]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        got = await client.responses.create(
            model="gpt-4o-mini",
            input="refund",
            tools=[
                {
                    "type": "function",
                    "name": "issue_refund",
                    "parameters": REFUND_SCHEMA,
                    "strict": False,
                }
            ],
        )
    assert [i.type for i in got.output if i.type == "function_call"] == ["function_call"]
    [decision] = refund_decisions(records)
    assert decision["effect"] == "allow"
