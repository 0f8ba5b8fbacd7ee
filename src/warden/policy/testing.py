"""Tools for policy authors: the Rego test runner, decision tables, eval and check.

``warden policy test`` follows ``opa test``: every rule named ``test_*`` is a
test that passes when it is defined and not ``false``; ``todo_*`` rules are
reported as skipped. On this engine a test can crash the whole process (a
builtin evaluated under ``with input as {...}``), and a crash happens while the
modules are compiled, so one bad test would take every other test with it.
Each test is therefore compiled on its own: the child process that runs the
tests sees the bundle with every *other* test rule blanked out (helpers stay),
and when the child dies the running test is reported as ERROR with a hint, a
new child is started and the remaining tests go on.

Decision tables are YAML or JSON files of cases (``*_cases.yaml`` anywhere in
a bundle folder, or any file under a ``decisions/`` folder): an input document
and the expected fields of the decision. They run on the production path, the
modules the engine compiles, evaluated with ``set_input`` and the compiled
decision query, so they can test any rule, and compliance staff can read them.

``warden policy check`` reports parse and compile errors with ``file:line``
and flags syntax that OPA 1.x rejects although this engine accepts it.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import orjson
import yaml

from warden.policy.bundle import Bundle, BundleError, Module, load_bundle, merge_bundles

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

DEFAULT_TEST_TIMEOUT_S = 10.0
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
_CASE_SUFFIXES = (".yaml", ".yml", ".json")
_TEST_PREFIX = "test_"
_TODO_PREFIX = "todo_"
_EVAL_FAILED = "evaluation failed (for example, a rule or function gave conflicting values)"
# Kept short: a crash report only needs the engine's last words.
_STDERR_TAIL = 600


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

    def to_json(self) -> dict[str, Any]:
        """The result as ``opa test --format json`` writes it, plus kind, status and hint."""
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


# --- loading bundles -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Bundles loaded for the tools.

    ``modules`` carry their file path as shown to people
    (``policies/customer-support/policy.rego``), so engine errors name real
    files; ``production`` are the modules the engine compiles (no
    ``*_test.rego``); ``data`` is the merged data tree.
    """

    modules: tuple[Module, ...]
    production: tuple[Module, ...]
    data: Mapping[str, Any]
    revision: str
    folders: tuple[Path, ...]


def load_policy_set(paths: Sequence[str | Path], *, check_syntax: bool = True) -> PolicySet:
    """Load bundles (folders or ``.tar.gz``) as the engine would; raise :class:`BundleError`."""
    if not paths:
        raise BundleError("no policy bundle given")
    bundles: list[Bundle] = [load_bundle(p, check_syntax=check_syntax) for p in paths]
    merged = merge_bundles(bundles)
    modules: list[Module] = []
    for path, bundle in zip(paths, bundles, strict=True):
        modules.extend(Module(_join(path, m.path), m.source) for m in bundle.modules)
    return PolicySet(
        modules=tuple(modules),
        production=tuple(m for m in modules if not m.path.endswith("_test.rego")),
        data=merged.data,
        revision=merged.revision,
        folders=tuple(Path(p) for p in paths if Path(p).is_dir()),
    )


def _join(base: str | Path, rel: str) -> str:
    return (Path(base) / rel).as_posix()


# --- statements: a small scanner for Rego source ---------------------------------------------

_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|#[^\n]*')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _blank(source: str) -> str:
    """``source`` with strings and comments replaced by spaces (offsets and newlines kept)."""

    def spaces(m: re.Match[str]) -> str:
        text = m.group(0)
        if text.startswith("#"):
            return " " * len(text)
        return text[0] + re.sub(r"[^\n]", " ", text[1:-1]) + text[-1]

    return _STRING_OR_COMMENT.sub(spaces, source)


@dataclass(frozen=True, slots=True)
class Statement:
    """One top-level statement of a module: ``package``, ``import`` or a rule.

    ``name`` is the rule name (``decision``, ``test_refund``), or the keyword
    for ``package`` and ``import``. ``start``/``end`` are offsets into the
    source; ``line`` is 1-based.
    """

    name: str
    start: int
    end: int
    line: int

    def text(self, source: str) -> str:
        """The statement's source text."""
        return source[self.start : self.end]


