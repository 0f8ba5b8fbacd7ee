"""A first day with Warden, as the README tells it: the real ``warden`` command.

``warden init --approver dana`` then ``warden serve --config warden.yaml``: dana
decides the shipped bundle's holds. What ``warden serve`` says at start (a
``./warden.yaml`` it does not read, observe mode's limits, approvers outside the
policy's groups), the eval suite ``warden init`` writes, and a stop signal while
Warden is still starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.sdk_calls import function_calls
from warden import cli
from warden.config import load_config
from warden.testing import Call, MockLLM, Reply

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "policies" / "customer-support"
SUITE = ROOT / "policies" / "customer-support-evals" / "suite.jsonl"
WARDEN = [sys.executable, "-m", "warden.cli"]
REFUND = {"order_id": "A-1003", "amount": 250, "currency": "USD"}
GROUP_WARNING = "approver token is in the approver groups support-leads"


def warden(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``warden ...`` as its own process, run to the end."""
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [*WARDEN, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def serve_env(**env: str) -> dict[str, str]:
    """The environment of ``warden serve`` on loopback ports with one policy worker."""
    return {
        **os.environ,
        "WARDEN_LISTEN__PROXY": "127.0.0.1:0",
        "WARDEN_LISTEN__ADMIN": "127.0.0.1:0",
        "WARDEN_POLICY__WORKERS": "1",
        **env,
    }


@contextlib.contextmanager
def serving(folder: Path, *args: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    """``warden serve ARGS`` started in ``folder``; stopped with SIGTERM at the end."""
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [*WARDEN, "serve", "--log-format", "text", *args],
        cwd=folder,
        env=serve_env(**env),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def start_lines(proc: subprocess.Popen[str]) -> list[str]:
    """What ``warden serve`` printed up to and including its banner's first line."""
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        line = proc.stderr.readline()
        assert line, "".join(lines)  # it ended before it started
        lines.append(line)
        if line.startswith("warden ") and " admin http" in line:
            return lines


def listeners(banner: str) -> tuple[str, str]:
    words = banner.split()
    return words[words.index("proxy") + 1], words[words.index("admin") + 1]


def drain(proc: subprocess.Popen[str]) -> None:
    """Keep reading its stderr, so that log lines never block it on a full pipe."""
    assert proc.stderr is not None
    threading.Thread(target=proc.stderr.read, daemon=True).start()


@pytest.fixture
async def refunds() -> AsyncIterator[MockLLM]:
    """A model that proposes a 250 USD refund: the shipped bundle holds it for a lead."""
    async with MockLLM() as llm:
        llm.on_request(lambda *_: Reply(tool_calls=[Call("issue_refund", REFUND)]))
        yield llm


async def pending(admin: str, token: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
        session.get(f"{admin}/v1/approvals?status=pending") as resp,
    ):
        assert resp.status == 200, await resp.text()
        approvals: list[dict[str, Any]] = (await resp.json())["approvals"]
        return approvals


async def test_dana_from_warden_init_approves_the_shipped_bundles_hold(
    tmp_path: Path, refunds: MockLLM
) -> None:
    done = warden("init", "--approver", "dana", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    token = re.search(r"admin token for dana \([^)]*\): (\S+)", done.stdout)
    assert token is not None, done.stdout
    # Only the base URL of the default openai upstream is changed, as a first user would.
    with serving(
        tmp_path, "--config", "warden.yaml", WARDEN_UPSTREAMS__OPENAI__BASE_URL=refunds.url
    ) as proc:
        said = await asyncio.to_thread(start_lines, proc)
        drain(proc)
        assert not any(GROUP_WARNING in line or "nobody can decide" in line for line in said)
        proxy, admin = listeners(said[-1])
        async with openai.AsyncOpenAI(
            base_url=f"{proxy}/openai/v1", api_key="sk-test", max_retries=0, timeout=120
        ) as client:
            asked = asyncio.create_task(
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "refund A-1003"}]
                )
            )
            async with asyncio.timeout(60):
                while not (held := await pending(admin, token.group(1))):
                    assert not asked.done(), asked.result()
                    await asyncio.sleep(0.2)
            assert held[0]["approvers"] == ["support-leads"]
            async with (
                aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {token.group(1)}"}
                ) as session,
                session.post(
                    f"{admin}/v1/approvals/{held[0]['id']}/approve", json={"comment": "ok"}
                ) as resp,
            ):
                assert resp.status == 200, await resp.text()  # was 403 not_an_approver
            completion = await asyncio.wait_for(asked, 60)
    calls = function_calls(completion.choices[0].message)
    assert [c.function.name for c in calls] == ["issue_refund"]  # approved: it goes through


