"""``warden eval run``, ``warden policy test`` and ``warden policy eval`` read a result as the
proxy does.

They compared the policy's raw result with the expectation, so two results
the proxy handles otherwise passed both:

* ``"approvers": "support-leads"`` (a string, not a list): the proxy refuses
  the result and denies the call as a policy error (``guard: fallback``);
* ``{"effect": "deny", "mode": "observe"}``: the proxy records the denial and
  lets the call through.

Each test first shows what a real Warden does with the bundle (the openai SDK
through the proxy to a mock model), then that the tools now say so.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.sdk_calls import function_calls
from warden.cli import main as warden_main
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

POLICY = """package warden
import rego.v1
default decision := {"effect": "allow", "reason": "ok"}
decision := {"effect": "require_approval", "reason": "big", "approvers": "support-leads"} if {
    input.action.tool == "issue_refund"
}
decision := {"effect": "deny", "reason": "never close accounts", "mode": "observe"} if {
    input.action.tool == "close_account"
}
decision := {"effect": "deny", "reason": "no deletes", "approvers": ["dpo"]} if {
    input.action.tool == "delete_customer"
}
"""
REFUND: dict[str, Any] = {"tool": "issue_refund", "arguments": {"amount": 500}}
CLOSE: dict[str, Any] = {"tool": "close_account", "arguments": {"id": "C-1"}}
DELETE: dict[str, Any] = {"tool": "delete_customer", "arguments": {"id": "C-1"}}
DENY = {"effect": "deny"}


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "policy.rego").write_text(POLICY)
    return folder


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = warden_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_the_proxy(tmp_path: Path, policy: Path) -> None:
    """What the tools must agree with: a real Warden blocks the refund (its result is
    invalid) and lets the observed denial through."""

    async def run() -> dict[str, list[str]]:
        received: dict[str, list[str]] = {}
        async with MockLLM() as llm:
            config = make_config(tmp_path, llm.url, policy={"bundles": [str(policy)]})
            async with Warden(config) as warden:
                for call in (REFUND, CLOSE):
                    llm.script(Reply(tool_calls=[Call(call["tool"], call["arguments"])]))
                    async with openai.AsyncOpenAI(
                        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
                    ) as client:
                        answer = await client.chat.completions.create(
                            model="gpt-4o", messages=[{"role": "user", "content": "go"}]
                        )
                    calls = function_calls(answer.choices[0].message)
                    received[call["tool"]] = [t.function.name for t in calls]
        return received

    assert asyncio.run(run()) == {"issue_refund": [], "close_account": ["close_account"]}
    decisions = {
        r["action"]["tool"]: r["decision"]
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"]
    }
    refund, close = decisions["issue_refund"], decisions["close_account"]
    assert (refund["effect"], refund["guard"], refund["error"]) == (
        "deny",
        "fallback",
        "policy_error",
    )
    assert (close["effect"], close["mode"]) == ("deny", "observe")


def write_suite(tmp_path: Path, scenarios: list[dict[str, Any]]) -> Path:
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps(s) + "\n" for s in scenarios))
    return suite


def test_eval_run_fails_what_the_proxy_would_not_do(
    tmp_path: Path, policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check_the_proxy(tmp_path, policy)
    suite = write_suite(
        tmp_path,
        [
            {
                "id": "refund-held",
                "call": REFUND,
                "expect": {"effect": "require_approval", "approvers": "support-leads"},
            },
            {"id": "close-denied", "call": CLOSE, "expect": {"effect": "deny"}},
            # What the proxy does do: both pass.
            {
                "id": "close-observed",
                "call": CLOSE,
                "expect": {"effect": "deny", "mode": "observe"},
            },
            {
                "id": "delete-denied",
                "call": DELETE,
                "expect": {"effect": "deny", "mode": "enforce"},
            },
        ],
    )
    argv = ["eval", "run", str(suite), "--bundle", str(policy), "--format", "json"]
    code, out, _ = cli(argv, capsys)
    assert code == 1, out
    doc = orjson.loads(out)
    by_id = {s["id"]: s for s in doc["scenarios"]}
    refund = by_id["refund-held"]
    assert refund["status"] == "ERROR"
    assert "approvers must be a list of strings" in refund["message"]
    assert "policy error" in refund["message"]
    close = by_id["close-denied"]
    assert (close["status"], close["effect"], close["mode"]) == ("FAIL", "deny", "observe")
    assert 'got "deny (observe)"' in close["message"]
    assert "lets the call through" in close["message"]
    assert by_id["close-observed"]["status"] == "PASS"
    assert by_id["delete-denied"]["status"] == "PASS"
    assert (doc["passed"], doc["failed"]) == (2, 2)

    code, out, _ = cli(argv[:-2], capsys)
    assert code == 1
    assert "close-denied    deny (observe)" in out


def test_eval_run_fails_a_denial_the_configured_observe_mode_lets_through(
    tmp_path: Path, policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The scenario's mode (else the agent's configured one) counts when the rule gives none."""
    suite = write_suite(
        tmp_path,
        [
            {"id": "observed", "call": DELETE, "mode": "observe", "expect": {"effect": "deny"}},
            {"id": "enforced", "call": DELETE, "mode": "enforce", "expect": {"effect": "deny"}},
        ],
    )
    code, out, _ = cli(
        ["eval", "run", str(suite), "--bundle", str(policy), "--format", "json"], capsys
    )
    statuses = {s["id"]: (s["status"], s["message"]) for s in orjson.loads(out)["scenarios"]}
    assert code == 1
    assert statuses["enforced"] == ("PASS", "")
    assert statuses["observed"][0] == "FAIL"
    assert "input.mode is observe" in statuses["observed"][1]


