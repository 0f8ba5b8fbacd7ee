"""The stream driver, sans I/O: decide and write are plain coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence

import pytest

from tests.unit.streams import ALLOW, DENY, deny_names, raw, replay
from warden.errors import StreamViolation, UpstreamProtocol
from warden.model import Decision, ToolCall, Usage
from warden.protocols import driver as driver_module
from warden.protocols.base import StreamItem
from warden.protocols.driver import KEEPALIVE, StreamDriver
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter
from warden.protocols.sse import SseEvent


class Rewriter:
    """``text:<x>`` passes; ``call:<name>`` is a call to decide; ``end`` completes the stream."""

    def __init__(self) -> None:
        self.complete = False
        self.resolved: list[tuple[str, str]] = []

    def feed(self, event: SseEvent) -> Iterator[StreamItem]:
        kind, _, value = event.data.partition(":")
        if kind == "call":
            yield ToolCall(
                call_id=f"id_{value}", name=value, raw_arguments="{}", arguments={}, key=value
            )
        elif kind == "bad":
            raise StreamViolation("a call was touched after its decision")
        elif kind == "end":
            self.complete = True
            yield event
        else:
            yield event

    def resolve(self, call: ToolCall, decision: Decision) -> list[SseEvent]:
        self.resolved.append((call.name, decision.effect.value))
        return [SseEvent(f"{decision.effect.value}:{call.name}")]

    def finish(self) -> Iterator[StreamItem]:
        return iter(())

    @property
    def usage(self) -> Usage | None:
        return None

    @property
    def model(self) -> str | None:
        return None


class Wire:
    """Records what was written, and when decisions were asked for."""

    def __init__(self, decisions: Mapping[str, Decision] | None = None) -> None:
        self.log: list[str] = []
        self.decisions = dict(decisions or {})
        self.release: asyncio.Event | None = None
        self.out = bytearray()

    async def write(self, data: bytes) -> None:
        self.log.append(f"write {data.decode()!r}")
        self.out += data

    async def decide(self, calls: Sequence[ToolCall]) -> Mapping[str, Decision]:
        self.log.append("decide " + ",".join(c.name for c in calls))
        if self.release is not None:
            await self.release.wait()
        return {c.key: self.decisions.get(c.name, ALLOW) for c in calls}


def sse(*datas: str) -> bytes:
    return b"".join(SseEvent(d).encode() for d in datas)


def driver(
    wire: Wire, rewriter: Rewriter | None = None, keepalive_s: float | None = None
) -> StreamDriver:
    return StreamDriver(rewriter or Rewriter(), wire.decide, wire.write, keepalive_s=keepalive_s)


async def test_text_before_a_call_is_written_before_the_call_is_decided() -> None:
    wire = Wire()
    await driver(wire).feed(sse("text:hi", "call:search", "text:after"))
    assert wire.log == [
        f"write {sse('text:hi').decode()!r}",
        "decide search",
        f"write {sse('allow:search', 'text:after').decode()!r}",
    ]


async def test_nothing_of_a_call_is_written_while_its_decision_is_pending() -> None:
    wire = Wire()
    wire.release = asyncio.Event()
    feeding = asyncio.ensure_future(driver(wire).feed(sse("call:refund", "text:after")))
    await asyncio.sleep(0.01)
    assert wire.log == ["decide refund"]
    wire.release.set()
    await feeding
    assert wire.log[-1] == f"write {sse('allow:refund', 'text:after').decode()!r}"


async def test_calls_are_decided_one_at_a_time_in_stream_order() -> None:
    wire = Wire({"b": DENY})
    rewriter = Rewriter()
    await driver(wire, rewriter).feed(sse("call:a", "call:b", "call:c"))
    assert [line for line in wire.log if line.startswith("decide")] == [
        "decide a",
        "decide b",
        "decide c",
    ]
    assert rewriter.resolved == [("a", "allow"), ("b", "deny"), ("c", "allow")]


async def test_a_stream_split_anywhere_gives_the_same_bytes() -> None:
    data = sse("text:one", "call:x", "text:two", "end")
    whole, split = Wire(), Wire()
    await driver(whole).feed(data)
    one = driver(split)
    for i in range(len(data)):
        await one.feed(data[i : i + 1])
    assert split.out == whole.out
    assert whole.out == sse("text:one", "allow:x", "text:two", "end")


async def test_keepalives_are_written_while_a_decision_waits() -> None:
    wire = Wire()
    wire.release = asyncio.Event()
    feeding = asyncio.ensure_future(driver(wire, keepalive_s=0.01).feed(sse("call:refund")))
    await asyncio.sleep(0.08)
    keepalives = wire.log.count(f"write {KEEPALIVE.decode()!r}")
    assert keepalives >= 2
    wire.release.set()
    await feeding
    assert wire.log[-1] == f"write {sse('allow:refund').decode()!r}"


async def test_no_keepalive_when_the_decision_is_quick() -> None:
    wire = Wire()
    await driver(wire, keepalive_s=5).feed(sse("call:refund"))
    assert f"write {KEEPALIVE.decode()!r}" not in wire.log


async def test_a_stream_violation_propagates_and_nothing_after_it_is_written() -> None:
    wire = Wire()
    with pytest.raises(StreamViolation):
        await driver(wire).feed(sse("text:hi", "bad", "text:never"))
    assert "never" not in "".join(wire.log)


async def test_a_failing_decision_propagates() -> None:
    async def fails(calls: Sequence[ToolCall]) -> Mapping[str, Decision]:
        raise RuntimeError("audit log is down")

    wire = Wire()
    one = StreamDriver(Rewriter(), fails, wire.write, keepalive_s=1.0)
    with pytest.raises(RuntimeError, match="audit log is down"):
        await one.feed(sse("call:refund"))
    assert wire.log == []


async def test_a_writer_failing_during_a_wait_cancels_the_decision() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(calls: Sequence[ToolCall]) -> Mapping[str, Decision]:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    async def gone(data: bytes) -> None:
        raise ConnectionResetError

    one = StreamDriver(Rewriter(), slow, gone, keepalive_s=0.01)
    with pytest.raises(ConnectionResetError):
        await one.feed(sse("call:refund"))
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_finish_raises_when_the_stream_never_completed() -> None:
    with pytest.raises(UpstreamProtocol):
        await driver(Wire()).finish()


async def test_a_stream_past_its_bound_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call's fragments are held until it completes; an upstream that never completes
    one is cut at the bound a whole answer has, not left to fill memory."""
    monkeypatch.setattr(driver_module, "MAX_STREAM_BYTES", 1000)
    wire = Wire()
    one = driver(wire)
    first, second = sse("text:" + "x" * 400), sse("text:" + "y" * 400)
    await one.feed(first)
    await one.feed(second)  # 826 bytes in all: within the bound
    with pytest.raises(UpstreamProtocol, match="over 1000 bytes"):
        await one.feed(sse("text:" + "z" * 400))
    assert bytes(wire.out) == first + second  # nothing of the chunk past the bound


