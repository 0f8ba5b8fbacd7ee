"""Shipping the local audit log to the central store on PostgreSQL (``audit.ship``).

The local log is the spool: the shipper follows it with a
:class:`~warden.audit.tail.RecordTail` and copies records, then the signed
checkpoints that cover them, into the central tables
(:mod:`warden.audit.central`). It never touches the decision path: it reads
files that are already durable (never past :attr:`AuditLog.size`), on a
worker thread, in bounded batches, so a slow or unreachable store only makes
it fall behind, and the log keeps every record until it is shipped.

- **At least once, stored once.** Each batch is one ``INSERT ... SELECT FROM
  unnest(...) ON CONFLICT DO NOTHING`` (one round trip, one transaction),
  keyed by ``(log_id, idx)``. Where to continue is read from the store
  (``max(idx) + 1`` for this log) each time the shipper connects, so a
  crash, a restart or a lost acknowledgement ships some records twice and
  the store keeps them once.
- **Checkpoints after their records**: a checkpoint is shipped only once
  every record it covers is, so the store never holds a checkpoint it
  cannot back. The store keeps the first checkpoint of each size; those
  signed where a run of Warden stops cleanly (``closed``) or resumes a
  closed log (``reopened``) also go to ``audit_run_checkpoints``, at a size
  already shipped too: on a quiet log the one of a clean stop has the size
  of a periodic one, and without it the store could not tell records
  appended after that stop from Warden's own.
- **Outages**: a failed connection or insert is retried with exponential
  backoff up to ``max_backoff_s``; on reconnecting it continues from the
  store's position and catches up in full batches.
- **Lag**: records written but not yet shipped, and seconds since the store
  last held everything (``warden_audit_ship_lag_records`` / ``_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
from psycopg import AsyncConnection

from warden import tasks
from warden.audit.central import index_of
from warden.audit.checkpoint import Checkpoint, NoteError
from warden.audit.layout import Layout
from warden.audit.segments import LogDamaged
from warden.audit.tail import RecordTail, StoredRecord
from warden.audit.verify_evidence import split_note
from warden.config import AuditShipConfig
from warden.errors import ConfigError
from warden.ops import metrics
from warden.password_file import read_password_file
from warden.state.migrate import pg_migrate
from warden.state.postgres import PgTarget, pg_reason

__all__ = [
    "Batch",
    "ShipConflict",
    "ShipStatus",
    "Shipper",
    "columns",
    "insert_batch",
    "ship_target",
]

log = logging.getLogger("warden.audit.ship")

_MIN_BACKOFF_S: Final = 0.1
_CLOSE_TIMEOUT_S: Final = 5.0

_INSERT = (
    'INSERT INTO audit_records (log_id, idx, record_id, kind, "time", agent, decision_id, '
    "effect, line, shipped_at) "
    "SELECT %s, u.*, %s FROM unnest(%b::int8[], %b::text[], %b::text[], %b::timestamptz[], "
    "%b::text[], %b::text[], %b::text[], %b::bytea[]) AS u "
    "ON CONFLICT (log_id, idx) DO NOTHING RETURNING idx"
)
_HELD = "SELECT idx, line FROM audit_records WHERE log_id = %s AND idx = ANY(%s)"
_INSERT_RUN = (
    "INSERT INTO audit_run_checkpoints (log_id, size, digest, note, shipped_at) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
_RUNS_HELD = "SELECT note FROM audit_run_checkpoints WHERE log_id = %s"


class ShipConflict(RuntimeError):
    """The store holds other records (or another verifier key) for this log: another
    writer uses its origin. Shipping stops rather than count them as this log's."""


def ship_target(config: AuditShipConfig) -> PgTarget:
    """Where to ship: the URL and the password (read from ``password_file`` now)."""
    password = config.password.get_secret_value() if config.password is not None else None
    if password is None and config.password_file:
        password = read_password_file(config.password_file, "audit.ship.password_file")
    return PgTarget(config.url, password, config.connect_timeout_s)


@dataclass(frozen=True, slots=True)
class Batch:
    """Records ready to insert, as columns (built off the event loop)."""

    first: int
    count: int
    columns: tuple[list[Any], ...]


def columns(records: list[StoredRecord]) -> tuple[list[Any], ...]:
    """The insert's column arrays for ``records`` (``LogDamaged`` if one does not decode)."""
    idx: list[int] = []
    rid: list[str] = []
    kind: list[str] = []
    when: list[Any] = []
    agent: list[str | None] = []
    decision: list[str | None] = []
    effect: list[str | None] = []
    line: list[bytes] = []
    for rec in records:
        try:
            row = index_of(orjson.loads(rec.payload))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LogDamaged(f"record {rec.seq} does not decode") from None
        idx.append(rec.seq)
        rid.append(row.record_id)
        kind.append(row.kind)
        when.append(row.time)
        agent.append(row.agent)
        decision.append(row.decision_id)
        effect.append(row.effect)
        line.append(rec.payload)
    return idx, rid, kind, when, agent, decision, effect, line


