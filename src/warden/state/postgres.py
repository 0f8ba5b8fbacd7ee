"""The PostgreSQL backend: budgets, kill switches and call links shared by a fleet.

Every sidecar of a fleet opens one async connection pool (psycopg 3) on the
same database. Each change is one transaction; reservations lock the counter
rows they touch (``SELECT ... ORDER BY key FOR UPDATE``: always in the same
order, so two reservations never deadlock) and check the caps under that
lock, so a cap holds across every sidecar. Reads take no locks.

Connection settings come from ``state.url``; libpq options such as
``sslmode``, ``sslrootcert``, ``sslcert`` and ``application_name`` go in its
query string. The password comes from ``state.password_file``,
``WARDEN_STATE__PASSWORD`` or libpq's own ``PGPASSWORD`` / ``.pgpass``; it is
handed to libpq as a separate parameter and never logged: every URL Warden
prints passes through :func:`redact_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar

import psycopg
from psycopg import AsyncConnection, AsyncCursor, errors
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed

from warden import tasks
from warden.audit.record import is_credential_key
from warden.config import StateConfig
from warden.errors import ConfigError, StateUnavailable, failure_summary
from warden.password_file import read_password_file
from warden.policy.bundle.order import SignedMark
from warden.state.base import DOWN_FOR_S
from warden.state.feed import CHANNELS, Fanout
from warden.state.links import (
    MAX_LINKS,
    Link,
    LinkOp,
    decode_action,
    encode_action,
    names_erased,
)
from warden.state.records import (
    Counter,
    Hold,
    KillSwitchRow,
    ReserveResult,
    decode_holds,
    encode_holds,
)
from warden.state.repos import Change, ErasedSubjects
from warden.state.sessions import PruneClock
from warden.urls import scrub, shown_url, url_secrets

__all__ = [
    "ERASE_PAGE",
    "PgDatabase",
    "PgFeed",
    "PgLinkStore",
    "PgStateStore",
    "PgTarget",
    "PgTimeouts",
    "StoreTimeout",
    "pg_reason",
    "redact_url",
]

log = logging.getLogger("warden.state.postgres")

T = TypeVar("T")
_RETRIES: Final = 8
ERASE_PAGE: Final = 1000
"""Rows an erasure reads at a time (call links, approvals, Responses chains)."""
_CHANNEL_PREFIX: Final = "warden_"


def redact_url(url: str) -> str:
    """``url`` with any password (in the authority or a credential-named query key) as ``***``."""
    return shown_url(url, masked=is_credential_key)  # sslmode stays, sslpassword goes


_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms: unacknowledged data gives up the connection
}


@dataclass(frozen=True, slots=True)
class PgTarget:
    """Where and how to connect: the URL, and the password kept apart from it."""

    url: str
    password: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, config: StateConfig) -> PgTarget:
        """From the ``state`` section; reads ``password_file`` now (ConfigError if unreadable)."""
        password = config.password.get_secret_value() if config.password is not None else None
        if password is None and config.password_file:
            password = read_password_file(config.password_file, "state.password_file")
        return cls(config.url, password, config.connect_timeout_s)

    @property
    def shown(self) -> str:
        """The URL as it may be printed."""
        return redact_url(self.url)

    def kwargs(self) -> dict[str, Any]:
        """Connection parameters besides the URL (libpq reads PGPASSWORD itself)."""
        out: dict[str, Any] = {
            "connect_timeout": max(2, round(self.connect_timeout_s)),
            # A connection the network dropped without a reset (a partition, a failover,
            # a NAT forgetting an idle flow) is found in seconds, not in the operating
            # system's hours: the change feed's LISTEN would otherwise wait on it unheard.
            **_KEEPALIVE,
        }
        if self.password is not None:
            out["password"] = self.password
        return out

    async def connect(self, *, autocommit: bool = True) -> AsyncConnection[Any]:
        """One connection; a failure is a :class:`ConfigError` naming the (redacted) URL."""
        try:
            return await AsyncConnection.connect(self.url, autocommit=autocommit, **self.kwargs())
        except psycopg.Error as exc:
            why = pg_reason(exc, self.url)
            raise ConfigError(f"state.url: cannot connect to {self.shown}: {why}") from None


def pg_reason(exc: BaseException, url: str) -> str:
    """A driver error on one line, with ``url``'s secrets scrubbed.

    Every line is kept: libpq puts the cause on one ("root certificate file
    \"/.postgresql/root.crt\" does not exist") and its hint on the next. Its
    messages name host, port and user; a URL it cannot parse it quotes
    ("invalid percent-encoded token"), password and all.
    """
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    return scrub(text, url_secrets(url, masked=is_credential_key))


@dataclass(frozen=True, slots=True)
class PgTimeouts:
    """How long PostgreSQL work may wait (``state.*_timeout_s``).

    ``lock_s`` and ``statement_s`` are set on every connection Warden opens for
    the store, so PostgreSQL itself ends a statement stuck behind another
    session's lock (an SRE's open transaction on a counter row) and rolls it
    back; ``call_s`` bounds each call as its caller sees it (a connection the
    network dropped unheard answers nothing at all); ``checkout_s`` bounds the
    wait for a pooled connection.
    """

    lock_s: float = 2.0
    statement_s: float = 4.0
    call_s: float = 5.0
    checkout_s: float = 1.0
    slow_s: float = 60.0
    """Statement timeout and deadline of the background upkeep (pruning, expiry): each
    deletes whatever aged out, however much that is, and no decision waits for it."""

    @classmethod
    def from_config(cls, config: StateConfig) -> PgTimeouts:
        """From the ``state`` section."""
        return cls(
            lock_s=config.lock_timeout_s,
            statement_s=config.statement_timeout_s,
            call_s=config.call_timeout_s,
            checkout_s=config.pool_timeout_s,
        )

    async def configure(self, conn: AsyncConnection[Any]) -> None:
        """Set the lock and statement timeouts on ``conn`` (for its whole session)."""
        await conn.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('statement_timeout', %s, false)",
            (_ms(self.lock_s), _ms(self.statement_s)),
        )


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class StoreTimeout(StateUnavailable):
    """A state store call that did not end within ``state.call_timeout_s``."""

    fence: asyncio.Future[bool] | None = None
    """For a call on the kill switches' connection: true once nothing of it can land any
    more (its session was ended and is gone); false if the store closed first."""


async def _check_if_spoken_to(conn: AsyncConnection[Any]) -> None:
    """Raise for a pooled connection PostgreSQL has dropped, with a round trip only when
    its socket says something happened.

    An idle pooled connection has nothing to read until the server speaks: a
    terminated session's last message, or the end of the stream. A round trip
    on every checkout (``AsyncConnectionPool.check_connection``) cost a third
    of the reservations a second; a poll of the socket costs a system call.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        readable = [True]
    if readable:
        await AsyncConnectionPool.check_connection(conn)


