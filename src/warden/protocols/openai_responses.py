"""The OpenAI Responses API (``POST /v1/responses``): requests, responses, streams.

A response's ``output`` is a list of items. Items of type ``function_call`` are
calls the agent would run itself, so each one is decided. Hosted tools
(``web_search_call``, ``file_search_call`` and the like) already ran at the
provider and pass through untouched, as do all other item types.

A call that is not allowed is replaced, at the same position, by an assistant
``message`` item whose text says what was blocked and why. Its id is
``msg_warden_<n>`` where ``n`` is the output index it stands at, so a streamed
response and its final ``response.completed`` snapshot agree.

Streams: every event carries its ``type`` and a ``sequence_number``. Events of
a ``function_call`` item are held until its ``response.output_item.done``, then
released verbatim (allowed) or replaced by the events of a complete message
item (not allowed). Sequence numbers are reassigned from one counter, so they
stay strictly increasing whatever was held, dropped or added; an event whose
number is already right is sent as the very object that came in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from warden.model import Decision, Effect, Mode, ToolCall, ToolResult, Usage
from warden.protocols._wire import StreamStatus, dumps, loads, parse_arguments
from warden.protocols.base import ParsedRequest, StreamItem, blocked_message
from warden.protocols.sse import SseEvent

__all__ = ["OpenAIResponsesAdapter", "OpenAIResponsesStreamRewriter"]

_FUNCTION_CALL = "function_call"
_ITEM_ADDED = "response.output_item.added"
_ITEM_DONE = "response.output_item.done"
_ARGS_DELTA = "response.function_call_arguments.delta"
_ARGS_DONE = "response.function_call_arguments.done"
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_LIFECYCLE = frozenset({"response.created", "response.queued", "response.in_progress"})

# Stands in when a call reaches rendering without a decision: that is a bug
# upstream of the adapter, and the safe reading of it is "not allowed".
_UNDECIDED = Decision(
    decision_id="none",
    effect=Effect.DENY,
    reasons=("no decision was recorded for this call",),
    mode=Mode.ENFORCE,
    guard="fallback",
)

# An item to put in place of a function call, or None to leave it out.
_Replace = Callable[[ToolCall, Mapping[str, Any]], Mapping[str, Any] | None]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _is_function_call(item: object) -> bool:
    return isinstance(item, Mapping) and item.get("type") == _FUNCTION_CALL


def _tool_call(item: Mapping[str, Any], index: int) -> ToolCall:
    """A ``function_call`` item as a ToolCall; ``call_id`` (not ``id``) names it."""
    raw, arguments = parse_arguments(item.get("arguments"))
    call_id = _str(item.get("call_id")) or _str(item.get("id")) or f"output_{index}"
    return ToolCall(
        call_id=call_id,
        name=_str(item.get("name")) or "",
        raw_arguments=raw,
        arguments=arguments,
        index=index,
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


def _blocked_id(index: int, decision: Decision) -> str:
    # Unique across turns: agents that replay earlier output as input must not
    # send two items with the same id.
    return f"msg_warden_{index}_{decision.decision_id}"


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


def _rewrite_response(response: Mapping[str, Any], replace: _Replace) -> dict[str, Any]:
    """A shallow copy of ``response`` with each function call passed through ``replace``."""
    result = dict(response)
    output = response.get("output")
    if not isinstance(output, list):
        return result
    rewritten: list[Any] = []
    for position, item in enumerate(output):
        kept = replace(_tool_call(item, position), item) if _is_function_call(item) else item
        if kept is not None:
            rewritten.append(kept)
    result["output"] = rewritten
    if isinstance(result.get("output_text"), str):
        result["output_text"] = _output_text(rewritten)
    return result


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else 0
    return Usage(
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        cached_input_tokens=_int(cached),
    )


def _result_content(output: object) -> str:
    """A ``function_call_output``'s output as text: a string, or a list of parts."""
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


