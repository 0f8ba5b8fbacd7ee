"""The decision cache, keyed only on the parts of ``input`` the policy reads.

:func:`analyse` scans a bundle's modules (strings and comments blanked) for
references to ``input``:

* ``input.action.tool`` or ``input["action"]["tool"]`` -- a static path: the
  key includes the value at that path (the whole subtree under it);
* ``input.action[x]`` -- a dynamic step: the path stops before it, so the key
  holds the whole ``input.action`` subtree;
* ``input`` alone (``object.get(input, ...)``, ``x := input``, ``with input``)
  -- the key is the whole input;
* ``f(input.action)`` where ``f`` is a function defined in the bundle -- the
  reference is followed into ``f``: the path becomes ``action`` plus what
  ``f`` reads of that parameter (``action.tool`` ...), found by scanning every
  use of the parameter's name in the module that defines ``f``. Any use that
  is not a static path (bare, dynamic, a literal or pattern parameter, more
  arguments than parameters, an imported or dotted name, ``with`` anywhere)
  stops the path at ``action``, as before. The argument's kind is read too
  (:data:`KIND`): a call with an undefined argument is undefined, so
  ``bad(a) if not a.approved_by`` must not see ``arguments`` vanish when it
  has no ``approved_by``;
* ``object.get(input.session.calls, "refund", 0)`` -- the member named by a
  string literal, and the kind of ``calls``; the key may also be a variable
  declared ``some tool in data.x.y`` in the same body and used nowhere else,
  where ``data.x.y`` is a list (or object) of strings in the bundle's data and
  no rule can define it: one path per string. A session's counters of other
  tools then stay out of the key.

This is a conservative textual scan, not a Rego compiler: it can only make
the key bigger than necessary, never smaller, as long as every read of the
input is spelled with the ``input`` keyword (Rego has no other way to reach
it; ``import input.x as y`` is caught as the path ``x``). A bundle with a form
feed, vertical tab, lone carriage return or NUL anywhere in its modules reads the
whole input: the scan's patterns take only space, tab and newline as whitespace.
So does one with a line (comments and strings blanked) that starts with ``.``, a
reference continued from the line above, perhaps past a comment there
(``import data.lib  # c`` then ``.risky``), or whose ``package`` the scan cannot
read exactly (``package warden[`x`]``): which package a module is in, and which
name an import binds, decide which functions a call is followed into.

The same paths drive :func:`project`, which sends the worker only those parts
of the input: building the engine's input document is the largest per-call
cost, and it grows with the size of tool arguments the policy never reads.

Policies that call non-deterministic builtins (``time.*``, ``uuid.*``,
``rand.*``, ``opa.runtime``, ``http.send``, ``net.*``, ``io.jwt.decode_verify``,
``crypto.x509.parse_and_verify_certificates*``, which reads the clock) are
never cached. A module with a template string is searched for those calls
in its raw text too, strings and comments included, every ``#`` between a
call's parts read as a comment: its literals hold code (``$"{time.now_ns()}"``,
comments there included), and where one ends (a quote or ``#`` inside its
braces) is for rego-cpp to say. A mere mention there costs the bundle its
cache, never a wrong decision. :attr:`InputShape.clock_module` names the
module found.
"""

from __future__ import annotations

import bisect
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from warden.policy.bundle import Module
from warden.policy.bundle.text import blank, package_of, string_end

__all__ = [
    "KIND",
    "WILDCARD",
    "InputShape",
    "LRUCache",
    "analyse",
    "cache_key",
    "path_text",
    "project",
]

_INPUT = re.compile(r"(?<![\w.])input(?![\w])")
# A newline before "[" ends the statement in rego-cpp (``x := input.a`` then ``["b"]``
# on the next line is a new expression); before "." it does not.
_STEP = re.compile(r'(?:\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)|[ \t]*\[\s*"((?:[^"\\]|\\.)*)"\s*\])')
# rego-cpp takes space, newlines included, around the dots of a builtin's name.
_NONDETERMINISTIC = re.compile(
    r"(?<![\w.])(?:time\s*\.\s*[a-z_0-9]+|uuid\s*\.\s*[a-z_0-9]+|rand\s*\.\s*[a-z_0-9]+"
    r"|opa\s*\.\s*runtime|http\s*\.\s*send|net\s*\.\s*[a-z_0-9]+"
    r"|io\s*\.\s*jwt\s*\.\s*decode_verify"
    # Checks a certificate's validity against the current time.
    r"|crypto\s*\.\s*x509\s*\.\s*parse_and_verify_certificates[a-z_]*)\s*\("
)
# The first word of each name above, where a search of raw source starts.
_CALL_START = re.compile(r"(?<![\w.])(?:time|uuid|rand|opa|http|net|io|crypto)(?![\w])")
_CALL_TOKEN = re.compile(r"[A-Za-z0-9_]{1,64}|\S")
_CALL_TOKENS = 6
"""The most tokens a name above and its ``(`` take (``crypto . x509 . parse_and_... (``)."""
_SPACE_RUN = re.compile(r"\s*")
_MISSING = object()
WILDCARD = "*"
"""A path step that goes through every member of a list or object (``input.history[i]``)."""
KIND = "\x00kind"
"""A last path step that reads only what kind of JSON value is there, if any.

The key holds the kind; the projection puts an empty value of that kind
there (``{}``, ``[]``, ``""``, ``0``, ``false`` or ``null``), which members
read by other paths fill in.
"""
_SCALAR_EMPTY: dict[type, Any] = {str: "", int: 0, float: 0, bool: False}


