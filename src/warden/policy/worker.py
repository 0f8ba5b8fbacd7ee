"""The policy worker process: one regopy interpreter, one compiled bundle.

A worker is a fresh interpreter (``python -m warden.policy.worker <fd>``,
spawned, never forked: the proxy has threads and an event loop), compiles the
bundle it is given, says so, then answers one evaluation at a time over a Unix
socket until it is told to stop or the socket closes. If the policy crashes
the interpreter or loops, only this process dies or is killed; see
:mod:`warden.policy.engine`.

Wire format: frames of a 4-byte big-endian length then the body:

* parent → worker at start: ``{"modules": [[path, source], ...], "data": {...},
  "query": "data.warden.decision", "label": "..."}``
* worker → parent: ``{"ok": true, "pid": 123}`` or ``{"ok": false, "error": "..."}``
* parent → worker: ``b"E" + <input JSON>``; worker → parent: ``b"R" + <regopy
  output text>`` or ``b"X" + <error message>``
* parent → worker: ``b"N" + <index byte> + <input JSON>``: evaluate the extra
  query ``entrypoints[index - 1]`` of the init frame's optional
  ``"entrypoints": [...]`` list (e.g. Envoy ext_authz's
  ``data.envoy.authz.allow``); a query that failed to compile answers
  ``b"X"`` with the compiler's message;
* parent → worker: ``b"B" + <JSON array of input documents>``: evaluate each
  in order; worker → parent: one ``b"S" + <JSON array>`` with one entry per
  input: regopy's output text (a string), or ``{"error": "..."}`` for an
  input the engine rejected. A body that is not a JSON array answers
  ``b"X"``. Used by the challenger (:mod:`warden.policy.challenger`), whose
  inputs are not waited for: one request and one reply for many inputs;
* parent → worker: ``b"Q"``: exit.

The worker sends regopy's output text untouched (``undefined``,
``{"expressions":[...]}`` or an error s-expression); the parent parses it, so
the worker does as little as possible per request.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from warden.ops.runtime import undumpable

if TYPE_CHECKING:
    from warden.policy.rego import Evaluator as RegoEvaluator

__all__ = [
    "ENTRY_VARIABLE",
    "MSG_BATCH",
    "MSG_BATCH_RESULT",
    "MSG_ERROR",
    "MSG_EVAL",
    "MSG_EVAL_AT",
    "MSG_QUIT",
    "MSG_RESULT",
    "Evaluator",
    "frame",
    "main",
    "read_frame",
    "set_stack",
    "stack_command",
    "worker_main",
]

MSG_EVAL = b"E"
MSG_EVAL_AT = b"N"
ENTRY_VARIABLE = "result"
"""An extra entrypoint ``q`` is compiled as ``result = q``; its value is that binding."""
MSG_RESULT = b"R"
MSG_ERROR = b"X"
MSG_QUIT = b"Q"
MSG_BATCH = b"B"
MSG_BATCH_RESULT = b"S"
_HEADER = struct.Struct(">I")


class Evaluator:
    """A compiled bundle and an interpreter to run it; used inside a worker.

    Also usable in-process (the benchmark measures it bare, the authoring
    tools run it in their own child), but the proxy only ever runs it in a
    worker process.
    """

    def __init__(
        self, modules: list[tuple[str, str]], data: Any, query: str, label: str = ""
    ) -> None:
        # Loads the engine: only worker processes and tools construct an Evaluator.
        from warden.policy import rego  # noqa: PLC0415
        from warden.policy.bundle.compile import compile_bundle  # noqa: PLC0415
        from warden.policy.bundle.model import Module  # noqa: PLC0415

        self._modules = [Module(p, s) for p, s in modules]
        self._data = data
        self._label = label
        compiled = compile_bundle(self._modules, data, query, label=label)
        self._engine: RegoEvaluator = rego.Evaluator(compiled)
        self._entries: list[RegoEvaluator | str] = []

    def add_entrypoint(self, query: str) -> None:
        """Compile one more query of the same bundle; a failure is kept as its answer."""
        from warden.policy import rego  # noqa: PLC0415
        from warden.policy.bundle.compile import compile_bundle  # noqa: PLC0415
        from warden.policy.bundle.model import BundleError  # noqa: PLC0415

        try:
            # Bound to a variable: a query that is just ``data.x`` is undefined when x is false.
            bound = f"{ENTRY_VARIABLE} = {query}"
            compiled = compile_bundle(self._modules, self._data, bound, label=self._label)
        except BundleError as exc:
            self._entries.append(f"query {query!r} does not compile: {exc}")
            return
        self._entries.append(rego.Evaluator(compiled))

    def evaluate_entry_json(self, index: int, body: bytes) -> str | None:
        """Like :meth:`evaluate_json` for extra query ``index`` (from 1); ``None`` if unknown.

        Raises ``LookupError`` with the compiler's message if it did not compile.
        """
        if not 1 <= index <= len(self._entries):
            return None
        entry = self._entries[index - 1]
        if isinstance(entry, str):
            raise LookupError(entry)
        return entry.evaluate(orjson.loads(body))

    def evaluate_json(self, body: bytes) -> str:
        """Evaluate for an input given as JSON; return regopy's output text."""
        return self.evaluate(orjson.loads(body))

    def evaluate(self, value: Any) -> str:
        """Evaluate for an input document; return regopy's output text.

        Never calls ``Output.expressions()``: on an undefined result that
        aborts the process. Errors come back as ``<error>`` followed by the
        error s-expression, for the parent to describe.
        """
        return self._engine.evaluate(value)


