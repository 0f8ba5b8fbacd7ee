"""Versioned schema migrations for the state database, SQLite and PostgreSQL alike.

Migrations are SQL files shipped with Warden, one folder per backend:
``warden/state/migrations/<backend>/NNNN_name.sql``. The table
``warden_schema_version`` records each applied version with the SHA-256 of its
file. Applying is one transaction per run, serialized between processes (an
advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so sidecars that
start together apply each migration once.

On PostgreSQL the status is read before anything is created or locked, so a
role that may only read and write rows starts against a current schema; and
each statement waits at most :data:`LOCK_TIMEOUT_S` for a lock another session
holds (an ``ALTER`` waiting behind a long reader would make every later query
on that table queue behind it). What the database refuses is raised as
:class:`MigrationError`, one line saying what failed and what to do.

Migrations only ever add (tables, columns, indexes): a sidecar one release
behind keeps working against a database that a newer one migrated.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection, sql

__all__ = [
    "LOCK_TIMEOUT_S",
    "VERSION_TABLE",
    "Migration",
    "MigrationError",
    "SchemaStatus",
    "migrations",
    "pg_migrate",
    "pg_status",
    "sqlite_migrate",
    "sqlite_status",
]

VERSION_TABLE: Final = "warden_schema_version"
# pg_advisory_xact_lock key: "warden.migrate" as a 64-bit number, fixed forever.
_LOCK_KEY: Final = 0x7761726465_6E6D67
log = logging.getLogger("warden.state.migrate")
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_TIMEOUT_S: Final = 5.0
"""How long a PostgreSQL migration's statement waits for a lock before giving up."""
_READING: Final = f"reading {VERSION_TABLE}"
_MIGRATION_LOCK: Final = "taking the migration lock"


class MigrationError(RuntimeError):
    """PostgreSQL refused to read or apply the migrations; the message is one line
    naming what failed and what to do.

    A :class:`RuntimeError`, as a changed migration is: the state backend reports
    both as a configuration error naming the database (``warden serve`` exits 2).
    """


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        """SHA-256 (hex) of the file's text: an applied migration must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database stands against the migrations this Warden ships."""

    backend: str
    current: int
    """The highest applied version (0: none)."""
    pending: tuple[Migration, ...]
    changed: tuple[int, ...] = ()
    """Applied versions whose file has changed since (a broken release)."""
    unknown: tuple[int, ...] = ()
    """Applied versions this Warden does not know (a newer Warden migrated)."""

    @property
    def latest(self) -> int:
        """The highest version this Warden ships."""
        return max((m.version for m in migrations(self.backend)), default=0)


def migrations(backend: str) -> tuple[Migration, ...]:
    """The migrations shipped for ``backend`` (``sqlite`` or ``postgresql``), in order."""
    folder = resources.files("warden.state").joinpath("migrations", backend)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {backend} migrations share a version: {versions}")
    return tuple(found)


def _status(backend: str, applied: Sequence[tuple[int, str]]) -> SchemaStatus:
    shipped = {m.version: m for m in migrations(backend)}
    done = dict(applied)
    return SchemaStatus(
        backend=backend,
        current=max(done, default=0),
        pending=tuple(m for v, m in sorted(shipped.items()) if v not in done),
        changed=tuple(
            v for v, c in sorted(done.items()) if v in shipped and shipped[v].checksum != c
        ),
        unknown=tuple(v for v in sorted(done) if v not in shipped),
    )


def _refuse_changed(status: SchemaStatus) -> None:
    if status.changed:
        raise RuntimeError(
            f"applied migration(s) {list(status.changed)} differ from the files this Warden "
            "ships: the schema is not what this release expects"
        )


# -- PostgreSQL ---------------------------------------------------------------------------

_PG_TABLE = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, name text NOT NULL, "
    "checksum text NOT NULL, applied_at double precision NOT NULL)"
).format(sql.Identifier(VERSION_TABLE))


