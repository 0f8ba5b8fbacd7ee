"""Offline verification of an audit directory: frames, chain, tree, checkpoints.

:func:`verify_log` reads every segment once and checks, in order:

* every frame's length and CRC (bit rot, torn writes, edits that did not
  re-frame);
* every record's sequence number and ``prev`` hash against the record before
  it (records modified, deleted, reordered or inserted);
* the Merkle root at every signed checkpoint's size, and every checkpoint's
  Ed25519 signature (a rewritten chain, a truncated log, forged checkpoints);
* that no record follows a checkpoint signed when Warden stopped cleanly
  (``closed``) unless a later run of Warden signed that it resumed the log
  there (``reopened``): records added at the end after the fact.

It stops at the first damaged record and names it with the kind of damage;
see :class:`Damage` for the kinds.
"""

from __future__ import annotations

import base64
import hashlib
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from warden.audit.checkpoint import Checkpoint, NoteVerifier
from warden.audit.layout import Layout
from warden.audit.merkle import CompactRange, leaf_hash
from warden.audit.record import GENESIS_PREV
from warden.audit.segments import (
    FRAME_HEADER,
    MAX_FRAME,
    RECOVERED_KIND,
    FrameScanner,
    find_next_frame,
    list_segments,
    locate,
    parse_header,
    zero_tail,
)

__all__ = [
    "DAMAGE_KINDS",
    "START_KIND",
    "Damage",
    "VerifyReport",
    "downgrade_warning",
    "iter_placed_records",
    "iter_records",
    "key_fingerprint",
    "restarted_unmarked",
    "unresumed_closed",
    "verify_log",
]

DAMAGE_KINDS = (
    "modified",  # stored bytes changed (frame checksum, chain or tree root no longer match)
    "deleted",  # records missing from the middle of the log
    "reordered",  # records present but out of order
    "inserted",  # a record that is not part of the chain
    "truncated",  # the log ends before a signed checkpoint says it does
    "appended",  # records after the checkpoint of a clean stop that no run of Warden resumed
    "torn",  # the last frame is incomplete: a crash mid-write (repaired at next start)
    # a checkpoint is forged, unsigned, for another log, or contradicts another; or the key
    # given signed none here (deleted checkpoints, another log's directory)
    "checkpoint",
)
START_KIND = "config_load"
"""The record a ``warden serve`` start writes first (``warden.audit.changes.CONFIG_LOAD``)."""
_LOOKAHEAD = 1024
_FRAME = FRAME_HEADER.size
_unpack = FRAME_HEADER.unpack_from


