#!/usr/bin/env python3
"""Check a Warden audit evidence package offline: ``python3 verify_evidence.py DIR --key VKEY``.

``warden audit verify-evidence DIR --key VKEY`` runs this module from an
installed Warden. A copy of this file goes into every package made by
``warden audit export`` for convenience only: whoever made the package could
have replaced it, so an auditor runs a copy obtained independently (their own
Warden, or this file from the Warden release, its SHA-256 compared with the
one published with the release). It needs only the Python standard library;
the Ed25519 signature of the checkpoint is checked with the ``cryptography``
package if it is installed, else with ``openssl`` (1.1.1 or later). It checks:

1. every file against ``MANIFEST.sha256`` (also: ``sha256sum -c MANIFEST.sha256``);
2. the signed checkpoint (C2SP signed note) against the log's verifier key,
   and that ``checkpoint.body``, ``checkpoint.sig`` and ``log-key.*`` are its
   text, its signature and that key;
3. each record: its leaf hash ``SHA-256(0x00 || line)`` and its RFC 6962
   inclusion proof against the checkpoint's root hash;
4. the hash chain between records with consecutive sequence numbers, and
   that the run reaches both ends of the declared period (``selection.json``,
   ``edges.json``);
5. the consistency proof from an earlier checkpoint, when the package has one;
6. ``changelog.jsonl`` and ``activations.jsonl`` against the proven records.

It then says which files are proven and which are not (``SUMMARY.md`` is a
digest for reading; it prints counts from the proven records to compare).
Exit status 0 means every check passed. Pass ``--key <verifier key>`` with the
key you obtained from the operator independently. Without it the script
refuses (exit status 2) unless told ``--trust-package-key``: the key shipped in
the package then shows damage, but not who signed.

Inside Warden this module is also the one implementation of the RFC 9162
proof verifiers (``warden.audit.merkle`` re-exports them).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHANGE_KINDS",
    "CHECKPOINT_TIME",
    "check",
    "checkpoint_time",
    "node_hash",
    "parse_checkpoint",
    "parse_vkey",
    "public_pem",
    "split_note",
    "verify_consistency",
    "verify_inclusion",
    "verify_package",
]

HASH_SIZE = 32
SIG_PREFIX = "\u2014 "
CHECKPOINT_TIME = "time "
"""The extension line a checkpoint carries: ``time`` and when it was signed (RFC 3339 UTC)."""


def node_hash(left: bytes, right: bytes) -> bytes:
    """An RFC 6962 interior node: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _is_hash(value: Any) -> bool:
    return isinstance(value, bytes | bytearray) and len(value) == HASH_SIZE


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows leaf ``index`` with ``leaf_hash`` is in the tree ``root``.

    RFC 9162 §2.1.3.2. Hashes that are not 32 bytes, negative or
    out-of-range indices and proofs of the wrong length are rejected; the
    function never raises.
    """
    try:
        if not (_is_count(index) and _is_count(tree_size) and index < tree_size):
            return False
        if not (_is_hash(leaf_hash) and _is_hash(root)):
            return False
        if not all(_is_hash(p) for p in proof):
            return False
        fn, sn = index, tree_size - 1
        r = bytes(leaf_hash)
        for p in proof:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = node_hash(bytes(p), r)
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                r = node_hash(r, bytes(p))
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == bytes(root)
    except Exception:  # a verifier answers False, it does not crash
        return False


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> bool:
    """Whether ``proof`` shows the tree ``root1`` of ``size1`` leaves is a prefix of ``root2``.

    RFC 9162 §2.1.4.2. Equal sizes need an empty proof and equal roots. A
    first size of zero is rejected: every tree extends the empty one, so such
    a "proof" proves nothing and most likely signals a confused caller. The
    function never raises.
    """
    try:
        if not (_is_count(size1) and _is_count(size2)) or not 0 < size1 <= size2:
            return False
        if not isinstance(root1, bytes | bytearray) or not isinstance(root2, bytes | bytearray):
            return False
        if size1 == size2:
            # Nothing to compute: the two heads must simply be the same bytes.
            return len(proof) == 0 and bytes(root1) == bytes(root2)
        if not (proof and _is_hash(root1) and _is_hash(root2) and all(map(_is_hash, proof))):
            return False
        return _consistent(size1, size2, [bytes(p) for p in proof], bytes(root1), bytes(root2))
    except Exception:  # a verifier answers False, it does not crash
        return False


def _consistent(size1: int, size2: int, path: list[bytes], root1: bytes, root2: bytes) -> bool:
    """Steps 2-7 of RFC 9162 §2.1.4.2 on checked inputs with ``0 < size1 < size2``."""
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == root1 and sr == root2


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """Split a C2SP signed note into its text and ``(name, key hash || signature)`` pairs.

    Raises ``ValueError`` when the note is malformed.
    """
    text, sep, sigs = note.rpartition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise ValueError("a note is text, a blank line, then signature lines")
    out: list[tuple[str, bytes]] = []
    for line in sigs[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise ValueError(f"malformed signature line {line!r}")
        name, space, blob = line[len(SIG_PREFIX) :].partition(" ")
        if not space or not name or "+" in name or any(c.isspace() for c in name):
            raise ValueError(f"malformed signature line {line!r}")
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise ValueError(f"signature of {name} is not base64") from None
        if len(raw) < 5:
            raise ValueError(f"signature of {name} is too short")
        out.append((name, raw))
    return text + "\n", out


def parse_vkey(vkey: str) -> tuple[str, bytes, bytes]:
    """``(name, 4-byte key hash, 32-byte Ed25519 public key)`` from a verifier key."""
    name, _, rest = vkey.strip().partition("+")
    hash_hex, _, key_b64 = rest.partition("+")
    material = base64.b64decode(key_b64, validate=True)
    if len(hash_hex) != 8 or len(material) != 33 or material[0] != 1:
        raise ValueError("not an Ed25519 verifier key <name>+<hash>+<base64 key>")
    key_hash = hashlib.sha256(name.encode() + b"\n" + material).digest()[:4]
    if key_hash.hex() != hash_hex:
        raise ValueError("the verifier key's hash does not match its name and key")
    return name, key_hash, material[1:]


def parse_checkpoint(text: str) -> tuple[str, int, bytes]:
    """``(origin, tree size, root hash)`` from a checkpoint body."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "" or not lines[1].isdigit():
        raise ValueError("a checkpoint is an origin, a size and a root hash, one per line")
    root = base64.b64decode(lines[2], validate=True)
    if len(root) != HASH_SIZE:
        raise ValueError("the checkpoint root hash is not 32 bytes")
    return lines[0], int(lines[1]), root


