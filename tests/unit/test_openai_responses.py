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

from tests.unit.streams import as_read
from warden.errors import StreamViolation
from warden.model import ActionKind, Decision, Effect, Mode, ToolCall, ToolResult, Usage
from warden.protocols import openai_responses
from warden.protocols.base import Adapter, StreamItem, StreamRewriter, blocked_message
from warden.protocols.openai_responses import PASSIVE_ITEMS, OpenAIResponsesAdapter
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


def sdk_final(output: bytes, *, strict: bool = True) -> Response:
    """Read ``output`` as the SDK does and return the response it ends with.

    ``strict``: validate every event against its SDK type too (the SDK's own
    default only constructs them, loosely).
    """
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in SseParser().feed(output):
        data = json.loads(event.data)
        assert event.event == data["type"]
        loose = construct_type(type_=ResponseStreamEvent, value=data)
        assert not isinstance(loose, dict), data["type"]
        event_model: Any = type(loose).model_validate(data) if strict else loose  # type: ignore[attr-defined]
        state.handle_event(event_model)
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


def test_tool_calls_are_every_item_that_is_not_passive_keyed_by_position() -> None:
    calls = ADAPTER.tool_calls(load("responses_calls.json"))
    assert calls == [
        ToolCall(
            call_id="ws_68b0c4f5aa108196b1c2d3e4f5a6b7c8",
            name="web_search_call",
            raw_arguments='{"type":"search","query":"ledger retention policy"}',
            arguments={"type": "search", "query": "ledger retention policy"},
            index=0,
            key="o0",
            kind=ActionKind.HOSTED_TOOL_CALL,
            wire_type="web_search_call",
        ),
        ToolCall(
            call_id=DENIED_CALL_ID,
            name="delete_file",
            raw_arguments='{"path":"/srv/data/ledger-2024.db"}',
            arguments={"path": DENIED_PATH},
            index=2,
            key="o2",
            kind=ActionKind.TOOL_CALL,
            wire_type="function_call",
        ),
        ToolCall(
            call_id="call_Z9y8X7w6V5u4T3s2",
            name="get_weather",
            raw_arguments='{"city":"Paris"}',
            arguments={"city": "Paris"},
            index=3,
            key="o3",
            kind=ActionKind.TOOL_CALL,
            wire_type="function_call",
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
    out = ADAPTER.rewrite(body, {"o0": ALLOW, "o2": decision, "o3": ALLOW})

    assert body == before  # the input is untouched
    (_, denied, _) = ADAPTER.tool_calls(body)
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
    out = ADAPTER.rewrite(body, {"o0": ALLOW, "o2": ALLOW, "o3": ALLOW})
    assert out == body
    assert out is not body


def test_rewrite_observe_mode_lets_the_call_through() -> None:
    body = load("responses_calls.json")
    observed = Decision(
        decision_id="dec_2", effect=Effect.DENY, reasons=("x",), mode=Mode.OBSERVE, guard="policy"
    )
    out = ADAPTER.rewrite(body, {"o0": ALLOW, "o2": observed, "o3": ALLOW})
    assert out == body


def test_rewrite_without_a_decision_fails_closed() -> None:
    body = load("responses_calls.json")
    out = ADAPTER.rewrite(body, {"o3": ALLOW})
    assert [item["type"] for item in out["output"]] == [
        "message",
        "message",
        "message",
        "function_call",
    ]


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
    out = ADAPTER.rewrite(body, {"o0": ALLOW, "o2": held, "o3": held})
    assert [item["id"] for item in out["output"][2:]] == [
        "msg_warden_2_dec_3",
        "msg_warden_3_dec_3",
    ]
    assert "for human approval" in out["output"][2]["content"][0]["text"]
    parts = [item["content"][0]["text"] for item in out["output"][1:]]
    assert out["output_text"] == "".join(parts)
    assert body["output_text"] == "Cleaning up as requested."


def test_usage() -> None:
    # Its web_search_call is billed per call, beside the tokens.
    assert ADAPTER.usage(load("responses_calls.json")) == Usage(
        input_tokens=312,
        output_tokens=41,
        cached_input_tokens=128,
        hosted_calls=(("web_search", 1),),
    )
    assert ADAPTER.usage({"usage": {"input_tokens": 5, "output_tokens": 2}}) == Usage(5, 2, 0)
    assert ADAPTER.usage({"usage": None}) is None
    assert ADAPTER.usage({}) is None
    # Counts that are no counts (a negative one crashed the request): spent as held.
    assert ADAPTER.usage({"usage": {"input_tokens": 5, "output_tokens": -1_000_000}}) is None
    assert ADAPTER.usage({"usage": {"input_tokens": "5", "output_tokens": 2}}) is None
    assert ADAPTER.usage({"usage": {}}) is None


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
        assert as_read(out) == as_read(event)


def test_allowed_call_is_released_as_one_canonical_set_of_events() -> None:
    run = Run([raw(CALL)], allow_all)
    assert run.calls == [
        ToolCall(
            call_id=DENIED_CALL_ID,
            name="delete_file",
            raw_arguments='{"path":"/srv/data/ledger-2024.db"}',
            arguments={"path": DENIED_PATH},
            index=0,
            key="o0",
            kind=ActionKind.TOOL_CALL,
            wire_type="function_call",
        )
    ]
    assert_numbered(run)
    assert [p["type"] for p in run.payloads] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert run.payloads[2]["item"]["arguments"] == ""
    assert run.payloads[3]["delta"] == '{"path":"/srv/data/ledger-2024.db"}'
    final = sdk_final(run.output)
    (item,) = final.output
    assert item.type == "function_call"
    assert item.call_id == DENIED_CALL_ID
    assert item.arguments == '{"path":"/srv/data/ledger-2024.db"}'


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
    assert (final.output[1].id or "").startswith("msg_warden_1_dec")
    weather = final.output[2]
    assert weather.type == "function_call"
    assert weather.arguments == '{"city":"Paris"}'
    assert final.output_text == blocked_message(run.calls[0], deny())


def test_parallel_calls_second_denied() -> None:
    run = Run([raw(PARALLEL)], lambda call: deny() if call.name == "get_weather" else ALLOW)
    assert_numbered(run)
    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["reasoning", "function_call", "message"]
    assert (final.output[2].id or "").startswith("msg_warden_2_dec")


@pytest.mark.parametrize(("verdict", "last"), [(allow_all, "function_call"), (deny_all, "message")])
def test_text_then_call(verdict: Verdict, last: str) -> None:
    run = Run([raw(TEXT_THEN_CALL)], verdict)
    assert_numbered(run)
    assert len(run.calls) == 1
    final = sdk_final(run.output)
    assert [item.type for item in final.output] == ["message", last]
    assert final.output_text.startswith("Let me check the weather first.")
    if last == "function_call":
        assert final == sdk_final(raw(TEXT_THEN_CALL))


def test_observe_mode_stream_passes_through() -> None:
    observed = Decision(
        decision_id="dec_2", effect=Effect.DENY, reasons=("x",), mode=Mode.OBSERVE, guard="policy"
    )
    run = Run([raw(PARALLEL)], lambda call: observed)
    assert sdk_final(run.output) == sdk_final(raw(PARALLEL))


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
    assert (final.output[1].id or "").startswith("msg_warden_1_dec")


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


def test_keepalive_and_done_marker_pass_unknown_payloads_are_dropped() -> None:
    rewriter = ADAPTER.stream_rewriter()
    created = SseParser().feed(raw(TEXT))[0]
    keepalive = SseEvent(data='{"type":"keepalive","sequence_number":1}', event="keepalive")
    unknown = SseEvent(
        data='{"type":"response.future_thing","sequence_number":2,"item":{"type":"function_call"}}'
    )
    done = SseEvent(data="[DONE]")
    assert list(rewriter.feed(created)) == [created]
    (out,) = rewriter.feed(keepalive)
    assert as_read(out) == as_read(keepalive)
    assert list(rewriter.feed(unknown)) == []
    (out,) = rewriter.feed(done)
    assert out is done


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
    assert (final.output[0].id or "").startswith("msg_warden_0_dec")


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


# -- airtight: every call-bearing shape is decided -----------------------------

SAMPLES: dict[str, tuple[dict[str, Any], ActionKind, str, dict[str, Any]]] = {
    "function_call": (
        {
            "id": "fc_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        ActionKind.TOOL_CALL,
        "get_weather",
        {"city": "Paris"},
    ),
    "custom_tool_call": (
        {
            "id": "ctc_1",
            "type": "custom_tool_call",
            "call_id": "call_2",
            "name": "run_sql",
            "input": "DROP TABLE customers",
        },
        ActionKind.CUSTOM_TOOL_CALL,
        "run_sql",
        {"input": "DROP TABLE customers"},
    ),
    "local_shell_call": (
        {
            "id": "lsh_1",
            "type": "local_shell_call",
            "call_id": "call_3",
            "status": "completed",
            "action": {"type": "exec", "command": ["rm", "-rf", "/"], "env": {}},
        },
        ActionKind.SHELL_CALL,
        "local_shell_call",
        {"type": "exec", "command": ["rm", "-rf", "/"], "env": {}},
    ),
    "shell_call": (
        {
            "id": "sh_1",
            "type": "shell_call",
            "call_id": "call_4",
            "status": "completed",
            "action": {"commands": ["cat /etc/shadow"]},
        },
        ActionKind.SHELL_CALL,
        "shell_call",
        {"commands": ["cat /etc/shadow"]},
    ),
    "computer_call": (
        {
            "id": "cu_1",
            "type": "computer_call",
            "call_id": "call_5",
            "status": "completed",
            "pending_safety_checks": [],
            "action": {"type": "click", "button": "left", "x": 1, "y": 2},
        },
        ActionKind.COMPUTER_CALL,
        "computer_call",
        {"action": {"type": "click", "button": "left", "x": 1, "y": 2}},
    ),
    "apply_patch_call": (
        {
            "id": "ap_1",
            "type": "apply_patch_call",
            "call_id": "call_6",
            "status": "completed",
            "operation": {"type": "delete_file", "path": "/etc/passwd"},
        },
        ActionKind.APPLY_PATCH_CALL,
        "apply_patch_call",
        {"type": "delete_file", "path": "/etc/passwd"},
    ),
    "mcp_call": (
        {
            "id": "mcp_1",
            "type": "mcp_call",
            "name": "create_issue",
            "server_label": "github",
            "arguments": '{"title":"x"}',
        },
        ActionKind.MCP_CALL,
        "github.create_issue",
        {"title": "x"},
    ),
    "mcp_approval_request": (
        {
            "id": "mcpr_1",
            "type": "mcp_approval_request",
            "name": "delete_repo",
            "server_label": "github",
            "arguments": '{"repo":"x"}',
        },
        ActionKind.MCP_APPROVAL_REQUEST,
        "github.delete_repo",
        {"repo": "x"},
    ),
    "web_search_call": (
        {
            "id": "ws_1",
            "type": "web_search_call",
            "status": "completed",
            "action": {"type": "search", "query": "q"},
        },
        ActionKind.HOSTED_TOOL_CALL,
        "web_search_call",
        {"type": "search", "query": "q"},
    ),
    "file_search_call": (
        {"id": "fs_1", "type": "file_search_call", "status": "completed", "queries": ["q"]},
        ActionKind.HOSTED_TOOL_CALL,
        "file_search_call",
        {"queries": ["q"]},
    ),
    "code_interpreter_call": (
        {
            "id": "ci_1",
            "type": "code_interpreter_call",
            "status": "completed",
            "code": "print(1)",
            "container_id": "cntr_1",
        },
        ActionKind.HOSTED_TOOL_CALL,
        "code_interpreter_call",
        {"code": "print(1)", "container_id": "cntr_1"},
    ),
    "image_generation_call": (
        {"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": None},
        ActionKind.HOSTED_TOOL_CALL,
        "image_generation_call",
        {},
    ),
    "tool_search_call": (
        {
            "id": "ts_1",
            "type": "tool_search_call",
            "status": "completed",
            "execution": "client",
            "arguments": {"query": "x"},
        },
        ActionKind.HOSTED_TOOL_CALL,
        "tool_search_call",
        {"arguments": {"query": "x"}, "execution": "client"},
    ),
    "program": (
        {"id": "prg_1", "type": "program", "call_id": "call_7", "code": "x()", "fingerprint": "f"},
        ActionKind.HOSTED_TOOL_CALL,
        "program",
        {"code": "x()"},
    ),
}
TEXT_ITEM = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "hi", "annotations": []}],
}