def read_frame(sock: socket.socket) -> bytes | None:
    """Read one length-prefixed frame from a blocking socket; ``None`` at EOF."""
    head = _read_exact(sock, 4)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    return _read_exact(sock, size)


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def frame(body: bytes) -> bytes:
    """Prefix a message with its length (4 bytes, big-endian)."""
    return _HEADER.pack(len(body)) + body


def worker_main(sock: socket.socket) -> None:
    """Serve one bundle over ``sock`` until told to quit or the parent goes away."""
    # Nothing should reach the proxy's stdout; errors go back over the socket.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    init = read_frame(sock)
    if init is None:
        return
    try:
        spec = orjson.loads(init)
        evaluator = Evaluator(spec["modules"], spec["data"], spec["query"], spec.get("label", ""))
        for query in spec.get("entrypoints", ()):
            evaluator.add_entrypoint(query)
    except Exception as exc:  # every failure is reported to the parent
        sock.sendall(frame(orjson.dumps({"ok": False, "error": str(exc) or type(exc).__name__})))
        return
    sock.sendall(frame(orjson.dumps({"ok": True, "pid": os.getpid()})))
    _serve(sock, evaluator)


def _serve(sock: socket.socket, evaluator: Evaluator) -> None:
    send = sock.sendall
    while True:
        try:
            message = read_frame(sock)
        except OSError:
            return
        if message is None:
            return  # the parent has gone: nothing left to serve
        kind = message[:1]
        if kind == MSG_EVAL:
            try:
                reply = MSG_RESULT + evaluator.evaluate_json(message[1:]).encode()
            except (ValueError, TypeError, RecursionError) as exc:
                reply = MSG_ERROR + f"input rejected: {exc}".encode()
            send(frame(reply))
        elif kind == MSG_EVAL_AT and len(message) >= 2:
            send(frame(_evaluate_entry(evaluator, message[1], message[2:])))
        elif kind == MSG_BATCH:
            send(frame(_evaluate_batch(evaluator, message[1:])))
        elif kind == MSG_QUIT:
            return
        else:
            send(frame(MSG_ERROR + b"unknown request"))


def _evaluate_entry(evaluator: Evaluator, index: int, body: bytes) -> bytes:
    try:
        text = evaluator.evaluate_entry_json(index, body)
    except LookupError as exc:
        return MSG_ERROR + str(exc).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        return MSG_ERROR + f"input rejected: {exc}".encode()
    if text is None:
        return MSG_ERROR + b"unknown query"
    return MSG_RESULT + text.encode()


def _evaluate_batch(evaluator: Evaluator, body: bytes) -> bytes:
    """Evaluate every input of a JSON array in order; one reply entry per input."""
    try:
        docs = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return MSG_ERROR + f"batch rejected: {exc}".encode()
    if not isinstance(docs, list):
        return MSG_ERROR + b"batch rejected: not a JSON array"
    out: list[str | dict[str, str]] = []
    evaluate = evaluator.evaluate
    for doc in docs:
        try:
            out.append(evaluate(doc))
        except (ValueError, TypeError, RecursionError) as exc:
            out.append({"error": f"input rejected: {exc}"})
    return MSG_BATCH_RESULT + orjson.dumps(out)


