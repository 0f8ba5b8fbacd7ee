"""A hold survives ``kill -9``: after a restart, a person's approval lets the retry pass once.

Warden runs as a real child process (its own session, so ``SIGKILL`` reaches
its policy workers too, as an OOM kill of the container would). The agent is
the openai SDK; the upstream and the admin calls live in the test process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.functional.conftest import ROOT, audit_records
from tests.functional.test_approvals_proxy_functional import BIG, MESSAGES, TOKENS, admin_tokens
from warden.testing import MockLLM, Reply

CHILD = r"""
import asyncio, json, sys
from pathlib import Path
from tests.functional.conftest import make_config
from warden.server import Warden

async def main():
    cfg = make_config(Path(sys.argv[1]), sys.argv[2], **json.loads(sys.argv[3]))
    async with Warden(cfg) as warden:
        warden.stop_on_signals()
        print(json.dumps({"proxy": warden.proxy_url, "admin": warden.admin_url}), flush=True)
        await warden.wait_stopped()

asyncio.run(main())
"""


class Child:
    """One Warden process on the test's state directory."""

    def __init__(self, tmp_path: Path, upstream: str, overrides: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), upstream, json.dumps(overrides)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.stdout.close()  # the child prints nothing after its addresses
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(f"Warden did not start (exit {self.proc.returncode})")
        urls = json.loads(line)
        self.proxy_url: str = urls["proxy"]
        self.admin_url: str = urls["admin"]

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()


async def admin(child: Child, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS['dana']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, child.admin_url + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def pending(child: Child, count: int = 1) -> list[dict[str, Any]]:
    for _ in range(400):
        _, body = await admin(child, "GET", "/v1/approvals?status=pending")
        if len(body["approvals"]) >= count:
            return list(body["approvals"])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


def agent(child: Child) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{child.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=60
    )


def tool_names(completion: Any) -> list[str]:
    return [t.function.name for t in completion.choices[0].message.tool_calls or []]


def tool_arguments(completion: Any) -> list[Any]:
    calls = completion.choices[0].message.tool_calls or []
    return [json.loads(t.function.arguments) for t in calls]


async def test_a_hold_killed_with_sigkill_is_approved_after_restart_and_passes_once(
    tmp_path: Path, llm: MockLLM, children: list[Child]
) -> None:
    overrides = {
        "approvals": {"mode": "hold", "keepalive_s": 0.2},
        "admin": {"tokens": admin_tokens()},
    }

    def start() -> Child:
        child = Child(tmp_path, llm.url, overrides)
        children.append(child)
        return child

    first = await asyncio.to_thread(start)
    llm.script(Reply(tool_calls=[BIG]))
    async with agent(first) as c:
        call = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        (held,) = await pending(first)
        assert held["mode"] == "hold"
        first.kill9()
        with pytest.raises(openai.APIConnectionError):
            await call

    second = await asyncio.to_thread(start)
    # The hold lost its request with the process: it is a deferral now.
    _, found = await admin(second, "GET", f"/v1/approvals/{held['id']}")
    assert (found["status"], found["mode"]) == ("pending", "defer")
    status, decided = await admin(second, "POST", f"/v1/approvals/{held['id']}/approve", {})
    assert status == 200
    assert decided["status"] == "approved"

    async with agent(second) as c:
        llm.script(Reply(tool_calls=[BIG]))
        retry = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert tool_names(retry) == ["issue_refund"]
        assert tool_arguments(retry) == [BIG.arguments]
        _, everything = await admin(second, "GET", "/v1/approvals")
        assert [a["id"] for a in everything["approvals"]] == [held["id"]]  # no second approval
        assert everything["approvals"][0]["status"] == "consumed"

        # Only once: the same call again is held again, as the policy says.
        llm.script(Reply(tool_calls=[BIG]))
        again = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        (fresh,) = await pending(second)
        assert fresh["id"] != held["id"]
        assert not again.done()
        await admin(second, "POST", f"/v1/approvals/{fresh['id']}/reject", {"comment": "no"})
        refused = await again
        assert tool_names(refused) == []
        assert "rejected by dana" in (refused.choices[0].message.content or "")

    await asyncio.to_thread(second.stop)
    assert second.proc.returncode == 0
    records = audit_records(tmp_path / "audit")
    kinds = [(r["kind"], (r.get("body") or {}).get("approval_id")) for r in records]
    assert ("approval_deferred", held["id"]) in kinds
    assert ("approval_executed", held["id"]) in kinds
    allowed = [
        r
        for r in records
        if r["kind"] == "decision"
        and r["decision"]["guard"] == "approval"
        and r["decision"]["effect"] == "allow"
    ]
    assert [r["approval"]["id"] for r in allowed] == [held["id"]]
