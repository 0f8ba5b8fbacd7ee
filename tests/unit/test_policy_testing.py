"""The policy test runner, decision tables, eval and check (warden.policy.testing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warden.policy.bundle import BundleError
from warden.policy.testing import (
    CRASH_HINT,
    WITH_INPUT_HINT,
    Status,
    TestReport,
    check_policy,
    compare_decision,
    discover_case_files,
    evaluate_input,
    lint_module,
    load_case_file,
    load_policy_set,
    run_tests,
    split_statements,
)

POLICY = """package warden

import rego.v1

small if input.amount <= 100

decision := {"effect": "allow", "reason": "small amount"} if small

conflict := 1

conflict := 2

double(x) := x * 2
"""

TESTS = """package warden.tests

import rego.v1

_helper := 4

test_passes if {
	data.warden.double(2) == _helper
}

test_is_false := false

test_is_undefined if {
	data.warden.double(2) == 5
}

test_conflict_errors if {
	data.warden.conflict == 1
}

test_whole_input_override if {
	data.warden.small with input as {"amount": 5}
}

test_key_override_works if {
	data.warden.small with input.amount as 5
}

todo_test_later if {
	false
}

test_also_passes if {
	data.warden.double(1) == 2
}
"""

# Deep enough to overflow the engine's stack: a real crash of the process.
_DEEP = "[" * 50_000 + "1" + "]" * 50_000


def _bundle(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _by_name(report: TestReport) -> dict[str, Status]:
    return {r.name.rsplit(".", 1)[-1]: r.status for r in report.results}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle(
        tmp_path_factory.mktemp("mixed"), {"policy.rego": POLICY, "policy_test.rego": TESTS}
    )


@pytest.fixture(scope="module")
def mixed_report(mixed: Path) -> TestReport:
    return run_tests(load_policy_set([mixed]))


def test_statuses_follow_opa_test(mixed_report: TestReport) -> None:
    assert _by_name(mixed_report) == {
        "test_passes": Status.PASS,
        "test_is_false": Status.FAIL,
        "test_is_undefined": Status.FAIL,
        "test_conflict_errors": Status.ERROR,
        "test_whole_input_override": Status.ERROR,
        "test_key_override_works": Status.PASS,
        "todo_test_later": Status.SKIPPED,
        "test_also_passes": Status.PASS,
    }
    assert not mixed_report.ok
    assert mixed_report.count(Status.PASS) == 3


def test_results_carry_location_and_messages(mixed_report: TestReport, mixed: Path) -> None:
    results = {r.name: r for r in mixed_report.results}
    first = results["data.warden.tests.test_passes"]
    assert first.file == (mixed / "policy_test.rego").as_posix()
    assert first.line == 7
    assert first.package == "data.warden.tests"
    assert first.duration_ns > 0
    assert "undefined" in results["data.warden.tests.test_is_undefined"].message
    # The engine answers `undefined` for a query whose value is false, as OPA's query API does.
    assert results["data.warden.tests.test_is_false"].message
    assert "conflicting" in results["data.warden.tests.test_conflict_errors"].message


def test_whole_input_override_gets_the_engine_hint(mixed_report: TestReport) -> None:
    (result,) = [r for r in mixed_report.results if r.name.endswith("test_whole_input_override")]
    assert result.hint == WITH_INPUT_HINT
    assert "with input.action as" in result.hint


def test_json_shape_matches_opa(mixed_report: TestReport) -> None:
    docs = {d["name"].rsplit(".", 1)[-1]: d for d in (r.to_json() for r in mixed_report.results)}
    assert docs["test_passes"]["location"]["row"] == 7
    assert docs["test_is_false"]["fail"] is True
    assert docs["todo_test_later"]["skip"] is True
    assert "message" in docs["test_conflict_errors"]["error"]
    json.dumps(docs)


def test_a_crashing_test_is_an_error_and_the_others_still_run(tmp_path: Path) -> None:
    tests = f"""package warden.tests

import rego.v1

test_before if {{
	data.warden.double(2) == 4
}}

test_crashes if {{
	x := {_DEEP}
	count(x) == 1
}}

test_after if {{
	data.warden.double(3) == 6
}}
"""
    bundle = _bundle(tmp_path, {"policy.rego": POLICY, "policy_test.rego": tests})
    report = run_tests(load_policy_set([bundle]))
    assert _by_name(report) == {
        "test_before": Status.PASS,
        "test_crashes": Status.ERROR,
        "test_after": Status.PASS,
    }
    crashed = report.results[1]
    assert "crashed" in crashed.message
    assert "SIGSEGV" in crashed.message
    assert crashed.hint == CRASH_HINT
    assert "with input as" in crashed.hint


def test_a_runaway_test_times_out(tmp_path: Path) -> None:
    tests = """package warden.tests

import rego.v1

