"""Which ``redact`` paths Warden can mask, and what it says of those it cannot.

The context (``X-Warden-Context-*``) is masked like the arguments; a path that names
any other part of the input document is refused by ``warden policy check`` and
``warden policy test``, recorded as not applied and logged once.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.unit.policy_authoring_samples import write_bundle
from warden.audit.record import (
    REDACTED,
    action_body,
    decision_body,
    outcome_body,
    redact_target,
    unmaskable_redactions,
)
from warden.config import PolicyConfig
from warden.model import Effect, Mode, Outcome, RequestMeta
from warden.pipeline import GuardContext
from warden.policy.authoring import check_policy, compare_decision, lint_module
from warden.policy.authoring.tables import enforced
from warden.policy.engine import PolicyResult
from warden.policy.guard import PolicyGuard
from warden.policy.metrics import PolicyMetrics
from warden.testing.audit import sample_action, sample_decision

CONTEXT = {"customer_email": "ann@example.com", "ticket": "T-7", "api_key": "sk-live-1"}


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("action.arguments.email", ("arguments", "email")),
        ("input.action.arguments.email", ("arguments", "email")),
        ("arguments.email", ("arguments", "email")),
        ("email", ("arguments", "email")),
        ("action.email", ("arguments", "email")),
        ("tags.1", ("arguments", "tags.1")),
        ("action.arguments", ("arguments", "")),
        ("context.customer_email", ("context", "customer_email")),
        ("input.context.customer.email", ("context", "customer.email")),
        ("context", ("context", "")),
        ("input.context", ("context", "")),
        ("action.input_responses.ask.content.email", ("input_responses", "ask.content.email")),
        ("input_responses", ("input_responses", "")),
        ("result.email", ("result", "email")),
        ("result", ("result", "")),
    ],
)
def test_paths_warden_masks(path: str, target: tuple[str, str]) -> None:
    assert redact_target(path) == target
    assert unmaskable_redactions([path]) == []


@pytest.mark.parametrize(
    "path",
    [
        "agent.claims.email",
        "input.agent.claims.email",
        "session.id",
        "request.tools",
        "history",
        "budget",
        "mode",
        "action.tool",
        "action.path",
        "action.meta.progressToken",
        "input.action",
        "action",
        "",
        "action.arguments.",
        "context..email",
        # The ext_authz door's OPA-Envoy keys: the request as that door shows it.
        "parsed_body.email",
        "input.parsed_body.customer.email",
        "parsed_path.1",
        "parsed_query.email.0",
        "attributes.request.http.headers.x-customer-email",
        "truncated_body",
        "version.encoding",
        "source_principal",
    ],
)
def test_paths_warden_cannot_mask(path: str) -> None:
    assert redact_target(path) is None
    assert unmaskable_redactions([path, path]) == [path]


def test_a_context_path_is_masked_in_the_record() -> None:
    action = _action(CONTEXT)
    body = action_body(action, ("action.arguments.email", "context.customer_email"))
    assert body["context"] == {
        "customer_email": REDACTED,
        "ticket": "T-7",
        "api_key": REDACTED,  # a credential, as before
    }
    assert body["arguments"] == {"customer_id": "C-1", "email": REDACTED}
    assert body["redacted"] == ["email", "context.customer_email"]
    assert "ann@example.com" not in orjson.dumps(body).decode()
    # The action itself is left as it was: the policy and the tool see the real value.
    assert action.context["customer_email"] == "ann@example.com"


def test_a_path_inside_a_nested_context_value() -> None:
    context = {"customer": {"email": "ann@example.com", "tier": "gold"}}
    body = action_body(_action(context), ("input.context.customer.email",))
    assert body["context"] == {"customer": {"email": REDACTED, "tier": "gold"}}
    assert body["redacted"] == ["context.customer.email"]


def test_the_whole_context_keeps_its_keys() -> None:
    body = action_body(_action(CONTEXT), ("context",))
    assert body["context"] == dict.fromkeys(CONTEXT, REDACTED)
    assert body["redacted"] == ["context"]
    assert action_body(_action({}), ("context",))["redacted"] == []


def test_a_context_path_is_no_argument_path() -> None:
    """Before, ``context.x`` was read as an argument named ``context``: it never matched."""
    action = _action(CONTEXT, {"context": {"customer_email": "kept@example.com"}})
    body = action_body(action, ("context.customer_email",))
    assert body["arguments"] == {"context": {"customer_email": "kept@example.com"}}
    assert body["context"]["customer_email"] == REDACTED
    hidden = action_body(action, ("action.arguments.context.customer_email",))
    assert hidden["arguments"] == {"context": {"customer_email": REDACTED}}


def test_a_context_path_leaves_a_routed_calls_path_alone() -> None:
    """Only hidden arguments may be spelled in an HTTP tool call's path."""
    action = _action(CONTEXT, protocol="http")
    body = action_body(action, ("context.customer_email",))
    assert body["request"]["path"] == "/customers/C-1"
    assert body["redacted"] == ["context.customer_email"]


