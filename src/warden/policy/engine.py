"""The policy engine: a supervised pool of worker processes, a deadline, a cache.

Each revision of the policy gets its own pool of ``policy.workers`` processes
(:mod:`warden.policy.worker`), each of which compiles the bundle once and then
evaluates one input at a time. The proxy talks to them over Unix sockets with
length-prefixed orjson frames, read from the event loop with ``add_reader``:
no thread hop, one in-flight request per worker.

The deadline bounds an evaluation, not the wait for a worker:

* a request waits for a free worker at most ``queue_timeout_s`` (about a
  second). A burst only makes requests wait; past that bound the engine is
  not keeping up and raises :class:`~warden.errors.Overloaded`, which the
  ingress renders as the provider's own 503 with ``Retry-After``. Being busy
  never becomes a decision: no fallback applies, nothing is recorded;
* an evaluation that has used ``policy.deadline_ms`` of its worker's CPU time
  without answering gives ``policy_timeout``: the worker is killed
  (``SIGKILL``) and a replacement starts in the background. The timer runs on
  wall time from when the input reached its worker; when it fires, a reply
  already on the socket is read first, and a worker that has used less CPU
  than its budget (the machine was busy, the policy was not looping) is given
  the rest. If such a starved evaluation is still unanswered after
  ``queue_timeout_s``, its caller gets :class:`~warden.errors.Overloaded`
  too; the worker finishes (or reaches its CPU budget) on its own;
* a worker that holds an evaluation for :func:`_stall_bound_s` of wall time
  (ten budgets, at least five seconds) without using its CPU budget is stalled,
  not slow: stopped (``SIGSTOP``, a frozen cgroup, a debugger) or starved for
  that long. It is killed and replaced, its caller (if still waiting) gets
  :class:`~warden.errors.Overloaded`, and the input is not blamed: it did
  not run;
* a worker that dies mid-request (the policy crashed the engine) gives
  ``policy_crash``, and is replaced the same way; restarts back off when they
  come in bursts;
* an input that killed or crashed a worker is answered with the same error,
  without a worker, for the next minute (quarantine);
* an error result or a result of the wrong shape gives ``policy_error``;
* no active bundle gives ``policy_not_ready``.

A new revision is compiled by a new pool; only when every worker has compiled
it (and the optional ``pre_activate`` hook has passed) is it swapped in, in one
assignment. The old pool finishes its in-flight requests and exits. On any
failure the last good revision stays active. See
docs/adr/0002-policy-engine-isolation.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

import warden
from warden.config import DEFAULT_POLICY_QUEUE_TIMEOUT_S, PolicyConfig
from warden.errors import Overloaded, PolicyError
from warden.model import Effect, Mode
from warden.policy.activation import Activator
from warden.policy.bundle import Bundle, BundleError, Module, describe_rego_error
from warden.policy.cache import (
    InputShape,
    LRUCache,
    analyse,
    cache_key,
    path_text,
    project,
)
from warden.policy.metrics import PROMETHEUS, PolicyMetrics
from warden.policy.worker import (
    ENTRY_VARIABLE,
    MSG_BATCH,
    MSG_BATCH_RESULT,
    MSG_ERROR,
    MSG_EVAL,
    MSG_EVAL_AT,
    MSG_QUIT,
    MSG_RESULT,
    frame,
    stack_command,
)
from warden.protocols._wire import reject_constant, unique_keys
from warden.tasks import Tasks

__all__ = [
    "DEFAULT_QUEUE_TIMEOUT_S",
    "ERROR_CODES",
    "PolicyEngine",
    "PolicyResult",
    "PreActivate",
    "WorkerPool",
    "interpret_output",
    "interpret_value",
    "production_modules",
    "result_document",
]

log = logging.getLogger("warden.policy")

ERROR_CODES = ("policy_timeout", "policy_crash", "policy_error", "policy_not_ready")
"""The stable codes a :class:`PolicyResult` may carry in ``error``."""

PreActivate = Callable[[Bundle], Awaitable[None]]
"""Called with a compiled bundle before it is swapped in; raising refuses it."""

DEFAULT_START_TIMEOUT_S = 60.0
DEFAULT_QUEUE_TIMEOUT_S = DEFAULT_POLICY_QUEUE_TIMEOUT_S
"""How long a request may wait for a free worker before the engine reports it is overloaded."""
_MAX_WAITERS = 4096  # past this many queued requests, push back at once
_RETRY_AFTER_S = 1
_MIN_REARM_S = 0.005
_STALL_RECHECK_S = 1.0
_CLOSE_GRACE_S = 2.0
_RESTART_WINDOW_S = 30.0
_MAX_RESTART_DELAY_S = 5.0
_QUARANTINE_S = 60.0
_QUARANTINE_MAX = 1024
# A worker that holds an evaluation for this many budgets of wall time, and at least
# this long, without spending its CPU budget is stalled (stopped, frozen), not slow.
_STALL_BUDGETS: Final = 10
_MIN_STALL_S: Final = 5.0
_HEADER = struct.Struct(">I")
_EFFECTS = {e.value: e for e in Effect}
_MODES = {m.value: m for m in Mode}


_KEY_DIGEST_OVER: Final = 1024
"""Cache keys longer than this (the projected input, as JSON) are kept as a digest."""
_MAX_CACHED_REASONS: Final = 4096
"""Results whose reasons are longer in all are not cached: a reason may repeat what the
agent sent (a tool name of megabytes), and 10,000 entries of it would hold the memory."""


def _cacheable(result: PolicyResult) -> bool:
    """Whether ``result`` may be kept in the decision cache: no error, short reasons."""
    return result.error is None and sum(map(len, result.reasons)) <= _MAX_CACHED_REASONS


@dataclass(frozen=True)
class PolicyResult:
    """What the policy said about one input, or why it could not say.

    ``effect`` is ``None`` when the policy is undefined for the input (the
    guard then applies ``policy.default_effect``) or when ``error`` is set
    (one of :data:`ERROR_CODES`; the guard then applies the fallback).
    ``mode`` is the policy's per-decision override, if it gave one.
    """

    effect: Effect | None
    reasons: tuple[str, ...] = ()
    mode: Mode | None = None
    approvers: tuple[str, ...] = ()
    hold_timeout_s: float | None = None
    redact: tuple[str, ...] = ()
    risk: str | None = None
    hold: str | None = None
    required_approvals: int | None = None
    """How many people must approve, when the policy says (``None``: the config decides)."""
    revision: str = ""
    error: str | None = None
    detail: str | None = None
    """For errors: what went wrong, for logs (never shown to agents)."""
    input_fault: bool = False
    """For errors: this input may have caused it (it ran and failed, is quarantined,
    or could not be encoded), so no allow fallback may apply. ``False`` only when
    the input never ran: no bundle, no worker, no free worker by the deadline."""
    cached: bool = False
    elapsed_us: int = 0
    value: Any = None
    """For an extra entrypoint (``evaluate(..., query=...)``): the query's value as is."""
    defined: bool = False
    """For an extra entrypoint: whether the query had a value (``value`` may be ``null``)."""

    @property
    def reason(self) -> str:
        """The reasons joined, or ``""``."""
        return "; ".join(self.reasons)

    @property
    def undefined(self) -> bool:
        """Whether the policy gave no result (and no error) for the input."""
        return self.effect is None and self.error is None


