"""Route rules: every body field is an argument (as every query parameter is).

A body value no pointer of the rule covers would reach the service without a
policy seeing it (``"currency": "KWD"`` beside a named ``/amount``): refused.
Optional pointers read ``null``; ``body: unread`` forwards a body no argument
reads. Rules are compiled from the configuration, as Warden compiles them.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.config import load_config
from warden.errors import ConfigError
from warden.protocols.http_tool import RouteRule, ToolRequestError, ToolRoutes

JSON = "application/json"
BASE = {"protocol": "http", "base_url": "http://127.0.0.1:1", "unmatched": "allow"}
REFUND: dict[str, Any] = {
    "method": "POST",
    "path": "/orders/{order_id}/refunds",
    "tool": "issue_refund",
    "arguments": {"order_id": "{order_id}", "amount": "/amount", "customer_id": "/customer"},
}


def load(*routes: dict[str, Any]) -> ToolRoutes:
    """The rules as Warden compiles them from a configuration."""
    config = load_config(
        environ={}, overrides={"upstreams": {"refunds": {**BASE, "routes": routes}}}
    )
    upstream = config.upstreams["refunds"]
    return ToolRoutes.compile(upstream.routes, upstream.unmatched)


def build(routes: ToolRoutes, path: str, body: Any, content_type: str = JSON) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    segments = path.strip("/").split("/")
    found = routes.find("POST", segments) or routes.find("GET", segments)
    assert found is not None
    rule, params = found
    return rule.build(params, raw, content_type)


def test_a_body_field_no_argument_names_is_refused_naming_it_and_the_rule() -> None:
    routes = load(REFUND)
    body = {"amount": 90, "customer": "C-1001", "currency": "KWD"}
    with pytest.raises(ToolRequestError) as refused:
        build(routes, "/orders/A-1/refunds", body)
    detail = str(refused.value)
    assert "'/currency'" in detail
    assert "POST /orders/{order_id}/refunds (issue_refund)" in detail
    assert refused.value.code == "invalid_tool_request"
    # Named, it is an argument the policy sees.
    named = {**REFUND, "arguments": {**REFUND["arguments"], "currency": "/currency"}}
    got = build(load(named), "/orders/A-1/refunds", body)
    assert got == {"order_id": "A-1", "amount": 90, "customer_id": "C-1001", "currency": "KWD"}


@pytest.mark.parametrize(
    ("arguments", "body", "uncovered"),
    [
        ({"a": "/a"}, {"a": 1, "b": {"c": 2}}, "'/b'"),
        ({"sku": "/lines/0/sku"}, {"lines": [{"sku": "x", "qty": 9}]}, "'/lines/0/qty'"),
        ({"first": "/lines/0"}, {"lines": [1, 2]}, "'/lines/1'"),
        # A value on the way to a pointer is not the argument: its content went unseen.
        ({"note": {"pointer": "/meta/note", "optional": True}}, {"meta": "x"}, "'/meta'"),
        ({"note": {"pointer": "/meta/note", "optional": True}}, {"meta": None}, "'/meta'"),
        ({"a": "/a"}, {"a": 1, "force": None}, "'/force'"),
        ({"a": "/a"}, {"a": 1, "opts": {}}, "'/opts'"),
        # Keys that may be personal data are never shown: the field above is.
        (
            {"k": "/x/known"},
            {"x": {"known": 1, "ann@example.com": 1}},
            "a field under '/x' whose name is not shown",
        ),
        (
            {"a": "/a"},
            {"a": 1, "ann@example.com": 1},
            "a field at the top level whose name is not shown",
        ),
    ],
)
def test_every_value_must_be_under_a_named_pointer(
    arguments: dict[str, Any], body: Any, uncovered: str
) -> None:
    routes = load({"method": "POST", "path": "/t", "tool": "t", "arguments": arguments})
    with pytest.raises(ToolRequestError, match="no argument of the rule") as refused:
        build(routes, "/t", body)
    assert uncovered in str(refused.value)
    assert "ann@example.com" not in str(refused.value)


def test_a_body_whose_every_value_is_named_passes() -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"refund": "/refund"}, {"refund": {"lines": [{"sku": "x", "qty": 2}], "why": "late"}}),
        ({"whole": ""}, {"anything": [1, {"at": "all"}]}),
        ({"a": "/lines/0", "b": "/lines/1"}, {"lines": [1, 2]}),
        ({"a": "/a", "n": {"pointer": "/n", "optional": True}}, {"a": 1}),
        ({"a": {"pointer": "/a", "optional": True}}, {}),
    ]
    for arguments, body in cases:
        routes = load({"method": "POST", "path": "/t", "tool": "t", "arguments": arguments})
        assert set(build(routes, "/t", body)) <= set(arguments)


def test_an_optional_pointer_is_left_out_when_absent_and_read_when_present() -> None:
    currency = {"pointer": "/currency", "optional": True}
    rule = {**REFUND, "arguments": {**REFUND["arguments"], "currency": currency}}
    routes = load(rule)
    body = {"amount": 40, "customer": "C-7"}
    assert "currency" not in build(routes, "/orders/A-1/refunds", body)
    assert build(routes, "/orders/A-1/refunds", {**body, "currency": None})["currency"] is None
    kwd = build(routes, "/orders/A-1/refunds", {**body, "currency": "KWD"})
    assert kwd["currency"] == "KWD"
    # Written out as not optional, the mapping form is the plain pointer: absent refuses.
    required = {
        **REFUND,
        "arguments": {**REFUND["arguments"], "currency": {"pointer": "/currency"}},
    }
    with pytest.raises(ToolRequestError, match="no value at '/currency'"):
        build(load(required), "/orders/A-1/refunds", body)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"status": "cancelled"}', JSON),
        (b"null", JSON),
        (b"status=cancelled", "application/x-www-form-urlencoded"),
        (b"\x00 raw bytes", "application/octet-stream"),
        (b"cancel", ""),
    ],
)
def test_a_rule_that_reads_no_body_refuses_one_unless_it_says_unread(
    body: bytes, content_type: str
) -> None:
    rule = {"method": "POST", "path": "/orders/{id}", "tool": "update_order", "arguments": {}}
    with pytest.raises(ToolRequestError, match=r"POST /orders/\{id\} \(update_order\) reads no"):
        build(load(rule), "/orders/A-1", body, content_type)
    assert build(load({**rule, "body": "unread"}), "/orders/A-1", body, content_type) == {}
    # No body at all is no field.
    assert build(load(rule), "/orders/A-1", b"", content_type) == {}


def test_the_first_field_of_a_refused_json_body_is_named() -> None:
    rule = {"method": "POST", "path": "/orders/{id}", "tool": "update_order", "arguments": {}}
    with pytest.raises(ToolRequestError, match="a body with a value at '/status'"):
        build(load(rule), "/orders/A-1", {"status": "cancelled"})


def test_an_unread_body_is_still_refused_when_it_could_change_the_call() -> None:
    # body: unread skips only the field check: a _method field and a body over a query
    # argument still make the service run another call than the one decided.
    upload = {
        "method": "POST",
        "path": "/files/{id}",
        "tool": "upload",
        "arguments": {"id": "{id}", "name": "?name"},
        "body": "unread",
    }
    routes = load(upload)
    with pytest.raises(ToolRequestError, match="'_method' field"):
        routes.resolve("POST", ["files", "f"], b'{"_method": "DELETE"}', JSON, "name=a")
    with pytest.raises(ToolRequestError, match="top-level key 'name'"):
        routes.resolve("POST", ["files", "f"], b'{"name": "b"}', JSON, "name=a")
    got = routes.resolve("POST", ["files", "f"], b'{"data": "x"}', JSON, "name=a")
    assert got is not None
    assert got.arguments == {"id": "f", "name": "a"}


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {**REFUND, "body": "unread"},
            r"upstreams.refunds.routes.0: .*arguments.amount: '/amount' reads the body, "
            "and body: unread",
        ),
        ({**REFUND, "body": "raw"}, r"upstreams.refunds.routes.0.body: .*'named' or 'unread'"),
        (
            {**REFUND, "arguments": {"c": {"pointer": "?currency", "optional": True}}},
            r"upstreams.refunds.routes.0.arguments: .*c: pointer: '\?currency' must be a JSON "
            "pointer",
        ),
        (
            {**REFUND, "arguments": {"c": {"pointer": "/a~2", "optional": True}}},
            r"upstreams.refunds.routes.0.arguments: .*c: pointer: .*'~' in a JSON pointer",
        ),
        (
            {**REFUND, "arguments": {"c": {"pointer": "/c", "optinal": True}}},
            r"upstreams.refunds.routes.0.arguments.c.*optinal: unknown key",
        ),
        (
            {**REFUND, "arguments": {"c": {"optional": True}}},
            r"upstreams.refunds.routes.0.arguments.c.*pointer: Field required",
        ),
        (
            {**REFUND, "arguments": {"c": {"pointer": "/c", "optional": "sometimes"}}},
            r"upstreams.refunds.routes.0.arguments.c.*optional: Input should be a valid boolean",
        ),
    ],
)
def test_config_checks_the_body_keys_at_load_naming_the_rule_and_field(
    route: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(route)


def test_compile_keeps_the_optional_flag_and_body_mode() -> None:
    rule = {
        **REFUND,
        "arguments": {
            **REFUND["arguments"],
            "currency": {"pointer": "/currency", "optional": True},
        },
    }
    (compiled,) = load(
        rule, {**REFUND, "path": "/uploads/{id}", "arguments": {}, "body": "unread"}
    ).rules[:1]
    sources = dict(compiled.arguments)
    assert sources["currency"].optional
    assert sources["currency"].pointer == ("currency",)
    assert not sources["amount"].optional
    assert compiled.body == "named"
    with pytest.raises(ValueError, match="body: 'raw' is not one of named, unread"):
        RouteRule.compile("POST", "/t", "t", {}, body="raw")


_KEYS = st.text(alphabet="abcdefgh", min_size=1, max_size=3)


@given(
    body=st.dictionaries(
        _KEYS, st.one_of(st.none(), st.booleans(), st.lists(st.booleans())), max_size=6
    ),
    named=st.sets(_KEYS, min_size=1, max_size=6),
)
def test_a_top_level_body_is_refused_exactly_when_a_key_is_unnamed(
    body: dict[str, Any], named: set[str]
) -> None:
    arguments: dict[str, Any] = {k: {"pointer": f"/{k}", "optional": True} for k in named}
    # Compiled as the configuration does, the mapping form included.
    routes = load({"method": "POST", "path": "/t", "tool": "t", "arguments": arguments})
    (rule,) = routes.rules
    raw = orjson.dumps(body)
    if set(body) <= named:
        assert rule.build({}, raw, JSON) == {k: body[k] for k in named if k in body}
    else:
        first = next(k for k in body if k not in named)
        with pytest.raises(ToolRequestError, match=f"'/{first}'"):
            rule.build({}, raw, JSON)


def test_a_key_of_digits_is_not_shown_but_a_list_index_is() -> None:
    # A PIN or postcode as a key would be recorded in clear in the reason at ext_authz.
    routes = load(REFUND)
    body = {"amount": 40, "customer": "C-7", "482913": "x"}
    with pytest.raises(ToolRequestError) as refused:
        build(routes, "/orders/A-1/refunds", body)
    assert "482913" not in str(refused.value)
    assert "at the top level whose name is not shown" in str(refused.value)
    lines = load({"method": "POST", "path": "/t", "tool": "t", "arguments": {"a": "/lines/0"}})
    with pytest.raises(ToolRequestError, match="'/lines/1'"):
        build(lines, "/t", {"lines": [1, 2]})


def test_an_empty_container_on_the_way_to_an_optional_pointer_is_refused() -> None:
    # "lines": [] may mean "no lines" to the service, where absent means "all lines";
    # the policy would read both as the argument left out.
    line = {"pointer": "/lines/0", "optional": True}
    routes = load({"method": "POST", "path": "/t", "tool": "t", "arguments": {"line": line}})
    empties: tuple[Any, ...] = ([], {})
    for empty in empties:
        with pytest.raises(ToolRequestError, match="'/lines'"):
            build(routes, "/t", {"lines": empty})
    assert build(routes, "/t", {}) == {}
    assert build(routes, "/t", {"lines": ["x"]}) == {"line": "x"}


def test_an_empty_json_body_passes_a_rule_that_reads_no_body() -> None:
    # Generated clients send {} with every POST; it carries nothing a policy could miss.
    routes = load(
        {
            "method": "POST",
            "path": "/orders/{id}/resend",
            "tool": "resend",
            "arguments": {"id": "{id}"},
        }
    )
    empties: tuple[Any, ...] = ({}, [])
    for empty in empties:
        assert build(routes, "/orders/A-1/resend", empty) == {"id": "A-1"}
    for carrying in ({"force": True}, [1], None):
        with pytest.raises(ToolRequestError, match="reads no argument from the body"):
            build(routes, "/orders/A-1/resend", carrying)
