"""A sidecar whose wall clock runs ahead leaves a sibling's live hold alone; a sidecar
that stalled tells the truth about the approval its sibling's request used.

Sidecar A (in this process, true clock) holds an agent's refund for a person.
Sidecar B is a Warden process of its own on the same state (one SQLite file,
or one PostgreSQL database) whose wall clock runs a minute ahead: by more than
``approvals.orphan_after_s`` (30 s) ahead of A's heartbeat, and past the
hold's expiry (40 s). B's sweeps must neither defer A's hold as orphaned nor
expire it, and a person's approval through B lets the agent's call through A.
The agent is the openai SDK; the upstream is the mock LLM in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import openai
import pytest

from tests.functional.conftest import ROOT, audit_records, make_config
from tests.functional.test_approvals_proxy_functional import BIG, MESSAGES, TOKENS, admin_tokens
from tests.functional.test_hold_recovery_functional import Child, tool_names
from tests.pg import PgServer, state_config
from warden.server import Warden
from warden.testing import MockLLM, Reply

AHEAD_S = 60.0
HOLD_S = 40
POLICY = """package warden

import rego.v1

default decision := {"effect": "allow"}

decision := {"effect": "require_approval", "reasons": ["refunds need a person"]} if {
    input.action.tool == "issue_refund"
}
"""

# Sidecar B: the same Warden, on a host whose wall clock runs ahead of A's.
CHILD = r"""
import sys, time
_true = time.time
time.time = lambda: _true() + float(sys.argv[4])

import asyncio, json
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

Beats = Callable[[], dict[str, float]]


class Ahead:
    """Sidecar B, a process of its own."""

    def __init__(self, home: Path, upstream: str, overrides: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(home), upstream, json.dumps(overrides), str(AHEAD_S)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.stdout.close()
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(f"sidecar B did not start (exit {self.proc.returncode})")
        urls = json.loads(line)
        self.proxy_url: str = urls["proxy"]
        self.admin_url: str = urls["admin"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, str], Beats]:
    """The shared state section, and a reader of every owner's heartbeat in it."""
    config = state_config(request, tmp_path)
    section = {"url": config.url}
    if request.param == "sqlite":
        path = config.url.removeprefix("sqlite:///")

        def sqlite_beats() -> dict[str, float]:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                rows = conn.execute("SELECT instance, heartbeat_at FROM approval_owners")
                return {str(i): float(b) for i, b in rows}

        return section, sqlite_beats
    assert config.password_file is not None
    section["password_file"] = config.password_file
    server: PgServer = request.getfixturevalue("pg_server")
    dbname = config.url.rsplit("/", 1)[1]

    def pg_beats() -> dict[str, float]:
        with server.admin(dbname) as conn:
            rows = conn.execute("SELECT instance, heartbeat_at FROM approval_owners")
            return {str(i): cast(float, b) for i, b in rows.fetchall()}

    return section, pg_beats


@pytest.fixture
def sidecars() -> Iterator[list[Ahead]]:
    started: list[Ahead] = []
    yield started
    for sidecar in started:
        if sidecar.proc.poll() is None:
            os.killpg(sidecar.proc.pid, signal.SIGKILL)
            sidecar.proc.wait()


async def admin(admin_url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS['dana']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, admin_url + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def until(check: Callable[[], Any], what: str) -> Any:
    for _ in range(600):
        found = await asyncio.to_thread(check)
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"waited 60 s for {what}")


