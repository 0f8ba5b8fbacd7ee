"""The task helper: references kept, failures logged and counted, drain and cancel."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from warden import tasks
from warden.errors import AuditError
from warden.tasks import Tasks

ROOT = Path(__file__).resolve().parents[2]


def errors(code: str) -> float:
    return REGISTRY.get_sample_value("warden_errors_total", {"code": code}) or 0.0


async def test_a_spawned_task_is_held_until_it_ends() -> None:
    group = Tasks("t")
    done = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.01)
        done.set()

    group.spawn(work(), name="w")
    gc.collect()  # nothing else holds the task: the group must
    assert len(group) == 1
    await group.drain()
    assert done.is_set()
    assert len(group) == 0


async def test_a_failure_is_logged_and_counted_by_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = Tasks("t")
    before = errors("audit_unavailable")

    async def fails() -> None:
        raise AuditError("disk full")

    with caplog.at_level(logging.ERROR, logger="warden.tasks"):
        group.spawn(fails(), name="record")
        await group.drain()
    assert group.failures == 1
    assert errors("audit_unavailable") == before + 1
    assert "warden-t-record" in caplog.text
    assert "disk full" in caplog.text


async def test_other_exceptions_count_as_internal_errors() -> None:
    group = Tasks("t")
    before = errors("internal_error")

    async def fails() -> None:
        raise ValueError("bug")

    group.spawn(fails(), name="x")
    await group.drain()
    assert errors("internal_error") == before + 1


async def test_an_awaited_task_leaves_its_failure_to_the_caller() -> None:
    group = Tasks("t")

    async def fails() -> None:
        raise ValueError("mine to handle")

    task = group.spawn(fails(), name="x", awaited=True)
    with pytest.raises(ValueError, match="mine to handle"):
        await task
    await group.drain()
    assert group.failures == 0


async def test_cancellation_is_not_a_failure() -> None:
    group = Tasks("t")
    group.spawn(asyncio.sleep(10), name="sleeper")
    await asyncio.sleep(0)
    await group.cancel()
    assert len(group) == 0
    assert group.failures == 0


async def test_cancel_from_one_of_its_own_tasks_cancels_the_others_and_returns() -> None:
    group = Tasks("t")
    sleeper = group.spawn(asyncio.sleep(10), name="sleeper")

    async def closer() -> None:
        await group.cancel()  # waiting for itself would never end

    await asyncio.wait_for(group.spawn(closer(), name="closer", awaited=True), 5)
    assert sleeper.cancelled()


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


async def test_a_task_given_a_context_does_not_see_the_callers() -> None:
    group = Tasks("t")
    REQUEST.set("req-1")

    async def read() -> str:
        return REQUEST.get()

    copied = group.spawn(read(), name="copied")
    own = group.spawn(read(), name="own", context=contextvars.Context())
    assert await copied == "req-1"
    assert await own == "none"


async def test_drain_waits_for_tasks_started_while_draining() -> None:
    group = Tasks("t")
    finished: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        finished.append("second")

    async def first() -> None:
        await asyncio.sleep(0.01)
        group.spawn(second(), name="second")
        finished.append("first")

    group.spawn(first(), name="first")
    await group.drain()
    assert finished == ["first", "second"]


async def test_the_process_wide_spawn_returns_a_task_its_owner_can_cancel() -> None:
    task = tasks.spawn(asyncio.sleep(10), name="poll")
    assert task.get_name() == "warden-process-poll"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_lint_bans_bare_create_task_in_src() -> None:
    probe = ROOT / "src" / "warden" / "_lint_probe_tasks.py"
    source = "import asyncio\n\n\nasync def f() -> None:\n    t = asyncio.create_task(f())\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--select",
            "TID251",
            "--stdin-filename",
            str(probe),
            "-",
        ],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "warden.tasks" in result.stdout
