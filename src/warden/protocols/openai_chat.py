"""OpenAI Chat Completions (``POST /v1/chat/completions``): requests, responses, streams.

Tool calls live in ``choices[*].message.tool_calls`` (and the legacy single
``function_call``). In a stream they arrive as ``delta.tool_calls`` fragments
keyed by a per-choice tool ``index``, which the SDK merges by concatenating
strings; a call is complete when a fragment for another index starts, when
its choice finishes, or at ``data: [DONE]``.

Every call is named by its position (``ToolCall.key``: ``c<choice>.t<index>``,
or ``c<choice>.f`` for a legacy ``function_call``), read from the field the SDK
dispatches on (``type: function`` → ``function``, ``custom`` → ``custom``;
any other type is an ``unknown_call`` whose whole entry is what is decided),
and, when allowed, rendered again from the decided values. In a stream an
allowed call is sent as one canonical delta, renumbered so the tool indexes
the agent sees stay contiguous from 0 in each choice.
"""

from __future__ import annotations

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
    loads,
    misspelled,
    misspelled_key,
    parse_arguments,
    refuse_misspelled_request,
    tier_rate,
    tiered,
    token_count,
)
from warden.protocols.base import ParsedRequest, StreamItem, blocked_message
from warden.protocols.sse import SseEvent

__all__ = [
    "OpenAIChatAdapter",
    "OpenAIChatStreamRewriter",
    "ends_stream",
    "entry_call",
    "legacy_call",
    "legacy_call_id",
]

_DONE: Final = "[DONE]"
_CHUNK: Final = "chat.completion.chunk"
_CALL_FINISHES: Final = ("tool_calls", "function_call")
_CALL_FIELDS: Final = ("tool_calls", "function_call")
_LEGACY: Final = "function_call"
_MAX_PART_DEPTH: Final = 80  # past the 64 levels a policy can take: such a call fails anyway
_REQUEST: Final = Envelope(
    names=frozenset(
        {
            *("model", "messages", "tools", "tool_choice", "stream", "stream_options"),
            *("parallel_tool_calls", "functions", "function_call", "type", "function"),
            *("custom", "name", "parameters", "format", "web_search_options"),
            # What a spend cap prices the call by.
            *("max_tokens", "max_completion_tokens", "n", "service_tier"),
        }
    ),
    inside=frozenset({"tools", "functions", "function", "custom", "tool_choice"}),
)
"""A chat request, down to the tools it declares."""
_ENVELOPE: Final = Envelope(
    names=frozenset(
        {
            *("id", "object", "created", "model", "choices", "usage", "system_fingerprint"),
            *("service_tier", "index", "message", "delta", "finish_reason", "logprobs", "role"),
            *("content", "refusal", "annotations", "audio", "tool_calls", "function_call"),
            *("function", "custom", "type", "name", "arguments", "input"),
        }
    ),
    inside=frozenset(
        {"choices", "message", "delta", "tool_calls", "function_call", "function", "custom"}
    ),
)
"""Chat completions and their chunks, down to each call's name and arguments."""


def _output_bound(body: Mapping[str, Any]) -> int | None:
    """The most output a request allows: ``max_tokens`` is the older name of
    ``max_completion_tokens``; given both, the larger (a compatible server may
    read either)."""
    bounds = [token_count(body.get(k)) for k in ("max_completion_tokens", "max_tokens")]
    given = [b for b in bounds if b is not None]
    return max(given) if given else None


def _count(value: Any) -> int:
    """A token count from the wire; anything but a non-negative int counts as 0."""
    return token_count(value) or 0


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


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
    index = _int(choice.get("index"))
    return default if index is None else index


