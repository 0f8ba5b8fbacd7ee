"""``warden db``: the state database's schema migrations.

::

    warden db status  --config warden.yaml   # backend, schema version, pending migrations
    warden db migrate --config warden.yaml   # apply the pending migrations

Both work on SQLite and PostgreSQL (``state.url``); the password comes from
``state.password_file``, ``WARDEN_STATE__PASSWORD`` or ``PGPASSWORD`` and is
never printed. ``status --check`` exits 1 while migrations are pending (for a
deploy pipeline's gate). On PostgreSQL, ``migrate --lock-timeout SECONDS``
(default 5) bounds each statement's wait for a table another session has
locked (an ``ALTER`` left waiting would hold up every sidecar's queries on
it), and the wait for another migration in progress.

Exit status: 0 done (up to date); 1 pending migrations with ``--check``, or
an applied migration that differs from this release; 2 usage, configuration,
connection or database error (one line: what failed and what to do).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from warden.config import StateConfig
    from warden.state.migrate import Migration

__all__ = ["register"]

EXIT_OK = 0
EXIT_PENDING = 1
EXIT_USAGE = 2
_MAX_LOCK_TIMEOUT_S = 86_400.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db status|migrate`` to the main CLI."""
    parser = subparsers.add_parser("db", help="the state database: schema status and migrations")
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="COMMAND")

    status = sub.add_parser(
        "status", help="print the backend, schema version and pending migrations"
    )
    status.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"))
    status.add_argument(
        "--check", action="store_true", help="exit 1 while any migration is pending"
    )
    status.set_defaults(func=_status)

    migrate = sub.add_parser("migrate", help="apply the pending migrations")
    migrate.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"))
    migrate.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="PostgreSQL: give up (applying nothing) when a statement waits this long for "
        "a lock another session holds, or another migration runs this long (default 5)",
    )
    migrate.set_defaults(func=_migrate)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= _MAX_LOCK_TIMEOUT_S:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r}: seconds, more than 0 and at most {_MAX_LOCK_TIMEOUT_S:g}"
        )
    return value


def _status(args: argparse.Namespace) -> int:
    import psycopg

    from warden.config import load_config
    from warden.errors import ConfigError
    from warden.state import backend
    from warden.state.migrate import MigrationError

    try:
        config = load_config(args.config)
        found = asyncio.run(backend.status(config.state))
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as exc:
        print(f"warden: {_unreadable(config.state.url, exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (MigrationError, psycopg.Error) as exc:
        print(f"warden: {_refused(config.state.url, 'read', exc)}", file=sys.stderr)
        return EXIT_USAGE
    print(f"backend:  {found.backend}")
    print(f"database: {_shown(config.state.url)}")
    print(f"version:  {found.current} (this release ships {found.latest})")
    if found.pending:
        print("pending:")
        for m in found.pending:
            print(f"  {m.version:04d}_{m.name}")
    else:
        print("pending:  none")
    if found.unknown:
        print(f"newer:    {list(found.unknown)} (applied by a newer Warden)")
    if found.changed:
        print(f"changed:  {list(found.changed)} differ from this release's files", file=sys.stderr)
        return EXIT_PENDING
    return EXIT_PENDING if args.check and found.pending else EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    import psycopg

    from warden.config import load_config
    from warden.errors import ConfigError
    from warden.state.migrate import MigrationError

    try:
        config = load_config(args.config)
        done = asyncio.run(_apply(config.state, args.lock_timeout))
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as exc:
        print(f"warden: {_unreadable(config.state.url, exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (MigrationError, psycopg.Error) as exc:
        print(f"warden: {_refused(config.state.url, 'migrate', exc)}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # an applied migration changed since
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_PENDING
    where = _shown(config.state.url)
    if not done:
        print(f"{where}: up to date")
    for m in done:
        print(f"{where}: applied {m.version:04d}_{m.name}")
    return EXIT_OK


async def _apply(state: StateConfig, lock_timeout_s: float | None) -> tuple[Migration, ...]:
    """Apply the pending migrations; on PostgreSQL with ``lock_timeout_s`` if given."""
    from warden.state import backend
    from warden.state.migrate import LOCK_TIMEOUT_S, pg_migrate
    from warden.state.postgres import PgTarget

    if backend.backend_of(state.url) == backend.SQLITE:
        return await backend.migrate(state)
    conn = await PgTarget.from_config(state).connect()
    try:
        wait = LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
        # Another migration in progress is waited for as long as a table's lock: a
        # deploy job must not hang on a sidecar stuck mid-migration.
        return await pg_migrate(conn, lock_timeout_s=wait, others_timeout_s=wait)
    finally:
        await conn.close()


def _refused(url: str, doing: str, exc: Exception) -> str:
    """The database's refusal in one line: a :class:`MigrationError` says what to do; any
    other driver error is its last line, the URL's secrets scrubbed."""
    from warden.state.migrate import MigrationError
    from warden.state.postgres import pg_reason

    why = str(exc) if isinstance(exc, MigrationError) else pg_reason(exc, url)
    return f"state.url: cannot {doing} {_shown(url)}: {why}"


def _unreadable(url: str, exc: sqlite3.Error) -> str:
    """Why the SQLite database named by ``url`` cannot be used, naming the setting."""
    path = _shown(url)
    if Path(path).is_dir():
        return f"state.url: {path} is a folder, not a SQLite database file"
    return f"state.url: cannot use {path} as a SQLite database: {exc}"


def _shown(url: str) -> str:
    """The database as people name it: SQLite's file path, or the URL without its password."""
    from warden.state.base import sqlite_path
    from warden.state.postgres import redact_url

    if url.startswith("sqlite:///"):
        return str(sqlite_path(url))  # redact_url would print sqlite:/./state.db
    return redact_url(url)
