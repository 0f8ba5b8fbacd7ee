"""The one way Warden starts a background task: referenced, named, failures counted.

The event loop keeps only weak references to tasks, so a task nobody holds can
be collected mid-flight, and an exception in a task nobody awaits is only
reported when it is collected, if ever. Bare ``asyncio.create_task`` and
``asyncio.ensure_future`` are therefore banned by lint (ruff ``TID251``);
code calls :func:`spawn` (a task that lives as long as the process needs it)
or :meth:`Tasks.spawn` (a group an owner drains on shutdown)::

    self._poller = tasks.spawn(self._poll(), name="killswitch-poll")

    background = Tasks("outcomes")
    background.spawn(record(...), name="outcome")
    await background.drain()   # graceful stop: wait for what is still running

A task that fails is logged with its name and counted in
``warden_errors_total`` under its stable error code (``internal_error`` for
anything that is not a :class:`~warden.errors.WardenError`). Cancellation is
not a failure.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

from warden.errors import WardenError
from warden.ops import metrics

__all__ = ["Tasks", "spawn"]

log = logging.getLogger("warden.tasks")


class Tasks:
    """A set of background tasks that one owner starts, watches and drains."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._running: set[asyncio.Task[Any]] = set()
        self.failures = 0
        """How many of this group's tasks ended with an exception."""

    def __len__(self) -> int:
        return len(self._running)

    def spawn[T](
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str,
        awaited: bool = False,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        """Start ``coro`` now; the group holds it until it ends.

        ``awaited``: the caller awaits the task and handles its failure itself,
        so it is not logged or counted here a second time. ``context``: run it
        in this context rather than a copy of the caller's (a task that outlives
        the request that started it must not log as that request).
        """
        task = asyncio.get_running_loop().create_task(
            coro, name=f"warden-{self.name}-{name}", context=context
        )
        self._running.add(task)
        task.add_done_callback(self._awaited if awaited else self._done)
        return task

    def _awaited(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.failures += 1
        code = exc.code if isinstance(exc, WardenError) else "internal_error"
        metrics.ERRORS.labels(code).inc()
        log.error("background task %s failed: %s", task.get_name(), exc, exc_info=exc)

    async def drain(self) -> None:
        """Wait until every task (including ones started meanwhile) has ended."""
        while self._running:
            pending = [task for task in self._running if not task.done()]
            if pending:
                await asyncio.wait(pending)
            # Done-callbacks (which empty the set) run on the loop's next pass;
            # awaiting finished futures alone would never yield to it.
            await asyncio.sleep(0)

    async def cancel(self) -> None:
        """Cancel every task (but the one calling) and wait for them to end."""
        current = asyncio.current_task()
        running = [task for task in self._running if task is not current]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        await asyncio.sleep(0)


_process = Tasks("process")


def spawn[T](coro: Coroutine[Any, Any, T], *, name: str, awaited: bool = False) -> asyncio.Task[T]:
    """Start a task the process holds until it ends; its owner may cancel or await it.

    ``awaited`` as in :meth:`Tasks.spawn`.
    """
    return _process.spawn(coro, name=name, awaited=awaited)
