"""Resources, prompts and argument completion are decided at both MCP doors.

The official ``mcp`` client reads a resource, gets a prompt and completes an
argument through ``warden mcp wrap`` (stdio) and through Warden's streamable
HTTP door, against the real test server, with the shipped customer-support
bundle: knowledge-base articles and the ``draft_reply`` prompt are allowed; a
customer's profile, read as a resource, is refused before it reaches the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal, cast

import httpx2
import pytest
from mcp import Client, types
from mcp.client.context import ClientRequestContext
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.functional import stdio_wrap
from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from tests.functional.test_mcp_stdio_functional import wrapped
from warden.protocols.mcp import INVALID_REQUEST, REFUSED
from warden.server import Warden
from warden.testing.mcp_server import (
    ESCALATE,
    EscalateParams,
    StreamableHttpServer,
    read_call_log,
)

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def fronted(tmp_path: Path, **overrides: Any) -> AsyncIterator[Warden]:
    """Warden in front of the test MCP server (upstream ``support-tools``)."""
    async with StreamableHttpServer(tmp_path / "calls.jsonl") as server:
        config = make_config(
            tmp_path,
            "http://127.0.0.1:9",
            upstreams={"support-tools": {"protocol": "mcp", "base_url": server.url}},
            **overrides,
        )
        async with Warden(config) as warden:
            yield warden


@asynccontextmanager
async def over_http(tmp_path: Path) -> AsyncIterator[ClientSession]:
    async with (
        fronted(tmp_path) as warden,
        httpx2.AsyncClient(timeout=30) as http,
        streamable_http_client(f"{warden.proxy_url}/support-tools", http_client=http) as (
            read,
            write,
        ),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


Door = Callable[[Path], AbstractAsyncContextManager[ClientSession]]
DOORS: dict[str, Door] = {"stdio": wrapped, "http": over_http}


@pytest.fixture(params=sorted(DOORS))
def door(request: pytest.FixtureRequest) -> Door:
    return DOORS[request.param]


def reached(tmp_path: Path) -> list[tuple[str, Any]]:
    """What the server ran or served, in order (its call log)."""
    return [(c["tool"], c["arguments"]) for c in read_call_log(tmp_path / "calls.jsonl")]


def decided(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "decision" and r["action"]["kind"] == kind
    ]


async def test_an_article_is_read_and_a_profile_is_refused(door: Door, tmp_path: Path) -> None:
    async with door(tmp_path) as session:
        article = await session.read_resource("kb://articles/refunds")
        with pytest.raises(MCPError) as refused:
            await session.read_resource("customers://C-1001/profile")
    (content,) = article.contents
    assert isinstance(content, types.TextResourceContents)
    assert content.text.startswith("Article refunds:")
    assert refused.value.error.code == REFUSED
    assert "blocked the request `resources/read`" in refused.value.error.message
    assert "customer records are read through the catalogued tools" in refused.value.error.message
    # The profile never reached the server.
    assert reached(tmp_path) == [("resources/read", {"uri": "kb://articles/refunds"})]
    allowed, denied = decided(tmp_path, "resource_read")
    assert allowed["action"]["tool"] == "resources/read"
    assert allowed["action"]["arguments"] == {"uri": "kb://articles/refunds"}
    assert allowed["decision"]["effect"] == "allow"
    assert denied["action"]["arguments"] == {"uri": "customers://C-1001/profile"}
    assert denied["decision"]["effect"] == "deny"
    assert refused.value.error.data == {"warden/decision": denied["decision"]["id"]}


async def test_prompts_and_completions_are_decided(door: Door, tmp_path: Path) -> None:
    prompt = types.PromptReference(type="ref/prompt", name="draft_reply")
    template = types.ResourceTemplateReference(
        type="ref/resource", uri="customers://{customer_id}/profile"
    )
    async with door(tmp_path) as session:
        got = await session.get_prompt("draft_reply", {"tone": "friendly"})
        with pytest.raises(MCPError, match="prompts/get request is not approved"):
            await session.get_prompt("exfiltrate", {"what": "everything"})
        completed = await session.complete(prompt, {"name": "tone", "value": "f"})
        with pytest.raises(MCPError, match="completion/complete request is not approved"):
            await session.complete(template, {"name": "customer_id", "value": "C-"})
    (message,) = got.messages
    assert isinstance(message.content, types.TextContent)
    assert message.content.text == "Write a friendly reply to the customer's last message."
    assert completed.completion.values == ["friendly", "formal", "firm"]
    assert reached(tmp_path) == [
        ("prompts/get", {"name": "draft_reply", "arguments": {"tone": "friendly"}}),
        ("completion/complete", {"argument": "tone", "value": "f"}),
    ]
    assert [r["decision"]["effect"] for r in decided(tmp_path, "prompt_get")] == ["allow", "deny"]
    completions = decided(tmp_path, "argument_completion")
    assert [r["decision"]["effect"] for r in completions] == ["allow", "deny"]


async def test_a_multi_round_trip_request_is_decided_each_round(tmp_path: Path) -> None:
    # 2026-07-28: the server's resolver asks the client through an InputRequiredResult,
    # and the client retries with its answers (inputResponses). Each round is decided;
    # the first is recorded as asking for input, not as a completed call.
    asked: list[str] = []

    async def confirm(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow", "reason": "ok"}\n'
    )
    async with fronted(tmp_path, policy={"bundles": [str(bundle)]}) as warden:
        client = Client(
            f"{warden.proxy_url}/support-tools", mode="2026-07-28", elicitation_callback=confirm
        )
        async with client:
            result = await client.call_tool("close_account_confirmed", {"customer_id": "C-1001"})
    assert not result.is_error
    assert asked == ["Close the account of C-1001?"]
    assert reached(tmp_path) == [("close_account", {"customer_id": "C-1001", "confirmed": True})]
    records = audit_records(tmp_path / "audit")
    decisions = [r for r in records if r.get("kind") == "decision"]
    assert [d["action"]["tool"] for d in decisions] == ["close_account_confirmed"] * 2
    outcomes = [r for r in records if r.get("kind") == "outcome"]
    assert [o["outcome"]["error"] for o in outcomes] == ["input_required", None]


def amounts_answered(*amounts: float) -> Callable[..., Any]:
    """An elicitation callback accepting with each of ``amounts`` in turn, as a user would."""
    left = iter(amounts)

    async def answer(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"amount": next(left)})

    return answer


def write_bundle(tmp_path: Path, source: str) -> Path:
    """A bundle of one module, ``source``."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(source)
    return bundle


