"""``warden policy check``: bundle, parse and compile errors with ``file:line``, and lint.

Also the ``redact`` paths Warden cannot mask that a module writes out or a
decision table expects (``warden policy test`` finds those a rule builds).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from warden.policy.authoring.child import DEFAULT_TEST_TIMEOUT_S, Child, Crash, init_doc
from warden.policy.authoring.lint import (
    CALL,
    MISSING_BUILTINS,
    REDACT_HINT,
    Finding,
    lint_module,
    redact_problems,
)
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.statements import blank, split_statements
from warden.policy.authoring.tables import discover_case_files, load_case_file
from warden.policy.bundle import BundleError, Module, describe_rego_error
from warden.policy.cache import analyse

__all__ = ["check_policy"]


_INVALID_COLLECTION_HINT = (
    "if this is a comprehension with `some k, v in x`, write `some k` then `v := x[k]`"
)


def check_policy(
    paths: Sequence[str | Path],
    *,
    query: str = "data.warden.decision",
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
) -> list[Finding]:
    """Everything ``warden policy check`` reports for the bundles at ``paths``.

    Bundle errors (manifest, data, roots), parse errors of every module,
    v0 syntax and engine pitfalls, then, when everything parses, a compile
    of the production modules for ``query`` in a child process.
    """
    try:
        policy = load_policy_set(paths, check_syntax=False)
    except BundleError as exc:
        return [_finding_from_text(line, "error") for line in str(exc).splitlines() if line.strip()]
    findings: list[Finding] = []
    parse_failed = False
    # Parsing only: it never evaluates, so unlike compiling it cannot crash this process.
    from warden.policy import rego  # noqa: PLC0415 - keeps importing the tools light

    for module in policy.modules:
        try:
            rego.parse_check(module.path, module.source)
        except rego.RegoError as exc:
            parse_failed = True
            for line in describe_rego_error(str(exc), [module]):
                finding = _finding_from_text(line, "error")
                if "Invalid collection" in finding.message:
                    finding = Finding(
                        finding.file,
                        finding.line,
                        finding.col,
                        "error",
                        finding.message,
                        _INVALID_COLLECTION_HINT,
                    )
                findings.append(finding)
        findings.extend(lint_module(module.path, module.source))
    findings.extend(_expected_redactions(policy.folders, query))
    if not parse_failed:
        # The loader's rule for what the engine evaluates (print included), so that
        # check, test, eval and serve accept the same calls.
        from warden.policy.bundle.compile import engine_function  # noqa: PLC0415

        interp = rego.Interpreter()
        findings.extend(_unknown_functions(policy.modules, lambda n: engine_function(interp, n)))
        findings.extend(_cache_misses(policy.production, policy.data, paths))
        with Child(init_doc(policy), timeout_s) as child:
            reply = child.request({"op": "compile", "query": query})
        if isinstance(reply, Crash):
            findings.append(
                Finding(
                    ", ".join(str(p) for p in paths),
                    0,
                    0,
                    "error",
                    f"compiling {query} crashed the engine: {reply.message}",
                )
            )
        elif not reply.get("ok"):
            findings.extend(
                _finding_from_text(line, "error")
                for line in str(reply.get("error")).splitlines()
                if line.strip()
            )
    # Keep the report stable and de-duplicated (the engine repeats some errors).
    unique = dict.fromkeys(findings)
    return sorted(unique, key=lambda f: (f.file, f.line, f.col, f.severity != "error", f.message))


def _expected_redactions(folders: Sequence[Path], query: str) -> list[Finding]:
    """Decision-table cases that expect a ``redact`` path Warden cannot mask.

    A table passing with such a path would only confirm a redaction that
    never happens. Tables that cannot be read are left to ``warden policy test``.
    """
    out: list[Finding] = []
    for path in discover_case_files(folders):
        try:
            table = load_case_file(path)
        except BundleError:
            continue
        if table.query not in (None, query):
            continue
        for case in table.cases:
            paths = case.expect.get("redact")
            if not isinstance(paths, list):
                continue
            for message in redact_problems(p for p in paths if isinstance(p, str)):
                text = f"case {case.name!r} expects it: {message}"
                out.append(Finding(table.path, case.line, 1, "error", text, REDACT_HINT))
    return out


_SESSION_COUNTERS = (("session",), ("session", "calls"), ("session", "held"))


def _cache_misses(
    modules: Sequence[Module], data: Mapping[str, Any], paths: Sequence[str | Path]
) -> list[Finding]:
    """A warning when the decision cache keys on a session's counters whole.

    Every call of a session changes them, so every call would be a policy
    evaluation (a cache miss); read one member at a time instead.
    """
    shape = analyse(modules, data)
    read = [p for p in shape.paths or () if p in _SESSION_COUNTERS]
    if not read:
        return []
    where = ", ".join(str(p) for p in paths)
    message = (
        f"input.{'.'.join(read[0])} is read whole, so the decision cache keys on every "
        "counter of the session: each call changes them, and each is a policy cache miss"
    )
    hint = (
        'read counters one member at a time: object.get(input.session.calls, "close_account", '
        "0), or with the key from a list in the bundle's data (docs/policies.md)"
    )
    return [Finding(where, 0, 0, "warning", message, hint)]


_NOT_CALLS = frozenset({"if", "not", "some", "every", "with", "in", "contains", "else", "as"})


def _unknown_functions(
    modules: Sequence[Module], is_builtin: Callable[[str], bool]
) -> list[Finding]:
    """Calls to functions that are neither builtins nor defined in the bundle.

    The engine only reports these when the call runs; OPA reports them at
    compile time, and so does the check.
    """
    blanked = {m.path: blank(m.source) for m in modules}
    defined = {s.name for m in modules for s in split_statements(m.source)}
    known: dict[str, bool] = {}
    out: list[Finding] = []
    for module in modules:
        for match in CALL.finditer(blanked[module.path]):
            name = match.group(1)
            if name in _NOT_CALLS or name.startswith(MISSING_BUILTINS) or name == "trace":
                continue
            if name.rsplit(".", 1)[-1] in defined:
                continue
            if name not in known:
                known[name] = is_builtin(name)
            if not known[name]:
                line = module.source.count("\n", 0, match.start()) + 1
                col = match.start() - (module.source.rfind("\n", 0, match.start()) + 1) + 1
                out.append(
                    Finding(
                        module.path,
                        line,
                        col,
                        "error",
                        f"unknown function {name}",
                        "neither a builtin of this engine nor defined in the bundle",
                    )
                )
    return out


_LOCATED = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+)(?::(?P<col>\d+))?: (?P<msg>.*)$", re.DOTALL
)


def _finding_from_text(text: str, severity: str) -> Finding:
    match = _LOCATED.match(text.strip())
    if match is None:
        file, _, msg = text.partition(": ")
        return Finding(file if msg else "", 0, 0, severity, msg or text)
    return Finding(
        match["file"], int(match["line"]), int(match["col"] or 1), severity, match["msg"]
    )