def response_body(*items: Any) -> dict[str, Any]:
    body = load("responses_calls.json")
    body["output"] = list(items)
    return body


@pytest.mark.parametrize("wire_type", sorted(SAMPLES))
def test_every_call_type_is_decided_with_its_kind(wire_type: str) -> None:
    item, kind, name, arguments = SAMPLES[wire_type]
    body = response_body(TEXT_ITEM, item)
    (call,) = ADAPTER.tool_calls(body)
    assert (call.key, call.kind, call.wire_type, call.name) == ("o1", kind, wire_type, name)
    assert call.arguments == arguments

    out = ADAPTER.rewrite(body, {"o1": deny()})
    assert [i["type"] for i in out["output"]] == ["message", "message"]
    assert out["output"][0] is TEXT_ITEM
    assert item.get("id", "") not in json.dumps(out["output"])
    kept = ADAPTER.rewrite(body, {"o1": ALLOW})
    assert kept["output"][1] == item  # already canonical
    Response.model_validate(kept)


@pytest.mark.parametrize("wire_type", sorted(SAMPLES))
def test_every_call_type_is_held_in_a_stream_and_released_canonically(wire_type: str) -> None:
    item, _, name, arguments = SAMPLES[wire_type]
    data = stream_of(
        [
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
        ],
        output=[item],
    )
    denied = Run([data], deny_all)
    assert item["id"].encode() not in denied.output
    assert [i.type for i in sdk_final(denied.output).output] == ["message"]

    allowed = Run([data], allow_all)
    (call,) = allowed.calls
    assert (call.name, call.arguments) == (name, arguments)
    final = sdk_final(allowed.output)
    assert [i.model_dump(exclude_none=True, by_alias=True) for i in final.output] == [
        Response.model_validate(response_body(item))
        .output[0]
        .model_dump(exclude_none=True, by_alias=True)
    ]