def checkpoint_time(text: str) -> str | None:
    """When a checkpoint body says it was signed (its ``time`` line), or ``None``."""
    for line in text.split("\n")[3:]:
        if line.startswith(CHECKPOINT_TIME):
            return line[len(CHECKPOINT_TIME) :]
    return None


def _ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool | None:
    """True/False, or ``None`` when neither ``cryptography`` nor ``openssl`` is available."""
    try:
        # Optional: the script must run with the standard library alone.
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PublicKey,
        )
    except ImportError:
        return _openssl_verify(public_key, message, signature)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def public_pem(public_key: bytes) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a raw Ed25519 public key, as ``openssl`` reads it."""
    # SubjectPublicKeyInfo for Ed25519 is a fixed 12-byte prefix and the raw key.
    spki = bytes.fromhex("302a300506032b6570032100") + public_key
    body = base64.encodebytes(spki)
    return b"-----BEGIN PUBLIC KEY-----\n" + body + b"-----END PUBLIC KEY-----\n"


def _openssl_verify(public_key: bytes, message: bytes, signature: bytes) -> bool | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"key.pem": public_pem(public_key), "msg": message, "sig": signature}
        for name, data in paths.items():
            (Path(tmp) / name).write_bytes(data)
        done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [
                openssl,
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                f"{tmp}/key.pem",
                "-rawin",
                "-in",
                f"{tmp}/msg",
                "-sigfile",
                f"{tmp}/sig",
            ],
            capture_output=True,
            check=False,
        )
    return done.returncode == 0


# The change-management record kinds changelog.jsonl lists (warden.audit.changes.CHANGE_KINDS;
# a test keeps the two equal: this file imports nothing from Warden).
CHANGE_KINDS = frozenset({"config_load", "policy_activation", "eval_run", "replay_run"})
"""The record kinds ``changelog.jsonl`` is drawn from."""

_ACTIVATION = "policy_activation"


class _Unreadable(ValueError):
    """A file of the package is not what it must be (not JSON, a line not an object...)."""


class _Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.notes: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)


def _json(data: bytes | str, where: str) -> Any:
    """Parsed JSON, or :class:`_Unreadable` naming ``where`` (never a RecursionError)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise _Unreadable(f"{where}: nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise _Unreadable(f"{where}: not JSON ({exc})") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Unreadable(f"{where}: not a JSON object")
    return value


def _seq(value: Any, where: str) -> int:
    if not _is_count(value):
        raise _Unreadable(f"{where}: seq is not a record number")
    return int(value)


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise _Unreadable(f"{where}: not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _Unreadable(f"{where}: not base64") from None


def _hashes(value: Any, where: str) -> list[bytes]:
    if not isinstance(value, list):
        raise _Unreadable(f"{where}: the proof is not a list of hashes")
    return [_b64(item, where) for item in value]


def _leaf(payload: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + payload).digest()


def _open_checkpoint(
    note: str, vkey: str, report: _Report
) -> tuple[str, int, bytes, str | None] | None:
    """``(origin, size, root, signed at)`` of a checkpoint whose signature verifies."""
    try:
        name, key_hash, public_key = parse_vkey(vkey)
        text, sigs = split_note(note)
        origin, size, root = parse_checkpoint(text)
    except ValueError as exc:
        report.fail(f"checkpoint: {exc}")
        return None
    mine = [raw for signer, raw in sigs if signer == name and raw[:4] == key_hash]
    if not mine:
        report.fail(f"checkpoint: no signature by the key {name}")
        return None
    for raw in mine:
        ok = _ed25519_verify(public_key, text.encode(), raw[4:])
        if ok is None:
            report.fail("checkpoint: cannot check Ed25519 (install `cryptography` or openssl)")
            return None
        if not ok:
            report.fail("checkpoint: the signature does not verify")
            return None
    if origin != name:
        # One key may sign several logs: the origin, under the signature, says which.
        report.fail(f"checkpoint: it is for log {origin}, not {name} (whose key signed it)")
        return None
    return origin, size, root, checkpoint_time(text)


def _check_key_files(pkg: Path, note: str, vkey: str, report: _Report) -> None:
    """The by-hand copies (``checkpoint.body``, ``.sig``, ``log-key.*``) are those of the key.

    ``checkpoint.body`` must be the signed text of ``checkpoint`` and
    ``checkpoint.sig`` the signature of ``vkey`` in it; ``log-key.vkey`` and
    ``log-key.pem`` must be ``vkey``: a forger's key shipped beside the real
    one would pass the by-hand ``openssl`` step of an auditor who used it.
    """
    name, key_hash, public_key = parse_vkey(vkey)
    text, sigs = split_note(note)
    signature = next((raw[4:] for n, raw in sigs if n == name and raw[:4] == key_hash), None)
    expected = {
        "checkpoint.body": (text.encode(), "is not the signed text of checkpoint"),
        "checkpoint.sig": (signature, f"is not the signature of {name} in checkpoint"),
        "log-key.pem": (public_pem(public_key), f"is not the key checked against ({name})"),
    }
    for file, (want, wrong) in expected.items():
        path = pkg / file
        if path.exists() and path.read_bytes() != want:
            report.fail(f"{file} {wrong}")
    shipped = pkg / "log-key.vkey"
    if shipped.exists():
        try:
            same = parse_vkey(shipped.read_text(encoding="utf-8")) == (name, key_hash, public_key)
        except ValueError:
            same = False
        if not same:
            report.fail(f"log-key.vkey is not the key checked against ({name})")


def _check_manifest(pkg: Path, report: _Report) -> None:
    manifest = pkg / "MANIFEST.sha256"
    listed: set[str] = set()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        listed.add(name)
        path = pkg / name
        if not path.is_file() or Path(name).is_absolute() or ".." in Path(name).parts:
            report.fail(f"manifest: {name} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            report.fail(f"manifest: {name} was modified")
    for path in pkg.rglob("*"):
        name = path.relative_to(pkg).as_posix()
        if path.is_file() and name != "MANIFEST.sha256" and name not in listed:
            report.fail(f"manifest: {name} is not listed")


def _check_records(
    pkg: Path, size: int, root: bytes, report: _Report, signed: str | None = None
) -> dict[int, dict[str, Any]]:
    """The records proven in the signed tree, by sequence number."""
    records = (pkg / "records.jsonl").read_bytes().split(b"\n")
    proofs = (pkg / "proofs.jsonl").read_bytes().split(b"\n")
    if records[-1] != b"" or proofs[-1] != b"" or len(records) != len(proofs):
        report.fail("records.jsonl and proofs.jsonl do not have one line per record each")
        return {}
    scope = _scope(pkg, report)
    whole_run = scope is None or scope.get("agent") is None
    previous: tuple[int, str] | None = None
    proven: dict[int, dict[str, Any]] = {}
    seqs: list[int] = []
    first_record: dict[str, Any] | None = None
    last_record: dict[str, Any] | None = None
    for number, (line, proof_line) in enumerate(zip(records[:-1], proofs[:-1], strict=True), 1):
        at_proof, at_record = f"proofs.jsonl line {number}", f"records.jsonl line {number}"
        proof = _object(_json(proof_line, at_proof), at_proof)
        record = _object(_json(line, at_record), at_record)
        seq = _seq(proof.get("seq"), at_proof)
        if previous is not None and seq <= previous[0]:
            report.fail(f"record {seq}: out of order or repeated after record {previous[0]}")
        elif previous is not None and whole_run and seq != previous[0] + 1:
            # Unfiltered, the package is one unbroken run: a gap is a hidden record.
            report.fail(f"records {previous[0] + 1}..{seq - 1} are missing from the run")
        seqs.append(seq)
        leaf = _leaf(line)
        path = _hashes(proof.get("proof"), at_proof)
        claimed = _b64(proof.get("leaf_hash"), f"{at_proof}: leaf_hash")
        if record.get("seq") != seq or record.get("id") != proof.get("id"):
            report.fail(f"record {seq}: its proof belongs to another record")
        elif claimed != leaf:
            report.fail(f"record {seq}: the record was modified (leaf hash differs)")
        elif not verify_inclusion(leaf, seq, size, path, root):
            report.fail(f"record {seq}: the inclusion proof does not lead to the signed root")
        else:
            proven[seq] = record
        if previous is not None and previous[0] + 1 == seq and record.get("prev") != previous[1]:
            report.fail(f"record {seq}: its prev hash does not match record {seq - 1}")
        previous = (seq, leaf.hex())
        first_record = first_record or record
        last_record = record
    if scope is not None:
        ends = [r for r in (first_record, last_record) if r is not None]
        _check_scope(pkg, scope, seqs, ends, report, size=size, root=root, signed=signed)
        if not whole_run:
            report.notes.append(
                f"filtered to agent {scope['agent']!r}: that no record of it was left out "
                "cannot be proven offline (other agents' records are not in the package)"
            )
        span = f"records {seqs[0]}..{seqs[-1]}" if seqs else "no records"
        report.notes.append(
            f"the package covers {span} for the period {scope.get('from') or 'start'} to "
            f"{scope.get('to') or 'end'}: check that it is the period you asked for"
        )
        if signed is not None:
            report.notes.append(
                f"the checkpoint was signed at {signed}: records written after it are not in"
                " the package"
            )
    return proven


def _in_period(record: dict[str, object], scope: dict[str, object]) -> bool:
    when, start, end = record.get("time"), scope.get("from"), scope.get("to")
    if not isinstance(when, str):
        return False
    return not (isinstance(start, str) and when < start) and not (
        isinstance(end, str) and when >= end
    )


def _check_scope(
    pkg: Path,
    scope: dict[str, object],
    seqs: list[int],
    ends: list[dict[str, object]],
    report: _Report,
    *,
    size: int,
    root: bytes,
    signed: str | None,
) -> None:
    """``selection.json`` against the records: the run, the filter, the period and its edges."""
    declared = (scope.get("first_seq"), scope.get("last_seq"), scope.get("records"))
    found = (seqs[0] if seqs else None, seqs[-1] if seqs else None, len(seqs))
    if declared != found:
        report.fail(f"selection.json declares records {declared}, the package holds {found}")
    agent = scope.get("agent")
    if agent is not None and (not isinstance(agent, str) or not agent):
        report.fail("selection.json: agent is neither null nor an agent id")
    for record in ends:
        if not _in_period(record, scope):
            report.fail(
                f"record {record.get('seq')} is dated {record.get('time')!r}, outside "
                "the period the package declares"
            )
    if agent is None:
        # With no record, the edges alone show the period empty: never skipped.
        run = (seqs[0], seqs[-1]) if seqs else None
        _check_edges(pkg, scope, run, report, size=size, root=root, signed=signed)


def _edges(
    pkg: Path, report: _Report, *, size: int, root: bytes
) -> dict[str, tuple[int, dict[str, object]]]:
    """The records of ``edges.json`` proven in the signed tree, by side."""
    path = pkg / "edges.json"
    listed = _json(path.read_bytes(), "edges.json") if path.exists() else []
    if not isinstance(listed, list):
        raise _Unreadable("edges.json: not a list")
    edges: dict[str, tuple[int, dict[str, object]]] = {}
    for number, item in enumerate(listed, 1):
        where = f"edges.json item {number}"
        edge = _object(item, where)
        seq = _seq(edge.get("seq"), where)
        payload = _b64(edge.get("record"), where)
        proof = _hashes(edge.get("proof"), where)
        record = _json(payload, where)
        if not isinstance(record, dict) or record.get("seq") != seq:
            report.fail(f"edges.json: record {seq} is not a record numbered {seq}")
        elif not verify_inclusion(_leaf(payload), seq, size, proof, root):
            report.fail(f"edges.json: record {seq} is not proven in the signed tree")
        else:
            edges[str(edge.get("side"))] = (seq, record)
    return edges


def _check_edges(
    pkg: Path,
    scope: dict[str, object],
    run: tuple[int, int] | None,
    report: _Report,
    *,
    size: int,
    root: bytes,
    signed: str | None,
) -> None:
    """An unfiltered run must reach both ends of the period: nothing left out at either end.

    The run starts at record 0, or the record before it (in ``edges.json``, proven
    in the signed tree) falls outside the period; likewise after its end, or it
    ends at the checkpoint's last record and the checkpoint was signed at or
    after the period's end (an older checkpoint would hide the records written
    after it). Assumes record times do not go back (a clock stepped back could
    place a later record of the period after that edge).

    With no record (``run`` is ``None``) the edges must be adjacent and hold the
    period between them: the one before dated before its start (or none: the
    period starts before record 0), the one after dated at or after its end (or
    none: the checkpoint ends right after the one before and was signed at or
    after the period's end). Merely outside the period is not enough here: two
    edges both dated after it would hide the records of the period before them.
    """
    edges = _edges(pkg, report, size=size, root=root)
    empty = run is None
    if run is None:
        # The empty run sits right after the edge before (or at the log's start).
        before = edges.get("before")
        first = before[0] + 1 if before is not None else 0
        run = (first, first - 1)
    first, last = run
    for side, needed, bound in (("before", first - 1, "from"), ("after", last + 1, "to")):
        if needed < 0:
            continue  # the run reaches the start of the log
        if needed >= size:
            end = scope.get(bound)
            if isinstance(end, str) and (signed is None or signed < end):
                when = f"signed at {signed}" if signed else "carrying no time"
                cut = f"the run ends at record {last}, the last the checkpoint covers"
                if empty:
                    cut = f"the package holds no record and the checkpoint ends at record {last}"
                report.fail(
                    f"{cut}, and the checkpoint ({when}) is from before the period's end: "
                    "records of the period written after it may be missing (export once a "
                    "checkpoint from after the period's end exists)"
                )
            continue
        edge = edges.get(side)
        if scope.get(bound) is None:
            reach = (
                "the package holds no record"
                if empty
                else f"the run of records {'starts' if side == 'before' else 'ends'} at record "
                f"{first if side == 'before' else last}"
            )
            report.fail(
                f"{reach}, but the package names no {bound!r} for its period: records are missing"
            )
        elif (
            edge is None
            or edge[0] != needed
            or _in_period(edge[1], scope)
            or (empty and not _beyond(edge[1], scope, bound))
        ):
            report.fail(
                f"record {needed}, {side} the run, is not shown to be outside the period: "
                "records of the period may have been left out"
            )


def _beyond(record: dict[str, object], scope: dict[str, object], bound: str) -> bool:
    """Whether ``record`` is dated before the period's ``from`` or at/after its ``to``."""
    when, edge = record.get("time"), scope.get(bound)
    if not (isinstance(when, str) and isinstance(edge, str)):
        return False
    return when < edge if bound == "from" else when >= edge


# ASCII digits only: str comparison orders these times, and a fullwidth digit sorts after 9.
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
"""How records and checkpoints write a time (UTC), which string comparison orders."""


def _scope(pkg: Path, report: _Report) -> dict[str, object] | None:
    """``selection.json``: the period, filter and run of records (a failure when missing)."""
    path = pkg / "selection.json"
    if not path.exists():
        # The manifest is not signed: whoever cut records could remove this file too.
        report.fail("no selection.json: the package cannot be shown complete for any period")
        return None
    scope = _json(path.read_bytes(), "selection.json")
    if not isinstance(scope, dict):
        report.fail("selection.json is not an object")
        return None
    for bound in ("from", "to"):
        value = scope.get(bound)
        # Compared as strings with record and checkpoint times: only their own form
        # orders right ("10:01-05:00" would sort before a checkpoint of 10:05Z).
        if value is not None and not (isinstance(value, str) and _TIME.fullmatch(value)):
            report.fail(f"selection.json: {bound!r} is not a time as records write it")
            return None
    start, end = scope.get("from"), scope.get("to")
    if isinstance(start, str) and isinstance(end, str) and not start < end:
        # Ends swapped, every record lies "outside" the period: an empty package of the
        # period asked for (09:00 to 11:00) would pass as one from 11:00 to 09:00.
        report.fail(f"selection.json: the period from {start} to {end} does not run forward")
        return None
    return scope


def _body(record: dict[str, Any]) -> dict[str, Any]:
    body = record.get("body")
    return body if isinstance(body, dict) else {}


def _check_changelog(
    pkg: Path,
    proven: dict[int, dict[str, Any]],
    scope: dict[str, object],
    report: _Report,
    *,
    size: int,
    root: bytes,
) -> tuple[dict[int, dict[str, Any]], int]:
    """``changelog.jsonl`` against the signed tree: the change records known, and how many
    lines carry no proof (an entry outside the package, from an older export).

    An entry is proven by the record of the package with its number, or by the
    record and inclusion proof the line carries; it must say what that record
    says. Every change record of the package dated before the period's end
    must be listed.
    """
    known = {seq: r for seq, r in proven.items() if r.get("kind") in CHANGE_KINDS}
    path = pkg / "changelog.jsonl"
    if not path.exists():
        return known, 0
    start, end = scope.get("from"), scope.get("to")
    listed: set[int] = set()
    unproven = 0
    last = -1
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        where = f"changelog.jsonl line {number}"
        entry = _object(_json(line, where), where)
        seq = _seq(entry.get("seq"), where)
        if seq <= last:
            report.fail(f"{where}: record {seq} is out of order or repeated")
        last = max(last, seq)
        record = proven.get(seq)
        if record is None and "record" in entry:
            payload = _b64(entry.get("record"), where)
            parsed = _json(payload, where)
            path_ = _hashes(entry.get("proof"), where)
            if not (
                isinstance(parsed, dict)
                and parsed.get("seq") == seq
                and verify_inclusion(_leaf(payload), seq, size, path_, root)
            ):
                report.fail(f"{where}: record {seq} is not proven in the signed tree")
                continue
            record = parsed
        if record is None:
            unproven += 1
            continue
        listed.add(seq)
        when = str(record.get("time", ""))
        said = (entry.get("id"), entry.get("time"), entry.get("kind"), entry.get("body"))
        if record.get("kind") not in CHANGE_KINDS or said != (
            str(record.get("id", "")),
            when,
            record.get("kind"),
            _body(record),
        ):
            report.fail(f"{where}: it does not say what record {seq}, proven, says")
            continue
        if isinstance(end, str) and when >= end:
            report.fail(f"{where}: record {seq} is dated after the period")
        if entry.get("in_period") is not (not isinstance(start, str) or when >= start):
            report.fail(f"{where}: in_period is wrong for record {seq}, dated {when}")
        known[seq] = record
    for seq, record in proven.items():
        due = not isinstance(end, str) or str(record.get("time", "")) < end
        if record.get("kind") in CHANGE_KINDS and due and seq not in listed:
            report.fail(f"changelog.jsonl leaves out record {seq} ({record.get('kind')})")
    return known, unproven


def _in_force(known: dict[int, dict[str, Any]], before: int, revision: str) -> str | None:
    """The id of the last champion activation of ``revision`` before record ``before``."""
    found: str | None = None
    for seq in sorted(known):
        if seq >= before:
            break
        body = _body(known[seq])
        if (
            revision
            and known[seq].get("kind") == _ACTIVATION
            and body.get("role", "champion") == "champion"
            and str(body.get("revision", "")) == revision
        ):
            found = str(known[seq].get("id", ""))
    return found


def _check_activations(
    pkg: Path, proven: dict[int, dict[str, Any]], known: dict[int, dict[str, Any]], report: _Report
) -> int:
    """``activations.jsonl``: one line per decision of the package, recomputed from the
    proven records and change log (the activation in force: the latest champion
    ``policy_activation`` of the decision's revision before it)."""
    path = pkg / "activations.jsonl"
    if not path.exists():
        return 0
    decisions = [seq for seq in sorted(proven) if proven[seq].get("kind") == "decision"]
    listed: list[int] = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        where = f"activations.jsonl line {number}"
        link = _object(_json(line, where), where)
        seq = _seq(link.get("seq"), where)
        listed.append(seq)
        record = proven.get(seq)
        if record is None or record.get("kind") != "decision":
            report.fail(f"{where}: record {seq} is not a decision the package proves")
            continue
        decision = record.get("decision")
        decision = decision if isinstance(decision, dict) else {}
        revision = str(decision.get("bundle_revision") or "")
        want = {
            "record_id": str(record.get("id", "")),
            "decision_id": str(decision.get("id", "")),
            "bundle_revision": revision,
            "activation_id": _in_force(known, seq, revision),
        }
        for name, value in want.items():
            if link.get(name) != value:
                report.fail(
                    f"{where}: {name} of decision record {seq} is {link.get(name)!r}; the "
                    f"proven records say {value!r}"
                )
    if listed != decisions:
        report.fail("activations.jsonl does not list each decision of the package once, in order")
    return len(listed)


def _counts(proven: dict[int, dict[str, Any]]) -> str:
    """Counts an auditor compares with SUMMARY.md, taken from the proven records."""
    kinds: dict[str, int] = {}
    effects: dict[str, int] = {}
    for record in proven.values():
        kind = str(record.get("kind"))
        kinds[kind] = kinds.get(kind, 0) + 1
        decision = record.get("decision")
        if kind == "decision" and isinstance(decision, dict):
            effect = str(decision.get("effect"))
            label = effect if decision.get("mode") == "enforce" else f"{effect} (observe)"
            effects[label] = effects.get(label, 0) + 1

    def shown(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"

    return f"proven records by kind: {shown(kinds)}; decisions by effect: {shown(effects)}"


def verify_package(pkg: Path, vkey: str | None = None) -> tuple[list[str], list[str]]:
    """Run every check on the package in ``pkg``; return the failures and the notes.

    A file that is not what it must be (not JSON, a line that is not an
    object...) is a failure naming it. The notes end by saying which files
    the checks prove and which they do not.
    """
    report = _Report()
    try:
        _verify(pkg, vkey, report)
    except _Unreadable as exc:
        report.fail(str(exc))
    return report.failures, report.notes


# What an evidence package holds; anything else in it is proven by nothing.
_PACKAGE_FILES = frozenset(
    {
        "MANIFEST.sha256",
        "SUMMARY.md",
        "VERIFY.md",
        "activations.jsonl",
        "changelog.jsonl",
        "checkpoint",
        "checkpoint-earlier",
        "checkpoint.body",
        "checkpoint.sig",
        "consistency.json",
        "edges.json",
        "log-key.pem",
        "log-key.vkey",
        "proofs.jsonl",
        "records.jsonl",
        "selection.json",
        "verify_evidence.py",
    }
)


def _plain_files(pkg: Path) -> list[str]:
    """The package's file names; :class:`_Unreadable` for anything but a regular file.

    Checked before anything is read: a FIFO would hang the check, and a link to
    ``/dev/zero`` exhaust its memory.
    """
    entries = sorted(pkg.iterdir())  # OSError: the package cannot be read at all (exit 2)
    for entry in entries:
        if not stat.S_ISREG(entry.lstat().st_mode):
            raise _Unreadable(f"{entry.name}: not a regular file (a link, FIFO or directory)")
    return [entry.name for entry in entries]


def _verify(pkg: Path, vkey: str | None, report: _Report) -> None:
    present = _plain_files(pkg)
    _check_manifest(pkg, report)
    if vkey is None:
        vkey = (pkg / "log-key.vkey").read_text(encoding="utf-8")
        report.notes.append("the checkpoint key was taken from the package (use --key to pin it)")
    note = (pkg / "checkpoint").read_text(encoding="utf-8")
    opened = _open_checkpoint(note, vkey, report)
    if opened is None:
        return
    origin, size, root, signed = opened
    _check_key_files(pkg, note, vkey, report)
    proven = _check_records(pkg, size, root, report, signed)
    proven_files = ["records.jsonl", "proofs.jsonl", "checkpoint", "selection.json", "edges.json"]
    consistency = pkg / "consistency.json"
    if consistency.exists():
        data = _object(_json(consistency.read_bytes(), "consistency.json"), "consistency.json")
        if data.get("checkpoint") != "checkpoint-earlier":
            raise _Unreadable("consistency.json: its checkpoint is not checkpoint-earlier")
        earlier = _open_checkpoint(
            (pkg / "checkpoint-earlier").read_text(encoding="utf-8"), vkey, report
        )
        path = _hashes(data.get("proof"), "consistency.json")
        if earlier is not None and not verify_consistency(earlier[1], size, path, earlier[2], root):
            report.fail("the earlier checkpoint is not consistent with the latest one")
        proven_files += ["checkpoint-earlier", "consistency.json"]
    scope = _scope(pkg, _Report()) or {}  # its failures were reported with the records
    known, unproven = _check_changelog(pkg, proven, scope, report, size=size, root=root)
    links = _check_activations(pkg, proven, known, report)
    if not report.failures:
        # Only a package that passed says what is proven: after a failure nothing is.
        report.notes.append(_counts(proven))
        _coverage(
            pkg,
            report,
            proven_files,
            present=present,
            scope=scope,
            proven=proven,
            unproven=unproven,
            links=links,
        )
        report.notes.append(
            f"OK: {len(proven)} records included in {origin} at tree size {size}, "
            f"root {base64.b64encode(root).decode()}"
        )


def _coverage(
    pkg: Path,
    report: _Report,
    files: list[str],
    *,
    present: list[str],
    scope: dict[str, object],
    proven: dict[int, dict[str, Any]],
    unproven: int,
    links: int,
) -> None:
    """Say which files the checks prove and which they do not: the manifest is unsigned."""
    if (pkg / "changelog.jsonl").exists():
        files.append("changelog.jsonl" + (" (but for the lines below)" if unproven else ""))
    if (pkg / "activations.jsonl").exists():
        files.append(f"activations.jsonl ({links} decisions)")
    files += ["checkpoint.body", "checkpoint.sig", "log-key.vkey", "log-key.pem"]
    # Only files the package holds (edges.json, checkpoint.body may be absent).
    files = [f for f in files if f.split(" ", 1)[0] in present]
    report.notes.append(f"proven against the signed checkpoint: {', '.join(files)}")
    gaps = [
        "SUMMARY.md (a digest whoever made the package wrote: compare it with the proven "
        "counts above)",
        "VERIFY.md",
        "verify_evidence.py (use a verifier you obtained yourself, never the package's copy)",
        "MANIFEST.sha256 (unsigned: it shows damage, not forgery)",
    ]
    if unproven:
        gaps.append(f"{unproven} line(s) of changelog.jsonl that carry no proof")
    if "checkpoint-earlier" in present and "consistency.json" not in present:
        gaps.append("checkpoint-earlier (no consistency.json proves it)")
    gaps += [
        f"{name} (not part of an evidence package)"
        for name in present
        if name not in _PACKAGE_FILES
    ]
    first = min(proven) if proven else None
    if (pkg / "changelog.jsonl").exists() and (scope.get("agent") is not None or first != 0):
        # The package holds every record of its run, not those before it (or another agent's).
        start = f"before record {first}" if first is not None and scope.get("agent") is None else ""
        gaps.append(
            f"that changelog.jsonl leaves out no change record {start or 'outside the package'}"
            " (and so that each decision's activation is the one in force)"
        )
    report.notes.append(f"not proven: {'; '.join(gaps)}")


def check(pkg: Path, vkey: str | None) -> int:
    """Verify the package and print the outcome; the exit status (0 intact, 1 failed, 2 unreadable).

    ``vkey`` is the verifier key the auditor obtained independently; ``None``
    checks against the package's own key, which shows damage but not who
    signed.
    """
    try:
        failures, notes = verify_package(pkg, vkey)
    except Exception as exc:  # whatever the package holds: a message, never a traceback
        print(f"FAILED: the package cannot be read: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for message in failures:
        print(f"FAILED: {message}")
    for message in notes:
        print(message)
    if vkey is None and not failures:
        print("NOT AUTHENTICATED: the key came from the package (--trust-package-key)")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; exit status 0 when the package is intact."""
    parser = argparse.ArgumentParser(description="Verify a Warden audit evidence package.")
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--key", help="the log's verifier key, obtained independently")
    parser.add_argument(
        "--trust-package-key",
        action="store_true",
        help="check against log-key.vkey from the package itself: finds damage, but not "
        "a package rebuilt and signed again by whoever made it",
    )
    args = parser.parse_args(argv)
    if args.key is None and not args.trust_package_key:
        print(
            "UNVERIFIED: pass --key with the log's verifier key, obtained from its operator "
            "independently; the package's own log-key.vkey is whatever its maker chose "
            "(--trust-package-key checks against it anyway, for damage only)",
            file=sys.stderr,
        )
        return 2
    return check(Path(args.package), args.key)


if __name__ == "__main__":
    sys.exit(main())
