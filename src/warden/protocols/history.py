"""The conversation so far, from a model request's messages: sans-I/O, bounded.

Agents resend the whole conversation on every model request. This module
reads it once per request and keeps what policies need: each earlier tool
call (tool, arguments, call id) and the result the agent sent back for it.

* OpenAI Chat Completions: ``assistant`` messages' ``tool_calls`` (function
  and custom) and legacy ``function_call``, answered by ``role: tool``
  messages and (a legacy call, which has no id) by the latest ``role:
  function`` message of its name;
* OpenAI Responses: every call item type the adapter decides (function,
  custom, shell, computer, apply-patch, MCP and hosted calls), answered by the
  ``*_output`` items, or inline for a hosted call the provider ran (an
  ``mcp_call``'s ``output``); ``previous_response_id`` is resolved
  elsewhere, from Warden's own records (:mod:`warden.sessions`); and the
  hosted MCP calls the request approves (``mcp_approval_response``), which
  the provider then runs. A ``compaction`` item (an encrypted summary of
  earlier turns) and an ``item_reference`` (``type`` ``item_reference``, or
  none at all and an ``id``: the SDK's ``ItemReference`` makes ``type``
  optional), which the provider fills in from an item it keeps, put content
  Warden cannot read into the model's context: they set ``truncated``;
* Anthropic Messages: every call block the adapter decides (``tool_use``,
  ``server_tool_use``, ``mcp_tool_use``), answered by ``tool_result`` and by
  every ``*_tool_result`` block (``web_fetch_tool_result``, ``mcp_tool_result``,
  ...), which carries the result of a call the provider ran, in either turn.
  A ``compaction`` block (a summary standing for earlier turns) sets
  ``truncated``, as a Responses ``compaction`` item does.

Bounds: at most ``max_messages`` messages (or items) are read, the latest
``max_calls`` calls (and as many results without their call) are kept, each
result keeps ``max_result_chars`` characters (with its full size and
SHA-256), and extraction stops after ``max_ms``; any of these sets
``truncated``. Nothing here raises on a
malformed conversation: what cannot be read is left out (the adapters have
already refused a body that is not JSON). Calls are read by the adapters' own
readers, so each has the name, arguments and digest Warden decided it with.
A result whose call is not in the request is kept apart (``results``); one
that names its tool (``role: function``, a hosted tool's ``*_tool_result``)
still counts that tool as answered, and so does one read before its call (out
of order, in any protocol): that call's tool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from warden.model import ActionKind, Conversation, HostedApproval, PriorCall, PriorResult
from warden.protocols._wire import parse_arguments
from warden.protocols.anthropic import CALL_BLOCKS, AnthropicMessagesAdapter
from warden.protocols.openai_chat import entry_call, legacy_call, legacy_call_id
from warden.protocols.openai_responses import CALL_SHAPES, PASSIVE_ITEMS, call_of, canonical_item

__all__ = [
    "APPROVAL_REQUEST",
    "EXTRACTORS",
    "MAX_APPROVAL_REQUESTS",
    "Bounds",
    "arguments_digest",
    "bound_result",
    "extract",
    "hosted_approvals",
    "hosted_environment",
]

_TIME_CHECK_EVERY: Final = 64
"""Messages between two clock reads: the time bound costs almost nothing."""


class Bounds:
    """How much of a conversation one request's extraction may read and keep."""

    __slots__ = ("max_calls", "max_messages", "max_ms", "max_result_chars")

    def __init__(
        self,
        *,
        max_calls: int = 256,
        max_messages: int = 5000,
        max_result_chars: int = 2048,
        max_ms: float = 20.0,
    ) -> None:
        self.max_calls = max_calls
        self.max_messages = max_messages
        self.max_result_chars = max_result_chars
        self.max_ms = max_ms


APPROVAL_REQUEST: Final = "mcp_approval_request"
"""The kind of call whose digest is kept apart (:func:`arguments_digest`)."""


