"""A decision record carries what it takes to rebuild the exact policy input (ADR 0012).

:func:`warden.pipeline.policy_input` is what the policy saw; the record keeps
the action and agent, and ``decision.input`` keeps the rest
(:func:`warden.pipeline.policy_facts`). These tests fail when a key is added
to the policy input without being recorded.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.audit import AuditLog
from warden.audit.record import action_body, decision_body, tools_sha256
from warden.audit.verify import iter_records
from warden.config import AuditConfig, PolicyConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    PolicyView,
    RequestMeta,
    Stage,
)
from warden.monitor.events import Unsealer
from warden.pipeline import GuardContext, policy_facts, policy_input
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.replay import ToolsSeen, rebuild_input, replay
from warden.testing.audit import sample_action, sample_decision

KEYS = st.sampled_from(["order_id", "amount", "note", "items", "customer_id", "flag"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=4)


def record_of(action: Action, ctx: GuardContext) -> dict[str, Any]:
    """The decision record's fields as the audit log builds them (see ``record_decision``)."""
    decision = dataclasses.replace(sample_decision(), input=policy_facts(action, ctx))
    agent: dict[str, Any] = {"id": action.agent.id, "version": action.agent.version}
    if action.agent.claims:
        agent["claims"] = dict(action.agent.claims)
    record = {"agent": agent, "action": action_body(action), "decision": decision_body(decision)}
    stored: dict[str, Any] = orjson.loads(orjson.dumps(record))  # as stored and read back
    return stored


@settings(max_examples=60, deadline=None)
@given(
    arguments=st.none() | OBJECTS,
    context=OBJECTS,
    claims=OBJECTS,
    budget=OBJECTS,
    tools=st.lists(OBJECTS, max_size=3),
    mode=st.sampled_from(list(Mode)),
    risk=st.sampled_from(["read_only", "write", "high"]),
    kind=st.sampled_from(list(ActionKind)),
    stage=st.sampled_from([Stage.PROPOSED, Stage.EXECUTED]),
    wire_type=st.none() | st.sampled_from(["function", "function_call", "tool_use"]),
    model=st.none() | st.text(max_size=8),
    labels=st.lists(st.sampled_from(["untrusted_output", "money"]), max_size=2),
    session=OBJECTS,
    calls=st.lists(st.sampled_from(["get_order", "search_kb"]), max_size=3),
    answers=st.none() | st.dictionaries(KEYS, OBJECTS, min_size=1, max_size=2),
    meta=st.none() | OBJECTS,
)
def test_the_record_rebuilds_the_exact_policy_input(
    arguments: dict[str, Any] | None,
    context: dict[str, Any],
    claims: dict[str, Any],
    budget: dict[str, Any],
    tools: list[dict[str, Any]],
    mode: Mode,
    risk: str,
    kind: ActionKind,
    stage: Stage,
    wire_type: str | None,
    model: str | None,
    labels: list[str],
    session: dict[str, Any],
    calls: list[str],
    answers: dict[str, Any] | None,
    meta: dict[str, Any] | None,
) -> None:
    action = Action(
        action_id="act_1",
        agent=Agent("support-triage", "2026-11-20", claims),
        kind=kind,
        protocol="openai.chat",
        stage=stage,
        request=RequestMeta("POST", "openai", "/v1/chat/completions", {}, tuple(tools)),
        tool="issue_refund" if arguments is not None else None,
        arguments=arguments,
        model=model,
        context=context,
        wire_type=wire_type,
        input_responses=answers,
        meta=meta,
    )
    # Prior calls without content: their structure is recorded exactly.
    history = [prior(tool, arguments=None, content=None) for tool in calls]
    ctx = GuardContext(
        mode=mode,
        risk=risk,
        budget=budget,
        history=history,
        session=session,
        labels=tuple(labels),
    )
    rebuilt = rebuild_input(record_of(action, ctx))
    assert rebuilt.skip is None
    assert rebuilt.exact
    expected = orjson.loads(orjson.dumps(policy_input(action, ctx)))
    assert rebuilt.input == expected


def prior(tool: str, *, arguments: Any, content: str | None) -> dict[str, Any]:
    """An ``input.history`` entry as the session guard builds it."""
    result = (
        None
        if content is None
        else {"content": content, "size": len(content), "digest": "ab", "is_error": False}
    )
    return {
        "call_id": f"call_{tool}",
        "tool": tool,
        "arguments": arguments,
        "result": result,
        "decision": {"id": "dec_1", "effect": "allow"},
        "verified": True,
        "labels": [],
    }


