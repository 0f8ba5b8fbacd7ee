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

import ctypes
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import orjson

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
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_HEADER = struct.Struct(">I")


class _Native:
    """Direct ctypes bindings for the per-request calls.

    regopy's Python wrappers allocate a buffer per string and re-check every
    return code; binding the few functions we call per request directly
    roughly halves the cost of building the input document.
    """

    def __init__(self) -> None:
        from regopy import rego_shared  # noqa: PLC0415 - only workers load the engine

        lib = ctypes.CDLL(rego_shared.rego._name)
        vp, u32 = ctypes.c_void_p, ctypes.c_uint32

        def bind(name: str, res: Any, args: list[Any]) -> Callable[..., Any]:
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
            return fn  # type: ignore[no-any-return]

        self.new_input = bind("regoNewInput", vp, [])
        self.free_input = bind("regoFreeInput", None, [vp])
        self.input_int = bind("regoInputInt", u32, [vp, ctypes.c_int64])
        self.input_float = bind("regoInputFloat", u32, [vp, ctypes.c_double])
        self.input_str = bind("regoInputString", u32, [vp, ctypes.c_char_p])
        self.input_bool = bind("regoInputBoolean", u32, [vp, ctypes.c_bool])
        self.input_null = bind("regoInputNull", u32, [vp])
        self.input_item = bind("regoInputObjectItem", u32, [vp])
        self.input_object = bind("regoInputObject", u32, [vp, u32])
        self.input_array = bind("regoInputArray", u32, [vp, u32])
        self.set_input = bind("regoSetInput", u32, [vp, vp])
        self.bundle_query = bind("regoBundleQuery", vp, [vp, vp])
        self.output_size = bind("regoOutputJSONSize", u32, [vp])
        self.output_json = bind("regoOutputJSON", u32, [vp, ctypes.c_char_p, u32])
        self.output_ok = bind("regoOutputOk", ctypes.c_bool, [vp])
        self.free_output = bind("regoFreeOutput", None, [vp])
        self.output_node = bind("regoOutputNode", vp, [vp])

    def add(self, handle: int, value: Any) -> None:
        """Push one JSON value onto regopy's input builder (a stack machine)."""
        kind = type(value)
        if kind is str:
            self.input_str(handle, value.encode())
        elif kind is dict:
            for key, item in value.items():
                self.input_str(handle, key.encode())
                self.add(handle, item)
                self.input_item(handle)
            self.input_object(handle, len(value))
        elif kind is bool:
            self.input_bool(handle, value)
        elif kind is int:
            if _INT64_MIN <= value <= _INT64_MAX:
                self.input_int(handle, value)
            else:
                self.input_float(handle, float(value))
        elif kind is float:
            self.input_float(handle, value)
        elif value is None:
            self.input_null(handle)
        elif kind is list:
            for item in value:
                self.add(handle, item)
            self.input_array(handle, len(value))
        else:  # pragma: no cover - orjson only yields the kinds above
            raise TypeError(f"cannot pass a {kind.__name__} to the policy")


class Evaluator:
    """A compiled bundle and an interpreter to run it; used inside a worker.

    Also usable in-process (the benchmark measures it bare), but the proxy
    only ever runs it in a worker process.
    """

    def __init__(
        self, modules: list[tuple[str, str]], data: Any, query: str, label: str = ""
    ) -> None:
        import regopy  # noqa: PLC0415

        from warden.policy.bundle import Module, compile_bundle  # noqa: PLC0415

        mods = [Module(p, s) for p, s in modules]
        builder, self._bundle = compile_bundle(mods, data, query, label=label)
        self._builder = builder  # keeps the compiled bundle's owner alive
        self._interp = regopy.Interpreter()
        self._interp.log_level = regopy.LogLevel.NONE
        self._native = _Native()

    def evaluate_json(self, body: bytes) -> str:
        """Evaluate for an input given as JSON; return regopy's output text."""
        return self.evaluate(orjson.loads(body))

    def evaluate(self, value: Any) -> str:
        """Evaluate for an input document; return regopy's output text.

        Never calls ``Output.expressions()``: on an undefined result that
        aborts the process. Errors come back as ``<error>`` followed by the
        error s-expression, for the parent to describe.
        """
        native = self._native
        handle = native.new_input()
        try:
            native.add(handle, value)
            if native.set_input(self._interp._impl, handle) != 0:
                raise ValueError("the engine refused the input document")
        finally:
            native.free_input(handle)
        output = native.bundle_query(self._interp._impl, self._bundle._impl)
        if not output:
            from regopy.rego_shared import rego_get_error  # noqa: PLC0415

            return "<error>" + str(rego_get_error(self._interp._impl))
        try:
            size = native.output_size(output)
            buf = ctypes.create_string_buffer(size)
            native.output_json(output, buf, size)
            text = buf.value.decode("utf-8", errors="replace")
            if not native.output_ok(output):
                text = "<error>" + _output_errors(native.output_node(output))
            return text
        finally:
            native.free_output(output)


def _output_errors(node: Any) -> str:
    from regopy.rego_shared import rego_node_get, rego_node_json, rego_node_size  # noqa: PLC0415

    if not node:
        return ""
    return "\n".join(rego_node_json(rego_node_get(node, i)) for i in range(rego_node_size(node)))


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
