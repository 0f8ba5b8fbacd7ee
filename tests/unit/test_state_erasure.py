"""Erasing a data subject from the state store: the same contract on SQLite and PostgreSQL.

Each test runs once per backend, through the repository interfaces, on a
backend opened as ``warden serve`` opens it; and once for the memory of
:class:`~warden.state.links.CallLinks`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.pg import state_config
from tests.unit.test_state_contract import approval
from warden.approvals.model import Approval, ApprovalStatus
from warden.approvals.store import ERASED_BY
from warden.audit.subjects import SubjectKeys, SubjectMatch
from warden.model import Action, ActionKind, Agent, RequestMeta, Stage
from warden.state import postgres
from warden.state.backend import StateBackend, open_state
from warden.state.links import CallLinks, Link, LinkOp
from warden.state.sessions import ERASED_CALLS, ChainLink

SOURCES = ("action.arguments.customer_id", "context.customer_id", "agent.claims.sub")


@pytest.fixture(params=["sqlite", "postgresql"])
async def state(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StateBackend]:
    # PostgreSQL erasures read a page at a time: pages of two make every test below
    # span several, so a row on a later page is erased too.
    monkeypatch.setattr(postgres, "ERASE_PAGE", 2)
    backend = await open_state(state_config(request, tmp_path))
    yield backend
    await backend.close()


@pytest.fixture
def ann(tmp_path: Path) -> SubjectMatch:
    """Customer ``C-ann`` being erased, as the audit log hands it to the stores."""
    keys = SubjectKeys.open(tmp_path / "audit")
    return SubjectMatch(frozenset({keys.ref("C-ann")}), SOURCES, keys.ref)


def _action(
    call_id: str,
    *,
    arguments: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
) -> Action:
    return Action(
        action_id=f"act_{call_id}",
        agent=Agent("support-triage", "1", claims or {}),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions", {}),
        tool="lookup_customer",
        arguments=arguments if arguments is not None else {"order_id": "A-1"},
        call_id=call_id,
        context=context or {},
    )


def test_a_subject_is_named_by_any_source_present(ann: SubjectMatch) -> None:
    assert ann.names(arguments={"customer_id": "C-ann"})
    assert ann.names(context={"customer_id": "C-ann"})
    assert ann.names(claims={"sub": "C-ann"})
    # Any source, not only the first present: Bob's context does not hide Ann.
    assert ann.names(arguments={"customer_id": "C-ann"}, context={"customer_id": "C-bob"})
    assert not ann.names(arguments={"customer_id": "C-bob"}, context={"customer_id": "C-bob"})
    assert not ann.names(arguments={"customer_id": ["C-ann"]})  # not a subject value
    assert not ann.names(arguments="C-ann")
    assert not ann.names()


async def test_links_naming_the_subject_are_deleted(state: StateBackend, ann: SubjectMatch) -> None:
    now = time.time()
    actions = {
        "by_argument": _action("by_argument", arguments={"customer_id": "C-ann"}),
        "by_context": _action("by_context", context={"customer_id": "C-ann"}),
        "by_claim": _action("by_claim", claims={"sub": "C-ann"}),
        "bob": _action("bob", arguments={"customer_id": "C-bob"}),
        "nobody": _action("nobody"),
    }
    ops = [LinkOp("put", c, Link(a, f"dec_{c}"), at=now) for c, a in actions.items()]
    ops.append(LinkOp("tomb", "tombstone", at=now))
    await state.links.apply(ops, prune_before=None)
    gone = await state.links.erase(ann)
    assert sorted(gone) == ["by_argument", "by_claim", "by_context"]
    assert await state.links.count() == 3
    links, tombs = await state.links.take(list(actions), newer_than=now - 60)
    assert sorted(links) == ["bob", "nobody"]
    assert tombs == set()
    assert await state.links.erase(ann) == []


async def test_call_links_forget_the_subject_in_memory_in_the_queue_and_stored(
    state: StateBackend, ann: SubjectMatch
) -> None:
    links = CallLinks(state.links)
    stored = Link(_action("stored", arguments={"customer_id": "C-ann"}), "dec_stored")
    links.link("stored", stored)
    await links.flush()
    links.link("queued", Link(_action("queued", context={"customer_id": "C-ann"}), "dec_q"))
    links.link("bob", Link(_action("bob", arguments={"customer_id": "C-bob"}), "dec_bob"))
    assert await links.erase(ann) == 2
    await links.flush()
    assert await state.links.count() == 1  # Bob's; Ann's queued link was never written
    found, unknown = links.take(["stored", "queued", "bob"])
    assert list(found) == ["bob"]
    assert unknown == []  # known to be unlinked: the store is not asked
    assert not links.waiting("stored")


def _approval(aid: str, customer: str, binding: str, **kw: Any) -> Approval:
    """The contract suite's approval, for an email change naming ``customer``."""
    return replace(
        approval(aid, binding=binding, mode="defer", ttl=3600),
        agent_id="support-triage",
        tool="update_email",
        arguments={"customer_id": customer, "email": f"{customer}@example.com"},
        **kw,
    )