async def _pg_applied(conn: AsyncConnection[Any]) -> list[tuple[int, str]]:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,))
    row = await cur.fetchone()
    if row is None or not row[0]:
        return []
    cur = await conn.execute(
        sql.SQL("SELECT version, checksum FROM {}").format(sql.Identifier(VERSION_TABLE))
    )
    return [(int(v), str(c)) for v, c in await cur.fetchall()]


async def pg_status(
    conn: AsyncConnection[Any], *, lock_timeout_s: float = LOCK_TIMEOUT_S
) -> SchemaStatus:
    """The schema status of the database ``conn`` is connected to (reads only).

    Raises :class:`MigrationError` when the database refuses the read, or a lock
    another session holds keeps it waiting longer than ``lock_timeout_s``.
    """
    try:
        async with conn.transaction():
            await _bound_lock_waits(conn, lock_timeout_s)
            return _status("postgresql", await _pg_applied(conn))
    except psycopg.Error as exc:
        raise _failure(exc, conn, _READING, lock_timeout_s) from exc


async def pg_migrate(
    conn: AsyncConnection[Any],
    *,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    others_timeout_s: float | None = None,
) -> tuple[Migration, ...]:
    """Apply the pending migrations in one transaction; return those applied.

    A database with nothing pending is only read. Each statement waits at most
    ``lock_timeout_s`` for a lock another session holds; then nothing is
    applied. Another process migrating is waited for at most
    ``others_timeout_s``; ``None`` (a sidecar starting beside its siblings):
    for as long as it takes, said in the log. Raises :class:`MigrationError`
    when the database refuses (no right to create, a lock not granted in time,
    a half-applied schema), and :class:`RuntimeError` when an applied migration
    differs from this release's.
    """
    found = await pg_status(conn, lock_timeout_s=lock_timeout_s)
    _refuse_changed(found)
    if not found.pending:
        return ()  # no CREATE right needed, no lock taken
    step = _MIGRATION_LOCK
    try:
        async with conn.transaction():
            await _take_migration_lock(conn, others_timeout_s)
            await _bound_lock_waits(conn, lock_timeout_s)
            step = f"creating {VERSION_TABLE}"
            await conn.execute(_PG_TABLE)
            step = _READING
            status = _status("postgresql", await _pg_applied(conn))
            _refuse_changed(status)
            for m in status.pending:
                step = f"applying {m.version:04d}_{m.name}"
                await conn.execute(m.sql.encode())  # a script: many statements, no parameters
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (version, name, checksum, applied_at) "
                        "VALUES (%s, %s, %s, %s)"
                    ).format(sql.Identifier(VERSION_TABLE)),
                    (m.version, m.name, m.checksum, time.time()),
                )
            return status.pending
    except psycopg.Error as exc:
        if step == _MIGRATION_LOCK and isinstance(exc, psycopg.errors.LockNotAvailable):
            raise MigrationError(
                f"{step}: another migration of this database is in progress (a sidecar "
                "starting with state.migrate: auto, or another `warden db migrate`); waited "
                f"{others_timeout_s:g} s for it, and nothing was applied: try again once it "
                "has finished, or wait longer with `warden db migrate --lock-timeout SECONDS`"
            ) from exc
        raise _failure(exc, conn, step, lock_timeout_s, applying=True) from exc


async def _take_migration_lock(conn: AsyncConnection[Any], wait_s: float | None) -> None:
    """Take the migration lock (for the transaction), waiting at most ``wait_s`` for another
    process's migration; ``None``: as long as that takes (it holds up nobody's queries, while
    an ALTER waiting for a table's lock holds up all of them), saying so in the log."""
    cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,))
    row = await cur.fetchone()
    if row is not None and row[0]:
        return
    if wait_s is not None:
        await _bound_lock_waits(conn, wait_s)  # advisory locks heed lock_timeout too
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        return
    log.info(
        "state store: waiting for another process to finish migrating the schema "
        "(it holds the migration lock)"
    )
    started = time.monotonic()
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
    log.info(
        "state store: the other migration ended after %.1f s; going on",
        time.monotonic() - started,
    )


