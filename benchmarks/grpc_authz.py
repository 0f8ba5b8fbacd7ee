"""Envoy ext_authz ``Check`` through Warden against a no-op Authorization servicer, same run.

Both servicers run on ``grpc.aio`` servers on 127.0.0.1 in this process and are
driven by the same ``external_auth_pb2_grpc.AuthorizationStub`` client, one
call at a time (1 stream) and 16 calls at a time on one channel (16 streams).
Warden decides every check through the governed core (kill switches, budgets,
the shipped ``policies/envoy-authz`` bundle in its worker processes, a
durable audit record); the request repeats, so the policy answers from its
decision cache (a cache hit). Prints p50/p99 and throughput of each, the
p50 Warden adds at one stream, and the throughput ratio at 16 streams::

    .venv/bin/python benchmarks/grpc_authz.py --calls 3000 --fsync always
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
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from warden.config import load_config
from warden.ingress.envoy_authz import ExtAuthzService
from warden.ops.runtime import tune_runtime
from warden.server import Warden

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "policies" / "envoy-authz"
WARMUP = 200


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allows everything at once: the floor a gRPC ext_authz server cannot beat."""

    async def Check(self, request: Any, context: Any) -> Any:
        response = external_auth_pb2.CheckResponse()
        response.status.code = 0
        return response


def check_request() -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = "10.0.0.7"
    http = request.attributes.request.http
    http.method = "GET"
    http.path = "/orders/A-1001?expand=items"
    http.host = "orders.internal"
    http.headers.update(
        {
            ":method": "GET",
            ":path": "/orders/A-1001?expand=items",
            "authorization": "Bearer reader-token-example",
            "user-agent": "bench",
            "x-request-id": "5f1c2e9a-7d3b",
        }
    )
    return request


@asynccontextmanager
async def serving(servicer: Any) -> AsyncIterator[Any]:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield external_auth_pb2_grpc.AuthorizationStub(channel)
    finally:
        await server.stop(None)


async def run(stub: Any, calls: int, streams: int) -> tuple[list[float], float]:
    """Per-call seconds and total seconds for ``calls`` checks, ``streams`` at a time."""
    request = check_request()
    for _ in range(WARMUP):
        response = await stub.Check(request)
        assert response.status.code == 0, response
    took: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            response = await stub.Check(request)
            took.append(time.perf_counter() - started)
            assert response.status.code == 0

    started = time.perf_counter()
    await asyncio.gather(*(worker(calls // streams) for _ in range(streams)))
    return took, time.perf_counter() - started


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--fsync", default="always", choices=["always", "batch", "never"])
    parser.add_argument("--workers", type=int, default=2, help="policy worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            environ={},
            overrides={
                "policy": {"bundles": [str(BUNDLE)], "watch": False, "workers": args.workers},
                "audit": {"dir": f"{tmp}/audit", "fsync": args.fsync},
                "state": {"url": f"sqlite:///{tmp}/state.db"},
            },
        )
        rows: dict[tuple[str, int], tuple[list[float], float]] = {}
        async with Warden(config, listeners=False) as warden:
            tune_runtime()  # as `warden serve` does once started
            assert warden.core is not None
            service = ExtAuthzService(warden.core, config)
            # Interleaved, so both see the same machine load.
            for streams in (1, 16):
                async with serving(NoopAuthorization()) as stub:
                    rows["no-op", streams] = await run(stub, args.calls, streams)
                async with serving(_Adapter(service)) as stub:
                    rows["warden", streams] = await run(stub, args.calls, streams)
    print(
        f"Envoy ext_authz Check, {args.calls} calls per row, cache hit, "
        f"fsync {args.fsync}, {args.workers} policy workers"
    )
    print(f"{'servicer':10}{'streams':>8}{'p50 ms':>10}{'p99 ms':>10}{'checks/s':>10}")
    for (name, streams), (took, total) in sorted(rows.items(), key=lambda r: (r[0][1], r[0][0])):
        print(
            f"{name:10}{streams:>8}{pct(took, 50):10.3f}{pct(took, 99):10.3f}"
            f"{len(took) / total:10.0f}"
        )
    added = pct(rows["warden", 1][0], 50) - pct(rows["no-op", 1][0], 50)
    print(f"p50 added at 1 stream: {added:.3f} ms")
    for streams in (1, 16):
        (w_took, w_total), (n_took, n_total) = rows["warden", streams], rows["no-op", streams]
        ratio = (len(w_took) / w_total) / (len(n_took) / n_total)
        print(f"throughput ratio at {streams} stream(s) (warden / no-op): {ratio:.2f}")


class _Adapter(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Registers the service on a server of the benchmark's own (as the gRPC door does)."""

    def __init__(self, service: ExtAuthzService) -> None:
        self._service = service

    async def Check(self, request: Any, context: Any) -> Any:
        return await self._service.check(request)


if __name__ == "__main__":
    asyncio.run(main())
