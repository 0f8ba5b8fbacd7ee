"""Whoever can write the audit directory but holds no signing key.

Records appended after a clean stop are refused at start and named by
verify; records after a crash are taken on, with a warning and a record; a
start cuts nothing a checkpoint covers; an erasure leaves its note before it
destroys anything, so a crash never leaves it unfinished and unrecorded.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from warden.audit import AuditLog
from warden.audit.checkpoint import CLOSED, REOPENED, Checkpoint, NoteVerifier
from warden.audit.layout import Layout
from warden.audit.merkle import leaf_hash
from warden.audit.segments import frame, list_segments
from warden.audit.subjects import SubjectKeys, SubjectMatch
from warden.audit.verify import iter_records, verify_log
from warden.config import AuditConfig
from warden.errors import AuditError
from warden.testing.audit import fill, read_segments


def _config(root: Path, **kw: Any) -> AuditConfig:
    return AuditConfig(dir=str(root), **{"checkpoint_interval_s": 3600, **kw})


def _records(root: Path) -> list[dict[str, Any]]:
    return [orjson.loads(p) for _, p in iter_records(root)]


def _latest(root: Path, verifier: NoteVerifier) -> Checkpoint:
    return Checkpoint.open((root / "checkpoint").read_bytes(), verifier)


def _forge(root: Path) -> None:
    """Append a correctly chained fake approval, as an insider without the key can."""
    last = read_segments(root)[-1]
    prev = orjson.loads(last.records[-1])
    seq = prev["seq"] + 1
    forged = {
        "v": 1,
        "id": f"{prev['id'][:-10]}{seq:010x}",
        "seq": seq,
        "time": prev["time"],
        "prev": leaf_hash(last.records[-1]).hex(),
        "kind": "approval_decided",
        "subject": None,
        "sealed": None,
        "body": {"approval_id": "apr_forged", "who": "cfo@example.com", "verdict": "approved"},
    }
    data = last.path.read_bytes().rstrip(b"\0")
    last.path.write_bytes(data + frame(orjson.dumps(forged, option=orjson.OPT_SORT_KEYS)))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != "LOCK"
    }


async def test_records_added_after_a_clean_stop_are_refused_and_named_by_verify(
    tmp_path: Path,
) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 6)
    verifier = NoteVerifier.from_vkey(log.verifier_key)
    await log.close()
    assert _latest(root, verifier).closed, "the checkpoint of a clean stop says so"
    outside = tmp_path / "kept-elsewhere"
    shutil.copy(root / "checkpoint", outside)
    _forge(root)
    before = _snapshot(root)

    with pytest.raises(AuditError, match=r"closed cleanly at 6 records.*record 6") as refused:
        await AuditLog.open(_config(root))
    assert "truncate -s" in str(refused.value)
    assert _snapshot(root) == before, "a refused start changes nothing, signs nothing"

    for extra in ([], [outside]):
        report = verify_log(root, verifier=verifier, extra_checkpoints=extra)
        assert [(d.kind, d.seq) for d in report.damage] == [("appended", 6)], report.damage
        assert "added after the fact" in report.damage[0].detail


async def test_a_restart_after_a_clean_stop_signs_that_it_resumed_the_log(
    tmp_path: Path,
) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 4)
    verifier = NoteVerifier.from_vkey(log.verifier_key)
    await log.close()
    closed = _latest(root, verifier)
    outside = tmp_path / "kept-elsewhere"
    shutil.copy(root / "checkpoint", outside)

    log = await AuditLog.open(_config(root))
    reopened = _latest(root, verifier)
    assert (reopened.size, reopened.closed) == (4, False)
    assert reopened.reopens == {(4, closed.digest())}
    await log.checkpoint(refresh=True)  # a quiet log's refresh keeps saying so
    assert _latest(root, verifier).reopens == {(4, closed.digest())}
    await fill(log, 2)  # not yet covered by a checkpoint: this run's own records
    report = verify_log(root, verifier=verifier, extra_checkpoints=[outside])
    assert report.ok, report.damage
    await log.checkpoint()
    assert _latest(root, verifier).reopens == {(4, closed.digest())}, "every checkpoint"
    await log.close()
    assert _latest(root, verifier).closed
    report = verify_log(root, verifier=verifier, extra_checkpoints=[outside])
    assert report.ok, report.damage
    assert [r["kind"] for r in _records(root)].count("log_recovered") == 0


async def test_runs_that_add_nothing_still_show_each_clean_stop_resumed(
    tmp_path: Path,
) -> None:
    """Where only the first checkpoint of each size is kept (the central store), the
    first clean stop is all that is left at its size: a later run must name it too."""
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 3)
    verifier = NoteVerifier.from_vkey(log.verifier_key)
    await log.close()
    first_stop = (root / "checkpoint").read_bytes()
    await (await AuditLog.open(_config(root))).close()  # a run that adds nothing
    log = await AuditLog.open(_config(root))
    await fill(log, 2)
    await log.close()
    # The third run names both clean stops at 3: the second, and the first it resumed.
    assert [size for size, _ in _latest(root, verifier).reopens] == [3, 3]
    (root / "checkpoints" / f"{3:020d}").write_bytes(first_stop)  # what the store kept
    report = verify_log(root, verifier=verifier)
    assert report.ok, report.damage


async def test_a_closed_checkpoint_taken_out_to_have_records_adopted_is_caught(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The insider removes the closed checkpoint: the start takes the records for a
    crash's, but says so in the log, and a checkpoint kept elsewhere names them."""
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 6)
    await log.checkpoint()
    await fill(log, 2)
    verifier = NoteVerifier.from_vkey(log.verifier_key)
    await log.close()  # closed at 8
    outside = tmp_path / "kept-elsewhere"
    shutil.copy(root / "checkpoint", outside)
    _forge(root)
    (root / "checkpoints" / f"{8:020d}").unlink()
    shutil.copy(root / "checkpoints" / f"{6:020d}", root / "checkpoint")

    with caplog.at_level(logging.WARNING, logger="warden.audit"):
        log = await AuditLog.open(_config(root))
    assert "adopting records 6..8" in caplog.text
    await log.close()
    recovered = _records(root)[9]
    assert recovered["kind"] == "log_recovered"
    assert recovered["body"]["adopted"] == {"first": 6, "last": 8}
    assert recovered["body"]["checkpoint"] == 6

    report = verify_log(root, verifier=verifier, extra_checkpoints=[outside])
    assert [(d.kind, d.seq) for d in report.damage] == [("appended", 8)], report.damage
    assert "record 8 follows" in report.damage[0].detail
    assert "record 9, log_recovered" in report.damage[0].detail


