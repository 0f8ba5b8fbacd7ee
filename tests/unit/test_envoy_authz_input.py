"""The ext_authz adapter: OPA-Envoy's input document, and its result read and rendered."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import descriptor_pb2, struct_pb2
from google.protobuf.descriptor import FileDescriptor

from warden.grpc_api.v1 import governance_pb2 as pb
from warden.protocols.envoy_authz import (
    CHECK_ROOM,
    CREDENTIAL_HEADERS,
    Answers,
    AuthzResult,
    GrpcBodies,
    body_limit,
    check_input,
    decode_segments,
    partial_body,
    read_result,
    render_response,
)


def _request(
    path: str = "/",
    headers: dict[str, str] | None = None,
    *,
    body: str = "",
    raw_body: bytes = b"",
    method: str = "GET",
) -> Any:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = method
    http.path = path
    http.host = "api.internal"
    http.headers.update(headers or {})
    http.body = body
    http.raw_body = raw_body
    return request


def test_the_request_is_mapped_field_by_field_under_json_names() -> None:
    request = _request("/v1/items?x=1", {"authorization": "Bearer t"}, raw_body=b"\x00\x01")
    request.attributes.source.address.socket_address.address = "10.0.0.7"
    request.attributes.source.address.socket_address.port_value = 51234
    request.attributes.source.principal = "spiffe://cluster.local/ns/a/sa/agent"
    request.attributes.request.time.seconds = 1_700_000_000
    request.attributes.context_extensions["virtual_host"] = "orders"
    request.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"sub": "alice", "groups": ["a", "b"]}
    )
    doc = check_input(request).input
    attributes = doc["attributes"]
    http = attributes["request"]["http"]
    assert http == {
        "method": "GET",
        "path": "/v1/items?x=1",
        "host": "api.internal",
        "headers": {"authorization": "Bearer t"},
        "rawBody": "AAE=",
    }
    assert attributes["request"]["time"] == {"seconds": 1_700_000_000}
    assert attributes["source"]["address"] == {
        "socketAddress": {"address": "10.0.0.7", "portValue": 51234}
    }
    assert attributes["contextExtensions"] == {"virtual_host": "orders"}
    assert attributes["metadataContext"]["filterMetadata"] == {
        "envoy.filters.http.jwt_authn": {"sub": "alice", "groups": ["a", "b"]}
    }
    assert doc["source_principal"] == "spiffe://cluster.local/ns/a/sa/agent"
    assert doc["version"] == {"ext_authz": "v3", "encoding": "protojson"}
    assert "destination" not in attributes  # unset fields are left out, as in OPA-Envoy


@pytest.mark.parametrize(
    ("path", "parsed_path", "parsed_query"),
    [
        ("/", [""], {}),
        ("//a/b/", ["a", "b", ""], {}),
        ("/a%20b/c+d?x=1&x=2&y", ["a b", "c+d"], {"x": ["1", "2"], "y": [""]}),
        ("/search?q=a+b%2Fc&&empty=", ["search"], {"q": ["a b/c"], "empty": [""]}),
        ("/a%2Fb", ["a", "b"], {}),
    ],
)
def test_path_and_query_are_parsed_as_opa_envoy_parses_them(
    path: str, parsed_path: list[str], parsed_query: dict[str, list[str]]
) -> None:
    parsed = check_input(_request(path))
    assert parsed.problem is None
    assert parsed.input["parsed_path"] == parsed_path
    assert parsed.input["parsed_query"] == parsed_query
    assert parsed.path == path.partition("?")[0]


@pytest.mark.parametrize("path", ["/a%zz", "/a%", "/ok?x=%zz", "/ok?a=1;b=2", "/%ff"])
def test_a_malformed_path_or_query_is_a_problem(path: str) -> None:
    parsed = check_input(_request(path))
    assert parsed.problem is not None
    assert parsed.problem.startswith("error parsing path and query")


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/v1/models?key=AIza-s3cret%zz", "the value of 'key'"),
        ("/v1/models?key=AIza-s3cret%ff", "the value of 'key'"),
        ("/v1/AIza-s3cret%ff/models", "the path"),
    ],
)
def test_a_malformed_value_is_named_never_quoted(path: str, named: str) -> None:
    """The problem becomes a recorded decision reason; a query value may be a key."""
    parsed = check_input(_request(path))
    assert parsed.problem is not None
    assert named in parsed.problem
    assert "s3cret" not in parsed.problem


@pytest.mark.parametrize(
    ("headers", "body", "parsed_body", "truncated"),
    [
        (
            {"content-type": "application/json"},
            '{"a": [1, 2.5, null]}',
            {"a": [1, 2.5, None]},
            False,
        ),
        ({"content-type": "application/json; charset=utf-8"}, "[true]", [True], False),
        ({"content-type": "application/json"}, "", None, False),
        ({"content-type": "application/json", "content-length": "100"}, "{}", None, True),
        ({"content-type": "application/json", "content-length": "2"}, "{}", {}, False),
        (
            {"content-type": "application/json", "x-envoy-auth-partial-body": "true"},
            "{",
            None,
            True,
        ),
        (
            {"content-type": "application/x-www-form-urlencoded"},
            "a=1&a=2&b=x+y",
            {"a": ["1", "2"], "b": ["x y"]},
            False,
        ),
        ({"content-type": "text/plain"}, "{", None, False),
        ({}, "{", None, False),
        # Not sent at all (no with_request_body), or cut, whatever its type.
        ({"content-type": "application/json", "content-length": "40"}, "", None, True),
        ({"content-type": "multipart/form-data", "content-length": "9"}, "--x", None, True),
    ],
)
def test_bodies_are_parsed_by_content_type(
    headers: dict[str, str], body: str, parsed_body: Any, truncated: bool
) -> None:
    parsed = check_input(_request("/", headers, body=body, method="POST"))
    assert parsed.problem is None
    assert parsed.input["parsed_body"] == parsed_body
    assert parsed.input["truncated_body"] is truncated


def test_raw_body_is_used_when_body_is_empty() -> None:
    parsed = check_input(
        _request("/", {"content-type": "application/json"}, raw_body=b'{"k": "v"}')
    )
    assert parsed.input["parsed_body"] == {"k": "v"}
    assert parsed.body == b'{"k": "v"}'


FORM = {"content-type": "application/x-www-form-urlencoded", "x-envoy-auth-partial-body": "false"}


@pytest.mark.parametrize(
    ("headers", "size", "cut"),
    [
        # Envoy checks once it holds max_request_bytes, says "false" when the cut lands
        # exactly there, and forwards the rest (HTTP/2 or chunked: no content-length).
        (FORM, 64, True),
        ({**FORM, "content-length": "-1"}, 64, True),
        # The service may read the rest as well; a longer body means the limit is off.
        (FORM, 65, True),
        # content-length (whose framing Envoy enforces) says it ends there.
        ({**FORM, "content-length": "64"}, 64, False),
        (FORM, 63, False),
    ],
    ids=["at-limit", "unknown-length", "past-limit", "length-proves-whole", "under-limit"],
)
def test_a_body_that_fills_max_request_bytes_counts_as_cut(
    headers: dict[str, str], size: int, cut: bool
) -> None:
    body = b"amount=5&pad=".ljust(size, b"x")
    request = _request("/orders/A-1", headers, raw_body=body, method="POST")
    parsed = check_input(request, max_request_bytes=64)
    assert parsed.problem is None
    assert parsed.input["truncated_body"] is cut
    assert (parsed.input["parsed_body"] is None) is cut
    assert partial_body(parsed.headers, parsed.body, 64) is cut
    # Without the filter's limit only Envoy's own word counts.
    assert check_input(request).input["truncated_body"] is False
    assert partial_body(parsed.headers, parsed.body) is False


def test_a_body_limit_must_fit_a_grpc_message_with_room_for_the_rest() -> None:
    assert body_limit(None, 1024) is None
    assert body_limit(1024, 1024 + CHECK_ROOM) == 1024
    with pytest.raises(ValueError, match=r"exceed grpc.max_message_bytes \(10485760\)"):
        body_limit(10485760 - CHECK_ROOM + 1, 10485760)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "application/json"}, "{"),
        ({"content-type": "application/json"}, '{"a": 1, "a": 2}'),
        ({"content-type": "application/json"}, "[NaN]"),
        ({"content-type": "application/json", "content-length": "x"}, "{}"),
        ({"content-type": "application/x-www-form-urlencoded"}, "a=%zz"),
        # Read as JSON by the first match, as a form by the service.
        ({"content-type": "application/x-www-form-urlencoded; x=application/json"}, "a=1"),
        ({"content-type": "application/json, application/x-www-form-urlencoded"}, "{}"),
        # An aiohttp service decodes by the charset: "+ACI-" is a quote under utf-7.
        ({"content-type": "application/json; charset=utf-7"}, '{"a": "+ACI-"}'),
        ({"content-type": "application/json; charset*=''utf-7"}, "{}"),
        ({"content-type": "application/x-www-form-urlencoded; charset=utf-7"}, "a=1"),
    ],
)
def test_an_unparsable_body_is_a_problem(headers: dict[str, str], body: str) -> None:
    parsed = check_input(_request("/", headers, body=body, method="POST"))
    assert parsed.problem is not None
    assert parsed.problem.startswith("error parsing request body")


def descriptor_set(*files: FileDescriptor) -> bytes:
    """What ``protoc --include_imports --descriptor_set_out`` writes for ``files``."""
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        for dependency in fd.dependencies:
            add(dependency)
        seen.add(fd.name)
        fd.CopyToProto(out.file.add())

    for fd in files:
        add(fd)
    return out.SerializeToString()


GOVERNANCE = GrpcBodies.load(descriptor_set(pb.DESCRIPTOR))
CHECK_PATH = "/warden.v1.Governance/Check"


def grpc_frame(message: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    size = len(message) if declared is None else declared
    return bytes([1 if compressed else 0]) + size.to_bytes(4, "big") + message


def refund_check() -> bytes:
    arguments = struct_pb2.Struct()
    arguments.update({"order_id": "A-1", "amount": 75})
    action = pb.Action(tool="issue_refund", arguments=arguments)
    return pb.CheckRequest(agent_id="refunds-bot", action=action).SerializeToString()


def test_a_grpc_request_body_is_parsed_with_the_configured_descriptors() -> None:
    headers = {"content-type": "application/grpc"}
    request = _request(CHECK_PATH, headers, raw_body=grpc_frame(refund_check()), method="POST")
    parsed = check_input(request, GOVERNANCE)
    assert parsed.problem is None
    assert parsed.input["parsed_body"] == {
        "agentId": "refunds-bot",
        "action": {"tool": "issue_refund", "arguments": {"order_id": "A-1", "amount": 75.0}},
    }
    assert parsed.input["truncated_body"] is False
    # Without descriptors, as OPA-Envoy without proto-descriptor: not parsed.
    assert check_input(request).input["parsed_body"] is None
    # Nor from Envoy's string body (binary does not survive it): only raw_body.
    as_text = _request(CHECK_PATH, headers, body="\x00\x00\x00\x00\x02\x08\x01", method="POST")
    assert check_input(as_text, GOVERNANCE).input["parsed_body"] is None


@pytest.mark.parametrize(
    ("path", "body", "parsed", "truncated"),
    [
        (CHECK_PATH, grpc_frame(refund_check(), compressed=True), None, False),
        (CHECK_PATH, grpc_frame(refund_check(), declared=10_000), None, True),
        ("/warden.v1.Unknown/Check", grpc_frame(refund_check()), None, False),
        ("/warden.v1.Governance/Nothing", grpc_frame(refund_check()), None, False),
    ],
    # Stable ids: a Struct's serialized order differs between processes (xdist workers).
    ids=["compressed", "truncated", "unknown-service", "unknown-method"],
)
def test_grpc_bodies_opa_envoy_leaves_unparsed_are_null(
    path: str, body: bytes, parsed: Any, truncated: bool
) -> None:
    request = _request(path, {"content-type": "application/grpc"}, raw_body=body, method="POST")
    doc = check_input(request, GOVERNANCE)
    assert doc.problem is None
    assert (doc.input["parsed_body"], doc.input["truncated_body"]) == (parsed, truncated)


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        (CHECK_PATH, b"\x00\x00", "shorter than its 5-byte prefix"),
        ("/too/many/segments", grpc_frame(refund_check()), "/<service>/<method>"),
        (CHECK_PATH, grpc_frame(b"\xff\xff\xff"), "is not a warden.v1.Governance/Check request"),
    ],
    ids=["short-frame", "not-service-method", "undecodable"],
)
def test_an_unreadable_grpc_body_is_a_problem(path: str, body: bytes, problem: str) -> None:
    request = _request(path, {"content-type": "application/grpc"}, raw_body=body, method="POST")
    found = check_input(request, GOVERNANCE).problem
    assert found is not None
    assert problem in found


def test_methods_the_descriptors_lack_are_not_remembered() -> None:
    """The path is the caller's: a stream of made-up methods must not grow memory."""
    bodies = GrpcBodies.load(descriptor_set(pb.DESCRIPTOR))
    for i in range(100):
        assert bodies.request_class(f"made.up.Service{i}", "Call") is None
        assert bodies.request_class("warden.v1.Governance", f"Call{i}") is None
    found = bodies.request_class("warden.v1.Governance", "Check")
    assert found is not None
    assert found.DESCRIPTOR.full_name == "warden.v1.CheckRequest"
    assert len(bodies._classes) == 1


