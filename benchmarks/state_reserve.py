"""State backend benchmark: budget reservations and kill-switch propagation.

    python benchmarks/state_reserve.py [--ops 3000] [--concurrency 8] [--url postgresql://...]
        [--if-available]

Measures, on this machine:

* reservation throughput and latency (p50, p99) of ``reserve`` + ``settle``
  pairs against one hot counter: three sidecars (three backends, each with
  its own pool) on one PostgreSQL, against one SQLite store, with
  ``--concurrency`` callers per sidecar;
* kill-switch propagation: the time from a switch stored through one
  instance to the other instance's in-memory index having it (the change
  feed: LISTEN/NOTIFY on PostgreSQL, polling on SQLite), p50 and p99.

Without ``--url`` (the password from ``PGPASSWORD``), a throwaway PostgreSQL
server is started as the tests start one (tests/pg.py). Prints a table and
writes ``benchmarks/results/state.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import pg  # noqa: E402

from warden.config import StateConfig  # noqa: E402
from warden.killswitch import KillSwitches, Scope  # noqa: E402
from warden.state import Hold  # noqa: E402
from warden.state.backend import StateBackend, open_state  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "state.json"


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def reservations(
    sidecars: Sequence[StateBackend], ops: int, concurrency: int
) -> dict[str, float]:
    """``ops`` reserve+settle pairs spread over the sidecars, ``concurrency`` callers each."""
    latencies: list[float] = []
    per_caller = ops // (len(sidecars) * concurrency)
    hold = Hold("bench", "day", "agent:a", 1.0, limit=1e12)

    async def caller(backend: StateBackend, name: str) -> None:
        for i in range(per_caller):
            rid = f"{name}-{i}"
            started = time.perf_counter()
            result = await backend.budgets.reserve(rid, [hold])
            latencies.append(time.perf_counter() - started)
            assert result.reserved
            await backend.budgets.settle(rid, None)

    started = time.perf_counter()
    await asyncio.gather(
        *(
            caller(backend, f"s{s}c{c}")
            for s, backend in enumerate(sidecars)
            for c in range(concurrency)
        )
    )
    elapsed = time.perf_counter() - started
    return {
        "reservations": len(latencies),
        "per_s": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
    }


async def propagation(here: StateBackend, there: StateBackend, rounds: int) -> dict[str, float]:
    """Switches thrown through ``there``, seen in ``here``'s memory: seconds each."""
    watcher = KillSwitches(here.killswitches, None, feed=here.feed)
    thrower = KillSwitches(there.killswitches, None, feed=there.feed)
    await watcher.start()
    await thrower.start()
    samples: list[float] = []
    try:
        for i in range(rounds):
            target = f"tool-{i}"
            started = time.perf_counter()
            switch = await thrower.set(Scope.TOOL, target, "bench", "bench")
            while watcher.is_killed("a", None, target) is None:
                await watcher.wait_changed()
            samples.append(time.perf_counter() - started)
            await thrower.clear(switch.id, "bench")
            while watcher.is_killed("a", None, target) is not None:
                await watcher.wait_changed()
    finally:
        await watcher.close()
        await thrower.close()
    return {
        "rounds": rounds,
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": pct(samples, 0.99) * 1000,
        "max_ms": max(samples) * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server: pg.PgServer | None = None
    if args.url:
        pg_config = StateConfig(url=args.url)
    else:
        found = pg.start()
        if isinstance(found, str):
            if args.if_available:  # `make bench` on a machine without PostgreSQL
                print(f"state benchmark skipped: no PostgreSQL ({found})")
                raise SystemExit(0)
            raise SystemExit(f"no PostgreSQL: {found}")
        server = found
        pg_config = StateConfig(
            url=server.url(server.create_database()), password_file=str(server.password_file)
        )
    out: dict[str, Any] = {"machine": platform.platform(), "python": sys.version.split()[0]}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lite_config = StateConfig(url=f"sqlite:///{tmp}/state.db")
            lite = [await open_state(lite_config) for _ in range(2)]
            fleet = [await open_state(pg_config) for _ in range(3)]
            try:
                await reservations(fleet, 300, args.concurrency)  # warm the pools
                out["postgresql_3_sidecars"] = await reservations(fleet, args.ops, args.concurrency)
                out["sqlite_1_store"] = await reservations(lite[:1], args.ops, args.concurrency)
                out["killswitch_postgresql"] = await propagation(fleet[0], fleet[1], args.rounds)
                out["killswitch_sqlite"] = await propagation(lite[0], lite[1], args.rounds // 4)
            finally:
                for backend in (*fleet, *lite):
                    await backend.close()
    finally:
        if server is not None:
            server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000, help="reservations per backend")
    parser.add_argument("--concurrency", type=int, default=8, help="callers per sidecar")
    parser.add_argument("--rounds", type=int, default=200, help="kill switches to propagate")
    parser.add_argument("--url", help="an existing PostgreSQL database (password: PGPASSWORD)")
    parser.add_argument(
        "--if-available",
        action="store_true",
        help="without --url and PostgreSQL's server binaries: say so and exit 0",
    )
    args = parser.parse_args()
    out = asyncio.run(run(args))
    fleet, lite = out["postgresql_3_sidecars"], out["sqlite_1_store"]
    print("fleet state: reservations and kill-switch propagation (benchmarks/state_reserve.py)")
    print(f"{'reservations':<34}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in (("PostgreSQL, 3 sidecars", fleet), ("SQLite, 1 store", lite)):
        print(f"{name:<34}{row['per_s']:>10.0f}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    print(f"{'kill-switch propagation':<34}{'rounds':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in (
        ("PostgreSQL (LISTEN/NOTIFY)", out["killswitch_postgresql"]),
        ("SQLite (polling)", out["killswitch_sqlite"]),
    ):
        print(f"{name:<34}{row['rounds']:>10}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}")
    p99 = out["killswitch_postgresql"]["p99_ms"]
    print(f"a kill switch reaches another sidecar in {p99:.1f} ms at p99 (target: 1000 ms)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
