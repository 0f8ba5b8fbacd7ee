"""Open the configured state backend: every repository, the change feed, migrations.

``state.url`` picks the backend: ``sqlite:///path`` (the embedded default,
one machine) or ``postgresql://user@host:5432/db`` (a fleet of sidecars).
:func:`open_state` applies pending migrations first when ``state.migrate`` is
``auto`` and refuses to start while any are pending when it is ``off``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import psycopg

from warden.approvals.store import ApprovalRepo, ApprovalStore
from warden.config import StateConfig
from warden.errors import ConfigError
from warden.policy.bundle.order import MarkRepo
from warden.state.base import BUSY_TIMEOUT_MS, private_sqlite_file, sqlite_path
from warden.state.feed import SqliteFeed
from warden.state.links import CallLinkStore, LinkRepo
from warden.state.migrate import (
    Migration,
    SchemaStatus,
    pg_migrate,
    pg_status,
    sqlite_migrate,
    sqlite_status,
)
from warden.state.pg_approvals import PgApprovalStore
from warden.state.pg_sessions import PgSessionStore
from warden.state.postgres import (
    PgDatabase,
    PgFeed,
    PgLinkStore,
    PgStateStore,
    PgTarget,
    PgTimeouts,
    pg_reason,
)
from warden.state.repos import BudgetRepo, ChangeFeed, KillSwitchRepo
from warden.state.sessions import SessionRepo, SessionStore
from warden.state.sqlite import StateStore

__all__ = ["POSTGRESQL", "SQLITE", "StateBackend", "backend_of", "migrate", "open_state", "status"]

log = logging.getLogger("warden.state")

SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"


def backend_of(url: str) -> str:
    """``sqlite`` or ``postgresql``, by the URL's scheme."""
    if url.startswith("sqlite:///"):
        return SQLITE
    if url.startswith(("postgresql://", "postgres://")):
        return POSTGRESQL
    raise ConfigError("state.url: must start with sqlite:/// or postgresql://")


@dataclass(frozen=True, slots=True)
class StateBackend:
    """The repositories of one backend, and the change feed; :meth:`close` when done."""

    kind: str
    budgets: BudgetRepo
    killswitches: KillSwitchRepo
    approvals: ApprovalRepo
    links: LinkRepo
    feed: ChangeFeed
    _closers: tuple[Callable[[], Awaitable[None]], ...]
    up: Callable[[], bool] = lambda: True
    """Whether the backend is reachable now: no call failed in the last few seconds (and
    on PostgreSQL, the change feed's connection is up)."""
    sessions: SessionRepo | None = None
    """Session counters, decided calls and Responses chains (:mod:`warden.state.sessions`)."""
    signed_marks: MarkRepo | None = None
    """The newest signing time activated per policy bundle (:mod:`warden.policy.bundle.order`)."""

    async def close(self) -> None:
        """Close the feed, the stores and the pool (each once; failures are logged)."""
        for close in self._closers:
            try:
                await close()
            except Exception:
                log.exception("could not close part of the %s state backend", self.kind)


async def open_state(config: StateConfig) -> StateBackend:
    """Open every repository of the configured backend, migrating first if ``auto``."""
    if backend_of(config.url) == SQLITE:
        return await _open_sqlite(config)
    return await _open_pg(config)


async def _open_sqlite(config: StateConfig) -> StateBackend:
    path = sqlite_path(config.url)
    await asyncio.to_thread(_sqlite_prepare, config)
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        state = await StateStore.open(config.url)
        closers.append(state.close)
        approvals = await ApprovalStore.open(config.url)
        closers.append(approvals.close)
        links = await CallLinkStore.open(config.url)
        closers.append(links.close)
        sessions = await SessionStore.open(config.url)
        closers.append(sessions.close)
        feed = SqliteFeed(path)
        await feed.start()
        closers.insert(0, feed.close)
    except BaseException:
        for close in reversed(closers):
            await close()
        raise
    return StateBackend(
        SQLITE,
        state,
        state,
        approvals,
        links,
        feed,
        tuple(closers),
        up=lambda: state.up and approvals.up and links.up and sessions.up,
        sessions=sessions,
        signed_marks=state,
    )