def test_prior_calls_content_is_not_repeated_and_makes_the_input_inexact() -> None:
    content = "Jane, born 1990-02-03"
    entry = prior("get_order", arguments={"order_id": "A-1"}, content=content)
    entry["result"]["digest"] = hashlib.sha256(content.encode()).hexdigest()
    ctx = GuardContext(mode=Mode.ENFORCE, history=[entry])
    record = record_of(sample_action(), ctx)
    stored = orjson.dumps(record)
    assert b"1990-02-03" not in stored
    assert b"A-1" not in stored  # the action's own order is A-0
    # Nor the digest of the result, which a guess of name and date would match.
    assert entry["result"]["digest"].encode() not in stored
    rebuilt = rebuild_input(record)
    assert rebuilt.input is not None
    assert not rebuilt.exact
    [shown] = rebuilt.input["history"]
    assert shown["arguments"] == "[redacted]"
    assert shown["result"]["content"] == "[redacted]"
    assert shown["result"]["digest"] == "[redacted]"
    assert shown["result"]["size"] == len(content)
    assert shown["verified"] is True


def test_session_counters_of_credential_named_tools_replay_exactly() -> None:
    # A count is no secret: masked, a candidate counting reset_password would see
    # nothing and the replay would report no change where decisions change.
    session = {"id": "s-1", "calls": {"reset_password": 3}, "held": {"rotate_api_key": 1}}
    ctx = GuardContext(mode=Mode.ENFORCE, session=session)
    rebuilt = rebuild_input(record_of(sample_action(), ctx))
    assert rebuilt.exact
    assert rebuilt.input is not None
    assert rebuilt.input["session"]["calls"] == {"reset_password": 3}
    assert rebuilt.input["session"]["held"] == {"rotate_api_key": 1}
    # Anything else masked in the session makes the input inexact.
    hidden = GuardContext(mode=Mode.ENFORCE, session={"id": "s-1", "api_key": "k"})
    assert not rebuild_input(record_of(sample_action(), hidden)).exact


def test_a_door_input_and_an_old_record_are_not_replayed() -> None:
    ctx = GuardContext(mode=Mode.ENFORCE)
    view = PolicyView("data.envoy.authz.allow", {"attributes": {}}, lambda v: (bool(v), v))
    action = dataclasses.replace(sample_action(), view=view)
    assert rebuild_input(record_of(action, ctx)).skip == "door_input"
    old = record_of(sample_action(), ctx)
    del old["decision"]["input"]
    assert rebuild_input(old).skip == "no_input"
    assert rebuild_input({"kind": "decision"}).skip == "unreadable"


def test_redacted_fields_make_the_input_inexact_and_whole_redaction_skips() -> None:
    ctx = GuardContext(mode=Mode.ENFORCE)
    action = sample_action(arguments={"order_id": "A-1", "email": "a@example.com"})
    decision = dataclasses.replace(
        sample_decision(redact=("email",)), input=policy_facts(action, ctx)
    )
    record = {
        "agent": {"id": "support-triage", "version": ""},
        "action": action_body(action, ("email",)),
        "decision": decision_body(decision),
    }
    rebuilt = rebuild_input(record)
    assert rebuilt.input is not None
    assert not rebuilt.exact
    assert rebuilt.input["action"]["arguments"]["email"] == "[redacted]"
    record["action"] = action_body(action, ("arguments",))
    assert rebuild_input(record).skip == "redacted"


@pytest.mark.parametrize("erase", [False, True])
async def test_sealed_fields_are_unsealed_from_the_real_log(tmp_path: Path, erase: bool) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path)))
    ctx = GuardContext(mode=Mode.OBSERVE, risk="high", budget={"refunds": {"day": {}}})
    action = sample_action(customer="C-9", arguments={"order_id": "A-1", "amount": 80})
    # An MCP retry's answers are the customer's too: sealed with the arguments.
    answers = {"ask": {"action": "accept", "content": {"email": "c9@example.com"}}}
    action = dataclasses.replace(action, input_responses=answers)
    decision = dataclasses.replace(sample_decision(Effect.ALLOW), input=policy_facts(action, ctx))
    try:
        await log.record_decision(action, decision)
        if erase:
            await log.erase_subject("C-9")
    finally:
        await log.close()
    [(_, payload), *_] = list(iter_records(tmp_path))
    record = orjson.loads(payload)
    assert record["sealed"] is not None
    assert record["action"]["arguments"] is None
    assert record["action"]["input_responses"] is None
    assert b"c9@example.com" not in payload
    rebuilt = rebuild_input(record, Unsealer(tmp_path))
    if erase:
        assert rebuilt.skip == "erased"
    else:
        assert rebuilt.input == orjson.loads(orjson.dumps(policy_input(action, ctx)))


