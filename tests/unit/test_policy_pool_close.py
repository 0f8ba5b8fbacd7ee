"""Closing a policy engine while a worker replacement is still starting leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from warden.config import PolicyConfig
from warden.policy import engine as engine_module
from warden.policy.engine import PolicyEngine

POLICY = 'package warden\n\ndefault decision := {"effect": "allow", "reason": "fine"}\n'


async def test_close_during_a_replacement_start_stops_the_new_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "policy.rego").write_text(POLICY)
    engine = await PolicyEngine.start(
        PolicyConfig(bundles=(str(tmp_path),), workers=1, watch=False)
    )
    started: list[subprocess.Popen[bytes]] = []
    entered, release = threading.Event(), threading.Event()
    real = engine_module._spawn_process

    def slow_spawn(python: str, stack_mb: int) -> Any:
        # The replacement's start is still in the executor when close() runs.
        entered.set()
        release.wait(10)
        proc, sock = real(python, stack_mb)
        started.append(proc)
        return proc, sock

    monkeypatch.setattr(engine_module, "_spawn_process", slow_spawn)
    (pid,) = engine.status()["worker_pids"]
    os.kill(pid, signal.SIGKILL)  # the pool starts a replacement
    assert await asyncio.to_thread(entered.wait, 10)
    closing = asyncio.ensure_future(engine.close())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, 20)
    assert len(started) == 1
    # Stopped and reaped by close(), not left to the garbage collector.
    assert started[0].returncode is not None
