"""A scripted fake LLM provider that speaks the OpenAI and Anthropic wire formats.

:class:`MockLLM` serves, on a loopback port:

* OpenAI ``POST /v1/chat/completions``, ``POST /v1/responses`` (both with and
  without ``stream``; ``background: true`` answers ``queued``, and ``GET
  /v1/responses/{id}`` or ``POST .../cancel`` then returns the finished
  answer), ``GET /v1/models`` and ``POST /v1/embeddings``;
* Anthropic ``POST /v1/messages`` (with and without ``stream``) and, when the
  request carries ``anthropic-version``, ``GET /v1/models``.

Answers are scripted with :class:`Reply` values. One reply renders in whichever
protocol the agent called, with the event order, field names and id shapes the
official SDKs parse, so a test can point the real ``openai``/``anthropic``
client (or Warden in front of it) at the mock::

    async with MockLLM() as llm:
        llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1001"})]))
        client = AsyncOpenAI(base_url=f"{llm.url}/v1", api_key="test")
        ...
        assert llm.requests[0].headers["Authorization"] == "Bearer test"

Replies come from the script queue first, then from the ``on_request``
responder, then the default text "Hello from the mock.". A reply may carry a
:class:`Fault` to exercise error handling: an HTTP error status, broken JSON, a
stream cut off mid-way, a server that never answers, a delay, or a slow stream.

OpenAI stream chunks and Responses delta events carry the ``obfuscation``
padding field the API adds, unless the request sets
``stream_options.include_obfuscation`` to false.

Responses are kept, as the API keeps them unless the request says
``store: false``: a request continuing one (``previous_response_id``) must
give an output item for each of its function calls, or it gets the API's 400
``No tool output found for function call <id>.``

Usage numbers are deterministic: input tokens are the words in the request's
messages (:func:`prompt_tokens`), output tokens are :attr:`Reply.output_tokens`.
The model is echoed from the request.

Run ``python -m warden.testing.mock_llm --port 8900`` to serve one by hand.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import hashlib
import itertools
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from warden.testing._server import LoopbackServer

__all__ = [
    "DEFAULT_TEXT",
    "Call",
    "Fault",
    "FaultKind",
    "MockLLM",
    "ReceivedRequest",
    "Reply",
    "Responder",
    "WireProtocol",
    "last_user_text",
    "main",
    "prompt_tokens",
]

FaultKind = Literal[
    "status", "malformed_json", "case_blind_keys", "truncate", "hang", "delay", "slow_stream"
]
"""The failure modes a :class:`Fault` can inject."""

WireProtocol = Literal["openai_chat", "openai_responses", "anthropic_messages"]
"""Which endpoint a request reached; passed to the responder."""

DEFAULT_TEXT: Final = "Hello from the mock."
"""The text of the reply used when nothing is scripted."""

_FAULT_KINDS: Final = frozenset(get_args(FaultKind))
# Tool-call arguments are streamed in pieces of this many characters, so even a
# small argument object arrives in several fragments, as it does from real models.
_FRAGMENT_CHARS: Final = 8
_FINGERPRINT: Final = "fp_mock0001"
_OPENAI_MODELS: Final = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "text-embedding-3-small",
)
_ANTHROPIC_MODELS: Final = (
    ("claude-sonnet-4-6", "Claude Sonnet 4.6"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
    ("claude-opus-4-7", "Claude Opus 4.7"),
)
_EMBEDDING_DIMENSIONS: Final = 1536
_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
# Structural fields that are not message text; left out of the prompt word count.
_NOT_TEXT: Final = frozenset(
    {"role", "type", "id", "tool_call_id", "call_id", "tool_use_id", "cache_control", "status"}
)
_TOKEN_RE: Final = re.compile(r"\s*\S+|\s+$")


@dataclass(frozen=True, slots=True)
class Fault:
    """A failure a :class:`Reply` injects instead of (or around) its answer.

    ``status``
        Answer with HTTP ``status`` and the provider's error body (``message``
        overrides the default text; ``headers`` are added, e.g. ``retry-after``).
    ``malformed_json``
        Status 200 with a body cut in half; a stream gets one event whose JSON is
        cut in half, then the rest of the stream.
    ``case_blind_keys``
        Status 200 with every key of the answer (or of each stream event) in
        upper case (``TOOL_CALLS``): what a case-blind client (Go's
        ``encoding/json``) still reads as the provider's fields.
    ``truncate``
        Send part of the answer and close the connection: a stream stops after
        ``after`` events (default: half) with no end marker; a JSON body stops
        half-way short of its announced ``Content-Length``.
    ``hang``
        Never answer. With ``after``, a stream sends that many events first and
        then stalls. The handler ends when the client goes away or the mock closes.
    ``delay``
        Wait ``seconds`` before answering normally.
    ``slow_stream``
        Stream normally but wait ``seconds`` between events (not before the
        first), to measure time to first token. Non-streaming answers are not slowed.
    """

    kind: FaultKind
    status: int = 500
    message: str | None = None
    seconds: float = 0.0
    after: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; expected one of {sorted(_FAULT_KINDS)}"
            )
        if self.kind == "status" and not 400 <= self.status <= 599:
            raise ValueError(f"fault status must be 4xx or 5xx, got {self.status}")
        if self.seconds < 0:
            raise ValueError("fault seconds must not be negative")
        if self.after is not None and self.after < 0:
            raise ValueError("fault after must not be negative")


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call the mock model makes.

    ``arguments`` is a JSON object (sent compactly encoded) or a raw string sent
    exactly as given, which may be invalid JSON to test how callers cope. ``id``
    defaults to a fresh provider-shaped id (``call_…``, ``toolu_…``).
    """

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    @property
    def arguments_json(self) -> str:
        """The arguments as the wire carries them: a JSON text."""
        if isinstance(self.arguments, str):
            return self.arguments
        return orjson.dumps(dict(self.arguments)).decode()