async def insert_batch(conn: AsyncConnection[Any], log_id: str, batch: Batch) -> None:
    """Store a batch in one statement; rows the store already holds are skipped.

    Skipped only if they are these very records (shipped before a restart):
    :class:`ShipConflict` if the store holds others at those positions.
    """
    cur = await conn.execute(_INSERT, (log_id, time.time(), *batch.columns))
    stored = {int(row[0]) for row in await cur.fetchall()}
    if len(stored) < batch.count:
        idx, lines = batch.columns[0], batch.columns[-1]
        ours = {i: bytes(line) for i, line in zip(idx, lines, strict=True) if i not in stored}
        cur = await conn.execute(_HELD, (log_id, list(ours)))
        differ = sorted(int(i) for i, line in await cur.fetchall() if bytes(line) != ours[int(i)])
        if differ:
            raise ShipConflict(
                f"the store holds other records at {len(differ)} positions of log {log_id} "
                f"(the first at {differ[0]}): another writer uses this log's origin"
            )
    metrics.child(metrics.AUDIT_SHIPPED, "record").inc(batch.count)


@dataclass(frozen=True, slots=True)
class ShipStatus:
    """For ``/readyz``: whether the store is reachable and how far behind shipping is."""

    connected: bool
    shipped: int
    lag_records: int
    lag_seconds: float
    error: str | None


