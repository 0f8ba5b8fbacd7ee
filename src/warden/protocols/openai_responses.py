"""The OpenAI Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``).

A response's ``output`` is a list of items, read by the SDK by their ``type``.
Every item is one of three things:

* passive (an allowlist: ``message``, ``reasoning``, ``compaction``,
  ``mcp_list_tools`` and the ``*_output`` result items): it carries no action
  and passes untouched;
* a call of a type Warden knows (``function_call``, ``custom_tool_call``,
  ``local_shell_call``, ``shell_call``, ``computer_call``,
  ``apply_patch_call``, ``mcp_call``, ``mcp_approval_request`` and the hosted
  calls): it becomes a :class:`ToolCall` of its own kind and is decided;
* anything else, an item of a type Warden does not know: an ``unknown_call``,
  decided like the rest (policies deny it unless they allow it by name).

Each call is keyed by its position, ``o<output_index>``, never by an id the
upstream chose. Its tool name and arguments come from the fields the SDK
dispatches on (see ``CALL_SHAPES``):

* ``function_call``, ``custom_tool_call``: ``name`` (``namespace.name`` when
  a namespace other than the name is sent); ``arguments`` (JSON text), or
  ``{"input": <free text>}`` for a custom tool;
* ``mcp_call``, ``mcp_approval_request``: ``server_label.name``; ``arguments``;
* ``local_shell_call``, ``shell_call``, ``web_search_call``: the type; the
  ``action`` object. ``apply_patch_call``: the type; the ``operation`` object.
  ``computer_call``: the type; ``{"action": ..., "actions": ...}``;
* other hosted calls: the type; an object of their input fields;
* unknown types: the type; the whole item.

An object field (``action``) sent as text is not read as JSON: the agent gets
text, so the arguments are ``None`` and the call is denied, as is a call whose
name fields are not text.

A call the policy allows is rendered from its canonical item: the SDK type's
own fields only, with the arguments exactly as decided. The call's
:class:`ToolCall` is a function of that canonical item alone, so what the
agent receives is what was decided. A call that is not allowed is replaced, at
the same position, by an assistant ``message`` item whose text says what was
blocked and why (id ``msg_warden_<index>_<decision id>``), so a streamed
response and its final snapshot agree.

Streams. Every event is parsed as leniently as the SDK parses it; an event
that is not a JSON object with a ``type`` ends the stream with
:class:`~warden.errors.StreamViolation`. Events of passive items go out as
they came (the very object, when their ``sequence_number`` needs no change).
Events of a call item are held, never forwarded: at its
``response.output_item.done`` (or when the stream ends first) the call is
decided, and released as one canonical set of events (added, one argument
delta and its done event where the item type streams arguments, and done),
all built from the decided item. Any later event for that output index, a
second ``added`` for a known index, or a call event aimed at a passive item,
raises :class:`StreamViolation`. Event types the SDK does not know are
dropped unless they carry nothing but ``type`` and ``sequence_number``.

Snapshots. ``response.created`` is the SDK's first view of the output, so
calls in it are decided on the spot. ``response.queued`` and
``response.in_progress`` show decided calls as decided and leave undecided
ones out. The terminal snapshot (``response.completed``, ``.incomplete``,
``.failed``), from which the SDK builds its final response, is rewritten
from the decided values: a position decided in the stream is rendered as
decided whatever the snapshot says there, and a call only the snapshot
carries is decided before the snapshot goes out.

Sequence numbers are reassigned from one counter, so they stay strictly
increasing whatever was held, dropped or added.

Errors. An event an SDK raises on ends the stream (whatever its type; see
:func:`~warden.protocols.openai_chat.ends_stream`): one named ``error``,
as OpenAI names its own ``error``-type event, or one with an ``error``
member that is not absent, ``null``, ``false``, ``0`` or ``""``. It goes
on with only its type, sequence number and error fields, the calls still
held are never decided, and every later event is dropped. The Python SDK
raises only on a member Python reads as true, and hands any other such event
(OpenAI's own error event, ``"error": {}``) to its caller by its type: that
event goes on typed ``error``, so its caller reads an error, and Warden's own
error event after it makes that SDK raise too. An unnamed ``error``-type
event without the member is yielded by both SDKs like any other, and passes
as it came.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from warden.errors import StreamViolation
from warden.model import ActionKind, Decision, Effect, ToolCall, ToolResult, Usage
from warden.protocols import declared_arguments, declared_tools
from warden.protocols._wire import (
    NO_DECISION,
    Envelope,
    StreamStatus,
    answered_by,
    as_read,
    dumps,
    event_object,
    misspelled,
    misspelled_key,
    parse_arguments,
    refuse_misspelled_request,
    tier_rate,
    tiered,
    token_count,
)
from warden.protocols.base import ParsedRequest, StreamItem, blocked_message
from warden.protocols.openai_chat import ends_stream
from warden.protocols.sse import SseEvent

__all__ = [
    "CALL_SHAPES",
    "PASSIVE_ITEMS",
    "OpenAIResponsesAdapter",
    "OpenAIResponsesStreamRewriter",
    "answer_refused",
    "call_of",
    "canonical_item",
    "key_of",
]

_DONE_MARKER: Final = "[DONE]"
_ITEM_ADDED: Final = "response.output_item.added"
_ITEM_DONE: Final = "response.output_item.done"
_CREATED: Final = "response.created"
_TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_LIFECYCLE: Final = frozenset({_CREATED, "response.queued", "response.in_progress"})
# What of an event that ends the stream in error goes on: an error event's own fields.
_ERROR_FIELDS: Final = frozenset({"type", "sequence_number", "error", "code", "message", "param"})

PASSIVE_ITEMS: Final = frozenset(
    {
        "message",
        "reasoning",
        "compaction",
        "mcp_list_tools",
        "additional_tools",
        "function_call_output",
        "custom_tool_call_output",
        "computer_call_output",
        "local_shell_call_output",
        "shell_call_output",
        "apply_patch_call_output",
        "tool_search_output",
        "program_output",
        "mcp_approval_response",
    }
)
"""Output item types that carry no action: text, reasoning, results, tool lists."""

# Events of a passive item's content: forwarded as they came.
_PASSIVE_CONTENT: Final = frozenset(
    {
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_text.annotation.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_part.done",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.compaction.compacting",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.mcp_list_tools.failed",
        "response.shell_call_output_content.delta",
        "response.shell_call_output_content.done",
    }
)

# Events of a call item's content: held, never forwarded (the call is re-rendered).
_CALL_CONTENT: Final = frozenset(
    {
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.mcp_call.failed",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.file_search_call.in_progress",
        "response.file_search_call.searching",
        "response.file_search_call.completed",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.completed",
        "response.shell_call_command.added",
        "response.shell_call_command.delta",
        "response.shell_call_command.done",
    }
)

# Events that name no output item: forwarded as they came.
_UNBOUND: Final = frozenset(
    {
        "error",
        "response.audio.delta",
        "response.audio.done",
        "response.audio.transcript.delta",
        "response.audio.transcript.done",
        "response.steer.accepted",
        "response.steer.failed",
        "response.steer.pending",
    }
)


@dataclass(frozen=True, slots=True)
class _Stream:
    """How an item type streams its text field: the event prefix and field name."""

    prefix: str
    field: str


@dataclass(frozen=True, slots=True)
class _Shape:
    """Where the SDK finds a call type's identity and input.

    ``fields`` are the SDK type's own fields: the canonical item keeps only
    those. The arguments are the JSON text in ``json_field``, or free text in
    ``text_field`` (as ``{text_field: text}``), or the object in ``unwrap``,
    or an object of the ``wrap`` fields that are present.
    """

    kind: ActionKind
    fields: frozenset[str]
    json_field: str | None = None
    text_field: str | None = None
    unwrap: str | None = None
    wrap: tuple[str, ...] = ()
    named: bool = False
    scope: str | None = None  # joined before the name: the SDK dispatches on both
    stream: _Stream | None = None


def _fields(*names: str) -> frozenset[str]:
    return frozenset(("id", "type", *names))


_FUNCTION_STREAM: Final = _Stream("response.function_call_arguments", "arguments")
CALL_SHAPES: Final[Mapping[str, _Shape]] = {  # every call item type, and how it is read
    "function_call": _Shape(
        ActionKind.TOOL_CALL,
        _fields("call_id", "name", "arguments", "namespace", "status", "caller", "async"),
        json_field="arguments",
        named=True,
        scope="namespace",
        stream=_FUNCTION_STREAM,
    ),
    "custom_tool_call": _Shape(
        ActionKind.CUSTOM_TOOL_CALL,
        _fields("call_id", "name", "input", "namespace", "caller", "async"),
        text_field="input",
        named=True,
        scope="namespace",
        stream=_Stream("response.custom_tool_call_input", "input"),
    ),
    "mcp_call": _Shape(
        ActionKind.MCP_CALL,
        _fields(
            "name", "arguments", "server_label", "approval_request_id", "error", "output", "status"
        ),
        json_field="arguments",
        named=True,
        scope="server_label",
        stream=_Stream("response.mcp_call_arguments", "arguments"),
    ),
    "mcp_approval_request": _Shape(
        ActionKind.MCP_APPROVAL_REQUEST,
        _fields("name", "arguments", "server_label"),
        json_field="arguments",
        named=True,
        scope="server_label",
    ),
    "local_shell_call": _Shape(
        ActionKind.SHELL_CALL, _fields("call_id", "action", "status"), unwrap="action"
    ),
    "shell_call": _Shape(
        ActionKind.SHELL_CALL,
        _fields("call_id", "action", "environment", "status", "caller", "created_by"),
        unwrap="action",
    ),
    "computer_call": _Shape(
        ActionKind.COMPUTER_CALL,
        _fields("call_id", "pending_safety_checks", "status", "action", "actions"),
        wrap=("action", "actions"),
    ),
    "apply_patch_call": _Shape(
        ActionKind.APPLY_PATCH_CALL,
        _fields("call_id", "operation", "status", "caller", "created_by"),
        unwrap="operation",
    ),
    "web_search_call": _Shape(
        ActionKind.HOSTED_TOOL_CALL, _fields("action", "status"), unwrap="action"
    ),
    "file_search_call": _Shape(
        ActionKind.HOSTED_TOOL_CALL, _fields("queries", "results", "status"), wrap=("queries",)
    ),
    "code_interpreter_call": _Shape(
        ActionKind.HOSTED_TOOL_CALL,
        _fields("code", "container_id", "outputs", "status"),
        wrap=("code", "container_id"),
    ),
    "image_generation_call": _Shape(
        ActionKind.HOSTED_TOOL_CALL,
        _fields(
            "result",
            "status",
            "action",
            "background",
            "error",
            "output_format",
            "quality",
            "revised_prompt",
            "size",
            "svg_usage",
        ),
        wrap=("action", "revised_prompt"),
    ),
    "tool_search_call": _Shape(
        ActionKind.HOSTED_TOOL_CALL,
        _fields("call_id", "arguments", "execution", "status", "created_by"),
        wrap=("arguments", "execution"),
    ),
    "program": _Shape(
        ActionKind.HOSTED_TOOL_CALL, _fields("call_id", "code", "fingerprint"), wrap=("code",)
    ),
}


_REQUEST: Final = Envelope(
    names=frozenset(
        {
            *("model", "input", "tools", "tool_choice", "stream", "previous_response_id"),
            *("conversation", "parallel_tool_calls", "type", "name", "parameters", "format"),
            *("server_label", "server_url", "connector_id", "allowed_tools", "tool_names"),
            *("require_approval", "headers", "authorization", "read_only"),
            *("prompt", "id", "version", "environment", "container", "container_id"),
            *("network_policy", "allowed_domains"),
            # What a spend cap prices the call by.
            *("max_output_tokens", "service_tier", "max_tool_calls"),
            # What an input item says the provider runs or ran (an approval, a call).
            *("approve", "approval_request_id", "arguments", "call_id", "output"),
        }
    ),
    # ``input``: its items can declare tools (``additional_tools``, ``tool_search_output``),
    # approve a hosted MCP call, or carry the calls the history is read from.
    inside=frozenset(
        {
            *("tools", "allowed_tools", "tool_choice", "input", "prompt"),
            *("environment", "container", "network_policy"),
        }
    ),
)
"""A Responses request, down to the tools it declares (hosted MCP servers among them).

