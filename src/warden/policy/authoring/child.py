"""The child process in which the authoring tools compile and evaluate policies.

On this engine a policy can crash the whole process (a builtin evaluated
under ``with input as {...}``, a very deep value), so the tools never
compile or evaluate in their own process: :class:`Child` runs
``python -m warden.policy.authoring <fd>``, sends it one JSON job per
line, and restarts it after a crash. The engine is only loaded in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from warden.policy.authoring.policy_set import PolicySet
from warden.policy.bundle import BundleError, Module, describe_rego_error
from warden.policy.engine import result_document
from warden.policy.worker import STACK_BYTES, stack_command

__all__ = [
    "DEFAULT_TEST_TIMEOUT_S",
    "EVAL_FAILED",
    "Child",
    "Crash",
    "Outcome",
    "init_doc",
    "main",
    "parse_output",
]

DEFAULT_TEST_TIMEOUT_S = 10.0
EVAL_FAILED = "evaluation failed (for example, a rule or function gave conflicting values)"
# Kept short: a crash report only needs the engine's last words.
_STDERR_TAIL = 600
# What one job's print() calls may hand back; a print in a loop could write megabytes.
_PRINTED_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class Crash:
    """The child died or timed out while handling a request."""

    message: str
    timed_out: bool = False


class Child:
    """A child process that compiles and evaluates policies; restarted after a crash.

    Requests and replies are JSON lines over the child's stdin and a private
    pipe (the engine prints to stdout, which the child collects for each job:
    a reply's ``printed``). The first
    line a new child gets is the ``init`` document: modules and data.
    """

    def __init__(
        self, init: Mapping[str, Any], timeout_s: float, *, stack_bytes: int = STACK_BYTES
    ) -> None:
        """``stack_bytes``: the stack the engine runs on, as ``policy.worker_stack_mb``."""
        self._init = orjson.dumps(init) + b"\n"
        self._timeout_s = timeout_s
        self._stack_bytes = stack_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: int | None = None
        self._stderr: IO[bytes] | None = None
        self._buf = b""

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            stack_command(
                [
                    sys.executable,
                    "-m",
                    "warden.policy.authoring",
                    str(write_fd),
                    str(self._stack_bytes),
                ],
                self._stack_bytes,
            ),
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

    def request(self, job: Mapping[str, Any]) -> dict[str, Any] | Crash:
        """Send one job and wait for its reply; a dead or hung child gives :class:`Crash`."""
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
            return Crash(f"timed out after {limit:g} s", timed_out=True)
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

    def _died(self) -> Crash:
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
        return Crash(f"the policy engine crashed ({what})" + (f": {tail}" if tail else ""))

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


def init_doc(policy: PolicySet) -> dict[str, Any]:
    return {
        "modules": [[m.path, m.source] for m in policy.modules],
        "production": [[m.path, m.source] for m in policy.production],
        "data": policy.data,
    }


def main(argv: Sequence[str]) -> int:
    """Serve jobs from stdin; replies go to the file descriptor in ``argv[0]``."""
    if not 1 <= len(argv) <= 2 or not all(a.isascii() and a.isdigit() for a in argv):
        print("usage: python -m warden.policy.authoring <reply fd> [stack bytes]", file=sys.stderr)
        return 2
    # The stack (argv[1]) was set by __main__, before the tools were imported.
    # Replies go to a private pipe: the engine prints to stdout (print()), which
    # _Printed collects for each job.
    out = os.fdopen(int(argv[0]), "wb", buffering=0)
    lines = iter(sys.stdin.buffer.readline, b"")
    first = next(lines, b"")
    if not first:
        return 0
    worker = _Worker(orjson.loads(first), _Printed())
    for line in lines:
        reply = worker.handle(orjson.loads(line))
        out.write(orjson.dumps(reply) + b"\n")
    return 0


class _Printed:
    """What the engine prints to standard output (``print()``), taken job by job.

    The engine writes to file descriptor 1 itself, so the child points that
    descriptor at a temporary file, appended to, and empties it after each job.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        fd = self._file.fileno()
        # Appending: once the file is emptied, the next write starts at 0 again.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        os.dup2(fd, 1)
        try:
            self._fflush: Any = ctypes.CDLL(None).fflush
        except (OSError, AttributeError):  # pragma: no cover - no C library to flush
            self._fflush = None

    def take(self) -> str:
        """What was printed since the last call (at most ``_PRINTED_MAX`` bytes of it)."""
        if self._fflush is not None:
            self._fflush(None)  # C stdio's buffer, should the engine write through it
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        if not size:
            return ""
        data = os.pread(fd, min(size, _PRINTED_MAX), 0)
        os.ftruncate(fd, 0)
        text = data.decode("utf-8", errors="replace")
        if size > _PRINTED_MAX:
            text += f"\n... ({size - _PRINTED_MAX} more bytes printed, not shown)"
        return text


class _Worker:
    """The child's side: runs one job at a time (see :class:`Child`).

    A reply carries ``printed``, the text the policy's ``print()`` calls wrote
    (for ``decide``, during the first evaluation only), when there is any.
    """

    def __init__(self, init: Mapping[str, Any], printed: _Printed) -> None:
        self._modules = [Module(p, s) for p, s in init["modules"]]
        self._production = [Module(p, s) for p, s in init["production"]]
        self._data = init["data"]
        self._evaluators: dict[str, Any] = {}
        self._printed = printed

    def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        reply = self._run(job)
        printed = self._printed.take()
        if printed and "printed" not in reply:
            reply["printed"] = printed
        return reply

    def _run(self, job: Mapping[str, Any]) -> dict[str, Any]:
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
        from warden.policy import rego  # noqa: PLC0415 - only the child loads the engine
        from warden.policy.bundle.compile import check_engine_faults  # noqa: PLC0415

        modules = [Module(m.path, replace.get(m.path, m.source)) for m in self._modules]
        try:
            # A test must not pass on what no bundle with it would load to do.
            check_engine_faults(modules)
        except BundleError as exc:
            return {"ok": False, "error": str(exc)}
        interp = rego.Interpreter()
        try:
            for module in modules:
                interp.add_module(module.path, module.source)
            interp.add_data_json(orjson.dumps(self._data).decode())
        except rego.RegoError as exc:
            return {"ok": False, "error": "\n".join(describe_rego_error(str(exc), modules))}
        started = time.perf_counter_ns()
        try:
            ok, text = interp.query(query)
        except rego.RegoError as exc:
            return {"ok": False, "error": str(exc)}
        elapsed = time.perf_counter_ns() - started
        if not ok or text.startswith("(error"):
            detail = "\n".join(describe_rego_error(text, modules)) if text.startswith("(") else ""
            return {"ok": False, "error": detail or EVAL_FAILED, "ns": elapsed}
        return {"ok": True, "text": text, "ns": elapsed}

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
        printed = self._printed.take()
        times = []
        for _ in range(repeat):
            started = time.perf_counter_ns()
            evaluator.evaluate(doc)
            times.append(time.perf_counter_ns() - started)
        self._printed.take()  # the repeats print the same again
        reply = {"ok": True, "text": text, "ns": first, "compile_ns": compile_ns, "times": times}
        if printed:
            reply["printed"] = printed
        return reply

    def _compile(self, query: str) -> dict[str, Any]:
        from warden.policy.bundle.compile import compile_check  # noqa: PLC0415

        compile_check(self._production, self._data, query)
        return {"ok": True}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The child's answer for a decision query, parsed."""

    result: Any = None
    undefined: bool = False
    error: str = ""
    crashed: bool = False
    printed: str = ""
    """What the policy's ``print()`` calls wrote while it ran."""


def parse_output(reply: Mapping[str, Any] | Crash, modules: Sequence[Module]) -> Outcome:
    if isinstance(reply, Crash):
        return Outcome(error=reply.message, crashed=True)
    printed = str(reply.get("printed") or "")
    if not reply.get("ok"):
        return Outcome(error=str(reply.get("error") or "evaluation failed"), printed=printed)
    text: str = reply["text"]
    if text == "undefined":
        return Outcome(undefined=True, printed=printed)
    if text.startswith(("<error>", "(error", "(rego-errorseq")):
        body = text.removeprefix("<error>")
        detail = "; ".join(describe_rego_error(body, modules)) if body else ""
        return Outcome(error=detail or EVAL_FAILED, printed=printed)
    doc = result_document(text)
    if doc is None:
        return Outcome(
            error=f"the engine returned unreadable output: {text[:200]!r}", printed=printed
        )
    expressions = doc.get("expressions") if isinstance(doc, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return Outcome(error="the query gave more than one result", printed=printed)
    return Outcome(result=expressions[0], printed=printed)
