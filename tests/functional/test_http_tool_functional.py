"""Plain HTTP tool APIs with route rules (issue 11, item 4), end to end.

A real Warden with real Rego sits in front of a small refunds service (an
aiohttp server on 127.0.0.1:0); the agent is a plain aiohttp client, as an
agent's HTTP tool would be.
"""

from __future__ import annotations

import asyncio
import gzip
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from yarl import URL

from tests.functional.conftest import audit_records, make_config
from warden.admin.auth import Principal
from warden.cli import main as warden_cli
from warden.errors import ConfigError
from warden.ingress import off_loop
from warden.server import Warden
from warden.testing._server import LoopbackServer

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "not a refund"}

decision := {"effect": "deny", "reason": "exports need a lead"} if {
	input.action.tool == "export_orders"
}

decision := {"effect": "deny", "reason": "credits over 500 are not allowed"} if {
	input.action.tool == "issue_credit"
	to_number(input.action.arguments.amount) > 500
}

decision := {"effect": "deny", "reason": msg} if {
	input.action.tool == "issue_refund"
	input.action.arguments.amount > 500
	msg := sprintf("refunds over 500 are not allowed (%v asked for order %v)", [
		input.action.arguments.amount, input.action.arguments.order_id])
} else := {"effect": "require_approval", "reason": "refunds over 200 need a lead"} if {
	input.action.tool == "issue_refund"
	input.action.arguments.amount > 200
} else := {"effect": "allow", "reason": msg} if {
	input.action.tool == "issue_refund"
	msg := sprintf("refund of %v on %v for %v", [
		input.action.arguments.amount, input.action.arguments.order_id,
		input.action.arguments.customer_id])
}
"""

ROUTES = [
    {
        "method": "POST",
        "path": "/orders/{order_id}/refunds",
        "tool": "issue_refund",
        "arguments": {"order_id": "{order_id}", "amount": "/amount", "customer_id": "/customer"},
    },
    {"method": "GET", "path": "/orders/{order_id}", "tool": "get_order", "arguments": {}},
    # Listed after the rule it is more specific than, as Flask, Go and Spring run it.
    {"method": "GET", "path": "/orders/export", "tool": "export_orders", "arguments": {}},
    {
        "method": "POST",
        "path": "/orders/{order_id}/credits",
        "tool": "issue_credit",
        "arguments": {"order_id": "{order_id}", "amount": "?amount"},
    },
    {
        "method": "GET",
        "path": "/orders/{order_id}/items",
        "tool": "list_items",
        "arguments": {"order_id": "{order_id}", "status": "?status"},
    },
]
CAP = {"name": "refunds", "tool": "issue_refund", "value": "amount", "limit": 100}


class Refunds(LoopbackServer):
    """The refunds service: records what reached it; order ``A-FAIL`` cannot be refunded,
    ``A-504`` and ``A-406`` are refunded and answered so, ``A-SSE`` answers a stream."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, bytes]] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.raw_path, body))
        order = request.match_info["tail"].split("/")[1:2]
        if order == ["A-FAIL"]:
            return web.json_response({"error": "order already refunded"}, status=409)
        if order == ["A-504"]:  # refunded, then the gateway in front gave up
            return web.json_response({"error": "upstream timed out"}, status=504)
        if order == ["A-406"]:  # refunded, then no format the agent's Accept takes (Spring)
            return web.json_response({"error": "not acceptable"}, status=406)
        if order == ["A-SSE"]:  # refunded, then progress streamed until the client leaves
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await stream.prepare(request)
            await stream.write(b'data: {"refund_id": "rf_sse", "state": "made"}\n\n')
            for _ in range(300):
                await asyncio.sleep(0.1)
                await stream.write(b'data: {"state": "notifying"}\n\n')
            return stream
        return web.json_response({"refund_id": f"rf_{len(self.seen)}", "order": order}, status=201)


