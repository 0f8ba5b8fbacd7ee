"""The decision index on the fleet's PostgreSQL: the same queries as the SQLite index.

With ``state.url: postgresql://...`` every sidecar indexes its own log into
the shared database (tables ``console_index`` and ``console_index_logs``,
migration ``0004_console_index``), keyed by the log's checkpoint origin, so
sidecars never touch each other's rows. The rows and every query are those
of :class:`warden.audit.index.DecisionIndex` (:class:`~warden.audit.index.RecordIndex`),
bounded the same way; only the dialect differs.

Blocking I/O on one psycopg connection, behind a lock: call from a thread,
as the console does. A lost connection is opened again on the next call;
meanwhile calls raise :class:`~warden.audit.index.IndexUnavailable`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg

from warden.audit.index import (
    COLUMNS,
    FILTER_COLUMNS,
    MAX_BUCKETS,
    MAX_PAGE,
    READ_BATCH,
    SCHEMA,
    Bucket,
    IndexedRecord,
    IndexQuery,
    IndexUnavailable,
    Page,
    Revision,
    epoch_of,
    fold_series,
    row_of,
    series_query,
    where_clause,
)
from warden.audit.layout import Layout
from warden.audit.tail import RecordTail
from warden.audit.verify import iter_records
from warden.errors import ConfigError
from warden.state.postgres import PgTarget, pg_reason

__all__ = ["PgDecisionIndex"]

_SHOWN = ", ".join('"time"' if c == "time" else c for c in COLUMNS if c != "ts")
_ALL = ", ".join('"time"' if c == "time" else c for c in COLUMNS)


def _clean(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL; a tool name or reason from a model may.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _values(log_id: str, rows: Iterable[tuple[int, bytes]]) -> list[tuple[Any, ...]]:
    out = []
    for seq, payload in rows:
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = {}
        row = row_of(seq, parsed if isinstance(parsed, dict) else {})
        out.append(
            (
                log_id,
                *(epoch_of(row.time) if c == "ts" else _clean(getattr(row, c)) for c in COLUMNS),
            )
        )
    return out


class PgDecisionIndex:
    """The index of one audit log, in PostgreSQL. Thread-safe; every call blocks."""

    def __init__(self, target: PgTarget, log_id: str) -> None:
        self.target = target
        self.log_id = log_id
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    @classmethod
    def open(cls, target: PgTarget, root: Path | str | None) -> PgDecisionIndex:
        """The index of the log at ``root``; :class:`ConfigError` if the tables are missing.

        ``root`` ``None``: no log yet (queries find nothing until the first
        :meth:`catch_up` or :meth:`rebuild` names one).
        """
        index = cls(target, Layout(Path(root)).read_meta().origin if root is not None else "")
        try:
            with index._cursor() as cur:
                cur.execute("SELECT to_regclass('console_index') IS NOT NULL")
                row = cur.fetchone()
        except IndexUnavailable as exc:
            raise ConfigError(f"state.url: the decision index is unreachable: {exc}") from None
        if row is None or not row[0]:
            index.close()
            raise ConfigError(
                f"state.url: {target.shown} has no decision index tables; run `warden db "
                "migrate` (or start Warden with state.migrate: auto)"
            )
        return index

    @property
    def where(self) -> str:
        """The database (password never shown) and the log's rows in it."""
        return f"{self.target.shown} (log {self.log_id})"

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor on the (re)opened connection, under the lock; errors: IndexUnavailable."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = psycopg.connect(
                        self.target.url, autocommit=True, **self.target.kwargs()
                    )
                with self._conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                # Reconnect next time: after an outage the connection may be dead.
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                # libpq quotes a URL it cannot parse, password and all: scrubbed.
                raise IndexUnavailable(pg_reason(exc, self.target.url)) from None

    # -- state -----------------------------------------------------------------

    @property
    def position(self) -> int:
        """How many records of the log are indexed (the next one's sequence number)."""
        with self._cursor() as cur:
            return self._position(cur)

    def _position(self, cur: psycopg.Cursor[Any]) -> int:
        cur.execute("SELECT MAX(seq) FROM console_index WHERE log_id = %s", (self.log_id,))
        row = cur.fetchone()
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def _matches(self, cur: psycopg.Cursor[Any], size: int) -> bool:
        cur.execute("SELECT schema FROM console_index_logs WHERE log_id = %s", (self.log_id,))
        row = cur.fetchone()
        return row is not None and int(row[0]) == SCHEMA and self._position(cur) <= size

    def _reset(self, cur: psycopg.Cursor[Any]) -> None:
        with cur.connection.transaction():
            cur.execute("DELETE FROM console_index WHERE log_id = %s", (self.log_id,))
            cur.execute(
                "INSERT INTO console_index_logs (log_id, schema, rebuilt_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (log_id) DO UPDATE SET schema = excluded.schema, "
                "rebuilt_at = excluded.rebuilt_at",
                (self.log_id, SCHEMA, time.time()),
            )

    def _insert(self, cur: psycopg.Cursor[Any], rows: Iterable[tuple[int, bytes]]) -> int:
        values = _values(self.log_id, rows)
        if values:
            marks = ", ".join("%s" for _ in range(len(COLUMNS) + 1))
            with cur.connection.transaction():
                cur.executemany(
                    f"INSERT INTO console_index (log_id, {_ALL}) VALUES ({marks}) "  # noqa: S608 - fixed columns
                    "ON CONFLICT (log_id, seq) DO NOTHING",
                    values,
                )
        return len(values)

    def _follow(self, root: Path | str) -> None:
        # Pointed at another log: its own rows, never a mix (the SQLite index starts over).
        self.log_id = Layout(Path(root)).read_meta().origin

    # -- filling ---------------------------------------------------------------

    def catch_up(self, root: Path | str, size: int, *, limit: int = 20_000) -> int:
        """Index records from :attr:`position` up to ``size`` (at most ``limit``); how many.

        Only whole records are read, so this is safe while Warden appends.
        """
        self._follow(root)
        with self._cursor() as cur:
            if not self._matches(cur, size):
                self._reset(cur)
            start = self._position(cur)
            if start >= size:
                return 0
            tail = RecordTail(root, start)
            done = 0
            while done < limit and tail.position < size:
                batch = tail.read(size, min(READ_BATCH, limit - done))
                if not batch:
                    break
                done += self._insert(cur, ((r.seq, r.payload) for r in batch))
            return done

    def rebuild(self, root: Path | str) -> int:
        """Drop this log's rows and index it again from record 0; how many records.

        Reads up to the first damaged frame (run ``warden audit verify`` first).
        """
        self._follow(root)
        with self._cursor() as cur:
            self._reset(cur)
            total = 0
            batch: list[tuple[int, bytes]] = []
            for item in iter_records(root):
                batch.append(item)
                if len(batch) >= READ_BATCH:
                    total += self._insert(cur, batch)
                    batch = []
            return total + self._insert(cur, batch)

    # -- queries ---------------------------------------------------------------

    def _where(self, q: IndexQuery) -> tuple[str, list[Any]]:
        where, args = where_clause(q, mark="%s", like="ILIKE", time_column='"time"')
        # The log's own rows: every query starts with its key.
        where = " WHERE log_id = %s" + (" AND " + where.removeprefix(" WHERE ") if where else "")
        return where, [self.log_id, *args]

    def search(self, q: IndexQuery) -> Page:
        """Rows matching ``q``, newest first, at most ``min(q.limit, MAX_PAGE)``."""
        limit = max(1, min(q.limit, MAX_PAGE))
        where, args = self._where(q)
        if q.before is not None:
            where += " AND seq < %s"
            args.append(q.before)
        sql = f"SELECT {_SHOWN} FROM console_index{where} ORDER BY seq DESC LIMIT %s"  # noqa: S608 - fixed columns, bound values
        with self._cursor() as cur:
            cur.execute(sql.encode(), [*args, limit + 1])
            found = cur.fetchall()
        rows = tuple(IndexedRecord(*r) for r in found[:limit])
        return Page(rows, rows[-1].seq if len(found) > limit else None)

    def get(self, seq: int) -> IndexedRecord | None:
        """The indexed fields of record ``seq``."""
        with self._cursor() as cur:
            cur.execute(
                f"SELECT {_SHOWN} FROM console_index WHERE log_id = %s AND seq = %s".encode(),  # noqa: S608 - fixed columns
                (self.log_id, seq),
            )
            row = cur.fetchone()
        return None if row is None else IndexedRecord(*row)

    def series(self, q: IndexQuery, start: float, end: float, buckets: int = 24) -> list[Bucket]:
        """Decisions by effect, added latency and errors in ``buckets`` slices of [start, end)."""
        buckets = max(1, min(buckets, MAX_BUCKETS))
        width = max((end - start) / buckets, 1e-6)
        where, args = self._where(series_query(q))
        sql = (
            "SELECT floor((ts - %s) / %s)::bigint AS b, kind, effect, "  # noqa: S608 - bound values
            "COUNT(*), AVG(elapsed_us)::float8, MAX(elapsed_us), "
            f"SUM(CASE WHEN error IS NOT NULL THEN 1 ELSE 0 END) FROM console_index{where} "
            "AND ts >= %s AND ts < %s GROUP BY b, kind, effect"
        )
        with self._cursor() as cur:
            cur.execute(sql.encode(), [start, width, *args, start, end])
            found = cur.fetchall()
        return fold_series(found, q, start, width, buckets)

    def first_time(self) -> float | None:
        """The epoch time of the oldest indexed record, or ``None`` when there is none."""
        with self._cursor() as cur:
            cur.execute("SELECT MIN(ts) FROM console_index WHERE log_id = %s", (self.log_id,))
            row = cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def distinct(self, column: str, limit: int = 100) -> list[str]:
        """The most frequent values of ``agent``, ``tool``, ``effect`` or ``mode`` in decisions."""
        if column not in FILTER_COLUMNS:
            raise ValueError(f"not a filter column: {column}")
        sql = (
            f"SELECT {column}, COUNT(*) AS n FROM console_index "  # noqa: S608 - column checked above
            f"WHERE log_id = %s AND kind = 'decision' AND {column} IS NOT NULL "
            f"GROUP BY {column} ORDER BY n DESC LIMIT %s"
        )
        with self._cursor() as cur:
            cur.execute(sql.encode(), (self.log_id, limit))
            return [str(r[0]) for r in cur.fetchall()]

    def revisions(self, limit: int = 20) -> list[Revision]:
        """Policy revisions seen in decisions, the newest first."""
        sql = (
            'SELECT revision, COUNT(*), MIN("time"), MAX("time"), '
            "SUM(CASE WHEN enforced = 'deny' OR effect = 'deny' THEN 1 ELSE 0 END) "
            "FROM console_index WHERE log_id = %s AND kind = 'decision' "
            "AND revision IS NOT NULL GROUP BY revision ORDER BY MAX(seq) DESC LIMIT %s"
        )
        with self._cursor() as cur:
            cur.execute(sql, (self.log_id, limit))
            found = cur.fetchall()
        return [Revision(str(r), int(n), str(a), str(b), int(d or 0)) for r, n, a, b, d in found]