def test_init_approver_group_names_the_groups_in_place_of_the_bundles(tmp_path: Path) -> None:
    done = warden(
        "init", "--approver", "dana", "--approver-group", "leads", "--admin", "ops", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    tokens = {t.subject: t for t in load_config(tmp_path / "warden.yaml", environ={}).admin.tokens}
    assert tokens["dana"].groups == ("leads",)
    assert tokens["ops"].groups == ()  # an admin decides no approvals: no groups
    alone = warden("init", str(tmp_path / "other"), "--approver-group", "leads", cwd=tmp_path)
    assert alone.returncode == 2
    assert "give --approver NAME too" in alone.stderr
    assert not (tmp_path / "other").exists()


def test_serve_warns_when_no_approver_is_in_the_policys_groups(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def token(subject: str, **more: Any) -> dict[str, Any]:
        return {"subject": subject, "roles": ["approver"], "sha256": "0" * 64, **more}

    cases: list[tuple[dict[str, Any], bool]] = [
        ({"admin": {"tokens": [token("dana")]}}, True),
        ({"admin": {"tokens": [token("dana", groups=["support-leads"])]}}, False),
        ({"admin": {"tokens": [token("support-leads")]}}, False),  # a subject is its group
        (
            {
                "admin": {"tokens": [token("dana", groups=["support-leads"]), token("sam")]},
                "approvals": {"required_approvals": 2},
            },
            True,
        ),
        # The active bundle is fetched from a server after start: not read for this.
        ({"admin": {"tokens": [token("dana")]}, "policy": {"bundle_url": "http://b:1/x"}}, False),
    ]
    for overrides, warned in cases:
        policy = {"bundles": [str(SHIPPED)], **overrides.pop("policy", {})}
        config = load_config(environ={}, overrides={**overrides, "policy": policy})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="warden.cli"):
            cli._warn_if_nobody_decides(config)
        assert (GROUP_WARNING in caplog.text or "token(s) of the 2" in caplog.text) is warned, (
            overrides
        )


def test_serve_says_a_warden_yaml_it_does_not_read_and_what_observe_mode_blocks(
    tmp_path: Path,
) -> None:
    (tmp_path / "warden.yaml").write_text("mode: enforce\n")
    with serving(tmp_path, WARDEN_MODE="observe") as proc:
        said = "".join(start_lines(proc))
        banner = proc.stderr.readline() if proc.stderr is not None else ""
    assert "./warden.yaml is not read" in said
    assert "--config warden.yaml" in said
    assert banner.startswith("warden: mode observe: decisions are recorded")
    assert "calls Warden cannot check exactly are denied" in banner  # validation still holds
    assert "kill switches still block" in banner
    checked = warden("config", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "./warden.yaml is not read" in checked.stderr


def test_serve_with_its_config_says_nothing_about_it(tmp_path: Path) -> None:
    (tmp_path / "warden.yaml").write_text("mode: enforce\n")
    with serving(tmp_path, "--config", "warden.yaml") as proc:
        said = "".join(start_lines(proc))
    assert "is not read" not in said


def test_init_writes_the_eval_suite_and_it_runs_as_the_docs_show(tmp_path: Path) -> None:
    done = warden("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "policies" / "customer-support-evals" / "suite.jsonl"
    assert written.read_bytes() == SUITE.read_bytes()
    command = (
        "warden eval run policies/customer-support-evals/suite.jsonl "
        "--bundle policies/customer-support"
    )
    assert command in done.stdout  # its next steps name it
    ran = warden(*command.split()[1:], cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "18 passed, 0 failed" in ran.stdout
    # Never overwritten unless told to, as the config and the bundle are not.
    (tmp_path / "warden.yaml").unlink()
    shutil.rmtree(tmp_path / "policies" / "customer-support")
    again = warden("init", cwd=tmp_path)
    assert again.returncode == 1
    assert "suite.jsonl already exists" in again.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_eval_suite(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=skip)
    shutil.copytree(ROOT / "policies", source / "policies", ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(  # noqa: S603 - fixed arguments
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("agent_warden-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        carried = archive.read("warden/data/policies/customer-support-evals/suite.jsonl")
    assert carried == SUITE.read_bytes()


@contextlib.contextmanager
def silent_database() -> Iterator[tuple[int, threading.Event]]:
    """A TCP port that accepts connections and never answers: a PostgreSQL server that
    hangs, holding ``warden serve`` in its start-up for as long as the test needs. The
    event is set once Warden has connected."""
    listener = socket.create_server(("127.0.0.1", 0))
    connected = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])
                connected.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], connected
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_stop_signal_during_start_up_ends_it_in_one_line(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    with (
        silent_database() as (port, connected),
        serving(
            tmp_path,
            WARDEN_STATE__URL=f"postgresql://warden@127.0.0.1:{port}/warden",
            WARDEN_STATE__CONNECT_TIMEOUT_S="60",
        ) as proc,
    ):
        assert connected.wait(60), "warden serve never reached its state store"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == status
        assert proc.stderr is not None
        said = proc.stderr.read()
    assert "Traceback" not in said
    assert f"warden: {sig.name} during start-up: stopped before serving\n" in said
    assert "INFO warden: stopped" in said  # what had started (the audit log) was closed