async def test_a_crash_tail_is_taken_on_with_a_warning_and_a_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "live"
    log = await AuditLog.open(_config(root))
    await fill(log, 5)
    await log.checkpoint()
    await fill(log, 3)
    crash = tmp_path / "crash"
    shutil.copytree(root, crash)  # what a kill -9 leaves: records 5..7 unsigned
    await log.close()

    with caplog.at_level(logging.WARNING, logger="warden.audit"):
        reopened = await AuditLog.open(_config(crash))
    assert "not closed cleanly; adopting records 5..7" in caplog.text
    await fill(reopened, 1)
    await reopened.close()
    records = _records(crash)
    assert [r["kind"] for r in records[8:]] == ["log_recovered", "decision"]
    assert records[8]["body"]["adopted"] == {"first": 5, "last": 7}
    assert verify_log(crash).ok


async def test_a_log_from_before_the_flag_opens_and_an_unsigned_tail_is_taken_on(
    tmp_path: Path,
) -> None:
    """Checkpoints without ``closed`` (older Wardens): continued as before, a tail no
    checkpoint signed taken on as a crash's and named."""
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 4)
    await log.checkpoint()  # at 4
    await fill(log, 2)
    await log.close()  # at 6
    layout = Layout(root)
    signer = layout.signer(layout.read_meta().origin, None)
    # The final checkpoint as an older Warden signed it: no `closed` line.
    final = _latest(root, signer.verifier)
    old = Checkpoint(final.origin, final.size, final.root, final.extensions[:1])
    assert final.closed
    assert not old.closed
    layout.write_checkpoint(6, signer.sign(old.text()))

    log = await AuditLog.open(_config(root))
    assert _latest(root, signer.verifier) == old, "nothing to resume: not signed again"
    await log.close()
    assert not any(r["kind"] == "log_recovered" for r in _records(root))
    assert verify_log(root).ok

    # An older Warden's crash: its last records signed by no checkpoint.
    (root / "checkpoints" / f"{6:020d}").unlink()
    shutil.copy(root / "checkpoints" / f"{4:020d}", root / "checkpoint")
    log = await AuditLog.open(_config(root))
    await log.close()
    recovered = [r for r in _records(root) if r["kind"] == "log_recovered"]
    assert [r["body"]["adopted"] for r in recovered] == [{"first": 4, "last": 5}]
    assert verify_log(root).ok