@dataclass(frozen=True, slots=True)
class Damage:
    """The first thing found wrong: its kind, the record (by sequence number) and where."""

    kind: str
    detail: str
    seq: int | None = None
    record_id: str | None = None
    segment: str | None = None
    offset: int | None = None

    def describe(self) -> str:
        """One line for people: ``modified: record 41 (rec_...) in 000...0.seg@1234: ...``."""
        where = []
        if self.seq is not None:
            where.append(f"record {self.seq}" + (f" ({self.record_id})" if self.record_id else ""))
        if self.segment is not None:
            where.append(f"in {self.segment}" + (f" at byte {self.offset}" if self.offset else ""))
        return f"{self.kind}: {' '.join(where)}{': ' if where else ''}{self.detail}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_log` found."""

    records: int
    segments: int
    checkpoints: int
    latest_checkpoint: int | None
    root: str
    seconds: float
    damage: tuple[Damage, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    key: str = ""
    """The verifier key checkpoints were checked with (note format; empty: not recorded)."""
    key_from_directory: bool = False
    """Whether that key was read from the directory itself (no key was given): whoever
    can write the directory could have put theirs there."""

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.damage

    @property
    def rate(self) -> float:
        """Records verified per second."""
        return self.records / self.seconds if self.seconds > 0 else 0.0


def _unless_zeros(data: bytes, pos: int, fault: str) -> str | None:
    """``fault``, unless the rest is zeros: room the writer wrote ahead, the end of records."""
    return None if zero_tail(data, pos) else fault


@dataclass(slots=True)
class _Seen:
    seq: Any
    prev: Any
    hash: str
    id: Any


def _peek(segments: list[Path], index: int, data: bytes, offset: int) -> Iterator[_Seen]:
    """Records from ``offset`` in segment ``index`` onward, for classifying damage."""
    scanner = FrameScanner(data, offset)
    for _, payload in scanner:
        yield _parse_seen(payload)
    for path in segments[index + 1 :]:
        more = path.read_bytes()
        parsed = parse_header(more)
        if parsed is None:
            return
        for _, payload in FrameScanner(more, parsed[1]):
            yield _parse_seen(payload)


def _parse_seen(payload: bytes) -> _Seen:
    try:
        rec = orjson.loads(payload)
    except orjson.JSONDecodeError:
        rec = {}
    if not isinstance(rec, dict):
        rec = {}
    return _Seen(rec.get("seq"), rec.get("prev"), leaf_hash(payload).hex(), rec.get("id"))


def _classify(
    expected: int, last: str, before_last: str, seen: list[_Seen]
) -> tuple[str, int, str]:
    """Kind, first bad sequence number and detail for a record that breaks the chain.

    ``seen[0]`` is the record found where record ``expected`` should be;
    ``last`` is the hash of record ``expected - 1`` and ``before_last`` its
    ``prev``.
    """
    cur = seen[0]
    s, p = cur.seq, cur.prev
    if not isinstance(s, int) or isinstance(s, bool) or not isinstance(p, str):
        return "modified", expected, "the frame holds no valid v1 record"
    if s == expected:
        if len(seen) > 1 and seen[1].seq == expected and seen[1].prev == last:
            return "inserted", expected, "a record that is not part of the chain stands here"
        if expected == 0:
            return "modified", 0, "the first record's prev hash is not the genesis value"
        return (
            "modified",
            expected - 1,
            f"its hash no longer matches the prev hash stored in record {expected}",
        )
    if s > expected:
        if any(later.seq == expected for later in seen[1:]):
            return "reordered", expected, f"record {s} stands where record {expected} should be"
        if p == last:
            return "modified", expected, f"the record chains to record {expected - 1} but says {s}"
        missing = f"record {expected}" if s == expected + 1 else f"records {expected}..{s - 1}"
        return "deleted", expected, f"{missing} missing: the next record found is {s}"
    if s == expected - 1 and p == before_last:
        return "inserted", expected - 1, f"two records claim sequence number {s}"
    return (
        "inserted",
        expected,
        f"a record claiming sequence number {s} appears after {expected - 1}",
    )


def _load_checkpoints(
    layout: Layout, verifier: NoteVerifier, origin: str, extra: Sequence[Path]
) -> tuple[list[tuple[Checkpoint, str]], list[Damage], list[tuple[Checkpoint, str]]]:
    """One checkpoint per size (sorted), the damage found, and every checkpoint that
    verified (several may share a size: a clean stop's and a later run's)."""
    found: list[tuple[Checkpoint, str]] = []
    damage: list[Damage] = []
    sources = [*layout.checkpoint_files(), *extra]
    if layout.latest_checkpoint.exists():
        sources.append(layout.latest_checkpoint)
    for path in sources:
        name = str(path) if path in extra else path.relative_to(layout.root).as_posix()
        # A stored file that proves nothing still matters: a start refuses while one is
        # newer than the newest that verifies (it may claim records nothing signed).
        stored = path.parent == layout.checkpoints
        refuses = " (Warden does not start while it is newer than every one that does)"
        try:
            ckpt = Checkpoint.open(path.read_bytes(), verifier)
        except (ValueError, OSError) as exc:  # NoteError, or a size int() cannot read
            why = f"checkpoint {name} does not verify with the key: {exc}"
            damage.append(Damage("checkpoint", why + (refuses if stored else "")))
            continue
        if ckpt.origin != origin:
            damage.append(Damage("checkpoint", f"checkpoint {name} is for log {ckpt.origin}"))
            continue
        if stored and int(path.name) != ckpt.size:
            why = f"checkpoint {name} says size {ckpt.size}"
            damage.append(Damage("checkpoint", why + refuses))
            continue
        found.append((ckpt, name))
    by_size: dict[int, tuple[Checkpoint, str]] = {}
    for ckpt, name in found:
        other = by_size.setdefault(ckpt.size, (ckpt, name))
        if other[0].root != ckpt.root:
            damage.append(
                Damage(
                    "checkpoint", f"checkpoints {other[1]} and {name} differ at size {ckpt.size}"
                )
            )
    return sorted(by_size.values(), key=lambda c: c[0].size), damage, found


class _Walk:
    """The state of one pass over the records, kept in attributes between segments."""

    def __init__(self, segments: list[Path], checkpoints: list[tuple[Checkpoint, str]]) -> None:
        self.segments = segments
        self.checkpoints = checkpoints
        self.sizes = [c.size for c, _ in checkpoints] + [-1]  # sentinel: never a size
        self.ck_index = 0
        self.verified_at = 0  # the largest checkpoint size whose root matched
        self.stack: list[bytes] = []  # compact range, largest subtree first
        self.expected = 0
        self.last = GENESIS_PREV
        self.before_last = GENESIS_PREV
        self.damage: Damage | None = None
        self.fault: str | None = None  # the bad frame's fault, when the walk stopped at one

    def root(self) -> bytes:
        return CompactRange(self.expected, self.stack).root()

    def check_root(self) -> Damage | None:
        """Compare the root with every checkpoint at the current size."""
        while self.sizes[self.ck_index] == self.expected:
            ckpt, name = self.checkpoints[self.ck_index]
            self.ck_index += 1
            if self.root() != ckpt.root:
                return Damage(
                    "modified",
                    f"the records do not match signed checkpoint {name} (size {ckpt.size}): a "
                    f"record between {self.verified_at} and {ckpt.size - 1} was changed, "
                    "inserted, deleted or reordered and the chain rewritten to hide it",
                    seq=self.verified_at,
                )
            self.verified_at = self.expected
        return None

    def run(self) -> None:
        # A size-0 checkpoint is compared before the first record; left unmatched it
        # would hold every later comparison back (they are taken in order of size).
        self.damage = self.check_root()
        if self.damage is not None:
            return
        for index, path in enumerate(self.segments):
            self.damage = self.segment(index, path)
            if self.damage is not None:
                if self.damage.kind == "torn":
                    # A tear that takes signed records is no crash: checkpoints are
                    # signed only over synced records.
                    self.damage = self.signed_tear(self.damage) or self.damage
                return
        self.damage = self.truncated()

    def signed_tear(self, torn: Damage) -> Damage | None:
        """What a bad last frame is when a signed checkpoint covers its record: changed
        bytes when the frame is whole (its checksum fails), else a cut log."""
        cut = self.truncated()
        if cut is None or self.fault != "frame checksum mismatch":
            return cut
        ckpt, name = self.checkpoints[-1]
        return Damage(
            "modified",
            f"{self.fault}: signed checkpoint {name} covers this record ({ckpt.size} "
            "records), so its stored bytes were changed, not torn by a crash",
            torn.seq,
            None,
            torn.segment,
            torn.offset,
        )

    def truncated(self) -> Damage | None:
        """Damage when a signed checkpoint covers more records than the walk found."""
        if self.ck_index >= len(self.checkpoints):
            return None
        ckpt, name = self.checkpoints[-1]
        if ckpt.size <= self.expected:
            return None
        return Damage(
            "truncated",
            f"the log ends after {self.expected} records but signed checkpoint {name} "
            f"covers {ckpt.size}",
            self.expected,
        )

    def segment(self, index: int, path: Path) -> Damage | None:
        """Walk one segment; return the first damage in it."""
        data = path.read_bytes()
        parsed = parse_header(data)
        if parsed is None:
            return Damage(
                "modified", "the segment header is damaged", self.expected, None, path.name, 0
            )
        head, pos = parsed
        if head.size > self.expected:
            gap = self.expected, head.size - 1
            missing = f"record {gap[0]}" if gap[0] == gap[1] else f"records {gap[0]}..{gap[1]}"
            detail = f"{missing} missing: the next segment starts at record {head.size}"
            return Damage("deleted", detail, self.expected, None, path.name, 0)
        if head.size < self.expected:
            detail = (
                f"the segment starts at record {head.size}, which the log already holds: "
                "a record was inserted before it"
            )
            return Damage("inserted", detail, head.size, None, path.name, 0)
        header_ok = head.last_hash.hex() == self.last and list(head.range) == self.stack
        pos, fault, broken, damage = self.frames(data, pos, header_ok)
        if damage is not None:
            return damage
        if broken:
            # A record breaks the chain: that explains a mismatched header too.
            seen = list(_first(_peek(self.segments, index, data, pos), _LOOKAHEAD))
            kind, bad, detail = _classify(self.expected, self.last, self.before_last, seen)
            rid = seen[0].id if seen[0].seq == bad else None  # only a record's own id
            return Damage(kind, detail, bad, rid if isinstance(rid, str) else None, path.name, pos)
        if not header_ok:
            return Damage(
                "modified",
                "the segment header does not match the records before it",
                self.expected,
                None,
                path.name,
                0,
            )
        if fault is None:
            return None
        return self.frame_fault(index, path, data, pos, fault)

    def frames(
        self, data: bytes, pos: int, header_ok: bool
    ) -> tuple[int, str | None, bool, Damage | None]:
        """The hot loop: frame, checksum, parse, chain, hash, tree, checkpoint roots.

        Returns where it stopped, the frame fault there (if any), whether a
        record broke the chain there, and any checkpoint mismatch. Everything
        unusual leaves the loop and is classified by slower code.
        """
        loads, sha256, crc32, unpack = orjson.loads, hashlib.sha256, zlib.crc32, _unpack
        stack, sizes = self.stack, self.sizes
        expected, last, before_last = self.expected, self.last, self.before_last
        end = len(data)
        fault: str | None = None
        broken = False
        while pos < end:
            if end - pos < _FRAME:
                fault = _unless_zeros(data, pos, "incomplete frame header")
                break
            length, crc = unpack(data, pos)
            body = pos + _FRAME
            if length == 0 or length > MAX_FRAME:
                fault = _unless_zeros(data, pos, f"impossible frame length {length}")
                break
            if body + length > end:
                fault = "frame runs past the end of the file"
                break
            payload = data[body : body + length]
            if crc32(payload) != crc:
                fault = "frame checksum mismatch"
                break
            try:
                rec = loads(payload)
                seq = rec["seq"]
                prev = rec["prev"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                seq = prev = None
            if seq != expected or prev != last or type(seq) is not int:
                broken = True
                break
            if not header_ok:
                break
            h = sha256(b"\x00" + payload).digest()
            node, n = h, expected
            while n & 1:
                node = sha256(b"\x01" + stack.pop() + node).digest()
                n >>= 1
            stack.append(node)
            before_last = last
            last = h.hex()
            expected += 1
            pos = body + length
            if sizes[self.ck_index] == expected:
                self.expected, self.last, self.before_last = expected, last, before_last
                damage = self.check_root()
                if damage is not None:
                    return pos, None, False, damage
        self.expected, self.last, self.before_last = expected, last, before_last
        return pos, fault, broken, None

    def frame_fault(self, index: int, path: Path, data: bytes, pos: int, fault: str) -> Damage:
        """Name a bad frame: changed bytes, a torn last write, or a cut segment."""
        self.fault = fault
        if find_next_frame(data, pos) is not None:
            kind, detail = "modified", f"{fault}: the stored bytes were changed"
        elif index == len(self.segments) - 1:
            kind, detail = (
                "torn",
                f"{fault}: an interrupted write; Warden cuts it off at its next start",
            )
        else:
            kind, detail = "truncated", f"{fault}: the segment was cut short"
        return Damage(kind, detail, self.expected, None, path.name, pos)


def verify_log(
    root: Path | str,
    *,
    verifier: NoteVerifier | None = None,
    extra_checkpoints: Sequence[Path | str] = (),
) -> VerifyReport:
    """Verify the audit directory ``root``; see the module docstring.

    ``verifier`` is the key checkpoints must be signed with; by default the
    one stored in the directory (pass a key you obtained independently to
    rule out a replaced key). A given key must be the key of this log (its
    name is ``log.json``'s origin) and must verify at least one checkpoint:
    otherwise nothing here is proven by it, and that is damage of kind
    ``checkpoint``. ``extra_checkpoints`` are checkpoint files kept
    elsewhere, checked against the log like its own.

    Raises ``FileNotFoundError`` when ``root`` holds no audit log.
    """
    started = time.perf_counter()
    layout = Layout(Path(root))
    meta = layout.read_meta()
    from_directory = verifier is None
    if verifier is None:
        verifier = layout.verifier()
    extra = [Path(p) for p in extra_checkpoints]
    checkpoints, damage, every = _load_checkpoints(layout, verifier, meta.origin, extra)
    segments = list_segments(layout.segments)
    walk = _Walk(segments, checkpoints)
    walk.run()
    warnings: list[str] = []
    torn = _torn_copies(layout.root)
    if walk.damage is not None:
        if walk.damage.kind == "truncated" and torn:
            walk.damage = _with_torn(walk.damage, torn)
        damage.insert(0, walk.damage)
    appended, downgrades = _appended(every, walk.expected, layout.root, segments)
    warnings.extend(downgrades)
    if appended is not None:
        damage.insert(0 if walk.damage is None else 1, appended)
    if not from_directory:
        damage = _given_key_damage(meta.origin, verifier, checkpoints, damage)
    if walk.damage is None and appended is None and walk.verified_at < walk.expected:
        warnings.append(
            f"records {walk.verified_at}..{walk.expected - 1} are not yet covered by a signed "
            "checkpoint: records deleted from the end, changed there or added there would go "
            "unnoticed until the next checkpoint (a start after a crash takes such records on "
            f"and names them in a `{RECOVERED_KIND}` record)"
        )
    if torn:
        warnings.append(
            f"torn/ holds {len(torn)} cop{'y' if len(torn) == 1 else 'ies'} of bytes a start "
            f"cut off the end of the log ({_listed(torn)}): a crash's unfinished last write, "
            "kept for inspection and not part of the log (older Wardens also cut a signed "
            "record whose bytes were damaged)"
        )
    return VerifyReport(
        records=walk.expected,
        segments=len(segments),
        checkpoints=len(checkpoints),
        latest_checkpoint=checkpoints[-1][0].size if checkpoints else None,
        root=walk.root().hex(),
        seconds=time.perf_counter() - started,
        damage=tuple(damage),
        warnings=tuple(warnings),
        key=verifier.vkey,
        key_from_directory=from_directory,
    )


def _torn_copies(root: Path) -> list[str]:
    """The copies of torn tails a start cut off (``torn/``): names and sizes."""
    folder = root / "torn"
    if not folder.is_dir():
        return []
    copies = sorted((p.stat().st_mtime_ns, p.name, p.stat().st_size) for p in folder.iterdir())
    return [f"{name} ({size} bytes)" for _, name, size in copies]  # oldest first


def _listed(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[-most:])  # the newest
    return shown if len(names) <= most else f"{shown} and {len(names) - most} older"


def _with_torn(damage: Damage, torn: Sequence[str]) -> Damage:
    """``damage`` (a shortened log) pointing at the torn tails a start cut off."""
    detail = (
        f"{damage.detail}; torn/ holds bytes a start cut off the end ({_listed(torn)}): "
        "the missing records may be there"
    )
    return Damage(damage.kind, detail, damage.seq, damage.record_id, damage.segment, damage.offset)


def unresumed_closed(checkpoints: Sequence[Checkpoint], total: int) -> list[Checkpoint]:
    """The closed checkpoints (a clean stop) with records after them that no checkpoint
    names as resumed (``reopened``), smallest first, each once.

    A run that resumes a closed log signs, at that size and before its first
    record, a checkpoint naming the closed one, and names it in every
    checkpoint after. Whoever can write the directory but not sign cannot
    make one: records after a closed checkpoint no checkpoint names were not
    written by a run of this release of Warden.
    """
    resumed: set[tuple[int, str]] = set()
    for ckpt in checkpoints:
        resumed |= ckpt.reopens
    found: dict[str, Checkpoint] = {}
    for ckpt in checkpoints:
        if ckpt.closed and ckpt.size < total:
            digest = ckpt.digest()
            if (ckpt.size, digest) not in resumed:
                found.setdefault(digest, ckpt)
    return sorted(found.values(), key=lambda c: c.size)


def restarted_unmarked(first_kind: object) -> bool:
    """Whether records after an unresumed closed checkpoint, which a later checkpoint
    signed and no ``log_recovered`` record took on, read as the run of a Warden
    release from before closed checkpoints (a downgrade) rather than an append.

    Only a key holder signs, and this release signs past a closed checkpoint
    only naming it, or (the checkpoint removed) with a ``log_recovered``
    record. So they do when the first of them is the :data:`START_KIND` record
    a start of ``warden serve`` writes before anything else (``first_kind``):
    records appended before that start would come first.
    """
    return first_kind == START_KIND


def downgrade_warning(first: int, closed: str, later: str) -> str:
    """The warning for records a release that marks no resumption signed after ``closed``."""
    return (
        f"records from {first} follow signed checkpoint {closed}, which Warden signed when "
        f"it stopped cleanly (closed), and were signed by {later}, which does not say it "
        f"resumed the log there; record {first} is a Warden start ({START_KIND}): a Warden "
        "release from before closed checkpoints ran on this log (a downgrade). If none did, "
        'treat them as appended: see docs/audit.md, "Downgrades"'
    )


def _appended(
    every: Sequence[tuple[Checkpoint, str]], total: int, root: Path, segments: Sequence[Path]
) -> tuple[Damage | None, list[str]]:
    """Records after a closed checkpoint (a clean stop) that no later run resumed
    (:func:`unresumed_closed`): the damage for the first that was appended, and a
    warning for each an older release's start took on (:func:`restarted_unmarked`).

    Records appended and then taken on by a start as a crash's (the closed
    checkpoint removed from the directory and kept elsewhere) are named with
    the ``log_recovered`` record that took them on.
    """
    names = {id(ckpt): name for ckpt, name in every}
    warnings: list[str] = []
    for closed in unresumed_closed([c for c, _ in every], total):
        first, name = closed.size, names[id(closed)]
        later = min(((c.size, n) for c, n in every if c.size > first), default=None)
        recovery = _recovery_of(segments, first, total)
        if recovery is None and later is not None and restarted_unmarked(_kind_at(root, first)):
            warnings.append(downgrade_warning(first, name, later[1]))
            continue
        last = total - 1 if recovery is None else recovery[1]
        span = f"record {first} follows" if first == last else f"records {first}..{last} follow"
        detail = (
            f"{span} signed checkpoint {name}, which Warden signed when it stopped cleanly "
            "(closed): "
        )
        if recovery is not None:
            detail += (
                f"added after the fact, then taken on by a start as a crash's (record "
                f"{recovery[0]}, {RECOVERED_KIND}) because that checkpoint had been removed "
                "or replaced in the directory"
            )
        elif later is not None:
            detail += (
                f"signed by {later[1]}, which does not say it resumed the log there, and "
                f"record {first} is no Warden start ({START_KIND}): added after the fact and "
                "taken on by a Warden release from before closed checkpoints, unless such a "
                "release ran on this log other than as `warden serve` (docs/audit.md, "
                '"Downgrades")'
            )
        else:
            detail += "added after the fact, and no later run of Warden resumed the log there"
        found = locate(root, first)
        if found is None:
            return Damage("appended", detail, first), warnings
        return Damage("appended", detail, first, None, found[0].name, found[1]), warnings
    return None, warnings


def _kind_at(root: Path, seq: int) -> object:
    """The ``kind`` of record ``seq`` (``None`` when it cannot be read)."""
    found = locate(root, seq)
    if found is None:
        return None
    path, offset = found
    data = path.read_bytes()
    for _, payload in FrameScanner(data, offset):
        try:
            return orjson.loads(payload).get("kind")
        except (orjson.JSONDecodeError, AttributeError):
            return None
    return None


def _recovery_of(segments: Sequence[Path], first: int, total: int) -> tuple[int, int] | None:
    """The ``log_recovered`` record that took on record ``first``: its seq and the last
    record it took on; ``None`` when there is none."""
    marker = RECOVERED_KIND.encode()  # only those records are decoded
    for path in segments:
        data = path.read_bytes()
        parsed = parse_header(data)
        if parsed is None:
            return None
        seq = parsed[0].size
        for _, payload in FrameScanner(data, parsed[1]):
            if seq > first and marker in payload:
                try:
                    rec = orjson.loads(payload)
                    adopted = rec["body"]["adopted"]
                    start, last = int(adopted["first"]), int(adopted["last"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    rec, start, last = {}, -1, -1
                if rec.get("kind") == RECOVERED_KIND and start <= first <= last:
                    return seq, min(last, total - 1)
            seq += 1
    return None


def _given_key_damage(
    origin: str,
    verifier: NoteVerifier,
    checkpoints: Sequence[tuple[Checkpoint, str]],
    damage: list[Damage],
) -> list[Damage]:
    """``damage`` with what a key given by the caller did not prove.

    Without these a directory whose checkpoints were all deleted, or another
    log's directory, would read "intact" under the key: nothing it signed was
    there to contradict anything.
    """
    if verifier.name != origin:
        damage.insert(
            0,
            Damage(
                "checkpoint",
                f"log.json says this is log {origin}, but the key given is the key of "
                f"{verifier.name}: another log's directory, or its identity was changed",
            ),
        )
    if not checkpoints and not any(d.kind == "checkpoint" for d in damage):
        damage.append(
            Damage(
                "checkpoint",
                f"no checkpoint here is signed by the key given ({verifier.name}): nothing "
                "is proven by it (checkpoints deleted, or none signed yet)",
            )
        )
    return damage


def key_fingerprint(vkey: str) -> str:
    """The SHA-256 of the Ed25519 public key in a verifier key, hex: what people compare."""
    material = base64.b64decode(vkey.split("+", 2)[2])  # the base64 key may hold "+" too
    return hashlib.sha256(material[1:]).hexdigest()


def _first(items: Iterator[_Seen], n: int) -> Iterator[_Seen]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def iter_records(root: Path | str) -> Iterator[tuple[int, bytes]]:
    """``(seq, stored bytes)`` of every record, in order, up to the first bad frame.

    Meant for reading a log that :func:`verify_log` found intact.
    """
    for seq, (_, payload) in enumerate(iter_placed_records(root)):
        yield seq, payload


def iter_placed_records(root: Path | str) -> Iterator[tuple[tuple[Path, int], bytes]]:
    """:func:`iter_records` with each record's place (segment file, frame offset) for
    its seq: where a reader can find it again without keeping it."""
    for path in list_segments(Layout(Path(root)).segments):
        data = path.read_bytes()
        parsed = parse_header(data)
        if parsed is None:
            return
        scanner = FrameScanner(data, parsed[1])
        for offset, payload in scanner:
            yield (path, offset), payload
        if scanner.fault is not None:
            return
        if scanner.fault is not None:
            return
