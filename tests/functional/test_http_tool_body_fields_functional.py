"""Every body field of a routed HTTP tool call is an argument, end to end.

A real Warden with the shipped customer-support bundle sits in front of a
loopback refunds service (:class:`~warden.testing.raw_upstream.RawUpstream`);
the agent is a plain aiohttp client. The bundle reads ``currency`` (USD by
default): a ``"currency": "KWD"`` the route rule does not name was decided
and recorded as a USD refund, and reached the service. The same holds at
Envoy ext_authz, driven through the xds-protos stubs as Envoy would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_envoy_authz_functional import _request, _serving
from warden.server import Warden
from warden.testing.raw_upstream import RawReply, RawRequest, RawUpstream

GRPC_OK = 0
JSON = {"content-type": "application/json"}
CURRENCY = {"pointer": "/currency", "optional": True}
REFUND: dict[str, Any] = {
    "method": "POST",
    "path": "/orders/{order_id}/refunds",
    "tool": "issue_refund",
    "arguments": {"order_id": "{order_id}", "amount": "/amount", "customer_id": "/customer"},
}
ORDER: dict[str, Any] = {
    "method": "GET",
    "path": "/orders/{order_id}",
    "tool": "get_order",
    "arguments": {"order_id": "{order_id}"},
}
DRAFT: dict[str, Any] = {
    # A draft's text, sent as is: the policy decides by the ticket alone.
    "method": "PUT",
    "path": "/tickets/{ticket_id}/draft",
    "tool": "draft_reply",
    "arguments": {"ticket_id": "{ticket_id}"},
    "body": "unread",
}
KWD = {"amount": 90, "customer": "C-1001", "currency": "KWD"}


def _answer(request: RawRequest) -> RawReply:
    return RawReply.json({"refund_id": "rf_1", "currency": "as sent"}, status=201)


@pytest.fixture
async def service() -> AsyncIterator[RawUpstream]:
    async with RawUpstream(on_request=_answer) as upstream:
        yield upstream


def _config(tmp_path: Path, service: RawUpstream, *routes: dict[str, Any]) -> Any:
    upstream = {"protocol": "http", "base_url": service.url, "timeout_s": 5, "routes": routes}
    return make_config(tmp_path, service.url, upstreams={"refunds": upstream})


async def _send(
    w: Warden, method: str, path: str, body: bytes, content_type: str = "application/json"
) -> tuple[int, str, Any]:
    headers = {"Content-Type": content_type} if body else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{w.proxy_url}/refunds{path}", data=body, headers=headers) as resp,
    ):
        return resp.status, resp.content_type, orjson.loads(await resp.read())


def _decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"]


async def test_a_body_field_the_rule_does_not_name_is_refused_undecided_and_unforwarded(
    tmp_path: Path, service: RawUpstream
) -> None:
    async with Warden(_config(tmp_path, service, REFUND)) as w:
        status, content_type, problem = await _send(
            w, "POST", "/orders/A-1001/refunds", orjson.dumps(KWD)
        )
    assert (status, content_type) == (400, "application/problem+json")
    assert problem["code"] == "invalid_tool_request"
    assert problem["type"] == "https://warden.dev/problems/invalid-tool-request"
    assert "'/currency'" in problem["detail"]
    assert "POST /orders/{order_id}/refunds (issue_refund)" in problem["detail"]
    # Not a refund of 90.00 USD: nothing decided, recorded or sent on.
    assert service.requests == []
    assert _decisions(tmp_path) == []


async def test_an_optional_field_named_by_the_rule_is_decided_as_sent(
    tmp_path: Path, service: RawUpstream
) -> None:
    rule = {**REFUND, "arguments": {**REFUND["arguments"], "currency": CURRENCY}}
    usd = {**KWD, "currency": "USD"}
    left_out = {"amount": 90, "customer": "C-1001"}
    async with Warden(_config(tmp_path, service, rule)) as w:
        kwd = await _send(w, "POST", "/orders/A-1001/refunds", orjson.dumps(KWD))
        allowed = await _send(w, "POST", "/orders/A-1001/refunds", orjson.dumps(usd))
        absent = await _send(w, "POST", "/orders/A-1001/refunds", orjson.dumps(left_out))
    assert (kwd[0], kwd[2]["code"]) == (403, "denied")
    assert "this one is in KWD" in kwd[2]["detail"]
    assert allowed[0] == 201
    # Left out, it is left out of the arguments too: the bundle's default (USD) applies,
    # as the service's own does to the body it gets.
    assert absent[0] == 201
    assert [r.json() for r in service.requests] == [usd, left_out]
    records = [d["action"]["arguments"] for d in _decisions(tmp_path)]
    assert [a.get("currency", "absent") for a in records] == ["KWD", "USD", "absent"]


async def test_a_rule_that_reads_no_body_refuses_one_unless_it_forwards_it_unread(
    tmp_path: Path, service: RawUpstream
) -> None:
    text = b"Dear customer, your refund is on its way."
    async with Warden(_config(tmp_path, service, REFUND, ORDER, DRAFT)) as w:
        refused = await _send(w, "GET", "/orders/A-1001", b'{"expand": "payments"}')
        form = await _send(
            w, "GET", "/orders/A-1001", b"expand=payments", "application/x-www-form-urlencoded"
        )
        drafted = await _send(w, "PUT", "/tickets/T-1/draft", text, "text/plain")
    assert (refused[0], refused[2]["code"]) == (400, "invalid_tool_request")
    assert "'/expand'" in refused[2]["detail"]
    assert "GET /orders/{order_id} (get_order) reads no argument" in refused[2]["detail"]
    assert (form[0], form[2]["code"]) == (400, "invalid_tool_request")
    assert drafted[0] == 201
    assert [(r.method, r.path, r.body) for r in service.requests] == [
        ("PUT", "/tickets/T-1/draft", text)
    ]
    [decision] = _decisions(tmp_path)
    assert decision["action"]["tool"] == "draft_reply"


# -- Envoy ext_authz ---------------------------------------------------------------------------

ALLOW_ALL = """package envoy.authz