class RawUpstream:
    """A service that records the bytes of every request reaching it, before any parsing
    (an aiohttp service would refuse a body it cannot inflate before recording it)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.received.append(head + await reader.readexactly(length))
            writer.write(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def refunds() -> AsyncIterator[Refunds]:
    async with Refunds() as server:
        yield server


def config_for(
    tmp_path: Path,
    refunds: Refunds | RawUpstream,
    caps: tuple[dict[str, Any], ...] = (),
    **upstream: Any,
) -> Any:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "policy.rego").write_text(POLICY)
    service = {"protocol": "http", "base_url": refunds.url, "timeout_s": 5, "routes": ROUTES}
    return make_config(
        tmp_path,
        refunds.url,
        upstreams={"refunds": {**service, **upstream}},
        policy={"bundles": [str(bundle)]},
        budgets={"caps": list(caps)},
    )


async def call(
    w: Warden, method: str, path: str, body: bytes | None = None, **json: Any
) -> tuple[int, str, dict[str, Any], str]:
    """Status, content type, JSON body and decision header of one request through Warden."""
    url = URL(w.proxy_url + "/refunds" + path, encoded=True)
    data = body if body is not None else (orjson.dumps(json) if json else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, data=data, headers=headers) as resp,
    ):
        raw = await resp.read()
        decision = resp.headers.get("X-Warden-Decision-Id", "")
        return resp.status, resp.content_type, orjson.loads(raw), decision


async def send(
    w: Warden, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, str, bytes]:
    """Status, content type and body of one request through Warden, headers as given
    (``X_HTTP_Method`` is sent as ``X-HTTP-Method``)."""
    url = URL(w.proxy_url + "/refunds" + path, encoded=True)
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    async with (
        aiohttp.ClientSession() as http,
        # Large bodies as a stream: aiohttp warns that bytes would hold its loop.
        http.request(method, url, data=io.BytesIO(body) if body else None, headers=sent) as resp,
    ):
        return resp.status, resp.content_type, await resp.read()


def decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"]


def outcomes(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]


def verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = warden_cli(["audit", "verify", "--dir", str(tmp_path / "audit")])
    assert code == 0, capsys.readouterr()


async def test_path_and_body_build_the_action_the_policy_decides(
    tmp_path: Path, refunds: Refunds, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w:
        got = await call(w, "POST", "/orders/A-1001/refunds", amount=40, customer="C-7")
    status, _, body, decision_id = got
    assert status == 201
    assert body == {"refund_id": "rf_1", "order": ["A-1001"]}
    # The body reaches the service exactly as sent.
    assert refunds.seen == [("POST", "/orders/A-1001/refunds", b'{"amount":40,"customer":"C-7"}')]
    [record] = decisions(tmp_path)
    action = record["action"]
    assert (action["kind"], action["protocol"], action["stage"]) == (
        "tool_call",
        "http",
        "executed",
    )
    assert action["tool"] == "issue_refund"
    assert action["arguments"] == {"order_id": "A-1001", "amount": 40, "customer_id": "C-7"}
    assert record["decision"]["id"] == decision_id
    assert record["decision"]["reasons"] == ["refund of 40 on A-1001 for C-7"]
    [outcome] = outcomes(tmp_path)
    assert outcome["outcome"]["status"] == 201
    assert "rf_1" in outcome["outcome"]["result"]
    verify(tmp_path, capsys)


async def test_a_denied_refund_gets_a_problem_and_never_reaches_the_service(
    tmp_path: Path, refunds: Refunds, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w:
        denied = await call(w, "POST", "/orders/A-1002/refunds", amount=900, customer="C-7")
        held = await call(w, "POST", "/orders/A-1003/refunds", amount=300, customer="C-7")
    status, content_type, body, decision_id = denied
    assert (status, content_type) == (403, "application/problem+json")
    assert body["type"].endswith("/denied")
    assert body["status"] == 403
    assert body["decision_id"] == decision_id
    assert "refunds over 500 are not allowed (900 asked for order A-1002)" in body["detail"]
    status, content_type, body, _ = held
    assert (status, content_type, body["code"]) == (
        403,
        "application/problem+json",
        "approval_required",
    )
    assert "refunds over 200 need a lead" in body["detail"]
    assert "approval apr_" in body["detail"]
    assert refunds.seen == []
    records = decisions(tmp_path)
    assert [r["decision"]["effect"] for r in records] == ["deny", "require_approval"]
    assert records[0]["decision"]["id"] == decision_id
    verify(tmp_path, capsys)


async def test_unmatched_routes_are_refused_or_forwarded_as_configured(
    tmp_path: Path, refunds: Refunds
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w:
        status, content_type, body, _ = await call(w, "DELETE", "/orders/A-1001/refunds")
    assert (status, content_type) == (404, "application/problem+json")
    assert "unmatched: deny" in body["detail"]
    assert refunds.seen == []
    assert decisions(tmp_path) == []

    allow = tmp_path / "allow"
    allow.mkdir()
    async with Warden(config_for(allow, refunds, unmatched="allow")) as w:
        status, _, _, _ = await call(w, "GET", "/health")
        # Not a plain http_call: services that read paths case-blind, or drop ';'
        # parameters, would run it as the refund rule's call.
        # Spring's suffix match runs "refunds." and "refunds.tar.gz" as "refunds" too.
        for variant in (
            "/orders/A-1/Refunds",
            "/orders/A-1/refunds;jsessionid=1",
            "/orders/A-1/refunds.",
            "/orders/A-1/refunds.tar.gz",
        ):
            refused = await call(w, "POST", variant, amount=900, customer="C-7")
            assert (refused[0], refused[2]["code"]) == (400, "invalid_tool_request")
    assert status == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("GET", "/health")]
    [record] = decisions(allow)
    assert record["action"]["kind"] == "http_call"
    assert record["action"].get("tool") is None


async def test_percent_encoded_paths_are_decoded_once_before_matching(
    tmp_path: Path, refunds: Refunds
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w:
        ok = await call(w, "POST", "/%6Frders/A%2D1001/refunds", amount=5, customer="C-1")
        # "%252D" is the literal text "%2D": decoded once, it is that order id.
        literal = await call(w, "POST", "/orders/A%252D1/refunds", amount=5, customer="C-1")
        slash = await call(w, "POST", "/orders/A%2F1/refunds", amount=5, customer="C-1")
    assert ok[0] == 201
    assert literal[0] == 201
    assert slash[0] == 400
    assert [p for _, p, _ in refunds.seen] == ["/orders/A-1001/refunds", "/orders/A%252D1/refunds"]
    orders = [r["action"]["arguments"]["order_id"] for r in decisions(tmp_path)]
    assert orders == ["A-1001", "A%2D1"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"amount=5&customer=C-1", "not valid JSON"),
        (b'{"amount": 5, "amount": 5000, "customer": "C-1"}', "'amount' twice"),
        (b'{"customer": "C-1"}', "no value at '/amount'"),
    ],
)
async def test_a_body_the_rule_cannot_read_is_refused_unforwarded(
    tmp_path: Path, refunds: Refunds, body: bytes, message: str
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w:
        status, content_type, problem, _ = await call(w, "POST", "/orders/A-1/refunds", body)
    assert (status, content_type) == (400, "application/problem+json")
    assert problem["code"] == "invalid_tool_request"
    assert message in problem["detail"]
    assert refunds.seen == []
    assert decisions(tmp_path) == []


async def test_query_parameters_are_arguments_and_one_no_rule_names_is_refused(
    tmp_path: Path, refunds: Refunds
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w:
        named = await call(w, "GET", "/orders/A-1/items?status=on+hold")
        # A service that reads ?amount= would refund what no policy saw.
        unnamed = await call(w, "POST", "/orders/A-1/refunds?amount=9000", amount=5, customer="C")
        twice = await call(w, "GET", "/orders/A-1/items?status=open&status=all")
        missing = await call(w, "GET", "/orders/A-1/items")
    assert named[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [
        ("GET", "/orders/A-1/items?status=on+hold"),
        ("GET", "/orders/A-1/items"),
    ]
    first, second = decisions(tmp_path)
    assert first["action"]["tool"] == "list_items"
    assert first["action"]["arguments"] == {"order_id": "A-1", "status": "on hold"}
    assert second["action"]["arguments"] == {"order_id": "A-1", "status": None}
    assert missing[0] == 201  # an absent query parameter is null: optional
    for (status, content_type, problem, _), message in (
        (unnamed, "query parameter 'amount' is not named in this route's arguments"),
        (twice, "gives the parameter 'status' twice"),
    ):
        assert (status, content_type) == (400, "application/problem+json")
        assert problem["code"] == "invalid_tool_request"
        assert message in problem["detail"]


async def test_an_approval_lets_through_only_the_request_it_was_asked_for(
    tmp_path: Path, refunds: Refunds
) -> None:
    lead = Principal("lead", frozenset({"approver"}), frozenset())
    asked = b'{"amount":300,"customer":"C-7"}'
    # The arguments are the same; the service would also read "to", which no one saw
    # (and no argument names, so it is refused before anything is decided).
    other = b'{"amount":300,"customer":"C-7","to":"IBAN-X"}'
    async with Warden(config_for(tmp_path, refunds)) as w:
        approvals = w._approvals
        assert approvals is not None
        held = await call(w, "POST", "/orders/A-1/refunds", asked)
        assert (held[0], held[2]["code"]) == (403, "approval_required")
        (pending,) = await approvals.list("pending")
        await approvals.decide(pending.id, lead, approve=True, comment="ok")
        swapped = await call(w, "POST", "/orders/A-1/refunds", other)
        # The same content, its keys in another order (a model re-emitting the call).
        again = b'{"customer": "C-7", "amount": 300}'
        approved = await call(w, "POST", "/orders/A-1/refunds", again)
    assert (swapped[0], swapped[2]["code"]) == (400, "invalid_tool_request")
    assert approved[0] == 201
    assert refunds.seen == [("POST", "/orders/A-1/refunds", again)]


def holding(tmp_path: Path, refunds: Refunds) -> Any:
    """The refunds config with approvals held open (the agent waits on the person)."""
    config = config_for(tmp_path, refunds)
    return config.model_copy(
        update={"approvals": config.approvals.model_copy(update={"mode": "hold"})}
    )


async def until_pending(approvals: Any, modes: list[str]) -> None:
    """Until the pending approvals are of ``modes`` (the store has no event to wait on)."""
    async with asyncio.timeout(5):
        while [a.mode for a in await approvals.list("pending")] != modes:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_hold_whose_agent_hung_up_is_deferred_and_its_retry_runs_once(
    tmp_path: Path, refunds: Refunds
) -> None:
    # An agent's HTTP client gives up while the refund is held. Still held, its
    # approval would run the refund for no one, and the retry would raise a second.
    lead = Principal("lead", frozenset({"approver"}), frozenset())
    refund = b'{"amount":300,"customer":"C-7"}'
    async with Warden(holding(tmp_path, refunds)) as w, aiohttp.ClientSession() as http:
        approvals = w._approvals
        assert approvals is not None
        target = URL(w.proxy_url + "/refunds/orders/A-1/refunds", encoded=True)
        headers = {"Content-Type": "application/json"}
        with pytest.raises(TimeoutError):
            async with http.post(
                target, data=refund, headers=headers, timeout=aiohttp.ClientTimeout(total=0.5)
            ):
                pass
        await until_pending(approvals, ["defer"])
        retry = asyncio.create_task(http.post(target, data=refund, headers=headers))
        await until_pending(approvals, ["hold"])  # the retry waits on the same approval
        (pending,) = await approvals.list("pending")
        await approvals.decide(pending.id, lead, approve=True, comment="ok")
        async with await retry as resp:
            assert resp.status == 201
    assert refunds.seen == [("POST", "/orders/A-1/refunds", refund)]
    (deferred,) = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "approval_deferred"]
    assert "the agent left" in deferred["body"]["reason"]


async def test_a_hold_approved_as_its_agent_hangs_up_is_the_retrys_grant(
    tmp_path: Path, refunds: Refunds
) -> None:
    # Approved within the moment between the hang-up and Warden noticing it: run, the
    # refund would go to no one, and the retry would need a second approval.
    lead = Principal("lead", frozenset({"approver"}), frozenset())
    refund = b'{"amount":300,"customer":"C-7"}'
    async with Warden(holding(tmp_path, refunds)) as w, aiohttp.ClientSession() as http:
        approvals = w._approvals
        assert approvals is not None
        host, port = w.proxy_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /refunds/orders/A-1/refunds HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(refund) + refund
        )
        await writer.drain()
        await until_pending(approvals, ["hold"])
        (held,) = await approvals.list("pending")
        writer.close()  # the agent hangs up, and a lead approves at once
        await approvals.decide(held.id, lead, approve=True, comment="ok")
        async with asyncio.timeout(5):
            while (await approvals.get(held.id)).mode != "defer":  # type: ignore[union-attr]  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert refunds.seen == []
        target = URL(w.proxy_url + "/refunds/orders/A-1/refunds", encoded=True)
        headers = {"Content-Type": "application/json"}
        async with http.post(target, data=refund, headers=headers) as resp:
            assert resp.status == 201  # the grant, taken once: no second approval
        assert await approvals.list("pending") == []
    assert refunds.seen == [("POST", "/orders/A-1/refunds", refund)]


async def test_the_services_answer_settles_the_cap(
    tmp_path: Path, refunds: Refunds, capsys: pytest.CaptureFixture[str]
) -> None:
    # Cap: 100 a day. A refund the service refuses releases its 60; one it
    # makes counts, so the next 60 would pass the cap.
    async with Warden(config_for(tmp_path, refunds, caps=(CAP,))) as w:
        assert w.core is not None
        failed = await call(w, "POST", "/orders/A-FAIL/refunds", amount=60, customer="C-1")
        await w.core.background.drain()  # the outcome has settled the reservation
        made = await call(w, "POST", "/orders/A-1001/refunds", amount=60, customer="C-1")
        await w.core.background.drain()
        over = await call(w, "POST", "/orders/A-1002/refunds", amount=60, customer="C-1")
    assert failed[0] == 409
    assert failed[2] == {"error": "order already refunded"}
    assert made[0] == 201
    assert over[0] == 403
    assert over[2]["code"] == "denied"
    assert [p for _, p, _ in refunds.seen] == ["/orders/A-FAIL/refunds", "/orders/A-1001/refunds"]
    records = decisions(tmp_path)
    assert [r["decision"]["guard"] for r in records][-1] == "budget"
    settled = {r["decision_id"]: r["outcome"] for r in outcomes(tmp_path)}
    assert settled[records[0]["decision"]["id"]]["is_error"] is True
    assert settled[records[1]["decision"]["id"]]["is_error"] is False
    verify(tmp_path, capsys)


@pytest.mark.parametrize("status", [504, 406])
async def test_a_failure_after_the_service_acted_leaves_the_refund_spent(
    tmp_path: Path, refunds: Refunds, status: int
) -> None:
    # The refund was made, then a gateway answered 504, or the framework found no
    # format the agent's own Accept header takes (406): releasing its 60 would let an
    # agent refund without limit.
    async with Warden(config_for(tmp_path, refunds, caps=(CAP,))) as w:
        assert w.core is not None
        path = f"/orders/A-{status}/refunds"
        failed = await call(w, "POST", path, amount=60, customer="C-1")
        await w.core.background.drain()
        over = await call(w, "POST", "/orders/A-1001/refunds", amount=60, customer="C-1")
    assert failed[0] == status
    assert over[0] == 403
    assert over[2]["code"] == "denied"
    assert [p for _, p, _ in refunds.seen] == [path]
    (settled,) = outcomes(tmp_path)
    assert settled["outcome"]["is_error"] is True  # recorded as the service's failure


async def test_a_streamed_answer_the_agent_cuts_leaves_the_refund_spent(
    tmp_path: Path, refunds: Refunds
) -> None:
    # The agent reads the first event (the refund is made) and hangs up: the cut
    # stream must not read as a refund that never happened.
    async with Warden(config_for(tmp_path, refunds, caps=(CAP,))) as w:
        assert w.core is not None
        url = URL(w.proxy_url + "/refunds/orders/A-SSE/refunds", encoded=True)
        body = orjson.dumps({"amount": 60, "customer": "C-1"})
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=body, headers=headers) as resp,
        ):
            assert resp.status == 200
            assert b"rf_sse" in await resp.content.readuntil(b"\n\n")
        async with asyncio.timeout(5):  # Warden notices the hang-up and records it
            while not outcomes(tmp_path):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await w.core.background.drain()
        over = await call(w, "POST", "/orders/A-1001/refunds", amount=60, customer="C-1")
    assert over[0] == 403
    assert over[2]["code"] == "denied"
    assert [p for _, p, _ in refunds.seen] == ["/orders/A-SSE/refunds"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "detail"),
    [
        # Symfony, Laravel, Express's method-override, ASP.NET Core and Rails would
        # run the DELETE handler for a request Warden decided as the refund.
        (
            "/orders/A-1/refunds",
            b'{"amount": 5, "customer": "C-1"}',
            {"X_HTTP_Method_Override": "DELETE"},
            "carries X-HTTP-Method-Override",
        ),
        (
            "/orders/A-1/refunds",
            b'{"amount": 5, "customer": "C-1"}',
            {"x_http_method": "DELETE"},
            "carries x-http-method",
        ),
        (
            "/orders/A-1/refunds",
            b'{"amount": 5, "customer": "C-1"}',
            {"X_METHOD_OVERRIDE": "DELETE"},
            "carries X-METHOD-OVERRIDE",
        ),
        (
            "/orders/A-1/refunds",
            b'{"amount": 5, "customer": "C-1", "_Method": "DELETE"}',
            {},
            "JSON body's top-level object has a '_method' field",
        ),
        # No rule fits, so with unmatched: allow it would be a plain POST http_call.
        (
            "/orders/A-1",
            b"note=late&_method=DELETE",
            {"Content_Type": "application/x-www-form-urlencoded"},
            "form body has a '_method' field",
        ),
        ("/orders/A-1?_method=DELETE", b"", {}, "query has a '_method' field"),
    ],
)
async def test_a_method_override_is_refused_unforwarded(
    tmp_path: Path, refunds: Refunds, path: str, body: bytes, headers: dict[str, str], detail: str
) -> None:
    headers = {"Content_Type": "application/json", **headers}
    async with Warden(config_for(tmp_path, refunds, unmatched="allow")) as w:
        status, content_type, raw = await send(w, "POST", path, body, **headers)
        # The same request without the override goes through: only the override is refused.
        plain = await send(
            w,
            "POST",
            "/orders/A-1/refunds",
            b'{"amount":5,"customer":"C"}',
            Content_Type="application/json",
        )
    assert (status, content_type) == (400, "application/problem+json")
    problem = orjson.loads(raw)
    assert (problem["status"], problem["code"]) == (400, "invalid_tool_request")
    assert detail in problem["detail"]
    assert "send the request with that method instead" in problem["detail"]
    assert plain[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("POST", "/orders/A-1/refunds")]
    assert [r["action"].get("tool") for r in decisions(tmp_path)] == ["issue_refund"]


async def test_large_bodies_are_read_whole_and_a_form_too_large_to_read_is_refused(
    tmp_path: Path, refunds: Refunds
) -> None:
    form = "application/x-www-form-urlencoded"
    # Large bodies are read in a thread beside the event loop (warden.ingress.off_loop).
    padding = "x" * (off_loop.LARGE_BYTES * 2)
    late_method = orjson.dumps({"note": padding, "_method": "DELETE"})
    many_fields = b"&".join([b"n=1"] * 300_000) + b"&_method=DELETE"
    async with Warden(config_for(tmp_path, refunds, unmatched="allow")) as w:
        json_status, _, json_raw = await send(
            w, "POST", "/orders/A-1", late_method, Content_Type="application/json"
        )
        form_status, _, form_raw = await send(
            w, "POST", "/orders/A-1", many_fields, Content_Type=form
        )
        ok = await send(
            w, "POST", "/orders/A-1", padding.encode(), Content_Type="application/octet-stream"
        )
    assert json_status == form_status == 400
    assert "JSON body's top-level object has a '_method' field" in orjson.loads(json_raw)["detail"]
    assert "more than 10,000 fields" in orjson.loads(form_raw)["detail"]
    assert ok[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("POST", "/orders/A-1")]


@pytest.mark.parametrize(
    ("path", "body", "content_type", "detail"),
    [
        # Go's r.FormValue and Laravel's input() read 9000: the form body wins.
        (
            "/orders/A-1/credits?amount=5",
            b"amount=9000",
            "application/x-www-form-urlencoded",
            "form",
        ),
        # Laravel and Rails merge a JSON body's keys over the query.
        ("/orders/A-1/credits?amount=5", b'{"amount": 9000}', "application/json", "'amount'"),
        # The policy would see amount null (to_number: 0); the service 9000.
        ("/orders/A-1/credits", b'{"Amount": 9000}', "application/json", "'Amount'"),
        # A rule reading both ?status and a body's status: Laravel reads the body's.
        ("/orders/A-1/items?status=open", b'{"status": "all"}', "application/json", "'status'"),
    ],
)
async def test_a_body_that_could_override_a_query_argument_is_refused_unforwarded(
    tmp_path: Path, refunds: Refunds, path: str, body: bytes, content_type: str, detail: str
) -> None:
    # list_items also reads the body's status (a filter), besides ?status.
    both = {"status": "?status", "filter": "/status"}
    routes = [{**r, "arguments": both} if r["tool"] == "list_items" else r for r in ROUTES]
    async with Warden(config_for(tmp_path, refunds, routes=routes)) as w:
        method = "GET" if "/items" in path else "POST"
        status, content_type_got, raw = await send(w, method, path, body, Content_Type=content_type)
        # No body: a rule that reads none from it refuses one (every body field is named).
        allowed = await send(w, "POST", "/orders/A-1/credits?amount=5")
    assert (status, content_type_got) == (400, "application/problem+json")
    problem = orjson.loads(raw)
    assert problem["code"] == "invalid_tool_request"
    assert detail in problem["detail"]
    assert allowed[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("POST", "/orders/A-1/credits?amount=5")]
    [record] = decisions(tmp_path)
    assert record["action"]["arguments"] == {"order_id": "A-1", "amount": "5"}


async def test_the_most_specific_rule_decides_whatever_the_order(
    tmp_path: Path, refunds: Refunds
) -> None:
    # GET /orders/{order_id} is listed first; Flask, Go and Spring run /orders/export.
    async with Warden(config_for(tmp_path, refunds)) as w:
        export = await call(w, "GET", "/orders/export")
        order = await call(w, "GET", "/orders/A-1")
    status, content_type, body, _ = export
    assert (status, content_type, body["code"]) == (403, "application/problem+json", "denied")
    assert "exports need a lead" in body["detail"]
    assert order[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("GET", "/orders/A-1")]
    assert [r["action"]["tool"] for r in decisions(tmp_path)] == ["export_orders", "get_order"]


def test_rules_that_fit_the_same_paths_refuse_to_start(tmp_path: Path, refunds: Refunds) -> None:
    twin = {**ROUTES[1], "path": "/orders/{id}", "tool": "lookup_order"}
    with pytest.raises(ConfigError) as caught:
        config_for(tmp_path, refunds, routes=[*ROUTES, twin])
    message = str(caught.value)
    assert "upstreams.refunds" in message
    assert "routes.1 (GET /orders/{order_id}, tool 'get_order')" in message
    assert f"routes.{len(ROUTES)} (GET /orders/{{id}}, tool 'lookup_order')" in message
    assert "fit exactly the same paths" in message


async def test_head_is_decided_as_the_get_rule_it_runs(tmp_path: Path, refunds: Refunds) -> None:
    # Flask, Go, Spring and Rails run the GET handler for HEAD: with unmatched: allow
    # a HEAD /orders/export was a plain http_call that the service ran as the export.
    async with Warden(config_for(tmp_path, refunds, unmatched="allow")) as w:
        export = await send(w, "HEAD", "/orders/export")
        order = await send(w, "HEAD", "/orders/A-1")
    assert export[0] == 403
    assert order[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("HEAD", "/orders/A-1")]
    records = decisions(tmp_path)
    assert [(r["action"]["kind"], r["action"]["tool"]) for r in records] == [
        ("tool_call", "export_orders"),
        ("tool_call", "get_order"),
    ]
    assert [r["action"]["request"]["method"] for r in records] == ["HEAD", "HEAD"]


async def test_an_encoded_body_is_refused_unforwarded(tmp_path: Path) -> None:
    # The proxy's server inflates the body and Warden decided on the plaintext: it
    # would reach the service labelled gzip. Decided bytes and forwarded bytes must
    # be one, so an encoded body is refused (the caller sends it unencoded).
    plain = b'{"amount": 40, "customer": "C-7"}'
    async with RawUpstream() as service, Warden(config_for(tmp_path, service)) as w:
        status, content_type, raw = await send(
            w,
            "POST",
            "/orders/A-1/refunds",
            gzip.compress(plain),
            Content_Type="application/json",
            Content_Encoding="gzip",
        )
        sent = await send(w, "POST", "/orders/A-1/refunds", plain, Content_Type="application/json")
    assert (status, content_type) == (400, "application/problem+json")
    problem = orjson.loads(raw)
    assert problem["code"] == "invalid_tool_request"
    assert "body is encoded (Content-Encoding: gzip)" in problem["detail"]
    assert sent[0] == 201
    [received] = service.received
    assert received.endswith(b"\r\n\r\n" + plain)
    assert b"content-encoding" not in received.lower()
    assert [r["action"]["tool"] for r in decisions(tmp_path)] == ["issue_refund"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        # Tomcat drops ";" parameters, then resolves "..": the refund, not /public.
        ("/public/..;/orders/A-1/refunds", {}),
        ("/public/.;v=1/orders/A-1/refunds", {}),
        # IIS URL Rewrite, Symfony and Laminas route the path this header names.
        ("/public/page", {"X-Original-URL": "/orders/A-1/refunds"}),
        ("/public/page", {"X-Rewrite-URL": "/orders/A-1/refunds"}),
    ],
)
async def test_a_path_the_service_reads_as_another_is_refused_unforwarded(
    tmp_path: Path, refunds: Refunds, path: str, headers: dict[str, str]
) -> None:
    body = b'{"amount": 5000, "customer": "C-1"}'
    async with Warden(config_for(tmp_path, refunds, unmatched="allow")) as w:
        status, _, raw = await send(
            w, "POST", path, body, Content_Type="application/json", **headers
        )
    assert status == 400, raw
    assert refunds.seen == []


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "detail"),
    [
        # aiohttp's request.json() decodes by the charset: under utf-7 the service reads
        # a second "amount" of 9000 in what Warden read as a note.
        (
            "POST",
            "/orders/A-1/refunds",
            b'{"amount":5,"customer":"C-1","note":"x+ACI-,+ACI-amount+ACI-:9000,+ACI-z+ACI-:+ACI-y"}',
            {"Content-Type": "application/json; charset=utf-7"},
            "declared as charset 'utf-7'",
        ),
        # WSGI servers hand X_HTTP_Method_Override to the app as X-HTTP-Method-Override.
        (
            "POST",
            "/orders/A-1/refunds",
            b'{"amount":5,"customer":"C-1"}',
            {"Content-Type": "application/json", "X_HTTP_Method_Override": "DELETE"},
            "carries X_HTTP_Method_Override",
        ),
        # Fits GET /orders/{order_id} exactly; ASP.NET Core and Express route it to
        # GET /orders/export (case-blind), Rails /orders/export.json too.
        ("GET", "/orders/EXPORT", b"", {}, "only when read case-blind"),
        ("GET", "/orders/export.json", b"", {}, "only when read case-blind"),
    ],
)
async def test_a_request_the_service_reads_as_another_call_is_refused_unforwarded(
    tmp_path: Path,
    refunds: Refunds,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    detail: str,
) -> None:
    async with Warden(config_for(tmp_path, refunds)) as w, aiohttp.ClientSession() as http:
        url = URL(w.proxy_url + "/refunds" + path, encoded=True)
        async with http.request(method, url, data=body or None, headers=headers) as resp:
            status, raw = resp.status, await resp.read()
        # The request as the rule writes it goes through.
        plain = await call(w, "GET", "/orders/A-2")
    assert status == 400, raw
    problem = orjson.loads(raw)
    assert problem["code"] == "invalid_tool_request"
    assert detail in problem["detail"]
    assert plain[0] == 201
    assert [(m, p) for m, p, _ in refunds.seen] == [("GET", "/orders/A-2")]
    assert [r["action"].get("tool") for r in decisions(tmp_path)] == ["get_order"]


CUSTOMER_POLICY = """package warden

