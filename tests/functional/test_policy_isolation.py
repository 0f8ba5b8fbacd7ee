"""A policy that crashes the engine or loops for minutes cannot take the proxy down.

Both policies below are input-triggered, so they compile and activate like any
other; the fault happens on the production path (set input, query bundle):

* ``json.unmarshal`` of a deeply nested string overflows rego-cpp's stack and
  the worker dies of SIGSEGV;
* two nested ``numbers.range`` iterations over a large ``n`` run for hours.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from warden.config import PolicyConfig
from warden.errors import Overloaded
from warden.model import Action, ActionKind, Agent, Effect, Mode, RequestMeta, Stage, new_id
from warden.pipeline import GuardContext
from warden.policy.engine import PolicyEngine, PolicyResult
from warden.policy.guard import PolicyGuard

# Wall-clock bounds on deadlines and kills: run alone, not beside other tests.
pytestmark = pytest.mark.serial

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


def write_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    root.mkdir()
    (root / "policy.rego").write_text(POLICY)
    return root


def action(tool: str) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent(id="tester"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool=tool,
        arguments={},
    )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[PolicyEngine]:
    root = write_bundle(tmp_path)
    # The stack the usual Linux limit gives: the parser's recursion crashes a worker on a
    # 30,000-deep document in milliseconds (Warden's default stack takes it).
    config = PolicyConfig(
        bundles=(str(root),),
        workers=2,
        deadline_ms=DEADLINE_MS,
        watch=False,
        worker_stack_mb=8,
    )
    # A worker starved of CPU by tests running beside this one is pushed back
    # (Overloaded) after the queue bound; these tests are about looping policies.
    eng = await PolicyEngine.start(config, queue_timeout_s=30)
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


async def test_a_caller_queued_behind_stuck_workers_is_evaluated_not_timed_out(
    tmp_path: Path,
) -> None:
    eng = await PolicyEngine.start(
        PolicyConfig(bundles=(str(write_bundle(tmp_path)),), workers=2, deadline_ms=DEADLINE_MS),
        watch=False,
        queue_timeout_s=30,
    )
    try:
        spins = [eng.evaluate(doc("spin", n=200_000 + i)) for i in range(2)]
        queued = eng.evaluate(doc("other"))
        results = await asyncio.gather(*spins, queued)
    finally:
        await eng.close()
    # Both workers were stuck past the deadline and killed; the queued call's
    # deadline only started once a (replacement) worker took it.
    assert [r.error for r in results] == ["policy_timeout", "policy_timeout", None]
    assert results[2].effect is Effect.ALLOW


async def test_queueing_under_load_neither_times_out_nor_kills_healthy_workers(
    tmp_path: Path,
) -> None:
    deadline_s = 0.6
    config = PolicyConfig(
        bundles=(str(write_bundle(tmp_path)),), workers=1, deadline_ms=deadline_s * 1000
    )
    eng = await PolicyEngine.start(config, watch=False, queue_timeout_s=30)
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
        # Together they waited longer than the deadline, each ran within it.
        assert [r.error for r in results] == [None] * queued
        assert eng.status()["worker_timeouts"] == 0
        assert eng.status()["worker_pids"] == pid
    finally:
        await eng.close()


async def test_a_wait_past_the_queue_bound_pushes_back_instead_of_deciding(
    tmp_path: Path,
) -> None:
    def overloaded() -> float:
        return REGISTRY.get_sample_value("warden_policy_overloaded_total") or 0

    def fallbacks() -> float:
        return sum(
            sample.value
            for metric in REGISTRY.collect()
            if metric.name == "warden_policy_fallbacks"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    config = PolicyConfig(bundles=(str(write_bundle(tmp_path)),), workers=1, deadline_ms=2000)
    eng = await PolicyEngine.start(config, watch=False, queue_timeout_s=0.2)
    guard = PolicyGuard(eng, config)
    before, fallbacks_before = overloaded(), fallbacks()
    try:
        spin = asyncio.ensure_future(eng.evaluate(doc("spin", n=200_000)))
        await asyncio.sleep(0.05)  # the spin holds the only worker
        started = time.monotonic()
        with pytest.raises(Overloaded) as caught:
            await guard.check(action("lookup"), GuardContext(mode=Mode.ENFORCE, risk="read_only"))
        waited = time.monotonic() - started
        spin.cancel()
    finally:
        await eng.close()
    assert 0.2 <= waited < 0.2 + SLACK_S * 2
    assert (caught.value.status, caught.value.code, caught.value.retry_after_s) == (
        503,
        "overloaded",
        1,
    )
    assert overloaded() == before + 1
    assert fallbacks() == fallbacks_before  # busy is never a decision


async def _stopped_for(eng: PolicyEngine, seconds: float) -> PolicyResult:
    """Evaluate while the only worker is stopped (SIGSTOP) for ``seconds``: starved, not looping."""
    (pid,) = eng.status()["worker_pids"]
    # Stopped before the input is sent: sent first, a worker on the other CPU could
    # answer before the signal lands, and the input would not be starved at all.
    os.kill(pid, signal.SIGSTOP)
    try:
        call = asyncio.ensure_future(eng.evaluate(doc("other")))
        await asyncio.sleep(seconds)  # dispatched at once: the kill timer runs from there
    finally:
        os.kill(pid, signal.SIGCONT)
    return await call


async def test_a_worker_starved_of_cpu_is_not_killed_at_the_deadline(tmp_path: Path) -> None:
    config = PolicyConfig(bundles=(str(write_bundle(tmp_path)),), workers=1, deadline_ms=100)
    eng = await PolicyEngine.start(config, watch=False, queue_timeout_s=10)
    try:
        pids = eng.status()["worker_pids"]
        result = await _stopped_for(eng, 0.5)  # five deadlines of wall time, no CPU
        assert (result.error, result.effect) == (None, Effect.ALLOW)
        assert eng.status()["worker_timeouts"] == 0
        assert eng.status()["worker_pids"] == pids
    finally:
        await eng.close()


async def test_a_worker_starved_past_the_queue_bound_pushes_back(tmp_path: Path) -> None:
    config = PolicyConfig(bundles=(str(write_bundle(tmp_path)),), workers=1, deadline_ms=100)
    eng = await PolicyEngine.start(config, watch=False, queue_timeout_s=0.3)
    try:
        pids = eng.status()["worker_pids"]
        with pytest.raises(Overloaded):
            await _stopped_for(eng, 0.8)
        # The worker was not blamed: it answers the next input.
        assert (await eng.evaluate(doc("other"))).effect is Effect.ALLOW
        assert eng.status()["worker_timeouts"] == 0
        assert eng.status()["worker_pids"] == pids
    finally:
        await eng.close()
