"""What Warden costs on the proxy path, as ratios measured in one run: issue 10's table.

Three targets, each its own process, the same fake upstream behind all:

* ``direct``: the fake upstream reached directly;
* ``reference``: a bare aiohttp pass-through proxy (reference_proxy.py);
* ``warden``: ``warden serve`` on its defaults (fsync ``always``: each decision
  is durable before the request goes on) with the shipped customer-support policy.

Load comes from ``wrk`` (closed loop, keep-alive, one thread) when it is
installed, else from a Python/aiohttp runner. Targets are measured in
alternating rounds and the median round is reported: these machines are
shared and noisy. Scenarios:

* ``tool``: the answer proposes one allowed tool call (two decisions);
* ``text``: a text answer to a request that declares tools (one decision);
* ``fixed``: a constant request rate (open loop, latency from each request's
  scheduled start, so a stall is not hidden) over 32 connections with 1 KB
  request bodies, in the style of published gateway benchmarks. Always the
  Python generator: wrk cannot hold a rate (wrk2, which can, is not packaged);
* ``burst``: 64 connections whose every tool call has new arguments (each
  decision a policy cache miss), counting fallback decisions (target 0) and
  503 push-backs from the admin metrics.

CPU per request is read from ``/proc/<pid>/stat`` (utime + stime, Warden's
policy workers included) over the c=16 tool run. The policy's cache-miss p50
is measured with the engine's real worker processes (benchmarks/policy.py).

    python benchmarks/overhead.py [--seconds 3] [--rounds 3] [--rate 400] [--python-load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

_MESSAGES = [{"role": "user", "content": "Where is my order?"}]
_TOOLS = [{"type": "function", "function": {"name": "search_kb", "parameters": {}}}]
# The fake upstream answers with a tool call when the request declares tools,
# unless the model is "bench-text"; "bench-burst" gets fresh arguments each time.
TOOL_BODY = json.dumps({"model": "gpt-4o-mini", "messages": _MESSAGES, "tools": _TOOLS}).encode()
TEXT_BODY = json.dumps({"model": "bench-text", "messages": _MESSAGES, "tools": _TOOLS}).encode()
BURST_BODY = json.dumps({"model": "bench-burst", "messages": _MESSAGES, "tools": _TOOLS}).encode()


def _padded(size: int) -> bytes:
    def body(content: str) -> bytes:
        message = {"role": "user", "content": content}
        return json.dumps({"model": "bench-text", "messages": [message], "tools": _TOOLS}).encode()

    room = size - len(body(""))
    return body(("Where is my order? " * (room // 19 + 1))[:room])


FIXED_BODY = _padded(1024)
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}

TARGETS = {
    "tool_c16_ratio": 0.60,
    "text_c16_ratio": 0.70,
    "tool_c1_p50_added_ms": 1.0,
    "cpu_ratio": 2.0,
    "policy_miss_p50_us": 300.0,
    "burst_fallbacks": 0,
}


@dataclass
class Run:
    """One load run against one target."""

    target: str
    scenario: str
    connections: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    cpu_ms_per_req: float | None = None


# -- processes ----------------------------------------------------------------------------------


def _start(cmd: list[str], marker: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a server; return it and its first output line (or the marker line)."""
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
        if marker is None or marker in line:
            return proc, line.strip()
    raise RuntimeError(f"{cmd} did not start in time")


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and its live children, in clock ticks."""
    total = 0
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                pids += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total


def _metric(admin: str, name: str) -> float:
    """The sum of a metric's samples on Warden's admin /metrics."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and (line[len(name)] in " {")
    )


# -- load generators ------------------------------------------------------------------------------

