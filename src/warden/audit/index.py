"""The decision index: audit records made searchable, in SQLite (or PostgreSQL).

The audit log is the source of truth; the index is a cache of a few fields
per record (time, kind, agent, tool, effect, mode, reason, policy revision,
latency, error) so the console can filter, page and chart without scanning
segments. Details always come from the log itself, by sequence number.

* :meth:`DecisionIndex.catch_up` reads whole records from the index's position
  up to the number the log says are written (safe while Warden appends);
* :meth:`DecisionIndex.rebuild` (``warden audit reindex``) throws the rows
  away and reads the log from record 0;
* an index made for another log (a different checkpoint origin) or longer
  than the log is rebuilt rather than trusted.

Queries are bounded: at most :data:`MAX_PAGE` rows a page, paged by sequence
number (newest first), and charts fold a range into at most
:data:`MAX_BUCKETS` buckets. Blocking I/O: call from a thread.

:class:`RecordIndex` is the query API every backend offers: this SQLite
:class:`DecisionIndex`, and :class:`warden.audit.pg_index.PgDecisionIndex`
on the fleet's PostgreSQL (:func:`warden.audit.indexes.open_index` picks).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from warden.audit.layout import Layout
from warden.audit.tail import RecordTail
from warden.audit.verify import iter_records
from warden.errors import ConfigError
from warden.state.base import private_sqlite_file

__all__ = [
    "COLUMNS",
    "MAX_BUCKETS",
    "MAX_PAGE",
    "Bucket",
    "DecisionIndex",
    "IndexQuery",
    "IndexUnavailable",
    "IndexedRecord",
    "Page",
    "RecordIndex",
    "Revision",
    "default_index_path",
    "epoch_of",
    "fold_series",
    "row_of",
    "series_query",
    "where_clause",
]

SCHEMA = 1
MAX_PAGE = 200
"""The most rows one query returns."""
MAX_BUCKETS = 96
"""The most buckets one chart series has."""
_READ_BATCH = 2000
READ_BATCH = _READ_BATCH
"""Records read and written per batch while filling an index."""

_COLUMNS = (
    "seq",
    "id",
    "time",
    "ts",
    "kind",
    "agent",
    "tool",
    "effect",
    "enforced",
    "mode",
    "guard",
    "decision_id",
    "reason",
    "revision",
    "elapsed_us",
    "error",
    "risk",
)

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    time TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    agent TEXT,
    tool TEXT,
    effect TEXT,
    enforced TEXT,
    mode TEXT,
    guard TEXT,
    decision_id TEXT,
    reason TEXT,
    revision TEXT,
    elapsed_us INTEGER,
    error TEXT,
    risk TEXT
);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
CREATE INDEX IF NOT EXISTS records_agent ON records (agent, seq);
CREATE INDEX IF NOT EXISTS records_tool ON records (tool, seq);
CREATE INDEX IF NOT EXISTS records_kind ON records (kind, seq);
CREATE INDEX IF NOT EXISTS records_decision ON records (decision_id);
CREATE INDEX IF NOT EXISTS records_id ON records (id);
"""


class IndexUnavailable(OSError):
    """The index's database cannot be reached now (the page says so; the log is unharmed)."""


def default_index_path(audit_dir: Path | str) -> Path:
    """Where the index lives unless configured: beside the audit directory, never inside it."""
    audit = Path(audit_dir)
    return audit.parent / f"{audit.name}-index.sqlite"


@dataclass(frozen=True, slots=True)
class IndexedRecord:
    """The indexed fields of one record; ``None`` where a kind has no such field."""

    seq: int
    id: str
    time: str
    kind: str
    agent: str | None = None
    tool: str | None = None
    effect: str | None = None
    enforced: str | None = None
    mode: str | None = None
    guard: str | None = None
    decision_id: str | None = None
    reason: str | None = None
    revision: str | None = None
    elapsed_us: int | None = None
    error: str | None = None
    risk: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as the console's JSON feed shows it."""
        return {name: getattr(self, name) for name in _COLUMNS if name != "ts"}


