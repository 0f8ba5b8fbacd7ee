"""The audit directory: where segments, checkpoints and keys live.

::

    <dir>/log.json                     origin and creation time of this log
    <dir>/LOCK                         held (flock) by the one process writing the log
    <dir>/segments/<first seq>.seg     records (see segments.py)
    <dir>/checkpoints/<size>           every signed checkpoint, one note per file
    <dir>/checkpoint                   the latest signed checkpoint
    <dir>/keys/checkpoint.pem          Ed25519 signing key, 0600 (unless supplied)
    <dir>/keys/checkpoint.vkey         verifier key, C2SP note format
    <dir>/keys/checkpoint.pub.pem      the same public key as PEM (for openssl)
    <dir>/keys/subject-salt            keys the pseudonymous subject references
    <dir>/subjects/<ab>/<ref>.key      one AES-256-GCM key per data subject
    <dir>/torn/                        copies of torn tails cut off at start
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from warden.audit.checkpoint import NoteError, NoteSigner, NoteVerifier, load_signing_key

__all__ = [
    "Layout",
    "LogLocked",
    "LogMeta",
    "fsync_dir",
    "write_atomic",
]

_ORIGIN_PREFIX = "warden.local/audit/"


class LogLocked(Exception):
    """Another process holds the log's write lock."""


@dataclass(frozen=True, slots=True)
class LogMeta:
    """What identifies a log: its checkpoint origin (also the signing key's name)."""

    origin: str
    created: str
    schema: int = 1


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` durably: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths inside one audit directory."""

    root: Path

    @property
    def segments(self) -> Path:
        """Folder of segment files."""
        return self.root / "segments"

    @property
    def checkpoints(self) -> Path:
        """Folder of signed checkpoints, one per tree size."""
        return self.root / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        """The most recent signed checkpoint."""
        return self.root / "checkpoint"

    @property
    def keys(self) -> Path:
        """Folder of the signing key, verifier key and subject salt."""
        return self.root / "keys"

    @property
    def signing_key(self) -> Path:
        """The generated signing key (used when no key file is configured)."""
        return self.keys / "checkpoint.pem"

    @property
    def vkey(self) -> Path:
        """The verifier key in note format."""
        return self.keys / "checkpoint.vkey"

    @property
    def meta(self) -> Path:
        """The log's identity file."""
        return self.root / "log.json"

    def read_meta(self) -> LogMeta:
        """The log's identity; raises ``FileNotFoundError`` if this is not a log.

        ``ValueError`` when ``log.json`` is not the object Warden writes there.
        """
        raw = orjson.loads(self.meta.read_bytes())  # JSONDecodeError is a ValueError
        if not isinstance(raw, dict) or not all(k in raw for k in ("origin", "created", "schema")):
            raise ValueError(
                "log.json is not a log's identity (an object with origin, created and schema)"
            )
        return LogMeta(origin=str(raw["origin"]), created=str(raw["created"]), schema=raw["schema"])

    def init(self) -> LogMeta:
        """Create the directory and its identity on first use; return the identity.

        Folders above it that are missing are made 0700 (``./warden-data`` also
        holds the state database); for a group to read the log, make them first.
        """
        missing = [p for p in self.root.parents if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir(mode=0o700, exist_ok=True)
        self.root.mkdir(mode=0o750, exist_ok=True)
        self.keys.mkdir(mode=0o700, exist_ok=True)
        self.checkpoints.mkdir(mode=0o750, exist_ok=True)
        if self.meta.exists():
            return self.read_meta()
        meta = LogMeta(
            origin=_ORIGIN_PREFIX + secrets.token_hex(8),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        body = {"origin": meta.origin, "created": meta.created, "schema": meta.schema}
        write_atomic(self.meta, orjson.dumps(body, option=orjson.OPT_INDENT_2))
        return meta

    def lock(self) -> int:
        """Take the write lock; return its descriptor. Raises :class:`LogLocked`."""
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LogLocked(f"another process is writing the audit log in {self.root}") from None
        return fd

    def is_locked(self) -> bool:
        """Whether a process currently writes this log."""
        try:
            fd = self.lock()
        except LogLocked:
            return True
        os.close(fd)
        return False

    def signer(self, origin: str, key_file: str | None) -> NoteSigner:
        """The checkpoint signer: the configured key, else the one generated for the log.

        Writes nothing: a log with neither gets a new key in memory, which
        :meth:`keep_signer` stores once the start is accepted. A start refused
        (another key signed the log) must leave the folder as it found it.
        """
        if key_file is not None:
            try:
                key = load_signing_key(Path(key_file))
            except OSError as exc:
                raise NoteError(
                    f"audit.signing_key_file: cannot read {key_file}: {exc.strerror}"
                ) from None
            except (ValueError, TypeError, NoteError):
                raise NoteError(
                    f"audit.signing_key_file: {key_file} is not an unencrypted Ed25519 "
                    "private key (PEM); leave the setting out to have Warden generate one"
                ) from None
        elif self.signing_key.exists():
            key = load_signing_key(self.signing_key)
        else:
            key = Ed25519PrivateKey.generate()
        return NoteSigner(origin, key)

    def keep_signer(self, signer: NoteSigner, key_file: str | None) -> None:
        """Store the keys of a start accepted with ``signer``: the key it generated (no
        ``key_file`` and none stored yet), then its verifier key, note format and PEM.

        Only once the log's checkpoints verify with ``signer`` (or it has none):
        the verifier key in the folder is what auditors check the log with.
        """
        if key_file is None and not self.signing_key.exists():
            pem = signer.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_atomic(self.signing_key, pem, 0o600)  # the lock is held: nobody races it
        verifier = signer.verifier
        vkey = (verifier.vkey + "\n").encode()
        if not self.vkey.exists() or self.vkey.read_bytes() != vkey:
            write_atomic(self.vkey, vkey, 0o644)
            write_atomic(self.keys / "checkpoint.pub.pem", verifier.public_pem, 0o644)

    def verifier(self) -> NoteVerifier:
        """The verifier key stored with the log; :class:`NoteError` if it is not one."""
        try:
            text = self.vkey.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError(f"{self.vkey} is not a verifier key (not UTF-8 text)") from None
        return NoteVerifier.from_vkey(text)

    def write_checkpoint(self, size: int, note: str) -> None:
        """Store a signed checkpoint and make it the latest. Blocking, durable."""
        data = note.encode()
        write_atomic(self.checkpoints / f"{size:020d}", data, 0o644)
        write_atomic(self.latest_checkpoint, data, 0o644)

    def checkpoint_files(self) -> list[Path]:
        """Every stored checkpoint, smallest tree first."""
        if not self.checkpoints.is_dir():
            return []
        # ASCII only: "³" and other Unicode digits pass isdigit() but not int().
        names = (p for p in self.checkpoints.iterdir() if p.name.isascii() and p.name.isdigit())
        return sorted(names)
