"""Evidence for auditors: packages they check offline, SIEM exports and single proofs.

``export_log`` first verifies the whole log (a damaged log is not exported),
then selects the records of a period (and optionally one agent) that the
latest signed checkpoint covers, and writes one of:

* ``evidence`` (a directory): ``records.jsonl`` (the stored bytes, one record
  per line), ``proofs.jsonl`` (an inclusion proof per record), the signed
  ``checkpoint`` with the verifier key, an optional consistency proof from an
  earlier checkpoint, ``selection.json`` (the period, the agent filter and
  the run of records it covers), ``SUMMARY.md``, ``VERIFY.md``, a copy of the
  standalone ``verify_evidence.py`` (for convenience: auditors run one they
  obtained themselves) and ``MANIFEST.sha256``;
* ``csv``: one row per record for spreadsheets;
* ``ocsf``: OCSF 1.6 API Activity events (class 6003), one JSON object per line.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import hashlib
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, overload

import orjson

from warden.audit.changelog import ChangeLog, DecisionLink, describe
from warden.audit.changes import CHANGE_KINDS
from warden.audit.checkpoint import Checkpoint, NoteVerifier
from warden.audit.layout import Layout
from warden.audit.merkle import MerkleTree, leaf_hash, verify_inclusion
from warden.audit.verify import iter_records, verify_log
from warden.audit.verify_evidence import checkpoint_time, split_note

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportResult",
    "Selection",
    "export_log",
    "inclusion_proof",
    "parse_time",
]

EXPORT_FORMATS = ("evidence", "csv", "ocsf")
OCSF_VERSION = "1.6.0"
_MAX_LISTED = 1000  # approvals and denials listed one by one in SUMMARY.md
_MAX_BETWEEN = 10_000  # records outside the period held in case a later one is inside
_STANDALONE = Path(__file__).with_name("verify_evidence.py")


class ExportError(Exception):
    """The export cannot be made: damaged log, unknown record, unusable output path."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Which records to export: a time range (``start`` inclusive, ``end`` exclusive) and agent."""

    start: str | None = None
    end: str | None = None
    agent: str | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` (parsed) falls in the selection."""
        when = record.get("time", "")
        if self.start is not None and when < self.start:
            return False
        if self.end is not None and when >= self.end:
            return False
        return self.agent is None or _agent_of(record) == self.agent


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What was exported, and what could not be (not yet under a checkpoint)."""

    path: Path
    format: str
    records: int
    tree_size: int
    uncovered: int
    signed_at: str | None = None
    """When the checkpoint the package leads to was signed (``None``: it carries no time)."""
    shortened: bool = False
    """The period asked for ends after that checkpoint was signed: the package declares
    (and covers) it up to :attr:`signed_at` only."""
    unprovable: bool = False
    """The period has an end but the checkpoint carries no time (a log written before
    checkpoints did): ``verify_evidence.py`` cannot show the package complete."""


def parse_time(value: str, *, end: bool = False) -> str:
    """A ``--from``/``--to`` value as the record time format, for string comparison.

    Accepts RFC 3339 timestamps and bare dates; a bare date as ``end`` means
    the end of that day, so ``--to 2026-11-30`` includes the 30th.
    """
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            when = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            if end:
                when += dt.timedelta(days=1)
        else:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
        return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise ExportError(f"{value!r} is not a date (2026-11-30) or RFC 3339 time") from None
    except OverflowError:  # 9999-12-31 as an end, 0001-01-01T00:00+01:00 in UTC
        raise ExportError(f"{value!r} is outside the years 1 to 9999 in UTC") from None


def _agent_of(record: Mapping[str, Any]) -> str | None:
    agent = record.get("agent")
    if isinstance(agent, Mapping):
        return str(agent.get("id"))
    body = record.get("body")
    if isinstance(body, Mapping):
        found = body.get("agent_id", body.get("agent"))
        return found if isinstance(found, str) else None
    return None


@dataclass(frozen=True, slots=True)
class _Loaded:
    tree: MerkleTree
    checkpoint: Checkpoint
    note: str
    notes_by_size: dict[int, str]
    selected: list[tuple[int, bytes, dict[str, Any]]]
    uncovered: int
    changes: ChangeLog = field(default_factory=ChangeLog)
    """Every change-management record of the log (see :mod:`warden.audit.changelog`)."""
    links: dict[int, DecisionLink] = field(default_factory=dict)
    """The activation in force for each selected decision, by sequence number."""
    change_records: dict[int, bytes] = field(default_factory=dict)
    """The stored bytes of every change-management record, by sequence number: the
    change log proves the entries the package's records do not."""
    edges: tuple[tuple[int, bytes] | None, tuple[int, bytes] | None] = (None, None)
    """The records just before and just after the selected run (unfiltered selections):
    outside the period, they prove no record of it was left out at either end. With no
    record selected, the adjacent pair the period falls between: the last record dated
    before it (``None``: the period starts before record 0) and the next one (``None``:
    the period ends past the checkpoint's last record)."""


class _Between:
    """Records outside the selection between two inside it, for an unfiltered package.

    Without an agent filter a package is one unbroken run of records, which the
    auditor's verifier requires: a record whose time fell outside the period (a
    clock stepping back) between two inside it goes in too. At most
    ``_MAX_BETWEEN`` are held; past that, bridging stops for good, and a later
    match leaves a gap the verifier names, rather than the rest of the log in memory.
    """

    def __init__(self, *, bridging: bool) -> None:
        self._bridging = bridging
        self._held: list[tuple[int, bytes, dict[str, Any]]] = []

    def hold(self, entry: tuple[int, bytes, dict[str, Any]]) -> None:
        if not self._bridging:
            return
        if len(self._held) >= _MAX_BETWEEN:
            self._bridging = False
            self._held.clear()
            return
        self._held.append(entry)

    def take(self) -> list[tuple[int, bytes, dict[str, Any]]]:
        held, self._held = self._held, []
        return held


class _Gap:
    """Where a period without records falls in the signed log, for an unfiltered package.

    An empty package proves nothing by itself: whoever cut the records out could
    have left it empty too. The last record dated before the period's start and
    the one right after it (``None`` past the checkpoint's last record), both
    proven in the signed tree, show nothing lies between (times not going back).
    """

    def __init__(self, start: str | None) -> None:
        self._start = start
        self.edges: tuple[tuple[int, bytes] | None, tuple[int, bytes] | None] = (None, None)

    def feed(self, seq: int, payload: bytes, record: Mapping[str, Any]) -> None:
        """The next record the checkpoint covers, in order."""
        before, after = self.edges
        if self._start is not None and record.get("time", "") < self._start:
            self.edges = ((seq, payload), None)
        elif after is None and seq == (before[0] + 1 if before is not None else 0):
            self.edges = (before, (seq, payload))


def _feed_change(
    changes: ChangeLog, stored: dict[int, bytes], entry: tuple[int, bytes, dict[str, Any]]
) -> None:
    """Feed a signed record to the change log; keep a change record's bytes for its proof."""
    seq, payload, record = entry
    changes.feed(seq, record)
    if record.get("kind") in CHANGE_KINDS:
        stored[seq] = payload


def _load(root: Path, selection: Selection, verifier: NoteVerifier | None) -> _Loaded:
    layout = Layout(root)
    if not layout.checkpoint_files():
        # Said before verify, which calls a given key that signed nothing damage.
        raise ExportError("the log has no signed checkpoint yet; nothing can be proven")
    report = verify_log(root, verifier=verifier)
    if not report.ok and not (len(report.damage) == 1 and report.damage[0].kind == "torn"):
        raise ExportError(f"the log is damaged, export refused: {report.damage[0].describe()}")
    verifier = verifier or layout.verifier()
    notes: dict[int, str] = {}
    for path in layout.checkpoint_files():
        notes[int(path.name)] = path.read_text(encoding="utf-8")
    size = max(notes)
    checkpoint = Checkpoint.open(notes[size], verifier)
    tree = MerkleTree()
    selected: list[tuple[int, bytes, dict[str, Any]]] = []
    uncovered = 0
    changes = ChangeLog()
    change_records: dict[int, bytes] = {}
    links: dict[int, DecisionLink] = {}
    between = _Between(bridging=selection.agent is None)
    previous: tuple[int, bytes] | None = None
    before: tuple[int, bytes] | None = None
    after: tuple[int, bytes] | None = None
    gap = _Gap(selection.start)
    for seq, payload in iter_records(root):
        tree.append(leaf_hash(payload))
        record = orjson.loads(payload)
        if seq < size:
            _feed_change(changes, change_records, (seq, payload, record))
            gap.feed(seq, payload, record)
        if not selection.matches(record):
            if selected and seq < size:
                between.hold((seq, payload, record))
                after = after or (seq, payload)
            previous = (seq, payload)
            continue
        if seq < size:
            if not selected:
                before = previous
            after = None
            previous = (seq, payload)
            for entry in (*between.take(), (seq, payload, record)):
                selected.append(entry)
                link = changes.link(entry[2])
                if link is not None:
                    links[entry[0]] = link
        else:
            uncovered += 1
    # Filtered, other agents' records are not in the package: no edge can prove anything.
    edges = (
        (None, None) if selection.agent is not None else (before, after) if selected else gap.edges
    )
    return _Loaded(
        tree,
        checkpoint,
        notes[size],
        notes,
        selected,
        uncovered,
        changes,
        links,
        change_records,
        edges,
    )


def export_log(
    root: Path | str,
    out: Path | str,
    *,
    selection: Selection = Selection(),
    fmt: str = "evidence",
    verifier: NoteVerifier | None = None,
) -> ExportResult:
    """Export the selected records of the log in ``root`` to ``out`` (see module docstring)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    root, out = Path(root), Path(out)
    if fmt == "evidence" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory")
    # In the records' own time form, which the package declares and string order compares.
    selection = dataclasses.replace(
        selection,
        start=parse_time(selection.start) if selection.start is not None else None,
        end=parse_time(selection.end, end=True) if selection.end is not None else None,
    )
    start, end = selection.start, selection.end
    if start is not None and end is not None and start >= end:
        raise ExportError(f"the period from {start} to {end} does not run forward")
    signed = _latest_signed(root)
    shortened = selection.end is not None and signed is not None and signed < selection.end
    if shortened:
        # What the signed log can vouch for: the log dates a checkpoint no later than any
        # record it leaves out, so none dated before then is missing from it. The period
        # is declared up to then, not beyond.
        assert signed is not None
        if selection.start is not None and signed <= selection.start:
            raise ExportError(
                f"the latest checkpoint ({signed}) is from before the period starts: no "
                "signed checkpoint covers any of it yet (export once the next is signed)"
            )
        selection = dataclasses.replace(selection, end=signed)
    loaded = _load(root, selection, verifier)
    if fmt == "csv":
        _write_csv(out, loaded)
    elif fmt == "ocsf":
        _write_ocsf(out, loaded, Layout(root).read_meta().origin)
    else:
        _write_package(root, out, selection, loaded)
    return ExportResult(
        out,
        fmt,
        len(loaded.selected),
        loaded.checkpoint.size,
        loaded.uncovered,
        checkpoint_time(loaded.checkpoint.text()),
        shortened,
        selection.end is not None and signed is None,
    )


def _latest_signed(root: Path) -> str | None:
    """When the latest checkpoint was signed, as it says (``None``: none, or no time)."""
    files = Layout(root).checkpoint_files()
    if not files:
        return None
    try:
        body, _ = split_note(files[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # _load names what is wrong with it
    return checkpoint_time(body)


# -- evidence package --------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_FILE_MODE = 0o600
_DIR_MODE = 0o700
"""An export holds what the log holds (the log is 0640, its index 0600): its files are
its maker's alone, whatever the umask; a folder it makes too."""


@overload
def _create(path: Path, text: Literal[False] = False) -> IO[bytes]: ...
@overload
def _create(path: Path, text: Literal[True]) -> IO[str]: ...
def _create(path: Path, text: bool = False) -> IO[bytes] | IO[str]:
    """``path`` opened to write, made 0600 when it is new (a file there keeps its mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    if text:
        return os.fdopen(fd, "w", newline="", encoding="utf-8")
    return os.fdopen(fd, "wb")


def _put(path: Path, data: bytes | str) -> None:
    with _create(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _write_package(root: Path, out: Path, selection: Selection, loaded: _Loaded) -> None:
    out.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    size = loaded.checkpoint.size
    tree = loaded.tree
    verifier = Layout(root).verifier()
    with _create(out / "records.jsonl") as records, _create(out / "proofs.jsonl") as proofs:
        for seq, payload, record in loaded.selected:
            records.write(payload + b"\n")
            line = {
                "seq": seq,
                "id": record.get("id"),
                "leaf_hash": _b64(tree.leaf(seq)),
                "proof": [_b64(p) for p in tree.inclusion_proof(seq, size)],
            }
            proofs.write(orjson.dumps(line) + b"\n")
    _put(out / "checkpoint", loaded.note)
    text = loaded.checkpoint.text()
    _put(out / "checkpoint.body", text)
    signature = _own_signature(loaded.note, verifier)
    _put(out / "checkpoint.sig", signature)
    _put(out / "log-key.vkey", verifier.vkey + "\n")
    _put(out / "log-key.pem", verifier.public_pem)
    earlier = _earliest_covering(loaded)
    if earlier is not None:
        first_size, note = earlier
        _put(out / "checkpoint-earlier", note)
        proof = tree.consistency_proof(first_size, size)
        body = {
            "checkpoint": "checkpoint-earlier",
            "size1": first_size,
            "size2": size,
            "proof": [_b64(p) for p in proof],
        }
        _put(out / "consistency.json", orjson.dumps(body, option=orjson.OPT_INDENT_2))
    _write_changelog(out, selection, loaded)
    seqs = [seq for seq, _, _ in loaded.selected]
    scope = {
        "from": selection.start,
        "to": selection.end,
        "agent": selection.agent,
        "first_seq": seqs[0] if seqs else None,
        "last_seq": seqs[-1] if seqs else None,
        "records": len(seqs),
    }
    _put(out / "selection.json", orjson.dumps(scope, option=orjson.OPT_INDENT_2))
    edges = [
        {
            "side": side,
            "seq": seq,
            "record": _b64(payload),
            "proof": [_b64(p) for p in tree.inclusion_proof(seq, size)],
        }
        for side, edge in zip(("before", "after"), loaded.edges, strict=True)
        if edge is not None
        for seq, payload in [edge]
    ]
    _put(out / "edges.json", orjson.dumps(edges, option=orjson.OPT_INDENT_2))
    _put(out / "verify_evidence.py", _STANDALONE.read_bytes())
    _put(out / "SUMMARY.md", _summary(selection, loaded, verifier))
    _put(out / "VERIFY.md", _instructions(loaded))
    lines = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if name != "MANIFEST.sha256":
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n")
    _put(out / "MANIFEST.sha256", "".join(lines))


def _write_changelog(out: Path, selection: Selection, loaded: _Loaded) -> None:
    """``changelog.jsonl``: every change record up to the period's end (``in_period`` marks
    the period's own); ``activations.jsonl``: the activation each exported decision was made
    under. Change records belong to no agent: ``--agent`` does not filter them.

    A change record that is not in ``records.jsonl`` comes with its stored bytes
    (``record``, base64) and inclusion proof (``proof``): the verifier proves every
    entry, not only those of the period."""
    size = loaded.checkpoint.size
    exported = {seq for seq, _, _ in loaded.selected}
    with _create(out / "changelog.jsonl") as fh:
        for entry in loaded.changes.entries:
            if selection.end is not None and entry.time >= selection.end:
                continue
            line = entry.as_dict()
            line["in_period"] = selection.start is None or entry.time >= selection.start
            if entry.seq not in exported:
                line["record"] = _b64(loaded.change_records[entry.seq])
                line["proof"] = [_b64(p) for p in loaded.tree.inclusion_proof(entry.seq, size)]
            fh.write(orjson.dumps(line) + b"\n")
    with _create(out / "activations.jsonl") as fh:
        for seq, _, _ in loaded.selected:
            link = loaded.links.get(seq)
            if link is not None:
                fh.write(orjson.dumps({"seq": seq, **link.as_dict()}) + b"\n")


def _own_signature(note: str, verifier: NoteVerifier) -> bytes:
    _, signatures = split_note(note)
    for name, raw in signatures:
        if name == verifier.name and raw[:4] == verifier.key_hash:
            return raw[4:]
    raise ExportError("the checkpoint carries no signature by the log's key")


def _earliest_covering(loaded: _Loaded) -> tuple[int, str] | None:
    """The first checkpoint that already covered the last exported record, if older."""
    if not loaded.selected:
        return None
    last = loaded.selected[-1][0]
    for size in sorted(loaded.notes_by_size):
        if size > last:
            return (size, loaded.notes_by_size[size]) if size < loaded.checkpoint.size else None
    return None


PEM_FROM_KEY = (
    "(echo '-----BEGIN PUBLIC KEY-----'; "
    r"(printf '\060\052\060\005\006\003\053\145\160\003\041\000'; "
    """printf '%s\\n' "$KEY" | cut -d+ -f3- | openssl base64 -d | tail -c 32) | openssl base64; """
    "echo '-----END PUBLIC KEY-----') > operator-key.pem"
)
"""The shell line of VERIFY.md that writes the PEM of the verifier key in ``$KEY``: the
fixed Ed25519 SubjectPublicKeyInfo prefix and the key's last 32 bytes (after its 0x01)."""

BODY_IS_CHECKPOINT = "sed '/^$/,$d' checkpoint | cmp - checkpoint.body"
"""The shell line of VERIFY.md that checks ``checkpoint.body`` is the text of ``checkpoint``."""


def _instructions(loaded: _Loaded) -> str:
    size = loaded.checkpoint.size
    return f"""# Verifying this evidence package

Everything here can be checked offline, without trusting the people who run
Warden. You need the log's verifier key (`<origin>+<key hash>+<base64 key>`),
obtained from its operator through a separate channel: never `log-key.vkey`
or `log-key.pem` from this package, which whoever made the package chose.

## With a verifier you obtained yourself

With Warden installed on your own machine:

    warden audit verify-evidence . --key "<the verifier key the operator gave you>"

Without Warden: `verify_evidence.py` from the Warden release (Python 3.10+,
standard library), once its SHA-256 (`sha256sum verify_evidence.py`) equals
the one published with that release:

    python3 /path/to/your/verify_evidence.py . --key "<the verifier key>"

The `verify_evidence.py` in this package is a copy for convenience and proves
nothing: whoever made the package could have replaced it with one that
passes anything. Do not run it to decide whether the package is genuine.

The verifier checks all of the steps below, and `selection.json`,
`edges.json`, `changelog.jsonl` and `activations.jsonl` against the proven
records; it exits with status 0 when everything holds. It prints which files
it proved and which it did not: `SUMMARY.md` is a digest for reading, not
evidence (compare it with the counts the verifier prints from the proven
records). Without an agent filter the records must form one unbroken run, and
`edges.json` holds the records just outside it (for a package with no record,
the two records the period falls between); the verifier prints the run and the
period it covers (from `selection.json`): check they are what you asked for.
It refuses to run without `--key` unless you say `--trust-package-key`, which
finds damage but proves nothing about who signed.
The Ed25519 check uses the `cryptography` package when installed, else `openssl`.

## By hand, with standard tools

1. Files are unchanged since the package was made (`MANIFEST.sha256` is not
   signed: this finds damage, not forgery):

       sha256sum -c MANIFEST.sha256

2. The checkpoint is signed by the key the operator gave you (OpenSSL 1.1.1
   or later). Write that key's PEM from the key itself, never from this
   package:

       KEY='<the verifier key the operator gave you>'
       {PEM_FROM_KEY}
       openssl pkeyutl -verify -pubin -inkey operator-key.pem -rawin \\
           -in checkpoint.body -sigfile checkpoint.sig

   `checkpoint.sig` is the signature from the last line of `checkpoint` (a
   C2SP signed note), after the 4-byte key hash. `checkpoint.body` must be
   exactly the text above the blank line in `checkpoint` (no output means
   equal):

       {BODY_IS_CHECKPOINT}

   It holds the log's origin, the tree size ({size}) and the base64 root hash.
   The origin (its first line) must be the name the key starts with (before
   its first `+`): one key may sign several logs, and only the origin says
   which log this checkpoint is of.

       test "$(head -n 1 checkpoint.body)" = "${{KEY%%+*}}" && echo same log

3. A record's hash is SHA-256 over a zero byte and the record's line (without
   the newline). For the record on line N:

       (printf '\\0'; sed -n Np records.jsonl | tr -d '\\n') | sha256sum

   It equals `leaf_hash` (base64) on line N of `proofs.jsonl`, and the next
   record in the log carries it (hex) as `prev`.

4. The record is in the signed tree: fold the `proof` hashes into the leaf hash
   as RFC 9162 section 2.1.3.2 describes (node = SHA-256(0x01 || left || right));
   the result equals the root hash in `checkpoint.body`.

5. When `consistency.json` is present, it proves (RFC 9162 section 2.1.4.2)
   that `checkpoint-earlier` is a prefix of `checkpoint`: the log was only
   appended to between the two.

These steps prove the records. `changelog.jsonl` (each line not in
`records.jsonl` carries its record and inclusion proof), `activations.jsonl`
and `SUMMARY.md` are derived from records: the verifier checks the first two
against the proven records; by hand, check the lines you rely on likewise.

Records are the exact stored bytes. Fields that hold personal data are
encrypted per data subject (`sealed`); a subject whose key was erased cannot
be read, yet every hash above still verifies.
"""


# Line breaks Markdown renderers honour (a bare CR, U+2028/9 too) and other
# control characters: an agent-chosen tool name must not start lines of its own.
_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What makes links, images, HTML or code, and the cell's own edge (ids and tool
# names keep their underscores: intraword ``_`` is no emphasis).
_MARKDOWN = re.compile(r"([\\`\[\]<>|])")