import rego.v1

default allow := true
"""


def _authz(tmp_path: Path, *routes: dict[str, Any]) -> dict[str, Any]:
    """``_serving`` overrides: an allow-all policy, so only Warden's own checks refuse."""
    bundle = tmp_path / "allow-all"
    bundle.mkdir(exist_ok=True)
    (bundle / "policy.rego").write_text(ALLOW_ALL)
    orders = {"protocol": "http", "base_url": "http://127.0.0.1:9", "routes": list(routes)}
    return {"policy": {"bundles": [str(bundle)]}, "upstreams": {"orders": orders}}


async def test_ext_authz_refuses_a_body_field_the_rule_does_not_name(tmp_path: Path) -> None:
    named = {**REFUND, "path": "/orders/{order_id}/credits", "tool": "issue_credit"}
    named["arguments"] = {**REFUND["arguments"], "currency": CURRENCY}
    async with _serving(tmp_path, **_authz(tmp_path, REFUND, named)) as stub:
        refused = await stub.Check(
            _request("POST", "/orders/A-1001/refunds", JSON, orjson.dumps(KWD))
        )
        credit = await stub.Check(
            _request("POST", "/orders/A-1001/credits", JSON, orjson.dumps(KWD))
        )
    assert refused.status.code != GRPC_OK
    assert refused.denied_response.status.code == 400
    body = refused.denied_response.body
    assert "'/currency', which no argument of the rule" in body
    assert "POST /orders/{order_id}/refunds (issue_refund)" in body
    assert credit.status.code == GRPC_OK
    records = {d["decision"]["id"]: d for d in _decisions(tmp_path)}
    decided = records[credit.dynamic_metadata["decision_id"]]["action"]["arguments"]
    assert decided["currency"] == "KWD"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        # A chunked body Envoy did not send (no with_request_body): Warden sees none.
        ({"transfer-encoding": "chunked"}, b""),
        # Cut at max_request_bytes: the fields past the cut go unchecked.
        ({"x-envoy-auth-partial-body": "true"}, b"%PDF-1.7 the first bytes"),
    ],
)
async def test_ext_authz_refuses_a_body_it_did_not_see_whole_on_a_rule(
    tmp_path: Path, headers: dict[str, str], body: bytes
) -> None:
    pdf = {"content-type": "application/pdf", **headers}
    async with _serving(tmp_path, **_authz(tmp_path, ORDER, DRAFT)) as stub:
        partial = await stub.Check(_request("GET", "/orders/A-1001", pdf, body))
        whole = await stub.Check(
            _request("PUT", "/tickets/T-1/draft", {"content-type": "text/plain"}, b"Dear")
        )
        extra = await stub.Check(
            _request("GET", "/orders/A-1001", {"content-type": "application/pdf"}, b"%P")
        )
    assert partial.status.code != GRPC_OK
    assert partial.denied_response.status.code == 400
    assert "only part of the body, or none" in partial.denied_response.body
    assert "GET /orders/{order_id} (get_order)" in partial.denied_response.body
    assert whole.status.code == GRPC_OK  # body: unread, sent whole
    assert extra.denied_response.status.code == 400
    assert "reads no argument from the body" in extra.denied_response.body
