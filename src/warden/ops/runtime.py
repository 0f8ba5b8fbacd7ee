"""Interpreter settings for a long-running Warden process.

A governed request allocates a few dozen container objects, many of them
in reference cycles (asyncio tasks and futures, exceptions). With CPython's
default thresholds the cyclic collector ran every twenty or so requests and,
every few thousand, walked the whole heap: the config, the bundles, every
module Warden imported. :func:`tune_gc` moves what startup built out of the
collector's reach (``gc.freeze``) and lets the youngest generation grow
further before a collection. Measured with the gRPC ``Check`` benchmark at
16 streams: time in the collector 33 µs per request before, 5 to 7 µs after.

:func:`tune_runtime` also shortens the interpreter's switch interval. The
drift monitor recomputes its gauges in a thread, a few hundred milliseconds
of Python on a busy sidecar; each time the event loop wanted the interpreter
back meanwhile it waited out the whole interval (5 ms by default), and a
request, which wants it back a dozen times, took 50 to 100 ms instead of one
(``benchmarks/overhead.py``, the run after a recompute). At 0.5 ms the same
requests stayed under 10 ms, and the throughput figures did not move.

Only process owners call them (``warden serve``, ``warden mcp wrap`` and the
benchmarks that host Warden the same way); a library embedding Warden keeps
its own settings.

:func:`raise_open_files` lifts the soft open-file limit (often 1,024) towards
what the listeners' connection caps need, as Go's runtime and nginx do.

:func:`undumpable` keeps other processes of the same user out of this one's
``/proc`` entries: ``warden mcp wrap`` and the policy workers call it, as the
MCP server the wrap starts runs as Warden's user unless told otherwise.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

__all__ = [
    "GEN0_THRESHOLD",
    "SWITCH_INTERVAL_S",
    "raise_open_files",
    "tune_gc",
    "tune_runtime",
    "undumpable",
]

GEN0_THRESHOLD = 10_000
"""Allocations (net of frees) of container objects before a young collection (CPython: 700)."""
SWITCH_INTERVAL_S = 0.0005
"""How long a thread may keep the interpreter from another that wants it (CPython: 5 ms)."""


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


def tune_runtime() -> None:
    """:func:`tune_gc`, and the switch interval set to :data:`SWITCH_INTERVAL_S`.

    Call once the server has started (``warden serve``, ``warden mcp wrap``).
    """
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL_S)


_PR_SET_DUMPABLE = 4


def undumpable() -> None:
    """Keep processes of this user out of this one's ``/proc`` entries.

    A wrapped MCP server of the same user could otherwise read
    ``/proc/<pid>/environ`` (``WARDEN_TOKEN``, ``PGPASSWORD``: what
    :func:`warden.ingress.mcp_stdio.child_env` withholds) and open
    ``/proc/<pid>/fd/<n>`` (the wrap's copy of the client's stdout, to answer the
    client behind Warden's back; a policy worker's socket, to answer for it). A
    process that is not dumpable (``PR_SET_DUMPABLE`` 0) passes those checks only
    for a reader with ``CAP_SYS_PTRACE``, and cannot be traced either. An ``exec``
    makes a process dumpable again (the server, and each policy worker, which
    calls this itself). Linux only; elsewhere a no-op.

    Raises :class:`OSError` when the kernel refuses.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)  # prctl reads its arguments as unsigned longs
    if libc.prctl(_PR_SET_DUMPABLE, zero, zero, zero, zero) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_DUMPABLE): {os.strerror(errno)}")


def raise_open_files(needed: int) -> int:
    """Raise the soft open-file limit to ``needed`` if it is lower; return it as it is now.

    Never past the hard limit, which only a privileged process may raise. Where
    the ``resource`` module is missing (Windows), returns ``needed``.
    """
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - POSIX only
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
