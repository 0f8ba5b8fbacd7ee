"""A policy worker starts once, with its stack already in force.

The worker needs a larger stack than Linux's usual 8 MiB (rego-cpp's regular
expressions recurse per character). Set by the worker itself, the limit only
holds after the interpreter starts again, so every worker start, and every
replacement a crashed worker's requests wait for, paid for two interpreter
starts. Started through ``prlimit``, it runs once. Counted with ``strace``.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.functional.conftest import SHIPPED_POLICY

pytestmark = pytest.mark.timeout(120)

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from warden.config import PolicyConfig
    from warden.policy.engine import PolicyEngine

    async def main():
        config = PolicyConfig(bundles=(sys.argv[1],), workers=2, watch=False)
        engine = await PolicyEngine.start(config)
        assert engine.ready, engine.status()
        limits = [open(f"/proc/{pid}/limits").read() for pid in engine.status()["worker_pids"]]
        await engine.close()
        for text in limits:
            line = next(x for x in text.splitlines() if x.startswith("Max stack size"))
            print(line.split()[3])

    asyncio.run(main())
    """
)


def test_each_worker_starts_one_interpreter_with_its_stack_set(tmp_path: Path) -> None:
    strace, prlimit = shutil.which("strace"), shutil.which("prlimit")
    if strace is None or prlimit is None:
        pytest.skip("needs strace and util-linux's prlimit")
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or hard != resource.RLIM_INFINITY and hard <= soft:
        pytest.skip("the stack limit cannot change here, so no worker starts twice")
    trace = tmp_path / "trace.txt"
    done = subprocess.run(
        # -ff: a file per process, so no call is split into "unfinished" and "resumed"
        # lines by another process's (the two workers start at once).
        [strace, "-ff", "-qq", "-s", "256", "-o", str(trace), "-e", "trace=execve"]
        + [sys.executable, "-c", CHILD, str(SHIPPED_POLICY)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    if "ptrace" in done.stderr and done.returncode != 0:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    # Each worker's stack is the engine's default, 512 MiB (within a lower hard limit).
    want = str(min(512 * 1024 * 1024, hard) if hard != resource.RLIM_INFINITY else 512 << 20)
    assert done.stdout.split() == [want, want]
    interpreters = [
        line
        for part in tmp_path.glob("trace.txt.*")
        for line in part.read_text().splitlines()
        if "execve(" in line
        and "warden.policy.worker" in line
        and f'execve("{prlimit}"' not in line
        and "= 0" in line
    ]
    assert len(interpreters) == 2, "\n".join(interpreters)


def test_prlimit_is_taken_from_the_system_and_only_when_it_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found on PATH, an empty entry ran the working directory's "prlimit", handed the
    # worker's socket; a prlimit that cannot set the limit left the worker unstarted.
    from warden.policy import worker  # noqa: PLC0415 - its cache is what is tested

    hostile = tmp_path / "prlimit"
    hostile.write_text("#!/bin/sh\necho ran > " + str(tmp_path / "ran") + "\n")
    hostile.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", ":/usr/bin:/bin")
    monkeypatch.setattr(worker, "_prlimit_works", {})
    argv = ["python", "-m", "warden.policy.worker", "3", "512"]
    command = worker.stack_command(argv, 512 << 20)
    assert command[0] != str(hostile)
    assert command[0] in {"/usr/bin/prlimit", "/bin/prlimit", "python"}
    assert not (tmp_path / "ran").exists()
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(worker, "_PRLIMIT_AT", (str(failing),))
    monkeypatch.setattr(worker, "_prlimit_works", {})
    assert worker.stack_command(argv, 512 << 20) == argv  # the worker sets its own
