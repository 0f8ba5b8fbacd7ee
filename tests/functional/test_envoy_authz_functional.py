"""Envoy ext_authz against a real Warden: xds-protos stubs play Envoy's side.

Warden runs in-process (its core, policy workers and audit log); the ext_authz
service is added to a ``grpc.aio`` server on 127.0.0.1:0 and driven through
``envoy.service.auth.v3.Authorization`` stubs, as Envoy would drive it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from tests.functional.conftest import ROOT, audit_records, make_config
from tests.unit.test_envoy_authz_input import descriptor_set
from warden.admin.auth import Principal
from warden.config import PolicyConfig
from warden.errors import ConfigError
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.ingress.envoy_authz import ExtAuthzService
from warden.killswitch import Scope
from warden.policy.engine import PolicyEngine
from warden.server import Warden

BUNDLE = ROOT / "policies" / "envoy-authz"
READER = {"authorization": "Bearer reader-token-example"}
SUPPORT = {"authorization": "Bearer support-token-example"}
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7

Check = Callable[..., Any]


def _request(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = "10.0.0.7"
    request.attributes.source.address.socket_address.port_value = 51234
    request.attributes.destination.address.socket_address.address = "10.0.0.9"
    http = request.attributes.request.http
    http.method = method
    http.path = path
    http.host = "orders.internal"
    http.headers.update({":method": method, ":path": path, **(headers or {})})
    if body:
        http.raw_body = body
        http.headers["content-length"] = str(len(body))
    return request


ORDERS: dict[str, Any] = {
    "protocol": "http",
    "base_url": "http://127.0.0.1:9",
    "routes": [
        {
            "method": "POST",
            "path": "/orders/{order_id}/refunds",
            "tool": "issue_refund",
            "arguments": {"order_id": "{order_id}", "amount": "/amount"},
        }
    ],
    "unmatched": "allow",
}
"""The upstream ext_authz decides for: one refund route, anything else allowed."""


@asynccontextmanager
async def _serving(
    tmp_path: Path, *, yield_warden: bool = False, **overrides: Any
) -> AsyncIterator[Any]:
    """Warden (core only) plus a gRPC server carrying the ext_authz service; yields a stub."""
    base: dict[str, Any] = {
        "policy": {"bundles": [str(BUNDLE)], "workers": 1, "watch": False, "deadline_ms": 5000},
        "upstreams": {"orders": ORDERS},
        "ext_authz": {"upstream": "orders"},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    config = make_config(tmp_path, "http://127.0.0.1:9", **base)
    async with Warden(config, listeners=False) as warden:
        assert warden.core is not None
        service = ExtAuthzService(warden.core, config, approvals=warden._approvals)
        server = grpc.aio.server()
        service.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                yield (stub, warden) if yield_warden else stub
        finally:
            await server.stop(None)
            await service.close()


def _decisions(tmp_path: Path) -> dict[str, dict[str, Any]]:
    records = audit_records(tmp_path / "audit")
    return {r["decision"]["id"]: r for r in records if r["kind"] == "decision"}


def _headers(options: Any) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}


def _checks(result: str) -> float:
    return REGISTRY.get_sample_value("warden_ext_authz_checks_total", {"result": result}) or 0.0


async def test_allowed_request_carries_the_policys_headers_and_its_decision(
    tmp_path: Path,
) -> None:
    before = _checks("allowed")
    async with _serving(tmp_path) as stub:
        response = await stub.Check(
            _request(
                "GET",
                "/orders/A-1?expand=items",
                {**READER, "x-debug-override": "1", "x-warden-context-ticket": "T-9"},
            )
        )
    assert response.status.code == GRPC_OK
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    assert _headers(ok.headers) == {"x-ext-authz-check": "allowed", "x-user-role": "reader"}
    assert list(ok.headers_to_remove) == ["x-debug-override"]
    assert _headers(ok.response_headers_to_add) == {"x-governed-by": "warden"}
    metadata = dict(response.dynamic_metadata)
    decision_id = metadata["decision_id"]
    assert metadata == {
        "role": "reader",
        "decision_id": decision_id,
        "warden_decision_id": decision_id,
    }
    record = _decisions(tmp_path)[decision_id]
    assert record["decision"]["effect"] == "allow"
    assert record["decision"]["guard"] == "policy"
    action = record["action"]
    assert (action["kind"], action["protocol"], action["stage"]) == (
        "http_call",
        "envoy_authz",
        "executed",
    )
    assert (action["request"]["method"], action["request"]["path"]) == ("GET", "/orders/A-1")
    assert action["context"] == {"ticket": "T-9"}
    # The bearer token reached the policy, never the record.
    assert b"reader-token-example" not in orjson.dumps(record)
    assert _checks("allowed") == before + 1


async def test_denied_request_gets_the_policys_status_body_and_headers(tmp_path: Path) -> None:
    before = _checks("denied")
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("GET", "/orders/A-1"))
    assert response.status.code == GRPC_PERMISSION_DENIED
    denied = response.denied_response
    assert denied.status.code == 401
    assert denied.body == "unauthorized: send Authorization: Bearer <token>"
    assert _headers(denied.headers) == {"www-authenticate": "Bearer"}
    decision_id = response.dynamic_metadata["decision_id"]
    record = _decisions(tmp_path)[decision_id]
    assert (record["decision"]["effect"], record["decision"]["enforced"]) == ("deny", "deny")
    assert _checks("denied") == before + 1


async def test_a_route_rule_makes_the_request_a_tool_call(tmp_path: Path) -> None:
    json_headers = {**SUPPORT, "content-type": "application/json"}
    async with _serving(tmp_path) as stub:
        small = await stub.Check(
            _request("POST", "/orders/A-1/refunds", json_headers, b'{"amount": 40}')
        )
        large = await stub.Check(
            _request("POST", "/orders/A-1/refunds", json_headers, b'{"amount": 400}')
        )
        # A query parameter no rule names is input the service may act on undecided.
        queried = await stub.Check(
            _request("POST", "/orders/A-1/refunds?amount=4000", json_headers, b'{"amount": 40}')
        )
        # Envoy cut the body at max_request_bytes: a prefix may parse as JSON (here the
        # first of two documents) while the service reads the whole.
        partial = _request("POST", "/orders/A-1/refunds", json_headers, b'{"amount": 40}')
        partial.attributes.request.http.headers["x-envoy-auth-partial-body"] = "true"
        truncated = await stub.Check(partial)
    assert small.status.code == GRPC_OK
    assert large.status.code == GRPC_PERMISSION_DENIED
    assert large.denied_response.status.code == 403
    assert queried.status.code == GRPC_PERMISSION_DENIED
    assert queried.denied_response.status.code == 400
    assert "'amount' is not named in this route's arguments" in queried.denied_response.body
    assert truncated.status.code == GRPC_PERMISSION_DENIED
    assert truncated.denied_response.status.code == 400
    assert "only part of the body" in truncated.denied_response.body
    records = _decisions(tmp_path)
    action = records[small.dynamic_metadata["decision_id"]]["action"]
    assert (action["kind"], action["tool"]) == ("tool_call", "issue_refund")
    assert action["arguments"] == {"order_id": "A-1", "amount": 40}
    assert records[large.dynamic_metadata["decision_id"]]["decision"]["effect"] == "deny"


@pytest.mark.parametrize(
    ("body", "content_type", "expect"),
    [
        (b'{"amount": ', "application/json", "error parsing request body"),
        (b'{"amount": 1, "amount": 2}', "application/json", "twice"),
        (b'{"amount": NaN}', "application/json", "NaN"),
        (b'{"amount": 99999999999999999999999}', "application/json", "64 bits"),
    ],
)
async def test_an_unparsable_body_fails_closed_with_400(
    tmp_path: Path, body: bytes, content_type: str, expect: str
) -> None:
    before = _checks("invalid")
    headers = {**SUPPORT, "content-type": content_type}
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("POST", "/orders/A-1/notes", headers, body))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 400
    assert expect in response.denied_response.body
    record = _decisions(tmp_path)[response.dynamic_metadata["decision_id"]]
    assert (record["decision"]["effect"], record["decision"]["guard"]) == ("deny", "validation")
    assert _checks("invalid") == before + 1


async def test_a_malformed_path_fails_closed(tmp_path: Path) -> None:
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("GET", "/orders/%zz", READER))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 400
    assert "error parsing path and query" in response.denied_response.body


@pytest.mark.parametrize(
    "path", ["/orders/A-1/refunds/", "/orders//A-1/refunds", "/orders/A-1/%2E/refunds"]
)
async def test_a_path_a_service_may_read_as_a_routes_resource_is_refused(
    tmp_path: Path, path: str
) -> None:
    # With unmatched: allow, a refund spelled with a trailing slash would pass as a
    # plain HTTP call, outside the refund's caps, to a service that ignores the slash.
    headers = {**SUPPORT, "content-type": "application/json"}
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("POST", path, headers, b'{"amount": 400}'))
        root = await stub.Check(_request("GET", "/", READER))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 400
    assert "no route rule can be tried" in response.denied_response.body
    record = _decisions(tmp_path)[response.dynamic_metadata["decision_id"]]
    assert (record["decision"]["effect"], record["decision"]["guard"]) == ("deny", "validation")
    assert root.status.code == GRPC_OK  # "/" holds no segment to misread


_REFUND = b'{"amount": 40}'


@pytest.mark.parametrize(
    ("path", "headers", "body", "expect"),
    [
        # The service behind Envoy (Symfony, Laravel, Express, ASP.NET, Rails) would run
        # the method these name, not the refund the policy allowed.
        ("/orders/A-1/refunds", {"x-http-method-override": "DELETE"}, _REFUND, "carries"),
        ("/orders/A-1/refunds", {"x-method-override": "PUT"}, _REFUND, "carries"),
        (
            "/orders/A-1/refunds",
            {},
            b'{"amount": 40, "_method": "DELETE"}',
            "JSON body's top-level object has a '_method' field",
        ),
        (
            "/orders/A-1/notes",
            {"content-type": "application/x-www-form-urlencoded"},
            b"text=hi&_method=DELETE",
            "form body has a '_method' field",
        ),
        # Warden would read the encoded bytes; the service may inflate them.
        (
            "/orders/A-1/refunds",
            {"content-encoding": "gzip"},
            _REFUND,
            "body is encoded (Content-Encoding: gzip)",
        ),
        # Spring's suffix match runs it as the refund; with unmatched: allow it was
        # a plain http_call.
        ("/orders/A-1/refunds.tar.gz", {}, _REFUND, "suffix after a dot"),
        # A "_method" field may sit past where Envoy cut the body, or in a body it never sent.
        (
            "/orders/A-1/notes",
            {
                "content-type": "application/x-www-form-urlencoded",
                "x-envoy-auth-partial-body": "true",
            },
            b"text=hi",
            "Envoy sent only part of the body, or none",
        ),
        ("/orders/A-1/notes", {"content-length": "4000"}, b"", "only part of the body, or none"),
        # Chunked, and Envoy sent none of it: a body with no length to say so.
        ("/orders/A-1/notes", {"transfer-encoding": "chunked"}, b"", "or none"),
    ],
)
async def test_a_request_the_service_may_run_as_another_call_is_refused(
    tmp_path: Path, path: str, headers: dict[str, str], body: bytes, expect: str
) -> None:
    before = _checks("invalid")
    sent = {**SUPPORT, "content-type": "application/json", **headers}
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("POST", path, sent, body))
        plain = await stub.Check(
            _request(
                "POST",
                "/orders/A-1/refunds",
                {**SUPPORT, "content-type": "application/json"},
                _REFUND,
            )
        )
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 400
    assert expect in response.denied_response.body
    record = _decisions(tmp_path)[response.dynamic_metadata["decision_id"]]
    assert (record["decision"]["effect"], record["decision"]["guard"]) == ("deny", "validation")
    assert _checks("invalid") == before + 1
    assert plain.status.code == GRPC_OK


async def test_a_cut_body_that_cannot_carry_form_fields_is_left_to_the_policy(
    tmp_path: Path,
) -> None:
    headers = {
        **SUPPORT,
        "content-type": "application/octet-stream",
        "x-envoy-auth-partial-body": "true",
    }
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("POST", "/files/upload", headers, b"\x00" * 64))
    record = _decisions(tmp_path)[response.dynamic_metadata["decision_id"]]
    assert record["decision"]["guard"] != "validation"
    assert record["action"]["kind"] == "http_call"


async def test_dry_run_records_the_denial_and_lets_it_through(tmp_path: Path) -> None:
    before = _checks("dry_run")
    async with _serving(tmp_path, ext_authz={"dry_run": True}) as stub:
        response = await stub.Check(_request("GET", "/orders/A-1"))
        unparsable = await stub.Check(
            _request("POST", "/x", {"content-type": "application/json"}, b"{")
        )
    assert response.status.code == GRPC_OK
    assert response.WhichOneof("http_response") == "ok_response"
    assert list(response.ok_response.headers) == []
    record = _decisions(tmp_path)[response.dynamic_metadata["decision_id"]]
    decision = record["decision"]
    assert (decision["effect"], decision["enforced"], decision["would"], decision["mode"]) == (
        "deny",
        "allow",
        "would_deny",
        "observe",
    )
    # As in OPA-Envoy, what cannot be parsed is denied even in dry-run.
    assert unparsable.status.code == GRPC_PERMISSION_DENIED
    assert unparsable.denied_response.status.code == 400
    assert _checks("dry_run") == before + 1


async def test_an_agent_in_observe_mode_still_gets_what_cannot_be_parsed_refused(
    tmp_path: Path,
) -> None:
    # Observe mode lets a rule's denial through, and `unmatched: deny` is such a rule;
    # a body Warden cannot read is refused in every mode (it was answered OK).
    orders = {**ORDERS, "unmatched": "deny"}
    json_body = {**SUPPORT, "content-type": "application/json"}
    async with _serving(tmp_path, mode="observe", upstreams={"orders": orders}) as stub:
        unparsable = await stub.Check(_request("POST", "/orders/A-1/refunds", json_body, b"{"))
        unmatched = await stub.Check(_request("GET", "/nowhere", SUPPORT))
    assert unparsable.status.code == GRPC_PERMISSION_DENIED
    assert unparsable.denied_response.status.code == 400
    assert unmatched.status.code == GRPC_OK
    record = _decisions(tmp_path)[unmatched.dynamic_metadata["decision_id"]]
    assert (record["decision"]["would"], record["decision"]["guard"]) == (
        "would_deny",
        "validation",
    )


def _bundle(tmp_path: Path, source: str) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "policy.rego").write_text(source)
    return folder


BOOLEAN_POLICY = """package envoy.authz

