"""Spend caps through the real proxy, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.adversarial import wire
from tests.functional.conftest import audit_records, make_config
from warden.budgets.caps import window_key
from warden.cli import main as warden_cli
from warden.server import Warden
from warden.state import StateStore
from warden.testing import Call, Fault, MockLLM, Reply
from warden.testing.raw_upstream import RawReply, RawUpstream

MESSAGES: Any = [{"role": "user", "content": "please refund my order"}]
REFUND_CAP: dict[str, Any] = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent", "customer"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}


def client(warden: Warden, *, max_retries: int = 0, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=max_retries, **kw
    )


def chat_answer(usage: Any, model: str = wire.MODEL) -> dict[str, Any]:
    """A text chat completion with ``usage`` as given, answered by ``model``."""
    return {**wire.chat_body([], text="hi", finish="stop"), "model": model, "usage": usage}


def responses_answer(usage: Any, model: str = wire.MODEL) -> dict[str, Any]:
    """A text Responses answer with ``usage`` as given, answered by ``model``."""
    text = {"type": "output_text", "text": "hi", "annotations": []}
    message = {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [text],
    }
    return {**wire.response_body([message]), "model": model, "usage": usage}


def today(window: str = "day") -> str:
    return window_key(window, datetime.now(UTC))


async def counter(tmp_path: Path, name: str, subject: str) -> tuple[float, float]:
    store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    try:
        (c,) = await store.counters([(name, today(), subject)])
        return c.spent, c.reserved
    finally:
        await store.close()


async def wait_for(tmp_path: Path, name: str, subject: str, pred: Any) -> tuple[float, float]:
    # Outcomes are settled just after the response reaches the agent; the
    # state store is read from outside, so polling it is the honest check.
    async with asyncio.timeout(5):
        while not pred(value := await counter(tmp_path, name, subject)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return value


async def test_fifty_concurrent_refunds_against_room_for_ten(tmp_path: Path, llm: MockLLM) -> None:
    llm.on_request(
        lambda _proto, _body: Reply(
            text="Refunding.",
            tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 50, "currency": "USD"})],
        )
    )
    # A policy that allows every refund, so that the cap alone decides; the
    # shipped policy would hold some first (it counts reservations too).
    allow_all = tmp_path / "allow-all"
    allow_all.mkdir()
    (allow_all / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
    )
    # Per agent only: these calls name no customer, which a per-customer cap
    # would hold for approval (test_caps_airtight_functional.py).
    agent_cap = {**REFUND_CAP, "per": ["agent"]}
    # The cap is the subject, not overload: on a machine busy with other tests the
    # policy worker may be slow, and a wait for it must not become a 503 here.
    policy = {"bundles": [str(allow_all)], "queue_timeout_s": 30}
    config = make_config(tmp_path, llm.url, budgets={"caps": [agent_cap]}, policy=policy)
    async with Warden(config) as warden, client(warden) as c:
        completions = await asyncio.gather(
            *(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES) for _ in range(50))
        )
    delivered = [
        x
        for x in completions
        if any(
            t.type == "function" and t.function.name == "issue_refund"
            for t in x.choices[0].message.tool_calls or []
        )
    ]
    blocked = [x for x in completions if not x.choices[0].message.tool_calls]
    assert len(delivered) == 10
    assert len(blocked) == 40
    text = blocked[0].choices[0].message.content or ""
    assert "refunds cap for this agent: 500.00 of 500.00 USD used today" in text
    assert "this issue_refund of 50.00 would pass it" in text
    # Ten reservations wait for their results; they survive a restart.
    assert await counter(tmp_path, "refunds", "agent:support-triage") == (0.0, 500.0)
    async with Warden(config) as warden, client(warden) as c:
        again = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not again.choices[0].message.tool_calls


async def test_the_shipped_policy_daily_limit_holds_under_concurrency(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The shipped policy lets an agent refund 300 a day without approval. It
    # counts refunds still in flight, so 50 at once pass it no more than 6 times.
    llm.on_request(
        lambda _proto, _body: Reply(
            tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 50, "currency": "USD"})]
        )
    )
    config = make_config(tmp_path, llm.url, budgets={"caps": [{**REFUND_CAP, "per": ["agent"]}]})
    # On a busy machine the burst may be pushed back (503 with Retry-After, never a
    # decision), which the SDK retries as agents' SDKs do.
    async with Warden(config) as warden, client(warden, max_retries=3) as c:
        completions = await asyncio.gather(
            *(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES) for _ in range(50))
        )
    delivered = [x for x in completions if x.choices[0].message.tool_calls]
    assert len(delivered) == 6
    held = [x.choices[0].message.content or "" for x in completions if x not in delivered]
    # Held by the policy, or, while held ones still had their reservations,
    # stopped by the cap itself: either way, none went through.
    assert all("for human approval" in t or "refunds cap" in t for t in held), set(held)


@pytest.mark.parametrize("customer", [{"customer_id": "C-1"}, {}])  # over the cap; names none
async def test_the_shipped_policys_ceiling_wins_over_a_caps_hold(
    tmp_path: Path, llm: MockLLM, customer: dict[str, str]
) -> None:
    # The cap holds both for approval; the shipped policy denies a refund past its
    # ceiling "even with approval", and that denial must stand.
    refund = {"order_id": "A-1", "amount": 50_000, "currency": "USD", **customer}
    llm.on_request(lambda _proto, _body: Reply(tool_calls=[Call("issue_refund", refund)]))
    cap = {**REFUND_CAP, "over": "require_approval"}
    config = make_config(tmp_path, llm.url, budgets={"caps": [cap]})
    async with Warden(config) as warden, client(warden) as c:
        answer = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert not answer.choices[0].message.tool_calls
    assert "an agent cannot issue it, even with approval" in (
        answer.choices[0].message.content or ""
    )
    (decision,) = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"].get("tool") == "issue_refund"
    ]
    assert (decision["decision"]["effect"], decision["decision"]["guard"]) == ("deny", "policy")


async def test_settled_refunds_reach_the_shipped_policy_as_input_budget(
    tmp_path: Path, llm: MockLLM
) -> None:
    # A generous cap: here the shipped policy's own per-customer limit (150 a
    # day without approval) decides, from input.budget.refunds.day.customer.spent.
    cap = {**REFUND_CAP, "limit": 10_000}
    config = make_config(tmp_path, llm.url, budgets={"caps": [cap]})
    refund = Call("issue_refund", {"order_id": "A-7", "amount": 90, "currency": "USD"})
    llm.script(Reply(tool_calls=[refund]), Reply(text="Done."), Reply(tool_calls=[refund]))
    headers = {"X-Warden-Context-Customer-Id": "C-42"}
    async with Warden(config) as warden, client(warden, default_headers=headers) as c:
        first = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        call = (first.choices[0].message.tool_calls or [])[0]
        history: Any = [
            *MESSAGES,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "refunded 90.00 USD"},
        ]
        await c.chat.completions.create(model="gpt-4o-mini", messages=history)
        spent = await wait_for(tmp_path, "refunds", "customer:c-42", lambda v: v[0] > 0)
        assert spent == (90.0, 0.0)
        second = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert not second.choices[0].message.tool_calls
    text = second.choices[0].message.content or ""
    assert "this customer has received 90.00 USD in refunds today" in text
    assert "for human approval" in text


async def test_llm_spend_is_settled_from_usage_and_then_capped(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The operator prices its house model at 15 USD per million input tokens and
    # 75 per million output: a call bounded to 4 output tokens can cost about
    # 0.0007 USD (its input estimated from the body's size), and fits a cap of 0.002.
    # (A model the table does not know would be held at its dearest price.)
    prices = tmp_path / "prices.yaml"
    prices.write_text("providers: {openai: {models: {house-model: {input: 15, output: 75}}}}\n")
    config = make_config(
        tmp_path,
        llm.url,
        budgets={"llm": {"limit_usd": 0.002, "window": "day"}},
        prices={"file": str(prices)},
    )
    agent = "agent:support-triage"
    async with Warden(config) as warden, client(warden) as c:
        llm.script(Reply(text="one two three"))
        await c.chat.completions.create(model="house-model", messages=MESSAGES, max_tokens=4)
        first = await wait_for(tmp_path, "llm", agent, lambda v: v[0] > 0)
        # Settled from usage: 4 prompt words and 3 output words at its price.
        assert first == pytest.approx(((4 * 15 + 3 * 75) / 1e6, 0.0))
        llm.script(Reply(text="four five six seven"))
        stream = await c.chat.completions.create(
            model="house-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=4,
        )
        async for _ in stream:
            pass
        second = await wait_for(tmp_path, "llm", agent, lambda v: v[0] > first[0])
        assert second[0] == pytest.approx(first[0] + (4 * 15 + 4 * 75) / 1e6)
        # A request that bounds no output is held at 8,192 output tokens: 0.61 USD.
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await c.chat.completions.create(model="house-model", messages=MESSAGES)
        llm.script(Reply(text="eight"))
        await c.chat.completions.create(model="house-model", messages=MESSAGES, max_tokens=4)
    assert "LLM spend cap for this agent" in str(denied.value)
    assert "today; this model call of 0.61 would pass it" in str(denied.value)
    # The spend is evidence too: each outcome record carries its cost.
    costs = [
        r["outcome"]["cost"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"
    ]
    assert costs[:2] == [pytest.approx(first[0]), pytest.approx(second[0] - first[0])]


async def test_embeddings_are_charged_to_the_llm_cap(tmp_path: Path, llm: MockLLM) -> None:
    # Embeddings carry no tool calls, but they are billed: by the request's model and
    # the answer's usage.prompt_tokens (0.13 USD per million on text-embedding-3-large).
    config = make_config(tmp_path, llm.url, budgets={"llm": {"limit_usd": 1.0, "window": "day"}})
    agent = "agent:support-triage"
    texts = ["refund policy for damaged goods", "how long do refunds take"]
    async with Warden(config) as warden, client(warden) as c:
        answer = await c.embeddings.create(model="text-embedding-3-large", input=texts)
        assert len(answer.data) == 2
        words = sum(len(t.split()) for t in texts)
        assert answer.usage.prompt_tokens == words
        spent = await wait_for(tmp_path, "llm", agent, lambda v: v[0] > 0)
        assert spent == pytest.approx((words * 0.13 / 1e6, 0.0))
    costs = [
        r["outcome"]["cost"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"
    ]
    assert costs == [pytest.approx(words * 0.13 / 1e6)]


async def test_a_model_call_that_timed_out_stays_spent_and_an_error_answer_does_not(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The provider may well have generated (and billed) an answer Warden gave up
    # waiting for; an error status says it did not. 1,000 output tokens of gpt-4o-mini
    # (0.60 USD a million) and the body's input: about 0.0006 USD held per call.
    upstream = {"protocol": "openai", "base_url": llm.url, "timeout_s": 0.5}
    config = make_config(
        tmp_path,
        llm.url,
        upstreams={"openai": upstream},
        budgets={"llm": {"limit_usd": 1.0, "window": "day"}},
    )
    agent = "agent:support-triage"
    async with Warden(config) as warden, client(warden) as c:
        llm.script(Reply(fault=Fault("hang")))
        with pytest.raises(openai.APIStatusError) as timed_out:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1000)
        held = await wait_for(tmp_path, "llm", agent, lambda v: v[0] > 0)
        llm.script(Reply(fault=Fault("status", status=500)))
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1000)
        after = await wait_for(tmp_path, "llm", agent, lambda v: v[1] == 0.0)
    assert timed_out.value.status_code == 504
    assert held[0] == pytest.approx(1000 * 0.6 / 1e6, rel=0.2)
    assert after == held  # the error answer's hold went back


async def test_a_stream_the_agent_cuts_short_is_spent_at_what_it_held(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The agent reads the start of an Anthropic stream and hangs up. message_start
    # already carries usage (its output a token or two); counted from it, the call
    # would cost next to nothing whatever the provider generated. It keeps its hold:
    # 1,000 output tokens of claude-opus-4-1 (75 USD a million) and the input's estimate.
    config = make_config(tmp_path, llm.url, budgets={"llm": {"limit_usd": 1.0, "window": "day"}})
    agent = "agent:support-triage"
    llm.script(Reply(text="word " * 200, fault=Fault("slow_stream", seconds=0.05)))
    async with (
        Warden(config) as warden,
        anthropic.AsyncAnthropic(
            base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
        ) as c,
    ):
        stream = await c.messages.create(
            model="claude-opus-4-1", max_tokens=1000, messages=MESSAGES, stream=True
        )
        async for event in stream:
            if event.type == "content_block_delta":
                break  # the agent has what it wanted
        await stream.close()
        spent = await wait_for(tmp_path, "llm", agent, lambda v: v[0] > 0 and v[1] == 0)
    assert spent[0] == pytest.approx(1000 * 75 / 1e6, rel=0.05)


@pytest.mark.parametrize(
    ("route", "usage"),
    [
        ("chat", {}),
        ("chat", {"prompt_tokens": "900000", "completion_tokens": 1e5}),
        ("responses", {"input_tokens": 10, "output_tokens": -1_000_000}),
        # Priced, a count past a float's range was an infinite cost, written to the
        # log as a bare Infinity that verify and a restart read as damage.
        ("chat", {"prompt_tokens": 10**308, "completion_tokens": 1}),
    ],
    ids=["chat-empty", "chat-not-integers", "responses-negative", "chat-past-a-float"],
)
async def test_usage_that_is_no_count_is_spent_at_what_it_held(
    tmp_path: Path, route: str, usage: dict[str, Any]
) -> None:
    """An upstream's usage without two non-negative integer counts does not settle the
    call at nothing (nor crash it, for a negative count): it stays spent at its hold."""
    answer = chat_answer(usage) if route == "chat" else responses_answer(usage)
    async with RawUpstream() as upstream:
        config = make_config(
            tmp_path, upstream.url, budgets={"llm": {"limit_usd": 1.0, "window": "day"}}
        )
        upstream.script(RawReply.json(answer))
        async with Warden(config) as warden, client(warden) as c:
            if route == "chat":
                await c.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=1000
                )
            else:
                await c.responses.create(
                    model="gpt-4o-mini", input="refund please", max_output_tokens=1000
                )
            spent, reserved = await wait_for(
                tmp_path, "llm", "agent:support-triage", lambda v: v[0] > 0
            )
    # 1,000 output tokens of gpt-4o-mini (0.60 USD a million) and the body's input.
    assert spent == pytest.approx(1000 * 0.6 / 1e6, rel=0.2)
    assert reserved == 0.0
    [outcome] = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert outcome["outcome"]["status"] == 200
    assert outcome["outcome"]["tokens"] is None
    assert warden_cli(["audit", "verify", "--dir", str(tmp_path / "audit")]) == 0


async def test_an_azure_deployment_is_the_model_priced_and_decided(
    tmp_path: Path, llm: MockLLM
) -> None:
    """On ``deployments/<name>/...`` the deployment runs, whatever the body's ``model``:
    a cheap model named in the body does not price a dear deployment's call."""
    config = make_config(tmp_path, llm.url, budgets={"llm": {"limit_usd": 1.0, "window": "day"}})

    def azure(warden: Warden, deployment: str) -> openai.AsyncAzureOpenAI:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=f"{warden.proxy_url}/openai",
            azure_deployment=deployment,
            api_key="sk-test",
            api_version="2024-10-21",
            max_retries=0,
        )

    async with Warden(config) as warden:
        async with azure(warden, "o1-pro") as dear:
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await dear.chat.completions.create(
                    model="gpt-4.1-nano", messages=MESSAGES, max_tokens=20_000
                )
        # 20,000 output tokens at o1-pro's 600 USD a million, not gpt-4.1-nano's.
        assert "this model call of 12.00 would pass it" in str(denied.value)
        llm.script(Reply(text="fine"))
        async with azure(warden, "gpt-4o-mini") as cheap:
            answer = await cheap.chat.completions.create(
                model="o1-pro", messages=MESSAGES, max_tokens=10
            )
        assert answer.choices[0].message.content == "fine"
    assert [r.path for r in llm.requests] == ["/openai/deployments/gpt-4o-mini/chat/completions"]
    models = [
        r["action"]["model"] for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"
    ]
    assert models == ["o1-pro", "gpt-4o-mini"]


