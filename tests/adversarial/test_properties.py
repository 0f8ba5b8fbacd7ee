"""Property tests through the real proxy: generated upstream answers, parsed by the official SDKs.

Per protocol (OpenAI chat, OpenAI Responses, Anthropic Messages), streaming
and not, hypothesis generates answers with random chunk boundaries,
duplicate, missing and colliding ids, unknown item types, extra fields, late
deltas and lenient JSON literals. Every case must keep:

(a) no tool the policy denied (and no call of an unknown type) appears in
    anything the SDK parsed, including events seen before an error;
(b) every call the SDK parsed has exactly one allow record in the audit log
    with the same arguments (canonical JSON), and when the SDK raised nothing
    the allowed records are exactly the parsed calls;
(c) no byte of a call reaches the agent before its decision is recorded: on
    the first event of each call the SDK yields, the call's decision record
    must already be in the log. Some cases pause the upstream inside a call
    (after its first fragment), so a fragment forwarded early would be seen
    while no decision can exist yet.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, cast

import anthropic
import openai
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.adversarial import wire
from tests.adversarial.conftest import (
    ALLOWED_TOOLS,
    DENIED_TOOLS,
    Harness,
    canonical,
    case_headers,
    chat_messages,
    is_denied,
    new_case,
)
from warden.audit import keyed_digest
from warden.audit.record import arguments_sha256, mask_credentials
from warden.testing.raw_upstream import RawReply, split_at, sse_bytes

EXAMPLES = int(os.environ.get("WARDEN_ADVERSARIAL_EXAMPLES", "2000"))
# A credential-like key: the record masks it and binds a keyed digest of the arguments.
MASKED = example(
    cs=[("search_kb", '{"COOKIE": null}', "call_1")],
    how={
        "stream": False,
        "cuts": [],
        "pause": False,
        "late": False,
        "extra": False,
        "unknown": False,
        "pieces": 1,
    },
)
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
SDK_ERRORS = (openai.APIError, anthropic.APIError, RuntimeError, ValueError)
PAUSE_S = 0.02
UNKNOWN = "teleport_call"

names = st.sampled_from(ALLOWED_TOOLS + DENIED_TOOLS)
ids = st.sampled_from(["call_1", "call_2", "", None])
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)
arguments = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.one_of(scalars, st.lists(scalars, max_size=3)),
    max_size=4,
)
# Literals only a lenient (Python json) parser reads, spliced in as an argument.
lenient = st.sampled_from([None, "NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 25])


@st.composite
def calls(draw: st.DrawFn, max_calls: int = 3) -> list[tuple[str, str, str | None]]:
    """(name, arguments text, id) per call."""
    out = []
    for _ in range(draw(st.integers(0, max_calls))):
        args = draw(arguments)
        text = json.dumps(args)
        literal = draw(lenient)
        if literal is not None:
            text = text[:-1] + (", " if args else "") + f'"lenient": {literal}}}'
        out.append((draw(names), text, draw(ids)))
    return out


@st.composite
def delivery(draw: st.DrawFn, data_len_hint: int = 4000) -> dict[str, Any]:
    """How the bytes are sent: stream or not, cuts, a pause, late delta, extra fields."""
    return {
        "stream": draw(st.booleans()),
        "cuts": draw(st.lists(st.integers(1, data_len_hint), max_size=12)),
        "pause": draw(st.integers(0, 9)) == 0,
        "late": draw(st.integers(0, 7)) == 0,
        "extra": draw(st.booleans()),
        "unknown": draw(st.integers(0, 4)) == 0,
        "pieces": draw(st.integers(1, 3)),
    }


def send(h: Harness, case: str, events: list[wire.Event], how: dict[str, Any], done: bool) -> None:
    data = sse_bytes(events, done=done)
    chunks = split_at(data, how["cuts"])
    delays: list[float] = []
    if how["pause"] and len(chunks) > 1:
        # Pause before the chunk after the first tool-call bytes.
        first = data.find(b"arguments") if b"arguments" in data else data.find(b"input")
        offset = 0
        for i, chunk in enumerate(chunks):
            offset += len(chunk)
            if offset > first >= 0:
                delays = [0.0] * (i + 1) + [PAUSE_S]
                break
    h.answer(
        case,
        RawReply(body=chunks, content_type="text/event-stream; charset=utf-8", delays=delays),
    )


def check(
    h: Harness, case: str, parsed: list[tuple[str, Any]], seen: list[str], raised: bool
) -> None:
    """Invariants (a) and (b); ``seen`` are names the SDK exposed at any point."""
    for name in [n for n, _ in parsed] + seen:
        assert not is_denied(name), f"denied tool {name!r} reached the agent"
        assert name != UNKNOWN, "an unknown call type reached the agent"
    allowed = allowed_calls(h, case)
    got = call_keys(h, parsed)
    for key, n in got.items():
        assert allowed[key] == n, f"{key} parsed {n}x, allow records {allowed[key]}"
    if not raised:
        assert allowed == got, f"allow records {allowed} != parsed {got}"


def allowed_calls(h: Harness, case: str) -> Counter[tuple[str, str]]:
    """The case's allow records as (tool, arguments) keys, as :func:`call_keys` makes them."""
    # A record that masks a credential-like key shows less than the agent got;
    # its arguments_sha256 binds the exact arguments instead.
    return Counter(
        (
            r["action"]["tool"],
            r["action"]["arguments_sha256"] or canonical(r["action"]["arguments"]),
        )
        for r in h.audit.decisions(case)
        if r["decision"]["enforced"] == "allow"
    )