import rego.v1

decision := {"effect": "allow", "reason": "lookups are fine", "redact": redact}

redact := ["customer_id"] if input.action.tool == "get_customer_hidden"
redact := [] if input.action.tool != "get_customer_hidden"
"""


async def test_a_path_that_spells_arguments_is_sealed_and_redacted_with_them(
    tmp_path: Path, refunds: Refunds
) -> None:
    """``/customers/{customer_id}`` spells the data subject: the record seals the path with
    the arguments (erasure takes it), and a policy hiding the argument hides the path."""
    bundle = tmp_path / "customers"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(CUSTOMER_POLICY)
    routes = [
        {"method": "GET", "path": "/customers/{customer_id}", "tool": "get_customer",
         "arguments": {"customer_id": "{customer_id}"}},
        {"method": "GET", "path": "/hidden/{customer_id}", "tool": "get_customer_hidden",
         "arguments": {"customer_id": "{customer_id}"}},
    ]  # fmt: skip
    service = {"protocol": "http", "base_url": refunds.url, "timeout_s": 5, "routes": routes}
    config = make_config(
        tmp_path,
        refunds.url,
        upstreams={"refunds": service},
        policy={"bundles": [str(bundle)]},
        audit={
            "dir": str(tmp_path / "audit"),
            "subjects": {"sources": ["action.arguments.customer_id"]},
        },
    )
    email = "alice.smith@example.com"
    async with Warden(config) as w:
        assert (await call(w, "GET", f"/customers/{email}"))[0] == 201
        assert (await call(w, "GET", "/hidden/C-42"))[0] == 201
    raw = b"".join(p.read_bytes() for p in (tmp_path / "audit").rglob("*") if p.is_file())
    assert email.encode() not in raw
    sealed, hidden = decisions(tmp_path)
    assert sealed["action"]["request"]["path"] is None
    assert "action.request.path" in sealed["sealed"]["fields"]
    assert hidden["action"]["request"]["path"] == "[redacted]"
    assert "request.path" in hidden["action"]["redacted"]


MODEL_ROUTES = [
    ("POST", "/llm/v1/chat/completions"),
    ("GET", "/llm/v1/chat/completions"),  # the stored completions list
    ("POST", "/llm/v1/Chat/Completions"),  # read case-blind, as some servers do
    ("POST", "/llm/v1/chat/completions;v=1"),
    ("POST", "/v1/responses"),
    ("GET", "/openai/responses/resp_1"),
    ("POST", "/v1/threads/t1/runs"),
    ("GET", "/v1/conversations/c1/items"),
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages/batches/b1/results"),
    ("POST", "/v1/projects/p/models/gemini-2.0-flash:generateContent"),
    ("POST", "/v1/projects/p/models/claude:rawPredict"),
    ("POST", "/model/anthropic.claude-v2/invoke"),
    ("POST", "/model/m1/converse-stream"),
    ("POST", "/v1/messages.json"),  # a format suffix some servers route as the bare name
    ("POST", "/llm/v1/chat/completions.json"),
    ("POST", "/responses"),  # at the path's start, as gateways serve it
    ("POST", "/threads/t1/runs"),  # the Assistants API's own resource, wherever it sits
    ("GET", "/conversations/c1/items"),
    ("POST", "/api/chat"),  # Ollama
    ("POST", "/v2/chat"),  # Cohere
    ("POST", "/v1/agents/completions"),  # Mistral
    ("GET", "/v1beta/interactions/i1"),  # Gemini Interactions
    ("GET", "/v1/realtime"),  # OpenAI Realtime, a WebSocket
    ("GET", "/v1/sessions/s1/threads/t1/events"),  # Anthropic Managed Agents
    ("GET", "/v1/chatkit/threads/t1/items"),  # OpenAI ChatKit
]
TOOL_ROUTES = [
    # Tool APIs' own routes with these words stay theirs.
    ("POST", "/v3/example.com/messages"),  # Mailgun
    ("POST", "/me/messages"),  # Microsoft Graph
    ("POST", "/api/v10/channels/1/messages"),  # Discord
    ("GET", "/surveys/s1/responses/r1"),  # SurveyMonkey
    ("GET", "/chat/history"),
    ("GET", "/api/v1.beta/messages"),  # a version with a dot is no format suffix
    ("GET", "/v1/conversations.list"),
    ("POST", "/api/chat.postMessage"),  # Slack
    ("GET", "/api/chat/rooms"),
    ("POST", "/v3/interactions"),
    ("POST", "/v1/sessions"),  # a tool API's sign-in
    ("GET", "/v1/sessions/s1"),
    ("GET", "/v1/checkout/sessions/cs_1/line_items"),  # Stripe
    ("GET", "/v1/sessions/s1/cart/items"),
    ("POST", "/api/v1/model/fraud/score/invoke"),
]


async def test_a_model_apis_route_on_a_tool_upstream_is_refused_unless_a_rule_names_it(
    tmp_path: Path, refunds: Refunds
) -> None:
    # One gateway serving tools and an OpenAI-style model API: an SDK pointed at the
    # tool upstream read tool calls in answers forwarded unparsed, decided by nobody.
    async with (
        Warden(config_for(tmp_path, refunds, unmatched="allow")) as w,
        openai.AsyncOpenAI(
            base_url=f"{w.proxy_url}/refunds/llm/v1", api_key="sk-test", max_retries=0
        ) as c,
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        for method, path in MODEL_ROUTES:
            status, content_type, body = await send(w, method, path)
            assert (status, content_type) == (404, "application/problem+json"), path
            assert orjson.loads(body)["code"] == "route_not_governed"
        for method, path in TOOL_ROUTES:
            assert (await send(w, method, path))[0] == 201, path
    assert "protocol: openai or anthropic" in refused.value.message
    assert [(m, p) for m, p, _ in refunds.seen] == TOOL_ROUTES

    named = tmp_path / "named"
    named.mkdir()
    rule = {
        "method": "POST",
        "path": "/v1/messages",
        "tool": "send_sms",
        "arguments": {"text": "/text"},
    }
    # A parameter fits a model route without naming it: it exempts nothing.
    loose = {"method": "POST", "path": "/v2/{channel}", "tool": "post_any", "arguments": {}}
    config = config_for(named, refunds, routes=[*ROUTES, rule, loose])
    async with Warden(config) as w:
        status, _, _, _ = await call(w, "POST", "/v1/messages", text="hello")
        refused_loose = (await send(w, "POST", "/v2/responses"))[0]
    assert status == 201
    assert [d["action"]["tool"] for d in decisions(named)] == ["send_sms", "post_any"]
    assert refused_loose == 201  # v2: not a model route at all


async def test_a_model_route_is_read_with_the_upstreams_base_path(
    tmp_path: Path, refunds: Refunds
) -> None:
    # base_url https://gw/v1 and the SDK's base_url at the upstream's root: the path
    # Warden sees is /responses, the service gets /v1/responses.
    config = config_for(tmp_path, refunds, unmatched="allow", base_url=refunds.url + "/v1")
    rule = {"method": "POST", "path": "/{channel}", "tool": "post_any", "arguments": {}}
    (tmp_path / "loose").mkdir()
    loose = config_for(tmp_path / "loose", refunds, routes=[rule], base_url=refunds.url + "/v1")
    async with Warden(config) as w:
        statuses = [(await send(w, "POST", path))[0] for path in ("/threads/t1/runs", "/messages")]
    async with Warden(loose) as w:
        through_a_parameter = (await send(w, "POST", "/messages"))[0]
    assert statuses == [404, 404]
    assert through_a_parameter == 404
    assert refunds.seen == []

    # A helpdesk API at https://api.example/v1: its routes with ids are named by rules
    # that write the resource out and take the id as a parameter.
    rules = [
        {"method": "PATCH", "path": "/messages/{id}", "tool": "edit_message", "arguments": {}},
        {"method": "GET", "path": "/conversations/{id}", "tool": "get_thread", "arguments": {}},
    ]
    (tmp_path / "helpdesk").mkdir()
    helpdesk = config_for(
        tmp_path / "helpdesk", refunds, routes=rules, base_url=refunds.url + "/v1"
    )
    async with Warden(helpdesk) as w:
        named = [
            (await send(w, m, p))[0]
            for m, p in (("PATCH", "/messages/123"), ("GET", "/conversations/c_42"))
        ]
        unnamed = (await send(w, "POST", "/messages"))[0]
    assert named == [201, 201]
    assert unnamed == 404

    # A rule must write out every segment that names the model route: /chat/{room}
    # names chat but fits completions by a parameter.
    partial = [
        {"method": "POST", "path": "/chat/{room}", "tool": "post_room", "arguments": {}},
        {"method": "POST", "path": "/threads/{id}/{action}", "tool": "act", "arguments": {}},
        {"method": "POST", "path": "/model/{name}/{verb}", "tool": "run", "arguments": {}},
    ]
    (tmp_path / "partial").mkdir()
    async with Warden(config_for(tmp_path / "partial", refunds, routes=partial)) as w:
        refused = [
            (await send(w, "POST", p))[0]
            for p in ("/chat/completions", "/threads/t1/runs", "/model/x/invoke")
        ]
    assert refused == [404, 404, 404]
