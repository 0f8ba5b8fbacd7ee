"""Sample policies and helpers shared by the tests of ``warden.policy.authoring``."""

from __future__ import annotations

from pathlib import Path

from warden.policy.authoring import Status, TestReport

POLICY = """package warden

import rego.v1

small if { is_number(input.amount); input.amount <= 100 }

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


def write_bundle(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def by_name(report: TestReport) -> dict[str, Status]:
    return {r.name.rsplit(".", 1)[-1]: r.status for r in report.results}
