"""Class 3: decisions are bound to the exact bytes the agent receives.

Colliding and missing ids, deltas that arrive after a call was decided, and
JSON that only a lenient (SDK-like) parser reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anthropic
import openai
import pytest

from tests.adversarial import wire
from tests.adversarial.conftest import (
    Harness,
    canonical,
    case_headers,
    chat_messages,
    new_case,
)
from warden.testing.raw_upstream import RawReply

SDK_ERRORS = (openai.APIError, anthropic.APIError)


def chat_create(oai: openai.OpenAI, case: str) -> Any:
    return oai.chat.completions.create(
        model=wire.MODEL,
        messages=chat_messages(case),  # type: ignore[arg-type]
        extra_headers=case_headers(case),
    )


def chat_final(oai: openai.OpenAI, case: str) -> Any:
    with oai.chat.completions.stream(
        model=wire.MODEL,
        messages=chat_messages(case),  # type: ignore[arg-type]
        extra_headers=case_headers(case),
    ) as s:
        return s.get_final_completion()


def chat_calls(completion: Any) -> list[tuple[str, str]]:
    return [
        (tc.function.name, tc.function.arguments)
        for c in completion.choices
        for tc in c.message.tool_calls or []
        if tc.type == "function"
    ]


def verdicts(h: Harness, case: str) -> list[tuple[str, str]]:
    return sorted((r["action"]["tool"], r["decision"]["enforced"]) for r in h.audit.decisions(case))


# -- ids -----------------------------------------------------------------------


@pytest.mark.parametrize("ids", [("same", "same"), (None, None), ("", "")], ids=str)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_calls_sharing_an_id_are_decided_one_by_one(
    harness: Harness, oai: openai.OpenAI, ids: tuple[str | None, str | None], stream: bool
) -> None:
    case = new_case()
    first = ("search_kb", {"q": "refund policy"})
    second = ("export_customers", {"format": "csv"})
    if stream:
        events = wire.chat_stream(
            wire.chat_call_chunks(0, *first, call_id=ids[0])
            + wire.chat_call_chunks(1, *second, call_id=ids[1])
        )
        harness.answer(case, RawReply.sse(events, done=True))
        completion = chat_final(oai, case)
    else:
        body = wire.chat_body(
            [wire.chat_call(*first, call_id=ids[0]), wire.chat_call(*second, call_id=ids[1])]
        )
        harness.answer(case, RawReply.json(body))
        completion = chat_create(oai, case)
    assert [name for name, _ in chat_calls(completion)] == ["search_kb"]
    assert verdicts(harness, case) == [("export_customers", "deny"), ("search_kb", "allow")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("block_id", ["toolu_same", None])
def test_anthropic_blocks_sharing_an_id_are_decided_one_by_one(
    harness: Harness, ant: anthropic.Anthropic, stream: bool, block_id: str | None
) -> None:
    case = new_case()
    content = [
        wire.tool_use("search_kb", {"q": "x"}, block_id),
        wire.tool_use("export_customers", {"format": "csv"}, block_id),
    ]
    messages: Any = [{"role": "user", "content": case}]
    headers = case_headers(case)
    if stream:
        harness.answer(case, RawReply.sse(wire.anthropic_stream(content)))
        with ant.messages.stream(
            model=wire.CLAUDE, max_tokens=10, messages=messages, extra_headers=headers
        ) as s:
            blocks: Sequence[anthropic.types.ContentBlock] = s.get_final_message().content
    else:
        harness.answer(case, RawReply.json(wire.message_body(content)))
        blocks = ant.messages.create(
            model=wire.CLAUDE, max_tokens=10, messages=messages, extra_headers=headers
        ).content
    assert [getattr(b, "name", None) for b in blocks if b.type == "tool_use"] == ["search_kb"]
    assert verdicts(harness, case) == [("export_customers", "deny"), ("search_kb", "allow")]


# -- late deltas -----------------------------------------------------------------

_START0 = (
    "content_block_start",
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "toolu_r", "name": "issue_refund", "input": {}},
    },
)
_STOP0 = ("content_block_stop", {"type": "content_block_stop", "index": 0})
_TEXT1 = wire.block_events(1, {"type": "text", "text": "Done."})

LATE_ANTHROPIC: dict[str, list[wire.Event]] = {
    "after_another_block_starts": [
        wire.message_start(),
        _START0,
        wire.input_delta(0, '{"order_id": "A-1", "amount": 5'),
        _TEXT1[0],
        wire.input_delta(0, "000}"),
        _STOP0,
        *_TEXT1[1:],
        *wire.message_end(),
    ],
    "after_block_stop": [
        wire.message_start(),
        _START0,
        wire.input_delta(0, '{"order_id": "A-1", "amount": 5'),
        wire.input_delta(0, "}"),
        _STOP0,
        wire.input_delta(0, " "),
        *wire.message_end(),
    ],
    "after_message_delta": [
        wire.message_start(),
        _START0,
        wire.input_delta(0, '{"order_id": "A-1", "amount": 5'),
        wire.message_end()[0],
        wire.input_delta(0, "000}"),
        _STOP0,
        wire.message_end()[1],
    ],
}


@pytest.mark.parametrize("shape", sorted(LATE_ANTHROPIC))
def test_anthropic_late_input_delta_cuts_the_stream(
    harness: Harness, ant: anthropic.Anthropic, shape: str
) -> None:
    case = new_case()
    harness.answer(case, RawReply.sse(LATE_ANTHROPIC[shape]))
    received: list[Any] = []
    with (  # noqa: PT012 - the error comes while iterating
        pytest.raises(anthropic.APIError),
        ant.messages.stream(
            model=wire.CLAUDE,
            max_tokens=10,
            messages=[{"role": "user", "content": case}],
            extra_headers=case_headers(case),
        ) as s,
    ):
        for event in s:
            received.append(event)
    # Whatever input the agent had assembled is what was recorded for the call.
    recs = harness.audit.decisions(case)
    snapshots = [
        b.input
        for e in received
        if e.type == "content_block_stop"
        for b in [e.content_block]
        if b.type == "tool_use"
    ]
    for snap in snapshots:
        assert any(r["action"]["arguments"] == snap for r in recs)
    llm = harness.audit.wait_for(
        case,
        lambda rs: any(
            r.get("kind") == "outcome" and r["action"]["kind"] == "llm_call" for r in rs
        ),
    )
    outcomes = [r for r in llm if r.get("kind") == "outcome" and r["action"]["kind"] == "llm_call"]
    assert outcomes
    assert outcomes[0]["outcome"]["error"] == "upstream_stream_violation"


def test_chat_fragment_after_finish_cuts_the_stream(harness: Harness, oai: openai.OpenAI) -> None:
    case = new_case()
    events = wire.chat_stream(
        wire.chat_call_chunks(0, "issue_refund", '{"order_id": "A-1", "amount": 5}', "c1")
    )
    late = (None, wire.chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": " "}}]}))
    harness.answer(case, RawReply.sse([*events, late], done=True))
    with pytest.raises(openai.APIError):
        chat_final(oai, case)


def test_responses_delta_after_item_done_cuts_the_stream(
    harness: Harness, oai: openai.OpenAI
) -> None:
    case = new_case()
    item = wire.fn_item("issue_refund", {"order_id": "A-1", "amount": 5})
    events = wire.responses_stream([item])
    late = (
        "response.function_call_arguments.delta",
        {
            "type": "response.function_call_arguments.delta",
            "sequence_number": 99,
            "item_id": "fc_1",
            "output_index": 0,
            "delta": "000",
        },
    )
    harness.answer(case, RawReply.sse([*events[:-1], late, events[-1]]))
    with (  # noqa: PT012
        pytest.raises((openai.APIError, RuntimeError)),
        oai.responses.stream(model=wire.MODEL, input=case, extra_headers=case_headers(case)) as s,
    ):
        for _ in s:
            pass
        s.get_final_response()


# -- lenient JSON ----------------------------------------------------------------

LENIENT_ARGS = {
    "nan": '{"query": "x", "limit": NaN}',
    "infinity": '{"query": "x", "limit": -Infinity}',
    "1e400": '{"query": "x", "limit": 1e400}',
    "bigint": '{"query": "x", "limit": 123456789012345678901234567890}',
    "neg_bigint": '{"query": "x", "limit": -99999999999999999999999}',
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("literal", sorted(LENIENT_ARGS))
def test_lenient_arguments_are_recorded_as_the_sdk_reads_them(
    harness: Harness, oai: openai.OpenAI, literal: str, stream: bool
) -> None:
    case = new_case()
    text = LENIENT_ARGS[literal]
    if stream:
        events = wire.chat_stream(wire.chat_call_chunks(0, "search_kb", text, "c1"))
        harness.answer(case, RawReply.sse(events, done=True))
        completion = chat_final(oai, case)
    else:
        harness.answer(case, RawReply.json(wire.chat_body([wire.chat_call("search_kb", text)])))
        completion = chat_create(oai, case)
    calls = chat_calls(completion)
    recs = harness.audit.decisions(case)
    assert len(recs) == 1
    if calls:  # allowed: the record holds what the agent will execute
        ((_, arguments),) = calls
        assert recs[0]["decision"]["enforced"] == "allow"
        assert canonical(recs[0]["action"]["arguments"]) == canonical(json.loads(arguments))
    else:
        assert recs[0]["decision"]["enforced"] != "allow"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e400", "123456789012345678901234567890"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_lenient_literal_in_the_envelope_is_parsed_not_forwarded(
    harness: Harness, oai: openai.OpenAI, literal: str, stream: bool
) -> None:
    case = new_case()
    if stream:
        head = {
            "index": 0,
            "id": "c1",
            "type": "function",
            "function": {"name": "export_customers", "arguments": '{"format": "csv"}'},
        }
        chunk = json.dumps(wire.chat_chunk({"tool_calls": [head]}))
        chunk = chunk[:-1] + f', "x_score": {literal}}}'
        events = wire.chat_stream([(None, chunk)])
        harness.answer(case, RawReply.sse(events, done=True))
    else:
        body = json.dumps(wire.chat_body([wire.chat_call("export_customers", {"format": "csv"})]))
        body = body[:-1] + f', "x_score": {literal}}}'
        harness.answer(case, RawReply(body=body.encode(), content_type="application/json"))
    try:
        completion = chat_final(oai, case) if stream else chat_create(oai, case)
    except openai.APIError:
        completion = None  # cut with an error: nothing reached the agent
    if completion is not None:
        assert "export_customers" not in [n for n, _ in chat_calls(completion)]
        assert verdicts(harness, case) == [("export_customers", "deny")]


@pytest.mark.parametrize("literal", ["NaN", "1e400"])
def test_anthropic_lenient_literal_in_an_event_is_parsed_not_forwarded(
    harness: Harness, ant: anthropic.Anthropic, literal: str
) -> None:
    case = new_case()
    start = json.dumps(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {
                "type": "tool_use",
                "id": "t1",
                "name": "export_customers",
                "input": {},
            },
        }
    )
    start = start[:-1] + f', "x_score": {literal}}}'
    events = [
        wire.message_start(),
        ("content_block_start", start),
        wire.input_delta(0, '{"format": "csv"}'),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        *wire.message_end(),
    ]
    harness.answer(case, RawReply.sse(events))
    try:
        with ant.messages.stream(
            model=wire.CLAUDE,
            max_tokens=10,
            messages=[{"role": "user", "content": case}],
            extra_headers=case_headers(case),
        ) as s:
            blocks = s.get_final_message().content
    except anthropic.APIError:
        blocks = []
    assert not [b for b in blocks if getattr(b, "name", None) == "export_customers"]
