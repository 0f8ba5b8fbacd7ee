"""Large request bodies are read in a thread beside the event loop, one at a time."""

from __future__ import annotations

import asyncio
import threading
import time

from warden.ingress import off_loop
from warden.ingress.off_loop import LARGE_BYTES


async def test_a_small_body_is_read_on_the_loop_and_a_large_one_in_a_thread() -> None:
    here = threading.get_ident()
    assert await off_loop.read(LARGE_BYTES - 1, threading.get_ident) == here
    assert await off_loop.read(LARGE_BYTES, threading.get_ident) != here


async def test_the_loop_serves_others_while_a_large_body_is_read() -> None:
    ticks = 0
    stop = asyncio.Event()

    async def other_requests() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    def slow_reader() -> int:
        started = time.monotonic()  # busy, as parsing is: no sleep that frees the GIL
        while time.monotonic() - started < 0.2:
            pass
        return ticks

    others = asyncio.get_running_loop().create_task(other_requests())
    seen = await off_loop.read(LARGE_BYTES, slow_reader)
    stop.set()
    await others
    assert seen > 0  # the loop ran while the reader held a thread


async def test_large_reads_take_turns() -> None:
    running = 0
    most = 0

    def reader() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        time.sleep(0.02)
        running -= 1

    await asyncio.gather(*(off_loop.read(LARGE_BYTES, reader) for _ in range(4)))
    assert most == 1
