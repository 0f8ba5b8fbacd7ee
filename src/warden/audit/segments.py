"""Append-only segment files: framing, rotation, fsync and torn-tail recovery.

A segment is ``segments/<first seq, 20 digits>.seg``::

    b"WARDSEG1"                         magic and format version
    frame(header JSON)                  first_seq, prev hash, Merkle compact range
    frame(record) frame(record) ...

and a frame is ``length (u32 BE) || CRC-32 of payload (u32 BE) || payload``.
The header lets a restart continue the chain and the tree from the last
segment alone; ``verify`` recomputes everything and only cross-checks it.

The segment being written is followed by zero bytes written ahead of the
records (:data:`PREALLOCATE` at a time): an fdatasync of a write into room
the file already has need not commit a new file size to the filesystem's
journal, which makes the per-batch sync about a third cheaper. A zero tail is
the end of the records, not damage (:func:`zero_tail`); a segment is cut to
its records when it is rotated or closed, so only the live segment, or one a
crash left behind, has one.

:class:`SegmentWriter` runs on the log's single I/O thread and nowhere else.
Any ``OSError`` from a write or an fsync leaves it broken for good: the caller
fails the log closed and nothing is retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from warden.audit.layout import fsync_dir
from warden.audit.merkle import CompactRange, leaf_hash
from warden.audit.record import GENESIS_PREV

__all__ = [
    "FRAME_HEADER",
    "MAGIC",
    "RECOVERED_KIND",
    "FrameScanner",
    "LogDamaged",
    "SegmentWriter",
    "TreeState",
    "count_records",
    "find_next_frame",
    "frame",
    "list_segments",
    "locate",
    "open_writer",
    "parse_header",
    "segment_name",
    "zero_tail",
]

log = logging.getLogger("warden.audit")

MAGIC = b"WARDSEG1"
FRAME_HEADER = struct.Struct(">II")
_HDR = FRAME_HEADER.size
MAX_FRAME = 64 * 1024 * 1024
_MAX_HEADER = 8 * 1024  # a header holds at most 64 hashes; anything bigger is not one
RECOVERED_KIND = "log_recovered"
"""The record a start writes when it takes on records no checkpoint signed (after a crash)."""
PREALLOCATE = 1024 * 1024
"""Zero bytes written ahead of the records at a time (never past ``segment_max_bytes``)."""
_pack = FRAME_HEADER.pack
_crc32 = zlib.crc32


class LogDamaged(Exception):
    """The log on disk is damaged in a way a restart must not paper over."""


@dataclass(frozen=True, slots=True)
class TreeState:
    """The log's state after some number of records: enough to continue it."""

    size: int
    last_hash: bytes
    range: tuple[bytes, ...]

    @classmethod
    def empty(cls) -> TreeState:
        """The state of a log with no records."""
        return cls(0, bytes.fromhex(GENESIS_PREV), ())

    def compact(self) -> CompactRange:
        """A compact range to continue appending from."""
        return CompactRange(self.size, self.range)

    def header(self) -> dict[str, Any]:
        """The segment header that starts a segment at this state."""
        return {
            "v": 1,
            "first_seq": self.size,
            "prev": self.last_hash.hex(),
            "range": [h.hex() for h in self.range],
        }