def _empty(node: Any) -> Any:
    """A new empty value of ``node``'s kind (:data:`KIND`)."""
    kind = type(node)
    if kind is dict or isinstance(node, Mapping):
        return {}
    if kind is list or kind is tuple:
        return []
    return _SCALAR_EMPTY.get(kind, node)


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
    clock_module: str | None = None
    """The first module found calling such a builtin (why the cache is off), if any."""

    @property
    def whole_input(self) -> bool:
        """Whether the policy may read any part of the input."""
        return self.paths is None


def _has_template(source: str) -> bool:
    """Whether ``source`` has a template string (``$"{input.x}"``): code inside a literal."""
    blanked = blank(source, fill="s")
    return any(blanked[i] == "$" and source[i + 1] in '"`' for i in range(len(source) - 1))


def _calls_nondeterministic(source: str, blanked: str, template: bool) -> bool:
    """Whether a module calls a builtin of :data:`_NONDETERMINISTIC`.

    ``blanked`` (strings and comments blanked) holds every call outside string
    literals. A template string's braces hold code it hides, so a module with one
    is searched raw too (:func:`_raw_call`).
    """
    return bool(_NONDETERMINISTIC.search(blanked)) or (template and _raw_call(source))


def _raw_call(source: str) -> bool:
    """Whether raw ``source`` holds a call of :data:`_NONDETERMINISTIC`, strings included.

    A ``#`` may start a comment or sit in a string (``$"{concat("#", [x])}"``):
    where a literal in a template's braces ends is for rego-cpp to say. So every
    ``#`` met between a name's tokens is read as a comment start, rego-cpp reading
    on past it (``time.now_ns # c`` then ``()``), and every one before a name's
    first token as not one. Each place is skipped once (memoised), so a long line
    of names and ``#`` costs linear time, not quadratic.
    """
    lines = [m.start() for m in re.finditer("\n", source)]
    skipped: dict[int, int] = {}

    def skip(pos: int) -> int:
        """Past whitespace and comments from ``pos``."""
        passed: list[int] = []
        while pos not in skipped:
            passed.append(pos)
            space = _SPACE_RUN.match(source, pos)
            assert space is not None  # it matches the empty string
            pos = space.end()
            if not source.startswith("#", pos):
                break
            at = bisect.bisect_left(lines, pos)
            pos = lines[at] if at < len(lines) else len(source)
        end = skipped.get(pos, pos)
        skipped.update(dict.fromkeys(passed, end))
        return end

    for start in _CALL_START.finditer(source):
        tokens, pos = [start.group()], start.end()
        while len(tokens) < _CALL_TOKENS:
            token = _CALL_TOKEN.match(source, skip(pos))
            if token is None:
                break
            tokens.append(token.group())
            pos = token.end()
            if token.group() == "(":
                break
        if _NONDETERMINISTIC.match(" ".join(tokens)):
            return True
    return False


