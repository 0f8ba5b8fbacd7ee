"""Property tests: no generated Anthropic response gets an undecided call past Warden.

Responses are generated with every block type (known calls, passive blocks,
unknown types, non-objects), colliding and missing ids, decoy fields, inputs
holding NaN, Infinity, ``1e400`` and integers past 64 bits; streams add calls
inside ``message_start``, random chunk boundaries, late deltas, repeated
starts, unnamed, unknown and unparseable events, and truncation. Whatever
Warden sends is parsed the way the official SDK parses it
(``construct_type`` and the stream accumulator ``accumulate_event``), and:

(a) no call the rule denied is in what the SDK parsed;
(b) every call the SDK parsed was decided exactly once, and its decided
    arguments equal the parsed input;
(c) nothing of a call is sent before its decision.

A stream cut by :class:`StreamViolation` counts as blocked: what was sent
before the violation is still checked.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx2
from anthropic._models import BaseModel, construct_type
from anthropic.lib.streaming._beta_messages import accumulate_event as beta_accumulate_event
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.beta import BetaRawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.streams import ALLOW, DENY
from warden.errors import StreamViolation
from warden.model import ActionKind, Decision, ToolCall
from warden.protocols._wire import loads
from warden.protocols.anthropic import CALL_BLOCKS, PASSIVE_BLOCKS, AnthropicMessagesAdapter
from warden.protocols.sse import SseEvent, SseParser

ADAPTER = AnthropicMessagesAdapter()
NAMES = ["search_kb", "refund", "danger_export", "danger_shell"]
UNKNOWN_TYPES = ["tool_call", "function_call", "Tool_use", "computer_call", "tool_use "]
PASSIVE_GENERATED = ["text", "thinking", "web_search_tool_result", "mcp_tool_result"]


def rule(call: ToolCall) -> Decision:
    """Deny tools named ``danger*``, unknown kinds and arguments that are not an object."""
    if call.kind is ActionKind.UNKNOWN_CALL or call.arguments is None:
        return DENY
    return DENY if call.name.startswith("danger") else ALLOW


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# --- generated responses -------------------------------------------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from(["amount", "q", "to", "cmd"]) | st.text(max_size=4)
inputs = st.one_of(
    st.dictionaries(keys, values, max_size=4),
    st.dictionaries(keys, values, max_size=4),
    st.dictionaries(keys, values, max_size=4),
    st.lists(values, max_size=2),
    st.text(max_size=5),
)
ids = st.sampled_from(["toolu_same", "toolu_same", "", "toolu_b", None])


@st.composite
def blocks(draw: st.DrawFn, *, objects_only: bool = False) -> Any:
    kind = draw(st.sampled_from([*PASSIVE_GENERATED, *CALL_BLOCKS, "unknown", "junk"]))
    if kind == "junk":
        return (
            {"type": "text", "text": "x"} if objects_only else draw(st.sampled_from([None, 3, "x"]))
        )
    decoy: dict[str, Any] = {}
    if draw(st.booleans()):
        decoy = {
            "name": draw(st.sampled_from(NAMES)),
            "function": {"name": "danger_export", "arguments": "{}"},
            "arguments": {"amount": 5000},
        }
    if kind == "text":
        return {"type": "text", "text": draw(st.text(max_size=12)), **decoy}
    if kind == "thinking":
        return {
            "type": "thinking",
            "thinking": draw(st.text(max_size=8)),
            "signature": "s",
            **decoy,
        }
    if kind in PASSIVE_BLOCKS:
        return {"type": kind, "tool_use_id": "toolu_same", "content": [], **decoy}
    block: dict[str, Any] = {
        **{k: v for k, v in decoy.items() if k != "name"},
        "type": draw(st.sampled_from(UNKNOWN_TYPES)) if kind == "unknown" else kind,
        "name": draw(st.sampled_from(NAMES)),
        "input": draw(inputs),
    }
    call_id = draw(ids)
    if call_id is not None:
        block["id"] = call_id
    if kind == "mcp_tool_use":
        block["server_name"] = "crm"
    if draw(st.booleans()):
        block["caller"] = {"type": "direct"}
    return block


def message(content: list[Any]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }


def json_text(value: Any, draw: Any) -> str:
    """JSON as a lenient server writes it: spaces or not, ``1e400`` for an infinity.

    ``draw`` is a composite's draw function or ``st.DataObject.draw``.
    """
    text = json.dumps(value, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    if draw(st.booleans()):
        text = text.replace("-Infinity", "-1e400").replace("Infinity", "1e400")
    return text


def is_call(block: Any) -> bool:
    return not (isinstance(block, dict) and block.get("type") in PASSIVE_BLOCKS)


# --- what the SDK parses, and the invariants -----------------------------------------------


def check_parsed(
    content: list[Any], decided: Mapping[str, list[tuple[ToolCall, Decision]]]
) -> None:
    """(a) and (b) over the content blocks the SDK parsed."""
    for key, entries in decided.items():
        assert len(entries) == 1, f"{key} decided {len(entries)} times"
    for position, block in enumerate(content):
        block_type = getattr(block, "type", None) if isinstance(block, BaseModel) else None
        if block_type in PASSIVE_BLOCKS:
            continue
        found = decided.get(f"b{position}")
        assert found, f"block {position} ({block_type}) reached the SDK undecided"
        [(call, decision)] = found
        assert decision is ALLOW, f"block {position} was not allowed"
        assert isinstance(block, BaseModel)
        assert not call.name.startswith("danger")
        assert call.arguments is not None
        if block_type in CALL_BLOCKS:
            assert (block_type, getattr(block, "name", None)) == (call.wire_type, call.name)
            assert getattr(block, "id", None) == call.call_id
            assert canonical(getattr(block, "input", None)) == canonical(call.arguments)
        else:
            assert canonical(block.to_dict()) == canonical(call.arguments)
        dumped = canonical(block.to_dict())
        assert "danger" not in dumped.replace(canonical(call.arguments), "")


@settings(max_examples=900, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bodies(data: st.DataObject) -> None:
    content = data.draw(st.lists(blocks(), max_size=6))
    body = loads(json_text(message(content), data.draw))  # as the ingress reads it
    calls = ADAPTER.tool_calls(body)
    decided: dict[str, list[tuple[ToolCall, Decision]]] = {}
    for call in calls:
        decided.setdefault(call.key, []).append((call, rule(call)))
    assert {call.key for call in calls} == {
        f"b{i}" for i, block in enumerate(body["content"]) if is_call(block)
    }
    out = ADAPTER.rewrite(body, {key: entries[0][1] for key, entries in decided.items()})
    parsed = construct_type(type_=Message, value=json.loads(json.dumps(out)))
    assert isinstance(parsed, Message)
    check_parsed(parsed.content, decided)


# --- streams ---------------------------------------------------------------------------------


def ev(name: str, **payload: Any) -> SseEvent:
    return SseEvent(data=json.dumps({"type": name, **payload}), event=name)


@dataclass
class Stream:
    """A generated stream: its events and the positions that hold a call."""

    events: list[SseEvent] = field(default_factory=list)
    calls: set[int] = field(default_factory=set)
    in_start: int = 0


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    content = draw(st.lists(blocks(objects_only=True), max_size=5))
    in_start = draw(st.integers(0, min(2, len(content))))
    stream = Stream(in_start=in_start)
    stream.calls = {i for i, block in enumerate(content) if is_call(block)}
    start = message(content[:in_start])
    stream.events.append(
        SseEvent(
            data=json_text({"type": "message_start", "message": start}, draw), event="message_start"
        )
    )
    for position, block in enumerate(content[in_start:], start=in_start):
        stream.events += block_events(draw, position, block)
    if draw(st.integers(0, 9)):
        stream.events.append(
            ev("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9})
        )
        stream.events.append(ev("message_stop"))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(stream.events)))
        extra = draw(noise(len(content)))
        stream.events.insert(at, extra)
        obj = json.loads(extra.data) if extra.event == "content_block_start" else {}
        if obj.get("index", -1) >= len(content):
            stream.calls.add(obj["index"])  # a tool_use at a new position: a call too
    return stream


def block_events(draw: st.DrawFn, position: int, block: dict[str, Any]) -> list[SseEvent]:
    out: list[SseEvent] = []
    if block["type"] == "text":
        out.append(ev("content_block_start", index=position, content_block={**block, "text": ""}))
        for piece in pieces(draw, block["text"]):
            out.append(
                ev(
                    "content_block_delta",
                    index=position,
                    delta={"type": "text_delta", "text": piece},
                )
            )
    elif is_call(block) and draw(st.integers(0, 3)):
        start_input = draw(st.sampled_from([{}, {}, {"amount": 1}]))
        start = SseEvent(
            data=json_text(
                {
                    "type": "content_block_start",
                    "index": position,
                    "content_block": {**block, "input": start_input},
                },
                draw,
            ),
            event="content_block_start",
        )
        out.append(start)
        for piece in pieces(draw, json_text(block["input"], draw)):
            delta = {"type": "input_json_delta", "partial_json": piece}
            out.append(ev("content_block_delta", index=position, delta=delta))
    else:
        out.append(
            SseEvent(
                data=json_text(
                    {"type": "content_block_start", "index": position, "content_block": block}, draw
                ),
                event="content_block_start",
            )
        )
    if draw(st.integers(0, 5)):
        out.append(ev("content_block_stop", index=position))
    return out


def pieces(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=3)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def noise(blocks_count: int) -> st.SearchStrategy[SseEvent]:
    index = st.integers(0, max(blocks_count, 1))
    return st.one_of(
        st.just(SseEvent(data='{"type": "ping"}', event="ping")),
        st.just(ev("future_event", detail=1)),
        st.just(
            SseEvent(
                data=json.dumps(
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {
                            "type": "tool_use",
                            "id": "x",
                            "name": "danger_unnamed",
                            "input": {},
                        },
                    }
                )
            )
        ),
        st.just(SseEvent(data="not json", event="content_block_delta")),
        index.map(
            lambda i: ev(
                "content_block_delta",
                index=i,
                delta={"type": "input_json_delta", "partial_json": '{"late": "danger_late"}'},
            )
        ),
        index.map(
            lambda i: ev(
                "content_block_delta", index=i, delta={"type": "text_delta", "text": "danger_text"}
            )
        ),
        index.map(
            lambda i: ev(
                "content_block_start",
                index=i,
                content_block={"type": "tool_use", "id": "d", "name": "danger_dup", "input": {}},
            )
        ),
        index.map(lambda i: ev("content_block_stop", index=i)),
        st.just(
            SseEvent(
                data='{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":NaN}}',
                event="message_delta",
            )
        ),
    )


@dataclass
class Run:
    """What the sans-I/O driver saw: events sent, calls decided (with how much was sent before)."""

    sent: list[SseEvent] = field(default_factory=list)
    decided: dict[str, list[tuple[ToolCall, Decision]]] = field(default_factory=dict)
    decided_at: dict[str, int] = field(default_factory=dict)
    violation: bool = False


def drive(payload: bytes, cuts: list[int]) -> Run:
    """Bytes split at ``cuts``, through the SSE parser and a rewriter, as the ingress walks them."""
    run = Run()
    rewriter = ADAPTER.stream_rewriter()
    parser = SseParser()

    def take(items: Any) -> None:
        for item in items:
            if isinstance(item, ToolCall):
                decision = rule(item)
                run.decided.setdefault(item.key, []).append((item, decision))
                run.decided_at.setdefault(item.key, len(run.sent))
                run.sent += rewriter.resolve(item, decision)
            else:
                run.sent.append(item)

    bounds = [0, *sorted(set(cuts)), len(payload)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            for event in parser.feed(payload[a:b]):
                take(rewriter.feed(event))
        take(rewriter.finish())
    except StreamViolation:
        run.violation = True
    return run


def sdk_accumulate(sent: list[SseEvent], *, beta: bool) -> Any:
    """The message the SDK's ``MessageStream`` (or ``BetaMessageStream``) builds from ``sent``."""
    snapshot: Any = None
    buffers: dict[int, bytes] = {}
    with warnings.catch_warnings():
        # Serialising beta-only block types through the non-beta models warns; it still works.
        warnings.simplefilter("ignore", UserWarning)
        for item in sent:
            if item.event in (None, "ping") or not item.data:
                continue  # as anthropic._streaming.Stream skips them
            value = json.loads(item.data)
            if beta:
                snapshot = beta_accumulate_event(
                    event=cast(Any, construct_type(type_=BetaRawMessageStreamEvent, value=value)),
                    current_snapshot=snapshot,
                    json_bufs=buffers,
                    request_headers=httpx2.Headers(),
                )
            else:
                event: Any = construct_type(type_=RawMessageStreamEvent, value=value)
                snapshot = accumulate_event(
                    event=event, current_snapshot=snapshot, json_bufs=buffers
                )
    return snapshot


def touched(item: SseEvent, stream: Stream) -> set[int]:
    """The call positions an event sent to the agent carries something of."""
    obj = json.loads(item.data)
    if obj.get("type") == "message_start":
        return {p for p in stream.calls if p < stream.in_start}
    index = obj.get("index")
    return {index} & stream.calls if isinstance(index, int) else set()


@settings(max_examples=1300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), data=st.data())
def test_streams(stream: Stream, data: st.DataObject) -> None:
    payload = b"".join(item.encode() for item in stream.events)
    cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=8))
    run = drive(payload, cuts)
    # (c) nothing of a call is sent before its decision
    for sent_at, item in enumerate(run.sent):
        if item.event in ("ping", "error"):
            continue
        for position in touched(item, stream):
            key = f"b{position}"
            assert key in run.decided_at, f"{key} sent undecided"
            assert run.decided_at[key] <= sent_at, f"{key} sent before its decision"
    snapshot = sdk_accumulate(run.sent, beta=data.draw(st.booleans()))
    if snapshot is not None:
        check_parsed(snapshot.content, run.decided)  # (a) and (b)
    if not run.violation:
        assert set(run.decided) == {f"b{p}" for p in stream.calls}, "every call was decided"