def frame(payload: bytes) -> bytes:
    """One frame: length, CRC-32, payload."""
    return _pack(len(payload), _crc32(payload)) + payload


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record is ``first_seq``."""
    return f"{first_seq:020d}.seg"


def list_segments(segdir: Path) -> list[Path]:
    """The segment files in order (names sort numerically: they are zero padded)."""
    if not segdir.is_dir():
        return []
    return sorted(p for p in segdir.iterdir() if p.suffix == ".seg" and p.stem.isdigit())


def parse_header(data: bytes) -> tuple[TreeState, int] | None:
    """The state a segment starts at and the offset of its first record, or ``None``."""
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + _HDR:
        return None
    length, crc = FRAME_HEADER.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _HDR
    payload = data[start : start + length]
    if length > _MAX_HEADER or len(payload) != length or _crc32(payload) != crc:
        return None
    try:
        head = orjson.loads(payload)
        state = TreeState(
            int(head["first_seq"]),
            bytes.fromhex(head["prev"]),
            tuple(bytes.fromhex(h) for h in head["range"]),
        )
        state.compact()  # validates the range against the size
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if len(state.last_hash) != 32:
        return None
    return state, start + length


def zero_tail(data: bytes, pos: int) -> bool:
    """Whether everything from ``pos`` on is zero bytes: room written ahead, not a record.

    No frame can start with zero bytes (a record is never empty), so a zero
    tail is never mistaken for one.
    """
    return data.count(0, pos) == len(data) - pos


def find_next_frame(data: bytes, after: int) -> int | None:
    """The offset of the first plausible valid frame past ``after``, or ``None``.

    Used to tell a torn tail (nothing valid follows the bad frame) from damage
    in the middle (valid frames follow). Record payloads are JSON objects, so
    candidates are found by looking for ``{"``, ending in ``}``, and checking
    the CRC before it.
    """
    n = len(data)
    pos = after + 1 + _HDR
    # Crafted bytes could make every "{" a candidate claiming the rest of the file:
    # checksummed work is bounded, and past the bound the answer is "a frame may
    # follow", which every caller takes as damage, never as a torn tail.
    budget = 4 * n + (1 << 20)
    while True:
        j = data.find(b'{"', pos)
        if j < 0:
            return None
        p = j - _HDR
        length, crc = FRAME_HEADER.unpack_from(data, p)
        if 0 < length <= min(n - j, MAX_FRAME) and data[j + length - 1] == 0x7D:  # "}"
            budget -= length
            if budget < 0 or _crc32(data[j : j + length]) == crc:
                return p
        pos = j + 1


class FrameScanner:
    """Iterates ``(offset, payload)`` over the frames of one segment's bytes.

    Iteration stops at the end or at the first bad frame; :attr:`fault` then
    says what was wrong (``None`` when the segment ended cleanly) and
    :attr:`fault_offset` where.
    """

    __slots__ = ("_data", "_start", "end", "fault", "fault_offset")

    def __init__(self, data: bytes, start: int) -> None:
        self._data = data
        self._start = start
        self.fault: str | None = None
        self.fault_offset = start
        self.end = start

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        data = self._data
        n = len(data)
        pos = self._start
        unpack = FRAME_HEADER.unpack_from
        crc32 = _crc32
        while pos < n:
            if n - pos < _HDR:
                if not zero_tail(data, pos):
                    self.fault, self.fault_offset = "incomplete frame header", pos
                return
            length, crc = unpack(data, pos)
            body = pos + _HDR
            if length == 0 or length > MAX_FRAME:
                if not (length == 0 and zero_tail(data, pos)):
                    self.fault, self.fault_offset = f"impossible frame length {length}", pos
                return
            if body + length > n:
                self.fault, self.fault_offset = "frame runs past the end of the file", pos
                return
            payload = data[body : body + length]
            if crc32(payload) != crc:
                self.fault, self.fault_offset = "frame checksum mismatch", pos
                return
            yield pos, payload
            pos = body + length
            self.end = pos
        self.end = pos


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class SegmentWriter:
    """Appends batches of frames to the current segment; rotates by size. I/O thread only."""

    def __init__(
        self,
        segdir: Path,
        *,
        path: Path,
        fd: int,
        size: int,
        data_start: int,
        state: TreeState,
        max_bytes: int,
        allocated: int | None = None,
    ) -> None:
        self._segdir = segdir
        self._path = path
        self._fd = fd
        self._size = size
        self._allocated = size if allocated is None else max(size, allocated)
        """The file's length: the records, then zeros written ahead."""
        self._ahead = True
        """Whether to write zeros ahead (off after the disk had no room for them)."""
        self._data_start = data_start
        self._state = state
        self._max_bytes = max_bytes
        self._broken: OSError | None = None
        self._dirty = False
        self.torn_copy: Path | None = None
        """Where :func:`open_writer` kept a torn tail it cut off, if it cut one."""

    @property
    def path(self) -> Path:
        """The segment being written."""
        return self._path

    def _guard(self) -> None:
        if self._broken is not None:
            raise OSError(self._broken.errno, f"the audit log failed earlier: {self._broken}")

    def write_batch(self, frames: list[bytes], state_after: TreeState, sync: bool) -> None:
        """Append ``frames`` (which take the log to ``state_after``); fdatasync if ``sync``."""
        self._guard()
        data = b"".join(frames)
        try:
            if self._size > self._data_start and self._size + len(data) > self._max_bytes:
                self._rotate()
            end = self._size + len(data)
            try:
                _write_all(self._fd, data, self._size)
            except OSError:
                # Leave no partial frame behind if we can; never try the write again.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                self._allocated = self._size
                raise
            self._size = end
            if end > self._allocated:
                self._write_ahead(end)
            self._dirty = True
            if sync:
                os.fdatasync(self._fd)
                self._dirty = False
        except OSError as exc:
            self._broken = exc
            raise
        self._state = state_after

    def sync(self) -> None:
        """Make everything written so far durable."""
        self._guard()
        if not self._dirty:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._broken = exc
            raise
        self._dirty = False

    def _write_ahead(self, end: int) -> None:
        """Out of room: write the next stretch of zeros, made durable by this batch's sync.

        Later batches only overwrite them. Zeros that do not fit (a full disk)
        are not an error: the log goes on without room ahead.
        """
        self._allocated = end
        ahead = min(end + PREALLOCATE, self._max_bytes)
        if not self._ahead or ahead <= end:
            return
        try:
            _write_all(self._fd, bytes(ahead - end), end)
        except OSError as exc:
            self._ahead = False
            os.ftruncate(self._fd, end)  # an error here breaks the log, as any write's would
            log.warning("audit: no room to write ahead in %s (%s)", self._path.name, exc)
            return
        self._allocated = ahead

    def _cut(self) -> None:
        """Drop the zeros written ahead: a finished segment ends with its last record."""
        if self._allocated > self._size:
            os.ftruncate(self._fd, self._size)
            self._allocated = self._size
            self._dirty = True

    def _rotate(self) -> None:
        self._cut()
        os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = -1
        path, fd, start, allocated = _create_segment(self._segdir, self._state, self._max_bytes)
        self._path, self._fd, self._size, self._data_start = path, fd, start, start
        self._allocated = allocated
        self._dirty = False

    def abandon(self) -> None:
        """Close the file without touching it (a start that is refused leaves it as found)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self, sync: bool = True) -> None:
        """Cut the zeros written ahead, sync (if asked and not broken) and close the file."""
        if self._fd < 0:
            return
        try:
            if self._broken is None:
                with contextlib.suppress(OSError):  # a recovery cuts them otherwise
                    self._cut()
            if sync and self._broken is None:
                self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1


def _create_segment(segdir: Path, state: TreeState, max_bytes: int) -> tuple[Path, int, int, int]:
    """A new segment: its path, fd, where records start and its length with the zeros ahead."""
    path = segdir / segment_name(state.size)
    head = MAGIC + frame(orjson.dumps(state.header()))
    allocated = max(len(head), min(PREALLOCATE, max_bytes))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, head, 0)
        try:
            _write_all(fd, bytes(allocated - len(head)), len(head))
        except OSError:  # a nearly full disk: no room ahead, the records still fit
            os.ftruncate(fd, len(head))
            allocated = len(head)
        os.fdatasync(fd)
        fsync_dir(segdir)
    except OSError:
        os.close(fd)
        raise
    return path, fd, len(head), allocated


def _keep_torn(torn_dir: Path, segment: Path, offset: int, data: bytes) -> Path:
    torn_dir.mkdir(mode=0o700, exist_ok=True)
    copy = torn_dir / f"{segment.name}.{offset}.{time.time_ns()}.torn"
    with copy.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(torn_dir)
    return copy


def _scan_tail(
    path: Path, data: bytes, start: TreeState, data_start: int
) -> tuple[TreeState, int, str | None]:
    """Replay the last segment: the state at its last good frame, that offset, and what
    is wrong with the frame after it (``None``: the segment ends there)."""
    compact = start.compact()
    last = start.last_hash
    expected = start.size
    scanner = FrameScanner(data, data_start)
    for offset, payload in scanner:
        try:
            seq = orjson.loads(payload)["seq"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            seq = None
        if seq != expected:
            raise LogDamaged(
                f"{path.name} at offset {offset}: expected record {expected}, found {seq!r}; "
                "run `warden audit verify`"
            )
        last = leaf_hash(payload)
        compact.append(last)
        expected += 1
    if scanner.fault is not None and find_next_frame(data, scanner.fault_offset) is not None:
        raise LogDamaged(
            f"{path.name} at offset {scanner.fault_offset}: {scanner.fault}, with valid records "
            "after it; run `warden audit verify`"
        )
    return TreeState(compact.size, last, compact.hashes), scanner.end, scanner.fault


def open_writer(root: Path, max_bytes: int, *, covered: int = 0) -> tuple[SegmentWriter, TreeState]:
    """Open the log for appending: recover a torn tail, return the writer and state.

    A torn last frame (a crash mid-write: nothing valid follows it) is copied
    to ``torn/`` and cut off, with a warning logged. Damage with valid frames
    after it is not a torn write: it raises :class:`LogDamaged` rather than
    drop records. Nor is a bad frame where one of the first ``covered``
    records should be (a signed checkpoint covers them, and a checkpoint is
    signed only over synced records): nothing is cut, :class:`LogDamaged`.
    """
    segdir = root / "segments"
    segdir.mkdir(mode=0o750, parents=True, exist_ok=True)
    segments = list_segments(segdir)
    while segments:
        path = segments[-1]
        data = path.read_bytes()
        parsed = parse_header(data)
        if parsed is None:
            if find_next_frame(data, len(MAGIC)) is None and int(path.stem) >= covered:
                # A crash while creating the segment: it never held a record.
                copy = _keep_torn(root / "torn", path, 0, data)
                path.unlink()
                fsync_dir(segdir)
                log.warning(
                    "audit: removed a half-created segment %s (copy kept at %s)", path, copy
                )
                segments.pop()
                continue
            raise LogDamaged(
                f"{path.name}: the segment header is damaged; run `warden audit verify`"
            )
        start, data_start = parsed
        if start.size != int(path.stem):
            raise LogDamaged(f"{path.name}: its header says it starts at record {start.size}")
        state, good_end, fault = _scan_tail(path, data, start, data_start)
        allocated = len(data)
        torn_copy = None
        if good_end < len(data) and not zero_tail(data, good_end):
            if state.size < covered:
                # Checked before anything is cut: a start that is refused must leave
                # the signed record where verify and the investigator will look for it.
                raise LogDamaged(
                    f"{path.name} at offset {good_end}: {fault or 'damaged bytes'} where record "
                    f"{state.size} should be, which a signed checkpoint covers ({covered} "
                    "records): its stored bytes were changed, not torn by a crash; "
                    "run `warden audit verify`"
                )
            torn = data[good_end:].rstrip(b"\0")  # without the zeros written ahead of it
            copy = torn_copy = _keep_torn(root / "torn", path, good_end, torn)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning(
                "audit: cut a torn last frame off %s at offset %d (%d bytes, copy kept at %s)",
                path.name,
                good_end,
                len(torn),
                copy,
            )
            allocated = good_end
        fd = os.open(path, os.O_WRONLY)
        writer = SegmentWriter(
            segdir,
            path=path,
            fd=fd,
            size=good_end,
            data_start=data_start,
            state=state,
            max_bytes=max_bytes,
            allocated=allocated,
        )
        writer.torn_copy = torn_copy
        return writer, state
    state = TreeState.empty()
    path, fd, start_offset, allocated = _create_segment(segdir, state, max_bytes)
    writer = SegmentWriter(
        segdir,
        path=path,
        fd=fd,
        size=start_offset,
        data_start=start_offset,
        state=state,
        max_bytes=max_bytes,
        allocated=allocated,
    )
    return writer, state


def locate(root: Path, seq: int) -> tuple[Path, int] | None:
    """The segment holding record ``seq`` and the offset of its frame, or ``None``.

    Reads only the last segment whose first record is at or before ``seq``;
    for messages that tell an operator where to look.
    """
    for path in reversed(list_segments(root / "segments")):
        if int(path.stem) > seq:
            continue
        data = path.read_bytes()
        parsed = parse_header(data)
        if parsed is None:
            return None
        at = parsed[0].size
        for offset, _ in FrameScanner(data, parsed[1]):
            if at == seq:
                return path, offset
            at += 1
        return None
    return None


def count_records(root: Path) -> int:
    """How many whole records the log holds, read only: nothing is cut or repaired.

    For what a refused start says: a torn last frame is not counted, and a
    last segment left half-created by a crash is passed over.
    """
    for path in reversed(list_segments(root / "segments")):
        data = path.read_bytes()
        parsed = parse_header(data)
        if parsed is None:
            continue
        return parsed[0].size + sum(1 for _ in FrameScanner(data, parsed[1]))
    return 0
