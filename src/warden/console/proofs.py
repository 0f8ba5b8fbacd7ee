"""Inclusion proofs for records of a running log, for the page to verify itself.

The tree of leaf hashes is kept in memory and extended as the log grows
(32 bytes a record), read through :class:`~warden.audit.tail.RecordTail`, so
only whole, written records are ever read. A proof is against the latest
signed checkpoint: the server checks the checkpoint's signature and that the
tree matches its root, and hands the browser everything to check the proof
again on its own (the record's stored bytes, the path, the signed note and
the verifier key). Blocking I/O: call from a thread.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden.audit.checkpoint import Checkpoint, NoteError, NoteVerifier
from warden.audit.layout import Layout
from warden.audit.merkle import MerkleTree, leaf_hash, verify_inclusion
from warden.audit.tail import RecordTail

__all__ = ["ProofError", "ProofSource", "RecordProof"]


class ProofError(Exception):
    """No proof can be given (unknown record, no checkpoint yet, log and checkpoint disagree)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True, slots=True)
class RecordProof:
    """A record's stored bytes and its inclusion proof in a signed checkpoint."""

    seq: int
    record: bytes
    leaf: bytes
    tree_size: int
    root: bytes
    path: tuple[bytes, ...]
    checkpoint: str
    verifier_key: str

    def to_json(self) -> dict[str, Any]:
        """What the page's script verifies (hashes and bytes in base64)."""
        return {
            "seq": self.seq,
            "record_b64": _b64(self.record),
            "leaf_hash": _b64(self.leaf),
            "tree_size": self.tree_size,
            "root": _b64(self.root),
            "proof": [_b64(p) for p in self.path],
            "checkpoint": self.checkpoint,
            "verifier_key": self.verifier_key,
        }


class ProofSource:
    """Leaf hashes of one log, read incrementally, and proofs against its checkpoints."""

    def __init__(self, root: Path | str, verifier: NoteVerifier) -> None:
        self._root = Path(root)
        self._layout = Layout(self._root)
        self._verifier = verifier
        self._tree = MerkleTree()
        self._tail = RecordTail(self._root, 0)
        self._lock = threading.Lock()

    def _extend(self, size: int) -> None:
        while len(self._tree) < size:
            batch = self._tail.read(size, 4096)
            if not batch:
                break
            for rec in batch:
                self._tree.append(leaf_hash(rec.payload))

    def latest_checkpoint(self) -> Checkpoint | None:
        """The latest signed checkpoint, its signature checked; ``None`` when there is none."""
        path = self._layout.latest_checkpoint
        if not path.exists():
            return None
        try:
            return Checkpoint.open(path.read_text(encoding="utf-8"), self._verifier)
        except (NoteError, OSError) as exc:
            raise ProofError(f"the latest checkpoint does not verify: {exc}") from None

    def latest_checkpoint_size(self) -> int:
        """How many records the latest signed checkpoint covers (0 when there is none)."""
        found = self.latest_checkpoint()
        return 0 if found is None else found.size

    def prove(self, seq: int, written: int) -> RecordProof:
        """The proof of record ``seq`` in the latest checkpoint (``written``: records on disk)."""
        note_path = self._layout.latest_checkpoint
        with self._lock:
            try:
                note = note_path.read_text(encoding="utf-8")
                checkpoint = Checkpoint.open(note, self._verifier)
            except FileNotFoundError:
                raise ProofError("the log has no signed checkpoint yet") from None
            except (NoteError, OSError) as exc:
                raise ProofError(f"the latest checkpoint does not verify: {exc}") from None
            if not 0 <= seq < checkpoint.size:
                raise ProofError(f"no signed checkpoint covers record {seq} yet")
            if checkpoint.size > written:
                raise ProofError("the checkpoint is larger than the log; run warden audit verify")
            self._extend(checkpoint.size)
            if len(self._tree) < checkpoint.size:
                raise ProofError("the log is shorter than its checkpoint; run warden audit verify")
            root = self._tree.root(checkpoint.size)
            if root != checkpoint.root:
                raise ProofError("the log does not match its checkpoint; run warden audit verify")
            path = tuple(self._tree.inclusion_proof(seq, checkpoint.size))
            leaf = self._tree.leaf(seq)
            record = RecordTail(self._root, seq).read(seq + 1, 1)[0].payload
        if leaf_hash(record) != leaf or not verify_inclusion(
            leaf, seq, checkpoint.size, list(path), root
        ):
            raise ProofError(f"record {seq} does not verify against the checkpoint")
        return RecordProof(
            seq, record, leaf, checkpoint.size, root, path, note, self._verifier.vkey
        )
