"""Tools for policy authors, apart from the engine: ``warden policy test|eval|check``.

* :mod:`~warden.policy.authoring.runner`: Rego tests as ``opa test`` runs them;
* :mod:`~warden.policy.authoring.tables`: decision tables (input, expected decision);
* :mod:`~warden.policy.authoring.eval`: one evaluation on the production path, timed;
* :mod:`~warden.policy.authoring.check` and :mod:`~warden.policy.authoring.lint`:
  parse and compile errors with ``file:line``, and syntax OPA 1.x rejects;
* :mod:`~warden.policy.authoring.child`: the child process in which all of them
  compile and evaluate, since a policy can crash the engine's process;
* :mod:`~warden.policy.authoring.statements`, :mod:`~warden.policy.authoring.policy_set`,
  :mod:`~warden.policy.authoring.results`: what they share.

Importing the tools does not load the engine; the child does. The engine
(:mod:`warden.policy.engine`) never imports this package.
"""

from warden.policy.authoring.check import check_policy
from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S
from warden.policy.authoring.eval import EvalResult, evaluate_input
from warden.policy.authoring.lint import Finding, lint_module
from warden.policy.authoring.policy_set import PolicySet, load_policy_set
from warden.policy.authoring.results import Status, TestReport, TestResult
from warden.policy.authoring.runner import CRASH_HINT, WITH_INPUT_HINT, run_tests
from warden.policy.authoring.statements import Statement, split_statements
from warden.policy.authoring.tables import (
    CaseFile,
    DecisionCase,
    compare_decision,
    discover_case_files,
    load_case_file,
)

__all__ = [
    "CRASH_HINT",
    "DEFAULT_TEST_TIMEOUT_S",
    "WITH_INPUT_HINT",
    "CaseFile",
    "DecisionCase",
    "EvalResult",
    "Finding",
    "PolicySet",
    "Statement",
    "Status",
    "TestReport",
    "TestResult",
    "check_policy",
    "compare_decision",
    "discover_case_files",
    "evaluate_input",
    "lint_module",
    "load_case_file",
    "load_policy_set",
    "run_tests",
    "split_statements",
]
