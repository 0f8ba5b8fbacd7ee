"""What the MCP doors record of a server answer that is no plain text result.

A real Warden before a scripted server (:class:`RawUpstream` over HTTP, a short
script over stdio): a JSON body that leaves an allowed call unanswered, a task
handle, and a tool result whose ``structuredContent`` says what its text does not.
Every allowed call gets an outcome record, and the record holds what the agent got.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn
from mcp import Client
from mcp.server.mcpserver import MCPServer

from tests.functional import stdio_wrap
from tests.functional.conftest import audit_records, make_config
from tests.functional.test_mcp_answers_functional import capped_config, settled
from tests.functional.test_mcp_requests_functional import ALLOW_ALL, either_door, write_bundle
from tests.functional.test_mcp_stdio_untrusted_functional import call, raw_wrap
from warden import tasks
from warden.server import Warden
from warden.testing.raw_upstream import RawReply, RawRequest, RawUpstream, json_bytes

pytestmark = pytest.mark.timeout(90)

UPSTREAM = "support-tools"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
SEARCH = {"name": "search_kb", "inputSchema": {"type": "object"}}
TASK = {"taskId": "t-1", "status": "working", "createdAt": "2026-01-01T00:00:00Z",
        "lastUpdatedAt": "2026-01-01T00:00:00Z", "ttl": 60000}  # fmt: skip
"""A 2025-11-25 ``CreateTaskResult``'s task: no ``resultType``."""
SAYS_OTHERWISE = {
    "content": [{"type": "text", "text": "no refund made"}],
    "structuredContent": {"refunded": 900, "order_id": "A-1001", "refund_token": "rt-secret"},
}
"""A tool result whose text and structured content (what code reads) disagree."""


def server_answer(message: dict[str, Any], result: Any) -> dict[str, Any] | None:
    """The scripted server: a plain MCP server whose every tool answers ``result``."""
    method, id_ = message.get("method"), message.get("id")
    if id_ is None:
        return None  # a notification
    if method == "initialize":
        hello = {
            "protocolVersion": message["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "scripted", "version": "1"},
        }
        return {"jsonrpc": "2.0", "id": id_, "result": hello}
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": id_, "result": {"tools": [SEARCH]}}
    if method == "tools/call":
        return {"jsonrpc": "2.0", "id": id_, "result": result}
    return {"jsonrpc": "2.0", "id": id_, "result": {}}


def http_server(result: Any, *, call_body: bytes | None = None) -> RawUpstream:
    """The scripted server over streamable HTTP; ``call_body``: a ``tools/call``'s whole body."""

    def responder(request: RawRequest) -> RawReply:
        message = request.json()
        if request.method != "POST":
            return RawReply(status=405 if request.method == "GET" else 200)
        members = message if isinstance(message, list) else [message]
        if call_body and any(m.get("method") == "tools/call" for m in members):
            return RawReply(body=call_body, content_type="application/json")
        answer = server_answer(message, result) if isinstance(message, dict) else None
        if answer is None:
            return RawReply(status=202)
        session = [("Mcp-Session-Id", "s1")]
        return RawReply(body=json_bytes(answer), headers=session, content_type="application/json")

    return RawUpstream(responder)


STDIO_SERVER = textwrap.dedent(
    """
    import json, sys
    result = json.loads(sys.argv[1])
    tools = [{"name": "search_kb", "inputSchema": {"type": "object"}}]
    for line in sys.stdin:
        message = json.loads(line)
        method, id_ = message.get("method"), message.get("id")
        if id_ is None:
            continue
        if method == "initialize":
            out = {"protocolVersion": message["params"]["protocolVersion"],
                   "capabilities": {"tools": {}},
                   "serverInfo": {"name": "scripted", "version": "1"}}
        elif method == "tools/list":
            out = {"tools": tools}
        elif method == "tools/call":
            out = result
        else:
            out = {}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": id_, "result": out}) + "\\n")
        sys.stdout.flush()
    """
)


def stdio_server(tmp_path: Path, result: Any) -> list[str]:
    """The scripted server as a command for ``warden mcp wrap``."""
    script = tmp_path / "scripted_server.py"
    script.write_text(STDIO_SERVER)
    return [sys.executable, str(script), orjson.dumps(result).decode()]


def outcomes(audit: Path) -> list[dict[str, Any]]:
    return [r["outcome"] for r in audit_records(audit) if r.get("kind") == "outcome"]


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]
) -> tuple[int, bytes]:
    async with http.post(url, data=orjson.dumps(body), headers={**ACCEPT, **headers}) as resp:
        return resp.status, await resp.read()


