"""The Governor and its call links: decide, link, record results, survive a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from warden.core import MAX_RESULTS_PER_REQUEST, RESERVED_CALL_IDS, Governor, Turn
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Conversation,
    Decision,
    Effect,
    Mode,
    Outcome,
    RequestMeta,
    Stage,
    ToolCall,
    ToolResult,
    new_id,
)
from warden.pipeline import GuardContext, Pipeline
from warden.state.links import (
    LINK_TTL_S,
    MAX_CALL_ID_CHARS,
    CallLinks,
    CallLinkStore,
    Link,
    decode_action,
    encode_action,
)
from warden.testing.memory_audit import MemoryAudit

AGENT = Agent("support-triage", "v1", {"sub": "svc"})
REQUEST = RequestMeta("POST", "openai", "/v1/chat/completions", {"user-agent": "sdk"})


class ByName:
    """A guard that denies the tools named ``deny*`` and holds ``hold*``."""

    name = "policy"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        tool = action.tool or ""
        effect = (
            Effect.DENY
            if tool.startswith("deny")
            else Effect.REQUIRE_APPROVAL
            if tool.startswith("hold")
            else Effect.ALLOW
        )
        return Decision(new_id("dec"), effect, (f"{effect} by name",), ctx.mode, "policy")


class Approver:
    """An approval gate that approves everything it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def settle(
        self, action: Action, decision: Decision, *, connected: Any = None
    ) -> Decision:
        self.asked.append(action.tool or "")
        return dataclasses.replace(decision, effect=Effect.ALLOW, guard="approval")


