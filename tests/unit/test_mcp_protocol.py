"""The sans-I/O MCP adapter, and the stdio door relaying through it with a real core."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import Any

import orjson
import pytest

from warden.core import Governor
from warden.ingress.mcp_stdio import StdioDoor
from warden.model import Action, ActionKind, Agent, Decision, Effect, Mode, new_id
from warden.pipeline import GuardContext, Pipeline
from warden.protocols import mcp
from warden.testing.memory_audit import MemoryAudit


def call_line(id_: object, name: object = "issue_refund", **params: Any) -> bytes:
    body = {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, **params}}
    return orjson.dumps(body)


def decision(effect: Effect, reason: str = "because") -> Decision:
    return Decision(new_id("dec"), effect, (reason,), Mode.ENFORCE, "policy")


def test_a_tools_call_becomes_a_tool_call_action() -> None:
    payload = mcp.parse(call_line(3, arguments={"order_id": "A-1", "amount": 5}))
    (message,) = payload.messages
    assert not payload.batch
    assert message.call is not None
    assert message.call.name == "issue_refund"
    assert message.call.arguments == {"order_id": "A-1", "amount": 5}
    action = mcp.action(message.call, Agent("a1"), "support-tools")
    assert (action.kind, action.protocol, action.tool) == (
        ActionKind.TOOL_CALL,
        "mcp",
        "issue_refund",
    )
    assert action.request.upstream == "support-tools"
    assert action.arguments == {"order_id": "A-1", "amount": 5}


def test_missing_arguments_are_an_empty_object_and_bad_ones_fail_closed() -> None:
    (empty,) = mcp.parse(call_line(1)).messages
    (bad,) = mcp.parse(call_line(2, arguments=[1, 2])).messages
    huge_line = call_line(3, arguments={"n": 1}).replace(b'"n":1', b'"n":' + str(2**70).encode())
    (huge,) = mcp.parse(huge_line).messages
    assert empty.call is not None
    assert empty.call.arguments == {}
    # The pipeline denies a call whose arguments are None before any guard sees it.
    assert bad.call is not None
    assert bad.call.arguments is None
    assert huge.call is not None
    assert huge.call.arguments is None


def test_the_forwarded_call_carries_exactly_the_decided_arguments() -> None:
    # Duplicate keys: whichever the parser kept is what is decided and what is sent.
    line = (
        b'{"jsonrpc":"2.0","id":"x","method":"tools/call","params":'
        b'{"name":"issue_refund","arguments":{"amount":5,"amount":5000},"_meta":{"k":1}}}'
    )
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    assert message.call.arguments is not None
    forwarded = mcp.forward_call(message)
    assert forwarded["params"]["arguments"] == dict(message.call.arguments)
    assert forwarded["params"]["_meta"] == {"k": 1}
    assert (
        orjson.loads(mcp.encode(forwarded))["params"]["arguments"]["amount"]
        == (message.call.arguments["amount"])
    )


@pytest.mark.parametrize(
    ("line", "id_", "code"),
    [
        (b"{nope", None, mcp.PARSE_ERROR),
        (b"\xff\xfe", None, mcp.PARSE_ERROR),
        (b"[]", None, mcp.INVALID_REQUEST),
        (b"42", None, mcp.INVALID_REQUEST),
        (b'{"id": 1, "method": "ping"}', 1, mcp.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', None, mcp.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', None, mcp.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 2, "method": 7}', 2, mcp.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 3, "method": "ping", "params": 1}', 3, mcp.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 4, "result": {}, "error": {}}', 4, mcp.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}}', None, -32600),
        (call_line(5, name=""), 5, mcp.INVALID_PARAMS),
        (call_line(6, name=["x"]), 6, mcp.INVALID_PARAMS),
    ],
)
def test_malformed_messages_get_the_spec_error_codes(line: bytes, id_: object, code: int) -> None:
    (message,) = mcp.parse(line).messages
    assert message.body is None
    assert message.call is None
    assert message.error is not None
    assert message.error["id"] == id_
    assert message.error["error"]["code"] == code


@pytest.mark.parametrize(
    ("line", "code"),
    [
        # A Go server reads the last of "method" and "METHOD": a tool call, undecided.
        (
            b'{"jsonrpc": "2.0", "id": 7, "method": "ping", "METHOD": "tools/call",'
            b' "params": {"name": "delete_repo", "arguments": {}}}',
            mcp.INVALID_REQUEST,
        ),
        (b'{"jsonrpc": "2.0", "id": 7, "Method": "tools/call", "result": {}}', mcp.INVALID_REQUEST),
        (
            b'{"jsonrpc": "2.0", "id": 8, "method": "tools/call",'
            b' "params": {"name": "read", "Name": "delete_repo"}}',
            mcp.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 9, "method": "tools/call",'
            b' "params": {"name": "read", "ARGUMENTS": {"path": "/etc"}}}',
            mcp.INVALID_PARAMS,
        ),
    ],
)
def test_a_field_spelled_in_another_case_is_refused(line: bytes, code: int) -> None:
    (message,) = mcp.parse(line).messages
    assert message.body is None
    assert message.call is None
    assert message.error is not None
    assert message.error["error"]["code"] == code


def test_a_forwarded_call_carries_only_what_a_tools_call_holds() -> None:
    line = (
        b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "read",'
        b' "arguments": {"q": 1}, "_meta": {"progressToken": 1}, "tool": "delete_repo"}}'
    )
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    assert mcp.forward_call(message)["params"] == {
        "name": "read",
        "arguments": {"q": 1},
        "_meta": {"progressToken": 1},
    }


def test_a_batch_over_the_bound_is_one_invalid_request() -> None:
    """Thousands of calls in one POST would be thousands of decisions and records at once."""
    at_bound = b"[" + b",".join(call_line(i) for i in range(mcp.MAX_BATCH)) + b"]"
    assert len(mcp.parse(at_bound).messages) == mcp.MAX_BATCH
    over = b"[" + b",".join(call_line(i) for i in range(mcp.MAX_BATCH + 1)) + b"]"
    payload = mcp.parse(over)
    assert not payload.batch
    (message,) = payload.messages
    assert message.call is None
    assert message.error is not None
    assert message.error["error"]["code"] == mcp.INVALID_REQUEST
    assert f"at most {mcp.MAX_BATCH}" in message.error["error"]["message"]


def test_a_batch_is_classified_member_by_member() -> None:
    batch = (
        b"["
        + b",".join(
            [
                call_line(1, arguments={}),
                b'{"jsonrpc": "2.0", "method": "notifications/initialized"}',
                b'{"jsonrpc": "2.0", "id": "s1", "result": {"roots": []}}',
                b'{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}',
                b"17",
            ]
        )
        + b"]"
    )
    payload = mcp.parse(batch)
    assert payload.batch
    calls = [m.call is not None for m in payload.messages]
    errors = [m.error is not None for m in payload.messages]
    assert calls == [True, False, False, False, False]
    assert errors == [False, False, False, False, True]
    assert [m.is_request for m in payload.messages] == [True, False, False, True, False]


def test_a_denied_call_is_a_tool_result_with_the_reason() -> None:
    (message,) = mcp.parse(call_line(9, arguments={})).messages
    denied = decision(Effect.DENY, "too much")
    answer = mcp.denied_result(message, denied)
    assert answer["id"] == 9
    assert answer["result"]["isError"] is True
    shown = answer["result"]["content"][0]["text"]
    assert "blocked the tool call `issue_refund`" in shown
    assert "too much" in shown
    assert denied.decision_id in shown
    held = mcp.denied_result(message, decision(Effect.REQUIRE_APPROVAL))
    assert "held the tool call" in held["result"]["content"][0]["text"]


def test_the_servers_answer_is_the_outcome() -> None:
    ok = {"id": 1, "result": {"content": [{"type": "text", "text": "done"}], "isError": False}}
    failed = {"id": 1, "result": {"content": [{"type": "text", "text": "no"}], "isError": True}}
    structured = {"id": 1, "result": {"structuredContent": {"a": 1}, "content": []}}
    error = {"id": 1, "error": {"code": -32602, "message": "unknown tool"}}
    assert mcp.result_outcome(ok).result == "done"
    assert not mcp.result_outcome(ok).is_error
    assert mcp.result_outcome(failed).is_error
    assert mcp.result_outcome(structured).result == '{"structuredContent":{"a":1},"content":[]}'
    outcome = mcp.result_outcome(error)
    assert (outcome.is_error, outcome.error, outcome.result) == (
        True,
        "jsonrpc_-32602",
        "unknown tool",
    )
    assert mcp.result_outcome({"id": 1, "result": 3}).error == "malformed_result"


def test_tools_list_filtering_hides_only_what_it_is_told() -> None:
    listing = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"tools": [{"name": "a"}, {"name": "b"}, "odd"], "nextCursor": "c"},
    }
    kept = mcp.filter_tools(listing, lambda name: name == "b")
    assert kept["result"] == {"tools": [{"name": "a"}, "odd"], "nextCursor": "c"}
    assert mcp.filter_tools({"id": 1, "error": {}}, lambda _: True) == {"id": 1, "error": {}}


# -- the stdio door, with a real Governor and a tiny child that answers every request


ECHO_SERVER = """
import json, sys
for line in sys.stdin:
    value = json.loads(line)
    items = value if isinstance(value, list) else [value]
    out = [{"jsonrpc": "2.0", "id": m["id"], "result": {"content": [{"type": "text",
            "text": "ran " + json.dumps(m.get("params"), sort_keys=True)}]}}
           for m in items if "id" in m and "method" in m]
    if out:
        print(json.dumps(out if isinstance(value, list) else out[0]), flush=True)
