"""`verify` names the first bad record and the kind of damage, for every kind."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from warden.audit import AuditLog
from warden.audit import segments as segments_module
from warden.audit.checkpoint import Checkpoint, NoteSigner, load_signing_key
from warden.audit.layout import Layout
from warden.audit.merkle import EMPTY_ROOT, leaf_hash
from warden.audit.segments import FRAME_HEADER, MAGIC, find_next_frame, frame
from warden.audit.verify import verify_log
from warden.config import AuditConfig
from warden.errors import AuditError
from warden.testing.audit import fill, read_segments, rechain, reencode, rewrite

RECORDS = 30


async def _build(root: Path) -> None:
    log = await AuditLog.open(
        AuditConfig(dir=str(root), checkpoint_interval_s=3600, segment_max_bytes=4096)
    )
    for _ in range(3):  # checkpoints at 10, 20 and 30
        await fill(log, 10)
        await log.checkpoint()
    await log.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "audit"
    asyncio.run(_build(root))
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "audit"
    shutil.copytree(pristine, copy)
    return copy


def _locate(root: Path, seq: int) -> tuple[int, int]:
    """(segment index, record index in it) of record ``seq``."""
    for s, seg in enumerate(read_segments(root)):
        for r, payload in enumerate(seg.records):
            if orjson.loads(payload)["seq"] == seq:
                return s, r
    raise AssertionError(seq)


def _damage(root: Path) -> tuple[str, int | None, str]:
    report = verify_log(root)
    assert not report.ok, "the damage went unnoticed"
    first = report.damage[0]
    return first.kind, first.seq, first.detail


def test_an_intact_log_verifies(root: Path) -> None:
    report = verify_log(root)
    assert report.ok, report.damage
    assert report.records == RECORDS
    assert report.checkpoints == 3
    assert report.segments > 3
    assert report.latest_checkpoint == RECORDS
    assert not report.warnings


def test_edited_bytes_without_reframing(root: Path) -> None:
    s, r = _locate(root, 12)
    seg = read_segments(root)[s]
    data = seg.path.read_bytes()
    at = data.index(seg.records[r]) + 20
    seg.path.write_bytes(data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :])
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("modified", 12)
    assert "checksum" in detail


def test_a_record_edited_and_reframed(root: Path) -> None:
    s, r = _locate(root, 12)
    seg = read_segments(root)[s]
    record = orjson.loads(seg.records[r])
    record["action"]["arguments"] = {"amount": 1}
    seg.records[r] = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    seg.write()
    assert _damage(root)[:2] == ("modified", 12)


def test_the_last_record_of_a_segment_edited(root: Path) -> None:
    seg = read_segments(root)[1]
    last = orjson.loads(seg.records[-1])["seq"]
    seg.records[-1] = reencode(seg.records[-1], time="2020-01-01T00:00:00.000000Z")
    seg.write()
    kind, seq, _ = _damage(root)
    assert (kind, seq) == ("modified", last)


def test_a_tampered_segment_header(root: Path) -> None:
    seg = read_segments(root)[2]
    first = orjson.loads(seg.records[0])["seq"]
    head = orjson.loads(seg.head[len(MAGIC) + 8 :])
    head["range"] = head["range"][::-1] if len(head["range"]) > 1 else ["00" * 32]
    seg.head = MAGIC + frame(orjson.dumps(head))
    seg.write()
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("modified", first)
    assert "segment header does not match" in detail


def test_the_last_record_edited_is_caught_by_the_checkpoint(root: Path) -> None:
    seg = read_segments(root)[-1]
    seg.records[-1] = reencode(seg.records[-1], time="2020-01-01T00:00:00.000000Z")
    seg.write()
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("modified", 20)
    assert "between 20 and 29" in detail


def test_a_deleted_record(root: Path) -> None:
    s, r = _locate(root, 15)
    seg = read_segments(root)[s]
    del seg.records[r]
    seg.write()
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("deleted", 15)
    assert "record 15 missing" in detail


def test_reordered_records(root: Path) -> None:
    s, r = _locate(root, 15)
    seg = read_segments(root)[s]
    if r + 1 == len(seg.records):
        s, r = _locate(root, 14)
        seg = read_segments(root)[s]
    seg.records[r], seg.records[r + 1] = seg.records[r + 1], seg.records[r]
    seg.write()
    kind, seq, _ = _damage(root)
    assert kind == "reordered"
    assert seq in (14, 15)


def test_a_copied_record_inserted(root: Path) -> None:
    s, r = _locate(root, 15)
    seg = read_segments(root)[s]
    seg.records.insert(r + 1, seg.records[r])
    seg.write()
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("inserted", 15)
    assert "two records claim sequence number 15" in detail


def test_a_forged_record_inserted_with_a_valid_prev(root: Path) -> None:
    s, r = _locate(root, 15)
    seg = read_segments(root)[s]
    forged = reencode(seg.records[r], seq=16, prev=leaf_hash(seg.records[r]).hex(), id="rec_x")
    seg.records.insert(r + 1, forged)
    seg.write()
    kind, seq, _ = _damage(root)
    assert (kind, seq) == ("inserted", 16)


def test_a_faithful_rewrite_stays_intact(root: Path) -> None:
    # The forger's tool itself leaves no trace: what the next test finds is the edit.
    rewrite(root, [p for seg in read_segments(root) for p in seg.records], per_segment=4)
    assert verify_log(root).ok


def test_a_rewritten_chain_is_caught_by_the_checkpoints(root: Path) -> None:
    # A forger edits record 14 and recomputes every later prev hash, frame and header.
    flat = [p for seg in read_segments(root) for p in seg.records]
    flat[14] = reencode(flat[14], time="2020-01-01T00:00:00.000000Z")
    flat[14:] = rechain(flat[14:], orjson.loads(flat[14])["prev"])
    rewrite(root, flat, per_segment=4)
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("modified", 10)
    assert "between 10 and 19" in detail


def test_a_truncated_log(root: Path) -> None:
    seg = read_segments(root)[-1]
    keep = len(seg.records) - 2
    seg.records = seg.records[:keep]
    seg.write()
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("truncated", RECORDS - 2)
    assert "covers 30" in detail


def test_a_torn_frame_under_a_signed_checkpoint_is_a_truncation(root: Path) -> None:
    """Checkpoints are signed only over synced records: no crash tears one of them."""
    seg = read_segments(root)[-1]
    data = seg.path.read_bytes()
    seg.path.write_bytes(data[: len(data) - 10])
    kind, seq, detail = _damage(root)
    assert (kind, seq) == ("truncated", RECORDS - 1)
    assert "covers 30" in detail


async def test_a_torn_frame_after_the_last_checkpoint_is_torn(root: Path, tmp_path: Path) -> None:
    """What a crash can leave: a record being written after the last checkpoint, cut short."""
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    await fill(log, 3)
    crash = tmp_path / "crash"
    shutil.copytree(root, crash)  # the directory as a crash leaves it: no closing checkpoint
    await log.close()
    seg = read_segments(crash)[-1]
    last = seg.records[-1]
    seg.records = seg.records[:-1]
    seg.write()
    framed = frame(last)
    seg.path.write_bytes(seg.path.read_bytes() + framed[: len(framed) // 2])  # half written
    kind, seq, _ = _damage(crash)
    assert (kind, seq) == ("torn", RECORDS + 2)


async def test_warden_will_not_continue_a_log_shorter_than_its_checkpoint(root: Path) -> None:
    """Continuing would sign a second history over the same sequence numbers."""
    seg = read_segments(root)[-1]
    seg.records = seg.records[:-3]
    seg.write()
    with pytest.raises(AuditError, match="records were removed"):
        await AuditLog.open(AuditConfig(dir=str(root)))
    assert _damage(root)[0] == "truncated"


def test_a_deleted_segment(root: Path) -> None:
    segs = read_segments(root)
    first_of_third = orjson.loads(segs[2].records[0])["seq"]
    segs[2].path.unlink()
    kind, seq, _ = _damage(root)
    assert (kind, seq) == ("deleted", first_of_third)


def test_a_forged_checkpoint(root: Path) -> None:
    path = Layout(root).checkpoints / f"{20:020d}"
    lines = path.read_text().split("\n")
    lines[2] = "A" * 43 + "="
    path.write_text("\n".join(lines))
    report = verify_log(root)
    assert [d.kind for d in report.damage] == ["checkpoint"]
    assert "does not verify" in report.damage[0].detail


def test_checkpoints_by_another_key(root: Path) -> None:
    origin = Layout(root).read_meta().origin
    stranger = NoteSigner(origin, Ed25519PrivateKey.generate()).verifier
    report = verify_log(root, verifier=stranger)
    assert not report.ok
    assert {d.kind for d in report.damage} == {"checkpoint"}
    assert verify_log(root, verifier=Layout(root).verifier()).ok


def test_an_outside_checkpoint_catches_a_truncation_hidden_locally(
    root: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "kept-checkpoint"
    shutil.copy(Layout(root).latest_checkpoint, kept)
    # The forger drops the last records and the checkpoints that mention them.
    seg = read_segments(root)[-1]
    seg.records = seg.records[:-3]
    seg.write()
    (Layout(root).checkpoints / f"{30:020d}").unlink()
    shutil.copy(Layout(root).checkpoints / f"{20:020d}", Layout(root).latest_checkpoint)
    assert verify_log(root).ok
    report = verify_log(root, extra_checkpoints=[kept])
    assert report.damage[0].kind == "truncated"


def test_a_planted_size_0_checkpoint_does_not_stop_the_others_being_compared(
    root: Path, tmp_path: Path
) -> None:
    # A forger with the key rewrites the chain, drops the directory's checkpoints and
    # signs one of size 0; the auditor's outside checkpoint must still be compared.
    kept = tmp_path / "kept-checkpoint"
    shutil.copy(Layout(root).latest_checkpoint, kept)
    flat = [p for seg in read_segments(root) for p in seg.records]
    flat[4] = reencode(flat[4], time="2020-01-01T00:00:00.000000Z")
    flat[4:] = rechain(flat[4:], orjson.loads(flat[4])["prev"])
    rewrite(root, flat, per_segment=7)
    layout = Layout(root)
    for path in layout.checkpoints.iterdir():
        path.unlink()
    layout.latest_checkpoint.unlink()
    signer = NoteSigner(layout.read_meta().origin, load_signing_key(layout.signing_key))
    empty = Checkpoint(layout.read_meta().origin, 0, EMPTY_ROOT)
    (layout.checkpoints / f"{0:020d}").write_text(signer.sign(empty.text()))
    report = verify_log(root, extra_checkpoints=[kept])
    assert [d.kind for d in report.damage] == ["modified"]
    # A size-0 checkpoint of a log that had records before is compared too.
    assert verify_log(root).ok
    (layout.checkpoints / f"{0:020d}").write_text(
        signer.sign(Checkpoint(layout.read_meta().origin, 0, leaf_hash(b"x")).text())
    )
    assert verify_log(root).damage[0].kind == "modified"


def test_every_sampled_single_bit_flip_is_detected(root: Path) -> None:
    rng = random.Random(4)
    flips = 0
    for seg in read_segments(root):
        data = seg.path.read_bytes()
        positions = {0, 7, 8, 12, 16, len(data) - 1, *rng.sample(range(len(data)), 40)}
        for pos in sorted(positions):
            bit = 1 << rng.randrange(8)
            seg.path.write_bytes(data[:pos] + bytes([data[pos] ^ bit]) + data[pos + 1 :])
            report = verify_log(root)
            assert not report.ok, f"a flip at byte {pos} of {seg.path.name} went unnoticed"
            flips += 1
        seg.path.write_bytes(data)
    assert flips > 200
    assert verify_log(root).ok


def test_crafted_bytes_cannot_make_the_frame_search_run_for_hours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every "{" a candidate claiming the rest of the file: the checksum work is bounded,
    and past the bound the answer is "a frame may follow" (damage, never a torn tail)."""
    size = 4 << 20
    head = frame(b'{"seq":0}')
    data = bytearray(head + b"X" * 16)
    candidate = len(FRAME_HEADER.pack(0, 0)) + 2
    while len(data) + candidate < size:
        data += FRAME_HEADER.pack(size - len(data) - FRAME_HEADER.size, 0) + b'{"'
    data += b"x" * (size - len(data) - 1) + b"}"
    calls = 0
    real = segments_module._crc32

    def counted(chunk: bytes) -> int:
        nonlocal calls
        calls += 1
        return real(chunk)

    monkeypatch.setattr(segments_module, "_crc32", counted)
    assert find_next_frame(bytes(data), len(head)) is not None
    assert calls < 8, "each candidate was checksummed over the rest of the file"
    # A genuine frame after damage is still found.
    genuine = head + b"\xff" * 8 + frame(b'{"seq":1}')
    assert find_next_frame(genuine, len(head)) == len(head) + 8


