"""Class 1: a response field spelled in another case is refused, never passed on.

Go's ``encoding/json`` (go-openai and other clients build on it) and .NET's
default binder read ``TOOL_CALLS`` as ``tool_calls`` when the exact spelling is
absent. Warden reads exact spellings, so an upstream that bends one envelope
key would hand such an agent a call Warden never saw. Each bent reply below is
refused in the provider's shape (a 502, or an error event that ends the
stream); the same reply unbent is delivered, so the refusal is the bend's.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.adversarial import wire
from tests.adversarial.conftest import Harness, case_headers, chat_messages, new_case
from warden.testing.raw_upstream import RawReply


def bend(value: Any, key: str, spelled: str) -> Any:
    """``value`` with every object key ``key`` spelled ``spelled`` instead."""
    return json.loads(json.dumps(value).replace(f'"{key}":', f'"{spelled}":'))


def _chat(oai: openai.OpenAI, case: str, stream: bool) -> list[str]:
    """The names of the calls the agent got."""
    kwargs: Any = {
        "model": wire.MODEL,
        "messages": chat_messages(case),
        "extra_headers": case_headers(case),
    }
    if stream:
        with oai.chat.completions.stream(**kwargs) as events:
            final = events.get_final_completion()
    else:
        final = oai.chat.completions.create(**kwargs)
    return [
        c.function.name for c in final.choices[0].message.tool_calls or () if c.type == "function"
    ]


def _responses(oai: openai.OpenAI, case: str, stream: bool) -> list[str]:
    headers = case_headers(case)
    final: Any
    if stream:
        with oai.responses.stream(model=wire.MODEL, input=case, extra_headers=headers) as events:
            final = events.get_final_response()
    else:
        final = oai.responses.create(model=wire.MODEL, input=case, extra_headers=headers)
    return [item.name for item in final.output if item.type == "function_call"]


def _messages(ant: anthropic.Anthropic, case: str, stream: bool) -> list[str]:
    kwargs: Any = {
        "model": wire.CLAUDE,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": case}],
        "extra_headers": case_headers(case),
    }
    if stream:
        with ant.messages.stream(**kwargs) as events:
            final = events.get_final_message()
    else:
        final = ant.messages.create(**kwargs)
    return [block.name for block in final.content if block.type == "tool_use"]


def _reply(api: str, stream: bool, key: str | None, spelled: str) -> RawReply:
    """The reply carrying one allowed ``search_kb`` call, with ``key`` bent if given."""
    if api == "chat":
        call = wire.chat_call("search_kb", {"query": "x"}, "c1")
        whole: Any = wire.chat_body([call])
        events: Any = wire.chat_stream(wire.chat_call_chunks(0, "search_kb", {"query": "x"}, "c1"))
    elif api == "responses":
        item = wire.fn_item("search_kb", {"query": "x"})
        whole, events = wire.response_body([item]), wire.responses_stream([item])
    else:
        block = wire.tool_use("search_kb", {"query": "x"})
        whole, events = wire.message_body([block]), wire.anthropic_stream([block])
    if key is not None:
        whole, events = bend(whole, key, spelled), [(n, bend(d, key, spelled)) for n, d in events]
    if stream:
        return RawReply.sse(events, done=api == "chat")
    return RawReply.json(whole)


@pytest.fixture
def ask(oai: openai.OpenAI, ant: anthropic.Anthropic) -> Any:
    """Ask through one API with the suite's SDK clients; the names of the calls got."""

    def asking(api: str, case: str, stream: bool) -> list[str]:
        if api == "chat":
            return _chat(oai, case, stream)
        if api == "responses":
            return _responses(oai, case, stream)
        return _messages(ant, case, stream)

    return asking


BENT = [
    ("chat", "tool_calls", "TOOL_CALLS"),
    ("chat", "function", "Function"),
    ("chat", "choices", "choice\u017f"),  # the long s: Go folds it to "s"
    ("chat", "name", "NAME"),
    ("responses", "output", "Output"),
    ("responses", "name", "Name"),
    ("responses", "item", "ITEM"),
    ("anthropic", "content", "CONTENT"),
    ("anthropic", "content_block", "Content_Block"),
    ("anthropic", "partial_json", "PARTIAL_JSON"),
]


def _applies(api: str, key: str, stream: bool) -> bool:
    """Whether the bent key occurs in that form of the reply at all."""
    whole_only = {("chat", "choices"), ("responses", "output"), ("anthropic", "content")}
    stream_only = {
        ("responses", "item"),
        ("anthropic", "content_block"),
        ("anthropic", "partial_json"),
    }
    return (api, key) not in (whole_only if stream else stream_only)


