"""What a stopping stdio door answers for calls it never sent to the server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from warden.ingress.mcp_stdio import SERVER_GONE, StdioDoor
from warden.model import Action, Agent, Decision, Effect, Mode, Outcome, new_id

CHILD = "import sys\nlog = open(sys.argv[1], 'a')\nfor line in sys.stdin:\n    log.write(line)\n"


class Core:
    """Allows every call at once, denies ``export``, and decides ``slow`` never (a person
    would)."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str | None, str | None, bool]] = []

    async def decide(self, action: Action, **_: Any) -> Decision:
        if action.tool == "slow":
            await asyncio.sleep(3600)
        effect = Effect.DENY if action.tool == "export" else Effect.ALLOW
        return Decision(new_id("dec"), effect, ("ok",), Mode.ENFORCE, "policy")

    def outcome(
        self, action: Action, decision: Decision, outcome: Outcome, *, trusted: bool = False
    ) -> None:
        self.outcomes.append((action.tool, outcome.error, trusted))

    async def hidden_tools(self, *_: Any) -> set[str]:
        return set()


def call(id_: int, tool: str) -> dict[str, Any]:
    params = {"name": tool, "arguments": {"amount": 20}}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


async def test_a_call_held_back_with_its_batch_is_answered_as_not_sent(tmp_path: Path) -> None:
    # The refund was allowed, but waited for its batch's other call when the wrap
    # stopped: Warden knows it never ran, so its outcome is trusted (a cap's hold goes
    # back), and the call still being decided gets an answer too.
    child, seen = tmp_path / "child.py", tmp_path / "seen.log"
    child.write_text(CHILD)
    client_in = asyncio.StreamReader()
    read_end, write_end = os.pipe()
    loop = asyncio.get_running_loop()
    client_out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(write_end, "wb", 0))
    door = StdioDoor(
        [sys.executable, str(child), str(seen)],
        agent=Agent("bot"),
        upstream="crm",
        client_in=client_in,
        client_out=client_out,
        grace_s=0.5,
    )
    core = Core()
    await door.start(core)  # type: ignore[arg-type]  # the door's view of the core
    batch = [call(1, "issue_refund"), call(2, "slow"), call(3, "export")]
    client_in.feed_data(orjson.dumps(batch) + b"\n")
    await asyncio.sleep(0.5)
    await door.stop()
    client_out.close()
    os.set_blocking(read_end, False)
    lines = map(orjson.loads, os.read(read_end, 65536).splitlines())
    answers = {a["id"]: a for a in lines}
    os.close(read_end)
    assert answers[1]["error"]["code"] == SERVER_GONE
    assert "not sent" in answers[1]["error"]["message"]
    assert "did not run" in answers[2]["error"]["message"]
    assert answers[3]["result"]["isError"] is True  # the denial decided before the stop
    assert core.outcomes == [("issue_refund", "not_sent", True)]
    assert not seen.exists() or seen.read_text() == ""
