"""``warden policy replay`` on an audit log written by a real Warden, driven by the openai SDK.

The log comes from the proxy with the shipped customer-support bundle, a
refund cap (so ``input.budget`` matters) and a customer id on every request
(so arguments and context are sealed in the records). A candidate that
tightens the refund limit from 100 to 50 must show exactly the refunds
between 50 and 100 going from allow to require_approval, and nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from warden.audit import AuditLog
from warden.cli import main as warden_main
from warden.config import AuditConfig, Config
from warden.model import Decision, Effect
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.replay import replay
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing.audit import sample_action, sample_decision

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


def decision_times(audit: Path) -> dict[str, str]:
    """The recorded time of each decision, by decision id, in log order."""
    return {r["decision"]["id"]: r["time"] for r in audit_records(audit) if r["kind"] == "decision"}


def replay_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """Run ``warden policy replay ... --format json``: its exit status and document."""
    code = warden_main(["policy", "replay", *args, "--format", "json"])
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, doc


def test_from_and_to_replay_only_the_decisions_in_the_window(
    recorded: tuple[Path, Config, dict[float, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--from`` (inclusive) and ``--to`` (exclusive) bound which decisions are replayed.

    The boundaries are decision times as the records carry them (RFC 3339)
    and durations back from now; the counts and the changed decision ids are
    exactly those of the decisions inside each window.
    """
    audit, _, ids = recorded
    at = decision_times(audit)
    times = list(at.values())
    # A model call's decision, then its refund's, per request; every time distinct.
    assert len(times) == 2 * len(AMOUNTS)
    assert times == sorted(set(times))

    def refund_at(amount: int) -> str:
        return str(at[ids[float(amount)]])

    base = ["--audit", str(audit), "--bundle", str(candidate_bundle(tmp_path, 50))]
    # Each row: the window, the decisions in it, and the refunds (by amount) that change.
    windows: list[tuple[list[str], int, set[int]]] = [
        # The 75 and 95 refunds and the model calls of the 95 and 30 requests.
        (["--from", refund_at(75), "--to", refund_at(30)], 4, {75, 95}),
        # --from takes the 60 refund, --to leaves out the 75 one.
        (["--from", refund_at(60), "--to", refund_at(75)], 2, {60}),
        # Up to the 60 refund: three model calls and the 20 and 40 refunds, none changed.
        (["--to", refund_at(60)], 5, set()),
        # From the 95 refund: it changes; the held 30 refund stays held.
        (["--from", refund_at(95)], 3, {95}),
        (["--from", "1h"], 2 * len(AMOUNTS), set(TIGHTENED)),
        (["--to", "1h"], 0, set()),
    ]
    for window, scanned, changed in windows:
        code, doc = replay_json([*base, *window], capsys)
        assert code == 0, window  # no threshold set
        assert (doc["scanned"], doc["replayed"], doc["changed"]) == (
            scanned,
            scanned,
            len(changed),
        ), window
        samples = {s for c in doc["changes"] for s in c["samples"]}
        assert samples == {ids[float(a)] for a in changed}, window
        assert {c["change"] for c in doc["changes"]} <= {"allow→require_approval"}


