"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification.

Leaves are ``SHA-256(0x00 || record bytes)`` and interior nodes
``SHA-256(0x01 || left || right)``; the tree of ``n`` leaves splits at the
largest power of two below ``n``. Three pieces live here:

* :class:`CompactRange`: the O(log n) state a writer needs to append leaves and
  compute the root (the "right edge" of perfect subtrees);
* :class:`MerkleTree`: all leaf hashes of a log, for producing inclusion and
  consistency proofs offline (``warden audit proof``, ``export``);
* :func:`verify_inclusion` and :func:`verify_consistency`: the RFC 9162
  verification algorithms, which take bytes and never raise on bad input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

# The verifiers live in the standalone script shipped with evidence packages,
# so Warden and auditors run the very same code.
from warden.audit.verify_evidence import node_hash, verify_consistency, verify_inclusion

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree: the hash of the empty string (RFC 9162 §2.1.1)."""

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """The leaf hash of one record's stored bytes: ``SHA-256(0x00 || data)``."""
    h = _sha256(b"\x00")
    h.update(data)
    return h.digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """The tree head of ``leaves`` (leaf hashes) by the RFC's recursive definition.

    Quadratic-free but recursive: meant for tests and small trees; writers use
    :class:`CompactRange`.
    """
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


class CompactRange:
    """The right edge of a growing tree: one hash per set bit of its size.

    ``append`` is amortised one node hash per leaf; ``root`` folds the edge
    from the right. The edge, together with the size, is all that is needed
    to continue a log after a restart, so segment headers store it.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        hashes = list(hashes)
        if size < 0 or len(hashes) != size.bit_count():
            raise ValueError(f"a compact range of size {size} needs {size.bit_count()} hashes")
        if any(len(h) != HASH_SIZE for h in hashes):
            raise ValueError("compact range hashes must be 32 bytes")
        self._size = size
        self._hashes = hashes

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The perfect-subtree roots, largest (leftmost) first."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash."""
        stack = self._hashes
        h = leaf
        n = self._size
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self._size += 1

    def root(self) -> bytes:
        """The tree head for the current size."""
        stack = self._hashes
        if not stack:
            return EMPTY_ROOT
        h = stack[-1]
        for left in reversed(stack[:-1]):
            h = _sha256(b"\x01" + left + h).digest()
        return h

    def copy(self) -> CompactRange:
        """An independent copy."""
        return CompactRange(self._size, self._hashes)


class MerkleTree:
    """Every leaf hash of a log, with proofs for any size up to the number of leaves.

    Levels are kept as flat ``bytearray`` buffers (32 bytes per node) so a
    million records cost about 64 MB. Only complete pairs are stored per
    level; the hashes of the ragged right edge are computed on demand.
    """

    __slots__ = ("_cache", "_levels")

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._cache: dict[tuple[int, int], bytes] = {}
        for leaf in leaves:
            self.append(leaf)

    def __len__(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash, completing any pairs it closes."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("leaf hashes must be 32 bytes")
        self._cache.clear()
        h = leaf
        level = 0
        while True:
            buf = self._levels[level]
            buf += h
            count = len(buf) // HASH_SIZE
            if count % 2:
                return
            h = node_hash(bytes(buf[-2 * HASH_SIZE : -HASH_SIZE]), h)
            level += 1
            if level == len(self._levels):
                self._levels.append(bytearray())

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        return bytes(self._levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]); a perfect aligned subtree is read from its level."""
        width = end - start
        if width & (width - 1) == 0 and start % width == 0:
            level = width.bit_length() - 1
            offset = (start >> level) * HASH_SIZE
            return bytes(self._levels[level][offset : offset + HASH_SIZE])
        key = (start, end)
        cached = self._cache.get(key)
        if cached is None:
            k = _split(width)
            cached = node_hash(self._hash(start, start + k), self._hash(start + k, end))
            self._cache[key] = cached
        return cached

    def root(self, size: int | None = None) -> bytes:
        """The tree head at ``size`` leaves (default: all of them)."""
        size = len(self) if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1)."""
        size = len(self) if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of size {size}")
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self._hash(start + k, end))
                end = start + k
            else:
                proof.append(self._hash(start, start + k))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """Proof that the ``size1`` tree is a prefix of the ``size2`` one (RFC 9162 §2.1.4.1)."""
        size2 = len(self) if size2 is None else size2
        self._check_size(size2)
        if not 0 < size1 <= size2:
            raise ValueError(f"no consistency proof from size {size1} to {size2}")
        proof: list[bytes] = []
        self._subproof(size1, 0, size2, True, proof)
        return proof

    def _subproof(self, m: int, start: int, end: int, complete: bool, out: list[bytes]) -> None:
        n = end - start
        if m == n:
            if not complete:
                out.append(self._hash(start, end))
            return
        k = _split(n)
        if m <= k:
            self._subproof(m, start, start + k, complete, out)
            out.append(self._hash(start + k, end))
        else:
            self._subproof(m - k, start + k, end, False, out)
            out.append(self._hash(start, start + k))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= len(self):
            raise ValueError(f"tree size {size} is beyond the {len(self)} leaves known")
