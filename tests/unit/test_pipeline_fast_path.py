"""The decision path's shortcuts decide exactly what the long way decides."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    Obligations,
    RequestMeta,
    Stage,
    new_id,
)
from warden.pipeline import MAX_INPUT_DEPTH, GuardContext, input_problem, policy_input
from warden.pipeline import _action_fits as action_fits
from warden.pipeline import _timed as timed

_CTX = GuardContext(mode=Mode.ENFORCE)

# Numbers at and past every bound input_problem has, text it cannot encode, keys that are not text.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, True]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.sampled_from(["\ud800", "ok", ""]),
)
_keys = st.one_of(st.text(max_size=3), st.sampled_from(["\udfff"]))
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.dictionaries(_keys, inner, max_size=3),
        st.dictionaries(st.integers(0, 3), inner, max_size=1),
    ),
    max_leaves=12,
)


def _nest(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def _action(
    arguments: Any = None, context: Any = None, claims: Any = None, tool: str = "refund"
) -> Action:
    return Action(
        action_id="act_1",
        agent=Agent("bot", "1", claims=claims if claims is not None else {}),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool=tool,
        arguments=arguments,
        context=context if context is not None else {},
    )


@settings(max_examples=400, deadline=None)
@given(
    arguments=st.one_of(st.none(), st.dictionaries(_keys, _json, max_size=3)),
    context=st.dictionaries(_keys, _json, max_size=2),
    claims=st.dictionaries(_keys, _json, max_size=2),
    tool=st.sampled_from(["refund", "\ud83d", "t"]),
    answers=st.one_of(st.none(), st.dictionaries(_keys, _json, max_size=2)),
    meta=st.one_of(st.none(), st.dictionaries(_keys, _json, max_size=2)),
)
def test_the_fast_check_agrees_with_the_full_walk(
    arguments: Any, context: Any, claims: Any, tool: str, answers: Any, meta: Any
) -> None:
    act = dataclasses.replace(
        _action(arguments, context, claims, tool), input_responses=answers, meta=meta
    )
    assert action_fits(act) == (input_problem(policy_input(act, _CTX)) is None)


@pytest.mark.parametrize(
    ("part", "levels"),
    # input (1) > action (2) > arguments (3); input > agent > claims (3); input > context (2)
    [("arguments", 3), ("claims", 3), ("context", 2), ("input_responses", 3), ("meta", 3)],
)
def test_the_depth_bound_is_where_the_full_walk_puts_it(part: str, levels: int) -> None:
    def act(depth: int) -> Action:
        # The part's own dict is one level; the list under "k" nests the rest.
        value = {"k": _nest(depth - levels)}
        if part == "arguments":
            return _action(arguments=value)
        if part == "input_responses":  # an MCP retry's answers: input > action > them
            return dataclasses.replace(_action(), input_responses=value)
        if part == "meta":  # an MCP request's _meta, beside them
            return dataclasses.replace(_action(), meta=value)
        return _action(context=value) if part == "context" else _action(claims=value)

    fits, too_deep = act(MAX_INPUT_DEPTH), act(MAX_INPUT_DEPTH + 1)
    assert action_fits(fits)
    assert input_problem(policy_input(fits, _CTX)) is None
    assert not action_fits(too_deep)
    assert "nests deeper" in (input_problem(policy_input(too_deep, _CTX)) or "")


def test_odd_numbers_are_still_caught() -> None:
    class Big(int):
        pass

    assert not action_fits(_action({"n": Big(2**64)}))
    assert not action_fits(_action({"n": math.nan}))
    assert action_fits(_action({"n": Big(5), "b": True, "f": 1.5}))


def test_timing_a_decision_keeps_every_field() -> None:
    decision = Decision(
        decision_id="dec_1",
        effect=Effect.REQUIRE_APPROVAL,
        reasons=("a", "b"),
        mode=Mode.OBSERVE,
        guard="policy",
        bundle_revision="r1",
        obligations=Obligations(redact=("x",), approvers=("ops",), hold="defer"),
        error="policy_error",
        elapsed_us=1,
        input={"mode": "observe"},
    )
    assert timed(decision, 42) == dataclasses.replace(decision, elapsed_us=42)
    facts = {"mode": "enforce"}
    assert timed(decision, 42, facts) == dataclasses.replace(decision, elapsed_us=42, input=facts)
    # A field added to Decision must be added to _timed too.
    assert [f.name for f in dataclasses.fields(Decision)][-1] == "input"
    assert len(dataclasses.fields(Decision)) == 10


_FORKED_IDS = """
import os
from warden.model import new_id
new_id("x")  # the parent has a block of tails buffered
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, new_id("x").encode())
    os._exit(0)
os.close(write)
child = os.read(read, 64).decode()
os.waitpid(pid, 0)
print(child.rsplit("_", 1)[1], new_id("x").rsplit("_", 1)[1])
"""


def test_ids_are_unique_and_a_forked_child_draws_its_own() -> None:
    ids = {new_id("x").rsplit("_", 1)[1] for _ in range(5000)}
    assert len(ids) == 5000
    # In a fresh single-threaded interpreter: forking this test process could deadlock.
    out = subprocess.run(
        [sys.executable, "-c", _FORKED_IDS], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(out) == 2
    assert all(len(tail) == 12 for tail in out)
    assert out[0] != out[1]


def test_a_problem_names_where_it_is_without_naming_personal_keys() -> None:
    # Reasons are recorded in clear, where erasing a customer cannot reach them.
    doc = {"action": {"arguments": {"balances": {"ann.smith@example.com": float("nan")}}}}
    problem = input_problem(doc)
    assert problem == "input.action.arguments.balances.<key> is nan, which JSON cannot carry"
    assert input_problem({"action": {"arguments": {"n": 2**70}}}) == (
        "input.action.arguments.n is an integer past 64 bits"
    )
