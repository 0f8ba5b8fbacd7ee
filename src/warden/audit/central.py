"""The central audit store on PostgreSQL: its rows, and verifying and exporting from it.

Sidecars ship their local logs here (:mod:`warden.audit.ship`); the tables
come with the state migrations (``0002_audit_store``). A record is stored as
the exact bytes of its local line plus a few columns to search by, so
:func:`verify_central` recomputes the very hashes the sidecar chained and
signed: every sidecar's chain, Merkle tree and checkpoints, with the logic of
:mod:`warden.audit.verify` applied to rows instead of segment files. It also
checks that the search columns agree with the bytes. A store where rows were
changed behind the append-only triggers (by a superuser who disabled them)
does not verify.

:func:`export_central` writes the same evidence packages, CSV and OCSF files
as ``warden audit export`` on a directory: it rebuilds the log from the store
in a temporary directory and exports that.

The checkpoints signed where a run of Warden stopped cleanly (``closed``) or
resumed a closed log (``reopened``) are also kept in ``audit_run_checkpoints``
(``0009``), even at a size ``audit_checkpoints`` already holds: verify finds
records after a clean stop that no run of Warden resumed (``appended``), as
``warden audit verify --dir`` does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
from psycopg import AsyncConnection

from warden.audit.checkpoint import Checkpoint, NoteError, NoteVerifier
from warden.audit.export import ExportError, ExportResult, Selection, export_log
from warden.audit.layout import Layout
from warden.audit.merkle import CompactRange, leaf_hash
from warden.audit.record import GENESIS_PREV
from warden.audit.segments import MAGIC, RECOVERED_KIND, TreeState, frame, segment_name
from warden.audit.verify import (
    Damage,
    VerifyReport,
    _classify,
    _parse_seen,
    _Seen,
    downgrade_warning,
    restarted_unmarked,
    unresumed_closed,
    verify_log,
)
from warden.state.postgres import PgTarget, pg_reason, redact_url

__all__ = [
    "CentralError",
    "CentralLog",
    "CentralReport",
    "RowIndex",
    "connect",
    "export_central",
    "index_of",
    "list_logs",
    "verify_central",
]

_FETCH: Final = 5000  # rows per round trip when reading a log
_LOOKAHEAD: Final = 1024  # rows read past a broken one to name the damage


class CentralError(Exception):
    """The central store cannot be read (unreachable, not migrated, no such log)."""


@dataclass(frozen=True, slots=True)
class RowIndex:
    """The columns a record is searched by, all taken from its stored bytes."""

    record_id: str
    kind: str
    time: dt.datetime
    agent: str | None
    decision_id: str | None
    effect: str | None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def index_of(doc: Mapping[str, Any]) -> RowIndex:
    """The search columns of a decoded record (``ValueError``/``KeyError`` if it is not one)."""
    kind = str(doc["kind"])
    agent = doc.get("agent")
    body = doc.get("body")
    who: str | None = None
    if isinstance(agent, Mapping):
        who = _text(agent.get("id"))
    elif isinstance(body, Mapping):
        who = _text(body.get("agent_id", body.get("agent")))
    decision_id: str | None = None
    effect: str | None = None
    decision = doc.get("decision")
    if kind == "decision" and isinstance(decision, Mapping):
        decision_id, effect = _text(decision.get("id")), _text(decision.get("effect"))
    elif isinstance(doc.get("decision_id"), str):
        decision_id = doc["decision_id"]
    elif isinstance(body, Mapping):
        decision_id = _text(body.get("decision_id"))
    when = dt.datetime.fromisoformat(str(doc["time"]))
    return RowIndex(str(doc["id"]), kind, when, who, decision_id, effect)


@dataclass(frozen=True, slots=True)
class CentralLog:
    """One sidecar's log as the store knows it."""

    log_id: str
    vkey: str
    created: str
    records: int
    checkpoints: int