@pytest.mark.parametrize("wire_type", sorted(PASSIVE_ITEMS))
def test_passive_items_are_not_calls(wire_type: str) -> None:
    item = {"id": "x_1", "type": wire_type, "call_id": "call_1", "output": "ok"}
    body = response_body(item)
    assert ADAPTER.tool_calls(body) == []
    assert ADAPTER.rewrite(body, {})["output"] == [item]


@pytest.mark.parametrize(
    "item",
    [
        {"type": "future_call", "id": "f1", "name": "wipe", "arguments": "{}"},
        {"id": "f1", "name": "wipe", "arguments": "{}"},
        {"type": 7, "id": "f1"},
        "function_call",
        None,
        ["function_call"],
    ],
)
def test_unknown_items_are_decided_and_removed_when_not_allowed(item: Any) -> None:
    body = response_body(item)
    (call,) = ADAPTER.tool_calls(body)
    assert call.kind is ActionKind.UNKNOWN_CALL
    assert call.key == "o0"
    if isinstance(item, dict):
        assert call.arguments == item  # the whole item is what a policy can allow
    else:
        assert call.arguments is None
    out = ADAPTER.rewrite(body, {})
    assert [i["type"] for i in out["output"]] == ["message"]
    assert "wipe" not in json.dumps(out)


