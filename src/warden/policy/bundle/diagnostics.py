"""The engine's error texts turned into ``file:line:col: message`` lines.

Pure text work on the s-expressions rego-cpp reports, so the proxy can
describe a worker's error without loading the engine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from warden.policy.bundle.model import Module

__all__ = ["describe_rego_error", "display_path", "line_col"]

_LOCATION = re.compile(r"(\d+):([^\s|()]+)\|(\d+)\|(\d+)")
_ERRORMSG = re.compile(r"\(errormsg (\d+):")


def line_col(source: str, byte_offset: int) -> tuple[int, int]:
    """The 1-based line and column of a UTF-8 byte offset into ``source``."""
    prefix = source.encode("utf-8")[:byte_offset].decode("utf-8", errors="replace")
    line = prefix.count("\n") + 1
    col = len(prefix) - (prefix.rfind("\n") + 1) + 1
    return line, col


def display_path(label: str, path: str) -> str:
    """A module's path as shown in messages: under the bundle's label when there is one."""
    return f"{label}/{path}" if label else path


def describe_rego_error(text: str, modules: Sequence[Module], *, label: str = "") -> list[str]:
    """Turn a regopy error s-expression into ``file:line:col: message`` lines."""
    by_path = {m.path: m for m in modules}
    out: list[str] = []
    chunks = re.split(r"\(error\b", text)[1:] or [text]
    for chunk in chunks:
        msg = "error"
        m = _ERRORMSG.search(chunk)
        if m is not None:
            # The length prefix counts bytes, so slice the encoded text.
            raw = chunk.encode()
            start = len(chunk[: m.end()].encode())
            msg = raw[start : start + int(m.group(1))].decode(errors="replace")
        where = label or "policy"
        for loc in _LOCATION.finditer(chunk):
            module = by_path.get(loc.group(2))
            if module is not None:
                line, col = line_col(module.source, int(loc.group(3)))
                where = f"{display_path(label, module.path)}:{line}:{col}"
                break
        text = f"{where}: {msg}"
        if text not in out:
            out.append(text)
    return out