async def opened(
    http: aiohttp.ClientSession, url: str, version: str = "2025-11-25"
) -> dict[str, str]:
    """A session opened through Warden: the headers a request in it carries."""
    hello = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw"}}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
    async with http.post(url, data=orjson.dumps(init), headers=ACCEPT) as resp:
        assert resp.status == 200
        return {"Mcp-Session-Id": resp.headers["Mcp-Session-Id"], "MCP-Protocol-Version": version}


# -- a JSON body that answers no call ---------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        # The server ran the refund and says so, in a notification only.
        {"jsonrpc": "2.0", "method": "notifications/message",
         "params": {"level": "info", "data": "refund of 50 made for A-1"}},
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": "boom"}},
    ],
    ids=["notification", "error-without-id"],
)  # fmt: skip
async def test_a_json_body_answering_no_call_gives_the_call_up(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    async with (
        http_server(None, call_body=json_bytes(body)) as server,
        Warden(capped_config(tmp_path, server.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        session = await opened(http, url)
        refund = call(2, "issue_refund", order_id="A-1", amount=50)
        status, got = await post(http, url, refund, session)
        # Settled at once, not after budgets.reservation_ttl_s: the refund may have
        # run, so what the cap holds for it is spent, not released.
        held = await settled(tmp_path)
    assert (status, orjson.loads(got)) == (200, body)  # the server's body, relayed
    (outcome,) = outcomes(tmp_path / "audit")
    assert (outcome["error"], outcome["is_error"], outcome["result"]) == ("no_answer", True, None)
    assert held == (50.0, 0.0)


async def test_a_batch_answer_leaving_a_call_out_gives_that_call_up(tmp_path: Path) -> None:
    # 2025-03-26 has batches: the server answers one of the two calls it was sent.
    found = {"content": [{"type": "text", "text": "article 7"}]}
    answered = json_bytes([{"jsonrpc": "2.0", "id": 2, "result": found}])
    async with (
        http_server(None, call_body=answered) as server,
        Warden(capped_config(tmp_path, server.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        session = await opened(http, url, "2025-03-26")
        batch = [call(2, "search_kb", query="refunds"), call(3, "get_order", order_id="A-1")]
        status, got = await post(http, url, batch, session)
    assert status == 200
    assert [m["id"] for m in orjson.loads(got)] == [2]
    recorded = {
        r["action"]["tool"]: r["outcome"]
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "outcome"
    }
    assert recorded["search_kb"]["result"] == "article 7"
    unanswered = recorded["get_order"]
    assert (unanswered["error"], unanswered["is_error"]) == ("no_answer", True)


# -- a task handle ------------------------------------------------------------------


async def test_a_task_handle_over_http_is_recorded_as_accepted(tmp_path: Path) -> None:
    async with (
        http_server({"task": TASK}) as server,
        Warden(capped_config(tmp_path, server.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        session = await opened(http, url)
        status, got = await post(http, url, call(2, "search_kb", query="x"), session)
    assert status == 200
    assert orjson.loads(got)["result"] == {"task": TASK}
    (outcome,) = outcomes(tmp_path / "audit")
    assert (outcome["status"], outcome["error"], outcome["is_error"]) == (202, None, False)
    assert orjson.loads(outcome["result"]) == {"task": TASK}


async def test_a_task_handle_over_stdio_is_recorded_as_accepted(tmp_path: Path) -> None:
    config = stdio_wrap.write_config(tmp_path, bundle=write_bundle(tmp_path, ALLOW_ALL))
    async with raw_wrap(config, *stdio_server(tmp_path, {"task": TASK})) as wrap:
        await wrap.initialize()
        await wrap.send(call(2, "search_kb", query="x"))
        got = await wrap.read()
        await wrap.rest()
    assert got["result"] == {"task": TASK}
    (outcome,) = outcomes(stdio_wrap.audit_dir(tmp_path))
    assert (outcome["status"], outcome["error"], outcome["is_error"]) == (202, None, False)


# -- structured content ---------------------------------------------------------------


@pytest.mark.parametrize("door", ["http", "stdio"])
async def test_structured_content_is_recorded_as_the_agent_reads_it(
    tmp_path: Path, door: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if door == "http":
            server = await stack.enter_async_context(http_server(SAYS_OTHERWISE))
            warden = await stack.enter_async_context(Warden(capped_config(tmp_path, server.url)))
            target: Any = f"{warden.proxy_url}/{UPSTREAM}"
            audit = tmp_path / "audit"
        else:
            config = stdio_wrap.write_config(tmp_path, bundle=write_bundle(tmp_path, ALLOW_ALL))
            params = stdio_wrap.wrap_params(config, tmp_path / "calls.jsonl")
            command = stdio_server(tmp_path, SAYS_OTHERWISE)
            args = [*params.args[: params.args.index("--") + 1], *command]
            target = params.model_copy(update={"args": args})
            audit = stdio_wrap.audit_dir(tmp_path)
        async with Client(target, mode="legacy") as client:
            result = await client.call_tool("search_kb", {"query": "refunds"})
    # What the agent's code reads: a refund of 900 was made.
    assert result.structured_content == SAYS_OTHERWISE["structuredContent"]
    (outcome,) = outcomes(audit)
    recorded = orjson.loads(outcome["result"])
    assert recorded["content"] == SAYS_OTHERWISE["content"]
    # The record says so too, with the credential masked as everywhere in the log.
    assert recorded["structuredContent"] == {
        "refunded": 900,
        "order_id": "A-1001",
        "refund_token": "[redacted]",
    }
    assert not any(b"rt-secret" in p.read_bytes() for p in audit.rglob("*") if p.is_file())


@pytest.mark.parametrize("door", ["http", "stdio"])
async def test_an_sdk_servers_structured_result_is_recorded_as_its_text(
    tmp_path: Path, door: str
) -> None:
    # The official server sends a tool's dict as JSON text and as structured content:
    # the text says it all, so the record keeps it readable.
    async with contextlib.AsyncExitStack() as stack:
        target, audit = await either_door(stack, tmp_path, door, write_bundle(tmp_path, ALLOW_ALL))
        async with Client(target, mode="legacy") as client:
            result = await client.call_tool("get_order", {"order_id": "A-1001"})
    assert result.structured_content is not None
    (outcome,) = outcomes(audit)
    (block,) = result.content
    assert outcome["result"] == getattr(block, "text", None)
    assert orjson.loads(outcome["result"]) == result.structured_content


API_TOKEN = "tok-LIVE-9f8e7d6c5b4a"


@contextlib.asynccontextmanager
async def keys_server(count: int) -> AsyncIterator[str]:
    """An official SDK server on 127.0.0.1:0 whose tool returns a list of ``count`` dicts,
    each with the token; yields its URL."""
    app: MCPServer[Any] = MCPServer("keys")

    @app.tool(description="List the account's API keys")
    async def list_api_keys(account: str) -> list[dict[str, Any]]:
        return [{"name": f"key-{i}", "api_token": API_TOKEN} for i in range(count)]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    asgi = app.streamable_http_app(host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="on"))
    serving = tasks.spawn(server.serve(sockets=[sock]), name="keys-server")
    try:
        while not server.started:
            assert not serving.done()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    finally:
        server.should_exit = True
        await serving
        sock.close()


@pytest.mark.parametrize("count", [1, 2])
async def test_an_sdk_servers_list_keeps_its_token_out_of_the_log(
    tmp_path: Path, count: int
) -> None:
    # The SDK sends a list as one JSON text block per item beside {"result": [...]}:
    # recorded as its text, whose credential is masked (one item) or which is hidden
    # whole (items joined: no JSON to find it in), never the escaped text in clear.
    bundle = write_bundle(tmp_path, ALLOW_ALL)
    async with keys_server(count) as url:
        config = make_config(
            tmp_path,
            "http://127.0.0.1:9",
            upstreams={"keys": {"protocol": "mcp", "base_url": url}},
            policy={"bundles": [str(bundle)]},
        )
        async with (
            Warden(config) as warden,
            Client(f"{warden.proxy_url}/keys", mode="legacy") as client,
        ):
            got = await client.call_tool("list_api_keys", {"account": "A-1"})
    assert got.structured_content == {
        "result": [{"name": f"key-{i}", "api_token": API_TOKEN} for i in range(count)]
    }
    (outcome,) = outcomes(tmp_path / "audit")
    if count == 1:
        assert orjson.loads(outcome["result"]) == {"name": "key-0", "api_token": "[redacted]"}
    else:
        assert (outcome["result"], outcome["redacted"]) == ("[redacted]", ["result"])
    audit = tmp_path / "audit"
    assert not any(API_TOKEN.encode() in p.read_bytes() for p in audit.rglob("*") if p.is_file())
