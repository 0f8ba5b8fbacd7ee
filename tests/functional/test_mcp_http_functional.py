"""MCP over streamable HTTP: the official ``mcp`` client through Warden to a real MCP server.

The server is :mod:`warden.testing.mcp_server` (the SDK's MCPServer served by
uvicorn on 127.0.0.1:0), whose call log proves what reached it. Warden runs
in-process with an upstream ``support-tools`` of ``protocol: mcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx2
import orjson
import pytest
from aiohttp import web
from mcp import types
from mcp.client.context import ClientRequestContext
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from tests.functional.conftest import audit_records, make_config
from warden import owners, tasks
from warden.config import Config
from warden.ingress.door_mark import VIA_HEADER, mark
from warden.server import Warden
from warden.state.sessions import SessionStore
from warden.testing._server import LoopbackServer
from warden.testing.mcp_server import StreamableHttpServer, read_call_log
from warden.testing.raw_upstream import RawReply, RawUpstream, json_bytes

pytestmark = pytest.mark.timeout(90)

UPSTREAM = "support-tools"
TOKENS = {"dana": "tok-dana-approver", "root": "tok-root-admin"}
AGENT_KEYS = {"refunds-bot": "key-refunds-bot"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config(tmp_path: Path, server_url: str, **overrides: Any) -> Config:
    tokens = [
        {"subject": "dana", "roles": ["approver"], "groups": ["support-leads"],
         "sha256": sha(TOKENS["dana"])},
        {"subject": "root", "roles": ["admin"], "sha256": sha(TOKENS["root"])},
    ]  # fmt: skip
    base: dict[str, Any] = {
        "upstreams": {UPSTREAM: {"protocol": "mcp", "base_url": server_url, "timeout_s": 60}},
        "admin": {"tokens": tokens},
        "identity": {"agents": {a: {"key_sha256": [sha(k)]} for a, k in AGENT_KEYS.items()}},
    }
    return make_config(tmp_path, "http://127.0.0.1:9", **{**base, **overrides})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[StreamableHttpServer]:
    async with StreamableHttpServer(tmp_path / "calls.jsonl") as running:
        yield running


@pytest.fixture
async def warden(tmp_path: Path, server: StreamableHttpServer) -> AsyncIterator[Warden]:
    async with Warden(config(tmp_path, server.url)) as running:
        yield running


def agent_headers(agent: str | None) -> dict[str, str]:
    if agent is None:
        return {}
    return {"X-Warden-Agent": agent, "X-Warden-Agent-Key": AGENT_KEYS[agent]}


@asynccontextmanager
async def connect(
    warden: Warden, agent: str | None = None, **session_args: Any
) -> AsyncIterator[ClientSession]:
    """The official client's streamable HTTP transport, pointed at Warden's MCP route."""
    timeout = httpx2.Timeout(30, read=60)
    async with (
        httpx2.AsyncClient(headers=agent_headers(agent), timeout=timeout) as http,
        streamable_http_client(f"{warden.proxy_url}/{UPSTREAM}", http_client=http) as (rd, wr),
        ClientSession(rd, wr, **session_args) as session,
    ):
        await session.initialize()
        yield session


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def tools_called(tmp_path: Path) -> list[str]:
    return [c["tool"] for c in read_call_log(tmp_path / "calls.jsonl")]


def records(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r.get("kind") == kind]


async def verify_audit(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "warden.cli", "audit", "verify", "--dir", str(tmp_path / "audit")]
    proc = await asyncio.create_subprocess_exec(
        *cli, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    said, _ = await proc.communicate()
    assert proc.returncode == 0, said.decode()


async def admin(warden: Warden, method: str, path: str, who: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, warden.admin_url + path, json=body, headers=headers) as resp,
    ):
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def pending_one(warden: Warden) -> dict[str, Any]:
    for _ in range(400):
        body = await admin(warden, "GET", "/v1/approvals?status=pending", "dana")
        if body["approvals"]:
            return dict(body["approvals"][0])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


async def arrived(tmp_path: Path) -> None:
    """Return once the server's call log shows a call."""
    for _ in range(400):
        if tools_called(tmp_path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the call never reached the server")


# -- allowed, denied, audited ----------------------------------------------------


async def test_allowed_call_returns_the_servers_result_as_a_trusted_outcome(
    warden: Warden, tmp_path: Path
) -> None:
    async with connect(warden) as session:
        result = await session.call_tool("get_order", {"order_id": "A-1001"})
        again = await session.call_tool("search_kb", {"query": "refund policy"})
    assert not result.is_error, text(result)
    assert "A-1001" in text(result)
    assert not again.is_error
    assert tools_called(tmp_path) == ["get_order", "search_kb"]
    await warden.stop()
    decisions = records(tmp_path, "decision")
    assert [d["action"]["tool"] for d in decisions] == ["get_order", "search_kb"]
    assert {d["action"]["protocol"] for d in decisions} == {"mcp"}
    assert {d["action"]["request"]["upstream"] for d in decisions} == {UPSTREAM}
    outcomes = records(tmp_path, "outcome")
    assert len(outcomes) == 2
    assert "A-1001" in orjson.dumps(outcomes).decode()


async def test_denied_call_is_answered_by_warden_and_never_reaches_the_server(
    warden: Warden, tmp_path: Path
) -> None:
    async with connect(warden) as session:
        refused = await session.call_tool("issue_refund", {"order_id": "A-1001", "amount": -5})
        held = await session.call_tool("close_account", {"customer_id": "C-1001"})
        after = await session.call_tool("search_kb", {"query": "refund policy"})
    assert refused.is_error
    assert "blocked the tool call `issue_refund`" in text(refused)
    assert "more than 0" in text(refused)
    # approvals.mode is defer in these tests: answered at once with the approval id.
    assert held.is_error
    assert "held the tool call `close_account`" in text(held)
    assert not after.is_error
    assert tools_called(tmp_path) == ["search_kb"]
    await warden.stop()
    decisions = records(tmp_path, "decision")
    assert [d["decision"]["effect"] for d in decisions] == ["deny", "require_approval", "allow"]
    assert decisions[0]["decision"]["id"] in text(refused)
    # The agent's MCP auth header never lands in the record.
    assert "authorization" not in orjson.dumps(decisions).decode().lower()
    await verify_audit(tmp_path)


async def test_an_argument_spelled_otherwise_than_listed_is_denied(
    warden: Warden, tmp_path: Path
) -> None:
    # A policy reading input.arguments.order_id finds nothing under ORDER_ID, while a
    # Go server binding arguments to a struct reads it as order_id.
    async with connect(warden) as session:
        unlisted = await session.call_tool("get_order", {"order_id": "A-1001"})
        listing = await session.list_tools()
        bent = await session.call_tool("get_order", {"ORDER_ID": "A-1001"})
        exact = await session.call_tool("get_order", {"order_id": "A-1002"})
    assert (
        "order_id"
        in next(t for t in listing.tools if t.name == "get_order").input_schema["properties"]
    )
    assert not unlisted.is_error
    assert not exact.is_error
    assert bent.is_error
    assert "spelled otherwise than the tool's schema" in text(bent)
    assert [c["arguments"]["order_id"] for c in read_call_log(tmp_path / "calls.jsonl")] == [
        "A-1001",
        "A-1002",
    ]


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_a_stateless_server_is_governed_the_same(tmp_path: Path, json_response: bool) -> None:
    # A server without sessions (the SDK's stateless_http): no Mcp-Session-Id
    # on any answer, each POST on its own; Warden decides every call the same.
    async with (
        StreamableHttpServer(
            tmp_path / "calls.jsonl", json_response=json_response, stateless=True
        ) as server,
        Warden(config(tmp_path, server.url)) as warden,
    ):
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{warden.proxy_url}/{UPSTREAM}", json=INIT, headers=ACCEPT) as first,
        ):
            # Read (and so released) here: an unreleased response warns when collected.
            body = await first.text()
            assert first.status == 200, body
            assert "Mcp-Session-Id" not in first.headers
        async with connect(warden) as session:
            result = await session.call_tool("get_order", {"order_id": "A-1001"})
            refused = await session.call_tool("issue_refund", {"order_id": "A-1", "amount": -5})
            tools = {t.name for t in (await session.list_tools()).tools}
    assert not result.is_error, text(result)
    assert "A-1001" in text(result)
    assert refused.is_error
    assert "blocked the tool call `issue_refund`" in text(refused)
    assert "search_kb" in tools
    assert tools_called(tmp_path) == ["get_order"]
    await warden.stop()
    decisions = records(tmp_path, "decision")
    assert [d["decision"]["effect"] for d in decisions] == ["allow", "deny"]
    assert len(records(tmp_path, "outcome")) == 1
    await verify_audit(tmp_path)


