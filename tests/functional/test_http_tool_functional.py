"""Plain HTTP tool APIs with route rules (issue 11, item 4), end to end.

A real Warden with real Rego sits in front of a small refunds service (an
aiohttp server on 127.0.0.1:0); the agent is a plain aiohttp client, as an
agent's HTTP tool would be.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from tests.functional.conftest import audit_records, make_config
from warden.admin.auth import Principal
from warden.cli import main as warden_cli
from warden.server import Warden
from warden.testing._server import LoopbackServer

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "not a refund"}

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
    {
        "method": "GET",
        "path": "/orders/{order_id}/items",
        "tool": "list_items",
        "arguments": {"order_id": "{order_id}", "status": "?status"},
    },
]
CAP = {"name": "refunds", "tool": "issue_refund", "value": "amount", "limit": 100}


class Refunds(LoopbackServer):
    """The refunds service: records what reached it; order ``A-FAIL`` cannot be refunded."""

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
        return web.json_response({"refund_id": f"rf_{len(self.seen)}", "order": order}, status=201)


@pytest.fixture
async def refunds() -> AsyncIterator[Refunds]:
    async with Refunds() as server:
        yield server


def config_for(
    tmp_path: Path, refunds: Refunds, caps: tuple[dict[str, Any], ...] = (), **upstream: Any
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
        got = await call(
            w, "POST", "/orders/A-1001/refunds", amount=40, customer="C-7", note="late"
        )
    status, _, body, decision_id = got
    assert status == 201
    assert body == {"refund_id": "rf_1", "order": ["A-1001"]}
    # The body reaches the service exactly as sent, extra fields and all.
    assert refunds.seen == [
        ("POST", "/orders/A-1001/refunds", b'{"amount":40,"customer":"C-7","note":"late"}')
    ]
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
        for variant in ("/orders/A-1/Refunds", "/orders/A-1/refunds;jsessionid=1"):
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
    # The arguments are the same; the service would also read "to", which no one saw.
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
    assert (swapped[0], swapped[2]["code"]) == (403, "approval_required")
    assert approved[0] == 201
    assert refunds.seen == [("POST", "/orders/A-1/refunds", again)]


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
