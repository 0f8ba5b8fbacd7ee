"""``warden.v1.Governance/Check`` through Warden against a no-op Governance servicer, same run.

Both servicers run on ``grpc.aio`` servers on 127.0.0.1 in this process and
are driven by the same generated ``GovernanceStub``, one call at a time
(1 stream) and 16 calls at a time on one channel (16 concurrent streams).
Warden decides every check through the governed core (kill switches,
budgets, the shipped customer-support bundle in its worker processes, a
durable audit record); the request repeats, so the policy answers from its
decision cache (a cache hit). The no-op servicer answers allow at once.
Prints p50/p99 and throughput of each, the p50 Warden adds at one stream and
the throughput ratio at 16 streams. Targets: ratio >= 0.5, p50 added <= 0.5 ms::

    .venv/bin/python benchmarks/grpc_check.py --calls 3000 --fsync always
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
from google.protobuf import struct_pb2

from warden.config import load_config
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.ops.runtime import tune_runtime
from warden.server import Warden

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "policies" / "customer-support"
WARMUP = 200
RATIO_TARGET = 0.5
ADDED_TARGET_MS = 0.5


class NoopGovernance(pb_grpc.GovernanceServicer):
    """Allows everything at once: the floor a gRPC Check server cannot beat."""

    async def Check(self, request: Any, context: Any) -> Any:
        return pb.CheckResponse(decision_id="dec_noop", effect=pb.EFFECT_ALLOW, reason="ok")


def check_request() -> pb.CheckRequest:
    arguments = struct_pb2.Struct()
    arguments.update({"query": "refund policy", "limit": 5})
    return pb.CheckRequest(action=pb.Action(tool="search_kb", arguments=arguments))


@asynccontextmanager
async def noop_server() -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_GovernanceServicer_to_server(NoopGovernance(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def run(stub: Any, calls: int, streams: int) -> tuple[list[float], float]:
    """Latencies (ms) of ``calls`` checks made ``streams`` at a time, and calls per second."""
    request = check_request()
    latencies: list[float] = []
    per_stream = calls // streams

    async def worker() -> None:
        for _ in range(per_stream):
            started = time.perf_counter()
            answer = await stub.Check(request)
            latencies.append((time.perf_counter() - started) * 1000)
            assert answer.effect == pb.EFFECT_ALLOW, answer.reason

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    return latencies, len(latencies) / (time.perf_counter() - began)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def measure(address: str, calls: int) -> dict[int, tuple[list[float], float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = pb_grpc.GovernanceStub(channel)
        await run(stub, WARMUP, 1)
        return {streams: await run(stub, calls, streams) for streams in (1, 16)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="checks per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians")
    parser.add_argument("--fsync", choices=["always", "batch", "never"], default="always")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            environ={},
            overrides={
                "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", "grpc": "127.0.0.1:0"},
                "tools": {"search_kb": {"risk": "read_only"}},
                "policy": {"bundles": [str(BUNDLE)], "workers": 2, "watch": False},
                "audit": {"dir": f"{tmp}/audit", "fsync": args.fsync},
                "state": {"url": f"sqlite:///{tmp}/state.db"},
            },
        )
        results: dict[str, list[dict[int, tuple[list[float], float]]]] = {"noop": [], "warden": []}
        async with Warden(config) as warden, noop_server() as noop:
            tune_runtime()  # as `warden serve` does once started
            for _ in range(args.rounds):
                results["noop"].append(await measure(noop, args.calls))
                results["warden"].append(await measure(warden.grpc_address, args.calls))

    def med(name: str, streams: int, what: str) -> float:
        values = []
        for one in results[name]:
            lat, rate = one[streams]
            values.append({"p50": pct(lat, 50), "p99": pct(lat, 99), "rate": rate}[what])
        return statistics.median(values)

    print(
        f"\nwarden.v1.Governance/Check, cache hit, fsync {args.fsync}, {args.calls} calls, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'calls/s':>10}")
    for name in ("noop", "warden"):
        for streams in (1, 16):
            print(
                f"{name + f' ({streams} stream' + ('s' if streams > 1 else '') + ')':24}"
                f"{med(name, streams, 'p50'):>10.3f}{med(name, streams, 'p99'):>10.3f}"
                f"{med(name, streams, 'rate'):>10.0f}"
            )
    added = med("warden", 1, "p50") - med("noop", 1, "p50")
    ratio = med("warden", 16, "rate") / med("noop", 16, "rate")
    print()
    print(f"{'figure':46}{'measured':>12}  target")
    print(
        f"{'p50 added at 1 stream (cache hit)':46}{added:>10.3f}ms  <= {ADDED_TARGET_MS} ms "
        f"{'met' if added <= ADDED_TARGET_MS else 'MISSED'}"
    )
    print(
        f"{'throughput / no-op at 16 streams':46}{ratio:>12.2f}  >= {RATIO_TARGET} "
        f"{'met' if ratio >= RATIO_TARGET else 'MISSED'}"
    )


if __name__ == "__main__":
    asyncio.run(main())