async def test_a_sidecar_whose_clock_runs_ahead_leaves_a_live_hold_alone(
    tmp_path: Path,
    llm: MockLLM,
    state: tuple[dict[str, str], Beats],
    sidecars: list[Ahead],
) -> None:
    section, beats = state
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(POLICY)
    overrides: dict[str, Any] = {
        "approvals": {"mode": "hold", "hold_timeout_s": HOLD_S, "keepalive_s": 0.2},
        "admin": {"tokens": admin_tokens()},
        "policy": {"bundles": [str(policy)]},
        "state": section,
    }
    llm.script(Reply(tool_calls=[BIG]))
    async with (
        Warden(make_config(tmp_path / "a", llm.url, **overrides)) as a,
        openai.AsyncOpenAI(
            base_url=f"{a.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=90
        ) as agent,
    ):
        call = asyncio.create_task(
            agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        held: dict[str, Any] = {}
        for _ in range(200):
            _, body = await admin(a.admin_url, "GET", "/v1/approvals?status=pending")
            if body["approvals"]:
                held = body["approvals"][0]
                break
            await asyncio.sleep(0.05)
        assert held["mode"] == "hold"
        (mine,) = await asyncio.to_thread(beats)

        b = await asyncio.to_thread(Ahead, tmp_path / "b", llm.url, overrides)
        sidecars.append(b)
        first = await until(lambda: {i: v for i, v in beats().items() if i != mine}, "B's row")
        ((theirs, beat),) = first.items()
        # B beats and sweeps on the same tick (each on a timer of its own, started
        # together): once it has beaten twice more, a whole sweep (recover, then
        # expire) has run on B's clock.
        seen = [beat]

        def swept() -> bool:
            now = beats().get(theirs)
            if now is not None and now != seen[-1]:
                seen.append(now)
            return len(seen) >= 3

        await until(swept, "two sweeps of B")

        _, found = await admin(a.admin_url, "GET", f"/v1/approvals/{held['id']}")
        assert (found["mode"], found["status"]) == ("hold", "pending")
        assert not call.done()
        # A person decides through B: B's clock is not the hold's either.
        status, decided = await admin(
            b.admin_url, "POST", f"/v1/approvals/{held['id']}/approve", {}
        )
        assert status == 200
        assert decided["status"] == "approved"
        completion = await asyncio.wait_for(call, 30)
        assert tool_names(completion) == ["issue_refund"]

    await asyncio.to_thread(b.stop)
    assert b.proc.returncode == 0
    b_kinds = [r["kind"] for r in audit_records(tmp_path / "b" / "audit")]
    assert "approval_deferred" not in b_kinds
    assert "approval_expired" not in b_kinds
    assert "approval_decided" in b_kinds
    executed = [
        r["body"]["approval_id"]
        for r in audit_records(tmp_path / "a" / "audit")
        if r["kind"] == "approval_executed"
    ]
    assert executed == [held["id"]]


async def test_a_stalled_sidecar_says_the_approval_was_used_by_the_retry(
    tmp_path: Path, llm: MockLLM, state: tuple[dict[str, str], Beats]
) -> None:
    # Sidecar A (a process of its own) holds the agent's refund and is stopped (SIGSTOP:
    # a frozen container, a long pause) past orphan_after_s. B defers the hold, the
    # agent's retry at B waits on it, dana approves, the retry goes through. When A
    # resumes, its first request must be refused as what happened, not "rejected".
    section, _ = state
    overrides: dict[str, Any] = {
        "approvals": {"mode": "hold", "keepalive_s": 0.2, "orphan_after_s": 3},
        "admin": {"tokens": admin_tokens()},
        "state": section,
    }
    a = await asyncio.to_thread(Child, tmp_path / "a", llm.url, overrides)
    try:
        async with (
            Warden(make_config(tmp_path / "b", llm.url, **overrides)) as b,
            openai.AsyncOpenAI(
                base_url=f"{a.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=90
            ) as at_a,
            openai.AsyncOpenAI(
                base_url=f"{b.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=90
            ) as at_b,
        ):
            llm.script(Reply(tool_calls=[BIG]))
            first = asyncio.create_task(
                at_a.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            )

            async def approval() -> dict[str, Any]:
                _, body = await admin(b.admin_url, "GET", "/v1/approvals?status=pending")
                return dict(body["approvals"][0]) if body["approvals"] else {}

            async def settled(check: Callable[[dict[str, Any]], bool], what: str) -> Any:
                for _ in range(600):
                    found = await approval()
                    if found and check(found):
                        return found
                    await asyncio.sleep(0.1)
                raise AssertionError(f"waited 60 s for {what}")

            held = await settled(lambda f: f["mode"] == "hold", "A's hold")
            os.killpg(a.proc.pid, signal.SIGSTOP)
            try:
                await settled(lambda f: f["mode"] == "defer", "B to defer A's hold")
                llm.script(Reply(tool_calls=[BIG]))
                retry = asyncio.create_task(
                    at_b.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                )
                adopted = await settled(lambda f: f["mode"] == "hold", "B to hold it again")
                assert adopted["id"] == held["id"]
                status, _ = await admin(
                    b.admin_url, "POST", f"/v1/approvals/{held['id']}/approve", {}
                )
                assert status == 200
                assert tool_names(await asyncio.wait_for(retry, 30)) == ["issue_refund"]
            finally:
                os.killpg(a.proc.pid, signal.SIGCONT)
            answer = await asyncio.wait_for(first, 30)
            assert tool_names(answer) == []
            said = answer.choices[0].message.content or ""
            assert "already used by another request for the same call" in said
            assert "rejected" not in said
    finally:
        await asyncio.to_thread(a.stop)
    a_decisions = [
        r["decision"]
        for r in audit_records(tmp_path / "a" / "audit")
        if r["kind"] == "decision" and r["decision"]["guard"] == "approval"
    ]
    assert [d["effect"] for d in a_decisions] == ["deny"]
    assert "already used by another request" in a_decisions[0]["reasons"][-1]
    assert "rejected" not in a_decisions[0]["reasons"][-1]
    b_executed = [
        r["body"]["approval_id"]
        for r in audit_records(tmp_path / "b" / "audit")
        if r["kind"] == "approval_executed"
    ]
    assert b_executed == [held["id"]]
