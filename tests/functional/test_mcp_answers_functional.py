"""The client's answers to the server's own requests are decided, whatever the revision.

Under the revisions before 2026-07-28 a server asks mid-call (``elicitation/create``,
``sampling/createMessage``, ``roots/list``) and the client answers with a JSON-RPC
response; the server runs on what the answer says (a refund's amount the user
typed). The official ``mcp`` client in ``mode="legacy"`` answers through both doors
to the real test server, and the answer is decided as the call's
``input_responses``, as a 2026-07-28 retry's are. Over HTTP, a call the client
cancels keeps what a spend cap holds for it: the server's answer to a cancelled
request is no proof its tool did not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp import Client
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.exceptions import MCPError

from tests.functional.conftest import audit_records, make_config, serving
from tests.functional.test_mcp_requests_functional import (
    ALLOW_ALL,
    ANSWER_POLICY,
    amounts_answered,
    either_door,
    reached,
    write_bundle,
)
from warden.budgets.caps import window_key
from warden.server import Warden
from warden.state import StateStore

pytestmark = pytest.mark.timeout(90)

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize("door_name", ["http", "stdio"])
async def test_a_legacy_answer_is_decided_as_the_calls_input_responses(
    tmp_path: Path, door_name: str
) -> None:
    # The client negotiates 2025-11-25: the server's resolver asks with elicitation/create
    # mid-call, and the client's answer (a JSON-RPC response) carries the amount. A
    # policy deciding on 2026-07-28 retries' answers must see this one too.
    answer = amounts_answered(900.0, 20.0)

    async with contextlib.AsyncExitStack() as stack:
        bundle = write_bundle(tmp_path, ANSWER_POLICY)
        server, audit = await either_door(stack, tmp_path, door_name, bundle)
        async with Client(server, mode="legacy", elicitation_callback=answer) as client:
            # The server's question is answered with Warden's error: its tool fails.
            with pytest.raises(MCPError, match="an answer asks for a refund above 100"):
                await client.call_tool("refund_asking_amount", {"order_id": "A-1001"})
            allowed = await client.call_tool("refund_asking_amount", {"order_id": "A-1002"})
    assert not allowed.is_error
    # Only the refund whose answer the policy allowed ran, with that answer.
    assert reached(tmp_path) == [
        ("issue_refund", {"order_id": "A-1002", "amount": 20.0, "reason": ""})
    ]
    records = audit_records(audit)
    decisions = [r for r in records if r.get("kind") == "decision"]
    answered = [d for d in decisions if "input_responses" in d["action"]]
    assert len(decisions) == 4  # each call, then each call again with its answer
    assert [d["decision"]["effect"] for d in answered] == ["deny", "allow"]
    assert [d["action"]["tool"] for d in answered] == ["refund_asking_amount"] * 2
    assert [d["action"]["input_responses"] for d in answered] == [
        {"elicitation/create#1": {"action": "accept", "content": {"amount": 900.0}}},
        {"elicitation/create#1": {"action": "accept", "content": {"amount": 20.0}}},
    ]
    # The allowed call went on under the decision that saw the answer: the server's
    # answer is that decision's outcome, and the first decision's says so.
    outcomes = {r["decision_id"]: r["outcome"] for r in records if r.get("kind") == "outcome"}
    first, again = decisions[2]["decision"]["id"], answered[1]["decision"]["id"]
    assert outcomes[first]["error"] == "input_answered"
    assert outcomes[first]["result"] == again
    assert outcomes[again]["error"] is None


# -- a cancelled call over HTTP ---------------------------------------------------


CAP = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 60,
    "over": "deny",
}


@asynccontextmanager
async def answering_cancelled(received: list[dict[str, Any]]) -> AsyncIterator[str]:
    """An MCP server that answers a cancelled call, as the ``mcp`` 1.x SDK's servers do
    (``Request cancelled``, code 0), after its tool has already acted. Every message it
    gets is kept in ``received``."""
    running: dict[Any, asyncio.Event] = {}

    async def mcp_endpoint(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.Response(status=405)
        if request.method == "DELETE":
            return web.Response(status=200)
        body = await request.json()
        received.append(body)
        if body.get("method") == "initialize":
            return initialized(body, "v1-like")
        if "method" not in body or "id" not in body:
            if body.get("method") == "notifications/cancelled":
                # Read as the SDKs read ids: "1" names call 1.
                cancelled = running.get(coerce_request_id(body["params"]["requestId"]))
                if cancelled is not None:
                    cancelled.set()
            return web.Response(status=202)
        if body["method"] != "tools/call":
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {}})
        order = body["params"]["arguments"].get("order_id")
        if order in _FAILURES:  # the refund is made, or not, then the server fails so
            status, error = _FAILURES[order]
            if status != 200:
                return web.Response(status=status)
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": error})
        # The payment API is called here; then the tool awaits something else.
        running[body["id"]] = asyncio.Event()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await asyncio.wait_for(running[body["id"]].wait(), 10)
            error = {"code": 0, "message": "Request cancelled"}
            answer = {"jsonrpc": "2.0", "id": body["id"], "error": error}
        except TimeoutError:
            done = {"content": [{"type": "text", "text": "refunded"}]}
            answer = {"jsonrpc": "2.0", "id": body["id"], "result": done}
        await response.write(b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp_endpoint)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}/mcp"


_FAILURES: dict[str, tuple[int, dict[str, Any] | None]] = {
    "A-RAISED": (200, {"code": -32603, "message": "refunds API timed out"}),  # after acting
    "A-BADARGS": (200, {"code": -32602, "message": "amount: not a number"}),  # before
    "A-408": (408, None),  # a gateway's timeout, after forwarding
    "A-499": (499, None),
}


def initialized(body: dict[str, Any], name: str) -> web.Response:
    """A tools server's answer to ``initialize``, opening session ``s-1``."""
    result = {
        "protocolVersion": body["params"]["protocolVersion"],
        "capabilities": {"tools": {}},
        "serverInfo": {"name": name, "version": "1"},
    }
    answer = {"jsonrpc": "2.0", "id": body["id"], "result": result}
    return web.json_response(answer, headers={"Mcp-Session-Id": "s-1"})


