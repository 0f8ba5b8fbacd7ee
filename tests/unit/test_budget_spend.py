"""Spend against caps, as the console's Operations view reads it: on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.pg import PgServer
from warden.budgets.caps import LLM_COUNTER, window_key, windows_closed_before
from warden.budgets.guard import BudgetGuard, CapSpend
from warden.budgets.prices import PriceTable
from warden.config import BudgetsConfig, StateConfig
from warden.console.charts import spend_chart
from warden.state import Hold
from warden.state.backend import StateBackend, open_state

NOW = datetime(2026, 11, 30, 15, 0, tzinfo=ZoneInfo("UTC")).timestamp()
TODAY = "day:2026-11-30"


@pytest.fixture(params=["sqlite", "postgresql"])
async def state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateBackend]:
    if request.param == "sqlite":
        config = StateConfig(url=f"sqlite:///{tmp_path}/state.db")
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        config = StateConfig(
            url=request.getfixturevalue("pg_url"), password_file=str(server.password_file)
        )
    backend = await open_state(config)
    yield backend
    await backend.close()


def guard(state: StateBackend) -> BudgetGuard:
    config = BudgetsConfig.model_validate(
        {
            "caps": [
                {
                    "name": "refunds",
                    "tool": "issue_refund",
                    "value": "amount",
                    "limit": 500,
                    "per": ["agent", "customer"],
                    "customer": {"argument": "/customer_id"},
                },
                {"name": "credits", "tool": "grant_credit", "value": "amount", "limit": 50},
            ],
            "llm": {"limit_usd": None, "window": "month"},
        }
    )
    return BudgetGuard(state.budgets, config, PriceTable.shipped(), {}, clock=lambda: NOW)


async def test_spend_reads_each_caps_current_window_most_used_first(state: StateBackend) -> None:
    budgets = state.budgets
    assert window_key("day", datetime.fromtimestamp(NOW, ZoneInfo("UTC"))) == TODAY
    await budgets.reserve("r1", [Hold("refunds", TODAY, "agent:bot", 40.0, 500.0)])
    await budgets.settle("r1", None)
    await budgets.reserve("r2", [Hold("refunds", TODAY, "customer:C-1", 120.0, 500.0)])
    await budgets.reserve("r3", [Hold("refunds", "day:2026-11-29", "agent:bot", 999.0, 500.0)])
    await budgets.reserve("r4", [Hold(LLM_COUNTER, "month:2026-11", "agent:bot", 0.25)])
    rows = await guard(state).spend()
    assert rows == (
        CapSpend(LLM_COUNTER, "month:2026-11", "agent:bot", 0.0, 0.25, None, "USD"),
        CapSpend("refunds", TODAY, "customer:C-1", 0.0, 120.0, 500.0, "USD"),
        CapSpend("refunds", TODAY, "agent:bot", 40.0, 0.0, 500.0, "USD"),
        # Nobody used this cap today (yesterday's counters are another window).
        CapSpend("credits", TODAY, None, 0.0, 0.0, 50.0, "USD"),
    )
    assert rows[1].used == 120.0
    # Bounded: at most `limit` subjects a cap.
    for i in range(5):
        await budgets.reserve(f"m{i}", [Hold("credits", TODAY, f"agent:a{i}", float(i + 1))])
    top = await budgets.window_counters("credits", TODAY, limit=2)
    assert [(c.subject, c.reserved) for c in top] == [("agent:a4", 5.0), ("agent:a3", 4.0)]
    assert len(await guard(state).spend(per_cap=3)) == 1 + 2 + 3


def test_the_spend_chart_says_in_words_what_it_draws_and_escapes_names() -> None:
    rows = [
        CapSpend("refunds", TODAY, "customer:<script>x</script>", 450.0, 100.0, 500.0, "USD"),
        CapSpend(LLM_COUNTER, "month:2026-11", "agent:bot", 1.5, 0.0, None, "USD"),
        CapSpend("credits", TODAY, None, 0.0, 0.0, 50.0, "EUR"),
    ]
    svg = spend_chart(rows)
    assert "<script>" not in svg
    assert "customer:&lt;script&gt;" in svg
    assert 'class="spend over"' in svg  # 550 used of 500 (observe mode let it pass)
    assert "spent 450.00 USD, reserved 100.00 USD of 500.00 USD (110%)" in svg
    assert "LLM spend, agent:bot: spent 1.50 USD, reserved 0.00 USD (no limit)" in svg
    assert "credits, no use yet: spent 0.00 EUR, reserved 0.00 EUR of 50.00 EUR (0%)" in svg
    assert 'aria-label="Spend against caps: no caps are configured"' in spend_chart([])


async def test_counters_of_windows_closed_long_ago_are_deleted(state: StateBackend) -> None:
    # They count nothing any more, yet name customers: they must not stay forever.
    budgets = state.budgets
    now = datetime.fromtimestamp(NOW, ZoneInfo("UTC"))
    cutoffs = windows_closed_before(now)
    assert cutoffs == {"hour": "hour:2026-11-28", "day": "day:2026-11-28", "month": "month:2026-10"}
    # In a zone far from UTC, what counts now is still kept.
    assert window_key("day", now.astimezone(ZoneInfo("Pacific/Kiritimati"))) >= cutoffs["day"]
    assert window_key("day", now.astimezone(ZoneInfo("Etc/GMT+12"))) >= cutoffs["day"]
    kept = [
        ("hour", "hour:2026-11-28T23-1200"),
        ("day", "day:2026-11-28"),
        ("day", TODAY),
        ("month", "month:2026-10"),
        ("month", "month:2026-11"),
    ]
    gone = [
        ("hour", "hour:2026-11-27T23+0000"),
        ("day", "day:2026-11-27"),
        ("day", "day:2025-12-31"),
        ("month", "month:2026-09"),
    ]
    for i, (_, window) in enumerate(kept + gone):
        await budgets.reserve(f"r{i}", [Hold("refunds", window, "customer:c-ann-7731", 10.0)])
        await budgets.settle(f"r{i}", None)
    assert await budgets.prune_windows(cutoffs) == len(gone)
    for _, window in kept:
        assert (await budgets.window_counters("refunds", window))[0].spent == 10.0, window
    for _, window in gone:
        assert await budgets.window_counters("refunds", window) == (), window
    assert await budgets.prune_windows(cutoffs) == 0