def entry_call(entry: Mapping[str, Any], *, key: str, index: int, parse: bool = True) -> ToolCall:
    """One ``tool_calls`` entry as a ToolCall, read from the field its ``type`` names.

    ``function`` (or no type at all: streams send it once, some servers never)
    reads ``function.name``/``function.arguments``; ``custom`` reads
    ``custom.name``/``custom.input`` (free text, which policies see as
    ``{"input": text}``). Any other type is an ``unknown_call``: the whole entry
    is its arguments, and is what is rendered if allowed.

    ``parse=False`` when only the call's id, name and text are needed (to
    render a decided call, or name an earlier one): text arguments are then
    not parsed, and ``arguments`` is ``None``; ``raw_arguments`` is the same.
    """
    wire = entry.get("type")
    call_id = _str(entry.get("id"))
    if wire is None or wire == "function":
        spec = entry.get("function")
        spec = spec if isinstance(spec, dict) else {}
        given = spec.get("arguments")
        raw, arguments = (
            parse_arguments(given) if parse or type(given) is not str else (given, None)
        )
        kind, wire_type = ActionKind.TOOL_CALL, "function"
    elif wire == "custom":
        spec = entry.get("custom")
        spec = spec if isinstance(spec, dict) else {}
        text = spec.get("input")
        raw, arguments = _custom_input(text) if parse or type(text) is not str else (text, None)
        kind, wire_type = ActionKind.CUSTOM_TOOL_CALL, "custom"
    else:
        spec = entry.get(wire) if isinstance(wire, str) else None
        spec = spec if isinstance(spec, dict) else {}
        whole = {k: v for k, v in entry.items() if k != "index"}
        raw, arguments = parse_arguments(whole)
        kind, wire_type = ActionKind.UNKNOWN_CALL, _str(wire)
    return ToolCall(
        call_id=call_id,
        name=_str(spec.get("name")),
        raw_arguments=raw,
        arguments=arguments,
        index=index,
        key=key,
        kind=kind,
        wire_type=wire_type,
    )


def _custom_input(text: object) -> tuple[str, Mapping[str, Any] | None]:
    """A custom tool's free text; policies see it as ``{"input": text}``, as for Responses."""
    if not isinstance(text, str):
        return ("" if text is None else dumps(text)), None
    return text, parse_arguments({"input": text})[1]


def legacy_call_id(choice: int) -> str:
    """The call id given to a legacy ``function_call``, which has none on the wire."""
    return f"function_call_{choice}"


def legacy_call(function_call: Mapping[str, Any], *, choice: int, key: str) -> ToolCall:
    """A legacy ``function_call`` as a ToolCall, with the id :func:`legacy_call_id` gives."""
    raw, arguments = parse_arguments(function_call.get("arguments"))
    return ToolCall(
        call_id=legacy_call_id(choice),
        name=_str(function_call.get("name")),
        raw_arguments=raw,
        arguments=arguments,
        key=key,
        kind=ActionKind.TOOL_CALL,
        wire_type=_LEGACY,
    )


def _render(call: ToolCall) -> dict[str, Any] | None:
    """The canonical wire form of a decided call, or ``None`` if it cannot be rendered.

    Built from the decided values only, so the agent receives exactly what
    was decided, whatever else the upstream's entry carried.
    """
    if call.wire_type == _LEGACY:
        return {"name": call.name, "arguments": call.raw_arguments}
    if call.kind is ActionKind.TOOL_CALL:
        function = {"name": call.name, "arguments": call.raw_arguments}
        return {"id": call.call_id, "type": "function", "function": function}
    if call.kind is ActionKind.CUSTOM_TOOL_CALL:
        custom = {"name": call.name, "input": call.raw_arguments}
        return {"id": call.call_id, "type": "custom", "custom": custom}
    try:
        entry = loads(call.raw_arguments)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _append_text(content: Any, text: str) -> Any:
    """Message content with ``text`` added after what is there, on a new line."""
    if isinstance(content, str) and content:
        return f"{content}\n{text}"
    if isinstance(content, list) and content:
        return [*content, {"type": "text", "text": text}]
    return text


def _tool_key(choice: int, tool: int | None) -> str:
    return f"c{choice}.f" if tool is None else f"c{choice}.t{tool}"


