"""The SSE parser and encoder: WHATWG event-stream rules, any byte boundary."""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any

import pytest

from warden.protocols.sse import SseEvent, SseParser, SseTooLarge, encode_comment
from warden.protocols.sse_relay import EventSplitter

DATA = Path(__file__).parent / "data"
RECORDED = sorted(
    path.name for path in DATA.glob("*.sse") if path.name.startswith(("openai_chat", "anthropic"))
)


def parse(*pieces: bytes) -> list[SseEvent]:
    parser = SseParser()
    out: list[SseEvent] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out


def test_recorded_streams_parse() -> None:
    anthropic = parse((DATA / "anthropic_tools.sse").read_bytes())
    assert [e.event for e in anthropic][:3] == ["message_start", "content_block_start", "ping"]
    assert anthropic[-1] == SseEvent(data='{"type":"message_stop"}', event="message_stop")
    openai = parse((DATA / "openai_chat_text.sse").read_bytes())
    assert openai[-1] == SseEvent(data="[DONE]")
    assert all(e.event is None for e in openai)


@pytest.mark.parametrize("name", RECORDED)
def test_every_split_gives_the_same_events(name: str) -> None:
    payload = (DATA / name).read_bytes()
    expected = parse(payload)
    assert expected
    for cut in range(len(payload) + 1):
        assert parse(payload[:cut], payload[cut:]) == expected, cut
    rng = random.Random(name)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(payload)), rng.randint(2, 60)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        assert parse(*pieces) == expected


@pytest.mark.parametrize("name", RECORDED)
def test_encode_round_trips_recorded_events(name: str) -> None:
    events = parse((DATA / name).read_bytes())
    assert parse(b"".join(e.encode() for e in events)) == events


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings(newline: bytes) -> None:
    lines = [b"event: update", b"data: first", b"data: second", b"", b"data: x", b"", b""]
    payload = newline.join(lines)
    expected = [SseEvent(data="first\nsecond", event="update"), SseEvent(data="x")]
    assert parse(payload) == expected
    assert parse(*[payload[i : i + 1] for i in range(len(payload))]) == expected


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    assert parse(b"data: a\r", b"\ndata: b\r\n\r\n") == [SseEvent(data="a\nb")]


def test_empty_chunk_between_cr_and_lf() -> None:
    assert parse(b"data: a\r", b"", b"\ndata: b\r\n\r\n") == [SseEvent(data="a\nb")]


def test_field_parsing_rules() -> None:
    payload = b": a comment\ndata:no space\ndata:  two spaces\ndata\nunknown: ignored\nid: 42\n\n"
    assert parse(payload) == [SseEvent(data="no space\n two spaces\n", id="42")]


def test_blank_lines_and_comments_alone_dispatch_nothing() -> None:
    assert parse(b"\n\n: keep-alive\n\n", encode_comment("waiting"), encode_comment()) == []


def test_event_name_resets_after_dispatch() -> None:
    assert parse(b"event: a\ndata: 1\n\ndata: 2\n\n") == [
        SseEvent(data="1", event="a"),
        SseEvent(data="2"),
    ]


