"""C2SP signed notes and checkpoints, checked against the Go reference vector."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from warden.audit.checkpoint import (
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    generate_signing_key,
    load_signing_key,
    open_note,
)

# The example key and note of golang.org/x/mod/sumdb/note (its note_test.go).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZ"
    "SNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def _go_signer() -> NoteSigner:
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])[1:]
    return NoteSigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))


def test_signing_reproduces_the_go_reference_note_byte_for_byte() -> None:
    signer = _go_signer()
    assert signer.verifier.vkey == GO_VKEY
    assert signer.sign(GO_TEXT) == GO_NOTE


def test_the_go_reference_note_opens() -> None:
    assert open_note(GO_NOTE, NoteVerifier.from_vkey(GO_VKEY)) == GO_TEXT


@pytest.mark.parametrize(
    "note",
    [
        GO_NOTE.replace("cryptography", "cryptographY"),  # text changed
        GO_NOTE.replace("x08go", "x08gp"),  # signature changed
        GO_NOTE.replace("\n\n", "\n"),  # no blank line
        GO_NOTE[:-1],  # no final newline
        GO_NOTE.replace("\u2014 ", "- "),  # not an em dash
        GO_NOTE.replace("PeterNeumann x", "PeterNeumann  x"),
        GO_TEXT + "\n\u2014 PeterNeumann !!!!\n",
    ],
)
def test_damaged_notes_are_rejected(note: str) -> None:
    with pytest.raises(NoteError):
        open_note(note, NoteVerifier.from_vkey(GO_VKEY))


def test_a_note_signed_only_by_another_key_is_rejected() -> None:
    other = NoteSigner("PeterNeumann", Ed25519PrivateKey.generate())
    with pytest.raises(NoteError, match="no signature by"):
        open_note(other.sign(GO_TEXT), NoteVerifier.from_vkey(GO_VKEY))
    # Unknown signers are ignored when a trusted one signed too.
    extra = other.sign(GO_TEXT).split("\n\n")[1]
    assert open_note(GO_NOTE + extra.replace("PeterNeumann", "Someone"), _go_signer().verifier)


@pytest.mark.parametrize(
    "vkey",
    [
        GO_VKEY.replace("c74f20a3", "c74f20a4"),
        GO_VKEY.replace("+ARpc", "+AXpc"),
        GO_VKEY[:-4],
        "PeterNeumann",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_mangled_verifier_keys_are_rejected(vkey: str) -> None:
    with pytest.raises(NoteError):
        NoteVerifier.from_vkey(vkey)


def test_checkpoint_text_round_trip() -> None:
    ckpt = Checkpoint("warden.local/audit/abc", 42, bytes(range(32)))
    assert (
        ckpt.text() == "warden.local/audit/abc\n42\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    )
    assert Checkpoint.parse(ckpt.text()) == ckpt
    signer = NoteSigner("warden.local/audit/abc", Ed25519PrivateKey.generate())
    assert Checkpoint.open(signer.sign(ckpt.text()), signer.verifier) == ckpt


@pytest.mark.parametrize(
    "text",
    [
        "origin\n42\n",
        "origin\n042\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
        "origin\n-1\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
        "origin\n42\nAAEC\n",
        "\n42\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
        # Digits int() reads but no other verifier does: one note, two tree sizes.
        "origin\n\u0664\u0662\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    ],
)
def test_malformed_checkpoints_are_rejected(text: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_generated_key_is_private_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_signing_key(path).private_bytes_raw() == key.private_bytes_raw()
    with pytest.raises(FileExistsError):
        generate_signing_key(path)
