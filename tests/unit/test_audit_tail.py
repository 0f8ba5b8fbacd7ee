"""Reading the audit log from a position while it grows, across segment rotations."""

from __future__ import annotations

from pathlib import Path

import pytest

from warden.audit import AuditLog
from warden.audit.segments import LogDamaged, list_segments
from warden.audit.tail import RecordTail
from warden.audit.verify import iter_records
from warden.config import AuditConfig


async def _log(tmp_path: Path, n: int) -> AuditLog:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), segment_max_bytes=4096, fsync="never"))
    for i in range(n):
        await log.append("note", {"i": i, "text": "x" * 200})
    return log


async def test_reads_every_record_as_stored_across_segments(tmp_path: Path) -> None:
    log = await _log(tmp_path, 60)
    try:
        assert len(list_segments(tmp_path / "segments")) > 3  # rotation happened
        tail = RecordTail(tmp_path)
        got = []
        while tail.position < log.size:
            got.extend(tail.read(log.size, limit=7))
        stored = list(iter_records(tmp_path))
        assert [(r.seq, r.payload) for r in got] == stored
        assert {r.kind for r in got} == {"note"}
        # Following: records appended later come from where it stopped.
        await log.append("note", {"i": 60})
        [late] = tail.read(log.size)
        assert (late.seq, late.kind) == (60, "note")
        assert tail.read(log.size) == []
    finally:
        await log.close()


@pytest.mark.parametrize("start", [0, 1, 17, 59])
async def test_starts_at_any_position(tmp_path: Path, start: int) -> None:
    log = await _log(tmp_path, 60)
    try:
        got = RecordTail(tmp_path, start).read(log.size, limit=1000)
        assert [r.seq for r in got] == list(range(start, 60))
        assert RecordTail(tmp_path, 60).read(log.size) == []
    finally:
        await log.close()


async def test_a_missing_segment_is_damage(tmp_path: Path) -> None:
    log = await _log(tmp_path, 60)
    try:
        segments = list_segments(tmp_path / "segments")
        segments[1].unlink()
        with pytest.raises(LogDamaged, match="missing"):
            RecordTail(tmp_path).read(log.size, limit=1000)
    finally:
        await log.close()
