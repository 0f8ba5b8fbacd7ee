"""The OpenAI Responses adapter: bodies, and streams replayed from fixture bytes.

The fixtures in ``data/responses_*`` follow the API's wire format (event
order, field names, ``obfuscation`` padding, multi-byte text); they were
written by hand, not captured from the live API.

Rewritten streams are checked the way the official SDK reads them: every event
is parsed into its SDK type and fed through ``ResponseStreamState``, the
accumulator behind ``client.responses.stream()``, whose final response must
hold the expected items.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from warden.model import Decision, Effect, Mode, ToolCall, ToolResult, Usage
from warden.protocols.base import Adapter, StreamItem, StreamRewriter, blocked_message
from warden.protocols.openai_responses import OpenAIResponsesAdapter
from warden.protocols.sse import SseEvent, SseParser

DATA = Path(__file__).parent / "data"
ADAPTER = OpenAIResponsesAdapter()

TEXT = "responses_text.sse"
CALL = "responses_call.sse"
PARALLEL = "responses_parallel.sse"
TEXT_THEN_CALL = "responses_text_then_call.sse"
STREAMS = (TEXT, CALL, PARALLEL, TEXT_THEN_CALL)

DENIED_CALL_ID = "call_Kx7pQ2mN9vR4tY8w"
DENIED_PATH = "/srv/data/ledger-2024.db"

Verdict = Callable[[ToolCall], Decision]


def deny(reason: str = "over limit", decision_id: str = "dec_1") -> Decision:
    return Decision(
        decision_id=decision_id,
        effect=Effect.DENY,
        reasons=(reason,),
        mode=Mode.ENFORCE,
        guard="policy",
    )


ALLOW = Decision(
    decision_id="dec_ok", effect=Effect.ALLOW, reasons=("fine",), mode=Mode.ENFORCE, guard="policy"
)


def allow_all(call: ToolCall) -> Decision:
    return ALLOW


def deny_all(call: ToolCall) -> Decision:
    return deny()


def deny_delete(call: ToolCall) -> Decision:
    return deny() if call.name == "delete_file" else ALLOW


def raw(name: str) -> bytes:
    return (DATA / name).read_bytes()


def load(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((DATA / name).read_text())
    return body


class Run:
    """One rewritten stream: output bytes, the calls decided, the rewriter."""

    def __init__(self, chunks: Iterable[bytes], verdict: Verdict, *, finish: bool = True) -> None:
        self.rewriter = ADAPTER.stream_rewriter()
        self.calls: list[ToolCall] = []
        self.events: list[SseEvent] = []
        parser = SseParser()
        for chunk in chunks:
            for event in parser.feed(chunk):
                self._drain(self.rewriter.feed(event), verdict)
        if finish:
            self._drain(self.rewriter.finish(), verdict)

    def _drain(self, items: Iterator[StreamItem], verdict: Verdict) -> None:
        for item in items:
            if isinstance(item, ToolCall):
                self.calls.append(item)
                self.events.extend(self.rewriter.resolve(item, verdict(item)))
            else:
                self.events.append(item)

    @property
    def output(self) -> bytes:
        return b"".join(event.encode() for event in self.events)

    @property
    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(event.data) for event in self.events]


def sdk_final(output: bytes) -> Response:
    """Read ``output`` as the SDK does and return the response it ends with."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in SseParser().feed(output):
        data = json.loads(event.data)
        assert event.event == data["type"]
        loose = construct_type(type_=ResponseStreamEvent, value=data)
        assert not isinstance(loose, dict), data["type"]
        state.handle_event(type(loose).model_validate(data))  # type: ignore[attr-defined]
    final = state._completed_response
    assert final is not None
    return final


def assert_numbered(run: Run) -> None:
    numbers = [payload["sequence_number"] for payload in run.payloads]
    assert numbers == list(range(len(numbers)))