async def test_a_deployment_in_the_upstreams_base_url_is_the_model_priced(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The deployment in base_url (as the Azure SDK's own base_url ends): the body's cheap
    # model was priced and decided instead, past a cap the deployment's call would pass.
    upstreams = {
        "openai": {"protocol": "openai", "base_url": f"{llm.url}/openai/deployments/o1-pro"}
    }
    budgets = {"llm": {"limit_usd": 1.0, "window": "day"}}
    config = make_config(tmp_path, llm.url, upstreams=upstreams, budgets=budgets)
    async with (
        Warden(config) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai", api_key="sk-test", max_retries=0
        ) as client,
    ):
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(
                model="gpt-4.1-nano", messages=MESSAGES, max_tokens=20_000
            )
    assert "this model call of 12.00 would pass it" in str(denied.value)
    assert llm.requests == []
    models = [
        r["action"]["model"] for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"
    ]
    assert models == ["o1-pro"]


async def test_a_request_without_an_output_bound_is_sent_with_the_one_it_is_held_at(
    tmp_path: Path, llm: MockLLM
) -> None:
    """Under a cap, a model request that sets no output bound is held at
    ``unbounded_output_tokens`` and sent with that bound, so it cannot spend past its
    hold (twenty such calls in flight could otherwise each generate 100,000 tokens).
    A request with its own bound, and any request with no cap to hold for, go as sent."""
    capped = {"llm": {"limit_usd": 5.0, "window": "day", "unbounded_output_tokens": 2000}}
    async with (
        Warden(make_config(tmp_path, llm.url, budgets=capped)) as warden,
        client(warden) as c,
    ):
        for _ in range(3):
            llm.script(Reply(text="ok"))
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await c.responses.create(model="gpt-4o-mini", input="refund please")
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    chat, responses, bounded = (r.body for r in llm.requests)
    assert chat["max_completion_tokens"] == 2000
    assert responses["max_output_tokens"] == 2000
    assert bounded["max_tokens"] == 50
    assert "max_completion_tokens" not in bounded
    # A model that generates less than the bound (its price entry's max_output) gets its own.
    default = {"llm": {"limit_usd": 5.0, "window": "day"}}
    async with (
        Warden(make_config(tmp_path / "default", llm.url, budgets=default)) as warden,
        client(warden) as c,
    ):
        for model in ("gpt-4-turbo", "gpt-4o-mini"):
            llm.script(Reply(text="ok"))
            await c.chat.completions.create(model=model, messages=MESSAGES)
    assert [r.body["max_completion_tokens"] for r in llm.requests[-2:]] == [4096, 8192]
    counted = {"llm": {"window": "day"}}  # spend counted, no cap: nothing to hold for
    async with (
        Warden(make_config(tmp_path / "counted", llm.url, budgets=counted)) as warden,
        client(warden) as c,
    ):
        llm.script(Reply(text="ok"))
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "max_completion_tokens" not in llm.requests[-1].body
    # Observe mode enforces no cap: a shadow run sends the request as the agent wrote it
    # (a bound written in cut answers short, and older Azure versions refuse it).
    async with (
        Warden(make_config(tmp_path / "shadow", llm.url, budgets=capped, mode="observe")) as w,
        client(w) as c,
    ):
        llm.script(Reply(text="ok"))
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "max_completion_tokens" not in llm.requests[-1].body


async def test_priority_processing_and_provider_searches_are_counted_at_their_price(
    tmp_path: Path, llm: MockLLM
) -> None:
    """``service_tier: priority`` costs twice standard (asked for, so counted so); an
    Anthropic answer's web searches cost 0.01 USD each beside its tokens."""
    searched: Any = {
        **wire.message_body([{"type": "text", "text": "found it"}], stop="end_turn"),
        "usage": {
            "input_tokens": 1000,
            "output_tokens": 100,
            "server_tool_use": {"web_search_requests": 4},
        },
    }
    async with RawUpstream() as anthropic_api:
        upstreams = {
            "openai": {"protocol": "openai", "base_url": llm.url, "timeout_s": 5},
            "anthropic": {"protocol": "anthropic", "base_url": anthropic_api.url, "timeout_s": 5},
        }
        config = make_config(
            tmp_path,
            llm.url,
            upstreams=upstreams,
            budgets={"llm": {"limit_usd": 5.0, "window": "day"}},
        )
        anthropic_api.script(RawReply.json(searched))
        async with Warden(config) as warden, client(warden) as c:
            llm.script(Reply(text="one two three"))
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
            llm.script(Reply(text="one two three"))
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, service_tier="priority"
            )
            async with anthropic.AsyncAnthropic(
                base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant", max_retries=0
            ) as claude:
                await claude.messages.create(
                    model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES
                )
    costs = [
        r["outcome"]["cost"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"
    ]
    standard, priority, sonnet = costs
    assert priority == pytest.approx(2 * standard)
    # Not in the shipped table: the default price, 15 USD a million in, 75 out.
    assert sonnet == pytest.approx((1000 * 15.0 + 100 * 75.0) / 1e6 + 4 * 0.01)


async def test_a_request_declaring_billed_hosted_tools_is_held_and_sent_with_their_bound(
    tmp_path: Path, llm: MockLLM
) -> None:
    """Tools the provider runs and bills per call count in the hold: under a cap, a
    request declaring them without a bound is sent with ``unbounded_tool_calls`` on them
    and held at that many calls at the provider's dearest fee (10 at 0.03 USD)."""
    cap = {"llm": {"limit_usd": 0.2, "window": "day"}}
    search: Any = [{"type": "web_search"}]
    async with (
        Warden(make_config(tmp_path, llm.url, budgets=cap)) as warden,
        client(warden) as c,
    ):
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await c.responses.create(
                model="gpt-4o-mini", input="news?", tools=search, max_output_tokens=100
            )
        llm.script(Reply(text="two searches at most"))
        await c.responses.create(
            model="gpt-4o-mini",
            input="news?",
            tools=search,
            max_output_tokens=100,
            max_tool_calls=2,
        )
    llm.script(Reply(text="no bound asked"))
    roomy = {"llm": {"limit_usd": 5.0, "window": "day"}}
    assert "this model call of 0.30 would pass it" in str(denied.value)
    assert llm.requests[-1].body["max_tool_calls"] == 2
    async with (
        Warden(make_config(tmp_path / "more", llm.url, budgets=roomy)) as warden,
        client(warden) as c,
    ):
        await c.responses.create(
            model="gpt-4o-mini", input="news?", tools=search, max_output_tokens=100
        )
    assert llm.requests[-1].body["max_tool_calls"] == 10


async def test_what_a_request_does_not_carry_is_held_at_its_most(
    tmp_path: Path, llm: MockLLM
) -> None:
    """A request naming no model (a stored prompt brings its own) is held at the table's
    dearest price; a continuation (``previous_response_id``) at its body and
    ``continued_input_tokens`` of stored input beside it, which the provider bills."""
    cap = {"llm": {"limit_usd": 0.2, "window": "day"}}
    async with (
        Warden(make_config(tmp_path, llm.url, budgets=cap)) as warden,
        client(warden) as c,
    ):
        with pytest.raises(openai.PermissionDeniedError) as unnamed:
            await c.responses.create(input="hello", max_output_tokens=1000)
        with pytest.raises(openai.PermissionDeniedError) as continued:
            await c.responses.create(
                model="gpt-4.1",
                previous_response_id="resp_elsewhere",
                input="continue",
                max_output_tokens=100,
            )
        llm.script(Reply(text="fresh"))
        fresh = await c.responses.create(model="gpt-4.1", input="hello", max_output_tokens=100)
    # 1,000 output tokens at o1-pro's 600 USD a million, the dearest in the table.
    assert "this model call of 0.60 would pass it" in str(unnamed.value)
    # 128,000 stored input tokens at gpt-4.1's 2 USD a million, and 100 output at 8.
    assert "this model call of 0.26 would pass it" in str(continued.value)
    assert fresh.output_text == "fresh"


async def test_a_call_is_settled_at_the_model_its_answer_says_ran(tmp_path: Path) -> None:
    """The answer names the model that ran: a dearer known one is what the call costs
    (a provider running another model than the body names), and a request that named
    none (held at the dearest price) settles at the one that ran."""
    swapped = chat_answer({"prompt_tokens": 1000, "completion_tokens": 100}, model="o1-pro")
    prompted = responses_answer(
        {"input_tokens": 1000, "output_tokens": 100}, model="gpt-4o-mini-2024-07-18"
    )
    async with RawUpstream() as upstream:
        config = make_config(
            tmp_path, upstream.url, budgets={"llm": {"limit_usd": 100.0, "window": "day"}}
        )
        upstream.script(RawReply.json(swapped))
        upstream.script(RawReply.json(prompted))
        async with Warden(config) as warden, client(warden) as c:
            await c.chat.completions.create(model="gpt-4.1-nano", messages=MESSAGES, max_tokens=100)
            await c.responses.create(input="hello", max_output_tokens=100)
    costs = [
        r["outcome"]["cost"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"
    ]
    # o1-pro: 150 and 600 USD a million; gpt-4o-mini: 0.15 and 0.60.
    assert costs == [
        pytest.approx((1000 * 150 + 100 * 600) / 1e6),
        pytest.approx((1000 * 0.15 + 100 * 0.6) / 1e6),
    ]
