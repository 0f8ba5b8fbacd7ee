"""Redaction applies to every record of an action, whoever decided it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from warden.audit import AuditLog, arguments_sha256, keyed_digest
from warden.audit.record import action_body
from warden.audit.redaction import REDACT_ALL, resolve
from warden.audit.verify import iter_records
from warden.config import AuditConfig
from warden.model import Action, Decision, Effect, Mode, Obligations, Outcome, new_id
from warden.pipeline import GuardContext, Pipeline
from warden.testing.audit import sample_action, sample_decision

EMAIL = "ann@example.com"
ARGS = {"customer_id": "C-1", "email": EMAIL, "amount": 5}


def decided_by(guard: str, *, redact: tuple[str, ...] = (), error: str | None = None) -> Decision:
    return dataclasses.replace(
        sample_decision(Effect.DENY),
        guard=guard,
        error=error,
        obligations=Obligations(redact=redact),
    )


class Asked:
    """Stands in for the policy when asked for redactions; counts the questions."""

    def __init__(self, answer: tuple[str, ...] | None | Exception) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> tuple[str, ...] | None:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_the_policys_own_list_stands() -> None:
    ask = Asked(("other",))
    decision = decided_by("policy", redact=("email",))
    assert await resolve(decision, ask) is decision
    approved = decided_by("approval", redact=())
    assert await resolve(approved, ask) is approved
    assert ask.calls == 0


@pytest.mark.parametrize("guard", ["kill_switch", "budget", "default", "some_new_stage"])
async def test_another_stage_asks_the_policy(guard: str) -> None:
    ask = Asked(("action.arguments.email",))
    resolved = await resolve(decided_by(guard), ask)
    assert resolved.obligations.redact == ("action.arguments.email",)
    assert ask.calls == 1
    # The policy answers "nothing to redact": that is an answer too.
    assert (await resolve(decided_by(guard), Asked(()))).obligations.redact == ()


@pytest.mark.parametrize(
    "answer", [None, RuntimeError("engine closed")], ids=["cannot answer", "raises"]
)
async def test_no_answer_redacts_everything(answer: None | Exception) -> None:
    resolved = await resolve(decided_by("kill_switch"), Asked(answer))
    assert resolved.obligations.redact == REDACT_ALL
    assert (await resolve(decided_by("budget"), None)).obligations.redact == REDACT_ALL


@pytest.mark.parametrize("guard", ["validation", "fallback"])
async def test_when_the_policy_could_not_see_or_answer_nothing_is_asked(guard: str) -> None:
    ask = Asked(())
    resolved = await resolve(decided_by(guard, error="policy_timeout"), ask)
    assert resolved.obligations.redact == REDACT_ALL
    assert ask.calls == 0


# -- through the pipeline and the real log ---------------------------------------------------


class StopEverything:
    """A first stage that decides before the policy, as a kill switch does."""

    name = "kill_switch"

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        return Decision(new_id("dec"), Effect.DENY, ("stopped",), Mode.ENFORCE, "kill_switch")


class PolicyRedactions:
    """The policy's part that the pipeline asks when another stage decided."""

    name = "policy"

    def __init__(self, answer: tuple[str, ...] | None) -> None:
        self.answer = answer

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        raise AssertionError("the policy stage runs after the deciding one")

    async def redactions(self, action: Action, ctx: GuardContext) -> tuple[str, ...] | None:
        return self.answer


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[AuditLog]:
    opened = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    yield opened
    await opened.close()


def pipeline(log: AuditLog, *guards: Any) -> Pipeline:
    return Pipeline(list(guards), log, mode_for=lambda _a: Mode.ENFORCE, risk_of=lambda _t: "write")


def stored(log: AuditLog) -> tuple[list[dict[str, Any]], bytes]:
    raw = [payload for _, payload in iter_records(log.directory)]
    return [orjson.loads(p) for p in raw], b"".join(raw)


async def test_a_kill_switch_decision_redacts_what_the_policy_names(log: AuditLog) -> None:
    action = sample_action(arguments=ARGS)
    p = pipeline(log, StopEverything(), PolicyRedactions(("action.arguments.email",)))
    decision = await p.decide(action)
    assert decision.guard == "kill_switch"
    (record,), raw = stored(log)
    assert record["action"]["arguments"] == {**ARGS, "email": "[redacted]"}
    assert record["decision"]["obligations"]["redact"] == ["action.arguments.email"]
    assert EMAIL.encode() not in raw