def split_statements(source: str) -> list[Statement]:
    """Split a module into top-level statements.

    A statement starts at a line that begins, in column 0 and outside any
    bracket, with a name other than ``else``; it runs until the next one.
    This is the layout ``opa fmt`` writes.
    """
    blanked = _blank(source)
    starts: list[int] = []
    depth = 0
    line_start = True
    for i, ch in enumerate(blanked):
        if line_start and depth == 0 and (ch.isalpha() or ch == "_"):
            word = _NAME.match(blanked, i)
            if word is not None and word.group(0) != "else":
                starts.append(i)
        line_start = ch == "\n"
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
    out: list[Statement] = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(source)
        out.append(
            Statement(_statement_name(blanked, start), start, end, source.count("\n", 0, start) + 1)
        )
    return out


def _statement_name(blanked: str, start: int) -> str:
    words: list[str] = _NAME.findall(blanked[start : start + 200])
    if not words:
        return ""
    if words[0] == "default" and len(words) > 1:
        return words[1]
    return words[0]


def _is_test(name: str) -> bool:
    return name.startswith((_TEST_PREFIX, _TODO_PREFIX))


def _package_ref(source: str) -> str:
    match = re.search(r"^[ \t]*package[ \t]+([^\s#]+)", _blank(source), re.MULTILINE)
    if match is None:
        return ""
    return source[match.start(1) : match.end(1)]


def _keep_only(source: str, keep: Iterable[Statement], drop: Iterable[Statement]) -> str:
    """``source`` with the ``drop`` statements blanked (newlines kept, so lines stay right)."""
    kept = {(s.start, s.end) for s in keep}
    chars = list(source)
    for stmt in drop:
        if (stmt.start, stmt.end) in kept:
            continue
        for i in range(stmt.start, stmt.end):
            if chars[i] != "\n":
                chars[i] = " "
    return "".join(chars)


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
        return self.rule.startswith(_TODO_PREFIX)


def _find_tests(modules: Sequence[Module]) -> list[_RegoTest]:
    found: dict[tuple[str, str], _RegoTest] = {}
    for module in modules:
        package = _package_ref(module.source)
        for stmt in split_statements(module.source):
            if not _is_test(stmt.name):
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
        tests = [s for s in stmts if _is_test(s.name)]
        if not tests:
            continue
        keep = [s for s in tests if module.path == test.module and s.name == test.rule]
        out[module.path] = _keep_only(module.source, keep, tests)
    return out


# --- the child process -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Crash:
    """The child died or timed out while handling a request."""

    message: str
    timed_out: bool = False


