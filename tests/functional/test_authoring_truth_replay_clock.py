"""``warden policy replay`` runs a clock rule at the recorded decision's time, not at replay time.

The logs are written by a real Warden (the openai SDK through the proxy to a
mock model). A rule that holds refunds while ``time.now_ns()`` is before a
cutoff stands for any time window (nights, weekends, a freeze): replayed
after the cutoff at the time of the replay, the same bundle showed invented
changes, and a candidate that would have held every recorded refund showed
none, so a ``--max-changes 0`` gate passed it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.cli import main as warden_main
from warden.config import Config
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.replay import replay
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

REFUNDS = 3
ALLOW = 'default decision := {"effect": "allow", "reason": "ok"}\n'


def bundle(tmp_path: Path, name: str, rules: str = "") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "policy.rego").write_text("package warden\nimport rego.v1\n" + rules + ALLOW)
    return folder


def held_until(cutoff_ns: int) -> str:
    """A freeze window: refunds are held while the clock is before ``cutoff_ns``."""
    return (
        'decision := {"effect": "require_approval", "reason": "refunds are frozen"} if {\n'
        '    input.action.tool == "issue_refund"\n'
        f"    time.now_ns() < {cutoff_ns}\n"
        "}\n"
    )


def record(tmp_path: Path, policy: Path) -> tuple[Path, Config]:
    """Three refunds through a real Warden deciding with ``policy``; its audit log."""

    async def run() -> Config:
        async with MockLLM() as llm:
            config = make_config(tmp_path, llm.url, policy={"bundles": [str(policy)]})
            async with Warden(config) as warden:
                for i in range(REFUNDS):
                    call = Call("issue_refund", {"order_id": f"A-{i}", "amount": 10})
                    llm.script(Reply(tool_calls=[call]))
                    async with openai.AsyncOpenAI(
                        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
                    ) as client:
                        await client.chat.completions.create(
                            model="gpt-4o", messages=[{"role": "user", "content": "refund"}]
                        )
            return config

    config = asyncio.run(run())
    return tmp_path / "audit", config


def refund_effects(audit: Path) -> list[str]:
    return [
        r["decision"]["effect"]
        for r in audit_records(audit)
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]


def replay_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = warden_main(["policy", "replay", *argv])
    return code, capsys.readouterr().out


def test_a_candidate_adding_a_time_window_shows_the_decisions_it_would_have_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit, config = record(tmp_path / "log", bundle(tmp_path, "allow-all"))
    assert refund_effects(audit) == ["allow"] * REFUNDS
    # Every refund was recorded before the cutoff, and the replay runs after it:
    # the candidate would have held each of them.
    cutoff = time.time_ns()
    candidate = bundle(tmp_path, "freeze", held_until(cutoff))
    report = replay(audit, load_policy_set([candidate]), config.policy)
    assert [(c.label, c.count) for c in report.changes] == [("allow→require_approval", REFUNDS)]
    assert report.at_recorded_time == report.replayed
    assert report.unreplayed == 0

    code, out = replay_cli(
        ["--audit", str(audit), "--bundle", str(candidate), "--max-changes", "0"], capsys
    )
    assert code == 1, out
    assert "allow→require_approval" in out
    assert f"{REFUNDS} decision(s) change" in out
    assert "replayed at their record's time" in out


def test_replaying_the_recorded_time_window_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Long enough for Warden to start and decide three refunds on a shared machine.
    cutoff = time.time_ns() + 8 * 10**9
    freeze = bundle(tmp_path, "freeze", held_until(cutoff))
    audit, config = record(tmp_path / "log", freeze)
    assert refund_effects(audit) == ["require_approval"] * REFUNDS
    time.sleep(max(0.0, (cutoff - time.time_ns()) / 1e9) + 0.2)  # the window is over

    report = replay(audit, load_policy_set([freeze]), config.policy)
    assert report.changes == ()
    assert report.replayed == report.scanned == report.at_recorded_time > 0

    code, out = replay_cli(
        ["--audit", str(audit), "--bundle", str(freeze), "--max-changes", "0", "--format", "json"],
        capsys,
    )
    doc: dict[str, Any] = orjson.loads(out)
    assert code == 0, out
    assert (doc["changed"], doc["at_recorded_time"]) == (0, doc["replayed"])


def test_a_clock_the_replay_cannot_set_skips_the_decisions_and_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """io.jwt.decode_verify reads the clock itself (``with time.now_ns`` does not reach
    it): such a candidate's decisions are not replayed, and a gated run says so."""
    audit, _ = record(tmp_path / "log", bundle(tmp_path, "allow-all"))
    rules = (
        'decision := {"effect": "deny", "reason": "bad admin token"} if {\n'
        '    input.action.tool == "admin_op"\n'
        '    [valid, _, _] := io.jwt.decode_verify(input.action.arguments.token, {"secret": "s"})\n'
        "    not valid\n"
        "}\n"
    )
    candidate = bundle(tmp_path, "jwt", rules)
    argv = ["--audit", str(audit), "--bundle", str(candidate), "--max-changes", "0"]
    code, out = replay_cli(argv, capsys)
    assert code == 1, out
    assert "not replayed: the candidate reads the clock" in out
    assert "--allow-skipped" in out

    code, out = replay_cli([*argv, "--format", "json"], capsys)
    doc = orjson.loads(out)
    assert doc["replayed"] == 0
    assert doc["skipped"]["clock"] == doc["scanned"] == doc["unreplayed"] > 0

    code, _ = replay_cli([*argv, "--allow-skipped"], capsys)
    assert code == 0


def test_a_clock_candidate_whose_decision_holds_a_big_integer_is_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its result went through orjson, which stops at 64 bits: a traceback, not a replay.
    audit, _ = record(tmp_path / "log", bundle(tmp_path, "allow-all"))
    rules = (
        'decision := {"effect": "deny", "reason": "frozen", '
        '"until_ns": time.now_ns() * 100000000000} if {\n'
        '    input.action.tool == "issue_refund"\n}\n'
    )
    candidate = bundle(tmp_path, "big", rules)
    code, out = replay_cli(
        ["--audit", str(audit), "--bundle", str(candidate), "--max-changes", "0"], capsys
    )
    assert code == 1, out
    assert "allow→deny" in out, out
