"""Anthropic Messages (``POST /v1/messages``): requests, responses, streams.

Every content block is read by its ``type``, the field the SDK dispatches on.
A block is either passive (an allowlist of types that carry no action the
agent executes: text, thinking, tool results, ...), a call (``tool_use``,
``server_tool_use``, ``mcp_tool_use``, each with its own
:class:`~warden.model.ActionKind`), or of a type Warden does not know, which
becomes an ``unknown_call`` whose arguments are the whole block. Calls are
keyed ``b<index>`` by their position in ``content``, never by their ``id``.

An allowed call is rendered again from the decided :class:`ToolCall`: its
``type``, ``id``, ``name`` and ``input`` exactly as decided, plus the
non-argument fields the SDK types define (``caller``, ``toolset_name``,
``server_name``). A call not allowed becomes a text block at the same index
saying why, so indexes stay as sent, which the SDK relies on: it appends a
block on every ``content_block_start`` and addresses deltas by index.

Streams are checked against the order the SDK accumulates: ``message_start``
first (its ``content`` may already hold calls: they are decided before it is
sent), then blocks one at a time, each ``content_block_start`` at the next
index. A call's block is held and decided when it ends (its stop, the next
block, ``message_delta`` or the end of the stream), then sent as one start,
one ``input_json_delta`` with the full decided input, and one stop (for
``mcp_tool_use``, which the non-beta SDK builds from the start alone, the
input is in the start). Anything
that later touches a decided call, or an event of a known type that cannot
be parsed or is out of order, raises :class:`~warden.errors.StreamViolation`.
The SDK reads events by their ``event:`` name and their data's ``type``: an
event whose two disagree is a violation, and events it never reads as part
of the message (unnamed, or of an unknown type) are dropped, not forwarded.
"""

from __future__ import annotations

import dataclasses
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
    token_count,
)
from warden.protocols.base import ParsedRequest, StreamItem, blocked_message
from warden.protocols.sse import SseEvent

__all__ = ["CALL_BLOCKS", "PASSIVE_BLOCKS", "AnthropicMessagesAdapter", "AnthropicStreamRewriter"]

PASSIVE_BLOCKS: Final = frozenset(
    {
        "text",
        "thinking",
        "redacted_thinking",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "advisor_tool_result",
        "mcp_tool_result",
        "mcp_tool_listing",
        "container_upload",
        "compaction",
        "fallback",
    }
)
"""Block types (``anthropic.types`` and ``anthropic.types.beta``) that carry no call: sent as is."""

CALL_BLOCKS: Final[Mapping[str, ActionKind]] = {
    "tool_use": ActionKind.TOOL_CALL,
    "server_tool_use": ActionKind.HOSTED_TOOL_CALL,
    "mcp_tool_use": ActionKind.MCP_CALL,
}
"""Block types that carry a call, and the kind each is decided as. Any other type is unknown."""

_EXTRAS: Final[Mapping[str, tuple[str, ...]]] = {
    "tool_use": ("caller", "toolset_name"),
    "server_tool_use": ("caller",),
    "mcp_tool_use": ("server_name",),
}
"""Fields besides ``id``, ``name`` and ``input`` that the SDK types define, kept on re-render."""

_DELTA_INPUT: Final = frozenset({"tool_use", "server_tool_use"})
"""Call types every SDK accumulator builds from ``input_json_delta`` (``mcp_tool_use`` only
the beta one): others are streamed with their decided ``input`` in the start event."""

_REQUEST: Final = Envelope(
    names=frozenset(
        {
            *("model", "messages", "system", "max_tokens", "tools", "tool_choice", "stream"),
            *("mcp_servers", "type", "name", "input_schema", "url", "authorization_token"),
            *("tool_configuration", "enabled", "allowed_tools", "mcp_server_name"),
            *("default_config", "configs"),
            # What a spend cap prices the call by.
            *("speed", "max_uses"),
        }
    ),
    # Not ``configs``: its keys are tool names.
    inside=frozenset({"tools", "mcp_servers", "tool_configuration", "default_config"}),
)
"""A Messages request, down to the tools and MCP servers it declares."""
_ENVELOPE: Final = Envelope(
    names=frozenset(
        {
            *("id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"),
            *("name", "input", "text", "index", "message", "content_block", "delta"),
            *("partial_json", "caller", "toolset_name", "server_name", "tool_use_id"),
            *("citations", "thinking", "signature", "data", "container", "stop_details"),
        }
    ),
    inside=frozenset({"message", "content", "content_block", "delta"}),
)
"""Messages and their stream events, down to each block's name and input."""