def pipeline(audit: MemoryAudit) -> Pipeline:
    return Pipeline([ByName()], audit, mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write")


def turn() -> Turn:
    return Turn(agent=AGENT, request=REQUEST, context={"customer_id": "C-1"}, model="gpt-4o")


def call(name: str, call_id: str, key: str | None = None) -> ToolCall:
    return ToolCall(
        call_id=call_id,
        name=name,
        raw_arguments='{"order_id": "A-1"}',
        arguments={"order_id": "A-1"},
        key=key or call_id,
    )


def result(call_id: str, content: str = "done") -> ToolResult:
    return ToolResult(call_id=call_id, content=content)


def ambiguous() -> float:
    value = REGISTRY.get_sample_value("warden_ambiguous_call_ids_total", {"upstream": "openai"})
    return value or 0.0


@pytest.fixture
def audit() -> MemoryAudit:
    return MemoryAudit()


@pytest.fixture
async def core(audit: MemoryAudit) -> AsyncIterator[Governor]:
    governor = Governor(pipeline(audit))
    await governor.start()
    yield governor
    await governor.close()


async def settled(core: Governor) -> None:
    await core.background.drain()


# -- decisions -----------------------------------------------------------------------


async def test_calls_are_decided_and_keyed_by_position(core: Governor) -> None:
    decided = await core.decide_calls(
        turn(), [call("search", "c1", "0.0"), call("deny_export", "c2", "0.1")], "openai.chat"
    )
    assert {k: d.effect for k, d in decided.items()} == {"0.0": Effect.ALLOW, "0.1": Effect.DENY}


async def test_two_calls_with_one_key_are_refused(core: Governor) -> None:
    with pytest.raises(RuntimeError, match="same key"):
        await core.decide_calls(turn(), [call("a", "c1", "k"), call("b", "c2", "k")], "openai")


async def test_the_action_carries_the_turn_and_the_call(core: Governor, audit: MemoryAudit) -> None:
    await core.decide_calls(turn(), [call("search", "c1")], "openai.chat")
    action, _ = audit.decisions[0]
    assert (action.agent, action.request, action.model) == (AGENT, REQUEST, "gpt-4o")
    assert (action.tool, action.call_id, action.protocol) == ("search", "c1", "openai.chat")
    assert action.context == {"customer_id": "C-1"}


async def test_a_held_decision_goes_through_the_gate(audit: MemoryAudit) -> None:
    gate = Approver()
    core = Governor(pipeline(audit), gate=gate)
    decided = await core.decide_calls(turn(), [call("hold_refund", "c1")], "openai")
    assert gate.asked == ["hold_refund"]
    assert decided["c1"].guard == "approval"
    await core.close()


async def test_decisions_are_counted(core: Governor) -> None:
    labels = {
        "agent": "support-triage",
        "tool": "deny_x",
        "effect": "deny",
        "mode": "enforce",
        "guard": "policy",
    }
    before = REGISTRY.get_sample_value("warden_decisions_total", labels) or 0.0
    await core.decide_calls(turn(), [call("deny_x", "c1")], "openai")
    assert REGISTRY.get_sample_value("warden_decisions_total", labels) == before + 1


# -- results -------------------------------------------------------------------------


async def test_a_result_is_recorded_as_its_decisions_outcome_once(
    core: Governor, audit: MemoryAudit
) -> None:
    decided = await core.decide_calls(turn(), [call("search", "c1")], "openai")
    core.record_results(AGENT, [result("c1", "found")])
    core.record_results(AGENT, [result("c1", "found")])  # the conversation, resent
    await settled(core)
    assert [(o.decision_id, o.outcome.result) for o in audit.outcomes] == [
        (decided["c1"].decision_id, "found")
    ]


async def test_a_result_from_another_agent_is_not_its_outcome(
    core: Governor, audit: MemoryAudit
) -> None:
    # Another agent naming the call id records nothing and leaves the link in place.
    decided = await core.decide_calls(turn(), [call("search", "c1")], "openai")
    core.record_results(Agent("other-bot"), [result("c1", "forged")])
    core.record_results(AGENT, [result("grpc-decision:" + decided["c1"].decision_id)])
    await settled(core)
    assert audit.outcomes == []
    core.record_results(AGENT, [result("c1", "found")])
    await settled(core)
    assert [o.outcome.result for o in audit.outcomes] == ["found"]


async def test_a_stored_link_of_another_agent_is_put_back(audit: MemoryAudit, url: str) -> None:
    first = await governor(audit, url)
    await first.decide_calls(turn(), [call("search", "c1")], "openai")
    await stop(first)
    second = await governor(audit, url)
    second.record_results(Agent("other-bot"), [result("c1", "forged")])
    await settled(second)
    assert audit.outcomes == []
    second.record_results(AGENT, [result("c1", "found")])
    await settled(second)
    await stop(second)
    assert [o.outcome.result for o in audit.outcomes] == ["found"]


async def test_a_denied_call_is_not_linked(core: Governor, audit: MemoryAudit) -> None:
    await core.decide_calls(turn(), [call("deny_export", "c1")], "openai")
    core.record_results(AGENT, [result("c1")])
    await settled(core)
    assert audit.outcomes == []


async def test_an_id_shared_in_one_response_links_to_nothing(
    core: Governor, audit: MemoryAudit
) -> None:
    before = ambiguous()
    await core.decide_calls(turn(), [call("a", "same", "0"), call("b", "same", "1")], "openai")
    assert ambiguous() == before + 1
    core.record_results(AGENT, [result("same")])
    await settled(core)
    assert audit.outcomes == []


async def test_an_id_still_waiting_from_an_earlier_response_links_to_nothing(
    core: Governor, audit: MemoryAudit
) -> None:
    await core.decide_calls(turn(), [call("a", "c1")], "openai")
    before = ambiguous()
    await core.decide_calls(turn(), [call("b", "c1")], "openai")
    assert ambiguous() == before + 1
    await core.decide_calls(turn(), [call("c", "c1")], "openai")  # a third time: still none
    core.record_results(AGENT, [result("c1")])
    await settled(core)
    assert audit.outcomes == []


async def test_an_id_in_wardens_own_namespace_links_to_nothing(
    core: Governor, audit: MemoryAudit
) -> None:
    # A gRPC Check's link: a provider naming its key must neither take nor tombstone it.
    grpc_key = RESERVED_CALL_IDS[0] + "dec_1"
    action = Action(new_id("act"), AGENT, ActionKind.TOOL_CALL, "grpc", Stage.PROPOSED, REQUEST)
    core.links.link(grpc_key, Link(action, "dec_1"))
    before = ambiguous()
    await core.decide_calls(turn(), [call("a", grpc_key)], "openai")
    assert ambiguous() == before + 1
    found, _ = core.links.take([grpc_key])
    assert found[grpc_key].decision_id == "dec_1"


async def test_an_id_whose_result_came_back_is_free_again(
    core: Governor, audit: MemoryAudit
) -> None:
    await core.decide_calls(turn(), [call("a", "c1")], "openai")
    core.record_results(AGENT, [result("c1", "first")])
    again = await core.decide_calls(turn(), [call("b", "c1")], "openai")
    core.record_results(AGENT, [result("c1", "second")])
    await settled(core)
    assert [o.outcome.result for o in audit.outcomes] == ["first", "second"]
    assert audit.outcomes[1].decision_id == again["c1"].decision_id


async def test_outcomes_are_recorded_in_the_background_and_drained_on_close(
    audit: MemoryAudit,
) -> None:
    core = Governor(pipeline(audit))
    decision = await core.decide(
        Action(new_id("act"), AGENT, ActionKind.LLM_CALL, "openai", Stage.EXECUTED, REQUEST)
    )
    core.outcome(audit.decisions[0][0], decision, Outcome(status=200))
    assert audit.outcomes == []  # not yet: the response does not wait on it
    await core.close()
    assert [o.outcome.status for o in audit.outcomes] == [200]


# -- call links across a restart -------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


_STORES: dict[int, CallLinkStore] = {}
"""Each test Governor's link store, closed by :func:`stop` after the core flushed into it."""


async def governor(audit: MemoryAudit, url: str, ttl_s: float = LINK_TTL_S) -> Governor:
    store = await CallLinkStore.open(url)
    core = Governor(pipeline(audit), links=CallLinks(store, ttl_s=ttl_s))
    _STORES[id(core)] = store
    await core.start()
    return core


async def stop(core: Governor) -> None:
    await core.close()
    await _STORES.pop(id(core)).close()


async def test_a_result_after_a_restart_links_to_its_decision(audit: MemoryAudit, url: str) -> None:
    first = await governor(audit, url)
    decided = await first.decide_calls(turn(), [call("search", "c1")], "openai")
    await stop(first)
    second = await governor(audit, url)
    second.record_results(AGENT, [result("c1", "found")])
    second.record_results(AGENT, [result("c1", "found")])
    await settled(second)
    await stop(second)
    [recorded] = audit.outcomes
    assert recorded.decision_id == decided["c1"].decision_id
    assert recorded.action == audit.decisions[0][0]
    assert recorded.outcome.result == "found"


async def test_a_link_is_written_in_the_background_without_a_stop(
    audit: MemoryAudit, url: str
) -> None:
    first = await governor(audit, url)
    await first.decide_calls(turn(), [call("search", "c1")], "openai")
    await first.links.flush()  # what the writer does within one batch
    reader = await CallLinkStore.open(url)
    links, tombs = await reader.take(["c1"], newer_than=0)
    await reader.close()
    await stop(first)
    assert set(links) == {"c1"}
    assert not tombs


async def test_a_call_id_too_long_to_be_a_providers_is_never_linked_or_looked_up(
    audit: MemoryAudit, url: str
) -> None:
    """Ids come from agents too: one of megabytes is neither kept nor sent to the store."""
    core = await governor(audit, url)
    long_id = "c" * (MAX_CALL_ID_CHARS + 1)
    decided = await core.decide_calls(turn(), [call("search", long_id)], "openai")
    assert decided[long_id].enforced is Effect.ALLOW  # decided as ever, only not linked
    assert not core.links.waiting(long_id)
    assert core.links.take([long_id, "c" * 10_000]) == ({}, [])
    await stop(core)


class _CountingLinkStore(CallLinkStore):
    """Remembers which ids it was asked for."""

    asked: list[str]

    async def take(self, call_ids: Any, *, newer_than: float) -> Any:
        self.asked.extend(call_ids)
        return await super().take(call_ids, newer_than=newer_than)


async def test_only_the_newest_results_of_a_request_are_looked_up(
    audit: MemoryAudit, url: str
) -> None:
    """An agent sending thousands of results gets a bounded lookup: the conversation's end."""
    store = await _CountingLinkStore.open(url)
    store.asked = []
    core = Governor(pipeline(audit), links=CallLinks(store))
    await core.start()
    sent = [result(f"r{i}") for i in range(MAX_RESULTS_PER_REQUEST + 500)]
    core.record_results(AGENT, sent)
    await settled(core)
    await core.close()
    await store.close()
    assert store.asked == [r.call_id for r in sent[-MAX_RESULTS_PER_REQUEST:]]


class _SlowLinkStore(CallLinkStore):
    """Each batch's transaction takes a while, in the store's thread, as on a busy disk."""

    started: threading.Event

    def _apply(self, ops: Any, prune_before: float | None, keep: int) -> list[str]:
        self.started.set()
        time.sleep(0.2)
        return super()._apply(ops, prune_before, keep)


async def test_a_stop_during_a_links_transaction_keeps_the_link(
    audit: MemoryAudit, url: str
) -> None:
    """Stopping while the writer's batch is in its transaction neither loses nor doubles it.

    A batch written twice would clash with itself and leave tombstones: the
    result sent after the restart would then link to nothing.
    """
    store = await _SlowLinkStore.open(url)
    store.started = threading.Event()
    first = Governor(pipeline(audit), links=CallLinks(store))
    await first.start()
    decided = await first.decide_calls(turn(), [call("search", "c1")], "openai")
    await asyncio.to_thread(store.started.wait, 5)  # the writer's batch is in its transaction
    await first.close()
    await store.close()
    second = await governor(audit, url)
    second.record_results(AGENT, [result("c1", "found")])
    await settled(second)
    await stop(second)
    [recorded] = audit.outcomes
    assert recorded.decision_id == decided["c1"].decision_id


async def test_an_id_linked_before_a_restart_and_proposed_again_links_to_nothing(
    audit: MemoryAudit, url: str
) -> None:
    first = await governor(audit, url)
    await first.decide_calls(turn(), [call("a", "c1")], "openai")
    await stop(first)
    second = await governor(audit, url)
    await second.decide_calls(turn(), [call("b", "c1")], "openai")
    await second.links.flush()
    second.record_results(AGENT, [result("c1")])
    await settled(second)
    await stop(second)
    assert audit.outcomes == []


async def test_a_link_older_than_its_ttl_links_to_nothing(audit: MemoryAudit, url: str) -> None:
    now = [1000.0]
    first = await governor(audit, url, ttl_s=60)
    first.links._clock = lambda: now[0]
    await first.decide_calls(turn(), [call("a", "c1")], "openai")
    await stop(first)
    second = await governor(audit, url, ttl_s=60)
    second.links._clock = lambda: now[0] + 61
    second.record_results(AGENT, [result("c1")])
    await settled(second)
    await stop(second)
    assert audit.outcomes == []


async def test_the_table_is_bounded_oldest_first(url: str) -> None:
    store = await CallLinkStore.open(url)
    links = CallLinks(store, max_links=3)
    action = Action(new_id("act"), AGENT, ActionKind.TOOL_CALL, "openai", Stage.PROPOSED, REQUEST)
    for i in range(5):
        links.link(f"c{i}", Link(action, f"dec_{i}"))
        await links.flush()
    links._pruned = 0.0  # prune on the next batch
    links.link("c5", Link(action, "dec_5"))
    await links.flush()
    assert await store.count() == 3
    found, _ = await store.take(["c0", "c5"], newer_than=0)
    assert set(found) == {"c5"}
    await store.close()


def test_an_action_survives_encoding() -> None:
    action = Action(
        action_id="act_1",
        agent=AGENT,
        kind=ActionKind.SHELL_CALL,
        protocol="openai.responses",
        stage=Stage.PROPOSED,
        request=REQUEST,
        tool="shell",
        arguments={"cmd": ["ls", "-l"], "n": 2**62, "f": 0.5, "deep": {"a": None}},
        raw_arguments='{"cmd": ["ls", "-l"]}',
        call_id="call_1",
        model="gpt-4o",
        context={"customer_id": "C-1"},
        wire_type="local_shell_call",
    )
    assert decode_action(encode_action(action)) == action


class _Chains:
    """Records the answers the core says were started, and by whom."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []

    async def record_response(
        self, conversation: Conversation, response_id: str, agent_id: str
    ) -> None:
        return None

    def settled(self, action: Action, decision: Decision) -> None:
        return None

    def answer_started(self, response_id: str, agent_id: str) -> None:
        self.started.append((response_id, agent_id))

    def proposed(self, actions: Sequence[Action]) -> None:
        return None


def test_a_stored_answer_streamed_again_is_not_started_by_whoever_fetches_it(
    audit: MemoryAudit,
) -> None:
    chains = _Chains()
    governor = Governor(pipeline(audit), chains=chains)
    asked = dataclasses.replace(
        turn(),
        request=RequestMeta("POST", "openai", "/v1/responses", conversation=Conversation()),
    )
    fetched = dataclasses.replace(
        turn(),
        request=RequestMeta(
            "GET",
            "openai",
            "/v1/responses/resp_1",
            conversation=Conversation(previous_response_id="resp_1", retrieved_id="resp_1"),
        ),
    )
    governor.answer_started(fetched, "resp_1")
    governor.answer_started(asked, "resp_2")
    assert chains.started == [("resp_2", asked.agent.id)]
