"""``warden init --approver/--admin``: someone can decide approvals on the first run."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from warden.config import load_config
from warden.server import Warden
from warden.testing import MockLLM

WARDEN = Path(sys.executable).with_name("warden")


def _init(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WARDEN), "init", str(folder), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def _status(url: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status


async def test_the_printed_tokens_work_with_their_roles(tmp_path: Path, llm: MockLLM) -> None:
    done = _init(tmp_path, "--approver", "dana", "--admin", "ops", "--approver", "ops")
    assert done.returncode == 0, done.stderr
    printed = dict(re.findall(r"admin token for (\S+) \([^)]*\): (\S+)", done.stdout))
    assert set(printed) == {"dana", "ops"}
    config_file = tmp_path / "warden.yaml"
    text = config_file.read_text()
    assert printed["dana"] not in text  # only its SHA-256 is kept
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    file_config = load_config(config_file, environ={})
    assert {(t.subject, t.roles) for t in file_config.admin.tokens} == {
        ("dana", ("approver",)),
        ("ops", ("admin", "approver")),
    }
    config = load_config(
        config_file,
        environ={},
        overrides={
            "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "upstreams": {"openai": {"protocol": "openai", "base_url": llm.url}},
            "policy": {"bundles": [str(tmp_path / "policies" / "customer-support")]},
            "audit": {"dir": str(tmp_path / "audit")},
            "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        },
    )
    async with Warden(config) as w:
        approvals = f"{w.admin_url}/v1/approvals?status=pending"
        switches = f"{w.admin_url}/v1/killswitches"
        assert await _status(approvals, printed["dana"]) == 200
        assert await _status(switches, printed["dana"]) == 403  # an approver, not an admin
        assert await _status(switches, printed["ops"]) == 200
        assert await _status(approvals, "not-a-token") == 401


@pytest.mark.parametrize("name", ["", "dana smith", "-x", "a" * 65])
def test_a_name_that_cannot_be_a_subject_is_refused(tmp_path: Path, name: str) -> None:
    done = _init(tmp_path, "--approver", name)
    assert done.returncode == 2
    assert "--approver" in done.stderr
    assert not (tmp_path / "warden.yaml").exists()


def test_a_name_yaml_would_read_as_another_type_stays_text(tmp_path: Path) -> None:
    done = _init(tmp_path, "--approver", "12345", "--approver", "no", "--admin", "2024-01-02")
    assert done.returncode == 0, done.stderr
    config = load_config(tmp_path / "warden.yaml", environ={})
    assert sorted(t.subject for t in config.admin.tokens) == ["12345", "2024-01-02", "no"]