_MISSING: Final = object()


def _text(content: Any) -> str:
    """Text of a ``tool_result`` content: a string, or its text blocks joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block["text"]
            for block in content
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        )
    return ""


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _input_arguments(value: Any) -> tuple[str, Mapping[str, Any] | None]:
    """``(raw, arguments)`` of an ``input`` value: only an object is arguments (canonical)."""
    if isinstance(value, dict):
        return parse_arguments(value)
    return ("" if value is _MISSING else dumps(value)), None


def _json_arguments(raw: str) -> tuple[str, Mapping[str, Any] | None]:
    """``(raw, arguments)`` of streamed input JSON; canonical once it parses to an object."""
    raw, arguments = parse_arguments(raw)
    return (raw if arguments is None else dumps(arguments)), arguments


def _classify(block: Any, position: int, ordinal: int) -> ToolCall | None:
    """The call a content block carries, or ``None`` for a passive block.

    ``arguments`` of a known call are its ``input``; of a block of unknown
    type, the whole block, so a policy that allows it saw all the agent gets.
    """
    obj: Mapping[str, Any] = block if isinstance(block, dict) else {}
    wire = obj.get("type")
    if isinstance(wire, str) and wire in PASSIVE_BLOCKS:
        return None
    kind = CALL_BLOCKS.get(wire) if isinstance(wire, str) else None
    if kind is not None:
        raw, arguments = _input_arguments(obj.get("input", _MISSING))
    elif isinstance(block, dict):
        raw, arguments = parse_arguments(block)
    else:
        raw, arguments = dumps(block), None
    return _one_reading(
        ToolCall(
            call_id=_str(obj.get("id")),
            name=_call_name(obj, wire),
            raw_arguments=raw,
            arguments=arguments,
            index=ordinal,
            key=f"b{position}",
            kind=kind or ActionKind.UNKNOWN_CALL,
            wire_type=_str(wire),
        ),
        obj,
    )


def _one_reading(call: ToolCall, block: Mapping[str, Any]) -> ToolCall:
    """``call``, or an unknown call when clients would run another action than its name.

    The Vercel AI SDK runs a toolset member with ``{action: name, ...input}``,
    so an ``input.action`` other than the member's name wins there: decided as
    ``computer.screenshot``, it would perform ``left_click``. Such a call is
    decided as an unknown call (denied by default), whose arguments are the
    whole block with its decided ``input``: an allowed one is rendered from
    them, so the policy saw all the agent gets.
    """
    toolset = block.get("toolset_name")
    member = block.get("name")
    if not (isinstance(toolset, str) and toolset and call.wire_type == "tool_use"):
        return call
    if call.arguments is None or call.arguments.get("action", member) == member:
        return call
    raw, whole = parse_arguments({**block, "input": dict(call.arguments)})
    return dataclasses.replace(
        call, kind=ActionKind.UNKNOWN_CALL, raw_arguments=raw, arguments=whole
    )


def _call_name(block: Mapping[str, Any], wire: object) -> str:
    """The name a call is decided by: a toolset member's is ``<toolset>.<name>``.

    The SDK's tool runner dispatches a ``tool_use`` on ``toolset_name`` and
    ``name`` together (the browser's ``navigate`` is not the agent's own), as
    the Responses adapter joins ``namespace`` and ``name``.
    """
    name = _str(block.get("name"))
    toolset = block.get("toolset_name") if wire == "tool_use" else None
    if isinstance(toolset, str) and toolset and toolset != name:
        return f"{toolset}.{name}"
    return name or _str(wire)


def _call_block(call: ToolCall, original: Mapping[str, Any], arguments: Any) -> dict[str, Any]:
    """A known call's block built from the decided call, with ``input`` = ``arguments``."""
    name = original.get("name")
    if not (isinstance(name, str) and _call_name(original, call.wire_type) == call.name):
        name = call.name  # the decided name is the block's own (no toolset)
    block: dict[str, Any] = {"type": call.wire_type, "id": call.call_id, "name": name}
    for name in _EXTRAS.get(call.wire_type, ()):
        if name in original:
            block[name] = original[name]
    if arguments is not _MISSING:
        block["input"] = arguments
    return block


