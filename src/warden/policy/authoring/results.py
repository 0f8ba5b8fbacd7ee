"""What ``warden policy test`` reports: one :class:`TestResult` per test or case."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Status", "TestReport", "TestResult"]


class Status(enum.StrEnum):
    """How one test or case ended."""

    PASS = "PASS"  # noqa: S105 - a test status, not a password
    FAIL = "FAIL"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True, slots=True)
class TestResult:
    """The outcome of one Rego test (``kind="rego"``) or decision case (``kind="case"``).

    ``name`` is ``data.<package>.<rule>`` for a Rego test and the case name
    for a case; ``file`` and ``line`` say where it is defined.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    kind: str
    name: str
    file: str
    line: int
    status: Status
    duration_ns: int = 0
    package: str = ""
    message: str = ""
    hint: str = ""
    printed: str = ""
    """What the policy's ``print()`` calls wrote while the test or case ran."""

    def to_json(self) -> dict[str, Any]:
        """The result as ``opa test --format json`` writes it, plus kind, status and hint.

        Print output is ``printed``, as text (OPA's ``output`` holds it as base64).
        """
        doc: dict[str, Any] = {
            "location": {"file": self.file, "row": self.line, "col": 1},
            "package": self.package,
            "name": self.name,
            "kind": self.kind,
            "status": self.status.value,
            "duration": self.duration_ns,
        }
        if self.status is Status.FAIL:
            doc["fail"] = True
        if self.status is Status.SKIPPED:
            doc["skip"] = True
        if self.status is Status.ERROR:
            doc["error"] = {"message": self.message}
        if self.message:
            doc["message"] = self.message
        if self.hint:
            doc["hint"] = self.hint
        if self.printed:
            doc["printed"] = self.printed
        return doc


@dataclass(frozen=True, slots=True)
class TestReport:
    """All results of one ``warden policy test`` run, in the order they ran."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    results: tuple[TestResult, ...]

    def count(self, status: Status) -> int:
        """How many results have ``status``."""
        return sum(1 for r in self.results if r.status is status)

    @property
    def ok(self) -> bool:
        """True when nothing failed or errored (skipped tests do not fail a run)."""
        return not any(r.status in (Status.FAIL, Status.ERROR) for r in self.results)