def arguments_digest(arguments: Mapping[str, Any] | None, raw: str = "", kind: str = "") -> str:
    """SHA-256 (hex) of arguments in canonical JSON; of ``raw`` when they are not an object.

    The session guard keeps this digest for every call Warden decides, and
    compares it with the digest of the call as the conversation carries it.
    A hosted MCP approval request's (``kind`` :data:`APPROVAL_REQUEST`) is
    prefixed with its kind: an approval then matches only a decided approval
    request, never a call at another door that an agent gave the same id.
    """
    if arguments is not None:
        try:
            data = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            data = b"\x00" + raw.encode("utf-8", "surrogatepass")
    else:
        data = b"\x00" + raw.encode("utf-8", "surrogatepass")
    if kind == APPROVAL_REQUEST:
        data = b"mcp_approval_request\x00" + data
    return hashlib.sha256(data).hexdigest()


def _object(raw: Any) -> tuple[Mapping[str, Any] | None, str]:
    """Arguments parsed exactly as the adapters parse a proposed call's, and their raw text."""
    text, arguments = parse_arguments(raw)
    return arguments, text


def _text(content: Any) -> str:
    """A result's text: a string, or the text parts of a content list, else its JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        if parts:
            return "".join(parts)
    if content is None:
        return ""
    try:
        return orjson.dumps(content).decode()
    except TypeError:
        return ""


def bound_result(text: str, limit: int, *, is_error: bool = False) -> PriorResult:
    """A result as history keeps it: ``limit`` characters, with the whole one's size and digest."""
    data = text.encode("utf-8", "surrogatepass")
    return PriorResult(
        content=text[:limit],
        size=len(data),
        digest=hashlib.sha256(data).hexdigest(),
        is_error=is_error,
    )