def _rendered(call: ToolCall, original: Any) -> Any:
    """An allowed call as the agent gets it, built from the decided call.

    Arguments that are not an object are only ever allowed in observe mode;
    then the block goes out with the ``input`` it came with.
    """
    if call.kind is ActionKind.UNKNOWN_CALL:
        return dict(call.arguments) if call.arguments is not None else original
    source: Mapping[str, Any] = original if isinstance(original, dict) else {}
    if call.arguments is not None:
        return _call_block(call, source, dict(call.arguments))
    return _call_block(call, source, source.get("input", _MISSING))


def _blocked(call: ToolCall, decision: Decision) -> dict[str, Any]:
    return {"type": "text", "text": blocked_message(call, decision)}


class AnthropicMessagesAdapter:
    """The ``anthropic.messages`` protocol: ``POST /v1/messages``."""

    name = "anthropic.messages"
    output_bound = "max_tokens"

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Model, stream flag and ``tool_result`` blocks, named from earlier ``tool_use`` blocks."""
        refuse_misspelled_request(body, _REQUEST)
        names: dict[str, str] = {}
        results: list[ToolResult] = []
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if not isinstance(content, list):
                continue
            role = message.get("role")
            for block in content:
                if not isinstance(block, dict):
                    continue
                if role == "assistant" and block.get("type") == "tool_use":
                    call_id, name = block.get("id"), _call_name(block, "tool_use")
                    if isinstance(call_id, str) and name != "tool_use":
                        names[call_id] = name
                elif role == "user" and block.get("type") == "tool_result":
                    call_id = block.get("tool_use_id")
                    if isinstance(call_id, str):
                        results.append(
                            ToolResult(
                                call_id=call_id,
                                content=_text(block.get("content")),
                                is_error=block.get("is_error") is True,
                                tool=names.get(call_id),
                            )
                        )
        model = body.get("model")
        return ParsedRequest(
            model=model if isinstance(model, str) else None,
            stream=body.get("stream") is True,
            tool_results=tuple(results),
            tools=declared_tools.anthropic(body),
            arguments=declared_arguments.anthropic(body),
            max_output_tokens=token_count(body.get("max_tokens")),
            rate=tier_rate(body.get("speed")),
        )

    def tool_calls(self, body: Mapping[str, Any]) -> list[ToolCall]:
        """Every block in ``content`` that is not passive, in order, keyed ``b<index>``."""
        content = body.get("content")
        calls: list[ToolCall] = []
        for position, block in enumerate(content if isinstance(content, list) else ()):
            call = _classify(block, position, len(calls))
            if call is not None:
                calls.append(call)
        return calls

    def misspelled_key(self, body: Mapping[str, Any]) -> str | None:
        """A key a case-blind client would read as a message's field (malformed)."""
        return misspelled_key(body, _ENVELOPE)

    def problem(self, body: Mapping[str, Any]) -> str | None:
        """Why the response cannot be decided as it stands, or ``None``."""
        key = self.misspelled_key(body)
        return misspelled(key) if key is not None else None

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """A copy where each allowed call is rendered from its decision, each other one is text.

        ``decisions`` is keyed by :attr:`ToolCall.key`; a call missing from it
        is blocked. The input is not mutated; passive blocks are shared with it.
        """
        out = dict(body)
        content = body.get("content")
        if not isinstance(content, list):
            return out
        new_content: list[Any] = []
        ordinal = 0
        kept = False
        for position, block in enumerate(content):
            call = _classify(block, position, ordinal)
            if call is None:
                new_content.append(block)
                continue
            ordinal += 1
            decision = decisions.get(call.key, NO_DECISION)
            if decision.enforced is Effect.ALLOW:
                new_content.append(_rendered(call, block))
                kept = kept or call.wire_type == "tool_use"
            else:
                new_content.append(_blocked(call, decision))
        out["content"] = new_content
        if not kept and out.get("stop_reason") == "tool_use":
            out["stop_reason"] = "end_turn"
        return out

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """``usage.input_tokens`` / ``output_tokens``, cache reads and cache writes."""
        usage = body.get("usage")
        if not isinstance(usage, dict) or not _counted(usage):
            return None  # spent as held: malformed counts must not settle at nothing
        return answered_by(_usage(usage), body.get("model"))

    def answer_refused(
        self, body: Mapping[str, Any], owed: Mapping[str, tuple[str, str]]
    ) -> tuple[dict[str, Any], int] | None:
        """None: the agent sends the whole conversation, and the provider keeps no answer."""
        return None

    def bound_hosted_calls(
        self, body: Mapping[str, Any], bound: int
    ) -> tuple[Mapping[str, Any], int]:
        """``max_uses`` on each web search tool that sets none; the sum of them."""
        tools = body.get("tools")
        if not isinstance(tools, list):
            return body, 0
        most, bounded, changed = 0, [], False
        for declared in tools:
            tool = declared
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind.startswith("web_search"):
                uses = token_count(tool.get("max_uses"))
                if uses is None:
                    tool, uses, changed = {**tool, "max_uses": bound}, bound, True
                most += uses
            bounded.append(tool)
        return ({**body, "tools": bounded} if changed else body), most

    def prepare_request(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Sent as is: this protocol always reports usage in its streams."""
        return None

    def stream_rewriter(
        self, *, hide_usage: bool = False, choices: int = 1
    ) -> AnthropicStreamRewriter:
        """A fresh rewriter for one ``stream: true`` response."""
        return AnthropicStreamRewriter()


def _usage(usage: Mapping[str, Any]) -> Usage:
    five, hour = _cache_writes(usage) or (0, 0)
    return Usage(
        input_tokens=token_count(usage.get("input_tokens")) or 0,
        output_tokens=token_count(usage.get("output_tokens")) or 0,
        cached_input_tokens=token_count(usage.get("cache_read_input_tokens")) or 0,
        cache_write_tokens=five,
        cache_write_1h_tokens=hour,
        rate=tier_rate(usage.get("speed")),
        hosted_calls=_searches(_web_searches(usage)),
    )


def _web_searches(usage: Mapping[str, Any]) -> int | None:
    """Web searches the provider ran (``server_tool_use.web_search_requests``), billed apart."""
    server = usage.get("server_tool_use")
    return token_count(server.get("web_search_requests")) if isinstance(server, dict) else None


def _searches(count: int | None) -> tuple[tuple[str, int], ...]:
    return (("web_search", count),) if count else ()


def _counted(usage: Mapping[str, Any]) -> bool:
    """Whether a whole answer's usage gives both counts as non-negative integers."""
    return (
        token_count(usage.get("input_tokens")) is not None
        and token_count(usage.get("output_tokens")) is not None
    )


def _cache_writes(usage: Mapping[str, Any]) -> tuple[int, int] | None:
    """Input written to the prompt cache, for five minutes and for an hour (``None``: not
    given). ``input_tokens`` leaves it out: unread, a prompt behind a cache breakpoint
    that never hits again would cost nothing."""
    total = token_count(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    five = hour = None
    if isinstance(split, dict):
        five = token_count(split.get("ephemeral_5m_input_tokens"))
        hour = token_count(split.get("ephemeral_1h_input_tokens"))
    if total is None and five is None and hour is None:
        return None
    hour = hour or 0
    # The total is the provider's count; a split that says more than it wins.
    total = max(total or 0, (five or 0) + hour)
    return total - hour, hour


_PASSED: Final = frozenset({"ping", "error"})
"""Events the SDK skips (``ping``) or raises on (``error``); their data is read all the same."""
_EVENTS: Final = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    }
)
"""The event types the SDK accumulates into a message (``RawMessageStreamEvent``)."""
_READ: Final = _EVENTS | _PASSED


