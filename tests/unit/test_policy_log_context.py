"""Log lines of a policy worker started to replace one that timed out name no decision: the
replacement outlives the request whose deadline started it (a real engine and guard, each
"request" its own task, as aiohttp runs them)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from warden.config import PolicyConfig
from warden.model import Action, ActionKind, Agent, Mode, RequestMeta, Stage, new_id
from warden.ops import tracing
from warden.pipeline import GuardContext
from warden.policy.engine import PolicyEngine
from warden.policy.guard import PolicyGuard

POLICY = """package warden
import rego.v1
default decision := {"effect": "allow", "reason": "fine"}
decision := {"effect": "deny", "reason": "never"} if {
\tinput.action.tool == "spin"
\tsome a in numbers.range(1, input.action.arguments.n)
\tsome b in numbers.range(1, input.action.arguments.n)
\ta * b == -1
}
"""


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage()[:90], tracing.log_fields().get("decision_id")))


def action(tool: str, **arguments: object) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent(id="tester"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool=tool,
        arguments=arguments,
    )


async def test_a_replacement_workers_log_lines_name_no_decision_of_the_request_before(
    tmp_path: Path,
) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "policy.rego").write_text(POLICY)
    engine = await PolicyEngine.start(
        PolicyConfig(bundles=(str(root),), workers=1, deadline_ms=300, watch=False),
        queue_timeout_s=30,
    )
    guard = PolicyGuard(engine, engine.config)
    ctx = GuardContext(mode=Mode.ENFORCE, risk="write")
    lines = Lines()
    logging.getLogger("warden").addHandler(lines)
    try:
        # Request A: its call times out; the worker is killed and replaced.
        a = await asyncio.create_task(guard.check(action("spin", n=10**9), ctx))
        assert a.error is not None  # timed out
        for _ in range(200):
            if engine.status()["workers_alive"] >= 1 and engine.status()["worker_pids"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        # Request B, later and unrelated: decided fine.
        b = await asyncio.create_task(guard.check(action("other"), ctx))
        assert b.error is None
        # The replacement worker dies (OOM-killed, a crash) while nobody's request concerns A.
        (pid,) = engine.status()["worker_pids"]
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(1.5)
    finally:
        logging.getLogger("warden").removeHandler(lines)
        await engine.close()
    died = [d for m, d in lines.lines if "died" in m]
    # Before: the timed-out request's decision, whose timer started the replacement.
    assert died
    assert died[-1] is None