# -- approvals -------------------------------------------------------------------


@pytest.fixture
async def holding(tmp_path: Path, server: StreamableHttpServer) -> AsyncIterator[Warden]:
    cfg = config(tmp_path, server.url, approvals={"mode": "hold", "keepalive_s": 0.2})
    async with Warden(cfg) as running:
        yield running


async def test_held_refund_runs_once_after_approval_with_progress_meanwhile(
    holding: Warden, tmp_path: Path
) -> None:
    notes: list[tuple[float, str | None]] = []
    told_twice = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, message))
        if len(notes) >= 2:
            told_twice.set()

    args: dict[str, Any] = {"order_id": "A-1003", "amount": 450}
    async with connect(holding) as session:
        call = session.call_tool("issue_refund", args, progress_callback=on_progress)
        running = tasks.spawn(call, name="held-call")
        item = await pending_one(holding)
        assert item["tool"] == "issue_refund"
        assert item["arguments"]["amount"] == 450
        await asyncio.wait_for(told_twice.wait(), 30)  # told it waits, more than once
        assert not running.done()
        assert tools_called(tmp_path) == []
        await admin(holding, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        result = await asyncio.wait_for(running, 30)
    assert not result.is_error, text(result)
    assert "A-1003" in text(result)
    assert tools_called(tmp_path) == ["issue_refund"]
    assert [n[0] for n in notes] == sorted({n[0] for n in notes})  # increasing
    assert "waiting for a person to approve" in (notes[0][1] or "")
    await holding.stop()
    approved = [r for r in records(tmp_path, "decision") if r["decision"]["guard"] == "approval"]
    assert approved[0]["decision"]["effect"] == "allow"
    assert approved[0]["approval"]["approver"] == "dana"
    await verify_audit(tmp_path)


async def test_a_held_call_in_a_batch_is_told_it_waits_then_runs_once(
    holding: Warden, tmp_path: Path
) -> None:
    url = f"{holding.proxy_url}/{UPSTREAM}"

    def call(id_: int, tool: str, arguments: dict[str, Any], **meta: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"name": tool, "arguments": arguments}
        if meta:
            params["_meta"] = meta
        return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}

    async with aiohttp.ClientSession() as http:
        # Batches are from the 2025-03-26 revision (later ones dropped them).
        init = orjson.loads(orjson.dumps(INIT))
        init["params"]["protocolVersion"] = "2025-03-26"
        async with http.post(url, json=init, headers=ACCEPT) as first:
            assert first.status == 200, await first.text()
            headers = {**ACCEPT, "Mcp-Session-Id": first.headers["Mcp-Session-Id"]}
            await first.read()
        ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(url, json=ready, headers=headers) as done:
            assert done.status == 202
        batch = [
            call(2, "issue_refund", {"order_id": "A-1003", "amount": 450}, progressToken="p-2"),
            call(3, "issue_refund", {"order_id": "A-1004", "amount": -5}),  # denied
        ]
        events: list[Any] = []
        async with http.post(url, json=batch, headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            item = await pending_one(holding)
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(orjson.loads(line[6:]))
                    if len(events) == 1:  # told it waits: now a person approves
                        assert tools_called(tmp_path) == []
                        path = f"/v1/approvals/{item['id']}/approve"
                        await admin(holding, "POST", path, "dana", {})
    notes = [e for e in events if isinstance(e, dict) and e.get("method")]
    answers = [a for e in events for a in (e if isinstance(e, list) else [e]) if "id" in a]
    assert notes[0]["method"] == "notifications/progress"
    assert notes[0]["params"]["progressToken"] == "p-2"
    assert "waiting for a person to approve" in notes[0]["params"]["message"]
    by_id = {a["id"]: a for a in answers}
    assert sorted(by_id) == [2, 3]
    assert not by_id[2]["result"].get("isError"), by_id[2]
    assert "A-1003" in orjson.dumps(by_id[2]["result"]).decode()
    assert by_id[3]["result"]["isError"] is True
    # Only the approved member reached the server (on its own: it has no batches).
    assert tools_called(tmp_path) == ["issue_refund"]


async def test_a_held_batch_member_the_client_cancels_is_answered_cancelled(
    holding: Warden, tmp_path: Path
) -> None:
    url = f"{holding.proxy_url}/{UPSTREAM}"
    async with aiohttp.ClientSession() as http:
        init = orjson.loads(orjson.dumps(INIT))
        init["params"]["protocolVersion"] = "2025-03-26"
        async with http.post(url, json=init, headers=ACCEPT) as first:
            headers = {**ACCEPT, "Mcp-Session-Id": first.headers["Mcp-Session-Id"]}
            await first.read()
        ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(url, json=ready, headers=headers) as done:
            assert done.status == 202
        params = {"name": "issue_refund", "arguments": {"order_id": "A-1003", "amount": 450}}
        batch = [
            {"jsonrpc": "2.0", "id": "r-7", "method": "tools/call", "params": params},
            {"jsonrpc": "2.0", "id": 8, "method": "ping"},
        ]
        async with http.post(url, json=batch, headers=headers) as resp:
            item = await pending_one(holding)
            # "7" would not name it: ids are compared as the server reads them.
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                      "params": {"requestId": "r-7", "reason": "user gave up"}}  # fmt: skip
            async with http.post(url, json=cancel, headers=headers) as told:
                assert told.status == 202
            answers: list[Any] = []

            async def read() -> None:
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        event = orjson.loads(line[6:])
                        answers.extend(event if isinstance(event, list) else [event])

            await asyncio.wait_for(read(), 20)  # ended by the cancellation, not the approval
        await admin(holding, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
    by_id = {a["id"]: a for a in answers if "id" in a}
    assert by_id["r-7"]["error"] == {"code": -32800, "message": "Request cancelled"}
    assert by_id[8]["result"] == {}
    assert tools_called(tmp_path) == []


async def test_rejected_refund_never_runs(holding: Warden, tmp_path: Path) -> None:
    async with connect(holding) as session:
        call = session.call_tool("issue_refund", {"order_id": "A-1003", "amount": 450})
        running = tasks.spawn(call, name="held-call")
        item = await pending_one(holding)
        body = {"comment": "duplicate"}
        await admin(holding, "POST", f"/v1/approvals/{item['id']}/reject", "dana", body)
        result = await asyncio.wait_for(running, 30)
    assert result.is_error
    assert "duplicate" in text(result)
    assert tools_called(tmp_path) == []


async def test_a_held_call_the_client_cancels_never_runs_and_its_retry_runs_once(
    holding: Warden, tmp_path: Path
) -> None:
    args: dict[str, Any] = {"order_id": "A-1003", "amount": 450}
    async with connect(holding) as session:
        held = tasks.spawn(session.call_tool("issue_refund", args), name="abandoned-refund")
        item = await pending_one(holding)
        held.cancel()  # the SDK tells Warden: notifications/cancelled, on a POST of its own
        # The hold ends; its approval stays decidable, as a deferral.
        for _ in range(200):
            waiting = await admin(holding, "GET", f"/v1/approvals/{item['id']}", "dana")
            if waiting["mode"] == "defer":
                break
            await asyncio.sleep(0.05)
        assert waiting["mode"] == "defer"
        assert waiting["status"] == "pending"
        await admin(holding, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        await session.send_ping()  # the session still works
        assert tools_called(tmp_path) == []  # the cancelled call did not run when approved
        retried = await session.call_tool("issue_refund", args)
    assert held.cancelled()
    assert not retried.is_error, text(retried)
    assert tools_called(tmp_path) == ["issue_refund"]
    await holding.stop()
    await verify_audit(tmp_path)


# -- tools/list, sessions, server-to-client requests -----------------------------

LEADS_ONLY = """package warden

import rego.v1

decision := {"effect": "deny", "reason": "only support leads close accounts"} if {
\tinput.action.tool == "close_account"
\tinput.agent.id != "support-triage"
} else := {"effect": "allow", "reason": "allowed"}
"""


def leads_only(tmp_path: Path) -> dict[str, Any]:
    """A policy that allows everything but close_account, which only support-triage may use."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(LEADS_ONLY)
    return {"bundles": [str(bundle)], "workers": 1, "watch": False, "deadline_ms": 5000}


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_tools_list_is_filtered_per_agent(tmp_path: Path, json_response: bool) -> None:
    async with (
        StreamableHttpServer(tmp_path / "calls.jsonl", json_response=json_response) as server,
        Warden(config(tmp_path, server.url, policy=leads_only(tmp_path))) as warden,
    ):
        async with connect(warden) as lead:
            lead_tools = {t.name for t in (await lead.list_tools()).tools}
        async with connect(warden, "refunds-bot") as bot:
            bot_tools = {t.name for t in (await bot.list_tools()).tools}
            refused = await bot.call_tool("close_account", {"customer_id": "C-1"})
    assert {"search_kb", "issue_refund", "close_account"} <= lead_tools
    assert bot_tools == lead_tools - {"close_account"}
    assert refused.is_error  # hidden or not, a call is still decided
    assert tools_called(tmp_path) == []


async def test_server_to_client_request_passes_both_ways(
    tmp_path: Path, server: StreamableHttpServer
) -> None:
    asked: list[str] = []

    async def elicit(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    async with (
        Warden(config(tmp_path, server.url, policy=leads_only(tmp_path))) as warden,
        connect(warden, elicitation_callback=elicit) as session,
    ):
        result = await session.call_tool("confirm_with_user", {"action": "refund A-1001"})
    assert not result.is_error, text(result)
    assert asked == ["Go ahead with: refund A-1001?"]
    assert '"confirmed":true' in text(result).replace(" ", "")
    assert tools_called(tmp_path) == ["confirm_with_user"]


async def test_a_sampling_answer_that_proposes_tool_calls_never_reaches_the_server(
    tmp_path: Path, server: StreamableHttpServer
) -> None:
    # The server runs the tool_use blocks of the client's sampling answer itself:
    # a tool call Warden would pass undecided. The server gets an error instead.
    async def model(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResultWithTools:
        assert params.tools is not None
        refund = {"order_id": "A-1001", "amount": 5000}
        use = types.ToolUseContent(id="toolu_1", name="issue_refund", input=refund)
        return types.CreateMessageResultWithTools(
            role="assistant", content=[use], model="m", stop_reason="toolUse"
        )

    tools = types.SamplingCapability(tools=types.SamplingToolsCapability())
    async with (
        Warden(config(tmp_path, server.url, policy=leads_only(tmp_path))) as warden,
        connect(warden, sampling_callback=model, sampling_capabilities=tools) as session,
    ):
        # The server's sampling request fails with Warden's error, and so does its tool.
        with pytest.raises(MCPError, match="does not govern tool use in sampling"):
            await session.call_tool("triage_with_model", {"request": "refund A-1001"})
    assert tools_called(tmp_path) == []


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(url, data=data, headers={**ACCEPT, **(headers or {})}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def initialized(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Open an MCP session through ``url`` with raw requests; its headers for what follows."""
    _, headers, _ = await post(http, url, INIT)
    session = {
        "Mcp-Session-Id": headers["mcp-session-id"],
        "MCP-Protocol-Version": "2025-11-25",
    }
    await post(http, url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    return session


def sse_messages(raw: bytes) -> list[dict[str, Any]]:
    lines = raw.decode().splitlines()
    return [
        orjson.loads(line[5:]) for line in lines if line.startswith("data:") and line[5:].strip()
    ]


async def test_session_id_and_protocol_version_pass_both_ways(
    warden: Warden, tmp_path: Path
) -> None:
    url = f"{warden.proxy_url}/{UPSTREAM}"
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await post(http, url, INIT)
        assert status == 200
        session = headers["mcp-session-id"]
        version = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        status, _, body = await post(http, url, note, version)
        assert (status, body) == (202, b"")
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "get_order", "arguments": {"order_id": "A-1001"}}}  # fmt: skip
        status, headers, body = await post(http, url, call, version)
        assert status == 200
        assert headers["X-Warden-Decision-Id"].startswith("dec_")
        (answer,) = [m for m in sse_messages(body) if m.get("id") == 2]
        assert "A-1001" in orjson.dumps(answer).decode()
        # The server does not know this session: its 404 reaches the client unchanged.
        status, _, _ = await post(http, url, {**call, "id": 3}, {**version, "Mcp-Session-Id": "x"})
        assert status == 404
        # A bad protocol version is the server's to refuse (400), relayed.
        bad = {**version, "MCP-Protocol-Version": "1999-01-01"}
        status, _, _ = await post(http, url, {**call, "id": 4}, bad)
        assert status == 400
        # DELETE ends the session; the server then forgets it.
        async with http.delete(url, headers=version) as resp:
            assert resp.status == 200
        status, _, _ = await post(http, url, {**call, "id": 5}, version)
        assert status == 404
    # The call under the unknown session was decided (allowed) but refused by the server.
    assert tools_called(tmp_path) == ["get_order"]


async def test_a_session_is_the_agents_that_opened_it(warden: Warden, tmp_path: Path) -> None:
    url = f"{warden.proxy_url}/{UPSTREAM}"
    async with aiohttp.ClientSession() as http:
        _, headers, _ = await post(http, url, INIT)  # opened by the sidecar's own agent
        mine = {"Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await post(http, url, note, mine))[0] == 202
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "get_order", "arguments": {"order_id": "A-1001"}}}  # fmt: skip
        # Another agent naming it: answered as for a session that does not exist.
        theirs = {**mine, **agent_headers("refunds-bot")}
        status, _, body = await post(http, url, call, theirs)
        assert status == 404
        assert orjson.loads(body)["error"]["data"]["warden"] == "session_not_found"
        async with http.get(url, headers={"Accept": "text/event-stream", **theirs}) as resp:
            assert resp.status == 404
        async with http.delete(url, headers=theirs) as resp:
            assert resp.status == 404
        # Named twice, the server might read the other one: refused.
        twice = CIMultiDict({**ACCEPT, **mine})
        twice.add("Mcp-Session-Id", "another")
        async with http.post(url, data=orjson.dumps(call), headers=twice) as resp:
            assert resp.status == 400
        # The agent that opened it carries on; nothing of the other's reached the server.
        status, _, _ = await post(http, url, call, mine)
        assert status == 200
    assert tools_called(tmp_path) == ["get_order"]