class Shipper:
    """Follows one audit directory and ships it; :meth:`start` after the log is open."""

    def __init__(self, config: AuditShipConfig, directory: Path | str) -> None:
        """Reads the password file now (``ConfigError``); connects only in :meth:`start`."""
        self._config = config
        self._target = ship_target(config)
        self._layout = Layout(Path(directory))
        self._size: Callable[[], int] = lambda: 0
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._wake = asyncio.Event()
        self._log_id = ""
        self._position = 0  # records the store holds (this log's next idx)
        self._checkpointed = 0  # the largest checkpoint size the store holds
        self._runs_shipped: set[str] = set()
        """Digests of the run checkpoints (closed, reopened) the store holds."""
        self._runs_named: set[tuple[int, str]] = set()
        """The closed checkpoints those name as resumed."""
        self._runs_refused = False  # the store takes no run checkpoints (warned once)
        self._caught_up_at = time.monotonic()
        self._connected = False
        self._error: str | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self, size: Callable[[], int]) -> None:
        """Start shipping; ``size`` says how many records are durable (``AuditLog.size``)."""
        self._size = size
        metrics.AUDIT_SHIP_LAG_RECORDS.set_function(lambda: float(self.lag_records))
        metrics.AUDIT_SHIP_LAG_SECONDS.set_function(self._lag_seconds)
        self._task = tasks.spawn(self._run(), name="audit-ship")

    async def close(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
        """Ship what is left (the final checkpoint too) if the store answers; then stop.

        Waits at most ``timeout_s``: what is not shipped by then stays in the
        local log and goes at the next start.
        """
        self._closing.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except TimeoutError:
                log.warning(
                    "audit shipping stopped %d records behind; they go at the next start",
                    self.lag_records,
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        metrics.AUDIT_SHIP_LAG_RECORDS.set_function(lambda: 0.0)
        metrics.AUDIT_SHIP_LAG_SECONDS.set_function(lambda: 0.0)

    def poke(self) -> None:
        """Look for new records now rather than at the next interval."""
        self._wake.set()

    # -- state -----------------------------------------------------------------

    @property
    def lag_records(self) -> int:
        """Records durable locally but not yet in the store."""
        return max(0, self._size() - self._position)

    def _lag_seconds(self) -> float:
        return 0.0 if self.lag_records == 0 else time.monotonic() - self._caught_up_at

    def status(self) -> ShipStatus:
        """Where shipping stands now."""
        return ShipStatus(
            self._connected, self._position, self.lag_records, self._lag_seconds(), self._error
        )

    # -- the loop --------------------------------------------------------------

    async def _run(self) -> None:
        backoff = _MIN_BACKOFF_S
        failing = False
        while True:
            conn: AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                self._connected, self._error = True, None
                if failing:
                    log.info("audit shipping: %s reachable again; catching up", self._target.shown)
                failing, backoff = False, _MIN_BACKOFF_S
                await self._follow(conn)
                return  # closing, and everything there was is shipped
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, LogDamaged, ConfigError, RuntimeError) as exc:
                self._connected = False
                self._error = _reason(exc, self._target.url)
                stage = "damaged" if isinstance(exc, LogDamaged) else "store"
                metrics.child(metrics.AUDIT_SHIP_ERRORS, stage).inc()
                if not failing:
                    log.warning(
                        "audit shipping to %s failed (%s); the local log keeps every record "
                        "and shipping retries",
                        self._target.shown,
                        self._error,
                    )
                failing = True
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            if self._closing.is_set():
                return  # the store is down while stopping: the spool keeps the rest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), backoff)
            backoff = min(self._config.max_backoff_s, backoff * 2)

    async def _connect(self) -> AsyncConnection[Any]:
        meta = self._layout.read_meta()
        vkey = self._layout.vkey.read_text(encoding="utf-8").strip()
        self._log_id = meta.origin
        conn = await AsyncConnection.connect(
            self._target.url, autocommit=True, **self._target.kwargs()
        )
        try:
            if self._config.migrate == "auto":
                done = await pg_migrate(conn)
                if done:
                    names = ", ".join(f"{m.version:04d}_{m.name}" for m in done)
                    log.info("audit shipping: applied %s to %s", names, self._target.shown)
            await conn.execute(
                "INSERT INTO audit_logs (log_id, vkey, created, first_seen) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (log_id) DO NOTHING",
                (meta.origin, vkey, meta.created, time.time()),
            )
            cur = await conn.execute(
                "SELECT vkey, (SELECT coalesce(max(idx) + 1, 0) FROM audit_records "
                "WHERE log_id = %s), (SELECT coalesce(max(size), 0) FROM audit_checkpoints "
                "WHERE log_id = %s) FROM audit_logs WHERE log_id = %s",
                (meta.origin, meta.origin, meta.origin),
            )
            row = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        assert row is not None
        stored_vkey, position, checkpointed = row
        if stored_vkey != vkey:
            await conn.close()
            raise ShipConflict(
                f"the store has another verifier key for log {meta.origin}: another writer "
                "uses this log's origin, or its key was replaced; nothing is shipped"
            )
        try:
            await self._check_tail(conn, meta.origin, int(position))
            await self._runs_held(conn)
        except BaseException:
            await conn.close()
            raise
        self._position, self._checkpointed = int(position), int(checkpointed)
        return conn

    async def _runs_held(self, conn: AsyncConnection[Any]) -> None:
        """Read which run checkpoints the store holds for this log (see :meth:`_ship_runs`)."""
        self._runs_shipped.clear()
        self._runs_named.clear()
        try:
            cur = await conn.execute(_RUNS_HELD, (self._log_id,))
        except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege) as exc:
            self._refuse_runs(exc)
            return
        self._runs_refused = False
        for (note,) in await cur.fetchall():
            ckpt = _run_checkpoint(str(note))
            if ckpt is not None:
                self._runs_shipped.add(ckpt.digest())
                self._runs_named |= ckpt.reopens

    def _refuse_runs(self, exc: psycopg.Error) -> None:
        if not self._runs_refused:
            log.warning(
                "audit shipping: the store does not take the checkpoints signed where Warden "
                "stops and starts (%s: %s): run `warden db migrate` on it and grant the role "
                "INSERT, SELECT on audit_run_checkpoints (docs/audit.md). Until then "
                "`warden audit verify --url` cannot tell records appended after a clean stop "
                "of a quiet log from Warden's own; records and the other checkpoints are "
                "shipped as before",
                type(exc).__name__,
                pg_reason(exc, self._target.url),
            )
        self._runs_refused = True

    async def _check_tail(self, conn: AsyncConnection[Any], origin: str, position: int) -> None:
        """:class:`ShipConflict` unless the store's last record of the log is this log's.

        Shipping resumes after the store's last record: one another writer put
        there (ahead of this log, or in place of its record) would have the
        records before it taken as shipped.
        """
        if position == 0:
            return
        size = self._size()
        if position > size:
            raise ShipConflict(
                f"the store holds {position} records of log {origin}, this log {size}: "
                "another writer uses this log's origin (or the log was restored from an "
                "older copy)"
            )
        cur = await conn.execute(_HELD, (origin, [position - 1]))
        row = await cur.fetchone()
        tail = RecordTail(self._layout.root, position - 1)
        (mine,) = await asyncio.to_thread(tail.read, position, 1)
        if row is None or bytes(row[1]) != mine.payload:
            raise ShipConflict(
                f"the store holds another record at position {position - 1} of log {origin}: "
                "another writer uses this log's origin"
            )

    async def _follow(self, conn: AsyncConnection[Any]) -> None:
        tail = RecordTail(self._layout.root, self._position)
        ahead: asyncio.Task[Batch] | None = None  # the next batch, read while one is inserted
        # The checkpoint a start signs where it resumes a closed log goes ahead of the
        # run's records, when the store already holds those before it.
        await self._ship_runs(conn)
        try:
            while True:
                written = self._size()
                if ahead is None and tail.position < written:
                    ahead = self._read_ahead(tail, written)
                if ahead is not None:
                    batch = await ahead
                    ahead = None
                    if tail.position < written:
                        ahead = self._read_ahead(tail, written)
                    await insert_batch(conn, self._log_id, batch)
                    self._position = batch.first + batch.count
                    continue
                await self._ship_checkpoints(conn)
                await self._ship_runs(conn)
                self._caught_up_at = time.monotonic()
                if self._closing.is_set():
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._config.interval_s)
        finally:
            if ahead is not None:  # a read in its thread cannot be cancelled: let it finish
                with contextlib.suppress(Exception):
                    await asyncio.shield(ahead)

    def _read_ahead(self, tail: RecordTail, written: int) -> asyncio.Task[Batch]:
        """Read and index the next batch on a thread (one at a time: the tail is not shared)."""
        first = tail.position
        size = self._config.batch

        def read() -> Batch:
            records = tail.read(written, size)
            return Batch(first, len(records), columns(records))

        return tasks.spawn(asyncio.to_thread(read), name="audit-ship-read", awaited=True)

    async def _ship_checkpoints(self, conn: AsyncConnection[Any]) -> None:
        """Ship signed checkpoints newer than the store's, once their records are there."""
        latest = await asyncio.to_thread(_latest_size, self._layout)
        if latest is None or latest <= self._checkpointed:
            return
        notes = await asyncio.to_thread(
            _notes_between, self._layout, self._checkpointed, self._position
        )
        if not notes:
            return
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO audit_checkpoints (log_id, size, note, shipped_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (log_id, size) DO NOTHING",
                [(self._log_id, size, note, time.time()) for size, note in notes],
            )
        self._checkpointed = notes[-1][0]
        metrics.child(metrics.AUDIT_SHIPPED, "checkpoint").inc(len(notes))

    async def _ship_runs(self, conn: AsyncConnection[Any]) -> None:
        """Ship the latest checkpoint to the run checkpoints if it marks a stop or a start.

        That is one signed when Warden stopped cleanly (``closed``), or one
        whose ``reopened`` lines name a closed checkpoint no run checkpoint
        shipped names yet (the first a start signs; the refreshes of a quiet
        run after it say the same and are not shipped again). Only once the
        store holds every record it covers.
        """
        if self._runs_refused:
            return
        note = await asyncio.to_thread(_latest_note, self._layout)
        ckpt = _run_checkpoint(note) if note is not None else None
        if note is None or ckpt is None or ckpt.size > self._position:
            return
        digest = ckpt.digest()
        if digest in self._runs_shipped:
            return
        if not ckpt.closed and ckpt.reopens <= self._runs_named:
            return
        try:
            await conn.execute(_INSERT_RUN, (self._log_id, ckpt.size, digest, note, time.time()))
        except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege) as exc:
            self._refuse_runs(exc)
            return
        self._runs_shipped.add(digest)
        self._runs_named |= ckpt.reopens
        metrics.child(metrics.AUDIT_SHIPPED, "checkpoint").inc()