@dataclass(frozen=True, slots=True)
class Reply:
    """What the mock model answers: text, tool calls, or a fault.

    The same reply renders in every protocol: text becomes the assistant
    message, each :class:`Call` a tool call, in order after the text.
    ``fault`` takes a :class:`Fault` or just its kind (``Reply(fault="hang")``).
    """

    text: str | None = None
    tool_calls: Sequence[Call] = ()
    fault: Fault | FaultKind | None = None

    def __post_init__(self) -> None:
        # Frozen: normalise once so rendering never re-checks shapes.
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        if isinstance(self.fault, str):
            object.__setattr__(self, "fault", Fault(self.fault))

    @property
    def output_tokens(self) -> int:
        """Reported output tokens: words of text, plus per call 1 + words of its arguments."""
        words = len(self.text.split()) if self.text else 0
        return words + sum(1 + len(c.arguments_json.split()) for c in self.tool_calls)


def _fault_of(reply: Reply) -> Fault | None:
    assert not isinstance(reply.fault, str)  # normalised by Reply.__post_init__
    return reply.fault


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A request as it reached the mock.

    ``headers`` are case-insensitive; ``body`` is the parsed JSON (``None`` when
    the body was empty or not JSON) and ``raw`` the bytes as received.
    """

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: Any
    raw: bytes = b""


Responder = Callable[[WireProtocol, dict[str, Any]], Reply | None]
"""Chooses a reply from the protocol and request body; ``None`` means the default."""


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The input tokens the mock reports: whitespace-separated words in the prompt.

    Counts every string in ``messages``, ``input``, ``system`` and
    ``instructions``, except structural fields such as ``role``, ``type`` and ids.
    """
    return sum(_words(body.get(key)) for key in ("messages", "input", "system", "instructions"))


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items() if k not in _NOT_TEXT)
    return 0


def last_user_text(body: Mapping[str, Any]) -> str:
    """The text of the last user message in a chat, Responses or Messages request.

    Handy in a responder that picks its answer by what the user said. Tool
    results (Anthropic ``tool_result`` blocks, Responses ``function_call_output``
    items) are not user text; a user turn holding only those yields ``""``.
    """
    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")
        if isinstance(messages, str):
            return messages
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = [
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") in ("text", "input_text")
        and isinstance(part.get("text"), str)
    ]
    return "\n".join(parts)


def _pieces(text: str) -> list[str]:
    """Split text into word-sized deltas that concatenate back to ``text``."""
    return _TOKEN_RE.findall(text)


def _fragments(arguments: str) -> list[str]:
    return [arguments[i : i + _FRAGMENT_CHARS] for i in range(0, len(arguments), _FRAGMENT_CHARS)]