def _unescape(text: str) -> str:
    try:
        value = orjson.loads(f'"{text}"')
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def _dynamic_step(blanked: str, pos: int) -> int | None:
    """Where a bracketed step that is no string literal (``[i]``, ``[_]``) at ``pos`` ends.

    Such a step may select any member, so the path goes on through every
    member (:data:`WILDCARD`). Strings are blanked, so a ``]`` inside one
    cannot end the step early.
    """
    if pos >= len(blanked) or blanked[pos] != "[":
        return None
    depth = 0
    for i in range(pos, len(blanked)):
        ch = blanked[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1 if ch == "]" else None
    return None


def _reference_path(source: str, blanked: str, end: int) -> tuple[tuple[str, ...], int]:
    """The static path that follows a name ending at ``end``, and where it ends.

    A dynamic step (``input.history[i].tool``) is :data:`WILDCARD`: the path
    continues below every member, so the key holds only the ``tool`` of each
    element, and each element's position.
    """
    path: list[str] = []
    pos = end
    while True:
        m = _STEP.match(source, pos)
        if m is None:
            wild = _dynamic_step(blanked, pos)
            if wild is None:
                break
            path.append(WILDCARD)
            pos = wild
            continue
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
            step = _unescape(m.group(2))
            if step in (WILDCARD, KIND):
                break  # a key spelt like a marker: read the parent whole
            path.append(step)
        pos = m.end()
    return tuple(path), pos


# rego-cpp takes any whitespace, newlines included, between a head's name and "(", and
# a rule after a ";" on the line of another ("limit := 5; risky(a) if ..."): one there
# may be a head too (a call in a body after ";" then counts as a head that may be one,
# which only widens the key).
_HEAD = re.compile(r"(?:^|;)(?:[ \t]*default)?[ \t]*([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.MULTILINE)
# A head through a ref (``checks.risky(a) if ...`` in package ``warden`` adds a clause to
# ``data.warden.checks.risky``), dotted or bracketed, spaces and newlines as in _HEAD.
_REF_HEAD = re.compile(
    r"(?:^|;)(?:[ \t]*default)?[ \t]*[A-Za-z_][A-Za-z0-9_]*"
    r"(?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*|[ \t]*\[[^\[\]]*\])+\s*\(",
    re.MULTILINE,
)
_LAST_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_IMPORT = re.compile(r"(?<![\w.])import(?![\w])")
_IMPORT_ROOT = re.compile(r"\s+([A-Za-z_][A-Za-z0-9_]*)(?![\w])")
_IMPORT_AS = re.compile(r"\s*(?<![\w])as\s+([A-Za-z_][A-Za-z0-9_]*)(?![\w])")
# Characters rego-cpp reads as whitespace that the scan's patterns do not expect
# (\f, \v and a lone \r before a head, ``\fneeds_review(b) if ...``, hide it), and
# NUL, after which rego-cpp reads nothing of the module while the scan reads on.
_ODD_SPACE = re.compile(r"[\f\v\x00]|\r(?!\n)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A line that starts with ".": it goes on with a reference from the line above, past
# any comment there (rego-cpp reads ``data.lib  # c`` then ``.risky`` as
# ``data.lib.risky``). A newline before "[" ends the reference in rego-cpp.
_CONTINUED_LINE = re.compile(r"^[ \t]*\.", re.MULTILINE)
# A package declaration as the scan reads it exactly: names and plain string steps
# (no raw string, no escape), on one line.
_PACKAGE_KEYWORD = re.compile(r"package\s+")
_PACKAGE_REF = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*"
    r'(?:[ \t]*\.[ \t]*[A-Za-z_][A-Za-z0-9_]*|[ \t]*\[[ \t]*"[^"\\\n]*"[ \t]*\])*'
)
_PACKAGE_STEP = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)|\[[ \t]*"([^"]*)"[ \t]*\]')
_CALLEE = re.compile(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*)$")
_WITH = re.compile(r"(?<![\w.])with(?![\w])")
# How far back a called function's name is looked for (names are shorter).
_NAME_WINDOW = 256
_OBJECT_WORD = re.compile(r"(?<![\w.])object(?![\w])")
_OBJECT_GET = re.compile(r"(?<![\w.])object\s*\.\s*get\s*$")
_OBJECT_GET_CALL = re.compile(r"(?<![\w.])object\s*\.\s*get\s*\(")
# ``some tool in data.a.b`` ending its statement (a newline, ``;`` or the body's end).
_SOME_IN_DATA = re.compile(
    r"(?<![\w.])some[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]+in[ \t]+"
    r"(data(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?=[ \t]*(?:[;\n\]}]|$))"
)
# What a rule head's parameter list is followed by (``==`` is a comparison).
_HEAD_TAIL = re.compile(r"[ \t]*(?::=|=(?!=)|if(?![\w])|\{)")
# Text a line can end with when the next line continues the same statement (a
# reference broken after its ".", an operator such as "%" with its operand below).
_CONTINUES = re.compile(
    r"(?:(?<![\w.])(?:if|else|not|in|some|every|with|as|contains|default)|[:=<>!+\-*/%&|,.])$"
)
# Text a call inside an expression can follow.
_IN_EXPRESSION = re.compile(
    r"(?:(?<![\w.])(?:if|else|not|in|some|every|contains|return)|[(\[{,:=<>!+\-*/&|%;])$"
)


@dataclass(frozen=True, slots=True)
class _Head:
    """A line that may be a function head: its module, parameter texts and their span."""

    module: int
    params: tuple[str, ...]
    span: tuple[int, int]
    certain: bool


def _arg_spans(text: str, start: int) -> tuple[list[tuple[int, int]], int] | None:
    """The spans of the top-level arguments of the call whose ``(`` is at ``start``, and its end.

    Each span is stripped of surrounding space; ``None`` if the call is not closed.
    """
    depth = 0
    spans: list[tuple[int, int]] = []
    begin = start + 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                spans.append(_stripped(text, begin, i))
                return spans, i + 1
        elif ch == "," and depth == 1:
            spans.append(_stripped(text, begin, i))
            begin = i + 1
    return None


def _stripped(text: str, begin: int, end: int) -> tuple[int, int]:
    while begin < end and text[begin].isspace():
        begin += 1
    while end > begin and text[end - 1].isspace():
        end -= 1
    return begin, end