# What GitHub's Markdown links on its own (``https://``, ``www.``, an e-mail address):
# written as character references, which render the same and link nothing.
_AUTOLINKS = re.compile(r"://|www\.|@", re.IGNORECASE)
_REFERENCES = str.maketrans({":": "&#58;", ".": "&#46;", "@": "&#64;"})


def _cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell, whatever the agent put in it."""
    text = _MARKDOWN.sub(r"\\\1", _BREAKS.sub(" ", "" if value is None else str(value)))
    return _AUTOLINKS.sub(lambda m: m.group().translate(_REFERENCES), text)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_APPROVAL_VERDICTS = {
    "approval_decided": None,  # the body's verdict: approved or rejected
    "approval_expired": "expired",
    "approval_cancelled": "cancelled",
    "approval": None,
}
_EFFECTS = ("allow", "deny", "require_approval")
_OBSERVED = tuple(f"{effect} (observe)" for effect in _EFFECTS)


def _effect_label(decision: Mapping[str, Any]) -> str:
    """A decision's effect as every table of the summary counts it: an observe-mode
    verdict (let through, ``would_deny``/``would_hold``) apart from an enforced one, as
    the verifier labels the counts it prints from the proven records."""
    effect = str(decision.get("effect"))
    return effect if decision.get("mode") == "enforce" else f"{effect} (observe)"


def _effect_columns(seen: Iterable[str]) -> list[str]:
    """The enforced effects always, then the observe-mode (and any other) labels seen."""
    labels = set(seen)
    extra = sorted(labels - {*_EFFECTS, *_OBSERVED})
    return [*_EFFECTS, *(label for label in _OBSERVED if label in labels), *extra]


def _approval_rows(selected: Iterable[tuple[int, bytes, dict[str, Any]]]) -> list[list[Any]]:
    """The Approvals table: one row per person's decision on an approval, in log order.

    The approval's own records (``approval_decided``, one per vote; expiries and
    cancellations) make the rows. The decision record that follows an approval carries
    it too (``approval``: the approvers joined by commas): it adds a row only for an
    approver no approval record of the package names (a period that starts after the
    votes, a log whose approvals left no records of their own), else each approval
    would be listed twice.
    """
    rows: list[tuple[int, list[Any]]] = []
    voted: set[tuple[str, str]] = set()  # (approval id, who) an approval record names
    ended: set[str] = set()  # approvals an approval record shows rejected, expired, cancelled
    carried: list[tuple[int, Mapping[str, Any], Any]] = []
    for index, (_, _, rec) in enumerate(selected):
        kind = rec.get("kind")
        if kind in _APPROVAL_VERDICTS:
            # Each vote, expiry and cancellation; "approval" is the older records' kind.
            body = rec.get("body")
            body = body if isinstance(body, Mapping) else {}
            who = body.get("who", body.get("approver"))
            verdict = _APPROVAL_VERDICTS[kind] or body.get("verdict")
            when = body.get("at", body.get("decided_at", rec.get("time")))
            rows.append(
                (index, [when, who, verdict, body.get("tool"), body.get("arguments_sha256")])
            )
            approval_id = body.get("approval_id")
            if isinstance(approval_id, str):
                if who is not None:
                    voted.add((approval_id, str(who)))
                if verdict != "approved":
                    ended.add(approval_id)
        elif kind == "decision" and isinstance(rec.get("approval"), Mapping):
            carried.append((index, rec["approval"], (rec.get("action") or {}).get("tool")))
    for index, approval, tool in carried:
        approval_id = str(approval.get("id"))
        approver = str(approval.get("approver") or "")
        verdict = approval.get("verdict")
        if verdict == "approved":
            # A quorum's approvers, each with the time the last of them decided.
            names = [approver] if (approval_id, approver) in voted else approver.split(",")
            missing = [name for name in names if (approval_id, name) not in voted]
        else:
            # How the approval ended (rejected, expired): its own record says it better.
            missing = [] if approval_id in ended else [approver]
        sha = approval.get("arguments_sha256")
        rows += [
            (index, [approval.get("decided_at"), name, verdict, tool, sha]) for name in missing
        ]
    rows.sort(key=lambda row: row[0])  # stable: a decision record's rows stay in order
    return [row for _, row in rows]


def _summary(selection: Selection, loaded: _Loaded, verifier: NoteVerifier) -> str:
    by_agent: dict[str, Counter[str]] = defaultdict(Counter)
    by_tool: dict[str, Counter[str]] = defaultdict(Counter)
    effects: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    denials: list[list[Any]] = []
    for _, _, rec in loaded.selected:
        kind = rec.get("kind")
        kinds[str(kind)] += 1
        if kind == "decision":
            decision = rec["decision"]
            label = _effect_label(decision)
            effects[label] += 1
            by_agent[rec["agent"]["id"]][label] += 1
            by_tool[rec["action"].get("tool") or rec["action"]["request"]["path"]][label] += 1
            if decision["effect"] == "deny":
                denials.append(
                    [
                        rec["time"],
                        rec["agent"]["id"],
                        rec["action"].get("tool"),
                        decision.get("mode"),
                        "; ".join(decision["reasons"]),
                    ]
                )
    approvals = _approval_rows(loaded.selected)
    seqs = [seq for seq, _, _ in loaded.selected]
    effect_names = _effect_columns(effects)
    parts = [
        "# Audit evidence summary\n",
        f"- Log: `{loaded.checkpoint.origin}`",
        f"- Period: {selection.start or 'beginning'} to {selection.end or 'now'} (UTC, end "
        "exclusive)" + (f"; agent `{selection.agent}` only" if selection.agent else ""),
        f"- Records: {len(seqs)}"
        + (f" (sequence numbers {seqs[0]} to {seqs[-1]})" if seqs else ""),
        f"- Signed checkpoint: tree size {loaded.checkpoint.size}, root "
        f"`{_b64(loaded.checkpoint.root)}`",
        f"- Verifier key: `{verifier.vkey}`",
    ]
    if loaded.uncovered:
        parts.append(
            f"- Not included: {loaded.uncovered} records of the period are newer than the "
            "latest checkpoint; export again after the next one"
        )
    parts += [
        "\n## Decisions by effect\n",
        _table(["effect", "decisions"], sorted(effects.items())),
        "\n## Decisions by agent\n",
        _table(
            ["agent", *effect_names],
            [[a, *(c[e] for e in effect_names)] for a, c in sorted(by_agent.items())],
        ),
        "\n## Decisions by tool\n",
        _table(
            ["tool", *effect_names],
            [[t, *(c[e] for e in effect_names)] for t, c in sorted(by_tool.items())],
        ),
        "\n## Approvals\n",
        _table(
            ["decided at", "approver", "verdict", "tool", "arguments sha256"],
            approvals[:_MAX_LISTED],
        ),
        "\n## Denials\n",
        _table(["time", "agent", "tool", "mode", "reasons"], denials[:_MAX_LISTED]),
        "\n## Records by kind\n",
        _table(["kind", "records"], sorted(kinds.items())),
    ]
    parts += ["\n## Change log\n", _change_table(selection, loaded)]
    if len(approvals) > _MAX_LISTED or len(denials) > _MAX_LISTED:
        parts.append(f"\nOnly the first {_MAX_LISTED} approvals and denials are listed.\n")
    return "\n".join(parts)


def _change_table(selection: Selection, loaded: _Loaded) -> str:
    rows = [
        [e.time, e.kind, e.id, describe(e)]
        for e in loaded.changes.entries
        if (selection.start is None or e.time >= selection.start)
        and (selection.end is None or e.time < selection.end)
    ]
    linked = Counter(link.activation_id or "(none in the log)" for link in loaded.links.values())
    text = _table(["time", "kind", "record", "change"], rows[:_MAX_LISTED])
    text += (
        "\nDecisions by the activation in force (`activations.jsonl`; earlier changes "
        "in `changelog.jsonl`):\n\n"
    )
    return text + _table(["activation record", "decisions"], sorted(linked.items()))


# -- CSV and OCSF ------------------------------------------------------------

CSV_COLUMNS = (
    "seq",
    "id",
    "time",
    "kind",
    "agent",
    "agent_version",
    "action_kind",
    "tool",
    "protocol",
    "stage",
    "effect",
    "enforced",
    "mode",
    "guard",
    "reasons",
    "bundle_revision",
    "approver",
    "approved_at",
    "status",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cost",
    "hash",
)


def _flat(seq: int, payload: bytes, rec: Mapping[str, Any]) -> dict[str, Any]:
    agent = rec.get("agent") or {}
    action = rec.get("action") or {}
    decision = rec.get("decision") or {}
    approval = rec.get("approval") or {}
    outcome = rec.get("outcome") or {}
    tokens = outcome.get("tokens") or {}
    return {
        "seq": seq,
        "id": rec.get("id"),
        "time": rec.get("time"),
        "kind": rec.get("kind"),
        "agent": agent.get("id") or _agent_of(rec),
        "agent_version": agent.get("version"),
        "action_kind": action.get("kind"),
        "tool": action.get("tool"),
        "protocol": action.get("protocol"),
        "stage": action.get("stage"),
        "effect": decision.get("effect"),
        "enforced": decision.get("enforced"),
        "mode": decision.get("mode"),
        "guard": decision.get("guard"),
        "reasons": "; ".join(decision.get("reasons") or ()),
        "bundle_revision": decision.get("bundle_revision"),
        "approver": approval.get("approver"),
        "approved_at": approval.get("decided_at"),
        "status": outcome.get("status"),
        "latency_ms": outcome.get("latency_ms"),
        "input_tokens": tokens.get("input"),
        "output_tokens": tokens.get("output"),
        "cost": outcome.get("cost"),
        "hash": leaf_hash(payload).hex(),
    }


def _write_csv(out: Path, loaded: _Loaded) -> None:
    with _create(out, text=True) as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for seq, payload, rec in loaded.selected:
            writer.writerow({k: _inert(v) for k, v in _flat(seq, payload, rec).items()})


# A cell starting with one of these is a formula to a spreadsheet (OWASP's list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: Any) -> Any:
    """Text a spreadsheet shows as written: an agent's tool name is never a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _epoch_ms(when: str) -> int:
    parsed = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    return int(parsed.timestamp() * 1000)