async def test_a_closed_checkpoint_edited_to_look_unclosed_is_not_trusted(
    tmp_path: Path,
) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 3)
    await log.close()
    _forge(root)
    for path in (root / "checkpoint", root / "checkpoints" / f"{3:020d}"):
        text = path.read_text()
        assert f"\n{CLOSED}\n" in text
        path.write_text(text.replace(f"\n{CLOSED}\n", "\n"))  # breaks the signature
    with pytest.raises(AuditError, match=r"does not verify with the log's key.*records 0\.\.3"):
        await AuditLog.open(_config(root))
    assert not any(r["kind"] == "log_recovered" for r in _records(root))


async def test_a_changed_signed_record_is_never_cut_as_a_torn_tail(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 10)
    await log.close()  # the final checkpoint covers all 10
    seg = list_segments(root / "segments")[-1]
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last, signed, record
    seg.write_bytes(bytes(data))
    before = _snapshot(root)

    with pytest.raises(AuditError, match="which a signed checkpoint covers"):
        await AuditLog.open(_config(root))
    assert _snapshot(root) == before, "nothing cut, nothing copied to torn/"
    assert not (root / "torn").exists()
    report = verify_log(root)
    assert report.damage[0].kind == "modified", report.damage
    assert report.damage[0].seq == 9


async def test_verify_reports_the_torn_tails_a_start_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "live"
    log = await AuditLog.open(_config(root))
    await fill(log, 3)
    crash = tmp_path / "crash"
    shutil.copytree(root, crash)
    await log.close()
    seg = list_segments(crash / "segments")[-1]
    data = seg.read_bytes()
    end = len(data.rstrip(b"\0"))
    torn = frame(b'{"seq":3,"half":"writ')[:-7]
    seg.write_bytes(data[:end] + torn + data[end + len(torn) :])
    with caplog.at_level(logging.WARNING, logger="warden.audit"):
        reopened = await AuditLog.open(_config(crash))
    await reopened.close()
    (copy,) = (crash / "torn").iterdir()
    report = verify_log(crash)
    assert report.ok, report.damage
    assert any("torn/" in w and copy.name in w for w in report.warnings), report.warnings
    recovered = [r for r in _records(crash) if r["kind"] == "log_recovered"]
    assert recovered[0]["body"]["torn"] == f"torn/{copy.name}"


