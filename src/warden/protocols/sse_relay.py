"""Server-sent events kept whole, for relaying a stream event by event. No I/O.

:mod:`warden.protocols.sse` parses events for their data; a relay must also
keep what it does not read: ``id:`` (resumption with ``Last-Event-ID``),
``retry:`` (how long the client waits before reconnecting), comments
(keep-alives) and events without data (an MCP server's priming event). An
:class:`EventSplitter` cuts a byte stream into :class:`RawEvent` blocks, each
written on unchanged (line ends normalised to LF), or with its data replaced
(:meth:`RawEvent.with_data`) when the relay must rewrite what it carries.
"""

from __future__ import annotations

from dataclasses import dataclass

from warden.protocols.sse import SseTooLarge

__all__ = ["EventSplitter", "RawEvent", "data_event"]

_BOM = b"\xef\xbb\xbf"


def _field(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    if sep and value.startswith(" "):
        value = value[1:]
    return name, value


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One block of an event stream: its lines (fields and comments) without line ends."""

    lines: tuple[str, ...]

    @property
    def data(self) -> str | None:
        """The ``data:`` values joined by newlines; ``None`` when the block has no data line."""
        values = [v for n, v in map(_field, self.lines) if n == "data"]
        return "\n".join(values) if values else None

    @property
    def id(self) -> str | None:
        """The block's ``id:`` field, if it has one."""
        ids = [v for n, v in map(_field, self.lines) if n == "id"]
        return ids[-1] if ids else None

    def encode(self) -> bytes:
        """The block in wire form, ending with the blank line that dispatches it."""
        return ("\n".join(self.lines) + "\n\n").encode()

    def with_data(self, data: str) -> RawEvent:
        """The same block (event name, id, retry, comments kept) carrying ``data`` instead."""
        kept = [line for line in self.lines if _field(line)[0] != "data"]
        new = [
            f"data: {line}" for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        ]
        return RawEvent((*kept, *new))


def data_event(data: str) -> bytes:
    """A ``message`` event carrying ``data`` (Warden's own messages in a relayed stream)."""
    return RawEvent(("event: message",)).with_data(data).encode()


class EventSplitter:
    """Incremental: ``feed(bytes)`` returns the blocks completed so far, in order.

    Accepts CR, LF and CRLF line ends split at any byte boundary. Raises
    :class:`~warden.protocols.sse.SseTooLarge` when one block grows beyond
    ``max_event`` bytes: a stream that never ends an event must not exhaust memory.
    """

    def __init__(self, max_event: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._clean = 0
        """Bytes at the buffer's start known to hold no line end (an unfinished line)."""
        self._lines: list[str] = []
        self._size = 0
        self._max = max_event
        self._pending_cr = False
        self._started = False

    def feed(self, chunk: bytes) -> list[RawEvent]:
        """Add bytes; return the blocks they complete."""
        data = self._opening(bytes(chunk))
        if not data:
            return []
        self._buf.extend(data)
        out: list[RawEvent] = []
        buf = self._buf
        start = 0
        # Each line end is searched for once, and an unfinished line's bytes only once:
        # rescanning the rest of the buffer per line is quadratic in a chunk of many
        # short lines (an MCP server's 8 MiB of bare line feeds held the loop for 20 s).
        cr = buf.find(b"\r", self._clean)
        lf = buf.find(b"\n", self._clean)
        while True:
            if cr != -1 and cr < start:
                cr = buf.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < len(buf):
                end, nxt = cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            else:
                end, nxt = cr, cr + 1
                self._pending_cr = True
            line = bytes(buf[start:end]).decode("utf-8", errors="replace")
            start = nxt
            if line:
                self._lines.append(line)
                self._size += len(line) + 1
            elif self._lines:
                out.append(RawEvent(tuple(self._lines)))
                self._lines = []
                self._size = 0
        del buf[:start]
        self._clean = len(buf)
        if self._size + len(buf) > self._max:
            raise SseTooLarge(f"SSE event larger than {self._max} bytes")
        return out

    def _opening(self, data: bytes) -> bytes:
        """``data`` without a leading BOM (the stream's first bytes) or the LF of a CRLF
        split after its CR; empty while a BOM may still be arriving."""
        if not data:
            return b""
        if not self._started:
            data = bytes(self._buf) + data
            self._buf.clear()
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._buf.extend(data)
                return b""
            self._started = True
            data = data.removeprefix(_BOM)
        if self._pending_cr and data.startswith(b"\n"):
            data = data[1:]  # the CR of a split CRLF already ended the line
        self._pending_cr = False
        return data