def _model(body: Mapping[str, Any], default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _obfuscation(n: int) -> str:
    # OpenAI pads stream chunks with a random string so chunk sizes do not
    # reveal token lengths; a deterministic stand-in keeps output reproducible.
    return "mockpad"[: 1 + n % 7]


# --- OpenAI chat completions ------------------------------------------------------


def _chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_choices(reply: Reply, call_ids: Sequence[str]) -> list[dict[str, Any]]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text,
        "refusal": None,
        "annotations": [],
    }
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": cid,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for call, cid in zip(reply.tool_calls, call_ids, strict=True)
        ]
    return [
        {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "tool_calls" if reply.tool_calls else "stop",
        }
    ]


def _chat_chunks(
    *,
    completion_id: str,
    created: int,
    model: str,
    reply: Reply,
    call_ids: Sequence[str],
    usage: dict[str, Any] | None,
    obfuscate: bool,
) -> list[bytes]:
    """The chunk stream, in the order the API sends it, ending with ``[DONE]``."""
    head = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
    }
    out: list[bytes] = []

    def emit(choices: list[dict[str, Any]], final_usage: dict[str, Any] | None = None) -> None:
        chunk: dict[str, Any] = {**head, "choices": choices}
        # With include_usage every chunk carries "usage": null until the last one.
        if usage is not None:
            chunk["usage"] = final_usage
        if obfuscate:
            chunk["obfuscation"] = _obfuscation(len(out))
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")

    def delta(d: dict[str, Any], finish: str | None = None) -> None:
        emit([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}])

    calls = list(zip(reply.tool_calls, call_ids, strict=True))
    if reply.text is not None or not calls:
        delta({"role": "assistant", "content": "", "refusal": None})
        for piece in _pieces(reply.text or ""):
            delta({"content": piece})
    for i, (call, cid) in enumerate(calls):
        # The first delta of a call names it (with id and type) and has empty
        # arguments; later deltas carry only the index and argument fragments.
        # The SDKs concatenate string fields, so repeating id or name would corrupt them.
        header = {
            "index": i,
            "id": cid,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        if i == 0 and reply.text is None:
            delta({"role": "assistant", "content": None, "tool_calls": [header], "refusal": None})
        else:
            delta({"tool_calls": [header]})
        for fragment in _fragments(call.arguments_json):
            delta({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]})
    delta({}, "tool_calls" if calls else "stop")
    if usage is not None:
        emit([], usage)
    out.append(b"data: [DONE]\n\n")
    return out


# --- OpenAI Responses ---------------------------------------------------------------


def _responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _response_object(
    body: Mapping[str, Any],
    *,
    response_id: str,
    created: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    completed = status == "completed"
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if completed else None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_output_text(text)] if status == "completed" else []
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _function_item(item_id: str, call: Call, call_id: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "arguments": call.arguments_json if status == "completed" else "",
        "call_id": call_id,
        "name": call.name,
    }


@dataclass(frozen=True, slots=True)
class _ResponseIds:
    response: str
    message: str
    items: tuple[str, ...]
    calls: tuple[str, ...]


def _responses_output(reply: Reply, ids: _ResponseIds) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = []
    if reply.text is not None or not reply.tool_calls:
        output.append(_message_item(ids.message, reply.text or "", "completed"))
    for call, item_id, call_id in zip(reply.tool_calls, ids.items, ids.calls, strict=True):
        output.append(_function_item(item_id, call, call_id, "completed"))
    return output


