"""What conversation history costs per decision, at 10, 50 and 200 prior messages.

For an OpenAI Chat request whose conversation holds N prior messages (N/2
tool calls, each answered by a result of about 400 characters), measures:

* ``extract``: reading the request's history and session
  (:func:`warden.sessions.conversation_of`), once per request;
* ``verify``: the session guard's first ``admit`` of a request: every prior
  call checked against Warden's record of decided calls, from memory
  (``warm``) and from the SQLite state store after a restart (``cold``),
  plus the session's counters read from the store;
* ``miss``: one policy evaluation in a worker process with the cache off
  (the shipped customer-support bundle): the input carries the history, and
  the engine projects it to the four fields the bundle reads of each entry;
  ``miss 0`` is the same action with no history, measured in the same run;
* ``hit``: the same input answered from the decision cache.

Prints a table and writes benchmarks/results/history.json.

    python benchmarks/history.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from warden.config import PolicyConfig, SessionsConfig, ToolConfig  # noqa: E402
from warden.model import (  # noqa: E402
    Action,
    ActionKind,
    Agent,
    Conversation,
    Decision,
    Effect,
    Mode,
    RequestMeta,
    Stage,
    new_id,
)
from warden.pipeline import GuardContext, policy_input  # noqa: E402
from warden.policy.engine import PolicyEngine  # noqa: E402
from warden.sessions import SessionGuard, conversation_of  # noqa: E402
from warden.state.sessions import SessionStore  # noqa: E402

RESULTS = HERE / "results"
BUNDLE = ROOT / "policies" / "customer-support"
SIZES = (10, 50, 200)
TOOLS = {"fetch_url": ToolConfig(labels=("untrusted_output",))}
RESULT_TEXT = "Order status: delivered on 2026-11-20, signed for by the customer. " * 6


def chat_body(messages: int, salt: str) -> dict[str, Any]:
    """A chat request with ``messages`` prior messages: calls and their results, alternating."""
    out: list[dict[str, Any]] = [{"role": "user", "content": "refund order A-1 please"}]
    for i in range(messages // 2):
        call_id = f"call_{salt}_{i}"
        tool = ("get_order", "search_kb", "fetch_url")[i % 3]
        out.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": f'{{"order_id": "A-{i}"}}'},
                    }
                ],
            }
        )
        out.append({"role": "tool", "tool_call_id": call_id, "content": RESULT_TEXT})
    return {"model": "gpt-4o", "messages": out}


def refund(conversation: Conversation | None) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent("support-bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions", conversation=conversation),
        tool="issue_refund",
        arguments={"order_id": "A-1", "amount": 20},
        raw_arguments='{"order_id": "A-1", "amount": 20}',
        call_id=new_id("call"),
        model="gpt-4o",
    )


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": round(ordered[len(ordered) // 2], 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "mean_us": round(statistics.fmean(ordered), 1),
    }


async def record_decided(
    guard: SessionGuard, body: dict[str, Any], conversation: Conversation | None
) -> None:
    """Make Warden's records hold every call of the body, as if it had decided them in
    ``conversation`` (history is verified only against calls of its own session)."""
    for message in body["messages"]:
        for call in message.get("tool_calls") or ():
            fn = call["function"]
            action = Action(
                action_id=new_id("act"),
                agent=Agent("support-bot"),
                kind=ActionKind.TOOL_CALL,
                protocol="openai.chat",
                stage=Stage.PROPOSED,
                request=RequestMeta(
                    "POST", "openai", "/v1/chat/completions", conversation=conversation
                ),
                tool=fn["name"],
                arguments=json.loads(fn["arguments"]),
                raw_arguments=fn["arguments"],
                call_id=call["id"],
            )
            # As the pipeline does: admit (which places the call in its session), decide.
            await guard.admit(action, GuardContext(mode=Mode.ENFORCE))
            await guard.decided(
                action, Decision(new_id("dec"), Effect.ALLOW, ("bench",), Mode.ENFORCE, "policy")
            )


async def measure(
    size: int, rounds: int, scratch: Path, engine: PolicyEngine, hits: PolicyEngine
) -> dict[str, Any]:
    config = SessionsConfig()
    headers = {"X-Warden-Session": f"bench-{size}"}
    bodies = [chat_body(size, f"{size}r{r}") for r in range(rounds)]
    store = await SessionStore.open(f"sqlite:///{scratch}/state-{size}.db")
    try:
        guard = SessionGuard(store, config, TOOLS)
        for body in bodies:
            await record_decided(guard, body, conversation_of("openai.chat", body, headers, config))
        await guard.close()  # the decided calls are all in the store (and still in memory)
        extract: list[float] = []
        conversations = []
        for body in bodies:
            start = time.perf_counter_ns()
            conversations.append(conversation_of("openai.chat", body, headers, config))
            extract.append((time.perf_counter_ns() - start) / 1000)
        ctx = GuardContext(mode=Mode.ENFORCE)
        warm: list[float] = []
        inputs = []
        for conversation in conversations:
            action = refund(conversation)
            start = time.perf_counter_ns()
            _, seen = await guard.admit(action, ctx)
            warm.append((time.perf_counter_ns() - start) / 1000)
            # As the pipeline does after every admit: the session's turn is released.
            await guard.decided(action, None)
            inputs.append(policy_input(action, seen))
        assert all(h["verified"] for h in inputs[0]["history"]), "history should verify"
        restarted = SessionGuard(store, config, TOOLS)  # nothing in memory: the store answers
        cold: list[float] = []
        for body in bodies:
            action = refund(conversation_of("openai.chat", body, headers, config))
            start = time.perf_counter_ns()
            await restarted.admit(action, ctx)
            cold.append((time.perf_counter_ns() - start) / 1000)
            await restarted.decided(action, None)
    finally:
        await store.close()
    miss: list[float] = []
    bare: list[float] = []
    plain = policy_input(refund(None), GuardContext(mode=Mode.ENFORCE))
    for doc in inputs:
        start = time.perf_counter_ns()
        result = await engine.evaluate(doc)
        miss.append((time.perf_counter_ns() - start) / 1000)
        assert result.error is None, result.error
        start = time.perf_counter_ns()
        await engine.evaluate(plain)
        bare.append((time.perf_counter_ns() - start) / 1000)
    await hits.evaluate(inputs[0])
    hit: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        await hits.evaluate(inputs[0])
        hit.append((time.perf_counter_ns() - start) / 1000)
    return {
        "messages": size,
        "calls": size // 2,
        "extract": summary(extract),
        "verify_warm": summary(warm),
        "verify_cold": summary(cold),
        "miss": summary(miss),
        "miss_no_history": summary(bare),
        "hit": summary(hit),
        "input_bytes": len(json.dumps(inputs[0]["history"])),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    base = PolicyConfig(bundles=(str(BUNDLE),), workers=1, deadline_ms=1000, watch=False)
    engine = await PolicyEngine.start(base.model_copy(update={"cache_size": 0}))
    hits = await PolicyEngine.start(base)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            rows = [await measure(n, args.rounds, Path(scratch), engine, hits) for n in SIZES]
    finally:
        await engine.close()
        await hits.close()
    report = {"python": platform.python_version(), "rounds": args.rounds, "sizes": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "history.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"history cost per decision, p50 (p99) in µs, {args.rounds} rounds")
    print(
        f"{'messages':>8} {'extract':>14} {'verify warm':>14} {'verify cold':>14} "
        f"{'miss':>14} {'miss, none':>14} {'hit':>12}"
    )
    for r in rows:
        cells = [
            f"{r[k]['p50_us']:.0f} ({r[k]['p99_us']:.0f})"
            for k in ("extract", "verify_warm", "verify_cold", "miss", "miss_no_history", "hit")
        ]
        print(f"{r['messages']:>8} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    asyncio.run(main())