def _enclosing_body(text: str, pos: int) -> tuple[int, int] | None:
    """The inside of the innermost ``[...]`` or ``{...}`` around ``pos``.

    Parentheses open no scope: ``sum([n | ...])`` is the comprehension's body.
    """
    found = _unclosed(text, pos, through_parens=True)
    call = None if found is None else _arg_spans(text, found[0])
    return None if found is None or call is None else (found[0] + 1, call[1] - 1)


def _unclosed(text: str, pos: int, *, through_parens: bool = False) -> tuple[int, int] | None:
    """The innermost bracket still open at ``pos``, and how many commas lie between it
    and ``pos`` outside nested brackets; ``through_parens``: a ``(`` is passed over."""
    depth = commas = 0
    for i in range(pos - 1, -1, -1):
        ch = text[i]
        if ch in ")]}":
            depth += 1
        elif ch in "([{":
            if depth > 0:
                depth -= 1
            elif not (through_parens and ch == "("):
                return i, commas
        elif ch == "," and depth == 0:
            commas += 1
    return None


def _depth(text: str, start: int, pos: int) -> int:
    """How many brackets opened between ``start`` and ``pos`` are still open at ``pos``."""
    depth = 0
    for ch in text[start:pos]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth


def _defines_object(marked: str, statements: set[int]) -> bool:
    """Whether a rule of the module is headed ``object`` (``object.get(o, k, d) := ...``).

    Such a head starts a statement (a line that starts one, or after ``;`` or
    ``}``) outside any bracket; a rule may put it after ``default``.
    """
    depth, counted = 0, 0
    for m in _OBJECT_WORD.finditer(marked):
        depth += _depth(marked, counted, m.start())  # one pass over the text in all
        counted = m.start()
        if depth != 0:
            continue
        j = m.start()
        while j > 0 and marked[j - 1] in " \t":
            j -= 1
        if marked.endswith("default", 0, j):
            j -= len("default")
            while j > 0 and marked[j - 1] in " \t":
                j -= 1
        if (j > 0 and marked[j - 1] in ";}") or (
            (j == 0 or marked[j - 1] == "\n") and j in statements
        ):
            return True
    return False


def _last_char(text: str, pos: int) -> int:
    """The offset of the last character before ``pos`` that is not space, or -1."""
    j = pos - 1
    while j >= 0 and text[j].isspace():
        j -= 1
    return j


def _first_char(text: str, pos: int) -> int:
    """The offset of the first character from ``pos`` on that is not space, or -1."""
    j = pos
    while j < len(text) and text[j].isspace():
        j += 1
    return j if j < len(text) else -1


def _tail(text: str, end: int) -> str:
    """The last few characters before ``end``, trailing space dropped (for ``$`` patterns)."""
    j = end
    while j > 0 and text[j - 1].isspace():
        j -= 1
    return text[max(0, j - 32) : j]


def _statement_starts(text: str) -> set[int]:
    """Offsets of lines that start a statement: outside brackets, not continuing one."""
    starts = {0}
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "\n" and depth == 0 and _CONTINUES.search(_tail(text, i)) is None:
            starts.add(i + 1)
    return starts


