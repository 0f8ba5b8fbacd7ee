"""A stored Responses answer is its own agent's: no other agent continues, fetches or deletes it.

With one provider key for every agent (Warden holding it, or agents sharing
one), the provider cannot tell agents apart, so a leaked answer id would let
one agent read or continue another's conversation. The official ``openai``
SDK of two agents through one Warden's base URL, against :class:`MockLLM`.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.server import Warden
from warden.testing import MockLLM, Reply

pytestmark = pytest.mark.timeout(60)

KEYS = {"refunds-bot": "key-refunds-bot", "triage-bot": "key-triage-bot"}


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    agents = {a: {"key_sha256": [hashlib.sha256(k.encode()).hexdigest()]} for a, k in KEYS.items()}
    config = make_config(tmp_path, llm.url, identity={"agents": agents, "require_proof": True})
    async with Warden(config) as running:
        yield running


def client(warden: Warden, agent: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1",
        api_key="sk-shared",
        max_retries=0,
        timeout=30,
        default_headers={"X-Warden-Agent": agent, "X-Warden-Agent-Key": KEYS[agent]},
    )


async def test_another_agent_cannot_continue_fetch_or_delete_an_answer(
    warden: Warden, llm: MockLLM, tmp_path: Path
) -> None:
    assert warden.core is not None
    async with client(warden, "refunds-bot") as mine, client(warden, "triage-bot") as theirs:
        llm.script(Reply(text="A-1001 ships tomorrow."))
        first = await mine.responses.create(model="gpt-4.1", input="where is A-1001?")
        llm.script(Reply(text="Queued."))
        queued = await mine.responses.create(model="gpt-4.1", input="summarise", background=True)
        await warden.core.background.drain()  # the answers' chain links are written
        seen = len(llm.requests)

        with pytest.raises(openai.PermissionDeniedError, match="made for another agent"):
            await theirs.responses.create(
                model="gpt-4.1", previous_response_id=first.id, input="and the refund?"
            )
        with pytest.raises(openai.PermissionDeniedError, match="made for another agent"):
            await theirs.responses.retrieve(queued.id)
        with pytest.raises(openai.PermissionDeniedError, match="made for another agent"):
            await theirs.responses.cancel(queued.id)
        with pytest.raises(openai.PermissionDeniedError, match="made for another agent"):
            await theirs.responses.delete(first.id)
        assert len(llm.requests) == seen  # none of it reached the provider

        # The agent it was made for carries on as before.
        llm.script(Reply(text="Refund issued."))
        answer = await mine.responses.create(
            model="gpt-4.1", previous_response_id=first.id, input="and the refund?"
        )
        assert answer.output_text == "Refund issued."
        fetched = await mine.responses.retrieve(queued.id)
        assert fetched.output_text == "Queued."
        await mine.responses.delete(first.id)
        assert len(llm.requests) == seen + 3
    await warden.stop()
    refused = [
        r
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "decision" and r["decision"]["guard"] == "session"
    ]
    assert [
        (r["agent"]["id"], r["decision"]["effect"], r["action"]["request"]["method"])
        for r in refused
    ] == [
        ("triage-bot", "deny", "POST"),
        ("triage-bot", "deny", "GET"),
        ("triage-bot", "deny", "POST"),
        ("triage-bot", "deny", "DELETE"),
    ]


async def test_a_conversation_id_no_provider_gives_is_refused_unclaimed(
    warden: Warden, llm: MockLLM, tmp_path: Path
) -> None:
    """Claimed, a 3 MB id would stay in memory and in the state store for days."""
    async with client(warden, "refunds-bot") as mine:
        with pytest.raises(openai.PermissionDeniedError, match="not one a provider gives"):
            await mine.responses.create(
                model="gpt-4.1", input="hi", conversation="conv_" + "A" * 5000
            )
    assert llm.requests == []
    assert b"A" * 5000 not in (tmp_path / "state.db").read_bytes()


async def test_a_provider_conversation_is_its_first_agents(
    warden: Warden, llm: MockLLM, tmp_path: Path
) -> None:
    async with client(warden, "refunds-bot") as mine, client(warden, "triage-bot") as theirs:
        llm.script(Reply(text="Hello."), Reply(text="Again."))
        await mine.responses.create(model="gpt-4.1", input="hi", conversation="conv_support_1")
        seen = len(llm.requests)
        with pytest.raises(openai.PermissionDeniedError, match="belongs to another agent"):
            await theirs.responses.create(
                model="gpt-4.1", input="what did they say?", conversation={"id": "conv_support_1"}
            )
        assert len(llm.requests) == seen
        again = await mine.responses.create(
            model="gpt-4.1", input="and?", conversation="conv_support_1"
        )
        assert again.output_text == "Again."
        # Another conversation is the other agent's to start.
        llm.script(Reply(text="Mine now."))
        other = await theirs.responses.create(
            model="gpt-4.1", input="hi", conversation="conv_support_2"
        )
        assert other.output_text == "Mine now."


async def test_handoffs_let_agents_continue_each_others_answers(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Agents that each bring their own key and hand a conversation over on purpose.
    agents = {a: {"key_sha256": [hashlib.sha256(k.encode()).hexdigest()]} for a, k in KEYS.items()}
    config = make_config(
        tmp_path,
        llm.url,
        identity={"agents": agents, "require_proof": True},
        sessions={"handoffs": True},
    )
    async with Warden(config) as warden:
        assert warden.core is not None
        async with client(warden, "refunds-bot") as mine, client(warden, "triage-bot") as theirs:
            llm.script(Reply(text="Over to you."), Reply(text="Taken over."))
            first = await mine.responses.create(model="gpt-4.1", input="hand over")
            await warden.core.background.drain()
            answer = await theirs.responses.create(
                model="gpt-4.1", previous_response_id=first.id, input="go on"
            )
            assert answer.output_text == "Taken over."