import rego.v1

default allow := false

allow if input.parsed_path[0] == "open"
"""


async def test_a_boolean_result_answers_without_an_http_response(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, BOOLEAN_POLICY)
    policy = {"bundles": [str(bundle)]}
    async with _serving(tmp_path, policy=policy) as stub:
        allowed = await stub.Check(_request("GET", "/open/door"))
        denied = await stub.Check(_request("GET", "/closed/door"))
    assert allowed.status.code == GRPC_OK
    assert allowed.WhichOneof("http_response") is None
    assert denied.status.code == GRPC_PERMISSION_DENIED
    assert denied.WhichOneof("http_response") is None, denied.denied_response.body
    assert denied.dynamic_metadata["decision_id"] == denied.dynamic_metadata["warden_decision_id"]


@pytest.mark.parametrize(
    ("source", "guard", "error"),
    [
        # The bundle has no envoy.authz package: the query is undefined.
        ("package other\n\nimport rego.v1\n\nallow := true\n", "policy", None),
        # A result object without "allowed".
        (
            'package envoy.authz\n\nimport rego.v1\n\nallow := {"ok": true}\n',
            "fallback",
            "policy_error",
        ),
        # An http_status Envoy cannot send.
        (
            'package envoy.authz\n\nallow := {"allowed": false, "http_status": 999}\n',
            "fallback",
            "policy_error",
        ),
    ],
)
async def test_a_missing_or_unusable_result_denies(
    tmp_path: Path, source: str, guard: str, error: str | None
) -> None:
    bundle = _bundle(tmp_path, source)
    async with _serving(tmp_path, policy={"bundles": [str(bundle)]}) as stub:
        response = await stub.Check(_request("GET", "/anything", READER))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    decision_id = response.dynamic_metadata["decision_id"]
    assert decision_id in response.denied_response.body
    record = _decisions(tmp_path)[decision_id]
    assert (record["decision"]["effect"], record["decision"]["guard"]) == ("deny", guard)
    assert record["decision"]["error"] == error


def _raw(request: Any) -> Any:
    """The request as Envoy sends it with ``encode_raw_headers: true``: in ``header_map``."""
    http = request.attributes.request.http
    for key, value in http.headers.items():
        http.header_map.headers.add(key=key, raw_value=value.encode())
    http.ClearField("headers")
    return request


async def test_raw_headers_are_read_as_headers_are(tmp_path: Path) -> None:
    async with _serving(tmp_path) as stub:
        allowed = await stub.Check(
            _raw(_request("GET", "/orders/A-1", {**READER, "x-debug-override": "1"}))
        )
        unproven = await stub.Check(
            _raw(_request("GET", "/health", {"x-warden-agent": "someone-else"}))
        )
    # The policy read the bearer token (and the header it removes); identity the agent.
    assert allowed.status.code == GRPC_OK
    assert _headers(allowed.ok_response.headers)["x-user-role"] == "reader"
    assert list(allowed.ok_response.headers_to_remove) == ["x-debug-override"]
    assert unproven.denied_response.status.code == 403
    assert "decision_id" not in unproven.dynamic_metadata


async def test_an_unproven_agent_is_refused_without_a_decision(tmp_path: Path) -> None:
    async with _serving(tmp_path) as stub:
        response = await stub.Check(_request("GET", "/health", {"x-warden-agent": "someone-else"}))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    assert "decision_id" not in response.dynamic_metadata
    assert _decisions(tmp_path) == {}


async def test_a_kill_switch_denies_before_the_policy(tmp_path: Path) -> None:
    async with _serving(tmp_path, yield_warden=True) as (stub, warden):
        await warden.killswitches.set(Scope.GLOBAL, "*", "incident 42", who="oncall")
        response = await stub.Check(_request("GET", "/health"))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    assert "incident 42" in response.denied_response.body
    record = _decisions(tmp_path)[response.dynamic_metadata["decision_id"]]
    assert record["decision"]["guard"] == "kill_switch"


TWO_QUERIES = """package envoy.authz