@dataclass(frozen=True, slots=True)
class IndexQuery:
    """A bounded search: filters, a time range (RFC 3339 strings), a cursor and a page size.

    ``before`` is a sequence number: the page holds records older than it.
    """

    kinds: tuple[str, ...] = ("decision",)
    agent: str | None = None
    tool: str | None = None
    effect: str | None = None
    mode: str | None = None
    start: str | None = None
    end: str | None = None
    text: str | None = None
    """A record id, decision id or action id prefix, or a word of the reason."""
    before: int | None = None
    limit: int = 50
    decision_id: str | None = None
    """Exactly this decision id (a decision's own; the one an outcome or approval record names)."""
    guard: str | None = None
    """Exactly this guard decided (decisions: ``policy``, ``approval``, ...)."""
    after: int | None = None
    """A sequence number: only records newer than it (with ``before``, a window)."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of rows, newest first, and the cursor of the next (older) page."""

    rows: tuple[IndexedRecord, ...]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Bucket:
    """One slice of time in a chart: decisions by effect, latency and errors."""

    start: float
    """Epoch seconds."""
    effects: Mapping[str, int] = field(default_factory=dict)
    latency_avg_ms: float | None = None
    latency_max_ms: float | None = None
    errors: int = 0

    @property
    def total(self) -> int:
        """Decisions in the bucket."""
        return sum(self.effects.values())


@dataclass(frozen=True, slots=True)
class Revision:
    """A policy revision seen in decisions: how many, first and last time."""

    revision: str
    decisions: int
    first: str
    last: str
    denials: int


COLUMNS = _COLUMNS
"""The indexed fields of a record, in table order (``ts``: its time as epoch seconds)."""


def _epoch(when: str) -> float:
    try:
        return dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def epoch_of(when: str) -> float:
    """An RFC 3339 time as epoch seconds (0 when it is not one)."""
    return _epoch(when)


def _text(value: Any, limit: int = 500) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text[:limit]


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def row_of(seq: int, record: Mapping[str, Any]) -> IndexedRecord:
    """The indexed fields of a parsed record (any kind, any shape: never raises)."""
    kind = str(record.get("kind", ""))
    agent = _map(record.get("agent")).get("id")
    action = _map(record.get("action"))
    base: dict[str, Any] = {
        "seq": seq,
        "id": str(record.get("id", "")),
        "time": str(record.get("time", "")),
        "kind": kind,
        "agent": _text(agent),
        "tool": _text(action.get("tool") or (action.get("kind") if action else None)),
    }
    if kind == "decision":
        decision = _map(record.get("decision"))
        obligations = _map(decision.get("obligations"))
        reasons = decision.get("reasons")
        reason = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else None
        elapsed = decision.get("elapsed_us")
        base.update(
            effect=_text(decision.get("effect")),
            enforced=_text(decision.get("enforced")),
            mode=_text(decision.get("mode")),
            guard=_text(decision.get("guard")),
            decision_id=_text(decision.get("id")),
            reason=_text(reason),
            revision=_text(decision.get("bundle_revision")),
            elapsed_us=elapsed if isinstance(elapsed, int) else None,
            error=_text(decision.get("error")),
            risk=_text(obligations.get("risk")),
        )
    elif kind == "outcome":
        outcome = _map(record.get("outcome"))
        failed = outcome.get("error") or (
            "the tool reported an error" if outcome.get("is_error") else None
        )
        base.update(decision_id=_text(record.get("decision_id")), error=_text(failed))
    else:
        body = _map(record.get("body"))
        base.update(
            agent=_text(body.get("agent_id", body.get("agent"))) or base["agent"],
            tool=_text(body.get("tool")),
            effect=_text(body.get("verdict")),
            decision_id=_text(body.get("decision_id") or body.get("approval_id")),
            reason=_text(body.get("reason") or body.get("comment")),
        )
    return IndexedRecord(**base)


