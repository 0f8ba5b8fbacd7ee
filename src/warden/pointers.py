"""RFC 6901 JSON pointers, read one way wherever Warden follows one.

Cap values and customers (``budgets.caps[].value``), the session pointer
(``sessions.pointer``) and a tool schema's local ``$ref`` all name a place in
a JSON document the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["pointer_get"]


def pointer_get(doc: Any, pointer: str) -> tuple[bool, Any]:
    """Resolve an RFC 6901 JSON pointer: ``(True, value)``, or ``(False, None)`` if absent.

    Array indexes are decimal without leading zeros, as the RFC says; ``-``
    (past the end) never resolves. A pointer that is neither empty nor starts
    with ``/`` names nothing.
    """
    if pointer == "":
        return True, doc
    if not pointer.startswith("/"):
        return False, None
    node = doc
    for raw in pointer[1:].split("/"):
        step = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping):
            if step not in node:
                return False, None
            node = node[step]
        elif isinstance(node, list):
            if not step.isdecimal() or (step != "0" and step.startswith("0")):
                return False, None
            index = int(step)
            if index >= len(node):
                return False, None
            node = node[index]
        else:
            return False, None
    return True, node