class _StuckEraser:
    """A state store that hangs until released (a busy database)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[frozenset[str]] = []

    async def __call__(self, match: SubjectMatch) -> dict[str, int]:
        self.calls.append(match.refs)
        self.started.set()
        await self.release.wait()
        return {"approvals": 1}


async def test_an_erasure_interrupted_midway_is_finished_by_the_next_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "live"
    log = await AuditLog.open(_config(root))
    await fill(log, 2, customer="cus_ann")
    eraser = _StuckEraser()
    log.on_erase(eraser)
    task = asyncio.create_task(log.erase("cus_ann"))
    await asyncio.wait_for(eraser.started.wait(), 10)
    # What a kill -9 leaves now: the key destroyed, the state store not yet erased.
    crash = tmp_path / "crash"
    shutil.copytree(root, crash)
    eraser.release.set()
    await task
    await log.close()
    keys = SubjectKeys.open(crash, create=False)
    ref = keys.ref("cus_ann")
    assert keys.load(ref) is None
    assert keys.noted_erasures() == {ref: True}, "the note is written before the key goes"

    finisher = _StuckEraser()
    finisher.release.set()
    again = await AuditLog.open(_config(crash, checkpoint_interval_s=0.05))
    again.on_erase(finisher)
    for _ in range(200):
        if not keys.noted_erasures():
            break
        await asyncio.sleep(0.05)
    await again.close()
    assert finisher.calls == [frozenset({ref})]
    erasures = [r["body"] for r in _records(crash) if r["kind"] == "erasure"]
    assert erasures == [{"subject": ref, "key_destroyed": True, "state": {"approvals": 1}}]


class _DownThenUp:
    """A state store out of reach until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False
        self.tries = 0

    async def __call__(self, match: SubjectMatch) -> dict[str, int]:
        self.tries += 1
        if not self.up:
            raise ConnectionError("the state store is out of reach")
        return {}


async def _until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)


async def test_a_noted_erasure_whose_key_survived_a_crash_destroys_it(tmp_path: Path) -> None:
    """Killed between the note and the key: whoever finishes the note destroys the key;
    not a key made after the note (the subject seen again while the store was down)."""
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 2, customer="cus_bob")
    await log.close()
    keys = SubjectKeys.open(root, create=False)
    ref = keys.ref("cus_bob")
    assert keys.load(ref) is not None
    keys.note_erasure(ref, key_destroyed=True)

    store = _DownThenUp()
    log = await AuditLog.open(_config(root, checkpoint_interval_s=0.05))
    log.on_erase(store)
    await _until(lambda: keys.load(ref) is None)
    assert keys.load(ref) is None, "the key the erasure was about"
    await fill(log, 1, customer="cus_bob")  # a new key, for a record after the erasure
    tries = store.tries
    await _until(lambda: store.tries > tries + 1)
    assert keys.load(ref) is not None, "a key made after the note stays"
    store.up = True
    await _until(lambda: not keys.noted_erasures())
    await log.close()
    assert keys.noted_erasures() == {}
    assert keys.load(ref) is not None
    erasures = [r["body"] for r in _records(root) if r["kind"] == "erasure"]
    assert erasures == [{"subject": ref, "key_destroyed": True, "state": {}}]


def test_reopened_lines_name_the_closed_checkpoint() -> None:
    ckpt = Checkpoint("warden.local/audit/abc", 3, bytes(32), ("time x", CLOSED))
    lines = ("time x", f"{REOPENED}3 {'a' * 64}", f"{REOPENED}2 {'b' * 64}", CLOSED)
    again = Checkpoint("warden.local/audit/abc", 3, bytes(32), lines)
    assert ckpt.closed
    assert again.reopens == {(3, "a" * 64), (2, "b" * 64)}
    # A run resuming it names it, and what it names at its own size (not at 2).
    assert again.resumed_lines() == (f"{REOPENED}3 {again.digest()}", f"{REOPENED}3 {'a' * 64}")
    assert ckpt.digest() != again.digest()


