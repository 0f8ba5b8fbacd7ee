"""The policy authoring loop as a team used to OPA runs it, through the real ``warden`` CLI.

``print()`` is one rule for ``check``, ``test``, ``eval`` and the loader ``warden
serve`` uses; a ``.rego`` file passed as a bundle names the folder to pass; ``warden
policy test`` without DIR says which bundle it tested and warns about modules here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.functional.conftest import make_config
from tests.sdk_calls import function_calls
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

ROOT = Path(__file__).resolve().parents[2]
WARDEN = ROOT / ".venv" / "bin" / "warden"

# print() at the start of a line (the loader took it for a function the bundle
# defines) and after another expression on the same line (the loader refused it).
PRINT_AT_LINE_START = '\tprint("tool", input.action.tool)\n\tinput.action.tool == "b"\n'
PRINT_MID_LINE = '\tinput.action.tool == "b"; print("tool", input.action.tool)\n'

POLICY = """package warden

import rego.v1

default decision := {{"effect": "allow", "reason": "anything but b"}}

decision := {{"effect": "deny", "reason": "no b"}} if {{
{body}}}
"""

TESTS = """package warden.tests

import rego.v1

test_a_is_allowed if {
	print("checking a")
	data.warden.decision.effect == "allow" with input.action as {"tool": "a"}
}
"""

FAILING_TEST = """
test_b_is_allowed if {
	print("checking b")
	data.warden.decision.effect == "allow" with input.action as {"tool": "b"}
}
"""


def warden(
    *args: str, cwd: Path | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    # No WARDEN_* settings from the environment: each test says what it uses.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    return subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
        [str(WARDEN), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def write_bundle(root: Path, body: str, *, failing: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "policy.rego").write_text(POLICY.format(body=body))
    (root / "policy_test.rego").write_text(TESTS + (FAILING_TEST if failing else ""))
    return root


def client(w: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{w.proxy_url}/openai/v1", api_key="k", max_retries=0, timeout=30
    )


async def allowed_calls(c: openai.AsyncOpenAI, llm: MockLLM, tool: str) -> list[str]:
    llm.script(Reply(tool_calls=[Call(tool, {})]))
    messages: Any = [{"role": "user", "content": "help"}]
    completion = await c.chat.completions.create(model="gpt-4o-mini", messages=messages)
    return [t.function.name for t in function_calls(completion.choices[0].message)]


@pytest.mark.parametrize("body", [PRINT_AT_LINE_START, PRINT_MID_LINE], ids=["start", "mid"])
async def test_print_is_accepted_alike_by_check_test_eval_and_serve(
    tmp_path: Path, llm: MockLLM, body: str
) -> None:
    bundle = write_bundle(tmp_path / "p", body)

    checked = warden("policy", "check", str(bundle))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "unknown function" not in checked.stdout

    tested = warden("policy", "test", str(bundle))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.strip() == "PASS: 1/1"

    evaluated = warden(
        "policy", "eval", "--input", "-", "--bundle", str(bundle), "--repeat", "0",
        stdin=json.dumps({"action": {"tool": "b"}}),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert json.loads(evaluated.stdout)["result"]["effect"] == "deny"
    assert evaluated.stderr == "tool b\n"

    # warden serve: its workers compile the bundle with the same loader.
    cfg = make_config(tmp_path, llm.url, policy={"bundles": [str(bundle)], "workers": 1})
    async with Warden(cfg) as w, client(w) as c:
        assert await allowed_calls(c, llm, "a") == ["a"]
        assert await allowed_calls(c, llm, "b") == []  # the rule holding print() denies


def test_print_output_is_shown_as_opa_test_and_opa_eval_show_it(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "p", PRINT_AT_LINE_START, failing=True)

    # Without -v: the failing test, with what it (and the policy) printed, indented.
    tested = warden("policy", "test", str(bundle))
    assert tested.returncode == 1
    failing = tested.stdout.split("data.warden.tests.test_b_is_allowed: FAIL", 1)[1]
    assert "\n  checking b\n  tool b\n" in failing.split("-" * 80)[0]
    assert "checking a" not in tested.stdout  # a passing test's output only with -v

    verbose = warden("policy", "test", "-v", str(bundle))
    passing = verbose.stdout.split("data.warden.tests.test_a_is_allowed: PASS", 1)[1]
    assert passing.startswith(" (")
    assert "\n\n  checking a\n  tool a\n\n" in passing.split("test_b_is_allowed")[0]

    as_json = json.loads(warden("policy", "test", "--format", "json", str(bundle)).stdout)
    assert {d["name"].rsplit(".", 1)[1]: d["printed"] for d in as_json} == {
        "test_a_is_allowed": "checking a\ntool a\n",
        "test_b_is_allowed": "checking b\ntool b\n",
    }

    # eval: on standard error, once for the first evaluation (not once per --repeat).
    evaluated = warden(
        "policy", "eval", "--input", "-", "--bundle", str(bundle), "--repeat", "5",
        stdin=json.dumps({"action": {"tool": "a"}}),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stderr == "tool a\n"
    assert json.loads(evaluated.stdout)["result"]["effect"] == "allow"  # the default


def test_a_rego_file_passed_as_a_bundle_names_the_folder_to_pass(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "p", PRINT_MID_LINE)

    # The `opa test p/policy.rego p/policy_test.rego` habit.
    tested = warden("policy", "test", "p/policy.rego", "p/policy_test.rego", cwd=tmp_path)
    assert tested.returncode == 2
    assert "tar.gz bundle" not in tested.stderr
    assert "p/policy.rego: a single .rego file, not a bundle" in tested.stderr
    assert "pass the bundle's folder, p," in tested.stderr

    checked = warden("policy", "check", "policy.rego", cwd=bundle)
    assert checked.returncode == 1
    assert "tar.gz bundle" not in checked.stdout
    assert "policy.rego: error: a single .rego file, not a bundle" in checked.stdout
    assert "pass the bundle's folder, . (this folder)," in checked.stdout

    (bundle / "data.json").write_text("{}")
    evaluated = warden(
        "policy", "eval", "--input", "-", "--bundle", "data.json", cwd=bundle, stdin="{}"
    )
    assert evaluated.returncode == 2
    assert "data.json: a single .json file, not a bundle" in evaluated.stderr


def test_test_without_dir_names_the_bundle_and_warns_about_modules_here(tmp_path: Path) -> None:
    configured = write_bundle(tmp_path / "configured", PRINT_MID_LINE)
    config = tmp_path / "warden.yaml"
    config.write_text(f"policy:\n  bundles: [{json.dumps(str(configured))}]\n")
    draft = write_bundle(tmp_path / "draft", PRINT_MID_LINE, failing=True)

    # Inside a bundle being written, with no DIR: the configured bundle is tested.
    tested = warden("policy", "test", "--config", str(config), cwd=draft)
    assert tested.returncode == 0
    assert tested.stdout.splitlines() == [
        f"testing {configured} (policy.bundles: no DIR given)",
        "PASS: 1/1",
    ]
    assert tested.stderr == (
        "warden policy: warning: policy.rego, policy_test.rego in this folder are not in the "
        f"bundle tested ({configured}); to test this folder's bundle: warden policy test .\n"
    )

    # What the warning suggests tests the draft, whose test fails.
    here = warden("policy", "test", "--config", str(config), ".", cwd=draft)
    assert here.returncode == 1
    assert "test_b_is_allowed: FAIL" in here.stdout
    assert not here.stdout.startswith("testing")
    assert here.stderr == ""

    # Inside the configured bundle itself: nothing to warn about.
    inside = warden("policy", "test", "--config", str(config), cwd=configured)
    assert inside.returncode == 0
    assert inside.stdout.startswith(f"testing {configured} ")
    assert inside.stderr == ""