def test_the_config_threshold_gates_unless_the_command_line_sets_one(
    recorded: tuple[Path, Config, dict[float, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``monitor.replay_max_changes`` in the config file gates the exit status.

    Three decisions change: a config limit of 2 fails (exit 1) and 3 passes,
    with no ``--max-changes``; a ``--max-changes`` given on the command line
    wins over the config either way; and the limit counts only the decisions
    in the ``--from`` window. The config's ``audit.dir`` is the log replayed.
    """
    audit, _, ids = recorded
    bundle = str(candidate_bundle(tmp_path, 50))

    def config_file(limit: int) -> str:
        path = tmp_path / f"warden-{limit}.yaml"
        path.write_text(
            json.dumps({"audit": {"dir": str(audit)}, "monitor": {"replay_max_changes": limit}})
        )
        return str(path)

    def gate(limit: int, *extra: str) -> tuple[int, int, int, bool]:
        """Exit status, decisions changed, the threshold applied, and whether it passed."""
        args = ["--bundle", bundle, "--config", config_file(limit), *extra]
        code, doc = replay_json(args, capsys)
        return code, doc["changed"], doc["threshold"]["max_changes"], doc["passed"]

    assert gate(2) == (1, 3, 2, False)
    assert gate(3) == (0, 3, 3, True)
    assert gate(2, "--max-changes", "3") == (0, 3, 3, True)
    assert gate(3, "--max-changes", "2") == (1, 3, 2, False)
    # From the 75 refund on: the 75 and 95 refunds change, within the config's 2.
    assert gate(2, "--from", decision_times(audit)[ids[75.0]]) == (0, 2, 2, True)
    # The text report says which threshold it applied.
    assert warden_main(["policy", "replay", "--bundle", bundle, "--config", config_file(2)]) == 1
    assert "3 decision(s) change (25.0% of replayed); threshold max 2: FAIL." in (
        capsys.readouterr().out
    )


async def test_a_large_tools_list_is_recorded_once_per_request(tmp_path: Path) -> None:
    """An answer with many calls to a request declaring large hosted tools writes them once.

    The model call's decision record carries ``input.request.tools`` (here an
    approved MCP server whose ``allowed_tools`` is long); each call's decision
    names it by digest, and replay rebuilds every one with the list.
    """
    hosted: Any = [
        {
            "type": "mcp",
            "server_label": "kb",
            "server_url": "https://kb.support.example.com/mcp",
            "allowed_tools": ["search_kb"] * 20_000,
            "require_approval": "never",
        }
    ]
    listed = len(json.dumps(hosted))
    calls = [Call("search_kb", {"query": f"q{i}"}) for i in range(20)]
    async with MockLLM() as llm:
        config = make_config(tmp_path, llm.url)
        async with Warden(config) as warden:
            llm.script(Reply(tool_calls=calls))
            async with openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as client:
                answer = await client.responses.create(
                    model="gpt-4o-mini", input="find the refund policy", tools=hosted
                )
    assert [item.type for item in answer.output] == ["function_call"] * 20
    audit = tmp_path / "audit"
    decisions = [r for r in audit_records(audit) if r["kind"] == "decision"]
    assert len(decisions) == 21
    assert len(decisions[0]["decision"]["input"]["tools"][0]["allowed_tools"]) == 20_000
    written = sum(f.stat().st_size for f in audit.rglob("*") if f.is_file())
    # Once, in the model call's record: 21 copies would be about 4 MB.
    assert listed < written < 2 * listed
    report = replay(audit, load_policy_set([SHIPPED_POLICY]), config.policy)
    assert report.skipped == {}
    assert report.replayed == 21
    assert report.changes == ()


def write_log(audit: Path, decisions: list[Decision]) -> None:
    """A log of refunds decided as given, each with its policy input unless it has none."""

    async def run() -> None:
        log = await AuditLog.open(AuditConfig(dir=str(audit)))
        try:
            for i, decision in enumerate(decisions):
                await log.record_decision(sample_action(i), decision)
        finally:
            await log.close()

    asyncio.run(run())


def test_decisions_not_replayed_fail_the_gate_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A decision replay could not rebuild may be one the candidate changes: with a
    threshold set it fails the run (exit 1) unless ``--allow-skipped``. One decided
    before the policy ran (a kill switch) cannot change and does not; the run's
    ``replay_run`` record counts both, and the inexact and failed evaluations."""
    facts = {"mode": "enforce", "risk": "write", "budget": {}, "history": [], "labels": []}
    replayed = dataclasses.replace(sample_decision(), input=facts)
    switched = dataclasses.replace(sample_decision(Effect.DENY), guard="kill_switch")
    old = sample_decision()  # no policy input: recorded before ADR 0012
    benign, unchecked = tmp_path / "benign", tmp_path / "unchecked"
    write_log(benign, [replayed, switched])
    write_log(unchecked, [replayed, switched, old])
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "policy.rego").write_text(
        'package warden\nimport rego.v1\ndecision := {"effect": "allow", "reason": "ok"}\n'
    )
    bundle = ["--bundle", str(allow)]

    def run(audit: Path, *extra: str) -> tuple[int, str]:
        code = warden_main(["policy", "replay", "--audit", str(audit), *bundle, *extra])
        return code, capsys.readouterr().out

    code, out = run(benign, "--max-changes", "0")
    assert code == 0
    assert "Skipped 1: decided before the policy ran" in out
    assert "no bundle decides these differently" in out
    code, out = run(unchecked, "--max-changes", "0")
    assert code == 1
    assert "Skipped 1, not replayed: recorded before records carried the policy input" in out
    assert "1 decision(s) the candidate might decide differently were not replayed: FAIL" in out
    code, doc = replay_json(["--audit", str(unchecked), *bundle, "--max-changes", "0"], capsys)
    assert (code, doc["changed"], doc["unreplayed"], doc["passed"]) == (1, 0, 1, False)
    assert doc["skipped"] == {"not_policy": 1, "no_input": 1}
    # Accepted on purpose, or no threshold at all: exit 0.
    assert run(unchecked, "--max-changes", "0", "--allow-skipped")[0] == 0
    assert run(unchecked)[0] == 0
    # The recorded run says what was not replayed.
    assert run(unchecked, "--max-changes", "0", "--record")[0] == 1
    [body] = [r["body"] for r in audit_records(unchecked) if r["kind"] == "replay_run"]
    assert body["skipped"] == {"not_policy": 1, "no_input": 1}
    assert (body["unreplayed"], body["inexact"], body["errors"]) == (1, 0, 0)
    assert body["threshold"]["allow_skipped"] is False
    assert body["result"] == "fail"
