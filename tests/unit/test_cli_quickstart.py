"""README's quick start works on the default configuration, as ``warden identity check`` says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from warden import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quick start")
    return text[start : text.index("\n## ", start + 1)]


def test_the_quick_start_sends_no_agent_id_the_default_config_refuses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WARDEN_CONFIG", "WARDEN_AGENT__ID", "WARDEN_IDENTITY__REQUIRE_PROOF"):
        monkeypatch.delenv(name, raising=False)
    section = quick_start()
    for snippet in re.findall(r"```python\n(.*?)```", section, re.S):
        for headers in re.findall(r"default_headers=\{(.*?)\}", snippet, re.S):
            agent = re.search(r'"X-Warden-Agent":\s*"([^"]+)"', headers)
            if agent is None or "X-Warden-Agent-Key" in headers:
                continue  # no id claimed, or one proved with its key
            code = cli.main(["identity", "check", "--agent", agent.group(1)])
            assert code == 0, capsys.readouterr().err
