"""Session counters at the MCP door: the MCP session (``Mcp-Session-Id``) is the session.

The official ``mcp`` client through Warden's streamable HTTP door to a real MCP
server, with the shipped customer-support bundle: at most two account changes
per session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from prometheus_client import REGISTRY

from tests.functional.conftest import make_config
from warden.server import Warden
from warden.testing.mcp_server import StreamableHttpServer, read_call_log

pytestmark = pytest.mark.timeout(90)
UPSTREAM = "support-tools"


@pytest.fixture
async def warden(tmp_path: Path) -> AsyncIterator[Warden]:
    async with StreamableHttpServer(tmp_path / "calls.jsonl") as server:
        config = make_config(
            tmp_path,
            "http://127.0.0.1:9",
            upstreams={UPSTREAM: {"protocol": "mcp", "base_url": server.url, "timeout_s": 60}},
        )
        async with Warden(config) as running:
            yield running


@asynccontextmanager
async def connect(warden: Warden) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http,
        streamable_http_client(f"{warden.proxy_url}/{UPSTREAM}", http_client=http) as (rd, wr),
        ClientSession(rd, wr) as session,
    ):
        await session.initialize()
        yield session


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_an_mcp_session_is_counted_as_one_conversation(
    warden: Warden, tmp_path: Path
) -> None:
    close = {"customer_id": "C-1001"}
    async with connect(warden) as session:
        # Three accounts (one held call proposed again is one hold).
        first = await session.call_tool("close_account", close)
        second = await session.call_tool("close_account", {"customer_id": "C-1002"})
        third = await session.call_tool("close_account", {"customer_id": "C-1003"})
        await session.call_tool("get_order", {"order_id": "A-1001"})
    assert "held the tool call `close_account`" in text(first)
    assert "held the tool call `close_account`" in text(second)
    assert third.is_error
    assert "blocked the tool call `close_account`" in text(third)
    assert "at most 2 are allowed in one conversation" in text(third)
    # A new MCP session starts from zero.
    async with connect(warden) as fresh:
        again = await fresh.call_tool("close_account", close)
    assert "held the tool call `close_account`" in text(again)
    assert [c["tool"] for c in read_call_log(tmp_path / "calls.jsonl")] == ["get_order"]


def cache_hits() -> float:
    return REGISTRY.get_sample_value("warden_policy_cache_total", {"result": "hit"}) or 0.0


async def test_lookups_in_a_session_are_decided_from_the_cache(warden: Warden) -> None:
    # The shipped bundle counts only account changes (data.warden.sessions), so
    # the session's count of lookups is not in the cache key: the same lookup
    # again is a hit, while the account changes go on counting.
    close = {"customer_id": "C-1001"}
    async with connect(warden) as session:
        await session.call_tool("get_order", {"order_id": "A-1001"})
        before = cache_hits()
        for _ in range(3):
            assert not (await session.call_tool("get_order", {"order_id": "A-1001"})).is_error
        assert cache_hits() - before == 3
        for n in range(2):
            closing = {"customer_id": f"C-200{n}"}
            assert "held the tool call" in text(await session.call_tool("close_account", closing))
        third = await session.call_tool("close_account", close)
    assert "at most 2 are allowed in one conversation" in text(third)
