"""AuditLog: durable group commit, fail closed, restart, rotation, privacy."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from warden.audit import ApprovalEvidence, AuditLog, arguments_sha256
from warden.audit import log as log_module
from warden.audit import segments as segments_module
from warden.audit.layout import Layout
from warden.audit.log import Erasure
from warden.audit.merkle import leaf_hash
from warden.audit.subjects import SubjectKeys, SubjectMatch
from warden.audit.verify import iter_records, verify_log
from warden.config import AuditConfig
from warden.errors import AuditError
from warden.model import Effect, Mode, Outcome, Usage
from warden.pipeline import AuditSink, Pipeline
from warden.testing.audit import fill, read_segments, sample_action, sample_decision

SCHEMA_KEYS = {"v", "id", "seq", "time", "prev", "kind", "subject", "sealed"}


def _config(path: Path, **kw: Any) -> AuditConfig:
    return AuditConfig(dir=str(path), checkpoint_interval_s=3600, **kw)


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[AuditLog]:
    opened = await AuditLog.open(_config(tmp_path / "audit"))
    yield opened
    await opened.close()


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _records(root: Path) -> list[dict[str, Any]]:
    return [orjson.loads(p) for _, p in iter_records(root)]


class SyncCounter:
    """Counts fdatasync calls and can start failing them like a dying disk."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        self.real(fd)


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> SyncCounter:
    counter = SyncCounter()
    # The os module segments writes through (segments_module.os is os).
    monkeypatch.setattr(os, "fdatasync", counter)
    return counter


async def test_open_creates_the_directory_and_private_keys(tmp_path: Path) -> None:
    root = tmp_path / "a" / "audit"
    log = await AuditLog.open(_config(root))
    await log.record_decision(sample_action(customer="cus_1"), sample_decision())
    await log.close()
    for private in [
        root / "keys" / "checkpoint.pem",
        root / "keys" / "subject-salt",
        *root.glob("subjects/*/*.key"),
    ]:
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    assert len(list(root.glob("subjects/*/*.key"))) == 1
    assert Layout(root).read_meta().origin == log.origin
    assert log.verifier_key.startswith(log.origin + "+")


async def test_a_decision_record_carries_schema_v1(log: AuditLog) -> None:
    approval = ApprovalEvidence(
        "apr_1", "lead@example.com", "2026-11-26T10:00:00Z", arguments_sha256({"order_id": "A-0"})
    )
    action = sample_action(0)
    decision = sample_decision(Effect.REQUIRE_APPROVAL, reasons=("over 100 USD",))
    await log.record_decision(action, decision, approval=approval)
    await log.record_outcome(
        action,
        decision.decision_id,
        Outcome(status=200, latency_ms=12.5, usage=Usage(7, 3)),
        cost=0.0021,
    )
    ref = await log.append("kill_switch", {"agent_id": "support-triage", "engaged": True})
    first, second, third = _records(log.directory)
    assert first.keys() >= SCHEMA_KEYS
    assert first["v"] == 1
    assert first["seq"] == 0
    assert first["kind"] == "decision"
    assert first["time"].endswith("Z")
    assert first["time"][10] == "T"
    assert first["agent"] == {"id": "support-triage", "version": "2026-11-20"}
    assert first["action"]["tool"] == "issue_refund"
    assert first["action"]["arguments"] == {"order_id": "A-0", "amount": 250, "currency": "USD"}
    assert first["action"]["protocol"] == "openai.chat"
    assert first["action"]["stage"] == "proposed"
    assert first["decision"]["id"] == decision.decision_id
    assert first["decision"]["effect"] == "require_approval"
    assert first["decision"]["reasons"] == ["over 100 USD"]
    assert first["decision"]["bundle_revision"] == "rev-1"
    assert first["approval"]["approver"] == "lead@example.com"
    assert first["prev"] == "0" * 64
    assert second["outcome"] == {
        "status": 200,
        "latency_ms": 12.5,
        "tokens": {"input": 7, "output": 3, "cached_input": 0},
        "cost": 0.0021,
        "error": None,
        "is_error": False,
        "result": None,
        "result_sha256": None,
        "redacted": [],
    }
    assert second["decision_id"] == decision.decision_id
    assert third["kind"] == "kill_switch"
    assert third["body"]["engaged"] is True
    assert ref.seq == 2
    assert ref.id == third["id"]
    assert log.size == 3