import rego.v1

default allow := false

allow if input.parsed_path[0] == "open"
"""

MAIN = """package warden

import rego.v1

decision := {"effect": "allow"} if input.parsed_path[0] == "open"
"""


async def test_the_engine_keeps_an_entrypoints_answers_apart_from_the_main_query(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "authz.rego").write_text(TWO_QUERIES)
    (folder / "main.rego").write_text(MAIN)
    config = PolicyConfig(bundles=(str(folder),), workers=1, watch=False, deadline_ms=5000)
    engine = await PolicyEngine.start(
        config, entrypoints=("data.envoy.authz.allow", "data.envoy.authz.nope(")
    )
    try:
        doc = {"parsed_path": ["closed"]}
        for _ in range(2):  # the second answers come from the decision cache
            main = await engine.evaluate(doc)
            entry = await engine.evaluate(doc, query="data.envoy.authz.allow")
            assert main.undefined
            assert (entry.defined, entry.value, entry.effect) == (True, False, None)
        assert entry.cached
        opened = await engine.evaluate({"parsed_path": ["open"]}, query="data.envoy.authz.allow")
        assert opened.value is True
        # A query that does not compile answers an error; one never compiled is not ready.
        broken = await engine.evaluate(doc, query="data.envoy.authz.nope(")
        assert broken.error == "policy_error"
        unknown = await engine.evaluate(doc, query="data.other.allow")
        assert unknown.error == "policy_not_ready"
    finally:
        await engine.close()


async def test_the_grpc_listener_serves_ext_authz(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        "http://127.0.0.1:9",
        listen={"grpc": "127.0.0.1:0"},
        policy={"bundles": [str(BUNDLE)], "workers": 1, "watch": False, "deadline_ms": 5000},
    )
    async with (
        Warden(config) as warden,
        grpc.aio.insecure_channel(warden.grpc_address) as channel,
    ):
        health_stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs are untyped
        health = await health_stub.Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization")
        )
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = await stub.Check(_request("GET", "/orders/A-1", READER))
        denied = await stub.Check(_request("DELETE", "/orders/A-1", READER))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert allowed.status.code == GRPC_OK
    assert denied.status.code == GRPC_PERMISSION_DENIED
    assert denied.denied_response.status.code == 403
    records = _decisions(tmp_path)
    assert records[allowed.dynamic_metadata["decision_id"]]["decision"]["effect"] == "allow"
    assert records[denied.dynamic_metadata["decision_id"]]["decision"]["effect"] == "deny"


GRPC_POLICY = """package envoy.authz

