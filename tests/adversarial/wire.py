"""Provider-shaped bodies and event lists, built from plain values for crafted replies.

Each builder returns exactly what a (possibly hostile) upstream would send,
so a test can take the well-formed answer and then bend one thing.
"""

from __future__ import annotations

from typing import Any

from warden.testing.raw_upstream import json_bytes

Event = tuple[str | None, Any]
MODEL = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-6"


def args_text(arguments: Any) -> str:
    """Arguments as the wire carries them (Python's json: ``NaN`` and big ints as written)."""
    return arguments if isinstance(arguments, str) else json_bytes(arguments).decode()


# -- OpenAI chat -------------------------------------------------------------


def chat_call(name: str, arguments: Any, call_id: str | None = "call_1") -> dict[str, Any]:
    """One ``function`` tool call of a chat message; ``call_id=None`` leaves the id out."""
    call: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": args_text(arguments)},
    }
    if call_id is not None:
        call["id"] = call_id
    return call


def chat_body(
    calls: list[dict[str, Any]], text: str | None = None, finish: str = "tool_calls"
) -> dict[str, Any]:
    """A chat completion with one choice carrying ``calls``."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-adv",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` for choice 0."""
    return {
        "id": "chatcmpl-adv",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def chat_call_chunks(
    index: int, name: str, arguments: Any, call_id: str | None = "call_1", pieces: int = 2
) -> list[Event]:
    """A tool call streamed as a head (id, name) and ``pieces`` argument fragments."""
    head: dict[str, Any] = {
        "index": index,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    if call_id is not None:
        head["id"] = call_id
    events: list[Event] = [(None, chat_chunk({"tool_calls": [head]}))]
    text = args_text(arguments)
    step = max(1, -(-len(text) // max(1, pieces)))
    for i in range(0, len(text), step):
        frag = {"index": index, "function": {"arguments": text[i : i + step]}}
        events.append((None, chat_chunk({"tool_calls": [frag]})))
    return events


def chat_stream(body_events: list[Event], finish: str = "tool_calls") -> list[Event]:
    """Role chunk, the given events, the finish chunk (``[DONE]`` is added by the reply)."""
    return [
        (None, chat_chunk({"role": "assistant", "content": None})),
        *body_events,
        (None, chat_chunk({}, finish)),
    ]


# -- OpenAI Responses --------------------------------------------------------


def fn_item(
    name: str, arguments: Any, call_id: str | None = "call_1", item_id: str = "fc_1"
) -> dict[str, Any]:
    """A Responses ``function_call`` output item."""
    item: dict[str, Any] = {
        "type": "function_call",
        "id": item_id,
        "name": name,
        "arguments": args_text(arguments),
        "status": "completed",
    }
    if call_id is not None:
        item["call_id"] = call_id
    return item


def response_body(output: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    """A Responses ``response`` object."""
    return {
        "id": "resp_adv",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "model": MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 5,
            "output_tokens": 5,
            "total_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def responses_stream(output: list[dict[str, Any]], pieces: int = 2) -> list[Event]:
    """created, each item added / argument deltas / done, then completed."""
    seq = iter(range(10_000))

    def ev(kind: str, **fields: Any) -> Event:
        return (kind, {"type": kind, "sequence_number": next(seq), **fields})

    events = [ev("response.created", response=response_body([], status="in_progress"))]
    for i, item in enumerate(output):
        if item["type"] == "function_call":
            events.append(
                ev(
                    "response.output_item.added",
                    output_index=i,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            text = item["arguments"]
            step = max(1, -(-len(text) // max(1, pieces)))
            for j in range(0, len(text), step):
                events.append(
                    ev(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=i,
                        delta=text[j : j + step],
                    )
                )
            events.append(
                ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=i,
                    arguments=text,
                )
            )
        else:
            events.append(ev("response.output_item.added", output_index=i, item=item))
        events.append(ev("response.output_item.done", output_index=i, item=item))
    events.append(ev("response.completed", response=response_body(output)))
    return events


# -- Anthropic ---------------------------------------------------------------


def tool_use(name: str, arguments: Any, block_id: str | None = "toolu_1") -> dict[str, Any]:
    """An Anthropic ``tool_use`` content block."""
    block: dict[str, Any] = {"type": "tool_use", "name": name, "input": arguments}
    if block_id is not None:
        block["id"] = block_id
    return block


def message_body(content: list[dict[str, Any]], stop: str = "tool_use") -> dict[str, Any]:
    """An Anthropic ``message``."""
    return {
        "id": "msg_adv",
        "type": "message",
        "role": "assistant",
        "model": CLAUDE,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 5},
    }


def message_start(content: list[dict[str, Any]] | None = None) -> Event:
    """``message_start`` (normally with empty content)."""
    msg = message_body(content or [], stop="tool_use")
    msg["stop_reason"] = None
    return ("message_start", {"type": "message_start", "message": msg})


def block_events(index: int, block: dict[str, Any], pieces: int = 2) -> list[Event]:
    """A content block streamed: start, deltas, stop."""
    events: list[Event] = []
    if block["type"] == "tool_use":
        start = {**block, "input": {}}
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        text = args_text(block["input"])
        step = max(1, -(-len(text) // max(1, pieces)))
        for j in range(0, len(text), step):
            events.append(input_delta(index, text[j : j + step]))
    elif block["type"] == "text":
        events.append(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": block["text"]},
                },
            )
        )
    else:
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def input_delta(index: int, partial: str) -> Event:
    """An ``input_json_delta`` for block ``index``."""
    return (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": partial},
        },
    )


def message_end(stop: str = "tool_use") -> list[Event]:
    """``message_delta`` with the stop reason, then ``message_stop``."""
    return [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 5},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def anthropic_stream(content: list[dict[str, Any]], pieces: int = 2) -> list[Event]:
    """A whole well-formed message stream for ``content``."""
    events = [message_start()]
    for i, block in enumerate(content):
        events += block_events(i, block, pieces)
    return events + message_end()
