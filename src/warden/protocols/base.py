"""The contract every protocol adapter implements. Adapters do no I/O.

An adapter knows one wire format. The ingress hands it parsed JSON bodies and
SSE events; it hands back tool calls to decide and the bytes to send. That
keeps every protocol testable from recorded bytes, without sockets.

Streaming uses a small sans-I/O protocol. For each upstream SSE event the
ingress calls :meth:`StreamRewriter.feed` and walks the returned iterator in
order. Items are either :class:`~warden.protocols.sse.SseEvent` (send now) or
:class:`~warden.model.ToolCall` (a call whose arguments are complete: decide
it, then call :meth:`StreamRewriter.resolve` with the decision and send what
it returns before taking the next item). Iterators are lazy, so an event that
depends on earlier decisions (the finish reason) is built only once those
decisions were resolved.

The rules every adapter keeps, so that a decision is bound to exactly what
the agent's SDK assembles:

* Calls are named by position (:attr:`ToolCall.key`), never by an id the
  upstream chose; decision maps are keyed by it.
* Every item, block or delta an SDK could read as a call is found, under the
  field the SDK dispatches on, and becomes a :class:`ToolCall` with its own
  :class:`~warden.model.ActionKind`. A type Warden does not know becomes an
  ``unknown_call`` to decide, never a pass-through.
* An allowed call is rendered from the decided :class:`ToolCall` itself, so
  the agent receives the canonical form of what was decided.
* A stream event that cannot be parsed, or that touches a call after it was
  decided, raises :class:`~warden.errors.StreamViolation`; the ingress ends
  the stream with the provider's error event and records why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from warden.model import Decision, Effect, ToolCall, ToolResult, Usage
from warden.protocols.declared_arguments import DeclaredArguments
from warden.protocols.sse import SseEvent

__all__ = [
    "Adapter",
    "ParsedRequest",
    "StreamItem",
    "StreamRewriter",
    "blocked_message",
    "bounded",
    "refusal_text",
]

StreamItem = SseEvent | ToolCall


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What Warden needs from an agent's request body.

    ``tool_results`` are the results of earlier calls the agent sends back
    (OpenAI ``role: tool`` messages, Anthropic ``tool_result`` blocks,
    Responses ``function_call_output`` items), with the tool name filled in
    when the same request also carries the call that they answer.
    """

    model: str | None
    stream: bool
    tool_results: tuple[ToolResult, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    """Tools the provider runs itself (remote MCP servers, hosted tools), without
    credentials: ``input.request.tools`` (:mod:`warden.protocols.declared_tools`)."""
    arguments: DeclaredArguments | None = None
    """The argument names the request declares for the tools the agent runs, checked
    against each call (:mod:`warden.protocols.declared_arguments`); ``None``: none."""
    max_output_tokens: int | None = None
    """The most output the request allows (``max_tokens`` and its kin); ``None``: unbounded."""
    choices: int = 1
    """How many answers the request asks for (Chat Completions ``n``)."""
    rate: float = 1.0
    """The multiple of the standard price the request asks for (a premium tier or speed)."""
    continued: bool = False
    """The request continues input the provider keeps and bills (Responses
    ``previous_response_id`` or ``conversation``), which its body does not carry."""


class StreamRewriter(Protocol):
    """Rewrites one SSE response stream so that no undecided tool call leaks out.

    Text deltas are yielded as soon as they are fed. Tool-call deltas are held
    until that call's arguments are complete, then yielded as one ToolCall.
    """

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        """Take one upstream event; yield what may be sent and what to decide."""
        ...

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        """Return the events that stand for ``call`` under ``decision``.

        Allowed: the call's held deltas (renumbered so the indexes the agent
        sees stay contiguous). Otherwise: a text delta saying what was
        blocked and why, with the decision id; nothing of the call remains.
        """
        ...

    def finish(self) -> Iterator[StreamItem]:
        """Upstream ended: yield what is still held (calls that never closed)."""
        ...

    @property
    def usage(self) -> Usage | None:
        """Token usage, if the stream reported it (seen so far)."""
        ...

    @property
    def model(self) -> str | None:
        """The model the stream reported, if any."""
        ...

    @property
    def complete(self) -> bool:
        """True once the protocol's own end marker was seen (else: truncated)."""
        ...


class Adapter(Protocol):
    """One LLM API's wire format: find actions in it, render verdicts back in it."""

    name: str
    """Protocol label used in actions, records and metrics, e.g. ``openai.chat``."""
    output_bound: str
    """The request field that bounds the answer's output tokens (``max_tokens`` and kin):
    written by Warden when a spend cap holds a call that sets none at a bound of its own."""

    def parse_request(self, body: Mapping[str, Any]) -> ParsedRequest:
        """Read model, stream flag and returned tool results from a request body."""
        ...

    def bound_hosted_calls(
        self, body: Mapping[str, Any], bound: int
    ) -> tuple[Mapping[str, Any], int]:
        """``body`` with ``bound`` on the calls of billed provider-run tools it declares
        where it sets none, and the most such calls it then allows (0: it declares none)."""
        ...

    def prepare_request(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """A changed request body to send upstream instead, or ``None`` to send it as is.

        Used to ask for what Warden needs and the agent did not (streamed token
        usage); the rewriter then hides it again (``stream_rewriter(hide_usage=True)``).
        """
        ...

    def answer_refused(
        self, body: Mapping[str, Any], owed: Mapping[str, tuple[str, str]]
    ) -> tuple[dict[str, Any], int] | None:
        """``body`` with an output for each owed call, and how many; ``None`` if none is added.

        For APIs that keep their answers (the Responses API's
        ``previous_response_id``): the calls of the continued answer that
        Warden kept from the agent (:func:`warden.sessions.owed_outputs`: by
        call id, the call's item type and the text the agent saw instead).
        Stateless APIs, where the agent sends the whole conversation, add none.
        """
        ...

    def tool_calls(self, body: Mapping[str, Any]) -> list[ToolCall]:
        """The tool calls a non-streaming response proposes, in order."""
        ...

    def misspelled_key(self, body: Mapping[str, Any]) -> str | None:
        """A key of a non-streaming response that a case-blind client reads as another.

        The response is then malformed: see :func:`warden.protocols._wire.misspelled_key`.
        Stream rewriters check each event the same way.
        """
        ...

    def problem(self, body: Mapping[str, Any]) -> str | None:
        """Why a non-streaming response cannot be decided as it stands (for the error), or
        ``None``: a misspelled key (:meth:`misspelled_key`), or calls a client would merge."""
        ...

    def rewrite(self, body: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
        """Return a copy of a non-streaming response with verdicts applied.

        ``decisions`` maps :attr:`ToolCall.key` to decision. Calls whose enforced effect is
        not allow are removed and explained in assistant text; when no call
        remains the finish/stop reason becomes ``stop`` / ``end_turn`` so the
        official SDKs parse the result.
        """
        ...

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """Token usage of a non-streaming response."""
        ...

    def stream_rewriter(self, *, hide_usage: bool = False, choices: int = 1) -> StreamRewriter:
        """A fresh rewriter for one streaming response.

        ``hide_usage``: Warden asked for usage the agent did not; keep it out
        of the agent's stream. ``choices``: how many answers the request asked
        for (OpenAI's ``n``); a stream with more is malformed.
        """
        ...


def bounded(
    adapter: Adapter,
    body: Mapping[str, Any],
    parsed: ParsedRequest,
    output: int | None,
    tool_calls: int | None,
) -> tuple[Mapping[str, Any], int | None, int]:
    """``body`` as sent, the output bound its hold is sized at, and the billed hosted
    tool calls the hold covers.

    With a spend cap (``output`` and ``tool_calls`` given) a call is held at
    what its request lets it cost, so the request must not let it cost more:
    one that sets no output bound is sent with ``output``, and one that
    declares tools the provider runs and bills per call, with ``tool_calls``
    on them where it sets none. Otherwise ``body``, its own bound, and none.
    """
    bound = parsed.max_output_tokens
    if bound is None and output is not None:
        body, bound = {**body, adapter.output_bound: output}, output
    if tool_calls is None:
        return body, bound, 0
    body, hosted = adapter.bound_hosted_calls(body, tool_calls)
    return body, bound, hosted


def response_id(adapter: Adapter, body: Mapping[str, Any]) -> str | None:
    """A whole Responses API answer's id, which a later request may continue from.

    Streams give it as their rewriter's ``response_id``.
    """
    found = body.get("id") if adapter.name == "openai.responses" else None
    return found if isinstance(found, str) and found else None


def blocked_message(call: ToolCall, decision: Decision) -> str:
    """The text an agent sees instead of a tool call that was not allowed.

    Written for the model reading it as much as for people: it says the call
    did not happen, so the model does not claim it did.
    """
    return refusal_text(call.name, decision)


def refusal_text(tool: str, decision: Decision) -> str:
    """:func:`blocked_message` for a call known by its tool's name only."""
    if decision.effect is Effect.REQUIRE_APPROVAL:
        what = f"held the tool call `{tool}` for human approval; it was not performed"
    else:
        what = f"blocked the tool call `{tool}`; it was not performed"
    return f"[Warden] {what}. Reason: {decision.reason}. (decision {decision.decision_id})"
