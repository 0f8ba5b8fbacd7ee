"""Interpreter settings for a long-running Warden process.

A governed request allocates a few dozen container objects, many of them
in reference cycles (asyncio tasks and futures, exceptions). With CPython's
default thresholds the cyclic collector ran every twenty or so requests and,
every few thousand, walked the whole heap: the config, the bundles, every
module Warden imported. :func:`tune_gc` moves what startup built out of the
collector's reach (``gc.freeze``) and lets the youngest generation grow
further before a collection. Measured with the gRPC ``Check`` benchmark at
16 streams: time in the collector 33 µs per request before, 5 to 7 µs after.

Only process owners call it (``warden serve``, ``warden mcp wrap`` and the
benchmarks that host Warden the same way); a library embedding Warden keeps
its own settings.
"""

from __future__ import annotations

import gc

__all__ = ["GEN0_THRESHOLD", "tune_gc"]

GEN0_THRESHOLD = 10_000
"""Allocations (net of frees) of container objects before a young collection (CPython: 700)."""


def tune_gc() -> None:
    """Freeze what exists now and collect the young generation less often.

    Call once the server has started, so its long-lived objects are frozen.
    Objects freed by reference counting are freed as always; cyclic garbage
    waits at most ``GEN0_THRESHOLD`` allocations.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