@dataclass(slots=True)
class _Held:
    """The open call block: its start and input deltas, held until decided (mutable)."""

    position: int
    block: Any  # content_block as sent
    partial_json: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    """A call handed out for decision; ``decision`` is set by ``resolve`` (mutable)."""

    call: ToolCall
    position: int
    block: Any
    in_message_start: bool
    decision: Decision | None = None


def _index(obj: Mapping[str, Any]) -> int:
    index = obj.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise StreamViolation(f"{obj.get('type')} without an integer index")
    return index


class AnthropicStreamRewriter(StreamStatus):
    """Rewrites one Messages stream (``event: message_start`` ... ``event: message_stop``).

    ``ping`` and ``error`` events, passive blocks and their deltas, and
    message events without calls are yielded unchanged (the same object) as
    soon as they are fed. A call block is held until decided.

    An ``error`` event ends the stream, as it does for the SDK, which raises
    on it and reads nothing after: the call block still held is dropped
    undecided, :attr:`failed` tells the driver to stop, and any later event
    but a ping or an error is a violation.
    """

    def __init__(self) -> None:
        self._started = False
        self._finished = False  # message_delta seen: no block event may follow
        self._final_usage = False  # message_delta carried usage: the counts are final
        self._input_counted = False  # an input count came as a non-negative integer
        self._stopped = False  # message_stop seen
        self._count = 0  # blocks the SDK holds, i.e. the index the next block must have
        self._calls: set[int] = set()  # positions holding a call
        self._held: _Held | None = None
        self._pending: dict[str, _Pending] = {}
        self._ordinal = 0
        self._allowed = False
        self._failed = False
        super().__init__()

    @property
    def failed(self) -> bool:
        """True once the upstream sent an ``error`` event: the agent's SDK raised there."""
        return self._failed

    @property
    def usage(self) -> Usage | None:
        """The answer's usage once final (``message_delta``), else ``None``.

        ``message_start`` carries counts too, but its output is a token or two: a
        stream the agent cut after reading most of it would be billed at its start.
        Without final counts, a spend cap keeps what the call held.
        """
        return answered_by(self._usage, self._model) if self._final_usage else None

    @staticmethod
    def _read(event: SseEvent) -> tuple[SseEvent, dict[str, Any]] | None:
        """The event as Warden read it, and its data; ``None`` for one to drop.

        Pings and errors are read too: some clients (the Vercel AI SDK) go by the
        data's type, not the event's name, and would run a ``tool_use`` start
        named ``ping``.
        """
        name = event.event
        if name is None or name not in _READ or (not event.data and name not in _PASSED):
            return None
        if not event.data:
            return event, {}  # a ping or error with no data: nothing to read
        try:
            obj = event_object(event.data, _ENVELOPE)
        except ValueError as exc:
            raise StreamViolation(f"{name} event {exc}") from None
        if obj.get("type") != name:
            raise StreamViolation(f"{name} event whose data is not a {name}")
        return as_read(event, obj), obj

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield events to send and calls to decide.

        Raises :class:`StreamViolation` for an event the SDK would read that
        cannot be parsed, is out of order, or touches a decided call.
        """
        name = event.event
        read = self._read(event)
        if read is None or name is None:
            return  # the SDK never accumulates it into the message: dropped
        event, obj = read
        if name in _PASSED:
            if name == "error":
                # The SDK raises here: the block still held never reaches the agent.
                self._failed = True
                self._held = None
            yield event  # the SDK skips pings and raises on errors: no call is read
            return
        if self._failed:
            raise StreamViolation(f"{name} after an error event")
        if name == "message_start":
            yield from self._message_start(event, obj)
            return
        if not self._started or self._stopped:
            raise StreamViolation(f"{name} outside a message")
        if name in ("message_delta", "message_stop"):
            yield from self._close()
            self._finished = True
            if name == "message_stop":
                self._stopped = True
                self._complete = True
                yield event
            else:
                yield self._message_delta(event, obj)
            return
        if self._finished:
            raise StreamViolation(f"{name} after message_delta")
        if name == "content_block_start":
            yield from self._block_start(event, obj)
        else:
            yield from self._block_event(event, obj, name)

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """Events for the call at ``call.key``: rendered from it if allowed, else text saying why.

        A call found in ``message_start`` is rendered into that event, which
        is sent once all its calls are resolved; its ``resolve`` returns nothing.
        """
        pending = self._pending.get(call.key)
        if pending is None or pending.decision is not None:
            return []
        if pending.in_message_start:
            pending.decision = decision
            return []
        del self._pending[call.key]
        call = pending.call
        if decision.enforced is Effect.ALLOW:
            self._allowed = self._allowed or call.wire_type == "tool_use"
            return self._allowed_events(call, pending.position, pending.block)
        index = pending.position
        text = blocked_message(call, decision)
        return [
            _start(index, {"type": "text", "text": ""}),
            _delta(index, {"type": "text_delta", "text": text}),
            _stop(index),
        ]

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield the call block that never closed."""
        yield from self._close()

    def _allowed_events(self, call: ToolCall, index: int, block: Any) -> list[SseEvent]:
        if call.kind is ActionKind.UNKNOWN_CALL:
            return [_start(index, _rendered(call, block)), _stop(index)]
        source: Mapping[str, Any] = block if isinstance(block, dict) else {}
        if call.wire_type not in _DELTA_INPUT:
            return [_start(index, _rendered(call, block)), _stop(index)]
        # As the API sends it: the SDK takes ``input`` from the start, replaced by the
        # deltas' JSON once there is any, so one delta with the decided JSON is exactly that.
        out = [_start(index, _call_block(call, source, {}))]
        if call.raw_arguments:
            out.append(
                _delta(index, {"type": "input_json_delta", "partial_json": call.raw_arguments})
            )
        out.append(_stop(index))
        return out

    def _message_start(self, event: SseEvent, obj: dict[str, Any]) -> Iterator[StreamItem]:
        if self._started:
            raise StreamViolation("a second message_start")
        self._started = True
        message = obj.get("message")
        if not isinstance(message, dict):
            raise StreamViolation("message_start without a message")
        content = message.get("content", [])
        if not isinstance(content, list):
            raise StreamViolation("message_start whose content is not a list")
        model = message.get("model")
        if isinstance(model, str):
            self._model = model
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage(usage)
            self._input_counted = token_count(usage.get("input_tokens")) is not None
        self._count = len(content)
        found: list[_Pending] = []
        for position, block in enumerate(content):
            call = _classify(block, position, self._ordinal)
            if call is not None:
                self._ordinal += 1
                self._calls.add(position)
                found.append(_Pending(call, position, block, in_message_start=True))
        if not found:
            yield event
            return
        for pending in found:
            self._pending[pending.call.key] = pending
            yield pending.call
        new_content = list(content)
        for pending in found:
            del self._pending[pending.call.key]
            decision = pending.decision or NO_DECISION
            if decision.enforced is Effect.ALLOW:
                self._allowed = self._allowed or pending.call.wire_type == "tool_use"
                new_content[pending.position] = _rendered(pending.call, pending.block)
            else:
                new_content[pending.position] = _blocked(pending.call, decision)
        data = {**obj, "message": {**message, "content": new_content}}
        yield SseEvent(data=dumps(data), event=event.event, id=event.id)

    def _block_start(self, event: SseEvent, obj: dict[str, Any]) -> Iterator[StreamItem]:
        index = _index(obj)
        if index != self._count:
            # The SDK appends every start: any other index names a block it does not hold there.
            raise StreamViolation(f"content_block_start at index {index}, expected {self._count}")
        yield from self._close()  # blocks come one at a time: the open one is complete
        self._count += 1
        block = obj.get("content_block")
        wire = block.get("type") if isinstance(block, dict) else None
        if isinstance(wire, str) and wire in PASSIVE_BLOCKS:
            yield event
            return
        self._calls.add(index)
        self._held = _Held(position=index, block=block)

    def _block_event(self, event: SseEvent, obj: dict[str, Any], name: str) -> Iterator[StreamItem]:
        index = _index(obj)
        if not 0 <= index < self._count:
            raise StreamViolation(f"{name} for block {index}, which was never started")
        held = self._held
        if held is None or held.position != index:
            if index in self._calls:
                raise StreamViolation(f"{name} for block {index}, a call already decided")
            yield event  # a passive block's own event
            return
        if name == "content_block_stop":
            yield from self._close()
            return
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            raise StreamViolation(f"content_block_delta for block {index} without a delta")
        if delta.get("type") == "input_json_delta":
            partial = delta.get("partial_json")
            if not isinstance(partial, str):
                raise StreamViolation(f"input_json_delta for block {index} without partial_json")
            held.partial_json.append(partial)
        # Other deltas change nothing the SDK assembles for a call: the render replaces them.

    def _close(self) -> Iterator[ToolCall]:
        held, self._held = self._held, None
        if held is None:
            return
        call = _classify(held.block, held.position, self._ordinal)
        if call is None:  # cannot happen: passive blocks are never held
            return
        self._ordinal += 1
        raw = "".join(held.partial_json)
        if raw and call.kind is not ActionKind.UNKNOWN_CALL:
            # Input deltas replace the start's input in the SDK (only once there is any text).
            raw_arguments, arguments = _json_arguments(raw)
            call = dataclasses.replace(call, raw_arguments=raw_arguments, arguments=arguments)
            call = _one_reading(call, held.block)
        self._pending[call.key] = _Pending(call, held.position, held.block, in_message_start=False)
        yield call

    def _message_delta(self, event: SseEvent, obj: dict[str, Any]) -> SseEvent:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # Final only with both counts to settle on (the input from message_start or
            # here); else the call is spent as held.
            self._input_counted |= token_count(usage.get("input_tokens")) is not None
            self._final_usage = (
                self._input_counted and token_count(usage.get("output_tokens")) is not None
            )
            # Counts here are running totals; absent ones keep the message_start value.
            current = self._usage or Usage()
            output = token_count(usage.get("output_tokens"))
            given = token_count(usage.get("input_tokens"))
            cached = token_count(usage.get("cache_read_input_tokens"))
            written = _cache_writes(usage)
            searches = _web_searches(usage)
            self._usage = dataclasses.replace(
                current,
                input_tokens=current.input_tokens if given is None else given,
                output_tokens=current.output_tokens if output is None else output,
                cached_input_tokens=current.cached_input_tokens if cached is None else cached,
                cache_write_tokens=current.cache_write_tokens if written is None else written[0],
                cache_write_1h_tokens=(
                    current.cache_write_1h_tokens if written is None else written[1]
                ),
                hosted_calls=current.hosted_calls if searches is None else _searches(searches),
                rate=max(current.rate, tier_rate(usage.get("speed"))),
            )
        delta = obj.get("delta")
        # Read only now: the calls closed before this event have been resolved.
        if isinstance(delta, dict) and delta.get("stop_reason") == "tool_use" and not self._allowed:
            out = dict(obj)
            out["delta"] = {**delta, "stop_reason": "end_turn"}
            return SseEvent(data=dumps(out), event=event.event, id=event.id)
        return event


def _event(name: str, data: Mapping[str, Any]) -> SseEvent:
    return SseEvent(data=dumps({"type": name, **data}), event=name)


def _start(index: int, block: Any) -> SseEvent:
    return _event("content_block_start", {"index": index, "content_block": block})


def _delta(index: int, delta: Mapping[str, Any]) -> SseEvent:
    return _event("content_block_delta", {"index": index, "delta": delta})


def _stop(index: int) -> SseEvent:
    return _event("content_block_stop", {"index": index})
