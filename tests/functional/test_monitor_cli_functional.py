"""``warden monitor`` on real audit logs: drift figures, exit codes, baselines, quality gauges.

* Drift: the real :class:`~warden.audit.AuditLog` writes decisions stamped
  days or hours before now (its clock is swapped for one the test sets), and
  ``warden monitor drift`` compares the last day with the previous days, a
  configured number of days, or a baseline pinned by ``warden monitor
  baseline``. Every PSI is checked against the documented formula applied to
  the shares the test wrote.
* Quality: a real Warden serves the openai SDK, an HTTP tool API and the
  approvals admin API; the gauges on ``/metrics`` and ``warden monitor report``
  give the exact rates and cost per conversation of that traffic.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_monitor_functional import scrape
from warden.audit import AuditLog
from warden.cli import main as warden_main
from warden.config import AuditConfig
from warden.model import Effect
from warden.monitor.windows import parse_instant
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing.audit import sample_action, sample_decision
from warden.testing.mock_llm import prompt_tokens
from warden.testing.mock_tools import MockTools

AGENT = "support-triage"
VERSION = "2026-11-20"  # the version sample_action's agent runs
HOUR, DAY = 3600.0, 86400.0
AMOUNT = "number:issue_refund.amount"

# --- drift: logs with controlled times ---------------------------------------------------------


class _StampAt:
    """Stands in for the audit log's clock: the next record is stamped at ``at``."""

    def __init__(self) -> None:
        self.at = 0.0

    def now(self) -> str:
        return dt.datetime.fromtimestamp(self.at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def refunds(counts: Mapping[float, int]) -> list[float | None]:
    """``{amount: how many}`` as a list of refund amounts."""
    return [amount for amount, n in counts.items() for _ in range(n)]


def searches(n: int) -> list[float | None]:
    """``n`` knowledge-base searches (``None`` in a list of refund amounts)."""
    return [None] * n


async def write_log(
    audit: Path, monkeypatch: pytest.MonkeyPatch, batches: Mapping[float, Sequence[float | None]]
) -> None:
    """Record one decision per action through the real audit log, a batch ``age`` seconds ago.

    An action is a refund amount or ``None``, a search. A refund over 100 is
    held for approval (as the shipped policy holds it), one up to 100 and a
    search are allowed. Records of a batch are a second apart.
    """
    log = await AuditLog.open(AuditConfig(dir=str(audit), fsync="never"))
    clock = _StampAt()
    monkeypatch.setattr(log, "_clock", clock)
    now = time.time()
    try:
        i = 0
        for age, actions in batches.items():
            for j, amount in enumerate(actions):
                clock.at = now - age + j
                if amount is None:
                    action = sample_action(i, tool="search_kb", arguments={"query": "parcel"})
                    effect = Effect.ALLOW
                else:
                    action = sample_action(i, arguments={"order_id": f"A-{i}", "amount": amount})
                    effect = Effect.ALLOW if amount <= 100 else Effect.REQUIRE_APPROVAL
                await log.record_decision(action, sample_decision(effect))
                i += 1
    finally:
        await log.close()


def expected_psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """docs/monitoring.md: sum of (current − reference) × ln(current / reference) over shares,
    a share of 0 counted as 0.0001."""
    total = 0.0
    for ref_share, cur_share in zip(reference, current, strict=True):
        ref, cur = ref_share or 1e-4, cur_share or 1e-4
        total += (cur - ref) * math.log(cur / ref)
    return total


# The reference: 100 refunds, 20 each of 10..50 (deciles at 10, 20, 30, 40: five bins of
# a fifth each), and 100 searches; all allowed.
REFERENCE = refunds({10: 20, 20: 20, 30: 20, 40: 20, 50: 20}) + searches(100)
REF_SHARES = {"tools": [0.5, 0.5], "effects": [1.0, 0.0], AMOUNT: [0.2] * 5}
# Shifted: half the refunds in the 30..40 bin, half at 250 (over 40, and held); fewer searches.
SHIFTED = refunds({40: 25, 250: 25}) + searches(25)
SHIFTED_SHARES = {
    "tools": [50 / 75, 25 / 75],
    "effects": [50 / 75, 25 / 75],
    AMOUNT: [0, 0, 0, 0.5, 0.5],
}
SHIFTED_LEVELS = {"tools": "watch", "effects": "act", AMOUNT: "act"}


def drift_json(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """Exit status and JSON document of ``warden monitor drift --format json ARGS``."""
    code = warden_main(["monitor", "drift", "--format", "json", *args])
    return code, json.loads(capsys.readouterr().out)


def by_group(doc: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{version: {distribution: its figures}}`` of the JSON document's groups, for AGENT."""
    return {
        g["version"]: {d["name"]: d for d in g["distributions"]}
        for g in doc["groups"]
        if g["agent"] == AGENT
    }


def assert_shifted(
    doc: Mapping[str, Any], ref_n: Mapping[str, int], ref_shares: Mapping[str, list[float]]
) -> None:
    """The SHIFTED window's figures against a reference of ``ref_n`` samples, in both groups."""
    cur_n = {"tools": 75, "effects": 75, AMOUNT: 50}
    groups = by_group(doc)
    assert sorted(groups) == ["*", VERSION]  # each version, and the agent over all of them
    for dists in groups.values():
        assert sorted(dists) == sorted(SHIFTED_LEVELS)
        for name, dist in dists.items():
            psi = expected_psi(ref_shares[name], SHIFTED_SHARES[name])
            assert dist["psi"] == pytest.approx(psi, abs=1e-6), name
            assert dist["level"] == SHIFTED_LEVELS[name], name
            assert (dist["reference_n"], dist["current_n"]) == (ref_n[name], cur_n[name]), name
    for group in doc["groups"]:
        assert group["level"] == "act"
        top = expected_psi(ref_shares[AMOUNT], SHIFTED_SHARES[AMOUNT])
        assert group["max_psi"] == pytest.approx(top, abs=1e-6)


async def test_drift_json_gives_each_distributions_psi_and_fail_on_act_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refund amounts moving up: each distribution's PSI is the formula's, at its level, and
    ``--fail-on act`` exits 1; the reference is the 7 days before the last day."""
    audit = tmp_path / "audit"
    await write_log(audit, monkeypatch, {2 * DAY: REFERENCE, HOUR: SHIFTED})
    before = time.time()
    code, doc = drift_json("--audit", str(audit), "--fail-on", "act", capsys=capsys)
    after = time.time()
    assert code == 1
    assert_shifted(doc, {"tools": 200, "effects": 200, AMOUNT: 100}, REF_SHARES)
    # The windows: the last day, and the 7 days before it.
    cur_from, cur_to = (parse_instant(doc["current"][k]) for k in ("from", "to"))
    assert before - 1 <= cur_to <= after
    assert cur_to - cur_from == pytest.approx(DAY, abs=1)
    ref_from, ref_to = (parse_instant(t) for t in doc["reference"].split(".."))
    assert ref_from == pytest.approx(cur_from - 7 * DAY, abs=1)
    assert ref_to == cur_from


async def test_unchanged_distributions_have_zero_psi_and_pass_fail_on_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same shares in both windows: every PSI is 0, every level ok, and even
    ``--fail-on watch`` exits 0."""
    audit = tmp_path / "audit"
    same = refunds({10: 10, 20: 10, 30: 10, 40: 10, 50: 10}) + searches(50)
    await write_log(audit, monkeypatch, {2 * DAY: REFERENCE, HOUR: same})
    code, doc = drift_json("--audit", str(audit), "--fail-on", "watch", capsys=capsys)
    assert code == 0
    for dists in by_group(doc).values():
        assert {n: (d["psi"], d["level"]) for n, d in dists.items()} == {
            "tools": (0.0, "ok"),
            "effects": (0.0, "ok"),
            AMOUNT: (0.0, "ok"),
        }
    assert [g["level"] for g in doc["groups"]] == ["ok", "ok"]


async def test_fail_on_exits_1_only_at_or_past_the_level_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A drift at watch (PSI 0.11): ``--fail-on act`` exits 0, ``--fail-on watch`` exits 1,
    and without ``--fail-on`` the command exits 0."""
    audit = tmp_path / "audit"
    moved = refunds({10: 5, 20: 10, 30: 10, 40: 10, 50: 15}) + searches(50)
    await write_log(audit, monkeypatch, {2 * DAY: REFERENCE, HOUR: moved})
    code, doc = drift_json("--audit", str(audit), "--fail-on", "act", capsys=capsys)
    assert code == 0
    psi = expected_psi([0.2] * 5, [0.1, 0.2, 0.2, 0.2, 0.3])
    assert psi == pytest.approx(0.1 * math.log(2) + 0.1 * math.log(1.5))  # 0.1099
    for dists in by_group(doc).values():
        assert dists[AMOUNT]["psi"] == pytest.approx(psi, abs=1e-6)
        assert dists[AMOUNT]["level"] == "watch"
        assert (dists["tools"]["level"], dists["effects"]["level"]) == ("ok", "ok")
    assert [g["level"] for g in doc["groups"]] == ["watch", "watch"]
    assert drift_json("--audit", str(audit), "--fail-on", "watch", capsys=capsys)[0] == 1
    assert drift_json("--audit", str(audit), capsys=capsys)[0] == 0


async def test_drift_table_names_each_distribution_with_its_psi_and_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text table has a row per group and distribution: agent, version, distribution,
    PSI to 4 places, level and both sample sizes, under a line naming both windows."""
    audit = tmp_path / "audit"
    await write_log(audit, monkeypatch, {2 * DAY: REFERENCE, HOUR: SHIFTED})
    assert warden_main(["monitor", "drift", "--audit", str(audit)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Drift: current ")
    assert " against " in lines[0]
    assert lines[1].split() == [
        "agent", "version", "distribution", "psi", "level", "ref", "n", "cur", "n"
    ]  # fmt: skip
    assert lines[-1] == "Levels: ok < 0.1 <= watch < 0.25 <= act (PSI)."
    rows = [line.split() for line in lines[2:-1]]
    ref_n = {"tools": "200", "effects": "200", AMOUNT: "100"}
    cur_n = {"tools": "75", "effects": "75", AMOUNT: "50"}
    expected = [
        [
            AGENT,
            version,
            name,
            f"{expected_psi(REF_SHARES[name], SHIFTED_SHARES[name]):.4f}",
            SHIFTED_LEVELS[name],
            ref_n[name],
            cur_n[name],
        ]
        for version in ("*", VERSION)
        for name in ("tools", "effects", AMOUNT)
    ]
    assert rows == expected


async def test_a_baseline_pinned_by_the_cli_is_the_reference_for_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``monitor baseline --since 30d --until 20d`` pins only that window (not the refunds of
    40 days ago), keeps no arguments, and ``drift --baseline`` measures today's shift
    against it, where the previous 7 days alone have nothing to compare with."""
    audit, pinned = tmp_path / "audit", tmp_path / "baselines" / "support.json"
    older = refunds({900: 50})  # outside the pinned window
    await write_log(audit, monkeypatch, {40 * DAY: older, 25 * DAY: REFERENCE, HOUR: SHIFTED})
    base = ["monitor", "baseline", "--audit", str(audit), "--since", "30d", "--until", "20d"]
    assert warden_main([*base, "--out", str(pinned), "--format", "json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["out"] == str(pinned)
    assert saved["groups"] == 2  # the version, and the agent over all versions
    window = [parse_instant(saved["window"][k]) for k in ("from", "to")]
    assert window[1] - window[0] == pytest.approx(10 * DAY, abs=2)
    text = pinned.read_text()
    assert "A-1" not in text  # counts and bin edges, never the arguments
    assert "parcel" not in text  # (nor the searches' query)

    code, doc = drift_json(
        "--audit", str(audit), "--baseline", str(pinned), "--fail-on", "act", capsys=capsys
    )
    assert code == 1
    assert doc["reference"].startswith(f"baseline {pinned} (")
    assert_shifted(doc, {"tools": 200, "effects": 200, AMOUNT: 100}, REF_SHARES)
    # Without the baseline the reference is the previous 7 days: empty.
    code, doc = drift_json("--audit", str(audit), "--fail-on", "act", capsys=capsys)
    assert code == 0
    assert {g["level"] for g in doc["groups"]} == {"insufficient"}


async def test_the_rolling_reference_is_the_configured_days_before_the_current_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``monitor.reference: 3d`` the reference is the refunds of the previous three days
    (spread over two of them), not the older ones; ``--reference 7d`` takes those in too."""
    audit = tmp_path / "audit"
    config = tmp_path / "warden.yaml"
    config.write_text(f"audit:\n  dir: {audit}\nmonitor:\n  reference: 3d\n")
    day2, day3 = REFERENCE[::2], REFERENCE[1::2]  # half of each refund amount and search
    older = refunds({900: 100})
    await write_log(
        audit,
        monkeypatch,
        {6 * DAY: older, 3.5 * DAY: day3, 1.5 * DAY: day2, HOUR: SHIFTED},
    )
    code, doc = drift_json("--config", str(config), "--fail-on", "act", capsys=capsys)
    assert code == 1
    assert_shifted(doc, {"tools": 200, "effects": 200, AMOUNT: 100}, REF_SHARES)
    ref_from, ref_to = (parse_instant(t) for t in doc["reference"].split(".."))
    assert ref_to - ref_from == pytest.approx(3 * DAY, abs=1)
    assert ref_to == parse_instant(doc["current"]["from"])

    # The 7 days before: 100 more refunds, all of 900 (and held), in the reference.
    code, doc = drift_json("--config", str(config), "--reference", "7d", capsys=capsys)
    assert code == 0
    ref_from, ref_to = (parse_instant(t) for t in doc["reference"].split(".."))
    assert ref_to - ref_from == pytest.approx(7 * DAY, abs=1)
    for dists in by_group(doc).values():
        assert dists["tools"]["reference_n"] == 300
        assert dists[AMOUNT]["reference_n"] == 200
        # A third of the reference is now held; the current window holds a third too.
        assert dists["effects"]["psi"] == pytest.approx(0.0, abs=1e-6)


# --- quality: a real Warden ------------------------------------------------------------------

QUALITY_AGENT = "quality-bot"
MESSAGES: Any = [{"role": "user", "content": "refund please"}]
MODEL = "house-model"
PRICE_IN, PRICE_OUT = 1000.0, 10000.0  # USD per million tokens
TOKENS = {"dana": "tok-dana-approver"}


def admin_tokens() -> list[dict[str, Any]]:
    sha = hashlib.sha256(TOKENS["dana"].encode()).hexdigest()
    return [{"subject": "dana", "roles": ["approver"], "groups": ["support-leads"], "sha256": sha}]


def cost(reply: Reply) -> float:
    """What one model call answering ``reply`` to MESSAGES costs at the test's prices."""
    return (
        prompt_tokens({"messages": MESSAGES}) * PRICE_IN + reply.output_tokens * PRICE_OUT
    ) / 1e6


def refund(order: str, amount: float) -> Reply:
    return Reply(tool_calls=[Call("issue_refund", {"order_id": order, "amount": amount})])


# Each conversation's model calls, and what the model answers to each; ``None``: a model call
# in no conversation (its cost counts in the total, not per conversation).
CONVERSATIONS: dict[str | None, list[Reply]] = {
    "s-1": [
        Reply(text="Let me look at those orders first."),
        refund("A-1001", 40),  # allowed
        Reply(tool_calls=[Call("export_customers", {})]),  # denied
    ],
    "s-2": [refund("A-1002", 450), refund("A-1003", 250)],  # both held
    "s-3": [refund("A-1004", 300)],  # held
    None: [Reply(text="Hello, how can I help you today?")],
}
REJECTED = {450.0, 300.0}  # of the three held refunds; 250 is approved
ORDER_LOOKUPS = {"A-1001": 200, "A-1002": 200, "A-1003": 200, "A-9999": 404}  # in s-1
REPLIES = [r for replies in CONVERSATIONS.values() for r in replies]


async def scrape_quality(warden: Warden) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The quality gauges of this test's agent on ``/metrics``."""
    return {
        key: value
        for key, value in (await scrape(warden)).items()
        if key[0].startswith("warden_quality") and ("agent", QUALITY_AGENT) in key[1]
    }


async def admin(warden: Warden, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS['dana']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, warden.admin_url + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def traffic(warden: Warden, llm: MockLLM) -> None:
    """The conversations through the openai SDK, the order lookups through the HTTP tool API,
    and a person's verdict on each held refund through the admin API."""
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        for session, replies in CONVERSATIONS.items():
            headers = {} if session is None else {"X-Warden-Context-Session-Id": session}
            for reply in replies:
                llm.script(reply)
                await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, extra_headers=headers
                )
    async with aiohttp.ClientSession() as http:
        for order, status in ORDER_LOOKUPS.items():
            async with http.post(
                f"{warden.proxy_url}/support/tools/get_order",
                json={"order_id": order},
                headers={"X-Warden-Context-Session-Id": "s-1"},
            ) as resp:
                assert resp.status == status
    _, pending = await admin(warden, "GET", "/v1/approvals?status=pending")
    held = {float(a["arguments"]["amount"]): a["id"] for a in pending["approvals"]}
    assert sorted(held) == [250.0, 300.0, 450.0]
    for amount, approval in held.items():
        verdict = "reject" if amount in REJECTED else "approve"
        status, _ = await admin(warden, "POST", f"/v1/approvals/{approval}/{verdict}", {})
        assert status == 200


async def recorded(audit: Path, outcomes: int, verdicts: int) -> None:
    """Wait until the outcomes (written in the background) and verdicts are in the log."""
    for _ in range(200):
        kinds = [r["kind"] for r in audit_records(audit)]
        if kinds.count("outcome") >= outcomes and kinds.count("approval_decided") >= verdicts:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"the log has {kinds.count('outcome')} outcomes, not {outcomes}")


async def test_quality_gauges_and_report_give_exact_figures_of_real_traffic(
    tmp_path: Path, llm: MockLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exact quality figures of real traffic, on /metrics and in ``monitor report``: cost per
    conversation (priced model calls summed per session, over 3 sessions; a call in none
    counts only in the total), the tool error rate (1 of 4 HTTP tool answers failed), the
    approval-rejection rate (2 of 3 verdicts given through the admin API), deny and hold."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "providers:\n  openai:\n    input_includes_cached: true\n    models:\n"
        f"      {MODEL}: {{input: {PRICE_IN}, cached_input: {PRICE_IN}, output: {PRICE_OUT}}}\n"
    )
    route = {
        "method": "POST",
        "path": "/tools/get_order",
        "tool": "get_order",
        "arguments": {"order_id": "/order_id"},
    }
    async with MockTools() as tools:
        support = {"protocol": "http", "base_url": tools.url, "timeout_s": 5, "routes": [route]}
        config = make_config(
            tmp_path,
            llm.url,
            agent={"id": QUALITY_AGENT, "version": "v1"},
            upstreams={"support": support},
            admin={"tokens": admin_tokens()},
            prices={"file": str(prices)},
        )
        async with Warden(config) as warden:
            assert warden.monitor is not None
            await traffic(warden, llm)
            await recorded(tmp_path / "audit", len(REPLIES) + len(ORDER_LOOKUPS), 3)
            await warden.monitor.refresh()
            gauges = await scrape_quality(warden)

    # Decisions: 7 model calls, the 5 tool calls they proposed, 4 order lookups.
    decisions = len(REPLIES) + sum(len(r.tool_calls) for r in REPLIES) + len(ORDER_LOOKUPS)
    in_conversations = [cost(r) for s, replies in CONVERSATIONS.items() if s for r in replies]
    figures = {
        "deny": 1 / decisions,
        "hold": 3 / decisions,
        "approval_rejection": 2 / 3,
        "tool_error": 1 / 4,
        "cost_per_conversation": sum(in_conversations) / 3,
    }
    # The arithmetic spelt out: 2 prompt tokens at 0.001, each output token at 0.01 USD;
    # the text answer has 7 output tokens, each tool call 2.
    assert figures["cost_per_conversation"] == pytest.approx((0.072 + 5 * 0.022) / 3)
    group = (("agent", QUALITY_AGENT), ("version", "v1"))
    for rate in ("deny", "hold", "approval_rejection", "tool_error"):
        key = ("warden_quality_rate", tuple(sorted((*group, ("rate", rate)))))
        assert gauges[key] == pytest.approx(figures[rate], rel=1e-9), rate
    cost_gauge = gauges[("warden_quality_cost_per_conversation_usd", group)]
    assert cost_gauge == pytest.approx(figures["cost_per_conversation"], rel=1e-9)

    # The report reads the same figures back from the log.
    audit = str(tmp_path / "audit")
    report_args = ["monitor", "report", "--audit", audit, "--since", "1h", "--format", "json"]
    assert warden_main(report_args) == 0
    reports = {g["version"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert sorted(reports) == ["*", "v1"]
    for report in reports.values():
        assert report["decisions"] == decisions
        assert report["deny_rate"] == pytest.approx(figures["deny"], abs=1e-6)
        assert report["hold_rate"] == pytest.approx(figures["hold"], abs=1e-6)
        assert (report["approvals"], report["trusted_outcomes"]) == (3, 4)
        assert report["approval_rejection_rate"] == pytest.approx(2 / 3, abs=1e-6)
        assert report["tool_error_rate"] == 0.25
        assert report["conversations"] == 3
        assert report["cost_usd"] == pytest.approx(sum(cost(r) for r in REPLIES), abs=1e-6)
        assert report["cost_per_conversation_usd"] == pytest.approx(
            figures["cost_per_conversation"], abs=1e-6
        )
