"""Signed checkpoints in the C2SP ``signed-note`` and ``tlog-checkpoint`` formats.

A checkpoint commits to the whole log at one size::

    warden.audit/3f9c2a1b7d4e5f60
    1234
    kXw1...base64 root hash...=

    — warden.audit/3f9c2a1b7d4e5f60 Az3f...base64(key hash || signature)...

The signature is Ed25519 over the text above the blank line; the key hash is
the first four bytes of ``SHA-256(name || "\\n" || 0x01 || public key)``. Any
tool that speaks these formats (the Go ``sumdb/note`` package, witnesses,
``litetlog``) can check Warden's checkpoints with the verifier key
``<name>+<key hash hex>+<base64(0x01 || public key)>``.

Besides ``time``, two extension lines say where a run of Warden started and
stopped: :data:`CLOSED` on the checkpoint it signs when it stops cleanly
(nothing follows it), and ``reopened <size> <digest>`` (:data:`REOPENED`) on
every checkpoint a later run signs, naming the closed checkpoint it resumed
(:meth:`Checkpoint.digest`). Records after a closed checkpoint that no
checkpoint names so were not written by Warden.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from warden.audit.verify_evidence import SIG_PREFIX, split_note

__all__ = [
    "ALG_ED25519",
    "CLOSED",
    "REOPENED",
    "Checkpoint",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "generate_signing_key",
    "load_signing_key",
    "open_note",
]

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
CLOSED = "closed"
"""The extension line of the checkpoint signed when the log is closed cleanly: the log
ends there, and records found after it at the next start were added by someone else."""
REOPENED = "reopened "
"""Extension line prefix: ``reopened <size> <digest>``, on the checkpoints of a run that
resumed the closed log at that size, naming its closed checkpoint (:meth:`Checkpoint.digest`)."""


class NoteError(ValueError):
    """A note or checkpoint is malformed, or no trusted signature verifies it."""


def _key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c == "+" for c in name)


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A public key that checks signatures of one named signer."""

    name: str
    key_hash: bytes
    public_key: Ed25519PublicKey

    @classmethod
    def from_public_key(cls, name: str, public_key: Ed25519PublicKey) -> NoteVerifier:
        """The verifier for ``public_key`` under ``name``."""
        if not _valid_name(name):
            raise NoteError(f"invalid key name {name!r}")
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(name, _key_hash(name, raw), public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<hash hex>+<base64(0x01 || key)>``; raise :class:`NoteError`."""
        name, sep, rest = vkey.strip().partition("+")
        hash_hex, sep2, key_b64 = rest.partition("+")
        if not (sep and sep2 and _valid_name(name)) or len(hash_hex) != 8:
            raise NoteError("a verifier key reads <name>+<8 hex digits>+<base64 key>")
        try:
            want_hash = bytes.fromhex(hash_hex)
            material = base64.b64decode(key_b64, validate=True)
        except ValueError as exc:
            raise NoteError(f"malformed verifier key: {exc}") from None
        if len(material) != 33 or material[0] != ALG_ED25519:
            raise NoteError("only Ed25519 verifier keys (algorithm 1) are supported")
        if _key_hash(name, material[1:]) != want_hash:
            raise NoteError("the verifier key's hash does not match its name and key")
        return cls(name, want_hash, Ed25519PublicKey.from_public_bytes(material[1:]))

    @property
    def vkey(self) -> str:
        """This verifier in the standard text form."""
        raw = self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        material = base64.b64encode(bytes([ALG_ED25519]) + raw).decode()
        return f"{self.name}+{self.key_hash.hex()}+{material}"

    @property
    def public_pem(self) -> bytes:
        """The public key as PEM, for ``openssl pkeyutl -verify``."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, text: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``text``."""
        try:
            self.public_key.verify(signature, text)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class NoteSigner:
    """A named Ed25519 key that signs notes."""

    name: str
    private_key: Ed25519PrivateKey

    @property
    def verifier(self) -> NoteVerifier:
        """The matching verifier."""
        return NoteVerifier.from_public_key(self.name, self.private_key.public_key())

    def sign(self, text: str) -> str:
        """The signed note: ``text``, a blank line and one signature line."""
        if not text.endswith("\n") or "\n\n" in text:
            raise NoteError("note text must end in a newline and contain no blank line")
        sig = self.private_key.sign(text.encode())
        blob = base64.b64encode(self.verifier.key_hash + sig).decode()
        return f"{text}\n{SIG_PREFIX}{self.name} {blob}\n"


def open_note(note: str | bytes, verifier: NoteVerifier) -> str:
    """Return the text of ``note`` once a signature by ``verifier`` checks out.

    Signatures by other keys are ignored, as the format requires; a signature
    that claims to be ``verifier``'s but does not verify is an error.
    """
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("a note must be UTF-8") from None
    try:
        text, signatures = split_note(note)
    except ValueError as exc:
        raise NoteError(str(exc)) from None
    if len(signatures) > MAX_SIGNATURES:
        raise NoteError("too many signatures")
    verified = False
    for name, raw in signatures:
        if name != verifier.name or raw[:4] != verifier.key_hash:
            continue
        if not verifier.verify(text.encode(), raw[4:]):
            raise NoteError(f"the signature of {name} does not verify")
        verified = True
    if not verified:
        raise NoteError(f"the note carries no signature by {verifier.name}")
    return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: the log's origin, its size and its root hash."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The checkpoint body that is signed."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "\n".join([*lines, *self.extensions]) + "\n"

    @property
    def closed(self) -> bool:
        """Whether it was signed when the log was closed cleanly (:data:`CLOSED`)."""
        return CLOSED in self.extensions

    @property
    def reopens(self) -> frozenset[tuple[int, str]]:
        """The closed checkpoints (size, digest) this one says its run resumed."""
        found = set()
        for line in self.extensions:
            size, _, digest = line.removeprefix(REOPENED).partition(" ")
            if line.startswith(REOPENED) and size.isascii() and size.isdigit() and digest:
                found.add((int(size), digest))
        return frozenset(found)

    def resumed_lines(self) -> tuple[str, ...]:
        """The ``reopened`` lines of a run that resumes the log at this closed checkpoint.

        They name it, and also the closed checkpoints it names at its own size:
        a run that added nothing in between must not leave the one before
        unnamed where only that one was kept (the central store keeps the
        first checkpoint of each size).
        """
        same_size = sorted(d for size, d in self.reopens if size == self.size)
        return tuple(f"{REOPENED}{self.size} {d}" for d in (self.digest(), *same_size))

    def digest(self) -> str:
        """SHA-256 of the signed text, hex: how a ``reopened`` line names this checkpoint."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body (already taken out of its signed note)."""
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint has an origin, a size and a root hash, one per line")
        origin, size_text, root_text, *ext = lines[:-1]
        if not origin:
            raise NoteError("the checkpoint origin is empty")
        if not (size_text.isascii() and size_text.isdigit()) or (
            size_text.startswith("0") and size_text != "0"
        ):
            raise NoteError(f"the checkpoint size {size_text!r} is not a decimal number")
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            raise NoteError("the checkpoint root hash is not base64") from None
        if len(root) != 32:
            raise NoteError("the checkpoint root hash is not 32 bytes")
        if any(not line for line in ext):
            raise NoteError("a checkpoint has no blank lines")
        return cls(origin, int(size_text), root, tuple(ext))

    @classmethod
    def open(cls, note: str | bytes, verifier: NoteVerifier) -> Checkpoint:
        """Check the note's signature, then parse its checkpoint.

        The signing key is named after its log (the checkpoint's origin), and
        one key may sign several logs (replicas given one key file): only the
        origin tells them apart, so a checkpoint whose origin is not the
        verifier's name is refused, however well it is signed.
        """
        checkpoint = cls.parse(open_note(note, verifier))
        if checkpoint.origin != verifier.name:
            raise NoteError(
                f"the checkpoint is for log {checkpoint.origin}, not {verifier.name} "
                "(whose key signed it)"
            )
        return checkpoint


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key as PEM at ``path`` with mode 0600; fail if it exists."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM, unencrypted)."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise NoteError(f"{path} is not an Ed25519 private key")
    return key