class _Builder:
    """Collects calls and results in order, within the bounds."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.calls: dict[str, PriorCall] = {}
        """In the order the model sees them: a call id given again moves to the end.
        Keyed by call id, or by a slot of its own for a legacy call (which has none)."""
        self.legacy: dict[str, str] = {}
        """The slot of the latest legacy ``function_call`` of each name."""
        self.orphans: dict[str, PriorResult] = {}
        self.truncated = False
        self.stopped = False
        """A bound stopped the reading: the calls and results after it are not read."""
        self.messages = 0
        self.entries = 0
        self.answered: set[str] = set()
        """Tools whose results were read, whether or not their calls are kept."""
        self._deadline = time.perf_counter() + bounds.max_ms / 1000

    def tick(self) -> bool:
        """Count one message; ``False`` once a bound stops the reading."""
        if self.stopped:
            return False
        if self.messages >= self.bounds.max_messages:
            self.truncated = True
            return False
        self.messages += 1
        if self.messages % _TIME_CHECK_EVERY == 0 and time.perf_counter() > self._deadline:
            self.truncated = True
            return False
        return True

    def _entry(self) -> bool:
        """Count one call or result, as :meth:`tick` counts messages: one message may
        carry any number of them (50,000 tool calls in one assistant message)."""
        if self.stopped:
            return False
        self.entries += 1
        if self.entries > self.bounds.max_messages or (
            self.entries % _TIME_CHECK_EVERY == 0 and time.perf_counter() > self._deadline
        ):
            self.truncated = self.stopped = True
            return False
        return True

    def call(
        self,
        call_id: Any,
        tool: Any,
        raw_arguments: Any,
        *,
        raw: str | None = None,
        kind: str = "",
        slot: str | None = None,
    ) -> None:
        if not self._entry():
            return
        if not isinstance(call_id, str) or not call_id or not isinstance(tool, str) or not tool:
            return
        if raw is None:
            arguments, raw = _object(raw_arguments)
        else:
            arguments = raw_arguments
        slot = slot or call_id
        # The later one stands, as the model sees it, at the end of the order.
        self.calls.pop(slot, None)
        self.calls[slot] = PriorCall(
            call_id=call_id,
            tool=tool,
            arguments=arguments,
            digest=arguments_digest(arguments, raw, kind),
        )

    def legacy_function_call(self, function_call: Mapping[str, Any], position: int) -> None:
        """A legacy ``function_call``: every one has the same id, so each gets a slot."""
        call = legacy_call(function_call, choice=0, key="")
        slot = f"{call.call_id}\x00{position}"
        self.call(call.call_id, call.name, call.arguments, raw=call.raw_arguments, slot=slot)
        if slot in self.calls:
            self.legacy[call.name] = slot

    def result(
        self, call_id: Any, content: Any, *, is_error: bool = False, tool: str | None = None
    ) -> None:
        """The result for the call in slot ``call_id``; ``tool``: the one it names itself."""
        if not self._entry() or not isinstance(call_id, str):
            return
        found = bound_result(_text(content), self.bounds.max_result_chars, is_error=is_error)
        call = self.calls.get(call_id)
        if call is None:
            # A call the request does not carry: an earlier response's, in a Responses chain.
            self.orphans[call_id] = found
            if tool:
                # Its output entered the conversation all the same: it taints (fail closed).
                self.answered.add(tool)
            return
        self.answered.add(call.tool)
        self.calls[call_id] = PriorCall(call.call_id, call.tool, call.arguments, call.digest, found)

    def named_result(self, tool: Any, content: Any) -> None:
        """A legacy ``role: function`` result: it names its function, not a call."""
        if isinstance(tool, str) and tool:
            self.result(self.legacy.get(tool, legacy_call_id(0)), content, tool=tool)

    def answer_orphans(self) -> None:
        """A result read before its call (out of order): that call's tool's output entered too."""
        for call_id in self.orphans:
            call = self.calls.get(call_id)
            if call is not None:
                self.answered.add(call.tool)

    def unseen(self) -> None:
        """Content the provider puts in the model's context that Warden cannot read (a
        compaction, a stored item): what entered the conversation is unknown (fail closed)."""
        self.truncated = True

    def done(self) -> Conversation:
        self.answer_orphans()
        order = list(self.calls)
        keep = order[-self.bounds.max_calls :] if self.bounds.max_calls else []
        orphans = tuple(self.orphans.items())
        results = orphans[-self.bounds.max_calls :] if self.bounds.max_calls else ()
        # A result left out may be the one that answers a chain's call (and taints).
        truncated = self.truncated or len(keep) < len(order) or len(results) < len(orphans)
        return Conversation(
            calls=tuple(self.calls[i] for i in keep),
            results=results,
            messages=self.messages,
            truncated=truncated,
            answered_tools=frozenset(self.answered),
        )


def _chat(body: Mapping[str, Any], b: _Builder) -> None:
    messages = body.get("messages")
    for position, message in enumerate(messages if isinstance(messages, list) else ()):
        if not b.tick():
            return
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "assistant":
            calls = message.get("tool_calls")
            for entry in calls if isinstance(calls, list) else ():
                if b.stopped:
                    return  # parse nothing past the bound
                if isinstance(entry, dict):
                    # Read from the field its ``type`` names (function, custom), as decided.
                    call = entry_call(entry, key="", index=0)
                    b.call(call.call_id, call.name, call.arguments, raw=call.raw_arguments)
            legacy = message.get("function_call")
            if isinstance(legacy, dict):
                b.legacy_function_call(legacy, position)
        elif role == "tool":
            b.result(message.get("tool_call_id"), message.get("content"))
        elif role == "function":
            b.named_result(message.get("name"), message.get("content"))


_RESPONSES_CALLS: Final = frozenset(CALL_SHAPES)
"""Every call item type the adapter decides."""
_RESPONSES_RESULTS: Final = frozenset(t for t in PASSIVE_ITEMS if t.endswith("_output"))
_INLINE_RESULTS: Final = {
    "mcp_call": "output",
    "file_search_call": "results",
    "code_interpreter_call": "outputs",
}
"""Hosted calls the provider ran, whose result the item itself carries (retrieved text)."""


_UNREADABLE: Final = frozenset({"compaction"})
"""Item types whose content Warden cannot read: an encrypted summary of earlier turns."""


def _reference(item: Mapping[str, Any]) -> bool:
    """An ``item_reference``: the provider fills it in from an item it keeps, unseen here.

    The SDK's ``ItemReference`` makes ``type`` optional (absent or ``null``), and
    the adapter passes such an item on as it came: an item with no type and an
    ``id`` is read as one too (fail closed), whatever else it carries.
    """
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and item.get("id") is not None)


def _responses(body: Mapping[str, Any], b: _Builder) -> None:
    items = body.get("input")
    for position, item in enumerate(items if isinstance(items, list) else ()):
        if not b.tick():
            return
        if not isinstance(item, dict):
            continue
        if _reference(item):
            b.unseen()
            continue
        kind = item.get("type")
        if not isinstance(kind, str):
            continue  # a message without its (optional) type: no call, no result
        if kind in _UNREADABLE:
            b.unseen()
        elif kind in _RESPONSES_CALLS:
            # Named and parsed exactly as the adapter named the call it decided.
            call = call_of(canonical_item(item), position)
            b.call(call.call_id, call.name, call.arguments, raw=call.raw_arguments, kind=kind)
            _inline_result(item, kind, call.call_id, call.name, b)
            if CALL_SHAPES[kind].kind in _PROVIDER_RUN or (
                kind == "shell_call" and hosted_environment(item.get("environment"))
            ):
                # The provider ran it, with or without its result in this request (Anthropic
                # runs a server tool once the next request brings the client tools' results).
                b.answered.add(call.name)
        elif kind in _RESPONSES_RESULTS:
            b.result(item.get("call_id") or item.get("id"), item.get("output"))


_PROVIDER_RUN: Final = frozenset({ActionKind.HOSTED_TOOL_CALL, ActionKind.MCP_CALL})
"""Call kinds the provider runs itself: their output reaches the model, decided or not."""


def hosted_environment(environment: Any) -> bool:
    """Whether a ``shell_call``'s environment is the provider's (a container), not the
    agent's machine (``local``, or none named)."""
    return isinstance(environment, dict) and environment.get("type") not in (None, "local")