class RecordIndex(Protocol):
    """What the console and ``warden audit reindex`` need of a decision index (blocking)."""

    @property
    def where(self) -> str:
        """Where the index lives, as it may be printed (a file, or a redacted URL)."""
        ...

    @property
    def position(self) -> int:
        """How many records of the log are indexed (the next one's sequence number)."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...

    def catch_up(self, root: Path | str, size: int, *, limit: int = 20_000) -> int:
        """Index records from :attr:`position` up to ``size`` (at most ``limit``); how many."""
        ...

    def rebuild(self, root: Path | str) -> int:
        """Drop this log's rows and index it again from record 0; how many records."""
        ...

    def search(self, q: IndexQuery) -> Page:
        """Rows matching ``q``, newest first, at most ``min(q.limit, MAX_PAGE)``."""
        ...

    def get(self, seq: int) -> IndexedRecord | None:
        """The indexed fields of record ``seq``."""
        ...

    def series(self, q: IndexQuery, start: float, end: float, buckets: int = 24) -> list[Bucket]:
        """Decisions by effect, added latency and errors in ``buckets`` slices of [start, end)."""
        ...

    def first_time(self) -> float | None:
        """The epoch time of the oldest indexed record, or ``None`` when there is none."""
        ...

    def distinct(self, column: str, limit: int = 100) -> list[str]:
        """The most frequent values of a filter column in decisions."""
        ...

    def revisions(self, limit: int = 20) -> list[Revision]:
        """Policy revisions seen in decisions, the newest first."""
        ...


FILTER_COLUMNS = frozenset({"agent", "tool", "effect", "mode"})


def where_clause(
    q: IndexQuery, *, mark: str = "?", like: str = "LIKE", time_column: str = "time"
) -> tuple[str, list[Any]]:
    """The ``WHERE`` of a query's filters (bound values only), in a backend's dialect.

    ``mark`` is the placeholder (``?`` or ``%s``); ``like`` the case-insensitive
    match (SQLite's ``LIKE`` is, PostgreSQL's ``ILIKE``).
    """
    clauses: list[str] = []
    args: list[Any] = []
    if q.kinds:
        clauses.append(f"kind IN ({', '.join(mark for _ in q.kinds)})")
        args.extend(q.kinds)
    # Exact: a value an agent can put in a reason (a tool's name) never widens these.
    for column in ("agent", "tool", "effect", "mode", "decision_id", "guard"):
        value = getattr(q, column)
        if value:
            clauses.append(f"{column} = {mark}")
            args.append(value)
    if q.after is not None:
        clauses.append(f"seq > {mark}")
        args.append(q.after)
    if q.start:
        clauses.append(f"{time_column} >= {mark}")
        args.append(q.start)
    if q.end:
        clauses.append(f"{time_column} < {mark}")
        args.append(q.end)
    if q.text:
        clauses.append(f"(id = {mark} OR decision_id = {mark} OR reason {like} {mark} ESCAPE '\\')")
        escaped = q.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args.extend([q.text, q.text, f"%{escaped}%"])
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def series_query(q: IndexQuery) -> IndexQuery:
    """The filters a chart honours: decisions and outcomes (for errors), never paged."""
    return IndexQuery(kinds=("decision", "outcome"), agent=q.agent, tool=q.tool, mode=q.mode)


