"""Reading the audit log from a position while it grows: for SIEM shippers (gRPC ``TailRecords``).

A :class:`RecordTail` remembers where it is (segment, byte offset, next
sequence number) and reads whole frames from there, never past the number
of records the caller says are written (:attr:`warden.audit.AuditLog.size`),
so a frame being written at that moment is never seen half done. Records
come back exactly as stored: their SHA-256 leaf hash verifies against the
log's checkpoints. Blocking file I/O: run :meth:`RecordTail.read` in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from warden.audit.layout import Layout
from warden.audit.segments import (
    FRAME_HEADER,
    MAX_FRAME,
    FrameScanner,
    LogDamaged,
    list_segments,
    parse_header,
    segment_name,
)

__all__ = ["RecordTail", "StoredRecord"]

_CHUNK = 1024 * 1024
_HEADER_READ = 16 * 1024  # a segment header is at most 8 KiB after the magic


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as stored, with the fields a shipper indexes on."""

    seq: int
    id: str
    kind: str
    time: str
    payload: bytes


class RecordTail:
    """Reads records in order, starting at sequence number ``start``."""

    def __init__(self, root: Path | str, start: int = 0) -> None:
        self._segdir = Layout(Path(root)).segments
        self._start = max(0, start)
        self._path: Path | None = None
        self._offset = 0
        self._next = 0

    @property
    def position(self) -> int:
        """The sequence number of the next record :meth:`read` returns."""
        return self._next if self._path is not None else self._start

    def read(self, upto: int, limit: int = 512) -> list[StoredRecord]:
        """The records from :attr:`position` up to (not including) ``upto``, at most ``limit``.

        ``upto`` must not exceed the number of records written. Raises
        :class:`LogDamaged` when a record that must be there is missing or
        does not decode.
        """
        if self._path is None:
            if upto <= self._start:
                return []
            self._locate()
            while self._next < self._start:  # skip to the start within its segment
                if self._frames(self._start, self._start - self._next, keep=False) is None:
                    self._next_segment()
        out: list[StoredRecord] = []
        while self._next < upto and len(out) < limit:
            got = self._frames(upto, limit - len(out), keep=True)
            if got is None:
                self._next_segment()
            else:
                out.extend(got)
        return out

    # -- internals -------------------------------------------------------------

    def _locate(self) -> None:
        segments = [p for p in list_segments(self._segdir) if int(p.stem) <= self._start]
        if not segments:
            raise LogDamaged(f"no segment holds record {self._start}")
        self._open(segments[-1])

    def _open(self, path: Path) -> None:
        with path.open("rb") as fh:
            parsed = parse_header(fh.read(_HEADER_READ))
        if parsed is None or parsed[0].size != int(path.stem):
            raise LogDamaged(f"{path.name}: the segment header is damaged")
        self._path, self._next, self._offset = path, parsed[0].size, parsed[1]

    def _next_segment(self) -> None:
        path = self._segdir / segment_name(self._next)
        if not path.exists():
            current = self._path.name if self._path is not None else "?"
            raise LogDamaged(f"record {self._next} is missing after {current}")
        self._open(path)

    def _frames(self, upto: int, room: int, *, keep: bool) -> list[StoredRecord] | None:
        """Whole frames from the offset; ``None`` at the end of the segment."""
        assert self._path is not None
        with self._path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read(_CHUNK)
            if len(data) >= FRAME_HEADER.size:
                length = FRAME_HEADER.unpack_from(data)[0]
                whole = FRAME_HEADER.size + length
                if len(data) < whole and length <= MAX_FRAME:  # one record bigger than a chunk
                    data += fh.read(whole - len(data))
        if not data:
            return None
        out: list[StoredRecord] = []
        scanner = FrameScanner(data, 0)
        for _, payload in scanner:
            if self._next >= upto or len(out) >= room:
                break
            if keep:
                out.append(_decode(self._next, payload, self._path))
            self._next += 1
            self._offset += FRAME_HEADER.size + len(payload)
            if not keep:
                out.append(_SKIPPED)
        if not out:
            # Record ``_next`` is written, so a frame that does not read here is damage.
            raise LogDamaged(
                f"{self._path.name} at offset {self._offset}: {scanner.fault or 'no record'}"
            )
        return out if keep else []


_SKIPPED = StoredRecord(-1, "", "", "", b"")


def _decode(seq: int, payload: bytes, path: Path) -> StoredRecord:
    try:
        doc = orjson.loads(payload)
        stored = int(doc["seq"])
        record = StoredRecord(seq, str(doc["id"]), str(doc["kind"]), str(doc["time"]), payload)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise LogDamaged(f"{path.name}: record {seq} does not decode") from None
    if stored != seq:
        raise LogDamaged(f"{path.name}: expected record {seq}, found {stored}")
    return record