def _inline_result(
    item: Mapping[str, Any], kind: str, call_id: str, tool: str, b: _Builder
) -> None:
    """A hosted call's own result; it names its tool even when the call has no id."""
    field = _INLINE_RESULTS.get(kind)
    if field is None:
        return
    if item.get(field) is not None:
        b.result(call_id, item[field], tool=tool)
    elif kind == "mcp_call" and item.get("error") is not None:
        b.result(call_id, item["error"], is_error=True, tool=tool)  # the server's words too


MAX_APPROVAL_REQUESTS: Final = 256
"""Approval request items read from one request; past this, approvals relying on any
of them are refused (:attr:`Conversation.approval_requests_cut`)."""


def hosted_approvals(
    body: Mapping[str, Any],
) -> tuple[tuple[HostedApproval, ...], tuple[PriorCall, ...], bool]:
    """The hosted MCP calls a Responses request approves, and the approval request items
    it carries (every copy, its digest prefixed with its kind), from its whole ``input``.

    Not bounded as the history is: an approval (or the request it names) past
    ``max_messages`` would otherwise go to the provider unchecked. The pass only
    looks at each item's ``type`` (and ``id``) and parses the approval request items,
    at most :data:`MAX_APPROVAL_REQUESTS` (the third value says there were more, or
    that an ``item_reference``, typed or not, has the provider fill in an item Warden
    cannot see). Only ``approve: false`` is a refusal: anything else may read as yes
    to the provider.
    """
    items = body.get("input")
    if not isinstance(items, list):
        return (), (), False
    approved: dict[str | None, None] = {}
    asked: list[PriorCall] = []
    cut = False
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "mcp_approval_response" and item.get("approve") is not False:
            request_id = item.get("approval_request_id")
            approved[request_id if isinstance(request_id, str) else None] = None
        elif _reference(item):
            # The provider fills it in from any item it keeps (an item with no type and
            # an ``id`` too): a copy Warden cannot see.
            cut = True
        elif kind == APPROVAL_REQUEST:
            if len(asked) == MAX_APPROVAL_REQUESTS:
                cut = True
                continue
            call = call_of(canonical_item(item), position)
            if call.call_id:
                digest = arguments_digest(call.arguments, call.raw_arguments, APPROVAL_REQUEST)
                asked.append(PriorCall(call.call_id, call.name, call.arguments, digest))
    copies: dict[str, list[PriorCall]] = {}
    for copy in asked:
        copies.setdefault(copy.call_id, []).append(copy)
    approvals = tuple(
        HostedApproval(i, tuple(copies.get(i, ())) if i is not None else ()) for i in approved
    )
    return approvals, tuple(asked), cut