async def test_an_agent_opening_sessions_without_end_pushes_out_only_its_own_from_memory(
    warden: Warden, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owners, "MAX_REMEMBERED_PER_AGENT", 2)
    url = f"{warden.proxy_url}/{UPSTREAM}"
    version = {"MCP-Protocol-Version": "2025-11-25"}
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with aiohttp.ClientSession() as http:

        async def opened(agent: str | None) -> dict[str, str]:
            _, headers, _ = await post(http, url, INIT, agent_headers(agent))
            return {"Mcp-Session-Id": headers["mcp-session-id"], **version}

        mine = await opened(None)
        bots = [await opened("refunds-bot") for _ in range(3)]
        bot = agent_headers("refunds-bot")
        assert (await post(http, url, listing, {**mine, **bot}))[0] == 404  # still mine
        # The bot's oldest left this process's memory, not the state store: still the bot's.
        assert (await post(http, url, listing, bots[0]))[0] == 404
        assert (await post(http, url, listing, {**bots[0], **bot}))[0] == 200
        assert (await post(http, url, listing, bots[2]))[0] == 404


async def test_a_session_stays_its_agents_after_a_restart(
    tmp_path: Path, server: StreamableHttpServer
) -> None:
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with aiohttp.ClientSession() as http:
        async with Warden(config(tmp_path, server.url)) as first:
            url = f"{first.proxy_url}/{UPSTREAM}"
            _, headers, _ = await post(http, url, INIT, agent_headers("refunds-bot"))
        theirs = {"Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        # The server still has the session; a new Warden on the same state knows its owner.
        async with Warden(config(tmp_path, server.url)) as second:
            url = f"{second.proxy_url}/{UPSTREAM}"
            status, _, body = await post(http, url, listing, theirs)  # the sidecar's own agent
            assert status == 404
            assert orjson.loads(body)["error"]["data"]["warden"] == "session_not_found"
            status, _, _ = await post(
                http, url, listing, {**theirs, **agent_headers("refunds-bot")}
            )
            assert status == 200
            # A session Warden never saw opened is the first agent's to name it.
            _, headers, _ = await post(http, server.url, INIT)  # opened around Warden
            unseen = {**theirs, "Mcp-Session-Id": headers["mcp-session-id"]}
            assert (await post(http, url, listing, unseen))[0] == 200
            bot_too = {**unseen, **agent_headers("refunds-bot")}
            assert (await post(http, url, listing, bot_too))[0] == 404


async def test_with_fallback_an_outage_leaves_sessions_unbound_not_refused(
    tmp_path: Path, server: StreamableHttpServer
) -> None:
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    fallback = config(tmp_path, server.url, state={"on_unavailable": "fallback"})
    async with Warden(fallback) as warden, aiohttp.ClientSession() as http:
        url = f"{warden.proxy_url}/{UPSTREAM}"
        assert warden._state is not None
        assert warden._state.sessions is not None
        await cast(SessionStore, warden._state.sessions).close()  # the store is gone
        status, headers, _ = await post(http, url, INIT)
        assert status == 200  # MCP goes on, as the server alone would, for the outage
        opened = {"Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        assert (await post(http, url, listing, opened))[0] == 200


async def test_a_session_id_given_out_twice_is_not_handed_to_a_second_agent(
    tmp_path: Path,
) -> None:
    # A server that reuses session ids (a counter reset by a restart, one fixed id).
    init_answer = json_bytes({"jsonrpc": "2.0", "id": 1, "result": {"capabilities": {}}})
    reused = RawReply(
        body=init_answer, headers=[("Mcp-Session-Id", "sess-1")], content_type="application/json"
    )
    async with RawUpstream() as up:
        up.script(reused, reused)
        async with Warden(config(tmp_path, up.url)) as warden, aiohttp.ClientSession() as http:
            url = f"{warden.proxy_url}/{UPSTREAM}"
            status, headers, _ = await post(http, url, INIT)  # the sidecar's own agent
            assert (status, headers.get("Mcp-Session-Id")) == (200, "sess-1")
            status, headers, body = await post(http, url, INIT, agent_headers("refunds-bot"))
            assert status == 502
            assert "mcp-session-id" not in {k.lower() for k in headers}
            assert "another agent holds" in orjson.loads(body)["error"]["message"]


async def test_a_result_holding_a_lone_surrogate_is_still_recorded(tmp_path: Path) -> None:
    # "\ud800" is valid JSON but no character: the outcome of the call it answers
    # must be in the log all the same, not lost to an encoding error.
    def responder(request: Any) -> RawReply:
        message = request.json()
        if message.get("method") == "initialize":
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"capabilities": {}}}
            return RawReply(
                body=json_bytes(answer),
                headers=[("Mcp-Session-Id", "s1")],
                content_type="application/json",
            )
        text = b'{"type":"text","text":"found \\ud800"}'
        body = b'{"jsonrpc":"2.0","id":%d,"result":{"content":[%s]}}' % (message["id"], text)
        return RawReply(body=body, content_type="application/json")

    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "search_kb", "arguments": {"query": "x"}}}  # fmt: skip
    async with (
        RawUpstream(responder) as up,
        Warden(config(tmp_path, up.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        _, headers, _ = await post(http, url, INIT)
        session = {k.lower(): v for k, v in headers.items()}["mcp-session-id"]
        opened = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        status, _, _ = await post(http, url, call, opened)
        assert status == 200
    (outcome,) = records(tmp_path, "outcome")
    assert outcome["outcome"]["result"] == "found \ufffd"


async def test_naming_ids_the_server_does_not_know_claims_nothing(
    warden: Warden, tmp_path: Path, server: StreamableHttpServer
) -> None:
    url = f"{warden.proxy_url}/{UPSTREAM}"
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    version = {"MCP-Protocol-Version": "2025-11-25"}
    async with aiohttp.ClientSession() as http:
        # The bot names ids nobody issued yet: the server refuses them, nothing is kept.
        for n in range(5):
            named = {"Mcp-Session-Id": f"guess-{n}", **version, **agent_headers("refunds-bot")}
            assert (await post(http, url, listing, named))[0] == 404
        assert warden._state is not None
        assert warden._state.sessions is not None
        for n in range(5):
            assert await warden._state.sessions.id_owner(f"mcp:{server.url}", f"guess-{n}") is None
        # A session opened around Warden is the agent's whose request the server accepts.
        _, headers, _ = await post(http, server.url, INIT)
        around = {"Mcp-Session-Id": headers["mcp-session-id"], **version}
        async with http.get(url, headers={"Accept": "text/event-stream", **around}) as resp:
            assert resp.status == 200
        owner = await warden._state.sessions.id_owner(f"mcp:{server.url}", around["Mcp-Session-Id"])
        assert owner == warden.config.agent.id
        assert (await post(http, url, listing, {**around, **agent_headers("refunds-bot")}))[
            0
        ] == 404


async def test_two_upstream_entries_for_one_server_share_its_owners(
    tmp_path: Path, server: StreamableHttpServer
) -> None:
    same = {"protocol": "mcp", "base_url": server.url, "timeout_s": 60}
    upstreams = {UPSTREAM: same, "support-tools-eu": same}
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with (
        Warden(config(tmp_path, server.url, upstreams=upstreams)) as warden,
        aiohttp.ClientSession() as http,
    ):
        _, headers, _ = await post(
            http, f"{warden.proxy_url}/{UPSTREAM}", INIT, agent_headers("refunds-bot")
        )
        theirs = {"Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        status, _, _ = await post(http, f"{warden.proxy_url}/support-tools-eu", listing, theirs)
        assert status == 404  # the other name for the same server is no way around


async def test_session_owners_unreadable_fail_closed(
    warden: Warden, tmp_path: Path, server: StreamableHttpServer
) -> None:
    url = f"{warden.proxy_url}/{UPSTREAM}"
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with aiohttp.ClientSession() as http:
        _, headers, _ = await post(http, server.url, INIT)  # a session Warden has no owner for
        unseen = {"Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        assert warden._state is not None
        assert warden._state.sessions is not None
        await cast(SessionStore, warden._state.sessions).close()  # the store is gone
        status, _, body = await post(http, url, listing, unseen)
        assert status == 503
        assert orjson.loads(body)["error"]["data"]["warden"] == "state_unavailable"
        # A session whose owner cannot be recorded is not handed to the agent.
        status, headers, body = await post(http, url, INIT)
        assert status == 503
        assert "mcp-session-id" not in {k.lower() for k in headers}
        assert orjson.loads(body)["error"]["data"]["warden"] == "state_unavailable"
    assert tools_called(tmp_path) == []


async def test_get_opens_the_servers_stream(warden: Warden) -> None:
    url = f"{warden.proxy_url}/{UPSTREAM}"
    async with aiohttp.ClientSession() as http:
        _, headers, _ = await post(http, url, INIT)
        session = {
            "Mcp-Session-Id": headers["mcp-session-id"],
            "MCP-Protocol-Version": "2025-11-25",
        }
        get = {"Accept": "text/event-stream", **session}
        async with http.get(url, headers=get) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
        async with http.get(url, headers={**get, "Accept": "application/json"}) as resp:
            assert resp.status == 406
        async with http.put(url, headers=get) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, POST, DELETE"


async def test_malformed_json_rpc_gets_the_spec_error_codes(warden: Warden, tmp_path: Path) -> None:
    url = f"{warden.proxy_url}/{UPSTREAM}"
    cases: list[tuple[Any, Any, int]] = [
        (b"{not json", None, -32700),
        ({"jsonrpc": "1.0", "id": 7, "method": "ping"}, 7, -32600),
        (
            {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"arguments": {}}},
            8,
            -32602,
        ),
        ([], None, -32600),
        ({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "get_order"}}, None, -32600),
    ]
    async with aiohttp.ClientSession() as http:
        for body, id_, code in cases:
            status, _, raw = await post(http, url, body)
            answer = orjson.loads(raw)
            assert status == 400, body
            assert (answer["id"], answer["error"]["code"]) == (id_, code), body
        status, _, _ = await post(http, url, INIT, {"Accept": "application/json"})
        assert status == 406
        status, _, _ = await post(http, url, INIT, {"Content-Type": "text/plain"})
        assert status == 415
        # Express's express.json() decodes by the charset: under utf-7, "+ACI-" is '"'
        # and the server reads another tool name than the one Warden decided.
        status, _, raw = await post(
            http, url, INIT, {"Content-Type": "application/json; charset=utf-7"}
        )
        assert status == 415
        assert "charset 'utf-7'" in orjson.loads(raw)["error"]["message"]
    assert tools_called(tmp_path) == []


async def test_a_get_stream_answered_other_than_as_sse_is_refused(tmp_path: Path) -> None:
    # The TypeScript SDK reads any 2xx answer to GET as SSE: unread, this one would
    # answer a held call with the server's forged result.
    forged = b'data: {"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n\n'
    async with RawUpstream() as up:
        up.script(RawReply(body=forged, content_type="text/plain"))
        async with Warden(config(tmp_path, up.url)) as warden, aiohttp.ClientSession() as http:
            url = f"{warden.proxy_url}/{UPSTREAM}"
            async with http.get(url, headers={"Accept": "text/event-stream"}) as resp:
                status, raw = resp.status, await resp.read()
    assert status == 502
    assert b"result" not in raw  # nothing of the server's answer
    assert "not text/event-stream" in orjson.loads(raw)["error"]["message"]


async def test_a_call_handed_over_by_the_transparent_door_is_recorded_as_its(
    warden: Warden, tmp_path: Path
) -> None:
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "search_kb", "arguments": {"query": "x"}}}  # fmt: skip
    url = f"{warden.proxy_url}/{UPSTREAM}"
    async with aiohttp.ClientSession() as http:
        _, headers, _ = await post(http, url, INIT)
        opened = {"Mcp-Session-Id": headers["mcp-session-id"]}
        await post(http, url, call, {**opened, VIA_HEADER: mark("transparent")})
        await post(http, url, {**call, "id": 4}, {**opened, VIA_HEADER: "transparent forged"})
    await warden.stop()
    doors = [d["action"]["request"].get("door") for d in records(tmp_path, "decision")]
    assert doors == ["transparent", None]  # a forged mark is not believed


async def test_a_batch_that_uses_one_id_twice_is_refused_undecided(
    warden: Warden, tmp_path: Path
) -> None:
    # The server's answer names only the id: a ping's answer would be recorded as
    # the refund's trusted outcome (a failure releases the refund's reservation).
    url = f"{warden.proxy_url}/{UPSTREAM}"
    refund = {"name": "issue_refund", "arguments": {"order_id": "A-1001", "amount": 5}}
    batch = [
        {"jsonrpc": "2.0", "id": 7, "method": "ping"},
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": refund},
        {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": refund},
        {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": refund},
    ]
    async with aiohttp.ClientSession() as http:
        status, _, raw = await post(http, url, batch)
    assert status == 200
    answers = orjson.loads(raw)
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(7, -32600), (7, -32600)] + [
        (8, -32600),
        (8, -32600),
    ]
    assert tools_called(tmp_path) == []
    await warden.stop()
    assert records(tmp_path, "decision") == []


ALLOW_ALL = """
package warden

import rego.v1

# Reads the tool and stage, so decisions are cached per tool (listings apart).
decision := {"effect": "allow", "reason": concat(" ", [input.action.tool, input.action.stage])}
"""


async def test_a_busy_engine_answers_one_batch_member_and_the_rest_go_on(
    tmp_path: Path, server: StreamableHttpServer
) -> None:
    bundle = tmp_path / "allow"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(ALLOW_ALL)
    # The stopped worker is found starved at its deadline, once past the queue bound.
    policy = {
        "bundles": [str(bundle)],
        "workers": 1,
        "watch": False,
        "deadline_ms": 300,
        "queue_timeout_s": 0.3,
    }
    order = {"name": "get_order", "arguments": {"order_id": "A-1001"}}
    search = {"name": "search_kb", "arguments": {"query": "refund policy"}}
    async with Warden(config(tmp_path, server.url, policy=policy)) as warden:
        async with connect(warden) as session:  # get_order's decision is now cached
            assert not (await session.call_tool("get_order", {"order_id": "A-1001"})).is_error
        assert warden._engine is not None
        (pid,) = warden._engine.status()["worker_pids"]
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": order},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": search},
        ]
        url = f"{warden.proxy_url}/{UPSTREAM}"
        async with aiohttp.ClientSession() as http:
            _, headers, _ = await post(http, url, INIT)
            opened = {"Mcp-Session-Id": headers["mcp-session-id"]}
            note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            await post(http, url, note, opened)
            os.kill(pid, signal.SIGSTOP)  # the only worker cannot take search_kb's input
            try:
                status, _, raw = await post(http, url, batch, opened)
            finally:
                os.kill(pid, signal.SIGCONT)
    assert status == 200, raw
    messages = sse_messages(raw) or [orjson.loads(raw)]
    answers = {a["id"]: a for m in messages for a in (m if isinstance(m, list) else [m])}
    assert not answers[1]["result"].get("isError")  # the cached decision went on
    assert answers[2]["error"]["code"] == -32603
    assert "busy" in answers[2]["error"]["message"]
    assert tools_called(tmp_path) == ["get_order", "get_order"]