def fold_series(
    found: Iterable[tuple[Any, ...]],
    q: IndexQuery,
    start: float,
    width: float,
    buckets: int,
) -> list[Bucket]:
    """Chart buckets from ``(bucket, kind, effect, count, avg_us, max_us, errors)`` rows."""
    effects: list[dict[str, int]] = [{} for _ in range(buckets)]
    lat: list[list[tuple[float, float, int]]] = [[] for _ in range(buckets)]
    errors = [0] * buckets
    for slot, kind, effect, count, avg, top, errs in found:
        b = int(slot)
        if not 0 <= b < buckets:
            continue
        errors[b] += int(errs or 0)
        if kind != "decision" or (q.effect and effect != q.effect):
            continue
        key = str(effect or "unknown")
        effects[b][key] = effects[b].get(key, 0) + int(count)
        if avg is not None:
            lat[b].append((float(avg), float(top), int(count)))
    out = []
    for i in range(buckets):
        n = sum(c for _, _, c in lat[i])
        out.append(
            Bucket(
                start=start + i * width,
                effects=effects[i],
                latency_avg_ms=sum(a * c for a, _, c in lat[i]) / n / 1000 if n else None,
                latency_max_ms=max(t for _, t, _ in lat[i]) / 1000 if lat[i] else None,
                errors=errors[i],
            )
        )
    return out