class _Analysis:
    """The paths of ``input`` the modules read, following bundle functions.

    Sound by construction in both directions that matter: every line that
    could be a head of a function counts as one (its parameters are all
    followed or the path stops), while only lines that are certainly heads
    hide their parameter names from the scan for reads.
    """

    def __init__(self, modules: Sequence[Module], data: Mapping[str, Any] | None) -> None:
        self.data = data
        self.sources = [m.source for m in modules]
        self.blanked = [blank(m.source) for m in modules]
        # Strings as marks: an argument that is a string literal keeps its extent.
        self.marked = [blank(m.source, fill="s") for m in modules]
        # ``with`` can replace a function; an import can alias one: both make
        # the name at a call site mean something the heads do not show.
        self.follow = not any(_WITH.search(text) for text in self.blanked)
        self.heads: dict[str, list[_Head]] = {}
        # Functions given a clause through a ref head: in a package the scan does not
        # work out, so a call to one is never followed (its argument is read whole).
        self.ref_headed: set[str] = set()
        # A call names a function of its own package, else a builtin (a function of
        # another package with a builtin's name does not replace it there).
        self.packages = [m.package for m in modules]
        # ``object.get`` is the builtin unless a module can make it something else:
        # an import named ``object``, a package ``object``, a rule headed ``object``.
        self.builtin_object = not any(
            p is not None and (p == "object" or p.endswith("/object")) for p in self.packages
        )
        self.imported: set[str] = set()
        self._memo: dict[tuple[int, int], set[tuple[str, ...]]] = {}
        self._unclassified: dict[str, bool] = {}
        self._strings: dict[tuple[int, int, str], set[str] | None] = {}
        self._plain: dict[tuple[str, ...], bool] = {}
        for index, text in enumerate(self.blanked):
            for m in _IMPORT.finditer(text):
                alias = self._import_alias(index, m.end())
                if alias is None:
                    self.follow = False  # a name bound that the scan cannot tell
                else:
                    self.imported.add(alias)
            # Strings as marks, not spaces: a line ending in a string is complete.
            statements = _statement_starts(self.marked[index])
            if _defines_object(self.marked[index], statements):
                self.builtin_object = False
            for m in _HEAD.finditer(text):
                parsed = _arg_spans(text, m.end() - 1)
                if parsed is None:
                    self.follow = False
                    continue
                params, end = [text[a:b] for a, b in parsed[0]], parsed[1]
                certain = m.start() in statements and _HEAD_TAIL.match(text, end) is not None
                self.heads.setdefault(m.group(1), []).append(
                    _Head(index, tuple(params), (m.end() - 1, end), certain)
                )
            for m in _REF_HEAD.finditer(text):
                name = self._ref_head_name(index, m.start(), m.end() - 1)
                if name is None:
                    self.follow = False
                else:
                    self.ref_headed.add(name)

    def _import_alias(self, index: int, end: int) -> str | None:
        """The name an import whose keyword ends at ``end`` binds in its module.

        As Rego binds it: the ``as`` name if there is one, else the last step of
        the reference, a bracketed string unescaped (``import data.lib["risky"]``
        binds ``risky``). ``None`` if the import does not read as one.
        """
        text = self.blanked[index]
        root = _IMPORT_ROOT.match(text, end)
        if root is None:
            return None
        path, pos = _reference_path(self.sources[index], text, root.end())
        if WILDCARD in path:
            return None  # a step that is no string literal (``[`risky`]``, ``[x]``)
        alias = _IMPORT_AS.match(text, pos)
        name = alias.group(1) if alias is not None else path[-1] if path else root.group(1)
        pos = pos if alias is None else alias.end()
        # Nothing more on its line, and no bracket after a newline that might go on.
        line_end = text.find("\n", pos)
        rest = text[pos : len(text) if line_end < 0 else line_end].strip()
        following = _first_char(text, pos)
        # A "." after the path, past a comment and a newline, goes on with it
        # (``import data.lib  # c`` then ``.risky`` binds ``risky``).
        if (rest and not rest.startswith(";")) or (following >= 0 and text[following] in "[(."):
            return None
        return name

    def _ref_head_name(self, index: int, start: int, opener: int) -> str | None:
        """The function a ref head from ``start`` to its ``(`` at ``opener`` names.

        ``None`` if its last step is a bracket holding no string literal.
        """
        text = self.blanked[index]
        last = _last_char(text, opener)
        if text[last] != "]":
            found = _LAST_NAME.search(text, start, last + 1)
            return None if found is None else found.group(0)
        source = self.sources[index]
        a, b = _stripped(source, text.rfind("[", start, last) + 1, last)
        literal = source[a:b]
        if literal[:1] not in ('"', "`") or string_end(source, a) != b:
            return None
        return _unescape(literal[1:-1]) if literal[0] == '"' else literal[1:-1]

    def _unclassified_use(self, name: str) -> bool:
        """Whether ``name(`` appears somewhere that is neither a line start nor an expression."""
        known = self._unclassified.get(name)
        if known is None:
            known = self._unclassified[name] = self._find_unclassified_use(name)
        return known

    def _find_unclassified_use(self, name: str) -> bool:
        pattern = re.compile(rf"(?<![\w.]){name}\s*\(")
        for text in self.blanked:
            for m in pattern.finditer(text):
                line_start = text.rfind("\n", 0, m.start()) + 1
                before = text[line_start : m.start()].strip()
                if before in ("", "default"):
                    continue
                if _IN_EXPRESSION.search(_tail(text, m.start())) is None:
                    return True
        return False

    def reads(self, index: int, start: int, end: int) -> set[tuple[str, ...]]:
        """The paths read below the reference at ``start:end`` of module ``index``.

        ``{()}`` means its whole value. Memoised: a parameter name is used in
        many places, and each use may be passed on again.
        """
        key = (index, start)
        known = self._memo.get(key)
        if known is not None:
            return known
        whole: set[tuple[str, ...]] = {()}
        self._memo[key] = whole  # a cycle (a compile error in Rego) reads the whole
        followed = self._follow(index, start, end)
        if followed is None:
            followed = self._member_reads(index, start, end)
        found = whole if followed is None else followed
        self._memo[key] = found
        return found

    def _call_argument(self, index: int, start: int, end: int) -> tuple[str, int, int] | None:
        """The callee, argument position and ``(`` offset if the reference is a whole argument."""
        text = self.blanked[index]
        last = _last_char(text, start)
        following = _first_char(text, end)
        if last < 0 or text[last] not in "(," or following < 0 or text[following] not in ",)":
            return None
        found = _unclosed(text, last + 1)
        if found is None or text[found[0]] != "(":
            return None
        opener, position = found
        callee = _CALLEE.search(text, max(0, opener - _NAME_WINDOW), opener)
        return None if callee is None else (callee.group(1), position, opener)

    def _follow(self, index: int, start: int, end: int) -> set[tuple[str, ...]] | None:
        """The paths read when the reference is a whole argument of a bundle function."""
        call = self._call_argument(index, start, end) if self.follow else None
        if call is None:
            return None
        name, position, opener = call
        package = self.packages[index]
        heads = [h for h in self.heads.get(name, ()) if self.packages[h.module] == package]
        if (
            not heads
            or name in self.imported
            or name in self.ref_headed
            or self._unclassified_use(name)
        ):
            return None
        if any(h.module == index and h.span[0] == opener for h in heads):
            return None  # the reference is a parameter pattern of a head
        # An undefined argument makes the call undefined: its presence is read.
        found: set[tuple[str, ...]] = {(KIND,)}
        for head in heads:
            if position >= len(head.params):
                return None  # an extra argument receives the result: a whole read
            param = head.params[position]
            if param == "_":
                continue
            if _IDENT.fullmatch(param) is None or param in ("true", "false", "null"):
                return None
            sub = self._parameter_reads(head, param)
            if sub is None:
                return None
            found |= sub
        return found

    def _member_reads(self, index: int, start: int, end: int) -> set[tuple[str, ...]] | None:
        """The paths read when the reference is the object of ``object.get(ref, key, default)``.

        The kind of the object, and the member the key names: a string
        literal, or a variable that can only hold strings listed in the
        bundle's data (:meth:`_data_strings`). Anything else: ``None``.
        """
        # ``with`` can replace data; a module can replace ``object.get``.
        if not self.follow or not self.builtin_object or "object" in self.imported:
            return None
        text = self.blanked[index]
        opener = _last_char(text, start)
        if (
            opener < 0
            or text[opener] != "("
            or _OBJECT_GET.search(text, max(0, opener - _NAME_WINDOW), opener) is None
        ):
            return None
        call = _arg_spans(self.marked[index], opener)
        if call is None or len(call[0]) != 3 or call[0][0] != (start, end):
            return None
        spans = call[0]
        source = self.sources[index]
        a, b = spans[1]
        key = source[a:b]
        if key[:1] in ('"', "`") and string_end(source, a) == b:
            # One whole string literal: its text is the member's name.
            names: set[str] | None = {_unescape(key[1:-1]) if key[0] == '"' else key[1:-1]}
        elif _IDENT.fullmatch(key) is not None:
            names = self._data_strings(index, opener, key)
        else:
            return None
        if names is None or names & {WILDCARD, KIND}:
            return None
        return {(KIND,)} | {(name,) for name in names}

    def _data_strings(self, index: int, opener: int, var: str) -> set[str] | None:
        """The strings ``var`` can hold at the call whose ``(`` is at ``opener``.

        Only when the innermost ``[...]`` or ``{...}`` around the call declares
        it ``some var in data.a.b`` at its own level, uses it nowhere else but
        as the key of ``object.get`` calls, and ``data.a.b`` is the bundle's
        own data (no module's rule can define it) holding only strings.
        """
        if self.data is None:
            return None
        body = _enclosing_body(self.blanked[index], opener)
        if body is None:
            return None
        key = (index, body[0], var)
        if key not in self._strings:  # one scan per body: it may hold many such calls
            self._strings[key] = self._body_strings(index, body, var)
        return self._strings[key]

    def _body_strings(self, index: int, body: tuple[int, int], var: str) -> set[str] | None:
        text = self.blanked[index]
        first, last = body
        uses = list(re.finditer(rf"(?<![\w.]){re.escape(var)}(?![\w])", text[first:last]))
        declared = [
            m
            for m in _SOME_IN_DATA.finditer(text, first, last)
            if m.group(1) == var and _depth(text, first, m.start()) == 0
        ]
        if len(declared) != 1:
            return None
        keys = 0
        for m in _OBJECT_GET_CALL.finditer(text, first, last):
            call = _arg_spans(self.marked[index], m.end() - 1)
            if call is not None and len(call[0]) == 3:
                a, b = call[0][1]
                keys += text[a:b].strip() == var
        if len(uses) != 1 + keys:
            return None
        steps = tuple(declared[0].group(2).split(".")[1:])
        if not self._plain_data(steps):
            return None
        node: Any = self.data
        for step in steps:
            if not isinstance(node, Mapping) or step not in node:
                return None
            node = node[step]
        members = list(node.values()) if isinstance(node, Mapping) else node
        if not isinstance(members, list) or not all(type(m) is str for m in members):
            return None
        return set(members)

    def _plain_data(self, steps: tuple[str, ...]) -> bool:
        """Whether ``data.<steps>`` can only be the bundle's data, not a rule's value.

        A module whose package is above the path must not use the next step's
        name anywhere but after a dot: where a rule starts is not read here
        (``x := 1; counted := ["a"]`` is two rules on one line).
        """
        known = self._plain.get(steps)
        if known is None:
            known = self._plain[steps] = self._find_plain_data(steps)
        return known

    def _find_plain_data(self, steps: tuple[str, ...]) -> bool:
        for package, text in zip(self.packages, self.blanked, strict=True):
            parts = tuple(package.split("/")) if package else ()
            if steps[: len(parts)] != parts:
                continue
            if len(parts) >= len(steps):
                return False  # the package is at or below the data path
            name = re.compile(rf"(?<![\w.]){re.escape(steps[len(parts)])}(?![\w])")
            if name.search(text) is not None:
                return False
        return True

    def _parameter_reads(self, head: _Head, param: str) -> set[tuple[str, ...]] | None:
        """Every path read of ``param`` anywhere in the head's module."""
        text = self.blanked[head.module]
        source = self.sources[head.module]
        name = re.compile(rf"(?<![\w.]){param}(?![\w])")
        if len(name.findall(text, head.span[0], head.span[1])) != 1:
            return None
        spans = [
            h.span
            for hs in self.heads.values()
            for h in hs
            if h.module == head.module and h.certain
        ]
        found: set[tuple[str, ...]] = set()
        for m in name.finditer(text):
            if any(a < m.start() < b for a, b in spans):
                continue  # a parameter of some head binds, it does not read
            path, end = _reference_path(source, text, m.end())
            found |= {path + rest for rest in self.reads(head.module, m.start(), end)}
        return found


