"""Which policy workers count as stalled: stopped or frozen, not merely starved of CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from warden.policy.engine import _runnable

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_busy_process_is_runnable_and_a_stopped_one_is_not() -> None:
    # A challenger's SCHED_IDLE worker on a busy machine is runnable (R): it is starved,
    # and replacing it would not help. A stopped one (T) is what the stall bound is for.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        while not _runnable(busy.pid):
            assert time.monotonic() < deadline, "the busy loop never showed as runnable"
            time.sleep(0.01)
        os.kill(busy.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _runnable(busy.pid):
            assert time.monotonic() < deadline, "the stopped process still showed as runnable"
            time.sleep(0.01)
    finally:
        busy.kill()
        busy.wait()
    assert not _runnable(busy.pid)  # gone: not runnable either
