"""A stream that ends in an error the agent's SDK raises on, through the real proxy.

The upstream is a scripted loopback server; the agents are the official
SDKs. A call carried by (or still held at) the error event never reaches the
agent: it must not be decided, so nothing is recorded as delivered, no call
link waits for its result and no budget stays held for it. The model call's
outcome names the error the agent got.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.server import Warden
from warden.testing.raw_upstream import RawReply, RawUpstream

REFUND_ARGS = '{"order_id":"A-1","amount":100}'
CAP: dict[str, Any] = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}
PROVIDER_ERROR = {"message": "upstream says: ignore me", "type": "server_error"}
MESSAGES: list[Any] = [{"role": "user", "content": "refund A-1"}]


def config(tmp_path: Path, upstream: RawUpstream) -> Any:
    """Every call allowed, refunds capped: an allowed refund holds its amount."""
    folder = tmp_path / "allow-all"
    folder.mkdir()
    (folder / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
    )
    policy = {"bundles": [str(folder)], "queue_timeout_s": 30}
    return make_config(tmp_path, upstream.url, budgets={"caps": [CAP]}, policy=policy)


def openai_client(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    )


def outcomes(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "outcome" and r["action"]["kind"] == kind]


def refund_decisions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r for r in records if r["kind"] == "decision" and r["action"].get("tool") == "issue_refund"
    ]


async def wait_for(
    tmp_path: Path, found: Callable[[list[dict[str, Any]]], bool], within: float = 20
) -> list[dict[str, Any]]:
    """The audit records once ``found`` holds of them (outcomes come in the background)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not found(audit_records(tmp_path / "audit")):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    return audit_records(tmp_path / "audit")


def held(tmp_path: Path) -> tuple[float, int, int]:
    """Reserved by the refunds cap, open reservations, and call links awaiting a result."""
    with sqlite3.connect(tmp_path / "state.db") as conn:
        reserved = conn.execute("SELECT coalesce(sum(reserved), 0) FROM budget_counters")
        reservations = conn.execute("SELECT count(*) FROM budget_reservations")
        links = conn.execute("SELECT count(*) FROM call_links")
        return float(reserved.fetchone()[0]), reservations.fetchone()[0], links.fetchone()[0]


async def model_call_ended(tmp_path: Path) -> list[dict[str, Any]]:
    records = await wait_for(tmp_path, lambda rs: bool(outcomes(rs, "llm_call")))
    (outcome,) = outcomes(records, "llm_call")
    assert outcome["outcome"]["error"] == "upstream_error"  # was a clean 200 or a hang-up
    return records


# --- chat completions ---------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


REFUND_PART = {
    "index": 0,
    "id": "call_1",
    "type": "function",
    "function": {"name": "issue_refund", "arguments": REFUND_ARGS},
}


async def chat(warden: Warden) -> tuple[list[str], str | None]:
    """The tool calls the agent's SDK gave it, and the error it raised."""
    got: list[str] = []
    async with openai_client(warden) as c:
        try:
            stream = await c.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            async for part in stream:
                for choice in part.choices:
                    got += [
                        (t.function and t.function.name) or ""
                        for t in choice.delta.tool_calls or []
                    ]
        except openai.APIError as exc:
            return got, exc.message
    return got, None


async def test_a_chat_call_in_a_chunk_with_an_error_is_neither_decided_nor_held(
    tmp_path: Path,
) -> None:
    events = [
        (None, chunk({"role": "assistant", "tool_calls": [REFUND_PART]}, error=PROVIDER_ERROR)),
        (None, chunk({}, "tool_calls")),
    ]
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse(events, done=True))
        assert await chat(warden) == ([], PROVIDER_ERROR["message"])
        records = await model_call_ended(tmp_path)
        # Was allowed and recorded as delivered: its link pending, its 100 held.
        assert refund_decisions(records) == []
        assert held(tmp_path) == (0.0, 0, 0)


async def test_a_chat_call_sent_before_the_error_stays_decided_and_held(tmp_path: Path) -> None:
    events = [
        (None, chunk({"role": "assistant", "tool_calls": [REFUND_PART]}, "tool_calls")),
        (None, {"error": PROVIDER_ERROR}),
        (None, chunk({"content": "never read"})),
    ]
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse(events, done=True))
        # The agent reads the call, then its SDK raises at the error.
        assert await chat(warden) == (["issue_refund"], PROVIDER_ERROR["message"])
        records = await model_call_ended(tmp_path)
        (decision,) = refund_decisions(records)
        assert decision["decision"]["enforced"] == "allow"
        assert held(tmp_path) == (100.0, 1, 1)  # until its result comes back


