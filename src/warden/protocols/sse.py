"""Server-sent events: an incremental parser and an encoder. No I/O.

The parser follows the WHATWG event-stream rules (``data:`` lines joined by
newlines, ``event:``/``id:`` fields, comments ignored, CR, LF and CRLF line
ends) and accepts input split at any byte boundary, so it gives the same events
however the network chunks the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SseEvent", "SseParser", "SseTooLarge", "encode_comment"]

_BOM = b"\xef\xbb\xbf"


class SseTooLarge(ValueError):
    """A line or event is over the parser's bound: the stream is refused, not buffered."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event: its ``event`` name (``None`` when absent) and its ``data``."""

    data: str
    event: str | None = None
    id: str | None = None

    def encode(self) -> bytes:
        """The event in wire form, ending with the blank line that dispatches it."""
        parts: list[str] = []
        if self.event is not None:
            parts.append(f"event: {self.event}\n")
        if self.id is not None:
            parts.append(f"id: {self.id}\n")
        # Each of CR, LF and CRLF ends a line on the wire: all become data lines.
        for line in self.data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            parts.append(f"data: {line}\n")
        parts.append("\n")
        return "".join(parts).encode()


def encode_comment(text: str = "") -> bytes:
    """A comment line: ignored by clients, used as a keep-alive while waiting.

    No blank line after it: a client keeps the last event id across events
    (the OpenAI and Anthropic SDKs' decoders, ``httpx-sse``), so a blank line
    would dispatch an empty event after an upstream's ``id:`` lines, which the
    SDKs then fail to read as JSON.
    """
    return f": {text}\n".encode()


class SseParser:
    """Incremental event-stream parser: ``feed(bytes)`` returns complete events."""

    def __init__(self, max_buffer: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._clean = 0
        """Bytes at the buffer's start known to hold no line end (an unfinished line)."""
        self._max_buffer = max_buffer
        self._data: list[str] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._pending_cr = False
        self._started = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete line."""
        return len(self._buf)

    @property
    def has_partial_event(self) -> bool:
        """True when fields were read but the event's blank line has not come yet."""
        return bool(self._buf) or bool(self._data) or self._event is not None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events they complete, in order.

        Raises :class:`SseTooLarge` when a line or event grows beyond ``max_buffer``:
        an upstream that never ends a line must not exhaust memory.
        """
        events: list[SseEvent] = []
        data = self._opening(bytes(chunk))
        if not data:
            return events
        self._buf.extend(data)
        start = 0
        buf = self._buf
        n = len(buf)
        # Each line end is searched for once: rescanning the rest of the buffer per
        # line would be quadratic in a chunk of many short lines.
        cr = buf.find(b"\r", self._clean)  # an unfinished line is not searched again
        lf = buf.find(b"\n", self._clean)
        while start < n:
            if cr != -1 and cr < start:
                cr = buf.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, nxt = lf, lf + 1
            else:
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                else:
                    nxt = cr + 1
                    self._pending_cr = True
            line = bytes(buf[start:end]).decode("utf-8", errors="replace")
            start = nxt
            event = self._line(line)
            if event is not None:
                events.append(event)
        del buf[:start]
        self._clean = len(buf)
        if len(buf) > self._max_buffer:
            raise SseTooLarge(f"SSE line longer than {self._max_buffer} bytes")
        return events

    def _opening(self, data: bytes) -> bytes:
        """``data`` without a byte-order mark at the stream's start or an LF ending a CRLF."""
        if not data:
            return data  # keeps a pending CR pending
        if not self._started:
            started = self._strip_bom(data)
            if started is None:
                return b""
            data = started
        if self._pending_cr and data.startswith(b"\n"):
            # CRLF split across two chunks: the CR already ended the line.
            data = data[1:]
        self._pending_cr = False
        return data

    def _strip_bom(self, data: bytes) -> bytes | None:
        # A stream may open with a UTF-8 byte-order mark, possibly split across
        # chunks; None means "not enough bytes yet to tell".
        data = bytes(self._buf) + data
        self._buf.clear()
        if len(data) < 3 and _BOM.startswith(data):
            self._buf.extend(data)
            return None
        self._started = True
        return data[3:] if data.startswith(_BOM) else data

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            # Per the standard, a block with no data lines dispatches nothing.
            if not self._data:
                self._event = None
                return None
            event = SseEvent(data="\n".join(self._data), event=self._event, id=self._id)
            self._data = []
            self._data_size = 0
            self._event = None
            return event
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self._max_buffer:
                raise SseTooLarge(f"SSE event larger than {self._max_buffer} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None
