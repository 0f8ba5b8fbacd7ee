"""Route rules for plain HTTP tool APIs: templates, pointers, refusals, problem documents."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.config import load_config
from warden.errors import ConfigError
from warden.protocols.http_tool import (
    RESULT_MAX_CHARS,
    RouteRule,
    ToolRequest,
    ToolRequestError,
    ToolRoutes,
    bound_body,
    parse_argument,
    parse_template,
    problem,
    result_text,
)

JSON = "application/json"
REFUND = RouteRule.compile(
    "post",
    "/orders/{order_id}/refunds",
    "issue_refund",
    {"order_id": "{order_id}", "amount": "/amount", "customer_id": "/customer"},
)
ROUTES = ToolRoutes(
    (
        REFUND,
        RouteRule.compile("GET", "/orders/{order_id}", "get_order", {"id": "{order_id}"}),
        # After the rule it is more specific than: order does not matter.
        RouteRule.compile("GET", "/orders/open", "list_open_orders", {}),
        RouteRule.compile(
            "GET", "/customers/{id}/orders", "list_orders", {"id": "{id}", "status": "?status"}
        ),
    )
)


def resolve(
    method: str, path: str, body: Any = None, content_type: str = JSON, query: str = ""
) -> ToolRequest | None:
    # No body at all when none is given: a rule that reads none refuses even "null".
    raw = body if isinstance(body, bytes) else b"" if body is None else orjson.dumps(body)
    return ROUTES.resolve(method, path.strip("/").split("/"), raw, content_type, query)


def test_path_parameters_and_body_pointers_build_the_call() -> None:
    got = resolve("POST", "/orders/A-1001/refunds", {"amount": 120.5, "customer": "C-7"})
    assert got == ToolRequest(
        "issue_refund", {"order_id": "A-1001", "amount": 120.5, "customer_id": "C-7"}
    )


def test_the_most_specific_rule_wins_and_needs_the_method_and_every_segment() -> None:
    # Flask, Go 1.22 and Spring run the literal route, whichever is listed first.
    assert resolve("GET", "/orders/open") == ToolRequest("list_open_orders", {})
    assert resolve("GET", "/orders/opened") == ToolRequest("get_order", {"id": "opened"})
    assert resolve("GET", "/orders/A-1/refunds") is None
    assert resolve("PUT", "/orders/A-1/refunds", {"amount": 1, "customer": "c"}) is None
    assert resolve("POST", "/orders/A-1/refunds/x", {}) is None
    assert resolve("POST", "/orders/A-1", {}) is None


def test_a_parameter_takes_the_decoded_segment_verbatim() -> None:
    # The ingress decoded "%2D" and "%20" once; the rule sees the text itself.
    got = resolve("GET", "/orders/A 1-\u00e9")
    assert got == ToolRequest("get_order", {"id": "A 1-\u00e9"})


@pytest.mark.parametrize(
    ("pointer", "body", "expected"),
    [
        ("/a/b", {"a": {"b": 3}}, 3),
        ("/a/0", {"a": [2]}, 2),  # every body value is named: index 1 alone leaves /a/0
        ("/a~1b", {"a/b": "slash"}, "slash"),
        ("/m~0n", {"m~n": "tilde"}, "tilde"),
        ("/", {"": "empty key"}, "empty key"),
        ("", {"whole": True}, {"whole": True}),
        ("/a", {"a": None}, None),
    ],
)
def test_json_pointers_follow_rfc_6901(pointer: str, body: Any, expected: Any) -> None:
    rule = RouteRule.compile("POST", "/t", "t", {"v": pointer})
    assert rule.build({}, orjson.dumps(body), JSON) == {"v": expected}


@pytest.mark.parametrize(
    ("pointer", "body"),
    [
        ("/missing", {"a": 1}),
        ("/a/b", {"a": 1}),
        ("/a/01", {"a": [1, 2]}),
        ("/a/2", {"a": [1, 2]}),
        ("/a/-", {"a": [1, 2]}),
        ("/a/x", {"a": [1, 2]}),
    ],
)
def test_a_pointer_that_finds_nothing_refuses_the_request(pointer: str, body: Any) -> None:
    rule = RouteRule.compile("POST", "/t", "t", {"v": pointer})
    with pytest.raises(ToolRequestError, match=f"no value at '{pointer}'"):
        rule.build({}, orjson.dumps(body), JSON)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"amount=5", "application/x-www-form-urlencoded", "Content-Type"),
        (b'{"amount": 5}', "", "missing"),
        (b"not json", JSON, "not valid JSON"),
        (b"", JSON, "not valid JSON"),
        (b'{"amount": 5, "amount": 500}', JSON, "'amount' twice"),
        # Reasons are not sealed: a key that is no identifier (an address) is not named.
        (b'{"ann@example.com": 5, "ann@example.com": 6}', JSON, "gives a key twice$"),
        # A Go or .NET tool API binds keys case-insensitively: it might charge 500.
        (b'{"amount": 5, "Amount": 500}', JSON, "differ only in case"),
        (b'{"order": {"id": "A-1", "ID": "B-2"}, "amount": 5}', JSON, "differ only in case"),
        (b'{"amount": NaN}', JSON, "NaN"),
        (b'{"amount": Infinity}', JSON, "Infinity"),
        (b"\xff\xfe", JSON, "not valid JSON"),
    ],
)
def test_a_body_the_pointers_cannot_read_unambiguously_is_refused(
    body: bytes, content_type: str, message: str
) -> None:
    with pytest.raises(ToolRequestError, match=message):
        resolve("POST", "/orders/A-1/refunds", body, content_type)


def test_json_media_types_with_parameters_and_suffixes_are_json() -> None:
    body = {"amount": 1, "customer": "c"}
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        assert resolve("POST", "/orders/A/refunds", body, content_type) is not None


def test_a_route_that_reads_no_pointer_never_parses_the_body() -> None:
    # Unless it says body: unread, such a rule refuses any body (no policy would see it).
    with pytest.raises(ToolRequestError, match="reads no argument from the body"):
        resolve("GET", "/orders/A-1", b"\x00 anything", "text/plain")
    upload = RouteRule.compile("PUT", "/files/{id}", "upload", {"id": "{id}"}, body="unread")
    assert upload.build({"id": "f"}, b"\x00 anything", "text/plain") == {"id": "f"}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "at least one segment"),
        ("/", "at least one segment"),
        ("/a/{x}/{x}", "appears twice"),
        ("/a/{x", "literal name"),
        ("/a/pre{x}", "literal name"),
        ("/a/{1x}", "literal name"),
        ("/a//b", "literal name"),
        ("/a/../b", "literal name"),
        ("/a/b c", "literal name"),
    ],
)
def test_bad_templates_say_what_is_wrong(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_template(template)


def test_templates_and_arguments_that_are_fine() -> None:
    assert parse_template("orders/{order_id}/refunds/") == ("orders", "{order_id}", "refunds")
    assert parse_argument("{order_id}").param == "order_id"
    assert parse_argument("/a~1b/c~0d").pointer == ("a/b", "c~d")
    assert parse_argument("").pointer == ()


def test_query_parameters_are_arguments_decoded_as_go_and_the_whatwg_url_read_them() -> None:
    assert resolve("GET", "/customers/C-7/orders", query="status=open") == ToolRequest(
        "list_orders", {"id": "C-7", "status": "open"}
    )
    got = resolve("GET", "/customers/C-7/orders", query="st%61tus=on+hold%21&")
    assert got == ToolRequest("list_orders", {"id": "C-7", "status": "on hold!"})
    assert parse_argument("?status").query == "status"
    # Optional, as query parameters often are (a page cursor): absent is null.
    assert resolve("GET", "/customers/C-7/orders") == ToolRequest(
        "list_orders", {"id": "C-7", "status": None}
    )


@pytest.mark.parametrize(
    ("path", "query", "message"),
    [
        # A parameter no rule names reaches the service undecided: refused, on every rule.
        ("/orders/A-1", "force=true", "'force' is not named in this route's arguments"),
        ("/customers/C-7/orders", "status=open&limit=5", "'limit' is not named"),
        ("/customers/C-7/orders", "limit=5", "'limit' is not named"),
        # The service might read the first, the last or both.
        ("/customers/C-7/orders", "status=open&status=all", "gives the parameter 'status' twice"),
        # Reasons are recorded in clear: a name that is no identifier is not repeated.
        ("/orders/A-1", "ann.smith%40example.com=1", "^a query parameter is not named"),
        ("/customers/C-7/orders", "status=open;x=1", "semicolon"),
        ("/customers/C-7/orders", "status=%zz", "invalid URL escape"),
        ("/customers/C-7/orders", "status=%ff", "not UTF-8"),
    ],
)
def test_a_query_the_rule_cannot_account_for_refuses_the_request(
    path: str, query: str, message: str
) -> None:
    with pytest.raises(ToolRequestError, match=message):
        resolve("GET", path, query=query)


@pytest.mark.parametrize(
    "path",
    [
        "/orders/A-1/Refunds",  # ASP.NET matches literal segments case-blind
        "/ORDERS/A-1/refunds",
        "/orders/A-1/refunds;jsessionid=x",  # Tomcat and Spring drop ';' parameters
        "/orders/A-1;v=2/refunds",  # the service's order id is A-1, not A-1;v=2
        "/orders/A-1/refunds.json",  # Rails routes (.:format) to the refunds action
    ],
)
def test_a_path_a_service_may_read_as_a_rules_call_is_refused(path: str) -> None:
    with pytest.raises(ToolRequestError, match="case-blind, without ';'"):
        resolve("POST", path, {"amount": 5, "customer": "C-1"})


def test_a_path_no_rule_fits_even_loosely_is_unmatched() -> None:
    assert resolve("POST", "/orders/A-1/returns;x=1", {}) is None
    assert resolve("GET", "/health") is None


def test_a_refused_query_never_quotes_a_value() -> None:
    with pytest.raises(ToolRequestError) as caught:
        resolve("GET", "/customers/C-7/orders", query="status=%zzsk-secret")
    assert "sk-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amount", "JSON pointer"),
        ("amount", "query parameter such as '\\?limit'"),
        ("?", "followed by a query parameter's name"),
        ("/a~", "followed by 0 or 1"),
        ("/a~2", "followed by 0 or 1"),
    ],
)
def test_bad_arguments_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_argument(value)


def test_an_argument_must_name_a_parameter_of_its_path() -> None:
    with pytest.raises(ValueError, match=r"arguments\.id: '\{oid\}' names no parameter"):
        RouteRule.compile("GET", "/orders/{order_id}", "t", {"id": "{oid}"})


def test_config_validates_routes_at_load_naming_the_key() -> None:
    def load(upstream: dict[str, Any]) -> None:
        load_config(environ={}, overrides={"upstreams": {"refunds": upstream}})

    base = {"protocol": "http", "base_url": "http://127.0.0.1:1"}
    route = {"method": "POST", "path": "/orders/{order_id}/refunds", "tool": "issue_refund"}
    load({**base, "routes": [{**route, "arguments": {"amount": "/amount"}}], "unmatched": "allow"})
    cases = [
        ({**route, "method": "BREW"}, "upstreams.refunds.routes.0.method"),
        ({**route, "path": "/a/{x}/{x}"}, "upstreams.refunds.routes.0.path"),
        ({**route, "arguments": {"a": "amount"}}, "upstreams.refunds.routes.0.arguments: .*a:"),
        ({**route, "arguments": {"a": "{nope}"}}, "upstreams.refunds.routes.0: .*names no"),
        ({**route, "tool": ""}, "upstreams.refunds.routes.0.tool"),
        ({**route, "extra": 1}, "upstreams.refunds.routes.0.extra: unknown key"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            load({**base, "routes": [bad]})
    with pytest.raises(ConfigError, match="upstreams.refunds.unmatched"):
        load({**base, "unmatched": "maybe"})
    with pytest.raises(ConfigError, match="only an upstream with protocol: http"):
        load({"protocol": "openai", "base_url": "http://x", "routes": [route]})


def test_compile_from_config() -> None:
    config = load_config(
        environ={},
        overrides={
            "upstreams": {
                "refunds": {
                    "protocol": "http",
                    "base_url": "http://127.0.0.1:1",
                    "routes": [
                        {"method": "GET", "path": "/a/{b}", "tool": "t", "arguments": {"b": "{b}"}}
                    ],
                    "unmatched": "allow",
                }
            }
        },
    )
    upstream = config.upstreams["refunds"]
    routes = ToolRoutes.compile(upstream.routes, upstream.unmatched)
    assert routes.unmatched == "allow"
    assert routes.resolve("GET", ["a", "x"], b"", "") == ToolRequest("t", {"b": "x"})


def test_problem_documents_follow_rfc_9457() -> None:
    doc = orjson.loads(
        problem(403, "denied", "Denied by Warden", "refunds over 100", decision_id="dec_1")
    )
    assert doc == {
        "type": "https://warden.dev/problems/denied",
        "title": "Denied by Warden",
        "status": 403,
        "detail": "refunds over 100",
        "code": "denied",
        "decision_id": "dec_1",
    }
    plain = orjson.loads(problem(400, "invalid_tool_request", "t", "d"))
    assert plain["type"].endswith("/invalid-tool-request")
    assert "decision_id" not in plain


def test_result_text_is_bounded_and_never_raises() -> None:
    assert result_text(b'{"ok": true}') == '{"ok": true}'
    assert result_text(b"\xff") == "\ufffd"
    assert len(result_text(b"x" * (RESULT_MAX_CHARS * 2))) == RESULT_MAX_CHARS


@given(st.lists(st.text(min_size=1), min_size=1, max_size=4), st.integers())
def test_any_key_path_escaped_as_rfc_6901_says_finds_its_value(keys: list[str], value: int) -> None:
    document: Any = value
    for key in reversed(keys):
        document = {key: document}
    pointer = "".join("/" + k.replace("~", "~0").replace("/", "~1") for k in keys)
    rule = RouteRule.compile("POST", "/t", "t", {"v": pointer})
    assert rule.build({}, json.dumps(document).encode(), JSON) == {"v": value}


# ';' is refused (a service may drop what follows it): see the loosely-fitting paths above.
@given(st.text(min_size=1).filter(lambda s: s not in (".", "..") and not {"/", ";"} & set(s)))
def test_a_parameter_matches_any_one_decoded_segment_verbatim(segment: str) -> None:
    assert resolve("GET", f"/orders/{segment}") == ToolRequest("get_order", {"id": segment})


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        (b'{"amount": 5, "to": "A"}', b'{"to":"A","amount":5}', True),  # order and spaces
        (b'{"to": "\\u0041"}', b'{"to": "A"}', True),  # one string, however escaped
        (b'{"amount": 1}', b'{"amount": 1.0}', False),
        # Read otherwise by some parser: bound byte for byte, never merged.
        (b'{"to": "A"}', b'{"to": "B", "to": "A"}', False),  # first-wins parsers read B
        (b'{"to": "A", "TO": "B"}', b'{"TO": "B", "to": "A"}', False),  # Go binds case-blind
        (b'{"n": 18446744073709551616}', b'{"n": 18446744073709551617}', False),
        (b'{"n": 1e400}', b'{"n": 2e400}', False),
    ],
)
def test_an_approval_binds_a_json_body_by_content_only_where_every_parser_agrees(
    one: bytes, other: bytes, same: bool
) -> None:
    assert (bound_body(one, JSON) == bound_body(other, JSON)) is same
    assert bound_body(b"not json", JSON) == b"not json"
    assert bound_body(one, "text/plain") == one
