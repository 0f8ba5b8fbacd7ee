"""What an approval shows people of a call: its display form, cut to a size they can read.

An agent chooses its arguments, and a tool route takes bodies of megabytes: an
approval that kept them whole would fill the approvers' queue, and every page,
API answer and webhook that shows it, with text no person reads. So when an
approval is stored, :func:`shorten` cuts its display arguments (and an MCP
retry's answers) to a bounded size:

* a text longer than :data:`MAX_TEXT` characters keeps its start and ends with
  a note saying how much is not shown;
* an object or array keeps its first :data:`MAX_ITEMS` entries, then a note;
* a key cut for length whose shortened name another key of the object has
  (or would have) is shown as ``<name> (n)``, ``n`` its place, under a name no
  key of the object has: one key never hides another's value;
* past :data:`MAX_CHARS` characters in all, what is left is dropped the same way.

Each value so cut is named (as a JSON pointer, after ``cut:``) in the
approval's ``redacted`` list, so every view that warns about hidden values
warns about it too: an approver who needs the rest refuses the call. Only the
display is cut: the approval stays bound to the whole call's hash, and the
decision record in the audit log keeps the arguments whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["CUT", "MAX_CHARS", "MAX_ITEMS", "MAX_NAMED", "MAX_TEXT", "MORE", "shorten"]

MAX_TEXT: Final = 1000
"""Characters of one text (a value or a key) an approval shows."""
MAX_ITEMS: Final = 100
"""Entries of one object or array an approval shows."""
MAX_CHARS: Final = 20_000
"""Characters an approval shows of one call in all (texts, keys, and a few per other value)."""
MAX_NAMED: Final = 20
"""Cut values named in ``redacted``; past them, one entry says that more were cut."""
CUT: Final = "cut:"
"""The prefix of a ``redacted`` entry that names a value cut for length."""
MORE: Final = f"{CUT}…"
"""The ``redacted`` entry that says more values were cut than are named."""
_MAX_POINTER: Final = 200
_MORE_KEY: Final = "[cut by Warden]"


def shorten(value: Any, where: str, budget: list[int]) -> tuple[Any, list[str]]:
    """``value`` cut to the limits above, and the ``redacted`` entries of what was cut.

    ``where`` is what the entries start with after :data:`CUT`: ``""`` for the
    arguments (``cut:/note``; ``cut:`` alone: the arguments themselves, a text
    or an object with too many entries), ``input_responses`` for an MCP
    retry's answers. ``budget`` (one number, shared by the calls for one
    approval) is the characters still to show; each call takes what it shows
    from it. Past :data:`MAX_NAMED` cut values, one last entry :data:`MORE`
    says that more were cut.
    """
    cutter = _Cutter(budget[0])
    shown = cutter.walk(value)
    budget[0] = cutter.left
    named = [f"{CUT}{where}{pointer}" for pointer in cutter.cut[:MAX_NAMED]]
    if len(cutter.cut) > MAX_NAMED:
        named.append(MORE)
    return shown, named


class _Cutter:
    """One walk over a value; the JSON pointer of where it is is built only for a cut."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.cut: list[str] = []
        self._path: list[str] = []

    def walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        self.left -= 2  # brackets, or a number, true, false or null: every value costs
        if isinstance(value, Mapping):
            return self._object(value)
        if isinstance(value, list | tuple):
            return self._array(value)
        return value

    def _text(self, text: str) -> str:
        keep = min(len(text), MAX_TEXT, max(self.left, 0))
        self.left -= keep
        if keep == len(text):
            return text
        self._mark()
        return f"{text[:keep]}… [cut by Warden: {len(text) - keep} of {len(text)} characters]"

    def _mark(self) -> None:
        if len(self.cut) > MAX_NAMED:
            return  # one more than are named: "and more"
        pointer = "".join(f"/{p.replace('~', '~0').replace('/', '~1')}" for p in self._path)
        self.cut.append(pointer if len(pointer) <= _MAX_POINTER else f"{pointer[:_MAX_POINTER]}…")

    def _object(self, obj: Mapping[Any, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        keys: set[str] | None = None  # the object's own key names, read once a key is cut
        for n, (key, item) in enumerate(obj.items()):
            if n >= MAX_ITEMS or self.left <= 0:
                self._mark()
                # No key is shown after the note: only one shown already can have its name.
                note = _MORE_KEY if _MORE_KEY not in out else _free(_MORE_KEY, n, out, set())
                out[note] = f"{len(obj) - n} more of {len(obj)} entries not shown"
                break
            name = str(key)
            self._path.append(name[:MAX_TEXT])
            if len(name) > MAX_TEXT:
                name = self._text(name)
                # Its cut name may be another key's (one that reads "… [cut by Warden: …",
                # or "<that> (n)"): renamed to one no key of the object has.
                keys = keys if keys is not None else {str(k) for k in obj}
                if name in keys or name in out:
                    name = _free(name, n, out, keys)
            else:
                self.left -= len(name)
                if name in out:  # keys that are one text (1 and "1"): neither is dropped
                    keys = keys if keys is not None else {str(k) for k in obj}
                    name = _free(name, n, out, keys)
            out[name] = self.walk(item)
            self._path.pop()
        return out

    def _array(self, items: list[Any] | tuple[Any, ...]) -> list[Any]:
        out: list[Any] = []
        for n, item in enumerate(items):
            if n >= MAX_ITEMS or self.left <= 0:
                self._mark()
                out.append(f"[cut by Warden: {len(items) - n} more of {len(items)} items]")
                break
            self._path.append(str(n))
            out.append(self.walk(item))
            self._path.pop()
        return out


def _free(name: str, n: int, out: Mapping[str, Any], keys: set[str]) -> str:
    """``name (n)`` for the ``n``-th key, or the first ``name (n.i)`` that is neither
    shown nor one of the object's ``keys``: a key renamed never takes another's place,
    so no value is dropped from what people see."""
    candidate, i = f"{name} ({n})", 1
    while candidate in out or candidate in keys:
        candidate, i = f"{name} ({n}.{i})", i + 1
    return candidate
