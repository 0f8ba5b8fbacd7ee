"""Policy decision latency and throughput, with the engine's real worker processes.

Measures, on the shipped customer-support bundle (an embedded equivalent if
it is missing or does not compile):

* ``bare``: one in-process evaluation (input conversion + query), no IPC;
* ``miss``: ``PolicyEngine.evaluate`` with the cache off: IPC to a worker,
  evaluation, result parsing, metrics;
* ``hit``: ``PolicyEngine.evaluate`` answered from the decision cache;
* ``guard hit``: ``PolicyGuard.check`` on an :class:`Action` (input document,
  cache, decision) -- what the pipeline pays per tool call on a hit;
* miss latency against rule count (10, 50, 200 generated deny rules);
* throughput with 1 and 2 workers and several concurrent callers.

Targets: cache hit p50 <= 20 us; miss p50 <= 300 us. Prints a table and writes
benchmarks/results/policy.json.

    python benchmarks/policy.py [--quick] [--bundle policies/customer-support]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from warden.config import PolicyConfig  # noqa: E402
from warden.model import Action, ActionKind, Agent, Mode, RequestMeta, Stage  # noqa: E402
from warden.pipeline import GuardContext, policy_input  # noqa: E402
from warden.policy.bundle import Bundle, BundleError, load_bundle  # noqa: E402
from warden.policy.bundle.compile import compile_check  # noqa: E402
from warden.policy.engine import PolicyEngine, production_modules  # noqa: E402
from warden.policy.guard import PolicyGuard  # noqa: E402
from warden.policy.worker import Evaluator  # noqa: E402

RESULTS = HERE / "results"
QUERY = "data.warden.decision"
HIT_TARGET_US = 20.0
MISS_TARGET_US = 300.0

# Used when policies/customer-support is absent or broken: the same shape of
# policy (catalogue and limits in data, one else-chain per decision).
EMBEDDED_POLICY = """package warden

import rego.v1

decision := verdict(input.action, object.get(input, "budget", {}))

verdict(action, _) := _allow("model calls are allowed") if {
\taction.kind == "llm_call"
} else := _deny("no tool name") if {
\tnot is_string(action.tool)
} else := class_verdict(
\tobject.get(data.warden.tools, action.tool, {"class": "unknown"}).class,
\taction.tool, action.arguments, budget,
)

budget := object.get(input, "budget", {})

class_verdict("read_only", tool, _, _) := _allow(sprintf("%v only reads", [tool]))

class_verdict("unknown", tool, _, _) := _deny(sprintf("%v is not in the catalogue", [tool]))

class_verdict("money", tool, args, b) := _deny("amount must be positive") if {
\targs.amount <= 0
} else := _deny("over the ceiling") if {
\targs.amount > data.warden.limits[tool].ceiling
} else := _hold("over the auto limit") if {
\targs.amount > data.warden.limits[tool].auto
} else := _hold("over the daily limit") if {
\tspent := object.get(b, ["refunds", "day", "agent", "spent"], 0)
\tspent + args.amount > data.warden.limits[tool].agent_day_auto
} else := _allow(sprintf("a refund of %.2f is within limits", [args.amount]))

_allow(reason) := {"effect": "allow", "reason": reason}

_deny(reason) := {"effect": "deny", "reason": reason}

