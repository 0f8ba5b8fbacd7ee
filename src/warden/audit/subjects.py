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

Erasure reaches beyond the log: :class:`SubjectMatch` tells the state store
which of its rows name an erased subject, and an erasure the CLI makes while
Warden runs leaves a note (:meth:`SubjectKeys.note_erasure`, the reference
only) for the running Warden to finish and record.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from warden.audit import metrics
from warden.audit.layout import fsync_dir
from warden.model import Action

__all__ = [
    "KEYED_PREFIX",
    "SEAL_ALG",
    "UNUSABLE",
    "SubjectKeys",
    "SubjectMatch",
    "keyed_digest",
    "subject_ids",
    "subject_value",
]

UNUSABLE = object()
"""What :func:`subject_value` returns for a subject it cannot name (not text or a number)."""

SEAL_ALG = "A256GCM"
_SALT_FILE = "subject-salt"
_DIGEST_PERSON = b"warden-digest"
KEYED_PREFIX = "keyed:"
"""How a keyed digest starts (:meth:`SubjectKeys.keyed`)."""
_NOTES = "erasures"  # under the key store: erasures the running Warden still has to finish
_REF_CHARS = frozenset("0123456789abcdef")
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


def _is_ref(name: str) -> bool:
    return len(name) == 32 and set(name) <= _REF_CHARS


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
        found = _source(source, action.arguments, action.context, action.agent.claims)
        if found is None or found == "":
            continue
        if isinstance(found, str) or (isinstance(found, int) and not isinstance(found, bool)):
            return str(found)
        return UNUSABLE
    return None


def _source(source: str, arguments: Any, context: Any, claims: Any) -> Any:
    root, _, rest = source.partition(".")
    if root == "context":
        return _lookup(context, rest.split("."))
    if rest.startswith("arguments."):
        return _lookup(arguments, rest.split(".")[1:])
    return _lookup(claims, rest.split(".")[1:])  # agent.claims.<path>


@dataclass(frozen=True, slots=True)
class SubjectMatch:
    """Which stored content names a data subject being erased (for stores beyond the log).

    Subjects are known by reference (:meth:`SubjectKeys.ref`): a running
    Warden learns of an erasure the CLI made only by reference. Content names
    an erased subject when *any* configured source present in it does, not
    only the first as when sealing: erasing a row too many is the safe side.
    """

    refs: frozenset[str]
    sources: tuple[str, ...]
    ref: Callable[[str], str]
    """The keyed reference of a subject id (:meth:`SubjectKeys.ref`)."""

    def names(self, *, arguments: Any = None, context: Any = None, claims: Any = None) -> bool:
        """Whether these parts of an action name an erased subject.

        A store passes what it keeps: a part it does not keep (``None``) names
        nobody, so sources there cannot match.
        """
        named = _named(self.sources, arguments, context, claims)
        return any(self.ref(found) in self.refs for found in named)


def _named(sources: Sequence[str], arguments: Any, context: Any, claims: Any) -> Iterator[str]:
    """The subject ids every source present names (text or integers), in source order."""
    for source in sources:
        found = _source(source, arguments, context, claims)
        if isinstance(found, bool) or not isinstance(found, str | int) or found == "":
            continue
        yield str(found)


def subject_ids(action: Action, sources: Sequence[str]) -> tuple[str, ...]:
    """Every data subject the configured sources name in ``action`` (not only the first,
    as sealing takes): what a store beyond the log keeps references of, for erasure."""
    named = _named(sources, action.arguments, action.context, action.agent.claims)
    return tuple(dict.fromkeys(named))


def keyed_digest(audit_dir: Path, digest: str) -> str:
    """``digest`` keyed as the log in ``audit_dir`` keys what it does not show
    (:meth:`SubjectKeys.keyed`): to check a claimed value against a record.

    Raises ``FileNotFoundError`` when the log has no key folder salt.
    """
    salt = audit_dir / "keys" / _SALT_FILE
    if not salt.exists():
        raise FileNotFoundError(f"{salt} is missing: this log keys no digests")
    return SubjectKeys.open(audit_dir, create=False).keyed(digest)


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

    def keyed(self, digest: str) -> str:
        """``keyed:`` and the BLAKE2b of ``digest`` keyed with the log's salt.

        What a record keeps of a value it does not show (redacted arguments, a
        masked password, a cut result): equal values still give equal digests,
        but a plain SHA-256 of a date of birth or a short password is found by
        hashing guesses, and this one only by whoever holds the log's key
        folder (``warden audit digest`` checks a value against it).
        """
        keyed = hashlib.blake2b(
            digest.encode(), key=self._salt, person=_DIGEST_PERSON, digest_size=32
        )
        return KEYED_PREFIX + keyed.hexdigest()

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

    def note_erasure(self, ref: str, key_destroyed: bool) -> None:
        """Leave a note that ``ref`` was erased here, for the Warden holding the log.

        The CLI cannot write to a log a running Warden holds: the note tells
        that process to erase the subject from its state store and memory and
        to record the erasure (:meth:`noted_erasures`), at its next
        checkpoint or when it next starts. Blocking I/O.
        """
        if not _is_ref(ref):
            raise ValueError(f"not a subject reference: {ref!r}")
        notes = self._root / _NOTES
        notes.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = notes / ref
        destroyed = key_destroyed or (path.exists() and path.read_bytes() == b"1")
        # A name of this writer's own: the CLI and the running Warden may both note one ref.
        tmp = notes / f".{ref}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        _write_new(tmp, b"1" if destroyed else b"0")
        os.replace(tmp, path)
        fsync_dir(notes)

    def noted_erasures(self) -> dict[str, bool]:
        """The erasures noted by :meth:`note_erasure` and not yet finished: ref to whether
        a key was destroyed."""
        notes = self._root / _NOTES
        if not notes.is_dir():
            return {}
        return {p.name: p.read_bytes() == b"1" for p in notes.iterdir() if _is_ref(p.name)}

    def finish_erasure(self, ref: str) -> None:
        """Drop the note of an erasure the log has now recorded. Blocking I/O."""
        if _is_ref(ref):
            (self._root / _NOTES / ref).unlink(missing_ok=True)

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
