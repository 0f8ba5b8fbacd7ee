"""The decision cache, keyed only on the parts of ``input`` the policy reads.

:func:`analyse` scans a bundle's modules (strings and comments blanked) for
references to ``input``:

* ``input.action.tool`` or ``input["action"]["tool"]`` -- a static path: the
  key includes the value at that path (the whole subtree under it);
* ``input.action[x]`` -- a dynamic step: the path stops before it, so the key
  holds the whole ``input.action`` subtree;
* ``input`` alone (``object.get(input, ...)``, ``x := input``, ``with input``)
  -- the key is the whole input.

This is a conservative textual scan, not a Rego compiler: it can only make
the key bigger than necessary, never smaller, as long as every read of the
input is spelled with the ``input`` keyword (Rego has no other way to reach
it; ``import input.x as y`` is caught as the path ``x``).

The same paths drive :func:`project`, which sends the worker only those parts
of the input: building the engine's input document is the largest per-call
cost, and it grows with the size of tool arguments the policy never reads.

Policies that call non-deterministic builtins (``time.*``, ``uuid.*``,
``rand.*``, ``opa.runtime``, ``http.send``, ``net.*``, ``io.jwt.decode_verify``)
are never cached.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from warden.policy.bundle import Module

__all__ = ["InputShape", "LRUCache", "analyse", "cache_key", "project"]

_INPUT = re.compile(r"(?<![\w.])input(?![\w])")
_STEP = re.compile(r'\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*"((?:[^"\\]|\\.)*)"\s*\])')
_NONDETERMINISTIC = re.compile(
    r"(?<![\w.])(?:time\.[a-z_0-9]+|uuid\.[a-z_0-9]+|rand\.[a-z_0-9]+|opa\.runtime"
    r"|http\.send|net\.[a-z_0-9]+|io\.jwt\.decode_verify)\s*\("
)
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`')
_MISSING = object()


@dataclass(frozen=True, slots=True)
class InputShape:
    """What a bundle reads of ``input``.

    ``paths`` is ``None`` when the policy reads the whole input; otherwise the
    minimal set of static paths (no path is a prefix of another).
    ``deterministic`` is false when the policy calls a builtin whose result
    changes between calls, so decisions must not be cached.
    """

    paths: tuple[tuple[str, ...], ...] | None
    deterministic: bool

    @property
    def whole_input(self) -> bool:
        """Whether the policy may read any part of the input."""
        return self.paths is None


def _blank(source: str) -> str:
    """Blank out string literals and comments, keeping every offset."""

    def spaces(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    lines = []
    for line in _STRING.sub(spaces, source).split("\n"):
        cut = line.find("#")
        lines.append(line if cut < 0 else line[:cut] + " " * (len(line) - cut))
    return "\n".join(lines)


def _unescape(text: str) -> str:
    try:
        value = orjson.loads(f'"{text}"')
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def _reference_path(source: str, blanked: str, end: int) -> tuple[str, ...]:
    """The static path that follows ``input`` ending at ``end``."""
    path: list[str] = []
    pos = end
    while (m := _STEP.match(source, pos)) is not None:
        # The blanked text has the same dots and brackets outside comments.
        seen = blanked[m.start() : m.end()]
        if m.group(1) is not None:
            if seen != m.group(0):
                break
            path.append(m.group(1))
        else:
            inner = seen.strip()
            if not (inner.startswith("[") and inner.endswith("]")):
                break
            path.append(_unescape(m.group(2)))
        pos = m.end()
    return tuple(path)


def analyse(modules: Sequence[Module]) -> InputShape:
    """Find which input paths the modules read and whether they are deterministic."""
    blanked = [(m.source, _blank(m.source)) for m in modules]
    deterministic = not any(_NONDETERMINISTIC.search(text) for _, text in blanked)
    paths: set[tuple[str, ...]] = set()
    for source, text in blanked:
        for match in _INPUT.finditer(text):
            path = _reference_path(source, text, match.end())
            if not path:
                return InputShape(paths=None, deterministic=deterministic)
            paths.add(path)
    kept: list[tuple[str, ...]] = []
    for path in sorted(paths, key=len):
        if not any(path[: len(p)] == p for p in kept):
            kept.append(path)
    return InputShape(paths=tuple(sorted(kept)), deterministic=deterministic)


def _lookup(doc: Any, path: tuple[str, ...]) -> Any:
    node = doc
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def cache_key(shape: InputShape, doc: Mapping[str, Any]) -> bytes:
    """A key equal for two inputs exactly when the policy cannot tell them apart."""
    if shape.paths is None:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    values = []
    for path in shape.paths:
        value = _lookup(doc, path)
        # A missing value and an explicit null are different inputs to Rego.
        values.append([0] if value is _MISSING else [1, value])
    return orjson.dumps(values, option=orjson.OPT_SORT_KEYS)


def project(shape: InputShape, doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of ``doc`` the policy reads; the whole of it if it reads it all."""
    if shape.paths is None:
        return doc
    out: dict[str, Any] = {}
    for path in shape.paths:
        value = _lookup(doc, path)
        if value is _MISSING:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


class LRUCache[K, V]:
    """A small least-recently-used map; ``capacity`` 0 keeps nothing."""

    __slots__ = ("_data", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The cached value, marking it recently used; ``None`` if absent."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store a value, evicting the least recently used beyond capacity."""
        if self.capacity <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (on every revision change)."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
