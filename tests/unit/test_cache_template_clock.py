"""A clock read inside a template string turns the decision cache off, as a plain call does.

The scan for non-deterministic builtins reads source text with strings blanked;
a template string's ``{...}`` holds code, so ``$"{time.now_ns()}"`` must be
seen there too, or a time window the policy closes stays open for every input
already seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from warden.config import PolicyConfig
from warden.model import Effect
from warden.policy.bundle import Module
from warden.policy.cache import InputShape, analyse
from warden.policy.engine import PolicyEngine


def shape_of(*sources: str) -> InputShape:
    return analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)])


@pytest.mark.parametrize(
    "expr",
    [
        '$"{time.now_ns()}"',
        "$`{time.now_ns()}`",
        '$"at { time . now_ns() }"',
        # A quote and a "#" inside the braces: the text scan reads a comment from there on.
        '$"{concat("#", [format_int(time.now_ns(), 10)])}"',
        '$"{uuid.rfc4122("k")}"',
        '$"{rand.intn("k", 9)}"',
    ],
)
def test_a_clock_call_inside_a_template_string_is_not_deterministic(expr: str) -> None:
    assert not shape_of(f"package warden\n\nx := {expr}\n").deterministic


@pytest.mark.parametrize(
    "call",
    [
        "time.now_ns # a comment\n()",
        "time # a comment\n.now_ns()",
        '$"{time.now_ns # a comment\n()}"',
        "$`{time # a comment\n.now_ns()}`",
        '$"{concat("#", [format_int(time.now_ns # c\n(), 10)])}"',
    ],
)
def test_a_comment_between_a_calls_parts_hides_nothing_beside_a_template(call: str) -> None:
    # rego-cpp reads on past the comment, in a template string's braces too.
    shape = shape_of(f'package warden\n\nnow := {call}\n\ntag := $"{{input.action.tool}}"\n')
    assert not shape.deterministic
    assert shape.clock_module == "m0.rego"


def test_a_template_string_in_another_module_is_searched_too() -> None:
    shape = shape_of(
        'package warden\n\ndecision := {"effect": "allow"}\n',
        'package lib\n\nstamp := $"{time.now_ns()}"\n',
    )
    assert not shape.deterministic


def test_a_template_string_without_such_a_call_stays_cacheable() -> None:
    shape = shape_of('package warden\n\nx := $"{upper(input.action.tool)}"\n')
    assert shape.deterministic
    assert shape.whole_input


def test_a_clock_named_only_in_a_plain_string_stays_cacheable() -> None:
    # Without a template string, strings are still blanked: a name in one is no call.
    assert shape_of('package warden\n\nx := "time.now_ns()"\n').deterministic


def doc(tool: str) -> dict[str, Any]:
    return {"agent": {"id": "a"}, "action": {"tool": tool, "arguments": {"amount": 5}}}


async def test_the_engine_evaluates_a_template_clock_policy_every_time(tmp_path: Path) -> None:
    root = tmp_path / "tpl"
    root.mkdir()
    (root / "policy.rego").write_text(
        "package warden\n\nimport rego.v1\n\n"
        'decision := {"effect": "allow", "reason": $"evaluated at {time.now_ns()}"}\n'
    )
    engine = await PolicyEngine.start(PolicyConfig(bundles=(str(root),), workers=1, watch=False))
    try:
        assert engine.ready, engine.last_error
        first = await engine.evaluate(doc("issue_refund"))
        second = await engine.evaluate(doc("issue_refund"))
        assert first.effect is second.effect is Effect.ALLOW
        assert not second.cached
        assert first.reason != second.reason  # the clock was read again
    finally:
        await engine.close()


async def test_readyz_says_which_module_turned_the_cache_off(tmp_path: Path) -> None:
    root = tmp_path / "tpl"
    root.mkdir()
    (root / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
    )
    (root / "stamp.rego").write_text(
        'package warden\n\nimport rego.v1\n\nnow := time.now_ns # c\n()\n\ntag := $"{now}"\n'
    )
    engine = await PolicyEngine.start(PolicyConfig(bundles=(str(root),), workers=1, watch=False))
    try:
        assert engine.ready, engine.last_error
        cache = engine.status()["cache"]
        assert not cache["enabled"]
        assert cache["off_because"] == "module stamp.rego calls a clock/random builtin"
    finally:
        await engine.close()


async def test_readyz_says_nothing_while_decisions_are_cached(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    (root / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
    )
    engine = await PolicyEngine.start(PolicyConfig(bundles=(str(root),), workers=1, watch=False))
    try:
        assert engine.ready, engine.last_error
        cache = engine.status()["cache"]
        assert cache["enabled"]
        assert cache["off_because"] is None
    finally:
        await engine.close()
