"""What the live monitor's kept events cost each full garbage collection, against none kept.

A busy sidecar's monitor keeps up to ``monitor.max_events`` decisions and as
many outcomes for its windows. Every full collection (which Python runs as
long-lived objects pile up) pauses all of Warden's threads, the event loop
included, for as long as it walks the tracked objects. Measured, same run:

* ``none``: nothing kept (the reference);
* ``events``: the events as :class:`~warden.monitor.events.DecisionEvent` and
  ``OutcomeEvent`` objects (how the monitor kept them before);
* ``rows``: as the plain tuples the monitor keeps now
  (:func:`~warden.monitor.events.row_of`), which the collector stops tracking.

Prints the median full-collection time of each, in ms::

    python benchmarks/monitor_gc.py [--events 500000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from warden.monitor.events import event_of, row_of  # noqa: E402


def records(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A decision record and its outcome, shaped as the audit log stores them."""
    when = f"2026-12-01T07:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}+00:00"
    agent = {"id": "support-triage", "version": "1.4.2"}
    action = {
        "id": f"act_{i:012x}_bench",
        "kind": "tool_call",
        "tool": "issue_refund" if i % 3 == 0 else "search_kb",
        "stage": "proposed",
        "arguments": {"order_id": f"A-{i}", "amount": 25 + i % 100},
        "context": {"session_id": f"conv-{i % 5000}"},
    }
    decision = {"id": f"dec_{i:012x}_bench", "effect": "allow", "guard": "policy"}
    decided = {"kind": "decision", "time": when, "agent": agent, "action": action}
    decided["decision"] = {**decision, "elapsed_us": 300 + i % 50}
    outcome = {"kind": "outcome", "time": when, "agent": agent, "action": action}
    outcome |= {"decision_id": decision["id"], "outcome": {"status": 200, "latency_ms": 1.5}}
    return decided, outcome


def full_collection_ms(rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000, help="decisions (and outcomes)")
    args = parser.parse_args()
    gc.collect()
    gc.freeze()  # as warden serve does once started: what startup built is not walked
    figures = {"none": full_collection_ms()}
    for name, convert in (("events", event_of), ("rows", row_of)):
        kept: deque[Any] = deque()
        for i in range(args.events):
            for record in records(i):
                kept.append(convert(record))
        figures[name] = full_collection_ms()
        del kept
        gc.collect()
    print(f"full garbage collection, ms ({args.events:,} decisions and as many outcomes kept)")
    for name, ms in figures.items():
        print(f"{name:8}{ms:>10.1f}")
    print(f"events ÷ rows: {figures['events'] / max(figures['rows'], 1e-3):.1f}")


if __name__ == "__main__":
    main()