"""


class DenyCloseAccount:
    name = "policy"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        if action.tool == "close_account":
            return decision(Effect.DENY, "never over stdio")
        return None


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.lines: asyncio.Queue[Any] = asyncio.Queue()
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.put_nowait(orjson.loads(line))


class FakeOut:
    """A write transport collecting what the door sends the client."""

    def __init__(self) -> None:
        self.protocol = Collect()

    def write(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def is_closing(self) -> bool:
        return False


async def echo_door(
    guard: Any,
    audit: MemoryAudit,
    session: str | None = None,
    server: str = ECHO_SERVER,
    *,
    owned: bool = False,
) -> tuple[StdioDoor, Governor, asyncio.StreamReader, FakeOut]:
    """A started stdio door around the echo server, deciding through ``guard`` alone."""
    pipeline = Pipeline(
        [guard],
        audit,
        mode_for=lambda _: Mode.ENFORCE,
        risk_of=lambda _: "write",
        default_effect=Effect.ALLOW,
    )
    core = Governor(pipeline)
    client_in = asyncio.StreamReader()
    out = FakeOut()
    door = StdioDoor(
        [sys.executable, "-c", server],
        agent=Agent("a1"),
        upstream="echo",
        client_in=client_in,
        client_out=out,  # type: ignore[arg-type]
        session=session,
        session_owned=owned,
    )
    await door.start(core)
    return door, core, client_in, out


async def test_the_door_decides_calls_and_merges_batch_answers() -> None:
    audit = MemoryAudit()
    door, core, client_in, out = await echo_door(DenyCloseAccount(), audit)
    client_in.feed_data(call_line(1, name="get_order", arguments={"order_id": "A-1"}) + b"\n")
    single = await asyncio.wait_for(out.protocol.lines.get(), 10)
    batch = [
        orjson.loads(call_line(2, name="close_account", arguments={"customer_id": "C-1"})),
        orjson.loads(call_line(3, name="get_order", arguments={"order_id": "A-2"})),
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
    ]
    client_in.feed_data(orjson.dumps(batch) + b"\n")
    merged = await asyncio.wait_for(out.protocol.lines.get(), 10)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    assert single["id"] == 1
    assert "A-1" in single["result"]["content"][0]["text"]
    by_id = {m["id"]: m for m in merged}
    assert set(by_id) == {2, 3}
    assert by_id[2]["result"]["isError"] is True
    assert "never over stdio" in by_id[2]["result"]["content"][0]["text"]
    assert "A-2" in by_id[3]["result"]["content"][0]["text"]
    assert [d.effect for _, d in audit.decisions] == [Effect.ALLOW, Effect.DENY, Effect.ALLOW]
    assert sorted(o.outcome.result or "" for o in audit.outcomes) == [
        'ran {"arguments": {"order_id": "A-1"}, "name": "get_order"}',
        'ran {"arguments": {"order_id": "A-2"}, "name": "get_order"}',
    ]


class SeeSessions:
    """A guard noting the conversation (the session) each call it sees belongs to."""

    name = "policy"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        self.seen.append(action.request.conversation)
        return None


@pytest.mark.parametrize("session", ["ses_one_connection", None])
async def test_every_call_of_the_connection_is_in_the_doors_session(session: str | None) -> None:
    guard = SeeSessions()
    door, core, client_in, out = await echo_door(guard, MemoryAudit(), session, owned=True)
    client_in.feed_data(call_line(1, name="get_order", arguments={"order_id": "A-1"}) + b"\n")
    await asyncio.wait_for(out.protocol.lines.get(), 10)
    batch = [orjson.loads(call_line(i, name="get_order", arguments={"n": i})) for i in (2, 3)]
    client_in.feed_data(orjson.dumps(batch) + b"\n")
    await asyncio.wait_for(out.protocol.lines.get(), 10)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    assert len(guard.seen) == 3
    if session is None:
        assert guard.seen == [None, None, None]
        return
    assert {(c.session_id, c.session_source, c.carried, c.owned) for c in guard.seen} == {
        (session, "mcp", False, True)  # a fresh id: this wrap run's alone
    }
    # One conversation per call: the session guard's per-request memo is not shared.
    assert len({id(c) for c in guard.seen}) == 3


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}}, "request"),
        ({"jsonrpc": "2.0", "method": "notifications/progress"}, "request"),
        ({"jsonrpc": "2.0", "id": 1, "result": {}}, "response"),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x"}}, "response"),
        # What the Python client reads as an answer to request 1, dressed as the server's own.
        ({"jsonrpc": "2.0", "id": 1, "method": None, "result": {}}, "invalid"),
        ({"jsonrpc": "2.0", "id": 1, "method": "x", "error": {"code": 1}}, "invalid"),
        ({"jsonrpc": "2.0", "id": 1, "method": ""}, "invalid"),
        ({"jsonrpc": "2.0", "id": 2, "ID": 7, "result": {}}, "invalid"),  # Go reads the last
        ({"jsonrpc": "2.0", "id": 1}, "invalid"),
    ],
)
def test_a_servers_message_is_read_as_a_client_reads_it(message: dict[str, Any], kind: str) -> None:
    assert mcp.from_server(message) == kind


def test_ids_are_told_apart_as_servers_route_answers() -> None:
    # The Python SDK's HTTP server routes an answer by str(id): 1 and "1" are one id.
    batch = mcp.parse(
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":"1","method":"ping"},'
        b'{"jsonrpc":"2.0","id":2,"method":"ping"}]'
    )
    assert mcp.ids_used_twice(batch.messages) == {1, "1"}


# -- resources, prompts and completion: decided like tool calls ------------------------------


def request_line(method: str, id_: object = 4, **params: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})


def test_the_meta_a_request_carries_is_part_of_its_action() -> None:
    # A server may act on a key of _meta (a vendor's); the policy sees what goes on.
    meta = {"progressToken": 1, "com.example/dry_run": False}
    line = call_line(7, name="issue_refund", arguments={"amount": 5}, _meta=meta)
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    action = mcp.action(message.call, Agent("a1"), "t", meta=mcp.request_meta(message))
    assert action.meta == meta
    assert mcp.forward_call(message)["params"]["_meta"] == meta
    (plain,) = mcp.parse(call_line(8, name="issue_refund", arguments={})).messages
    assert mcp.request_meta(plain) is None
    for bad in ("x", ["x"], {"k": 1, "K": 2}, {"k": "a\x00b"}):
        (refused,) = mcp.parse(call_line(9, name="issue_refund", arguments={}, _meta=bad)).messages
        assert refused.error is not None
        assert "_meta must be an object a policy can read" in refused.error["error"]["message"]


@pytest.mark.parametrize(
    ("method", "params", "kind", "arguments"),
    [
        ("resources/read", {"uri": "kb://a"}, ActionKind.RESOURCE_READ, {"uri": "kb://a"}),
        (
            "prompts/get",
            {"name": "draft_reply", "arguments": {"tone": "firm"}},
            ActionKind.PROMPT_GET,
            {"name": "draft_reply", "arguments": {"tone": "firm"}},
        ),
        (
            "completion/complete",
            {"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": ""}},
            ActionKind.ARGUMENT_COMPLETION,
            {"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": ""}},
        ),
    ],
)
def test_requests_that_read_at_the_server_become_actions(
    method: str, params: dict[str, Any], kind: ActionKind, arguments: dict[str, Any]
) -> None:
    # Fields the method does not have are neither decided nor forwarded; _meta rides along.
    line = request_line(method, **params, _meta={"progressToken": 1}, path="/etc/shadow")
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    action = mcp.action(message.call, Agent("a1"), "support-tools")
    assert (action.kind, action.tool, action.request.method) == (kind, method, method)
    assert action.arguments == arguments
    forwarded = mcp.forward_call(message)
    assert forwarded["method"] == method
    assert forwarded["params"] == {**arguments, "_meta": {"progressToken": 1}}
    denied = mcp.denied_result(message, decision(Effect.DENY, "no"))
    assert denied["error"]["code"] == mcp.REFUSED
    assert f"blocked the request `{method}`; it was not performed" in denied["error"]["message"]


@pytest.mark.parametrize(
    ("line", "id_", "code"),
    [
        # As a notification it would be served undecided by a lenient server.
        (
            b'{"jsonrpc": "2.0", "method": "resources/read", "params": {"uri": "kb://a"}}',
            None,
            -32600,
        ),
        (request_line("resources/read", uri="kb://a", URI="customers://C-1"), 4, -32602),
        (request_line("resources/read", uri=""), 4, -32602),
        (request_line("resources/read", uri=["kb://a"]), 4, -32602),
        (b'{"jsonrpc": "2.0", "id": 4, "method": "resources/read"}', 4, -32602),
        (request_line("prompts/get", name="p", arguments={"n": 1}), 4, -32602),
        (request_line("prompts/get", arguments={}), 4, -32602),
        (request_line("completion/complete", ref={"type": "ref/prompt"}), 4, -32602),
        (request_line("completion/complete", ref={}, argument={}, context=[]), 4, -32602),
    ],
)
def test_requests_the_server_could_read_otherwise_are_refused(
    line: bytes, id_: object, code: int
) -> None:
    (message,) = mcp.parse(line).messages
    assert message.call is None
    assert message.error is not None
    assert (message.error["id"], message.error["error"]["code"]) == (id_, code)


@pytest.mark.parametrize("id_", ["1", "01", " 1", "1 ", "+1", "\u0661"])
def test_a_string_id_the_server_reads_as_a_number_is_that_id(id_: str) -> None:
    # The Python SDK's dispatcher files a request under int(id) where that reads it.
    (message,) = mcp.parse(orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": "ping"})).messages
    assert message.error is None
    assert mcp.id_key(id_) == mcp.id_key(1)


@pytest.mark.parametrize("id_", ["0x1", "abc", "req-1", "1.0"])
def test_other_string_ids_are_their_own(id_: str) -> None:
    assert mcp.valid_id(id_) == id_
    assert mcp.id_key(id_) == id_


class Gate:
    """A guard that holds every decision until opened."""

    name = "policy"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        self.entered.set()
        await self.open.wait()
        return None


@pytest.mark.parametrize("other", ["1", "01"])
async def test_an_id_the_server_reads_as_one_in_flight_is_refused(other: str) -> None:
    # 1 and "1" are one request to the server: a ping under "1" while call 1 is
    # decided would take its place there (and its answer would settle the call).
    gate = Gate()
    door, core, client_in, out = await echo_door(gate, MemoryAudit())
    client_in.feed_data(call_line(1, name="get_order", arguments={"order_id": "A-1"}) + b"\n")
    await asyncio.wait_for(gate.entered.wait(), 10)
    ping = {"jsonrpc": "2.0", "id": other, "method": "ping"}
    client_in.feed_data(orjson.dumps(ping) + b"\n")
    refused = await asyncio.wait_for(out.protocol.lines.get(), 10)
    gate.open.set()
    answer = await asyncio.wait_for(out.protocol.lines.get(), 10)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    assert refused == mcp.id_in_use(other)
    assert answer["id"] == 1
    assert "A-1" in answer["result"]["content"][0]["text"]


@pytest.mark.parametrize(
    "params",
    [
        # A Go server reads "NAME" and "TYPE" as the ref's fields: another completion.
        b'{"ref": {"type": "ref/prompt", "name": "draft_reply", "NAME": "x",'
        b' "TYPE": "ref/resource"}, "argument": {"name": "customer_id", "value": "C-"}}',
        # A lone surrogate: no policy engine can take it as the server reads it.
        b'{"ref": {"type": "ref/prompt", "name": "p"},'
        b' "argument": {"name": "a", "value": "\\ud800"}}',
    ],
)
def test_params_no_policy_can_read_as_the_server_does_are_malformed(params: bytes) -> None:
    line = (
        b'{"jsonrpc": "2.0", "id": 4, "method": "completion/complete", "params": ' + params + b"}"
    )
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    assert message.call.arguments is None  # denied by the validation guard, and recorded


SAMPLED_TOOL_USE = {
    "role": "assistant",
    "model": "m",
    "content": [{"type": "tool_use", "id": "t1", "name": "issue_refund", "input": {}}],
}


@pytest.mark.parametrize("method", sorted(mcp.PASSED))
def test_the_methods_mcp_defines_that_act_on_nothing_pass(method: str) -> None:
    (message,) = mcp.parse(request_line(method)).messages
    assert (message.call, message.error) == (None, None)
    assert message.body is not None


@pytest.mark.parametrize(
    ("method", "named"),
    [
        ("TOOLS/CALL", "tools/call"),
        ("Resources/Read", "resources/read"),
        ("COMPLETION/complete", "completion/complete"),
        ("tools/LIST", "tools/list"),
    ],
)
def test_a_method_spelled_otherwise_than_mcp_spells_it_is_refused(method: str, named: str) -> None:
    # A server matching methods leniently would run it as the method it resembles.
    for line in (request_line(method, name="close_account", arguments={}), request_line(method)):
        (message,) = mcp.parse(line).messages
        assert message.call is None
        assert message.error is not None
        assert message.error["error"]["code"] == mcp.INVALID_REQUEST
        assert f"spelled otherwise than {named!r}" in message.error["error"]["message"]


@pytest.mark.parametrize(
    "method",
    ["tools/call ", " tools/call", "tools/call\u200b", "tools/call\x00", "\ufefftools/call"],
)
def test_a_method_with_characters_a_server_may_trim_is_refused(method: str) -> None:
    # JavaScript's trim() drops U+FEFF, Java's trim() control characters.
    (message,) = mcp.parse(request_line(method, name="close_account", arguments={})).messages
    assert message.call is None
    assert message.error is not None
    assert message.error["error"]["code"] == mcp.INVALID_REQUEST
    assert "spaces, control or non-ASCII" in message.error["error"]["message"]


def test_a_method_mcp_does_not_define_is_decided_with_its_params() -> None:
    line = request_line("support/escalate", ticketId="T-1", _meta={"progressToken": 3})
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    action = mcp.action(message.call, Agent("a1"), "support-tools")
    assert (action.kind, action.tool) == (ActionKind.MCP_REQUEST, "support/escalate")
    assert action.arguments == {"ticketId": "T-1"}  # _meta rides along, undecided
    sent = mcp.forward_call(message)
    assert sent["params"] == {"ticketId": "T-1", "_meta": {"progressToken": 3}}
    # Without params: decided on none, sent with an empty object.
    (bare,) = mcp.parse(b'{"jsonrpc": "2.0", "id": 6, "method": "support/ping_all"}').messages
    assert bare.call is not None
    assert bare.call.arguments == {}
    assert mcp.forward_call(bare)["params"] == {}
    # Positional params name nothing a policy could read: refused.
    positional = b'{"jsonrpc": "2.0", "id": 5, "method": "support/escalate", "params": ["T-1"]}'
    (refused,) = mcp.parse(positional).messages
    assert refused.error is not None
    assert refused.error["error"]["code"] == mcp.INVALID_PARAMS
    no = Decision("dec_1", Effect.DENY, ("no",), Mode.ENFORCE, guard="policy")
    denied = mcp.denied_result(message, no)
    assert denied["error"]["code"] == mcp.REFUSED
    assert "the request `support/escalate`" in denied["error"]["message"]


@pytest.mark.parametrize("method", ["tools/call", "support/escalate"])
@pytest.mark.parametrize("field", ["INPUTRESPONSES", "input_responses", "Request_State"])
def test_a_retry_field_spelled_otherwise_is_refused(method: str, field: str) -> None:
    # Else the answers would ride along as an argument, unseen as answers by the policy;
    # the SDKs' params models bind their Python names (input_responses) too.
    answers = {"q": {"action": "accept"}}
    (message,) = mcp.parse(
        request_line(method, name="x", arguments={}, **{field: answers})
    ).messages
    assert message.call is None
    assert message.error is not None
    assert message.error["error"]["code"] == mcp.INVALID_PARAMS


def test_only_the_notifications_mcp_defines_go_on() -> None:
    for method in sorted(mcp.NOTIFICATIONS):
        ok = orjson.dumps({"jsonrpc": "2.0", "method": method, "params": {}})
        (passed,) = mcp.parse(ok).messages
        assert (passed.call, passed.error) == (None, None)
    for method in ("support/escalate", "notifications/support/escalate", "Notifications/Progress"):
        line = orjson.dumps({"jsonrpc": "2.0", "method": method, "params": {"ticketId": "T"}})
        (refused,) = mcp.parse(line).messages
        assert refused.body is None
        assert refused.error is not None
        assert refused.error["error"]["code"] == mcp.INVALID_REQUEST


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tools/call", {"name": "close_account", "arguments": {}}),
        ("resources/read", {"uri": "kb://a"}),
        ("prompts/get", {"name": "p"}),
    ],
)
def test_a_multi_round_trip_retry_goes_on_with_its_answers(
    method: str, params: dict[str, Any]
) -> None:
    answers = {"q": {"action": "accept", "content": {"confirm": True}}}
    retry = {**params, "inputResponses": answers, "requestState": "s1"}
    (message,) = mcp.parse(request_line(method, **retry)).messages
    assert message.call is not None
    assert message.call.arguments is not None
    assert "inputResponses" not in message.call.arguments  # they are no argument
    # The action carries them: the server reads them with the arguments.
    action = mcp.action(message.call, Agent("a1"), "t", answers=mcp.input_responses(message))
    assert action.input_responses == answers
    (first,) = mcp.parse(request_line(method, **params)).messages
    assert mcp.input_responses(first) is None
    sent = mcp.forward_call(message)["params"]
    assert (sent["inputResponses"], sent["requestState"]) == (answers, "s1")
    # A sampled answer that proposes tool calls would have the server run them undecided.
    sampled = {**params, "inputResponses": {"q": SAMPLED_TOOL_USE}}
    (refused,) = mcp.parse(request_line(method, **sampled)).messages
    assert refused.call is None
    assert refused.error is not None
    assert "proposes tool calls" in refused.error["error"]["message"]
    for bad in ({"inputResponses": ["q"]}, {"requestState": 7}):
        (malformed,) = mcp.parse(request_line(method, **params, **bad)).messages
        assert malformed.error is not None
    # Answers a Go or .NET server binds case-blind would say what the policy did not read.
    for unreadable in (
        {"q": {"action": "accept", "CONTENT": {"amount": 900}}},
        {"q": {"action": "accept", "content": {"amount": 20, "Amount": 900}}},
        {"q": {"action": "accept", "content": {"note": "a\x00b"}}},  # NUL: the engine stops there
    ):
        line = request_line(method, **params, inputResponses=unreadable)
        (refused_answer,) = mcp.parse(line).messages
        assert refused_answer.error is not None
        assert "inputResponses holds keys equal but for case" in str(refused_answer.error)
    # A policy reads every answer and field: their number is bounded.
    wide = {f"f{i}": 1 for i in range(mcp.MAX_ANSWER_FIELDS + 1)}
    for too_many in (
        {f"q{i}": {"action": "accept"} for i in range(mcp.MAX_ANSWERS + 1)},
        {"q": {"action": "accept", "content": wide}},
        {"q": {"action": "accept", **wide}},
    ):
        (refused_wide,) = mcp.parse(
            request_line(method, **params, inputResponses=too_many)
        ).messages
        assert refused_wide.error is not None
        assert "more than 16 answers" in str(refused_wide.error)
    most = {f"q{i}": {"action": "accept"} for i in range(mcp.MAX_ANSWERS)}
    (kept,) = mcp.parse(request_line(method, **params, inputResponses=most)).messages
    assert kept.error is None


def test_an_answer_that_asks_for_input_is_no_completed_call() -> None:
    asks = {"resultType": "input_required", "inputRequests": {}, "requestState": "s"}
    outcome = mcp.result_outcome({"jsonrpc": "2.0", "id": 1, "result": asks})
    assert (outcome.error, outcome.is_error) == ("input_required", True)
    # A task handle (a shape a client extension claims): the call goes on at the server.
    task = {"resultType": "task", "task": {"taskId": "t1", "status": "working"}}
    outcome = mcp.result_outcome({"jsonrpc": "2.0", "id": 1, "result": task})
    # Accepted, not failed: a cap's reservation for it stays spent (a failure releases it).
    assert (outcome.status, outcome.error, outcome.is_error) == (mcp.ACCEPTED, None, False)
    assert outcome.result is not None
    assert "t1" in outcome.result
    done = {"resultType": "complete", "content": [{"type": "text", "text": "ok"}]}
    assert mcp.result_outcome({"jsonrpc": "2.0", "id": 1, "result": done}).error is None


def test_answers_a_method_does_not_forward_are_not_decided_on() -> None:
    ref = {"type": "ref/prompt", "name": "p"}
    line = request_line(
        "completion/complete",
        ref=ref,
        argument={"name": "a", "value": ""},
        inputResponses={"q": {"action": "accept", "content": {"confirm": True}}},
    )
    (message,) = mcp.parse(line).messages
    assert message.call is not None
    assert mcp.input_responses(message) is None
    assert "inputResponses" not in mcp.forward_call(message)["params"]


def test_warden_results_carry_the_result_type_later_revisions_require() -> None:
    (message,) = mcp.parse(call_line(1, name="close_account", arguments={})).messages
    denied = mcp.denied_result(message, decision(Effect.DENY))
    assert denied["result"]["resultType"] == "complete"


class AllowAll:
    """A guard that leaves every call to the pipeline's default (allow)."""

    name = "policy"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        return None


