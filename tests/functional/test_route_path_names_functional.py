"""Route rules and the path as the service reads it, at the base-URL proxy and Envoy ext_authz.

1. On a ``body: unread`` rule, a body field named like a path parameter would reach a
   service that reads it over the route value (ASP.NET MVC model binding, Laravel's
   ``$request->ticket_id``): decided on the path's ticket, run on the body's. Refused,
   and so is a multipart part PHP reads so named (``name='x'``), or naming ``_method``.
2. Rules are relative to the upstream's ``base_url``, as the proxy reads them: ext_authz,
   which sees Envoy's whole ``:path``, takes ``base_url``'s path off before trying them.

The services are loopback servers; ext_authz is driven through the xds-protos stubs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_envoy_authz_functional import _request, _serving
from warden.server import Warden
from warden.testing._server import LoopbackServer
from warden.testing.raw_upstream import RawReply, RawRequest, RawUpstream

TICKETS_POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "ok"}

decision := {"effect": "deny", "reason": "ticket T-LOCKED is under legal hold"} if {
	input.action.arguments.ticket_id == "T-LOCKED"
}

allow if {
	input.action.tool == "draft_reply"
	input.action.arguments.ticket_id != "T-LOCKED"
}
"""

REFUNDS_POLICY = """package warden

import rego.v1

default allow := true

allow := false if {
	input.action.tool == "issue_refund"
	input.action.arguments.amount > 500
}

default decision := {"effect": "allow", "reason": "ok"}

decision := {"effect": "deny", "reason": "refunds over 500 need a person"} if {
	input.action.tool == "issue_refund"
	input.action.arguments.amount > 500
}
"""

DRAFT: dict[str, Any] = {
    "method": "PUT",
    "path": "/tickets/{ticket_id}/draft",
    "tool": "draft_reply",
    "arguments": {"ticket_id": "{ticket_id}"},
    "body": "unread",
}
REFUND: dict[str, Any] = {
    "method": "POST",
    "path": "/orders/{order_id}/refunds",
    "tool": "issue_refund",
    "arguments": {"order_id": "{order_id}", "amount": "/amount"},
}
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MULTIPART = "multipart/form-data; boundary=b"


def _part(name: str, value: str) -> bytes:
    return f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


# Bodies a service binding fields over route values would read T-LOCKED from.
SMUGGLED = [
    (FORM, b"text=hi&ticket_id=T-LOCKED", "form body"),
    (FORM, b"text=hi&Ticket.Id=T-LOCKED", "form body"),  # PHP reads "." as "_"
    (FORM, b"text=hi&draft%5Bticket_id%5D=T-LOCKED", "form body"),  # ASP.NET's x[ticket_id]
    ("", b"ticket_id=T-LOCKED", "form body"),  # Rails reads a body without a type as a form
    (MULTIPART, _part("text", "hi") + _part("ticket_id", "T-LOCKED") + b"--b--\r\n", "form body"),
    (JSON, b'{"text": "hi", "ticket_id": "T-LOCKED"}', "JSON body's top-level object"),
    (JSON, b'{"text": "hi", "TICKET_ID": "T-LOCKED"}', "JSON body's top-level object"),
    ("text/json", b'{"ticket_id": "T-LOCKED"}', "JSON body's top-level object"),  # Laravel
]
# Bodies that carry no such field: forwarded unread, as body: unread promises.
FORWARDED = [
    (FORM, b"text=hi&ticket=T-LOCKED"),
    (MULTIPART, _part("file", "%PDF-1.7") + b"--b--\r\n"),
    (JSON, b'{"text": "hi", "reply": {"ticket_id": "T-LOCKED"}}'),  # not top level
    ("application/pdf", b"%PDF-1.7 ticket_id=T-LOCKED"),  # an upload's bytes carry no field
]


def _bundle(tmp_path: Path, policy: str) -> str:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "policy.rego").write_text(policy)
    return str(bundle)


def _laravel_like(request: RawRequest) -> RawReply:
    """``$request->ticket_id``: a form field wins over the route value of the same name."""
    route_value = request.path.split("/")[2]
    acted_on = dict(parse_qsl(request.body.decode())).get("ticket_id", route_value)
    return RawReply.json({"drafted_on": acted_on}, status=200)


def _decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [d for d in audit_records(tmp_path / "audit") if d["kind"] == "decision"]


# -- 1. a body field named like a path parameter ------------------------------------------------