def test_output_that_is_not_a_list_becomes_empty() -> None:
    body = response_body()
    body["output"] = {"0": SAMPLES["function_call"][0]}
    assert ADAPTER.tool_calls(body) == []
    assert ADAPTER.rewrite(body, {})["output"] == []


def test_calls_sharing_an_id_or_with_none_are_decided_one_by_one() -> None:
    safe = {**SAMPLES["function_call"][0], "name": "search_kb", "arguments": '{"q":"a"}'}
    bad = {**SAMPLES["function_call"][0], "name": "export_customers", "arguments": "{}"}
    nameless = {k: v for k, v in bad.items() if k not in ("id", "call_id")}
    body = response_body(safe, bad, nameless)
    calls = ADAPTER.tool_calls(body)
    assert [c.key for c in calls] == ["o0", "o1", "o2"]
    decisions = {c.key: deny() if c.name == "export_customers" else ALLOW for c in calls}
    out = ADAPTER.rewrite(body, decisions)
    assert [i["type"] for i in out["output"]] == ["function_call", "message", "message"]
    assert out["output"][0]["name"] == "search_kb"


def test_name_and_arguments_come_from_the_fields_the_sdk_dispatches_on() -> None:
    custom = {
        **SAMPLES["custom_tool_call"][0],
        "arguments": '{"query":"harmless"}',  # a decoy: the SDK runs ``input``
        "function": {"name": "search_kb"},
    }
    namespaced = {**SAMPLES["function_call"][0], "namespace": "billing", "name": "refund"}
    top_level = {**SAMPLES["function_call"][0], "namespace": "refund", "name": "refund"}
    calls = ADAPTER.tool_calls(response_body(custom, namespaced, top_level))
    assert calls[0].name == "run_sql"
    assert calls[0].arguments == {"input": "DROP TABLE customers"}
    assert calls[0].raw_arguments == "DROP TABLE customers"
    assert [c.name for c in calls[1:]] == ["billing.refund", "refund"]
    # Allowed, the decoys are gone: the agent gets the SDK type's fields only.
    out = ADAPTER.rewrite(response_body(custom), {"o0": ALLOW})
    assert out["output"][0] == SAMPLES["custom_tool_call"][0]


