"""Inclusion proofs of a log's records for the console, checked against signed checkpoints."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from warden.audit.layout import Layout
from warden.audit.log import AuditLog
from warden.audit.merkle import leaf_hash, verify_inclusion
from warden.config import AuditConfig
from warden.console.proofs import ProofError, ProofSource
from warden.testing.audit import fill, read_segments, rewrite


async def write_log(root: Path, count: int, *, checkpoint: bool = True) -> int:
    log = await AuditLog.open(AuditConfig(dir=str(root)))
    try:
        await fill(log, count)
        if checkpoint:
            await log.checkpoint()
        size = log.size
    finally:
        await log.close()
    return size


def source(root: Path) -> ProofSource:
    return ProofSource(root, Layout(root).verifier())


async def test_every_record_proves_against_the_signed_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    size = await write_log(root, 21)
    proofs = source(root)
    assert proofs.latest_checkpoint_size() == size
    for seq in (0, 7, size - 1):
        got = proofs.prove(seq, size)
        assert got.tree_size == size
        assert leaf_hash(got.record) == got.leaf
        assert verify_inclusion(got.leaf, seq, size, list(got.path), got.root)
        body = got.to_json()
        assert base64.b64decode(body["record_b64"]) == got.record
        assert body["checkpoint"].startswith(Layout(root).read_meta().origin)
        assert body["verifier_key"] == Layout(root).verifier().vkey


async def test_records_past_the_checkpoint_and_unknown_records_have_no_proof(
    tmp_path: Path,
) -> None:
    root = tmp_path / "audit"
    size = await write_log(root, 4)
    proofs = source(root)
    with pytest.raises(ProofError, match="no signed checkpoint covers record 4"):
        proofs.prove(size, size + 1)
    with pytest.raises(ProofError, match="covers record -1"):
        proofs.prove(-1, size)
    empty = tmp_path / "empty"
    await write_log(empty, 0, checkpoint=False)
    assert source(empty).latest_checkpoint_size() == 0
    with pytest.raises(ProofError, match="no signed checkpoint yet"):
        source(empty).prove(0, 0)


async def test_a_log_changed_after_its_checkpoint_gives_no_proof(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    size = await write_log(root, 6)
    records = [r for seg in read_segments(root) for r in seg.records]
    records[2] = records[2].replace(b'"amount":250', b'"amount":251')
    rewrite(root, records, per_segment=len(records))
    with pytest.raises(ProofError, match="does not match its checkpoint"):
        source(root).prove(1, size)