class DecisionIndex:
    """An SQLite index of one audit log. Thread-safe; every call blocks."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # Records' fields (agents, tools, reasons) are for the log's readers alone: 0600.
        private_sqlite_file(self.path, "the decision index")
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_DDL)
        except sqlite3.Error as exc:
            self._db.close()
            raise ConfigError(
                f"the decision index {self.path} cannot be used: {exc}; it is only a cache "
                "of the audit log: move it away and it is built again"
            ) from None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        """The index file."""
        return str(self.path)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # -- state -----------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def position(self) -> int:
        """How many records of the log are indexed (the next one's sequence number)."""
        with self._lock:
            return self._position()

    def _position(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM records").fetchone()
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def _matches(self, origin: str, size: int) -> bool:
        return (
            self._meta("origin") == origin
            and self._meta("schema") == str(SCHEMA)
            and self._position() <= size
        )

    def _reset(self, origin: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM records")
        self._db.execute("DELETE FROM meta")
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("origin", origin), ("schema", str(SCHEMA))],
        )
        self._db.execute("COMMIT")

    def _insert(self, rows: Iterable[tuple[int, bytes]]) -> int:
        values = []
        for seq, payload in rows:
            try:
                parsed = orjson.loads(payload)
            except orjson.JSONDecodeError:
                parsed = {}
            row = row_of(seq, parsed if isinstance(parsed, dict) else {})
            values.append(
                tuple(_epoch(row.time) if c == "ts" else getattr(row, c) for c in _COLUMNS)
            )
        if values:
            marks = ", ".join("?" for _ in _COLUMNS)
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                f"INSERT OR REPLACE INTO records ({', '.join(_COLUMNS)}) VALUES ({marks})",  # noqa: S608 - fixed column names
                values,
            )
            self._db.execute("COMMIT")
        return len(values)

    # -- filling ---------------------------------------------------------------

    def catch_up(self, root: Path | str, size: int, *, limit: int = 20_000) -> int:
        """Index records from :attr:`position` up to ``size`` (at most ``limit``); how many.

        ``size`` must not exceed the number of records written: only whole
        records are read, so this is safe while Warden appends to the log.
        """
        origin = Layout(Path(root)).read_meta().origin
        with self._lock:
            if not self._matches(origin, size):
                self._reset(origin)
            start = self._position()
            if start >= size:
                return 0
            tail = RecordTail(root, start)
            done = 0
            while done < limit and tail.position < size:
                batch = tail.read(size, min(_READ_BATCH, limit - done))
                if not batch:
                    break
                done += self._insert((r.seq, r.payload) for r in batch)
            return done

    def rebuild(self, root: Path | str) -> int:
        """Drop every row and index the whole log from record 0; how many records.

        Reads up to the first damaged frame (run ``warden audit verify`` first).
        """
        origin = Layout(Path(root)).read_meta().origin
        with self._lock:
            self._reset(origin)
            total = 0
            batch: list[tuple[int, bytes]] = []
            for item in iter_records(root):
                batch.append(item)
                if len(batch) >= _READ_BATCH:
                    total += self._insert(batch)
                    batch = []
            return total + self._insert(batch)

    # -- queries ---------------------------------------------------------------

    @staticmethod
    def _where(q: IndexQuery) -> tuple[str, list[Any]]:
        return where_clause(q)

    def search(self, q: IndexQuery) -> Page:
        """Rows matching ``q``, newest first, at most ``min(q.limit, MAX_PAGE)``."""
        limit = max(1, min(q.limit, MAX_PAGE))
        where, args = self._where(q)
        if q.before is not None:
            where += (" AND " if where else " WHERE ") + "seq < ?"
            args.append(q.before)
        sql = (
            f"SELECT {', '.join(c for c in _COLUMNS if c != 'ts')} FROM records"  # noqa: S608 - fixed columns, bound values
            f"{where} ORDER BY seq DESC LIMIT ?"
        )
        with self._lock:
            found = self._db.execute(sql, [*args, limit + 1]).fetchall()
        rows = tuple(IndexedRecord(*r) for r in found[:limit])
        return Page(rows, rows[-1].seq if len(found) > limit else None)

    def get(self, seq: int) -> IndexedRecord | None:
        """The indexed fields of record ``seq``."""
        columns = ", ".join(c for c in _COLUMNS if c != "ts")
        with self._lock:
            row = self._db.execute(
                f"SELECT {columns} FROM records WHERE seq = ?",  # noqa: S608 - fixed columns
                (seq,),
            ).fetchone()
        return None if row is None else IndexedRecord(*row)

    def series(self, q: IndexQuery, start: float, end: float, buckets: int = 24) -> list[Bucket]:
        """Decisions by effect, added latency and errors in ``buckets`` slices of [start, end)."""
        buckets = max(1, min(buckets, MAX_BUCKETS))
        width = max((end - start) / buckets, 1e-6)
        where, args = self._where(series_query(q))
        where += (" AND " if where else " WHERE ") + "ts >= ? AND ts < ?"
        sql = (
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS b, kind, effect, "  # noqa: S608 - bound values
            "COUNT(*), AVG(elapsed_us), MAX(elapsed_us), "
            f"SUM(CASE WHEN error IS NOT NULL THEN 1 ELSE 0 END) FROM records{where} "
            "GROUP BY b, kind, effect"
        )
        with self._lock:
            found = self._db.execute(sql, [start, width, *args, start, end]).fetchall()
        return fold_series(found, q, start, width, buckets)

    def first_time(self) -> float | None:
        """The epoch time of the oldest indexed record, or ``None`` when there is none."""
        with self._lock:
            row = self._db.execute("SELECT MIN(ts) FROM records").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def distinct(self, column: str, limit: int = 100) -> list[str]:
        """The most frequent values of ``agent``, ``tool``, ``effect`` or ``mode`` in decisions."""
        if column not in FILTER_COLUMNS:
            raise ValueError(f"not a filter column: {column}")
        sql = (
            f"SELECT {column}, COUNT(*) AS n FROM records "  # noqa: S608 - column checked above
            f"WHERE kind = 'decision' AND {column} IS NOT NULL "
            f"GROUP BY {column} ORDER BY n DESC LIMIT ?"
        )
        with self._lock:
            return [str(r[0]) for r in self._db.execute(sql, (limit,)).fetchall()]

    def revisions(self, limit: int = 20) -> list[Revision]:
        """Policy revisions seen in decisions, the newest first."""
        sql = (
            "SELECT revision, COUNT(*), MIN(time), MAX(time), "
            "SUM(CASE WHEN enforced = 'deny' OR effect = 'deny' THEN 1 ELSE 0 END) "
            "FROM records WHERE kind = 'decision' AND revision IS NOT NULL "
            "GROUP BY revision ORDER BY MAX(seq) DESC LIMIT ?"
        )
        with self._lock:
            found = self._db.execute(sql, (limit,)).fetchall()
        return [Revision(str(r), int(n), str(a), str(b), int(d or 0)) for r, n, a, b, d in found]