class OpenAIChatAdapter:
    """The ``openai.chat`` protocol: ``POST /v1/chat/completions``.

    Calls are keyed by position: ``c<choice>.t<n>`` for the n-th entry of a
    choice's ``tool_calls`` (choice = position in ``choices``; in a stream,
    the choice's and delta's ``index``), ``c<choice>.f`` for a legacy
    ``function_call``, which has no id on the wire and is reported with the
    id from :func:`legacy_call_id`.
    """

    name = "openai.chat"
    output_bound = "max_completion_tokens"

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Model, stream flag and ``role: tool`` results, named from earlier assistant calls."""
        refuse_misspelled_request(body, _REQUEST)
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
                        call = entry_call(entry, key="", index=0, parse=False)
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
            tools=declared_tools.openai_chat(body),
            arguments=declared_arguments.openai_chat(body),
            max_output_tokens=_output_bound(body),
            choices=max(1, token_count(body.get("n")) or 1),
            rate=tier_rate(body.get("service_tier")),
        )

    def tool_calls(self, body: Mapping[str, Any]) -> list[ToolCall]:
        """Every choice's tool calls in order; ``index`` is the entry's position in its list."""
        calls: list[ToolCall] = []
        choices = body.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            entries = message.get("tool_calls")
            for i, entry in enumerate(entries if isinstance(entries, list) else ()):
                if isinstance(entry, dict):
                    calls.append(entry_call(entry, key=_tool_key(position, i), index=i))
            function_call = message.get("function_call")
            if isinstance(function_call, dict):
                calls.append(
                    legacy_call(
                        function_call,
                        choice=_choice_index(choice, position),
                        key=_tool_key(position, None),
                    )
                )
        return calls

    def misspelled_key(self, body: Mapping[str, Any]) -> str | None:
        """A key a case-blind client would read as a completion's field (malformed)."""
        return misspelled_key(body, _ENVELOPE)

    def problem(self, body: Mapping[str, Any]) -> str | None:
        """Why the response cannot be decided as it stands, or ``None``."""
        key = self.misspelled_key(body)
        return misspelled(key) if key is not None else None

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """A copy with allowed calls rendered from their decided values, others removed.

        ``decisions`` is keyed by :attr:`ToolCall.key`. Removed calls are
        explained in the message content. Entries that are not objects (never
        decided) are removed too. The input is not mutated.
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
        usage = tiered(_usage(body.get("usage")), body.get("service_tier"))
        return answered_by(usage, body.get("model"))

    def answer_refused(
        self, body: Mapping[str, Any], owed: Mapping[str, tuple[str, str]]
    ) -> tuple[dict[str, Any], int] | None:
        """None: the agent sends the whole conversation, and the provider keeps no answer."""
        return None

    def bound_hosted_calls(
        self, body: Mapping[str, Any], bound: int
    ) -> tuple[Mapping[str, Any], int]:
        """Chat Completions declares no provider-run tool billed per call: as sent."""
        return body, 0

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

    def stream_rewriter(
        self, *, hide_usage: bool = False, choices: int = 1
    ) -> OpenAIChatStreamRewriter:
        """A fresh rewriter for one ``stream: true`` response with up to ``choices`` answers."""
        return OpenAIChatStreamRewriter(hide_usage=hide_usage, choices=choices)


def _usage(usage: Any) -> Usage | None:
    """The counts, or ``None`` (spent as held) unless both are non-negative integers:
    an upstream's ``{}`` or ``"1e9"`` must not settle a model call at nothing."""
    if not isinstance(usage, dict):
        return None
    given, output = (
        token_count(usage.get("prompt_tokens")),
        token_count(usage.get("completion_tokens")),
    )
    if given is None or output is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(input_tokens=given, output_tokens=output, cached_input_tokens=_count(cached))


def _rewrite_choice(
    choice: Mapping[str, Any], position: int, decisions: Mapping[str, Decision]
) -> dict[str, Any]:
    message = dict(choice["message"])
    notes: list[str] = []
    kept_tools = _filter_tool_calls(message, position, decisions, notes)
    kept_function = _filter_function_call(
        message, position, _choice_index(choice, position), decisions, notes
    )
    if notes:
        message["content"] = _append_text(message.get("content"), "\n".join(notes))
    out = dict(choice)
    out["message"] = message
    if not (kept_tools or kept_function) and out.get("finish_reason") in _CALL_FINISHES:
        out["finish_reason"] = "stop"
    return out


def _decided(call: ToolCall, decisions: Mapping[str, Decision], notes: list[str]) -> Any:
    """The rendered call if allowed (and renderable), else ``None`` with a note why."""
    decision = decisions.get(call.key, NO_DECISION)
    if decision.enforced is Effect.ALLOW:
        rendered = _render(call)
        if rendered is not None:
            return rendered
    notes.append(blocked_message(call, decision))
    return None