async def test_records_chain_and_verify(log: AuditLog) -> None:
    await fill(log, 25)
    records = list(iter_records(log.directory))
    for (_, before), (_, after) in zip(records, records[1:], strict=False):
        assert orjson.loads(after)["prev"] == leaf_hash(before).hex()
    assert await log.checkpoint() is not None
    report = verify_log(log.directory)
    assert report.ok, report.damage
    assert report.records == 25
    assert report.latest_checkpoint == 25


async def test_credentials_never_reach_the_disk(tmp_path: Path) -> None:
    log = await AuditLog.open(_config(tmp_path))
    action = sample_action(
        arguments={"url": "https://api.example.com", "api_key": "sk-live-SECRET1"},
        headers={"Authorization": "Bearer sk-live-SECRET2", "x-api-key": "sk-live-SECRET3"},
    )
    await log.record_decision(action, sample_decision())
    await log.append("note", {"nested": {"password": "sk-live-SECRET4"}})
    await log.close()
    assert not _files_containing(tmp_path, b"sk-live-SECRET")


async def test_a_record_is_durable_before_the_call_returns(
    log: AuditLog, syncs: SyncCounter
) -> None:
    await log.record_decision(sample_action(), sample_decision())
    assert syncs.calls == 1
    assert len(_records(log.directory)) == 1


async def test_concurrent_appends_share_fsyncs(log: AuditLog, syncs: SyncCounter) -> None:
    async def writer(n: int) -> None:
        for i in range(10):
            await log.record_decision(sample_action(n * 100 + i), sample_decision())

    await asyncio.gather(*(writer(n) for n in range(64)))
    assert log.size == 640
    assert syncs.calls < 640 / 4, f"{syncs.calls} fsyncs for 640 records: no group commit"
    assert verify_log(log.directory).ok


async def test_records_appended_in_one_loop_pass_share_one_fsync(
    log: AuditLog, syncs: SyncCounter
) -> None:
    # The batch starts on the next loop pass, not at the first record: a burst
    # of decisions taken in one pass costs one fsync, however it began.
    await asyncio.gather(
        *(log.record_decision(sample_action(n), sample_decision()) for n in range(32))
    )
    assert syncs.calls == 1
    assert log.size == 32


async def test_followers_get_each_batch_in_order_after_its_appenders_resume(
    log: AuditLog,
) -> None:
    # A follower (the drift monitor) is nobody's answer: the appenders a batch
    # releases run on before it, so a request never waits for the monitor.
    seen: list[tuple[int, int, bool]] = []
    resumed = [False]
    log.follow(lambda first, records: seen.append((first, len(records), resumed[0])))
    await log.record_decision(sample_action(1), sample_decision())
    resumed[0] = True
    assert seen == []
    await asyncio.gather(
        *(log.record_decision(sample_action(n), sample_decision()) for n in range(2, 5))
    )
    await asyncio.sleep(0)
    assert seen == [(0, 1, True), (1, 3, True)]


async def test_a_failed_fsync_fails_the_log_closed_for_good(
    log: AuditLog, syncs: SyncCounter
) -> None:
    await log.record_decision(sample_action(), sample_decision())
    syncs.fail = True
    results = await asyncio.gather(
        *(log.record_decision(sample_action(i), sample_decision()) for i in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, AuditError) for r in results)
    # Agents are told this: the OS error and the log's paths stay in Warden's log.
    assert not [r for r in results if "Input/output" in str(r) or str(log.directory) in str(r)]
    assert not log.writable
    calls = syncs.calls
    syncs.fail = False  # even a healed disk gets no silent retry
    with pytest.raises(AuditError, match="not writable"):
        await log.record_decision(sample_action(), sample_decision())
    with pytest.raises(AuditError):
        await log.append("note", {})
    with pytest.raises(AuditError):
        await log.checkpoint()
    assert syncs.calls == calls
    assert log.size == 1