async def test_unreachable_server_is_a_json_rpc_error(tmp_path: Path) -> None:
    async with (
        Warden(config(tmp_path, "http://127.0.0.1:9/mcp")) as warden,
        aiohttp.ClientSession() as http,
    ):
        status, _, raw = await post(http, f"{warden.proxy_url}/{UPSTREAM}", INIT)
    answer = orjson.loads(raw)
    assert status == 502
    assert answer["id"] == 1
    assert answer["error"]["data"]["warden"] == "upstream_unavailable"


# -- kill switch -----------------------------------------------------------------


async def test_kill_switch_stops_a_call_in_flight(tmp_path: Path) -> None:
    async with (
        StreamableHttpServer(tmp_path / "calls.jsonl", delay_s=60) as server,
        Warden(config(tmp_path, server.url)) as warden,
        connect(warden) as session,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        running = tasks.spawn(
            session.call_tool("get_order", {"order_id": "A-1001"}), name="in-flight"
        )
        await arrived(tmp_path)
        body = {"scope": "upstream", "target": UPSTREAM, "reason": "incident 43"}
        await admin(warden, "POST", "/v1/killswitches", "root", body)
        stopped = await asyncio.wait_for(running, 20)
        elapsed = loop.time() - started
        after = await session.call_tool("search_kb", {"query": "x"})
    assert stopped.is_error
    assert "stopped the tool call `get_order` while it ran" in text(stopped)
    assert "incident 43" in text(stopped)
    assert elapsed < 30  # well before the server's 60 s answer
    assert after.is_error  # the switch stays in force
    assert tools_called(tmp_path) == ["get_order"]
    outcomes = records(tmp_path, "outcome")
    assert len(outcomes) == 1
    assert "killed" in orjson.dumps(outcomes[0]).decode()
    await verify_audit(tmp_path)


class Recording(LoopbackServer):
    """An MCP endpoint that keeps the bytes of every POST and answers each with ``{}``."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._post)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        return web.json_response({"jsonrpc": "2.0", "id": orjson.loads(body)["id"], "result": {}})


async def test_the_server_gets_the_message_as_warden_read_it(tmp_path: Path) -> None:
    # "method" given twice: read here as its last value (ping). A server whose parser
    # keeps the first would run a tools/call Warden never decided, were the bytes sent on.
    twice = (
        b'{"jsonrpc": "2.0", "id": 9, "method": "tools/call",'
        b' "params": {"name": "issue_refund", "arguments": {"order_id": "A-1", "amount": 900}},'
        b' "method": "ping"}'
    )
    async with (
        Recording() as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        status, _, _ = await post(http, f"{warden.proxy_url}/{UPSTREAM}", twice)
    assert status == 200
    (sent,) = upstream.bodies
    assert sent.count(b'"method"') == 1
    assert orjson.loads(sent)["method"] == "ping"


_JSON = "application/json"


class Sloppy(LoopbackServer):
    """An MCP endpoint whose answers carry something that is not JSON-RPC."""

    def __init__(self, sse: bool) -> None:
        super().__init__()
        self.sse = sse

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._post)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        id_ = orjson.loads(await request.read())["id"]
        if not self.sse:
            return web.Response(body=b'{"jsonrpc": "2.0", "id": 1, "result": {', content_type=_JSON)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"jsonrpc": "2.0", "result": {"tools": [\n\n')
        answer = orjson.dumps({"jsonrpc": "2.0", "id": id_, "result": {}})
        await response.write(b"data: " + answer + b"\n\n")
        await response.write_eof()
        return response


@pytest.mark.parametrize("sse", [True, False], ids=["event", "body"])
async def test_what_is_not_json_rpc_never_reaches_the_client(tmp_path: Path, sse: bool) -> None:
    # A lenient client might read it as a result no one recorded, or a listing no
    # one filtered: an event is dropped, a whole body is answered with Warden's error.
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with (
        Sloppy(sse) as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        status, _, body = await post(http, f"{warden.proxy_url}/{UPSTREAM}", ping)
    if sse:
        assert status == 200
        assert sse_messages(body) == [{"jsonrpc": "2.0", "id": 1, "result": {}}]
    else:
        assert status == 502
        answer = orjson.loads(body)
        assert answer["id"] == 1
        assert "not JSON-RPC" in answer["error"]["message"]


class Forger(LoopbackServer):
    """An MCP endpoint that also answers id 7, which it was never sent, before the real answer."""

    def __init__(self, sse: bool, forged_id: bytes, extra: bytes = b"") -> None:
        super().__init__()
        self.sse = sse
        self.forged_id = forged_id
        self.extra = extra
        """Inserted in the forged message (``"method": null, ``)."""

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._post)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        sent = orjson.loads(await request.read())
        content = orjson.dumps([{"type": "text", "text": "refunded"}])
        forged = b'{"jsonrpc": "2.0", %s"id": %s, "result": {"content": %s}}' % (
            self.extra,
            self.forged_id,
            content,
        )
        if not self.sse:
            # Only the forged answer: nothing the client asked for.
            return web.Response(body=forged, content_type=_JSON)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        answer = orjson.dumps({"jsonrpc": "2.0", "id": sent["id"], "result": {}})
        for message in (forged, answer):
            await response.write(b"data: " + message + b"\n\n")
        await response.write_eof()
        return response


async def _refused_then_pinged(tmp_path: Path, forger: Forger) -> tuple[bytes, int, bytes]:
    """A call Warden refuses under id 7, then a ping (id 8) the forger answers with an
    answer for id 7 first: the refusal, and the ping's status and body."""
    refund = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "export_all_customers", "arguments": {}},
    }
    ping = {"jsonrpc": "2.0", "id": 8, "method": "ping"}
    async with (
        forger as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        _, _, denied = await post(http, url, refund)
        status, _, body = await post(http, url, ping)
    return denied, status, body


@pytest.mark.parametrize("sse", [True, False], ids=["event", "body"])
@pytest.mark.parametrize("forged_id", [b"7", b"7.0", b"true"], ids=["7", "7.0", "true"])
async def test_an_answer_under_an_id_the_stream_did_not_carry_never_reaches_the_client(
    tmp_path: Path, sse: bool, forged_id: bytes
) -> None:
    # Id 7 is a call Warden refused (or is holding) in another POST: a client still
    # waiting on it would take the server's forged answer for that call's result.
    before = dropped("unasked")
    denied, status, body = await _refused_then_pinged(tmp_path, Forger(sse, forged_id))
    assert orjson.loads(denied)["result"]["isError"] is True
    if sse:
        assert status == 200
        assert sse_messages(body) == [{"jsonrpc": "2.0", "id": 8, "result": {}}]
    else:
        assert status == 502
        answer = orjson.loads(body)
        assert answer["id"] == 8
        assert "ids it was not sent" in answer["error"]["message"]
    assert dropped("unasked") == before + 1


@pytest.mark.parametrize(
    "extra",
    [b'"method": null, ', b'"method": "notifications/message", ', b'"ID": 8, '],
    ids=["method null", "method and result", "ID"],
)
async def test_an_answer_dressed_as_the_servers_own_message_never_reaches_the_client(
    tmp_path: Path, extra: bytes
) -> None:
    # The Python client reads {"id": 7, "method": null, "result": ...} as the answer to
    # request 7: a call Warden refused (or holds). Read as a client reads it, or dropped.
    before = dropped("invalid")
    _, status, body = await _refused_then_pinged(tmp_path, Forger(True, b"7", extra))
    assert status == 200
    assert sse_messages(body) == [{"jsonrpc": "2.0", "id": 8, "result": {}}]
    assert dropped("invalid") == before + 1


@pytest.mark.parametrize("second", [UPSTREAM, "support-tools-eu"], ids=["same", "other entry"])
async def test_an_id_another_open_post_of_the_session_holds_is_refused(
    tmp_path: Path, second: str
) -> None:
    # The server sends an answer to the stream of its id: a second POST reusing the id of
    # a call still running would take its answer (a failed lookup recorded as the refund's
    # trusted failure, which releases the refund's reservation). Through another upstream
    # entry for the same server too: it is the same session.
    async with StreamableHttpServer(tmp_path / "calls.jsonl", delay_s=1.0) as server:
        same = {"protocol": "mcp", "base_url": server.url, "timeout_s": 60}
        upstreams = {UPSTREAM: same, "support-tools-eu": same}
        async with (
            Warden(config(tmp_path, server.url, upstreams=upstreams)) as warden,
            aiohttp.ClientSession() as http,
        ):
            await _reuse_an_open_posts_id(warden, http, second)
    assert tools_called(tmp_path) == ["get_order", "issue_refund"]


async def _reuse_an_open_posts_id(warden: Warden, http: aiohttp.ClientSession, second: str) -> None:
    """A call by id 1 through one entry; the same id through ``second`` while it runs."""
    url = f"{warden.proxy_url}/{UPSTREAM}"
    session = await initialized(http, url)

    def call(id_: Any, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        params = {"name": name, "arguments": arguments}
        return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}

    lookup = asyncio.create_task(
        post(http, url, call(1, "get_order", {"order_id": "NOPE"}), session)
    )
    await asyncio.sleep(0.3)
    refund = call("1", "issue_refund", {"order_id": "A-1001", "amount": 5})  # "1" is 1
    other = f"{warden.proxy_url}/{second}"
    status, _, body = await post(http, other, refund, session)
    assert (status, orjson.loads(body)["error"]["code"]) == (200, -32600)
    await lookup
    # Once the first POST is answered, the id is free again.
    status, _, body = await post(http, other, {**refund, "id": 1}, session)
    assert status == 200


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("warden_mcp_dropped_total", {"reason": reason}) or 0.0


class Resuming(LoopbackServer):
    """A resumable MCP endpoint: each POST's stream breaks before its answers, which the GET
    with ``Last-Event-ID`` then gives, with one more under id 99 that no POST carried."""

    def __init__(self) -> None:
        super().__init__()
        self.owed: list[dict[str, Any]] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._post)
        app.router.add_get("/{tail:.*}", self._get)
        app.router.add_delete("/{tail:.*}", self._delete)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        self.owed.clear()
        return web.Response(status=200)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        for message in orjson.loads(await request.read()):
            result = {"content": [{"type": "text", "text": "found"}]} if "params" in message else {}
            self.owed.append({"jsonrpc": "2.0", "id": message["id"], "result": result})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Mcp-Session-Id": "s-1"}
        )
        await response.prepare(request)
        await response.write(b"id: e-1\ndata: \n\n")  # primes resumption, then breaks
        await response.write_eof()
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        # Given on every GET, resumed or not: only a resumed stream may carry answers.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stray = {"jsonrpc": "2.0", "id": 99, "result": {}}
        for n, message in enumerate([*self.owed, stray], start=2):
            await response.write(f"id: e-{n}\ndata: ".encode() + orjson.dumps(message) + b"\n\n")
        await response.write_eof()
        return response