def refunds_run(received: list[dict[str, Any]]) -> list[str]:
    """The orders whose refund reached the server's tool."""
    return [
        m["params"]["arguments"]["order_id"] for m in received if m.get("method") == "tools/call"
    ]


def capped_config(tmp_path: Path, url: str, *, trusted: bool = False) -> Any:
    """Warden with the refund cap of 60 before the MCP server at ``url``, allowing all;
    ``trusted``: its reported failures release (``budgets.trusted_failures``)."""
    return make_config(
        tmp_path,
        "http://127.0.0.1:9",
        upstreams={"support-tools": {"protocol": "mcp", "base_url": url}},
        budgets={"caps": [CAP], "trusted_failures": ["support-tools"] if trusted else []},
        policy={"bundles": [str(write_bundle(tmp_path, ALLOW_ALL))]},
    )


@asynccontextmanager
async def raw_session(
    tmp_path: Path, received: list[dict[str, Any]], *, trusted: bool = False
) -> AsyncIterator[tuple[aiohttp.ClientSession, str, dict[str, str]]]:
    """Warden (a refund cap of 60) before :func:`answering_cancelled`, and an open
    session through it: the HTTP client, the URL and the session's headers."""
    async with answering_cancelled(received) as url:
        config = capped_config(tmp_path, url, trusted=trusted)
        async with Warden(config) as warden, aiohttp.ClientSession() as http:
            target = f"{warden.proxy_url}/support-tools"
            async with http.post(target, json=INIT, headers=ACCEPT) as resp:
                headers = {**ACCEPT, "Mcp-Session-Id": resp.headers["Mcp-Session-Id"]}
            yield http, target, headers


INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


async def refunds_counter(tmp_path: Path) -> tuple[float, float]:
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        key = ("refunds", window_key("day", datetime.now(UTC)), "agent:support-triage")
        (counter,) = await store.counters([key])
        return counter.spent, counter.reserved
    finally:
        await store.close()


async def test_a_call_the_client_cancels_keeps_what_the_cap_holds_for_it(tmp_path: Path) -> None:
    # The refund acts, then the client gives up on it. The server's "Request cancelled"
    # is no proof the refund did not happen: it must not release the cap's hold.
    received: list[dict[str, Any]] = []
    async with answering_cancelled(received) as url:
        config = capped_config(tmp_path, url)
        async with (
            Warden(config) as warden,
            Client(f"{warden.proxy_url}/support-tools", mode="legacy") as client,
        ):
            refund = {"order_id": "A-1", "amount": 50}
            with pytest.raises(TimeoutError):  # the SDK sends notifications/cancelled
                async with asyncio.timeout(1.0):
                    await client.call_tool("issue_refund", refund)
            held = await settled(tmp_path)
            second = await client.call_tool("issue_refund", {"order_id": "A-2", "amount": 50})
    assert refunds_run(received) == ["A-1"]
    assert held == (50.0, 0.0)  # spent, not released
    assert second.is_error  # 50 + 50 is over the cap of 60
    outcomes = [
        r["outcome"] for r in audit_records(tmp_path / "audit") if r.get("kind") == "outcome"
    ]
    assert [o["error"] for o in outcomes] == ["client_cancelled"]


@pytest.mark.parametrize(
    ("order", "trusted", "spent"),
    [
        # The official SDKs answer an exception raised after the refund was made with
        # isError, or -32602 when the handler's own validation failed: by default no
        # reported failure releases.
        ("A-BADARGS", False, 50.0),
        ("A-RAISED", False, 50.0),
        # A server budgets.trusted_failures names: a failure before running releases;
        # an internal error, or a gateway's 408 or 499, still says nothing.
        ("A-BADARGS", True, 0.0),
        ("A-RAISED", True, 50.0),
        ("A-408", True, 50.0),
        ("A-499", True, 50.0),
    ],
)
async def test_only_a_failure_a_trusted_server_gives_before_running_releases_the_hold(
    tmp_path: Path, order: str, trusted: bool, spent: float
) -> None:
    received: list[dict[str, Any]] = []
    async with raw_session(tmp_path, received, trusted=trusted) as (http, target, headers):
        params = {"name": "issue_refund", "arguments": {"order_id": order, "amount": 50}}
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        async with http.post(target, json=call, headers=headers) as resp:
            await resp.read()
        held = await settled(tmp_path)
    assert refunds_run(received) == [order]
    assert held == (spent, 0.0)


async def settled(tmp_path: Path) -> tuple[float, float]:
    """The refund cap's counter once nothing is reserved (outcomes settle just after)."""
    async with asyncio.timeout(10):
        while (held := await refunds_counter(tmp_path))[1]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return held


async def test_a_cancellation_names_the_call_as_the_server_reads_ids(tmp_path: Path) -> None:
    # The SDKs read "1" as 1 (mcp 2.3's coerce_request_id): the server cancels call 1,
    # so Warden must take the cancellation as call 1's too.
    received: list[dict[str, Any]] = []
    async with raw_session(tmp_path, received) as (http, target, headers):
        params = {"name": "issue_refund", "arguments": {"order_id": "A-1", "amount": 50}}
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        running = asyncio.ensure_future(http.post(target, json=call, headers=headers))
        async with asyncio.timeout(10):
            while not refunds_run(received):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                  "params": {"requestId": "1"}}  # fmt: skip
        async with http.post(target, json=cancel, headers=headers) as resp:
            assert resp.status == 202
        async with await running as resp:
            answered = await resp.text()
        held = await settled(tmp_path)
    assert "Request cancelled" in answered  # relayed on the call's stream, not trusted
    assert held == (50.0, 0.0)
    outcomes = [
        r["outcome"] for r in audit_records(tmp_path / "audit") if r.get("kind") == "outcome"
    ]
    assert [o["error"] for o in outcomes] == ["client_cancelled"]