async def test_restart_continues_the_chain_and_checkpoints(tmp_path: Path) -> None:
    for round_ in range(3):
        log = await AuditLog.open(_config(tmp_path, segment_max_bytes=4096))
        assert log.size == round_ * 15
        await fill(log, 15)
        await log.close()
    report = verify_log(tmp_path)
    assert report.ok, report.damage
    assert report.records == 45
    assert report.checkpoints == 3
    assert report.segments > 3
    assert [r["seq"] for r in _records(tmp_path)] == list(range(45))


async def test_segments_rotate_by_size(tmp_path: Path) -> None:
    log = await AuditLog.open(_config(tmp_path, segment_max_bytes=4096))
    for i in range(40):
        await log.record_decision(sample_action(i), sample_decision())
    await log.close()
    segs = read_segments(tmp_path)
    assert len(segs) >= 8
    assert all(s.path.stat().st_size <= 4096 + 2048 for s in segs)
    assert verify_log(tmp_path).ok


async def test_one_writer_per_directory(log: AuditLog) -> None:
    with pytest.raises(AuditError, match="another process"):
        await AuditLog.open(_config(log.directory))


async def test_a_torn_tail_is_cut_off_with_a_copy_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = await AuditLog.open(_config(tmp_path))
    await fill(log, 5)
    await log.close()
    seg = read_segments(tmp_path)[-1].path
    whole = seg.read_bytes()
    torn = segments_module.frame(b'{"seq":5,"half":"writ')[:-7]
    seg.write_bytes(whole + torn)
    assert verify_log(tmp_path).damage[0].kind == "torn"
    with caplog.at_level(logging.WARNING, logger="warden.audit"):
        log = await AuditLog.open(_config(tmp_path))
    assert "torn last frame" in caplog.text
    assert seg.read_bytes() == whole
    copies = list((tmp_path / "torn").iterdir())
    assert len(copies) == 1
    assert copies[0].read_bytes() == torn
    await fill(log, 3)
    await log.close()
    report = verify_log(tmp_path)
    assert report.ok
    assert report.records == 8


