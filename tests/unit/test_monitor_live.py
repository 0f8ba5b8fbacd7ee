"""LiveMonitor reads new records a little at a time, between its recomputes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from warden.audit import AuditLog
from warden.config import AuditConfig, MonitorConfig
from warden.monitor import live
from warden.monitor.live import LiveMonitor
from warden.testing.audit import sample_action, sample_decision


async def test_records_are_read_between_recomputes(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
    try:
        monitor.start(lambda: log.size)
        for _ in range(200):  # the first recompute is done
            if monitor.last is not None:
                break
            await asyncio.sleep(0.01)
        assert monitor.last is not None
        first = monitor.last
        for i in range(3 * live._YIELD_EVERY + 5):  # several read batches
            await log.record_decision(sample_action(i), sample_decision())
        for _ in range(500):  # read within about READ_EVERY_S, long before the next recompute
            if len(monitor._decisions) == 3 * live._YIELD_EVERY + 5:
                break
            await asyncio.sleep(0.01)
        assert len(monitor._decisions) == 3 * live._YIELD_EVERY + 5
        assert monitor.last is first  # not recomputed: only read
        # A recompute asked for meanwhile waits its turn and sees every record.
        snapshot = await monitor.refresh()
        assert sum(q.decisions for q in snapshot.quality if q.version == "*") == len(
            monitor._decisions
        )
    finally:
        await monitor.close()
        await log.close()