def assert_nothing_of_denied_call(run: Run) -> None:
    """The denied call's id and arguments are gone; its name only in the explanation.

    (The name also stays in the echoed ``tools`` definitions, which are the
    agent's own request, not the call.)
    """
    output = run.output
    assert DENIED_CALL_ID.encode() not in output
    assert DENIED_PATH.encode() not in output
    assert b"ledger" not in output
    for payload in run.payloads:
        if isinstance(payload.get("response"), dict):
            payload["response"].pop("tools", None)
        text = json.dumps(payload, ensure_ascii=False)
        assert text.count("delete_file") == text.count("`delete_file`")


# -- the adapter as the rest of Warden sees it ---------------------------------


def test_satisfies_the_adapter_protocols() -> None:
    adapter: Adapter = ADAPTER
    rewriter: StreamRewriter = adapter.stream_rewriter()
    assert adapter.name == "openai.responses"
    assert rewriter.complete is False
    assert rewriter.usage is None
    assert rewriter.model is None


# -- requests -------------------------------------------------------------------


def test_parse_request_reads_results_and_names_them_from_their_calls() -> None:
    parsed = ADAPTER.parse_request(load("responses_request.json"))
    assert parsed.model == "gpt-4.1"
    assert parsed.stream is True
    assert parsed.tool_results == (
        ToolResult(call_id=DENIED_CALL_ID, content="deleted", tool="delete_file"),
        ToolResult(
            call_id="call_Z9y8X7w6V5u4T3s2",
            content="21 °C, clear\n[input_image]",
            tool="get_weather",
        ),
        ToolResult(call_id="call_from_earlier_turn", content="ok", tool=None),
    )


def test_parse_request_takes_the_name_an_output_item_carries() -> None:
    body = {
        "model": "gpt-4.1",
        "input": [
            {"type": "function_call_output", "call_id": "call_1", "output": "x", "name": "lookup"}
        ],
    }
    (result,) = ADAPTER.parse_request(body).tool_results
    assert result.tool == "lookup"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4.1", "input": "What is the weather in Paris?"},
        {"model": "gpt-4.1", "input": [{"role": "user", "content": "hi"}]},
        {"model": "gpt-4.1"},
    ],
)
def test_parse_request_without_results(body: dict[str, Any]) -> None:
    parsed = ADAPTER.parse_request(body)
    assert parsed.model == "gpt-4.1"
    assert parsed.stream is False
    assert parsed.tool_results == ()


def test_parse_request_tolerates_odd_shapes() -> None:
    parsed = ADAPTER.parse_request({"model": 3, "stream": "yes", "input": [None, 7, "x"]})
    assert parsed.model is None
    assert parsed.stream is False
    assert parsed.tool_results == ()


# -- non-streaming responses ----------------------------------------------------


def test_tool_calls_are_the_function_call_items_named_by_call_id() -> None:
    calls = ADAPTER.tool_calls(load("responses_calls.json"))
    assert calls == [
        ToolCall(
            call_id=DENIED_CALL_ID,
            name="delete_file",
            raw_arguments='{"path":"/srv/data/ledger-2024.db"}',
            arguments={"path": DENIED_PATH},
            index=2,
        ),
        ToolCall(
            call_id="call_Z9y8X7w6V5u4T3s2",
            name="get_weather",
            raw_arguments='{"city":"Paris"}',
            arguments={"city": "Paris"},
            index=3,
        ),
    ]


@pytest.mark.parametrize(
    "arguments",
    ['{"path": "/tmp"', "[1, 2]", '"text"', "", "null", '{"a": NaN}', '{"a": 1, "a": 2}', 42, None],
)
def test_malformed_arguments_become_none(arguments: object) -> None:
    item: dict[str, Any] = {"type": "function_call", "call_id": "call_1", "name": "f"}
    if arguments is not None:
        item["arguments"] = arguments
    (call,) = ADAPTER.tool_calls({"output": [item]})
    assert call.arguments is None
    assert call.call_id == "call_1"