async def test_an_answer_to_no_open_question_reaches_the_server_as_an_error(
    tmp_path: Path,
) -> None:
    # An answer no decided call is waiting for (forged, or to a question the server
    # asked on no call's stream) could steer what the server does next: it fails closed.
    received: list[dict[str, Any]] = []
    forged = {"action": "accept", "content": {"amount": 900}}
    async with raw_session(tmp_path, received) as (http, target, headers):
        answer = {"jsonrpc": "2.0", "id": 0, "result": forged}
        async with http.post(target, json=answer, headers=headers) as resp:
            assert resp.status == 202
    (got,) = [m for m in received if "method" not in m]
    assert "result" not in got
    assert got["id"] == 0
    assert "did not relay the client's answer" in got["error"]["message"]


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_call_asking_for_input_stays_held_unless_the_server_is_trusted(
    tmp_path: Path, trusted: bool
) -> None:
    # 2026-07-28: the server answers the first round with a request for input, and the
    # client retries with the answers. A server may act before asking, and its client
    # need never retry: the first round stays spent, and under a cap of 60 the retry
    # of a refund of 50 is refused. A server budgets.trusted_failures names releases
    # the first round's hold, and the refund is made, counted once.
    received: list[dict[str, Any]] = []

    async def mcp_endpoint(request: web.Request) -> web.StreamResponse:
        if request.method in ("GET", "DELETE"):
            return web.Response(status=405 if request.method == "GET" else 200)
        body = await request.json()
        received.append(body)
        if body.get("method") == "initialize":
            return initialized(body, "asking")
        if "id" not in body:
            return web.Response(status=202)
        if body["params"].get("inputResponses"):
            done = {"resultType": "complete", "content": [{"type": "text", "text": "refunded"}]}
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": done})
        confirm = {
            "method": "elicitation/create",
            "params": {"message": "Refund 50?", "requestedSchema": {"type": "object"}},
        }
        asking = {
            "resultType": "input_required",
            "requestState": "st",
            "inputRequests": {"confirm": confirm},
        }
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": asking})

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp_endpoint)
    async with serving(app) as port:
        config = capped_config(tmp_path, f"http://127.0.0.1:{port}/mcp", trusted=trusted)
        async with Warden(config) as warden, aiohttp.ClientSession() as http:
            target = f"{warden.proxy_url}/support-tools"
            init: dict[str, Any] = json.loads(json.dumps(INIT))
            init["params"]["protocolVersion"] = "2026-07-28"
            async with http.post(target, json=init, headers=ACCEPT) as resp:
                headers = {**ACCEPT, "Mcp-Session-Id": resp.headers["Mcp-Session-Id"]}
            params = {"name": "issue_refund", "arguments": {"order_id": "A-1", "amount": 50}}
            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
            async with http.post(target, json=call, headers=headers) as resp:
                await resp.read()
            answers = {"confirm": {"action": "accept", "content": {"ok": True}}}
            resumed = {**params, "inputResponses": answers, "requestState": "st"}
            retry = {**call, "id": 2, "params": resumed}
            async with http.post(target, json=retry, headers=headers) as resp:
                finished = await resp.json()
            held = await settled(tmp_path)
    text = finished["result"]["content"][0]["text"]
    assert held == (50.0, 0.0)
    retried = [bool(m["params"].get("inputResponses")) for m in received if "params" in m]
    if trusted:
        assert text == "refunded"
        assert retried[-2:] == [False, True]
    else:
        assert "refunds cap for this agent" in text
        assert retried[-1] is False  # the retry never reached the server
