"""Faults a real disk and a real kernel produce: kill -9, EIO on fsync, a full disk.

After each, `verify` must tell the truth and every acknowledged record must
be there. A child process writes under load and prints ``ack <seq> <hash>``
once an append has returned.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden.audit import AuditLog
from warden.audit.merkle import leaf_hash
from warden.audit.verify import VerifyReport, iter_records, verify_log
from warden.config import AuditConfig
from warden.errors import AuditError

CHILD = r"""
import asyncio, sys
from warden.audit import AuditLog
from warden.config import AuditConfig
from warden.errors import AuditError

async def main(root, writers, per_writer):
    log = await AuditLog.open(
        AuditConfig(dir=root, checkpoint_interval_s=0.2, segment_max_bytes=64 * 1024)
    )
    out = sys.stdout
    async def writer(w):
        for i in range(per_writer):
            try:
                ref = await log.append("load", {"writer": w, "i": i, "pad": "x" * 200})
            except AuditError as exc:
                out.write(f"error {exc}\n")
                return
            out.write(f"ack {ref.seq} {ref.hash}\n")
            out.flush()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    out.write(f"writable {log.writable}\n")
    if not log.writable:
        try:
            await log.append("load", {})
            out.write("retried\n")
        except AuditError:
            out.write("refused\n")
    await log.close()
    out.write("closed\n")
    out.flush()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def _env() -> dict[str, str]:
    # The child may run under the real interpreter (not the venv's), so hand it our path.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _acks(lines: list[str]) -> dict[int, str]:
    acks = {}
    for line in lines:
        if line.startswith("ack "):
            _, seq, digest = line.split()
            acks[int(seq)] = digest
    return acks


def _assert_truthful(root: Path, acks: dict[int, str]) -> VerifyReport:
    """Verify says intact (or names a torn tail, all it may find) and every ack is there."""
    report = verify_log(root)
    assert report.ok or [d.kind for d in report.damage] == ["torn"], report.damage
    stored = {seq: leaf_hash(payload).hex() for seq, payload in iter_records(root)}
    missing = [seq for seq, digest in acks.items() if stored.get(seq) != digest]
    assert not missing, f"acknowledged records lost: {missing[:10]}"
    return report


def test_kill_9_under_load_loses_no_acknowledged_record(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), "32", "100000"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert child.stdout is not None
    lines = []
    try:
        for line in child.stdout:
            lines.append(line)
            if len(lines) >= 1500:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    lines += rest.splitlines()
    assert child.returncode == -signal.SIGKILL
    acks = _acks(lines)
    assert len(acks) >= 1500
    report = _assert_truthful(root, acks)
    assert report.records >= max(acks) + 1

    async def reopen() -> None:
        log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
        await log.append("restart", {})
        await log.close()

    asyncio.run(reopen())
    after = verify_log(root)
    assert after.ok, after.damage
    # The restart record, and the log_recovered record naming the records taken on.
    assert _assert_truthful(root, acks).records == report.records + 2


def test_eio_on_fsync_fails_closed_without_retry(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    root = tmp_path / "audit"
    trace = tmp_path / "trace.txt"
    python = os.path.realpath(sys.executable)
    done = subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-o",
            str(trace),
            "-e",
            "trace=fsync,fdatasync",
            "-e",
            "inject=fsync,fdatasync:error=EIO:when=40+",
            python,
            "-c",
            CHILD,
            str(root),
            "8",
            "200",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    if "ptrace" in done.stderr and done.returncode != 0:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    acks = _acks(lines)
    assert acks, "the log should have taken records before the disk failed"
    assert any(line.startswith("error ") for line in lines)
    assert "writable False" in lines
    assert "refused" in lines
    assert "retried" not in lines
    injected = [line for line in trace.read_text().splitlines() if "INJECTED" in line]
    assert len(injected) == 1, f"the failed fsync was retried:\n{''.join(injected)}"
    _assert_truthful(root, acks)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_fails_closed(tiny_disk: Path, tmp_path: Path) -> None:
    root = tiny_disk / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    acks: dict[int, str] = {}

    async def fill_the_disk() -> None:
        for i in range(10_000):
            ref = await log.append("load", {"i": i, "pad": "x" * 900})
            acks[ref.seq] = ref.hash

    with pytest.raises(AuditError, match="failed to write") as failed:
        await fill_the_disk()
    # The cause stays with the error (Warden's log); agents read only the message.
    assert "No space left" in str(failed.value.__cause__)
    assert "No space left" not in str(failed.value)
    assert not log.writable
    with pytest.raises(AuditError):
        await log.append("load", {})
    await log.close()
    assert len(acks) > 50
    _assert_truthful(root, acks)
    # Moved to a healthy disk, the log opens, repairs any torn tail and goes on.
    healthy = tmp_path / "healthy"
    shutil.copytree(root, healthy)
    log = await AuditLog.open(AuditConfig(dir=str(healthy), checkpoint_interval_s=3600))
    await log.append("restart", {})
    await log.close()
    assert verify_log(healthy).ok
    _assert_truthful(healthy, acks)
