"""MCP ``tools/call`` over streamable HTTP: through Warden against the same server direct.

The test server (:mod:`warden.testing.mcp_server`, the SDK's MCPServer under
uvicorn) and ``warden serve`` (the shipped customer-support policy, fsync
``always``) each run as their own process; the official ``mcp`` client runs
here, one call at a time (c=1), alternating direct and Warden rounds on the
same server. Prints p50 and p99 of each, the p50 Warden adds, and the
throughput ratio (Warden / direct)::

    .venv/bin/python benchmarks/mcp_http.py --calls 300 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parents[1]


def start(cmd: list[str], marker: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a server; return it and its first stdout line (or the stderr line with ``marker``)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if marker else subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    stream = proc.stderr if marker else proc.stdout
    assert stream is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"{cmd} exited before it was ready")
        if marker is None or marker in line:
            return proc, line.strip()
    raise RuntimeError(f"{cmd} did not start in time")


def warden_config(tmp: Path, server_url: str, fsync: str) -> Path:
    path = tmp / "warden.yaml"
    config = {
        "agent": {"id": "support-triage"},
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "upstreams": {"support-tools": {"protocol": "mcp", "base_url": server_url}},
        "policy": {"bundles": [str(ROOT / "policies" / "customer-support")], "watch": False},
        "audit": {"dir": str(tmp / "audit"), "fsync": fsync},
        "state": {"url": f"sqlite:///{tmp}/state.db"},
    }
    path.write_text(json.dumps(config))
    return path


async def timings(url: str, calls: int) -> list[float]:
    """Seconds per ``get_order`` call on one session, after a few warm-up calls."""
    async with (
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
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


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", default="always", choices=["always", "batch", "never"])
    args = parser.parse_args()
    py = sys.executable
    warden_bin = str(Path(py).with_name("warden"))
    procs: list[subprocess.Popen[str]] = []
    direct: list[list[float]] = []
    through: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
        try:
            server, server_url = start(
                [py, "-m", "warden.testing.mcp_server", "--transport", "streamable-http"]
            )
            procs.append(server)
            warden, line = start(
                [
                    warden_bin,
                    "serve",
                    "--config",
                    str(warden_config(Path(tmp), server_url, args.fsync)),
                ],
                marker="proxy http",
            )
            procs.append(warden)
            proxy = line.split("proxy ", 1)[1].split()[0]
            for _ in range(args.rounds):
                direct.append(await timings(server_url, args.calls))
                through.append(await timings(f"{proxy}/support-tools", args.calls))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    # The median round by p50, so one noisy round on a shared machine does not decide.
    d = sorted(direct, key=lambda t: p(t, 50))[len(direct) // 2]
    w = sorted(through, key=lambda t: p(t, 50))[len(through) // 2]
    print(
        f"MCP tools/call over streamable HTTP, c=1, {args.calls} calls x {args.rounds} rounds "
        f"(median round), fsync {args.fsync}"
    )
    print(f"{'':10}{'p50 ms':>10}{'p99 ms':>10}{'calls/s':>10}")
    for name, took in (("direct", d), ("warden", w)):
        print(f"{name:10}{p(took, 50):10.2f}{p(took, 99):10.2f}{len(took) / sum(took):10.0f}")
    print(f"p50 added: {p(w, 50) - p(d, 50):.2f} ms")
    print(f"ratio (warden / direct throughput): {sum(d) / sum(w):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