async def _bound_lock_waits(conn: AsyncConnection[Any], seconds: float) -> None:
    """``lock_timeout`` for the rest of the current transaction."""
    await conn.execute(
        "SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(seconds * 1000))}ms",)
    )


_DUPLICATE: Final = (
    psycopg.errors.DuplicateTable,
    psycopg.errors.DuplicateObject,
    psycopg.errors.DuplicateColumn,
    psycopg.errors.DuplicateFunction,
    psycopg.errors.DuplicateSchema,
)


def _failure(
    exc: psycopg.Error,
    conn: AsyncConnection[Any],
    step: str,
    lock_timeout_s: float,
    *,
    applying: bool = False,
) -> MigrationError:
    """What failed, in one line, and what to do about it.

    ``applying``: the step ran in the migrations' one transaction, rolled back whole.
    """
    why = exc.diag.message_primary or next(
        (line for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )
    role = conn.info.user
    undone = ", and nothing was applied" if applying else ""
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return MigrationError(
            f"{step}: waited {lock_timeout_s:g} s for a lock another session holds{undone}; "
            "end that session's transaction (pg_stat_activity shows it, often 'idle in "
            "transaction') and try again, or wait longer with "
            "`warden db migrate --lock-timeout SECONDS`"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        if not applying:
            return MigrationError(
                f"{step}: {why}: GRANT SELECT ON {VERSION_TABLE} TO {role} (as its owner)"
            )
        return MigrationError(
            f"{step}: {why} (role {role}){undone}: run `warden db migrate` as a role that "
            "may create and alter Warden's tables (the database's owner); with nothing "
            "pending, Warden's own role needs only to read and write rows"
        )
    if isinstance(exc, _DUPLICATE):
        return MigrationError(
            f"{step}: {why}, though {VERSION_TABLE} does not record it as applied: the "
            f"schema was changed outside `warden db migrate` (a partial or manual run){undone}; "
            "restore the database, or drop what that run created, then migrate again"
        )
    return MigrationError(f"{step}: {why}{undone}")


# -- SQLite ---------------------------------------------------------------------------------

_SQLITE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER PRIMARY KEY, "
    "name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at REAL NOT NULL)"
)


def _sqlite_applied(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (VERSION_TABLE,)
    ).fetchone()
    if found is None:
        return []
    rows = conn.execute(f"SELECT version, checksum FROM {VERSION_TABLE}").fetchall()  # noqa: S608
    return [(int(v), str(c)) for v, c in rows]


def sqlite_status(conn: sqlite3.Connection) -> SchemaStatus:
    """The schema status of an open SQLite database (reads only)."""
    return _status("sqlite", _sqlite_applied(conn))


def sqlite_migrate(conn: sqlite3.Connection) -> tuple[Migration, ...]:
    """Apply the pending migrations in one ``BEGIN IMMEDIATE`` transaction.

    ``conn`` must be in autocommit mode (``isolation_level=None``).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SQLITE_TABLE)
        status = _status("sqlite", _sqlite_applied(conn))
        _refuse_changed(status)
        for m in status.pending:
            for statement in _statements(m.sql):
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO {VERSION_TABLE} (version, name, checksum, applied_at) "  # noqa: S608
                "VALUES (?, ?, ?, ?)",
                (m.version, m.name, m.checksum, time.time()),
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return status.pending


def _statements(script: str) -> list[str]:
    """Split a script into complete statements (``executescript`` would commit first)."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip() and not all(
        not ln.strip() or ln.strip().startswith("--") for ln in current.splitlines()
    ):
        raise ValueError("a migration ends in an incomplete statement")
    return out
