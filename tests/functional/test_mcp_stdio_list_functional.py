"""``tools/list`` through ``warden mcp wrap`` is filtered per agent, with the official MCP client.

A tool the policy denies the agent in every case (asked at ``stage: list``,
by name alone) is left out of the listing; a tool whose calls depend on their
arguments stays listed, and every call is still decided.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.functional.stdio_wrap import (
    audit_dir,
    decisions,
    text,
    throw_switch,
    tools_called,
    wrapped,
    write_config,
)
from warden.killswitch import Scope

pytestmark = pytest.mark.timeout(90)

# The FAQ bot may only read; refunds above 100 are denied for everyone, which
# depends on the arguments, so it must not fire at list stage.
POLICY = """
package warden

import rego.v1

reads := {"search_kb", "get_order"}

decision := {"effect": "deny", "reason": "the FAQ bot may only read"} if {
	input.agent.id == "faq-bot"
	not input.action.tool in reads
} else := {"effect": "deny", "reason": "refunds above 100 are not allowed"} if {
	input.action.stage != "list"
	input.action.tool == "issue_refund"
	input.action.arguments.amount > 100
} else := {"effect": "allow", "reason": "allowed"}
"""


async def server_tools(call_log: Path) -> set[str]:
    """The tools the test server lists when asked directly, without Warden."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "warden.testing.mcp_server", "--call-log", str(call_log)],
        env={k: v for k in ("PYTHONPATH",) if (v := os.environ.get(k))},
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return {t.name for t in (await session.list_tools()).tools}


def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.rego").write_text(POLICY)
    return folder


async def test_tools_list_is_filtered_per_agent(tmp_path: Path) -> None:
    policy = bundle(tmp_path)
    calls = tmp_path / "calls.jsonl"
    direct = await server_tools(calls)
    async with wrapped(write_config(tmp_path, "support-triage", bundle=policy), calls) as session:
        triage = await session.list_tools()
    async with wrapped(write_config(tmp_path, "faq-bot", bundle=policy), calls) as session:
        faq = await session.list_tools()
        # A client that calls a tool it was not shown is still decided, and refused.
        refund = await session.call_tool("issue_refund", {"order_id": "A-1001", "amount": 5})
        found = await session.call_tool("search_kb", {"query": "shipping"})
    assert direct >= {"search_kb", "get_order", "issue_refund", "close_account"}
    assert {t.name for t in triage.tools} == direct
    assert {t.name for t in faq.tools} == {"search_kb", "get_order"}
    # What is kept is the server's own listing, untouched.
    kept = next(t for t in faq.tools if t.name == "search_kb")
    assert kept.input_schema["properties"]["query"]["type"] == "string"
    assert refund.is_error
    assert "the FAQ bot may only read" in text(refund)
    assert not found.is_error
    assert tools_called(calls) == ["search_kb"]
    # Listings are not actions: only the two calls were recorded.
    assert decisions(audit_dir(tmp_path, "support-triage")) == []
    tools = [d["action"]["tool"] for d in decisions(audit_dir(tmp_path, "faq-bot"))]
    assert tools == ["issue_refund", "search_kb"]


async def test_a_rule_on_arguments_does_not_hide_a_tool_but_still_decides_its_calls(
    tmp_path: Path,
) -> None:
    calls = tmp_path / "calls.jsonl"
    config = write_config(tmp_path, bundle=bundle(tmp_path))
    async with wrapped(config, calls) as session:
        listed = await session.list_tools()
        big = await session.call_tool("issue_refund", {"order_id": "A-1001", "amount": 500})
    assert "issue_refund" in {t.name for t in listed.tools}
    assert big.is_error
    assert "refunds above 100" in text(big)
    assert tools_called(calls) == []


async def test_a_kill_switch_hides_the_tool_from_the_next_listing(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with wrapped(write_config(tmp_path), calls) as session:
        before = await session.list_tools()
        await throw_switch(tmp_path, Scope.TOOL, "close_account", "incident 44")
        # Every sidecar sharing the store re-reads the switches within a poll interval.
        await asyncio.sleep(1.5)
        after = await session.list_tools()
    assert "close_account" in {t.name for t in before.tools}
    assert {t.name for t in after.tools} == {t.name for t in before.tools} - {"close_account"}


async def test_an_argument_spelled_otherwise_than_listed_is_denied(tmp_path: Path) -> None:
    # "AMOUNT" escapes the rule on input.arguments.amount; a Go server would bind it.
    calls = tmp_path / "calls.jsonl"
    async with wrapped(
        write_config(tmp_path, "support-triage", bundle=bundle(tmp_path)), calls
    ) as session:
        await session.list_tools()
        bent = await session.call_tool("issue_refund", {"order_id": "A-1001", "AMOUNT": 500})
        exact = await session.call_tool("issue_refund", {"order_id": "A-1001", "amount": 5})
    assert bent.is_error
    assert "spelled otherwise than the tool's schema" in text(bent)
    assert not exact.is_error
    assert tools_called(calls) == ["issue_refund"]
    assert [d["decision"]["guard"] for d in decisions(audit_dir(tmp_path))][:1] == ["validation"]