class _Child:
    """A child process that compiles and evaluates policies; restarted after a crash.

    Requests and replies are JSON lines over the child's stdin and a private
    pipe (the engine may print to stdout, so stdout is not used). The first
    line a new child gets is the ``init`` document: modules and data.
    """

    def __init__(self, init: Mapping[str, Any], timeout_s: float) -> None:
        self._init = orjson.dumps(init) + b"\n"
        self._timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: int | None = None
        self._stderr: IO[bytes] | None = None
        self._buf = b""

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "warden.policy.testing", "--child", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            pass_fds=(write_fd,),
            env=env,
        )
        os.close(write_fd)
        self._reader = read_fd
        self._buf = b""
        assert self._proc.stdin is not None
        self._proc.stdin.write(self._init)
        self._proc.stdin.flush()

    def request(self, job: Mapping[str, Any]) -> dict[str, Any] | _Crash:
        """Send one job and wait for its reply; a dead or hung child gives :class:`_Crash`."""
        if self._proc is None:
            self._start()
        assert self._proc is not None
        assert self._proc.stdin is not None
        try:
            line = orjson.dumps(job) + b"\n"
        except orjson.JSONEncodeError as exc:
            return {"ok": False, "error": f"the input cannot be sent to the engine: {exc}"}
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except OSError:
            return self._died()
        limit = self._timeout_s
        try:
            answer = self._read_line(limit)
        except TimeoutError:
            self._kill()
            return _Crash(f"timed out after {limit:g} s", timed_out=True)
        if answer is None:
            return self._died()
        reply: dict[str, Any] = orjson.loads(answer)
        return reply

    def _read_line(self, timeout_s: float) -> bytes | None:
        """The next reply line, or ``None`` when the child is gone; raises ``TimeoutError``."""
        assert self._reader is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self._reader, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError
                chunk = os.read(self._reader, 65536)
                if not chunk:
                    return None
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _died(self) -> _Crash:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self._proc.returncode
        tail = self._stderr_tail()
        self._cleanup()
        if code is not None and code < 0:
            try:
                what = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"killed by signal {-code}"
        else:
            what = f"exited with status {code}"
        return _Crash(f"the policy engine crashed ({what})" + (f": {tail}" if tail else ""))

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace").strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " ".join(lines)[-_STDERR_TAIL:]

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._reader is not None:
            os.close(self._reader)
        if self._stderr is not None:
            self._stderr.close()
        self._proc, self._reader, self._stderr = None, None, None

    def close(self) -> None:
        """Stop the child: closing its stdin ends it; kill it if it lingers."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._cleanup()


def _init_doc(policy: PolicySet) -> dict[str, Any]:
    return {
        "modules": [[m.path, m.source] for m in policy.modules],
        "production": [[m.path, m.source] for m in policy.production],
        "data": policy.data,
    }


def _child_main(argv: Sequence[str]) -> int:
    """Serve jobs from stdin; replies go to the file descriptor in ``argv[0]``."""
    # Replies go to a private pipe: the engine may print diagnostics to stdout.
    out = os.fdopen(int(argv[0]), "wb", buffering=0)
    lines = iter(sys.stdin.buffer.readline, b"")
    first = next(lines, b"")
    if not first:
        return 0
    worker = _ChildWorker(orjson.loads(first))
    for line in lines:
        reply = worker.handle(orjson.loads(line))
        out.write(orjson.dumps(reply) + b"\n")
    return 0


class _ChildWorker:
    """The child's side: runs one job at a time (see :class:`_Child`)."""

    def __init__(self, init: Mapping[str, Any]) -> None:
        self._modules = [Module(p, s) for p, s in init["modules"]]
        self._production = [Module(p, s) for p, s in init["production"]]
        self._data = init["data"]
        self._evaluators: dict[str, Any] = {}

    def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        op = job.get("op")
        try:
            if op == "query":
                return self._query(job["query"], job.get("replace") or {})
            if op == "decide":
                return self._decide(job["query"], job["input"], int(job.get("repeat", 0)))
            if op == "compile":
                return self._compile(job["query"])
        except (BundleError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        return {"ok": False, "error": f"unknown job {op!r}"}

    def _query(self, query: str, replace: Mapping[str, str]) -> dict[str, Any]:
        import regopy  # noqa: PLC0415 - only the child loads the engine
        from regopy import rego_shared as native  # noqa: PLC0415

        from warden.policy.bundle import describe_rego_error  # noqa: PLC0415

        modules = [Module(m.path, replace.get(m.path, m.source)) for m in self._modules]
        interp = regopy.Interpreter()
        interp.log_level = regopy.LogLevel.NONE
        for module in modules:
            try:
                interp.add_module(module.path, module.source)
            except regopy.RegoError as exc:
                return {"ok": False, "error": "\n".join(describe_rego_error(str(exc), modules))}
        interp.add_data_json(orjson.dumps(self._data).decode())
        started = time.perf_counter_ns()
        # Raw calls: the wrapper's Output parses the text as JSON and fails on error text.
        output = native.rego_query(interp._impl, query)
        elapsed = time.perf_counter_ns() - started
        if not output:
            return {"ok": False, "error": native.rego_get_error(interp._impl) or "query failed"}
        try:
            text = native.rego_output_string(output)
            if not native.rego_output_ok(output) or text.startswith("(error"):
                detail = (
                    "\n".join(describe_rego_error(text, modules)) if text.startswith("(") else ""
                )
                detail = detail or _EVAL_FAILED
                return {"ok": False, "error": detail, "ns": elapsed}
            return {"ok": True, "text": text, "ns": elapsed}
        finally:
            native.rego_free_output(output)

    def _decide(self, query: str, doc: Any, repeat: int) -> dict[str, Any]:
        from warden.policy.worker import Evaluator  # noqa: PLC0415

        evaluator = self._evaluators.get(query)
        compile_ns = 0
        if evaluator is None:
            started = time.perf_counter_ns()
            modules = [(m.path, m.source) for m in self._production]
            evaluator = Evaluator(modules, self._data, query)
            compile_ns = time.perf_counter_ns() - started
            self._evaluators[query] = evaluator
        started = time.perf_counter_ns()
        text = evaluator.evaluate(doc)
        first = time.perf_counter_ns() - started
        times = []
        for _ in range(repeat):
            started = time.perf_counter_ns()
            evaluator.evaluate(doc)
            times.append(time.perf_counter_ns() - started)
        return {"ok": True, "text": text, "ns": first, "compile_ns": compile_ns, "times": times}

    def _compile(self, query: str) -> dict[str, Any]:
        from warden.policy.bundle import compile_check  # noqa: PLC0415

        compile_check(self._production, self._data, query)
        return {"ok": True}


# --- decision tables --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecisionCase:
    """One row of a decision table: an input and the decision fields expected for it."""

    name: str
    input: Mapping[str, Any]
    expect: Mapping[str, Any]
    line: int = 0


@dataclass(frozen=True, slots=True)
class CaseFile:
    """A decision table file: its cases and, optionally, the query they are for."""

    path: str
    cases: tuple[DecisionCase, ...]
    query: str | None = None


def discover_case_files(folders: Iterable[Path]) -> list[Path]:
    """Decision tables in bundle folders: ``*_cases.{yaml,yml,json}`` and ``decisions/*``."""
    found: dict[Path, None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix not in _CASE_SUFFIXES:
                continue
            rel = path.relative_to(folder).parts
            if any(p.startswith(".") for p in rel):
                continue
            if path.stem.endswith("_cases") or "decisions" in rel[:-1]:
                found[path] = None
    return list(found)


def load_case_file(path: str | Path) -> CaseFile:
    """Read a decision table; raise :class:`BundleError` naming the file on any problem.

    The file is a mapping with ``cases`` (a list) and optional ``query`` and
    ``defaults`` (``defaults.input`` is merged under every case's input), or
    just the list of cases. Each case has ``name``, ``input`` and ``expect``.
    """
    p = Path(path)
    label = p.as_posix()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{label}: cannot read: {exc}") from None
    try:
        doc = orjson.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{label}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        raise BundleError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if isinstance(doc, list):
        doc = {"cases": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise BundleError(f"{label}: a decision table needs a list of cases (under `cases:`)")
    query = doc.get("query")
    if query is not None and not isinstance(query, str):
        raise BundleError(f"{label}: query must be text such as data.warden.decision")
    defaults_doc = doc.get("defaults") or {}
    defaults = defaults_doc.get("input", {}) if isinstance(defaults_doc, dict) else None
    if not isinstance(defaults, dict):
        raise BundleError(f"{label}: defaults.input must be a mapping")
    lines = _case_lines(text) if p.suffix != ".json" else []
    cases = []
    for index, raw in enumerate(doc["cases"]):
        line = lines[index] if index < len(lines) else 0
        case = _case(raw, index, f"{label}:{line}" if line else f"{label} (case {index + 1})")
        line = line or _find_line(text, case.name)
        cases.append(DecisionCase(case.name, _deep_merge(defaults, case.input), case.expect, line))
    return CaseFile(label, tuple(cases), query)


def _case(raw: Any, index: int, where: str) -> DecisionCase:
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: a case must be a mapping with name, input and expect")
    name = raw.get("name") or f"case {index + 1}"
    inp, expect = raw.get("input", {}), raw.get("expect")
    if not isinstance(inp, dict):
        raise BundleError(f"{where}: input must be a mapping")
    if not isinstance(expect, dict) or not expect:
        raise BundleError(f"{where}: expect must name at least one decision field")
    empty = [k for k, v in expect.items() if v is None]
    if empty:
        raise BundleError(
            f"{where}: expect.{empty[0]} has no value (in a YAML {{...}} mapping, "
            "put text that contains a comma in quotes)"
        )
    return DecisionCase(str(name), inp, expect)


def _case_lines(text: str) -> list[int]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    node = root
    if isinstance(root, yaml.MappingNode):
        node = next((v for k, v in root.value if getattr(k, "value", None) == "cases"), None)
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def _find_line(text: str, needle: str) -> int:
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 0


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def compare_decision(expect: Mapping[str, Any], result: Any, *, undefined: bool) -> list[str]:
    """What differs between a decision and its expectation, as sentences (empty: it matches).

    ``effect`` must be equal (a bare ``true``/``false`` result counts as
    ``allow``/``deny``); ``reason`` must occur in the reason (or in one of
    ``reasons``); ``undefined: true`` expects no decision; every other key
    must equal the result's field of that name.
    """
    if expect.get("undefined") is True:
        return [] if undefined else [f"expected no decision (undefined), got {_show(result)}"]
    if undefined:
        return ["expected a decision, but the policy is undefined for this input"]
    fields: Mapping[str, Any]
    if isinstance(result, bool):
        fields = {"effect": "allow" if result else "deny"}
    elif isinstance(result, Mapping):
        fields = result
    else:
        return [f"expected a decision object, got {_show(result)}"]
    problems = []
    for key, want in expect.items():
        if key == "undefined":
            continue
        if key == "reason":
            reasons = [fields.get("reason"), *(fields.get("reasons") or [])]
            texts = [r for r in reasons if isinstance(r, str)]
            if not any(str(want) in r for r in texts):
                got = "; ".join(texts) or "no reason"
                problems.append(f"expected the reason to contain {want!r}, got {got!r}")
        elif key not in fields:
            problems.append(f"expected {key} {_show(want)}, the decision has no {key}")
        elif fields[key] != want:
            problems.append(f"expected {key} {_show(want)}, got {_show(fields[key])}")
    return problems


def _show(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The child's answer for a decision query, parsed."""

    result: Any = None
    undefined: bool = False
    error: str = ""
    crashed: bool = False


def _parse_output(reply: Mapping[str, Any] | _Crash, modules: Sequence[Module]) -> _Outcome:
    from warden.policy.bundle import describe_rego_error  # noqa: PLC0415

    if isinstance(reply, _Crash):
        return _Outcome(error=reply.message, crashed=True)
    if not reply.get("ok"):
        return _Outcome(error=str(reply.get("error") or "evaluation failed"))
    text: str = reply["text"]
    if text == "undefined":
        return _Outcome(undefined=True)
    if text.startswith(("<error>", "(error", "(rego-errorseq")):
        body = text.removeprefix("<error>")
        detail = "; ".join(describe_rego_error(body, modules)) if body else ""
        return _Outcome(error=detail or _EVAL_FAILED)
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _Outcome(error=f"the engine returned unreadable output: {text[:200]!r}")
    expressions = doc.get("expressions") if isinstance(doc, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return _Outcome(error="the query gave more than one result")
    return _Outcome(result=expressions[0])


# --- running tests ----------------------------------------------------------------------------


def run_tests(
    policy: PolicySet,
    *,
    case_files: Sequence[CaseFile] = (),
    query: str = "data.warden.decision",
    run: str | None = None,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
) -> TestReport:
    """Run the Rego tests in ``policy`` and the decision tables in ``case_files``.

    ``run`` is a regular expression searched in each test's name (Rego tests:
    ``data.pkg.test_x``; cases: ``file: case name``); only matches run.
    Cases run on the production path for ``query`` unless their file names
    its own. Each Rego test is compiled on its own in a child process, so a
    test that crashes the engine is reported as ERROR and the others still run.
    """
    pattern = re.compile(run) if run else None
    results: list[TestResult] = []
    with _Child(_init_doc(policy), timeout_s) as child:
        for test in _find_tests(policy.modules):
            if pattern is not None and not pattern.search(test.name):
                continue
            results.append(_run_rego_test(child, policy, test))
        for case_file in case_files:
            for case in case_file.cases:
                display = f"{case_file.path}: {case.name}"
                if pattern is not None and not pattern.search(display):
                    continue
                results.append(_run_case(child, policy, case_file, case, case_file.query or query))
    return TestReport(tuple(results))


@dataclass(frozen=True, slots=True)
class _Where:
    kind: str
    name: str
    file: str
    line: int
    package: str

    def result(self, status: Status, ns: int = 0, message: str = "", hint: str = "") -> TestResult:
        return TestResult(
            self.kind, self.name, self.file, self.line, status, ns, self.package, message, hint
        )


def _run_rego_test(child: _Child, policy: PolicySet, test: _RegoTest) -> TestResult:
    where = _Where("rego", test.name, test.module, test.line, f"data.{test.package}")
    if test.todo:
        return where.result(Status.SKIPPED)
    replace = _isolated(policy.modules, test)
    reply = child.request({"op": "query", "query": test.name, "replace": replace})
    if isinstance(reply, _Crash):
        hint = "" if reply.timed_out else CRASH_HINT
        return where.result(Status.ERROR, message=reply.message, hint=hint)
    ns = int(reply.get("ns", 0))
    outcome = _parse_output(reply, policy.modules)
    if outcome.error:
        hint = WITH_INPUT_HINT if _WITH_INPUT_ERROR in outcome.error else ""
        return where.result(Status.ERROR, ns, outcome.error, hint)
    if outcome.undefined:
        return where.result(Status.FAIL, ns, "the test rule is undefined")
    if outcome.result is False:
        return where.result(Status.FAIL, ns, "the test rule is false")
    return where.result(Status.PASS, ns)


def _run_case(
    child: _Child, policy: PolicySet, case_file: CaseFile, case: DecisionCase, query: str
) -> TestResult:
    where = _Where("case", case.name, case_file.path, case.line, query)
    reply = child.request({"op": "decide", "query": query, "input": case.input})
    outcome = _parse_output(reply, policy.production)
    ns = 0 if isinstance(reply, _Crash) else int(reply.get("ns", 0))
    if outcome.error:
        hint = CRASH_HINT if outcome.crashed else ""
        if _WITH_INPUT_ERROR in outcome.error:
            hint = WITH_INPUT_HINT
        return where.result(Status.ERROR, ns, outcome.error, hint)
    problems = compare_decision(case.expect, outcome.result, undefined=outcome.undefined)
    if problems:
        return where.result(Status.FAIL, ns, "; ".join(problems))
    return where.result(Status.PASS, ns)


# --- eval ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalResult:
    """One evaluation on the production path, with timings in microseconds."""

    result: Any
    undefined: bool
    error: str
    compile_ms: float
    first_us: float
    times_us: tuple[float, ...] = field(default_factory=tuple)

    def to_json(self, *, query: str, revision: str) -> dict[str, Any]:
        """The document ``warden policy eval`` prints."""
        doc: dict[str, Any] = {"query": query, "revision": revision}
        if self.error:
            doc["error"] = self.error
        else:
            doc["result"] = None if self.undefined else self.result
            doc["undefined"] = self.undefined
        timing: dict[str, Any] = {
            "compile_ms": round(self.compile_ms, 2),
            "first_us": round(self.first_us, 1),
        }
        if self.times_us:
            ordered = sorted(self.times_us)
            timing["runs"] = len(ordered)
            timing["p50_us"] = round(ordered[len(ordered) // 2], 1)
            timing["p99_us"] = round(ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)], 1)
            timing["min_us"] = round(ordered[0], 1)
        doc["timing"] = timing
        return doc


def evaluate_input(
    policy: PolicySet,
    doc: Any,
    *,
    query: str = "data.warden.decision",
    repeat: int = 0,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
) -> EvalResult:
    """Evaluate ``query`` for the input ``doc`` as the engine does, in a child process.

    ``repeat`` further evaluations of the same input measure the warm cost.
    """
    with _Child(_init_doc(policy), timeout_s) as child:
        reply = child.request({"op": "decide", "query": query, "input": doc, "repeat": repeat})
    outcome = _parse_output(reply, policy.production)
    if isinstance(reply, _Crash):
        return EvalResult(None, False, outcome.error, 0.0, 0.0)
    times = tuple(t / 1000 for t in reply.get("times", ()))
    return EvalResult(
        outcome.result,
        outcome.undefined,
        outcome.error,
        int(reply.get("compile_ns", 0)) / 1e6,
        int(reply.get("ns", 0)) / 1000,
        times,
    )


# --- check ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem ``warden policy check`` reports. ``severity`` is ``error`` or ``warning``."""

    file: str
    line: int
    col: int
    severity: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        text = f"{where}: {self.severity}: {self.message}"
        return text + (f"\n  hint: {self.hint}" if self.hint else "")

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON object."""
        return {
            "file": self.file,
            "row": self.line,
            "col": self.col,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


_V1_HINT = "add `import rego.v1` and write rules in v1 syntax, which OPA 1.x requires"
# Builtins OPA 1.x removed, with what to use instead.
_DEPRECATED = {
    "any": "`some x in xs` or a comprehension",
    "all": "`every x in xs { ... }`",
    "re_match": "regex.match",
    "set_diff": "the `-` operator on sets",
    "net.cidr_overlap": "net.cidr_contains",
    "cast_array": "a comprehension",
    "cast_set": "a set comprehension",
    "cast_string": "format_int or sprintf",
    "cast_boolean": "a comparison",
    "cast_null": "null",
    "cast_object": "an object comprehension",
}
# Builtins this engine lacks: they evaluate to undefined, so a rule using them never holds.
_MISSING = ("http.send", "net.", "json.match_schema", "rego.metadata.", "strings.render_template")
_CALL = re.compile(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\(")
_SPRINTF_Q = re.compile(r'sprintf\(\s*"(?:[^"\\\n]|\\.)*%q')
_KV_SOME_IN_COMPREHENSION = re.compile(r"\|\s*some\s+\w+\s*,\s*\w+\s+in\b")


def lint_module(path: str, source: str) -> list[Finding]:
    """Flag v0 syntax, removed or missing builtins and engine pitfalls in one module."""
    blanked = _blank(source)
    findings: list[Finding] = []

    def at(offset: int) -> tuple[int, int]:
        line = source.count("\n", 0, offset) + 1
        return line, offset - (source.rfind("\n", 0, offset) + 1) + 1

    def add(offset: int, severity: str, message: str, hint: str = "") -> None:
        line, col = at(offset)
        findings.append(Finding(path, line, col, severity, message, hint))

    has_tests = False
    for stmt in split_statements(source):
        text = blanked[stmt.start : stmt.end]
        if stmt.name == "package":
            continue
        if stmt.name == "import":
            if re.match(r"import\s+future\.keywords", text):
                add(stmt.start, "warning", "`import future.keywords` is not needed", _V1_HINT)
            continue
        has_tests = has_tests or stmt.name.startswith(_TEST_PREFIX)
        for offset, message in _v0_heads(text):
            add(stmt.start + offset, "error", message, _V1_HINT)
    for match in _CALL.finditer(blanked):
        name = match.group(1)
        if name in _DEPRECATED:
            add(
                match.start(), "error", f"{name} was removed in OPA 1.x", f"use {_DEPRECATED[name]}"
            )
        elif name == "trace":
            add(
                match.start(),
                "error",
                "trace() does not exist in this engine: the rule fails with an error",
                "remove it; use `warden policy eval` to look at values",
            )
        elif name.startswith(_MISSING):
            add(
                match.start(),
                "warning",
                f"{name} is not available in this engine; it evaluates to undefined",
                "pass what it would fetch in the input or in data.json",
            )
    for match in _SPRINTF_Q.finditer(source):
        add(
            match.start(),
            "warning",
            "sprintf on this engine does not know %q: it stays in the text and shifts the values",
            "use %v",
        )
    for match in _KV_SOME_IN_COMPREHENSION.finditer(blanked):
        add(
            match.start(),
            "error",
            "`some k, v in x` inside a comprehension does not parse on this engine",
            "write `some k` and then `v := x[k]`",
        )
    if has_tests and not path.endswith("_test.rego"):
        add(
            0,
            "warning",
            "test rules outside a *_test.rego file are compiled into production",
            "move the tests to a file whose name ends in _test.rego",
        )
    return findings


def _v0_heads(text: str) -> Iterator[tuple[int, str]]:
    """v0 rule heads in one blanked statement: bodies without ``if``, sets without ``contains``.

    Yields ``(offset in text, message)``.
    """
    for start, head, brace in _heads(text):
        words = _NAME.findall(head)
        if not words or words[0] in ("default", "import", "package"):
            continue
        if words[0] != "else" and _SET_HEAD.fullmatch(head.strip()):
            if "if" in words:
                yield (
                    start,
                    (
                        "`p[x] if` makes a set on this engine but an object (p[x] = true) in "
                        "OPA 1.x; write `p contains x if`"
                    ),
                )
            else:
                yield start, "partial set rule without `contains` (v0 syntax)"
        elif brace is not None and "if" not in words:
            yield brace, "rule body without `if` (v0 syntax)"


_SET_HEAD = re.compile(r"[A-Za-z_][\w.]*\s*\[[^\]]*\]\s*(?:if\b.*)?", re.DOTALL)


def _heads(text: str) -> Iterator[tuple[int, str, int | None]]:
    """Each head of a statement (the rule and every ``else``) with its body brace, if any.

    A ``{`` opens a body unless it directly follows ``:=``, ``=`` or ``if``
    (then it is a value or the body of an ``if``).
    """
    depth = 0
    seg_start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if (
            depth == 0
            and text.startswith("else", i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))
        ):
            after = text[i + 4 : i + 5]
            if not (after.isalnum() or after == "_"):
                if i > seg_start:
                    yield from _finish(text, seg_start, i)
                seg_start = i
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == "{":
            if depth == 0:
                prev = text[seg_start:i].rstrip()
                is_value = prev.endswith((":=", "=")) and not prev.endswith(("==", "!="))
                if not is_value:
                    yield seg_start, text[seg_start:i], i
                    i = _skip_block(text, i)
                    seg_start = i
                    continue
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        i += 1
    if seg_start < n and text[seg_start:].strip():
        yield from _finish(text, seg_start, n)


def _finish(text: str, start: int, end: int) -> Iterator[tuple[int, str, int | None]]:
    head = text[start:end]
    if head.strip() and head.strip() != "}":
        yield start, head, None


def _skip_block(text: str, i: int) -> int:
    depth = 0
    while i < len(text):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


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
    from warden.policy.bundle import describe_rego_error  # noqa: PLC0415

    try:
        policy = load_policy_set(paths, check_syntax=False)
    except BundleError as exc:
        return [_finding_from_text(line, "error") for line in str(exc).splitlines() if line.strip()]
    findings: list[Finding] = []
    parse_failed = False
    import regopy  # noqa: PLC0415 - parsing only: it never evaluates, so it cannot crash

    for module in policy.modules:
        interp = regopy.Interpreter()
        interp.log_level = regopy.LogLevel.NONE
        try:
            interp.add_module(module.path, module.source)
        except regopy.RegoError as exc:
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
    if not parse_failed:
        checker = regopy.Interpreter()
        findings.extend(_unknown_functions(policy.modules, checker))
        with _Child(_init_doc(policy), timeout_s) as child:
            reply = child.request({"op": "compile", "query": query})
        if isinstance(reply, _Crash):
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


_NOT_CALLS = frozenset({"if", "not", "some", "every", "with", "in", "contains", "else", "as"})


def _unknown_functions(modules: Sequence[Module], interp: Any) -> list[Finding]:
    """Calls to functions that are neither builtins nor defined in the bundle.

    The engine only reports these when the call runs; OPA reports them at
    compile time, and so does the check.
    """
    blanked = {m.path: _blank(m.source) for m in modules}
    defined = {s.name for m in modules for s in split_statements(m.source)}
    known: dict[str, bool] = {}
    out: list[Finding] = []
    for module in modules:
        for match in _CALL.finditer(blanked[module.path]):
            name = match.group(1)
            if name in _NOT_CALLS or name.startswith(_MISSING) or name == "trace":
                continue
            if name.rsplit(".", 1)[-1] in defined:
                continue
            if name not in known:
                known[name] = bool(interp.is_builtin(name))
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child_main(sys.argv[2:]))
    print(
        "usage: warden policy test|eval|check|sign (this module is not a command)", file=sys.stderr
    )
    sys.exit(2)
