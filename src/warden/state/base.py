"""What every SQLite-backed store shares: one connection, used from one thread.

SQLite calls block, so each store owns a one-thread executor and runs every
call there; the event loop never waits on the disk. WAL mode lets stores on
one file (and sidecars sharing it) read while another writes, and every write
is ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from warden.errors import ConfigError
from warden.state.migrate import sqlite_migrate

__all__ = ["SqliteStore", "immediate", "private_sqlite_file", "sqlite_path"]

log = logging.getLogger("warden.state")

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000
QUEUE_DEADLINE_S = 2 * BUSY_TIMEOUT_MS / 1000
"""How long a call may wait for its store's thread before it fails. Behind a lock
another process holds, each call waits out the busy timeout in turn: without a
bound, the tenth call queued waited fifty seconds. A call already running is
bounded by the busy timeout itself (and is never abandoned: a write may commit)."""
DOWN_FOR_S = 10.0
"""How long after a failed call the store counts as down (``/readyz``, ``warden_state_up``)."""
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700
# What SQLite writes beside a database; it gives each the database's own mode.
COMPANIONS = ("-wal", "-shm", "-journal")


def sqlite_path(url: str) -> Path:
    """The file named by a ``sqlite:///path`` URL (``sqlite:////abs`` or ``sqlite:///rel``)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"state.url: only sqlite:/// URLs are supported, got {url!r}")
    path = url[len("sqlite:///") :]
    if not path:
        raise ConfigError("state.url: the sqlite URL names no file")
    return Path(path)


def private_sqlite_file(path: Path, setting: str = "state.url") -> None:
    """Make ``path`` ready for ``sqlite3.connect``, readable by Warden's user alone.

    The database holds what others must not read (an approval's arguments,
    unsealed, until it expires). Folders that are missing are made 0700, a
    missing database is created empty at 0600 (SQLite gives its ``-wal`` and
    ``-shm`` files the database's mode), and an existing file of Warden's user
    that others can read is set to 0600, with a warning. Raises
    :class:`ConfigError` naming ``setting`` (a key, or "the decision index")
    when the file cannot be made or is not a file.
    """
    try:
        _make_private_folders(path.parent)
        with contextlib.suppress(FileExistsError):  # made before: tightened below
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
        if not path.is_file():
            raise ConfigError(f"{setting}: {path} is not a file (a SQLite database goes there)")
        for file in (path, *(path.with_name(path.name + end) for end in COMPANIONS)):
            _tighten(file)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot create {path}: {exc.strerror or exc}") from None


def _make_private_folders(folder: Path) -> None:
    missing: list[Path] = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)


def _tighten(file: Path) -> None:
    try:
        found = file.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(found.st_mode) or not found.st_mode & 0o077:
        return
    if found.st_uid != os.geteuid():
        # Another user's file, shared on purpose (or not): say so, and leave it.
        log.warning("%s is readable by others and not Warden's user's to change", file)
        return
    try:
        file.chmod(PRIVATE_FILE)
    except OSError as exc:  # a read-only mount: it stays as it was
        log.warning("%s is readable by others and cannot be set to 0600: %s", file, exc.strerror)
        return
    log.warning("%s was readable by others; set to 0600", file)


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
        self._failed_at: float | None = None

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
        private_sqlite_file(path)
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

    @property
    def up(self) -> bool:
        """False for :data:`DOWN_FOR_S` after a call failed (locked, read-only, damaged)."""
        failed = self._failed_at
        return failed is None or time.monotonic() - failed > DOWN_FOR_S

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"the {self.NAME} store is closed")
        # Claimed by whichever comes first: the thread starting the call, or the caller
        # giving up on it (cancelled, or past the queue deadline): it then never runs.
        claim = threading.Lock()

        def job() -> T:
            if not claim.acquire(blocking=False):
                raise _Abandoned
            return fn(*args)

        loop = asyncio.get_running_loop()
        waiter: _Waiter[T] = _Waiter(claim, loop=loop)
        done = self._io.submit(job)
        done.add_done_callback(lambda call: _hand_back(loop, waiter, call))

        def give_up() -> None:
            if claim.acquire(blocking=False):
                done.cancel()
                self._failed_at = time.monotonic()
                waiter.set_exception(
                    sqlite3.OperationalError(
                        f"the {self.NAME} store did not get to this call within "
                        f"{QUEUE_DEADLINE_S:g} s (the database is locked or slow)"
                    )
                )

        timer = loop.call_later(QUEUE_DEADLINE_S, give_up)
        try:
            return await waiter
        except sqlite3.Error:
            self._failed_at = time.monotonic()
            raise
        finally:
            timer.cancel()


class _Waiter(asyncio.Future[T]):
    """The caller's side of one store call. Cancelling it (the caller gave up) claims the
    call at once, so the store's thread never starts it: asyncio's own cancel of a call
    handed to a thread reaches the thread only a loop pass later, when it may have begun."""

    def __init__(self, claim: threading.Lock, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._claim = claim

    def cancel(self, msg: Any | None = None) -> bool:
        self._claim.acquire(blocking=False)
        return super().cancel(msg=msg)


def _hand_back[T](
    loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[T], call: Future[T]
) -> None:
    """In the store's thread: pass the call's end to its caller on the loop."""

    def settle() -> None:
        if waiter.done():
            return  # the caller gave up; whatever the call did stands, unread
        if call.cancelled():
            waiter.cancel()
        elif (exc := call.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(call.result())

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
        loop.call_soon_threadsafe(settle)


class _Abandoned(Exception):
    """A store call whose caller stopped waiting before the store's thread reached it."""