_HTTP_ACTIVITY = {"POST": 1, "GET": 2, "PUT": 3, "PATCH": 3, "DELETE": 4}


def ocsf_event(seq: int, payload: bytes, rec: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """One record as an OCSF API Activity event (class 6003)."""
    flat = _flat(seq, payload, rec)
    action = rec.get("action") or {}
    request = action.get("request") or {}
    decision = rec.get("decision") or {}
    outcome = rec.get("outcome") or {}
    activity = 99
    if action.get("kind") != "tool_call":
        activity = _HTTP_ACTIVITY.get(str(request.get("method", "")).upper(), 99)
    event: dict[str, Any] = {
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity,
        "type_uid": 6003 * 100 + activity,
        "time": _epoch_ms(str(rec.get("time"))),
        "severity_id": 1,
        "metadata": {
            "version": OCSF_VERSION,
            "uid": rec.get("id"),
            "original_time": rec.get("time"),
            "log_name": origin,
            "sequence": seq,
            "event_code": rec.get("kind"),
            "product": {"name": "Warden", "vendor_name": "Warden"},
            "profiles": ["security_control"],
        },
        "actor": {"app_name": flat["agent"], "user": {"uid": flat["agent"], "type_id": 99}},
        "src_endpoint": {"name": flat["agent"]},
        "api": {
            "operation": action.get("tool") or request.get("path") or rec.get("kind"),
            "service": {"name": request.get("upstream") or "warden"},
            "request": {"uid": action.get("id")},
        },
        "unmapped": {"warden": {"record_hash": flat["hash"], "record": rec}},
    }
    if activity == 99:
        event["activity_name"] = str(action.get("kind") or rec.get("kind"))
    if decision:
        blocked = decision.get("enforced") != "allow"
        event["action_id"] = 2 if blocked else 1
        event["action"] = "Denied" if blocked else "Allowed"
        event["disposition_id"] = 2 if blocked else 1
        event["status_detail"] = "; ".join(decision.get("reasons") or ())
        event["policy"] = {
            "name": decision.get("guard"),
            "version": decision.get("bundle_revision"),
        }
    if outcome:
        failed = bool(outcome.get("error") or outcome.get("is_error"))
        event["status_id"] = 2 if failed else 1
        event["api"]["response"] = {"code": outcome.get("status"), "error": outcome.get("error")}
        event["duration"] = outcome.get("latency_ms")
    return event


def _write_ocsf(out: Path, loaded: _Loaded, origin: str) -> None:
    with _create(out) as fh:
        for seq, payload, rec in loaded.selected:
            fh.write(orjson.dumps(ocsf_event(seq, payload, rec, origin)) + b"\n")


# -- single proofs -----------------------------------------------------------


def inclusion_proof(
    root: Path | str, record: str, *, verifier: NoteVerifier | None = None
) -> dict[str, Any]:
    """The inclusion proof of one record (by id or sequence number), checked before it is returned.

    The proof is against the latest signed checkpoint when it covers the
    record; otherwise against the current (unsigned) tree, and ``checkpoint``
    is ``None``.
    """
    root = Path(root)
    layout = Layout(root)
    verifier = verifier or layout.verifier()
    want = _parse_record_ref(record)
    tree = MerkleTree()
    found: tuple[int, dict[str, Any]] | None = None
    for seq, payload in iter_records(root):
        tree.append(leaf_hash(payload))
        if seq == want:
            found = (seq, orjson.loads(payload))
    if found is None or (not _is_number(record) and found[1].get("id") != record):
        raise ExportError(f"no record {record} in {root}")
    seq, rec = found
    files = layout.checkpoint_files()
    note: str | None = None
    size = len(tree)
    if files and int(files[-1].name) > seq:
        note = files[-1].read_text(encoding="utf-8")
        size = Checkpoint.open(note, verifier).size
    if size > len(tree):
        raise ExportError(f"the log is shorter than its checkpoint ({size}); run verify")
    proof = tree.inclusion_proof(seq, size)
    root_hash = tree.root(size)
    if note is not None and Checkpoint.open(note, verifier).root != root_hash:
        raise ExportError("the log does not match its latest checkpoint; run verify")
    assert verify_inclusion(tree.leaf(seq), seq, size, proof, root_hash)
    return {
        "record_id": rec.get("id"),
        "seq": seq,
        "leaf_hash": _b64(tree.leaf(seq)),
        "tree_size": size,
        "root": _b64(root_hash),
        "proof": [_b64(p) for p in proof],
        "checkpoint": note,
    }


def _is_number(text: str) -> bool:
    # ASCII only: "³" and other Unicode digits pass isdigit() but not int().
    return text.isascii() and text.isdigit()


def _parse_record_ref(record: str) -> int:
    if _is_number(record):
        return int(record)
    tail = record.rpartition("_")[2]
    try:
        return int(tail, 16)
    except ValueError:
        raise ExportError(f"{record!r} is neither a record id nor a sequence number") from None