def call_keys(h: Harness, calls: list[tuple[str, Any]]) -> Counter[tuple[str, str]]:
    """(tool, arguments) keys of calls someone received, comparable with :func:`allowed_calls`.

    A masked record's digest is keyed (``keyed:``) with the log's key, so
    that a guessable value cannot be found from it: the key is read here too.
    """
    return Counter(
        (name, _digest(h, args) if mask_credentials(args) != args else canonical(args))
        for name, args in calls
    )


def _digest(h: Harness, args: Any) -> str:
    return keyed_digest(h.audit.root, arguments_sha256(args))


def chat_tool_calls(cs: Any, how: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat answer's ``tool_calls``: the generated calls, extra fields, an unknown type."""
    extra = {"x_extra": {"nested": [1, 2]}} if how["extra"] else {}
    tool_calls = [{**wire.chat_call(n, a, i), **extra} for n, a, i in cs]
    if how["unknown"]:
        tool_calls.append({"id": "call_u", "type": UNKNOWN, UNKNOWN: {"name": "danger_x"}})
    return tool_calls


def chat_events(cs: Any, how: dict[str, Any], *, late: bool) -> list[wire.Event]:
    """The same calls streamed, each in ``how["pieces"]``; a late fragment after them if asked."""
    events: list[wire.Event] = []
    for idx, (n, a, i) in enumerate(cs):
        events += wire.chat_call_chunks(idx, n, a, i, pieces=how["pieces"])
    if how["unknown"]:
        head = {"index": len(cs), "id": "call_u", "type": UNKNOWN, UNKNOWN: {"name": "x"}}
        events.append((None, wire.chat_chunk({"tool_calls": [head]})))
    stream_events = wire.chat_stream(events, finish="tool_calls" if cs else "stop")
    if late:
        frag = {"index": 0, "function": {"arguments": " "}}
        stream_events.append((None, wire.chat_chunk({"tool_calls": [frag]})))
    return stream_events


def anthropic_content(cs: Any, how: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's content blocks: the generated calls, extra fields, an unknown type."""
    # Anthropic's input is an object on the wire; the lenient literal rides in the text.
    content: list[dict[str, Any]] = []
    for n, a, i in cs:
        block = wire.tool_use(n, a, "toolu_" + i if i else None)
        if how["extra"]:
            block["x_extra"] = {"k": 1}
        content.append(block)
    if how["unknown"]:
        content.append({"type": "teleport_use", "id": "tp_1", "name": "teleport", "input": {}})
    return content


def anthropic_body(content: list[dict[str, Any]]) -> bytes:
    """The whole message, each call's input as its generated text (lenient literals and all)."""
    body = json.dumps(wire.message_body([]))
    blocks_text = ", ".join(_block_text(b) for b in content)
    return body.replace('"content": []', f'"content": [{blocks_text}]').encode()


def anthropic_events(
    content: list[dict[str, Any]], how: dict[str, Any], *, late: bool
) -> list[wire.Event]:
    """The same message streamed; a late input delta after the blocks if asked."""
    events = [wire.message_start()]
    for k, block in enumerate(content):
        if block["type"] == "tool_use":
            events += _tool_use_events(k, block, how["pieces"])
        else:
            events += wire.block_events(k, block)
    if late:
        events.append(wire.input_delta(0, " "))
    return events + wire.message_end()


def decided(h: Harness, case: str, name: str, count: int) -> None:
    """(c): at least ``count`` decision records for ``name`` exist right now."""
    have = sum(1 for r in h.audit.decisions(case) if r["action"]["tool"] == name)
    assert have >= count, f"{name!r} reached the agent before its decision was recorded"


def loads(text: str) -> Any:
    return json.loads(text)


# -- OpenAI chat -----------------------------------------------------------------


@PROPERTY
@given(cs=calls(), how=delivery())
@MASKED
def test_openai_chat(harness: Harness, oai: openai.OpenAI, cs: Any, how: dict[str, Any]) -> None:
    case = new_case()
    tool_calls = chat_tool_calls(cs, how)
    headers = case_headers(case)
    messages: Any = chat_messages(case)
    parsed: list[tuple[str, Any]] = []
    seen: list[str] = []
    raised = False
    if not how["stream"]:
        h_body = wire.chat_body(tool_calls, text="ok", finish="tool_calls" if cs else "stop")
        harness.answer(case, RawReply.json(h_body))
        try:
            completion = oai.chat.completions.create(
                model=wire.MODEL, messages=messages, extra_headers=headers
            )
        except SDK_ERRORS:
            completion, raised = None, True
        if completion is not None:
            for tc in completion.choices[0].message.tool_calls or []:
                if tc.type != "function":
                    seen.append(UNKNOWN)
                    continue
                parsed.append((tc.function.name, loads(tc.function.arguments)))
        check(harness, case, parsed, seen, raised)
        return
    late = bool(how["late"] and cs)
    send(harness, case, chat_events(cs, how, late=late), how, done=True)
    counts: Counter[str] = Counter()
    try:
        with oai.chat.completions.stream(
            model=wire.MODEL, messages=messages, extra_headers=headers
        ) as s:
            for event in s:
                if event.type != "chunk":
                    continue
                for choice in event.chunk.choices:
                    for delta in choice.delta.tool_calls or []:
                        fn = delta.function
                        if fn is not None and fn.name:
                            seen.append(fn.name)
                            counts[fn.name] += 1
                            decided(harness, case, fn.name, counts[fn.name])
                        elif getattr(delta, "type", None) not in (None, "function"):
                            seen.append(UNKNOWN)
            final = s.get_final_completion()
        for tc in final.choices[0].message.tool_calls or []:
            if tc.type != "function":
                seen.append(UNKNOWN)
                continue
            parsed.append((tc.function.name, loads(tc.function.arguments)))
    except SDK_ERRORS:
        raised = True
    assert raised or not late, "a late fragment did not end the stream with an error"
    check(harness, case, parsed, seen, raised)


# -- OpenAI Responses ------------------------------------------------------------


@PROPERTY
@given(cs=calls(), how=delivery())
@MASKED
def test_openai_responses(
    harness: Harness, oai: openai.OpenAI, cs: Any, how: dict[str, Any]
) -> None:
    case = new_case()
    extra = {"x_extra": [None, "NaN"]} if how["extra"] else {}
    output = [
        {**wire.fn_item(n, a, i, item_id=f"fc_{k % 2}"), **extra} for k, (n, a, i) in enumerate(cs)
    ]
    if how["unknown"]:
        output.append({"type": UNKNOWN, "id": "tp_1", "call_id": "call_t", "target": "prod"})
    headers = case_headers(case)
    parsed: list[tuple[str, Any]] = []
    seen: list[str] = []
    raised = False

    def collect(items: Any) -> None:
        for item in items:
            kind = getattr(item, "type", None)
            if kind == "function_call":
                parsed.append((item.name, loads(item.arguments)))
            elif kind == UNKNOWN:
                seen.append(UNKNOWN)

    if not how["stream"]:
        harness.answer(case, RawReply.json(wire.response_body(output)))
        try:
            resp = oai.responses.create(model=wire.MODEL, input=case, extra_headers=headers)
            collect(resp.output)
        except SDK_ERRORS:
            raised = True
        check(harness, case, parsed, seen, raised)
        return
    events = wire.responses_stream(output, pieces=how["pieces"])
    late = how["late"] and cs
    if late:
        events.insert(
            -1,
            (
                "response.function_call_arguments.delta",
                {
                    "type": "response.function_call_arguments.delta",
                    "sequence_number": 9999,
                    "item_id": "fc_0",
                    "output_index": 0,
                    "delta": " ",
                },
            ),
        )
    send(harness, case, events, how, done=False)
    counts: Counter[str] = Counter()
    try:
        with oai.responses.stream(model=wire.MODEL, input=case, extra_headers=headers) as s:
            for event in s:
                item = getattr(event, "item", None)
                if event.type == "response.output_item.added" and item is not None:
                    # Every output item has a type, so a name always results.
                    name = cast("str", getattr(item, "name", None) or getattr(item, "type", ""))
                    seen.append(UNKNOWN if item.type == UNKNOWN else name)
                    counts[name] += 1
                    if item.type == "function_call":
                        decided(harness, case, name, counts[name])
            collect(s.get_final_response().output)
    except SDK_ERRORS:
        raised = True
    assert raised or not late, "a late delta did not end the stream with an error"
    check(harness, case, parsed, seen, raised)


# -- Anthropic ---------------------------------------------------------------------


@PROPERTY
@given(cs=calls(), how=delivery())
@MASKED
def test_anthropic_messages(
    harness: Harness, ant: anthropic.Anthropic, cs: Any, how: dict[str, Any]
) -> None:
    case = new_case()
    content = anthropic_content(cs, how)
    headers = case_headers(case)
    messages: Any = [{"role": "user", "content": case}]
    parsed: list[tuple[str, Any]] = []
    seen: list[str] = []
    raised = False

    def collect(blocks: Any) -> None:
        for b in blocks:
            if b.type == "tool_use":
                parsed.append((b.name, b.input))
            elif b.type == "teleport_use":
                seen.append(UNKNOWN)

    if not how["stream"]:
        body = anthropic_body(content)
        harness.answer(case, RawReply(body=body, content_type="application/json"))
        try:
            msg = ant.messages.create(
                model=wire.CLAUDE, max_tokens=10, messages=messages, extra_headers=headers
            )
            collect(msg.content)
        except SDK_ERRORS:
            raised = True
        check(harness, case, parsed, seen, raised)
        return
    late = bool(how["late"] and cs)
    send(harness, case, anthropic_events(content, how, late=late), how, done=False)
    counts: Counter[str] = Counter()
    try:
        with ant.messages.stream(
            model=wire.CLAUDE, max_tokens=10, messages=messages, extra_headers=headers
        ) as s:
            for event in s:
                if event.type == "content_block_start":
                    started = event.content_block
                    name = getattr(started, "name", None) or started.type
                    # A block type the SDK does not know arrives as a plain string.
                    unknown = cast("str", started.type) == "teleport_use"
                    seen.append(UNKNOWN if unknown else name)
                    counts[name] += 1
                    if started.type == "tool_use":
                        decided(harness, case, name, counts[name])
            collect(s.get_final_message().content)
    except SDK_ERRORS:
        raised = True
    assert raised or not late, "a late input delta did not end the stream with an error"
    check(harness, case, parsed, seen, raised)


def _block_text(block: dict[str, Any]) -> str:
    if block["type"] != "tool_use":
        return json.dumps(block)
    # The input goes in as the generated text, lenient literals and all.
    rest = json.dumps({k: v for k, v in block.items() if k != "input"})
    return rest[:-1] + f', "input": {block["input"]}}}'


def _tool_use_events(index: int, block: dict[str, Any], pieces: int) -> list[wire.Event]:
    start = {k: v for k, v in block.items() if k != "input"} | {"input": {}}
    events: list[wire.Event] = [
        (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
    ]
    text: str = block["input"]
    step = max(1, -(-len(text) // pieces))
    for j in range(0, len(text), step):
        events.append(wire.input_delta(index, text[j : j + step]))
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events