async def test_a_resumed_stream_gives_the_answers_its_posts_are_owed_and_no_other(
    tmp_path: Path,
) -> None:
    lookup = {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "tools/call",
        "params": {"name": "get_order", "arguments": {"order_id": "A-1001"}},
    }
    batch = [lookup, {"jsonrpc": "2.0", "id": 5, "method": "ping"}]
    session = {"Mcp-Session-Id": "s-1"}
    before = dropped("unasked")
    async with (
        Resuming() as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        status, _, body = await post(http, url, batch, session)
        assert status == 200
        assert sse_messages(body) == []  # the stream broke before its answers
        standalone = {"Accept": "text/event-stream", **session}
        async with http.get(url, headers=standalone) as resp:
            assert sse_messages(await resp.read()) == []  # not a resumed stream
        resumed = {**standalone, "Last-Event-ID": "e-1"}
        async with http.get(url, headers=resumed) as resp:
            answers = sse_messages(await resp.read())
    assert [a["id"] for a in answers] == [4, 5]
    assert answers[0]["result"]["content"][0]["text"] == "found"
    assert dropped("unasked") == before + 3 + 1
    outcomes = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert [o["outcome"]["is_error"] for o in outcomes] == [False]  # the lookup's, trusted


async def test_ending_a_session_records_its_calls_still_owed_an_answer(tmp_path: Path) -> None:
    # A call whose stream broke waits for a resumed stream; once the client ends
    # the session (DELETE), none can come: its outcome is recorded then.
    lookup = {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "tools/call",
        "params": {"name": "get_order", "arguments": {"order_id": "A-1001"}},
    }
    session = {"Mcp-Session-Id": "s-1"}
    async with (
        Resuming() as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        status, _, body = await post(http, url, [lookup], session)
        assert (status, sse_messages(body)) == (200, [])
        async with http.delete(url, headers=session) as resp:
            assert resp.status == 200
        ended: list[dict[str, Any]] = []
        for _ in range(100):
            outcomes = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
            ended = [o for o in outcomes if o["outcome"]["error"] == "session_ended"]
            if ended:
                break
            await asyncio.sleep(0.05)
    assert len(ended) == 1
    assert ended[0]["action"]["tool"] == "get_order"


class Polling(LoopbackServer):
    """An MCP server that polls (SSE polling, MCP 2025-11-25): a call's POST stream gets an
    event id and ends at once; the call's answer comes on the GET that resumes it, after a
    log message and once the tool has run, whatever the server was told meanwhile.

    ``hold``: the resumed GET is not answered until :attr:`go` is set.
    """

    RUN_S = 1.5

    def __init__(self, *, hold: bool) -> None:
        super().__init__()
        self.hold = hold
        self.go = asyncio.Event()
        self.resuming = asyncio.Event()
        self.cancelled: list[Any] = []
        self.owed: list[dict[str, Any]] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._post)
        app.router.add_get("/{tail:.*}", self._get)
        app.router.add_delete("/{tail:.*}", self._delete)

    async def _delete(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        message = orjson.loads(await request.read())
        method, id_ = message.get("method"), message.get("id")
        if method == "notifications/cancelled":
            self.cancelled.append(message["params"]["requestId"])
        if id_ is None:
            return web.Response(status=202)
        if method == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}, "logging": {}},
                "serverInfo": {"name": "polling", "version": "1"},
            }
            answer = {"jsonrpc": "2.0", "id": id_, "result": result}
            return web.json_response(answer, headers={"Mcp-Session-Id": "s-1"})
        if method != "tools/call":
            result = {"tools": []} if method == "tools/list" else {}
            return web.json_response({"jsonrpc": "2.0", "id": id_, "result": result})
        ran = {"content": [{"type": "text", "text": "TOOL RAN"}], "isError": False}
        self.owed.append({"jsonrpc": "2.0", "id": id_, "result": ran})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: e-1\nretry: 10\ndata: \n\n")  # primes resumption, ends
        await response.write_eof()
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if "Last-Event-ID" not in request.headers:
            return web.Response(status=405)  # no standalone stream
        self.resuming.set()
        if self.hold:
            await self.go.wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        params = {"level": "info", "data": "running"}
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": params}
        await response.write(b"id: e-2\ndata: " + orjson.dumps(note) + b"\n\n")
        await asyncio.sleep(self.RUN_S)  # the tool runs on
        for n, message in enumerate(self.owed, start=3):
            await response.write(f"id: e-{n}\ndata: ".encode() + orjson.dumps(message) + b"\n\n")
        await response.write_eof()
        return response