def _responses_events(
    body: Mapping[str, Any],
    *,
    reply: Reply,
    ids: _ResponseIds,
    created: int,
    model: str,
    usage: dict[str, Any],
    obfuscate: bool,
) -> list[bytes]:
    """The typed event stream: ``event:`` lines, ``sequence_number`` from 0, no ``[DONE]``."""
    out: list[bytes] = []

    def emit(kind: str, payload: dict[str, Any], pad: bool = False) -> None:
        event: dict[str, Any] = {"type": kind, "sequence_number": len(out), **payload}
        if pad and obfuscate:
            event["obfuscation"] = _obfuscation(len(out))
        out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")

    def response(
        status: str, output: list[dict[str, Any]], u: dict[str, Any] | None
    ) -> dict[str, Any]:
        return _response_object(
            body,
            response_id=ids.response,
            created=created,
            model=model,
            status=status,
            output=output,
            usage=u,
        )

    emit("response.created", {"response": response("in_progress", [], None)})
    emit("response.in_progress", {"response": response("in_progress", [], None)})
    index = 0
    if reply.text is not None or not reply.tool_calls:
        text = reply.text or ""
        where = {"item_id": ids.message, "output_index": index, "content_index": 0}
        emit(
            "response.output_item.added",
            {"output_index": index, "item": _message_item(ids.message, "", "in_progress")},
        )
        emit(
            "response.content_part.added",
            {**where, "part": _output_text("")},
        )
        for piece in _pieces(text):
            emit("response.output_text.delta", {**where, "delta": piece, "logprobs": []}, pad=True)
        emit("response.output_text.done", {**where, "text": text, "logprobs": []})
        emit("response.content_part.done", {**where, "part": _output_text(text)})
        emit(
            "response.output_item.done",
            {"output_index": index, "item": _message_item(ids.message, text, "completed")},
        )
        index += 1
    for call, item_id, call_id in zip(reply.tool_calls, ids.items, ids.calls, strict=True):
        emit(
            "response.output_item.added",
            {"output_index": index, "item": _function_item(item_id, call, call_id, "in_progress")},
        )
        for fragment in _fragments(call.arguments_json):
            emit(
                "response.function_call_arguments.delta",
                {"item_id": item_id, "output_index": index, "delta": fragment},
                pad=True,
            )
        emit(
            "response.function_call_arguments.done",
            {"item_id": item_id, "output_index": index, "arguments": call.arguments_json},
        )
        emit(
            "response.output_item.done",
            {"output_index": index, "item": _function_item(item_id, call, call_id, "completed")},
        )
        index += 1
    emit(
        "response.completed",
        {"response": response("completed", _responses_output(reply, ids), usage)},
    )
    return out


# --- Anthropic Messages -------------------------------------------------------------


def _tool_input(call: Call) -> Any:
    """A tool_use ``input`` for a non-streamed message.

    The wire has an object here, not a string. Raw arguments that parse as JSON
    are sent as that value; raw arguments that do not are sent as a JSON string,
    a malformed answer a caller must tolerate.
    """
    if not isinstance(call.arguments, str):
        return dict(call.arguments)
    try:
        return orjson.loads(call.arguments)
    except orjson.JSONDecodeError:
        return call.arguments


def _anthropic_content(reply: Reply, call_ids: Sequence[str]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if reply.text is not None:
        content.append({"type": "text", "text": reply.text})
    for call, cid in zip(reply.tool_calls, call_ids, strict=True):
        content.append(
            {"type": "tool_use", "id": cid, "name": call.name, "input": _tool_input(call)}
        )
    return content


def _anthropic_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": completion,
        "service_tier": "standard",
    }


def _anthropic_message(
    *, message_id: str, model: str, content: list[dict[str, Any]], stop: str | None, usage: Any
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }


def _anthropic_events(
    *, message_id: str, model: str, reply: Reply, call_ids: Sequence[str], prompt: int
) -> list[bytes]:
    """message_start, content blocks (a ping after the first), message_delta, message_stop."""
    out: list[bytes] = []

    def emit(kind: str, payload: dict[str, Any]) -> None:
        out.append(
            b"event: "
            + kind.encode()
            + b"\ndata: "
            + orjson.dumps({"type": kind, **payload})
            + b"\n\n"
        )

    emit(
        "message_start",
        {
            "message": _anthropic_message(
                message_id=message_id,
                model=model,
                content=[],
                stop=None,
                usage=_anthropic_usage(prompt, 1),
            )
        },
    )
    index = 0

    def start(block: dict[str, Any]) -> None:
        emit("content_block_start", {"index": index, "content_block": block})
        if index == 0:
            emit("ping", {})

    if reply.text is not None:
        start({"type": "text", "text": ""})
        for piece in _pieces(reply.text):
            emit(
                "content_block_delta",
                {"index": index, "delta": {"type": "text_delta", "text": piece}},
            )
        emit("content_block_stop", {"index": index})
        index += 1
    for call, cid in zip(reply.tool_calls, call_ids, strict=True):
        start({"type": "tool_use", "id": cid, "name": call.name, "input": {}})
        # The API opens every tool input with an empty fragment.
        for fragment in ["", *_fragments(call.arguments_json)]:
            emit(
                "content_block_delta",
                {"index": index, "delta": {"type": "input_json_delta", "partial_json": fragment}},
            )
        emit("content_block_stop", {"index": index})
        index += 1
    if index == 0:
        emit("ping", {})
    emit(
        "message_delta",
        {
            "delta": {
                "stop_reason": "tool_use" if reply.tool_calls else "end_turn",
                "stop_sequence": None,
            },
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    emit("message_stop", {})
    return out


# --- errors -------------------------------------------------------------------------

_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error."),
    529: ("overloaded_error", "Overloaded"),
}


def _openai_error_body(status: int, message: str | None) -> dict[str, Any]:
    default = ("server_error", None, "Server error.") if status >= 500 else _OPENAI_ERRORS[400]
    kind, code, text = _OPENAI_ERRORS.get(status, default)
    return {"error": {"message": message or text, "type": kind, "param": None, "code": code}}


def _anthropic_error_body(status: int, message: str | None, request_id: str) -> dict[str, Any]:
    default = _ANTHROPIC_ERRORS[500] if status >= 500 else _ANTHROPIC_ERRORS[400]
    kind, text = _ANTHROPIC_ERRORS.get(status, default)
    return {
        "type": "error",
        "error": {"type": kind, "message": message or text},
        "request_id": request_id,
    }


# --- embeddings ----------------------------------------------------------------------


def _embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector derived from the input text."""
    digest = hashlib.shake_256(text.encode()).digest(dimensions * 2)
    raw = [(digest[2 * i] << 8 | digest[2 * i + 1]) / 32767.5 - 1.0 for i in range(dimensions)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]  # one pre-tokenised input
    if isinstance(value, list):
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    return []


def _base64_floats(values: list[float]) -> str:
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()  # the API sends little-endian float32
    return base64.b64encode(packed.tobytes()).decode()


# --- the server ---------------------------------------------------------------------

_DEFAULT_REPLY: Final = Reply(text=DEFAULT_TEXT)
# The default answer's choices never change, so the benchmark's hot path
# serialises them once and splices the bytes into every response.
_DEFAULT_CHAT_CHOICES: Final = orjson.Fragment(orjson.dumps(_chat_choices(_DEFAULT_REPLY, ())))
_DEFAULT_OUTPUT_TOKENS: Final = _DEFAULT_REPLY.output_tokens


class MockLLM(LoopbackServer):
    """A fake OpenAI and Anthropic upstream on a loopback port; see the module docs.

    Use it as an async context manager, or call :meth:`start` and :meth:`close`;
    :attr:`url` is the base address. ``record=False`` stops keeping
    :attr:`requests`, for long benchmark runs.
    """

    def __init__(self, *, record: bool = True) -> None:
        super().__init__()
        self.requests: list[ReceivedRequest] = []
        """Every request received, oldest first."""
        self._record = record
        self._queue: deque[Reply] = deque()
        self._responder: Responder | None = None
        self._ids = itertools.count(1)
        self._stored: dict[str, tuple[str, ...]] = {}
        """Function call ids of each kept Responses answer, by response id."""
        self._background: dict[str, bytes] = {}
        """Finished ``background: true`` Responses answers, by id, for ``GET`` to fetch."""

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/responses/{response_id}", self._retrieve_response)
        app.router.add_post("/v1/responses/{response_id}/cancel", self._retrieve_response)
        app.router.add_delete("/v1/responses/{response_id}", self._delete_response)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/embeddings", self._embeddings)
        # Azure OpenAI's deployment paths (the deployment, not the body, names the model).
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        # Anything else gets the provider's 404, like an unknown API path.
        app.router.add_route("*", "/{tail:.*}", self._not_found)

    # -- scripting ------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies; each generating request takes the oldest one."""
        self._queue.extend(replies)

    def on_request(self, responder: Responder | None) -> Responder | None:
        """Set (or with ``None`` clear) the responder used when the queue is empty.

        Returns its argument, so it also works as a decorator.
        """
        self._responder = responder
        return responder

    @property
    def pending(self) -> int:
        """Scripted replies not yet used."""
        return len(self._queue)

    def reset(self) -> None:
        """Forget queued replies, the responder and the recorded requests."""
        self._queue.clear()
        self._responder = None
        self.requests.clear()

    def _next_reply(self, protocol: WireProtocol, body: dict[str, Any]) -> Reply:
        if self._queue:
            return self._queue.popleft()
        if self._responder is not None:
            reply = self._responder(protocol, body)
            if reply is not None:
                return reply
        return _DEFAULT_REPLY

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}mock{next(self._ids):012d}"

    # -- request plumbing -----------------------------------------------------------

    async def _receive(self, request: web.Request) -> Any:
        raw = await request.read()
        body: Any = None
        if raw:
            # A body that is not JSON is recorded as None; the handler answers 400.
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(raw)
        if self._record:
            self.requests.append(
                ReceivedRequest(request.method, request.path, request.headers, body, raw)
            )
        return body

    async def _wait(self, seconds: float | None) -> bool:
        """Sleep (forever when ``None``); False if the mock began closing meanwhile."""
        if self._closing.is_set():
            return False
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return True
        return False

    async def _before(
        self,
        fault: Fault | None,
        error: Callable[[int, str | None], web.Response],
        *,
        streaming: bool,
    ) -> web.Response | None:
        """Apply the faults that act before any answer; return the answer they force."""
        if fault is None:
            return None
        if fault.kind == "status":
            response = error(fault.status, fault.message)
            response.headers.update(fault.headers)
            return response
        stalls_later = streaming and fault.after is not None
        if fault.kind == "hang" and not stalls_later and not await self._wait(None):
            return error(503, "The mock server is shutting down.")
        if fault.kind == "delay" and not await self._wait(fault.seconds):
            return error(503, "The mock server is shutting down.")
        return None

    @staticmethod
    def _drop(request: web.Request) -> None:
        # Closing the transport flushes what was written, then ends the
        # connection without the final chunk: the client sees a cut-off body.
        if request.transport is not None:
            request.transport.close()

    async def _send_json(
        self, request: web.Request, payload: bytes, fault: Fault | None, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        kind = fault.kind if fault is not None else None
        if kind == "malformed_json":
            payload = payload[: len(payload) // 2]
        elif kind == "case_blind_keys":
            payload = _upper_keys(payload)
        elif kind == "truncate":
            response = web.StreamResponse(headers=headers)
            response.content_type = "application/json"
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            self._drop(request)
            return response
        return web.Response(body=payload, content_type="application/json", headers=headers)

    async def _stream(
        self,
        request: web.Request,
        events: list[bytes],
        fault: Fault | None,
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        stop = stall = len(events) + 1
        gap = 0.0
        if fault is not None and fault.kind == "truncate":
            half = max(1, len(events) // 2)
            stop = min(fault.after if fault.after is not None else half, len(events) - 1)
        elif fault is not None and fault.kind == "hang" and fault.after is not None:
            stall = min(fault.after, len(events) - 1)
        elif fault is not None and fault.kind == "malformed_json":
            middle = len(events) // 2
            events[middle] = _break_event(events[middle])
        elif fault is not None and fault.kind == "case_blind_keys":
            events = [_upper_keys(event) for event in events]
        elif fault is not None and fault.kind == "slow_stream":
            gap = fault.seconds
        response = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        await response.prepare(request)
        for i, event in enumerate(events):
            if i == stall:
                await self._wait(None)
            if i >= stop or i == stall or (gap and i and not await self._wait(gap)):
                self._drop(request)
                return response
            await response.write(event)
        await response.write_eof()
        return response

    # -- OpenAI ---------------------------------------------------------------------

    def _openai_headers(self) -> dict[str, str]:
        return {"x-request-id": self._new_id("req_"), "openai-processing-ms": "1"}

    def _unanswered(self, body: Mapping[str, Any]) -> str | None:
        """A function call of the continued answer that the request gives no output for."""
        previous = body.get("previous_response_id")
        calls = self._stored.get(previous) if isinstance(previous, str) else None
        if not calls:
            return None  # an answer this mock did not keep: not checked
        items = body.get("input")
        given = {
            item.get("call_id")
            for item in (items if isinstance(items, list) else ())
            if isinstance(item, dict) and str(item.get("type", "")).endswith("_output")
        }
        return next((call_id for call_id in calls if call_id not in given), None)

    def _openai_error(self, status: int, message: str | None) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps(_openai_error_body(status, message)),
            content_type="application/json",
            headers=self._openai_headers(),
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        if not isinstance(body, dict):
            return self._openai_error(400, "We could not parse the JSON body of your request.")
        reply = self._next_reply("openai_chat", body)
        fault = _fault_of(reply)
        streaming = bool(body.get("stream"))
        early = await self._before(fault, self._openai_error, streaming=streaming)
        if early is not None:
            return early
        model = _model(body, "gpt-4o-mini")
        completion_id = self._new_id("chatcmpl-")
        created = int(time.time())
        prompt = prompt_tokens(body)
        headers = self._openai_headers()
        if streaming:
            options = body.get("stream_options") or {}
            call_ids = [c.id or self._new_id("call_") for c in reply.tool_calls]
            events = _chat_chunks(
                completion_id=completion_id,
                created=created,
                model=model,
                reply=reply,
                call_ids=call_ids,
                usage=_chat_usage(prompt, reply.output_tokens)
                if options.get("include_usage")
                else None,
                obfuscate=options.get("include_obfuscation", True) is not False,
            )
            return await self._stream(request, events, fault, headers)
        if reply is _DEFAULT_REPLY:
            choices: Any = _DEFAULT_CHAT_CHOICES
            completion = _DEFAULT_OUTPUT_TOKENS
        else:
            call_ids = [c.id or self._new_id("call_") for c in reply.tool_calls]
            choices = _chat_choices(reply, call_ids)
            completion = reply.output_tokens
        payload = orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": _chat_usage(prompt, completion),
                "service_tier": "default",
                "system_fingerprint": _FINGERPRINT,
            }
        )
        return await self._send_json(request, payload, fault, headers)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        if not isinstance(body, dict):
            return self._openai_error(400, "We could not parse the JSON body of your request.")
        unanswered = self._unanswered(body)
        if unanswered is not None:
            return self._openai_error(400, f"No tool output found for function call {unanswered}.")
        reply = self._next_reply("openai_responses", body)
        fault = _fault_of(reply)
        streaming = bool(body.get("stream"))
        early = await self._before(fault, self._openai_error, streaming=streaming)
        if early is not None:
            return early
        model = _model(body, "gpt-4o-mini")
        created = int(time.time())
        ids = _ResponseIds(
            response=self._new_id("resp_"),
            message=self._new_id("msg_"),
            items=tuple(self._new_id("fc_") for _ in reply.tool_calls),
            calls=tuple(c.id or self._new_id("call_") for c in reply.tool_calls),
        )
        usage = _responses_usage(prompt_tokens(body), reply.output_tokens)
        headers = self._openai_headers()
        if body.get("store") is not False:
            self._stored[ids.response] = ids.calls
        if streaming:
            options = body.get("stream_options") or {}
            events = _responses_events(
                body,
                reply=reply,
                ids=ids,
                created=created,
                model=model,
                usage=usage,
                obfuscate=options.get("include_obfuscation", True) is not False,
            )
            return await self._stream(request, events, fault, headers)
        finished = _response_object(
            body,
            response_id=ids.response,
            created=created,
            model=model,
            status="completed",
            output=_responses_output(reply, ids),
            usage=usage,
        )
        if body.get("background") is True:
            # Queued at once; the answer is ready for GET /v1/responses/{id} straight away.
            self._background[ids.response] = orjson.dumps({**finished, "background": True})
            queued = {**finished, "status": "queued", "output": [], "usage": None}
            queued.update(background=True, completed_at=None)
            return await self._send_json(request, orjson.dumps(queued), fault, headers)
        return await self._send_json(request, orjson.dumps(finished), fault, headers)

    async def _retrieve_response(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/responses/{id}`` (or ``POST .../cancel``, too late to stop it): a
        ``background: true`` answer, finished."""
        await self._receive(request)
        found = self._background.get(request.match_info["response_id"])
        if found is None:
            return self._openai_error(404, "No response found with that id.")
        return web.Response(
            body=found, content_type="application/json", headers=self._openai_headers()
        )

    async def _delete_response(self, request: web.Request) -> web.StreamResponse:
        """``DELETE /v1/responses/{id}``: a kept answer is forgotten (not continued again)."""
        await self._receive(request)
        response_id = request.match_info["response_id"]
        kept = self._stored.pop(response_id, None)
        fetched = self._background.pop(response_id, None)
        if kept is None and fetched is None:
            return self._openai_error(404, "No response found with that id.")
        body = {"id": response_id, "object": "response", "deleted": True}
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers=self._openai_headers()
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        if not isinstance(body, dict):
            return self._openai_error(400, "We could not parse the JSON body of your request.")
        inputs = _embedding_inputs(body.get("input"))
        if not inputs:
            return self._openai_error(400, "'input' is a required property.")
        dimensions = body.get("dimensions")
        if not isinstance(dimensions, int) or dimensions <= 0:
            dimensions = _EMBEDDING_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = _embedding(text, dimensions)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": _base64_floats(vector) if as_base64 else vector,
                }
            )
        words = sum(len(text.split()) for text in inputs)
        payload = {
            "object": "list",
            "data": data,
            "model": _model(body, "text-embedding-3-small"),
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
        return web.Response(
            body=orjson.dumps(payload),
            content_type="application/json",
            headers=self._openai_headers(),
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        if "anthropic-version" in request.headers:
            data = [
                {
                    "type": "model",
                    "id": model_id,
                    "display_name": name,
                    "created_at": "2025-09-29T00:00:00Z",
                    "lifecycle": "active",
                }
                for model_id, name in _ANTHROPIC_MODELS
            ]
            anthropic_page = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
            }
            return web.Response(
                body=orjson.dumps(anthropic_page),
                content_type="application/json",
                headers={"request-id": self._new_id("req_")},
            )
        openai_page = {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": 1715367049, "owned_by": "system"}
                for model_id in _OPENAI_MODELS
            ],
        }
        return web.Response(
            body=orjson.dumps(openai_page),
            content_type="application/json",
            headers=self._openai_headers(),
        )

    # -- Anthropic ------------------------------------------------------------------

    def _anthropic_error(self, status: int, message: str | None) -> web.Response:
        request_id = self._new_id("req_")
        return web.Response(
            status=status,
            body=orjson.dumps(_anthropic_error_body(status, message, request_id)),
            content_type="application/json",
            headers={"request-id": request_id},
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        if not isinstance(body, dict):
            return self._anthropic_error(
                400, "There was an error parsing the body of your request."
            )
        reply = self._next_reply("anthropic_messages", body)
        fault = _fault_of(reply)
        streaming = bool(body.get("stream"))
        early = await self._before(fault, self._anthropic_error, streaming=streaming)
        if early is not None:
            return early
        model = _model(body, "claude-sonnet-4-6")
        message_id = self._new_id("msg_")
        call_ids = [c.id or self._new_id("toolu_") for c in reply.tool_calls]
        prompt = prompt_tokens(body)
        headers = {"request-id": self._new_id("req_")}
        if streaming:
            events = _anthropic_events(
                message_id=message_id, model=model, reply=reply, call_ids=call_ids, prompt=prompt
            )
            return await self._stream(request, events, fault, headers)
        payload = orjson.dumps(
            _anthropic_message(
                message_id=message_id,
                model=model,
                content=_anthropic_content(reply, call_ids),
                stop="tool_use" if reply.tool_calls else "end_turn",
                usage=_anthropic_usage(prompt, reply.output_tokens),
            )
        )
        return await self._send_json(request, payload, fault, headers)

    # -- anything else ----------------------------------------------------------------

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        if "anthropic-version" in request.headers or "x-api-key" in request.headers:
            return self._anthropic_error(404, f"{request.method} {request.path} not found.")
        message = f"Invalid URL ({request.method} {request.path})"
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return web.Response(
            status=404,
            body=orjson.dumps({"error": error}),
            content_type="application/json",
            headers=self._openai_headers(),
        )


# A key as JSON writes it: a quote not escaped inside a string, so keys in
# argument text (``\"format\":``) keep their spelling.
_KEY: Final = re.compile(rb'(?<!\\)"([a-z_]+)":')


def _upper_keys(payload: bytes) -> bytes:
    return _KEY.sub(lambda m: b'"' + m.group(1).upper() + b'":', payload)


def _break_event(event: bytes) -> bytes:
    """The same event with its JSON data cut in half."""
    start = event.index(b"data: ") + len(b"data: ")
    end = event.rindex(b"\n\n")
    data = event[start:end]
    return event[:start] + data[: max(1, len(data) // 2)] + b"\n\n"


# --- command line -------------------------------------------------------------------


async def _serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    mock = MockLLM(record=False)
    await mock.start(port=port)
    async with mock:
        print(f"mock LLM serving on {mock.url} (OpenAI base_url {mock.url}/v1)", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a mock LLM on 127.0.0.1 until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m warden.testing.mock_llm",
        description="Serve a fake OpenAI/Anthropic upstream that answers with the default reply.",
    )
    parser.add_argument("--port", type=int, default=8900, help="port on 127.0.0.1 (0 picks one)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