# Holds every tools/call; answers one only once it is cancelled (late); answers the rest.
LATE_SERVER = """
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("method") == "notifications/cancelled":
        late = {"content": [{"type": "text", "text": "late"}]}
        answer = {"jsonrpc": "2.0", "id": int(m["params"]["requestId"]), "result": late}
        print(json.dumps(answer), flush=True)
    elif "id" in m and m.get("method") not in (None, "tools/call"):
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": {}}), flush=True)
"""


@pytest.mark.parametrize("named", [1, "1"])
async def test_a_cancelled_call_is_recorded_then_and_its_late_answer_dropped(
    named: int | str,
) -> None:
    # A server need not answer a cancelled request: the call was once kept waiting
    # for good (and its id in use), and a late answer reached the client. "1" names
    # call 1 as the SDKs read ids (coerce_request_id), so it cancels it too.
    audit = MemoryAudit()
    door, core, client_in, out = await echo_door(AllowAll(), audit, server=LATE_SERVER)
    client_in.feed_data(call_line(1, name="get_order", arguments={"order_id": "A-1"}) + b"\n")
    for _ in range(200):
        if audit.decisions:
            break
        await asyncio.sleep(0.01)
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": named},
    }
    client_in.feed_data(orjson.dumps(cancel) + b"\n")
    client_in.feed_data(b'{"jsonrpc": "2.0", "id": 2, "method": "ping"}\n')
    first = await asyncio.wait_for(out.protocol.lines.get(), 10)
    for _ in range(200):
        if audit.outcomes:
            break
        await asyncio.sleep(0.01)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    assert first == {"jsonrpc": "2.0", "id": 2, "result": {}}  # the late answer went no further
    assert out.protocol.lines.empty()
    assert [o.outcome.error for o in audit.outcomes] == ["client_cancelled"]


