"""Batch evaluation: the worker's ``b"B"`` request, ``PolicyEngine.evaluate_batch``, the challenger.

The challenger sends many inputs to one worker in one request, so the proxy's
event loop pays one round trip per batch rather than per input. A batch keeps
its inputs' order; an input the engine refuses fails alone; a batch that uses
up its budget (the deadline once per input) or crashes its worker is asked
again one input at a time, so only the input at fault fails, and the pool
recovers.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from warden.config import ChallengerConfig, PolicyConfig
from warden.errors import Overloaded
from warden.model import Decision, Effect, Mode
from warden.policy.challenger import Challenger
from warden.policy.engine import PolicyEngine, PolicyResult, interpret_output
from warden.policy.worker import (
    MSG_BATCH,
    MSG_BATCH_RESULT,
    MSG_ERROR,
    MSG_EVAL,
    MSG_QUIT,
    MSG_RESULT,
    Evaluator,
    frame,
    read_frame,
)

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {"effect": "deny", "reason": "denied"} if input.action.tool == "deny"

decision := {"effect": "require_approval", "reason": "ask"} if input.action.tool == "ask"

decision := {"effect": "deny", "reason": "never"} if {
\tinput.action.tool == "spin"
\tsome a in numbers.range(1, input.action.arguments.n)
\tsome b in numbers.range(1, input.action.arguments.n)
\ta * b == -1
}
"""
QUERY = "data.warden.decision"
# Worker CPU time for one "spin" input of n=150: about 60 ms (a few times more on a slow machine).
SPIN_N = 150
DEADLINE_MS = 150


def doc(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"agent": {"id": "a"}, "action": {"tool": tool, "arguments": arguments}}


def write_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "policy.rego").write_text(POLICY)
    return root


async def start_engine(tmp_path: Path, **overrides: Any) -> PolicyEngine:
    queue_timeout_s = overrides.pop("queue_timeout_s", 30)
    settings: dict[str, Any] = {"workers": 1, "deadline_ms": DEADLINE_MS, "watch": False}
    settings.update(overrides)
    config = PolicyConfig(bundles=(str(write_bundle(tmp_path)),), **settings)
    engine = await PolicyEngine.start(config, queue_timeout_s=queue_timeout_s)
    assert engine.ready, engine.last_error
    return engine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[PolicyEngine]:
    eng = await start_engine(tmp_path)
    yield eng
    await eng.close()


async def wait_for_pool(engine: PolicyEngine, workers: int = 1) -> None:
    for _ in range(400):
        if engine.status()["workers_alive"] >= workers:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the pool did not recover")


# -- the wire: a real worker process ------------------------------------------------------------