def _filter_tool_calls(
    message: dict[str, Any], position: int, decisions: Mapping[str, Decision], notes: list[str]
) -> bool:
    """Keep only allowed ``tool_calls`` in ``message``, re-rendered; True if any remain."""
    if "tool_calls" not in message:
        return False
    entries = message.pop("tool_calls")
    if entries is None:
        message["tool_calls"] = None
        return False
    kept: list[Any] = []
    # Entries that are not objects cannot be decided, so they are dropped too.
    for i, entry in enumerate(entries if isinstance(entries, list) else ()):
        if isinstance(entry, dict):
            call = entry_call(entry, key=_tool_key(position, i), index=i, parse=False)
            rendered = _decided(call, decisions, notes)
            if rendered is not None:
                kept.append(rendered)
    if kept:
        message["tool_calls"] = kept
    return bool(kept)


def _filter_function_call(
    message: dict[str, Any],
    position: int,
    choice: int,
    decisions: Mapping[str, Decision],
    notes: list[str],
) -> bool:
    """Keep the legacy ``function_call`` only if allowed, re-rendered; True if it remains."""
    if "function_call" not in message:
        return False
    function_call = message.pop("function_call")
    if function_call is None:
        message["function_call"] = None
        return False
    if not isinstance(function_call, dict):
        return False
    call = legacy_call(function_call, choice=choice, key=_tool_key(position, None))
    rendered = _decided(call, decisions, notes)
    if rendered is None:
        return False
    message["function_call"] = rendered
    return True


# --- streams ---------------------------------------------------------------------------


class _Text(list[str]):
    """A string being assembled from fragments, joined once when the call closes."""