The tools come from ``tools``, from ``input`` items and from a stored
``prompt``; see :func:`warden.protocols.declared_tools.openai_responses`.
"""
_ENVELOPE: Final = Envelope(
    names=frozenset(
        {
            *(name for shape in CALL_SHAPES.values() for name in shape.fields),
            *("object", "created_at", "model", "output", "usage", "response", "item"),
            *("output_index", "item_id", "content_index", "delta", "sequence_number", "part"),
            *("text", "content", "role", "summary", "incomplete_details", "error"),
        }
    ),
    inside=frozenset({"response", "output", "item"}),
)
"""Responses and their stream events, down to each output item's own fields."""


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _item_type(item: object) -> str | None:
    return _str(item.get("type")) if isinstance(item, Mapping) else None


def _is_passive(item: object) -> bool:
    return _item_type(item) in PASSIVE_ITEMS


def key_of(index: int) -> str:
    """The :attr:`ToolCall.key` of the call at output position ``index``."""
    return f"o{index}"


def canonical_item(item: object) -> Any:
    """The item as Warden renders it: the SDK type's own fields, arguments as text.

    Items of a type Warden does not know are kept whole: all of them is what
    the policy decides on.
    """
    if not isinstance(item, Mapping):
        return item
    shape = CALL_SHAPES.get(_item_type(item) or "")
    if shape is None:
        return dict(item)
    out = {k: v for k, v in item.items() if k in shape.fields}
    if shape.json_field is not None:
        # Compatible servers may send an object: the SDK's type is JSON text.
        out[shape.json_field] = parse_arguments(item.get(shape.json_field))[0]
    return out


