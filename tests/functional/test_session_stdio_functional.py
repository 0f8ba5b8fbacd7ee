"""Session counters over MCP stdio: one ``warden mcp wrap`` run is one session.

The official ``mcp`` client through the real wrap process around the MCP test
server, with the shipped customer-support bundle: at most two account changes
(allowed or held) in one conversation, the third denied, as over MCP HTTP
(``test_session_mcp_functional``). A run names a fresh session of its own, or
the one ``--session`` names: wraps naming the same one share its counts
through the state store.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client

from tests.functional.conftest import audit_records
from tests.functional.stdio_wrap import audit_dir, text, tools_called, wrap_params, write_config

pytestmark = pytest.mark.timeout(90)

LIMIT = "at most 2 are allowed in one conversation"
_ACCOUNTS = itertools.count(1001)


@asynccontextmanager
async def wrapped(config: Path, call_log: Path, *wrap_args: str) -> AsyncIterator[ClientSession]:
    """An initialised client session through ``warden mcp wrap [wrap_args] -- server``."""
    params = wrap_params(config, call_log)
    cut = params.args.index("--")
    params.args = [*params.args[:cut], *wrap_args, *params.args[cut:]]
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def close_accounts(session: ClientSession, times: int) -> list[types.CallToolResult]:
    # Each another account: one held call proposed again is one hold.
    return [
        await session.call_tool("close_account", {"customer_id": f"C-{next(_ACCOUNTS)}"})
        for _ in range(times)
    ]


def held(result: types.CallToolResult) -> bool:
    return "held the tool call `close_account`" in text(result)


def limited(result: types.CallToolResult) -> bool:
    said = text(result)
    return result.is_error and "blocked the tool call `close_account`" in said and LIMIT in said


def sessions(tmp_path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(tool, input.session) of every tool-call decision, in log order."""
    out = []
    for record in audit_records(audit_dir(tmp_path)):
        if record.get("kind") == "decision" and record["action"]["kind"] == "tool_call":
            out.append((record["action"]["tool"], record["decision"]["input"]["session"]))
    return out


async def test_one_wrap_run_is_one_session_and_the_next_starts_afresh(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    calls = tmp_path / "calls.jsonl"
    async with wrapped(config, calls) as session:
        first, second, third = await close_accounts(session, 3)
        lookup = await session.call_tool("get_order", {"order_id": "A-1001"})
    assert held(first)
    assert held(second)
    assert limited(third), text(third)
    assert not lookup.is_error
    # A new run is a new connection: a session of its own, from zero.
    async with wrapped(config, calls) as fresh:
        (again,) = await close_accounts(fresh, 1)
    assert held(again), text(again)
    assert tools_called(calls) == ["get_order"]
    seen = sessions(tmp_path)
    assert [tool for tool, _ in seen] == ["close_account"] * 3 + ["get_order", "close_account"]
    ids = [facts["id"] for _, facts in seen]
    assert len(set(ids[:4])) == 1
    assert ids[4] != ids[0]
    assert all(i.startswith("ses_") for i in ids)
    assert {facts["source"] for _, facts in seen} == {"mcp"}
    assert [facts["held"].get("close_account", 0) for _, facts in seen] == [0, 1, 2, 2, 0]
    assert seen[0][1]["conversation"] is False


async def test_wraps_naming_one_session_share_its_counts(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    calls = tmp_path / "calls.jsonl"
    async with wrapped(config, calls, "--session", "desk-1") as session:
        first, second = await close_accounts(session, 2)
    assert held(first)
    assert held(second)
    # Another run (the same desktop agent's other server) naming the same
    # session carries on, through the state store both share.
    async with wrapped(config, calls, "--session", "desk-1") as same:
        (third,) = await close_accounts(same, 1)
    assert limited(third), text(third)
    async with wrapped(config, calls, "--session", "desk-2") as other:
        (elsewhere,) = await close_accounts(other, 1)
    assert held(elsewhere), text(elsewhere)
    seen = sessions(tmp_path)
    assert [(f["id"], f["source"]) for _, f in seen] == [("desk-1", "wrap")] * 3 + [
        ("desk-2", "wrap")
    ]
    assert tools_called(calls) == []


@pytest.mark.parametrize("name", ["", "   ", "tab\there", "x" * 201])
async def test_a_session_name_the_doors_would_not_take_is_refused_at_start(
    tmp_path: Path, name: str
) -> None:
    config = write_config(tmp_path)
    started = tmp_path / "started"
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "warden.cli", "mcp", "wrap", "--config", str(config)],
        *["--session", name, "--", sys.executable, "-c", f"open({str(started)!r}, 'w')"],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "--session must be 1 to 200 printable characters" in err.decode()
    assert out == b""
    assert not started.exists()  # the server was never launched
