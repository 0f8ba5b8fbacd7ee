"""Change feeds: who changed a kill switch or an approval, as it happens.

:class:`Fanout` hands each change to every :class:`~warden.state.repos.Subscription`
of its channel. :class:`SqliteFeed` finds changes by polling SQLite's
``PRAGMA data_version`` (it moves whenever another connection, in any
process, commits to the file), so it can only say "something changed"
(``key`` ``None``). The PostgreSQL feed (:class:`warden.state.postgres.PgFeed`)
listens for the notifications the tables' triggers publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from warden import tasks
from warden.state.repos import APPROVALS, KILLSWITCHES, Change, Subscription

__all__ = ["CHANNELS", "SQLITE_POLL_S", "Fanout", "SqliteFeed"]

log = logging.getLogger("warden.state.feed")

CHANNELS: Final = (KILLSWITCHES, APPROVALS)
SQLITE_POLL_S: Final = 0.2
"""How often the SQLite feed looks for commits by other connections."""


class Fanout:
    """Subscriptions by channel; :meth:`publish` delivers to each."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {c: set() for c in CHANNELS}

    def watch(self, channel: str) -> Subscription:
        """Changes on ``channel`` from now on."""
        if channel not in self._subs:
            raise ValueError(f"no change feed channel {channel!r}")
        sub = Subscription(channel, self._drop)
        self._subs[channel].add(sub)
        return sub

    def publish(self, change: Change) -> None:
        """Deliver ``change`` to every subscription of its channel."""
        for sub in tuple(self._subs.get(change.channel, ())):
            sub.put(change)

    def publish_all(self) -> None:
        """Tell every subscription that anything may have changed."""
        for channel in CHANNELS:
            self.publish(Change(channel, None))

    def _drop(self, sub: Subscription) -> None:
        self._subs.get(sub.channel, set()).discard(sub)


class SqliteFeed(Fanout):
    """The polling feed for SQLite; :meth:`start` it, :meth:`close` it."""

    def __init__(self, path: Path, *, interval_s: float = SQLITE_POLL_S) -> None:
        super().__init__()
        self._path = path
        self._interval = interval_s
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warden-feed")
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open a connection of its own and start polling."""
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._io, self._connect)
        self._task = tasks.spawn(self._poll(), name="state-feed")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)

    def _version(self) -> int:
        assert self._conn is not None
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        seen = await loop.run_in_executor(self._io, self._version)
        while True:
            await asyncio.sleep(self._interval)
            try:
                version = await loop.run_in_executor(self._io, self._version)
            except sqlite3.Error:
                log.warning("the state feed could not read the database", exc_info=True)
                continue
            if version != seen:
                seen = version
                self.publish_all()

    async def close(self) -> None:
        """Stop polling and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._io, self._conn.close)
            self._conn = None
        self._io.shutdown(wait=True)