import rego.v1

default allow := false

allow if input.parsed_body.action.tool == "search_kb"
"""


async def test_grpc_request_bodies_reach_the_policy_through_the_configured_descriptors(
    tmp_path: Path,
) -> None:
    """A gRPC service behind Envoy, its calls decided on their message (OPA-Envoy's
    ``proto-descriptor``): Warden's own ``Check`` messages stand in for it."""
    bundle = tmp_path / "grpc-bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(GRPC_POLICY)
    descriptors = tmp_path / "services.pb"
    descriptors.write_bytes(descriptor_set(pb.DESCRIPTOR))

    def call(tool: str) -> Any:
        message = pb.CheckRequest(action=pb.Action(tool=tool)).SerializeToString()
        frame = b"\x00" + len(message).to_bytes(4, "big") + message
        headers = {"content-type": "application/grpc", "te": "trailers"}
        return _request("POST", "/warden.v1.Governance/Check", headers, frame)

    async with _serving(
        tmp_path,
        policy={"bundles": [str(bundle)]},
        ext_authz={"proto_descriptor": str(descriptors)},
    ) as stub:
        allowed = await stub.Check(call("search_kb"))
        denied = await stub.Check(call("issue_refund"))
    assert allowed.status.code == GRPC_OK
    assert denied.status.code == GRPC_PERMISSION_DENIED
    records = _decisions(tmp_path)
    assert [r["decision"]["effect"] for r in records.values()] == ["allow", "deny"]