async def either_door(
    stack: contextlib.AsyncExitStack, tmp_path: Path, door: str, bundle: Path
) -> tuple[Any, Path]:
    """What the official client connects to at ``door`` (``http`` or ``stdio``), deciding
    with ``bundle`` in front of the test server, and where that door's audit log is."""
    if door == "http":
        warden = await stack.enter_async_context(
            fronted(tmp_path, policy={"bundles": [str(bundle)]})
        )
        return f"{warden.proxy_url}/support-tools", tmp_path / "audit"
    config = stdio_wrap.write_config(tmp_path, bundle=bundle)
    return stdio_wrap.wrap_params(config, tmp_path / "calls.jsonl"), stdio_wrap.audit_dir(tmp_path)


ANSWER_POLICY = """package warden

import rego.v1

decision := {"effect": "deny", "reason": "an answer asks for a refund above 100"} if {
	some answer in input.action.input_responses
	some key
	amount := answer.content[key]
	lower(key) == "amount" # Go and .NET servers read "Amount" as "amount"
	amount > 100
} else := {"effect": "allow", "reason": "ok"}
"""


@pytest.mark.parametrize("door_name", ["http", "stdio"])
async def test_the_answers_of_a_retry_are_decided_recorded_and_never_run_when_denied(
    tmp_path: Path, door_name: str
) -> None:
    # The refund's amount is in no argument: the server asks the user for it
    # (2026-07-28, an InputRequiredResult) and reads it from the retry's answers.
    # A policy deciding on arguments alone would let any amount through.
    answer = amounts_answered(900.0, 20.0)

    async with contextlib.AsyncExitStack() as stack:
        bundle = write_bundle(tmp_path, ANSWER_POLICY)
        server, audit = await either_door(stack, tmp_path, door_name, bundle)
        client = Client(server, mode="2026-07-28", elicitation_callback=answer)
        async with client:
            denied = await client.call_tool("refund_asking_amount", {"order_id": "A-1001"})
            allowed = await client.call_tool("refund_asking_amount", {"order_id": "A-1002"})
    assert denied.is_error
    assert "an answer asks for a refund above 100" in str(denied.content)
    assert not allowed.is_error
    # Only the refund whose answer the policy allowed ran, with that answer.
    assert reached(tmp_path) == [
        ("issue_refund", {"order_id": "A-1002", "amount": 20.0, "reason": ""})
    ]
    decisions = [r for r in audit_records(audit) if r.get("kind") == "decision"]
    retries = [d for d in decisions if "input_responses" in d["action"]]
    assert len(decisions) == 4  # each call's first round has no answers
    assert [d["decision"]["effect"] for d in retries] == ["deny", "allow"]
    shown = [list(d["action"]["input_responses"].values()) for d in retries]
    assert shown == [
        [{"action": "accept", "content": {"amount": 900.0}}],
        [{"action": "accept", "content": {"amount": 20.0}}],
    ]