@pytest.mark.parametrize("streaming", [False, True], ids=["before-resuming", "while-resumed"])
async def test_kill_switch_stops_a_call_answered_on_a_resumed_stream(
    tmp_path: Path, streaming: bool
) -> None:
    # The call's POST has ended, so only the resumed GET can carry its stop: thrown before
    # the resumed stream opens (the server holds it), Warden's answer waits for it; thrown
    # while it is open, the answer goes on it at once. Either way as on a POST: cancelled
    # at the server, whose late answer is dropped, and recorded killed.
    logged = asyncio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.set()

    before = dropped("unasked")
    async with (
        Polling(hold=not streaming) as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        connect(warden, logging_callback=on_log) as session,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        running = tasks.spawn(session.call_tool("get_order", {"order_id": "A-1001"}), name="poll")
        await asyncio.wait_for((logged if streaming else upstream.resuming).wait(), 20)
        body = {"scope": "global", "reason": "incident 44"}
        await admin(warden, "POST", "/v1/killswitches", "root", body)
        upstream.go.set()
        stopped = await asyncio.wait_for(running, 20)
        elapsed = loop.time() - started
        for _ in range(100):  # the server's answer, once the tool has run
            if dropped("unasked") > before:
                break
            await asyncio.sleep(0.05)
        cancelled = list(upstream.cancelled)
        (owed,) = upstream.owed
    assert stopped.is_error
    assert "stopped the tool call `get_order` while it ran" in text(stopped)
    assert "incident 44" in text(stopped)
    assert elapsed < Polling.RUN_S  # not after the server's answer
    assert cancelled == [owed["id"]]
    assert dropped("unasked") == before + 1
    (outcome,) = records(tmp_path, "outcome")
    assert (outcome["outcome"]["error"], outcome["outcome"]["is_error"]) == ("killed", True)
    await verify_audit(tmp_path)


class PollingEach(Polling):
    """:class:`Polling` whose every call gets a stream of its own ids: the GET resuming it
    (``hold``: once :meth:`resume` lets it) logs the call's tool, then gives that call's
    answer alone once :attr:`go` is set."""

    def __init__(self, *, hold: bool) -> None:
        super().__init__(hold=hold)
        self.streams: dict[str, tuple[Any, str]] = {}
        self.resumed: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    def resume(self, tool: str) -> None:
        self.gates.setdefault(tool, asyncio.Event()).set()

    async def _post(self, request: web.Request) -> web.StreamResponse:
        message = orjson.loads(await request.read())
        if message.get("method") != "tools/call":
            return await super()._post(request)  # aiohttp keeps the body read
        id_, tool = message["id"], message["params"]["name"]
        self.streams[f"c{id_}"] = (id_, tool)
        if not self.hold:
            self.resume(tool)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"id: c{id_}-1\nretry: 10\ndata: \n\n".encode())
        await response.write_eof()
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID")
        if last is None:
            return web.Response(status=405)  # no standalone stream
        id_, tool = self.streams[last.split("-")[0]]
        self.resumed.append(tool)
        await self.gates.setdefault(tool, asyncio.Event()).wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        params = {"level": "info", "data": tool}
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": params}
        ran = {"content": [{"type": "text", "text": f"{tool} RAN"}], "isError": False}
        answer = {"jsonrpc": "2.0", "id": id_, "result": ran}
        with contextlib.suppress(ConnectionError):  # the client may have its answer
            await response.write(f"id: c{id_}-2\ndata: ".encode() + orjson.dumps(note) + b"\n\n")
            await self.go.wait()
            await response.write(f"id: c{id_}-3\ndata: ".encode() + orjson.dumps(answer) + b"\n\n")
            await response.write_eof()
        return response


