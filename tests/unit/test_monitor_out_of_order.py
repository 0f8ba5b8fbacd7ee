"""The live monitor's windows hold when the wall clock steps and records come out of time order.

The audit log stamps each record with the wall clock when it is written. An NTP
step (or a clock set by hand, then corrected) leaves a record stamped a day ahead
among records stamped now, or records stamped before ones already kept. The log's
order is the order decisions were made, so the monitor counts each row no earlier
than the one before it and no later than its own clock: the windows are cut by
bisection and old rows dropped from the left, in O(1) per row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from warden.audit import AuditLog
from warden.config import AuditConfig, MonitorConfig
from warden.model import Effect
from warden.monitor.live import LiveMonitor, Snapshot
from warden.testing.audit import sample_action, sample_decision

DAY_NS = 86400 * 10**9


class SteppedClock:
    """``time.time_ns`` as the audit log reads it, ``step`` nanoseconds off the real one."""

    def __init__(self, real: Callable[[], int]) -> None:
        self.real = real
        self.step = 0

    def __call__(self) -> int:
        return self.real() + self.step


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    stepped = SteppedClock(time.time_ns)
    monkeypatch.setattr(time, "time_ns", stepped)
    return stepped


async def write(log: AuditLog, count: int, effect: Effect) -> None:
    for i in range(count):
        await log.record_decision(sample_action(i), sample_decision(effect))


def current(snapshot: Snapshot) -> tuple[int, float | None]:
    """Decisions and deny rate of the current window, all agents and versions together."""
    (whole,) = [q for q in snapshot.quality if q.version == "*"]
    return whole.decisions, whole.deny_rate


async def gauge(log: AuditLog, monitor: LiveMonitor) -> Snapshot:
    monitor.start(lambda: log.size)
    try:
        return await monitor.refresh()
    finally:
        await monitor.close()


@pytest.mark.parametrize("fed", [False, True], ids=["read-back", "fed"])
async def test_a_record_stamped_a_day_ahead_hides_no_later_denials(
    tmp_path: Path, clock: SteppedClock, fed: bool
) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
    try:
        if fed:
            log.follow(monitor.feed)  # as `warden serve` wires it
        await write(log, 20, Effect.ALLOW)
        clock.step = DAY_NS  # a step forward for one record, then corrected
        await write(log, 1, Effect.ALLOW)
        clock.step = 0
        await write(log, 20, Effect.DENY)
        snapshot = await gauge(log, monitor)
    finally:
        await log.close()
    # The record stamped tomorrow was made now: it is counted now, and so is every later one
    # (before, none of the 20 denials after it was in the current window).
    assert current(snapshot) == (41, 20 / 41)


async def test_records_stamped_before_those_kept_are_counted_when_they_were_made(
    tmp_path: Path, clock: SteppedClock
) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    try:
        await write(log, 20, Effect.ALLOW)
        clock.step = -2 * DAY_NS  # stepped back two days, while the decisions are made now
        await write(log, 20, Effect.DENY)
        clock.step = 0
        snapshot = await gauge(log, LiveMonitor(MonitorConfig(interval_s=3600), tmp_path))
    finally:
        await log.close()
    # Made after the allows, they count with them, not two days back in the reference.
    assert current(snapshot) == (40, 0.5)


async def test_rows_stay_in_time_order_whatever_order_they_come_in(
    tmp_path: Path, clock: SteppedClock
) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
    try:
        for step in (0, DAY_NS, -DAY_NS, 0, 3 * DAY_NS, -3 * DAY_NS, 0):
            clock.step = step
            await write(log, 3, Effect.ALLOW)
        await gauge(log, monitor)
    finally:
        await log.close()
    stamps = [row[0] for row in monitor._decisions]
    assert len(stamps) == 21
    assert stamps == sorted(stamps)


async def test_a_full_window_after_a_step_back_keeps_the_newest_decisions(
    tmp_path: Path, clock: SteppedClock
) -> None:
    # Full (max_events), each record after a step back evicted the one before it: the
    # current window counted one decision.
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    monitor = LiveMonitor(MonitorConfig(interval_s=3600, max_events=1000), tmp_path)
    try:
        await write(log, 1000, Effect.ALLOW)
        clock.step = -3600 * 10**9  # set back an hour, and it stays there
        await write(log, 300, Effect.DENY)
        snapshot = await gauge(log, monitor)
    finally:
        await log.close()
    assert current(snapshot) == (1000, 0.3)  # the last 1,000 made: 700 allows, 300 denials