def _call_name(shape: _Shape, item: Mapping[str, Any], wire_type: str) -> str:
    if not shape.named:
        return wire_type
    name = _str(item.get("name")) or ""
    scope = _str(item.get(shape.scope)) if shape.scope is not None else None
    # A function deferred to the top level names itself as its namespace.
    if scope and scope != name:
        return f"{scope}.{name}"
    return name


def _identity_is_text(shape: _Shape, item: Mapping[str, Any]) -> bool:
    """Whether the fields naming the tool are text (or, for a scope, absent)."""
    if not shape.named:
        return True
    scope = item.get(shape.scope) if shape.scope is not None else None
    return isinstance(item.get("name"), str) and (scope is None or isinstance(scope, str))


def _call_arguments(shape: _Shape, item: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    if shape.json_field is not None:
        return parse_arguments(item.get(shape.json_field))
    if shape.text_field is not None:
        text = item.get(shape.text_field)
        if not isinstance(text, str):
            return ("" if text is None else dumps(text)), None
        return text, parse_arguments({shape.text_field: text})[1]
    if shape.unwrap is not None:
        value = item.get(shape.unwrap)
        if not isinstance(value, dict):
            # The SDK types this field as an object: text that parses as one is
            # still text to the agent, so it is not read as JSON here.
            return ("" if value is None else dumps(value)), None
        return parse_arguments(value)
    return parse_arguments({name: item[name] for name in shape.wrap if name in item})


def call_of(item: object, index: int) -> ToolCall:
    """The call an output item (already canonical) stands for; see the module docstring."""
    key = key_of(index)
    if not isinstance(item, Mapping):
        return ToolCall(
            call_id="",
            name="",
            raw_arguments=dumps(item),
            arguments=None,
            index=index,
            key=key,
            kind=ActionKind.UNKNOWN_CALL,
            wire_type="",
        )
    wire_type = _item_type(item) or ""
    call_id = _str(item.get("call_id")) or _str(item.get("id")) or ""
    shape = CALL_SHAPES.get(wire_type)
    if shape is None:
        raw, arguments = parse_arguments(dict(item))
        return ToolCall(
            call_id=call_id,
            name=wire_type,
            raw_arguments=raw,
            arguments=arguments,
            index=index,
            key=key,
            kind=ActionKind.UNKNOWN_CALL,
            wire_type=wire_type,
        )
    raw, arguments = _call_arguments(shape, item)
    if not _identity_is_text(shape, item):
        arguments = None  # the agent could dispatch on it some other way: fail closed
    return ToolCall(
        call_id=call_id,
        name=_call_name(shape, item, wire_type),
        raw_arguments=raw,
        arguments=arguments,
        index=index,
        key=key,
        kind=shape.kind,
        wire_type=wire_type,
    )


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(msg_id: str, text: str) -> dict[str, Any]:
    """The completed assistant message that stands for a call that was not allowed."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [_text_part(text)],
    }


def _blocked_item(call: ToolCall, decision: Decision) -> dict[str, Any]:
    # Unique across turns: agents that replay earlier output as input must not
    # send two items with the same id.
    msg_id = f"msg_warden_{call.index}_{decision.decision_id}"
    return _message_item(msg_id, blocked_message(call, decision))


def _output_text(output: list[Any]) -> str:
    """What the SDKs' ``output_text`` property computes: all output text, joined."""
    texts: list[str] = []
    for item in output:
        if isinstance(item, Mapping) and item.get("type") == "message":
            for part in item.get("content") or ():
                if isinstance(part, Mapping) and part.get("type") == "output_text":
                    text = _str(part.get("text"))
                    if text is not None:
                        texts.append(text)
    return "".join(texts)


def _with_output(response: Mapping[str, Any], output: list[Any]) -> dict[str, Any]:
    result = dict(response)
    result["output"] = output
    if isinstance(result.get("output_text"), str):
        result["output_text"] = _output_text(output)
    return result


# Hosted tools the provider runs itself and bills per call, by output item type.
_HOSTED_CALLS: Final = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
}