async def test_finish_passes_when_the_stream_completed() -> None:
    one = driver(Wire())
    await one.feed(sse("end"))
    await one.finish()


async def test_a_real_adapter_gives_what_the_adapters_own_walk_gives() -> None:
    data = raw("openai_chat_parallel_tools.sse")
    expected = replay(OpenAIChatAdapter().stream_rewriter(), [data], deny_names("get_weather"))
    out = bytearray()

    async def write(chunk: bytes) -> None:
        out.extend(chunk)

    async def decide(calls: Sequence[ToolCall]) -> Mapping[str, Decision]:
        return {c.key: DENY if c.name == "get_weather" else ALLOW for c in calls}

    one = StreamDriver(OpenAIChatAdapter().stream_rewriter(), decide, write, keepalive_s=1.0)
    for i in range(0, len(data), 7):
        await one.feed(data[i : i + 7])
    await one.finish()
    assert bytes(out) == expected


async def test_the_answer_id_is_told_before_any_byte_naming_it_is_written() -> None:
    # A Responses stream names its id in its first event: the core must know whose answer
    # it is before the agent (or anyone it leaks to) can ask for it by id.
    told: list[tuple[str, int]] = []
    wire = Wire()
    stream = StreamDriver(
        OpenAIResponsesAdapter().stream_rewriter(),
        wire.decide,
        wire.write,
        keepalive_s=None,
        on_answer_id=lambda answer: told.append((answer, len(wire.out))),
    )
    whole = raw("responses_text_then_call.sse")
    for start in range(0, len(whole), 7):
        await stream.feed(whole[start : start + 7])
    await stream.finish()
    assert len(told) == 1
    answer, written_before = told[0]
    assert answer.startswith("resp_")
    assert written_before == 0
    assert answer.encode() in wire.out
