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
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from warden.policy.rego import Evaluator as RegoEvaluator

__all__ = [
    "MSG_ERROR",
    "MSG_EVAL",
    "MSG_QUIT",
    "MSG_RESULT",
    "Evaluator",
    "frame",
    "main",
    "read_frame",
    "worker_main",
]

MSG_EVAL = b"E"
MSG_RESULT = b"R"
MSG_ERROR = b"X"
MSG_QUIT = b"Q"
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

        compiled = compile_bundle([Module(p, s) for p, s in modules], data, query, label=label)
        self._engine: RegoEvaluator = rego.Evaluator(compiled)

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
        elif kind == MSG_QUIT:
            return
        else:
            send(frame(MSG_ERROR + b"unknown request"))


def main(argv: list[str] | None = None) -> int:
    """``python -m warden.policy.worker <fd>``: serve on an inherited socket."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m warden.policy.worker <socket fd>", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    try:
        worker_main(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
