"""RFC 6962 trees and proofs: the shared conformance vectors, then our own trees."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parents[2] / ".." / "shared" / "testdata" / "merkle"


def _vectors() -> list[Path]:
    return sorted(VECTORS.rglob("*.json")) if VECTORS.is_dir() else []


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _run(case: dict[str, Any]) -> bool:
    proof = [_b64(p) for p in case["proof"] or []]
    if "leafIdx" in case:
        return verify_inclusion(
            _b64(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, _b64(case["root"])
        )
    return verify_consistency(
        case["size1"], case["size2"], proof, _b64(case["root1"]), _b64(case["root2"])
    )


@pytest.mark.skipif(
    not VECTORS.is_dir(), reason=f"test vectors not found at {VECTORS} (shared/ beside the repo)"
)
def test_every_conformance_vector() -> None:
    files = _vectors()
    assert len(files) >= 150, "the vector folder looks incomplete"
    wrong = []
    kinds = {"inclusion": 0, "consistency": 0}
    for path in files:
        case = json.loads(path.read_text())
        kinds["inclusion" if "leafIdx" in case else "consistency"] += 1
        if _run(case) == case["wantErr"]:
            wrong.append(f"{path.relative_to(VECTORS)}: {case['desc']}")
    assert not wrong, "\n".join(wrong)
    assert kinds["inclusion"] > 50
    assert kinds["consistency"] > 50


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_known_roots() -> None:
    assert root_of([]) == EMPTY_ROOT
    leaves = _leaves(3)
    assert root_of(leaves) == node_hash(node_hash(leaves[0], leaves[1]), leaves[2])
    # RFC 6962 test data: the root of the 8 leaves used by every implementation.
    data = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    root = root_of([leaf_hash(d) for d in data])
    assert base64.b64encode(root).decode() == "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="


def test_tree_compact_range_and_proofs_agree_for_every_size() -> None:
    leaves = _leaves(33)
    tree = MerkleTree(leaves)
    compact = CompactRange()
    for n in range(1, 34):
        compact.append(leaves[n - 1])
        assert compact.size == n
        assert compact.root() == tree.root(n) == root_of(leaves[:n])
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            assert verify_consistency(m, n, proof, tree.root(m), tree.root(n))
            assert not verify_consistency(m, n, proof, bytes(32), tree.root(n))
        for i in range(n):
            proof = tree.inclusion_proof(i, n)
            assert verify_inclusion(leaves[i], i, n, proof, tree.root(n))
            if n > 1:
                assert not verify_inclusion(leaves[i], (i + 1) % n, n, proof, tree.root(n))


def test_compact_range_restores_from_its_hashes() -> None:
    leaves = _leaves(21)
    full = CompactRange()
    for leaf in leaves[:13]:
        full.append(leaf)
    restored = CompactRange(full.size, full.hashes)
    for leaf in leaves[13:]:
        full.append(leaf)
        restored.append(leaf)
    assert restored.root() == full.root() == root_of(leaves)
    with pytest.raises(ValueError, match="needs 3 hashes"):
        CompactRange(13, full.hashes[:1])


def test_tree_rejects_sizes_it_cannot_prove() -> None:
    tree = MerkleTree(_leaves(4))
    with pytest.raises(ValueError, match="beyond"):
        tree.root(5)
    with pytest.raises(ValueError, match="not in a tree"):
        tree.inclusion_proof(4, 4)
    with pytest.raises(ValueError, match="no consistency proof"):
        tree.consistency_proof(0, 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.data())
def test_any_changed_proof_is_rejected(n: int, data: st.DataObject) -> None:
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = tree.inclusion_proof(i, n)
    root = tree.root(n)
    assert verify_inclusion(leaves[i], i, n, proof, root)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = list(proof)
        bad[k] = bytes(b ^ (1 << (bit % 8)) if j == bit // 8 else b for j, b in enumerate(bad[k]))
        assert not verify_inclusion(leaves[i], i, n, bad, root)
        assert not verify_inclusion(leaves[i], i, n, proof[:-1], root)
        assert not verify_inclusion(leaves[i], i, n, [*proof, root], root)
    m = data.draw(st.integers(1, n))
    cproof = tree.consistency_proof(m, n)
    assert verify_consistency(m, n, cproof, tree.root(m), root)
    if cproof:
        assert not verify_consistency(m, n, cproof[1:], tree.root(m), root)


@given(
    st.one_of(st.none(), st.binary(), st.integers(), st.text()),
    st.one_of(st.none(), st.integers(-5, 5), st.booleans(), st.text()),
    st.one_of(st.none(), st.integers(-5, 5), st.floats()),
    st.one_of(st.none(), st.lists(st.one_of(st.binary(), st.none(), st.integers()))),
    st.one_of(st.none(), st.binary(), st.text()),
)
def test_verifiers_never_raise(a: Any, b: Any, c: Any, d: Any, e: Any) -> None:
    assert verify_inclusion(a, b, c, d, e) in (True, False)
    assert verify_consistency(b, c, d, a, e) in (True, False)