STACK_BYTES = 512 * 1024 * 1024
"""The stack the engine runs on by default (``policy.worker_stack_mb``). rego-cpp's
regular expressions recurse once per character matched: on Linux's usual 8 MiB,
``^[a-z]+$`` over some 26,000 characters overflowed it and the worker died."""


def _stack_limits(want: int) -> tuple[int, int, int] | None:
    """``(soft, hard, want within hard)`` of RLIMIT_STACK; ``None`` where it is not set."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - not on Linux
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY:
        return None  # no limit: the stack grows as far as memory lets it
    return soft, hard, want if hard == resource.RLIM_INFINITY else min(hard, want)


def stack_command(argv: Sequence[str], want: int = STACK_BYTES) -> list[str]:
    """``argv`` started with a ``want``-byte stack in force from the start, where it can be.

    Through util-linux's ``prlimit``, which sets the limit and executes the
    command: the child then finds its stack set and does not start a second
    time (:func:`set_stack`, some 0.15 s of every worker start, and of every
    replacement a crashed worker waits for). Where ``prlimit`` is missing the
    child sets it itself, as before.
    """
    limits = _stack_limits(want)
    if limits is None or limits[0] == limits[2]:
        return list(argv)
    setting = f"--stack={limits[2]}:"
    tool = _prlimit(setting)
    return list(argv) if tool is None else [tool, setting, "--", *argv]


_PRLIMIT_AT: Final = ("/usr/bin/prlimit", "/bin/prlimit")
_prlimit_works: dict[str, str | None] = {}


def _prlimit(setting: str) -> str | None:
    """util-linux's ``prlimit``, where it is installed and can set ``setting`` here.

    Only from the system's own directories: looked up on ``PATH``, an empty or
    relative entry would run whatever ``prlimit`` the working directory holds,
    handed the worker's socket. Tried once per setting (a seccomp profile or a
    lower hard limit may refuse it): where it fails, the worker sets its own stack.
    """
    if setting not in _prlimit_works:
        import subprocess  # noqa: PLC0415 - the parent's alone: a worker starts lean

        found = next((p for p in _PRLIMIT_AT if os.access(p, os.X_OK)), None)
        if found is not None:
            try:
                tried = subprocess.run(  # noqa: S603 - a fixed path, our own interpreter
                    [found, setting, "--", sys.executable, "-S", "-c", ""],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=10,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                found = None
            else:
                found = found if tried.returncode == 0 else None
        _prlimit_works[setting] = found
    return _prlimit_works[setting]


def set_stack(module: str, args: Sequence[str], want: int = STACK_BYTES) -> None:
    """Run ``python -m module args`` again with a ``want``-byte stack, unless it has that.

    Set, then exec'd: the kernel leaves room below the stack for the limit in
    force when the process starts, so changing it in a running process is not
    enough. Inherited file descriptors (the worker's socket) stay open across
    the exec. A second start (some 0.15 s; :func:`stack_command` avoids it),
    rather than the parent raising its own limit for its children to inherit:
    every other process it starts (a wrapped MCP server) would inherit it too.
    """
    limits = _stack_limits(want)
    if limits is None or limits[0] == limits[2]:
        return
    import resource  # noqa: PLC0415 - present: _stack_limits found it

    resource.setrlimit(resource.RLIMIT_STACK, (limits[2], limits[1]))
    os.execv(sys.executable, [sys.executable, "-m", module, *args])  # noqa: S606 - ourselves again


def main(argv: list[str] | None = None) -> int:
    """``python -m warden.policy.worker <fd> [stack MiB]``: serve on an inherited socket."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or not all(a.isascii() and a.isdigit() for a in args):
        print("usage: python -m warden.policy.worker <socket fd> [stack MiB]", file=sys.stderr)
        return 2
    if argv is None and len(args) == 2:
        set_stack("warden.policy.worker", args, int(args[1]) * 1024 * 1024)
    if argv is None:
        # Its exec made it dumpable again: a wrapped MCP server of the same user could
        # read its environment or answer for it on its socket.
        undumpable()
    sock = socket.socket(fileno=int(args[0]))
    try:
        worker_main(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent went while starting or stopping: no one is left to answer
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