def _run_checkpoint(note: str) -> Checkpoint | None:
    """The checkpoint in ``note`` when it marks a stop (closed) or a start (reopened)
    of a run of Warden; ``None`` otherwise, or when it does not parse. The store's
    verify checks the signature: the shipper only picks what to send."""
    try:
        text, _ = split_note(note)
        ckpt = Checkpoint.parse(text)
    except (NoteError, ValueError):
        return None
    return ckpt if ckpt.closed or ckpt.reopens else None


def _latest_note(layout: Layout) -> str | None:
    """The latest checkpoint's signed note, or ``None``."""
    try:
        return layout.latest_checkpoint.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _latest_size(layout: Layout) -> int | None:
    """The size of the latest checkpoint (its second line), or ``None``."""
    try:
        text = layout.latest_checkpoint.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    lines = text.split("\n", 2)
    return int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None


def _notes_between(layout: Layout, after: int, upto: int) -> list[tuple[int, str]]:
    """Checkpoints with ``after < size <= upto``, smallest first."""
    out: list[tuple[int, str]] = []
    for path in layout.checkpoint_files():
        size = int(path.name)
        if after < size <= upto:
            out.append((size, path.read_text(encoding="utf-8")))
    return out


def _reason(exc: BaseException, url: str) -> str:
    return f"{type(exc).__name__}: {pg_reason(exc, url)}"
