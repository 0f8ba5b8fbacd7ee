"""Anthropic Messages (``POST /v1/messages``): requests, responses, streams.

Tool calls are ``tool_use`` content blocks. A stream sends content blocks one
after another (``content_block_start``, deltas, ``content_block_stop``), so a
held ``tool_use`` block is complete at its stop event, and is decided before
the next block is read. A call that is not allowed becomes a text block at the
same index; released blocks keep their index. Indexes therefore stay
contiguous without renumbering, which the official SDK relies on: it appends
blocks on ``content_block_start`` and addresses deltas by index.

``server_tool_use`` and ``mcp_tool_use`` blocks are run by Anthropic, not by
the agent, and are passed through like other non-tool blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from warden.model import Decision, Effect, ToolCall, ToolResult, Usage
from warden.protocols._wire import (
    NO_DECISION,
    StreamStatus,
    dumps,
    loads_or_none,
    parse_arguments,
    token_count,
)
from warden.protocols.base import ParsedRequest, StreamItem, blocked_message
from warden.protocols.sse import SseEvent

__all__ = ["AnthropicMessagesAdapter", "AnthropicStreamRewriter"]


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


def _tool_call(block: Mapping[str, Any], position: int) -> ToolCall:
    arguments = block.get("input")
    return ToolCall(
        call_id=_str(block.get("id")),
        name=_str(block.get("name")),
        raw_arguments=dumps(arguments),
        arguments=arguments if isinstance(arguments, dict) else None,
        index=position,
    )


def _is_tool_use(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "tool_use"


class AnthropicMessagesAdapter:
    """The ``anthropic.messages`` protocol: ``POST /v1/messages``."""

    name = "anthropic.messages"

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Model, stream flag and ``tool_result`` blocks, named from earlier ``tool_use`` blocks."""
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
                    call_id, name = block.get("id"), block.get("name")
                    if isinstance(call_id, str) and isinstance(name, str):
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
        )

    def tool_calls(self, body: Mapping[str, Any]) -> list[ToolCall]:
        """The ``tool_use`` blocks in order; ``raw_arguments`` is the compact JSON of ``input``."""
        content = body.get("content")
        blocks = (
            [block for block in content if _is_tool_use(block)] if isinstance(content, list) else []
        )
        return [_tool_call(block, i) for i, block in enumerate(blocks)]

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """A copy where each non-allowed ``tool_use`` block is a text block saying why.

        The input is not mutated; parts that need no change are shared with it.
        """
        out = dict(body)
        content = body.get("content")
        if not isinstance(content, list):
            return out
        new_content: list[Any] = []
        kept = 0
        position = 0
        for block in content:
            if not _is_tool_use(block):
                new_content.append(block)
                continue
            call = _tool_call(block, position)
            position += 1
            decision = decisions.get(call.call_id, NO_DECISION)
            if decision.enforced is Effect.ALLOW:
                new_content.append(block)
                kept += 1
            else:
                new_content.append({"type": "text", "text": blocked_message(call, decision)})
        out["content"] = new_content
        if not kept and out.get("stop_reason") == "tool_use":
            out["stop_reason"] = "end_turn"
        return out

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """``usage.input_tokens`` / ``output_tokens`` / ``cache_read_input_tokens``."""
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return None
        return Usage(
            input_tokens=token_count(usage.get("input_tokens")) or 0,
            output_tokens=token_count(usage.get("output_tokens")) or 0,
            cached_input_tokens=token_count(usage.get("cache_read_input_tokens")) or 0,
        )

    def prepare_request(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Sent as is: this protocol always reports usage in its streams."""
        return None

    def stream_rewriter(self, *, hide_usage: bool = False) -> AnthropicStreamRewriter:
        """A fresh rewriter for one ``stream: true`` response."""
        return AnthropicStreamRewriter()


@dataclass(slots=True)
class _HeldBlock:
    """A ``tool_use`` block whose events are held until it is decided (mutable, per stream)."""

    index: Any  # as sent: an int on a well-formed stream
    position: int
    call_id: str
    name: str
    start_input: Any
    events: list[SseEvent] = field(default_factory=list)
    partial_json: list[str] = field(default_factory=list)


def _block_key(obj: Mapping[str, Any]) -> int | None:
    index = obj.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


class AnthropicStreamRewriter(StreamStatus):
    """Rewrites one Messages stream (``event: message_start`` ... ``event: message_stop``).

    Every event except a ``tool_use`` block's own is yielded unchanged (the same
    event object) as soon as it is fed: text, thinking, ``ping``, ``error`` and
    unknown events. An event is told apart by its data's ``type``, falling back
    to the SSE event name.
    """

    def __init__(self) -> None:
        self._open: dict[int | None, _HeldBlock] = {}
        self._pending: list[tuple[ToolCall, _HeldBlock]] = []
        self._calls = 0
        self._allowed = False
        super().__init__()

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield events to send and calls to decide."""
        obj = loads_or_none(event.data)
        if not isinstance(obj, dict):
            yield event  # not JSON, so it carries no tool call: pass it on
            return
        kind = obj.get("type")
        if not isinstance(kind, str):
            kind = event.event
        if kind == "message_start":
            self._message_start(obj)
            yield event
        elif kind == "content_block_start":
            yield from self._block_start(event, obj)
        elif kind in ("content_block_delta", "content_block_stop"):
            yield from self._block_event(event, obj, kind)
        elif kind in ("message_delta", "message_stop"):
            yield from self._close_all()
            if kind == "message_stop":
                self._complete = True
                yield event
            else:
                yield self._message_delta(event, obj)
        elif "index" in obj and _block_key(obj) in self._open:
            # An event type this code does not know, about a held block: keep it with the block.
            self._open[_block_key(obj)].events.append(event)
        else:
            yield event

    def _block_event(
        self, event: SseEvent, obj: Mapping[str, Any], kind: str
    ) -> Iterator[StreamItem]:
        key = _block_key(obj)
        held = self._open.get(key)
        if held is None:
            yield event
            return
        held.events.append(event)
        delta = obj.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("partial_json"), str):
            held.partial_json.append(delta["partial_json"])
        if kind == "content_block_stop":
            yield from self._close(key)

    def _block_start(self, event: SseEvent, obj: Mapping[str, Any]) -> Iterator[StreamItem]:
        key = _block_key(obj)
        if key not in self._open:
            # Blocks come one at a time: a new one means the held ones are complete.
            yield from self._close_all()
        block = obj.get("content_block")
        if _is_tool_use(block) or key in self._open:
            self._hold(event, obj, block)
        else:
            yield event

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """The held block's events if allowed; else a text block at the same index saying why."""
        held = self._take_pending(call)
        if held is None:
            return []
        if decision.enforced is Effect.ALLOW:
            self._allowed = True
            return list(held.events)
        index = held.index
        text = blocked_message(call, decision)
        return [
            _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": text},
                },
            ),
            _event("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield the ``tool_use`` blocks that never closed."""
        yield from self._close_all()

    def _message_start(self, obj: Mapping[str, Any]) -> None:
        message = obj.get("message")
        if not isinstance(message, dict):
            return
        model = message.get("model")
        if isinstance(model, str):
            self._model = model
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._usage = Usage(
                input_tokens=token_count(usage.get("input_tokens")) or 0,
                output_tokens=token_count(usage.get("output_tokens")) or 0,
                cached_input_tokens=token_count(usage.get("cache_read_input_tokens")) or 0,
            )

    def _message_delta(self, event: SseEvent, obj: dict[str, Any]) -> SseEvent:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # Counts here are running totals; absent ones keep the message_start value.
            current = self._usage or Usage()
            output = token_count(usage.get("output_tokens"))
            given = token_count(usage.get("input_tokens"))
            cached = token_count(usage.get("cache_read_input_tokens"))
            self._usage = dataclasses.replace(
                current,
                input_tokens=current.input_tokens if given is None else given,
                output_tokens=current.output_tokens if output is None else output,
                cached_input_tokens=current.cached_input_tokens if cached is None else cached,
            )
        delta = obj.get("delta")
        # Read only now: the calls closed before this event have been resolved.
        if isinstance(delta, dict) and delta.get("stop_reason") == "tool_use" and not self._allowed:
            out = dict(obj)
            out["delta"] = {**delta, "stop_reason": "end_turn"}
            return SseEvent(data=dumps(out), event=event.event, id=event.id)
        return event

    def _hold(self, event: SseEvent, obj: Mapping[str, Any], block: Any) -> None:
        key = _block_key(obj)
        held = self._open.get(key)
        if held is not None:
            # A second start for a held index: keep it with that block, never send it alone.
            held.events.append(event)
            return
        block = block if isinstance(block, dict) else {}
        self._open[key] = _HeldBlock(
            index=obj.get("index"),
            position=self._calls,
            call_id=_str(block.get("id")),
            name=_str(block.get("name")),
            start_input=block.get("input"),
            events=[event],
        )
        self._calls += 1

    def _close(self, key: int | None) -> Iterator[ToolCall]:
        held = self._open.pop(key, None)
        if held is None:
            return
        raw = "".join(held.partial_json)
        parsed: Any
        if raw:
            raw, parsed = parse_arguments(raw)
        else:
            # No input deltas: the input is the one given at the block's start.
            raw, parsed = dumps(held.start_input), held.start_input
        call = ToolCall(
            call_id=held.call_id,
            name=held.name,
            raw_arguments=raw,
            arguments=parsed if isinstance(parsed, dict) else None,
            index=held.position,
        )
        self._pending.append((call, held))
        yield call

    def _close_all(self) -> Iterator[ToolCall]:
        for key in list(self._open):
            yield from self._close(key)

    def _take_pending(self, call: ToolCall) -> _HeldBlock | None:
        for i, (pending, _) in enumerate(self._pending):
            if pending is call:
                return self._pending.pop(i)[1]
        # The caller may pass an equal copy rather than the object it was given.
        for i, (pending, _) in enumerate(self._pending):
            if pending.call_id == call.call_id and pending.index == call.index:
                return self._pending.pop(i)[1]
        return None


def _event(name: str, data: Mapping[str, Any]) -> SseEvent:
    return SseEvent(data=dumps(data), event=name)