def _outage(exc: BaseException) -> bool:
    """Whether a failed call says the store is not serving (not that the data was refused)."""
    if isinstance(exc, psycopg.IntegrityError | psycopg.DataError):
        return False  # an answer: a duplicate key, a value the column refuses
    return isinstance(exc, psycopg.Error | OSError | TimeoutError | StoreTimeout)


@dataclass(slots=True)
class _Seat:
    """Where one call on the kill switches' connection stands: the connection it is
    using, if any, and whether its caller gave up on it (it then sends nothing more)."""

    conn: AsyncConnection[Any] | None = None
    given_up: bool = False

    def check(self) -> None:
        """Raise if the caller gave up: a call past its deadline must not start a statement."""
        if self.given_up:
            raise StoreTimeout("the state store call was given up on")


def _shut(conn: AsyncConnection[Any]) -> None:
    """End ``conn``'s socket under the call waiting on it: that call fails at once (and
    closes the connection itself) instead of waiting for a server that stopped answering."""
    # A duplicate of the descriptor: closing the connection's own under a task that waits
    # on it would let a new connection reuse its number in the event loop.
    with (
        contextlib.suppress(OSError, ValueError, psycopg.Error),
        socket.socket(fileno=os.dup(conn.fileno())) as sock,
    ):
        sock.shutdown(socket.SHUT_RDWR)


