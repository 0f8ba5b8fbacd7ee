"""Reading a large request in a thread beside the event loop, one request at a time.

Reading a tool request's body for its route rule (its JSON, every form field
name, every multipart part name) is Python work that grows with its size: up to
half a second for a 10 MiB body. On the event loop that stalls every other
request Warden is serving; in a thread the loop keeps running (the interpreter
is handed back every few milliseconds). One such read at a time keeps a burst of
large bodies from taking more than half of the loop's time.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Final

__all__ = ["LARGE_BYTES", "read"]

LARGE_BYTES: Final = 64 * 1024
"""Bodies from this size are read in a thread (below it, a thread costs more than it saves)."""

_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def read[T](size: int, reader: Callable[[], T]) -> T:
    """``reader()``: here for a body under :data:`LARGE_BYTES`, else in a thread, one at a time."""
    if size < LARGE_BYTES:
        return reader()
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(1)
    async with gate:
        return await asyncio.to_thread(reader)