def test_decision_tables_fail_what_the_proxy_would_not_do(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (policy / "refunds_cases.yaml").write_text(
        """cases:
  - name: refund held for support leads
    input: {action: {kind: tool_call, tool: issue_refund, arguments: {amount: 500}}}
    expect: {effect: require_approval, approvers: support-leads}
  - name: close_account denied
    input: {action: {kind: tool_call, tool: close_account, arguments: {id: C-1}}}
    expect: {effect: deny}
  - name: close_account observed
    input: {action: {kind: tool_call, tool: close_account, arguments: {id: C-1}}}
    expect: {effect: deny, mode: observe}
  - name: delete denied while enforcing
    input: {mode: enforce, action: {kind: tool_call, tool: delete_customer}}
    expect: {effect: deny, mode: enforce}
  - name: delete in an observed agent
    input: {mode: observe, action: {kind: tool_call, tool: delete_customer}}
    expect: {effect: deny}
"""
    )
    code, out, _ = cli(["policy", "test", str(policy), "--format", "json"], capsys)
    assert code == 1, out
    results = {r["name"]: r for r in orjson.loads(out)}
    refund = results["refund held for support leads"]
    assert refund["status"] == "ERROR"
    assert "approvers must be a list of strings" in refund["message"]
    assert results["close_account denied"]["status"] == "FAIL"
    assert 'got "deny (observe)"' in results["close_account denied"]["message"]
    assert results["close_account observed"]["status"] == "PASS"
    assert results["delete denied while enforcing"]["status"] == "PASS"
    assert results["delete in an observed agent"]["status"] == "FAIL"


def test_policy_eval_says_the_proxy_refuses_the_result(
    tmp_path: Path, policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "input.json"
    given.write_text(json.dumps({"action": {"kind": "tool_call", **REFUND}}))
    argv = ["policy", "eval", "--input", str(given), "--bundle", str(policy), "--repeat", "0"]
    code, out, err = cli(argv, capsys)
    assert code == 1
    doc = orjson.loads(out)
    assert doc["result"]["approvers"] == "support-leads"  # the raw result, as before
    assert "approvers must be a list of strings" in doc["invalid"]
    assert "the proxy refuses this result" in err

    given.write_text(json.dumps({"action": {"kind": "tool_call", **DELETE}}))
    code, out, _ = cli(argv, capsys)
    assert code == 0
    assert "invalid" not in orjson.loads(out)