def test_an_unreadable_descriptor_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pb"
    broken.write_bytes(b"\xff\xff not a descriptor set")
    for path, message in (
        (broken, "not a FileDescriptorSet"),
        (tmp_path / "gone.pb", "cannot read"),
    ):
        config = make_config(
            tmp_path, "http://127.0.0.1:9", ext_authz={"proto_descriptor": str(path)}
        )
        with pytest.raises(ConfigError, match=f"ext_authz.proto_descriptor: .*{message}"):
            ExtAuthzService(cast(Any, None), config)


async def test_a_call_that_needs_a_person_is_answered_at_once_and_passes_once_approved(
    tmp_path: Path,
) -> None:
    # Refunds over 100 a day need approval. Warden's default is to hold such a
    # call open, but Envoy gives a check about a second: ext_authz defers.
    cap = {
        "name": "refunds",
        "tool": "issue_refund",
        "value": "amount",
        "per": ["agent"],
        "window": "day",
        "limit": 100,
        "over": "require_approval",
    }
    json_headers = {**SUPPORT, "content-type": "application/json"}
    refund = _request("POST", "/orders/A-1/refunds", json_headers, b'{"amount": 90}')
    held_before = _checks("held")
    async with _serving(
        tmp_path, yield_warden=True, budgets={"caps": [cap]}, approvals={"mode": "hold"}
    ) as (stub, warden):
        first = await stub.Check(refund)
        assert first.status.code == GRPC_OK  # 90 of 100
        second = await stub.Check(refund)  # 180 of 100: a person decides
        assert second.status.code == GRPC_PERMISSION_DENIED
        assert second.denied_response.status.code == 403
        assert second.denied_response.body.startswith("Warden held this request for approval")
        approvals = warden._approvals
        (pending,) = await approvals.list("pending")
        assert pending.mode == "defer"
        assert pending.id in second.denied_response.body
        assert second.dynamic_metadata["warden_approval_id"] == pending.id  # for Envoy's logs
        lead = Principal("lead", frozenset({"approver"}), frozenset())
        await approvals.decide(pending.id, lead, approve=True, comment="ok")
        # Same arguments, another body: the service would read what the approver never
        # saw, and no argument names "to", so it is refused before any approval applies.
        other = await stub.Check(
            _request("POST", "/orders/A-1/refunds", json_headers, b'{"amount": 90, "to": "X"}')
        )
        assert other.status.code == GRPC_PERMISSION_DENIED
        assert other.denied_response.status.code == 400
        assert "'/to', which no argument of the rule" in other.denied_response.body
        third = await stub.Check(refund)  # the approved call, once
        fourth = await stub.Check(refund)  # and not again
    assert third.status.code == GRPC_OK
    assert fourth.status.code == GRPC_PERMISSION_DENIED
    assert _checks("held") == held_before + 2
    decisions = _decisions(tmp_path)
    assert decisions[third.dynamic_metadata["decision_id"]]["decision"]["guard"] == "approval"
    assert decisions[second.dynamic_metadata["decision_id"]]["decision"]["effect"] == (
        "require_approval"
    )


