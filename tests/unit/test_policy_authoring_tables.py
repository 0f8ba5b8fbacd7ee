"""Decision tables (warden.policy.authoring.tables), run on the production path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.policy_authoring_samples import POLICY, write_bundle
from warden.policy.authoring import (
    WITH_INPUT_HINT,
    Status,
    compare_decision,
    discover_case_files,
    load_case_file,
    load_policy_set,
    run_tests,
)
from warden.policy.bundle import BundleError

CASES = """# a comment
defaults:
  input:
    budget: {}
cases:
  - name: small is allowed
    input: {amount: 5}
    expect: {effect: allow, reason: small}
  - name: large is undefined
    input: {amount: 500}
    expect: {undefined: true}
"""


def test_cases_run_on_the_production_path(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, "small_cases.yaml": CASES})
    policy = load_policy_set([bundle])
    files = [load_case_file(p) for p in discover_case_files(policy.folders)]
    report = run_tests(policy, case_files=files)
    assert [(r.kind, r.name, r.status, r.line) for r in report.results] == [
        ("case", "small is allowed", Status.PASS, 6),
        ("case", "large is undefined", Status.PASS, 9),
    ]


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    wrong = CASES.replace("{effect: allow, reason: small}", "{effect: deny}")
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, "decisions/x.yaml": wrong})
    policy = load_policy_set([bundle])
    report = run_tests(policy, case_files=[load_case_file(bundle / "decisions/x.yaml")])
    assert [r.status for r in report.results] == [Status.FAIL, Status.PASS]
    assert report.results[0].message == 'expected effect "deny", got "allow"'
    assert not report.ok


def test_a_crash_on_the_production_path_is_an_error_for_each_case(tmp_path: Path) -> None:
    # A builtin under `with input as` in a policy module: the Rego test's query
    # fails, and compiling the bundle for the decision query aborts the engine.
    crashing = POLICY + '\nodd if {\n\tsmall with input as {"amount": 1}\n}\n'
    tests = "package warden.tests\n\nimport rego.v1\n\ntest_ok if data.warden.double(1) == 2\n"
    bundle = write_bundle(
        tmp_path, {"policy.rego": crashing, "policy_test.rego": tests, "a_cases.yaml": CASES}
    )
    policy = load_policy_set([bundle])
    report = run_tests(policy, case_files=[load_case_file(bundle / "a_cases.yaml")])
    rego, *cases = report.results
    assert rego.status is Status.ERROR
    assert rego.hint == WITH_INPUT_HINT
    assert [c.status for c in cases] == [Status.ERROR, Status.ERROR]
    # The engine's last words name the `with input as` problem, so its hint is the specific one.
    assert all("crashed (killed by SIGABRT)" in c.message for c in cases)
    assert all(c.hint == WITH_INPUT_HINT for c in cases)


def test_discover_case_files(tmp_path: Path) -> None:
    write_bundle(
        tmp_path,
        {
            "policy.rego": POLICY,
            "refund_cases.yaml": CASES,
            "decisions/more.json": "[]",
            "decisions/nested/deep.yml": CASES,
            "data.yaml": "{}",
            "notes.yaml": "x: 1",
            ".hidden/decisions/x.yaml": CASES,
        },
    )
    found = [p.relative_to(tmp_path).as_posix() for p in discover_case_files([tmp_path])]
    assert found == ["decisions/more.json", "decisions/nested/deep.yml", "refund_cases.yaml"]


def test_load_case_file_merges_defaults_and_accepts_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "query": "data.x.allow",
                "defaults": {"input": {"action": {"kind": "tool_call", "tool": "a"}}},
                "cases": [
                    {"name": "n", "input": {"action": {"tool": "b"}}, "expect": {"effect": "allow"}}
                ],
            }
        )
    )
    loaded = load_case_file(path)
    assert loaded.query == "data.x.allow"
    assert loaded.cases[0].input == {"action": {"kind": "tool_call", "tool": "b"}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x: 1\n", "needs a list of cases"),
        ("cases:\n  - {name: a, input: {}}\n", "expect must name at least one"),
        ("cases:\n  - {name: a, expect: {reason: x, y}}\n", "expect.y has no value"),
        ("cases: [\n", "invalid YAML"),
    ],
)
def test_load_case_file_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad_cases.yaml"
    path.write_text(text)
    with pytest.raises(BundleError, match=message) as info:
        load_case_file(path)
    assert str(path) in str(info.value)


def test_compare_decision() -> None:
    result = {
        "effect": "require_approval",
        "reason": "above the limit",
        "approvers": ["leads"],
    }
    want = {"effect": "require_approval", "reason": "limit"}
    assert compare_decision(want, result, undefined=False) == []
    assert compare_decision({"approvers": ["leads"]}, result, undefined=False) == []
    assert compare_decision({"reason": "nope"}, result, undefined=False) == [
        "expected the reason to contain 'nope', got 'above the limit'"
    ]
    assert compare_decision({"redact": []}, result, undefined=False) == [
        "expected redact [], the decision has no redact"
    ]
    assert compare_decision({"effect": "allow"}, True, undefined=False) == []
    assert compare_decision({"effect": "allow"}, False, undefined=False) != []
    assert compare_decision({"undefined": True}, None, undefined=True) == []
    assert compare_decision({"effect": "deny"}, None, undefined=True) == [
        "expected a decision, but the policy is undefined for this input"
    ]
