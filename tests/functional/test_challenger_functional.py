"""The live challenger on real traffic: a candidate bundle beside the shipped one.

The agent talks to Warden with the openai SDK. The challenger tightens the
refund limit without approval from 100 to 50, so a 75 USD refund is allowed
(the champion decides) and diverges as allow→require_approval; a 40 USD
refund agrees. The agent's decisions never change.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import openai
from prometheus_client import REGISTRY

from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from warden.config import ChallengerConfig
from warden.model import Decision, Effect, Mode
from warden.policy.challenger import Challenger
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund my order"}]


def candidate(tmp_path: Path, auto: int, revision: str) -> Path:
    """The shipped bundle with the refund limit without approval set to ``auto``."""
    bundle = tmp_path / revision
    shutil.copytree(SHIPPED_POLICY, bundle)
    data = json.loads((bundle / "data.json").read_text())
    data["warden"]["limits"]["issue_refund"]["auto"] = auto
    (bundle / "data.json").write_text(json.dumps(data))
    manifest = json.loads((bundle / ".manifest").read_text())
    manifest["revision"] = revision
    (bundle / ".manifest").write_text(json.dumps(manifest))
    return bundle


def divergences(frm: str, to: str) -> float:
    labels = {"from": frm, "to": to}
    return REGISTRY.get_sample_value("warden_challenger_divergence_total", labels) or 0.0


async def test_divergence_is_counted_and_recorded_on_live_traffic(
    llm: MockLLM, tmp_path: Path
) -> None:
    bundle = candidate(tmp_path, 50, "candidate-50")
    config = make_config(tmp_path, llm.url, policy={"challenger": {"bundles": [str(bundle)]}})
    before = divergences("allow", "require_approval")
    async with Warden(config) as warden:
        assert warden.challenger is not None
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as client:
            for i, amount in enumerate((40, 75)):
                refund = Call("issue_refund", {"order_id": f"A-{i}", "amount": amount})
                llm.script(Reply(tool_calls=[refund]))
                done = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                # The champion decides: both refunds reach the agent.
                calls = done.choices[0].message.tool_calls or []
                assert [c.function.name for c in calls if c.type == "function"] == ["issue_refund"]
        await warden.challenger.idle()
        # The challenger's workers get only CPU nothing else wants, in the proxy's
        # session (so in its scheduling group, where that priority counts); the
        # champion's are scheduled like the proxy.
        challenger_pids = warden.challenger.engine.status()["worker_pids"]
        assert challenger_pids
        for pid in challenger_pids:
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
            assert os.getsid(pid) == os.getsid(0)
            assert os.getpgid(pid) != os.getpgid(0)  # a terminal's Ctrl-C is not theirs
        assert warden._engine is not None
        for pid in warden._engine.status()["worker_pids"]:
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        stats = warden.challenger.stats()
        assert stats.revision == "candidate-50"
        assert stats.diverged == 1
        assert dict(stats.changes) == {"allow→require_approval": 1}
        # Two refunds and two model calls were compared; only the 75 USD refund diverged.
        assert stats.evaluated == 4
        assert stats.dropped == 0
    assert divergences("allow", "require_approval") == before + 1
    records = audit_records(tmp_path / "audit")
    refunds = [
        r for r in records if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]
    assert [r["decision"]["effect"] for r in refunds] == ["allow", "allow"]
    [challenged] = [r for r in records if r["kind"] == "challenger"]
    body = challenged["body"]
    assert body["decision_id"] == refunds[1]["decision"]["id"]
    assert body["champion"] == {
        "revision": "customer-support-2025.1",
        "effect": "allow",
        "mode": "enforce",
    }
    assert body["challenger"] == {
        "revision": "candidate-50",
        "effect": "require_approval",
        "mode": "enforce",
    }
    assert body["tool"] == "issue_refund"
    assert "arguments" not in json.dumps(body)
    # The challenger's own activation is recorded, apart from the champion's.
    roles = [r["body"]["role"] for r in records if r["kind"] == "policy_activation"]
    assert sorted(roles) == ["challenger", "champion"]


def rego_bundle(tmp_path: Path, name: str, rules: str) -> Path:
    """A bundle whose decision is ``rules``, else allow."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "policy.rego").write_text(
        f'package warden\nimport rego.v1\n{rules}else := {{"effect": "allow", "reason": "ok"}}\n'
    )
    return folder


async def test_a_candidate_that_only_changes_the_mode_diverges(
    llm: MockLLM, tmp_path: Path
) -> None:
    """``{"effect": "deny", "mode": "observe"}`` lets the call through: a divergence of
    its own (``deny→deny (observe)``), where comparing effects alone saw none."""
    deny = (
        'decision := {"effect": "deny", "reason": "no"%s} if { input.action.tool == "delete_db" }\n'
    )
    champion = rego_bundle(tmp_path, "champion", deny % "")
    candidate = rego_bundle(tmp_path, "candidate", deny % ', "mode": "observe"')
    policy = {"bundles": [str(champion)], "challenger": {"bundles": [str(candidate)]}}
    config = make_config(tmp_path, llm.url, policy=policy)
    before = divergences("deny", "deny (observe)")
    tools: Any = [{"type": "function", "function": {"name": "delete_db", "parameters": {}}}]
    async with Warden(config) as warden:
        assert warden.challenger is not None
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as client:
            llm.script(Reply(tool_calls=[Call("delete_db", {"db": "prod"})]))
            done = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, tools=tools
            )
            assert not done.choices[0].message.tool_calls  # the champion decides: denied
        await warden.challenger.idle()
        stats = warden.challenger.stats()
        assert stats.evaluated == 2  # the model call agrees
        assert dict(stats.changes) == {"deny→deny (observe)": 1}
    assert divergences("deny", "deny (observe)") == before + 1
    [challenged] = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "challenger"]
    body = challenged["body"]
    assert (body["champion"]["effect"], body["champion"]["mode"]) == ("deny", "enforce")
    assert (body["challenger"]["effect"], body["challenger"]["mode"]) == ("deny", "observe")


async def test_a_full_queue_drops_and_counts_instead_of_waiting() -> None:
    config = ChallengerConfig(bundles=("unused",), queue_size=2)
    # No engine is needed: nothing drains while this coroutine does not yield.
    challenger = Challenger(engine=None, config=config, default_effect=Effect.DENY)  # type: ignore[arg-type]
    decision = Decision("dec_1", Effect.ALLOW, ("ok",), Mode.ENFORCE, "policy")
    before = REGISTRY.get_sample_value("warden_challenger_dropped_total", {"reason": "queue_full"})
    for _ in range(5):
        challenger.offer({"agent": {"id": "a"}, "action": {"tool": "t"}}, decision)
    assert challenger._dropped == 3
    assert len(challenger._queue) == 2
    after = REGISTRY.get_sample_value("warden_challenger_dropped_total", {"reason": "queue_full"})
    assert (after or 0.0) - (before or 0.0) == 3
    # A fallback is not the champion's answer: it is not compared at all.
    fallback = Decision("dec_2", Effect.DENY, ("x",), Mode.ENFORCE, "fallback")
    challenger._queue.clear()
    challenger.offer({}, fallback)
    assert len(challenger._queue) == 0
