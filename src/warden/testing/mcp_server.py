"""A real MCP server for tests and the demo, built with the official SDK.

It serves the customer-support tools of :mod:`warden.testing.mock_tools`
(search_kb, get_order, issue_refund, close_account) with the same data and
semantics, through the SDK's ``MCPServer`` (FastMCP before mcp 2). Run it over
stdio with::

    python -m warden.testing.mcp_server --call-log calls.jsonl

Every call that reaches a tool is appended to the call log as one JSON line,
before the tool runs, so a test can prove a denied call never arrived.
Needs the ``testing`` extra (``pip install agent-warden[testing]``).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from warden.testing.mock_tools import TOOLS, MockTools

__all__ = ["build_server", "main", "read_call_log"]


def build_server(call_log: Path | None = None, delay_s: float = 0.0) -> MCPServer[Any]:
    """An MCP server with the support tools; calls are appended to ``call_log``.

    ``delay_s``: each call waits this long after it is logged, before the tool
    runs (a call in flight, for kill-switch tests).
    """
    tools = MockTools()
    server: MCPServer[Any] = MCPServer("warden-support-tools")

    async def run(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        if call_log is not None:
            line = orjson.dumps({"tool": name, "arguments": dict(arguments)}) + b"\n"
            with call_log.open("ab") as log:
                log.write(line)
        if delay_s:
            await asyncio.sleep(delay_s)
        status, body = tools.call(name, arguments)
        if status >= 400:
            raise ToolError(str(body.get("error", {}).get("message", body)))
        return body

    @server.tool(description=TOOLS["search_kb"].description)
    async def search_kb(query: str) -> dict[str, Any]:
        return await run("search_kb", {"query": query})

    @server.tool(description=TOOLS["get_order"].description)
    async def get_order(order_id: str) -> dict[str, Any]:
        return await run("get_order", {"order_id": order_id})

    @server.tool(description=TOOLS["issue_refund"].description)
    async def issue_refund(order_id: str, amount: float, reason: str = "") -> dict[str, Any]:
        return await run("issue_refund", {"order_id": order_id, "amount": amount, "reason": reason})

    @server.tool(description=TOOLS["close_account"].description)
    async def close_account(customer_id: str, reason: str = "") -> dict[str, Any]:
        return await run("close_account", {"customer_id": customer_id, "reason": reason})

    return server


def read_call_log(path: Path) -> list[dict[str, Any]]:
    """The calls a server run with ``--call-log path`` received, oldest first."""
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the support tools over stdio."""
    parser = argparse.ArgumentParser(prog="python -m warden.testing.mcp_server")
    parser.add_argument("--call-log", type=Path, help="append each tool call here (JSON lines)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="wait before each tool runs")
    args = parser.parse_args(argv)
    build_server(args.call_log, args.delay_s).run("stdio")


if __name__ == "__main__":
    main()