class EscalateRequest(types.Request[EscalateParams, Literal["support/escalate"]]):
    """The test server's extension method, as a client of the extension sends it."""

    method: Literal["support/escalate"] = "support/escalate"


class MisspelledCall(types.Request[types.CallToolRequestParams, Literal["TOOLS/CALL"]]):
    """``tools/call`` spelled otherwise: a server matching methods leniently would run it."""

    method: Literal["TOOLS/CALL"] = "TOOLS/CALL"


ALLOW_ALL = 'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow", "reason": "ok"}\n'


class Escalated(types.Result):
    """What the extension answers."""

    escalated: str
    queue: str


@pytest.mark.parametrize("door_name", ["http", "stdio"])
@pytest.mark.parametrize("policy", ["shipped", "allow"])
async def test_an_extension_method_is_decided_and_a_misspelled_method_refused(
    tmp_path: Path, door_name: str, policy: str
) -> None:
    # MCP servers serve methods of their own (SEP-2133 extensions); one can act
    # (here it hands a ticket to a person), so none passes undecided.
    bundle = write_bundle(tmp_path, ALLOW_ALL) if policy == "allow" else SHIPPED_POLICY
    async with contextlib.AsyncExitStack() as stack:
        server, audit = await either_door(stack, tmp_path, door_name, bundle)
        client = await stack.enter_async_context(Client(server, mode="2026-07-28"))
        session = client.session
        params = types.CallToolRequestParams(name="close_account", arguments={})
        with pytest.raises(MCPError) as misspelled:
            await session.send_request(MisspelledCall(params=params), types.CallToolResult)
        escalate = EscalateRequest(params=EscalateParams(ticket_id="T-7"))
        if policy == "allow":
            answer = await session.send_request(escalate, Escalated)
        else:
            with pytest.raises(MCPError) as refused:
                await session.send_request(escalate, Escalated)
    assert misspelled.value.error.code == INVALID_REQUEST
    assert "spelled otherwise than 'tools/call'" in misspelled.value.error.message
    [decision] = [r for r in audit_records(audit) if r.get("kind") == "decision"]
    assert decision["action"]["kind"] == "mcp_request"
    assert decision["action"]["tool"] == ESCALATE
    assert decision["action"]["arguments"] == {"ticketId": "T-7", "priority": "normal"}
    if policy == "allow":
        assert (answer.escalated, answer.queue) == ("T-7", "tier-2")
        assert reached(tmp_path) == [(ESCALATE, {"ticket_id": "T-7", "priority": "normal"})]
        [outcome] = [r for r in audit_records(audit) if r.get("kind") == "outcome"]
        assert "tier-2" in outcome["outcome"]["result"]
    else:
        assert refused.value.error.code == REFUSED
        assert "support/escalate request is not approved" in refused.value.error.message
        assert reached(tmp_path) == []  # neither the misspelled call nor the escalation


