"""What Warden costs on the proxy path, as ratios measured in one run.

Three targets, each its own process, the same fake upstream behind all:

* ``direct``: the fake upstream reached directly;
* ``reference``: through a bare aiohttp pass-through proxy (reference_proxy.py);
* ``warden``: through ``warden serve`` with the shipped customer-support policy
  and the audit log on (fsync ``always``: each decision is durable before the
  request goes on).

Closed loop at fixed concurrency with keep-alive. Targets are measured in
alternating rounds and the median round is reported, because these machines
are shared and noisy. Scenarios: ``text`` (a plain answer: one llm_call
decision) and ``tool`` (the answer proposes one allowed tool call: a second
decision and a rewrite check).

    python benchmarks/overhead.py [--seconds 3] [--rounds 3] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TEXT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Where is my order?"}]}
).encode()
TOOL_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Where is my order?"}],
        "tools": [{"type": "function", "function": {"name": "search_kb", "parameters": {}}}],
    }
).encode()


@dataclass
class Result:
    target: str
    scenario: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _start(cmd: list[str], marker: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a server process; return it and the URL it reports on its first line."""
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
            raise RuntimeError(f"{cmd[1]} exited before it was ready")
        if marker is None:
            return proc, line.strip()
        if marker in line:
            # "warden 0.1.0: proxy http://127.0.0.1:PORT  admin ..."
            return proc, line.split("proxy ", 1)[1].split()[0]
    raise RuntimeError(f"{cmd} did not start in time")


async def _load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def _measure(
    target: str, url: str, scenario: str, body: bytes, concurrency: int, seconds: float
) -> Result:
    asyncio.run(_load(url, body, concurrency, min(1.0, seconds / 3)))  # warm-up: pools, caches
    t0 = time.perf_counter()
    latencies, errors = asyncio.run(_load(url, body, concurrency, seconds))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return Result(
        target=target,
        scenario=scenario,
        concurrency=concurrency,
        requests=len(latencies),
        rps=len(latencies) / elapsed,
        p50_ms=latencies[len(latencies) // 2] * 1e3,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        errors=errors,
    )


def _median(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rps)
    mid = ordered[len(ordered) // 2]
    return Result(
        target=mid.target,
        scenario=mid.scenario,
        concurrency=mid.concurrency,
        requests=sum(r.requests for r in results),
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args()

    py = sys.executable
    warden_bin = str(Path(py).with_name("warden"))
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
        try:
            upstream, upstream_url = _start([py, str(HERE / "fake_upstream.py")])
            procs.append(upstream)
            ref, ref_url = _start(
                [py, str(HERE / "reference_proxy.py"), "--upstream", upstream_url]
            )
            procs.append(ref)
            config = Path(tmp) / "warden.yaml"
            config.write_text(
                json.dumps(
                    {
                        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                        "upstreams": {"openai": {"protocol": "openai", "base_url": upstream_url}},
                        "policy": {"bundles": [str(ROOT / "policies" / "customer-support")]},
                        "audit": {"dir": str(Path(tmp) / "audit"), "fsync": "always"},
                        "state": {"url": f"sqlite:///{tmp}/state.db"},
                    }
                )
            )
            warden, warden_url = _start(
                [warden_bin, "serve", "--config", str(config), "--log-level", "warning"],
                marker="proxy http",
            )
            procs.append(warden)
            targets = {
                "direct": f"{upstream_url}/v1/chat/completions",
                "reference": f"{ref_url}/openai/v1/chat/completions",
                "warden": f"{warden_url}/openai/v1/chat/completions",
            }
            scenarios = {"text": TEXT_BODY, "tool": TOOL_BODY}
            runs: dict[tuple[str, str, int], list[Result]] = {}
            for rnd in range(args.rounds):
                for conc in args.concurrency:
                    for scenario, body in scenarios.items():
                        for target, url in targets.items():
                            result = _measure(target, url, scenario, body, conc, args.seconds)
                            runs.setdefault((target, scenario, conc), []).append(result)
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    results = {key: _median(value) for key, value in runs.items()}
    rows = []
    print(
        f"\n{'scenario':8} {'conc':>4} {'target':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'vs ref':>7} {'+p50 vs direct':>15}"
    )
    for (target, scenario, conc), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        ref = results[("reference", scenario, conc)]
        direct = results[("direct", scenario, conc)]
        ratio = r.rps / ref.rps
        added = r.p50_ms - direct.p50_ms
        rows.append({**asdict(r), "throughput_vs_reference": ratio, "p50_added_ms": added})
        print(
            f"{scenario:8} {conc:>4} {target:10} {r.rps:>9.0f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f}"
            f" {ratio:>7.2f} {added:>+15.3f}"
        )
    summary = {}
    for scenario in scenarios:
        for conc in args.concurrency:
            w = results[("warden", scenario, conc)]
            summary[f"{scenario}_c{conc}"] = {
                "warden_vs_reference_throughput": w.rps
                / results[("reference", scenario, conc)].rps,
                "warden_p50_added_ms_vs_direct": w.p50_ms
                - results[("direct", scenario, conc)].p50_ms,
            }
    print("\nTargets: throughput vs reference >= 0.60; p50 added at concurrency 1 <= 1 ms")
    for key, value in summary.items():
        print(
            f"  {key:10} warden/reference = {value['warden_vs_reference_throughput']:.2f}"
            f"   p50 added = {value['warden_p50_added_ms_vs_direct']:+.3f} ms"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "seconds": args.seconds,
                "rounds": args.rounds,
                "results": rows,
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")
    errors = sum(r.errors for r in results.values())
    if errors:
        print(f"{errors} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
