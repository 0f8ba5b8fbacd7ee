"""The SQLite state store locked by another process: bounded waits, and readiness says so."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.functional.conftest import make_config
from tests.sdk_calls import function_calls
from warden.server import Warden
from warden.state import base
from warden.testing import Call, MockLLM, Reply

CAP: dict[str, Any] = {"name": "refunds", "tool": "issue_refund", "value": "amount"}
CAP |= {"per": ["agent"], "window": "day", "limit": 300}
REFUND = Call("issue_refund", {"order_id": "A-1", "amount": 20})


async def _state(admin_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/readyz") as r:
        detail: dict[str, Any] = (await r.json())["state"]
        return detail


async def test_calls_behind_a_lock_fail_in_bounded_time_and_readiness_says_so(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each call queued behind a lock held elsewhere waited out the busy timeout of every
    # call before it: the tenth capped refund was answered after ten busy timeouts.
    monkeypatch.setattr(base, "BUSY_TIMEOUT_MS", 500)
    monkeypatch.setattr(base, "QUEUE_DEADLINE_S", 1.0)
    monkeypatch.setattr(base, "DOWN_FOR_S", 0.5)
    llm.on_request(lambda protocol, body: Reply(tool_calls=[REFUND]))
    config = make_config(tmp_path, llm.url, budgets={"caps": [CAP]})
    async with (
        Warden(config) as w,
        openai.AsyncOpenAI(
            base_url=f"{w.proxy_url}/openai/v1", api_key="k", max_retries=0
        ) as client,
    ):

        async def refund() -> tuple[list[str], float]:
            started = time.monotonic()
            done = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "refund"}]
            )
            names = [f.function.name for f in function_calls(done.choices[0].message)]
            return names, time.monotonic() - started

        assert (await refund())[0] == ["issue_refund"]
        assert (await _state(w.admin_url))["up"] is True
        locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            answers = await asyncio.gather(*(refund() for _ in range(10)))
            locked = await _state(w.admin_url)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await asyncio.sleep(0.6)  # past DOWN_FOR_S
        after = await refund()
        recovered = await _state(w.admin_url)
    assert [names for names, _ in answers] == [[]] * 10  # denied: the cap cannot be read
    # Ten busy timeouts would be 5 s; each waits at most the queue bound and one timeout.
    assert max(took for _, took in answers) < 3.5
    assert locked["up"] is False
    assert after[0] == ["issue_refund"]
    assert recovered["up"] is True