_hold(reason) := {"effect": "require_approval", "reason": reason, "approvers": ["support-leads"]}
"""
EMBEDDED_DATA = {
    "tools": {
        "get_order": {"class": "read_only"},
        "search_kb": {"class": "read_only"},
        "issue_refund": {"class": "money"},
        "apply_credit": {"class": "money"},
    },
    "limits": {
        "issue_refund": {"auto": 100, "ceiling": 1000, "agent_day_auto": 300},
        "apply_credit": {"auto": 50, "ceiling": 500, "agent_day_auto": 200},
    },
}
TOOLS: list[tuple[str, Callable[[random.Random], dict[str, Any]]]] = [
    ("get_order", lambda r: {"order_id": f"ord_{r.randrange(10**6)}"}),
    ("search_kb", lambda r: {"query": "where is my parcel " * r.randrange(1, 4)}),
    (
        "issue_refund",
        lambda r: {"order_id": f"ord_{r.randrange(10**6)}", "amount": r.randrange(1, 1500)},
    ),
    (
        "apply_credit",
        lambda r: {"customer_id": f"cus_{r.randrange(10**6)}", "amount": r.randrange(1, 600)},
    ),
    (
        "update_email",
        lambda r: {"customer_id": "cus_1", "email": f"a{r.randrange(999)}@example.com"},
    ),
    ("export_customers", lambda r: {}),
    ("delete_everything", lambda r: {"confirm": True}),
]


def write_embedded(root: Path) -> Path:
    (root / "warden").mkdir(parents=True, exist_ok=True)
    (root / "warden" / "policy.rego").write_text(EMBEDDED_POLICY)
    (root / "warden" / "data.json").write_text(json.dumps(EMBEDDED_DATA))
    (root / ".manifest").write_text('{"revision": "embedded-support", "roots": ["warden"]}')
    return root


def pick_bundle(requested: str | None, scratch: Path) -> tuple[Path, str]:
    candidate = Path(requested) if requested else ROOT / "policies" / "customer-support"
    try:
        bundle = load_bundle(candidate)
        compile_check(production_modules(bundle), bundle.data, QUERY)
        return candidate, str(
            candidate.relative_to(ROOT) if candidate.is_relative_to(ROOT) else candidate
        )
    except BundleError as exc:
        print(f"note: {candidate} unusable ({str(exc).splitlines()[0]}); using the embedded policy")
        return write_embedded(scratch / "embedded-support"), "embedded"


def make_action(rng: random.Random) -> Action:
    tool, args = rng.choice(TOOLS)
    return Action(
        action_id="act_bench",
        agent=Agent("support-bot", "1.4.2"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta(method="POST", upstream="openai", path="/v1/chat/completions"),
        tool=tool,
        arguments=args(rng),
        model="gpt-4o-mini",
        context={"conversation": f"conv_{rng.randrange(10**6)}"},
    )


def make_input(rng: random.Random) -> dict[str, Any]:
    ctx = GuardContext(
        mode=Mode.ENFORCE,
        risk="write",
        budget={
            "refunds": {
                "day": {"agent": {"spent": rng.randrange(0, 400)}, "customer": {"spent": 0}}
            },
            "credits": {
                "day": {"agent": {"spent": rng.randrange(0, 300)}, "customer": {"spent": 0}}
            },
        },
    )
    return policy_input(make_action(rng), ctx)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples_us: list[float]) -> dict[str, float]:
    return {
        "n": len(samples_us),
        "p50_us": round(pct(samples_us, 0.50), 1),
        "p99_us": round(pct(samples_us, 0.99), 1),
        "mean_us": round(statistics.fmean(samples_us), 1),
    }


async def time_calls(call: Callable[[Any], Awaitable[Any]], inputs: list[Any]) -> list[float]:
    out = []
    for item in inputs:
        start = time.perf_counter_ns()
        await call(item)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def bare_latency(bundle: Bundle, inputs: list[dict[str, Any]]) -> list[float]:
    modules = production_modules(bundle)
    ev = Evaluator([(m.path, m.source) for m in modules], bundle.data, QUERY)
    for item in inputs[:50]:
        ev.evaluate(item)
    out = []
    for item in inputs:
        start = time.perf_counter_ns()
        ev.evaluate(item)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def generated_bundle(root: Path, rules: int) -> Path:
    lines = ["package warden", "", "import rego.v1", ""]
    for i in range(rules):
        lines += [
            f'deny contains "rule {i}" if {{',
            f'\tinput.action.tool == "tool_{i}"',
            f"\tinput.action.arguments.amount > {i}",
            "}",
            "",
        ]
    lines += [
        'decision := {"effect": "deny", "reasons": sort([m | some m in deny])} if count(deny) > 0',
        "",
        'default decision := {"effect": "allow", "reason": "no rule matched"}',
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "policy.rego").write_text("\n".join(lines) + "\n")
    return root


async def with_engine(path: Path, workers: int, cache_size: int) -> PolicyEngine:
    config = PolicyConfig(
        bundles=(str(path),), workers=workers, cache_size=cache_size, deadline_ms=1000, watch=False
    )
    engine = await PolicyEngine.start(config)
    if not engine.ready:
        raise SystemExit(f"policy engine not ready: {engine.status()['last_error']}")
    return engine


async def throughput(
    path: Path, workers: int, callers: int, seconds: float, seed: int
) -> dict[str, Any]:
    engine = await with_engine(path, workers, cache_size=0)
    rng = random.Random(seed)
    pool = [make_input(rng) for _ in range(2000)]
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop_at:
            start = time.perf_counter_ns()
            result = await engine.evaluate(pool[i % len(pool)])
            latencies.append((time.perf_counter_ns() - start) / 1000)
            errors += result.error is not None
            i += callers

    try:
        await asyncio.gather(*(caller(k) for k in range(callers)))
    finally:
        await engine.close()
    return {
        "workers": workers,
        "callers": callers,
        "decisions_per_s": round(len(latencies) / seconds),
        "errors": errors,
        **summary(latencies),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", help="bundle directory (default: policies/customer-support)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (about 25 s)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    scale = 0.3 if args.quick else 1.0
    n_miss, n_hit, n_rules = int(3000 * scale), int(20000 * scale), int(1500 * scale)
    seconds = 2.0 * scale + 0.5
    rng = random.Random(args.seed)
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "targets": {"hit_p50_us": HIT_TARGET_US, "miss_p50_us": MISS_TARGET_US},
    }
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        path, label = pick_bundle(args.bundle, scratch)
        bundle = load_bundle(path)
        results["bundle"] = {"source": label, "revision": bundle.revision}
        misses = [make_input(rng) for _ in range(n_miss)]

        results["bare"] = summary(bare_latency(bundle, misses))

        engine = await with_engine(path, workers=1, cache_size=0)
        try:
            await time_calls(engine.evaluate, misses[:200])  # warm up
            results["miss"] = summary(await time_calls(engine.evaluate, misses))
        finally:
            await engine.close()

        engine = await with_engine(path, workers=1, cache_size=10_000)
        try:
            hot = [make_input(rng) for _ in range(100)]
            await time_calls(engine.evaluate, hot)
            hits = [hot[i % len(hot)] for i in range(n_hit)]
            results["hit"] = summary(await time_calls(engine.evaluate, hits))
            results["cache_input_paths"] = engine.status()["cache"]["input_paths"]
            guard = PolicyGuard(engine, engine.config)
            ctx = GuardContext(mode=Mode.ENFORCE, risk="write")
            actions = [make_action(random.Random(i % 100)) for i in range(n_hit)]
            for a in actions[:200]:
                await guard.check(a, ctx)
            results["guard_hit"] = summary(await time_calls(lambda a: guard.check(a, ctx), actions))
        finally:
            await engine.close()

        rule_rows = []
        for rules in (10, 50, 200):
            gen = generated_bundle(scratch / f"rules-{rules}", rules)
            inputs = [
                {
                    "action": {
                        "tool": f"tool_{rng.randrange(rules)}",
                        "arguments": {"amount": rng.randrange(300)},
                    }
                }
                for _ in range(n_rules)
            ]
            gen_bundle = load_bundle(gen)
            bare = summary(bare_latency(gen_bundle, inputs))
            engine = await with_engine(gen, workers=1, cache_size=0)
            try:
                await time_calls(engine.evaluate, inputs[:100])
                miss = summary(await time_calls(engine.evaluate, inputs))
            finally:
                await engine.close()
            rule_rows.append({"rules": rules, "bare_p50_us": bare["p50_us"], **miss})
        results["rules"] = rule_rows

        rows = []
        for workers in (1, 2):
            for callers in (1, 4, 16):
                rows.append(await throughput(path, workers, callers, seconds, args.seed))
        results["throughput"] = rows

    results["pass"] = {
        "hit_p50": results["hit"]["p50_us"] <= HIT_TARGET_US,
        "miss_p50": results["miss"]["p50_us"] <= MISS_TARGET_US,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)


def report(r: dict[str, Any]) -> None:
    print(
        f"\nbundle: {r['bundle']['source']} (revision {r['bundle']['revision']}); "
        f"{r['machine']['cpus']} CPUs, Python {r['machine']['python']}"
    )
    print(f"cache key paths: {r['cache_input_paths'] or 'whole input'}\n")
    print(f"{'latency':<34}{'p50 us':>10}{'p99 us':>10}{'n':>8}")
    for key, label in (
        ("bare", "bare evaluation (no IPC)"),
        ("miss", "engine, cache miss"),
        ("hit", "engine, cache hit"),
        ("guard_hit", "guard.check, cache hit"),
    ):
        row = r[key]
        print(f"{label:<34}{row['p50_us']:>10}{row['p99_us']:>10}{row['n']:>8}")
    print(f"\n{'rules':<10}{'bare p50':>12}{'miss p50':>12}{'miss p99':>12}")
    for row in r["rules"]:
        print(f"{row['rules']:<10}{row['bare_p50_us']:>12}{row['p50_us']:>12}{row['p99_us']:>12}")
    print(
        f"\n{'workers':<9}{'callers':>8}{'decisions/s':>13}"
        f"{'p50 us':>10}{'p99 us':>10}{'errors':>8}"
    )
    for row in r["throughput"]:
        print(
            f"{row['workers']:<9}{row['callers']:>8}{row['decisions_per_s']:>13}"
            f"{row['p50_us']:>10}{row['p99_us']:>10}{row['errors']:>8}"
        )
    ok = r["pass"]
    print(
        f"\ntargets: hit p50 <= {HIT_TARGET_US:g} us: {'PASS' if ok['hit_p50'] else 'FAIL'}; "
        f"miss p50 <= {MISS_TARGET_US:g} us: {'PASS' if ok['miss_p50'] else 'FAIL'}"
    )
    print(f"written to {RESULTS / 'policy.json'}")


if __name__ == "__main__":
    asyncio.run(main())