@dataclass(frozen=True, slots=True)
class CentralReport:
    """What :func:`verify_central` found, one report per log."""

    url: str
    logs: tuple[tuple[CentralLog, VerifyReport], ...]
    warnings: tuple[str, ...] = field(default=())
    missing: tuple[str, ...] = field(default=())
    """The log the key given names, when the store holds no such log (its rows removed)."""

    @property
    def ok(self) -> bool:
        """True when every log verified and the log the key given names is there."""
        return not self.missing and all(report.ok for _, report in self.logs)


async def connect(target: PgTarget) -> AsyncConnection[Any]:
    """A read connection to the store; :class:`CentralError` when it cannot be made."""
    try:
        return await AsyncConnection.connect(target.url, autocommit=True, **target.kwargs())
    except psycopg.Error as exc:
        why = pg_reason(exc, target.url)
        raise CentralError(f"cannot connect to {target.shown}: {why}") from None


async def list_logs(conn: AsyncConnection[Any]) -> list[CentralLog]:
    """Every log in the store, with how many records and checkpoints it holds."""
    try:
        cur = await conn.execute(
            "SELECT l.log_id, l.vkey, l.created, "
            "(SELECT count(*) FROM audit_records r WHERE r.log_id = l.log_id), "
            "(SELECT count(*) FROM audit_checkpoints c WHERE c.log_id = l.log_id) "
            "FROM audit_logs l ORDER BY l.log_id"
        )
    except psycopg.errors.UndefinedTable:
        raise CentralError("the database holds no audit store (run `warden db migrate`)") from None
    return [
        CentralLog(str(a), str(b), str(c), int(d), int(e)) for a, b, c, d, e in await cur.fetchall()
    ]


async def _rows(conn: AsyncConnection[Any], log_id: str) -> AsyncGenerator[tuple[Any, ...], None]:
    """The log's records in index order, read in chunks by a server-side cursor."""
    async with conn.transaction(), conn.cursor(name="warden_audit_rows") as cur:
        await cur.execute(
            'SELECT idx, record_id, kind, "time", agent, decision_id, effect, line '
            "FROM audit_records WHERE log_id = %s ORDER BY idx",
            (log_id,),
        )
        while rows := await cur.fetchmany(_FETCH):
            for row in rows:
                yield row


async def _checkpoints(conn: AsyncConnection[Any], log_id: str) -> list[tuple[int, str]]:
    cur = await conn.execute(
        "SELECT size, note FROM audit_checkpoints WHERE log_id = %s ORDER BY size", (log_id,)
    )
    return [(int(size), str(note)) for size, note in await cur.fetchall()]


async def _run_checkpoints(
    conn: AsyncConnection[Any], log_id: str
) -> list[tuple[int, str, str]] | None:
    """The log's run checkpoints (size, digest, note); ``None`` when the store has none
    to read (not migrated to 0009, or the role may not read that table)."""
    try:
        cur = await conn.execute(
            "SELECT size, digest, note FROM audit_run_checkpoints WHERE log_id = %s "
            "ORDER BY size, digest",
            (log_id,),
        )
    except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
        return None
    return [(int(size), str(digest), str(note)) for size, digest, note in await cur.fetchall()]


def _open_checkpoints(
    log_id: str,
    notes: Sequence[tuple[int, str]],
    verifier: NoteVerifier,
    *,
    where: str = "",
    digests: Sequence[str] = (),
) -> tuple[list[Checkpoint], list[Damage]]:
    """The notes that verify as this log's checkpoints of their stored size, and damage
    for the others. ``digests``: the digest each is stored under (run checkpoints)."""
    found: list[Checkpoint] = []
    damage: list[Damage] = []
    for i, (size, note) in enumerate(notes):
        named = f"checkpoint{where} at size {size}"
        try:
            ckpt = Checkpoint.open(note, verifier)
        except ValueError as exc:  # NoteError, or a size int() cannot read
            damage.append(Damage("checkpoint", f"{named}: {exc}"))
            continue
        if ckpt.origin != log_id:
            damage.append(Damage("checkpoint", f"{named} is for log {ckpt.origin}"))
        elif ckpt.size != size:
            damage.append(Damage("checkpoint", f"{named} says {ckpt.size}"))
        elif digests and digests[i] != ckpt.digest():
            damage.append(Damage("checkpoint", f"{named} is stored under another digest"))
        else:
            found.append(ckpt)
    return found, damage