async def test_the_live_segment_has_room_written_ahead_and_a_crash_leaves_only_zeros(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "live"
    log = await AuditLog.open(_config(root))
    await fill(log, 5)
    seg = read_segments(root)[-1].path
    length = seg.stat().st_size
    # Zeros ahead of the records: a batch's sync overwrites room the file has.
    assert length >= segments_module.PREALLOCATE
    await fill(log, 5)
    assert seg.stat().st_size == length
    # What a crash leaves: the live segment as it is, zeros after the records.
    crash = tmp_path / "crash"
    shutil.copytree(root, crash)
    assert seg.read_bytes().endswith(bytes(64))
    report = verify_log(crash)
    assert report.ok, report.damage
    assert report.records == 10
    assert [r["seq"] for r in _records(crash)] == list(range(10))
    with caplog.at_level(logging.WARNING, logger="warden.audit"):
        reopened = await AuditLog.open(_config(crash))
    assert "torn" not in caplog.text
    assert not (crash / "torn").exists(), "zeros written ahead are not a torn record"
    await fill(reopened, 3)
    await reopened.close()
    report = verify_log(crash)
    assert report.ok, report.damage
    assert report.records == 14  # and the log_recovered record naming what it took on
    # Closed, a segment ends with its last record.
    assert not read_segments(crash)[-1].path.read_bytes().endswith(b"\0")
    await log.close()
    assert not seg.read_bytes().endswith(b"\0")
    assert verify_log(root).records == 10


async def test_a_torn_frame_in_the_room_ahead_is_cut_and_kept_without_the_zeros(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "live"
    log = await AuditLog.open(_config(root))
    await fill(log, 5)
    crash = tmp_path / "crash"
    shutil.copytree(root, crash)
    await log.close()
    seg = read_segments(crash)[-1].path
    data = seg.read_bytes()
    end = len(data.rstrip(b"\0"))  # a record's JSON never ends in a zero byte
    torn = segments_module.frame(b'{"seq":5,"half":"writ')[:-7]
    seg.write_bytes(data[:end] + torn + data[end + len(torn) :])  # written into the room
    assert verify_log(crash).damage[0].kind == "torn"
    with caplog.at_level(logging.WARNING, logger="warden.audit"):
        reopened = await AuditLog.open(_config(crash))
    assert "torn last frame" in caplog.text
    # Cut back to the last whole record, then the log_recovered record naming the range.
    assert seg.read_bytes().startswith(data[:end])
    copies = list((crash / "torn").iterdir())
    assert [c.read_bytes() for c in copies] == [torn]
    await fill(reopened, 3)
    await reopened.close()
    report = verify_log(crash)
    assert report.ok, report.damage
    assert report.records == 9  # and the log_recovered record


async def test_damage_in_the_middle_is_not_mistaken_for_a_torn_tail(tmp_path: Path) -> None:
    log = await AuditLog.open(_config(tmp_path))
    await fill(log, 6)
    await log.close()
    seg = read_segments(tmp_path)[-1].path
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(AuditError, match="valid records after it"):
        await AuditLog.open(_config(tmp_path))
    assert not (tmp_path / "torn").exists(), "nothing may be cut off"


async def test_checkpoints_are_signed_on_an_interval(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=0.05))
    await fill(log, 4)
    for _ in range(100):
        if (tmp_path / "checkpoint").exists():
            break
        await asyncio.sleep(0.02)
    assert (tmp_path / "checkpoint").read_text().split("\n")[1] == "4"
    await fill(log, 2)
    await log.close()
    report = verify_log(tmp_path)
    assert report.ok
    assert report.checkpoints == 2
    assert report.latest_checkpoint == 6


@pytest.mark.parametrize("policy", ["batch", "never"])
async def test_other_fsync_policies(
    tmp_path: Path, syncs: SyncCounter, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than the shipped 50 ms, so a loaded machine writing the 20 records does not
    # see the timer's sync among them.
    monkeypatch.setattr(log_module, "BATCH_SYNC_INTERVAL_S", 0.5)
    log = await AuditLog.open(_config(tmp_path, fsync=policy))
    opened = syncs.calls  # creating the first segment syncs its header
    await fill(log, 20)
    assert syncs.calls == opened, "records are acknowledged before any fsync"
    # Shipping stops at what a power loss cannot take back.
    assert log.synced_size == (0 if policy == "batch" else log.size)
    await asyncio.sleep(0.8)
    if policy == "batch":
        assert 1 <= syncs.calls - opened <= 3, "batch syncs on a short timer"
    else:
        assert syncs.calls == opened
    assert log.synced_size == log.size == 20
    before_close = syncs.calls
    await log.close()
    assert syncs.calls > before_close or policy == "batch"  # the checkpoint syncs first
    assert verify_log(tmp_path).ok


async def test_append_validates_its_kind(log: AuditLog) -> None:
    for kind in ("decision", "outcome", "Bad Kind", "", "note\n"):
        with pytest.raises(ValueError, match="invalid record kind"):
            await log.append(kind, {})
    with pytest.raises(AuditError, match="cannot be encoded"):
        await log.append("note", {"not json": {1, 2}})
    assert log.writable
    assert (await log.append("note", {"when": "now"})).seq == 0


async def test_an_oversized_record_is_refused_without_harming_the_log(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("warden.audit.log.MAX_RECORD_BYTES", 2000)
    with pytest.raises(AuditError, match="over the limit"):
        await log.record_decision(sample_action(arguments={"blob": "x" * 5000}), sample_decision())
    assert log.writable
    await log.record_decision(sample_action(), sample_decision())
    assert [r["seq"] for r in _records(log.directory)] == [0]


async def test_redactions_apply_to_the_outcome_too(log: AuditLog) -> None:
    action = sample_action(arguments={"email": "ann@example.com", "amount": 5})
    decision = sample_decision(redact=("email", "result.email"))
    await log.record_decision(action, decision)
    result = '{"email": "ann@example.com", "status": "refunded"}'
    await log.record_outcome(action, decision.decision_id, Outcome(status=200, result=result))
    raw = b"".join(p for _, p in iter_records(log.directory))
    assert b"ann@example.com" not in raw
    first, second = _records(log.directory)
    assert first["action"]["arguments"]["amount"] == 5
    assert orjson.loads(second["outcome"]["result"])["status"] == "refunded"


async def test_personal_fields_are_sealed_per_subject_and_erasable(log: AuditLog) -> None:
    action = sample_action(arguments={"email": "ann@example.com"}, customer="cus_ann")
    decision = sample_decision()
    await log.record_decision(action, decision)
    await log.record_outcome(action, decision.decision_id, Outcome(status=200, result="Hi Ann"))
    await log.record_decision(sample_action(customer="cus_bob"), sample_decision())
    await log.checkpoint()
    raw = b"".join(p for _, p in iter_records(log.directory))
    assert b"ann@example.com" not in raw
    assert b"cus_ann" not in raw
    assert b"Hi Ann" not in raw
    keys = SubjectKeys.open(log.directory, create=False)
    ann_decision, ann_outcome, bob = _records(log.directory)
    assert ann_decision["subject"] == log.subject_ref("cus_ann")
    assert ann_decision["action"]["arguments"] is None
    assert ann_decision["sealed"]["fields"] == ["action.arguments", "action.context"]
    assert keys.unseal(ann_decision) == {
        "action.arguments": {"email": "ann@example.com"},
        "action.context": {"session_id": "sess-0", "customer_id": "cus_ann"},
    }
    assert keys.unseal(ann_outcome) == {"outcome.result": "Hi Ann"}

    assert await log.erase_subject("cus_ann") is True
    assert keys.unseal(ann_decision) is None
    assert keys.unseal(ann_outcome) is None
    assert keys.unseal(bob) is not None
    erasure = _records(log.directory)[-1]
    assert erasure["kind"] == "erasure"
    assert erasure["body"]["subject"] == ann_decision["subject"]
    assert await log.erase_subject("cus_ann") is False
    await log.checkpoint()
    report = verify_log(log.directory)
    assert report.ok, report.damage


async def test_erasure_reaches_other_stores_and_records_what_they_erased(log: AuditLog) -> None:
    seen: list[SubjectMatch] = []

    async def eraser(match: SubjectMatch) -> dict[str, int]:
        seen.append(match)
        return {"call_links": 2 if match.names(context={"customer_id": "cus_ann"}) else 0}

    log.on_erase(eraser)
    await log.record_decision(sample_action(customer="cus_ann"), sample_decision())
    erasure = await log.erase("cus_ann")
    assert erasure == Erasure(log.subject_ref("cus_ann"), True, {"call_links": 2})
    assert seen[0].refs == {log.subject_ref("cus_ann")}
    record = _records(log.directory)[-1]
    assert record["body"] == {
        "subject": log.subject_ref("cus_ann"),
        "key_destroyed": True,
        "state": {"call_links": 2},
    }


async def test_an_erasure_the_state_store_missed_is_finished_at_a_checkpoint(
    tmp_path: Path,
) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit"), checkpoint_interval_s=0.05))
    down = True

    async def eraser(match: SubjectMatch) -> dict[str, int]:
        if down:
            raise ConnectionError("the state store is down")
        return {"approvals": 1}

    log.on_erase(eraser)
    try:
        await log.record_decision(sample_action(customer="cus_ann"), sample_decision())
        erasure = await log.erase("cus_ann")
        assert erasure.key_destroyed
        assert erasure.state is None
        keys = SubjectKeys.open(log.directory, create=False)
        assert keys.noted_erasures() == {erasure.subject: True}
        await asyncio.sleep(0.2)  # checkpoints try again, and record nothing meanwhile
        assert [r["body"]["state"] for r in _records(log.directory)[1:]] == [None]
        down = False
        for _ in range(100):
            if keys.noted_erasures() == {}:
                break
            await asyncio.sleep(0.02)
        bodies = [r["body"] for r in _records(log.directory) if r["kind"] == "erasure"]
        assert bodies[-1] == {
            "subject": erasure.subject,
            "key_destroyed": True,
            "state": {"approvals": 1},
        }
        assert len(bodies) == 2
    finally:
        await log.close()


async def test_a_running_log_finishes_an_erasure_the_cli_noted(tmp_path: Path) -> None:
    """The subject's key was never loaded by this process: only the note tells it."""
    root = tmp_path / "audit"
    first = await AuditLog.open(_config(root))
    await first.record_decision(sample_action(customer="cus_ann"), sample_decision())
    await first.close()
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=0.05))
    called: list[SubjectMatch] = []

    async def eraser(match: SubjectMatch) -> dict[str, int]:
        called.append(match)
        return {}

    log.on_erase(eraser)
    try:
        keys = SubjectKeys.open(root, create=False)
        ref = keys.ref("cus_ann")
        keys.note_erasure(ref, keys.erase(ref))  # what `warden audit erase` does meanwhile
        for _ in range(100):
            if called and keys.noted_erasures() == {}:
                break
            await asyncio.sleep(0.02)
        assert [m.refs for m in called] == [{ref}]
        erasure = _records(root)[-1]
        assert erasure["kind"] == "erasure"
        assert erasure["body"] == {"subject": ref, "key_destroyed": True, "state": {}}
    finally:
        await log.close()


async def test_noted_erasures_wait_for_the_erasers_a_starting_warden_expects(
    tmp_path: Path,
) -> None:
    """Checkpoints while the stores are still opening leave the note, not a record of
    an erasure that reached nothing beyond the log."""
    root = tmp_path / "audit"
    first = await AuditLog.open(_config(root))
    await first.record_decision(sample_action(customer="cus_ann"), sample_decision())
    await first.close()
    keys = SubjectKeys.open(root, create=False)
    ref = keys.ref("cus_ann")
    keys.note_erasure(ref, keys.erase(ref))
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=0.05))
    log.expect_erasers()
    try:
        await asyncio.sleep(0.3)  # several checkpoints
        assert keys.noted_erasures() == {ref: True}
        assert [r for r in _records(root) if r["kind"] == "erasure"] == []

        async def eraser(match: SubjectMatch) -> dict[str, int]:
            return {"call_links": 1}

        log.on_erase(eraser)
        for _ in range(100):
            if keys.noted_erasures() == {}:
                break
            await asyncio.sleep(0.02)
        (erasure,) = [r for r in _records(root) if r["kind"] == "erasure"]
        assert erasure["body"]["state"] == {"call_links": 1}
    finally:
        await log.close()


