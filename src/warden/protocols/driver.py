"""The one stream driver: runs a :class:`~warden.protocols.base.StreamRewriter`. No sockets.

Every door that relays an SSE response (the base-URL proxy today; ext_proc
and transparent mode later) drives the adapter's rewriter with this, so the
ordering rules are written once:

* bytes the rewriter releases (text, finished events) are written in order;
* when the rewriter hands over a call, everything released before it is
  written first, then the call is decided, and nothing of the call (nor
  anything after it) is written before its decision is back;
* while a decision is pending (a call held for approval may wait minutes) a
  keep-alive comment is written every ``keepalive_s``, so the agent's client
  and any proxy in between do not time out;
* a :class:`~warden.errors.StreamViolation` (or any failure) from the
  rewriter, the decision or the writer propagates to the caller, which ends
  the stream with the provider's error event;
* an upstream error event the agent's SDK raises on (a rewriter's ``failed``
  turns true) is written, then :class:`~warden.errors.UpstreamError` is
  raised: the SDK reads nothing after it, so nothing after it is decided, and
  the answer's outcome records the error the agent got.

I/O comes in as two callables: ``decide(calls)`` returns decisions keyed by
:attr:`ToolCall.key`, and ``write(data)`` sends bytes to the agent. Tests
pass plain coroutines. An optional ``recheck(tools)`` is told the names of the
calls allowed so far before each write of content, and raises to cut the
stream: a rewriter may hold an allowed call's bytes until a later call is
decided (a Responses snapshot, an Anthropic ``message_start``), and a kill
switch thrown while that one was held for a person must still stop it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final

from warden import tasks
from warden.errors import UpstreamError, UpstreamProtocol
from warden.model import Decision, Effect, ToolCall
from warden.protocols.base import StreamItem, StreamRewriter
from warden.protocols.sse import SseEvent, SseParser, encode_comment

__all__ = ["KEEPALIVE", "MAX_STREAM_BYTES", "Decide", "Recheck", "StreamDriver", "Write"]

Decide = Callable[[Sequence[ToolCall]], Awaitable[Mapping[str, Decision]]]
"""Decide calls; the answer maps each call's :attr:`ToolCall.key` to its decision."""
Write = Callable[[bytes], Awaitable[None]]
"""Send bytes to the agent."""
Recheck = Callable[[Sequence[str]], None]
"""Told the names of the calls allowed so far before content goes out; raises to cut."""

KEEPALIVE = encode_comment("warden: waiting for a decision")
MAX_STREAM_BYTES: Final = 64 * 1024 * 1024
"""The most an upstream stream may carry, as a whole answer may: a call's fragments are
held until it is complete, and an upstream that never completes one must not fill memory."""


class StreamDriver:
    """Feeds one upstream SSE stream through a rewriter, deciding calls as they complete."""

    def __init__(
        self,
        rewriter: StreamRewriter,
        decide: Decide,
        write: Write,
        *,
        keepalive_s: float | None,
        parser: SseParser | None = None,
        on_answer_id: Callable[[str], None] | None = None,
        recheck: Recheck | None = None,
    ) -> None:
        """``on_answer_id``: told the answer's id (a Responses ``response_id``) once the
        rewriter has read it, before any byte naming it is written. ``recheck``: see the
        module docstring."""
        self.rewriter = rewriter
        self._decide = decide
        self._write_out = write
        self._keepalive_s = keepalive_s
        self._parser = parser if parser is not None else SseParser()
        self._received = 0
        self._on_answer_id = on_answer_id
        self._recheck = recheck
        self._allowed: list[str] = []

    async def feed(self, chunk: bytes) -> None:
        """Take upstream bytes (split anywhere); write what may go out, deciding calls first."""
        self._received += len(chunk)
        if self._received > MAX_STREAM_BYTES:
            raise UpstreamProtocol(f"the upstream stream is over {MAX_STREAM_BYTES} bytes")
        out = bytearray()
        for event in self._parser.feed(chunk):
            await self._drain(self.rewriter.feed(event), out)
            if getattr(self.rewriter, "failed", False):
                if out:
                    await self._write(bytes(out))  # the provider's error, as the SDK reads it
                raise UpstreamError("the upstream ended the stream with an error event")
        if out:
            await self._write(bytes(out))

    async def finish(self) -> None:
        """The upstream ended: release what is held, or raise if the stream was cut short."""
        out = bytearray()
        await self._drain(self.rewriter.finish(), out)
        if out:
            await self._write(bytes(out))
        if not self.rewriter.complete:
            raise UpstreamProtocol("the upstream stream ended before it was complete")

    async def _drain(self, items: Iterable[StreamItem], out: bytearray) -> None:
        # The iterator is lazy: each ToolCall is resolved before the next item
        # is produced, so events that depend on decisions see them.
        for item in items:
            if isinstance(item, SseEvent):
                out += item.encode()
                continue
            if out:
                # What was released before the call goes out before waiting on it.
                await self._write(bytes(out))
                out.clear()
            decided = await self._wait(item)
            if decided[item.key].enforced is Effect.ALLOW:
                self._allowed.append(item.name)
            for event in self.rewriter.resolve(item, decided[item.key]):
                out += event.encode()

    async def _write(self, data: bytes) -> None:
        if self._recheck is not None and self._allowed and data is not KEEPALIVE:
            self._recheck(self._allowed)
        if self._on_answer_id is not None:
            answer_id = getattr(self.rewriter, "response_id", None)
            if answer_id:
                told, self._on_answer_id = self._on_answer_id, None
                told(answer_id)
        await self._write_out(data)

    async def _wait(self, call: ToolCall) -> Mapping[str, Decision]:
        if self._keepalive_s is None:
            return await self._decide([call])
        pending = tasks.spawn(_awaited(self._decide([call])), name="stream-decision", awaited=True)
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self._keepalive_s)
                if done:
                    return pending.result()
                await self._write(KEEPALIVE)
        finally:
            pending.cancel()


async def _awaited(pending: Awaitable[Mapping[str, Decision]]) -> Mapping[str, Decision]:
    return await pending