# -- the client's answers to the child's own requests (revisions before 2026-07-28)

# Asks the client mid-call (elicitation/create, id 100 + the call's) once it holds
# both calls 1 and 2; outside any call, on the client's ping, it pings and elicits
# ("p" and "e"). Whatever answer reaches it is told back as a notification.
ASKING_SERVER = """
import json, sys
calls = []
def out(value):
    print(json.dumps(value), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("method") == "tools/call":
        calls.append(m["id"])
        if len(calls) == 2:
            out({"jsonrpc": "2.0", "id": 102, "method": "elicitation/create",
                 "params": {"message": "How much?"}})
    elif m.get("method") == "ping":
        out({"jsonrpc": "2.0", "id": "p", "method": "ping"})
        out({"jsonrpc": "2.0", "id": "e", "method": "elicitation/create",
             "params": {"message": "Anything?"}})
        out({"jsonrpc": "2.0", "id": m["id"], "result": {}})
    elif "method" not in m:
        out({"jsonrpc": "2.0", "method": "notifications/message",
             "params": {"level": "info", "data": m}})
"""


class DenyLargeAnswers:
    """Denies a refund whose answers ask for more than 100."""

    name = "policy"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        answers = action.input_responses or {}
        amounts = [
            a["content"].get("amount", 0)
            for a in answers.values()
            if isinstance(a, dict) and isinstance(a.get("content"), dict)
        ]
        if action.tool == "issue_refund" and any(x > 100 for x in amounts):
            return decision(Effect.DENY, "a refund above 100")
        return None