def test_descriptors_must_be_a_self_contained_descriptor_set() -> None:
    with pytest.raises(ValueError, match="not a FileDescriptorSet"):
        GrpcBodies.load(b"\xff\xff not protobuf")
    alone = descriptor_pb2.FileDescriptorSet()
    pb.DESCRIPTOR.CopyToProto(alone.file.add())  # its imports left out
    with pytest.raises(ValueError, match="--include_imports"):
        GrpcBodies.load(alone.SerializeToString())


def test_a_request_without_http_attributes_is_a_problem() -> None:
    parsed = check_input(external_auth_pb2.CheckRequest())
    assert parsed.problem == "the CheckRequest carries no HTTP request"


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("/orders/A-1/refunds", ["orders", "A-1", "refunds"]),
        ("/orders/A%2D1", ["orders", "A-1"]),
        ("/", []),
        ("/orders/", None),
        ("/orders//x", None),
        ("/orders/%2E%2E/x", None),
        ("/orders/a%2Fb", None),
        ("/orders/%00", None),
        ("/orders/%zz", None),
        ("/public/..;/orders/A-1", None),  # Tomcat drops ";v=1" and then resolves ".."
        ("/public/.;x=1/orders", None),
        ("/orders/A-1;v=2", ["orders", "A-1;v=2"]),
    ],
)
def test_route_segments_are_decoded_once_and_strictly(
    path: str, segments: list[str] | None
) -> None:
    assert decode_segments(path) == segments