def test_computer_call_decides_batched_actions_too() -> None:
    item = {**SAMPLES["computer_call"][0], "actions": [{"type": "type", "text": "rm -rf /"}]}
    (call,) = ADAPTER.tool_calls(response_body(item))
    assert call.arguments is not None
    assert call.arguments["actions"] == [{"type": "type", "text": "rm -rf /"}]


@pytest.mark.parametrize(
    "arguments", ['{"a": NaN}', '{"a": Infinity}', '{"a": 1e400}', '{"a": 123456789012345678901}']
)
def test_arguments_a_policy_cannot_take_fail_closed(arguments: str) -> None:
    item = {**SAMPLES["function_call"][0], "arguments": arguments}
    (call,) = ADAPTER.tool_calls(response_body(item))
    assert call.arguments is None
    assert call.raw_arguments == arguments


def test_lenient_literals_in_object_fields_fail_closed() -> None:
    body = json.loads(
        '{"output":[{"type":"shell_call","id":"s","call_id":"c","status":"completed",'
        '"action":{"commands":["ls"],"timeout_ms":NaN}}]}'
    )
    (call,) = ADAPTER.tool_calls(body)
    assert call.kind is ActionKind.SHELL_CALL
    assert call.arguments is None


# -- airtight: streams ---------------------------------------------------------

CREATED: dict[str, Any] = {
    "type": "response.created",
    "response": {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-4.1",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "status": "in_progress",
    },
}


def stream_of(
    middle: list[dict[str, Any]], *, output: list[Any] | None, final: str = "response.completed"
) -> bytes:
    """A stream: created, ``middle``, then a terminal snapshot (``output``, or none)."""
    response = {**CREATED["response"], "status": "completed"}
    if output is not None:
        response["output"] = output
    else:
        del response["output"]
    payloads = [CREATED, *middle, {"type": final, "response": response}]
    return encode({**p, "sequence_number": n} for n, p in enumerate(payloads))


FC = SAMPLES["function_call"][0]
ADDED = {"type": "response.output_item.added", "output_index": 0, "item": {**FC, "arguments": ""}}
DELTA = {
    "type": "response.function_call_arguments.delta",
    "output_index": 0,
    "item_id": "fc_1",
    "delta": '{"city":"Paris"}',
}
DONE = {"type": "response.output_item.done", "output_index": 0, "item": FC}


def run_payloads(payloads: list[dict[str, Any]], verdict: Verdict = allow_all) -> Run:
    return Run([encode({**p, "sequence_number": n} for n, p in enumerate(payloads))], verdict)