async def received(out: FakeOut) -> dict[str, Any]:
    """The next answer the child got, as it tells it back."""
    while True:
        line = await asyncio.wait_for(out.protocol.lines.get(), 10)
        if line.get("method") == "notifications/message":
            got: dict[str, Any] = line["params"]["data"]
            return got


def answer_line(id_: object, amount: float) -> bytes:
    result = {"action": "accept", "content": {"amount": amount}}
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "result": result}) + b"\n"


async def test_an_answer_is_decided_against_every_call_that_may_have_asked() -> None:
    # Stdio does not say which call a request belongs to: with two calls running,
    # the answer must be allowed with each; the refund's decision refuses it.
    audit = MemoryAudit()
    door, core, client_in, out = await echo_door(DenyLargeAnswers(), audit, server=ASKING_SERVER)
    client_in.feed_data(call_line(1, name="get_order", arguments={"order_id": "A-1"}) + b"\n")
    client_in.feed_data(call_line(2, arguments={"order_id": "A-1"}) + b"\n")
    asked = await asyncio.wait_for(out.protocol.lines.get(), 10)
    assert (asked["id"], asked["method"]) == (102, "elicitation/create")
    client_in.feed_data(answer_line(102, 900))
    got = await received(out)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    assert "result" not in got  # the answer never reached the child: Warden's error did
    assert got["id"] == 102
    assert got["error"]["code"] == mcp.REFUSED
    assert "blocked the client's answer to elicitation/create" in got["error"]["message"]
    assert "a refund above 100" in got["error"]["message"]
    again = [(a, d) for a, d in audit.decisions if a.input_responses is not None]
    assert sorted((a.tool, d.effect) for a, d in again) == [
        ("get_order", Effect.ALLOW),
        ("issue_refund", Effect.DENY),
    ]
    key = {"elicitation/create#1": {"action": "accept", "content": {"amount": 900}}}
    assert all(a.input_responses == key for a, _ in again)
    # The get_order decision the answer did not use gives back what it held.
    (unused,) = [o for o in audit.outcomes if o.outcome.error == "answer_refused"]
    assert unused.action.tool == "get_order"