class OpenAIResponsesAdapter:
    """The Responses API wire format. Holds no state; one instance serves all requests."""

    name = "openai.responses"

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Model, stream flag, and the ``function_call_output`` items in ``input``.

        A result's tool name comes from the ``function_call`` item with the same
        ``call_id`` in the same input, else from the output item's own ``name``.
        A plain-string ``input`` carries no results.
        """
        items = body.get("input")
        results: list[ToolResult] = []
        if isinstance(items, list):
            names: dict[str, str] = {}
            for item in items:
                if _is_function_call(item):
                    call_id, name = _str(item.get("call_id")), _str(item.get("name"))
                    if call_id is not None and name is not None:
                        names[call_id] = name
            for item in items:
                if isinstance(item, Mapping) and item.get("type") == "function_call_output":
                    call_id = _str(item.get("call_id")) or ""
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
        )

    def tool_calls(self, body: Mapping[str, Any]) -> list[ToolCall]:
        """The ``function_call`` output items, in order; ``index`` is the output position."""
        output = body.get("output")
        if not isinstance(output, list):
            return []
        return [_tool_call(item, i) for i, item in enumerate(output) if _is_function_call(item)]

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """A copy of ``body`` where each call not allowed became an explaining message.

        A call missing from ``decisions`` is treated as not allowed. The
        Responses API has no stop reason to adjust: an output without function
        calls is already what ends an agent's loop.
        """

        def replace(call: ToolCall, item: Mapping[str, Any]) -> Mapping[str, Any]:
            decision = decisions.get(call.call_id, _UNDECIDED)
            if decision.enforced is Effect.ALLOW:
                return item
            return _message_item(_blocked_id(call.index, decision), blocked_message(call, decision))

        return _rewrite_response(body, replace)

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """``usage.input_tokens``, ``output_tokens`` and ``input_tokens_details.cached_tokens``."""
        return _usage(body.get("usage"))

    def prepare_request(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Sent as is: this protocol always reports usage in its streams."""
        return None

    def stream_rewriter(self, *, hide_usage: bool = False) -> OpenAIResponsesStreamRewriter:
        """A fresh rewriter for one streaming response."""
        return OpenAIResponsesStreamRewriter()


@dataclass(slots=True)
class _HeldCall:
    """One ``function_call`` output item while its events are held."""

    index: int
    events: list[tuple[SseEvent, dict[str, Any]]] = field(default_factory=list)
    added: Mapping[str, Any] | None = None
    done: Mapping[str, Any] | None = None
    deltas: list[str] = field(default_factory=list)
    arguments_done: str | None = None
    yielded: bool = False

    def call(self) -> ToolCall:
        """The call as its latest item states it; arguments fall back to the deltas."""
        item: dict[str, Any] = {**(self.added or {}), **(self.done or {})}
        if self.done is None or not isinstance(self.done.get("arguments"), str):
            if self.arguments_done is not None:
                item["arguments"] = self.arguments_done
            elif self.deltas:
                item["arguments"] = "".join(self.deltas)
        return _tool_call(item, self.index)

    def consistent(self, call: ToolCall) -> bool:
        """Whether every held event states the same name, id and arguments as ``call``."""
        if self.deltas and "".join(self.deltas) != call.raw_arguments:
            return False
        if self.arguments_done is not None and self.arguments_done != call.raw_arguments:
            return False
        return all(
            item is None
            or (
                (_str(item.get("name")) or "") == call.name
                and (_str(item.get("call_id")) or call.call_id) == call.call_id
            )
            for item in (self.added, self.done)
        )