async def test_sealed_fields_are_bound_to_their_record(log: AuditLog) -> None:
    await log.record_decision(sample_action(customer="cus_1"), sample_decision())
    await log.record_decision(sample_action(customer="cus_1"), sample_decision())
    first, second = _records(log.directory)
    moved = {**second, "sealed": first["sealed"]}
    assert SubjectKeys.open(log.directory, create=False).unseal(moved) is None


async def test_close_is_final_and_idempotent(tmp_path: Path) -> None:
    log = await AuditLog.open(_config(tmp_path))
    await fill(log, 3)
    await log.close()
    await log.close()
    assert not log.writable
    with pytest.raises(AuditError, match="closed"):
        await log.record_decision(sample_action(), sample_decision())
    assert not Layout(tmp_path).is_locked()


async def test_the_pipeline_records_through_the_log(log: AuditLog) -> None:
    sink: AuditSink = log
    pipeline = Pipeline([], sink, mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write")
    decision = await pipeline.decide(sample_action())
    await pipeline.outcome(sample_action(), decision.decision_id, Outcome(status=200))
    kinds = [r["kind"] for r in _records(log.directory)]
    assert kinds == ["decision", "outcome"]
    assert _records(log.directory)[0]["decision"]["effect"] == "deny"


async def test_close_writes_records_still_queued(tmp_path: Path) -> None:
    log = await AuditLog.open(_config(tmp_path))
    first = asyncio.ensure_future(log.append("note", {"n": 1}))
    await asyncio.sleep(0)  # the first record's batch is on the I/O thread...
    outcome = asyncio.ensure_future(
        log.record_outcome(sample_action(), "dec_x", Outcome(status=200))
    )
    await asyncio.sleep(0)  # ...and an outcome waits behind it, not yet in any batch
    await log.close()
    assert [r["kind"] for r in _records(tmp_path)] == ["note", "outcome"]
    assert (await first).seq == 0
    await outcome