async def test_an_answer_tied_to_no_call_fails_closed_and_a_ping_passes_empty() -> None:
    audit = MemoryAudit()
    door, core, client_in, out = await echo_door(AllowAll(), audit, server=ASKING_SERVER)
    client_in.feed_data(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')
    for _ in range(3):  # the child's ping, its elicitation, its answer to the client's ping
        await asyncio.wait_for(out.protocol.lines.get(), 10)
    pong = {"jsonrpc": "2.0", "id": "p", "result": {"smuggled": 1}}
    client_in.feed_data(orjson.dumps(pong) + b"\n")
    ponged = await received(out)
    client_in.feed_data(answer_line("e", 5))  # asked outside any call
    outside = await received(out)
    client_in.feed_data(answer_line("never", 5))  # asked never
    never = await received(out)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    assert ponged == {"jsonrpc": "2.0", "id": "p", "result": {}}
    for got, id_ in ((outside, "e"), (never, "never")):
        assert "result" not in got
        assert got["id"] == id_
        assert "did not relay the client's answer" in got["error"]["message"]
    assert audit.decisions == []


def test_a_legacy_answer_joins_the_calls_input_responses() -> None:
    (message,) = mcp.parse(call_line(3, arguments={"order_id": "A-1"})).messages
    assert message.call is not None
    action = mcp.action(message.call, Agent("a1"), "support-tools")
    first = mcp.with_answer(action, "elicitation/create", {"action": "accept"})
    assert first is not None
    second = mcp.with_answer(first, "roots/list", {"roots": []})
    assert second is not None
    assert second.input_responses == {
        "elicitation/create#1": {"action": "accept"},
        "roots/list#2": {"roots": []},
    }
    assert len({action.action_id, first.action_id, second.action_id}) == 3
    full = dataclasses.replace(action, input_responses={str(i): {} for i in range(16)})
    assert mcp.with_answer(full, "elicitation/create", {}) is None  # mcp.MAX_ANSWERS


@pytest.mark.parametrize(
    "result",
    [
        b'{"action": "accept", "CONTENT": {"amount": 900}}',
        b'{"action": "accept", "content": {"amount": 1, "Amount": 900}}',
        b'{"action": "accept", "content": {"note": "a\\u0000b"}}',
        b"[1, 2]",
    ],
)
def test_an_answer_no_policy_can_read_as_the_server_does_goes_on_as_an_error(
    result: bytes,
) -> None:
    (message,) = mcp.parse(b'{"jsonrpc": "2.0", "id": 0, "result": ' + result + b"}").messages
    assert message.body is not None
    assert "result" not in message.body
    assert message.body["id"] == 0
    assert mcp.client_result(message) is None  # nothing to decide: it is Warden's error


def test_an_answer_that_names_a_method_is_no_answer() -> None:
    # "method": null beside a result: the SDK's server reads it as an answer, which
    # must not reach it without the answer's decision; neither request nor answer, it
    # is refused and goes nowhere.
    line = {"jsonrpc": "2.0", "id": 0, "method": None, "result": {"action": "accept"}}
    (message,) = mcp.parse(orjson.dumps(line)).messages
    assert message.body is None
    assert message.error is not None
    assert message.error["error"]["code"] == mcp.INVALID_REQUEST
    assert mcp.client_result(message) is None


def test_a_retry_may_not_name_an_answer_as_warden_names_them() -> None:
    # Warden names an earlier revision's answers "elicitation/create#1", "#2"...: an
    # answer the client sends under such a name first would be read by a rule that
    # looks it up by name in place of the one the user gave.
    params = {
        "name": "issue_refund",
        "arguments": {"order_id": "A-1"},
        "inputResponses": {"elicitation/create#1": {"action": "accept", "content": {}}},
    }
    line = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": params}
    (message,) = mcp.parse(orjson.dumps(line)).messages
    assert message.call is None
    assert message.error is not None
    assert "as Warden names the answers" in message.error["error"]["message"]
    fine = {**params, "inputResponses": {"ask": {"action": "accept", "content": {}}}}
    (ok,) = mcp.parse(orjson.dumps({**line, "params": fine})).messages
    assert ok.call is not None


TWO_QUESTIONS_SERVER = """
import json, sys
def out(value):
    print(json.dumps(value), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("method") == "tools/call":
        for i in (201, 202):
            out({"jsonrpc": "2.0", "id": i, "method": "elicitation/create",
                 "params": {"message": "How much?"}})
    elif "method" not in m:
        out({"jsonrpc": "2.0", "method": "notifications/message",
             "params": {"level": "info", "data": m}})
"""


async def test_two_answers_to_one_call_are_decided_one_after_the_other() -> None:
    # Sent together, each answer's decision must see the one before it: decided at
    # once, both would start from the call without either and land under one name.
    audit = MemoryAudit()
    door, core, client_in, out = await echo_door(AllowAll(), audit, server=TWO_QUESTIONS_SERVER)
    client_in.feed_data(call_line(1, arguments={"order_id": "A-1"}) + b"\n")
    for _ in range(2):
        await asyncio.wait_for(out.protocol.lines.get(), 10)
    client_in.feed_data(answer_line(201, 10) + answer_line(202, 20))
    for _ in range(2):
        await received(out)
    client_in.feed_eof()
    await asyncio.wait_for(door.done.wait(), 10)
    await door.stop()
    await core.close()
    seen = [dict(a.input_responses) for a, _ in audit.decisions if a.input_responses]
    assert [sorted(s) for s in seen] == [
        ["elicitation/create#1"],
        ["elicitation/create#1", "elicitation/create#2"],
    ]
