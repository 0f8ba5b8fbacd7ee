"""A sidecar whose clock runs days ahead does not reset the fleet's caps when it cleans up.

Sidecar A is a real Warden (proxy, policy engine, SQLite state file) enforcing a
500/day refund cap for an agent driven by the official openai SDK. Sidecar B
shares the state file; its clock is three days ahead (a bad time source, or one
forward step), and its budget guard's clean-up job, which every sidecar runs at
start and every minute, prunes budget windows by that clock. It used to delete
today's counters, so A's cap started again from zero; now it keeps them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import openai

from tests.functional.conftest import make_config
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import BudgetsConfig
from warden.server import Warden
from warden.state import StateStore
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "please refund my order"}]
CAP: dict[str, Any] = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}
AHEAD_S = 3 * 86400.0


class _WatchedStore(StateStore):
    """B's state store, saying when its budget guard's prune has run."""

    pruned: asyncio.Event

    async def prune_windows(self, before: Mapping[str, str]) -> int:
        try:
            return await super().prune_windows(before)
        finally:
            self.pruned.set()


async def refunds_delivered(warden: Warden, count: int) -> int:
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        answers = [
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            for _ in range(count)
        ]
    return sum(bool(a.choices[0].message.tool_calls) for a in answers)


async def test_a_sidecar_days_ahead_leaves_the_fleets_cap_in_force(
    tmp_path: Path, llm: MockLLM
) -> None:
    refund = {"order_id": "A-1", "amount": 100, "currency": "USD"}
    llm.on_request(lambda _proto, _body: Reply(tool_calls=[Call("issue_refund", refund)]))
    allow_all = tmp_path / "allow-all"  # the cap alone decides
    allow_all.mkdir()
    (allow_all / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
    )
    config = make_config(
        tmp_path,
        llm.url,
        budgets={"caps": [CAP]},
        policy={"bundles": [str(allow_all)], "queue_timeout_s": 30},
    )
    async with Warden(config) as warden:
        assert await refunds_delivered(warden, 6) == 5  # 500 of 500 used today
        store = await _WatchedStore.open(f"sqlite:///{tmp_path}/state.db")
        store.pruned = asyncio.Event()
        fast = BudgetGuard(
            store,
            BudgetsConfig.model_validate({"caps": [CAP]}),
            PriceTable.shipped(),
            {},
            clock=lambda: time.time() + AHEAD_S,
        )
        fast.start()  # its first round of clean-up runs at once
        try:
            async with asyncio.timeout(10):
                await store.pruned.wait()
        finally:
            await fast.close()
            await store.close()
        # Later the same real day, A's agent asks again: the cap still holds.
        assert await refunds_delivered(warden, 3) == 0