async def test_a_requests_declared_tools_are_recorded_once_and_rebuilt_by_digest(
    tmp_path: Path,
) -> None:
    """A response's calls name their request's declared tools by digest, not in full.

    The first decision of a request (its model call) carries the list; each
    later one (the calls of its answer) ``input.tools_sha256``. Replay reads
    the list from the earlier record; without it the call is skipped, never
    rebuilt with no tools. Another request with an equal list starts afresh.
    """
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path)))
    ctx = GuardContext(mode=Mode.ENFORCE)
    hosted = ({"type": "mcp", "server_label": "crm", "headers": {"authorization": "x"}},)
    tools = ({"type": "function", "name": "issue_refund"}, *hosted)
    request = RequestMeta("POST", "openai", "/v1/responses", {}, tools)
    model_call = dataclasses.replace(
        sample_action(), kind=ActionKind.LLM_CALL, tool=None, arguments=None, request=request
    )
    calls = [
        dataclasses.replace(sample_action(arguments={"order_id": f"A-{i}"}), request=request)
        for i in range(3)
    ]
    again = RequestMeta("POST", "openai", "/v1/responses", {}, tuple(dict(t) for t in tools))
    other = dataclasses.replace(calls[0], request=again)
    try:
        for action in [model_call, *calls, other]:
            facts = policy_facts(action, ctx)
            await log.record_decision(action, dataclasses.replace(sample_decision(), input=facts))
    finally:
        await log.close()
    records = [orjson.loads(payload) for _, payload in iter_records(tmp_path)]
    records = [r for r in records if r["kind"] == "decision"]
    recorded = [r["decision"]["input"] for r in records]
    listed = recorded[0]["tools"]
    assert listed[1]["headers"]["authorization"] == "[redacted]"  # masked as before
    for shown in recorded[1:4]:
        assert "tools" not in shown
        assert shown["tools_sha256"] == tools_sha256(listed)
    assert recorded[4]["tools"] == listed
    assert "tools_sha256" not in recorded[4]

    seen = ToolsSeen()
    for record, action in zip(records, [model_call, *calls, other], strict=True):
        seen.read(record)
        rebuilt = rebuild_input(record, tools=seen)
        assert rebuilt.input is not None
        assert rebuilt.input["request"]["tools"] == listed
        expected = orjson.loads(orjson.dumps(policy_input(action, ctx)))
        expected["request"]["tools"] = listed
        assert rebuilt.input == expected
    assert rebuild_input(records[1], tools=ToolsSeen()).skip == "tools_unseen"
    assert rebuild_input(records[1]).skip == "tools_unseen"


class _Declared(dict[str, Any]):
    """A declared tool the test can hold a weak reference to."""


async def test_the_log_does_not_keep_a_finished_requests_tools_alive(tmp_path: Path) -> None:
    """The log remembers which requests' tools it wrote only while the requests live: an
    agent's many large lists are not held after their requests are done."""
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path)))
    ctx = GuardContext(mode=Mode.ENFORCE)
    declared = _Declared(type="mcp", server_label="kb")
    request = RequestMeta("POST", "openai", "/v1/responses", {}, (declared,))
    action = dataclasses.replace(sample_action(), request=request)
    try:
        decision = dataclasses.replace(sample_decision(), input=policy_facts(action, ctx))
        await log.record_decision(action, decision)
        gone = weakref.ref(declared)
        del action, request, declared, decision
        gc.collect()
        assert gone() is None
    finally:
        await log.close()


def bundle(tmp_path: Path, rules: str) -> Path:
    """A candidate bundle of ``rules`` (the decision rule's bodies), else allow."""
    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / "policy.rego").write_text(
        f'package warden\nimport rego.v1\n{rules}else := {{"effect": "allow", "reason": "ok"}}\n'
    )
    return folder