def test_multibyte_utf8_split_inside_a_character() -> None:
    payload = "data: café ☕\n\n".encode()
    assert parse(payload[:9], payload[9:]) == [SseEvent(data="café ☕")]
    assert parse(payload[:13], payload[13:]) == [SseEvent(data="café ☕")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse(b"data: \xff\xfe\n\n") == [SseEvent(data="\ufffd\ufffd")]


def test_encode() -> None:
    assert SseEvent(data="x").encode() == b"data: x\n\n"
    assert SseEvent(data="a\nb", event="ping", id="7").encode() == (
        b"event: ping\nid: 7\ndata: a\ndata: b\n\n"
    )
    assert SseEvent(data="").encode() == b"data: \n\n"


@pytest.mark.parametrize(
    "event",
    [
        SseEvent(data="plain"),
        SseEvent(data="multi\nline\n\nwith blank", event="message_delta"),
        SseEvent(data=" leading space"),
        SseEvent(data='{"json": "value with: colon"}', event="content_block_delta"),
        SseEvent(data="☕ unicode"),
    ],
)
def test_encode_round_trip(event: SseEvent) -> None:
    assert parse(event.encode()) == [event]


def test_encode_comment() -> None:
    assert encode_comment("waiting for approval") == b": waiting for approval\n"


@pytest.mark.parametrize("decoder", ["openai", "anthropic"])
def test_a_keep_alive_after_an_event_with_an_id_dispatches_nothing(decoder: str) -> None:
    # The SDKs keep the last event id across events: a keep-alive ending in a blank
    # line would dispatch an empty event, which they fail to read as JSON.
    module = importlib.import_module(f"{decoder}._streaming")
    stream = b'id: 1\ndata: {"a": 1}\n\n' + encode_comment("waiting") + b'data: {"b": 2}\n\n'
    events = list(module.SSEDecoder().iter_bytes(iter([stream])))
    assert [e.data for e in events] == ['{"a": 1}', '{"b": 2}']


def test_buffered_and_partial_event() -> None:
    parser = SseParser()
    assert not parser.has_partial_event
    assert parser.feed(b"data: par") == []
    assert parser.buffered == len(b"data: par")
    assert parser.has_partial_event
    assert parser.feed(b"tial\n") == []
    assert parser.buffered == 0
    assert parser.has_partial_event
    assert parser.feed(b"\n") == [SseEvent(data="partial")]
    assert not parser.has_partial_event


def test_overlong_line_is_refused() -> None:
    parser = SseParser(max_buffer=64)
    with pytest.raises(SseTooLarge, match="longer than 64 bytes"):
        parser.feed(b"data: " + b"x" * 100)


def test_event_within_the_limit_is_accepted_and_a_larger_one_refused() -> None:
    parser = SseParser(max_buffer=64)
    assert parser.feed(b"data: " + b"x" * 60 + b"\n\n") == [SseEvent(data="x" * 60)]
    with pytest.raises(SseTooLarge, match="larger than 64 bytes"):
        parser.feed(b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n")


def test_byte_order_mark_at_the_start_is_ignored() -> None:
    payload = b"\xef\xbb\xbfdata: x\n\n"
    for cut in range(len(payload) + 1):
        assert parse(payload[:cut], payload[cut:]) == [SseEvent(data="x")], cut


def test_block_without_data_dispatches_nothing() -> None:
    assert parse(b"event: lonely\n\ndata: x\n\n") == [SseEvent(data="x")]


def test_encode_turns_carriage_returns_into_data_lines() -> None:
    event = SseEvent(data="a\r\nb\rc")
    assert event.encode() == b"data: a\ndata: b\ndata: c\n\n"
    assert parse(event.encode()) == [SseEvent(data="a\nb\nc")]


class _Scanned(bytearray):
    """A buffer that counts the bytes its searches read."""

    scanned = 0

    def find(self, sub: Any, start: Any = 0, *args: Any) -> int:
        found = super().find(sub, start, *args)
        _Scanned.scanned += (len(self) if found == -1 else found) - (start or 0)
        return found


@pytest.mark.parametrize("parser", ["events", "blocks"])
def test_every_byte_is_searched_a_bounded_number_of_times(parser: str) -> None:
    # Many short lines in one chunk, and one long line in many chunks: searched from a
    # line's start each time, an MCP server's 8 MiB of bare line feeds held the event
    # loop for 20 s.
    reader: Any = SseParser() if parser == "events" else EventSplitter()
    reader._buf = _Scanned()
    _Scanned.scanned = 0
    reader.feed(b"\n" * 200_000)
    assert _Scanned.scanned <= 4 * 200_000
    _Scanned.scanned = 0
    for _ in range(2_000):
        reader.feed(b"d" * 100)
    reader.feed(b"\n\n")
    assert _Scanned.scanned <= 4 * 200_002