@pytest.mark.parametrize(
    "late",
    [
        {**DELTA, "delta": '{"city":"Berlin"}'},
        {**DELTA, "type": "response.function_call_arguments.done", "arguments": "{}"},
        ADDED,
        DONE,
        {"type": "response.web_search_call.searching", "output_index": 0, "item_id": "fc_1"},
        {"type": "response.future_thing", "output_index": 0, "delta": "x"},
    ],
)
def test_any_event_touching_a_decided_call_is_a_violation(late: dict[str, Any]) -> None:
    with pytest.raises(StreamViolation):
        run_payloads([CREATED, ADDED, DELTA, DONE, late])


def test_a_violation_ends_the_stream_after_the_decided_call_only() -> None:
    rewriter = ADAPTER.stream_rewriter()
    sent: list[SseEvent] = []
    events = SseParser().feed(encode([CREATED, ADDED, DELTA, DONE, {**DELTA, "delta": "x"}]))

    def drive() -> None:
        for event in events:
            for item in rewriter.feed(event):
                if isinstance(item, ToolCall):
                    sent.extend(rewriter.resolve(item, ALLOW))
                else:
                    sent.append(item)

    with pytest.raises(StreamViolation):
        drive()
    deltas = [json.loads(e.data) for e in sent if "arguments.delta" in e.data]
    assert [d["delta"] for d in deltas] == ['{"city":"Paris"}']


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[1, 2]",
        "null",
        '{"sequence_number": 3}',
        '{"type": "response.output_item.added", "output_index": "0", "item": {}}',
        '{"type": "response.output_item.added", "output_index": 0, "item": "function_call"}',
        '{"type": "response.output_item.done", "output_index": 0, "item": null}',
        '{"type": "response.output_text.delta", "output_index": 5, "delta": "x"}',
        '{"type": "response.completed", "response": null}',
        '{"type": "response.completed", "response": {"output": {"a": 1}}}',
    ],
)
def test_events_the_sdk_cannot_read_end_the_stream(bad: str) -> None:
    rewriter = ADAPTER.stream_rewriter()
    list(rewriter.feed(SseParser().feed(encode([CREATED]))[0]))
    with pytest.raises(StreamViolation):
        list(rewriter.feed(SseEvent(data=bad)))


def test_a_call_event_aimed_at_a_text_item_is_a_violation() -> None:
    added = {"type": "response.output_item.added", "output_index": 0, "item": TEXT_ITEM}
    with pytest.raises(StreamViolation):
        run_payloads([CREATED, added, DELTA])
    with pytest.raises(StreamViolation):
        run_payloads([CREATED, added, DONE])


def test_added_as_a_call_and_done_as_text_is_a_violation() -> None:
    done = {"type": "response.output_item.done", "output_index": 0, "item": TEXT_ITEM}
    with pytest.raises(StreamViolation):
        run_payloads([CREATED, ADDED, done])


def test_lenient_literals_are_parsed_not_refused() -> None:
    """The SDK parses NaN and huge integers: so does Warden, and decides the call."""
    plain = stream_of([ADDED, DELTA, DONE], output=[FC])
    data = plain.replace(b'"item_id": "fc_1"', b'"extra": NaN, "n": 1e400, "item_id": "fc_1"')
    data = data.replace(b'"created_at": 1,', b'"created_at": 123456789012345678901234567890,')
    assert data.count(b"NaN") == 1
    assert b"12345678901234567890" in data
    run = Run([data], deny_all)
    assert len(run.calls) == 1
    assert b"Paris" not in run.output


def test_nan_arguments_in_a_stream_fail_closed() -> None:
    item = {**FC, "arguments": '{"amount": NaN}'}
    run = run_payloads(
        [CREATED, {**DONE, "item": item}],
        lambda call: ALLOW if call.arguments is not None else deny(),
    )
    assert run.calls[0].arguments is None
    assert b"NaN" not in run.output


def test_deltas_of_a_held_call_are_never_forwarded_and_the_done_item_decides() -> None:
    sneaky = {**DELTA, "delta": '{"city":"Berlin"}'}
    run = run_payloads([CREATED, ADDED, sneaky, DONE])
    assert b"Berlin" not in run.output
    (call,) = run.calls
    assert call.arguments == {"city": "Paris"}


