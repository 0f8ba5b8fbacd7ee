"""How long the live drift monitor holds up Warden's event loop, against the idle loop, same run.

A probe on the event loop sleeps 1 ms over and over and records how late it
wakes (the delay any agent's request would see at that moment). Measured:

* ``writes``: records written at a steady rate, no monitor (the reference:
  the writing itself takes the loop too);
* ``follow``: the same writes while the monitor follows the log, which hands
  it each durable batch as ``warden serve`` does (no recompute within the run);
* ``catch-up``: one recompute after a backlog of records (a start or a
  restart of a busy sidecar: every record is read, then drift and quality
  are computed over the windows).

Prints p99 and the worst lateness of each, in ms::

    python benchmarks/monitor_lag.py [--backlog 60000] [--rate 2000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from warden.audit import AuditLog  # noqa: E402
from warden.config import AuditConfig, MonitorConfig  # noqa: E402
from warden.monitor.live import LiveMonitor  # noqa: E402
from warden.ops.runtime import tune_runtime  # noqa: E402
from warden.testing.audit import sample_action, sample_decision  # noqa: E402


async def lateness(work: Awaitable[object]) -> list[float]:
    """How late (ms) a 1 ms sleep on the loop wakes while ``work`` runs."""
    late: list[float] = []
    done = False

    async def probe() -> None:
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - started - 0.001) * 1000)

    probing = asyncio.ensure_future(probe())
    try:
        await work
    finally:
        done = True
        await probing
    return late


async def write(log: AuditLog, count: int, offset: int = 0) -> None:
    pending = []
    for i in range(count):
        pending.append(log.record_decision(sample_action(offset + i), sample_decision()))
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def steady(log: AuditLog, rate: int, seconds: float) -> None:
    written = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        await write(log, rate // 10, written)
        written += rate // 10
        await asyncio.sleep(0.1)


def summary(name: str, late: list[float]) -> str:
    ordered = sorted(late)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{name:10}{statistics.median(ordered):>10.3f}{p99:>10.3f}{ordered[-1]:>10.3f}"


async def main_async(backlog: int, rate: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = await AuditLog.open(AuditConfig(dir=tmp, checkpoint_interval_s=3600, fsync="never"))
        tune_runtime()  # as `warden serve` does once started
        idle = await lateness(steady(log, rate, seconds))
        monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp)
        log.follow(monitor.feed)  # as `warden serve` wires it: batches handed over
        monitor.start(lambda: log.size)
        follow = await lateness(steady(log, rate, seconds))
        await monitor.close()
        await write(log, backlog, 10**7)
        catch_up_monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp)
        catch_up_monitor._size = lambda: log.size  # as start() would set it
        catch_up = await lateness(catch_up_monitor.refresh())
        await log.close()
    print(f"event-loop lateness, ms (backlog {backlog} records, follow {rate} records/s)")
    print(f"{'':10}{'p50':>10}{'p99':>10}{'worst':>10}")
    for name, late in (("writes", idle), ("follow", follow), ("catch-up", catch_up)):
        print(summary(name, late))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=60000)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.backlog, args.rate, args.seconds))


if __name__ == "__main__":
    main()
