"""The headers that mirror an MCP request's body (2026-07-28, SEP-2243) must say what it says."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from warden.protocols import mcp, mcp_mirror
from warden.protocols.declared_arguments import ListedArguments


def headers(**given: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in given.items()}))


def request(method: str, **params: Any) -> mcp.Payload:
    return mcp.parse(orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))


def sentinel(text: str) -> str:
    return f"=?base64?{base64.b64encode(text.encode()).decode()}?="


CUSTOMER = {
    "type": "object",
    "properties": {
        "customer_id": {"type": "string", "x-mcp-header": "Customer"},
        "verbose": {"type": "boolean", "x-mcp-header": "Verbose"},
        "filter": {
            "type": "object",
            "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
        },
        "note": {"type": "string"},
    },
}


def listed() -> ListedArguments:
    known = ListedArguments()
    known.learn({"result": {"tools": [{"name": "get_customer", "inputSchema": CUSTOMER}]}})
    return known


CALL = {"name": "get_customer", "arguments": {"customer_id": "C-1", "verbose": True}}


@pytest.mark.parametrize(
    "given",
    [
        {},  # an earlier revision's client sends none
        {"Mcp-Method": "tools/call", "Mcp-Name": "get_customer"},
        {"Mcp-Method": "tools/call", "Mcp-Name": sentinel("get_customer")},
        {"Mcp-Param-Customer": "C-1", "mcp-param-verbose": "true"},
        {"Mcp-Param-Customer": sentinel("C-1")},
    ],
)
def test_headers_that_say_what_the_body_says_pass(given: dict[str, str]) -> None:
    assert mcp_mirror.problem(request("tools/call", **CALL), headers(**given), listed()) is None


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ({"Mcp-Method": "tools/list"}, "Mcp-Method says 'tools/list'"),
        ({"Mcp-Name": "close_account"}, "Mcp-Name does not match"),
        ({"Mcp-Name": "=?base64?Z2V0X2N1c3RvbWVy?"}, "Mcp-Name does not match"),  # no sentinel
        ({"Mcp-Name": "=?base64?Z2V0X2N1c3RvbWVy=?="}, "Mcp-Name does not match"),  # bad base64
        ({"Mcp-Param-Customer": "C-2"}, "does not match the argument 'customer_id'"),
        ({"Mcp-Param-Verbose": "True"}, "does not match the argument 'verbose'"),
        ({"Mcp-Param-Region": "eu"}, "does not match the argument 'filter.region'"),
        ({"Mcp-Param-Note": "x"}, "mirrors no argument the tool's schema annotates"),
    ],
)
def test_a_header_that_says_otherwise_is_a_mismatch(given: dict[str, str], why: str) -> None:
    found = mcp_mirror.problem(request("tools/call", **CALL), headers(**given), listed())
    assert found is not None
    assert why in found


def test_a_nested_argument_is_mirrored_by_its_path() -> None:
    call = {"name": "get_customer", "arguments": {"customer_id": "C-1", "filter": {"region": "eu"}}}
    given = headers(**{"Mcp-Param-Region": "eu", "Mcp-Param-Customer": "C-1"})
    assert mcp_mirror.problem(request("tools/call", **call), given, listed()) is None


def test_params_of_a_tool_never_listed_cannot_be_checked() -> None:
    found = mcp_mirror.problem(
        request("tools/call", **CALL), headers(**{"Mcp-Param-Customer": "C-1"}), None
    )
    assert found is not None
    assert "has not seen the server list the tool 'get_customer'" in found
    # Without such headers a call to it goes on as before.
    assert mcp_mirror.problem(request("tools/call", **CALL), headers(), None) is None


def test_the_name_of_a_read_is_its_uri_and_other_methods_name_nothing() -> None:
    read = request("resources/read", uri="kb://articles/refunds")
    assert mcp_mirror.problem(read, headers(Mcp_Name="kb://articles/refunds"), None) is None
    assert mcp_mirror.problem(read, headers(Mcp_Name="customers://C-1/profile"), None)
    # Params are mirrored for tool calls only.
    assert mcp_mirror.problem(read, headers(Mcp_Param_Customer="C-1"), listed())


def test_one_header_twice_and_headers_on_a_batch_are_mismatches() -> None:
    twice = CIMultiDictProxy(CIMultiDict([("Mcp-Name", "get_customer"), ("mcp-name", "x")]))
    found = mcp_mirror.problem(request("tools/call", **CALL), twice, None)
    assert "more than once" in (found or "")
    line = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    batch = mcp.parse(b"[" + line + b"]")
    assert "batch" in (mcp_mirror.problem(batch, headers(Mcp_Method="ping"), None) or "")
    # An answer to the server's request has no method for a header to mirror.
    answer = mcp.parse(b'{"jsonrpc": "2.0", "id": "s1", "result": {}}')
    assert mcp_mirror.problem(answer, headers(Mcp_Method="tools/call"), None)


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ({"Mcp-Name": "=?base64?\u00e9?="}, "outside printable ASCII"),
        ({"Mcp-Name": "get_customer\u00e9"}, "outside printable ASCII"),
        ({"Mcp_Name": "get_customer"}, "spelled with an underscore"),
        ({"mcp_param_customer": "C-1"}, "spelled with an underscore"),
    ],
)
def test_values_and_names_that_readers_take_differently_are_refused(
    given: dict[str, str], why: str
) -> None:
    sent = CIMultiDictProxy(CIMultiDict(given))  # as written: CGI stacks read _ as -
    found = mcp_mirror.problem(request("tools/call", **CALL), sent, listed())
    assert why in (found or "")


def test_a_malformed_base64_name_matches_nothing_and_raises_nothing() -> None:
    # Printable, but base64 no decoder takes: it cannot equal the body's name.
    for value in ("=?base64?@@@@?=", "=?base64?//79?="):  # the second is not UTF-8
        found = mcp_mirror.problem(request("tools/call", **CALL), headers(Mcp_Name=value), None)
        assert "does not match" in (found or "")


def test_a_request_that_names_nothing_carries_no_name() -> None:
    ref = {"type": "ref/prompt", "name": "p"}
    complete = request("completion/complete", ref=ref, argument={"name": "a", "value": ""})
    assert "names nothing" in (mcp_mirror.problem(complete, headers(Mcp_Name="p"), None) or "")
    # A server's own method may name what it defines.
    escalate = request("support/escalate", ticketId="T-1")
    assert mcp_mirror.problem(escalate, headers(Mcp_Name="T-1"), None) is None


def test_a_token_may_hold_an_underscore_where_the_schema_gives_one() -> None:
    # RFC 9110 tokens allow "_": the official client writes Mcp-Param-customer_id.
    schema = {"type": "object", "properties": {"id": {"type": "string", "x-mcp-header": "c_id"}}}
    known = ListedArguments()
    known.learn({"result": {"tools": [{"name": "lookup", "inputSchema": schema}]}})
    call = request("tools/call", name="lookup", arguments={"id": "C-1"})
    given = CIMultiDictProxy(CIMultiDict({"Mcp-Param-c_id": "C-1"}))
    assert mcp_mirror.problem(call, given, known) is None
    loose = CIMultiDictProxy(CIMultiDict({"Mcp-Param-c-id": "C-1"}))  # not the declared token
    assert "mirrors no argument" in (mcp_mirror.problem(call, loose, known) or "")


def test_a_name_goes_only_where_a_request_names_something() -> None:
    note = mcp.parse(b'{"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}')
    assert "names nothing" in (mcp_mirror.problem(note, headers(Mcp_Name="x"), None) or "")
    answer = mcp.parse(b'{"jsonrpc": "2.0", "id": "s1", "result": {}}')
    assert "names nothing" in (mcp_mirror.problem(answer, headers(Mcp_Name="x"), None) or "")
    # tasks/* name their task (SEP-2663).
    task = request("tasks/get", taskId="t1")
    assert mcp_mirror.problem(task, headers(Mcp_Name="t1"), None) is None
