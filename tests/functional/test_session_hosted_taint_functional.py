"""Output of a tool the provider runs itself taints the session, whatever Warden decides.

A hosted tool (Anthropic's ``web_fetch``, a Responses ``mcp_call`` or web
search) runs at the provider before Warden sees its call: denying the call
keeps its result from the agent, not from the model. A real Warden with the
shipped bundle, the official SDKs, and a raw upstream playing the provider:
the model reads an injected page and, in the same answer or the next one,
proposes ``send_email`` (a ``sensitive_sink``), which the shipped policy holds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.adversarial.wire import (
    CLAUDE,
    MODEL,
    fn_item,
    message_body,
    response_body,
    tool_use,
)
from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from tests.functional.test_history_calls_functional import (
    FETCHED,
    INJECTED,
    MCP_CALL,
    SEND,
    WEB_FETCH,
)
from tests.functional.test_history_calls_functional import TOOLS as HISTORY_TOOLS
from warden.server import Warden
from warden.testing.raw_upstream import RawReply, RawUpstream

# The injected page, the sink and the fetch: as the history tests have them.
TOOLS = {**HISTORY_TOOLS, "web_search_call": {"risk": "read_only", "labels": ["untrusted_output"]}}
HOSTED: dict[str, dict[str, Any]] = {
    "mcp_call": MCP_CALL,
    "web_search_call": {
        "type": "web_search_call",
        "id": "ws_1",
        "status": "completed",
        "action": {"type": "search", "query": "evil"},
    },
}
TEXT = {
    "type": "message",
    "id": "msg_1",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "read it", "annotations": []}],
}


def sink_decisions(tmp_path: Path) -> list[tuple[str, list[str]]]:
    return [
        (r["decision"]["effect"], r["decision"]["input"]["session"]["taints"])
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"].get("tool") == "send_email"
    ]


@pytest.mark.parametrize("session", [None, "ticket-1"])
async def test_a_hosted_fetch_taints_the_calls_of_its_own_answer(
    tmp_path: Path, session: str | None
) -> None:
    headers = {"X-Warden-Session": session} if session else None
    answer = message_body([WEB_FETCH, FETCHED, tool_use("send_email", SEND, "toolu_2")])
    async with RawUpstream() as up:
        up.on_request = lambda _request: RawReply.json(answer)
        async with (
            Warden(make_config(tmp_path, up.url, tools=TOOLS)) as warden,
            anthropic.AsyncAnthropic(
                base_url=f"{warden.proxy_url}/anthropic",
                api_key="sk-ant-test",
                max_retries=0,
                default_headers=headers,
            ) as sdk,
        ):
            got = await sdk.messages.create(
                model=CLAUDE,
                max_tokens=50,
                messages=[{"role": "user", "content": "Summarise https://evil.test/page"}],
                tools=[
                    {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 1},
                    {"name": "send_email", "input_schema": {"type": "object"}},
                ],
            )
    assert "tool_use" not in [block.type for block in got.content]
    assert sink_decisions(tmp_path) == [("require_approval", ["untrusted_output"])]


@pytest.mark.parametrize("kind", ["mcp_call", "web_search_call"])
async def test_a_denied_hosted_call_still_taints_the_answers_after_it(
    tmp_path: Path, kind: str
) -> None:
    # Turn 1's hosted call is denied (the shipped catalogue does not list it), but
    # the provider ran it and keeps its output with the answer turn 2 continues.
    answers = [
        response_body([HOSTED[kind], TEXT]) | {"id": "resp_1"},
        response_body([fn_item("send_email", SEND, "call_2", "fc_2")]) | {"id": "resp_2"},
    ]
    async with RawUpstream() as up:
        up.on_request = lambda _request: RawReply.json(answers.pop(0))
        async with (
            Warden(make_config(tmp_path, up.url, tools=TOOLS)) as warden,
            openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as sdk,
        ):
            first = await sdk.responses.create(model=MODEL, input="read the page")
            await asyncio.sleep(0.3)  # the chain link is written behind the answer
            second = await sdk.responses.create(
                model=MODEL, previous_response_id=first.id, input="go on"
            )
    assert "function_call" not in [item.type for item in second.output]
    assert sink_decisions(tmp_path) == [("require_approval", ["untrusted_output"])]


def with_web_fetch(tmp_path: Path) -> str:
    """The shipped bundle with the provider's web_fetch in its catalogue (allowed)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_POLICY, bundle)
    data = json.loads((bundle / "data.json").read_text())
    data["warden"]["tools"]["web_fetch"] = {"class": "read_only"}
    (bundle / "data.json").write_text(json.dumps(data))
    return str(bundle)


