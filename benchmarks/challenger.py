"""Does a live challenger change the agent's latency? A/B on the same machine, same run.

Starts Warden twice over (the shipped customer-support bundle, one policy
worker, the audit log with fsync), once without and once with a challenger
(a copy of the bundle with a tighter refund limit, so about half the refunds
diverge and are recorded), and drives each with the openai SDK: sequential
chat completions whose response proposes an ``issue_refund`` with a new
amount every time (no decision-cache hits). The two configurations run in
alternating rounds, so drift of the machine's load hits both alike.

Reported: per configuration the median and p95 of the agent's request
latency, and the ratio challenger/reference, each beside the spread of the
reference's own rounds (its noise): a challenger adds no latency when both
ratios are within that spread, and the last two lines say whether they are.

    python benchmarks/challenger.py [--requests 200] [--rounds 4]

Writes benchmarks/results/challenger.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from warden.config import load_config  # noqa: E402
from warden.server import Warden  # noqa: E402
from warden.testing import Call, MockLLM, Reply  # noqa: E402

RESULTS = HERE / "results"
BUNDLE = ROOT / "policies" / "customer-support"
MESSAGES: Any = [{"role": "user", "content": "refund my order"}]


def _candidate(tmp: Path) -> Path:
    bundle = tmp / "candidate"
    shutil.copytree(BUNDLE, bundle)
    data = json.loads((bundle / "data.json").read_text())
    data["warden"]["limits"]["issue_refund"]["auto"] = 50
    (bundle / "data.json").write_text(json.dumps(data))
    return bundle


async def _round(
    tmp: Path, llm: MockLLM, challenger: Path | None, n: int, seed: int
) -> list[float]:
    name = f"{'on' if challenger else 'off'}-{seed}"
    policy: dict[str, Any] = {"bundles": [str(BUNDLE)], "workers": 1, "watch": False}
    if challenger is not None:
        policy["challenger"] = {"bundles": [str(challenger)]}
    config = load_config(
        environ={},
        overrides={
            "agent": {"id": "bench-agent"},
            "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "upstreams": {"openai": {"protocol": "openai", "base_url": llm.url}},
            "policy": policy,
            "audit": {"dir": str(tmp / name / "audit")},
            "state": {"url": f"sqlite:///{tmp / name}.db"},
            "monitor": {"enabled": False},
            "approvals": {"mode": "defer"},
        },
    )
    times: list[float] = []
    async with (
        Warden(config) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-bench", max_retries=0
        ) as client,
    ):
        for i in range(n + 10):
            amount = 1 + (seed * 7919 + i * 104729) % 99  # 1..99: half diverge (over 50)
            call = Call("issue_refund", {"order_id": f"A-{seed}-{i}", "amount": amount})
            llm.script(Reply(tool_calls=[call]))
            started = time.perf_counter()
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            if i >= 10:  # warm-up: connections, first compiles
                times.append(time.perf_counter() - started)
        if warden.challenger is not None:
            await warden.challenger.idle()
            stats = warden.challenger.stats()
            batches = warden.challenger.batches
            print(
                f"  challenger round {seed}: evaluated {stats.evaluated}, diverged "
                f"{stats.diverged}, dropped {stats.dropped}, in {batches} batches "
                f"(mean {stats.evaluated / max(batches, 1):.1f} inputs)",
                flush=True,
            )
    return times


def _p95(xs: list[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


async def main_async(requests: int, rounds: int) -> dict[str, Any]:
    results: dict[str, list[float]] = {"reference": [], "challenger": []}
    medians: dict[str, list[float]] = {"reference": [], "challenger": []}
    tails: dict[str, list[float]] = {"reference": [], "challenger": []}
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        candidate = _candidate(tmp)
        async with MockLLM() as llm:
            for r in range(rounds):
                order = [None, candidate] if r % 2 == 0 else [candidate, None]
                for which in order:
                    key = "challenger" if which is not None else "reference"
                    times = await _round(tmp, llm, which, requests, r * 2 + (which is not None))
                    results[key] += times
                    medians[key].append(statistics.median(times))
                    tails[key].append(_p95(times))
    ref, ch = results["reference"], results["challenger"]
    noise = (max(medians["reference"]) - min(medians["reference"])) / statistics.median(ref)
    tail_noise = (max(tails["reference"]) - min(tails["reference"])) / _p95(ref)
    return {
        "requests_per_round": requests,
        "rounds": rounds,
        "reference": {"median_ms": statistics.median(ref) * 1e3, "p95_ms": _p95(ref) * 1e3},
        "challenger": {"median_ms": statistics.median(ch) * 1e3, "p95_ms": _p95(ch) * 1e3},
        "ratio_median": statistics.median(ch) / statistics.median(ref),
        "ratio_p95": _p95(ch) / _p95(ref),
        "reference_round_spread": noise,
        "reference_round_p95_spread": tail_noise,
        "round_p95_ms": {k: [m * 1e3 for m in v] for k, v in tails.items()},
        "round_medians_ms": {k: [m * 1e3 for m in v] for k, v in medians.items()},
        "machine": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    out = asyncio.run(main_async(args.requests, args.rounds))
    print(
        f"\nagent latency, {args.rounds} alternating rounds of {args.requests} requests each\n"
        f"{'':12}{'median ms':>10}{'p95 ms':>10}\n"
        f"{'reference':12}{out['reference']['median_ms']:>10.2f}{out['reference']['p95_ms']:>10.2f}\n"
        f"{'challenger':12}{out['challenger']['median_ms']:>10.2f}"
        f"{out['challenger']['p95_ms']:>10.2f}\n"
        f"ratio challenger/reference: median {out['ratio_median']:.3f}, "
        f"p95 {out['ratio_p95']:.3f}\n"
        f"spread of the reference's own round medians: {out['reference_round_spread']:.1%}, "
        f"of its round p95s: {out['reference_round_p95_spread']:.1%}"
    )
    for figure, ratio, spread in (
        ("median", out["ratio_median"], out["reference_round_spread"]),
        ("p95", out["ratio_p95"], out["reference_round_p95_spread"]),
    ):
        within = abs(ratio - 1) <= spread
        print(
            f"{figure}: the challenger changes it by {ratio - 1:+.1%}, "
            f"{'within' if within else 'BEYOND'} the reference's own spread ({spread:.1%})"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "challenger.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
