"""``warden mcp wrap`` driven by the official MCP client over stdio, against a real MCP server.

The server is :mod:`warden.testing.mcp_server` (the SDK's MCPServer), whose call
log proves what reached it; Warden runs as its own process, as an IDE launches it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.functional.conftest import SHIPPED_POLICY, audit_records
from warden import tasks
from warden.admin.auth import Principal
from warden.approvals.gate import approval_settings
from warden.approvals.service import Approvals
from warden.config import load_config
from warden.killswitch import KillSwitches, Scope
from warden.state import StateStore
from warden.testing.mcp_server import read_call_log
from warden.testing.memory_audit import MemoryAudit

pytestmark = pytest.mark.timeout(60)


def write_config(tmp_path: Path) -> Path:
    """A warden.yaml (JSON is YAML) with the shipped support policy and files under tmp_path."""
    config = {
        "agent": {"id": "support-triage"},
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "policy": {"bundles": [str(SHIPPED_POLICY)], "workers": 1, "watch": False},
        "audit": {"dir": str(tmp_path / "audit")},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "approvals": {"mode": "defer"},
        "shutdown_grace_s": 5,
    }
    path = tmp_path / "warden.yaml"
    path.write_bytes(orjson.dumps(config))
    return path


def wrap_params(tmp_path: Path, *server_args: str) -> StdioServerParameters:
    """``warden mcp wrap`` around the test server, as an MCP client config would launch it."""
    server = [sys.executable, "-m", "warden.testing.mcp_server"]
    server += ["--call-log", str(tmp_path / "calls.jsonl"), *server_args]
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "warden.cli", "mcp", "wrap", "--config", str(write_config(tmp_path))]
        + ["--name", "support-tools", "--", *server],
        # The SDK passes only a safe default environment; keep the interpreter's path.
        env={k: v for k in ("PYTHONPATH",) if (v := os.environ.get(k))},
    )


@asynccontextmanager
async def wrapped(tmp_path: Path, *server_args: str) -> AsyncIterator[ClientSession]:
    async with (
        stdio_client(wrap_params(tmp_path, *server_args)) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def tools_called(tmp_path: Path) -> list[str]:
    return [c["tool"] for c in read_call_log(tmp_path / "calls.jsonl")]


def decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "decision"]


async def test_allowed_call_returns_the_servers_result_and_is_recorded(tmp_path: Path) -> None:
    async with wrapped(tmp_path) as session:
        listed = await session.list_tools()
        result = await session.call_tool("get_order", {"order_id": "A-1001"})
    assert {t.name for t in listed.tools} >= {"search_kb", "issue_refund", "close_account"}
    assert not result.is_error
    assert "A-1001" in text(result)
    assert tools_called(tmp_path) == ["get_order"]
    records = audit_records(tmp_path / "audit")
    (decision,) = decisions(tmp_path)
    assert decision["action"]["protocol"] == "mcp"
    assert decision["action"]["tool"] == "get_order"
    assert decision["decision"]["effect"] == "allow"
    outcomes = [r for r in records if r.get("kind") == "outcome"]
    assert len(outcomes) == 1
    assert "A-1001" in orjson.dumps(outcomes[0]).decode()


async def test_denied_call_is_answered_by_warden_and_never_arrives(tmp_path: Path) -> None:
    async with wrapped(tmp_path) as session:
        refused = await session.call_tool("issue_refund", {"order_id": "A-1001", "amount": -5})
        held = await session.call_tool("close_account", {"customer_id": "C-1001"})
        after = await session.call_tool("search_kb", {"query": "refund policy"})
    assert refused.is_error
    assert "blocked the tool call `issue_refund`" in text(refused)
    assert "more than 0" in text(refused)
    assert held.is_error
    assert "held the tool call `close_account`" in text(held)
    assert "approval apr_" in text(held)
    assert not after.is_error
    assert tools_called(tmp_path) == ["search_kb"]
    effects = [d["decision"]["effect"] for d in decisions(tmp_path)]
    assert effects == ["deny", "require_approval", "allow"]
    ids = [d["decision"]["id"] for d in decisions(tmp_path)]
    assert ids[0] in text(refused)
    assert ids[1] in text(held)
    verify = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "warden.cli", "audit", "verify", "--dir", str(tmp_path / "audit")],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await verify.communicate()
    assert verify.returncode == 0, said.decode()


async def test_deferred_call_runs_once_after_approval(tmp_path: Path) -> None:
    async with wrapped(tmp_path) as session:
        args = {"customer_id": "C-1002", "reason": "customer asked"}
        held = await session.call_tool("close_account", args)
        approval_id = text(held).split("approval ")[1].split(" ")[0]
        # A support lead approves it, as through the admin API of a `warden serve` on this store.
        config = load_config(write_config(tmp_path))
        approvals = await Approvals.open(
            config.state.url, MemoryAudit(), approval_settings(config.approvals)
        )
        try:
            lead = Principal("lead", frozenset({"support-leads"}), frozenset({"support-leads"}))
            await approvals.decide(approval_id, lead, True, "verified by phone")
        finally:
            await approvals.close()
        approved = await session.call_tool("close_account", args)
        again = await session.call_tool("close_account", args)
    assert held.is_error
    assert not approved.is_error, text(approved)
    assert again.is_error
    assert tools_called(tmp_path) == ["close_account"]


async def test_kill_switch_stops_a_call(tmp_path: Path) -> None:
    async with wrapped(tmp_path) as session:
        first = await session.call_tool("search_kb", {"query": "shipping"})
        await throw_switch(tmp_path, Scope.TOOL, "search_kb", "incident 42")
        # Every sidecar sharing the store re-reads the switches within a poll interval.
        await asyncio.sleep(1.5)
        stopped = await session.call_tool("search_kb", {"query": "shipping"})
    assert not first.is_error
    assert stopped.is_error
    assert "incident 42" in text(stopped)
    assert tools_called(tmp_path) == ["search_kb"]
    assert [d["decision"]["guard"] for d in decisions(tmp_path)][-1] == "kill_switch"


async def throw_switch(tmp_path: Path, scope: Scope, target: str, reason: str) -> None:
    """Throw a kill switch in the shared store, as `warden kill` at any sidecar does."""
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        await KillSwitches(store, MemoryAudit()).set(scope, target, reason, "oncall")
    finally:
        await store.close()


async def arrived(tmp_path: Path) -> None:
    """Return once the server's call log shows a call (it then runs for --delay-s)."""
    for _ in range(400):
        if tools_called(tmp_path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the call never reached the server")


async def test_kill_switch_stops_a_call_in_flight(tmp_path: Path) -> None:
    async with wrapped(tmp_path, "--delay-s", "30") as session:
        started = asyncio.get_running_loop().time()
        call = session.call_tool("get_order", {"order_id": "A-1001"})
        running = tasks.spawn(call, name="call-in-flight")
        await arrived(tmp_path)
        await throw_switch(tmp_path, Scope.UPSTREAM, "support-tools", "incident 43")
        stopped = await asyncio.wait_for(running, 10)
        elapsed = asyncio.get_running_loop().time() - started
    assert stopped.is_error
    assert "stopped the tool call `get_order` while it ran" in text(stopped)
    assert "incident 43" in text(stopped)
    assert elapsed < 15
    outcomes = [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "outcome"]
    assert len(outcomes) == 1
    assert "killed" in orjson.dumps(outcomes[0]).decode()


async def raw_wrap(tmp_path: Path) -> asyncio.subprocess.Process:
    """``warden mcp wrap`` as a process the test writes raw lines to and reads from."""
    params = wrap_params(tmp_path)
    return await asyncio.create_subprocess_exec(
        params.command,
        *params.args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def test_malformed_json_rpc_gets_the_spec_error_codes(tmp_path: Path) -> None:
    proc = await raw_wrap(tmp_path)
    assert proc.stdin is not None
    assert proc.stdout is not None
    lines = [
        b"{not json\n",
        b'{"jsonrpc": "1.0", "id": 7, "method": "ping"}\n',
        b'{"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"arguments": {}}}\n',
        b"[]\n",
    ]
    proc.stdin.write(b"".join(lines))
    await proc.stdin.drain()
    answers = [orjson.loads(await proc.stdout.readline()) for _ in lines]
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    codes = [(a["id"], a["error"]["code"]) for a in answers]
    assert codes == [(None, -32700), (7, -32600), (8, -32602), (None, -32600)]
    assert tools_called(tmp_path) == []


async def test_a_request_that_reuses_a_waiting_calls_id_is_refused(tmp_path: Path) -> None:
    # The child's answer names only the id: an answer to a ping carrying a call's id
    # would be recorded as the call's trusted outcome, and a failure releases a cap.
    proc = await raw_wrap(tmp_path)
    assert proc.stdin is not None
    assert proc.stdout is not None
    init = {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    }
    order = {"name": "get_order", "arguments": {"order_id": "A-1001"}}
    messages: list[Any] = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": order},
        {"jsonrpc": "2.0", "id": 7, "method": "ping"},
    ]
    proc.stdin.write(b"".join(orjson.dumps(m) + b"\n" for m in messages[:2]))
    await proc.stdin.drain()
    assert orjson.loads(await proc.stdout.readline())["id"] == 1
    proc.stdin.write(b"".join(orjson.dumps(m) + b"\n" for m in messages[2:]))
    await proc.stdin.drain()
    answers = [orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in "ab"]
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    refused = [a for a in answers if "error" in a]
    assert [(a["id"], a["error"]["code"]) for a in refused] == [(7, -32600)]
    (result,) = [a for a in answers if "result" in a]
    assert result["id"] == 7
    assert not result["result"].get("isError")
    assert tools_called(tmp_path) == ["get_order"]
    outcomes = [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "outcome"]
    assert [o["outcome"]["is_error"] for o in outcomes] == [False]