def _sqlite_prepare(config: StateConfig) -> None:
    path = sqlite_path(config.url)
    private_sqlite_file(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        if config.migrate == "auto":
            done = sqlite_migrate(conn)
            if done:
                log.info("state: applied migration(s) %s to %s", _names(done), path)
        else:
            _require_current(sqlite_status(conn), str(path))
    except (sqlite3.Error, RuntimeError) as exc:
        raise ConfigError(f"state.url: cannot migrate {path}: {exc}") from None
    finally:
        conn.close()


async def _open_pg(config: StateConfig) -> StateBackend:
    target = PgTarget.from_config(config)
    conn = await target.connect()
    try:
        if config.migrate == "auto":
            done = await pg_migrate(conn)
            if done:
                log.info("state: applied migration(s) %s to %s", _names(done), target.shown)
        else:
            _require_current(await pg_status(conn), target.shown)
    except RuntimeError as exc:
        raise ConfigError(f"state.url: cannot migrate {target.shown}: {exc}") from None
    except psycopg.Error as exc:
        why = pg_reason(exc, target.url)
        raise ConfigError(f"state.url: cannot migrate {target.shown}: {why}") from None
    finally:
        await conn.close()
    db = await PgDatabase.open(
        target,
        min_size=config.pool_min_size,
        max_size=config.pool_max_size,
        timeouts=PgTimeouts.from_config(config),
    )
    # Back from an outage: the pool connects anew at once, not after its own backoff.
    feed = PgFeed(target, on_reconnect=db.renew)
    try:
        await feed.start()
    except BaseException:
        await db.close()
        raise
    state = PgStateStore(db)
    return StateBackend(
        POSTGRESQL,
        state,
        state,
        PgApprovalStore(db),
        PgLinkStore(db),
        feed,
        (feed.close, db.close),
        lambda: feed.listening.is_set() and db.up,
        sessions=PgSessionStore(db),
        signed_marks=state,
    )


def _require_current(found: SchemaStatus, where: str) -> None:
    if found.pending:
        raise ConfigError(
            f"state.url: {where} is at schema version {found.current} and "
            f"{len(found.pending)} migration(s) are pending ({_names(found.pending)}); "
            "run `warden db migrate`, or set state.migrate: auto"
        )
    if found.changed:
        raise ConfigError(
            f"state.url: applied migration(s) {list(found.changed)} in {where} differ from "
            "this release's files"
        )


def _names(done: tuple[Migration, ...]) -> str:
    return ", ".join(f"{m.version:04d}_{m.name}" for m in done)


# -- for `warden db` -----------------------------------------------------------------------------


async def status(config: StateConfig) -> SchemaStatus:
    """The schema status of the configured database (changes nothing)."""
    if backend_of(config.url) == SQLITE:
        return await asyncio.to_thread(_sqlite_status, config)
    conn = await PgTarget.from_config(config).connect()
    try:
        return await pg_status(conn)
    finally:
        await conn.close()


def _sqlite_status(config: StateConfig) -> SchemaStatus:
    path = sqlite_path(config.url)
    if not path.exists():
        return sqlite_status(sqlite3.connect(":memory:"))
    with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
        return sqlite_status(conn)


async def migrate(config: StateConfig) -> tuple[Migration, ...]:
    """Apply the pending migrations to the configured database; return those applied."""
    if backend_of(config.url) == SQLITE:
        return await asyncio.to_thread(_sqlite_migrate, config)
    target = PgTarget.from_config(config)
    conn = await target.connect()
    try:
        return await pg_migrate(conn)
    finally:
        await conn.close()


def _sqlite_migrate(config: StateConfig) -> tuple[Migration, ...]:
    path = sqlite_path(config.url)
    private_sqlite_file(path)
    with contextlib.closing(
        sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    ) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        return sqlite_migrate(conn)
