"""What a model spend cap charges is what the provider can bill, and every charge is on
record: through the real proxy, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client import REGISTRY

from tests.functional.conftest import audit_records, make_config
from warden.budgets.caps import window_key
from warden.budgets.prices import Price, PriceTable
from warden.model import Usage
from warden.server import Warden
from warden.state import Hold, StateStore
from warden.testing import Call, Fault, MockLLM, Reply
from warden.testing.raw_upstream import RawReply, RawRequest, RawUpstream, json_bytes

AGENT = "agent:support-triage"


def client(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    )


async def llm_counter(tmp_path: Path, name: str = "llm") -> tuple[float, float]:
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        (c,) = await store.counters([(name, window_key("day", datetime.now(UTC)), AGENT)])
        return c.spent, c.reserved
    finally:
        await store.close()


async def settled(tmp_path: Path, outcomes: int) -> list[dict[str, Any]]:
    """The outcome records, once ``outcomes`` of them are written (settled just after the
    answer reaches the agent, so the log is read from outside until they are there)."""
    async with asyncio.timeout(5):
        while True:
            found = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
            if len(found) >= outcomes:
                return found
            await asyncio.sleep(0.02)


async def overspend(tmp_path: Path, usd: float) -> None:
    """Charge ``usd`` more to the agent's model spend, as a settled call would."""
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        window = window_key("day", datetime.now(UTC))
        await store.reserve("act_elsewhere", [Hold("llm", window, AGENT, usd)], force=True)
        await store.settle("act_elsewhere", None)
    finally:
        await store.close()


def input_tokens() -> float:
    """The agent's input tokens counted by ``warden_tokens_total``, every model together."""
    return sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "warden_tokens"
        for s in metric.samples
        if s.name == "warden_tokens_total"
        and s.labels.get("agent") == "support-triage"
        and s.labels.get("direction") == "input"
    )


def spend_metric(model: str) -> float:
    labels = {"agent": "support-triage", "model": model}
    return REGISTRY.get_sample_value("warden_llm_spend_usd_total", labels) or 0.0


# -- a model name the price table does not know ------------------------------------------


async def test_an_unknown_model_name_is_held_at_the_dearest_price(tmp_path: Path) -> None:
    # An Azure deployment name runs o1-pro (150/600 USD per million tokens). Held at
    # `default` (75 per million output), ten concurrent calls of 4,000 output tokens
    # fit a cap of 5 USD and settle at 2.41 each: 24 USD spent. Held at the dearest
    # price (2.40 each), two fit.
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "o1-pro-2025-03-19",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "done"},
            }
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 4000, "total_tokens": 4050},
    }

    def reply(_request: RawRequest) -> RawReply:
        # Answered slowly, so the ten are in flight together.
        return RawReply(
            status=200,
            body=[json_bytes(answer)],
            content_type="application/json",
            delays=[0.5],
        )

    async with RawUpstream(on_request=reply) as upstream:
        config = make_config(
            tmp_path, upstream.url, budgets={"llm": {"limit_usd": 5.0, "window": "day"}}
        )
        async with (
            Warden(config) as warden,
            openai.AsyncAzureOpenAI(
                azure_endpoint=f"{warden.proxy_url}/openai",
                azure_deployment="reasoning-prod",
                api_key="k",
                api_version="2025-03-01-preview",
                max_retries=0,
            ) as azure,
        ):

            async def one() -> int:
                try:
                    await azure.chat.completions.create(
                        model="reasoning-prod",
                        messages=[{"role": "user", "content": "plan"}],
                        max_completion_tokens=4000,
                    )
                except openai.PermissionDeniedError:
                    return 403
                return 200

            statuses = await asyncio.gather(*(one() for _ in range(10)))
            await settled(tmp_path, 2)
    assert statuses.count(200) == 2
    spent, reserved = await llm_counter(tmp_path)
    # Settled at the model the answer names.
    assert spent == pytest.approx(2 * (50 * 150 + 4000 * 600) / 1e6)
    assert spent <= 5.0
    assert reserved == 0.0


# -- fetching what a model call made ----------------------------------------------------


async def test_fetching_a_background_answer_charges_nothing_again(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = make_config(tmp_path, llm.url, budgets={"llm": {"limit_usd": 1.0, "window": "day"}})
    async with Warden(config) as warden, client(warden) as c:
        llm.script(Reply(text="word " * 500))
        made = await c.responses.create(
            model="gpt-4.1", input="summarise", max_output_tokens=1000, background=True
        )
        await settled(tmp_path, 1)
        held = await llm_counter(tmp_path)
        assert held[0] > 0
        for _ in range(3):
            got = await c.responses.retrieve(made.id)
            assert got.usage is not None
        records = await settled(tmp_path, 4)
    # The background call stays spent at its hold; its three fetches add nothing.
    assert await llm_counter(tmp_path) == held
    assert [r["outcome"]["cost"] for r in records[1:]] == [None, None, None]


async def test_a_stored_chat_completion_fetched_or_updated_charges_nothing(
    tmp_path: Path,
) -> None:
    answer = {
        "id": "chatcmpl-stored1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4.1",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
        ],
        "usage": {"prompt_tokens": 100_000, "completion_tokens": 1000, "total_tokens": 101_000},
    }
    async with RawUpstream(on_request=lambda _r: RawReply.json(answer)) as upstream:
        config = make_config(
            tmp_path, upstream.url, budgets={"llm": {"limit_usd": 10.0, "window": "day"}}
        )
        async with Warden(config) as warden, client(warden) as c:
            await c.chat.completions.create(
                model="gpt-4.1",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=1000,
                store=True,
            )
            await settled(tmp_path, 1)
            once = await llm_counter(tmp_path)
            assert once[0] == pytest.approx((100_000 * 2 + 1000 * 8) / 1e6)
            tokens = input_tokens()
            await c.chat.completions.retrieve("chatcmpl-stored1")
            await c.chat.completions.update("chatcmpl-stored1", metadata={"k": "v"})
            records = await settled(tmp_path, 3)
            # The answer's usage, read again, counts no tokens again either.
            assert input_tokens() == tokens
    assert await llm_counter(tmp_path) == once
    assert [r["outcome"]["cost"] for r in records] == [pytest.approx(once[0]), None, None]