_ANTHROPIC: Final = AnthropicMessagesAdapter()
"""Reads each call block as Warden decided it (name, arguments); holds no state."""
_ANTHROPIC_CALLS: Final = frozenset(CALL_BLOCKS)
"""Every call block type the adapter decides (any other type is decided as unknown)."""
_ANTHROPIC_UNREADABLE: Final = frozenset({"compaction"})
"""Block types that stand for content Warden cannot read: a summary of earlier turns
(which may retell any tool's output), in either turn."""
_ANTHROPIC_PROVIDER_RUN: Final = frozenset({"server_tool_use", "mcp_tool_use"})
_RESULT: Final = "_tool_result"
_RESULT_TOOLS: Final[Mapping[str, tuple[str, ...]]] = {
    "tool_search_tool_result": ("tool_search_tool_regex", "tool_search_tool_bm25"),
    # Named by its call's id alone: without the call, its tool is unknown.
    "mcp_tool_result": (),
    "tool_result": (),
}
"""The ``server_tool_use`` names a result block's type stands for, when not
``<name>_tool_result`` (``web_fetch_tool_result``: ``web_fetch``)."""


def _anthropic(body: Mapping[str, Any], b: _Builder) -> None:
    # A result read before its call counts its call's tool as answered (_Builder.done).
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not b.tick():
            return
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, list):
            continue
        role = message.get("role")
        for block in content:
            if b.stopped:
                return  # parse nothing past the bound
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if not isinstance(kind, str):
                continue
            if kind in _ANTHROPIC_UNREADABLE:
                b.unseen()
            elif role == "assistant" and kind in _ANTHROPIC_CALLS:
                # Named and parsed exactly as the adapter named the call it decided
                # (a toolset member's ``<toolset>.<name>``, a hosted tool's own name).
                (call,) = _ANTHROPIC.tool_calls({"content": [block]})
                b.call(call.call_id, call.name, call.arguments, raw=call.raw_arguments)
                if kind in _ANTHROPIC_PROVIDER_RUN:
                    # Run at the provider, its result here or not: a server tool called
                    # beside a client tool runs once the next request brings their results.
                    b.answered.add(call.name)
            elif kind == "tool_result" or kind.endswith(_RESULT):
                # In either turn: a provider-run call's result inline in the assistant's
                # (``web_fetch_tool_result``), a hosted MCP call's (``mcp_tool_result``).
                _anthropic_result(block, kind, b)


def _anthropic_result(block: Mapping[str, Any], kind: str, b: _Builder) -> None:
    """A ``*_tool_result`` block, for the call whose ``tool_use_id`` it names.

    One whose call the request does not carry still counts the tool its type
    names as answered (fail closed): a hosted tool's result is its output.
    """
    content = block.get("content")
    error = block.get("is_error") is True or (
        # A hosted tool's failure: ``{"type": "web_fetch_tool_result_error", ...}``.
        isinstance(content, dict)
        and isinstance(content.get("type"), str)
        and content["type"].endswith("_error")
    )
    tools = _RESULT_TOOLS.get(kind)
    if tools is None:
        tools = (kind.removesuffix(_RESULT),) if kind != _RESULT else ()
    b.result(block.get("tool_use_id"), content, is_error=error, tool=tools[0] if tools else None)
    if tools and not b.stopped:
        # Every tool the type may stand for, its call kept or not, named or not (fail closed).
        b.answered.update(tools)


EXTRACTORS: Final[dict[str, Callable[[Mapping[str, Any], _Builder], None]]] = {
    "openai_chat": _chat,
    "openai_responses": _responses,
    "anthropic": _anthropic,
}
"""By adapter name (:attr:`warden.protocols.base.Adapter.name`)."""


def extract(protocol: str, body: Mapping[str, Any], bounds: Bounds | None = None) -> Conversation:
    """The prior tool calls and results of ``body``, a model request of ``protocol``.

    An unknown protocol gives an empty conversation. ``previous_response_id``
    (Responses API) is carried over for the session guard to resolve.
    """
    builder = _Builder(bounds or Bounds())
    reader = EXTRACTORS.get(protocol)
    if reader is not None:
        reader(body, builder)
    conversation = builder.done()
    if protocol == "openai_responses":
        approvals, requests, cut = hosted_approvals(body)
        if approvals or requests or cut:
            conversation = dataclasses.replace(
                conversation,
                approvals=approvals,
                approval_requests=requests,
                approval_requests_cut=cut,
            )
    previous = body.get("previous_response_id") if protocol == "openai_responses" else None
    if isinstance(previous, str) and previous:
        return dataclasses.replace(conversation, previous_response_id=previous)
    return conversation