async def _close(conn: AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


class _Aside:
    """One connection of its own, outside the pool, for the kill switches.

    A pool full of decisions waiting on a locked counter row must not keep a
    switch thrown on another sidecar from being read here (or one thrown here
    from being saved). Checked before each use (a restart leaves it stale),
    and replaced when it breaks, or when a call on it is given up on
    (:meth:`PgDatabase._give_up`). A caller waits at most ``checkout_s`` for
    it; past that, another call is stuck on it, and the caller gets a
    connection of its own for its call.
    """

    def __init__(self, target: PgTarget, timeouts: PgTimeouts) -> None:
        self._target = target
        self._timeouts = timeouts
        self._conn: AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._stale = False

    @contextlib.asynccontextmanager
    async def connection(self, seat: _Seat) -> AsyncIterator[AsyncConnection[Any]]:
        """The connection, for one caller at a time (``seat`` says which it is using)."""
        try:
            async with asyncio.timeout(self._timeouts.checkout_s):
                await self._lock.acquire()
        except TimeoutError:
            own = await self._connect(seat)
            try:
                yield own
            finally:
                seat.conn = None
                await _close(own)
            return
        try:
            seat.check()
            conn = await self._ready(seat)
            try:
                yield conn
            except BaseException:
                if conn.broken or conn.closed:
                    self.forget(conn)
                raise
            finally:
                if conn is not self._conn:  # broken, or given up on meanwhile
                    await _close(conn)
        finally:
            seat.conn = None
            self._lock.release()

    async def _ready(self, seat: _Seat) -> AsyncConnection[Any]:
        if self._stale:
            self._stale = False
            if self._conn is not None:
                await _close(self._conn)
                self._conn = None
        conn = self._conn
        if conn is not None:
            seat.conn = conn
            try:
                await AsyncConnectionPool.check_connection(conn)
            except psycopg.Error:
                seat.conn = None
                self.forget(conn)
                await _close(conn)
                conn = None
        if conn is None:
            conn = self._conn = await self._connect(seat)
        return conn

    async def _connect(self, seat: _Seat) -> AsyncConnection[Any]:
        seat.check()
        conn = await AsyncConnection.connect(
            self._target.url, autocommit=True, **self._target.kwargs()
        )
        seat.conn = conn
        try:
            seat.check()  # given up while connecting: not used
            await self._timeouts.configure(conn)
        except BaseException:
            seat.conn = None
            await _close(conn)
            raise
        return conn

    def forget(self, conn: AsyncConnection[Any]) -> None:
        """Stop handing out ``conn``: the next caller connects anew."""
        if self._conn is conn:
            self._conn = None

    def reset(self) -> None:
        """Reconnect at the next use (PostgreSQL came back: this one may be stale)."""
        self._stale = True

    async def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


class PgDatabase:
    """The shared pool, and transactions that retry on deadlock or serialization failure.

    Every call is bounded by ``timeouts.call_s``: past it the caller gets
    :class:`StoreTimeout` and the call runs on to its own end (bounded by the
    statement timeout), never abandoned midway; an ``undo`` given for it then
    runs (a reservation that lands after its caller stopped waiting is
    released). A call that fails so (or with a driver error that is not a
    refusal of the data) counts the store as down for
    :data:`~warden.state.base.DOWN_FOR_S` (:attr:`up`).
    """

    def __init__(
        self,
        target: PgTarget,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeouts: PgTimeouts | None = None,
    ) -> None:
        self.target = target
        self.timeouts = timeouts or PgTimeouts(checkout_s=target.connect_timeout_s)
        self._sizes = (min_size, max(max_size, min_size, 1))
        self.pool = self._new_pool()
        self._aside = _Aside(target, self.timeouts)
        self._calls = tasks.Tasks("state-calls")
        self._aftermath = tasks.Tasks("state-aftermath")  # fences, and what waits on them
        self._failed_at: float | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        target: PgTarget,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeouts: PgTimeouts | None = None,
    ) -> PgDatabase:
        """Open the pool, waiting until its first connections are up.

        ``timeouts.checkout_s`` bounds the wait for a pooled connection (default:
        the connect timeout): on the request path, an unreachable database must
        fail a decision quickly, not after the full connect timeout.
        """
        db = cls(target, min_size=min_size, max_size=max_size, timeouts=timeouts)
        try:
            await db.pool.open(wait=True, timeout=target.connect_timeout_s)
        except Exception as exc:
            await db.pool.close()
            raise ConfigError(
                f"state.url: cannot open a connection pool to {target.shown}: "
                f"{pg_reason(exc, target.url)}"
            ) from None
        return db

    def _new_pool(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        return AsyncConnectionPool(
            self.target.url,
            kwargs={"autocommit": True, **self.target.kwargs()},
            min_size=self._sizes[0],
            max_size=self._sizes[1],
            open=False,
            name="warden-state",
            timeout=self.timeouts.checkout_s,
            configure=self.timeouts.configure,
            # A connection PostgreSQL dropped (a restart, a failover, a terminated
            # session) is found and replaced at checkout, not by the call given it.
            check=_check_if_spoken_to,
        )

    @property
    def up(self) -> bool:
        """False for :data:`~warden.state.base.DOWN_FOR_S` after a call failed (timed out,
        refused by a read-only server, no connection)."""
        failed = self._failed_at
        return failed is None or time.monotonic() - failed > DOWN_FOR_S

    def renew(self) -> None:
        """PostgreSQL is reachable again: connect anew now.

        The pool's own reconnection backs off (by minutes after a long
        outage); a fresh pool connects at once. Calls waiting on the old pool
        move to the new one; connections out of it are closed when returned.
        """
        if self._closed or (self._renewal is not None and not self._renewal.done()):
            return
        self._renewal = tasks.spawn(self._renew(), name="state-pool-renew")

    async def _renew(self) -> None:
        old, new = self.pool, self._new_pool()
        await new.open(wait=False)
        self.pool = new
        self._aside.reset()
        await old.close()

    async def close(self) -> None:
        """Close every pooled connection, and the kill switches' own."""
        self._closed = True
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        await self._aftermath.cancel()
        await self._calls.cancel()  # only calls whose callers stopped waiting are left
        await self.pool.close()
        await self._aside.close()

    def later(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``work`` in the background until it ends or the store closes."""
        if self._closed:
            work.close()
            return
        self._aftermath.spawn(work, name=name)

    async def tx(
        self,
        fn: Callable[[AsyncCursor[Any]], Awaitable[T]],
        *,
        aside: bool = False,
        slow: bool = False,
        landed: Callable[[T], Awaitable[object]] | None = None,
    ) -> T:
        """Run ``fn`` in one transaction, again (a few times) if PostgreSQL asks to retry.

        ``aside``: on the kill switches' own connection. ``slow``: background upkeep,
        bounded by ``timeouts.slow_s`` instead. ``landed``: run with the result of a
        call that ended after its caller stopped waiting (to undo it).
        """
        seat = _Seat() if aside else None
        work = self._tx(fn, aside=aside, transaction=True, slow=slow, seat=seat)
        deadline = self.timeouts.slow_s if slow else None
        return await self._bounded(work, None, deadline, seat=seat, landed=landed)

    async def call(
        self,
        fn: Callable[[AsyncCursor[Any]], Awaitable[T]],
        *,
        undo: Callable[[], Awaitable[object]] | None = None,
    ) -> T:
        """Run ``fn`` (one statement: its own transaction), retrying like :meth:`tx`."""
        return await self._bounded(self._tx(fn, aside=False, transaction=False), undo)

    async def read(
        self, query: str, params: Sequence[Any] = (), *, aside: bool = False, slow: bool = False
    ) -> list[tuple[Any, ...]]:
        """Rows of one query, outside any transaction (``slow``: in one, under
        ``timeouts.slow_s``)."""

        async def run(cur: AsyncCursor[Any]) -> list[tuple[Any, ...]]:
            await cur.execute(query.encode(), params)
            return list(await cur.fetchall())

        seat = _Seat() if aside else None
        work = self._tx(run, aside=aside, transaction=slow, slow=slow, seat=seat)
        return await self._bounded(work, None, self.timeouts.slow_s if slow else None, seat=seat)

    async def scan(
        self, query: str, pick: Callable[[Sequence[tuple[Any, ...]]], list[T]]
    ) -> list[T]:
        """What ``pick`` keeps of the rows ``query`` pages through (an erasure's search).

        ``query`` takes the last page's key (its rows' first column, text) and a
        limit: ``... WHERE key > %s ORDER BY key LIMIT %s``. Each page is read under
        the clean-up jobs' limits (``slow``): a whole large table read in one
        statement outlasts the statement timeout, and the erasure would never end.
        ``pick`` runs in a thread: parsing stored actions is CPU work.
        """
        kept: list[T] = []
        after = ""
        while True:
            rows = await self.read(query, (after, ERASE_PAGE), slow=True)
            kept += await asyncio.to_thread(pick, rows)
            if len(rows) < ERASE_PAGE:
                return kept
            after = str(rows[-1][0])

    async def _tx(
        self,
        fn: Callable[[AsyncCursor[Any]], Awaitable[T]],
        *,
        aside: bool,
        transaction: bool,
        slow: bool = False,
        seat: _Seat | None = None,
    ) -> T:
        for attempt in range(_RETRIES):
            try:
                async with self._connection(aside, seat) as conn:
                    if not transaction:
                        return await fn(conn.cursor())
                    async with conn.transaction():
                        cur = conn.cursor()
                        if slow:
                            await cur.execute(
                                "SELECT set_config('statement_timeout', %s, true)",
                                (_ms(self.timeouts.slow_s),),
                            )
                        return await fn(cur)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise
                await asyncio.sleep(0.002 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _connection(
        self, aside: bool, seat: _Seat | None
    ) -> AsyncIterator[AsyncConnection[Any]]:
        if aside:
            async with self._aside.connection(seat or _Seat()) as own:
                yield own
            return
        while True:
            pool = self.pool
            try:
                conn = await pool.getconn()
            except PoolClosed:
                if pool is self.pool or self._closed:
                    raise
                continue  # renewed while this call waited: the new pool serves it
            break
        try:
            async with conn:
                yield conn
        finally:
            await pool.putconn(conn)

    async def _bounded(
        self,
        work: Coroutine[Any, Any, T],
        undo: Callable[[], Awaitable[object]] | None,
        deadline_s: float | None = None,
        *,
        seat: _Seat | None = None,
        landed: Callable[[T], Awaitable[object]] | None = None,
    ) -> T:
        deadline_s = deadline_s or self.timeouts.call_s
        call = self._calls.spawn(work, name="call", awaited=True)
        try:
            done, _ = await asyncio.wait((call,), timeout=deadline_s)
        except asyncio.CancelledError:
            # The caller gave up (its client left, a deadline of its own).
            self._give_up(call, seat)
            self._abandon(call, undo, landed)
            raise
        if not done:
            fence = self._give_up(call, seat)
            self._abandon(call, undo, landed)
            self._failed_at = time.monotonic()
            timeout = StoreTimeout(
                f"the state store did not answer within {deadline_s:g} s (state.call_timeout_s)"
            )
            timeout.fence = fence
            raise timeout
        try:
            return call.result()
        except Exception as exc:
            if _outage(exc):
                self._failed_at = time.monotonic()
            raise

    def _give_up(self, call: asyncio.Task[Any], seat: _Seat | None) -> asyncio.Future[bool] | None:
        """Free the kill switches' connection from a call given up on; ``None`` for a pooled
        call (it runs on to its end, bounded by the statement timeout).

        A session that stopped answering with its TCP connection up (a frozen backend,
        a middlebox) would keep the connection, and every switch read and save after
        it, forever. Its socket is ended here, so the call fails now, and its session
        is ended on the server (:meth:`_fence`), so a statement it was sent never runs
        late: a switch cleared after its clearing was answered as failed.
        """
        if seat is None:
            return None
        seat.given_up = True
        conn = seat.conn
        if conn is None or call.done():
            # Nothing on its way: it sends nothing more (seat.check).
            settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            settled.set_result(True)
            return settled
        try:
            pid = conn.info.backend_pid
        except psycopg.Error:
            pid = 0
        self._aside.forget(conn)
        _shut(conn)
        return self._aftermath.spawn(self._fence(pid), name="fence", awaited=True)

    async def _fence(self, pid: int) -> bool:
        """End the session ``pid`` (on another connection) and wait until it is gone: what
        it was sent then ran before, or never will. False if the store closed first."""
        delay = 0.1
        ended = not pid
        while not self._closed:
            try:
                conn = await AsyncConnection.connect(
                    self.target.url, autocommit=True, **self.target.kwargs()
                )
                async with conn:
                    await self.timeouts.configure(conn)
                    if not ended:
                        ended = True  # once: a role that may not end it waits for it to go
                        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    while not self._closed:
                        cur = await conn.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                        )
                        if await cur.fetchone() is None:
                            return True
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, 2.0)
            except (psycopg.Error, OSError) as exc:
                log.debug("ending a state store session given up on: %s", failure_summary(exc))
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
        return False

    def _abandon(
        self,
        call: asyncio.Task[Any],
        undo: Callable[[], Awaitable[object]] | None,
        landed: Callable[[Any], Awaitable[object]] | None = None,
    ) -> None:
        """Let ``call`` run to its end (a write may commit), then ``undo`` it if given, and
        hand what it returned to ``landed`` if it returned."""

        def ended(task: asyncio.Task[Any]) -> None:
            answered = not task.cancelled() and task.exception() is None
            if self._closed:
                return
            if undo is not None:
                tasks.spawn(self._undo(undo), name="state-undo")
            if landed is not None and answered:
                result = task.result()
                tasks.spawn(self._undo(lambda: landed(result)), name="state-undo")

        call.add_done_callback(ended)

    async def _undo(self, undo: Callable[[], Awaitable[object]]) -> None:
        try:
            await undo()
        except Exception as exc:
            log.warning(
                "could not undo a state store call whose caller stopped waiting: %s",
                failure_summary(exc),
            )


# -- budgets and kill switches --------------------------------------------------------------

_LOCK = (
    'SELECT c.counter, c."window", c.subject, c.spent, c.reserved FROM budget_counters c '
    "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k (counter, w, subject) "
    'ON c.counter = k.counter AND c."window" = k.w AND c.subject = k.subject '
    "ORDER BY 1, 2, 3 FOR UPDATE OF c"
)
_READ = (
    'SELECT c.counter, c."window", c.subject, c.spent, c.reserved FROM budget_counters c '
    "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k (counter, w, subject) "
    'ON c.counter = k.counter AND c."window" = k.w AND c.subject = k.subject'
)
_SETTLE = (
    "UPDATE budget_counters c SET reserved = greatest(0, c.reserved - k.amount), "
    "spent = c.spent + k.spend "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::float8[]) "
    "AS k (counter, w, subject, amount, spend) "
    'WHERE c.counter = k.counter AND c."window" = k.w AND c.subject = k.subject '
    'RETURNING c.counter, c."window", c.subject, c.spent, c.reserved'
)
_RESERVE = (
    "SELECT * FROM warden_reserve(%s, %s::text[], %s::text[], %s::text[], %s::float8[], "
    "%s::float8[], %s, %s, %s)"
)
_SETTLE_CALL = "SELECT * FROM warden_settle(%s, %s::jsonb)"
_KS_COLUMNS = "id, scope, target, reason, created_by, created_at, cleared_by, cleared_at"

_Key = tuple[str, str, str]


def _columns(keys: Sequence[_Key]) -> tuple[list[str], list[str], list[str]]:
    return [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]


def _key(hold: Hold) -> _Key:
    return (hold.counter, hold.window, hold.subject)


class PgStateStore:
    """Budgets (:class:`~warden.state.repos.BudgetRepo`) and kill switches on PostgreSQL."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._prune_clock = PruneClock("budget counters")

    async def close(self) -> None:
        """Nothing of its own to close: the pool belongs to the backend."""

    # -- budgets ---------------------------------------------------------------

    async def reserve(
        self, reservation_id: str, holds: Sequence[Hold], *, force: bool = False
    ) -> ReserveResult:
        """Hold every amount atomically across the fleet, or none if any would pass its limit.

        One round trip: ``warden_reserve`` locks the counter rows in key order
        (``FOR UPDATE``), checks every limit under the locks and holds. A
        reservation that lands after its caller stopped waiting (the call timed
        out, or its client left) is released at once: no decision uses it, and
        it would count against the caps until it expired.
        """
        held = tuple(holds)
        params = (
            reservation_id,
            [h.counter for h in held],
            [h.window for h in held],
            [h.subject for h in held],
            [h.amount for h in held],
            [h.limit for h in held],
            force,
            time.time(),
            encode_holds(held),
        )

        async def run(cur: AsyncCursor[Any]) -> ReserveResult:
            await cur.execute(_RESERVE, params)
            row = await cur.fetchone()
            assert row is not None
            ok, spent, reserved, over = row
            before = tuple(
                Counter(h.counter, h.window, h.subject, float(sp), float(rs))
                for h, sp, rs in zip(held, spent, reserved, strict=True)
            )
            return ReserveResult(
                reserved=bool(ok),
                before=before,
                over=tuple(h for h, o in zip(held, over, strict=True) if o),
            )

        async def release() -> None:
            await self._db.call(_release(reservation_id))

        return await self._db.call(run, undo=release)

    async def settle(
        self, reservation_id: str, actual: Mapping[str, float] | None
    ) -> tuple[Counter, ...]:
        """Turn a reservation into spend and drop it; return the counters after (one call)."""
        spent = Jsonb(dict(actual)) if actual is not None else None

        async def run(cur: AsyncCursor[Any]) -> tuple[Counter, ...]:
            await cur.execute(_SETTLE_CALL, (reservation_id, spent))
            rows = await cur.fetchall()
            if not rows:
                return ()
            # One counter per key, in key order (SQLite gives one per hold, in hold order).
            return tuple(Counter(c, w, s, float(sp), float(rs)) for c, w, s, sp, rs in sorted(rows))

        return await self._db.call(run)

    async def expire(self, older_than_s: float) -> int:
        """Settle reservations older than ``older_than_s`` at their held value.

        Sidecars expiring at once skip each other's rows (``SKIP LOCKED``), so
        each reservation is settled once.
        """
        cutoff = time.time() - older_than_s

        async def run(cur: AsyncCursor[Any]) -> int:
            await cur.execute(
                "DELETE FROM budget_reservations WHERE id IN (SELECT id FROM budget_reservations "
                "WHERE created_at < %s ORDER BY id LIMIT 10000 FOR UPDATE SKIP LOCKED) "
                "RETURNING holds",
                (cutoff,),
            )
            rows = await cur.fetchall()
            holds = tuple(h for (raw,) in rows for h in decode_holds(raw))
            if holds:
                await _spend(cur, holds, None)
            return len(rows)

        return await self._db.tx(run, slow=True)

    async def counters(self, keys: Iterable[tuple[str, str, str]]) -> tuple[Counter, ...]:
        """Read counters by ``(counter, window, subject)``; missing ones read as zero."""
        wanted = tuple(keys)
        if not wanted:
            return ()
        rows = await self._db.read(_READ, _columns(wanted))
        found = {(c, w, s): (float(sp), float(rs)) for c, w, s, sp, rs in rows}
        return tuple(Counter(*k, *found.get(k, (0.0, 0.0))) for k in wanted)

    async def prune_windows(self, before: Mapping[str, str]) -> int:
        """Delete the counters of windows closed long ago; how many.

        None of the day before the database's today, or later, and none at all while
        this machine's clock is over an hour ahead of the database's
        (:class:`~warden.state.sessions.PruneClock`).
        """
        now = time.time()

        async def run(cur: AsyncCursor[Any]) -> int:
            await cur.execute("SELECT extract(epoch FROM now())::float8")
            clock = await cur.fetchone()
            assert clock is not None
            cutoffs = self._prune_clock.window_cutoffs(before, local=now, store_now=clock[0])
            deleted = 0
            for kind, cutoff in sorted(cutoffs.items()):
                await cur.execute(
                    'DELETE FROM budget_counters WHERE "window" LIKE %s AND "window" < %s',
                    (f"{kind}:%", cutoff),
                )
                deleted += max(cur.rowcount, 0)
            return deleted

        return await self._db.tx(run, slow=True)

    async def window_counters(
        self, counter: str, window: str, *, limit: int = 50
    ) -> tuple[Counter, ...]:
        """Every subject's totals of ``counter`` in ``window``, the most used first."""
        rows = await self._db.read(
            "SELECT subject, spent, reserved FROM budget_counters "
            'WHERE counter = %s AND "window" = %s ORDER BY spent + reserved DESC, subject LIMIT %s',
            (counter, window, max(1, min(limit, 1000))),
        )
        return tuple(Counter(counter, window, str(s), float(sp), float(rs)) for s, sp, rs in rows)

    # -- kill switches ---------------------------------------------------------

    async def add_killswitch(self, row: KillSwitchRow) -> None:
        """Store a new, active kill switch (its trigger tells every sidecar)."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.execute(
                "INSERT INTO killswitches (id, scope, target, reason, created_by, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (row.id, row.scope, row.target, row.reason, row.created_by, row.created_at),
            )

        await self._db.tx(run, aside=True)

    async def clear_killswitch(self, switch_id: str, who: str) -> KillSwitchRow | None:
        """Clear an active switch; ``None`` when there is no active switch with that id.

        A clearing past ``state.call_timeout_s`` may still be on its way: its
        session is ended, and once it is gone (within another
        ``call_timeout_s``) the row says whether the clearing landed; if it did,
        it is answered as done. Else :class:`StoreTimeout`, and the switch stays
        in force as its caller is told: a clearing whose outcome could not be
        learnt in time is undone should it turn out to have landed.
        """
        at = time.time()  # with ``who``, marks this clearing's row

        async def run(cur: AsyncCursor[Any]) -> KillSwitchRow | None:
            await cur.execute(
                "UPDATE killswitches SET cleared_by = %s, cleared_at = %s "  # noqa: S608 - constant columns
                f"WHERE id = %s AND cleared_at IS NULL RETURNING {_KS_COLUMNS}",
                (who, at, switch_id),
            )
            found = await cur.fetchone()
            return KillSwitchRow(*found) if found else None

        try:
            return await self._db.tx(run, aside=True)
        except StoreTimeout as exc:
            if exc.fence is None:
                raise
            landed = await self._cleared_late(exc.fence, switch_id, who, at)
            if landed is None:
                raise
            return landed  # it landed as the deadline passed

    async def _cleared_late(
        self, fence: asyncio.Future[bool], switch_id: str, who: str, at: float
    ) -> KillSwitchRow | None:
        """The row a clearing given up on left, if it landed; ``None`` if it did not, or if
        that cannot be learnt within ``call_timeout_s`` (it is then undone should it land)."""
        try:
            async with asyncio.timeout(self._db.timeouts.call_s):
                if not await asyncio.shield(fence):
                    return None  # the store is closing
                rows = await self._db.read(
                    f"SELECT {_KS_COLUMNS} FROM killswitches "  # noqa: S608 - constant columns
                    "WHERE id = %s AND cleared_by = %s AND cleared_at = %s",
                    (switch_id, who, at),
                    aside=True,
                )
                return KillSwitchRow(*rows[0]) if rows else None
        except (TimeoutError, StateUnavailable, psycopg.Error):
            self._db.later(self._undo_clear(fence, switch_id, who, at), "undo-clear")
            return None

    async def _undo_clear(
        self, fence: asyncio.Future[bool], switch_id: str, who: str, at: float
    ) -> None:
        """Put a switch back in force if the clearing marked ``(who, at)``, answered as failed,
        landed after all; tried until the store takes it."""

        async def run(cur: AsyncCursor[Any]) -> bool:
            await cur.execute(
                "UPDATE killswitches SET cleared_by = NULL, cleared_at = NULL "
                "WHERE id = %s AND cleared_by = %s AND cleared_at = %s",
                (switch_id, who, at),
            )
            return cur.rowcount > 0

        if not await fence:
            return
        delay = 1.0
        while True:
            try:
                if await self._db.tx(run, aside=True):
                    log.warning(
                        "kill switch %s: its clearing, answered as failed, reached the state "
                        "store late; it is in force again",
                        switch_id,
                    )
                return
            except Exception as exc:
                log.debug("kill switch %s: checking a late clearing: %s", switch_id, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 15.0)

    async def active_killswitches(self) -> tuple[KillSwitchRow, ...]:
        """Every switch not yet cleared, oldest first.

        Kill switches are read and written on a connection of their own, not the
        pool's: decisions filling the pool must not keep a switch from this sidecar.
        """
        rows = await self._db.read(
            f"SELECT {_KS_COLUMNS} FROM killswitches "  # noqa: S608 - constant columns
            "WHERE cleared_at IS NULL ORDER BY created_at, id",
            aside=True,
        )
        return tuple(KillSwitchRow(*r) for r in rows)

    # -- signed bundles --------------------------------------------------------

    async def signed_marks(self, bundles: Sequence[str]) -> dict[str, SignedMark]:
        """The newest signing time activated for each of these bundle names, fleet-wide."""
        rows = await self._db.read(
            "SELECT bundle, signed_at, revision, activated_at FROM policy_signed_marks "
            "WHERE bundle = ANY(%s)",
            (list(bundles),),
        )
        return {str(r[0]): SignedMark(str(r[0]), int(r[1]), str(r[2]), float(r[3])) for r in rows}

    async def raise_signed_marks(self, marks: Sequence[SignedMark]) -> None:
        """Store each mark unless its bundle's stored signing time is newer."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.executemany(
                "INSERT INTO policy_signed_marks (bundle, signed_at, revision, activated_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (bundle) DO UPDATE SET "
                "signed_at = excluded.signed_at, revision = excluded.revision, "
                "activated_at = excluded.activated_at "
                "WHERE excluded.signed_at >= policy_signed_marks.signed_at",
                [(m.bundle, m.signed_at, m.revision, m.activated_at) for m in marks],
            )

        if marks:
            await self._db.tx(run)


def _release(
    reservation_id: str,
) -> Callable[[AsyncCursor[Any]], Coroutine[Any, Any, None]]:
    """Release a reservation, spending nothing (nothing, if there is none)."""

    async def run(cur: AsyncCursor[Any]) -> None:
        await cur.execute(_SETTLE_CALL, (reservation_id, Jsonb({})))

    return run


def _totals(holds: Iterable[Hold], value: Callable[[Hold], float]) -> dict[_Key, float]:
    out: dict[_Key, float] = {}
    for hold in holds:
        out[_key(hold)] = out.get(_key(hold), 0.0) + value(hold)
    return out


async def _spend(
    cur: AsyncCursor[Any], holds: Sequence[Hold], actual: Mapping[str, float] | None
) -> dict[_Key, Counter]:
    """Release ``holds`` and add what was spent, under row locks taken in key order."""
    keys = sorted({_key(h) for h in holds})
    await cur.execute(_LOCK, _columns(keys))
    amounts = _totals(holds, lambda h: h.amount)
    spends = _totals(
        holds, lambda h: h.amount if actual is None else max(0.0, actual.get(h.counter, 0.0))
    )
    await cur.execute(
        _SETTLE, (*_columns(keys), [amounts[k] for k in keys], [spends[k] for k in keys])
    )
    return {
        (c, w, s): Counter(c, w, s, float(sp), float(rs))
        for c, w, s, sp, rs in await cur.fetchall()
    }


# -- call links -------------------------------------------------------------------------------


class PgLinkStore:
    """Call links (:class:`~warden.state.links.LinkRepo`) on PostgreSQL, shared by the fleet."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._prune_clock = PruneClock("call links")

    async def close(self) -> None:
        """Nothing of its own to close: the pool belongs to the backend."""

    async def apply(
        self, ops: Sequence[LinkOp], *, prune_before: float | None, keep: int = MAX_LINKS
    ) -> list[str]:
        """Write a batch in one transaction; return ids that became tombstones on disk.

        ``prune_before`` is moved back as far as this machine's clock is ahead of the
        database's, or past the newest link stored before the batch less an hour
        (:class:`~warden.state.sessions.PruneClock`).
        """
        batch = tuple(ops)
        cutoff_given = prune_before is not None

        async def run(cur: AsyncCursor[Any]) -> list[str]:
            clashed: list[str] = []
            cutoff = prune_before
            if cutoff is not None:
                # Before the batch goes in: its own stamps say nothing of the others' clocks.
                await cur.execute(
                    "SELECT extract(epoch FROM now())::float8, max(created_at) FROM call_links"
                )
                row = await cur.fetchone()
                assert row is not None
                cutoff = self._prune_clock.cutoff(
                    cutoff, local=time.time(), newest=row[1], store_now=row[0]
                )
            for op in batch:
                if op.kind == "drop":
                    await cur.execute(
                        "DELETE FROM call_links WHERE call_id = %s AND decision_id IS NOT NULL",
                        (op.call_id,),
                    )
                    continue
                if op.kind == "put" and op.link is not None:
                    await cur.execute(
                        "INSERT INTO call_links (call_id, decision_id, action, created_at) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (call_id) DO NOTHING "
                        "RETURNING call_id",
                        (op.call_id, op.link.decision_id, encode_action(op.link.action), op.at),
                    )
                    if await cur.fetchone() is not None:
                        continue
                    clashed.append(op.call_id)
                await cur.execute(
                    "INSERT INTO call_links (call_id, decision_id, action, created_at) "
                    "VALUES (%s, NULL, NULL, %s) ON CONFLICT (call_id) DO UPDATE "
                    "SET decision_id = NULL, action = NULL, created_at = excluded.created_at",
                    (op.call_id, op.at),
                )
            if cutoff is not None:
                await cur.execute("DELETE FROM call_links WHERE created_at < %s", (cutoff,))
                await cur.execute(
                    "DELETE FROM call_links WHERE call_id IN (SELECT call_id FROM call_links "
                    "ORDER BY created_at DESC OFFSET %s)",
                    (keep,),
                )
            return clashed

        # Off the request path (the links' writer), and it prunes whatever aged out.
        return await self._db.tx(run, slow=cutoff_given)

    async def take(
        self, call_ids: Sequence[str], *, newer_than: float
    ) -> tuple[dict[str, Link], set[str]]:
        """Remove and return the links of ``call_ids``; also say which are tombstones."""
        ids = list(dict.fromkeys(call_ids))

        async def run(cur: AsyncCursor[Any]) -> tuple[dict[str, Link], set[str]]:
            await cur.execute(
                "DELETE FROM call_links WHERE call_id = ANY(%s) AND created_at >= %s "
                "AND decision_id IS NOT NULL RETURNING call_id, decision_id, action",
                (ids, newer_than),
            )
            links: dict[str, Link] = {}
            for call_id, decision_id, action in await cur.fetchall():
                try:
                    links[call_id] = Link(decode_action(bytes(action)), decision_id)
                except (ValueError, KeyError, TypeError):
                    log.warning("call link %r is unreadable; its result is not linked", call_id)
            await cur.execute(
                "SELECT call_id FROM call_links WHERE call_id = ANY(%s) AND created_at >= %s "
                "AND decision_id IS NULL",
                (ids, newer_than),
            )
            return links, {r[0] for r in await cur.fetchall()}

        return await self._db.tx(run)

    async def count(self) -> int:
        """How many rows (links and tombstones) the table holds."""
        rows = await self._db.read("SELECT count(*) FROM call_links")
        return int(rows[0][0])

    async def erase(self, erased: ErasedSubjects) -> list[str]:
        """Delete the links whose action names an erased data subject; return their call ids.

        Read a page at a time (:meth:`PgDatabase.scan`): a full table
        (:data:`~warden.state.links.MAX_LINKS`) outlasts one statement's timeout.
        """
        found = await self._db.scan(
            "SELECT call_id, action FROM call_links WHERE call_id > %s "
            "AND action IS NOT NULL ORDER BY call_id LIMIT %s",
            partial(_links_naming, erased),
        )
        if not found:
            return []

        async def run(cur: AsyncCursor[Any]) -> list[str]:
            # Only rows still holding what was read: another sidecar may have taken
            # the link meanwhile, and a new call may reuse its id.
            await cur.execute(
                "DELETE FROM call_links c USING unnest(%s::text[], %s::bytea[]) AS k (id, action) "
                "WHERE c.call_id = k.id AND c.action = k.action RETURNING c.call_id",
                ([c for c, _ in found], [a for _, a in found]),
            )
            return [str(r[0]) for r in await cur.fetchall()]

        return await self._db.tx(run, slow=True)


def _links_naming(
    erased: ErasedSubjects, rows: Sequence[tuple[Any, ...]]
) -> list[tuple[str, bytes]]:
    """The ``(call_id, action)`` of the links among ``rows`` whose action names ``erased``."""
    return [(str(c), bytes(a)) for c, a in rows if names_erased(erased, bytes(a))]


# -- the change feed -----------------------------------------------------------------------------


class PgFeed(Fanout):
    """Changes published by the tables' triggers, received with LISTEN on a connection of its own.

    When that connection is lost, it reconnects (backing off up to
    ``max_backoff_s``), calls ``on_reconnect`` (the pool connects anew: see
    :meth:`PgDatabase.renew`) and then tells every watcher to re-read
    (``key`` ``None``): changes made while it was away are not lost.
    """

    def __init__(
        self,
        target: PgTarget,
        *,
        max_backoff_s: float = 2.0,
        on_reconnect: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        self._target = target
        self._max_backoff = max_backoff_s
        self._on_reconnect = on_reconnect
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection[Any] | None = None
        self.listening = asyncio.Event()
        """Set while the LISTEN connection is up."""

    async def start(self) -> None:
        """Connect and LISTEN; returns once listening (or raises ConfigError)."""
        conn = await self._listen()
        self._task = tasks.spawn(self._run(conn), name="state-feed")

    async def _listen(self) -> AsyncConnection[Any]:
        conn = await self._target.connect(autocommit=True)
        try:
            for channel in CHANNELS:
                await conn.execute(f"LISTEN {_CHANNEL_PREFIX}{channel}".encode())
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self.listening.set()
        return conn

    async def _run(self, conn: AsyncConnection[Any] | None) -> None:
        backoff = 0.05
        while True:
            try:
                if conn is None:
                    conn = await self._listen()
                    if self._on_reconnect is not None:
                        self._on_reconnect()
                    self.publish_all()  # whatever happened while away
                    backoff = 0.05
                async for note in conn.notifies():
                    channel = note.channel.removeprefix(_CHANNEL_PREFIX)
                    self.publish(Change(channel, note.payload or None))
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, ConfigError, OSError) as exc:
                log.warning(
                    "state change feed lost its connection to %s (%s); reconnecting",
                    self._target.shown,
                    pg_reason(exc, self._target.url),
                )
            self.listening.clear()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            conn = self._conn = None
            await asyncio.sleep(backoff)
            backoff = min(self._max_backoff, backoff * 2)

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        self.listening.clear()
