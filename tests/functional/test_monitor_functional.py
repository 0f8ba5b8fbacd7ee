"""Drift and quality from real traffic: Warden proxying the openai SDK, the audit log it wrote.

* The drift gauges: a pinned baseline of refunds between 20 and 100, then
  real refunds between 150 and 900 through the proxy: the amount's PSI
  crosses 0.25 on ``/metrics`` while the tool mix (still only refunds) stays
  under 0.1.
* ``warden monitor compare``: the same agent run as version v1, then v2 (a
  redeploy on the same audit log), side by side.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.functional.conftest import make_config
from warden.cli import main as warden_main
from warden.monitor import drift
from warden.monitor.baseline import save_baseline
from warden.monitor.events import DecisionEvent
from warden.monitor.windows import Window
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund please"}]
AGENT = "support-triage"


async def refunds(warden: Warden, llm: MockLLM, amounts: list[float]) -> None:
    """One chat completion per refund, each in its own conversation."""
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        for i, amount in enumerate(amounts):
            llm.script(
                Reply(tool_calls=[Call("issue_refund", {"order_id": f"A-{i}", "amount": amount})])
            )
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={"X-Warden-Context-Session-Id": f"s-{i}"},
            )


async def scrape(warden: Warden) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{warden.admin_url}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("warden_drift", "warden_quality"))
    }


def pinned(tmp_path: Path, version: str) -> Path:
    """A baseline of 200 model calls, each proposing a refund between 20 and 100."""
    rng = random.Random(7)
    events = [
        DecisionEvent(
            ts=float(i),
            agent=AGENT,
            version=version,
            action_id=f"act_{i}",
            decision_id=f"dec_{i}",
            kind="tool_call",
            tool="issue_refund",
            effect="allow",
            guard="policy",
            elapsed_us=300,
            numbers=(("issue_refund.amount", round(rng.uniform(20, 100), 2)),),
        )
        for i in range(200)
    ]
    # Each refund came in a model's answer: the model call is decided too.
    events += [
        DecisionEvent(
            ts=float(i),
            agent=AGENT,
            version=version,
            action_id=f"act_llm_{i}",
            decision_id=f"dec_llm_{i}",
            kind="llm_call",
            tool=None,
            effect="allow",
            guard="policy",
            elapsed_us=300,
        )
        for i in range(200)
    ]
    path = tmp_path / "baseline.json"
    save_baseline(path, drift.profiles(events), Window(0, 200), "generated")
    return path


async def test_a_shift_in_refund_amounts_raises_the_drift_gauge(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(
        tmp_path,
        llm.url,
        agent={"id": AGENT, "version": "v1"},
        monitor={"baseline": str(pinned(tmp_path, "v1")), "min_samples": 10},
    )
    rng = random.Random(11)
    async with Warden(config) as warden:
        assert warden.monitor is not None
        await refunds(warden, llm, [round(rng.uniform(150, 900), 2) for _ in range(12)])
        await warden.monitor.refresh()
        gauges = await scrape(warden)
    group = (("agent", AGENT), ("version", "v1"))

    def psi(distribution: str) -> float:
        key = tuple(sorted((*group, ("distribution", distribution))))
        return gauges[("warden_drift_psi", key)]

    assert psi("number:issue_refund.amount") >= 0.25
    assert psi("tools") < 0.1  # still one refund per model call
    assert gauges[("warden_drift_level", group)] == 2  # act
    # Quality from the same traffic: every refund over 100 is held for approval.
    assert gauges[("warden_quality_rate", tuple(sorted((*group, ("rate", "hold")))))] == 0.5
    assert ("warden_quality_added_latency_p95_seconds", group) in gauges


@pytest.mark.parametrize("fmt", ["json"])
async def test_compare_shows_two_versions_from_real_traffic(
    tmp_path: Path, llm: MockLLM, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    rng = random.Random(5)
    for version, (low, high) in (("v1", (20, 90)), ("v2", (120, 400))):
        config = make_config(
            tmp_path, llm.url, agent={"id": AGENT, "version": version}, monitor={"enabled": False}
        )
        async with Warden(config) as warden:
            await refunds(warden, llm, [round(rng.uniform(low, high), 2) for _ in range(8)])
    audit = str(tmp_path / "audit")
    base = ["monitor", "compare", "--audit", audit, "--agent", AGENT, "--since", "1h"]
    assert warden_main([*base, "--versions", "v1,v2", "--min-samples", "5", "--format", fmt]) == 0
    doc = json.loads(capsys.readouterr().out)
    v1, v2 = doc["quality"]
    assert (v1["version"], v2["version"]) == ("v1", "v2")
    # 8 refunds and 8 model calls each; v1's refunds are allowed, v2's held.
    assert v1["decisions"] == v2["decisions"] == 16
    assert v1["hold_rate"] == 0.0
    assert v2["hold_rate"] == 0.5
    assert v1["conversations"] == v2["conversations"] == 8
    amounts = {d["name"]: d for d in doc["drift"]["distributions"]}
    assert amounts["number:issue_refund.amount"]["level"] == "act"
    assert doc["drift"]["level"] == "act"
    # The report and the drift table read the same log.
    assert warden_main(["monitor", "report", "--audit", audit, "--since", "1h"]) == 0
    report = capsys.readouterr().out
    assert "v1" in report
    assert "v2" in report
    assert "50.0%" in report
    # With no history before the last day there is nothing to compare with:
    # too little data is not drift, and the CI gate passes (the exit-1 path is
    # in test_monitor_cli_functional.py).
    assert warden_main(["monitor", "drift", "--audit", audit, "--fail-on", "act"]) == 0
    assert "insufficient" in capsys.readouterr().out