def test_custom_tool_input_streams_as_one_canonical_delta() -> None:
    item = SAMPLES["custom_tool_call"][0]
    pieces = [
        {
            "type": "response.custom_tool_call_input.delta",
            "output_index": 0,
            "item_id": "ctc_1",
            "delta": part,
        }
        for part in ("DROP ", "TABLE ", "customers")
    ]
    added = {"type": "response.output_item.added", "output_index": 0, "item": {**item, "input": ""}}
    data = stream_of([added, *pieces], output=None)  # no done item: decided at the end
    run = Run([data], allow_all)
    (call,) = run.calls
    assert call.arguments == {"input": "DROP TABLE customers"}
    deltas = [p for p in run.payloads if p["type"] == "response.custom_tool_call_input.delta"]
    assert [d["delta"] for d in deltas] == ["DROP TABLE customers"]
    final = sdk_final(run.output, strict=False)
    assert final.output[0].type == "custom_tool_call"
    assert final.output[0].input == "DROP TABLE customers"


def test_a_terminal_snapshot_is_rewritten_from_the_decided_call() -> None:
    other = {**FC, "name": "export_customers", "arguments": '{"all":true}'}
    run = run_payloads([CREATED, ADDED, DELTA, DONE, stream_payload_final([other])])
    final = sdk_final(run.output)
    assert final.output[0].type == "function_call"
    assert final.output[0].name == "get_weather"
    assert b"export_customers" not in run.output


def stream_payload_final(output: list[Any]) -> dict[str, Any]:
    return {"type": "response.completed", "response": {**CREATED["response"], "output": output}}


def test_a_terminal_snapshot_without_output_keeps_the_decided_items() -> None:
    data = stream_of([ADDED, DELTA, DONE], output=None)
    final = sdk_final(Run([data], deny_all).output, strict=False)
    assert [i.type for i in final.output] == ["message"]


def test_calls_in_the_created_snapshot_are_decided_before_it_goes() -> None:
    created = {**CREATED, "response": {**CREATED["response"], "output": [FC]}}
    run = run_payloads([created, stream_payload_final([FC])], deny_all)
    assert [c.key for c in run.calls] == ["o0"]
    assert b"Paris" not in run.output
    assert run.payloads[0]["response"]["output"][0]["type"] == "message"
    with pytest.raises(StreamViolation):
        run_payloads([created, DELTA])


def test_done_marker_decides_held_calls_first_and_ends_the_stream() -> None:
    rewriter = ADAPTER.stream_rewriter()
    out: list[str] = []
    events = SseParser().feed(encode([CREATED, ADDED, DELTA]))
    events += [SseEvent(data="[DONE]"), SseParser().feed(encode([DONE]))[0]]
    for event in events:
        for item in rewriter.feed(event):
            if isinstance(item, ToolCall):
                out.extend(e.data for e in rewriter.resolve(item, deny()))
            else:
                out.append(item.data)
    assert out[-1] == "[DONE]"
    assert not any("Paris" in data for data in out)
    assert rewriter.complete is False


def test_an_unknown_item_in_a_stream_is_decided_as_such() -> None:
    item = {"id": "zz_1", "type": "teleport_call", "target": "prod"}
    run = run_payloads(
        [
            CREATED,
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
        ],
        lambda call: deny() if call.kind is ActionKind.UNKNOWN_CALL else ALLOW,
    )
    (call,) = run.calls
    assert call.kind is ActionKind.UNKNOWN_CALL
    assert call.name == "teleport_call"
    assert b"prod" not in run.output


def test_resolve_ignores_a_call_it_did_not_yield() -> None:
    rewriter = ADAPTER.stream_rewriter()
    stray = ToolCall(call_id="c", name="x", raw_arguments="{}", arguments={}, key="o0")
    assert rewriter.resolve(stray, ALLOW) == []


def test_results_of_every_call_type_are_read_and_named() -> None:
    body = {
        "model": "gpt-4.1",
        "input": [
            SAMPLES["custom_tool_call"][0],
            SAMPLES["local_shell_call"][0],
            {"type": "custom_tool_call_output", "call_id": "call_2", "output": "3 rows"},
            {"type": "local_shell_call_output", "id": "call_3", "output": "done"},
            {"type": "computer_call_output", "call_id": "call_9", "output": {"type": "x"}},
        ],
    }
    assert ADAPTER.parse_request(body).tool_results == (
        ToolResult(call_id="call_2", content="3 rows", tool="run_sql"),
        ToolResult(call_id="call_3", content="done", tool="local_shell_call"),
        ToolResult(call_id="call_9", content='{"type":"x"}', tool=None),
    )