def _billed_tool(tool: object) -> bool:
    """Whether a declared tool is one the provider runs and bills per call."""
    kind = tool.get("type") if isinstance(tool, Mapping) else None
    return isinstance(kind, str) and (
        kind.startswith("web_search") or kind in ("file_search", "code_interpreter")
    )


def _billed(response: Mapping[str, Any]) -> Usage | None:
    """A whole answer's usage: its tokens, the tier it ran on, the hosted calls it made."""
    usage = tiered(_usage(response.get("usage")), response.get("service_tier"))
    usage = answered_by(usage, response.get("model"))
    output = response.get("output")
    if usage is None or not isinstance(output, list):
        return usage
    kinds = Counter(
        _HOSTED_CALLS[kind] for item in output if (kind := _item_type(item)) in _HOSTED_CALLS
    )
    return dataclasses.replace(usage, hosted_calls=tuple(sorted(kinds.items())))


def _usage(usage: object) -> Usage | None:
    """The counts, or ``None`` (spent as held) unless both are non-negative integers."""
    if not isinstance(usage, Mapping):
        return None
    given, output = token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens"))
    if given is None or output is None:
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else 0
    return Usage(
        input_tokens=given, output_tokens=output, cached_input_tokens=token_count(cached) or 0
    )


_RESULT_ITEMS: Final = frozenset(
    {
        "function_call_output",
        "custom_tool_call_output",
        "computer_call_output",
        "local_shell_call_output",
        "shell_call_output",
        "apply_patch_call_output",
    }
)