async def test_approvals_naming_the_subject_lose_their_arguments_and_live_ones_are_rejected(
    state: StateBackend, ann: SubjectMatch
) -> None:
    repo = state.approvals
    now = time.time()
    answered = {"ask": {"action": "accept", "content": {"email": "ann@example.com"}}}
    pending = _approval("apr_pending", "C-ann", "b1", answers=answered)
    # A masked value's pointer is made of argument keys: the subject's e-mail address.
    await repo.insert(replace(pending, redacted=("/logins/ann@example.com/password",)))
    await repo.insert(_approval("apr_grant", "C-ann", "b2", status=ApprovalStatus.APPROVED))
    used = _approval("apr_used", "C-ann", "b3", status=ApprovalStatus.CONSUMED, consumed_at=now)
    await repo.insert(replace(used, decided_at=now - 1, decided_by="dana"))
    bob = _approval("apr_bob", "C-bob", "b4", answers={"ask": {"action": "decline"}})
    await repo.insert(bob)
    done = await repo.erase(ann, now)
    assert done.erased == 3
    assert sorted(a.id for a in done.revoked) == ["apr_grant", "apr_pending"]
    for revoked in done.revoked:
        assert revoked.status is ApprovalStatus.REJECTED
        assert revoked.decided_by == ERASED_BY
        assert revoked.decided_at == pytest.approx(now)
    after = {a.id: a for a in await repo.list()}
    for aid in ("apr_pending", "apr_grant", "apr_used"):
        assert after[aid].arguments == {"erased": True}
        assert after[aid].answers is None  # an MCP retry's answers go with them
        assert after[aid].arguments_sha256 == ""
        assert after[aid].binding == ""
        assert after[aid].redacted == ()
    # Consumed stays consumed, with who decided it: the history still reads true.
    assert after["apr_used"].status is ApprovalStatus.CONSUMED
    assert after["apr_used"].decided_by == "dana"
    assert after["apr_bob"] == bob
    # Nothing matches an erased approval again, and erasing twice changes nothing.
    assert await repo.pending_for("b1", now) is None
    assert await repo.consume_grant("b2", now) is None
    assert (await repo.erase(ann, now)).erased == 0


async def test_responses_chain_links_naming_the_subject_are_emptied(
    state: StateBackend, ann: SubjectMatch
) -> None:
    repo = state.sessions
    assert repo is not None

    def calls(arguments: Any = None, raw: str = "") -> str:
        entry = {"call_id": "c", "tool": "lookup_customer", "arguments": arguments, "raw": raw}
        return orjson.dumps([{"call_id": "r", "result": {"content": "x"}}, entry]).decode()

    await repo.record_response(ChainLink("r1", "s", None, calls({"customer_id": "C-ann"}), "a"))
    await repo.record_response(ChainLink("r2", "s", "r1", calls(raw='{"customer_id":"C-ann"}')))
    await repo.record_response(ChainLink("r3", "s", "r2", calls({"customer_id": "C-bob"})))
    assert await repo.erase(ann) == 2
    # The links stay, with their agent (the provider still keeps the answers, and only
    # that agent may fetch them), emptied of their calls and session.
    chain = await repo.chain("r3")
    assert [(c.response_id, c.session_id, c.agent_id) for c in chain] == [
        ("r3", "s", None),
        ("r2", "", None),
        ("r1", "", "a"),
    ]
    # ...and marked: the hosted MCP approval requests they held are gone with the rest.
    assert [c.calls for c in chain[1:]] == [ERASED_CALLS, ERASED_CALLS]
    assert "C-bob" in chain[0].calls
    assert await repo.erase(ann) == 0
    # A maker's record coming after (the answer was fetched first) brings nothing back.
    await repo.extend_response(ChainLink("r9", "s", None, calls({"customer_id": "C-ann"})))
    assert await repo.erase(ann) == 1
    await repo.record_response(ChainLink("r9", "s", "r3", calls({"customer_id": "C-ann"}), "a"))
    (late,) = await repo.chain("r9", limit=1)
    assert (late.calls, late.session_id, late.previous_id, late.agent_id) == (
        ERASED_CALLS,
        "",
        "r3",
        "a",
    )