class _RowWalk:
    """One pass over a log's rows: chain, tree, checkpoints, search columns."""

    def __init__(self, checkpoints: list[Checkpoint]) -> None:
        self.checkpoints = checkpoints
        self.sizes = [c.size for c in checkpoints] + [-1]  # sentinel: never a size
        self.ck = 0
        self.verified_at = 0
        self.tree = CompactRange()
        self.expected = 0
        self.last = GENESIS_PREV
        self.before_last = GENESIS_PREV
        self.closed_at = {c.size for c in checkpoints if c.closed}
        self.kinds: dict[int, str] = {}
        """The kind of the record after each closed checkpoint."""
        self.recovered: list[tuple[int, int, int]] = []
        """The ``log_recovered`` records: seq, and the first and last record taken on."""

    def check_root(self) -> Damage | None:
        while self.sizes[self.ck] == self.expected:
            ckpt = self.checkpoints[self.ck]
            self.ck += 1
            if self.tree.root() != ckpt.root:
                return Damage(
                    "modified",
                    f"the records do not match the signed checkpoint at size {ckpt.size}: a "
                    f"record between {self.verified_at} and {ckpt.size - 1} was changed, "
                    "inserted, deleted or reordered and the chain rewritten to hide it",
                    seq=self.verified_at,
                )
            self.verified_at = self.expected
        return None

    def row(self, row: tuple[Any, ...]) -> Damage | str | None:
        """Check one row; a :class:`Damage`, ``"broken"`` (classify with lookahead) or ``None``."""
        idx, record_id, kind, when, agent, decision_id, effect, line = row
        payload = bytes(line)
        if idx != self.expected:
            missing = (
                f"record {self.expected}"
                if idx == self.expected + 1
                else f"records {self.expected}..{idx - 1}"
            )
            return Damage(
                "deleted", f"{missing} missing: the next record stored is {idx}", self.expected
            )
        try:
            doc = orjson.loads(payload)
            seq, prev = doc["seq"], doc["prev"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return "broken"
        if seq != self.expected or prev != self.last or type(seq) is not int:
            return "broken"
        try:
            index = index_of(doc)
        except (KeyError, TypeError, ValueError):
            index = None
        stored = RowIndex(record_id, kind, when, agent, decision_id, effect)
        if index != stored:
            differ = (
                [f for f in RowIndex.__slots__ if getattr(index, f) != getattr(stored, f)]
                if index is not None
                else ["all"]
            )
            return Damage(
                "modified",
                f"its search columns ({', '.join(differ)}) disagree with its stored bytes",
                self.expected,
                record_id if isinstance(record_id, str) else None,
            )
        if seq in self.closed_at:
            self.kinds[seq] = kind
        if kind == RECOVERED_KIND:
            self.recovered.append((seq, *_adopted(doc)))
        h = leaf_hash(payload)
        self.tree.append(h)
        self.before_last, self.last = self.last, h.hex()
        self.expected += 1
        return self.check_root()


async def _load_checkpoints(
    conn: AsyncConnection[Any], log: CentralLog, verifier: NoteVerifier
) -> tuple[list[Checkpoint], list[Checkpoint], list[Damage], bool]:
    """The log's checkpoints (one per size), its run checkpoints, the damage found in
    either, and whether the store has run checkpoints at all (migration 0009)."""
    checkpoints, damage = _open_checkpoints(
        log.log_id, await _checkpoints(conn, log.log_id), verifier
    )
    stored = await _run_checkpoints(conn, log.log_id)
    runs, run_damage = _open_checkpoints(
        log.log_id,
        [(size, note) for size, _, note in stored or ()],
        verifier,
        where=" of a run",
        digests=[digest for _, digest, _ in stored or ()],
    )
    return checkpoints, runs, damage + run_damage, stored is not None


async def _verify_log(
    conn: AsyncConnection[Any], log: CentralLog, verifier: NoteVerifier
) -> VerifyReport:
    started = time.perf_counter()
    checkpoints, runs, damage, migrated = await _load_checkpoints(conn, log, verifier)
    # Run checkpoints are checked against the tree too, but how far the log goes is
    # told by audit_checkpoints alone (rows removed there are found as before).
    walk = _RowWalk(sorted([*checkpoints, *runs], key=lambda c: c.size))
    found: Damage | None = None
    rows = _rows(conn, log.log_id)
    async for row in rows:
        result = walk.row(row)
        if result is None:
            continue
        if isinstance(result, Damage):
            found = result
            break
        seen: list[_Seen] = [_parse_seen(bytes(row[7]))]
        async for later in rows:
            seen.append(_parse_seen(bytes(later[7])))
            if len(seen) >= _LOOKAHEAD:
                break
        kind, bad, detail = _classify(walk.expected, walk.last, walk.before_last, seen)
        rid = seen[0].id if seen[0].seq == bad and isinstance(seen[0].id, str) else None
        found = Damage(kind, detail, bad, rid)
        break
    await rows.aclose()
    if found is None and walk.expected == 0:
        found = walk.check_root()
    if found is None and checkpoints and checkpoints[-1].size > walk.expected:
        last = checkpoints[-1]
        found = Damage(
            "truncated",
            f"the store ends after {walk.expected} records but the signed checkpoint at "
            f"size {last.size} covers {last.size}",
            walk.expected,
        )
    warnings: list[str] = []
    if not migrated:
        warnings.append(
            "audit_run_checkpoints cannot be read (run `warden db migrate` on the store, "
            "and grant this role SELECT on it): records appended after a clean stop of a "
            "quiet sidecar, then taken on as a crash's, cannot be told from its own"
        )
    appended = _appended([*checkpoints, *runs], walk.expected, walk.kinds, walk.recovered, warnings)
    if found is not None:
        damage.insert(0, found)
    if appended is not None:
        damage.insert(0 if found is None else 1, appended)
    if found is None and appended is None and walk.verified_at < walk.expected:
        warnings.append(
            f"records {walk.verified_at}..{walk.expected - 1} are not yet covered by a shipped "
            "signed checkpoint"
        )
    return VerifyReport(
        records=walk.expected,
        segments=0,
        checkpoints=len(checkpoints),
        latest_checkpoint=checkpoints[-1].size if checkpoints else None,
        root=walk.tree.root().hex(),
        seconds=time.perf_counter() - started,
        damage=tuple(damage),
        warnings=tuple(warnings),
    )


def _adopted(doc: Mapping[str, Any]) -> tuple[int, int]:
    """The records a ``log_recovered`` record says its start took on (``-1, -1``: unreadable)."""
    try:
        adopted = doc["body"]["adopted"]
        return int(adopted["first"]), int(adopted["last"])
    except (KeyError, TypeError, ValueError):
        return -1, -1


def _appended(
    checkpoints: Sequence[Checkpoint],
    total: int,
    kinds: Mapping[int, str],
    recovered: Sequence[tuple[int, int, int]],
    warnings: list[str],
) -> Damage | None:
    """Records after a closed checkpoint that no run of Warden resumed, as
    :func:`warden.audit.verify.verify_log` finds them: the damage for the first appended;
    a warning for those no shipped checkpoint covers yet (the one naming the run that
    resumed the log may still be on its way), and for those a Warden release from
    before closed checkpoints took on (a downgrade)."""
    for closed in unresumed_closed(checkpoints, total):
        first = closed.size
        at = f"the checkpoint at size {first}, which Warden signed when it stopped cleanly"
        later = min((c.size for c in checkpoints if c.size > first), default=None)
        took = next(((s, b) for s, a, b in recovered if a <= first <= b and s > first), None)
        if took is None and later is None:
            warnings.append(
                f"records from {first} follow {at}, and no shipped checkpoint covers them "
                "yet: the next one tells whether a run of Warden resumed the log there"
            )
            continue
        if took is None and restarted_unmarked(kinds.get(first)):
            later_at = f"the checkpoint at size {later}"
            warnings.append(downgrade_warning(first, f"at size {first}", later_at))
            continue
        last = total - 1 if took is None else min(took[1], total - 1)
        span = f"record {first} follows" if first == last else f"records {first}..{last} follow"
        detail = f"{span} {at} (closed): added after the fact, " + (
            f"then taken on by a start as a crash's (record {took[0]}, {RECOVERED_KIND}) "
            "because that checkpoint had been removed or replaced in the sidecar's directory"
            if took is not None
            else f"and the checkpoint at size {later}, which does not say it resumed the "
            "log there, signed them: taken on by a Warden release from before closed "
            "checkpoints, unless such a release ran on this log other than as `warden serve` "
            '(docs/audit.md, "Downgrades")'
        )
        return Damage("appended", detail, first)
    return None


def _verifier_for(log: CentralLog, given: NoteVerifier | None) -> tuple[NoteVerifier, str | None]:
    """The key to check ``log``'s checkpoints with, and a warning when it is the stored one."""
    if given is not None and given.name == log.log_id:
        return given, None
    try:
        stored = NoteVerifier.from_vkey(log.vkey)
    except NoteError as exc:
        raise CentralError(
            f"log {log.log_id}: the stored verifier key is unusable: {exc}"
        ) from None
    note = (
        f"log {log.log_id}: checked with the verifier key stored in the database; pass the key "
        "you obtained from its operator (--key) to rule out a replaced key"
        if given is not None
        else None
    )
    return stored, note


async def verify_central(
    target: PgTarget, *, log_id: str | None = None, verifier: NoteVerifier | None = None
) -> CentralReport:
    """Verify every log in the store (or only ``log_id``).

    ``verifier``: a key obtained independently; it checks the log it names
    (its name is the log's origin). Other logs are checked with the key the
    store holds for them. The log it names must be in the store (else it is
    reported :attr:`~CentralReport.missing`) and have a checkpoint it
    verifies (else that log is damaged): rows removed by someone who
    disabled the append-only triggers must not pass for a log never shipped.
    """
    conn = await connect(target)
    try:
        logs = await list_logs(conn)
        named = verifier.name if verifier is not None else None
        missing = (named,) if named is not None and named not in {x.log_id for x in logs} else ()
        if log_id is not None:
            logs = [log for log in logs if log.log_id == log_id]
            if not logs:
                raise CentralError(f"the store holds no log {log_id!r}")
        reports: list[tuple[CentralLog, VerifyReport]] = []
        warnings: list[str] = []
        for log in logs:
            key, note = _verifier_for(log, verifier)
            if note:
                warnings.append(note)
            report = await _verify_log(conn, log, key)
            if log.log_id == named and report.checkpoints == 0 and report.ok:
                unproven = Damage(
                    "checkpoint",
                    "the store holds no checkpoint of this log: nothing in it is proven by the "
                    "key given (its checkpoints were removed, or none was shipped yet)",
                )
                report = dataclasses.replace(report, damage=(unproven,))
            reports.append((log, report))
    except psycopg.Error as exc:
        raise CentralError(f"reading {target.shown} failed: {pg_reason(exc, target.url)}") from None
    finally:
        await conn.close()
    return CentralReport(redact_url(target.url), tuple(reports), tuple(warnings), missing)


# -- export ----------------------------------------------------------------------------------


async def _rebuild(conn: AsyncConnection[Any], log: CentralLog, root: Path) -> int:
    """Write ``log`` as an audit directory at ``root``: one segment, its checkpoints, its
    key. Returns how many records it holds."""
    layout = Layout(root)
    layout.segments.mkdir(parents=True)
    layout.checkpoints.mkdir()
    layout.keys.mkdir()
    body = {"origin": log.log_id, "created": log.created, "schema": 1}
    layout.meta.write_bytes(orjson.dumps(body))
    layout.vkey.write_text(log.vkey.strip() + "\n", encoding="utf-8")
    count = 0
    with (layout.segments / segment_name(0)).open("wb") as seg:
        seg.write(MAGIC + frame(orjson.dumps(TreeState.empty().header())))
        async for row in _rows(conn, log.log_id):
            seg.write(frame(bytes(row[7])))
            count += 1
    notes = await _checkpoints(conn, log.log_id)
    for size, note in notes:
        (layout.checkpoints / f"{size:020d}").write_text(note, encoding="utf-8")
    if notes:
        layout.latest_checkpoint.write_text(notes[-1][1], encoding="utf-8")
    return count


async def _check_runs(
    conn: AsyncConnection[Any], log: CentralLog, root: Path, count: int, key: NoteVerifier
) -> None:
    """Refuse (:class:`ExportError`) a rebuilt log that its run checkpoints show damaged.

    The directory holds one checkpoint per size; the store's run checkpoints
    (a clean stop's at the size of a periodic one) are checked with it as
    checkpoints kept elsewhere, so records appended after a clean stop are
    refused as ``warden audit verify --url`` names them.
    """
    runs = [(s, d, n) for s, d, n in await _run_checkpoints(conn, log.log_id) or () if s <= count]
    if not runs:
        return
    folder = root.parent / "audit_run_checkpoints"  # how the damage found names them
    folder.mkdir()
    extra = []
    for size, digest, note in runs:
        path = folder / f"{size:020d}.{digest[:16]}"
        path.write_text(note, encoding="utf-8")
        extra.append(path)
    report = verify_log(root, verifier=key, extra_checkpoints=extra)
    if not report.ok:
        found = report.damage[0].describe().replace(f"{root.parent}/", "")
        raise ExportError(f"log {log.log_id}: the log is damaged, export refused: {found}")


async def export_central(
    target: PgTarget,
    out: Path | str,
    *,
    log_id: str | None = None,
    selection: Selection | None = None,
    fmt: str = "evidence",
    verifier: NoteVerifier | None = None,
) -> tuple[CentralLog, ExportResult]:
    """Export one log of the store like :func:`warden.audit.export.export_log`.

    ``log_id`` may be left out when the store holds one log. The log is
    verified first (a damaged one is refused), with ``verifier`` if given.
    """
    conn = await connect(target)
    try:
        logs = await list_logs(conn)
        if log_id is None:
            if len(logs) != 1:
                names = ", ".join(log.log_id for log in logs) or "none"
                raise CentralError(
                    f"the store holds {len(logs)} logs ({names}); choose one with --log"
                )
            (log,) = logs
        else:
            matching = [log for log in logs if log.log_id == log_id]
            if not matching:
                raise CentralError(f"the store holds no log {log_id!r}")
            (log,) = matching
        if verifier is not None and verifier.name != log.log_id:
            # Exporting with the stored key instead would hand over a package that
            # looks checked with the operator's key and was not.
            raise CentralError(
                f"log {log.log_id}: --key is the verifier key of {verifier.name!r}, not of "
                "this log; export refused"
            )
        key, _ = _verifier_for(log, verifier)
        with tempfile.TemporaryDirectory(prefix="warden-central-") as tmp:
            root = Path(tmp) / "log"
            count = await _rebuild(conn, log, root)
            await _check_runs(conn, log, root, count, key)
            try:
                result = export_log(
                    root, out, selection=selection or Selection(), fmt=fmt, verifier=key
                )
            except ExportError as exc:
                raise ExportError(f"log {log.log_id}: {exc}") from None
    except psycopg.Error as exc:
        raise CentralError(f"reading {target.shown} failed: {pg_reason(exc, target.url)}") from None
    finally:
        await conn.close()
    return log, result
