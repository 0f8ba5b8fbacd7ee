"""The console's state and lifecycle: decision index, proofs, sessions, the aiohttp sub-app.

``Console`` is started by :class:`warden.server.Warden` beside the admin API
and mounted at ``/console/`` on the admin listener. It reads the audit log
(never writes records of its own) and acts only through the same services
the admin API uses (approvals, kill switches, erasure), with the same roles,
so a page that is bypassed still meets the same refusals.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from warden.admin.auth import TokenAuth
from warden.approvals.service import Approvals
from warden.audit import AuditLog
from warden.audit.index import IndexUnavailable, RecordIndex
from warden.audit.indexes import open_index
from warden.audit.layout import Layout
from warden.audit.segments import LogDamaged
from warden.audit.tail import RecordTail
from warden.budgets.guard import BudgetGuard
from warden.config import Config
from warden.console.proofs import ProofSource
from warden.console.sessions import SessionStore
from warden.killswitch import KillSwitches
from warden.policy.challenger import ChallengerStats

__all__ = ["CONSOLE", "Console", "RecordUnreadable"]

log = logging.getLogger("warden.console")


Readiness = Callable[[], tuple[bool, Mapping[str, Any]]]


class RecordUnreadable(Exception):
    """A record within the log's size that cannot be read: the log is damaged there
    (``damaged``), or its files cannot be read at all (a volume gone, permissions).

    Never "no such record": a record the log says it holds and cannot give back is
    what tampering or a failing disk looks like, and an auditor must be told so.
    """

    def __init__(self, seq: int, detail: str, *, damaged: bool) -> None:
        self.seq = seq
        self.detail = detail.splitlines()[0][:300] if detail else ""
        self.damaged = damaged
        what = "damaged" if damaged else "unreadable"
        super().__init__(f"the audit log is {what} at record #{seq}: {self.detail}")

    @property
    def status(self) -> int:
        """500 for damage (it does not mend itself), 503 for files that cannot be read now."""
        return 500 if self.damaged else 503


class Console:
    """Everything the console's pages read and act through."""

    def __init__(
        self,
        config: Config,
        *,
        audit: AuditLog,
        approvals: Approvals,
        killswitches: KillSwitches,
        auth: TokenAuth,
        readiness: Readiness,
        budgets: BudgetGuard | None = None,
        challenger: Callable[[], ChallengerStats | None] = lambda: None,
    ) -> None:
        """``budgets``: the guard whose caps the Operations view shows spend against.

        ``challenger``: the live challenger's counts, for the Model risk view.
        """
        self.config = config
        self.audit = audit
        self.approvals = approvals
        self.killswitches = killswitches
        self.auth = auth
        self.readiness = readiness
        self.budgets = budgets
        self.challenger = challenger
        self.sessions = SessionStore(config.console.session_ttl_s)
        self._index: RecordIndex | None = None
        self._proofs = ProofSource(audit.directory, Layout(audit.directory).verifier())
        self._refresh_lock = asyncio.Lock()
        self._upstreams: frozenset[str] = frozenset()
        self._upstreams_at = 0
        self._upstreams_lock = asyncio.Lock()
        self.exporting = asyncio.Lock()
        """Held while an evidence package is built: one at a time, as each holds its
        records in memory in the process that also serves the proxy."""

    @property
    def index(self) -> RecordIndex:
        """The decision index (open once :meth:`start` ran)."""
        if self._index is None:
            raise RuntimeError("the console is not started")
        return self._index

    @property
    def proofs(self) -> ProofSource:
        """Inclusion proofs of this log's records."""
        return self._proofs

    async def start(self) -> None:
        """Open the index; pages catch it up with the log when they are read.

        Not in the background: indexing parses records in a thread that shares
        the interpreter with the proxy, and a refresh every few seconds showed
        as 20-30 ms stalls in the proxy's p99 (benchmarks/overhead.py). A page
        nobody opens costs nothing.
        """
        # SQLite beside the log, or the fleet's PostgreSQL (state.url): warden.audit.indexes.
        self._index = await asyncio.to_thread(open_index, self.config, self.audit.directory)

    async def close(self) -> None:
        """Close the index."""
        if self._index is not None:
            index, self._index = self._index, None
            await asyncio.to_thread(index.close)

    async def refresh(self) -> int:
        """Index what the log wrote since the last refresh; how many records."""
        index = self._index
        if index is None:
            return 0
        async with self._refresh_lock:
            try:
                return await asyncio.to_thread(
                    index.catch_up, self.audit.directory, self.audit.size
                )
            except (LogDamaged, IndexUnavailable, OSError, ValueError) as exc:
                # The index is a cache: the page shows what it has; verify finds the damage.
                log.warning("the decision index could not catch up: %s", exc)
                return 0

    async def record(self, seq: int) -> tuple[bytes, dict[str, Any]] | None:
        """Record ``seq`` from the log itself (stored bytes and parsed); ``None`` when the
        log holds no such record. Raises :class:`RecordUnreadable` for one it holds but
        cannot give back."""
        if not 0 <= seq < self.audit.size:
            return None

        def read() -> bytes:
            found = RecordTail(self.audit.directory, seq).read(seq + 1, 1)
            if not found:
                raise LogDamaged(f"record {seq} is missing")
            return found[0].payload

        try:
            payload = await asyncio.to_thread(read)
        except LogDamaged as exc:
            # A folder that is gone or closed to us reads as "no segment holds record N".
            if not self._readable():
                gone = "the log's segment folder is missing or cannot be read"
                raise RecordUnreadable(seq, gone, damaged=False) from None
            raise RecordUnreadable(seq, str(exc), damaged=True) from None
        except OSError as exc:
            raise RecordUnreadable(seq, f"{exc.strerror or exc}", damaged=False) from None
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise RecordUnreadable(seq, "the stored record does not decode", damaged=True) from None
        return payload, parsed if isinstance(parsed, dict) else {}

    async def upstreams_seen(self) -> frozenset[str] | None:
        """The upstreams this log's decisions name: in its newest :data:`UPSTREAMS_SCANNED`
        records, and those earlier calls found; ``None`` when the log cannot be read now.
        A call reads only records no earlier call read."""
        async with self._upstreams_lock:
            size = self.audit.size
            start = max(self._upstreams_at, size - UPSTREAMS_SCANNED)
            if start < size:
                try:
                    found = await asyncio.to_thread(
                        _upstreams_in, self.audit.directory, start, size
                    )
                except (LogDamaged, OSError, ValueError) as exc:
                    log.warning("the upstreams in the audit log could not be read: %s", exc)
                    return None
                self._upstreams = self._upstreams | found
                self._upstreams_at = size
            return self._upstreams

    def _readable(self) -> bool:
        """Whether the log's segment folder is there and may be listed and read."""
        segments = Layout(self.audit.directory).segments
        return segments.is_dir() and os.access(segments, os.R_OK | os.X_OK)


UPSTREAMS_SCANNED = 2000
"""The newest records read for the upstreams decisions name (the index has no such
field), leaving out those an earlier look read."""


def _upstreams_in(root: Path, start: int, end: int) -> set[str]:
    """The upstreams the decisions among records ``start`` to ``end`` name (blocking)."""
    tail = RecordTail(root, start)
    names: set[str] = set()
    while tail.position < end:
        batch = tail.read(end, 512)
        if not batch:
            break
        for stored in batch:
            if stored.kind != "decision":
                continue
            parsed = orjson.loads(stored.payload)
            action = parsed.get("action") if isinstance(parsed, dict) else None
            request = action.get("request") if isinstance(action, dict) else None
            upstream = request.get("upstream") if isinstance(request, dict) else None
            if isinstance(upstream, str) and upstream:
                names.add(upstream)
    return names


CONSOLE = web.AppKey("warden_console", Console)
"""Where the console's routes find their :class:`Console`."""