async def test_headers_that_mirror_the_body_must_say_what_it_says(tmp_path: Path) -> None:
    # 2026-07-28 clients repeat the method, the tool's name and annotated arguments in
    # headers, for whatever acts on headers without reading the body (SEP-2243).
    bundle = write_bundle(tmp_path, ALLOW_ALL)
    async with fronted(tmp_path, policy={"bundles": [str(bundle)]}) as warden:
        url = f"{warden.proxy_url}/support-tools"
        # The official client sends them all (Mcp-Param-Customer for get_customer's
        # annotated argument), and they agree: the call goes through.
        async with Client(url, mode="2026-07-28") as client:
            await client.list_tools()
            found = await client.call_tool("get_customer", {"customer_id": "C-1001"})
        assert not found.is_error
        call = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "get_customer", "arguments": {"customer_id": "C-1001"}},
        }
        plain = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        async with httpx2.AsyncClient(timeout=30) as http:
            for mirror in (
                {"Mcp-Method": "tools/call", "Mcp-Name": "close_account"},
                {"Mcp-Method": "resources/read"},
                {"Mcp-Method": "tools/call", "Mcp-Param-Customer": "C-1002"},
            ):
                answer = await http.post(url, json=call, headers={**plain, **mirror})
                assert answer.status_code == 400, mirror
                assert answer.json()["error"]["code"] == -32020, mirror
    # The mismatched requests never reached the server, nor were they decided.
    assert reached(tmp_path) == [("get_customer", {"customer_id": "C-1001"})]
    assert len(decided(tmp_path, "tool_call")) == 1


META_POLICY = """package warden

import rego.v1

decision := {"effect": "deny", "reason": "this client may only ask for dry runs"} if {
	input.action.meta["com.example/dry_run"] == false
} else := {"effect": "allow", "reason": "ok"}
"""


@pytest.mark.parametrize("door_name", ["http", "stdio"])
async def test_the_meta_a_request_carries_is_decided_and_recorded(
    tmp_path: Path, door_name: str
) -> None:
    # A server may act on a key of _meta (here a vendor's dry-run switch): the policy
    # sees the _meta that goes on, and the record keeps it.
    async with contextlib.AsyncExitStack() as stack:
        server, audit = await either_door(
            stack, tmp_path, door_name, write_bundle(tmp_path, META_POLICY)
        )
        client = await stack.enter_async_context(Client(server, mode="2026-07-28"))
        # An open map at run time; the SDK's TypedDict names only the keys MCP reserves.
        live_meta = cast(types.RequestParamsMeta, {"com.example/dry_run": False})
        dry_meta = cast(types.RequestParamsMeta, {"com.example/dry_run": True})
        live = await client.call_tool("get_order", {"order_id": "A-1001"}, meta=live_meta)
        dry = await client.call_tool("get_order", {"order_id": "A-1002"}, meta=dry_meta)
    assert live.is_error
    assert "this client may only ask for dry runs" in str(live.content)
    assert not dry.is_error
    assert reached(tmp_path) == [("get_order", {"order_id": "A-1002"})]
    decisions = [r for r in audit_records(audit) if r.get("kind") == "decision"]
    assert [d["action"]["meta"]["com.example/dry_run"] for d in decisions] == [False, True]
