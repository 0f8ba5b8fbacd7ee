"""CI runs recorded in a running Warden's own log, through ``POST /v1/changes``.

A real Warden holds its audit log, so ``warden eval run`` and ``warden policy
replay`` cannot open it: with ``--admin`` they send their change record to
the admin API instead. The record must land in the live log, name the token's
subject, and appear in ``warden audit export``'s change log; the API must
refuse what is not an eval or replay run, and append nothing when it does.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from tests.functional.test_challenger_functional import candidate
from warden.admin.auth import hash_token
from warden.admin.change_routes import MAX_BODY_BYTES
from warden.cli import main as warden_main
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "policies" / "customer-support-evals" / "suite.jsonl"
ADMIN_TOKEN, VIEWER_TOKEN = "ci-admin-token", "grafana-viewer-token"
ADMIN = {
    "tokens": [
        {"subject": "ci-bot", "roles": ["admin"], "sha256": hash_token(ADMIN_TOKEN)},
        {"subject": "grafana", "roles": ["viewer"], "sha256": hash_token(VIEWER_TOKEN)},
    ]
}
MESSAGES: Any = [{"role": "user", "content": "refund my order"}]
RECORDED = re.compile(r"recorded as (rec_\S+) by (\S+)")


def eval_body(**changes: Any) -> dict[str, Any]:
    """An ``eval_run`` body of the shape ``warden eval run`` sends."""
    body: dict[str, Any] = {
        "suite": "suite.jsonl",
        "suite_sha256": "0" * 64,
        "scenarios": 1,
        "passed": 1,
        "failed": 0,
        "failed_ids": [],
        "bundle_revision": "rev-1",
        "bundles": ["policies/customer-support"],
        "result": "pass",
    }
    body.update(changes)
    return body


def export_changes(audit: Path, out: Path) -> list[dict[str, Any]]:
    """``warden audit export`` of ``audit``: its change log."""
    assert warden_main(["audit", "verify", "--dir", str(audit)]) == 0
    assert warden_main(["audit", "export", "--dir", str(audit), "--out", str(out)]) == 0
    return [orjson.loads(line) for line in (out / "changelog.jsonl").read_bytes().splitlines()]


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_TOKEN", ADMIN_TOKEN)
    # --admin URL is given: the environment's URL must not be what is used.
    monkeypatch.setenv("WARDEN_ADMIN_URL", "http://127.0.0.1:9")


async def test_an_eval_run_is_recorded_in_the_live_log(
    tmp_path: Path, llm: MockLLM, token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Warden(make_config(tmp_path, llm.url, admin=ADMIN)) as warden:
        # In a thread: the command blocks on HTTP while this loop serves the admin API.
        code = await asyncio.to_thread(
            warden_main,
            ["eval", "run", str(SUITE), "--bundle", str(SHIPPED_POLICY)]
            + ["--admin", warden.admin_url],
        )
        out = capsys.readouterr().out
        assert code == 0, out
        found = RECORDED.search(out)
        assert found is not None, out
        assert found.group(2) == warden.admin_url
    audit = tmp_path / "audit"
    [record] = [r for r in audit_records(audit) if r["kind"] == "eval_run"]
    assert record["id"] == found.group(1)
    body = record["body"]
    assert body["suite_sha256"] == hashlib.sha256(SUITE.read_bytes()).hexdigest()
    assert (body["bundle_revision"], body["result"], body["failed"]) == (
        "customer-support-2025.1",
        "pass",
        0,
    )
    assert body["submitted_by"] == "ci-bot"

    changes = export_changes(audit, tmp_path / "evidence")
    assert [c["kind"] for c in changes] == ["config_load", "policy_activation", "eval_run"]
    assert changes[2]["id"] == record["id"]
    assert changes[2]["body"]["submitted_by"] == "ci-bot"
    assert changes[2]["body"]["suite_sha256"] == body["suite_sha256"]


async def test_a_replay_of_the_live_log_is_recorded_in_it(
    tmp_path: Path, llm: MockLLM, token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # A candidate that holds refunds above 50 for approval; the live bundle allows 75.
    bundle = candidate(tmp_path, 50, "rev-50")
    audit = tmp_path / "audit"
    async with Warden(make_config(tmp_path, llm.url, admin=ADMIN)) as warden:
        llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 75})]))
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as client:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        code = await asyncio.to_thread(
            warden_main,
            ["policy", "replay", "--audit", str(audit), "--bundle", str(bundle)]
            + ["--max-changes", "5", "--admin", warden.admin_url],
        )
        out = capsys.readouterr().out
        assert code == 0, out
        found = RECORDED.search(out)
        assert found is not None, out
    [record] = [r for r in audit_records(audit) if r["kind"] == "replay_run"]
    assert record["id"] == found.group(1)
    body = record["body"]
    assert body["bundle_revision"] == "rev-50"
    assert body["changes"] == {"allow→require_approval": 1}
    assert body["threshold"] == {"max_changes": 5, "max_change_rate": None, "allow_skipped": False}
    assert (body["skipped"], body["unreplayed"], body["errors"]) == ({}, 0, 0)
    assert (body["result"], body["submitted_by"]) == ("pass", "ci-bot")
    changes = export_changes(audit, tmp_path / "evidence")
    assert [c["kind"] for c in changes][-1] == "replay_run"
    assert changes[-1]["id"] == record["id"]


async def test_the_api_refuses_what_is_not_an_eval_or_replay_run(
    tmp_path: Path, llm: MockLLM
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        Warden(make_config(tmp_path, llm.url, admin=ADMIN)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url) as http,
    ):

        async def post(doc: Any, token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            data = doc if isinstance(doc, bytes) else orjson.dumps(doc)
            async with http.post("/v1/changes", data=data, headers=headers) as resp:
                return resp.status, await resp.json()

        good = {"kind": "eval_run", "body": eval_body()}
        assert (await post(good, token=None))[0] == 401
        status, err = await post(good, token=VIEWER_TOKEN)
        assert (status, err["error"]["code"]) == (403, "forbidden")
        status, err = await post({"kind": "policy_activation", "body": eval_body()})
        assert status == 400
        assert "eval_run, replay_run" in err["error"]["message"]
        assert (await post({"kind": "config_load", "body": {}}))[0] == 400
        assert (await post({"kind": "eval_run", "body": ["not", "an", "object"]}))[0] == 400
        assert (await post({"kind": "eval_run", "body": "text"}))[0] == 400
        assert (await post([good]))[0] == 400
        assert (await post(b"{not json"))[0] == 400
        status, err = await post({"kind": "eval_run", "body": {"suite": "s"}})
        assert status == 400
        assert "suite_sha256" in err["error"]["message"]
        assert (await post({"kind": "eval_run", "body": eval_body(passed="all")}))[0] == 400
        assert (await post({"kind": "eval_run", "body": eval_body(result="maybe")}))[0] == 400
        # Too large: the body by one byte (the request around it is within its limit),
        # and a whole request far past it.
        pad = MAX_BODY_BYTES - len(orjson.dumps(eval_body(suite="")))
        status, err = await post({"kind": "eval_run", "body": eval_body(suite="x" * (pad + 1))})
        assert (status, err["error"]["code"]) == (413, "too_large")
        huge = ["x" * 1000] * (2 * MAX_BODY_BYTES // 1000)
        assert (await post({"kind": "eval_run", "body": eval_body(failed_ids=huge)}))[0] == 413
        # Nothing above was appended; the same route takes well-formed runs, the
        # largest allowed among them.
        status, created = await post(good)
        assert status == 201, created
        async with http.post("/v1/changes", json=good, headers=auth) as resp:
            assert resp.status == 201
            second = await resp.json()
        assert second["seq"] == created["seq"] + 1
        status, largest = await post({"kind": "eval_run", "body": eval_body(suite="x" * pad)})
        assert status == 201, largest
    records = audit_records(tmp_path / "audit")
    kinds = [r["kind"] for r in records]
    assert "replay_run" not in kinds
    assert kinds.count("config_load") == 1
    runs = [r for r in records if r["kind"] == "eval_run"]
    assert [r["id"] for r in runs] == [created["id"], second["id"], largest["id"]]
    assert all(r["body"]["submitted_by"] == "ci-bot" for r in runs)


async def test_the_cli_says_why_a_run_was_not_recorded(
    tmp_path: Path,
    llm: MockLLM,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = ["eval", "run", str(SUITE), "--bundle", str(SHIPPED_POLICY), "--admin"]
    async with Warden(make_config(tmp_path, llm.url, admin=ADMIN)) as warden:
        # The URL from the environment when --admin has none.
        monkeypatch.setenv("WARDEN_ADMIN_URL", warden.admin_url)
        monkeypatch.setenv("WARDEN_TOKEN", VIEWER_TOKEN)
        assert await asyncio.to_thread(warden_main, run) == 2
        err = capsys.readouterr().err
        assert f"not recorded by {warden.admin_url}" in err
        assert "403: this route needs the role admin" in err
        monkeypatch.delenv("WARDEN_TOKEN")
        assert await asyncio.to_thread(warden_main, run) == 2
        assert "set WARDEN_TOKEN" in capsys.readouterr().err
    assert [r for r in audit_records(tmp_path / "audit") if r["kind"] == "eval_run"] == []
    # Nothing listens there any more.
    monkeypatch.setenv("WARDEN_TOKEN", ADMIN_TOKEN)
    assert await asyncio.to_thread(warden_main, run) == 2
    assert "cannot reach the admin API" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "run", str(SUITE), "--admin", "http://127.0.0.1:9", "--audit", "somewhere"],
        ["eval", "run", str(SUITE), "--record", "--admin"],
        ["policy", "replay", "--bundle", "b", "--record", "--admin", "http://127.0.0.1:9"],
    ],
)
def test_admin_and_a_log_together_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        warden_main(argv)
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
