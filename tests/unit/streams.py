"""What the protocol adapter tests share: decisions, recorded fixtures, and the
ingress's way of walking a rewritten stream (no sockets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from warden.model import Decision, Effect, Mode, ToolCall
from warden.protocols._wire import loads
from warden.protocols.base import StreamRewriter
from warden.protocols.sse import SseEvent, SseParser

DATA = Path(__file__).parent / "data"

ALLOW = Decision(
    decision_id="dec_allow", effect=Effect.ALLOW, reasons=(), mode=Mode.ENFORCE, guard="policy"
)
DENY = Decision(
    decision_id="dec_1",
    effect=Effect.DENY,
    reasons=("over limit",),
    mode=Mode.ENFORCE,
    guard="policy",
)
HOLD = Decision(
    decision_id="dec_2",
    effect=Effect.REQUIRE_APPROVAL,
    reasons=("needs a human",),
    mode=Mode.ENFORCE,
    guard="approval",
)
OBSERVED_DENY = dataclasses.replace(DENY, mode=Mode.OBSERVE)

Decide = Callable[[ToolCall], Decision]


def allow_all(call: ToolCall) -> Decision:
    return ALLOW


def deny_all(call: ToolCall) -> Decision:
    return DENY


def deny_names(*names: str) -> Decide:
    return lambda call: DENY if call.name in names else ALLOW


def raw(name: str) -> bytes:
    return (DATA / name).read_bytes()


def body(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(raw(name))
    return loaded


def events(name: str) -> list[SseEvent]:
    return SseParser().feed(raw(name))


def data(item: SseEvent) -> Any:
    """An event's JSON, parsed as leniently as the SDKs do (``NaN``, ``1e400``, big ints)."""
    return loads(item.data)


def as_read(item: SseEvent | ToolCall) -> tuple[str | None, Any]:
    """An event as a client reads it (name and parsed data): what a rewriter sends is the
    data as it read it, in its own encoding, so bytes may differ from the upstream's. A
    call (not an event) is itself, so it never equals an event."""
    if not isinstance(item, SseEvent):
        return "call", item
    try:
        return item.event, data(item)
    except ValueError:  # "[DONE]", an empty keep-alive
        return item.event, item.data


def carries_tool_delta(item: SseEvent) -> bool:
    """True when a chat completion chunk has a ``tool_calls`` or ``function_call`` delta."""
    if item.data.startswith("[DONE]"):
        return False
    chunk = loads(item.data)
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (
            delta.get("tool_calls") or delta.get("function_call") is not None
        ):
            return True
    return False


def encoded(out: list[SseEvent]) -> bytes:
    return b"".join(item.encode() for item in out)


def take(
    rewriter: StreamRewriter, items: Iterable[SseEvent | ToolCall], decide: Decide
) -> tuple[list[SseEvent], list[ToolCall]]:
    """Walk items as the ingress does: resolve each call before taking the next item."""
    out: list[SseEvent] = []
    calls: list[ToolCall] = []
    for item in items:
        if isinstance(item, ToolCall):
            calls.append(item)
            out.extend(rewriter.resolve(item, decide(item)))
        else:
            out.append(item)
    return out, calls


def replay(rewriter: StreamRewriter, pieces: Iterable[bytes], decide: Decide) -> bytes:
    """Bytes in as the network splits them, through the parser and ``rewriter``; bytes out."""
    parser = SseParser()
    out = bytearray()
    for piece in pieces:
        for item in parser.feed(piece):
            sent, _ = take(rewriter, rewriter.feed(item), decide)
            out += encoded(sent)
    sent, _ = take(rewriter, rewriter.finish(), decide)
    out += encoded(sent)
    return bytes(out)