class OpenAIResponsesStreamRewriter(StreamStatus):
    """Rewrites one Responses event stream; see the module docstring."""

    def __init__(self) -> None:
        self._next_seq: int | None = None
        self._held: dict[int, _HeldCall] = {}
        self._item_index: dict[str, int] = {}
        self._pending: dict[tuple[str, int], _HeldCall] = {}
        self._decided: dict[str, tuple[ToolCall, Decision]] = {}
        self._blocked: dict[str, tuple[str, str]] = {}
        self._dropped: set[int] = set()
        self._added_count = 0
        super().__init__()

    # -- feeding ----------------------------------------------------------

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield what may be sent and what to decide."""
        try:
            data = loads(event.data)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            # Not an event any client could parse into a tool call.
            yield event
            return
        kind = _str(data.get("type")) or event.event
        if kind in _TERMINAL:
            yield from self._terminal(event, data)
            return
        if kind in _LIFECYCLE:
            yield self._lifecycle(event, data)
            return
        held = self._hold(kind, data)
        if held is None:
            index = data.get("output_index")
            if isinstance(index, int) and index in self._dropped:
                return  # belongs to an item that was replaced
            yield self._emit(event, data)
            return
        held.events.append((event, data))
        if kind == _ITEM_DONE:
            yield self._ready(held)

    def _hold(self, kind: str | None, data: dict[str, Any]) -> _HeldCall | None:
        """The held call this event belongs to (starting one if it opens a call), or None."""
        item = data.get("item")
        starts = kind == _ITEM_ADDED and _is_function_call(item)
        opens = (
            starts
            or kind in (_ARGS_DELTA, _ARGS_DONE)
            or (kind == _ITEM_DONE and _is_function_call(item))
        )
        if kind == _ITEM_ADDED:
            self._added_count += 1
        index = self._index_of(data, item)
        if index is None:
            if not opens:
                return None
            # No usable output_index: the item most recently added is the best guess.
            index = max(self._added_count - 1, 0)
        held = self._held.get(index)
        if held is None or starts:
            if not opens:
                return None
            held = self._held[index] = _HeldCall(index=index)
            self._dropped.discard(index)
        if isinstance(item, Mapping):
            item_id = _str(item.get("id"))
            if item_id is not None:
                self._item_index[item_id] = index
            if starts:
                held.added = item
            elif kind == _ITEM_DONE:
                held.done = item
        if kind == _ARGS_DELTA:
            held.deltas.append(_str(data.get("delta")) or "")
        elif kind == _ARGS_DONE:
            held.arguments_done = _str(data.get("arguments")) or ""
        return held

    def _index_of(self, data: Mapping[str, Any], item: object) -> int | None:
        index = data.get("output_index")
        if isinstance(index, int) and not isinstance(index, bool):
            return index
        item_id = _str(item.get("id")) if isinstance(item, Mapping) else None
        item_id = item_id or _str(data.get("item_id"))
        return self._item_index.get(item_id) if item_id is not None else None

    def _ready(self, held: _HeldCall) -> ToolCall:
        call = held.call()
        held.yielded = True
        self._pending[(call.call_id, call.index)] = held
        return call

    def _flush(self) -> Iterator[ToolCall]:
        for index in sorted(self._held):
            held = self._held[index]
            if not held.yielded:
                yield self._ready(held)

    def _lifecycle(self, event: SseEvent, data: dict[str, Any]) -> SseEvent:
        response = data.get("response")
        if not isinstance(response, Mapping):
            return self._emit(event, data)
        self._model = _str(response.get("model")) or self._model
        output = response.get("output")
        if not (isinstance(output, list) and any(_is_function_call(i) for i in output)):
            return self._emit(event, data)
        # A snapshot taken mid-stream: calls decided so far get their verdict,
        # undecided ones are left out until they are.
        rewritten = _rewrite_response(response, self._final_item())
        return self._emit(event, {**data, "response": rewritten}, changed=True)

    def _terminal(self, event: SseEvent, data: dict[str, Any]) -> Iterator[StreamItem]:
        self._complete = True
        response = data.get("response")
        if not isinstance(response, Mapping):
            yield from self._flush()
            yield self._emit(event, data)
            return
        self._usage = _usage(response.get("usage")) or self._usage
        self._model = _str(response.get("model")) or self._model
        # Calls that never reached their output_item.done, then calls that only
        # the final snapshot carries: all are decided before the snapshot goes.
        yield from self._flush()
        output = response.get("output")
        if not isinstance(output, list):
            output = []
        for position, item in enumerate(output):
            if _is_function_call(item):
                call = _tool_call(item, position)
                if call.call_id not in self._decided:
                    self._pending[(call.call_id, call.index)] = _HeldCall(
                        index=position, yielded=True
                    )
                    yield call
        if not any(_is_function_call(i) for i in output):
            yield self._emit(event, data)
            return
        # Built only now, after every call above was resolved.
        rewritten = _rewrite_response(response, self._final_item())
        yield self._emit(event, {**data, "response": rewritten}, changed=True)

    def _final_item(self) -> _Replace:
        """How a response snapshot shows each call: as decided; left out while undecided."""

        def replace(call: ToolCall, item: Mapping[str, Any]) -> Mapping[str, Any] | None:
            entry = self._decided.get(call.call_id)
            if entry is None:
                return None
            decided, decision = entry
            if decision.enforced is Effect.ALLOW:
                if (call.name, call.raw_arguments) == (decided.name, decided.raw_arguments):
                    return item
                # What the agent runs is what was decided.
                return {**item, "name": decided.name, "arguments": decided.raw_arguments}
            msg_id, text = self._blocked.get(call.call_id) or (
                _blocked_id(call.index, decision),
                blocked_message(call, decision),
            )
            return _message_item(msg_id, text)

        return replace

    # -- resolving --------------------------------------------------------

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """The held events (allowed), or the events of a message explaining the block."""
        held = self._pending.pop((call.call_id, call.index), None)
        previous = self._decided.get(call.call_id)
        if previous is None or previous[1].enforced is Effect.ALLOW:
            self._decided[call.call_id] = (call, decision)
        if held is None:
            return []
        if self._held.get(held.index) is held:
            del self._held[held.index]
        if not held.events:
            return []  # known only from the final snapshot, which carries the verdict
        if decision.enforced is Effect.ALLOW:
            return self._release(held, call)
        self._dropped.add(held.index)
        msg_id, text = _blocked_id(held.index, decision), blocked_message(call, decision)
        self._blocked.setdefault(call.call_id, (msg_id, text))
        return [self._new_event(e) for e in _message_events(held.index, msg_id, text)]

    def _release(self, held: _HeldCall, call: ToolCall) -> list[SseEvent]:
        if held.consistent(call):
            return [self._emit(event, data) for event, data in held.events]
        # The deltas say something other than the decided call: send the
        # decided call only, as one delta.
        out: list[SseEvent] = []
        delta_sent = False
        for event, data in held.events:
            kind = data.get("type")
            fixed = dict(data)
            if kind == _ARGS_DELTA:
                if delta_sent:
                    continue
                delta_sent = True
                fixed["delta"] = call.raw_arguments
            elif kind == _ARGS_DONE:
                fixed["arguments"] = call.raw_arguments
            elif kind in (_ITEM_ADDED, _ITEM_DONE) and isinstance(data.get("item"), Mapping):
                item = {**data["item"], "name": call.name, "call_id": call.call_id}
                if kind == _ITEM_DONE:
                    item["arguments"] = call.raw_arguments
                fixed["item"] = item
            out.append(self._emit(event, fixed, changed=True))
        return out

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield the calls still held, which never closed."""
        yield from self._flush()

    # -- numbering --------------------------------------------------------

    def _emit(self, event: SseEvent, data: dict[str, Any], *, changed: bool = False) -> SseEvent:
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


def _message_events(index: int, msg_id: str, text: str) -> list[dict[str, Any]]:
    """The events of a one-part message item, as the API streams one.

    ``sequence_number`` is a placeholder; :meth:`_new_event` assigns it.
    """
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
        {
            "type": _ITEM_DONE,
            "sequence_number": 0,
            "output_index": index,
            "item": _message_item(msg_id, text),
        },
    ]