async def test_a_used_up_cap_refuses_no_fetch_and_still_decides_its_tool_calls(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The cap is used by the background request; fetching its answer and listing
    # models spend nothing, so they pass. A tool call in the fetched answer is still
    # decided: the refunds cap (30 a day) removes a refund of 50.
    refunds = {
        "name": "refunds",
        "tool": "issue_refund",
        "value": "amount",
        "per": ["agent"],
        "window": "day",
        "limit": 30,
        "over": "deny",
    }
    budgets = {"llm": {"limit_usd": 0.01, "window": "day"}, "caps": [refunds]}
    config = make_config(tmp_path, llm.url, budgets=budgets)
    refund = Call("issue_refund", {"order_id": "A-1", "amount": 50, "currency": "USD"})
    async with Warden(config) as warden, client(warden) as c:
        llm.script(Reply(text="Refunding.", tool_calls=[refund]))
        made = await c.responses.create(
            model="gpt-4.1", input="refund A-1", max_output_tokens=1200, background=True
        )
        await settled(tmp_path, 1)
        await overspend(tmp_path, 0.01)  # another sidecar's answer, dearer than it held
        spent, _ = await llm_counter(tmp_path)
        assert spent > 0.01
        with pytest.raises(openai.PermissionDeniedError, match="LLM spend cap"):
            await c.responses.create(model="gpt-4.1", input="more", max_output_tokens=1200)
        for _ in range(2):
            got = await c.responses.retrieve(made.id)
        assert got.status == "completed"
        assert not [item for item in got.output if item.type == "function_call"]
        assert "refunds cap for this agent" in got.model_dump_json()
        models = await c.models.list()
        assert models is not None
    assert (await llm_counter(tmp_path))[0] == spent


# -- what was charged is on record --------------------------------------------------------


async def test_a_call_charged_at_its_hold_records_and_counts_that_amount(
    tmp_path: Path, llm: MockLLM
) -> None:
    upstream = {"protocol": "openai", "base_url": llm.url, "timeout_s": 0.5}
    config = make_config(
        tmp_path,
        llm.url,
        upstreams={"openai": upstream},
        budgets={"llm": {"limit_usd": 100.0, "window": "day"}},
    )
    before = spend_metric("gpt-4.1")
    async with Warden(config) as warden, client(warden) as c:
        # A background request: answered, its usage never read.
        llm.script(Reply(text="ok"))
        await c.responses.create(
            model="gpt-4.1", input="hi", max_output_tokens=20_000, background=True
        )
        # A timeout: the provider may have answered it all.
        llm.script(Reply(fault=Fault("hang")))
        with pytest.raises(openai.APIStatusError):
            await c.chat.completions.create(
                model="gpt-4.1", messages=[{"role": "user", "content": "hi"}], max_tokens=20_000
            )
        records = await settled(tmp_path, 2)
    spent, reserved = await llm_counter(tmp_path)
    assert reserved == 0.0
    costs = [r["outcome"]["cost"] for r in records]
    # Each held at its 20,000 output tokens (8 USD per million) and its input.
    assert all(cost is not None and cost > 20_000 * 8 / 1e6 for cost in costs)
    assert all(r["outcome"]["tokens"] is None for r in records)  # no usage: the hold
    assert sum(costs) == pytest.approx(spent)
    assert spend_metric("gpt-4.1") - before == pytest.approx(spent)


def test_a_fine_tune_of_a_known_model_is_held_at_default_not_the_dearest() -> None:
    # ft:<base>:... is priced by nobody's table, but runs at up to twice its base's
    # price: held at the dearest model's, an ordinary call was refused by a small cap.
    table = PriceTable.shipped()
    usage = Usage(input_tokens=1000, output_tokens=8192)
    fine_tune = table.cost("openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123", usage, held=True)
    alias = table.cost("openai", "reasoning-prod", usage, held=True)
    at_default = usage_cost(table.default, usage)
    assert fine_tune.usd == pytest.approx(at_default)
    assert alias.usd == pytest.approx(usage_cost(table.dearest, usage))
    assert alias.usd > fine_tune.usd
    # A fine-tune of a base nobody knows is an unknown name like any other.
    unknown = table.cost("openai", "ft:house-model:acme::abc123", usage, held=True)
    assert unknown.usd == pytest.approx(alias.usd)


def usage_cost(price: Price, usage: Usage) -> float:
    return (usage.input_tokens * price.input + usage.output_tokens * price.output) / 1e6