def test_an_approval_shows_no_context_and_lists_no_context_path() -> None:
    body = action_body(_action(CONTEXT), ("email", "context.customer_email"), context=False)
    assert body["context"] is None
    assert body["redacted"] == ["email"]


def test_the_decision_record_says_which_paths_were_not_applied() -> None:
    redact = ("action.arguments.email", "agent.claims.email", "session.id", "agent.claims.email")
    body = decision_body(sample_decision(redact=redact))
    assert body["obligations"]["redact"] == list(redact)
    assert body["obligations"]["redact_not_applied"] == ["agent.claims.email", "session.id"]
    # Every other record keeps its shape.
    plain = decision_body(sample_decision(redact=("email", "context.customer_email")))
    assert "redact_not_applied" not in plain["obligations"]


def test_an_outcome_ignores_context_paths() -> None:
    result = '{"email": "ann@example.com"}'
    body = outcome_body(Outcome(status=200, result=result), ("context.customer_email",))
    assert body["result"] == result
    assert body["redacted"] == []


# -- warden policy check -----------------------------------------------------------------

LITERALS = """package warden

import rego.v1

# "redact": ["agent.claims.email"] in a comment is no list
decision := {"effect": "allow", "redact": ["action.arguments.email", "agent.claims.email",
    sprintf("session.%s", ["id"]), `input.request.tools`]} if {
    input.action.tool == "update_email"
}

redact := ["context.customer_email", "action.tool"]

redact contains "history"
"""


def test_the_lint_flags_literal_paths_warden_cannot_mask() -> None:
    found = [f for f in lint_module("p.rego", LITERALS) if "redact path" in f.message]
    assert [(f.line, f.severity, f.message.split('"')[1]) for f in found] == [
        (6, "error", "agent.claims.email"),
        (7, "error", "input.request.tools"),
        (11, "error", "action.tool"),
        (13, "error", "history"),
    ]
    assert "context.customer_email" in found[0].hint


def test_the_lint_passes_paths_warden_masks() -> None:
    source = 'package warden\nd := {"redact": ["context.customer_email", "email", "result"]}\n'
    assert lint_module("p.rego", source) == []


POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "ok"}

decision := {"effect": "allow", "reason": "noted", "redact": paths} if {
    input.action.tool == "update_email"
    paths := ["action.arguments.email", sprintf("agent.claims.%s", ["email"])]
}
"""
TABLE = """cases:
  - name: the email is masked
    input:
      action: {kind: tool_call, tool: update_email, arguments: {email: a@example.com}}
    expect: {effect: allow, redact: [action.arguments.email, agent.claims.email]}
