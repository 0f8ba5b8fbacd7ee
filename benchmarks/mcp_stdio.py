"""MCP ``tools/call`` over stdio: through ``warden mcp wrap`` against the same server direct.

Both are driven from this process, one after the other, with the official
``mcp`` client and the test server (:mod:`warden.testing.mcp_server`); one
call at a time, in alternating rounds (a fresh session each) so both see the
same machine load. Prints the medians over rounds of p50 and p99 latency of
each, the p50 Warden adds, and the throughput ratio (wrapped / direct), with
the ratio of every round::

    .venv/bin/python benchmarks/mcp_stdio.py --calls 300 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

ROOT = Path(__file__).resolve().parents[1]
SERVER = [sys.executable, "-m", "warden.testing.mcp_server"]


def wrap_config(tmp: Path, fsync: str) -> Path:
    config = {
        "agent": {"id": "support-triage"},
        "policy": {"bundles": [str(ROOT / "policies" / "customer-support")], "watch": False},
        "audit": {"dir": str(tmp / "audit"), "fsync": fsync},
        "state": {"url": f"sqlite:///{tmp}/state.db"},
    }
    path = tmp / "warden.yaml"
    path.write_bytes(orjson.dumps(config))
    return path


async def timings(params: StdioServerParameters, calls: int) -> list[float]:
    """Seconds per ``get_order`` call, after a few warm-up calls."""
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        for _ in range(20):
            await session.call_tool("get_order", {"order_id": "A-1001"})
        took = []
        for _ in range(calls):
            started = time.perf_counter()
            result = await session.call_tool("get_order", {"order_id": "A-1001"})
            took.append(time.perf_counter() - started)
            assert not result.is_error
        return took


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians")
    parser.add_argument("--fsync", default="always", choices=["always", "batch", "never"])
    args = parser.parse_args()
    direct_params = StdioServerParameters(command=SERVER[0], args=SERVER[1:])
    rounds: list[tuple[list[float], list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        wrap = [
            "-m",
            "warden.cli",
            "mcp",
            "wrap",
            "--config",
            str(wrap_config(Path(tmp), args.fsync)),
        ]
        wrapped_params = StdioServerParameters(command=sys.executable, args=[*wrap, "--", *SERVER])
        for _ in range(args.rounds):
            direct = await timings(direct_params, args.calls)
            rounds.append((direct, await timings(wrapped_params, args.calls)))

    def med(side: int, figure: Callable[[list[float]], float]) -> float:
        return statistics.median(figure(pair[side]) for pair in rounds)

    print(
        f"MCP tools/call over stdio, {args.calls} calls, one at a time, fsync {args.fsync}, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'':10}{'p50 ms':>10}{'p99 ms':>10}{'calls/s':>10}")
    for name, side in (("direct", 0), ("warden", 1)):
        p50, p99 = med(side, lambda t: p(t, 50)), med(side, lambda t: p(t, 99))
        print(f"{name:10}{p50:10.2f}{p99:10.2f}{med(side, lambda t: len(t) / sum(t)):10.0f}")
    added = statistics.median(p(w, 50) - p(d, 50) for d, w in rounds)
    ratios = [sum(d) / sum(w) for d, w in rounds]
    print(f"p50 added: {added:.2f} ms")
    print(
        f"ratio (warden / direct throughput): {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    asyncio.run(main())
