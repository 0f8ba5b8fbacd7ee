"""Per data subject encryption of personal fields (crypto-shredding).

Each customer id gets its own AES-256-GCM key in ``<audit dir>/subjects/``.
Records name the subject only by a keyed hash (:meth:`SubjectKeys.ref`), and
carry the personal fields as ciphertext in ``sealed``. Erasing a subject
deletes its key file: the ciphertext stays in the log, so every hash, the
chain and the checkpoints still verify, but nobody can read those fields any
more. That is how the log honours GDPR and CCPA erasure while staying
append-only.

Key files are written and fsynced before any record that uses them, by the
log's I/O thread.

Keys are made only for subjects named by configured sources
(``audit.subjects.sources``, see :func:`subject_value`), and at most
``audit.subjects.max_keys`` of them: an agent inventing customer ids cannot
grow the key store without bound. Past the bound the log records those
personal fields redacted, never in plaintext.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from warden.audit import metrics
from warden.audit.layout import fsync_dir
from warden.model import Action

__all__ = ["SEAL_ALG", "UNUSABLE", "SubjectKeys", "subject_value"]

UNUSABLE = object()
"""What :func:`subject_value` returns for a subject it cannot name (not text or a number)."""

SEAL_ALG = "A256GCM"
_SALT_FILE = "subject-salt"
_NONCE_BYTES = 12
_MAX_CACHED = 100_000  # subject keys held in memory


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) with ``data``, durable with its directory entry."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _lookup(value: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def subject_value(action: Action, sources: Sequence[str]) -> str | object | None:
    """The data subject named by the first configured source present in ``action``.

    ``sources`` are ``context.<name>``, ``action.arguments.<path>`` and
    ``agent.claims.<path>``. Text and integers name a subject; ``None`` when
    no source is present (or is empty); :data:`UNUSABLE` for any other value,
    which the log treats as personal data it cannot seal.
    """
    for source in sources:
        root, _, rest = source.partition(".")
        if root == "context":
            found = _lookup(action.context, rest.split("."))
        elif rest.startswith("arguments."):
            found = _lookup(action.arguments, rest.split(".")[1:])
        else:  # agent.claims.<path>
            found = _lookup(action.agent.claims, rest.split(".")[1:])
        if found is None or found == "":
            continue
        if isinstance(found, str) or (isinstance(found, int) and not isinstance(found, bool)):
            return str(found)
        return UNUSABLE
    return None


class SubjectKeys:
    """The key store: one AES-256-GCM key per data subject, found by keyed hash."""

    def __init__(self, root: Path, salt: bytes, *, max_keys: int | None = None) -> None:
        self._root = root
        self._salt = salt
        self._cache: dict[str, AESGCM] = {}
        self._nonces = memoryview(b"")
        self._max_keys = max_keys
        self._count = self._scan() if max_keys is not None else 0
        metrics.SUBJECT_KEYS.set(self._count)

    @classmethod
    def open(
        cls, audit_dir: Path, *, create: bool = True, max_keys: int | None = None
    ) -> SubjectKeys:
        """The store of ``audit_dir``; creates its salt on first use when ``create``.

        ``max_keys`` bounds how many keys :meth:`load_or_create` makes (the
        keys already on disk count); ``None`` for no bound (offline tools).
        """
        keys_dir = audit_dir / "keys"
        salt_path = keys_dir / _SALT_FILE
        if not salt_path.exists() and create:
            keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_new(salt_path, secrets.token_bytes(32))
        salt = salt_path.read_bytes() if salt_path.exists() else b""
        return cls(audit_dir / "subjects", salt, max_keys=max_keys)

    def _scan(self) -> int:
        if not self._root.is_dir():
            return 0
        return sum(1 for d in self._root.iterdir() if d.is_dir() for _ in d.glob("*.key"))

    @property
    def count(self) -> int:
        """How many keys this store knows of (when bounded)."""
        return self._count

    def ref(self, subject_id: str) -> str:
        """The pseudonymous reference stored in records: keyed BLAKE2b of the id, 128 bits."""
        return hashlib.blake2b(subject_id.encode(), key=self._salt, digest_size=16).hexdigest()

    def _path(self, ref: str) -> Path:
        return self._root / ref[:2] / f"{ref}.key"

    def cached(self, ref: str) -> AESGCM | None:
        """The subject's key if this process already holds it."""
        return self._cache.get(ref)

    def load_or_create(self, ref: str) -> AESGCM | None:
        """The subject's key, created (and made durable) on first use. Blocking I/O.

        ``None`` when the subject has no key yet and the store is full
        (``max_keys``): the caller then records the fields redacted.
        """
        aead = self._cache.get(ref)
        if aead is not None:
            return aead
        path = self._path(ref)
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            if self._max_keys is not None and self._count >= self._max_keys:
                return None
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = AESGCM.generate_key(bit_length=256)
            try:
                _write_new(path, key)
                self._count += 1
                metrics.SUBJECT_KEYS.set(self._count)
            except FileExistsError:
                key = path.read_bytes()
        aead = AESGCM(key)
        self._cache[ref] = aead
        if len(self._cache) > _MAX_CACHED:
            del self._cache[next(iter(self._cache))]  # the oldest; reloaded when needed
        return aead

    def load(self, ref: str) -> AESGCM | None:
        """The subject's key for reading, or ``None`` once erased."""
        try:
            return AESGCM(self._path(ref).read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def erase(self, ref: str) -> bool:
        """Destroy the subject's key; whether there was one. Blocking I/O.

        The file is overwritten and synced before it is unlinked, so the key
        does not linger in the file's old blocks on simple filesystems (on
        copy-on-write or journaled data it may; see docs/audit.md).
        """
        self._cache.pop(ref, None)
        path = self._path(ref)
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            os.write(fd, b"\0" * 32)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        fsync_dir(path.parent)
        self._count = max(0, self._count - 1)
        metrics.SUBJECT_KEYS.set(self._count)
        return True

    def forget_erased(self) -> list[str]:
        """Drop cached keys whose file was erased by another process; return their refs."""
        gone = [ref for ref in self._cache if not self._path(ref).exists()]
        for ref in gone:
            del self._cache[ref]
        if self._max_keys is not None:
            self._count = self._scan()  # erasures by other processes free room too
            metrics.SUBJECT_KEYS.set(self._count)
        return gone

    def _nonce(self) -> bytes:
        # getrandom() costs microseconds per call; one call per 4096 nonces
        # gives the same uniformly random 96-bit nonces.
        if not self._nonces:
            self._nonces = memoryview(os.urandom(_NONCE_BYTES * 4096))
        nonce, self._nonces = bytes(self._nonces[:_NONCE_BYTES]), self._nonces[_NONCE_BYTES:]
        return nonce

    def seal(
        self, aead: AESGCM, ref: str, record_id: str, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Encrypt ``fields`` (field path to value) for one record.

        The record id and subject are bound as associated data, so ciphertext
        cannot be moved to another record or subject unnoticed.
        """
        nonce = self._nonce()
        ct = aead.encrypt(nonce, orjson.dumps(dict(fields)), f"{record_id}|{ref}".encode())
        return {
            "alg": SEAL_ALG,
            "fields": sorted(fields),
            "nonce": base64.b64encode(nonce).decode(),
            "ct": base64.b64encode(ct).decode(),
        }

    def unseal(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """The personal fields of a stored record, or ``None`` if its subject was erased."""
        sealed = record.get("sealed")
        ref = record.get("subject")
        if not isinstance(sealed, Mapping) or not isinstance(ref, str):
            return {}
        aead = self.load(ref)
        if aead is None:
            return None
        try:
            plain = aead.decrypt(
                base64.b64decode(sealed["nonce"]),
                base64.b64decode(sealed["ct"]),
                f"{record['id']}|{ref}".encode(),
            )
        except (InvalidTag, KeyError, ValueError):
            return None
        value = orjson.loads(plain)
        return value if isinstance(value, dict) else None