@pytest.mark.parametrize("closed_kept", [True, False])
async def test_a_checkpoint_file_that_does_not_verify_cannot_get_appended_records_signed(
    tmp_path: Path, closed_kept: bool
) -> None:
    """After a clean stop the insider appends a record and drops any file named after
    the size that includes it (with or without the closed checkpoint): the start
    judges the log by the newest checkpoint that verifies, and refuses."""
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 3)
    await log.checkpoint()  # at 3
    await fill(log, 2)
    verifier = NoteVerifier.from_vkey(log.verifier_key)
    await log.close()  # closed at 5
    _forge(root)  # record 5
    checkpoints = root / "checkpoints"
    if not closed_kept:
        (checkpoints / f"{5:020d}").unlink()
        shutil.copy(checkpoints / f"{3:020d}", root / "checkpoint")
    bogus = checkpoints / f"{6:020d}"
    bogus.write_text("anything\n")
    before = _snapshot(root)

    with pytest.raises(AuditError) as refused:
        await AuditLog.open(_config(root))
    said = str(refused.value)
    assert f"checkpoint file {bogus.name} in {checkpoints} does not verify" in said
    newest = (
        f"{5:020d} (5 records, signed when Warden stopped cleanly)"
        if closed_kept
        else f"{3:020d} (3 records)"
    )
    assert f"the newest that does is {newest}" in said
    assert ("record 5 after it" if closed_kept else "records 3..5 after it") in said
    assert "warden audit verify --dir" in said
    assert _snapshot(root) == before, "a refused start changes nothing, signs nothing"

    report = verify_log(root, verifier=verifier)
    bad = [d.detail for d in report.damage if d.kind == "checkpoint"]
    assert bad, report.damage
    assert f"checkpoints/{bogus.name} does not verify with the key" in bad[0]
    assert "Warden does not start" in bad[0]

    # Set aside as the refusal says: the closed checkpoint still refuses the record;
    # without it the record is taken on as a crash's, and the log says so.
    bogus.rename(tmp_path / bogus.name)
    if closed_kept:
        with pytest.raises(AuditError, match="closed cleanly at 5 records"):
            await AuditLog.open(_config(root))
        return
    log = await AuditLog.open(_config(root))
    await log.close()
    recovered = [r["body"]["adopted"] for r in _records(root) if r["kind"] == "log_recovered"]
    assert recovered == [{"first": 3, "last": 5}]


async def _older_release_run(root: Path, monkeypatch: pytest.MonkeyPatch, *, start: bool) -> None:
    """A run of a Warden release from before closed checkpoints: it takes whatever the
    log holds, signs no ``reopened`` line and no ``closed`` one. ``start``: it writes
    the ``config_load`` record ``warden serve`` writes first."""
    with monkeypatch.context() as patched:
        patched.setattr("warden.audit.log._resume", lambda *_a, **_k: ((), None))
        log = await AuditLog.open(_config(root))
        if start:
            await log.append("config_load", {"source": "warden.yaml"})
        await fill(log, 2)
        await log.close()
    layout = Layout(root)
    signer = layout.signer(layout.read_meta().origin, None)
    final = _latest(root, signer.verifier)
    unclosed = Checkpoint(final.origin, final.size, final.root, final.extensions[:1])
    layout.write_checkpoint(final.size, signer.sign(unclosed.text()))


async def test_records_an_older_release_wrote_after_a_downgrade_are_told_from_an_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New release, then the release before it (a rollback), then the new one again:
    the older release's records start with its start's ``config_load`` and a later
    checkpoint signed them, so verify warns rather than call them appended. An insider's
    record ahead of that start is still `appended`."""
    root = tmp_path / "audit"
    log = await AuditLog.open(_config(root))
    await fill(log, 3)
    verifier = NoteVerifier.from_vkey(log.verifier_key)
    await log.close()  # closed at 3
    await _older_release_run(root, monkeypatch, start=True)  # records 3..5
    log = await AuditLog.open(_config(root))
    await log.append("config_load", {"source": "warden.yaml"})
    await fill(log, 1)
    await log.close()

    report = verify_log(root, verifier=verifier)
    assert report.ok, report.damage
    (warning,) = [w for w in report.warnings if "downgrade" in w]
    assert "records from 3 follow signed checkpoint checkpoints/00000000000000000003" in warning
    assert "record 3 is a Warden start (config_load)" in warning

    # The insider's record came first, and the older release took it on: appended.
    other = tmp_path / "other"
    log = await AuditLog.open(_config(other))
    await fill(log, 3)
    await log.close()
    _forge(other)
    await _older_release_run(other, monkeypatch, start=True)
    report = verify_log(other)
    assert [(d.kind, d.seq) for d in report.damage] == [("appended", 3)], report.damage
    assert "record 3 is no Warden start" in report.damage[0].detail