"""


def test_check_flags_a_table_that_expects_a_path_warden_cannot_mask(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, {"policy.rego": POLICY, "decisions/email.yaml": TABLE})
    found = [f for f in check_policy([bundle]) if "redact path" in f.message]
    assert len(found) == 1
    assert found[0].file.endswith("decisions/email.yaml")
    assert found[0].line == 2
    assert found[0].severity == "error"
    assert "agent.claims.email" in found[0].message
    assert "the email is masked" in found[0].message


# -- warden policy test ------------------------------------------------------------------


def _decided(redact: list[str]) -> str:
    return orjson.dumps({"expressions": [{"effect": "allow", "redact": redact}]}).decode()


def test_a_case_expecting_a_path_warden_cannot_mask_fails() -> None:
    redact = ["action.arguments.email", "agent.claims.email"]
    proxy = enforced(_decided(redact), {})
    assert proxy.unmaskable == ("agent.claims.email",)
    problems = compare_decision(
        {"effect": "allow", "redact": redact},
        {"effect": "allow", "redact": redact},
        undefined=False,
        proxy=proxy,
    )
    assert len(problems) == 1
    assert '"agent.claims.email"' in problems[0]
    assert "cannot mask" in problems[0]


def test_a_case_with_paths_warden_masks_passes() -> None:
    redact = ["action.arguments.email", "context.customer_email"]
    expect: dict[str, Any] = {"effect": "allow", "redact": redact}
    result = {"effect": "allow", "redact": redact}
    proxy = enforced(_decided(redact), {})
    assert compare_decision(expect, result, undefined=False, proxy=proxy) == []


# -- at run time ---------------------------------------------------------------------------


def test_the_guard_warns_once_per_path_and_revision(caplog: pytest.LogCaptureFixture) -> None:
    guard = PolicyGuard(None, PolicyConfig(), metrics=PolicyMetrics())  # type: ignore[arg-type]
    ctx = GuardContext(mode=Mode.ENFORCE)
    redact = ("action.arguments.email", "agent.claims.email")
    with caplog.at_level(logging.WARNING, logger="warden.policy"):
        for revision in ("rev-warn-1", "rev-warn-1", "rev-warn-2"):
            result = PolicyResult(effect=Effect.ALLOW, redact=redact, revision=revision)
            decision = guard.decide(result, ctx)
            assert decision.obligations.redact == redact  # recorded as the policy gave it
        other = PolicyResult(
            effect=Effect.DENY, redact=("agent.claims.email",), revision="rev-warn-1"
        )
        guard.decide(other, ctx)
    lines = [r.getMessage() for r in caplog.records if "agent.claims.email" in r.getMessage()]
    assert len(lines) == 2
    assert "rev-warn-1" in lines[0]
    assert "rev-warn-2" in lines[1]
    assert not any("action.arguments.email" in line for line in lines)


def _action(
    context: dict[str, Any],
    arguments: dict[str, Any] | None = None,
    *,
    protocol: str = "openai.chat",
) -> Any:
    action = sample_action(
        arguments=arguments or {"customer_id": "C-1", "email": "new@example.com"}
    )
    request = RequestMeta("GET", "crm", "/customers/C-1") if protocol == "http" else action.request
    return dataclasses.replace(action, context=context, protocol=protocol, request=request)


# -- failing closed: a list Warden could not get, a path a result does not have ---------


def test_a_result_path_that_finds_nothing_hides_the_whole_result() -> None:
    # An MCP result kept whole: the value the policy names as result.email is under
    # structuredContent, where its path does not look.
    whole = orjson.dumps(
        {
            "content": [{"type": "text", "text": "Customer updated"}],
            "structuredContent": {"email": "ann@example.com"},
        }
    ).decode()
    body = outcome_body(Outcome(result=whole), ["result.email"])
    assert body["result"] == "[redacted]"
    assert body["redacted"] == ["result"]
    # A path that finds its field hides that field alone.
    found = outcome_body(Outcome(result='{"email": "ann@example.com", "n": 1}'), ["result.email"])
    assert orjson.loads(found["result"]) == {"email": "[redacted]", "n": 1}
