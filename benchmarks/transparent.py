"""What transparent mode costs, as ratios measured in one run (issue 15's benchmark).

Four targets, each its own process where it is a server, one fake upstream
behind all (benchmarks/fake_upstream.py; the request declares a tool, the
answer proposes one allowed ``search_kb`` call, so Warden decides twice):

* ``direct``: the fake upstream reached directly (plain HTTP), for reference;
* ``base_url``: ``warden serve`` reached at its base-URL listener (plain HTTP,
  as an agent with a changed base URL reaches it);
* ``mitmproxy``: ``mitmdump`` alone in regular mode, no Warden and no addon
  of ours: the same TLS interception with the same CA, ``connection_strategy
  lazy``, and its built-in ``map_remote`` sending ``https://api.openai.com`` to
  the fake upstream;
* ``transparent``: the same ``warden serve`` through its transparent listener
  (mitmproxy in-process, handing the flow to the base-URL listener).

The agent side is one Python client (httpx2, as the SDKs use) asking for
``https://api.openai.com/v1/chat/completions`` through ``HTTPS_PROXY``-style
proxying and trusting the exported CA, keep-alive, sequentially (c=1, latency
per request) and with 8 requests in flight (throughput). Targets are measured
in alternating rounds; the median round is reported, as these machines are
shared and noisy.

    python benchmarks/transparent.py [--requests 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Where is my order?"}],
    "tools": [{"type": "function", "function": {"name": "search_kb", "parameters": {}}}],
}
HEADERS = {"Authorization": "Bearer sk-bench"}
GOVERNED_URL = "https://api.openai.com/v1/chat/completions"
TARGETS = ("direct", "base_url", "mitmproxy", "transparent")
CONCURRENCY = 8


@dataclass
class Run:
    target: str
    p50_ms: float
    p90_ms: float
    rps_c8: float
    errors: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def _start(cmd: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **kw
    )


def _config(tmp: Path, upstream: str, proxy: int, admin: int, transparent: int) -> Path:
    path = tmp / "warden.yaml"
    path.write_text(
        json.dumps(
            {
                "listen": {"proxy": f"127.0.0.1:{proxy}", "admin": f"127.0.0.1:{admin}"},
                "upstreams": {"openai": {"protocol": "openai", "base_url": upstream}},
                "tools": {"search_kb": {"risk": "read_only"}},
                "audit": {"dir": str(tmp / "audit")},
                "state": {"url": f"sqlite:///{tmp}/state.db"},
                "transparent": {
                    "listen": f"127.0.0.1:{transparent}",
                    "hosts": {"api.openai.com": "openai"},
                    "ca_dir": str(tmp / "ca"),
                },
            }
        )
    )
    return path


async def _measure(client: httpx2.AsyncClient, url: str, requests: int) -> tuple[list[float], int]:
    """Sequential latencies (seconds) and the number of non-2xx answers."""
    latencies, errors = [], 0
    for _ in range(requests):
        started = time.perf_counter()
        response = await client.post(url, json=BODY, headers=HEADERS)
        latencies.append(time.perf_counter() - started)
        errors += not response.is_success
    return latencies, errors


async def _throughput(client: httpx2.AsyncClient, url: str, requests: int) -> tuple[float, int]:
    errors = 0
    queue = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for _ in queue:
            response = await client.post(url, json=BODY, headers=HEADERS)
            errors += not response.is_success

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return requests / (time.perf_counter() - started), errors


async def _run(target: str, url: str, proxy: str | None, ca: Path, requests: int) -> Run:
    verify = ssl.create_default_context(cafile=str(ca))
    limits = httpx2.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx2.AsyncClient(
        proxy=proxy, verify=verify, trust_env=False, limits=limits, timeout=30
    ) as client:
        await _measure(client, url, 20)  # warm: connections, TLS, caches
        latencies, errors = await _measure(client, url, requests)
        rps, more = await _throughput(client, url, requests * 2)
    q = statistics.quantiles(latencies, n=10)
    return Run(target, statistics.median(latencies) * 1e3, q[8] * 1e3, rps, errors + more)


def _median_run(runs: list[Run]) -> Run:
    """The round whose p50 is the median (so its figures belong together)."""
    return sorted(runs, key=lambda r: r.p50_ms)[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150, help="sequential requests per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "transparent.json"))
    args = parser.parse_args()
    py = sys.executable
    bin_dir = Path(py).parent
    procs: list[subprocess.Popen[str]] = []
    runs: dict[str, list[Run]] = {t: [] for t in TARGETS}
    with tempfile.TemporaryDirectory(prefix="warden-bench-transparent-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream = _start([py, str(HERE / "fake_upstream.py")])
            procs.append(upstream)
            assert upstream.stdout is not None
            upstream_url = upstream.stdout.readline().strip()
            ports = {name: _free_port() for name in ("proxy", "admin", "transparent", "mitm")}
            cfg = _config(tmp, upstream_url, ports["proxy"], ports["admin"], ports["transparent"])
            ca = tmp / "warden-ca.pem"
            # The CA both proxies sign with: Warden's, in mitmproxy's confdir layout.
            subprocess.run(
                [str(bin_dir / "warden"), "ca", "export", "--config", str(cfg), "--out", str(ca)],
                check=True,
                cwd=ROOT,
                capture_output=True,
            )
            warden = _start([str(bin_dir / "warden"), "serve", "--config", str(cfg)])
            procs.append(warden)
            mitm = _start(
                [
                    str(bin_dir / "mitmdump"), "-q",
                    "--mode", f"regular@127.0.0.1:{ports['mitm']}",
                    "--set", f"confdir={tmp / 'ca'}",
                    "--set", "connection_strategy=lazy",
                    "--set", "upstream_cert=false",
                    "--map-remote", f"|https://api\\.openai\\.com|{upstream_url}",
                ]
            )  # fmt: skip
            procs.append(mitm)
            for port, proc in (
                (ports["proxy"], warden),
                (ports["transparent"], warden),
                (ports["mitm"], mitm),
            ):
                _wait_port(port, proc)
            plan = {
                "direct": (f"{upstream_url}/v1/chat/completions", None),
                "base_url": (f"http://127.0.0.1:{ports['proxy']}/openai/v1/chat/completions", None),
                "mitmproxy": (GOVERNED_URL, f"http://127.0.0.1:{ports['mitm']}"),
                "transparent": (GOVERNED_URL, f"http://127.0.0.1:{ports['transparent']}"),
            }
            for rnd in range(args.rounds):
                order = TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS))
                for target in order:
                    url, proxy = plan[target]
                    runs[target].append(asyncio.run(_run(target, url, proxy, ca, args.requests)))
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    best = {t: _median_run(r) for t, r in runs.items()}
    tr, mitm_run, base = best["transparent"], best["mitmproxy"], best["base_url"]
    summary = {
        "vs_mitmproxy_p50_ratio": tr.p50_ms / mitm_run.p50_ms,
        "vs_mitmproxy_p50_added_ms": tr.p50_ms - mitm_run.p50_ms,
        "vs_mitmproxy_rps_ratio": tr.rps_c8 / mitm_run.rps_c8,
        "vs_base_url_p50_ratio": tr.p50_ms / base.p50_ms,
        "vs_base_url_p50_added_ms": tr.p50_ms - base.p50_ms,
        "vs_base_url_rps_ratio": tr.rps_c8 / base.rps_c8,
    }
    print()
    print(f"| target | p50 ms | p90 ms | req/s (c={CONCURRENCY}) | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    for target in TARGETS:
        r = best[target]
        print(f"| {target} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.rps_c8:.0f} | {r.errors} |")
    print()
    print("| transparent vs | p50 ratio | p50 added ms | throughput ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| mitmproxy alone | {summary['vs_mitmproxy_p50_ratio']:.2f} | "
        f"{summary['vs_mitmproxy_p50_added_ms']:.2f} | {summary['vs_mitmproxy_rps_ratio']:.2f} |"
    )
    print(
        f"| base-URL mode | {summary['vs_base_url_p50_ratio']:.2f} | "
        f"{summary['vs_base_url_p50_added_ms']:.2f} | {summary['vs_base_url_rps_ratio']:.2f} |"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "requests": args.requests,
                "rounds": args.rounds,
                "runs": {t: [asdict(r) for r in rs] for t, rs in runs.items()},
                "median": {t: asdict(r) for t, r in best.items()},
                "summary": summary,
            },
            indent=2,
        )
    )
    failed = sum(r.errors for rs in runs.values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