@pytest.mark.parametrize("policy", [None, PolicyRedactions(None)], ids=["no policy", "no answer"])
async def test_without_a_redaction_list_no_argument_is_written(
    log: AuditLog, policy: PolicyRedactions | None
) -> None:
    action = sample_action(arguments=ARGS)
    guards = [StopEverything()] + ([policy] if policy is not None else [])
    decision = await pipeline(log, *guards).decide(action)
    await log.record_outcome(action, decision.decision_id, Outcome(status=200, result=EMAIL))
    (record, outcome), raw = stored(log)
    assert record["action"]["arguments"] == "[redacted]"
    # Keyed: a plain SHA-256 of the hidden values would give them away to guessing.
    assert record["action"]["arguments_sha256"] == keyed_digest(
        log.directory, arguments_sha256(ARGS)
    )
    assert record["action"]["arguments_sha256"] != arguments_sha256(ARGS)
    assert record["action"]["argument_keys"] == sorted(ARGS)
    assert outcome["outcome"]["result"] == "[redacted]"
    assert EMAIL.encode() not in raw


async def test_unparseable_arguments_are_never_written(log: AuditLog) -> None:
    text = '{"email": "' + EMAIL + '", '
    action = dataclasses.replace(sample_action(), arguments=None, raw_arguments=text)
    decision = await pipeline(log, PolicyRedactions(())).decide(action)
    assert decision.guard == "validation"
    (record,), raw = stored(log)
    assert record["action"]["raw_arguments"] == "[redacted]"
    assert isinstance(record["action"]["arguments_sha256"], str)
    assert EMAIL.encode() not in raw


async def test_an_outcome_of_an_unknown_decision_keeps_only_the_results_hash(
    log: AuditLog,
) -> None:
    # Recorded by an earlier process (or forgotten): its redactions are unknown.
    await log.record_outcome(sample_action(), "dec_from_before", Outcome(status=200, result=EMAIL))
    known = sample_decision()
    await log.record_decision(sample_action(), known)
    await log.record_outcome(sample_action(), known.decision_id, Outcome(result="fine"))
    (unknown, _, shown), raw = stored(log)
    assert unknown["outcome"]["result"] == "[redacted]"
    assert unknown["outcome"]["result_sha256"] is not None
    assert shown["outcome"]["result"] == "fine"
    assert EMAIL.encode() not in raw


ANSWERS = {"ask": {"action": "accept", "content": {"email": EMAIL, "api_key": "sk-live-SECRET9"}}}


def test_an_mcp_retrys_answers_are_shown_masked_and_redacted_where_the_policy_says() -> None:
    action = dataclasses.replace(sample_action(arguments=ARGS), input_responses=ANSWERS)
    shown = action_body(action, ("action.input_responses.ask.content.email",))
    assert shown["input_responses"]["ask"]["content"]["email"] == "[redacted]"
    # The policy's path as written; the masked credential as a pointer, so it is named too.
    assert shown["redacted"] == [
        "input_responses.ask.content.email",
        "input_responses/ask/content/api_key",
    ]
    assert shown["arguments"] == ARGS  # the answers' paths name no argument
    assert b"SECRET9" not in orjson.dumps(shown)  # credentials masked, as in arguments
    whole = action_body(action, ("input.action.input_responses",))
    assert (whole["input_responses"], whole["redacted"]) == ("[redacted]", ["input_responses"])
    # Only a retry has them: every other record keeps its shape.
    assert "input_responses" not in action_body(sample_action(arguments=ARGS))


async def test_answers_are_hidden_when_the_policy_could_not_say_what_to_hide(
    log: AuditLog,
) -> None:
    action = dataclasses.replace(sample_action(arguments=ARGS), input_responses=ANSWERS)
    decision = await pipeline(log, StopEverything(), PolicyRedactions(None)).decide(action)
    assert "input_responses" in decision.obligations.redact
    (record,), raw = stored(log)
    assert record["action"]["input_responses"] == "[redacted]"
    assert EMAIL.encode() not in raw