async def test_proxy_refuses_a_body_field_named_like_a_path_parameter(tmp_path: Path) -> None:
    async with RawUpstream(on_request=_laravel_like) as service:
        upstream = {"protocol": "http", "base_url": service.url, "timeout_s": 5, "routes": [DRAFT]}
        config = make_config(
            tmp_path,
            service.url,
            upstreams={"tickets": upstream},
            policy={"bundles": [_bundle(tmp_path, TICKETS_POLICY)]},
        )
        async with Warden(config) as w, aiohttp.ClientSession() as http:
            url = f"{w.proxy_url}/tickets/tickets/T-OPEN/draft"
            for content_type, body, where in SMUGGLED:
                headers = {"Content-Type": content_type} if content_type else {}
                # No Content-Type at all, not aiohttp's application/octet-stream.
                async with http.put(
                    url, data=body, headers=headers, skip_auto_headers=["Content-Type"]
                ) as r:
                    problem = await r.json(content_type=None)
                assert r.status == 400, (content_type, body, problem)
                assert problem["code"] == "invalid_tool_request"
                assert (
                    f"{where} has a field named like the path parameter {{ticket_id}}"
                    in (problem["detail"])
                )
            assert service.requests == []  # nothing reached the service
            assert _decisions(tmp_path) == []  # refused before any policy: nothing recorded
            for content_type, body in FORWARDED:
                async with http.put(url, data=body, headers={"Content-Type": content_type}) as r:
                    answer = await r.json()
                assert r.status == 200, (content_type, body, answer)
            assert [bytes(q.body) for q in service.requests] == [b for _, b in FORWARDED]
    recorded = [d["action"]["arguments"] for d in _decisions(tmp_path)]
    assert recorded == [{"ticket_id": "T-OPEN"}] * len(FORWARDED)


async def test_ext_authz_refuses_a_body_field_named_like_a_path_parameter(tmp_path: Path) -> None:
    tickets = {
        "protocol": "http",
        "base_url": "http://127.0.0.1:9",
        "routes": [DRAFT],
        "unmatched": "deny",
    }
    async with _serving(
        tmp_path,
        upstreams={"tickets": tickets},
        ext_authz={"upstream": "tickets", "query": "data.warden.allow"},
        policy={"bundles": [_bundle(tmp_path, TICKETS_POLICY)]},
    ) as stub:
        for content_type, body, where in SMUGGLED:
            headers = {"content-type": content_type} if content_type else {}
            answer = await stub.Check(_request("PUT", "/tickets/T-OPEN/draft", headers, body))
            denied = answer.denied_response
            assert answer.status.code == 7, (content_type, body)
            assert denied.status.code == 400
            assert f"{where} has a field named like the path parameter {{ticket_id}}" in (
                denied.body
            )
        for content_type, body in FORWARDED:
            headers = {"content-type": content_type}
            answer = await stub.Check(_request("PUT", "/tickets/T-OPEN/draft", headers, body))
            assert answer.status.code == 0, (content_type, body, answer.denied_response.body)


# -- 1b. a multipart part's name as the service's parser reads it --------------------------------