@pytest.mark.parametrize(
    ("path", "ext_authz"),
    [
        ("/llm/v1/chat/completions", {"upstream": "orders"}),
        ("/v1/messages", {"upstream": "orders"}),
        ("/api/chat", {"upstream": "orders"}),  # Ollama
        ("/v2/chat/", {"upstream": None}),  # Cohere
        # WebSockets and bidirectional streams: calls flow once the upgrade is allowed.
        ("/v1/realtime?model=gpt-realtime", {"upstream": "orders"}),
        (
            "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
            {"upstream": None},
        ),
        ("/model/m1/invoke-with-bidirectional-stream", {"upstream": None}),
        # An inference profile's ARN, its "/" encoded as botocore sends it.
        (
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.m1/converse",
            {"upstream": None},
        ),
        (
            "/ws/google.cloud.aiplatform.v1beta1.LlmBidiService/BidiGenerateContent",
            {"upstream": None},
        ),
        (
            "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained",
            {"upstream": None},
        ),
        ("/v1/agents/sessions/s1/items", {"upstream": "orders"}),  # OpenAI agent sessions
        ("/v1/sessions/s1/events/stream", {"upstream": "orders"}),  # Anthropic Managed Agents
        ("/v1/chatkit/threads/t1/items", {"upstream": None}),
        # Read as a slash by WHATWG URL parsers (Node, Deno, Bun, Workers).
        ("/v1\\responses\\resp_1", {"upstream": None}),
        ("/x%5C..%5Cv1/responses/resp_1", {"upstream": None}),
        ("/v1/Chat/Completions;x=1", {"upstream": None}),  # no tool upstream named
        # A path route rules cannot read, which lax servers route as /v1/messages.
        ("/v1/messages/", {"upstream": None}),
        ("/llm//v1/chat/completions", {"upstream": None}),
        ("/v1/x/../messages/batches/b1/results", {"upstream": None}),
        ("/v1/%2e/messages", {"upstream": None}),
        ("/v1/messages%2Fbatches", {"upstream": None}),
    ],
)
async def test_a_model_apis_route_is_refused_unread(
    tmp_path: Path, path: str, ext_authz: dict[str, Any]
) -> None:
    # Envoy sends the answer on without Warden reading it: an SDK would read tool
    # calls nobody decided. Envoy's ext_proc filter governs model APIs.
    async with _serving(tmp_path, ext_authz=ext_authz) as stub:
        response = await stub.Check(_request("POST", path, READER, b"{}"))
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert response.denied_response.status.code == 404
    assert "protocol: openai or anthropic" in response.denied_response.body


async def test_dry_run_lets_a_model_route_through_as_it_does_unmatched_routes(
    tmp_path: Path,
) -> None:
    async with _serving(tmp_path, ext_authz={"upstream": "orders", "dry_run": True}) as stub:
        response = await stub.Check(_request("POST", "/v1/messages", READER, b"{}"))
        # Unless the path is one Warden cannot read: refused in every mode.
        unread = await stub.Check(
            _request("POST", "/v1/messages/../../orders/1/refunds", READER, b"{}")
        )
    assert response.status.code == GRPC_OK
    assert unread.status.code == GRPC_PERMISSION_DENIED