def _package_misread(source: str, blanked: str) -> bool:
    """Whether the module's ``package`` declaration may not be the package the scan
    reads (:func:`package_of`): a raw-string or escaped step, anything after the
    reference on its line, or a reference read here differently."""
    found = package_of(source)
    if found is None:
        return False  # no declaration to misread (the loader rejects such a module)
    keyword = _PACKAGE_KEYWORD.match(blanked, found[1])
    ref = None if keyword is None else _PACKAGE_REF.match(source, keyword.end())
    if ref is None:
        return True
    line_end = blanked.find("\n", ref.end())
    if blanked[ref.end() : len(blanked) if line_end < 0 else line_end].strip():
        return True
    steps = [a or b for a, b in _PACKAGE_STEP.findall(ref.group(0))]
    return "/".join(steps) != found[0]


def analyse(modules: Sequence[Module], data: Mapping[str, Any] | None = None) -> InputShape:
    """Find which input paths the modules read and whether they are deterministic.

    ``data`` is the bundle's data document, evaluated with the modules; with
    it, keys drawn from lists in it narrow ``object.get`` reads.
    """
    analysis = _Analysis(modules, data)
    templated = [_has_template(source) for source in analysis.sources]
    clock_module = next(
        (
            module.path
            for module, source, text, template in zip(
                modules, analysis.sources, analysis.blanked, templated, strict=True
            )
            if _calls_nondeterministic(source, text, template)
        ),
        None,
    )
    # Every early return reads the whole input.
    whole = InputShape(paths=None, deterministic=clock_module is None, clock_module=clock_module)
    if any(templated):
        # Template strings hold expressions the scan for reads cannot see into.
        return whole
    if any(_ODD_SPACE.search(source) for source in analysis.sources):
        # Every pattern of the scan (heads, ref heads, rules headed ``object``,
        # statement starts) is written for space, tab and newline; rather than prove
        # each one right around these characters, read the whole input: nothing is
        # projected away, so nothing the scan misses can change a decision. Checked
        # in the raw text, comments and strings too, so that no disagreement about
        # where a comment or string ends can hide one. OPA rejects \f and \v; they
        # cost a policy that has them its projection, never a wrong decision.
        return whole
    if any(_CONTINUED_LINE.search(text) for text in analysis.blanked) or any(
        _package_misread(source, text)
        for source, text in zip(analysis.sources, analysis.blanked, strict=True)
    ):
        # The package a module is in, and the name an import binds, decide which
        # functions a call is followed into: where the scan may read either short
        # (a comment before a newline ends its reading of a reference, rego-cpp reads
        # on), nothing is projected away.
        return whole
    paths: set[tuple[str, ...]] = set()
    for index, (source, text) in enumerate(zip(analysis.sources, analysis.blanked, strict=True)):
        for match in _INPUT.finditer(text):
            path, end = _reference_path(source, text, match.end())
            if not path:
                return whole
            try:
                paths |= {path + rest for rest in analysis.reads(index, match.start(), end)}
            except RecursionError:  # functions passing the input down hundreds deep
                return whole
    kept: list[tuple[str, ...]] = []
    # ``x[_]`` with nothing read below reads every member whole: that is ``x`` itself.
    paths = _crowded_read_whole({_untail(p) for p in paths})
    if () in paths:
        return whole
    for path in sorted(paths, key=len):
        if not any(path[: len(p)] == p for p in kept):
            kept.append(path)
    return replace(whole, paths=tuple(sorted(kept)))