@pytest.mark.parametrize(
    "event",
    [
        # An error JavaScript reads as true: the TypeScript SDK throws, Python reads on.
        (None, chunk({"role": "assistant", "tool_calls": [REFUND_PART]}, "tool_calls", error={})),
        (None, chunk({"role": "assistant", "tool_calls": [REFUND_PART]}, "tool_calls", error=[])),
        # A chunk named ``error``: the TypeScript SDK throws on the name alone.
        ("error", chunk({"role": "assistant", "tool_calls": [REFUND_PART]}, "tool_calls")),
    ],
    ids=["error {}", "error []", "event: error"],
)
async def test_a_chat_call_in_a_chunk_only_the_typescript_sdk_raises_on_is_not_decided(
    tmp_path: Path, event: tuple[str | None, Any]
) -> None:
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse([event], done=True))
        got, raised = await chat(warden)
        # The Python SDK reads the chunk, without the call, then raises at Warden's error.
        assert got == []
        assert raised is not None
        records = await model_call_ended(tmp_path)
        # Was allowed and recorded as delivered, 100 held: the TypeScript agent never got it.
        assert refund_decisions(records) == []
        assert held(tmp_path) == (0.0, 0, 0)


async def test_a_chat_error_after_done_leaves_the_answer_whole(tmp_path: Path) -> None:
    events = [
        (None, chunk({"role": "assistant", "tool_calls": [REFUND_PART]}, "tool_calls")),
        (None, "[DONE]"),
        (None, {"error": PROVIDER_ERROR}),  # no SDK reads past [DONE]
    ]
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse(events))
        assert await chat(warden) == (["issue_refund"], None)
        records = await wait_for(tmp_path, lambda rs: bool(outcomes(rs, "llm_call")))
        (outcome,) = outcomes(records, "llm_call")
        assert outcome["outcome"]["error"] is None  # was upstream_error
        (decision,) = refund_decisions(records)
        assert decision["decision"]["enforced"] == "allow"
        assert held(tmp_path) == (100.0, 1, 1)


# --- responses ----------------------------------------------------------------------

REFUND_ITEM = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "issue_refund",
    "arguments": REFUND_ARGS,
    "status": "completed",
}


async def test_a_responses_call_in_an_event_with_an_error_is_neither_decided_nor_held(
    tmp_path: Path,
) -> None:
    done = {"type": "response.output_item.done", "output_index": 0, "item": REFUND_ITEM}
    events = [
        (None, {**done, "sequence_number": 0, "error": PROVIDER_ERROR}),
        (None, {**done, "sequence_number": 1}),
    ]
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse(events))
        got: list[str] = []
        async with openai_client(warden) as c:
            try:
                stream = await c.responses.create(
                    model="gpt-4o-mini", input="refund A-1", stream=True
                )
                async for event in stream:
                    got.append(event.type)
            except openai.APIError as exc:
                got.append(f"raised: {exc.message}")
        assert got == [f"raised: {PROVIDER_ERROR['message']}"]
        records = await model_call_ended(tmp_path)
        assert refund_decisions(records) == []
        assert held(tmp_path) == (0.0, 0, 0)


async def test_openais_named_responses_error_event_reaches_the_agent_and_ends_the_stream(
    tmp_path: Path,
) -> None:
    error = {
        "type": "error",
        "code": "server_error",
        "message": PROVIDER_ERROR["message"],
        "param": None,
        "sequence_number": 0,
    }
    done = {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": REFUND_ITEM,
        "sequence_number": 1,
    }
    events = [("error", error), ("response.output_item.done", done)]
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse(events))
        got: list[str] = []
        async with openai_client(warden) as c:
            try:
                stream = await c.responses.create(
                    model="gpt-4o-mini", input="refund A-1", stream=True
                )
                async for event in stream:
                    got.append(event.type)
                    if event.type == "error":
                        got.append(event.message)
            except openai.APIError:
                got.append("raised")
        # The Python SDK hands the error event on, then raises at Warden's; the
        # TypeScript SDK throws at the error event itself.
        assert got == ["error", PROVIDER_ERROR["message"], "raised"]
        records = await model_call_ended(tmp_path)
        # Was allowed and recorded as delivered, 100 held: the TypeScript agent never got it.
        assert refund_decisions(records) == []
        assert held(tmp_path) == (0.0, 0, 0)


# --- anthropic ----------------------------------------------------------------------


async def test_an_anthropic_call_held_at_an_error_event_is_neither_decided_nor_held(
    tmp_path: Path,
) -> None:
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }
    block = {"type": "tool_use", "id": "toolu_1", "name": "issue_refund", "input": {}}
    json_delta = {"type": "input_json_delta", "partial_json": REFUND_ARGS}
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    events = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": json_delta}),
        ("error", overloaded),
    ]
    async with RawUpstream() as upstream, Warden(config(tmp_path, upstream)) as warden:
        upstream.script(RawReply.sse(events))  # and the upstream hangs up
        got: list[str] = []
        async with anthropic.AsyncAnthropic(
            base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant", max_retries=0
        ) as claude:
            try:
                stream = await claude.messages.create(
                    model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES, stream=True
                )
                async for event in stream:
                    got.append(event.type)
            except anthropic.APIStatusError as exc:
                got.append(f"raised: {exc.body}")
        assert got == ["message_start", f"raised: {overloaded}"]
        records = await model_call_ended(tmp_path)
        # Was decided when the stream ended, after the agent's SDK had raised.
        assert refund_decisions(records) == []
        assert held(tmp_path) == (0.0, 0, 0)
