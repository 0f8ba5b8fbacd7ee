"""``warden policy test``: Rego tests, as ``opa test`` runs them, and decision tables.

Every rule named ``test_*`` is a test that passes when it is defined and not
``false``; ``todo_*`` rules are reported as skipped. On this engine a test can
crash the whole process (a builtin evaluated under ``with input as {...}``),
and a crash happens while the modules are compiled, so one bad test would take
every other test with it. Each test is therefore compiled on its own: the
child process that runs the tests sees the bundle with every *other* test rule
blanked out (helpers stay), and when the child dies the running test is
reported as ERROR with a hint, a new child is started and the remaining tests
go on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from warden.policy.authoring.child import (
    DEFAULT_TEST_TIMEOUT_S,
    Child,
    Crash,
    init_doc,
    parse_output,
)
from warden.policy.authoring.policy_set import PolicySet
from warden.policy.authoring.results import Status, TestReport, TestResult
from warden.policy.authoring.statements import (
    TODO_PREFIX,
    is_test,
    keep_only,
    package_ref,
    split_statements,
)
from warden.policy.authoring.tables import (
    CaseFile,
    DecisionCase,
    compare_decision,
    enforced,
    invalid_message,
)
from warden.policy.bundle import Module
from warden.policy.worker import STACK_BYTES

__all__ = ["CRASH_HINT", "WITH_INPUT_HINT", "run_tests"]

WITH_INPUT_HINT = (
    "this engine cannot evaluate builtins (comparisons such as <=, arithmetic, `in`, count, "
    "startswith, sprintf...) in rules run under `with input as {...}`: the query fails, and a "
    "compiled bundle crashes. Override input one key at a time instead (`with input.action as "
    "{...} with input.budget as {...}`), call a function with literal arguments, or cover the "
    "rule with a decision table, which runs on the production path"
)
CRASH_HINT = (
    "the engine process died on this test; the other tests ran in a new one. The usual cause "
    "is a builtin evaluated under `with input as {...}` (override input one key at a time: "
    "`with input.action as {...}`, or use a decision table); very deeply nested values also "
    "overflow the engine's stack"
)
# The engine's message when `with input as` replaces the whole input around a builtin.
_WITH_INPUT_ERROR = "rego-localref"


@dataclass(frozen=True, slots=True)
class _RegoTest:
    module: str
    package: str
    rule: str
    line: int
    body: str

    @property
    def name(self) -> str:
        return f"data.{self.package}.{self.rule}"

    @property
    def todo(self) -> bool:
        return self.rule.startswith(TODO_PREFIX)


def _find_tests(modules: Sequence[Module]) -> list[_RegoTest]:
    found: dict[tuple[str, str], _RegoTest] = {}
    for module in modules:
        package = package_ref(module.source)
        for stmt in split_statements(module.source):
            if not is_test(stmt.name):
                continue
            key = (module.path, stmt.name)
            earlier = found.get(key)
            body = stmt.text(module.source)
            if earlier is not None:
                # Several definitions make one rule, as in OPA: run them together.
                body = earlier.body + "\n" + body
            found[key] = _RegoTest(
                module.path, package, stmt.name, earlier.line if earlier else stmt.line, body
            )
    return list(found.values())


def _isolated(modules: Sequence[Module], test: _RegoTest) -> dict[str, str]:
    """The sources of modules with tests, every test rule blanked except ``test``."""
    out: dict[str, str] = {}
    for module in modules:
        stmts = split_statements(module.source)
        tests = [s for s in stmts if is_test(s.name)]
        if not tests:
            continue
        keep = [s for s in tests if module.path == test.module and s.name == test.rule]
        out[module.path] = keep_only(module.source, keep, tests)
    return out


def run_tests(
    policy: PolicySet,
    *,
    case_files: Sequence[CaseFile] = (),
    query: str = "data.warden.decision",
    run: str | None = None,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
    stack_bytes: int = STACK_BYTES,
) -> TestReport:
    """Run the Rego tests in ``policy`` and the decision tables in ``case_files``.

    ``run`` is a regular expression searched in each test's name (Rego tests:
    ``data.pkg.test_x``; cases: ``file: case name``); only matches run.
    Cases run on the production path for ``query`` unless their file names
    its own; a result of ``query`` (the decision query) is read as the proxy
    reads it (:func:`~warden.policy.authoring.tables.enforced`). Each Rego test
    is compiled on its own in a child process, so a test that crashes the
    engine is reported as ERROR and the others still run.
    ``stack_bytes``: the stack that child runs the engine on (``policy.worker_stack_mb``).
    """
    pattern = re.compile(run) if run else None
    results: list[TestResult] = []
    with Child(init_doc(policy), timeout_s, stack_bytes=stack_bytes) as child:
        for test in _find_tests(policy.modules):
            if pattern is not None and not pattern.search(test.name):
                continue
            results.append(_run_rego_test(child, policy, test))
        for case_file in case_files:
            for case in case_file.cases:
                display = f"{case_file.path}: {case.name}"
                if pattern is not None and not pattern.search(display):
                    continue
                results.append(
                    _run_case(
                        child,
                        policy,
                        case_file,
                        case,
                        case_file.query or query,
                        decision=case_file.query in (None, query),
                    )
                )
    return TestReport(tuple(results))


@dataclass(frozen=True, slots=True)
class _Where:
    kind: str
    name: str
    file: str
    line: int
    package: str

    def result(
        self, status: Status, ns: int = 0, message: str = "", hint: str = "", printed: str = ""
    ) -> TestResult:
        return TestResult(
            self.kind,
            self.name,
            self.file,
            self.line,
            status,
            ns,
            self.package,
            message,
            hint,
            printed,
        )


def _run_rego_test(child: Child, policy: PolicySet, test: _RegoTest) -> TestResult:
    where = _Where("rego", test.name, test.module, test.line, f"data.{test.package}")
    if test.todo:
        return where.result(Status.SKIPPED)
    replace = _isolated(policy.modules, test)
    reply = child.request({"op": "query", "query": test.name, "replace": replace})
    if isinstance(reply, Crash):
        hint = "" if reply.timed_out else CRASH_HINT
        return where.result(Status.ERROR, message=reply.message, hint=hint)
    ns = int(reply.get("ns", 0))
    outcome = parse_output(reply, policy.modules)
    printed = outcome.printed
    if outcome.error:
        hint = WITH_INPUT_HINT if _WITH_INPUT_ERROR in outcome.error else ""
        return where.result(Status.ERROR, ns, outcome.error, hint, printed)
    if outcome.undefined:
        return where.result(Status.FAIL, ns, "the test rule is undefined", printed=printed)
    if outcome.result is False:
        return where.result(Status.FAIL, ns, "the test rule is false", printed=printed)
    return where.result(Status.PASS, ns, printed=printed)


def _run_case(
    child: Child,
    policy: PolicySet,
    case_file: CaseFile,
    case: DecisionCase,
    query: str,
    *,
    decision: bool,
) -> TestResult:
    where = _Where("case", case.name, case_file.path, case.line, query)
    reply = child.request({"op": "decide", "query": query, "input": case.input})
    outcome = parse_output(reply, policy.production)
    ns = 0 if isinstance(reply, Crash) else int(reply.get("ns", 0))
    if outcome.error:
        hint = CRASH_HINT if outcome.crashed else ""
        if _WITH_INPUT_ERROR in outcome.error:
            hint = WITH_INPUT_HINT
        return where.result(Status.ERROR, ns, outcome.error, hint, outcome.printed)
    proxy = None
    if decision and not isinstance(reply, Crash):
        # What the proxy enforces, not only what the policy wrote.
        proxy = enforced(str(reply["text"]), case.input, policy.production)
        if proxy.invalid:
            return where.result(Status.ERROR, ns, invalid_message(proxy), printed=outcome.printed)
    problems = compare_decision(
        case.expect, outcome.result, undefined=outcome.undefined, proxy=proxy
    )
    if problems:
        return where.result(Status.FAIL, ns, "; ".join(problems), printed=outcome.printed)
    return where.result(Status.PASS, ns, printed=outcome.printed)
