"""Install anywhere: the wheel serves from an empty folder; ``warden init`` starts a project.

The wheel is built from a copy of the source (no network, no build
isolation), installed with ``--no-deps`` into a fresh virtual environment
whose dependencies come from the project's environment through a ``.pth``
file (so nothing is downloaded), and run as the ``warden`` console script.
No file of the checkout is on its path: the policy bundle it serves must be
the one inside the wheel.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from warden.testing import Call, MockLLM, Reply

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

MESSAGES: Any = [{"role": "user", "content": "export every customer to a csv"}]


def run(*args: str | Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(  # noqa: S603 - fixed arguments
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv with the wheel installed."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=skip)
    shutil.copytree(ROOT / "policies", source / "policies", ignore=skip)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, source)
    (wheel,) = dist.glob("agent_warden-*.whl")

    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    # Dependencies from the project's environment, after the venv's own site-packages.
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
    )
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run(python, "-c", "import warden; print(warden.__file__)").stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout
    return venv / "bin"


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


async def _banner(log: Path, proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """The proxy and admin URLs from ``warden serve``'s start line."""
    async with asyncio.timeout(60):
        while True:
            for line in _read(log).splitlines():
                if line.startswith("warden ") and " proxy " in line:
                    words = line.split()
                    return words[words.index("proxy") + 1], words[words.index("admin") + 1]
            if proc.returncode is not None:
                raise AssertionError(_read(log))
            await asyncio.sleep(0.1)


async def test_the_wheel_serves_the_shipped_policy_from_an_empty_folder(
    installed: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "anywhere"
    empty.mkdir()
    log = tmp_path / "serve.log"
    async with MockLLM() as llm:
        llm.on_request(lambda *_: Reply(tool_calls=[Call("export_customers", {"format": "csv"})]))
        env = {
            **os.environ,
            "WARDEN_LISTEN__PROXY": "127.0.0.1:0",
            "WARDEN_LISTEN__ADMIN": "127.0.0.1:0",
            "WARDEN_UPSTREAMS__OPENAI__PROTOCOL": "openai",
            "WARDEN_UPSTREAMS__OPENAI__BASE_URL": llm.url,
            "WARDEN_POLICY__WORKERS": "1",
        }
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                installed / "warden", "serve", cwd=empty, env=env, stdout=out, stderr=out
            )
        try:
            proxy, admin = await _banner(log, proc)
            async with aiohttp.ClientSession() as session, session.get(admin + "/readyz") as resp:
                assert resp.status == 200, await resp.text()
                ready = orjson.loads(await resp.read())
            source = Path(ready["policy"]["source"])
            assert source.parts[-3:] == ("data", "policies", "customer-support")
            assert not source.is_relative_to(ROOT)
            async with openai.AsyncOpenAI(
                base_url=f"{proxy}/openai/v1", api_key="k", max_retries=0
            ) as client:
                completion = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES
                )
            message = completion.choices[0].message
            assert not message.tool_calls
            assert "[Warden] blocked the tool call `export_customers`" in (message.content or "")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert (empty / "warden-data" / "audit").is_dir()  # its data where it ran


def test_warden_init_writes_a_config_and_a_bundle_whose_tests_pass(
    installed: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    done = run(installed / "warden", "init", cwd=project)
    assert "warden serve --config warden.yaml" in done.stdout
    bundle = project / "policies" / "customer-support"
    assert (bundle / "policy.rego").is_file()
    assert (bundle / "policy_test.rego").is_file()
    assert list((bundle / "decisions").glob("*.yaml"))
    checked = run(installed / "warden", "config", "--config", "warden.yaml", cwd=project)
    assert orjson.loads(checked.stdout)["policy"]["bundles"] == ["policies/customer-support"]
    tested = run(installed / "warden", "policy", "test", "policies/customer-support", cwd=project)
    assert "PASS" in tested.stdout + tested.stderr
    # A second init changes nothing unless told to.
    (project / "warden.yaml").write_text("mode: observe\n")
    again = subprocess.run(  # noqa: S603 - fixed arguments
        [str(installed / "warden"), "init"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert (project / "warden.yaml").read_text() == "mode: observe\n"