CASES = [
    pytest.param(api, key, spelled, stream, id=f"{api}-{'stream' if stream else 'whole'}-{spelled}")
    for api, key, spelled in BENT
    for stream in (False, True)
    if _applies(api, key, stream)
]


@pytest.mark.parametrize(("api", "key", "spelled", "stream"), CASES)
def test_a_key_spelled_in_another_case_is_refused(
    harness: Harness, ask: Any, api: str, key: str, spelled: str, stream: bool
) -> None:
    case = new_case()
    harness.answer(case, _reply(api, stream, key, spelled))
    error: type[anthropic.APIError | openai.APIError]
    error = anthropic.APIError if api == "anthropic" else openai.APIError
    with pytest.raises(error) as refused:
        ask(api, case, stream)
    if not stream:
        assert getattr(refused.value, "status_code", None) == 502
    assert isinstance(refused.value, (anthropic.APIError, openai.APIError))
    assert repr(spelled) in refused.value.message
    # The call was never decided, so nothing was allowed for it.
    tools = {r["action"]["tool"] for r in harness.audit.decisions(case)}
    assert "search_kb" not in tools


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("api", ["chat", "responses", "anthropic"])
def test_the_same_reply_spelled_as_the_provider_does_is_delivered(
    harness: Harness, ask: Any, api: str, stream: bool
) -> None:
    case = new_case()
    harness.answer(case, _reply(api, stream, None, ""))
    assert ask(api, case, stream) == ["search_kb"]


def test_keys_of_tool_arguments_and_metadata_are_the_tools_own(
    harness: Harness, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    """Only the envelope is read case-blind by a client; inside arguments any spelling goes."""
    case = new_case()
    block = wire.tool_use("search_kb", {"ID": "A-1", "Query": "refunds", "Name": "Ada"})
    harness.answer(case, RawReply.json(wire.message_body([block])))
    msg = ant.messages.create(
        model=wire.CLAUDE,
        max_tokens=100,
        messages=[{"role": "user", "content": case}],
        extra_headers=case_headers(case),
    )
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert [u.input for u in uses] == [{"ID": "A-1", "Query": "refunds", "Name": "Ada"}]

    case = new_case()
    body = {**wire.response_body([wire.fn_item("search_kb", {"Query": "x"})])}
    body["metadata"] = {"Name": "ticket", "ID": "7"}
    harness.answer(case, RawReply.json(body))
    got = oai.responses.create(model=wire.MODEL, input=case, extra_headers=case_headers(case))
    assert [item.name for item in got.output if item.type == "function_call"] == ["search_kb"]
    assert got.metadata == {"Name": "ticket", "ID": "7"}


EVIL_MCP = {"type": "mcp", "server_label": "x", "server_url": "https://mcp.evil.example/mcp"}


@pytest.mark.parametrize(
    ("api", "extra"),
    [
        ("chat", {"TOOLS": [{"type": "function", "function": {"name": "f"}}]}),
        ("chat", {"tools": [{"type": "function", "Function": {"name": "f"}}]}),
        ("responses", {"Tools": [EVIL_MCP]}),
        ("responses", {"tools": [{**EVIL_MCP, "type": "function", "TYPE": "mcp"}]}),
        ("anthropic", {"MCP_SERVERS": [{"type": "url", "url": "https://mcp.evil.example/mcp"}]}),
    ],
    ids=["chat-TOOLS", "chat-Function", "responses-Tools", "responses-TYPE", "anthropic-MCP"],
)
def test_a_request_key_spelled_in_another_case_never_goes_upstream(
    harness: Harness, oai: openai.OpenAI, ant: anthropic.Anthropic, api: str, extra: dict[str, Any]
) -> None:
    """A Go gateway would open what the policy never saw in ``input.request.tools``."""
    case = new_case()
    harness.answer(case, _reply(api, False, None, ""))

    def send() -> Any:
        headers = case_headers(case)
        if api == "chat":
            messages: Any = chat_messages(case)
            return oai.chat.completions.create(
                model=wire.MODEL, messages=messages, extra_headers=headers, extra_body=extra
            )
        if api == "responses":
            return oai.responses.create(
                model=wire.MODEL, input=case, extra_headers=headers, extra_body=extra
            )
        return ant.messages.create(
            model=wire.CLAUDE,
            max_tokens=100,
            messages=[{"role": "user", "content": case}],
            extra_headers=headers,
            extra_body=extra,
        )

    with pytest.raises((openai.BadRequestError, anthropic.BadRequestError)) as refused:
        send()
    misspelled = next(k for k in json.dumps(extra).split('"') if k.lower() != k)
    assert isinstance(refused.value, (openai.BadRequestError, anthropic.BadRequestError))
    assert repr(misspelled) in refused.value.message
    assert case in harness.replies  # the upstream was never asked