class _Uploads(LoopbackServer):
    """A Laravel-like service: ``$request->ticket_id`` takes a form field over the route
    value, and a ``_method`` field runs that method (Symfony). Part names are read by
    aiohttp's multipart reader, and single-quoted ones as PHP reads them (``name='x'``
    is ``x``). Records the method it ran and the ticket it acted on."""

    def __init__(self) -> None:
        super().__init__()
        self.acted: list[tuple[str, str]] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/tickets/{ticket_id}", self._any)
        app.router.add_route("*", "/tickets/{ticket_id}/{tail}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = {k[1:-1] if k[:1] == k[-1:] == "'" else k: str(v) for k, v in form.items()}
        ran = fields.get("_method", request.method).upper()
        self.acted.append((ran, fields.get("ticket_id", request.match_info["ticket_id"])))
        return web.json_response({"ran": ran})


def _named_part(disposition: str, value: str) -> bytes:
    return f"--b\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n".encode()


# Parts the service reads as ticket_id or _method, though none says name="ticket_id".
OPEN = "/tickets/T-OPEN/draft"
SPELLED = [
    # PHP (so Laravel) reads a name in single quotes as one in double quotes.
    ("PUT", OPEN, "form-data; name='ticket_id'", "T-LOCKED", "{ticket_id}"),
    # No rule fits POST /tickets/T-9 (unmatched: allow), but the service would run a DELETE.
    ("POST", "/tickets/T-9", "form-data; name='_method'", "DELETE", "'_method' field"),
]


def _spelled_body(disposition: str, value: str) -> bytes:
    return _part("text", "hi") + _named_part(disposition, value) + b"--b--\r\n"


async def test_proxy_refuses_a_part_the_service_reads_as_a_path_parameter_or_method(
    tmp_path: Path,
) -> None:
    async with _Uploads() as service:
        upstream = {
            "protocol": "http",
            "base_url": service.url,
            "timeout_s": 5,
            "routes": [DRAFT],
            "unmatched": "allow",
        }
        config = make_config(
            tmp_path,
            service.url,
            upstreams={"tickets": upstream},
            policy={"bundles": [_bundle(tmp_path, TICKETS_POLICY)]},
        )
        async with Warden(config) as w, aiohttp.ClientSession() as http:
            headers = {"Content-Type": MULTIPART}
            for method, path, disposition, value, named in SPELLED:
                body = _spelled_body(disposition, value)
                url = f"{w.proxy_url}/tickets{path}"
                async with http.request(method, url, data=body, headers=headers) as r:
                    problem = await r.json(content_type=None)
                assert r.status == 400, (disposition, problem)
                assert problem["code"] == "invalid_tool_request"
                assert named in problem["detail"]
            assert service.acted == []  # nothing reached the service
            # A part named otherwise is forwarded unread, and acted on the path's ticket.
            body = _spelled_body("form-data; name='note'", "T-LOCKED")
            async with http.put(f"{w.proxy_url}/tickets{OPEN}", data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
    assert service.acted == [("PUT", "T-OPEN")]
    recorded = [d["action"]["arguments"] for d in _decisions(tmp_path)]
    assert recorded == [{"ticket_id": "T-OPEN"}]


async def test_ext_authz_refuses_a_part_the_service_reads_as_a_path_parameter_or_method(
    tmp_path: Path,
) -> None:
    tickets = {
        "protocol": "http",
        "base_url": "http://127.0.0.1:9",
        "routes": [DRAFT],
        "unmatched": "allow",
    }
    async with _serving(
        tmp_path,
        upstreams={"tickets": tickets},
        ext_authz={"upstream": "tickets", "query": "data.warden.allow"},
        policy={"bundles": [_bundle(tmp_path, TICKETS_POLICY)]},
    ) as stub:
        headers = {"content-type": MULTIPART}
        for method, path, disposition, value, named in SPELLED:
            body = _spelled_body(disposition, value)
            answer = await stub.Check(_request(method, path, headers, body))
            assert answer.denied_response.status.code == 400, disposition
            assert named in answer.denied_response.body
        forwarded = _spelled_body("form-data; name='note'", "T-LOCKED")
        answer = await stub.Check(_request("PUT", OPEN, headers, forwarded))
        assert answer.status.code == 0, answer.denied_response.body
    assert _decisions(tmp_path)[-1]["action"]["arguments"] == {"ticket_id": "T-OPEN"}


# -- 2. rules relative to base_url --------------------------------------------------------------


def _orders(base_url: str, *routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "protocol": "http",
        "base_url": base_url,
        "timeout_s": 5,
        "routes": list(routes) or [REFUND],
        "unmatched": "allow",
    }


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/orders/A-1/refunds",  # what the service serves: base_url's path, then the rule's
        "/API/V2/orders/A-1/refunds",  # base_url's path read case-blind, as the proxy's join does
        "/orders/A-1/refunds",  # before an Envoy prefix_rewrite adds base_url's path
    ],
)
async def test_ext_authz_tries_rules_past_the_base_url_path(tmp_path: Path, path: str) -> None:
    big, small = orjson.dumps({"amount": 900000}), orjson.dumps({"amount": 5})
    json = {"content-type": JSON}
    async with _serving(
        tmp_path,
        upstreams={"orders": _orders("http://127.0.0.1:9/api/v2")},
        ext_authz={"upstream": "orders", "query": "data.warden.allow"},
        policy={"bundles": [_bundle(tmp_path, REFUNDS_POLICY)]},
    ) as stub:
        refused = await stub.Check(_request("POST", path, json, big))
        allowed = await stub.Check(_request("POST", path, json, small))
    assert refused.status.code == 7  # a plain false: Envoy answers its own 403
    assert allowed.status.code == 0
    actions = [d["action"] for d in _decisions(tmp_path)]
    assert [(a["kind"], a["tool"], a["arguments"]) for a in actions] == [
        ("tool_call", "issue_refund", {"order_id": "A-1", "amount": 900000}),
        ("tool_call", "issue_refund", {"order_id": "A-1", "amount": 5}),
    ]
    assert actions[0]["request"]["path"] == path  # recorded as Envoy sent it