def test_object_arguments_from_compatible_servers() -> None:
    item = {"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}
    (call,) = ADAPTER.tool_calls({"output": [item]})
    assert call.arguments == {"a": 1}
    assert call.raw_arguments == '{"a":1}'


def test_tool_calls_of_bodies_without_output() -> None:
    assert ADAPTER.tool_calls({}) == []
    assert ADAPTER.tool_calls({"output": None}) == []


def test_rewrite_replaces_a_denied_call_in_place() -> None:
    body = load("responses_calls.json")
    before = copy.deepcopy(body)
    decision = deny()
    out = ADAPTER.rewrite(body, {DENIED_CALL_ID: decision, "call_Z9y8X7w6V5u4T3s2": ALLOW})

    assert body == before  # the input is untouched
    (denied, _) = ADAPTER.tool_calls(body)
    text = blocked_message(denied, decision)
    assert [item.get("type") for item in out["output"]] == [
        "web_search_call",
        "message",
        "message",
        "function_call",
    ]
    assert out["output"][2] == {
        "id": "msg_warden_2_dec_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    assert out["output"][:2] == body["output"][:2]
    assert out["output"][3] == body["output"][3]
    assert {k: v for k, v in out.items() if k != "output"} == {
        k: v for k, v in body.items() if k != "output"
    }

    response = Response.model_validate(out)
    assert response.output_text == "Cleaning up as requested." + text
    assert "dec_1" in text
    assert "over limit" in text
    assert DENIED_PATH not in json.dumps(out)
    assert DENIED_CALL_ID not in json.dumps(out)


def test_rewrite_all_allowed_keeps_the_body() -> None:
    body = load("responses_calls.json")
    out = ADAPTER.rewrite(body, {DENIED_CALL_ID: ALLOW, "call_Z9y8X7w6V5u4T3s2": ALLOW})
    assert out == body
    assert out is not body


def test_rewrite_observe_mode_lets_the_call_through() -> None:
    body = load("responses_calls.json")
    observed = Decision(
        decision_id="dec_2", effect=Effect.DENY, reasons=("x",), mode=Mode.OBSERVE, guard="policy"
    )
    out = ADAPTER.rewrite(body, {DENIED_CALL_ID: observed, "call_Z9y8X7w6V5u4T3s2": ALLOW})
    assert out == body


def test_rewrite_without_a_decision_fails_closed() -> None:
    body = load("responses_calls.json")
    out = ADAPTER.rewrite(body, {"call_Z9y8X7w6V5u4T3s2": ALLOW})
    assert out["output"][2]["type"] == "message"
    assert out["output"][3]["type"] == "function_call"


def test_rewrite_explains_a_held_call_and_updates_output_text() -> None:
    body = load("responses_calls.json")
    body["output_text"] = "Cleaning up as requested."
    held = Decision(
        decision_id="dec_3",
        effect=Effect.REQUIRE_APPROVAL,
        reasons=("needs a human",),
        mode=Mode.ENFORCE,
        guard="approval",
    )
    out = ADAPTER.rewrite(body, {DENIED_CALL_ID: held, "call_Z9y8X7w6V5u4T3s2": held})
    assert [item["id"] for item in out["output"][2:]] == [
        "msg_warden_2_dec_3",
        "msg_warden_3_dec_3",
    ]
    assert "for human approval" in out["output"][2]["content"][0]["text"]
    parts = [item["content"][0]["text"] for item in out["output"][1:]]
    assert out["output_text"] == "".join(parts)
    assert body["output_text"] == "Cleaning up as requested."


def test_usage() -> None:
    assert ADAPTER.usage(load("responses_calls.json")) == Usage(
        input_tokens=312, output_tokens=41, cached_input_tokens=128
    )
    assert ADAPTER.usage({"usage": {"input_tokens": 5, "output_tokens": 2}}) == Usage(5, 2, 0)
    assert ADAPTER.usage({"usage": None}) is None
    assert ADAPTER.usage({}) is None


# -- streams ----------------------------------------------------------------------


def test_text_stream_passes_through_unchanged() -> None:
    data = raw(TEXT)
    run = Run([data], deny_all)
    assert run.output == data
    assert run.calls == []
    assert run.rewriter.complete is True
    assert run.rewriter.model == "gpt-4.1-2025-04-14"
    assert run.rewriter.usage == Usage(input_tokens=312, output_tokens=41, cached_input_tokens=128)
    final = sdk_final(run.output)
    assert final.output_text == "Bonjour — ça va ? Il fait 21 °C à Paris 👋"


def test_text_events_are_the_objects_fed_in() -> None:
    rewriter = ADAPTER.stream_rewriter()
    for event in SseParser().feed(raw(TEXT)):
        (out,) = rewriter.feed(event)
        assert out is event


def test_allowed_call_is_released_verbatim() -> None:
    data = raw(CALL)
    run = Run([data], allow_all)
    assert run.output == data
    assert run.calls == [
        ToolCall(
            call_id=DENIED_CALL_ID,
            name="delete_file",
            raw_arguments='{"path":"/srv/data/ledger-2024.db"}',
            arguments={"path": DENIED_PATH},
            index=0,
        )
    ]
    final = sdk_final(run.output)
    (item,) = final.output
    assert item.type == "function_call"
    assert item.call_id == DENIED_CALL_ID


def test_nothing_of_a_call_is_sent_before_it_is_decided() -> None:
    rewriter = ADAPTER.stream_rewriter()
    sent: list[str] = []
    for event in SseParser().feed(raw(CALL)):
        for item in rewriter.feed(event):
            if isinstance(item, ToolCall):
                assert not any(DENIED_PATH in s or DENIED_CALL_ID in s for s in sent)
                sent.extend(e.data for e in rewriter.resolve(item, deny()))
            else:
                sent.append(item.data)


def test_denied_call_becomes_a_message_at_the_same_index() -> None:
    run = Run([raw(CALL)], deny_all)
    assert_numbered(run)
    assert_nothing_of_denied_call(run)
    text = blocked_message(run.calls[0], deny())
    types = [payload["type"] for payload in run.payloads]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert {p.get("output_index") for p in run.payloads[2:8]} == {0}
    assert run.payloads[4]["delta"] == text

    final = sdk_final(run.output)
    (item,) = final.output
    assert item.type == "message"
    assert item.id.startswith("msg_warden_0_dec")
    assert item.status == "completed"
    assert final.output_text == text
    assert final.usage is not None
    assert run.rewriter.complete is True


def test_parallel_calls_first_denied() -> None:
    run = Run([raw(PARALLEL)], deny_delete)
    assert [call.name for call in run.calls] == ["delete_file", "get_weather"]
    assert [call.index for call in run.calls] == [1, 2]
    assert_numbered(run)
    assert_nothing_of_denied_call(run)

    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[1].id.startswith("msg_warden_1_dec")
    weather = final.output[2]
    assert weather.type == "function_call"
    assert weather.arguments == '{"city":"Paris"}'
    assert final.output_text == blocked_message(run.calls[0], deny())


def test_parallel_calls_second_denied() -> None:
    run = Run([raw(PARALLEL)], lambda call: deny() if call.name == "get_weather" else ALLOW)
    assert_numbered(run)
    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["reasoning", "function_call", "message"]
    assert final.output[2].id.startswith("msg_warden_2_dec")


@pytest.mark.parametrize(("verdict", "last"), [(allow_all, "function_call"), (deny_all, "message")])
def test_text_then_call(verdict: Verdict, last: str) -> None:
    run = Run([raw(TEXT_THEN_CALL)], verdict)
    assert_numbered(run)
    assert len(run.calls) == 1
    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["message", last]
    assert final.output_text.startswith("Let me check the weather first.")
    if last == "function_call":
        assert run.output == raw(TEXT_THEN_CALL)


def test_observe_mode_stream_passes_through() -> None:
    observed = Decision(
        decision_id="dec_2", effect=Effect.DENY, reasons=("x",), mode=Mode.OBSERVE, guard="policy"
    )
    run = Run([raw(PARALLEL)], lambda call: observed)
    assert run.output == raw(PARALLEL)


# -- chunking ----------------------------------------------------------------------

VERDICTS: dict[str, Verdict] = {TEXT: deny_all, CALL: deny_all, PARALLEL: deny_delete}
VERDICTS[TEXT_THEN_CALL] = allow_all


@pytest.mark.parametrize("name", STREAMS)
def test_every_two_chunk_split_gives_the_same_output(name: str) -> None:
    data = raw(name)
    verdict = VERDICTS[name]
    expected = Run([data], verdict).output
    for cut in range(1, len(data)):
        assert Run([data[:cut], data[cut:]], verdict).output == expected, cut


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("verdict", [allow_all, deny_all, deny_delete])
def test_random_splits_give_the_same_output(name: str, verdict: Verdict) -> None:
    data = raw(name)
    expected = Run([data], verdict).output
    rng = random.Random(f"{name}-{verdict.__name__}")
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(2, 40)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert Run(chunks, verdict).output == expected, cuts
    # and one byte at a time
    assert Run([data[i : i + 1] for i in range(len(data))], verdict).output == expected


# -- truncation and unusual streams --------------------------------------------


def events_of(name: str) -> list[dict[str, Any]]:
    return [json.loads(event.data) for event in SseParser().feed(raw(name))]


def encode(payloads: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(
        SseEvent(data=json.dumps(p, ensure_ascii=False), event=p["type"]).encode() for p in payloads
    )


def test_truncated_stream_yields_held_call_at_finish() -> None:
    payloads = events_of(CALL)
    cut = [p for p in payloads if p["type"] == "response.function_call_arguments.delta"][2]
    data = encode(payloads[: payloads.index(cut) + 1])

    run = Run([data], deny_all, finish=False)
    assert run.calls == []
    assert run.rewriter.complete is False
    assert [p["type"] for p in run.payloads] == ["response.created", "response.in_progress"]

    held = list(run.rewriter.finish())
    (call,) = held
    assert isinstance(call, ToolCall)
    assert call.call_id == DENIED_CALL_ID
    assert call.name == "delete_file"
    assert call.raw_arguments == '{"path":"'
    assert call.arguments is None
    replacement = run.rewriter.resolve(call, deny())
    assert [json.loads(e.data)["type"] for e in replacement][0] == "response.output_item.added"
    assert not any(DENIED_PATH in e.data for e in replacement)
    assert list(run.rewriter.finish()) == []


def test_truncated_after_arguments_done_uses_the_final_arguments() -> None:
    payloads = events_of(CALL)
    done = next(p for p in payloads if p["type"] == "response.function_call_arguments.done")
    run = Run([encode(payloads[: payloads.index(done) + 1])], allow_all)
    (call,) = run.calls
    assert call.arguments == {"path": DENIED_PATH}
    assert run.rewriter.complete is False
    assert_numbered(run)


def test_incomplete_response_decides_the_unfinished_call_first() -> None:
    payloads = events_of(CALL)
    final = payloads[-1]
    final["type"] = "response.incomplete"
    final["response"]["status"] = "incomplete"
    final["response"]["incomplete_details"] = {"reason": "max_output_tokens"}
    partial = {**final["response"]["output"][0], "status": "incomplete", "arguments": '{"path":"'}
    final["response"]["output"] = [partial]
    deltas = [p for p in payloads if p["type"] == "response.function_call_arguments.delta"]
    kept = payloads[: payloads.index(deltas[2]) + 1] + [final]

    rewriter = ADAPTER.stream_rewriter()
    order: list[str] = []
    for event in SseParser().feed(encode(kept)):
        for item in rewriter.feed(event):
            if isinstance(item, ToolCall):
                order.append("call")
                assert item.arguments is None
                order.extend(json.loads(e.data)["type"] for e in rewriter.resolve(item, deny()))
            else:
                order.append(json.loads(item.data)["type"])
    assert order[2:] == [
        "call",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert list(rewriter.finish()) == []
    assert rewriter.complete is True
    assert rewriter.usage == Usage(312, 41, 128)


@pytest.mark.parametrize("kind", ["response.failed", "response.incomplete"])
def test_other_terminal_events_complete_the_stream(kind: str) -> None:
    payloads = events_of(TEXT)
    payloads[-1]["type"] = kind
    run = Run([encode(payloads)], deny_all)
    assert run.rewriter.complete is True


def test_call_only_in_the_final_snapshot_is_decided_before_it() -> None:
    payloads = events_of(TEXT)
    call_item = {
        "id": "fc_x",
        "type": "function_call",
        "status": "completed",
        "arguments": '{"path":"/srv/data/ledger-2024.db"}',
        "call_id": DENIED_CALL_ID,
        "name": "delete_file",
    }
    payloads[-1]["response"]["output"].append(call_item)
    run = Run([encode(payloads)], deny_all)
    (call,) = run.calls
    assert call.index == 1
    assert_nothing_of_denied_call(run)
    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["message", "message"]
    assert final.output[1].id.startswith("msg_warden_1_dec")


def test_release_sends_the_arguments_that_were_decided() -> None:
    """Deltas that disagree with the finished item are replaced by the decided ones."""
    payloads = events_of(CALL)
    for p in payloads:
        if p["type"] == "response.function_call_arguments.delta":
            p["delta"] = p["delta"].replace("ledger", "LEDGER")
    run = Run([encode(payloads)], allow_all)
    assert b"LEDGER" not in run.output
    assert_numbered(run)
    deltas = [p["delta"] for p in run.payloads if p["type"].endswith("arguments.delta")]
    assert deltas == ['{"path":"/srv/data/ledger-2024.db"}']
    final = sdk_final(run.output)
    assert final.output[0].type == "function_call"
    assert final.output[0].arguments == '{"path":"/srv/data/ledger-2024.db"}'


def test_final_snapshot_states_the_decided_arguments() -> None:
    payloads = events_of(CALL)
    payloads[-1]["response"]["output"][0]["arguments"] = '{"path":"/"}'
    run = Run([encode(payloads)], allow_all)
    final = run.payloads[-1]["response"]["output"][0]
    assert final["arguments"] == '{"path":"/srv/data/ledger-2024.db"}'


def test_unknown_and_non_json_events_pass_through() -> None:
    rewriter = ADAPTER.stream_rewriter()
    created = SseParser().feed(raw(TEXT))[0]
    unknown = SseEvent(data='{"type":"response.future_thing","sequence_number":1}', event=None)
    comment = SseEvent(data="[DONE]")
    assert list(rewriter.feed(created)) == [created]
    (out,) = rewriter.feed(unknown)
    assert out is unknown
    (out,) = rewriter.feed(comment)
    assert out is comment


def test_events_of_other_items_interleaved_with_a_held_call() -> None:
    """A text item streamed while a call is open is sent at once; numbers stay ordered."""
    call_events = events_of(CALL)
    text_events = events_of(TEXT)
    head, call_body, tail = call_events[:2], call_events[2:-1], call_events[-1]
    text_body = text_events[2:-1]
    for p in text_body:
        p["output_index"] = 1
    mixed = head + call_body[:3] + text_body + call_body[3:]
    tail["response"]["output"].append(text_events[-1]["response"]["output"][0])
    for n, p in enumerate([*mixed, tail]):
        p["sequence_number"] = n

    run = Run([encode([*mixed, tail])], deny_all)
    assert_numbered(run)
    assert_nothing_of_denied_call(run)
    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["message", "message"]
    assert final.output[0].id.startswith("msg_warden_0_dec")


def test_numbering_follows_an_upstream_that_does_not_start_at_zero() -> None:
    payloads = events_of(CALL)
    for p in payloads:
        p["sequence_number"] += 7
    run = Run([encode(payloads)], deny_all)
    numbers = [p["sequence_number"] for p in run.payloads]
    assert numbers == list(range(7, 7 + len(numbers)))


def test_snapshot_mid_stream_never_shows_an_undecided_call() -> None:
    payloads = events_of(CALL)
    snapshot = copy.deepcopy(payloads[1])
    snapshot["response"]["output"] = [payloads[-1]["response"]["output"][0]]
    run = Run([encode([payloads[0], snapshot])], allow_all, finish=False)
    assert run.payloads[1]["response"]["output"] == []
