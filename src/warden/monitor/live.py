"""Drift and quality gauges kept up to date by a background task, off the request path.

:class:`LiveMonitor` follows the audit log with a
:class:`~warden.audit.tail.RecordTail` (never past the records already
written), keeps the events of the reference and current windows in memory
(at most ``monitor.max_events`` of each kind), and every
``monitor.interval_s`` recomputes :mod:`~warden.monitor.drift` and
:mod:`~warden.monitor.quality` in a worker thread and sets the Prometheus
gauges. New records are taken every :data:`READ_EVERY_S` rather than all at
once per interval, and the reading thread lets go of the interpreter every
:data:`_YIELD_EVERY` records: a minute of a busy sidecar's records read in one
go held the event loop up by tens of milliseconds (p99 of agents' requests).
Reading starts at the first segment that can hold records of the windows, so
a long log is not read from the beginning. Once serving, the audit log hands
each durable batch over (:meth:`LiveMonitor.feed`), so records written by
this process are not read back and decoded again: about 17 µs less CPU a
record in the threads a busy sidecar's event loop competes with for the
interpreter. Nothing here is on an agent's
request path: a failure is logged and counted, and the next round tries again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Gauge

from warden import tasks
from warden.audit.layout import Layout
from warden.audit.segments import FrameScanner, list_segments, parse_header
from warden.audit.tail import RecordTail
from warden.config import MonitorConfig
from warden.errors import ConfigError
from warden.monitor import drift, quality
from warden.monitor.baseline import Baseline, load_baseline
from warden.monitor.events import (
    AGENT,
    APPROVAL,
    DECISION,
    OUTCOME,
    TS,
    VERSION,
    ApprovalRow,
    DecisionRow,
    OutcomeRow,
    Unsealer,
    row_of,
)
from warden.monitor.psi import Level
from warden.monitor.windows import (
    Window,
    parse_duration,
    parse_instant,
    recent,
    reference_before,
)
from warden.ops import metrics

__all__ = ["LiveMonitor", "Snapshot"]

log = logging.getLogger("warden.monitor")

READ_EVERY_S = 1.0
"""How often new records are read (the gauges are recomputed every ``interval_s``)."""
_YIELD_EVERY = 64
"""Records read and parsed between two hand-backs of the interpreter to the event loop."""
_HEAD_READ = 1024 * 1024
_Row = DecisionRow | OutcomeRow | ApprovalRow
_Fed = tuple[int, _Row] | Mapping[str, Any] | None
"""A fed record as the reading thread takes it: its row, or the record if it is sealed."""
_MONITORED = frozenset(("decision", "outcome", "approval_decided", "approval_expired"))
_LEVEL_VALUE = {Level.OK: 0, Level.WATCH: 1, Level.ACT: 2, Level.INSUFFICIENT: -1}


MAX_VERSIONS = 32
"""Versions of one agent the monitor tells apart within its window; more fold into
``_other`` (an agent states its own version when the config pins none)."""


class Snapshot:
    """The figures of the last round: drift and quality results, and when they were computed."""

    __slots__ = ("at", "drift", "quality")

    def __init__(
        self,
        at: float,
        drift_results: list[drift.DriftResult],
        quality_results: list[quality.Quality],
    ) -> None:
        self.at = at
        self.drift = tuple(drift_results)
        self.quality = tuple(quality_results)


def first_seq_since(root: Path, since: float) -> int:
    """The first sequence number of the earliest segment that may hold records at or after
    ``since`` (epoch seconds): every older segment ends before it."""
    segments = list_segments(Layout(root).segments)
    start = 0
    for following in segments[1:]:
        began = _first_time(following)
        if began is None or began >= since:
            break
        start = int(following.stem)
    return start


def _first_time(path: Path) -> float | None:
    try:
        with path.open("rb") as f:
            data = f.read(_HEAD_READ)
    except OSError:
        return None
    parsed = parse_header(data)
    if parsed is None:
        return None
    for _, payload in FrameScanner(data, parsed[1]):
        try:
            return parse_instant(str(orjson.loads(payload)["time"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
    return None


class LiveMonitor:
    """See the module docstring: ``start(size)``, then ``close()``; :meth:`refresh` is one round."""

    def __init__(
        self,
        config: MonitorConfig,
        audit_dir: Path | str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._root = Path(audit_dir)
        self._clock = clock
        self._current_s = parse_duration(config.current)
        self._reference_s = parse_duration(config.reference)
        self._baseline: Baseline | None = None
        if config.baseline is not None:
            try:
                self._baseline = load_baseline(config.baseline)
            except ValueError as exc:
                raise ConfigError(f"monitor.baseline: {exc}") from None
        keep = config.max_events
        # Rows, not event objects: the garbage collector does not track them
        # (see warden.monitor.events), so its full passes do not walk the windows.
        self._decisions: deque[DecisionRow] = deque(maxlen=keep)
        self._outcomes: deque[OutcomeRow] = deque(maxlen=keep)
        self._approvals: deque[ApprovalRow] = deque(maxlen=keep)
        self._tail: RecordTail | None = None
        self._unsealer: Unsealer | None = None
        self._position = -1  # the next record to take; -1: not started
        # Batches the audit log handed over once durable (feed); appended on the
        # event loop, taken in the reading thread. Bounded: past it, the oldest
        # batches are dropped and read back from the log instead.
        self._fed: deque[tuple[int, list[_Fed]]] = deque(maxlen=keep)
        self._closed = False
        self._size: Callable[[], int] = lambda: 0
        self._task: asyncio.Task[None] | None = None
        self._gauged: set[tuple[object, tuple[str, ...]]] = set()
        self._versions: dict[str, dict[str, float]] = {}
        """Per agent, the versions in the window and when each was last seen: an agent
        states its own version, and each one is a group the rounds compute and gauge."""
        self.last: Snapshot | None = None
        self._busy = asyncio.Lock()  # one thread at a time reads the log and the windows

    @property
    def span_s(self) -> float:
        """How far back the windows reach."""
        reference = 0.0 if self._baseline is not None else self._reference_s
        return self._current_s + reference

    def feed(self, first: int, records: list[Mapping[str, Any]]) -> None:
        """Take a durable batch from the audit log (:meth:`AuditLog.follow`), on the loop.

        Each record becomes its event's row here (a few µs), so the records are not
        kept alive until the next read (retained, they lengthened the garbage
        collector's passes); one with sealed fields waits for the reading
        thread, which may have to read its subject's key. Records before the
        feed began, and batches dropped while the reader was far behind, are
        read back from the log.
        """
        if self._closed:  # nobody would take them: keep nothing alive
            return
        items = [r if r.get("sealed") else row_of(r) for r in records]
        self._fed.append((first, items))

    def start(self, size: Callable[[], int]) -> None:
        """Start the background task; ``size()`` is how many records are written so far."""
        self._size = size
        self._task = tasks.spawn(self._run(), name="monitor")

    async def close(self) -> None:
        """Stop the background task, and take no more batches from the log."""
        self._closed = True
        self._fed.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                if loop.time() >= due:
                    due = loop.time() + self.config.interval_s
                    await self.refresh()
                else:
                    await self.read_new()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the drift and quality gauges could not be computed")
                metrics.ERRORS.labels("internal_error").inc()  # a stable code (warden.errors)
            await asyncio.sleep(min(READ_EVERY_S, max(0.0, due - loop.time())))

    async def read_new(self) -> None:
        """Read what was written since the last read (a little at a time keeps it cheap)."""
        upto = self._size()
        async with self._busy:
            await asyncio.to_thread(self._read, upto, self._clock())

    async def refresh(self) -> Snapshot:
        """Read what was written since the last round, recompute, set the gauges."""
        upto = self._size()
        async with self._busy:
            snapshot = await asyncio.to_thread(self._round, upto)
        self._set_gauges(snapshot)
        self.last = snapshot
        return snapshot

    # -- in the worker thread ------------------------------------------------------------

    def _round(self, upto: int) -> Snapshot:
        now = self._clock()
        self._read(upto, now)
        current = recent(now, self._current_s)
        decisions = tuple(self._decisions)
        now_decisions = _slice(decisions, current)
        reference: Mapping[tuple[str, str], drift.Profile] | tuple[DecisionRow, ...]
        if self._baseline is not None:
            reference = self._baseline.profiles
        else:
            reference = _slice(decisions, reference_before(current, self._reference_s))
        drifts = drift.compute(reference, now_decisions, min_samples=self.config.min_samples)
        figures = quality.compute_rows(
            now_decisions,
            _slice(tuple(self._outcomes), current),
            _slice(tuple(self._approvals), current),
        )
        return Snapshot(now, drifts, figures)

    def _read(self, upto: int, now: float) -> None:
        if self._position < 0:
            self._position = first_seq_since(self._root, now - self.span_s)
            self._unsealer = Unsealer(self._root)
        for queue in (self._decisions, self._outcomes, self._approvals):
            _restamp_ahead(queue, now)
        fed = self._fed
        taken = 0
        while fed:
            first, items = fed.popleft()
            if first > self._position:  # written before the feed began, or dropped
                self._read_log(first, now)
            for item in items[max(0, self._position - first) :]:
                # A sealed record is unsealed here, off the loop.
                self._take(row_of(item, self._unsealer) if isinstance(item, Mapping) else item, now)
            self._position = max(self._position, first + len(items))
            taken += len(items)
            if taken >= _YIELD_EVERY:
                taken = 0
                time.sleep(0)  # let the event loop have the interpreter between batches
        self._read_log(upto, now)
        oldest = now - self.span_s
        for queue in (self._decisions, self._outcomes, self._approvals):
            while queue and queue[0][TS] < oldest:
                queue.popleft()

    def _read_log(self, upto: int, now: float) -> None:
        """Read the records from the current position up to ``upto`` back from the log."""
        if self._position >= upto:
            return
        tail = self._tail
        if tail is None or tail.position != self._position:
            tail = self._tail = RecordTail(self._root, self._position)
        while tail.position < upto:
            batch = tail.read(upto, _YIELD_EVERY)
            if not batch:
                break
            time.sleep(0)  # let the event loop have the interpreter between batches
            for stored in batch:
                if stored.kind in _MONITORED:
                    self._take(row_of(orjson.loads(stored.payload), self._unsealer), now)
        self._position = tail.position

    def _take(self, found: tuple[int, _Row] | None, now: float) -> None:
        if found is None:
            return
        what, row = found
        if what == DECISION:
            _put(self._decisions, self._folded(row), now)
        elif what == OUTCOME:
            _put(self._outcomes, self._folded(row), now)
        elif what == APPROVAL:
            _put(self._approvals, row, now)

    def _folded(self, row: _Row) -> _Row:
        """``row``, its version folded into ``_other`` past ``MAX_VERSIONS`` of its agent in
        the window (200,000 stated versions made every round stall the loop for seconds)."""
        agent, version, at = row[AGENT], row[VERSION], row[TS]
        seen = self._versions.setdefault(str(agent), {})
        if version in seen or len(seen) < MAX_VERSIONS:
            seen[str(version)] = max(at, seen.get(str(version), at))
            return row
        oldest = at - self.span_s
        for old in [v for v, last in seen.items() if last < oldest]:
            del seen[old]
        if len(seen) < MAX_VERSIONS:
            seen[str(version)] = at
            return row
        return (*row[:VERSION], metrics.OTHER, *row[VERSION + 1 :])  # type: ignore[return-value]

    # -- on the event loop ---------------------------------------------------------------

    def _set_gauges(self, snapshot: Snapshot) -> None:
        seen: set[tuple[object, tuple[str, ...]]] = set()

        levels: dict[tuple[str, ...], float] = {}

        def put(gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
            gauge.labels(*labels).set(value)
            seen.add((gauge, labels))

        for result in snapshot.drift:
            group = (_label("agent", result.agent), _version_label(result.agent, result.version))
            # Groups folded into one label (_other) show the worst of them, not the last.
            value = _LEVEL_VALUE[result.level]  # -1 (insufficient) stays -1 alone
            levels[group] = max(levels[group], value) if group in levels else value
            put(metrics.DRIFT_LEVEL, group, levels[group])
            for dist in result.distributions:
                if dist.level is not Level.INSUFFICIENT:
                    put(metrics.DRIFT_PSI, (*group, _label("distribution", dist.name)), dist.psi)
        for q in snapshot.quality:
            group = (_label("agent", q.agent), _version_label(q.agent, q.version))
            rates = {
                "deny": q.deny_rate,
                "hold": q.hold_rate,
                "approval_rejection": q.approval_rejection_rate,
                "tool_error": q.tool_error_rate,
            }
            for name, rate in rates.items():
                if rate is not None:
                    put(metrics.QUALITY_RATE, (*group, name), rate)
            if q.cost_per_conversation_usd is not None:
                put(metrics.QUALITY_COST_PER_CONVERSATION, group, q.cost_per_conversation_usd)
            if q.added_latency_p95_ms is not None:
                put(metrics.QUALITY_ADDED_LATENCY_P95, group, q.added_latency_p95_ms / 1000)
        for gauge, labels in self._gauged - seen:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)  # type: ignore[attr-defined]
        self._gauged = seen


def _label(kind: str, value: str) -> str:
    # The version label may legitimately be empty (no version configured).
    return metrics.bounded(f"monitor_{kind}", value) if value else ""


def _version_label(agent: str, version: str) -> str:
    """A version label from the agent's own budget: one agent stating hundreds of
    versions cannot push another's canary into ``_other``."""
    return metrics.bounded(f"monitor_version\x1f{agent}", version) if version else ""


def _put(queue: deque[Any], row: tuple[Any, ...], now: float) -> None:
    """Add ``row`` to ``queue``, its time kept in order (:func:`_slice` bisects the
    queue, and :meth:`LiveMonitor._read` drops old rows from its left end).

    Rows come in the log's order, which is the order decisions were made; their
    times follow it unless the wall clock steps. So a row's time is counted as no
    earlier than the row before it and no later than ``now`` (the reader's clock,
    just before it): one record of a brief jump ahead cannot end the current window
    before every later record, rows written after a step back are counted in the
    current window, and a full queue still gives up the rows made first. O(1).
    """
    at = row[TS]
    if queue and queue[-1][TS] > at:
        at = queue[-1][TS]
    at = min(at, _before(now))
    if at != row[TS]:
        row = (at, *row[1:])  # TS is the first field
    queue.append(row)


def _before(now: float) -> float:
    """The last time inside a window ending at ``now`` (windows leave out their end)."""
    return math.nextafter(now, -math.inf)


def _restamp_ahead(queue: deque[Any], now: float) -> None:
    """Count at ``now`` the rows kept with a time past it (read while the clock ran
    ahead, now set back): in order, at the right end, so the queue stays sorted."""
    if not queue or queue[-1][TS] < now:
        return
    ahead: list[Any] = []
    while queue and queue[-1][TS] >= now:
        ahead.append(queue.pop())
    at = _before(now)
    queue.extend((at, *row[1:]) for row in reversed(ahead))


def _slice[R: tuple[Any, ...]](rows: tuple[R, ...], window: Window) -> tuple[R, ...]:
    """The rows inside ``window``, by bisection: :func:`_put` keeps the deques in time order."""
    lo = bisect.bisect_left(rows, window.start, key=lambda r: r[TS])
    hi = bisect.bisect_left(rows, window.end, key=lambda r: r[TS])
    return rows[lo:hi]