async def test_the_proxy_and_ext_authz_decide_a_base_path_request_alike(tmp_path: Path) -> None:
    body = orjson.dumps({"amount": 900000})
    async with RawUpstream(on_request=lambda _: RawReply.json({"ok": True})) as service:
        upstream = _orders(service.url + "/api/v2")
        proxy_dir, authz_dir = tmp_path / "proxy", tmp_path / "authz"
        proxy_dir.mkdir()
        authz_dir.mkdir()
        config = make_config(
            proxy_dir,
            service.url,
            upstreams={"orders": upstream},
            policy={"bundles": [_bundle(proxy_dir, REFUNDS_POLICY)]},
        )
        async with Warden(config) as w, aiohttp.ClientSession() as http:
            url = f"{w.proxy_url}/orders/orders/A-1/refunds"
            async with http.post(url, data=body, headers={"Content-Type": JSON}) as r:
                assert r.status == 403
        async with _serving(
            authz_dir,
            upstreams={"orders": upstream},
            ext_authz={"upstream": "orders", "query": "data.warden.allow"},
            policy={"bundles": [_bundle(authz_dir, REFUNDS_POLICY)]},
        ) as stub:
            # The very path the proxy would have sent the service.
            answer = await stub.Check(
                _request("POST", "/api/v2/orders/A-1/refunds", {"content-type": JSON}, body)
            )
            assert answer.status.code == 7
    assert service.requests == []

    def called(directory: Path) -> list[tuple[str, Any]]:
        return [(d["action"]["tool"], d["action"]["arguments"]) for d in _decisions(directory)]

    assert (
        called(proxy_dir)
        == called(authz_dir)
        == [("issue_refund", {"order_id": "A-1", "amount": 900000})]
    )


async def test_ext_authz_refuses_paths_it_would_read_apart_from_the_service(
    tmp_path: Path,
) -> None:
    json = {"content-type": JSON}
    body = orjson.dumps({"amount": 900000})
    whole = {**REFUND, "path": "/api/v2/orders/{order_id}/refunds"}
    async with _serving(
        tmp_path,
        upstreams={"orders": _orders("http://127.0.0.1:9/api/v2", REFUND)},
        ext_authz={"upstream": "orders", "query": "data.warden.allow"},
        policy={"bundles": [_bundle(tmp_path, REFUNDS_POLICY)]},
    ) as stub:
        # Tomcat and Spring read "/api;x/v2" as "/api/v2": a refund to them.
        params = await stub.Check(_request("POST", "/api;x/v2/orders/A-1/refunds", json, body))
    assert params.denied_response.status.code == 400
    assert "base_url only when read without ';' parameters" in params.denied_response.body

    (tmp_path / "whole").mkdir()
    async with _serving(
        tmp_path / "whole",
        upstreams={"orders": _orders("http://127.0.0.1:9/api/v2", whole)},
        ext_authz={"upstream": "orders", "query": "data.warden.allow"},
        policy={"bundles": [_bundle(tmp_path, REFUNDS_POLICY)]},
    ) as stub:
        # A rule written for Envoy's whole :path: the proxy would not read it so.
        written = await stub.Check(_request("POST", "/api/v2/orders/A-1/refunds", json, body))
    assert written.denied_response.status.code == 400
    assert "relative to base_url; write the rule without /api/v2" in written.denied_response.body


async def test_ext_authz_model_route_named_by_a_rule_past_the_base_url_path(
    tmp_path: Path,
) -> None:
    # A gateway whose own /v1/messages is a plain tool API the operator named in a rule.
    messages = {"method": "POST", "path": "/messages", "tool": "post_message", "arguments": {}}
    async with _serving(
        tmp_path,
        upstreams={"chat": _orders("http://127.0.0.1:9/v1", messages)},
        ext_authz={"upstream": "chat", "query": "data.warden.allow"},
        policy={"bundles": [_bundle(tmp_path, REFUNDS_POLICY)]},
    ) as stub:
        named = await stub.Check(_request("POST", "/v1/messages"))
        unnamed = await stub.Check(_request("GET", "/v1/messages"))
    assert named.status.code == 0
    assert unnamed.denied_response.status.code == 404  # a model API's route no rule names
    tools = [d["action"].get("tool") for d in _decisions(tmp_path)]
    assert tools[0] == "post_message"