def _held(value: Any) -> Any:
    if isinstance(value, str):
        return _Text([value])
    if isinstance(value, dict):
        return {k: _held(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_held(v) for v in value]
    return value


def _joined(value: Any) -> Any:
    if isinstance(value, _Text):
        return "".join(value)
    if isinstance(value, dict):
        return {k: _joined(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_joined(v) for v in value]
    return value


def _merge(acc: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Merge one fragment into a call as the SDK's ``accumulate_delta`` does.

    Strings are concatenated (a second ``id`` extends the first, it does not
    start a new call), ``type`` is replaced, objects merge, lists extend;
    a value of another shape than the one held is ignored.
    """
    for key, value in delta.items():
        current = acc.get(key)
        if current is None or key == "type":
            acc[key] = _held(value)
        elif isinstance(current, _Text):
            if isinstance(value, str):
                current.append(value)
        elif isinstance(current, dict):
            if isinstance(value, dict):
                _merge(current, value)
        elif isinstance(current, list):
            if isinstance(value, list):
                current.extend(_held(v) for v in value)
        elif isinstance(current, int | float) and isinstance(value, int | float):
            acc[key] = current + value


@dataclass(slots=True)
class _Open:
    """A call whose fragments are held until it is decided (mutable, per stream)."""

    choice: int
    tool: int | None  # the upstream tool index; None for a legacy function_call
    position: int
    envelope: dict[str, Any]  # the chunk it started in, without its choices
    event: SseEvent
    entry: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _ChoiceState:
    """What one choice of the stream has shown so far (mutable, per stream)."""

    open: _Open | None = None
    decided: set[int | None] = field(default_factory=set)
    finished: bool = False
    emitted: bool = False  # the agent has seen this choice (its SDK has a slot for it)
    calls: int = 0
    next_index: int = 0
    allowed: bool = False
    has_text: bool = False


def _violation(why: str) -> StreamViolation:
    return StreamViolation(f"chat completion stream: {why}")


def _call_parts(choice: Mapping[str, Any]) -> tuple[list[Any], Any]:
    """The ``tool_calls`` parts and ``function_call`` of a choice's delta; checked shapes."""
    delta = choice.get("delta")
    if delta is None:
        return [], None
    if not isinstance(delta, dict):
        raise _violation("a choice's delta is not an object")
    parts = delta.get("tool_calls")
    if parts is None:
        parts = []
    elif not isinstance(parts, list):
        raise _violation("delta.tool_calls is not a list")
    function_call = delta.get("function_call")
    if function_call is not None and not isinstance(function_call, dict):
        raise _violation("delta.function_call is not an object")
    return parts, function_call


def _shallow(value: Any, depth: int = 0) -> bool:
    """True unless ``value`` nests past what a call can carry (and what is safe to recurse)."""
    if depth > _MAX_PART_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_shallow(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_shallow(v, depth + 1) for v in value)
    return True


def _meaningful(choice: Mapping[str, Any]) -> bool:
    """True when a choice still says something once its tool-call deltas are taken out."""
    delta = choice.get("delta")
    if isinstance(delta, dict) and any(value is not None for value in delta.values()):
        return True
    return choice.get("finish_reason") is not None or choice.get("logprobs") is not None


def ends_stream(event: SseEvent, data: Mapping[str, Any]) -> bool:
    """True when an official OpenAI SDK raises on this stream event and reads nothing after.

    The union of both SDKs' tests, so that no agent reads a call Warden did not
    decide (nor is one decided that no agent read): Python's
    (``openai._streaming.Stream.__stream__``) raises on an ``error`` member
    Python reads as true; TypeScript's (npm ``openai``, ``core/streaming.js``,
    ``Stream.fromSSEResponse``, legacy mode) on any event named ``error`` and on
    an ``error`` member JavaScript reads as true, as it does ``{}`` and ``[]``.
    So only an ``error`` that is absent, ``null``, ``false``, ``0`` or ``""``
    ends nothing. ``data`` is the event's parsed object; ``[DONE]`` is the
    caller's to test first (both SDKs stop there before any other test).
    """
    error = data.get("error")
    return event.event == "error" or bool(error) or isinstance(error, (dict, list))


class OpenAIChatStreamRewriter(StreamStatus):
    """Rewrites one chat completion stream (``data: {chunk}`` events, ``data: [DONE]``).

    Chunks without tool-call deltas or a finish reason are yielded unchanged
    (the same event object). A chunk that mixes tool-call deltas with other
    content is split: the other content is sent on at once, the deltas held.
    A chunk that cannot be parsed, is not the shape the SDK reads, or touches
    a decided call (or a finished choice) raises :class:`StreamViolation`.

    A chunk an SDK raises on (see :func:`ends_stream`) ends the stream, as it
    does for the SDK, which reads nothing after: it goes on with its choices
    emptied, the calls still held are dropped undecided, and :attr:`failed`
    tells the driver to stop. A tool call delta after it is a violation. After
    ``[DONE]`` no SDK reads on, so a chunk there ends nothing: it is read as
    any chunk after the end (a call in it is a violation).

    Choices must first appear in order 0, 1, 2…: the SDK's accumulator puts
    a choice it has not seen at the end of its list and looks choices up by
    ``index``, so any other order would merge one choice's calls into another's.
    """

    def __init__(self, *, hide_usage: bool = False, choices: int = 1) -> None:
        self._hide_usage = hide_usage
        self._max_choices = max(1, choices)
        self._choices: dict[int, _ChoiceState] = {}
        self._pending: dict[str, tuple[ToolCall, _Open]] = {}
        self._failed = False
        super().__init__()

    @property
    def failed(self) -> bool:
        """True once the upstream sent a chunk an SDK raises on (:func:`ends_stream`)."""
        return self._failed

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield events to send and calls to decide.

        Raises :class:`StreamViolation` (while iterating) on an event that
        cannot be parsed or would change a call that was already decided.
        """
        data = event.data
        if data.startswith(_DONE):  # the SDK's own test for the end marker
            self._complete = True
            yield from self._close_all()
            yield event
            return
        try:
            chunk = event_object(data, _ENVELOPE)
        except ValueError as exc:
            raise _violation(f"an event {exc}") from None
        event = as_read(event, chunk)
        model = chunk.get("model")
        if isinstance(model, str):
            self._model = model
        usage = tiered(_usage(chunk.get("usage")), chunk.get("service_tier"))
        choices = chunk.get("choices")
        if usage is not None:
            self._usage = usage
        if not self._complete and ends_stream(event, chunk):
            yield self._fail(event, chunk)
            return
        if usage is not None and self._hide_usage and choices == []:
            return  # the usage-only chunk Warden asked for; the agent did not
        if choices is None:
            yield event  # no choices, so no call (keep-alives, usage)
            return
        if not isinstance(choices, list):
            raise _violation("choices is not a list")
        has_calls, finishing, texts = self._scan(choices)
        if has_calls and chunk.get("object", _CHUNK) != _CHUNK:
            # The SDK's stream helper skips such chunks, its raw iterator does not.
            raise _violation("a tool call delta in a chunk that is not a chat.completion.chunk")
        if not has_calls and not finishing:
            self._mark_sent(choices, texts)
            yield event  # the hot path: text, role and empty deltas go out as read
            return
        yield from self._split(event, chunk, choices, has_calls, texts)

    def _scan(self, choices: list[Any]) -> tuple[bool, bool, list[int]]:
        """Check every choice's shape; say whether any carries calls or finishes, and
        which carry text."""
        has_calls = False
        finishing = False
        texts: list[int] = []
        seen: set[int] = set()
        for choice in choices:
            if not isinstance(choice, dict):
                raise _violation("a choice is not an object")
            index = self._check_index(choice)
            # The SDK's stream helper makes its first snapshot from the first chunk's
            # choices as sent, by position: a choice repeated, or one carrying a whole
            # ``message``, would hand the agent tool calls no delta ever carried.
            if index in seen:
                raise _violation(f"choice {index} appears twice in one chunk")
            seen.add(index)
            if "message" in choice:
                raise _violation("a chunk's choice carries a message; chunks carry deltas")
            parts, function_call = _call_parts(choice)
            if parts or function_call is not None:
                if self._failed:
                    raise _violation("a tool call delta after the stream's error")
                if self._complete or self._state(index).finished:
                    raise _violation(f"a tool call delta after choice {index} finished")
                has_calls = True
            finishing = finishing or choice.get("finish_reason") is not None
            delta = choice.get("delta")
            if (
                isinstance(delta, dict)
                and isinstance(delta.get("content"), str)
                and delta["content"]
            ):
                texts.append(index)
        return has_calls, finishing, texts

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """An allowed call as one canonical delta; else one content delta saying why."""
        pending = self._pending.pop(call.key, None)
        if pending is None:
            return []
        decided, held = pending  # what was yielded is what is rendered
        state = self._state(held.choice)
        rendered = _render(decided) if decision.enforced is Effect.ALLOW else None
        if rendered is not None:
            state.allowed = True
            if held.tool is None:
                delta: dict[str, Any] = {"function_call": rendered}
            else:
                delta = {"tool_calls": [{"index": state.next_index, **rendered}]}
                state.next_index += 1
            return [self._chunk_event(held, delta)]
        text = blocked_message(decided, decision)
        if state.has_text:
            text = f"\n{text}"
        state.has_text = True
        return [self._chunk_event(held, {"content": text})]

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield the calls still open (a stream cut before ``[DONE]``)."""
        yield from self._close_all()

    def _state(self, choice: int) -> _ChoiceState:
        state = self._choices.get(choice)
        if state is None:
            state = self._choices[choice] = _ChoiceState()
        return state

    def _check_index(self, choice: Mapping[str, Any]) -> int:
        index = _int(choice.get("index"))
        if index is None:
            raise _violation("a choice has no integer index")
        if index not in self._choices:
            if index != len(self._choices):
                raise _violation(f"choice {index} appears before choice {len(self._choices)}")
            if index >= self._max_choices:
                # Frameworks that read choices[0] of every chunk (LangChain) would merge
                # its calls into the first choice's: a call no decision saw.
                raise _violation(
                    f"choice {index} in an answer to a request for {self._max_choices}"
                )
            self._choices[index] = _ChoiceState()
        return index

    def _fail(self, event: SseEvent, chunk: dict[str, Any]) -> SseEvent:
        """The error chunk that ends the stream, as the agent is to get it.

        The SDK raises on it and reads nothing after: the calls still held never
        reach the agent, so they are dropped, never decided. Its choices are
        emptied, so that no other client reads a call from them either.
        """
        self._failed = True
        for state in self._choices.values():
            state.open = None
        if chunk.get("choices", []) == []:
            return event
        # Emptied, not removed: the Python SDK reads a chunk that is only named
        # ``error`` as a chunk, and its callers iterate its choices.
        envelope = {**chunk, "choices": []}
        return SseEvent(data=dumps(envelope), event=event.event, id=event.id)

    def _mark_sent(self, choices: list[Any], texts: list[int]) -> None:
        for choice in choices:
            self._state(_choice_index(choice)).emitted = True
        # Remembered so that a later blocked-call notice starts on its own line.
        for index in texts:
            self._state(index).has_text = True

    def _chunk_event(self, held: _Open, delta: dict[str, Any]) -> SseEvent:
        chunk = dict(held.envelope)
        chunk["choices"] = [
            {"index": held.choice, "delta": delta, "logprobs": None, "finish_reason": None}
        ]
        return SseEvent(data=dumps(chunk), event=held.event.event, id=held.event.id)

    def _split(
        self,
        event: SseEvent,
        chunk: dict[str, Any],
        choices: list[Any],
        has_calls: bool,
        texts: list[int],
    ) -> Iterator[StreamItem]:
        envelope = {key: value for key, value in chunk.items() if key != "choices"}
        if "usage" in envelope:
            envelope["usage"] = None
        remainder: list[dict[str, Any]] = []
        for choice in choices:
            index = _choice_index(choice)
            state = self._state(index)
            parts, function_call = _call_parts(choice)
            if parts or function_call is not None:
                yield from self._take(
                    state, index, parts, function_call, envelope=envelope, event=event
                )
                rest = dict(choice)
                rest["delta"] = {
                    key: value for key, value in choice["delta"].items() if key not in _CALL_FIELDS
                }
                # A choice the SDK has not seen keeps its slot, or a later one would take it.
                if _meaningful(rest) or not state.emitted:
                    remainder.append(rest)
                    state.emitted = True
            else:
                remainder.append(choice)
                state.emitted = True
            if choice.get("finish_reason") is not None:
                yield from self._close(state)
                state.finished = True
        # Read only now: the calls yielded above have been resolved by the consumer.
        rewritten = False
        for i, choice in enumerate(remainder):
            if (
                choice.get("finish_reason") in _CALL_FINISHES
                and not self._state(_choice_index(choice)).allowed
            ):
                remainder[i] = {**choice, "finish_reason": "stop"}
                rewritten = True
        self._mark_sent(remainder, texts)
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
        state: _ChoiceState,
        choice: int,
        parts: list[Any],
        function_call: Mapping[str, Any] | None,
        *,
        envelope: dict[str, Any],
        event: SseEvent,
    ) -> Iterator[ToolCall]:
        for part in parts:
            if not isinstance(part, dict):
                raise _violation("a tool_calls part is not an object")
            tool = _int(part.get("index"))
            if tool is None:
                raise _violation("a tool_calls part has no integer index")
            if not _shallow(part):
                raise _violation("a tool_calls part is nested too deeply")
            closed, entry = self._hold(state, choice, tool, envelope=envelope, event=event)
            yield from closed
            _merge(entry, {k: v for k, v in part.items() if k != "index"})
        if function_call is not None:
            if not _shallow(function_call):
                raise _violation("a function_call delta is nested too deeply")
            closed, entry = self._hold(state, choice, None, envelope=envelope, event=event)
            yield from closed
            _merge(entry, function_call)

    def _hold(
        self,
        state: _ChoiceState,
        choice: int,
        tool: int | None,
        *,
        envelope: dict[str, Any],
        event: SseEvent,
    ) -> tuple[list[ToolCall], dict[str, Any]]:
        """Make the call at ``tool`` the open one: the calls this closes, and its entry."""
        if state.finished:
            raise _violation(f"a tool call delta after choice {choice} finished")
        if tool in state.decided:
            raise _violation(f"a delta for call {_tool_key(choice, tool)} after it was decided")
        closed: list[ToolCall] = []
        held = state.open
        if held is not None and held.tool != tool:
            closed = list(self._close(state))
            held = None
        if held is None:
            held = state.open = _Open(choice, tool, state.calls, envelope, event)
            state.calls += 1
        return closed, held.entry

    def _close(self, state: _ChoiceState) -> Iterator[ToolCall]:
        held = state.open
        if held is None:
            return
        state.open = None
        state.decided.add(held.tool)
        key = _tool_key(held.choice, held.tool)
        entry = _joined(held.entry)
        if held.tool is None:
            call = legacy_call(entry, choice=held.choice, key=key)
        else:
            call = entry_call(entry, key=key, index=held.position)
        self._pending[key] = (call, held)
        yield call

    def _close_all(self) -> Iterator[ToolCall]:
        for choice in sorted(self._choices):
            yield from self._close(self._choices[choice])
