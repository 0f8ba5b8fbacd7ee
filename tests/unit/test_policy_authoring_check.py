"""``warden policy check`` and the lint (warden.policy.authoring.check, .lint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.policy_authoring_samples import POLICY, TESTS, write_bundle
from warden.policy.authoring import check_policy, lint_module


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(
        tmp_path_factory.mktemp("mixed"), {"policy.rego": POLICY, "policy_test.rego": TESTS}
    )


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
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, "bad.rego": bad})
    (finding,) = check_policy([bundle])
    assert (finding.file, finding.line, finding.col) == ((bundle / "bad.rego").as_posix(), 6, 10)
    assert finding.severity == "error"
    assert str(finding).startswith(f"{bundle.as_posix()}/bad.rego:6:10: error:")


def test_check_reports_unknown_functions(tmp_path: Path) -> None:
    source = POLICY + "\nodd if {\n\tno_such_function(1)\n}\n"
    bundle = write_bundle(tmp_path, {"policy.rego": source})
    (finding,) = check_policy([bundle])
    assert finding.message == "unknown function no_such_function"
    assert finding.line == 16


def test_check_reports_bundle_errors(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, ".manifest": '{"roots": ["other"]}'})
    (finding,) = check_policy([bundle])
    assert "outside the bundle roots" in finding.message
    assert finding.line == 1


def test_check_of_a_clean_bundle_is_empty(mixed: Path) -> None:
    assert check_policy([mixed]) == []


def test_check_warns_when_session_counters_are_read_whole(tmp_path: Path) -> None:
    # Each call of a session changes its counters: keyed whole, each call is a miss.
    whole = POLICY + "\ntoo_many if input.session.calls[input.action.tool] > 3\n"
    bundle = write_bundle(tmp_path / "whole", {"policy.rego": whole})
    (finding,) = check_policy([bundle])
    assert finding.severity == "warning"
    assert finding.message.startswith("input.session.calls is read whole")
    assert "object.get(input.session.calls" in finding.hint
    # One member at a time keys on that counter only: nothing to report.
    member = POLICY + '\ntoo_many if object.get(input.session.calls, "refund", 0) > 3\n'
    assert check_policy([write_bundle(tmp_path / "member", {"policy.rego": member})]) == []


NUMBERS = """package numbers

import rego.v1

deny if input.action.arguments.amount > 500

deny if 10 <= input.action.arguments["count"]

deny if to_number(input.action.arguments.amount) > 5

many if count(input.action.arguments) > 3

deny if object.get(input.action.arguments, "amount", 0) > 500
"""


def test_lint_warns_that_json_unmarshal_keeps_escapes() -> None:
    # rego-cpp leaves "\/etc" as \/etc: a startswith(path, "/etc/") check is passed so.
    source = "package warden\nimport rego.v1\nx := json.unmarshal(input.action.arguments.doc)\n"
    (finding,) = lint_module("p.rego", source)
    assert (finding.line, finding.severity) == (3, "warning")
    assert "does not decode escapes" in finding.message


def test_lint_warns_where_this_engine_reads_numbers_unlike_opa() -> None:
    found = sorted(
        (f.line, f.severity, f.message.split(":")[0]) for f in lint_module("n.rego", NUMBERS)
    )
    assert found == [
        (5, "warning", "this engine orders every string below every number"),
        (7, "warning", "this engine orders every string below every number"),
        (9, "warning", "to_number on this engine reads a leading number"),
        (13, "warning", "this engine orders every string below every number"),
    ]
    # A rule that checks the type is trusted to check the one it compares; the others
    # are still flagged.
    guarded = NUMBERS.replace(
        "deny if input.action.arguments.amount > 500",
        "deny if { is_number(input.action.arguments.amount); input.action.arguments.amount > 500 }",
    )
    assert sorted(f.line for f in lint_module("n.rego", guarded)) == [7, 9, 13]
    # A session's counters and the budget are Warden's own numbers.
    counted = (
        'deny if input.session.calls_total > 3\n\ndeny if object.get(input.budget, "x", 0) > 5\n'
    )
    assert lint_module("c.rego", "package c\n\nimport rego.v1\n\n" + counted) == []