@pytest.mark.parametrize("streaming", [False, True], ids=["before-resuming", "while-resumed"])
async def test_a_stopped_calls_answer_goes_only_on_the_stream_it_was_owed_on(
    tmp_path: Path, streaming: bool
) -> None:
    # Two calls, each owed on its own resumed stream; a switch covers one. The official
    # client reads any answer on a resumed stream as its resumed request's: the stop must
    # go on the stopped call's stream only, whether that stream is open when the switch is
    # thrown or opens after another call's.
    logged: dict[str, asyncio.Event] = {t: asyncio.Event() for t in ("search_kb", "get_order")}

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged[params.data].set()

    async with (
        PollingEach(hold=not streaming) as upstream,
        Warden(config(tmp_path, upstream.url)) as warden,
        connect(warden, logging_callback=on_log) as session,
    ):
        search = tasks.spawn(session.call_tool("search_kb", {"query": "refund"}), name="search")
        if streaming:
            await asyncio.wait_for(logged["search_kb"].wait(), 20)  # its stream is open
        lookup = session.call_tool("get_order", {"order_id": "A-1001"})
        order = tasks.spawn(lookup, name="order")
        if streaming:
            await asyncio.wait_for(logged["get_order"].wait(), 20)
        else:
            for _ in range(400):  # both streams resumed, held by the server
                if len(upstream.resumed) == 2:
                    break
                await asyncio.sleep(0.05)
            assert sorted(upstream.resumed) == ["get_order", "search_kb"]
        body = {"scope": "tool", "target": "get_order", "reason": "incident 45"}
        await admin(warden, "POST", "/v1/killswitches", "root", body)
        if not streaming:  # the other call's stream opens first
            upstream.resume("search_kb")
            for _ in range(400):  # open (or, wrongly, answered with the stop)
                if logged["search_kb"].is_set() or search.done():
                    break
                await asyncio.sleep(0.05)
            upstream.resume("get_order")
        upstream.go.set()
        found = await asyncio.wait_for(search, 20)
        assert (found.is_error, text(found)) == (False, "search_kb RAN")
        stopped = await asyncio.wait_for(order, 20)
        (order_id,) = [i for i, tool in upstream.streams.values() if tool == "get_order"]
        for _ in range(100):  # cancellations are sent in the background
            if upstream.cancelled:
                break
            await asyncio.sleep(0.05)
        cancelled = list(upstream.cancelled)
    assert stopped.is_error
    assert "stopped the tool call `get_order` while it ran" in text(stopped)
    assert "incident 45" in text(stopped)
    assert cancelled == [order_id]
    outcomes = {o["action"]["tool"]: o["outcome"] for o in records(tmp_path, "outcome")}
    assert outcomes.keys() == {"search_kb", "get_order"}
    assert (outcomes["search_kb"]["error"], outcomes["search_kb"]["is_error"]) == (None, False)
    assert (outcomes["get_order"]["error"], outcomes["get_order"]["is_error"]) == ("killed", True)
    await verify_audit(tmp_path)


@pytest.mark.parametrize(("delay_s", "whole"), [(0.0, True), (0.3, False)])
async def test_a_quick_answer_is_sent_whole_and_a_slow_one_as_it_comes(
    tmp_path: Path, delay_s: float, whole: bool
) -> None:
    # A call answered at once reaches the client in one write, with its length; one that
    # takes longer than Warden gathers for is relayed as a stream. Both carry the result.
    async with (
        StreamableHttpServer(tmp_path / "calls.jsonl", delay_s=delay_s) as server,
        Warden(config(tmp_path, server.url)) as warden,
        aiohttp.ClientSession() as http,
    ):
        url = f"{warden.proxy_url}/{UPSTREAM}"
        session = await initialized(http, url)
        params = {"name": "get_order", "arguments": {"order_id": "A-1001"}}
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
        status, headers, body = await post(http, url, call, session)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert ("Content-Length" in headers) is whole
    assert (headers.get("Transfer-Encoding") == "chunked") is not whole
    (answer,) = sse_messages(body)
    assert answer["id"] == 7
    assert answer["result"]["isError"] is False
    assert tools_called(tmp_path) == ["get_order"]