def test_a_renumbered_event_with_a_lone_surrogate_can_still_be_sent() -> None:
    added = {"type": "response.output_item.added", "output_index": 0, "item": TEXT_ITEM}
    data = encode([{**CREATED, "sequence_number": 0}, {**added, "sequence_number": 1}])
    data += b'data: {"type":"response.output_text.delta","sequence_number":9,'
    data += b'"output_index":0,"item_id":"msg_1","content_index":0,"delta":"\\ud800"}\n\n'
    run = Run([data], allow_all, finish=False)
    assert run.payloads[-1]["sequence_number"] == 2
    assert run.payloads[-1]["delta"] == "\ud800"
    assert run.output.count(b"\\ud800") == 1


# -- outputs for calls kept from the agent (previous_response_id) -------------------


OWED = {
    "call_export": ("function_call", "[Warden] blocked the tool call `export`"),
    "call_patch": ("apply_patch_call", "[Warden] blocked the tool call `apply_patch`"),
    "call_screen": ("computer_call", "[Warden] blocked the tool call `computer`"),
}


def test_answer_refused_puts_an_output_for_each_owed_call_first() -> None:
    mine = {"type": "function_call_output", "call_id": "call_lookup", "output": "shipped"}
    body = {"model": "gpt-4.1", "previous_response_id": "resp_1", "input": [mine]}
    answered = openai_responses.answer_refused(body, OWED)
    assert answered is not None
    changed, count = answered
    assert count == 2
    assert changed["input"] == [
        {
            "type": "function_call_output",
            "call_id": "call_export",
            "output": OWED["call_export"][1],
        },
        {
            "type": "apply_patch_call_output",
            "call_id": "call_patch",
            "output": OWED["call_patch"][1],
            "status": "failed",
        },
        mine,
    ]
    assert body["input"] == [mine]  # the agent's body is not changed in place


@pytest.mark.parametrize(
    ("given", "rest"),
    [
        (None, []),
        ("and then?", [{"type": "message", "role": "user", "content": "and then?"}]),
    ],
)
def test_answer_refused_takes_every_input_shape(given: Any, rest: list[Any]) -> None:
    owed = {"call_export": OWED["call_export"]}
    answered = openai_responses.answer_refused({"input": given}, owed)
    assert answered is not None
    assert answered[0]["input"][1:] == rest


def test_answer_refused_leaves_calls_the_request_answers_and_types_text_cannot_answer() -> None:
    theirs = {"type": "function_call_output", "call_id": "call_export", "output": "x"}
    owed = {"call_export": OWED["call_export"], "call_screen": OWED["call_screen"]}
    assert openai_responses.answer_refused({"input": [theirs]}, owed) is None
    assert openai_responses.answer_refused({"input": 7}, owed) is None


def test_a_stream_bills_the_hosted_calls_it_showed_though_its_snapshot_carries_none() -> None:
    """The SDK builds a final answer from its done items, so a terminal snapshot may carry
    no ``output``: the hosted calls the stream showed are billed all the same."""
    searches: list[dict[str, Any]] = []
    for index in range(3):
        item = {"type": "web_search_call", "id": f"ws_{index}", "status": "completed"}
        searches += [
            {"type": "response.output_item.added", "output_index": index, "item": item},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]
    response = {**CREATED["response"], "status": "completed"}
    del response["output"]
    response["usage"] = {"input_tokens": 5, "output_tokens": 2}
    run = run_payloads([CREATED, *searches, {"type": "response.completed", "response": response}])
    assert run.rewriter.usage == Usage(5, 2, 0, hosted_calls=(("web_search", 3),))


def test_a_tier_that_is_no_name_is_counted_high_not_a_crash() -> None:
    assert ADAPTER.parse_request({"model": "m", "service_tier": []}).rate == 6.0
    usage = {"input_tokens": 5, "output_tokens": 2}
    answer = ADAPTER.usage({"usage": usage, "service_tier": {"x": 1}})
    assert answer is not None
    assert answer.rate == 6.0
