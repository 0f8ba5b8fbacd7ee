"""A SQLite store's one thread: calls waiting for it are bounded, and a caller that gives
up takes its call with it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from warden.state import KillSwitchRow, StateStore, base


def _row(switch_id: str) -> KillSwitchRow:
    return KillSwitchRow(switch_id, "global", "*", "drill", "ops", 1.0)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "BUSY_TIMEOUT_MS", 300)
    monkeypatch.setattr(base, "QUEUE_DEADLINE_S", 0.5)


@pytest.mark.usefixtures("quick")
async def test_a_call_cancelled_while_it_waits_never_runs(tmp_path: Path) -> None:
    # An ext_authz check past its deadline cancels its reservation's write: run later
    # anyway, the reservation would hold what no call uses.
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        first = asyncio.create_task(store.add_killswitch(_row("ks_first")))
        await asyncio.sleep(0.05)  # the thread is busy with it, waiting for the lock
        second = asyncio.create_task(store.add_killswitch(_row("ks_second")))
        await asyncio.sleep(0.05)
        second.cancel()
        locker.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await second
        await first  # the lock is gone before its busy timeout: it lands
        await asyncio.sleep(0.2)
        stored = {row.id for row in await store.active_killswitches()}
    finally:
        locker.close()
        await store.close()
    assert stored == {"ks_first"}


@pytest.mark.usefixtures("quick")
async def test_a_call_that_waits_past_the_deadline_fails_and_never_runs(tmp_path: Path) -> None:
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        calls = [asyncio.create_task(store.add_killswitch(_row(f"ks_{i}"))) for i in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert not store.up
        locker.execute("ROLLBACK")
        await asyncio.sleep(0.2)
        stored = {row.id for row in await store.active_killswitches()}
    finally:
        locker.close()
        await store.close()
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    waited = [str(r) for r in results if "did not get to this call" in str(r)]
    assert len(waited) >= 2  # queued behind the first, given up on at the deadline
    assert stored == set()


async def test_a_call_cancelled_as_the_thread_frees_up_never_runs(tmp_path: Path) -> None:
    # asyncio's own cancel reaches the thread only on the next loop pass: a thread that
    # picked the call up first ran it anyway.
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    gate = threading.Event()
    try:
        first = asyncio.create_task(store._run(gate.wait))  # the thread is busy with this
        await asyncio.sleep(0.05)
        second = asyncio.create_task(store.add_killswitch(_row("ks_second")))
        await asyncio.sleep(0.05)  # queued behind the first
        second.cancel()  # the caller gives up...
        gate.set()  # ...as the thread frees up,
        time.sleep(0.05)  # noqa: ASYNC251 - a busy pass of the loop, on purpose
        with pytest.raises(asyncio.CancelledError):
            await second
        await first
        await asyncio.sleep(0.1)
        stored = {row.id for row in await store.active_killswitches()}
    finally:
        gate.set()
        await store.close()
    assert stored == set()
