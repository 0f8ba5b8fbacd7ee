"""A policy that crashes the engine or loops for minutes cannot take the proxy down.

Both policies below are input-triggered, so they compile and activate like any
other; the fault happens on the production path (set input, query bundle):

* ``json.unmarshal`` of a deeply nested string overflows rego-cpp's stack and
  the worker dies of SIGSEGV;
* two nested ``numbers.range`` iterations over a large ``n`` run for hours.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from warden.config import PolicyConfig
from warden.model import Effect, Mode
from warden.pipeline import GuardContext
from warden.policy.engine import PolicyEngine, PolicyResult
from warden.policy.guard import PolicyGuard

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {"effect": "allow", "reason": "parsed"} if {
\tinput.action.tool == "parse"
\tjson.unmarshal(input.action.arguments.doc)
}

decision := {"effect": "deny", "reason": "never"} if {
\tinput.action.tool == "spin"
\tsome a in numbers.range(1, input.action.arguments.n)
\tsome b in numbers.range(1, input.action.arguments.n)
\ta * b == -1
}
"""
DEADLINE_MS = 300
# Time allowed beyond the deadline for the event loop to run the callback on a busy machine.
SLACK_S = 0.25


def doc(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"action": {"tool": tool, "arguments": arguments}, "risk": "write"}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[PolicyEngine]:
    root = tmp_path / "b"
    root.mkdir()
    (root / "policy.rego").write_text(POLICY)
    config = PolicyConfig(bundles=(str(root),), workers=2, deadline_ms=DEADLINE_MS, watch=False)
    eng = await PolicyEngine.start(config)
    assert eng.ready
    yield eng
    await eng.close()


async def timed(engine: PolicyEngine, input_doc: dict[str, Any]) -> tuple[PolicyResult, float]:
    started = time.monotonic()
    result = await engine.evaluate(input_doc)
    return result, time.monotonic() - started


async def wait_for_pool(engine: PolicyEngine, workers: int) -> None:
    for _ in range(400):
        if engine.status()["workers_alive"] >= workers:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the pool did not recover")


def stack_is_limited() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    return soft != resource.RLIM_INFINITY


@pytest.mark.skipif(not stack_is_limited(), reason="with no stack limit the parser does not crash")
async def test_a_crashing_policy_leaves_the_proxy_serving(engine: PolicyEngine) -> None:
    pids = engine.status()["worker_pids"]
    crashes = (
        REGISTRY.get_sample_value(
            "warden_policy_fallbacks_total", {"reason": "crash", "risk": "write"}
        )
        or 0
    )
    deep = "[" * 30_000 + "]" * 30_000
    guard = PolicyGuard(engine, engine.config)
    # A normal call runs alongside the crashing one, on the other worker.
    (crashed, elapsed), (fine, _) = await asyncio.gather(
        timed(engine, doc("parse", doc=deep)), timed(engine, doc("other"))
    )
    assert crashed.error == "policy_crash", crashed
    assert elapsed < DEADLINE_MS / 1000 + SLACK_S
    assert fine.effect is Effect.ALLOW
    assert engine.status()["worker_crashes"] == 1

    decision = guard.decide(crashed, GuardContext(mode=Mode.ENFORCE, risk="write"))
    assert decision.guard == "fallback"
    assert decision.effect is Effect.DENY
    assert decision.error == "policy_crash"
    assert (
        REGISTRY.get_sample_value(
            "warden_policy_fallbacks_total", {"reason": "crash", "risk": "write"}
        )
        == crashes + 1
    )

    # The same input again is answered at once, without killing another worker.
    again, elapsed = await timed(engine, doc("parse", doc=deep))
    assert again.error == "policy_crash"
    assert elapsed < 0.05
    assert engine.status()["worker_crashes"] == 1

    await wait_for_pool(engine, 2)
    assert engine.status()["worker_restarts"] == 1
    assert set(engine.status()["worker_pids"]) != set(pids)
    assert (await engine.evaluate(doc("parse", doc="[[1]]"))).reasons == ("parsed",)


async def test_a_looping_policy_is_cut_off_at_the_deadline(engine: PolicyEngine) -> None:
    (looped, elapsed), (fine, fine_elapsed) = await asyncio.gather(
        timed(engine, doc("spin", n=100_000)), timed(engine, doc("other"))
    )
    assert looped.error == "policy_timeout"
    assert DEADLINE_MS / 1000 <= elapsed < DEADLINE_MS / 1000 + SLACK_S
    assert fine.effect is Effect.ALLOW
    assert fine_elapsed < DEADLINE_MS / 1000
    status = engine.status()
    assert status["worker_timeouts"] == 1
    assert status["ready"]  # the other worker still serves

    # Retrying the same input does not cost another worker.
    again, elapsed = await timed(engine, doc("spin", n=100_000))
    assert again.error == "policy_timeout"
    assert elapsed < 0.05

    # Loops with different inputs each lose a worker, but the pool recovers.
    await wait_for_pool(engine, 2)
    results = await asyncio.gather(*(engine.evaluate(doc("spin", n=100_001 + i)) for i in range(2)))
    assert [r.error for r in results] == ["policy_timeout", "policy_timeout"]
    await wait_for_pool(engine, 2)
    assert (await engine.evaluate(doc("spin", n=3))).reasons == ("fine",)
    assert engine.status()["worker_timeouts"] == 3


async def test_callers_queue_until_the_deadline_when_workers_are_busy(engine: PolicyEngine) -> None:
    spins = [engine.evaluate(doc("spin", n=200_000 + i)) for i in range(2)]
    queued = engine.evaluate(doc("other"))
    results = await asyncio.gather(*spins, queued)
    # Both workers were stuck until the deadline, so the queued call timed out too.
    assert [r.error for r in results] == ["policy_timeout"] * 3
    await wait_for_pool(engine, 2)
    assert (await engine.evaluate(doc("other"))).effect is Effect.ALLOW


async def test_queueing_under_load_does_not_kill_healthy_workers(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "policy.rego").write_text(POLICY)
    deadline_s = 0.6
    config = PolicyConfig(
        bundles=(str(root),), workers=1, deadline_ms=deadline_s * 1000, watch=False
    )
    eng = await PolicyEngine.start(config)
    try:
        # A legitimate evaluation of a known cost (calibrated on this machine).
        _, one = await timed(eng, doc("spin", n=150))
        if one > deadline_s / 3:
            pytest.skip("this machine is too slow to calibrate the timing")
        pid = eng.status()["worker_pids"]
        queued = int(deadline_s / one) + 2
        results = await asyncio.gather(
            *(eng.evaluate(doc("spin", n=151 + i)) for i in range(queued))
        )
        # The callers at the back of the queue ran out of time...
        assert results[0].error is None
        assert results[-1].error == "policy_timeout"
        # ...but the worker was given time to finish instead of being killed.
        await asyncio.sleep(one + 0.1)
        assert eng.status()["worker_timeouts"] == 0
        assert eng.status()["worker_pids"] == pid
        assert (await eng.evaluate(doc("other"))).effect is Effect.ALLOW
    finally:
        await eng.close()
