"""``warden mcp wrap`` when the server exits, or Warden stops, with calls out.

Every request the server leaves unanswered gets Warden's JSON-RPC error
(``-32000``), and every such call an outcome record, not trusted: the server
may have acted before it went, so a spend cap keeps what it holds. What the
server wrote before it exited still reaches the client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from tests.functional.conftest import audit_records
from tests.functional.stdio_wrap import (
    audit_dir,
    text,
    tools_called,
    wrap_params,
    write_config,
)
from warden import tasks

pytestmark = pytest.mark.timeout(90)

REFUND_CAP = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 30,
    "over": "deny",
}


def configure(tmp_path: Path, **settings: Any) -> Path:
    config = write_config(tmp_path)
    doc = orjson.loads(config.read_bytes())
    config.write_bytes(orjson.dumps({**doc, "shutdown_grace_s": 1, **settings}))
    return config


def outcomes(tmp_path: Path) -> list[dict[str, Any]]:
    records = audit_records(audit_dir(tmp_path))
    return [r["outcome"] for r in records if r.get("kind") == "outcome"]


@asynccontextmanager
async def wrapped(config: Path, call_log: Path, pid_file: Path) -> AsyncIterator[ClientSession]:
    """The test server through ``warden mcp wrap``; its pid is written to ``pid_file``."""
    base = wrap_params(config, call_log, "--delay-s", "30")
    cut = base.args.index("--") + 1
    server = ["sh", "-c", 'echo $$ > "$0"; exec "$@"', str(pid_file), *base.args[cut:]]
    params = StdioServerParameters(
        command=base.command, args=[*base.args[:cut], *server], env=base.env
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def arrived(call_log: Path) -> None:
    for _ in range(400):
        if tools_called(call_log):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the call never reached the server")


async def test_a_call_out_when_the_server_dies_is_answered_and_stays_spent(
    tmp_path: Path,
) -> None:
    # Even a server whose reported failures are trusted: it said nothing.
    budgets = {"caps": [REFUND_CAP], "trusted_failures": ["support-tools"]}
    config = configure(tmp_path, budgets=budgets)
    call_log, pid_file = tmp_path / "calls.jsonl", tmp_path / "server.pid"
    refund = {"order_id": "A-1001", "amount": 20}
    async with wrapped(config, call_log, pid_file) as session:
        refunding = session.call_tool("issue_refund", refund)
        running = tasks.spawn(refunding, name="refund", awaited=True)
        await arrived(call_log)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        with pytest.raises(MCPError, match="the MCP server exited before it answered") as raised:
            await asyncio.wait_for(running, 15)
    assert raised.value.code == -32000
    (outcome,) = outcomes(tmp_path)
    assert (outcome["error"], outcome["is_error"]) == ("server_exited", True)
    # The first refund's 20 is still held: another 20 goes over the cap of 30.
    async with wrapped(config, call_log, pid_file) as session:
        again = await session.call_tool("issue_refund", refund)
    assert again.is_error
    assert "blocked the tool call `issue_refund`" in text(again)
    assert tools_called(call_log) == ["issue_refund"]


STOPPING_SERVER = textwrap.dedent(
    """
    import json, sys
    log, asked = open(sys.argv[1], "a"), []
    for line in sys.stdin:
        asked.append(json.loads(line))
        log.write(line)
        log.flush()
    # Warden is stopping (stdin closed): answer the listing and get_order as it exits.
    # A long listing comes first: Warden is still filtering it once this server has exited.
    names = ["get_order", *(f"lookup_{i}" for i in range(500))]
    tools = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names]}
    order = {"content": [{"type": "text", "text": "order A-1001: shipped"}]}
    for m in asked:
        if m["method"] == "tools/list" or m["params"]["name"] == "get_order":
            result = tools if m["method"] == "tools/list" else order
            sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": result}))
            sys.stdout.write("\\n")
    """
)


def call(id_: int, tool: str, **arguments: Any) -> dict[str, Any]:
    params = {"name": tool, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


async def test_stopping_relays_the_servers_last_answers_and_answers_the_rest(
    tmp_path: Path,
) -> None:
    server, asked = tmp_path / "stopping.py", tmp_path / "asked.jsonl"
    server.write_text(STOPPING_SERVER)
    base = wrap_params(configure(tmp_path), Path("/dev/null"))
    args = [*base.args[: base.args.index("--") + 1], sys.executable, str(server), str(asked)]
    proc = await asyncio.create_subprocess_exec(
        base.command, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        sent = [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            call(2, "get_order", order_id="A-1001"),
            call(3, "search_kb", query="refunds"),
        ]
        proc.stdin.write(b"".join(orjson.dumps(m) + b"\n" for m in sent))
        await proc.stdin.drain()
        for _ in range(400):
            if asked.exists() and len(asked.read_bytes().splitlines()) == len(sent):
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # as a supervisor stops the wrap
        left = await asyncio.wait_for(proc.stdout.read(), 30)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    answers = {a["id"]: a for a in map(orjson.loads, left.splitlines())}
    # The listing filtered as ever (the shipped policy knows no lookup_* tool).
    assert [t["name"] for t in answers[1]["result"]["tools"]] == ["get_order"]
    assert answers[2]["result"]["content"][0]["text"] == "order A-1001: shipped"
    assert answers[3]["error"]["code"] == -32000
    assert "Warden stopped before the MCP server answered" in answers[3]["error"]["message"]
    got = sorted((o["error"] or "", o["is_error"]) for o in outcomes(tmp_path))
    assert got == [("", False), ("wrap_stopped", True)]
