"""``warden eval run``: the shipped suite passes the shipped bundle; a broken bundle fails it.

Each run evaluates on the production path in the authoring child process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import orjson
import pytest

from tests.functional.conftest import SHIPPED_POLICY, audit_records
from tests.functional.test_challenger_functional import candidate
from warden.cli import main as warden_main
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.results import Status
from warden.policy.authoring.suite import SuiteError, load_suite, run_suite

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "policies" / "customer-support-evals" / "suite.jsonl"


def test_the_shipped_suite_passes_the_shipped_bundle(capsys: pytest.CaptureFixture[str]) -> None:
    code = warden_main(["eval", "run", str(SUITE), "--bundle", str(SHIPPED_POLICY)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert hashlib.sha256(SUITE.read_bytes()).hexdigest() in out
    assert "FAIL" not in out.replace(": PASS", "")
    report = run_suite(load_suite(SUITE), load_policy_set([SHIPPED_POLICY]))
    assert report.ok
    assert len(report.results) >= 15
    assert {r.effect for r in report.results} == {"allow", "deny", "require_approval"}


def test_a_broken_bundle_fails_the_suite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A regression: the limit without approval drops from 100 to 30 USD.
    broken = candidate(tmp_path, 30, "too-strict")
    code = warden_main(["eval", "run", str(SUITE), "--bundle", str(broken), "--format", "json"])
    doc = orjson.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["result"] == "fail"
    assert doc["revision"] == "too-strict"
    failed = {s["id"]: s for s in doc["scenarios"] if s["status"] != "PASS"}
    # Two refunds are now held; a third is held for the per-action limit, not the daily one.
    assert set(failed) == {"refund-small", "refund-at-limit", "refund-agent-daily-total"}
    assert {s["effect"] for s in failed.values()} == {"require_approval"}
    message = failed["refund-small"]["message"]
    assert 'expected effect "allow", got "require_approval"' in message


def test_a_bundle_that_does_not_compile_errors_every_scenario(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED_POLICY, broken)
    policy = broken / "policy.rego"
    policy.write_text(policy.read_text() + '\ndecision := {"effect": \n')
    code = warden_main(["eval", "run", str(SUITE), "--bundle", str(broken)])
    assert code == 2  # the bundle cannot be loaded: the run cannot happen


def test_the_run_is_recorded_when_an_audit_dir_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "audit"
    code = warden_main(
        ["eval", "run", str(SUITE), "--bundle", str(SHIPPED_POLICY), "--audit", str(audit)]
    )
    assert code == 0
    assert f"in {audit}" in capsys.readouterr().out
    [record] = [r for r in audit_records(audit) if r["kind"] == "eval_run"]
    body = record["body"]
    assert body["suite_sha256"] == hashlib.sha256(SUITE.read_bytes()).hexdigest()
    assert body["bundle_revision"] == "customer-support-2025.1"
    assert (body["result"], body["failed"], body["failed_ids"]) == ("pass", 0, [])
    assert body["passed"] == body["scenarios"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not JSON"),
        ('{"id": "x", "call": {"tool": "t"}}', "expect must give"),
        ('{"id": "x", "call": {}, "expect": {"effect": "allow"}}', "call.tool"),
        ('{"id": "x", "call": {"tool": "t"}, "expect": {"effect": "maybe"}}', "expect.effect"),
        ('{"id": "x", "call": {"tool": "t"}, "expect": {"effect": "allow"}, "oops": 1}', "oops"),
    ],
)
def test_a_malformed_suite_is_refused_with_its_line(
    tmp_path: Path, line: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "suite.jsonl"
    good = json.dumps({"id": "ok", "call": {"tool": "search_kb"}, "expect": {"effect": "allow"}})
    suite.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(SuiteError, match=problem):
        load_suite(suite)
    code = warden_main(["eval", "run", str(suite), "--bundle", str(SHIPPED_POLICY)])
    assert code == 2
    assert f"{suite}:3" in capsys.readouterr().err


def test_an_undefined_result_is_compared_as_the_configured_default(tmp_path: Path) -> None:
    bundle = tmp_path / "quiet"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(
        'package warden\n\ndecision := {"effect": "allow"} if input.action.tool == "a"\n'
    )
    suite = tmp_path / "suite.jsonl"
    lines = [
        {"id": "a", "call": {"tool": "a"}, "expect": {"effect": "allow"}},
        {"id": "b", "call": {"tool": "b"}, "expect": {"effect": "deny"}},
        {"id": "c", "call": {"tool": "b"}, "expect": {"undefined": True}},
    ]
    suite.write_text("\n".join(json.dumps(x) for x in lines))
    report = run_suite(load_suite(suite), load_policy_set([bundle]))
    assert [r.status for r in report.results] == [Status.PASS] * 3