# -- results ------------------------------------------------------------------------------------


def test_a_boolean_result() -> None:
    assert read_result(True) == AuthzResult(allowed=True)
    assert read_result(False) == AuthzResult(allowed=False)


def test_an_object_result_is_read_as_opa_envoy_reads_it() -> None:
    result = read_result(
        {
            "allowed": True,
            "headers": [{"x-a": "1"}, {"x-b": ["2", "3"]}],
            "response_headers_to_add": {"x-c": "4"},
            "request_headers_to_remove": ["x-d"],
            "query_parameters_to_set": {"q": ["1", "2"]},
            "query_parameters_to_remove": ["debug"],
            "dynamic_metadata": {"role": "reader"},
            # Not used when allowed, so not checked (as in OPA-Envoy).
            "http_status": "not a number",
            "body": 5,
        }
    )
    assert result.allowed
    assert result.structured
    assert result.headers == (("x-a", "1"), ("x-b", "2"), ("x-b", "3"))
    assert result.response_headers_to_add == (("x-c", "4"),)
    assert result.request_headers_to_remove == ("x-d",)
    assert result.query_parameters_to_set == (("q", "1"), ("q", "2"))
    assert result.query_parameters_to_remove == ("debug",)
    assert result.dynamic_metadata == {"role": "reader"}
    denied = read_result({"allowed": False, "http_status": 429, "body": "slow down"})
    assert (denied.allowed, denied.http_status, denied.body) == (False, 429, "slow down")
    assert read_result({"allowed": False}).http_status == 403


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "boolean or an object"),
        ("yes", "boolean or an object"),
        ({}, '"allowed"'),
        ({"allowed": "true"}, "allowed must be a boolean"),
        ({"allowed": True, "headers": "x"}, "headers"),
        ({"allowed": True, "headers": {"x": 1}}, "headers.x"),
        ({"allowed": True, "request_headers_to_remove": "x"}, "request_headers_to_remove"),
        ({"allowed": True, "query_parameters_to_set": []}, "query_parameters_to_set"),
        ({"allowed": True, "dynamic_metadata": []}, "dynamic_metadata"),
        ({"allowed": False, "http_status": 999}, "http_status"),
        ({"allowed": False, "http_status": 403.5}, "http_status"),
        ({"allowed": False, "http_status": True}, "http_status"),
        ({"allowed": False, "body": {"a": 1}}, "body"),
    ],
)
def test_a_result_of_the_wrong_shape_is_refused(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_result(value)


def test_rendering_a_structured_denial() -> None:
    result = read_result(
        {
            "allowed": False,
            "http_status": 401,
            "body": "who are you",
            "headers": {"www-authenticate": "Bearer"},
            "dynamic_metadata": {"k": "v"},
        }
    )
    response = render_response(result, allowed=False, decision_id="dec_1")
    assert response.status.code == 7
    assert response.denied_response.status.code == 401
    assert response.denied_response.body == "who are you"
    assert [(o.header.key, o.header.value) for o in response.denied_response.headers] == [
        ("www-authenticate", "Bearer")
    ]
    assert dict(response.dynamic_metadata) == {
        "k": "v",
        "decision_id": "dec_1",
        "warden_decision_id": "dec_1",
    }


def test_rendering_a_boolean_gives_no_http_response() -> None:
    for value in (True, False):
        response = render_response(read_result(value), allowed=value, decision_id="dec_2")
        assert response.status.code == (0 if value else 7)
        assert response.WhichOneof("http_response") is None
        assert response.HasField("status")


def test_dry_run_answers_an_empty_ok_response_and_keeps_the_metadata() -> None:
    result = read_result({"allowed": False, "body": "no", "dynamic_metadata": {"k": "v"}})
    response = render_response(result, allowed=True, decision_id="dec_3")
    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    assert response.ok_response == external_auth_pb2.OkHttpResponse()
    assert response.dynamic_metadata["k"] == "v"


def test_agent_credentials_are_hidden_from_the_policy_and_removed_before_upstream() -> None:
    headers = {"x-warden-agent-key": "wk_secret", "x-warden-agent-token": "ey.x.y", "x-a": "1"}
    parsed = check_input(_request("/", headers))
    shown = parsed.input["attributes"]["request"]["http"]["headers"]
    assert shown == {"x-a": "1"}
    assert parsed.headers["x-warden-agent-key"] == "wk_secret"  # identity still reads it
    for value in (True, {"allowed": True, "headers": {"x-b": "2"}}):
        response = render_response(
            read_result(value), allowed=True, decision_id="dec_5", credentials=CREDENTIAL_HEADERS
        )
        assert set(CREDENTIAL_HEADERS) <= set(response.ok_response.headers_to_remove)


def test_raw_headers_are_read_hidden_and_joined_as_envoy_joins_them() -> None:
    # encode_raw_headers: true sends header_map, raw bytes, names as sent, repeats apart.
    request = _request("/", {})
    raw = request.attributes.request.http.header_map.headers
    for key, value in (("X-Warden-Agent-Key", b"wk_secret"), ("x-a", b"1"), ("X-A", b"2")):
        raw.add(key=key, raw_value=value)
    parsed = check_input(request)
    http = parsed.input["attributes"]["request"]["http"]
    assert "headerMap" not in http  # its raw values would show the key base64-encoded
    assert http["headers"] == {"x-a": "1,2"}
    assert parsed.headers["x-warden-agent-key"] == "wk_secret"
    assert parsed.problem is None
    raw.add(key="x-b", raw_value=b"\xff")
    assert check_input(request).problem == "the value of header 'x-b' is not UTF-8"


def test_a_denial_of_wardens_own_has_status_and_body() -> None:
    response = render_response(None, allowed=False, decision_id="dec_4", status=400, body="bad")
    assert (response.denied_response.status.code, response.denied_response.body) == (400, "bad")
    refused = render_response(None, allowed=False, decision_id="", status=401, body="who")
    assert "decision_id" not in refused.dynamic_metadata


OBJECT_RESULT: dict[str, Any] = {
    "allowed": True,
    "headers": {"x-user-role": "reader"},
    "request_headers_to_remove": ["x-debug-override"],
    "response_headers_to_add": {"x-governed-by": "warden"},
    "dynamic_metadata": {"role": "reader"},
}


@pytest.mark.parametrize(
    ("value", "allowed", "credentials"),
    [
        (OBJECT_RESULT, True, ()),
        (OBJECT_RESULT, True, ("x-warden-agent-key",)),
        (True, True, ()),
        ({"allowed": False, "http_status": 401, "body": "no"}, True, ()),  # dry-run let through
        ({"allowed": False, "http_status": 401, "body": "no"}, False, ()),
        (False, False, ("x-warden-agent-token",)),
    ],
)
def test_remembered_answers_are_the_rendered_ones(
    value: Any, allowed: bool, credentials: tuple[str, ...]
) -> None:
    answers = Answers()
    result = answers.read(value)[1]
    assert result == read_result(value)
    assert answers.read(value)[1] is result  # read once per value object
    for decision_id in ("dec_1", "dec_2"):  # the second from the template, if an allow
        response = answers.render(
            result, allowed=allowed, decision_id=decision_id, credentials=credentials
        )
        assert response == render_response(
            result, allowed=allowed, decision_id=decision_id, credentials=credentials
        )
        response.ok_response.headers_to_remove.append("x-changed-by-a-caller")
    assert answers.render(result, allowed=allowed, decision_id="dec_3") == render_response(
        result, allowed=allowed, decision_id="dec_3"
    )


def test_each_value_object_gets_its_own_answer_within_the_bound() -> None:
    answers = Answers(size=2)
    first = {"allowed": True, "headers": {"x-user-role": "reader"}}
    assert answers.read(first)[1].headers == (("x-user-role", "reader"),)
    second = {"allowed": True, "headers": {"x-user-role": "support"}}
    assert answers.read(second)[1].headers == (("x-user-role", "support"),)
    third = {"allowed": False}
    assert answers.read(third)[0] is False  # past the bound: cleared, still right
    assert answers.read(second)[1].headers == (("x-user-role", "support"),)
    assert answers.read(first)[1].headers == (("x-user-role", "reader"),)
    with pytest.raises(ValueError, match="allowed"):
        answers.read({"headers": {}})