def _result_content(output: object) -> str:
    """A result item's output as text: a string, or a list of parts."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        pieces: list[str] = []
        for part in output:
            if isinstance(part, Mapping) and part.get("type") == "input_text":
                pieces.append(_str(part.get("text")) or "")
            elif isinstance(part, Mapping):
                # Images and files are named, not inlined: the record stays text.
                pieces.append(f"[{_str(part.get('type')) or 'part'}]")
        return "\n".join(pieces)
    return "" if output is None else dumps(output)


# The output item that answers a call of each type with text, for the calls a
# request must answer and the agent never saw (answer_refused). Computer and
# shell calls take structured output that text cannot stand for.
_REFUSAL_OUTPUTS: Final = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
    "apply_patch_call": "apply_patch_call_output",
}


def answer_refused(
    body: Mapping[str, Any], owed: Mapping[str, tuple[str, str]]
) -> tuple[dict[str, Any], int] | None:
    """``body`` with an output for each call Warden kept from the agent, and how many.

    ``owed`` (:func:`warden.sessions.owed_outputs`): by call id, the call's
    item type and the text the agent saw in its place. The provider stored
    those calls with the answer ``previous_response_id`` names and refuses a
    continuation that leaves one unanswered, so the model is told, as the
    call's output, what the agent was told. Outputs go first in ``input``,
    before the agent's own items; a call the request already answers is left
    as it is. ``None`` when nothing is added.
    """
    given = body.get("input")
    items: list[Any]
    if given is None:
        items = []
    elif isinstance(given, str):
        items = [{"type": "message", "role": "user", "content": given}]
    elif isinstance(given, list):
        items = given
    else:
        return None  # not a shape the provider takes: it answers with its own error
    answered = {
        item.get("call_id")
        for item in items
        if isinstance(item, Mapping) and _item_type(item) in PASSIVE_ITEMS
    }
    added: list[dict[str, Any]] = []
    for call_id, (call_type, text) in owed.items():
        output_type = _REFUSAL_OUTPUTS.get(call_type)
        if output_type is None or call_id in answered:
            continue
        item: dict[str, Any] = {"type": output_type, "call_id": call_id, "output": text}
        if output_type == "apply_patch_call_output":
            item["status"] = "failed"
        added.append(item)
    if not added:
        return None
    return {**body, "input": [*added, *items]}, len(added)


class OpenAIResponsesAdapter:
    """The Responses API wire format. Holds no state; one instance serves all requests."""

    name = "openai.responses"
    output_bound = "max_output_tokens"

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Model, stream flag, and the result items (``function_call_output`` and kin) in ``input``.

        A result's tool name is the name of the call item with the same
        ``call_id`` in the same input, else the result item's own ``name``.
        A plain-string ``input`` carries no results.
        """
        refuse_misspelled_request(body, _REQUEST)
        items = body.get("input")
        results: list[ToolResult] = []
        if isinstance(items, list):
            names: dict[str, str] = {}
            for position, item in enumerate(items):
                if _item_type(item) in CALL_SHAPES:
                    call = call_of(canonical_item(item), position)
                    if call.call_id and call.name:
                        names[call.call_id] = call.name
            for item in items:
                if _item_type(item) in _RESULT_ITEMS:
                    # A local shell call's output names its call by ``id``.
                    call_id = _str(item.get("call_id")) or _str(item.get("id")) or ""
                    results.append(
                        ToolResult(
                            call_id=call_id,
                            content=_result_content(item.get("output")),
                            tool=names.get(call_id) or _str(item.get("name")),
                        )
                    )
        return ParsedRequest(
            model=_str(body.get("model")),
            stream=body.get("stream") is True,
            tool_results=tuple(results),
            tools=declared_tools.openai_responses(body),
            arguments=declared_arguments.openai_responses(body),
            max_output_tokens=token_count(body.get("max_output_tokens")),
            rate=tier_rate(body.get("service_tier")),
            continued=bool(body.get("previous_response_id") or body.get("conversation")),
        )

    def tool_calls(self, body: Mapping[str, Any]) -> list[ToolCall]:
        """Every output item that is not passive, in order; ``key`` is ``o<position>``."""
        output = body.get("output")
        if not isinstance(output, list):
            return []
        return [
            call_of(canonical_item(item), i)
            for i, item in enumerate(output)
            if not _is_passive(item)
        ]

    def misspelled_key(self, body: Mapping[str, Any]) -> str | None:
        """A key a case-blind client would read as a response's field (malformed)."""
        return misspelled_key(body, _ENVELOPE)

    def problem(self, body: Mapping[str, Any]) -> str | None:
        """Why the response cannot be decided as it stands, or ``None``."""
        key = self.misspelled_key(body)
        if key is not None:
            return misspelled(key)
        return shared_id_problem(body.get("output"))

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """A copy of ``body``: allowed calls in canonical form, others as explaining messages.

        ``decisions`` is keyed by :attr:`ToolCall.key`; a call missing from it
        is not allowed. An ``output`` that is not a list (and not absent)
        cannot be read, so it becomes empty. The Responses API has no stop
        reason to adjust: an output without calls already ends an agent's loop.
        """
        output = body.get("output")
        if output is None:
            return dict(body)
        if not isinstance(output, list):
            return _with_output(body, [])
        rewritten: list[Any] = []
        for position, item in enumerate(output):
            if _is_passive(item):
                rewritten.append(item)
                continue
            canonical = canonical_item(item)
            call = call_of(canonical, position)
            decision = decisions.get(call.key, NO_DECISION)
            allowed = decision.enforced is Effect.ALLOW
            rewritten.append(canonical if allowed else _blocked_item(call, decision))
        return _with_output(body, rewritten)

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """``usage.input_tokens``, ``output_tokens`` and ``input_tokens_details.cached_tokens``."""
        return _billed(body)

    def answer_refused(
        self, body: Mapping[str, Any], owed: Mapping[str, tuple[str, str]]
    ) -> tuple[dict[str, Any], int] | None:
        """See :func:`answer_refused`."""
        return answer_refused(body, owed)

    def bound_hosted_calls(
        self, body: Mapping[str, Any], bound: int
    ) -> tuple[Mapping[str, Any], int]:
        """``max_tool_calls`` (it bounds every built-in tool's calls) where a billed tool
        (web search, file search, code interpreter) is declared and it is not set.

        Declared anywhere the provider reads tools (``tools``, input items carrying a
        ``tools`` list), or possibly by a stored ``prompt``, whose tools Warden
        cannot see: that counts as declaring them.
        """
        declared = declared_tools.openai_responses(body)
        if not any(_billed_tool(t) or t.get("type") == "prompt" for t in declared):
            return body, 0
        given = token_count(body.get("max_tool_calls"))
        if given is not None:
            return body, given
        return {**body, "max_tool_calls": bound}, bound

    def prepare_request(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Sent as is: this protocol always reports usage in its streams."""
        return None

    def stream_rewriter(
        self, *, hide_usage: bool = False, choices: int = 1
    ) -> OpenAIResponsesStreamRewriter:
        """A fresh rewriter for one streaming response."""
        return OpenAIResponsesStreamRewriter()


class _State(enum.Enum):
    PASSIVE = "passive"
    HELD = "held"
    PENDING = "pending"  # yielded for a decision, not yet resolved
    DECIDED = "decided"


@dataclass(slots=True)
class _Slot:
    """What the stream showed at one output index (mutable, per stream)."""

    index: int
    state: _State
    added: Mapping[str, Any] | None = None
    done: Mapping[str, Any] | None = None
    deltas: dict[str, list[str]] = field(default_factory=dict)
    finals: dict[str, str] = field(default_factory=dict)
    streamed: bool = True  # False: known only from a snapshot, which carries the verdict
    call: ToolCall | None = None
    item: Any = None  # the canonical item decided on
    rendered: Any = None  # what stands at this index once decided

    def assembled(self) -> Any:
        """The item as the stream states it: the done item, else the added one plus deltas."""
        if self.done is not None:
            return self.done
        item = dict(self.added or {})
        shape = CALL_SHAPES.get(_item_type(item) or "")
        if shape is not None and shape.stream is not None:
            name = shape.stream.field
            if name in self.finals:
                item[name] = self.finals[name]
            elif name in self.deltas:
                item[name] = (_str(item.get(name)) or "") + "".join(self.deltas[name])
        return item


def _violation(message: str) -> StreamViolation:
    return StreamViolation(f"openai.responses stream: {message}")


def _shared_id(item: Any, ids: set[tuple[str, str]]) -> str | None:
    """The ``id`` or ``call_id`` of ``item`` that an earlier item of the answer has
    (noted in ``ids``), or ``None``.

    Frameworks key an item's events and chunks by them (LangChain pins an item id
    to the output it first saw): two calls sharing one are merged into a call
    that no decision saw (``dan`` + ``ger_wipe``).
    """
    if not isinstance(item, Mapping):
        return None
    for name in ("id", "call_id") if not _is_passive(item) else ("id",):
        value = item.get(name)
        if isinstance(value, str) and value:
            if (name, value) in ids:
                return f"{name} {value[:64]!r}"
            ids.add((name, value))
    return None


def shared_id_problem(output: Any) -> str | None:
    """Why a response's ``output`` cannot be decided item by item, or ``None``."""
    if not isinstance(output, list):
        return None
    ids: set[tuple[str, str]] = set()
    for item in output:
        shared = _shared_id(item, ids)
        if shared is not None:
            return f"two output items with the {shared}, which clients merge into one"
    return None


