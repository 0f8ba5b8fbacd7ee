"""OpenAI Chat Completions (``POST /v1/chat/completions``): requests, responses, streams.

Tool calls live in ``choices[*].message.tool_calls`` (and the legacy single
``function_call``). In a stream they arrive as ``delta.tool_calls`` fragments
keyed by a per-choice tool index; a call is complete when a fragment for
another call starts, when its choice finishes, or at ``data: [DONE]``.

The agent must never see a fragment of a call that was not allowed, and the
official SDK indexes its accumulated tool calls by the delta ``index``, so
released calls are renumbered to stay contiguous from 0 in each choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

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

__all__ = ["OpenAIChatAdapter", "OpenAIChatStreamRewriter", "legacy_call_id"]

_DONE: Final = "[DONE]"
_CALL_FINISHES: Final = ("tool_calls", "function_call")


def _count(value: Any) -> int:
    """A token count from the wire; anything but a non-negative int counts as 0."""
    return token_count(value) or 0


def _text(content: Any) -> str:
    """Text of a message content: a string, or a list of ``text`` parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def _choice_index(choice: Mapping[str, Any], default: int = 0) -> int:
    index = choice.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    return default


def _call_spec(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``function`` object of a tool call entry (or ``custom`` for custom tools)."""
    spec = entry.get("function")
    if isinstance(spec, dict):
        return spec
    kind = entry.get("type")
    if isinstance(kind, str):
        spec = entry.get(kind)
        if isinstance(spec, dict):
            return spec
    return None


def _tool_call(entry: Mapping[str, Any], position: int) -> ToolCall:
    spec = _call_spec(entry) or {}
    name = spec.get("name")
    # Custom tools carry free text in ``input``: not an object, so it fails closed.
    raw, arguments = parse_arguments(spec.get("arguments", spec.get("input")))
    call_id = entry.get("id")
    return ToolCall(
        call_id=call_id if isinstance(call_id, str) else "",
        name=name if isinstance(name, str) else "",
        raw_arguments=raw,
        arguments=arguments,
        index=position,
    )


def legacy_call_id(choice: int) -> str:
    """The call id given to a legacy ``function_call``, which has none on the wire."""
    return f"function_call_{choice}"


def _legacy_call(function_call: Mapping[str, Any], choice: int) -> ToolCall:
    name = function_call.get("name")
    raw, arguments = parse_arguments(function_call.get("arguments"))
    return ToolCall(
        call_id=legacy_call_id(choice),
        name=name if isinstance(name, str) else "",
        raw_arguments=raw,
        arguments=arguments,
    )


def _append_text(content: Any, text: str) -> Any:
    """Message content with ``text`` added after what is there, on a new line."""
    if isinstance(content, str) and content:
        return f"{content}\n{text}"
    if isinstance(content, list) and content:
        return [*content, {"type": "text", "text": text}]
    return text


class OpenAIChatAdapter:
    """The ``openai.chat`` protocol: ``POST /v1/chat/completions``.

    A legacy ``function_call`` has no id on the wire; it is reported with the
    id from :func:`legacy_call_id` so that it can still be decided by id.
    """

    name = "openai.chat"

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Model, stream flag and ``role: tool`` results, named from earlier assistant calls."""
        names: dict[str, str] = {}
        results: list[ToolResult] = []
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if role == "assistant":
                calls = message.get("tool_calls")
                for entry in calls if isinstance(calls, list) else ():
                    if isinstance(entry, dict):
                        call = _tool_call(entry, 0)
                        if call.call_id and call.name:
                            names[call.call_id] = call.name
            elif role == "tool":
                call_id = message.get("tool_call_id")
                if isinstance(call_id, str):
                    results.append(
                        ToolResult(
                            call_id=call_id,
                            content=_text(message.get("content")),
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
        """Every choice's tool calls in order; ``index`` is the position within its message."""
        calls: list[ToolCall] = []
        choices = body.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            entries = message.get("tool_calls")
            if isinstance(entries, list):
                entries = [entry for entry in entries if isinstance(entry, dict)]
                calls.extend(_tool_call(entry, i) for i, entry in enumerate(entries))
            function_call = message.get("function_call")
            if isinstance(function_call, dict):
                calls.append(_legacy_call(function_call, _choice_index(choice, position)))
        return calls

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """A copy with non-allowed calls removed and explained in the message content.

        The input is not mutated; parts that need no change are shared with it.
        """
        out = dict(body)
        choices = body.get("choices")
        if isinstance(choices, list):
            out["choices"] = [
                _rewrite_choice(choice, position, decisions)
                if isinstance(choice, dict) and isinstance(choice.get("message"), dict)
                else choice
                for position, choice in enumerate(choices)
            ]
        return out

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """Prompt, completion and cached prompt tokens from ``usage``."""
        return _usage(body.get("usage"))

    def prepare_request(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Ask for the streamed usage chunk (``stream_options.include_usage``) if not asked.

        Without it a stream reports no tokens, and spend could not be counted.
        """
        if body.get("stream") is not True:
            return None
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return None
        merged = dict(options) if isinstance(options, dict) else {}
        merged["include_usage"] = True
        return {**body, "stream_options": merged}

    def stream_rewriter(self, *, hide_usage: bool = False) -> OpenAIChatStreamRewriter:
        """A fresh rewriter for one ``stream: true`` response."""
        return OpenAIChatStreamRewriter(hide_usage=hide_usage)


def _usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(
        input_tokens=_count(usage.get("prompt_tokens")),
        output_tokens=_count(usage.get("completion_tokens")),
        cached_input_tokens=_count(cached),
    )


def _rewrite_choice(
    choice: Mapping[str, Any], position: int, decisions: Mapping[str, Decision]
) -> dict[str, Any]:
    message = dict(choice["message"])
    notes: list[str] = []
    kept_tools = _filter_tool_calls(message, decisions, notes)
    kept_function = _filter_function_call(
        message, _choice_index(choice, position), decisions, notes
    )
    if notes:
        message["content"] = _append_text(message.get("content"), "\n".join(notes))
    out = dict(choice)
    out["message"] = message
    if not (kept_tools or kept_function) and out.get("finish_reason") in _CALL_FINISHES:
        out["finish_reason"] = "stop"
    return out


def _filter_tool_calls(
    message: dict[str, Any], decisions: Mapping[str, Decision], notes: list[str]
) -> bool:
    """Keep only allowed ``tool_calls`` in ``message``; True if any remain."""
    if "tool_calls" not in message:
        return False
    entries = message.pop("tool_calls")
    if entries is None:
        message["tool_calls"] = None
        return False
    # Entries that are not objects cannot be decided, so they are dropped too.
    calls = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    kept: list[Any] = []
    for i, entry in enumerate(calls):
        call = _tool_call(entry, i)
        decision = decisions.get(call.call_id, NO_DECISION)
        if decision.enforced is Effect.ALLOW:
            kept.append(entry)
        else:
            notes.append(blocked_message(call, decision))
    if kept:
        message["tool_calls"] = kept
    return bool(kept)


def _filter_function_call(
    message: dict[str, Any], choice: int, decisions: Mapping[str, Decision], notes: list[str]
) -> bool:
    """Keep the legacy ``function_call`` only if allowed; True if it remains."""
    if "function_call" not in message:
        return False
    function_call = message.pop("function_call")
    if function_call is None:
        message["function_call"] = None
        return False
    if not isinstance(function_call, dict):
        return False
    call = _legacy_call(function_call, choice)
    decision = decisions.get(call.call_id, NO_DECISION)
    if decision.enforced is Effect.ALLOW:
        message["function_call"] = function_call
        return True
    notes.append(blocked_message(call, decision))
    return False


@dataclass(slots=True)
class _Fragment:
    """One held tool-call delta and the upstream chunk it came in."""

    event: SseEvent
    chunk: dict[str, Any]
    choice: dict[str, Any]
    part: dict[str, Any]
    pure: bool  # the chunk held nothing but this delta: resend the same event when possible


@dataclass(slots=True)
class _HeldCall:
    """A call whose fragments are held until it is decided (mutable, per stream)."""

    choice: int
    key: int | None  # the upstream tool index; None for a legacy function_call
    position: int
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    fragments: list[_Fragment] = field(default_factory=list)


@dataclass(slots=True)
class _ChoiceState:
    """What one choice of the stream has shown so far (mutable, per stream)."""

    open: _HeldCall | None = None
    closed: set[int | None] = field(default_factory=set)
    calls: int = 0
    next_index: int = 0
    allowed: bool = False
    has_text: bool = False


def _carries_call(delta: Mapping[str, Any]) -> bool:
    return bool(delta.get("tool_calls")) or bool(delta.get("function_call"))


def _meaningful(choice: Mapping[str, Any]) -> bool:
    """True when a choice still says something once its tool-call deltas are taken out."""
    delta = choice.get("delta")
    if isinstance(delta, dict) and any(value is not None for value in delta.values()):
        return True
    return choice.get("finish_reason") is not None or choice.get("logprobs") is not None


def _is_pure(chunk: Mapping[str, Any], choices: list[Any]) -> bool:
    if len(choices) != 1 or not isinstance(choices[0], dict) or chunk.get("usage") is not None:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict) or choice.get("finish_reason") is not None:
        return False
    calls = delta.get("tool_calls")
    others = (value for key, value in delta.items() if key != "tool_calls")
    return isinstance(calls, list) and len(calls) == 1 and all(v is None for v in others)


class OpenAIChatStreamRewriter(StreamStatus):
    """Rewrites one chat completion stream (``data: {chunk}`` events, ``data: [DONE]``).

    Chunks without tool-call deltas or a finish reason are yielded unchanged
    (the same event object). A chunk that mixes tool-call deltas with other
    content is split: the other content is sent on at once, the deltas held.
    """

    def __init__(self, *, hide_usage: bool = False) -> None:
        self._hide_usage = hide_usage
        self._choices: dict[int, _ChoiceState] = {}
        self._pending: list[tuple[ToolCall, _HeldCall]] = []
        super().__init__()

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield events to send and calls to decide."""
        data = event.data
        if data.startswith(_DONE):  # the SDK's own test for the end marker
            self._complete = True
            yield from self._close_all()
            yield event
            return
        chunk = loads_or_none(data)
        if not isinstance(chunk, dict):
            yield event  # not a chunk at all, so it carries no tool call: pass it on
            return
        model = chunk.get("model")
        if isinstance(model, str):
            self._model = model
        usage = _usage(chunk.get("usage"))
        choices = chunk.get("choices")
        if usage is not None:
            self._usage = usage
            if self._hide_usage and choices == []:
                return  # the usage-only chunk Warden asked for; the agent did not
        if not isinstance(choices, list):
            yield event
            return
        has_calls = False
        finishing = False
        texts: list[int] = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                has_calls = has_calls or _carries_call(delta)
                content = delta.get("content")
                if isinstance(content, str) and content:
                    texts.append(_choice_index(choice))
            finishing = finishing or choice.get("finish_reason") is not None
        if not has_calls and not finishing:
            self._mark_text(texts)
            yield event  # the hot path: text, role and empty deltas go out untouched
            return
        yield from self._split(event, chunk, choices, has_calls, texts)

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """The held deltas of an allowed call, renumbered; else one content delta saying why."""
        held = self._take_pending(call)
        if held is None:
            return []
        state = self._state(held.choice)
        if decision.enforced is Effect.ALLOW:
            state.allowed = True
            if held.key is None:
                return [_release(fragment, held.choice, None) for fragment in held.fragments]
            index = state.next_index
            state.next_index += 1
            return [_release(fragment, held.choice, index) for fragment in held.fragments]
        text = blocked_message(call, decision)
        if state.has_text:
            text = f"\n{text}"
        state.has_text = True
        first = held.fragments[0]
        chunk = dict(first.chunk)
        chunk["choices"] = [
            {
                "index": held.choice,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        if "usage" in chunk:
            chunk["usage"] = None
        return [SseEvent(data=dumps(chunk), event=first.event.event, id=first.event.id)]

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield the calls still open (a stream cut before ``[DONE]``)."""
        yield from self._close_all()

    def _state(self, choice: int) -> _ChoiceState:
        state = self._choices.get(choice)
        if state is None:
            state = self._choices[choice] = _ChoiceState()
        return state

    def _mark_text(self, choices: list[int]) -> None:
        # Remembered so that a later blocked-call notice starts on its own line.
        for choice in choices:
            self._state(choice).has_text = True

    def _split(
        self,
        event: SseEvent,
        chunk: dict[str, Any],
        choices: list[Any],
        has_calls: bool,
        texts: list[int],
    ) -> Iterator[StreamItem]:
        pure = has_calls and _is_pure(chunk, choices)
        remainder: list[Any] = []
        for choice in choices:
            if not isinstance(choice, dict):
                remainder.append(choice)
                continue
            index = _choice_index(choice)
            state = self._state(index)
            delta = choice.get("delta")
            if isinstance(delta, dict) and _carries_call(delta):
                yield from self._take(
                    state=state,
                    choice_index=index,
                    event=event,
                    chunk=chunk,
                    choice=choice,
                    delta=delta,
                    pure=pure,
                )
                rest = dict(choice)
                rest["delta"] = {
                    key: value
                    for key, value in delta.items()
                    if key not in ("tool_calls", "function_call")
                }
                if _meaningful(rest):
                    remainder.append(rest)
            else:
                remainder.append(choice)
            if choice.get("finish_reason") is not None:
                yield from self._close(state)
        # Read only now: the calls yielded above have been resolved by the consumer.
        rewritten = False
        for i, choice in enumerate(remainder):
            if (
                isinstance(choice, dict)
                and choice.get("finish_reason") in _CALL_FINISHES
                and not self._state(_choice_index(choice)).allowed
            ):
                remainder[i] = {**choice, "finish_reason": "stop"}
                rewritten = True
        self._mark_text(texts)
        if not has_calls and not rewritten:
            yield event
            return
        if not remainder and chunk.get("usage") is None:
            return
        out = dict(chunk)
        out["choices"] = remainder
        yield SseEvent(data=dumps(out), event=event.event, id=event.id)

    def _take(
        self,
        *,
        state: _ChoiceState,
        choice_index: int,
        event: SseEvent,
        chunk: dict[str, Any],
        choice: dict[str, Any],
        delta: Mapping[str, Any],
        pure: bool,
    ) -> Iterator[ToolCall]:
        parts = delta.get("tool_calls")
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            key = part.get("index")
            if not isinstance(key, int) or isinstance(key, bool):
                key = state.open.key if state.open is not None else 0
            part_id = part.get("id")
            yield from self._hold(
                state=state,
                choice_index=choice_index,
                key=key,
                part_id=part_id if isinstance(part_id, str) else "",
                fragment=_Fragment(event, chunk, choice, part, pure),
                spec=_call_spec(part),
            )
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            fragment = _Fragment(event, chunk, choice, function_call, pure=False)
            yield from self._hold(
                state=state,
                choice_index=choice_index,
                key=None,
                part_id="",
                fragment=fragment,
                spec=function_call,
            )

    def _hold(
        self,
        *,
        state: _ChoiceState,
        choice_index: int,
        key: int | None,
        part_id: str,
        fragment: _Fragment,
        spec: Mapping[str, Any] | None,
    ) -> Iterator[ToolCall]:
        held = state.open
        # A new index, or a new id at the same index (as some compatible servers
        # send), means the open call is complete.
        if held is not None and (
            held.key != key or (part_id and held.call_id and part_id != held.call_id)
        ):
            yield from self._close(state)
            held = None
        if held is None:
            if key in state.closed and not part_id:
                # A late fragment of a call already decided: it must not change that call.
                return
            held = _HeldCall(choice=choice_index, key=key, position=state.calls)
            state.calls += 1
            state.open = held
        if part_id and not held.call_id:
            held.call_id = part_id
        if spec is not None:
            name = spec.get("name")
            if isinstance(name, str):
                held.name += name  # accumulated as the SDK does
            arguments = spec.get("arguments", spec.get("input"))
            if isinstance(arguments, str):
                held.arguments.append(arguments)
        held.fragments.append(fragment)

    def _close(self, state: _ChoiceState) -> Iterator[ToolCall]:
        held = state.open
        if held is None:
            return
        state.open = None
        state.closed.add(held.key)
        raw, arguments = parse_arguments("".join(held.arguments))
        call_id = held.call_id
        if held.key is None and not call_id:
            call_id = legacy_call_id(held.choice)
        call = ToolCall(
            call_id=call_id,
            name=held.name,
            raw_arguments=raw,
            arguments=arguments,
            index=held.position,
        )
        self._pending.append((call, held))
        yield call

    def _close_all(self) -> Iterator[ToolCall]:
        for choice in sorted(self._choices):
            yield from self._close(self._choices[choice])

    def _take_pending(self, call: ToolCall) -> _HeldCall | None:
        for i, (pending, _) in enumerate(self._pending):
            if pending is call:
                return self._pending.pop(i)[1]
        # The caller may pass an equal copy rather than the object it was given.
        for i, (pending, _) in enumerate(self._pending):
            if pending.call_id == call.call_id and pending.index == call.index:
                return self._pending.pop(i)[1]
        return None


def _release(fragment: _Fragment, choice: int, index: int | None) -> SseEvent:
    """The event that sends one held fragment on, with its tool index set to ``index``."""
    if fragment.pure and (index is None or fragment.part.get("index") == index):
        return fragment.event
    if index is None:
        delta: dict[str, Any] = {"function_call": fragment.part}
    else:
        delta = {"tool_calls": [{**fragment.part, "index": index}]}
    new_choice: dict[str, Any] = {"index": choice, "delta": delta}
    if "logprobs" in fragment.choice:
        new_choice["logprobs"] = None
    new_choice["finish_reason"] = None
    chunk = dict(fragment.chunk)
    chunk["choices"] = [new_choice]
    if "usage" in chunk:
        chunk["usage"] = None
    return SseEvent(data=dumps(chunk), event=fragment.event.event, id=fragment.event.id)