async def test_a_server_tool_run_beside_a_client_tool_taints_the_next_turn(
    tmp_path: Path,
) -> None:
    # Claude calls a server tool and a client tool together: the server tool comes
    # back without its result and runs once the next request brings the client
    # tool's. No session named (the SDK's default): the history alone must taint.
    fetch_first = message_body([WEB_FETCH, tool_use("get_order", {"order_id": "A1"}, "toolu_1")])
    answers = [fetch_first, message_body([FETCHED, tool_use("send_email", SEND, "toolu_2")])]
    tools = {**TOOLS, "get_order": {"risk": "read_only"}}
    bundle = with_web_fetch(tmp_path)
    declared: Any = [
        {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 1},
        {"name": "get_order", "input_schema": {"type": "object"}},
        {"name": "send_email", "input_schema": {"type": "object"}},
    ]
    messages: list[Any] = [{"role": "user", "content": "Read https://evil.test/page, check A1"}]
    async with RawUpstream() as up:
        up.on_request = lambda _request: RawReply.json(answers.pop(0))
        config = make_config(tmp_path, up.url, tools=tools, policy={"bundles": [bundle]})
        async with (
            Warden(config) as warden,
            anthropic.AsyncAnthropic(
                base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
            ) as sdk,
        ):
            first = await sdk.messages.create(
                model=CLAUDE, max_tokens=50, messages=messages, tools=declared
            )
            messages += [
                {
                    "role": "assistant",
                    "content": [b.model_dump(exclude_none=True) for b in first.content],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "shipped"}
                    ],
                },
            ]
            await sdk.messages.create(
                model=CLAUDE, max_tokens=50, messages=messages, tools=declared
            )
    assert sink_decisions(tmp_path) == [("require_approval", ["untrusted_output"])]


SHELL = {
    "type": "shell_call",
    "id": "sh_1",
    "call_id": "call_sh",
    "status": "completed",
    "action": {"commands": ["cat /mnt/data/attachment.txt"], "timeout_ms": 1000},
    "environment": {"type": "container_reference", "container_id": "cntr_1"},
}
SHELL_OUT = {
    "type": "shell_call_output",
    "id": "sho_1",
    "call_id": "call_sh",
    "status": "completed",
    "output": [{"stdout": INJECTED, "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}],
}


SHELL_TOOLS: Any = [
    {"type": "shell", "environment": {"type": "container_auto"}},
    {"type": "function", "name": "send_email", "parameters": {"type": "object"}},
]


async def test_the_providers_shell_taints_like_any_tool_it_runs(tmp_path: Path) -> None:
    # A request giving the provider's shell (a container): the shell call in the answer
    # ran there, whatever Warden decides of it, and its output reached the model.
    answer = response_body([SHELL, SHELL_OUT, fn_item("send_email", SEND, "call_2", "fc_2")])
    tools = {**TOOLS, "shell_call": {"labels": ["untrusted_output"]}}
    async with RawUpstream() as up:
        up.on_request = lambda _request: RawReply.json(answer)
        async with (
            Warden(make_config(tmp_path, up.url, tools=tools)) as warden,
            openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as sdk,
        ):
            await sdk.responses.create(
                model=MODEL,
                input="summarise the customer's attachment",
                tools=SHELL_TOOLS,
            )
    assert sink_decisions(tmp_path) == [("require_approval", ["untrusted_output"])]


async def test_a_refused_provider_run_calls_output_resent_still_taints(tmp_path: Path) -> None:
    # The provider's shell ran; Warden refused its call, but the separate output item
    # reached the agent, which sends it back (store: false, no session named). The
    # request no longer carries the call: Warden's own record names its tool.
    tools = {**TOOLS, "shell_call": {"labels": ["untrusted_output"]}}
    answers = [
        response_body([SHELL, SHELL_OUT, TEXT]) | {"id": "resp_1"},
        response_body([fn_item("send_email", SEND, "call_2", "fc_2")]) | {"id": "resp_2"},
    ]
    async with RawUpstream() as up:
        up.on_request = lambda _request: RawReply.json(answers.pop(0))
        async with (
            Warden(make_config(tmp_path, up.url, tools=tools)) as warden,
            openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as sdk,
        ):
            sent: Any = [{"role": "user", "content": "summarise the customer's attachment"}]
            first = await sdk.responses.create(
                model=MODEL, input=sent, tools=SHELL_TOOLS, store=False
            )
            assert "shell_call" not in [item.type for item in first.output]
            sent += [item.model_dump(exclude_none=True) for item in first.output]
            sent.append({"role": "user", "content": "go on"})
            await sdk.responses.create(model=MODEL, input=sent, tools=SHELL_TOOLS, store=False)
    assert sink_decisions(tmp_path) == [("require_approval", ["untrusted_output"])]


async def test_a_result_no_record_knows_reads_as_history_unknown(tmp_path: Path) -> None:
    # A result sent back for a call neither the request nor Warden's records know (its
    # record pruned, or never kept): what it was is unknown, as past the bounds.
    answer = response_body([fn_item("send_email", SEND, "call_2", "fc_2")])
    resent: Any = [
        {"role": "user", "content": "summarise the page"},
        {"type": "function_call_output", "call_id": "call_gone", "output": INJECTED},
    ]
    async with RawUpstream() as up:
        up.on_request = lambda _request: RawReply.json(answer)
        async with (
            Warden(make_config(tmp_path, up.url, tools=TOOLS)) as warden,
            openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as sdk,
        ):
            await sdk.responses.create(model=MODEL, input=resent, store=False)
    (decision,) = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"].get("tool") == "send_email"
    ]
    assert decision["decision"]["effect"] == "require_approval"
    assert decision["decision"]["input"]["session"]["truncated"] is True