def _evolve(result: PolicyResult, **changes: Any) -> PolicyResult:
    """``dataclasses.replace`` without re-running ``__init__``.

    The cache-hit path is hot (a few microseconds in all) and a frozen
    dataclass's ``__init__`` costs as much as the rest of it together.
    """
    new = object.__new__(PolicyResult)
    new.__dict__.update(result.__dict__)
    new.__dict__.update(changes)
    return new


class _ShapeError(ValueError):
    pass


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _ShapeError(f"{key} must be a list of strings")
    return tuple(value)


_HOLD_MODES = frozenset({"hold", "defer"})


def _from_value(value: Any) -> PolicyResult:
    if value is True:
        return PolicyResult(effect=Effect.ALLOW, reasons=("the policy allows it",))
    if value is False:
        return PolicyResult(effect=Effect.DENY, reasons=("the policy denies it",))
    if not isinstance(value, dict):
        raise _ShapeError(f"the result must be an object or a boolean, not {type(value).__name__}")
    effect = _EFFECTS.get(str(value.get("effect")))
    if effect is None:
        raise _ShapeError(f"effect must be one of {sorted(_EFFECTS)}, not {value.get('effect')!r}")
    reason = value.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise _ShapeError("reason must be a string")
    reasons = ((reason,) if reason else ()) + _strings(value.get("reasons"), "reasons")
    mode_raw = value.get("mode")
    mode = _MODES.get(str(mode_raw)) if mode_raw is not None else None
    if mode_raw is not None and mode is None:
        raise _ShapeError(f"mode must be one of {sorted(_MODES)}, not {mode_raw!r}")
    hold = value.get("hold_timeout_s")
    if hold is not None and (
        isinstance(hold, bool) or not isinstance(hold, int | float) or hold <= 0
    ):
        raise _ShapeError("hold_timeout_s must be a positive number")
    risk = value.get("risk")
    if risk is not None and not isinstance(risk, str):
        raise _ShapeError("risk must be a string")
    hold_how = value.get("hold")
    if hold_how is not None and hold_how not in _HOLD_MODES:
        raise _ShapeError(f"hold must be one of {sorted(_HOLD_MODES)}, not {hold_how!r}")
    required = value.get("required_approvals")
    if required is not None and (
        isinstance(required, bool) or not isinstance(required, int) or not 1 <= required <= 10
    ):
        raise _ShapeError("required_approvals must be a whole number from 1 to 10")
    return PolicyResult(
        effect=effect,
        reasons=reasons,
        mode=mode,
        approvers=_strings(value.get("approvers"), "approvers"),
        hold_timeout_s=float(hold) if hold is not None else None,
        redact=_strings(value.get("redact"), "redact"),
        risk=risk,
        hold=hold_how,
        required_approvals=required,
    )