_LUA = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
done = function(summary, latency, requests)
  io.write(string.format(
    "WRK %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
"""


def _wrk(url: str, body: bytes, connections: int, seconds: float, tmp: Path) -> Run:
    script = tmp / "post.lua"
    script.write_text(_LUA % body.decode())
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    requests, duration_us, p50_us, p99_us, non2xx = (int(v) for v in line.split()[1:])
    return Run(
        "",
        "",
        connections,
        requests,
        requests / (duration_us / 1e6),
        p50_us / 1e3,
        p99_us / 1e3,
        non2xx,
    )


async def _closed_loop(url: str, body: bytes, connections: int, seconds: float) -> Run:
    latencies: list[float] = []
    non2xx = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal non2xx
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=HEADERS) as resp:
                    await resp.read()
                    non2xx += resp.status // 100 != 2
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    return _summarise(latencies, elapsed, connections, non2xx)


async def _fixed_rate(url: str, body: bytes, connections: int, rate: float, seconds: float) -> Run:
    """Open loop: request i is due at i / rate; its latency counts from then."""
    latencies: list[float] = []
    non2xx = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(due: float) -> None:
            nonlocal non2xx
            async with session.post(url, data=body, headers=HEADERS) as resp:
                await resp.read()
                non2xx += resp.status // 100 != 2
            latencies.append(time.perf_counter() - due)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return _summarise(latencies, elapsed, connections, non2xx)


def _summarise(latencies: list[float], elapsed: float, connections: int, non2xx: int) -> Run:
    latencies.sort()
    n = len(latencies)
    return Run(
        "",
        "",
        connections,
        n,
        n / elapsed,
        latencies[n // 2] * 1e3,
        latencies[min(n - 1, int(n * 0.99))] * 1e3,
        non2xx,
    )


# -- the measurements ------------------------------------------------------------------------------


class Bench:
    """The three targets and how to load them."""

    def __init__(self, urls: dict[str, str], pids: dict[str, int], use_wrk: bool, tmp: Path):
        self.urls = urls
        self.pids = pids
        self.use_wrk = use_wrk
        self.tmp = tmp

    def load(self, target: str, scenario: str, body: bytes, conns: int, seconds: float) -> Run:
        url = self.urls[target]
        if self.use_wrk:
            _wrk(url, body, conns, min(1.0, seconds / 3), self.tmp)  # warm-up
        else:
            asyncio.run(_closed_loop(url, body, conns, min(1.0, seconds / 3)))
        pid = self.pids.get(target)
        before = _cpu_ticks(pid) if pid else 0
        if self.use_wrk:
            run = _wrk(url, body, conns, seconds, self.tmp)
        else:
            run = asyncio.run(_closed_loop(url, body, conns, seconds))
        if pid and run.requests:
            run.cpu_ms_per_req = (_cpu_ticks(pid) - before) * 1e3 / _CLK_TCK / run.requests
        run.target, run.scenario = target, scenario
        return run

    def fixed(self, target: str, rate: float, seconds: float) -> Run:
        url = self.urls[target]
        asyncio.run(_fixed_rate(url, FIXED_BODY, 32, rate, min(1.0, seconds / 3)))
        run = asyncio.run(_fixed_rate(url, FIXED_BODY, 32, rate, seconds))
        run.target, run.scenario = target, "fixed"
        return run


def _progress(run: Run) -> None:
    """One line per run on stderr: a round's outlier is seen, not only the medians."""
    print(
        f"  {run.scenario} c={run.connections} {run.target}: {run.rps:,.0f} req/s, "
        f"p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms",
        file=sys.stderr,
        flush=True,
    )


def _median(runs: list[Run]) -> Run:
    mid = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
    cpus = [r.cpu_ms_per_req for r in runs if r.cpu_ms_per_req is not None]
    return Run(
        mid.target,
        mid.scenario,
        mid.connections,
        sum(r.requests for r in runs),
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.non2xx for r in runs),
        statistics.median(cpus) if cpus else None,
    )


def _policy_miss_p50_us(samples: int) -> float:
    """Cache-miss p50 through the engine and its worker process (see benchmarks/policy.py)."""
    sys.path.insert(0, str(HERE))
    import policy as policy_bench  # noqa: PLC0415 - a sibling script, not a package

    async def measure() -> float:
        rng = random.Random(7)
        inputs = [policy_bench.make_input(rng) for _ in range(samples)]
        path = ROOT / "policies" / "customer-support"
        engine = await policy_bench.with_engine(path, workers=1, cache_size=0)
        try:
            await policy_bench.time_calls(engine.evaluate, inputs[:200])
            latencies = await policy_bench.time_calls(engine.evaluate, inputs)
        finally:
            await engine.close()
        return float(statistics.median(latencies))

    return asyncio.run(measure())


def _config(tmp: Path, upstream_url: str) -> Path:
    path = tmp / "warden.yaml"
    path.write_text(
        json.dumps(
            {
                "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                "upstreams": {"openai": {"protocol": "openai", "base_url": upstream_url}},
                "policy": {"bundles": [str(ROOT / "policies" / "customer-support")]},
                "audit": {"dir": str(tmp / "audit"), "fsync": "always"},
                "state": {"url": f"sqlite:///{tmp}/state.db"},
            }
        )
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=400.0, help="fixed-rate requests/s")
    parser.add_argument("--python-load", action="store_true", help="do not use wrk")
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args()

    use_wrk = not args.python_load and shutil.which("wrk") is not None
    print(f"load generator: {'wrk' if use_wrk else 'python/aiohttp'}", file=sys.stderr)
    py = sys.executable
    warden_bin = str(Path(py).with_name("warden"))
    procs: list[subprocess.Popen[str]] = []
    runs: dict[tuple[str, str, int], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream, upstream_url = _start([py, str(HERE / "fake_upstream.py")])
            procs.append(upstream)
            ref, ref_url = _start(
                [py, str(HERE / "reference_proxy.py"), "--upstream", upstream_url]
            )
            procs.append(ref)
            warden, line = _start(
                [warden_bin, "serve", "--config", str(_config(tmp, upstream_url))],
                marker="proxy http",
            )
            procs.append(warden)
            # "warden 0.1.0: proxy http://127.0.0.1:PORT  admin http://127.0.0.1:PORT ..."
            warden_url = line.split("proxy ", 1)[1].split()[0]
            admin_url = line.split("admin ", 1)[1].split()[0]
            bench = Bench(
                {
                    "direct": f"{upstream_url}/v1/chat/completions",
                    "reference": f"{ref_url}/openai/v1/chat/completions",
                    "warden": f"{warden_url}/openai/v1/chat/completions",
                },
                {"reference": ref.pid, "warden": warden.pid},
                use_wrk,
                tmp,
            )
            plan: list[tuple[str, bytes, int, tuple[str, ...]]] = [
                ("tool", TOOL_BODY, 16, ("reference", "warden")),
                ("text", TEXT_BODY, 16, ("reference", "warden")),
                ("tool", TOOL_BODY, 1, ("direct", "reference", "warden")),
            ]
            for rnd in range(args.rounds):
                for scenario, body, conns, targets in plan:
                    # Alternate which target goes first, so drift favours none.
                    for target in targets if rnd % 2 == 0 else tuple(reversed(targets)):
                        run = bench.load(target, scenario, body, conns, args.seconds)
                        runs.setdefault((target, scenario, conns), []).append(run)
                        _progress(run)
                for target in ("direct", "reference", "warden"):
                    run = bench.fixed(target, args.rate, args.seconds)
                    runs.setdefault((target, "fixed", 32), []).append(run)
                    _progress(run)
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

            fallbacks_before = _metric(admin_url, "warden_policy_fallbacks_total")
            overloaded_before = _metric(admin_url, "warden_policy_overloaded_total")
            burst = bench.load("warden", "burst", BURST_BODY, 64, args.seconds)
            burst_fallbacks = _metric(admin_url, "warden_policy_fallbacks_total") - fallbacks_before
            burst_overloaded = (
                _metric(admin_url, "warden_policy_overloaded_total") - overloaded_before
            )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    miss_p50_us = _policy_miss_p50_us(1500)
    med = {key: _median(value) for key, value in runs.items()}

    def r(target: str, scenario: str, conns: int) -> Run:
        return med[(target, scenario, conns)]

    figures: dict[str, float] = {
        "tool_c16_ratio": r("warden", "tool", 16).rps / r("reference", "tool", 16).rps,
        "text_c16_ratio": r("warden", "text", 16).rps / r("reference", "text", 16).rps,
        "tool_c1_p50_added_ms": r("warden", "tool", 1).p50_ms - r("direct", "tool", 1).p50_ms,
        "cpu_ratio": (r("warden", "tool", 16).cpu_ms_per_req or 0)
        / (r("reference", "tool", 16).cpu_ms_per_req or 1),
        "policy_miss_p50_us": miss_p50_us,
        "burst_fallbacks": burst_fallbacks,
    }
    informational = {
        "tool_c1_p99_added_ms": r("warden", "tool", 1).p99_ms - r("direct", "tool", 1).p99_ms,
        "warden_cpu_ms_per_req": r("warden", "tool", 16).cpu_ms_per_req or 0.0,
        "reference_cpu_ms_per_req": r("reference", "tool", 16).cpu_ms_per_req or 0.0,
        "fixed_p50_added_ms": r("warden", "fixed", 32).p50_ms - r("direct", "fixed", 32).p50_ms,
        "fixed_p99_added_ms": r("warden", "fixed", 32).p99_ms - r("direct", "fixed", 32).p99_ms,
        "burst_requests": burst.requests,
        "burst_503": burst_overloaded,
        "burst_non2xx": burst.non2xx,
    }
    _print(med, figures, informational, args, use_wrk)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "load_generator": "wrk" if use_wrk else "python",
                "seconds": args.seconds,
                "rounds": args.rounds,
                "rate": args.rate,
                "runs": [asdict(v) for v in med.values()],
                "figures": figures,
                "informational": informational,
                "targets": TARGETS,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")
    errors = sum(v.non2xx for k, v in med.items() if k[1] != "burst")
    if errors:
        print(f"{errors} requests failed", file=sys.stderr)
        return 1
    return 0


def _print(
    med: dict[tuple[str, str, int], Run],
    figures: dict[str, float],
    info: dict[str, float],
    args: argparse.Namespace,
    use_wrk: bool,
) -> None:
    print(
        f"\n{'scenario':8} {'conns':>5} {'target':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'CPU ms/req':>10}"
    )
    for (target, scenario, conns), run in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        cpu = f"{run.cpu_ms_per_req:.3f}" if run.cpu_ms_per_req is not None else "-"
        print(
            f"{scenario:8} {conns:>5} {target:10} {run.rps:>8.0f} {run.p50_ms:>8.3f}"
            f" {run.p99_ms:>8.3f} {cpu:>10}"
        )
    rows: list[tuple[str, str, str, Callable[[float], bool]]] = [
        ("throughput / pass-through, c=16, one tool call", "tool_c16_ratio", "≥ 0.60", _ge(0.60)),
        ("same, text answer (tools declared)", "text_c16_ratio", "≥ 0.70", _ge(0.70)),
        ("p50 added over direct, c=1, tool call (ms)", "tool_c1_p50_added_ms", "≤ 1.0", _le(1.0)),
        ("Warden CPU per request / pass-through's", "cpu_ratio", "≤ 2.0", _le(2.0)),
        (
            "policy decision, cache miss, isolated, p50 (µs)",
            "policy_miss_p50_us",
            "≤ 300",
            _le(300),
        ),
        ("fallback decisions in a 64-connection burst", "burst_fallbacks", "0", _le(0)),
    ]
    gen = "wrk" if use_wrk else "python/aiohttp"
    print(
        f"\nIssue 10 targets ({gen}; median of {args.rounds} alternating rounds of"
        f" {args.seconds:g} s; fsync always)"
    )
    print(f"{'figure':50} {'measured':>9} {'target':>7}  result")
    for label, key, target, ok in rows:
        verdict = "met" if ok(figures[key]) else "MISSED"
        print(f"{label:50} {figures[key]:>9.2f} {target:>7}  {verdict}")
    print(
        f"\np99 added over direct, c=1, tool call: {info['tool_c1_p99_added_ms']:+.2f} ms;"
        f" CPU per request: Warden {info['warden_cpu_ms_per_req']:.3f} ms,"
        f" pass-through {info['reference_cpu_ms_per_req']:.3f} ms"
    )
    print(
        f"fixed rate {args.rate:g} req/s, 32 connections, 1 KB bodies (Python open-loop"
        f" generator): added p50 {info['fixed_p50_added_ms']:+.2f} ms,"
        f" p99 {info['fixed_p99_added_ms']:+.2f} ms"
    )
    print(
        f"burst, 64 connections, every call a policy cache miss: {info['burst_requests']:.0f}"
        f" requests, {figures['burst_fallbacks']:.0f} fallback decisions,"
        f" {info['burst_503']:.0f} pushed back (503), {info['burst_non2xx']:.0f} non-2xx"
    )


def _ge(bound: float) -> Callable[[float], bool]:
    return lambda value: value >= bound


def _le(bound: float) -> Callable[[float], bool]:
    return lambda value: value <= bound


if __name__ == "__main__":
    sys.exit(main())