test_loops if {
	regex.match("(a*)*$", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!")
}

test_after if {
	data.warden.double(3) == 6
}
"""
    bundle = _bundle(tmp_path, {"policy.rego": POLICY, "policy_test.rego": tests})
    report = run_tests(load_policy_set([bundle]), timeout_s=1.0)
    assert _by_name(report) == {"test_loops": Status.ERROR, "test_after": Status.PASS}
    assert "timed out after 1 s" in report.results[0].message


def test_run_filter_selects_by_regex(mixed: Path) -> None:
    report = run_tests(load_policy_set([mixed]), run=r"passes$")
    assert sorted(_by_name(report)) == ["test_also_passes", "test_passes"]
    assert report.ok


def test_split_statements_finds_rules_and_else_chains() -> None:
    source = (
        "package p\n\nimport rego.v1\n\n"
        "f(x) := 1 if {\n\tx > 1\n} else := 2\n\n"
        'default g := {\n\t"a": 1,\n}\n'
    )
    stmts = split_statements(source)
    assert [(s.name, s.line) for s in stmts] == [("package", 1), ("import", 3), ("f", 5), ("g", 9)]
    assert "else := 2" in stmts[2].text(source)


# --- decision tables ---------------------------------------------------------------------------

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
    bundle = _bundle(tmp_path, {"policy.rego": POLICY, "small_cases.yaml": CASES})
    policy = load_policy_set([bundle])
    files = [load_case_file(p) for p in discover_case_files(policy.folders)]
    report = run_tests(policy, case_files=files)
    assert [(r.kind, r.name, r.status, r.line) for r in report.results] == [
        ("case", "small is allowed", Status.PASS, 6),
        ("case", "large is undefined", Status.PASS, 9),
    ]


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    wrong = CASES.replace("{effect: allow, reason: small}", "{effect: deny}")
    bundle = _bundle(tmp_path, {"policy.rego": POLICY, "decisions/x.yaml": wrong})
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
    bundle = _bundle(
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
    _bundle(
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


# --- eval ----------------------------------------------------------------------------------------


def test_evaluate_input_gives_the_decision_and_timings(mixed: Path) -> None:
    policy = load_policy_set([mixed])
    result = evaluate_input(policy, {"amount": 3}, repeat=5)
    assert not result.error
    assert result.result == {"effect": "allow", "reason": "small amount"}
    assert len(result.times_us) == 5
    doc = result.to_json(query="data.warden.decision", revision=policy.revision)
    assert doc["timing"]["runs"] == 5
    assert evaluate_input(policy, {"amount": 300}).undefined


# --- check --------------------------------------------------------------------------------------

V0 = """package legacy

import future.keywords.in

default allow = false

allow {
	input.user == "admin"
}

deny[msg] {
	msg := "no"
}

warn[msg] if {
	msg := "w"
}

f(x) = y {
	y := x
}

g(x) := 1 if {
	x > 1
} else = 2 {
	true
}

ok if re_match("a", input.user)

fetch := http.send({"method": "GET", "url": "http://x"})

names := [n | some k, v in {"a": 1}; n := k]

obj := {"a": {"b": 1}}
"""


def test_lint_flags_v0_syntax_with_lines() -> None:
    found = [(f.line, f.severity, f.message.split(" (")[0]) for f in lint_module("l.rego", V0)]
    assert found == [
        (3, "warning", "`import future.keywords` is not needed"),
        (7, "error", "rule body without `if`"),
        (11, "error", "partial set rule without `contains`"),
        (15, "error", "`p[x] if` makes a set on this engine but an object"),
        (19, "error", "rule body without `if`"),
        (25, "error", "rule body without `if`"),
        (29, "error", "re_match was removed in OPA 1.x"),
        (31, "warning", "http.send is not available in this engine; it evaluates to undefined"),
        (33, "error", "`some k, v in x` inside a comprehension does not parse on this engine"),
    ]
    assert all(f.hint for f in lint_module("l.rego", V0))


def test_lint_accepts_v1_syntax() -> None:
    assert lint_module("p.rego", POLICY) == []
    assert lint_module("p_test.rego", TESTS) == []


def test_lint_flags_tests_outside_test_files() -> None:
    (finding,) = lint_module("policy.rego", POLICY + "\ntest_x if true\n")
    assert "compiled into production" in finding.message


def test_check_reports_parse_errors_with_file_and_line(tmp_path: Path) -> None:
    bad = "package warden\n\nimport rego.v1\n\nallow if {\n\tinput.a ==\n}\n"
    bundle = _bundle(tmp_path, {"policy.rego": POLICY, "bad.rego": bad})
    (finding,) = check_policy([bundle])
    assert (finding.file, finding.line, finding.col) == ((bundle / "bad.rego").as_posix(), 6, 10)
    assert finding.severity == "error"
    assert str(finding).startswith(f"{bundle.as_posix()}/bad.rego:6:10: error:")


def test_check_reports_unknown_functions(tmp_path: Path) -> None:
    source = POLICY + "\nodd if {\n\tno_such_function(1)\n}\n"
    bundle = _bundle(tmp_path, {"policy.rego": source})
    (finding,) = check_policy([bundle])
    assert finding.message == "unknown function no_such_function"
    assert finding.line == 16


def test_check_reports_bundle_errors(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, {"policy.rego": POLICY, ".manifest": '{"roots": ["other"]}'})
    (finding,) = check_policy([bundle])
    assert "outside the bundle roots" in finding.message
    assert finding.line == 1


def test_check_of_a_clean_bundle_is_empty(mixed: Path) -> None:
    assert check_policy([mixed]) == []
