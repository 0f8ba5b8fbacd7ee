"""``warden policy replay`` on an audit log written by a real Warden, driven by the openai SDK.

The log comes from the proxy with the shipped customer-support bundle, a
refund cap (so ``input.budget`` matters) and a customer id on every request
(so arguments and context are sealed in the records). A candidate that
tightens the refund limit from 100 to 50 must show exactly the refunds
between 50 and 100 going from allow to require_approval, and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from warden.cli import main as warden_main
from warden.config import Config
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.replay import replay
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund my order"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "issue_refund",
            "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}},
        },
    }
]
# Within every limit of the shipped bundle (100 each, 300 a day per agent) until
# the last, which passes the agent's daily 300 and is held for approval: under
# the candidate it must stay held, which only holds if replay sees input.budget.
AMOUNTS = (20, 40, 60, 75, 95, 30)
TIGHTENED = (60, 75, 95)
REFUND_CAP = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 10_000,
    "over": "deny",
}


def candidate_bundle(tmp_path: Path, auto: int) -> Path:
    """The shipped bundle with the refund limit without approval set to ``auto``."""
    bundle = tmp_path / f"candidate-{auto}"
    shutil.copytree(SHIPPED_POLICY, bundle)
    data_file = bundle / "data.json"
    data = json.loads(data_file.read_text())
    data["warden"]["limits"]["issue_refund"]["auto"] = auto
    data_file.write_text(json.dumps(data))
    return bundle


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config, dict[float, str]]:
    """The audit log of one proxy run, its config, and the decision id of each refund."""
    return _recorded(tmp_path_factory.mktemp("replay"))


def _recorded(tmp_path: Path) -> tuple[Path, Config, dict[float, str]]:
    import asyncio  # noqa: PLC0415 - a module-scoped fixture runs its own loop

    async def run() -> Config:
        async with MockLLM() as llm:
            config = make_config(tmp_path, llm.url, budgets={"caps": [REFUND_CAP]})
            async with Warden(config) as warden:
                for i, amount in enumerate(AMOUNTS):
                    refund = Call("issue_refund", {"order_id": f"A-{i}", "amount": amount})
                    llm.script(Reply(tool_calls=[refund]))
                    async with openai.AsyncOpenAI(
                        base_url=f"{warden.proxy_url}/openai/v1",
                        api_key="sk-test",
                        max_retries=0,
                        default_headers={"X-Warden-Context-Customer-Id": f"C-{i}"},
                    ) as client:
                        await client.chat.completions.create(
                            model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS
                        )
            return config

    config = asyncio.run(run())
    audit = tmp_path / "audit"
    refunds = [
        r
        for r in audit_records(audit)
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]
    # One request at a time: the records are in the order of AMOUNTS.
    assert len(refunds) == len(AMOUNTS)
    for record in refunds:
        assert record["sealed"] is not None  # the customer's fields are sealed
        assert record["action"]["arguments"] is None
        assert "refunds" in record["decision"]["input"]["budget"]
    effects = [r["decision"]["effect"] for r in refunds]
    assert effects == ["allow"] * 5 + ["require_approval"]
    ids = {float(a): r["decision"]["id"] for a, r in zip(AMOUNTS, refunds, strict=True)}
    return audit, config, ids


def test_a_tightened_refund_limit_shows_exactly_the_expected_changes(
    recorded: tuple[Path, Config, dict[float, str]], tmp_path: Path
) -> None:
    audit, config, ids = recorded
    report = replay(audit, load_policy_set([candidate_bundle(tmp_path, 50)]), config.policy)
    assert [(c.label, c.count) for c in report.changes] == [("allow→require_approval", 3)]
    assert set(report.changes[0].samples) == {ids[float(a)] for a in TIGHTENED}
    assert report.inexact == 0
    assert report.errors == 0
    # Every refund and every model call was the policy's to decide, and was replayed.
    assert report.skipped == {}
    assert report.replayed == report.scanned == 2 * len(AMOUNTS)


def test_replaying_the_recorded_bundle_changes_nothing(
    recorded: tuple[Path, Config, dict[float, str]],
) -> None:
    audit, config, _ = recorded
    report = replay(audit, load_policy_set([SHIPPED_POLICY]), config.policy)
    assert report.changes == ()
    assert report.replayed == 2 * len(AMOUNTS)


def test_the_exit_code_gates_on_the_threshold(
    recorded: tuple[Path, Config, dict[float, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    audit, _, ids = recorded
    bundle = str(candidate_bundle(tmp_path, 50))
    base = ["policy", "replay", "--audit", str(audit), "--bundle", bundle]
    assert warden_main([*base, "--max-changes", "2"]) == 1
    out = capsys.readouterr().out
    assert "allow→require_approval" in out
    assert ids[60.0] in out
    assert "FAIL" in out
    assert warden_main([*base, "--max-changes", "3"]) == 0
    assert "pass" in capsys.readouterr().out
    assert warden_main([*base, "--format", "json", "--max-change-rate", "0.1"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["changed"] == 3
    assert doc["passed"] is False
    # A bundle that cannot be read is exit status 2, not a pass.
    assert warden_main(["policy", "replay", "--audit", str(audit), "--bundle", "/nonexistent"]) == 2
