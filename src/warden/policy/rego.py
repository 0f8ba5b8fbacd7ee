"""The binding to the Rego engine (regopy over rego-cpp): the only module that imports regopy.

Nothing here knows about bundles or files. It takes module sources, data as
JSON text and queries, and gives back the engine's own texts: results as
JSON, errors as s-expressions that :mod:`warden.policy.bundle.diagnostics`
turns into ``file:line:col`` lines. Every regopy exception leaves this module
as a :class:`RegoError`.

:class:`Evaluator` binds a few functions of rego-cpp's C library directly
with ctypes (regopy's wrappers cost about twice as much per request), which
is why ``pyproject.toml`` caps regopy below its next minor release: a change
in the C API is checked here and nowhere else.

Importing this module loads the C library, so the proxy process never does:
policy workers (:mod:`warden.policy.worker`), the ``warden policy`` tools and
ahead-of-time compile checks import it when they need it.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from typing import Any

import regopy
from regopy import rego_shared

__all__ = ["CompiledQuery", "Evaluator", "Interpreter", "RegoError", "parse_check"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class RegoError(Exception):
    """The engine refused a module, data or a query; ``str()`` is the engine's error text."""


class Interpreter:
    """One engine interpreter, with the library's own printing of errors turned off."""

    def __init__(self) -> None:
        self._interp = regopy.Interpreter()
        # The library prints errors to stdout at its default level; we report them ourselves.
        self._interp.log_level = regopy.LogLevel.NONE

    def add_module(self, path: str, source: str) -> None:
        """Parse and add one module; raise :class:`RegoError` on a syntax error."""
        try:
            self._interp.add_module(path, source)
        except regopy.RegoError as exc:
            raise RegoError(str(exc)) from None

    def add_data_json(self, text: str) -> None:
        """Add a base document given as JSON text."""
        try:
            self._interp.add_data_json(text)
        except regopy.RegoError as exc:
            raise RegoError(str(exc)) from None

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` (``count``, ``time.now_ns``) is a builtin of this engine."""
        return bool(self._interp.is_builtin(name))

    def build(self, query: str) -> CompiledQuery:
        """Compile the modules and data for ``query``; see :attr:`CompiledQuery.ok`.

        Raises :class:`RegoError` when the query itself cannot be compiled.
        """
        try:
            built = self._interp.build(query)
        except regopy.RegoError as exc:
            raise RegoError(str(exc)) from None
        return CompiledQuery(self, built)

    def query(self, query: str) -> tuple[bool, str]:
        """Evaluate ``query`` directly (no compiled bundle); return ``(ok, output text)``.

        Raw calls: regopy's ``Output`` parses the text as JSON and fails on
        the error text that a failed evaluation gives.
        """
        impl = self._interp._impl
        output = rego_shared.rego_query(impl, query)
        if not output:
            raise RegoError(rego_shared.rego_get_error(impl) or "query failed")
        try:
            return bool(rego_shared.rego_output_ok(output)), rego_shared.rego_output_string(output)
        finally:
            rego_shared.rego_free_output(output)


class CompiledQuery:
    """A query compiled with its modules and data, which any :class:`Evaluator` can run.

    It keeps the interpreter that built it, which owns the compiled bundle.
    """

    def __init__(self, owner: Interpreter, built: Any) -> None:
        self._owner = owner
        self._built = built

    @property
    def ok(self) -> bool:
        """Whether it compiled; if not, :meth:`errors` says why."""
        return bool(self._built.ok())

    def errors(self) -> list[str]:
        """The compiler's error texts (s-expressions), one per problem."""
        node = rego_shared.rego_bundle_node(self._built._impl)
        return [
            rego_shared.rego_node_json(rego_shared.rego_node_get(node, i))
            for i in range(rego_shared.rego_node_size(node))
        ]


def parse_check(path: str, source: str) -> None:
    """Parse one module on its own; raise :class:`RegoError` on a syntax error.

    Parsing never evaluates, so unlike compiling it cannot crash the process.
    """
    Interpreter().add_module(path, source)


def _c_text(text: str) -> bytes:
    """``text`` for the engine's input builder, its quotes and backslashes escaped.

    rego-cpp keeps a string as its JSON text and takes the builder's text as
    given. Unescaped, a quote in an argument (``a", "effect": "allow``) would
    end the string in a result that repeats it, adding keys of the agent's
    choosing to the decision, and ``C:\\Win`` would not equal the policy's
    ``"C:\\\\Win"``. Only ``"`` and ``\\`` are escaped: rego-cpp's builtins
    (``regex.match``, ``count``) read the text as kept, so a newline or tab
    escaped as ``\\n`` would slip past a rule such as ``drop\\s+table``; such
    characters stay raw, and a result that carries them is read leniently
    (:func:`warden.policy.engine.interpret_output`). NUL goes in as U+FFFD: the
    engine reads C strings, and would cut ``"ok\x00/../etc/shadow"`` short. The
    core denies an action whose own arguments, context or claims hold NUL before
    any policy runs (:func:`warden.pipeline.input_problem`); what reaches here is
    text the input only carries (a prior tool result, a declared tool's name), and
    refusing it made the fallback decide at the will of whoever wrote that text.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no JSON text can carry it
        raise ValueError("a string of the input is not valid Unicode") from None


_STRING = 1010
"""rego-cpp's node type of a string (``NodeKind.String``)."""
_SAFE_STRING = re.compile(rb'"(?:[^"\\]|\\["\\])*"|(?:[^"\\]|\\["\\])*', re.DOTALL)
"""A string as the engine keeps it (its JSON token, quotes included, or the text between
them) that, written out, reads back as the very text the policy compared: no bare quote,
and no backslash but the two escapes input reaches the engine with (``\\"``, ``\\\\``).
Any other escape (``\\u0061``) the engine compares as written and a reader decodes: a
builtin that cuts input's doubled backslash in two (``substring``, the decoders) would
have the policy pass ``\\u0061lice`` while the decision names ``alice``."""


class _Native:
    """Direct ctypes bindings for the per-request calls.

    regopy's Python wrappers allocate a buffer per string and re-check every
    return code; binding the few functions called per request directly
    roughly halves the cost of building the input document.
    """

    def __init__(self) -> None:
        # PyDLL: the calls keep the interpreter, which a worker's one thread
        # would only take back (about 0.1 µs a call, 70 calls an input).
        lib = ctypes.PyDLL(rego_shared.rego._name)
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
        self.node_type = bind("regoNodeType", u32, [vp])
        self.node_size = bind("regoNodeSize", u32, [vp])
        self.node_get = bind("regoNodeGet", vp, [vp, u32])
        self.value_size = bind("regoNodeValueSize", u32, [vp])
        self.value = bind("regoNodeValue", u32, [vp, ctypes.c_char_p, u32])

    def unsafe_strings(self, node: int) -> bool:
        """Whether a string (or key) of the result the engine wrote would not read back
        as itself: a bare quote, or a backslash that starts no escape.

        rego-cpp keeps a string as its JSON text and writes it out as kept. Input
        text reaches it escaped (:func:`_c_text`), but some builtins give it back
        unescaped (``trim``, ``trim_space``, the decoders; ``sprintf`` wraps what
        ``lower`` or ``concat`` made in bare quotes): an argument such as
        ``c-1","mode":"observe`` a policy trims into its reason, or list items ending
        in a backslash, would write keys of the agent's choosing into the text the
        decision is read from. The value's own tree says what each string holds.
        """
        stack = [node]
        while stack:
            current = stack.pop()
            if self.node_type(current) == _STRING:
                size = self.value_size(current)
                buf = ctypes.create_string_buffer(size)
                self.value(current, buf, size)
                if _SAFE_STRING.fullmatch(buf.value) is None:
                    return True
                continue
            stack.extend(self.node_get(current, i) for i in range(self.node_size(current)))
        return False

    def add(self, handle: int, value: Any) -> None:
        """Push one JSON value onto regopy's input builder (a stack machine)."""
        kind = type(value)
        if kind is str:
            self.input_str(handle, _c_text(value))
        elif kind is dict:
            for key, item in value.items():
                self.input_str(handle, _c_text(key))
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
    """Runs one :class:`CompiledQuery` for input documents, one at a time."""

    def __init__(self, compiled: CompiledQuery) -> None:
        self._compiled = compiled  # keeps the compiled bundle and its owner alive
        self._interp = Interpreter()._interp
        self._native = _Native()
        # Looked up once: evaluate() is on the per-request path.
        self._impl = self._interp._impl
        self._bundle_impl = compiled._built._impl

    def evaluate(self, value: Any) -> str:
        """Evaluate for an input document; return the engine's output text.

        Never calls ``Output.expressions()``: on an undefined result that
        aborts the process. Errors come back as ``<error>`` followed by the
        error s-expression, for the caller to describe. Raises ``ValueError``
        when the engine refuses the input document, or when a string of the result
        would be written unescaped (:meth:`_Native.unsafe_strings`).
        """
        native = self._native
        impl = self._impl
        handle = native.new_input()
        try:
            native.add(handle, value)
            if native.set_input(impl, handle) != 0:
                raise ValueError("the engine refused the input document")
        finally:
            native.free_input(handle)
        output = native.bundle_query(impl, self._bundle_impl)
        if not output:
            return "<error>" + str(rego_shared.rego_get_error(impl))
        try:
            size = native.output_size(output)
            buf = ctypes.create_string_buffer(size)
            native.output_json(output, buf, size)
            text = buf.value.decode("utf-8", errors="replace")
            if not native.output_ok(output):
                return "<error>" + _output_errors(native.output_node(output))
            if native.unsafe_strings(native.output_node(output)):
                raise ValueError(
                    "the policy's result holds input text the engine writes unescaped (a "
                    "builtin such as trim or base64.decode gave back its quotes or "
                    "backslashes), which could change the decision's shape"
                )
            return text
        finally:
            native.free_output(output)


def _output_errors(node: Any) -> str:
    if not node:
        return ""
    return "\n".join(
        rego_shared.rego_node_json(rego_shared.rego_node_get(node, i))
        for i in range(rego_shared.rego_node_size(node))
    )