def _index(data: Mapping[str, Any]) -> int:
    index = data.get("output_index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    raise _violation(f"{data.get('type')} event without an integer output_index")


class OpenAIResponsesStreamRewriter(StreamStatus):
    """Rewrites one Responses event stream; see the module docstring."""

    def __init__(self) -> None:
        self._next_seq: int | None = None
        self._slots: dict[int, _Slot] = {}
        self._ids: set[tuple[str, str]] = set()  # items' ids and calls' call ids so far
        self._hosted: dict[int, str] = {}  # outputs the provider bills per call, by index
        self._ended = False  # the SDK's ``[DONE]`` was seen: it reads nothing after
        self._failed = False  # an event the SDK raises on was seen: nor after that
        super().__init__()
        self.response_id: str | None = None
        """The response's id, once an event carrying the response object named it."""

    @property
    def failed(self) -> bool:
        """True once the upstream sent an event an SDK raises on (:func:`ends_stream`)."""
        return self._failed

    # -- feeding ----------------------------------------------------------

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield what may be sent and what to decide."""
        if self._ended:
            return
        if event.data.startswith(_DONE_MARKER):  # the SDK's own test for the end
            self._ended = True
            yield from self._flush()
            yield event
            return
        try:
            data = event_object(event.data, _ENVELOPE)
        except ValueError as exc:
            raise _violation(f"an event that {exc}") from None
        event = as_read(event, data)
        if ends_stream(event, data):
            yield self._fail(event, data)
            return
        kind = data.get("type")
        if not isinstance(kind, str):
            raise _violation("an event without a type")
        if kind in _TERMINAL:
            yield from self._terminal(event, data)
        elif kind in _LIFECYCLE:
            yield from self._lifecycle(event, data, kind)
        elif kind == _ITEM_ADDED:
            yield from self._added(event, data)
        elif kind == _ITEM_DONE:
            yield from self._done(event, data)
        elif kind in _PASSIVE_CONTENT or kind in _CALL_CONTENT:
            yield from self._content(event, data, kind)
        elif kind in _UNBOUND:
            yield self._emit(event, data)
        else:
            yield from self._unknown(event, data)

    def _fail(self, event: SseEvent, data: dict[str, Any]) -> SseEvent:
        """The event that ends the stream, as the agent is to get it: its error fields.

        The SDK raises on it and reads nothing after: the calls still held never
        reach the agent, so they are never decided, and later events are dropped.
        """
        self._ended = self._failed = True
        error = {key: value for key, value in data.items() if key in _ERROR_FIELDS}
        if not data.get("error"):
            # The Python SDK does not raise on it (its name, or an error of {} or []
            # ends it): it reads it by its type, as the error it is.
            error["type"] = "error"
        return self._emit(event, error, changed=error != data)

    def _note_hosted(self, index: int, item: Mapping[str, Any]) -> None:
        kind = _HOSTED_CALLS.get(_item_type(item) or "")
        if kind is not None:
            self._hosted[index] = kind

    def _with_streamed_calls(self, usage: Usage | None) -> Usage | None:
        """``usage`` billing at least the hosted calls the stream showed: a final
        snapshot may carry no ``output`` (the SDK builds it from the done items)."""
        if usage is None or not self._hosted:
            return usage
        counts = Counter(self._hosted.values())
        for kind, count in usage.hosted_calls:
            counts[kind] = max(counts[kind], count)
        return dataclasses.replace(usage, hosted_calls=tuple(sorted(counts.items())))

    def _slot(self, index: int) -> _Slot | None:
        slot = self._slots.get(index)
        if slot is not None and slot.state in (_State.PENDING, _State.DECIDED):
            raise _violation(f"an event for output {index} after its call was decided")
        return slot

    def _added(self, event: SseEvent, data: dict[str, Any]) -> Iterator[StreamItem]:
        index = _index(data)
        item = data.get("item")
        if item is None:
            # The SDK skips an empty added event; so does the agent.
            yield self._emit(event, data)
            return
        if not isinstance(item, dict):
            raise _violation(f"output {index} added with an item that is not an object")
        if self._slot(index) is not None:
            raise _violation(f"output {index} added twice")
        if (shared := _shared_id(item, self._ids)) is not None:
            raise _violation(f"output {index} has the {shared} of an earlier output")
        self._note_hosted(index, item)
        if _is_passive(item):
            self._slots[index] = _Slot(index, _State.PASSIVE)
            yield self._emit(event, data)
            return
        self._slots[index] = _Slot(index, _State.HELD, added=item)

    def _done(self, event: SseEvent, data: dict[str, Any]) -> Iterator[StreamItem]:
        index = _index(data)
        item = data.get("item")
        if not isinstance(item, dict):
            raise _violation(f"output {index} done without an item object")
        slot = self._slot(index)
        self._note_hosted(index, item)
        if _is_passive(item) and (slot is None or slot.state is _State.PASSIVE):
            self._slots[index] = _Slot(index, _State.PASSIVE)
            yield self._emit(event, data)
            return
        if slot is not None and slot.state is _State.PASSIVE:
            raise _violation(f"output {index} was added as text and is done as a call")
        if slot is not None and _is_passive(item):
            raise _violation(f"output {index} was added as a call and is done as text")
        if slot is None:
            slot = self._slots[index] = _Slot(index, _State.HELD)
        slot.done = item
        yield self._ready(slot)

    def _content(self, event: SseEvent, data: dict[str, Any], kind: str) -> Iterator[StreamItem]:
        index = _index(data)
        slot = self._slot(index)
        if slot is None:
            raise _violation(f"{kind} for output {index}, which was never added")
        if slot.state is _State.PASSIVE:
            if kind not in _PASSIVE_CONTENT:
                raise _violation(f"{kind} for output {index}, which is not a call")
            yield self._emit(event, data)
            return
        # A held call: its content is kept for the decision, never forwarded.
        shape = CALL_SHAPES.get(_item_type(slot.added) or "")
        stream = shape.stream if shape is not None else None
        if stream is None or not kind.startswith(f"{stream.prefix}."):
            return
        if kind.endswith(".delta"):
            slot.deltas.setdefault(stream.field, []).append(_str(data.get("delta")) or "")
        elif kind.endswith(".done"):
            slot.finals[stream.field] = _str(data.get(stream.field)) or ""

    def _unknown(self, event: SseEvent, data: dict[str, Any]) -> Iterator[StreamItem]:
        index = data.get("output_index")
        if isinstance(index, int) and not isinstance(index, bool):
            self._slot(index)  # touching a decided call is a violation, known type or not
        if set(data) <= {"type", "sequence_number"}:
            yield self._emit(event, data)  # carries nothing (a keep-alive)
        # Anything else the SDK has no type for is dropped: never forwarded unread.

    def _ready(self, slot: _Slot) -> ToolCall:
        assembled = slot.assembled()
        if isinstance(slot.added, Mapping):  # its own ids were noted when it was added
            own = {(n, slot.added.get(n)) for n in ("id", "call_id")}
            self._ids.difference_update(own)
        if (shared := _shared_id(assembled, self._ids)) is not None:
            raise _violation(f"output {slot.index} has the {shared} of an earlier output")
        slot.item = canonical_item(assembled)
        slot.call = call_of(slot.item, slot.index)
        slot.state = _State.PENDING
        return slot.call

    def _flush(self) -> Iterator[ToolCall]:
        for index in sorted(self._slots):
            slot = self._slots[index]
            if slot.state is _State.HELD:
                yield self._ready(slot)

    # -- snapshots --------------------------------------------------------

    def _lifecycle(self, event: SseEvent, data: dict[str, Any], kind: str) -> Iterator[StreamItem]:
        response = data.get("response")
        if not isinstance(response, dict):
            raise _violation(f"{kind} without a response object")
        self._model = _str(response.get("model")) or self._model
        self.response_id = self.response_id or _str(response.get("id"))
        output = response.get("output")
        if output is None:
            yield self._emit(event, data)
            return
        if not isinstance(output, list):
            raise _violation(f"{kind} with an output that is not a list")
        if kind == _CREATED:
            # The SDK takes this output as the first items, by position.
            yield from self._decide_snapshot(output)
            for index, item in enumerate(output):
                if _is_passive(item) and index not in self._slots:
                    self._slots[index] = _Slot(index, _State.PASSIVE)
        if all(_is_passive(item) for item in output):
            yield self._emit(event, data)
            return
        # Built only now, after the calls above were resolved.
        yield self._emit(event, {**data, "response": self._snapshot(response, output)}, True)

    def _terminal(self, event: SseEvent, data: dict[str, Any]) -> Iterator[StreamItem]:
        kind = data.get("type")
        response = data.get("response")
        if not isinstance(response, dict):
            raise _violation(f"{kind} without a response object")
        output = response.get("output")
        if output is not None and not isinstance(output, list):
            raise _violation(f"{kind} with an output that is not a list")
        self._complete = True
        self._usage = self._with_streamed_calls(_billed(response)) or self._usage
        self._model = _str(response.get("model")) or self._model
        self.response_id = self.response_id or _str(response.get("id"))
        # Calls that never reached their output_item.done, then calls that only
        # the snapshot carries: all are decided before the snapshot goes.
        yield from self._flush()
        if output is None:
            # The SDK builds the final output from the done items Warden sent.
            yield self._emit(event, data)
            return
        yield from self._decide_snapshot(output)
        if not any(self._decided(i) for i in range(len(output))):
            yield self._emit(event, data)  # nothing but passive items
            return
        # Built only now, after every call above was resolved.
        yield self._emit(event, {**data, "response": self._snapshot(response, output)}, True)

    def _decided(self, index: int) -> bool:
        slot = self._slots.get(index)
        return slot is not None and slot.state is _State.DECIDED

    def _decide_snapshot(self, output: list[Any]) -> Iterator[ToolCall]:
        """Decide each call in ``output`` at a position the stream has not decided."""
        for index, item in enumerate(output):
            if _is_passive(item):
                continue
            slot = self._slots.get(index)
            if slot is not None and slot.state is _State.DECIDED:
                continue
            if slot is not None and slot.state is _State.HELD:
                raise _violation(f"a snapshot shows output {index} while it is streaming")
            slot = self._slots[index] = _Slot(index, _State.HELD, done=item, streamed=False)
            yield self._ready(slot)

    def _snapshot(self, response: Mapping[str, Any], output: list[Any]) -> dict[str, Any]:
        """The response with every position the stream decided shown as decided.

        Calls not decided yet (a mid-stream snapshot) are left out until they are.
        """
        rewritten: list[Any] = []
        for index, item in enumerate(output):
            slot = self._slots.get(index)
            if slot is not None and slot.state is _State.DECIDED:
                rewritten.append(slot.rendered)
            elif _is_passive(item):
                rewritten.append(item)
        return _with_output(response, rewritten)

    # -- resolving --------------------------------------------------------

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """The decided call's canonical events (allowed), or a message explaining the block."""
        slot = self._slots.get(call.index)
        if slot is None or slot.state is not _State.PENDING or slot.call is None:
            return []
        if slot.call.key != call.key:
            return []
        slot.state = _State.DECIDED
        allowed = decision.enforced is Effect.ALLOW
        slot.rendered = slot.item if allowed else _blocked_item(slot.call, decision)
        if not slot.streamed:
            return []  # known only from a snapshot, which carries the verdict
        payloads = _call_events(slot.index, slot.item) if allowed else _message_events(slot)
        return [self._new_event(payload) for payload in payloads]

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield the calls still held, which never closed (unless an
        error ended the stream first: they never reached the agent)."""
        if not self._failed:
            yield from self._flush()

    # -- numbering --------------------------------------------------------

    def _emit(self, event: SseEvent, data: dict[str, Any], changed: bool = False) -> SseEvent:
        """``event`` with the next sequence number; the same object when nothing changes."""
        seq = data.get("sequence_number")
        if self._next_seq is None:
            self._next_seq = _int(seq)
        number = self._next_seq
        self._next_seq += 1
        if "sequence_number" in data and seq != number:
            data = {**data, "sequence_number": number}
            changed = True
        if not changed:
            return event
        return SseEvent(data=dumps(data), event=event.event, id=event.id)

    def _new_event(self, data: dict[str, Any]) -> SseEvent:
        number = self._next_seq if self._next_seq is not None else 0
        self._next_seq = number + 1
        data["sequence_number"] = number
        return SseEvent(data=dumps(data), event=data["type"])


def _call_events(index: int, item: Any) -> list[dict[str, Any]]:
    """The events of one complete call item, built from the decided item alone.

    Where the SDK accumulates a text field from deltas, the item is added with
    that field empty and the whole decided text follows as one delta, so the
    accumulated value, the ``.done`` event and the done item all agree.
    ``sequence_number`` is a placeholder; :meth:`_new_event` assigns it.
    """
    shape = CALL_SHAPES.get(_item_type(item) or "")
    stream = shape.stream if shape is not None else None
    text = item.get(stream.field) if stream is not None and isinstance(item, Mapping) else None
    if stream is None or not isinstance(text, str):
        return [
            {"type": _ITEM_ADDED, "sequence_number": 0, "output_index": index, "item": item},
            {"type": _ITEM_DONE, "sequence_number": 0, "output_index": index, "item": item},
        ]
    where = {"item_id": _str(item.get("id")) or "", "output_index": index}
    started = {**item, stream.field: ""}
    return [
        {"type": _ITEM_ADDED, "sequence_number": 0, "output_index": index, "item": started},
        {"type": f"{stream.prefix}.delta", "sequence_number": 0, **where, "delta": text},
        {"type": f"{stream.prefix}.done", "sequence_number": 0, **where, stream.field: text},
        {"type": _ITEM_DONE, "sequence_number": 0, "output_index": index, "item": item},
    ]


def _message_events(slot: _Slot) -> list[dict[str, Any]]:
    """The events of the one-part message item that stands for a blocked call."""
    item = slot.rendered
    msg_id, text = item["id"], item["content"][0]["text"]
    index = slot.index
    where = {"item_id": msg_id, "output_index": index, "content_index": 0}
    started = {**_message_item(msg_id, text), "status": "in_progress", "content": []}
    return [
        {"type": _ITEM_ADDED, "sequence_number": 0, "output_index": index, "item": started},
        {
            "type": "response.content_part.added",
            "sequence_number": 0,
            **where,
            "part": _text_part(""),
        },
        {
            "type": "response.output_text.delta",
            "sequence_number": 0,
            **where,
            "delta": text,
            "logprobs": [],
        },
        {
            "type": "response.output_text.done",
            "sequence_number": 0,
            **where,
            "text": text,
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "sequence_number": 0,
            **where,
            "part": _text_part(text),
        },
        {"type": _ITEM_DONE, "sequence_number": 0, "output_index": index, "item": item},
    ]