def interpret_output(text: str, modules: tuple[Module, ...] = ()) -> PolicyResult:
    """Turn regopy's output text for the decision query into a :class:`PolicyResult`.

    The decision contract: ``undefined``; ``true``/``false``; or an object
    with ``effect`` (``allow``, ``deny``, ``require_approval``) and optionally
    ``reason`` (or ``reasons``), ``approvers``, ``hold_timeout_s``,
    ``redact``, ``mode`` and ``risk``. Other keys are ignored, so policies may
    carry extra detail. Anything else is a ``policy_error``.
    """
    if text == "undefined":
        return PolicyResult(effect=None)
    if text.startswith(("<error>", "(error", "(rego-errorseq")):
        body = text.removeprefix("<error>")
        detail = "; ".join(describe_rego_error(body, modules)) if body else "evaluation failed"
        return PolicyResult(effect=None, error="policy_error", detail=detail)
    doc = result_document(text)
    if doc is None:
        return PolicyResult(
            effect=None, error="policy_error", detail=f"unreadable result {text[:200]!r}"
        )
    expressions = doc.get("expressions") if isinstance(doc, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return PolicyResult(
            effect=None, error="policy_error", detail="the query gave several results"
        )
    try:
        return _from_value(expressions[0])
    except _ShapeError as exc:
        return PolicyResult(effect=None, error="policy_error", detail=f"invalid result: {exc}")


def result_document(text: str) -> Any:
    """The engine's result text as JSON, or ``None`` (the decision is then an error).

    A string repeated from the input keeps its control characters raw (see
    ``warden.policy.rego._c_text``), which strict JSON refuses inside a
    string: they are allowed. A key given twice is not: rego-cpp writes an
    object's keys once, so a second ``effect`` can only come from input text
    a builtin unescaped (``base64.decode``) and the result repeats.
    """
    try:
        return json.loads(
            text, strict=False, parse_constant=reject_constant, object_pairs_hook=unique_keys
        )
    except (ValueError, RecursionError):
        return None


def interpret_value(text: str, modules: tuple[Module, ...] = ()) -> PolicyResult:
    """Like :func:`interpret_output` for an extra entrypoint: the value is kept as is.

    ``effect`` stays ``None``; ``defined`` and ``value`` carry the query's
    value for the caller to read in its own contract (OPA-Envoy's ``allowed``).
    """
    if text == "undefined":
        return PolicyResult(effect=None)
    if text.startswith(("<error>", "(error", "(rego-errorseq")):
        return interpret_output(text, modules)
    doc = result_document(text)
    if doc is None:
        return PolicyResult(
            effect=None, error="policy_error", detail=f"unreadable result {text[:200]!r}"
        )
    bindings = doc.get("bindings") if isinstance(doc, dict) else None
    if not isinstance(bindings, dict) or ENTRY_VARIABLE not in bindings:
        return PolicyResult(
            effect=None, error="policy_error", detail="the query gave several results"
        )
    return PolicyResult(effect=None, value=bindings[ENTRY_VARIABLE], defined=True)


def _worker_error(detail: str) -> PolicyResult:
    """A worker's refusal (``b"X"``, or an ``{"error": ...}`` entry of a batch)."""
    return PolicyResult(effect=None, error="policy_error", detail=detail)


def _stamped(result: PolicyResult, revision: str) -> PolicyResult:
    """A worker's answer for one input, with the revision that gave it."""
    # An error from evaluating this input is the input's to answer for.
    return _evolve(result, revision=revision, input_fault=result.error is not None)


def _read_batch_entry(entry: Any, modules: tuple[Module, ...]) -> PolicyResult:
    """One entry of a batch reply: output text, or ``{"error": ...}``."""
    if isinstance(entry, str):
        return interpret_output(entry, modules)
    if isinstance(entry, dict) and isinstance(entry.get("error"), str):
        return _worker_error(entry["error"])
    return _worker_error("unknown reply from worker")


# --- the worker pool ---------------------------------------------------------------------------


class _EvalTimeout(Exception):
    pass


class _WorkerCrash(Exception):
    pass


class _NoWorker(Exception):
    pass


class _QueueTimeout(TimeoutError):
    """No worker was free within the queue bound: the input never ran."""


class _Starved(Exception):
    """The worker got too little CPU to answer in time: the machine is busy, not the policy."""


class _Stalled(_Starved):
    """The worker held the input past :func:`_stall_bound_s` without using its budget.

    It was killed and replaced; like :class:`_Starved`, the input did not run.
    """


class _PoolClosed(Exception):
    pass


class _State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    ready: asyncio.Future[None]
    state: _State = _State.STARTING
    buf: bytearray = field(default_factory=bytearray)
    pending: asyncio.Future[bytes] | None = None
    tag: Any = None
    timer: asyncio.TimerHandle | None = None
    served: int = 0
    dispatched_at: float = 0.0
    cpu_at_dispatch: int | None = None
    budget_s: float = 0.0
    """The current request's evaluation budget (a batch's is its inputs' budgets together)."""


def _stall_bound_s(budget_s: float) -> float:
    """Wall time a worker may hold an evaluation of ``budget_s`` (CPU) before it is replaced.

    Ten budgets, and at least five seconds: well past what a busy machine's
    scheduler leaves a worker waiting, so only a worker that is not running
    at all (stopped, frozen) or next to it reaches it.
    """
    return max(_STALL_BUDGETS * budget_s, _MIN_STALL_S)


def _cpu_ns(pid: int) -> int | None:
    """CPU time used so far by process ``pid``, or ``None`` where that cannot be read."""
    # Linux encodes another process's CPU clock as ((~pid) << 3) | CPUCLOCK_SCHED.
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except OSError:
        return None


def _runnable(pid: int) -> bool:
    """Whether process ``pid`` is running or waiting for a CPU (``R`` in ``/proc``).

    A worker left that long without its budget is then only starved (a challenger's
    ``SCHED_IDLE`` worker on a busy machine): replacing it would not help. Stopped
    (``T``), or asleep in a frozen cgroup, it is not; unreadable counts as not.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"R"


_WORKER_ENV: Final = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "SYSTEMROOT"}
)
# Python's own settings, and the coverage hooks of a test run.
_WORKER_ENV_PREFIXES: Final = ("LC_", "PYTHON", "COV_CORE_", "COVERAGE_")


def _worker_env() -> dict[str, str]:
    """The environment a policy worker starts with: only what the interpreter needs.

    A policy reads its worker's environment through ``opa.runtime().env``, and
    Warden's holds the upstream keys it injects (ADR 0015) and any
    ``WARDEN_*`` setting: a rule could put them in a reason the agent reads.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k in _WORKER_ENV or k.startswith(_WORKER_ENV_PREFIXES)
    }
    # The worker imports warden from wherever this process did, installed or not.
    root = str(Path(warden.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _spawn_process(python: str, stack_mb: int) -> tuple[subprocess.Popen[bytes], socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            stack_command(
                [python, "-m", "warden.policy.worker", str(child.fileno()), str(stack_mb)],
                stack_mb * 1024 * 1024,
            ),
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=_worker_env(),
            # Own process group: a terminal Ctrl-C is for the proxy, which stops its
            # workers. Not its own session: with Linux's autogroups a session is
            # scheduled as a group, and a challenger worker's idle priority counts
            # only beside the proxy's threads, in the proxy's group.
            process_group=0,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    parent.setblocking(False)
    return proc, parent


def _stop_started(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """Stop a worker started for a pool that closed meanwhile (it has compiled nothing)."""
    sock.close()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _exit_text(proc: subprocess.Popen[bytes]) -> str:
    code = proc.poll()
    if code is None:
        return "it closed its socket"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class WorkerPool:
    """Worker processes for one compiled revision; see the module docstring."""

    def __init__(
        self,
        init: bytes,
        size: int,
        *,
        label: str,
        python: str | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        on_change: Callable[[], None] | None = None,
        on_failure: Callable[[Any, str], None] | None = None,
        eval_budget_s: float = 0.05,
        queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
        stack_mb: int = 512,
    ) -> None:
        self._init = init
        self._stack_mb = stack_mb
        self._on_failure = on_failure
        self._eval_budget_s = eval_budget_s
        self._queue_timeout_s = queue_timeout_s
        self._size = size
        self._label = label
        self._python = python or sys.executable
        self._start_timeout_s = start_timeout_s
        self._on_change = on_change
        self._workers: set[_Worker] = set()
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._tasks = Tasks("policy-pool")
        # Reapers are awaited by close(), never cancelled: no zombie is left behind.
        self._reapers = Tasks("policy-reap")
        # Process starts under way in the executor: close() stops what they start.
        self._spawning: set[asyncio.Future[tuple[subprocess.Popen[bytes], socket.socket]]] = set()
        self._restart_times: deque[float] = deque()
        self._closed = False
        self.restarts = 0
        self.timeouts = 0
        self.crashes = 0
        self.stalls = 0

    @property
    def alive(self) -> int:
        """Workers that can take a request now or after their current one."""
        return sum(1 for w in self._workers if w.state in (_State.IDLE, _State.BUSY))

    async def until_alive(self, timeout_s: float) -> bool:
        """Wait (polling) for a live worker, e.g. a replacement starting; whether there is one."""
        deadline = time.monotonic() + timeout_s
        while self.alive == 0 and not self._closed:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return self.alive > 0

    def pids(self) -> list[int]:
        """Process ids of the live workers (for status and tests)."""
        return sorted(w.proc.pid for w in self._workers if w.state in (_State.IDLE, _State.BUSY))

    async def start(self) -> None:
        """Start every worker and wait until all have compiled the bundle.

        Raises :class:`BundleError` with the compiler's message, or when a
        worker dies or stalls while compiling; no worker is left running then.
        """
        try:
            workers = [await self._spawn() for _ in range(self._size)]
            async with asyncio.timeout(self._start_timeout_s):
                results = await asyncio.gather(*(w.ready for w in workers), return_exceptions=True)
        except TimeoutError:
            await self.close(grace=0)
            raise BundleError(
                f"{self._label}: the policy did not compile within {self._start_timeout_s:g} s"
            ) from None
        except BaseException:
            await self.close(grace=0)
            raise
        for result in results:
            if isinstance(result, BaseException):
                await self.close(grace=0)
                if isinstance(result, BundleError):
                    raise result
                raise BundleError(f"{self._label}: {result}")
        for worker in workers:
            worker.state = _State.BUSY
            self._release(worker)
        self._changed()

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        starting = loop.run_in_executor(None, _spawn_process, self._python, self._stack_mb)
        self._spawning.add(starting)
        # Shielded: a caller cancelled meanwhile (close() cancels replacements)
        # must not orphan the process the executor starts anyway.
        proc, sock = await asyncio.shield(starting)
        self._spawning.discard(starting)
        if self._closed:
            _stop_started(proc, sock)
            raise _PoolClosed
        worker = _Worker(proc=proc, sock=sock, ready=loop.create_future())
        self._workers.add(worker)
        loop.add_reader(sock.fileno(), self._on_readable, worker)
        try:
            await loop.sock_sendall(sock, frame(self._init))
        except OSError:
            self._on_dead(worker)  # reported through ``ready``
        return worker

    def _on_readable(self, worker: _Worker) -> None:
        try:
            data = worker.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._on_dead(worker)
            return
        buf = worker.buf
        buf.extend(data)
        while len(buf) >= 4:
            (size,) = _HEADER.unpack_from(buf)
            if len(buf) < 4 + size:
                break
            body = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            self._on_message(worker, body)

    def _on_message(self, worker: _Worker, body: bytes) -> None:
        if worker.state is _State.STARTING:
            try:
                hello = orjson.loads(body)
            except orjson.JSONDecodeError:
                hello = {"ok": False, "error": "unreadable start-up message"}
            if not worker.ready.done():
                if hello.get("ok"):
                    worker.ready.set_result(None)
                else:
                    worker.ready.set_exception(
                        BundleError(str(hello.get("error", "compile failed")))
                    )
            return
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        pending, worker.pending = worker.pending, None
        worker.tag = None
        worker.served += 1
        if pending is not None and not pending.done():
            pending.set_result(body)
        self._release(worker)

    def _on_dead(self, worker: _Worker, *, reason: type[Exception] = _WorkerCrash) -> None:
        if worker.state is _State.DEAD:
            return
        was_serving = worker.state in (_State.IDLE, _State.BUSY)
        worker.state = _State.DEAD
        self._disconnect(worker)
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        if not worker.ready.done():
            self._track(self._report_start_failure(worker))
        pending, worker.pending = worker.pending, None
        tag, worker.tag = worker.tag, None
        if pending is not None and not pending.done():
            pending.set_exception(reason(_exit_text(worker.proc)))
        if (
            pending is not None
            and tag is not None
            and self._on_failure is not None
            and reason is not _Stalled  # a stopped worker says nothing of its input
        ):
            code = "policy_timeout" if reason is _EvalTimeout else "policy_crash"
            self._on_failure(tag, code)
        killed = reason is _EvalTimeout or reason is _Stalled
        self._reap_later(worker, 0.0 if killed else _CLOSE_GRACE_S)
        if was_serving and not self._closed:
            if reason is _EvalTimeout:
                self.timeouts += 1
            elif reason is _Stalled:
                self.stalls += 1
            else:
                self.crashes += 1
                log.error(
                    "policy worker %s died (%s); starting a replacement",
                    worker.proc.pid,
                    _exit_text(worker.proc),
                )
            self._schedule_replacement()
        self._changed()

    async def _report_start_failure(self, worker: _Worker) -> None:
        # Give the process a moment to exit so the message can say how it died.
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(worker.proc.wait, 0.5)
        if not worker.ready.done():
            how = _exit_text(worker.proc)
            worker.ready.set_exception(
                BundleError(f"{self._label}: the policy worker died while compiling ({how})")
            )

    def _disconnect(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(worker.sock.fileno())
        worker.sock.close()

    def _on_timeout(self, worker: _Worker) -> None:
        worker.timer = None
        if worker.state is not _State.BUSY:
            return
        # The answer may be on the socket already, behind a busy event loop:
        # take it rather than kill a worker that met its deadline.
        pending = worker.pending
        self._on_readable(worker)
        if worker.pending is not pending or worker.state is not _State.BUSY:
            return
        now = asyncio.get_running_loop().time()
        start_cpu = worker.cpu_at_dispatch
        used_ns = _cpu_ns(worker.proc.pid) if start_cpu is not None else None
        if used_ns is not None and start_cpu is not None:
            left_s = worker.budget_s - (used_ns - start_cpu) / 1e9
            if left_s > 0:
                held_s = now - worker.dispatched_at
                stall_s = _stall_bound_s(worker.budget_s)
                if held_s >= stall_s and not _runnable(worker.proc.pid):
                    self._on_stalled(worker, held_s)
                    return
                # Starved of CPU, not looping: give it the rest of its budget.
                if pending is not None and held_s >= self._queue_timeout_s:
                    worker.pending, worker.tag = None, None
                    if not pending.done():
                        pending.set_exception(_Starved())
                # A stopped worker never spends its budget: the stall bound is checked too
                # (past it, a starved one's state again every second).
                until_stall = stall_s - held_s if held_s < stall_s else _STALL_RECHECK_S
                worker.timer = asyncio.get_running_loop().call_later(
                    max(min(left_s, until_stall), _MIN_REARM_S), self._on_timeout, worker
                )
                return
        log.warning("policy worker %s passed the deadline; killing it", worker.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        self._on_dead(worker, reason=_EvalTimeout)

    def _on_stalled(self, worker: _Worker, held_s: float) -> None:
        """Kill and replace a worker that held its input past the stall bound unused."""
        log.warning(
            "policy worker %s held an evaluation for %.1f s without using its %g ms "
            "CPU budget (stopped or frozen?); killing it and starting a replacement",
            worker.proc.pid,
            held_s,
            worker.budget_s * 1000,
        )
        # Answered first, so _on_dead neither blames the input nor calls it a crash.
        pending, worker.pending, worker.tag = worker.pending, None, None
        if pending is not None and not pending.done():
            pending.set_exception(_Stalled())
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        self._on_dead(worker, reason=_Stalled)

    async def _reap(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)

    def _reap_later(self, worker: _Worker, grace: float) -> None:
        self._workers.discard(worker)
        self._reapers.spawn(self._reap(worker.proc, grace), name="reap")

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        # In a context of its own: a replacement outlives the request whose timeout
        # started it, and its worker's log lines must not name that request's decision.
        self._tasks.spawn(coro, name="worker", context=contextvars.Context())

    def _schedule_replacement(self) -> None:
        now = time.monotonic()
        self._restart_times.append(now)
        while self._restart_times and now - self._restart_times[0] > _RESTART_WINDOW_S:
            self._restart_times.popleft()
        # One free restart per worker in the window; beyond that, back off so a
        # policy that crashes on every input cannot keep the CPU busy compiling.
        excess = len(self._restart_times) - self._size
        delay = 0.0 if excess <= 0 else min(_MAX_RESTART_DELAY_S, 0.1 * 2 ** (excess - 1))
        self._track(self._replace(delay))

    async def _replace(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._closed:
            return
        try:
            worker = await self._spawn()
            async with asyncio.timeout(self._start_timeout_s):
                await worker.ready
        except _PoolClosed:
            return
        except (BundleError, OSError, TimeoutError) as exc:
            log.error("policy worker replacement failed: %s", exc)
            if not self._closed:
                self._schedule_replacement()
            return
        if worker.state is _State.DEAD:
            return
        self.restarts += 1
        worker.state = _State.BUSY
        self._release(worker)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _release(self, worker: _Worker) -> None:
        if worker.state is not _State.BUSY:
            return
        if self._closed:
            self._retire(worker)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        worker.state = _State.IDLE
        self._idle.append(worker)

    def _retire(self, worker: _Worker) -> None:
        worker.state = _State.DEAD
        with contextlib.suppress(OSError):
            worker.sock.send(frame(MSG_QUIT))
        self._disconnect(worker)
        self._reap_later(worker, _CLOSE_GRACE_S)

    async def _acquire(self) -> _Worker:
        while self._idle:
            worker = self._idle.popleft()
            if worker.state is _State.IDLE:
                worker.state = _State.BUSY
                return worker
        if self.alive == 0:
            raise _NoWorker
        if len(self._waiters) >= _MAX_WAITERS:
            raise _QueueTimeout
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                return await waiter
        except BaseException:
            # A worker may have been handed over just as we gave up: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise

    async def evaluate(
        self,
        body: bytes,
        tag: Any = None,
        *,
        prefix: bytes = MSG_EVAL,
        budget_s: float | None = None,
    ) -> bytes:
        """Send one input to a free worker; return its reply frame.

        ``prefix``: the request kind (``MSG_EVAL``, or ``MSG_EVAL_AT`` and the
        index of an extra entrypoint, or ``MSG_BATCH``). ``budget_s``: this
        request's evaluation budget instead of the pool's ``eval_budget_s``
        (a batch gets one budget per input).

        Raises :class:`_QueueTimeout` when no worker was free within the
        queue bound (the input never ran), :class:`_Starved` when its worker
        got too little CPU to answer within that bound, :class:`_Stalled`
        when it was replaced for holding the input past the stall bound
        unused (neither is the input's doing), :class:`_EvalTimeout` when the
        worker was killed for running past the evaluation budget, and
        :class:`_WorkerCrash` when it died. ``tag`` is passed to
        ``on_failure`` if this request kills or crashes the worker.
        """
        if self._closed:
            raise _PoolClosed
        try:
            worker = await self._acquire()
        except TimeoutError:
            raise _QueueTimeout from None
        if self._closed or worker.state is _State.DEAD:
            # Handed a worker just before the pool closed (a swap): close() saw
            # no request on it and stopped it, so this one goes to the new pool.
            raise _PoolClosed
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        worker.pending = reply
        worker.tag = tag
        # The pool, not the caller, owns the kill timer, so a caller that goes
        # away cannot leave a stuck worker behind. The budget starts now, when
        # the input reaches its worker: time spent queueing is not held against it.
        worker.dispatched_at = loop.time()
        worker.cpu_at_dispatch = _cpu_ns(worker.proc.pid)
        worker.budget_s = self._eval_budget_s if budget_s is None else budget_s
        worker.timer = loop.call_later(worker.budget_s, self._on_timeout, worker)
        data = frame(prefix + body)
        try:
            sent = worker.sock.send(data)
            if sent < len(data):
                await loop.sock_sendall(worker.sock, data[sent:])
        except BlockingIOError:
            await loop.sock_sendall(worker.sock, data)
        except OSError:
            self._on_dead(worker)
            if not reply.done():  # it was already dead: nothing else will answer
                reply.set_exception(
                    _WorkerCrash("the worker stopped before the request reached it")
                )
        # No timer of the caller's own: the kill timer answers ``reply`` (a
        # timer here could fire in the same loop pass as the reply and lose it).
        return await reply

    async def close(self, grace: float = _CLOSE_GRACE_S) -> None:
        """Stop taking requests; let in-flight ones finish; stop every worker."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_PoolClosed())
        for worker in list(self._workers):
            if worker.state in (_State.IDLE, _State.STARTING):
                if not worker.ready.done():
                    worker.ready.cancel()
                self._retire(worker)
        in_flight = [w.pending for w in self._workers if w.state is _State.BUSY and w.pending]
        if in_flight and grace > 0:
            await asyncio.wait(in_flight, timeout=grace)
        for worker in list(self._workers):
            if worker.state is not _State.DEAD:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                self._on_dead(worker)
        await self._tasks.cancel()
        for starting in list(self._spawning):
            self._spawning.discard(starting)
            with contextlib.suppress(Exception):
                _stop_started(*await starting)
        await self._reapers.drain()
        self._workers.clear()
        self._idle.clear()
        self._changed()


# --- the engine --------------------------------------------------------------------------------


class _Quarantine:
    """Inputs (by cache key) that recently made a worker time out or crash.

    A retry of the same input gets the same error at once, instead of taking
    down another worker; entries are forgiven after ``_QUARANTINE_S``.
    """

    def __init__(self) -> None:
        self._until: dict[bytes, tuple[float, str]] = {}

    def __bool__(self) -> bool:
        return bool(self._until)

    def get(self, key: bytes) -> str | None:
        entry = self._until.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._until[key]
            return None
        return entry[1]

    def add(self, key: Any, code: str) -> None:
        self._until[key] = (time.monotonic() + _QUARANTINE_S, code)
        while len(self._until) > _QUARANTINE_MAX:
            del self._until[next(iter(self._until))]


@dataclass(eq=False)
class _Generation:
    bundle: Bundle
    modules: tuple[Module, ...]
    pool: WorkerPool
    shape: InputShape
    cache: LRUCache[bytes, PolicyResult]
    cacheable: bool
    activated_at: float
    quarantine: _Quarantine


def production_modules(bundle: Bundle) -> tuple[Module, ...]:
    """The modules the engine compiles: all but ``*_test.rego``.

    Tests are for ``warden policy test``; leaving them out of production also
    keeps constructs the engine cannot compile (``with input as`` around a
    builtin) out of the proxy's path.
    """
    return tuple(m for m in bundle.modules if not m.path.endswith("_test.rego"))


def _now_iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


class PolicyEngine:
    """Evaluates the active bundle in worker processes; see the module docstring."""

    def __init__(
        self,
        config: PolicyConfig,
        *,
        metrics: PolicyMetrics | None = None,
        pre_activate: PreActivate | None = None,
        python: str | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
        entrypoints: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        # Extra queries every revision compiles beside ``policy.query`` (ext_authz's).
        self._entrypoints = tuple(q for q in dict.fromkeys(entrypoints) if q != config.query)
        if len(self._entrypoints) > 255:
            raise ValueError("at most 255 extra policy entrypoints")
        self._entry_index = {q: i for i, q in enumerate(self._entrypoints, start=1)}
        self.metrics = metrics if metrics is not None else PROMETHEUS
        self.pre_activate = pre_activate
        self._python = python
        self._start_timeout_s = start_timeout_s
        self._queue_timeout_s = queue_timeout_s
        self._active: _Generation | None = None
        self._lock = asyncio.Lock()
        self._deadline_s = config.deadline_ms / 1000
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_reload_at: float | None = None
        self._activator: Any = None
        self._retiring = Tasks("policy-retire")
        self._closed = False

    @classmethod
    async def start(
        cls,
        config: PolicyConfig,
        *,
        metrics: PolicyMetrics | None = None,
        pre_activate: PreActivate | None = None,
        watch: bool | None = None,
        python: str | None = None,
        queue_timeout_s: float | None = None,
        entrypoints: tuple[str, ...] = (),
    ) -> PolicyEngine:
        """Load and activate the configured bundles, then keep them current.

        Never raises for a bad or missing bundle: the engine then starts not
        ready (every evaluation gets ``policy_not_ready``), reports why in
        :meth:`status`, and keeps polling. ``watch`` overrides
        ``config.watch``; a ``bundle_url`` is always polled. ``entrypoints``:
        extra queries every revision compiles beside ``config.query``, for
        :meth:`evaluate`'s ``query`` (one the bundle does not define is
        undefined; one that does not compile answers ``policy_error``).
        """
        engine = cls(
            config,
            metrics=metrics,
            pre_activate=pre_activate,
            python=python,
            queue_timeout_s=config.queue_timeout_s if queue_timeout_s is None else queue_timeout_s,
            entrypoints=entrypoints,
        )
        engine._activator = Activator.for_config(engine, config)
        await engine._activator.poll_once()
        keep_polling = config.bundle_url is not None or (config.watch if watch is None else watch)
        if keep_polling:
            engine._activator.start()
        return engine

    @property
    def revision(self) -> str | None:
        """The active bundle's revision, or ``None`` before any bundle was activated."""
        return self._active.bundle.revision if self._active is not None else None

    @property
    def bundle(self) -> Bundle | None:
        """The active bundle."""
        return self._active.bundle if self._active is not None else None

    @property
    def ready(self) -> bool:
        """A bundle is active and at least one worker can evaluate it."""
        return self._active is not None and self._active.pool.alive > 0

    def status(self) -> dict[str, Any]:
        """Details for ``/readyz`` and ``warden status``."""
        gen = self._active
        return {
            "ready": self.ready,
            "revision": self.revision,
            "source": gen.bundle.source if gen else None,
            "signed_by": gen.bundle.signed_by if gen else None,
            "activated_at": _now_iso(gen.activated_at) if gen else None,
            "last_reload_at": _now_iso(self.last_reload_at),
            "last_error": self.last_error,
            "last_error_at": _now_iso(self.last_error_at),
            "workers": self.config.workers,
            "workers_alive": gen.pool.alive if gen else 0,
            "worker_pids": gen.pool.pids() if gen else [],
            "worker_restarts": gen.pool.restarts if gen else 0,
            "worker_timeouts": gen.pool.timeouts if gen else 0,
            "worker_crashes": gen.pool.crashes if gen else 0,
            "worker_stalls": gen.pool.stalls if gen else 0,
            "cache": {
                "enabled": bool(gen and gen.cacheable),
                "entries": len(gen.cache) if gen else 0,
                "input_paths": (
                    None
                    if gen is None or gen.shape.paths is None
                    else [path_text(p) for p in gen.shape.paths]
                ),
                # Why decisions are not cached; None when they are.
                "off_because": (
                    None
                    if gen is None or gen.cacheable
                    else "policy.cache_size is 0"
                    if self.config.cache_size <= 0
                    else f"module {gen.shape.clock_module} calls a clock/random builtin"
                ),
            },
        }

    def report_failure(self, message: str) -> None:
        """Record a failed reload: log line, metric, and :meth:`status`."""
        repeated = message == self.last_error
        self.last_error = message
        self.last_error_at = time.time()
        self.metrics.reload("failure")
        # A bundle server that stays down fails every poll; say so once.
        log.log(
            logging.DEBUG if repeated else logging.ERROR,
            "policy bundle not activated; keeping revision %s: %s",
            self.revision,
            message,
        )

    async def activate(self, bundle: Bundle) -> bool:
        """Compile ``bundle`` in a new worker pool and swap it in.

        Returns ``False`` when it is the active bundle already (same files,
        same signer: files re-signed with another key, a key rotation, are
        activated again so the change log records the new signer). On
        failure the active revision stays, the failure is reported, and
        :class:`PolicyError` is raised.
        """
        async with self._lock:
            if self._closed:
                raise PolicyError("the policy engine is closed")
            current = self._active
            if (
                current is not None
                and current.bundle.revision == bundle.revision
                and current.bundle.file_hashes == bundle.file_hashes
                and bundle.file_hashes is not None
                and current.bundle.signed_by == bundle.signed_by
            ):
                # The store is back to what decides: an earlier refusal is over.
                self.last_error = None
                self.last_error_at = None
                return False
            modules = production_modules(bundle)
            try:
                init = orjson.dumps(
                    {
                        "modules": [[m.path, m.source] for m in modules],
                        "data": bundle.data,
                        "query": self.config.query,
                        "entrypoints": list(self._entrypoints),
                        "label": bundle.name,
                    }
                )
            except TypeError as exc:
                # Data nested past what JSON carries once placed under its folders: the
                # bundle's fault, reported as any other (the poll goes on).
                message = f"{bundle.source}: its data cannot be sent to the engine: {exc}"
                self.report_failure(message)
                raise BundleError(message) from None
            quarantine = _Quarantine()
            pool = WorkerPool(
                init,
                self.config.workers,
                label=bundle.source,
                python=self._python,
                start_timeout_s=self._start_timeout_s,
                on_change=self._pool_changed,
                on_failure=quarantine.add,
                eval_budget_s=self._deadline_s,
                queue_timeout_s=self._queue_timeout_s,
                stack_mb=self.config.worker_stack_mb,
            )
            try:
                await pool.start()
                if self.pre_activate is not None:
                    await self.pre_activate(bundle)
                # A scan of the bundle's text: a large bundle takes a while.
                shape = await asyncio.to_thread(analyse, modules, bundle.data)
            except Exception as exc:
                await pool.close(grace=0)
                message = (
                    str(exc) if isinstance(exc, PolicyError) else f"{type(exc).__name__}: {exc}"
                )
                self.report_failure(message)
                if isinstance(exc, PolicyError):
                    raise
                raise PolicyError(message) from exc
            self._active = _Generation(
                bundle=bundle,
                modules=modules,
                pool=pool,
                shape=shape,
                cache=LRUCache(self.config.cache_size),
                cacheable=self.config.cache_size > 0 and shape.deterministic,
                activated_at=time.time(),
                quarantine=quarantine,
            )
            self.last_reload_at = time.time()
            self.last_error = None
            self.last_error_at = None
            self.metrics.reload("success")
            self.metrics.active_revision(
                current.bundle.revision if current else None, bundle.revision
            )
            self._pool_changed()
            log.info(
                "policy revision %s active (from %s; %d workers)",
                bundle.revision,
                bundle.source,
                self.config.workers,
            )
            if current is not None:
                # The old pool finishes its in-flight requests in the background.
                self._retiring.spawn(current.pool.close(), name="close")
            return True

    def _pool_changed(self) -> None:
        gen = self._active
        self.metrics.workers_alive(gen.pool.alive if gen is not None else 0)

    async def evaluate(
        self, input_doc: Mapping[str, Any], *, query: str | None = None
    ) -> PolicyResult:
        """Evaluate the active policy for one input, within ``policy.deadline_ms`` of evaluation.

        Never raises for policy trouble: errors come back as a result with
        ``error`` set to one of :data:`ERROR_CODES`. Raises
        :class:`~warden.errors.Overloaded` when no worker was free within the
        queue bound: being busy is not the policy's answer, so the caller
        must push back rather than decide.

        ``query``: one of the engine's extra ``entrypoints`` instead of
        ``policy.query``; its value comes back as is (:func:`interpret_value`).
        """
        started = time.perf_counter_ns()
        entry = self._entry(query)
        if entry is None:
            detail = f"the query {query!r} is not an entrypoint of this engine"
            return self._finish(
                PolicyResult(effect=None, error="policy_not_ready", detail=detail), started
            )
        salt, prefix = entry
        for _attempt in range(2):
            gen = self._active
            if gen is None:
                return self._finish(
                    PolicyResult(
                        effect=None, error="policy_not_ready", detail=self.last_error or "no bundle"
                    ),
                    started,
                )
            try:
                key, whole, early = self._before_dispatch(gen, input_doc, salt)
            except TypeError as exc:
                return self._finish(self._bad_input(gen, exc), started)
            if early is not None:
                return self._finish(early, started)
            try:
                # For a whole-input policy the key was made of the input as JSON already.
                body = (
                    whole
                    if gen.shape.whole_input
                    # Sorted as the whole input is: rego-cpp walks an object in the order its
                    # keys came, so a comprehension's "first" must not be the agent's choice.
                    else orjson.dumps(project(gen.shape, input_doc), option=orjson.OPT_SORT_KEYS)
                )
            except TypeError as exc:
                return self._finish(self._bad_input(gen, exc), started)
            revision = gen.bundle.revision
            try:
                reply = await gen.pool.evaluate(body, tag=key, prefix=prefix)
            except _PoolClosed:
                continue  # a new revision was swapped in while we waited: ask it
            except (_QueueTimeout, _Starved) as exc:
                raise self._overloaded(exc) from None
            except _EvalTimeout:
                return self._finish(self._timeout(revision), started)
            except _WorkerCrash as exc:
                return self._finish(
                    PolicyResult(
                        effect=None,
                        revision=revision,
                        error="policy_crash",
                        detail=f"the policy worker died during evaluation ({exc})",
                        input_fault=True,
                    ),
                    started,
                )
            except _NoWorker:
                return self._finish(
                    PolicyResult(
                        effect=None,
                        revision=revision,
                        error="policy_crash",
                        detail="no policy worker is running; replacements are starting",
                    ),
                    started,
                )
            result = self._read_reply(reply, gen, entry=bool(salt))
            if gen.cacheable and _cacheable(result):
                gen.cache.put(key, result)
            return self._finish(result, started)
        return self._finish(  # pragma: no cover - needs two swaps within one call
            PolicyResult(effect=None, error="policy_not_ready", detail="revision changed twice"),
            started,
        )

    async def evaluate_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[PolicyResult]:
        """Evaluate the active ``policy.query`` for many inputs: one request to one worker.

        For callers that do not wait on the answers (the challenger): one
        frame out and one back for the whole batch, so the event loop's cost
        per input is a fraction of :meth:`evaluate`'s. Results come in the
        order of ``docs``, each as :meth:`evaluate` would give it, except:

        * the decision cache and the quarantine are used as :meth:`evaluate`
          uses them: a hit costs a key on the event loop and saves the
          worker an evaluation (live traffic repeats, e.g. a conversation's
          model-call decisions). Inputs that share a key (a deterministic
          policy cannot tell them apart) are evaluated once per batch;
        * the worker's budget is ``policy.deadline_ms`` per input, for the
          batch as a whole. A batch killed for using it up, or whose worker
          crashed, is asked again one input at a time, each with its own
          budget: only an input that fails alone gets ``policy_timeout`` or
          ``policy_crash`` (and is quarantined), the others their results. An
          input the engine refused (not JSON, rejected by the worker) gets
          ``policy_error`` alone;
        * ``elapsed_us`` is the whole batch's time.

        Raises :class:`~warden.errors.Overloaded` as :meth:`evaluate` does.
        """
        started = time.perf_counter_ns()
        count = len(docs)
        if not count:
            return []
        for _attempt in range(2):
            gen = self._active
            if gen is None:
                result = PolicyResult(
                    effect=None, error="policy_not_ready", detail=self.last_error or "no bundle"
                )
                return self._finish_batch([result] * count, started)
            results: list[PolicyResult | None] = [None] * count
            parts, sent, keys = self._encode_batch(gen, docs, results)
            if parts:
                answers = await self._batch_answers(gen, parts, keys)
                if answers is None:
                    continue  # a new revision was swapped in while we waited: ask it
                for i, slot in sent:
                    results[i] = answers[slot]
            return self._finish_batch([r for r in results if r is not None], started)
        result = PolicyResult(  # pragma: no cover - needs two swaps within one call
            effect=None, error="policy_not_ready", detail="revision changed twice"
        )
        return self._finish_batch([result] * count, started)  # pragma: no cover

    def _encode_batch(
        self,
        gen: _Generation,
        docs: Sequence[Mapping[str, Any]],
        results: list[PolicyResult | None],
    ) -> tuple[list[bytes], list[tuple[int, int]], list[bytes]]:
        """The inputs to send as the request's JSON parts, and where each answer will be.

        Returns ``parts``, ``(position in docs, position in parts)`` pairs and
        each part's cache key. An input answered from the cache or the
        quarantine, or that cannot be encoded, gets its result in ``results``
        now. Inputs with the same key are sent once.
        """
        parts: list[bytes] = []
        sent: list[tuple[int, int]] = []
        keys: list[bytes] = []
        seen: dict[bytes, int] = {}
        shape, whole = gen.shape, gen.shape.whole_input
        dumps, sorted_keys = orjson.dumps, orjson.OPT_SORT_KEYS
        for i, doc in enumerate(docs):
            try:
                key, whole_json, early = self._before_dispatch(gen, doc)
                if early is not None:
                    results[i] = early
                    continue
                slot = seen.get(key, -1) if shape.deterministic else -1
                if slot < 0:
                    # For a whole-input policy the key was made of the input as JSON already.
                    part = whole_json if whole else dumps(project(shape, doc), option=sorted_keys)
                    slot = len(parts)
                    parts.append(part)
                    keys.append(key)
                    seen[key] = slot
            except TypeError as exc:
                results[i] = self._bad_input(gen, exc)
                continue
            sent.append((i, slot))
        return parts, sent, keys

    async def _batch_answers(
        self, gen: _Generation, parts: list[bytes], keys: list[bytes]
    ) -> list[PolicyResult] | None:
        """One worker's answers to ``parts``, in order; ``None`` if the revision was replaced."""
        body = b"[" + b",".join(parts) + b"]"
        try:
            reply = await gen.pool.evaluate(
                body, prefix=MSG_BATCH, budget_s=self._deadline_s * len(parts)
            )
        except _PoolClosed:
            return None
        except (_QueueTimeout, _Starved) as exc:
            raise self._overloaded(exc) from None
        except (_EvalTimeout, _WorkerCrash) as exc:
            if len(parts) == 1:
                return [self._batch_failed(exc, gen.bundle.revision, 1)]
            # Which input looped or crashed the worker is not known: ask one at
            # a time, so only that one fails (and is quarantined).
            return await self._one_by_one(gen, parts, keys)
        except _NoWorker as exc:
            return [self._batch_failed(exc, gen.bundle.revision, len(parts))] * len(parts)
        answers = self._read_batch_reply(reply, gen, len(parts))
        if gen.cacheable:
            for key, answer in zip(keys, answers, strict=True):
                if _cacheable(answer):
                    gen.cache.put(key, answer)
        return answers

    async def _one_by_one(
        self, gen: _Generation, parts: list[bytes], keys: list[bytes]
    ) -> list[PolicyResult]:
        """A failed batch's inputs evaluated singly, each with its own budget, in order.

        An input that times out or crashes its worker again is blamed and
        quarantined as in :meth:`evaluate`; the others get their results.
        """
        revision = gen.bundle.revision
        answers: list[PolicyResult] = []
        for part, key in zip(parts, keys, strict=True):
            try:
                # The batch's worker was killed: its replacement may still be starting.
                await gen.pool.until_alive(self._queue_timeout_s)
                reply = await gen.pool.evaluate(part, tag=key, prefix=MSG_EVAL)
            except (_QueueTimeout, _Starved) as exc:
                raise self._overloaded(exc) from None
            except (_EvalTimeout, _WorkerCrash, _NoWorker, _PoolClosed) as exc:
                if isinstance(exc, _PoolClosed):
                    exc = _NoWorker()  # the revision was replaced meanwhile
                answers.append(self._batch_failed(exc, revision, 1))
                continue
            answer = self._read_reply(reply, gen, entry=False)
            if gen.cacheable and _cacheable(answer):
                gen.cache.put(key, answer)
            answers.append(answer)
        return answers

    def _batch_failed(self, exc: Exception, revision: str, size: int) -> PolicyResult:
        """Every input's result when a batch's worker was killed or died, or none was running."""
        if isinstance(exc, _EvalTimeout):
            return _evolve(
                self._timeout(revision),
                detail=f"a batch of {size} inputs got no result within "
                f"{self.config.deadline_ms:g} ms of evaluation each",
            )
        if isinstance(exc, _NoWorker):
            detail = "no policy worker is running; replacements are starting"
        else:
            detail = f"the policy worker died during a batch evaluation ({exc})"
        return PolicyResult(
            effect=None,
            revision=revision,
            error="policy_crash",
            detail=detail,
            input_fault=isinstance(exc, _WorkerCrash),
        )

    @staticmethod
    def _read_batch_reply(reply: bytes, gen: _Generation, count: int) -> list[PolicyResult]:
        """The results of a ``b"S"`` reply, in order; its error for all when it is not one."""
        revision = gen.bundle.revision
        kind = reply[:1]
        if kind == MSG_BATCH_RESULT:
            try:
                entries = orjson.loads(reply[1:])
            except orjson.JSONDecodeError:
                entries = None
            if isinstance(entries, list) and len(entries) == count:
                modules = gen.modules
                return [_stamped(_read_batch_entry(e, modules), revision) for e in entries]
            detail = "unreadable batch reply from worker"
        elif kind == MSG_ERROR:
            detail = reply[1:].decode("utf-8", errors="replace")
        else:
            detail = "unknown reply from worker"
        return [_stamped(_worker_error(detail), revision)] * count

    def _finish_batch(self, results: list[PolicyResult], started: int) -> list[PolicyResult]:
        """:meth:`_finish` for a batch: one log line for its errors, each input's share timed."""
        elapsed_ns = time.perf_counter_ns() - started
        share_s = elapsed_ns / 1e9 / len(results)
        elapsed_us = elapsed_ns // 1000
        errors: dict[str, int] = {}
        out = []
        for result in results:
            if result.error is not None:
                label = "error"
                errors[result.error] = errors.get(result.error, 0) + 1
            elif result.effect is None:
                label = "undefined"
            else:
                label = result.effect.value
            self.metrics.evaluation(label, share_s)
            out.append(_evolve(result, elapsed_us=elapsed_us))
        if errors:
            first = next(r for r in results if r.error is not None)
            log.warning(
                "policy evaluation failed for %d of a batch of %d (%s); first: %s",
                sum(errors.values()),
                len(results),
                ", ".join(f"{code}: {n}" for code, n in errors.items()),
                first.detail,
            )
        return out

    def _overloaded(self, exc: Exception) -> Overloaded:
        """The push-back for a request no worker took, or answered, in time."""
        self.metrics.overloaded()
        if isinstance(exc, _Stalled):
            why = "its worker stopped making progress and is being replaced"
        else:
            why = (
                "its worker got too little CPU to answer"
                if isinstance(exc, _Starved)
                else "no worker was free"
            ) + f" within {self._queue_timeout_s:g} s"
        return Overloaded(
            f"the policy engine is busy: {why}; retry shortly", retry_after_s=_RETRY_AFTER_S
        )

    def _entry(self, query: str | None) -> tuple[bytes, bytes] | None:
        """The cache-key salt and request prefix for ``query``; ``None`` if it is not compiled."""
        if query is None or query == self.config.query:
            return b"", MSG_EVAL
        index = self._entry_index.get(query)
        if index is None:
            return None
        # Keys are JSON otherwise, which never starts with NUL: no entry shares a key.
        return b"\x00" + bytes([index]), MSG_EVAL_AT + bytes([index])

    def _before_dispatch(
        self, gen: _Generation, input_doc: Mapping[str, Any], salt: bytes = b""
    ) -> tuple[bytes, bytes, PolicyResult | None]:
        """The cache key (``salt`` first: which query), the JSON it was made of (a
        whole-input policy's input), and a result if no worker is needed."""
        made_of = key = cache_key(gen.shape, input_doc)
        if len(key) > _KEY_DIGEST_OVER:
            # The arguments are the agent's: kept whole, 10,000 keys of 8 MiB each would
            # hold the sidecar's memory. A digest cannot be told from another input's
            # (no 32-byte BLAKE2b collision is known), and starts with 1: no JSON does.
            key = b"\x01" + hashlib.blake2b(key, digest_size=32).digest()
        if salt:
            key = salt + key
        code = gen.quarantine.get(key) if gen.quarantine else None
        if code is not None:
            detail = "this input recently made the policy fail; it is not retried for a while"
            return (
                key,
                made_of,
                PolicyResult(
                    effect=None,
                    revision=gen.bundle.revision,
                    error=code,
                    detail=detail,
                    input_fault=True,
                ),
            )
        if not gen.cacheable:
            self.metrics.cache("bypass")
            return key, made_of, None
        hit = gen.cache.get(key)
        if hit is not None:
            self.metrics.cache("hit")
            return key, made_of, _evolve(hit, cached=True)
        self.metrics.cache("miss")
        return key, made_of, None

    def _timeout(self, revision: str) -> PolicyResult:
        # The input ran for the whole budget: it may have caused that itself.
        return PolicyResult(
            effect=None,
            revision=revision,
            error="policy_timeout",
            detail=f"no result within {self.config.deadline_ms:g} ms of evaluation",
            input_fault=True,
        )

    @staticmethod
    def _bad_input(gen: _Generation, exc: Exception) -> PolicyResult:
        return PolicyResult(
            effect=None,
            revision=gen.bundle.revision,
            error="policy_error",
            detail=f"the input is not JSON: {exc}",
            input_fault=True,
        )

    @staticmethod
    def _read_reply(reply: bytes, gen: _Generation, *, entry: bool = False) -> PolicyResult:
        kind, body = reply[:1], reply[1:].decode("utf-8", errors="replace")
        if kind == MSG_RESULT:
            read = interpret_value if entry else interpret_output
            result = read(body, gen.modules)
        elif kind == MSG_ERROR:
            result = _worker_error(body)
        else:
            result = _worker_error("unknown reply from worker")
        return _stamped(result, gen.bundle.revision)

    def _finish(self, result: PolicyResult, started: int) -> PolicyResult:
        elapsed_ns = time.perf_counter_ns() - started
        if result.error is not None:
            label = "error"
            log.warning("policy evaluation failed (%s): %s", result.error, result.detail)
        elif result.effect is None:
            label = "undefined"
        else:
            label = result.effect.value
        self.metrics.evaluation(label, elapsed_ns / 1e9)
        return _evolve(result, elapsed_us=elapsed_ns // 1000)

    async def close(self) -> None:
        """Stop polling for bundles and stop every worker."""
        self._closed = True
        if self._activator is not None:
            await self._activator.stop()
        async with self._lock:
            gen, self._active = self._active, None
        if gen is not None:
            await gen.pool.close()
            self.metrics.active_revision(gen.bundle.revision, None)
        await self._retiring.drain()
        self.metrics.workers_alive(0)
