"""Rego tests as ``opa test`` runs them (warden.policy.authoring.runner), and statements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.policy_authoring_samples import POLICY, TESTS, by_name, write_bundle
from warden.policy.authoring import (
    CRASH_HINT,
    WITH_INPUT_HINT,
    Status,
    TestReport,
    load_policy_set,
    run_tests,
    split_statements,
)

# Deep enough to overflow the engine's stack: a real crash of the process.
_DEEP = "[" * 50_000 + "1" + "]" * 50_000


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(
        tmp_path_factory.mktemp("mixed"), {"policy.rego": POLICY, "policy_test.rego": TESTS}
    )


@pytest.fixture(scope="module")
def mixed_report(mixed: Path) -> TestReport:
    return run_tests(load_policy_set([mixed]))


def test_a_test_of_what_the_engine_gets_wrong_errors_not_passes(tmp_path: Path) -> None:
    # rego-cpp says rem(74, 7) is 6: a test asserting that must not pass, since no
    # bundle using it would load.
    tests = "package warden.tests\nimport rego.v1\ntest_rem if rem(74, 7) == 6\n"
    report = run_tests(load_policy_set([write_bundle(tmp_path, {"p_test.rego": tests})]))
    (result,) = report.results
    assert result.status is Status.ERROR
    assert "rem, the builtin behind %" in result.message


def test_statuses_follow_opa_test(mixed_report: TestReport) -> None:
    assert by_name(mixed_report) == {
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
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, "policy_test.rego": tests})
    # On Linux's usual 8 MiB stack the literal overflows it (Warden's own stack takes it).
    report = run_tests(load_policy_set([bundle]), stack_bytes=8 * 1024 * 1024)
    assert by_name(report) == {
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
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, "policy_test.rego": tests})
    # Long enough for the next test's fresh child to start (twice: once more with the
    # engine's stack) on a machine busy with other tests; the runaway one would not
    # finish in minutes.
    report = run_tests(load_policy_set([bundle]), timeout_s=6.0)
    assert by_name(report) == {"test_loops": Status.ERROR, "test_after": Status.PASS}
    assert "timed out after 6 s" in report.results[0].message


def test_run_filter_selects_by_regex(mixed: Path) -> None:
    report = run_tests(load_policy_set([mixed]), run=r"passes$")
    assert sorted(by_name(report)) == ["test_also_passes", "test_passes"]
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
