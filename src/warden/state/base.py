"""What every SQLite-backed store shares: one connection, used from one thread.

SQLite calls block, so each store owns a one-thread executor and runs every
call there; the event loop never waits on the disk. WAL mode lets stores on
one file (and sidecars sharing it) read while another writes, and every write
is ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing midway.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from warden.errors import ConfigError
from warden.state.migrate import sqlite_migrate

__all__ = ["SqliteStore", "immediate", "sqlite_path"]

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000


def sqlite_path(url: str) -> Path:
    """The file named by a ``sqlite:///path`` URL (``sqlite:////abs`` or ``sqlite:///rel``)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"state.url: only sqlite:/// URLs are supported, got {url!r}")
    path = url[len("sqlite:///") :]
    if not path:
        raise ConfigError("state.url: the sqlite URL names no file")
    return Path(path)


class immediate:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Cursor:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn.cursor()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


class SqliteStore:
    """Base of the stores: open with :meth:`open`, close with :meth:`close`.

    Subclasses set ``NAME`` (for the thread name and error messages). The
    tables are the versioned migrations' (:mod:`warden.state.migrate`):
    opening applies any still pending, so one schema serves every store.
    """

    NAME: ClassVar[str]

    def __init__(self, path: Path, conn: sqlite3.Connection, io: ThreadPoolExecutor) -> None:
        self.path = path
        self._conn = conn
        self._io = io
        self._closed = False
        self._loop_conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, url: str) -> Self:
        """Open (creating what is missing) the database named by ``state.url``."""
        path = sqlite_path(url)
        io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"warden-{cls.NAME}")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(io, cls._connect, path)
        except BaseException:
            io.shutdown(wait=False)
            raise
        return cls(path, conn, io)

    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), and
        # check_same_thread=False because the executor's one thread is not this one.
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            sqlite_migrate(conn)
        except (sqlite3.Error, RuntimeError, ValueError) as exc:
            conn.close()
            raise ConfigError(
                f"state.url: cannot open the {cls.NAME} tables in {path}: {exc}"
            ) from None
        return conn

    async def close(self) -> None:
        """Close the connections and stop the I/O thread."""
        if self._closed:
            return
        self._closed = True
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None
        await asyncio.get_running_loop().run_in_executor(self._io, self._conn.close)
        self._io.shutdown(wait=True)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A small read, on the event loop's own thread when it can run at once.

        A thread round trip costs more than a point read of a page in memory
        (about 100 µs against 5 on the project's test VM), and a decision
        waits for it. The loop's connection never waits for a lock
        (``busy_timeout`` 0; in WAL mode readers need none unless the log is
        being recovered): a busy database is read through the I/O thread,
        as every read was before.
        """
        if self._closed:
            raise RuntimeError(f"the {self.NAME} store is closed")
        try:
            conn = self._loop_conn
            if conn is None:
                conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
                conn.execute("PRAGMA query_only = 1")
                self._loop_conn = conn
            return fn(conn)
        except sqlite3.OperationalError:
            return await self._run(fn, self._conn)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"the {self.NAME} store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