@pytest.fixture
def worker() -> Iterator[socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "warden.policy.worker", str(child.fileno())],
        pass_fds=(child.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    child.close()
    parent.settimeout(30)
    init = {"modules": [["policy.rego", POLICY]], "data": {}, "query": QUERY, "label": "t"}
    parent.sendall(frame(orjson.dumps(init)))
    hello = read_frame(parent)
    assert hello is not None
    assert orjson.loads(hello)["ok"] is True
    try:
        yield parent
    finally:
        parent.sendall(frame(MSG_QUIT))
        parent.close()
        proc.wait(10)


def ask(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(frame(message))
    reply = read_frame(sock)
    assert reply is not None
    return reply


def effect_of(text: str) -> str:
    return str(orjson.loads(text)["expressions"][0]["effect"])


def test_worker_answers_a_batch_in_order_with_one_entry_per_input(worker: socket.socket) -> None:
    # Deeper than the worker's Python recursion limit, shallower than JSON's: the
    # engine refuses this one input, the others in the batch are answered.
    deep = b"[" * 1010 + b"]" * 1010
    body = b"[" + b",".join([orjson.dumps(doc("deny")), deep, orjson.dumps(doc("ask"))]) + b"]"
    reply = ask(worker, MSG_BATCH + body)
    assert reply[:1] == MSG_BATCH_RESULT
    first, refused, last = orjson.loads(reply[1:])
    assert effect_of(first) == "deny"
    assert isinstance(refused, dict)
    assert refused["error"].startswith("input rejected:")
    assert effect_of(last) == "require_approval"
    # An empty batch has an empty answer; the single-input request is unchanged.
    assert ask(worker, MSG_BATCH + b"[]") == MSG_BATCH_RESULT + b"[]"
    single = ask(worker, MSG_EVAL + orjson.dumps(doc("other")))
    assert single[:1] == MSG_RESULT
    assert effect_of(single[1:].decode()) == "allow"


def test_worker_refuses_a_batch_that_is_not_an_array(worker: socket.socket) -> None:
    reply = ask(worker, MSG_BATCH + orjson.dumps(doc("deny")))
    assert reply[:1] == MSG_ERROR
    assert b"not a JSON array" in reply
    reply = ask(worker, MSG_BATCH + b"[{")
    assert reply[:1] == MSG_ERROR
    # The worker goes on serving.
    assert ask(worker, MSG_BATCH + b"[{}]")[:1] == MSG_BATCH_RESULT


# -- PolicyEngine.evaluate_batch ----------------------------------------------------------------


async def test_batch_results_keep_the_inputs_order(engine: PolicyEngine) -> None:
    tools = ["deny", "ask", "other", "ask", "deny", "deny", "other"]
    results = await engine.evaluate_batch([doc(t) for t in tools])
    expected = {"deny": Effect.DENY, "ask": Effect.REQUIRE_APPROVAL, "other": Effect.ALLOW}
    assert [r.effect for r in results] == [expected[t] for t in tools]
    assert [r.reason for r in results][:3] == ["denied", "ask", "fine"]
    assert all(r.error is None and not r.cached for r in results)
    assert {r.revision for r in results} == {engine.revision}
    # Same answers as one at a time.
    for tool, batched in zip(tools, results, strict=True):
        single = await engine.evaluate(doc(tool))
        assert (single.effect, single.reasons) == (batched.effect, batched.reasons)
    assert await engine.evaluate_batch([]) == []


async def test_inputs_the_policy_cannot_tell_apart_are_evaluated_once(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = engine._active.pool  # type: ignore[union-attr]
    sizes: list[int] = []
    evaluate = pool.evaluate

    async def counting(body: bytes, tag: Any = None, **kwargs: Any) -> bytes:
        sizes.append(len(orjson.loads(body)))
        return await evaluate(body, tag, **kwargs)

    monkeypatch.setattr(pool, "evaluate", counting)
    # The policy reads only action.tool: these differ in nothing it reads.
    other_agent = {**doc("deny"), "agent": {"id": "b"}}
    batch = [doc("deny"), doc("ask"), other_agent, doc("ask"), doc("other")]
    results = await engine.evaluate_batch(batch)
    assert sizes == [3]
    assert [r.effect for r in results] == [
        Effect.DENY,
        Effect.REQUIRE_APPROVAL,
        Effect.DENY,
        Effect.REQUIRE_APPROVAL,
        Effect.ALLOW,
    ]
    # A later batch is answered from the decision cache: nothing new is sent.
    again = await engine.evaluate_batch([doc("ask"), other_agent, doc("new")])
    assert sizes == [3, 1]
    assert [r.cached for r in again] == [True, True, False]
    assert [r.effect for r in again] == [Effect.REQUIRE_APPROVAL, Effect.DENY, Effect.ALLOW]


async def test_a_policy_that_reads_the_clock_evaluates_every_input(tmp_path: Path) -> None:
    root = tmp_path / "clock"
    root.mkdir()
    (root / "policy.rego").write_text(
        "package warden\n\nimport rego.v1\n\n"
        'decision := {"effect": "allow", "reason": sprintf("%d", [time.now_ns()])}\n'
    )
    config = PolicyConfig(bundles=(str(root),), workers=1, watch=False)
    engine = await PolicyEngine.start(config)
    try:
        results = await engine.evaluate_batch([doc("read"), doc("read")])
        assert all(r.effect is Effect.ALLOW for r in results)
        assert results[0].reason != results[1].reason
    finally:
        await engine.close()


async def test_a_string_holding_nul_is_read_with_a_replacement_not_cut_short(
    engine: PolicyEngine,
) -> None:
    # The engine takes C strings: "deny\0x" would read as "deny" in one place and as
    # something else to the tool. It reads NUL as U+FFFD, in a key or a value (the
    # core denies an action whose own arguments hold NUL before any policy runs).
    cut = doc("deny\x00-not-really")
    results = await engine.evaluate_batch([cut, doc("deny")])
    assert (results[0].error, results[0].effect) == (None, Effect.ALLOW)  # not "deny"
    assert results[1].effect is Effect.DENY
    evaluator = Evaluator([("p.rego", "package p\n\nx := input\n")], {}, "data.p.x")
    seen = evaluator.evaluate({"amount\x00": 5, "amount": 5000})
    assert '"amount\ufffd":5' in seen.replace(" ", "")
    assert '"amount":5000' in seen.replace(" ", "")


def test_input_strings_reach_the_policy_as_the_agent_wrote_them() -> None:
    # The engine keeps strings as JSON text: unescaped, a quote in an argument would
    # end the string in the result and add keys of the agent's choosing to it. Control
    # characters stay raw, as the builtins read them (a tab is whitespace to a regex);
    # rego-cpp counts a quote or backslash as the two characters it keeps.
    policy = """package p

import rego.v1

decision := {"effect": "deny", "reason": sprintf("%v is blocked", [input.cmd])}

facts := {"quote": input.s == "a\\"b", "system": startswith(input.s, "C:\\\\Win"),
	"drop": regex.match(`drop\\s+table`, input.s), "size": count(input.s),
	"key": object.keys(input.o)}
"""
    evaluator = Evaluator([("p.rego", policy)], {}, "data.p.decision")
    for injected in (
        'rm -rf /srv #", "effect": "allow", "z": "',
        'rm -rf /srv\n#", "effect": "allow',
    ):
        result = interpret_output(evaluator.evaluate({"cmd": injected}))
        assert (result.effect, result.reasons) == (Effect.DENY, (f"{injected} is blocked",))
    facts = Evaluator([("p.rego", policy)], {}, "data.p.facts")
    for text, expected in (
        ('a"b', {"quote": True, "system": False, "drop": False, "size": 4}),
        ("C:\\Windows", {"quote": False, "system": True, "drop": False, "size": 11}),
        ("drop\ttable", {"quote": False, "system": False, "drop": True, "size": 10}),
        ("C:\\\\Windows", {"quote": False, "system": False, "drop": False, "size": 13}),
    ):
        [got] = orjson.loads(facts.evaluate({"s": text, "o": {'k"': 1}}))["expressions"]
        assert got == {**expected, "key": ['k"']}, text


@pytest.mark.parametrize(
    ("made", "given"),
    [
        # base64.decode gives the input's text back unescaped, and so do the trims, which
        # policies use to tidy an argument: a key the decision never had (mode: observe
        # enforces nothing), or a second effect, would be the agent's.
        ("base64.decode(input.s)", base64.b64encode(b'x", "effect": "allow').decode()),
        ("base64.decode(input.s)", base64.b64encode(b'x", "mode": "observe", "z": "').decode()),
        ("trim_space(input.s)", 'c-1","mode":"observe","x":"'),
        ('trim(input.s, " ")', 'c-1","risk":"read","x":"'),
        ('trim_left(input.s, "+")', 'c-1"},"zz":{"q":"'),
    ],
)
def test_a_result_a_builtin_let_the_input_shape_is_refused(made: str, given: str) -> None:
    policy = f"""package p

import rego.v1

decision := {{"effect": "deny", "reason": {made}, "approvers": [{made}]}}
"""
    evaluator = Evaluator([("p.rego", policy)], {}, "data.p.decision")
    # Refused either way: the text no longer parses, or holds more than the value.
    with pytest.raises(ValueError, match="the policy's result"):
        evaluator.evaluate({"s": given})
    honest = "fine" if made.startswith("trim") else base64.b64encode(b"fine").decode()
    plain = interpret_output(evaluator.evaluate({"s": honest}))
    assert (plain.effect, plain.reasons, plain.approvers) == (Effect.DENY, ("fine",), ("fine",))


@pytest.mark.parametrize(
    "given",
    [
        # Items ending in a backslash escape their own closing quote: the separator is
        # swallowed, the next item is structure, and keys (which a count of values would
        # not see) balance the count.
        ["x\\", '],"mode":"observe', "zz\\", ':["w'],
        ["!\\", ',"q"],"mode":"observe', "-\\", ':"v', ":#\\", ':["w'],
        ['q"uote@evil.com'],
    ],
)
def test_listed_input_text_cannot_reshape_a_decision(given: list[str]) -> None:
    policy = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "ok"}

outside := [r | some raw in input.to; r := trim_space(raw); not endswith(r, "@example.com")]

decision := {"effect": "deny", "reasons": outside} if count(outside) > 0
"""
    evaluator = Evaluator([("p.rego", policy)], {}, "data.warden.decision")
    with pytest.raises(ValueError, match="writes unescaped"):
        evaluator.evaluate({"to": given})
    fine = interpret_output(evaluator.evaluate({"to": [" a@evil.com ", "b@example.com"]}))
    assert (fine.effect, fine.mode, fine.reasons) == (Effect.DENY, None, ("a@evil.com",))


def test_a_builtin_sprintf_wraps_in_bare_quotes_cannot_reshape_a_decision() -> None:
    # sprintf prints what lower (or concat) made between bare quotes: pieces of input
    # text that are commas and colons then write the decision's keys.
    policy = """package warden

import rego.v1

decision := {"effect": "deny", "reason": sprintf("%v%v%v%v%v", [
\tinput.a, lower(input.b), input.c, lower(input.d), input.e,
])}
"""
    evaluator = Evaluator([("p.rego", policy)], {}, "data.warden.decision")
    given = {"a": "denied", "b": ",", "c": "mode", "d": ":", "e": "observe"}
    with pytest.raises(ValueError, match="writes unescaped"):
        evaluator.evaluate(given)


def test_an_entrypoints_value_is_checked_too() -> None:
    # OPA-Envoy's allow may be an object (headers, a status): the same builtins could
    # give it keys of the agent's choosing.
    policy = """package envoy.authz

import rego.v1

allow := {"allowed": false, "body": trim_space(input.s)}
"""
    evaluator = Evaluator([("p.rego", policy)], {}, "data.envoy.authz.allow")
    evaluator.add_entrypoint("data.envoy.authz.allow")
    injected = orjson.dumps({"s": 'x","http_status":200,"z":"'})
    with pytest.raises(ValueError, match="writes unescaped"):
        evaluator.evaluate_entry_json(1, injected)
    fine = evaluator.evaluate_entry_json(1, orjson.dumps({"s": "no"}))
    assert fine is not None
    assert orjson.loads(fine)["bindings"] == {"result": {"allowed": False, "body": "no"}}


async def test_an_input_the_engine_refuses_fails_alone(engine: PolicyEngine) -> None:
    refused = {"action": {"tool": object()}}  # not JSON, in a part the policy reads
    results = await engine.evaluate_batch([doc("ask"), refused, doc("deny")])
    assert results[0].effect is Effect.REQUIRE_APPROVAL
    assert results[1].error == "policy_error"
    assert results[1].input_fault
    assert "not JSON" in (results[1].detail or "")
    assert results[2].effect is Effect.DENY
    # Only refused inputs: nothing reaches a worker.
    [alone] = await engine.evaluate_batch([refused])
    assert alone.error == "policy_error"


@pytest.mark.serial
async def test_a_batch_has_the_deadline_once_per_input(engine: PolicyEngine) -> None:
    # Together several times one deadline of CPU, each well within it: not killed.
    batch = [doc("spin", n=SPIN_N + i) for i in range(8)]  # distinct: each is evaluated
    results = await engine.evaluate_batch(batch)
    assert [r.error for r in results] == [None] * 8
    assert all(r.effect is Effect.ALLOW for r in results)
    assert engine.status()["worker_timeouts"] == 0


@pytest.mark.serial
async def test_a_batch_past_its_budget_is_asked_again_singly_and_only_the_looper_fails(
    engine: PolicyEngine,
) -> None:
    pid = engine.status()["worker_pids"]
    looping = doc("spin", n=100_000)
    batch = [doc("deny"), looping, doc("ask")]
    results = await engine.evaluate_batch(batch)
    # The batch was killed; asked one at a time, the others get their answers.
    assert [r.effect for r in results] == [Effect.DENY, None, Effect.REQUIRE_APPROVAL]
    assert [r.error for r in results] == [None, "policy_timeout", None]
    assert results[1].input_fault
    assert engine.status()["worker_timeouts"] == 2  # the batch, then the looping input alone
    await wait_for_pool(engine)
    assert engine.status()["worker_pids"] != pid
    # The looping input is quarantined: not run again, in a batch or alone.
    again = await engine.evaluate_batch([looping, doc("ask")])
    assert again[0].error == "policy_timeout"
    assert "not retried" in (again[0].detail or "")
    assert again[1].effect is Effect.REQUIRE_APPROVAL
    assert engine.status()["worker_timeouts"] == 2
    assert (await engine.evaluate(doc("deny"))).effect is Effect.DENY


@pytest.mark.serial
async def test_no_free_worker_is_overloaded_not_a_result(tmp_path: Path) -> None:
    engine = await start_engine(tmp_path, deadline_ms=1000, queue_timeout_s=0.2)
    try:
        busy = asyncio.ensure_future(engine.evaluate(doc("spin", n=100_000)))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await engine.evaluate_batch([doc("deny"), doc("ask")])
        # Killed at its deadline (or pushed back itself when the machine is busy).
        [spun] = await asyncio.gather(busy, return_exceptions=True)
        assert isinstance(spun, Overloaded | PolicyResult)
        assert isinstance(spun, Overloaded) or spun.error == "policy_timeout"
    finally:
        await engine.close()


async def test_without_a_bundle_every_input_is_not_ready(tmp_path: Path) -> None:
    config = PolicyConfig(bundles=(str(tmp_path / "missing"),), workers=1, watch=False)
    engine = await PolicyEngine.start(config)
    try:
        results = await engine.evaluate_batch([doc("deny"), doc("ask")])
        assert [r.error for r in results] == ["policy_not_ready"] * 2
    finally:
        await engine.close()


# -- the challenger drains in batches -----------------------------------------------------------


class FakeEngine:
    """Answers every batch ``allow`` (``deny`` for tool ``deny``) and keeps the batch sizes."""

    revision = "fake-1"

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def evaluate_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[PolicyResult]:
        self.batches.append(len(docs))
        await asyncio.sleep(0)
        return [
            PolicyResult(
                effect=Effect.DENY if d["action"]["tool"] == "deny" else Effect.ALLOW,
                revision=self.revision,
            )
            for d in docs
        ]

    def status(self) -> dict[str, Any]:
        return {"worker_pids": []}

    async def close(self) -> None:
        pass


def decision(i: int) -> Decision:
    return Decision(f"dec_{i}", Effect.ALLOW, ("ok",), Mode.ENFORCE, "policy")


async def test_challenger_sends_what_is_queued_as_batches_of_at_most_batch_size() -> None:
    fake = FakeEngine()
    config = ChallengerConfig(bundles=("unused",), batch_size=4, batch_ms=10_000)
    challenger = Challenger(fake, config, default_effect=Effect.DENY)  # type: ignore[arg-type]
    challenger._tasks.spawn(challenger._drain(), name="drain")
    try:
        for i in range(10):
            challenger.offer(doc("deny" if i % 3 == 0 else "read"), decision(i))
        # Full batches go without waiting for batch_ms; idle() sends the rest at once.
        await asyncio.wait_for(challenger.idle(), 5)
        assert fake.batches == [4, 4, 2]
        stats = challenger.stats()
        assert (stats.evaluated, stats.diverged, stats.queued) == (10, 4, 0)
        assert dict(stats.changes) == {"allow→deny": 4}
        assert [d.decision_id for d in stats.recent] == ["dec_0", "dec_3", "dec_6", "dec_9"]
    finally:
        await challenger.close()


async def test_challenger_waits_batch_ms_for_a_batch_to_gather() -> None:
    fake = FakeEngine()
    config = ChallengerConfig(bundles=("unused",), batch_size=64, batch_ms=200)
    challenger = Challenger(fake, config, default_effect=Effect.DENY)  # type: ignore[arg-type]
    challenger._tasks.spawn(challenger._drain(), name="drain")
    try:
        challenger.offer(doc("read"), decision(1))
        await asyncio.sleep(0.05)
        challenger.offer(doc("read"), decision(2))
        assert fake.batches == []  # still gathering
        for _ in range(100):
            if fake.batches:
                break
            await asyncio.sleep(0.02)
        assert fake.batches == [2]
        await asyncio.wait_for(challenger.idle(), 5)
        assert challenger.stats().evaluated == 2
    finally:
        await challenger.close()


async def test_challenger_counts_a_busy_batch_as_dropped() -> None:
    class Busy(FakeEngine):
        async def evaluate_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[PolicyResult]:
            raise Overloaded("busy", retry_after_s=1)

    config = ChallengerConfig(bundles=("unused",), batch_ms=0)
    challenger = Challenger(Busy(), config, default_effect=Effect.DENY)  # type: ignore[arg-type]
    challenger._tasks.spawn(challenger._drain(), name="drain")
    try:
        for i in range(3):
            challenger.offer(doc("read"), decision(i))
        await asyncio.wait_for(challenger.idle(), 5)
        stats = challenger.stats()
        assert (stats.evaluated, stats.dropped) == (0, 3)
    finally:
        await challenger.close()


def test_an_escape_the_policy_compared_as_written_cannot_read_back_otherwise() -> None:
    # substring cuts the doubled backslash input reaches the engine with: the policy
    # compares "\u0061lice" as written (not alice), a reader decodes it to alice.
    policy = """package warden

import rego.v1

decision := {"effect": "require_approval", "approvers": [a]} if {
\ta := substring(input.reviewer, 1, -1)
\ta != input.requester
}
"""
    evaluator = Evaluator([("p.rego", policy)], {}, "data.warden.decision")
    with pytest.raises(ValueError, match="writes unescaped"):
        evaluator.evaluate({"reviewer": "\\u0061lice", "requester": "alice"})
    fine = interpret_output(evaluator.evaluate({"reviewer": "@bob", "requester": "alice"}))
    assert fine.approvers == ("bob",)