_MAX_MEMBERS = 16
"""Members of one value read one by one, at most; more and the value is read whole."""


def _crowded_read_whole(paths: set[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """``paths``, with a value whose members more than :data:`_MAX_MEMBERS` paths name
    read whole instead: a key of hundreds of lookups would cost more than it saves."""
    members: dict[tuple[str, ...], int] = {}
    for path in paths:
        if len(path) >= 2 and path[-1] not in (WILDCARD, KIND):
            members[path[:-1]] = members.get(path[:-1], 0) + 1
    crowded = {parent for parent, count in members.items() if count > _MAX_MEMBERS}
    if not crowded:
        return paths
    out: set[tuple[str, ...]] = set()
    for path in paths:
        parent = next((path[:i] for i in range(1, len(path)) if path[:i] in crowded), None)
        out.add(path if parent is None else _untail(parent))
    return out


def _untail(path: tuple[str, ...]) -> tuple[str, ...]:
    while path and path[-1] == WILDCARD:
        path = path[:-1]
    return path


def path_text(path: tuple[str, ...]) -> str:
    """A path as operators read it: ``session.calls.(kind)``, ``history.*.tool``."""
    return ".".join("(kind)" if step == KIND else step for step in path)


def _pick(node: Any, path: tuple[str, ...]) -> Any:
    """The part of ``node`` below ``path``, through every member at a :data:`WILDCARD`.

    A wildcard keeps the list (each position) or object (each key) and puts
    in each member what lies below it: ``{}`` for a member that has nothing
    there, which the policy cannot tell apart (it reads only below it). Over
    anything else it finds no member, as over ``{}`` (Rego iterates no string,
    number or null): a projection that holds such a member's ``{}`` keys alike.
    """
    for i, key in enumerate(path):
        if key == KIND:
            return _empty(node)
        if key == WILDCARD:
            rest = path[i + 1 :]
            if type(node) is list:
                return [_member(item, rest) for item in node]
            if isinstance(node, Mapping):
                return {k: _member(v, rest) for k, v in node.items()}
            return {}
        if not (type(node) is dict or isinstance(node, Mapping)) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _member(node: Any, rest: tuple[str, ...]) -> Any:
    """One member below a wildcard: what ``rest`` reaches in it, under its static steps."""
    found = _pick(node, rest)
    if found is _MISSING:
        return {}
    cut = rest.index(WILDCARD) if WILDCARD in rest else len(rest)
    for key in reversed(rest[:cut]):
        if key == KIND:
            continue
        found = {key: found}
    return found


def _adds_nothing(value: Any, into: Any) -> bool:
    """Whether ``value``, found where another projection of the same document put
    ``into``, tells nothing ``into`` does not: a wildcard's ``{}`` (nothing read
    below), or the empty value of ``into``'s kind standing in for it (:data:`KIND`).

    Either may land on a value another path read (paths are applied in sorted
    order, and a member such as ``$where`` sorts before ``*``): replaced, the
    policy would read a ``""`` or ``[]`` there on every call, cached or not.
    """
    if isinstance(value, dict) and not value:
        return True
    empty = _empty(into)
    return type(value) is type(empty) and value == empty


def _merge(into: Any, value: Any) -> Any:
    """Two projections of the same document, joined (lists member by member).

    A new value: the parts may be the caller's own objects, never changed. A
    stand-in (:func:`_adds_nothing`) never replaces what another path read.
    """
    if isinstance(into, dict) and isinstance(value, dict):
        merged = dict(into)
        for key, item in value.items():
            merged[key] = _merge(into[key], item) if key in into else item
        return merged
    if type(into) is list and type(value) is list and len(into) == len(value):
        return [_merge(a, b) for a, b in zip(into, value, strict=True)]
    return into if _adds_nothing(value, into) else value


def _lookup(doc: Any, path: tuple[str, ...]) -> Any:
    if WILDCARD in path:
        return _pick(doc, path)
    node = doc
    for key in path:
        if key == KIND:
            return _empty(node)
        # An exact dict first: the ABC check costs a microsecond a step.
        if not (type(node) is dict or isinstance(node, Mapping)) or key not in node:
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
    """The part of ``doc`` the policy reads; the whole of it if it reads it all.

    The worker decides on this alone, hit or miss: every path must find here
    what it finds in ``doc`` (``cache_key`` of both is equal), or the decision
    is wrong every time.
    """
    if shape.paths is None:
        return doc
    out: dict[str, Any] = {}
    for path in shape.paths:
        value = _lookup(doc, path)
        if value is _MISSING:
            continue
        if WILDCARD in path:
            # Several paths through one list: joined member by member.
            cut = path.index(WILDCARD)
            wrapped: Any = value
            for key in reversed(path[:cut]):
                wrapped = {key: wrapped}
            out = _merge(out, wrapped)
            continue
        node = out
        *parents, last = path
        if last == KIND:
            # The empty value of its kind, unless a path read before filled in a
            # value of that kind. A wildcard's ``{}`` for a member it found nothing
            # below is no such value when the member is a string or a list.
            *parents, last = parents
            for key in parents:
                node = node.setdefault(key, {})
            if last not in node or not _adds_nothing(value, node[last]):
                node[last] = value
            continue
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
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