def _drop_checkpoints(root: Path) -> None:
    layout = Layout(root)
    for path in layout.checkpoints.iterdir():
        path.unlink()
    layout.latest_checkpoint.unlink()


def test_a_key_given_proves_nothing_without_a_checkpoint_it_signed(root: Path) -> None:
    """Every checkpoint deleted: nothing here was signed by the auditor's key, so not intact."""
    verifier = Layout(root).verifier()
    _drop_checkpoints(root)
    plain = verify_log(root)
    assert plain.ok  # no key given: a log without checkpoints yet, warned about
    assert plain.key_from_directory
    assert any("not yet covered by a signed checkpoint" in w for w in plain.warnings)
    report = verify_log(root, verifier=verifier)
    assert [d.kind for d in report.damage] == ["checkpoint"]
    assert "no checkpoint here is signed by the key given" in report.damage[0].detail
    assert (report.key, report.key_from_directory) == (verifier.vkey, False)


def test_a_key_given_must_be_the_key_of_this_log(root: Path) -> None:
    """Another log's directory under log A's key is not log A, checkpoints or none."""
    other = NoteSigner("warden.local/audit/00000000000000aa", Ed25519PrivateKey.generate())
    report = verify_log(root, verifier=other.verifier)
    assert report.damage[0].kind == "checkpoint"
    origin = Layout(root).read_meta().origin
    assert f"log.json says this is log {origin}" in report.damage[0].detail
    _drop_checkpoints(root)
    report = verify_log(root, verifier=other.verifier)
    assert not report.ok
    assert f"log.json says this is log {origin}" in report.damage[0].detail


def test_a_checkpoint_file_named_with_another_digit_is_not_a_checkpoint(root: Path) -> None:
    """A name like "³" passes str.isdigit() but not int(): skipped, never a crash."""
    layout = Layout(root)
    (layout.checkpoints / "\u00b3").write_text("x")
    (layout.checkpoints / "\u0661\u0660").write_text("x")  # Arabic-Indic 10: int() reads it
    assert [p.name for p in layout.checkpoint_files()] == [f"{n:020d}" for n in (10, 20, 30)]
    report = verify_log(root)
    assert report.ok
    assert report.checkpoints == 3