async def record_all(audit: Path, decided: Iterable[tuple[Action, GuardContext, Decision]]) -> None:
    """Record each action's decision with its facts, one at a time (nothing kept alive)."""
    log = await AuditLog.open(AuditConfig(dir=str(audit)))
    try:
        for action, ctx, decision in decided:
            facts = policy_facts(action, ctx)
            await log.record_decision(action, dataclasses.replace(decision, input=facts))
    finally:
        await log.close()


def read_records(audit: Path) -> list[dict[str, Any]]:
    """The decision records of a log."""
    records = [orjson.loads(payload) for _, payload in iter_records(audit)]
    return [r for r in records if r["kind"] == "decision"]


async def test_a_call_is_replayed_however_many_tools_lists_came_between(tmp_path: Path) -> None:
    """A slow answer's call names its request's tools by digest; an agent sending 300
    requests with other lists meanwhile must not make replay skip it (it skipped it as
    ``tools_unseen`` once more than 256 lists followed, and a CI gate passed)."""

    def model_call(i: int) -> Action:
        hosted = ({"type": "mcp", "server_label": f"kb{i}"},)
        request = RequestMeta("POST", "openai", "/v1/responses", {}, hosted)
        return dataclasses.replace(
            sample_action(i), kind=ActionKind.LLM_CALL, tool=None, arguments=None, request=request
        )

    def traffic() -> Iterator[tuple[Action, GuardContext, Decision]]:
        ctx = GuardContext(mode=Mode.ENFORCE)
        slow = model_call(0)
        yield slow, ctx, sample_decision()
        for i in range(1, 301):  # each request done (and forgotten) before the next
            yield model_call(i), ctx, sample_decision()
        call = sample_action(arguments={"db": "prod"})
        yield (
            dataclasses.replace(call, tool="delete_db", request=slow.request),
            ctx,
            sample_decision(),
        )

    audit = tmp_path / "audit"
    await record_all(audit, traffic())
    [named] = [r for r in read_records(audit) if r["action"]["tool"] == "delete_db"]
    assert "tools_sha256" in named["decision"]["input"]
    candidate = bundle(
        tmp_path,
        'decision := {"effect": "deny", "reason": "no"} if { input.action.tool == "delete_db" }\n',
    )
    report = replay(audit, load_policy_set([candidate]), PolicyConfig())
    assert report.skipped == {}
    assert report.replayed == 302
    assert [(c.label, c.count) for c in report.changes] == [("allow→deny", 1)]
    assert report.changes[0].samples == (named["decision"]["id"],)


async def test_a_rule_that_only_changes_the_mode_changes_what_is_enforced(tmp_path: Path) -> None:
    """``{"effect": "deny", "mode": "observe"}`` lets the action through: replay reports
    ``deny→deny (observe)`` where it compared effects alone and saw no change. In an
    agent observed anyway, an effect change reads as before, without modes."""
    enforced, observed = GuardContext(mode=Mode.ENFORCE), GuardContext(mode=Mode.OBSERVE)
    drop = dataclasses.replace(sample_action(1), tool="delete_db")
    trial = dataclasses.replace(sample_action(2), tool="close_account")
    keep = sample_action(3)
    audit = tmp_path / "audit"
    await record_all(
        audit,
        [
            (drop, enforced, sample_decision(Effect.DENY)),
            (trial, observed, sample_decision(Effect.ALLOW, mode=Mode.OBSERVE)),
            (keep, enforced, sample_decision(Effect.DENY)),
        ],
    )
    candidate = bundle(
        tmp_path,
        'decision := {"effect": "deny", "reason": "no", "mode": "observe"} if {\n'
        '  input.action.tool == "delete_db"\n'
        '} else := {"effect": "deny", "reason": "no"} if {\n'
        '  input.action.tool in {"close_account", "issue_refund"}\n}\n',
    )
    report = replay(audit, load_policy_set([candidate]), PolicyConfig())
    assert report.skipped == {}
    changes = {c.label: c.as_dict() for c in report.changes}
    assert set(changes) == {"deny→deny (observe)", "allow→deny"}
    assert changes["deny→deny (observe)"]["before_mode"] == "enforce"
    assert changes["deny→deny (observe)"]["after_mode"] == "observe"
    assert changes["allow→deny"]["before_mode"] is None  # observe on both sides
    assert report.changed == 2
