"""Argument names a request declares, per provider, and which spellings they refuse."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from warden.protocols import declared_arguments
from warden.protocols.declared_arguments import MAX_WORK, TOO_COMPLEX

SCHEMA = {"type": "object", "properties": {"amount": {}, "orderId": {}, "kind": {}}}


@pytest.mark.parametrize(
    ("read", "body"),
    [
        (
            declared_arguments.openai_chat,
            {"tools": [{"type": "function", "function": {"name": "refund", "parameters": SCHEMA}}]},
        ),
        (declared_arguments.openai_chat, {"functions": [{"name": "refund", "parameters": SCHEMA}]}),
        (
            declared_arguments.openai_responses,
            {"tools": [{"type": "function", "name": "refund", "parameters": SCHEMA}]},
        ),
        (declared_arguments.anthropic, {"tools": [{"name": "refund", "input_schema": SCHEMA}]}),
    ],
    ids=["chat", "chat-functions", "responses", "anthropic"],
)
def test_each_provider_declares_where_its_sdk_puts_the_schema(read: Any, body: Any) -> None:
    declared = read(body)
    assert declared is not None
    assert declared.misspelled("refund", {"amount": 1, "orderId": "A"}) is None
    assert declared.misspelled("refund", {"Amount": 1}) == "Amount"
    assert declared.misspelled("refund", {"orderid": "A"}) == "orderid"
    assert declared.misspelled("refund", {"\u212aind": "x"}) == "\u212aind"  # the Kelvin sign
    assert declared.misspelled("refund", {"note": "x", "Note": "y"}) is None  # not declared
    assert declared.misspelled("other", {"Amount": 1}) is None  # another tool


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"tools": []},
        {"tools": "refund"},
    ],
)
def test_a_request_without_tools_declares_nothing(body: Any) -> None:
    assert declared_arguments.openai_chat(body) is None
    assert declared_arguments.openai_responses(body) is None
    assert declared_arguments.anthropic(body) is None


def test_malformed_declarations_are_skipped_and_the_first_named_one_counts() -> None:
    junk = ["refund", {"name": 7, "input_schema": SCHEMA}, {"input_schema": SCHEMA}]
    found = declared_arguments.anthropic(
        {"tools": [*junk, {"name": "refund", "input_schema": SCHEMA}]}
    )
    assert found is not None
    assert found.misspelled("refund", {"Amount": 1}) == "Amount"
    # A declaration of the tool without usable properties declares no names.
    for schema in ("not a schema", {"properties": ["amount"]}, {}):
        unusable = declared_arguments.anthropic(
            {"tools": [{"name": "refund", "input_schema": schema}, *junk]}
        )
        assert unusable is not None
        assert unusable.misspelled("refund", {"Amount": 1}) is None


def listing(*tools: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": {"tools": list(tools)}}


def test_an_mcp_listing_declares_its_tools_arguments_page_by_page() -> None:
    listed = declared_arguments.ListedArguments(limit=2)
    assert listed.misspelled("refund", {"Amount": 1}) is None  # nothing listed yet
    listed.learn(listing({"name": "refund", "inputSchema": SCHEMA}, "junk", {"name": 3}))
    listed.learn(listing({"name": "lookup", "inputSchema": {"properties": {"id": {}}}}))
    listed.learn(listing({"name": "third", "inputSchema": {"properties": {"x": {}}}}))
    assert listed.misspelled("refund", {"Amount": 1}) == "Amount"  # the first page stays
    assert listed.misspelled("lookup", {"ID": 1}) == "ID"
    assert listed.misspelled("third", {"X": 1}) is None  # past the limit: taken as it comes
    # A later listing replaces what a tool declares.
    listed.learn(listing({"name": "refund", "inputSchema": {"properties": {"Amount": {}}}}))
    assert listed.misspelled("refund", {"Amount": 1}) is None
    assert listed.misspelled("refund", {"amount": 1}) == "amount"
    listed.learn({"jsonrpc": "2.0", "id": 2, "error": {"code": -1, "message": "no"}})
    assert listed.misspelled("lookup", {"ID": 1}) == "ID"


NESTED = {
    "type": "object",
    "properties": {
        "refund": {"type": "object", "properties": {"amount": {}, "currency": {}}},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {}}}},
        "note": {"$ref": "#/$defs/note"},
    },
}


def test_nested_objects_and_array_items_are_compared_too() -> None:
    declared = declared_arguments.openai_responses(
        {"tools": [{"type": "function", "name": "refund", "parameters": NESTED}]}
    )
    assert declared is not None
    good = {"refund": {"amount": 1, "currency": "EUR"}, "lines": [{"sku": "A"}]}
    assert declared.misspelled("refund", good) is None
    assert declared.misspelled("refund", {"refund": {"Amount": 900}}) == "refund.Amount"
    assert declared.misspelled("refund", {"lines": [{"sku": "A"}, {"SKU": "B"}]}) == "lines.SKU"
    # Not followed: a $ref to nothing, and values of another shape than the schema's.
    assert declared.misspelled("refund", {"note": {"Text": "x"}}) is None
    assert declared.misspelled("refund", {"refund": ["Amount"], "lines": {"SKU": 1}}) is None
    listed = declared_arguments.ListedArguments()
    listed.learn(listing({"name": "refund", "inputSchema": NESTED}))
    assert listed.misspelled("refund", {"refund": {"AMOUNT": 900}}) == "refund.AMOUNT"


class _Line(pydantic.BaseModel):
    sku: str


class _Refund(pydantic.BaseModel):
    amount: int
    currency: str


class _Order(pydantic.BaseModel):
    refund: _Refund
    lines: list[_Line]
    backup: _Refund | None = None


def test_refs_and_branches_are_followed_as_pydantic_writes_them() -> None:
    # $defs and $ref for nested models, anyOf for an optional one: what FastMCP
    # servers and pydantic-typed agents send.
    schema = _Order.model_json_schema()
    assert "$defs" in schema
    declared = declared_arguments.anthropic({"tools": [{"name": "order", "input_schema": schema}]})
    assert declared is not None
    good = {"refund": {"amount": 1, "currency": "EUR"}, "lines": [{"sku": "A"}], "backup": None}
    assert declared.misspelled("order", good) is None
    assert declared.misspelled("order", {"refund": {"Amount": 900}}) == "refund.Amount"
    assert declared.misspelled("order", {"lines": [{"SKU": "B"}]}) == "lines.SKU"
    assert declared.misspelled("order", {"backup": {"AMOUNT": 5}}) == "backup.AMOUNT"
    listed = declared_arguments.ListedArguments()
    listed.learn(listing({"name": "order", "inputSchema": schema}))
    assert listed.misspelled("order", {"backup": {"Currency": "EUR"}}) == "backup.Currency"


def test_a_name_any_branch_declares_is_declared() -> None:
    schema = {
        "type": "object",
        "properties": {
            "target": {
                "oneOf": [
                    {"properties": {"orderId": {}}},
                    {"allOf": [{"properties": {"OrderID": {}}}, {"$ref": "#/$defs/extra"}]},
                ]
            },
            "self": {"$ref": "#"},  # a cycle ends
            "remote": {"$ref": "https://example.invalid/schema.json"},  # never fetched
        },
        "$defs": {"extra": {"properties": {"amount": {}}}},
    }
    declared = declared_arguments.openai_responses(
        {"tools": [{"type": "function", "name": "t", "parameters": schema}]}
    )
    assert declared is not None
    assert declared.misspelled("t", {"target": {"orderId": 1, "OrderID": 2}}) is None
    assert declared.misspelled("t", {"target": {"orderid": 1}}) == "target.orderid"
    assert declared.misspelled("t", {"target": {"Amount": 1}}) == "target.Amount"
    assert declared.misspelled("t", {"self": {"self": {"Target": {}}}}) == "self.self.Target"
    assert declared.misspelled("t", {"remote": {"Anything": 1}}) is None


def test_a_long_array_costs_a_lookup_per_item_not_a_schema_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastMCP-style: items are a union of many models. Each level's names are worked
    # out once per call, however many items share it (else one request stalls the loop).
    defs: dict[str, Any] = {
        f"Op{i}": {"properties": {f"f{i}_{j}": {} for j in range(30)}} for i in range(40)
    }
    union = {"anyOf": [{"$ref": f"#/$defs/Op{i}"} for i in range(40)]}
    schema = {"$defs": defs, "properties": {"ops": {"type": "array", "items": union}}}
    listed = declared_arguments.ListedArguments()
    listed.learn(listing({"name": "batch", "inputSchema": schema}))
    worked: list[int] = []
    real = declared_arguments._views

    def counted(schemas: Any, walk: Any) -> Any:
        views = real(schemas, walk)
        worked.append(len(views))
        return views

    monkeypatch.setattr(declared_arguments, "_views", counted)
    ops: list[Any] = [{}] * 20_000 + [{"f3_1": "x", "F39_29": "y"}]
    assert listed.misspelled("batch", {"ops": ops}) == "ops.F39_29"
    # The top level, the "ops" level, then its items' union, 40 references and 40 models:
    # each worked out once, however many items share them.
    assert worked == [1, 1, 81]


def test_a_schema_too_complex_to_compare_refuses_the_call() -> None:
    wide: dict[str, Any] = {"anyOf": [{"properties": {f"f{i}": {}}} for i in range(MAX_WORK)]}
    declared = declared_arguments.anthropic(
        {"tools": [{"name": "t", "input_schema": {"properties": {"x": wide}}}]}
    )
    assert declared is not None
    assert declared.misspelled("t", {"x": {"f1": 1}}) == TOO_COMPLEX
    assert declared.misspelled("t", {"x": 5}) is None  # a scalar needs no schema below


def test_a_huge_recursive_schema_is_read_once_and_refused_past_the_bound() -> None:
    # Every property refers back to one model of 100,000 properties: each level reads it
    # in place; folding its names for a misspelled key would pass the bound, so the call
    # is refused rather than compared in part or for minutes.
    props: dict[str, Any] = {f"p{i}": {"$ref": "#/$defs/N"} for i in range(100_000)}
    schema = {"$defs": {"N": {"type": "object", "properties": props}}, "$ref": "#/$defs/N"}
    declared = declared_arguments.openai_responses(
        {"tools": [{"type": "function", "name": "t", "parameters": schema}]}
    )
    assert declared is not None
    exact = {f"p{i}": {"p0": {"p1": 1}} for i in range(2_000)}
    assert declared.misspelled("t", exact) is None
    assert declared.misspelled("t", {"p0": {"P1": 1}}) == TOO_COMPLEX


def test_a_ref_is_looked_up_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # However many keys reach one definition, its (long) $ref is resolved once.
    schema: dict[str, Any] = {
        "$defs": {"D": {"$ref": "#/" + "/" * 10_000}},
        "properties": {f"k{i}": {"$ref": "#/$defs/D"} for i in range(2_000)},
    }
    resolved: list[str] = []
    real = declared_arguments._resolve

    def counted(root: Any, ref: str) -> Any:
        resolved.append(ref[:10])
        return real(root, ref)

    monkeypatch.setattr(declared_arguments, "_resolve", counted)
    assert declared_arguments._misspelled(schema, {f"k{i}": {} for i in range(2_000)}) is None
    assert sorted(resolved) == ["#/$defs/D", "#/////////"]
