"""The policy engine with real worker processes: evaluation, cache, activation."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tests.functional.conftest import serving
from warden.config import PolicyConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    Outcome,
    RequestMeta,
    Stage,
)
from warden.pipeline import AuditSink, GuardContext, Pipeline
from warden.policy.bundle import Bundle, load_bundle
from warden.policy.engine import PolicyEngine
from warden.policy.guard import PolicyGuard

POLICY = """package warden

import rego.v1

default decision := {"effect": "deny", "reason": "not in the catalogue"}

decision := {"effect": "allow", "reason": "VERSION reads only"} if {
\tinput.action.tool in data.warden.tools.read_only
}

decision := {"effect": "require_approval", "reason": "big refund", "approvers": ["leads"]} if {
\tinput.action.tool == "issue_refund"
\tinput.action.arguments.amount > 100
}
"""


def write_policy(root: Path, version: str = "v1", *, revision: str | None = None) -> Path:
    (root / "warden").mkdir(parents=True, exist_ok=True)
    (root / "warden" / "policy.rego").write_text(POLICY.replace("VERSION", version))
    (root / "warden" / "data.json").write_text(
        json.dumps({"tools": {"read_only": ["lookup_order"]}})
    )
    manifest: dict[str, Any] = {"roots": ["warden"]}
    if revision is not None:
        manifest["revision"] = revision
    (root / ".manifest").write_text(json.dumps(manifest))
    return root


def doc(tool: str, **arguments: Any) -> dict[str, Any]:
    return {
        "agent": {"id": "support-bot", "version": "1"},
        "action": {"kind": "tool_call", "tool": tool, "arguments": arguments},
        "context": {"trace": "abc"},
        "budget": {},
        "mode": "enforce",
        "risk": "write",
    }


def config(path: Path, **overrides: Any) -> PolicyConfig:
    values: dict[str, Any] = {
        "bundles": (str(path),),
        "workers": 2,
        "deadline_ms": 1000,
        "poll_interval_s": 0.1,
        "watch": False,
    }
    values.update(overrides)
    return PolicyConfig(**values)


async def wait_for(predicate: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[PolicyEngine]:
    eng = await PolicyEngine.start(config(write_policy(tmp_path / "b", revision="r1")))
    yield eng
    await eng.close()


async def test_evaluates_and_caches_on_read_paths(engine: PolicyEngine) -> None:
    assert engine.ready
    assert engine.revision == "r1"
    first = await engine.evaluate(doc("lookup_order", order="1"))
    assert first.effect is Effect.ALLOW
    assert first.reasons == ("v1 reads only",)
    assert first.revision == "r1"
    assert not first.cached
    # Only input.action.tool and input.action.arguments.amount are read: other fields
    # and other arguments do not change the key.
    again = doc("lookup_order", order="1")
    again["context"] = {"trace": "other"}
    assert (await engine.evaluate(again)).cached
    held = await engine.evaluate(doc("issue_refund", amount=500))
    assert held.effect is Effect.REQUIRE_APPROVAL
    assert held.approvers == ("leads",)
    assert (await engine.evaluate(doc("unknown"))).effect is Effect.DENY
    status = engine.status()
    assert status["ready"]
    assert status["workers_alive"] == 2
    assert status["cache"]["input_paths"] == ["action.arguments.amount", "action.tool"]
    assert REGISTRY.get_sample_value("warden_policy_bundle_info", {"revision": "r1"}) == 1.0


ENVIRONMENT_READER = """package warden

import rego.v1

decision := {"effect": "deny", "reason": concat(",", sort(object.keys(opa.runtime().env)))}
"""


async def test_a_policy_cannot_read_wardens_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Warden's environment holds the upstream keys it injects (ADR 0015): a rule
    # reading opa.runtime().env could put them in a reason the agent reads.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-held-by-warden")
    monkeypatch.setenv("WARDEN_STATE_URL", "postgresql://warden:secret@db/warden")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.rego").write_text(ENVIRONMENT_READER)
    eng = await PolicyEngine.start(config(tmp_path / "b", workers=1))
    try:
        result = await eng.evaluate(doc("lookup_order"))
    finally:
        await eng.close()
    assert result.error is None, result.reasons
    (names,) = result.reasons
    assert "PATH" in names.split(",")
    assert "OPENAI_API_KEY" not in names
    assert "WARDEN_STATE_URL" not in names


WORD_CHECK = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "one word"}

decision := {"effect": "deny", "reason": "not one word"} if {
	not regex.match(`^[a-z]+$`, input.action.arguments.q)
}
"""


async def test_a_long_argument_matched_by_a_regex_does_not_kill_the_worker(
    tmp_path: Path,
) -> None:
    # The engine's regular expressions recurse once per character: on an 8 MiB stack
    # 60,000 characters killed the worker, and every such call was a crash fallback.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.rego").write_text(WORD_CHECK)
    eng = await PolicyEngine.start(config(tmp_path / "b", workers=1, deadline_ms=5000))
    try:
        result = await eng.evaluate(doc("search_kb", q="a" * 60_000))
        other = await eng.evaluate(doc("search_kb", q="a" * 60_000 + " b"))
    finally:
        await eng.close()
    assert (result.error, result.effect) == (None, Effect.ALLOW)
    assert (other.error, other.effect) == (None, Effect.DENY)


async def test_a_large_input_is_cached_under_a_digest(engine: PolicyEngine) -> None:
    # The arguments are the agent's: 10,000 cached keys of 8 MiB each would hold the
    # sidecar's memory; a key past 1 KiB is kept as its digest.
    # The policy reads the amount: a long one is in the key.
    assert not (await engine.evaluate(doc("issue_refund", amount="9" * 100_000))).cached
    assert (await engine.evaluate(doc("issue_refund", amount="9" * 100_000))).cached
    assert not (await engine.evaluate(doc("issue_refund", amount="9" * 100_001))).cached
    gen = engine._active
    assert gen is not None
    assert max(len(k) for k in gen.cache._data) < 1024


ECHOING = """package warden

import rego.v1

decision := {"effect": "deny", "reason": sprintf("%v is not in the catalogue", [input.action.tool])}
"""


async def test_a_result_repeating_what_the_agent_sent_at_length_is_not_cached(
    tmp_path: Path,
) -> None:
    # A deny reason naming a tool of megabytes: 10,000 cached results of it held the
    # sidecar's memory (the key is a digest, the value was whole).
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.rego").write_text(ECHOING)
    eng = await PolicyEngine.start(config(tmp_path / "b", workers=1))
    try:
        long_tool = "t" * 10_000
        first = await eng.evaluate(doc(long_tool))
        assert first.effect is Effect.DENY
        assert not (await eng.evaluate(doc(long_tool))).cached
        assert not (await eng.evaluate(doc("search_kb"))).cached
        assert (await eng.evaluate(doc("search_kb"))).cached
    finally:
        await eng.close()


WHOLE_INPUT = """package warden

import rego.v1

decision := {"effect": "allow", "reason": "read whole"} if {
	doc := input
	doc.action.tool == "lookup_order"
} else := {"effect": "deny", "reason": "no"}
"""


async def test_a_policy_reading_its_whole_input_gets_a_large_one_whole(tmp_path: Path) -> None:
    # Its key is the input itself: digested past 1 KiB for the cache, never for the worker.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.rego").write_text(WHOLE_INPUT)
    eng = await PolicyEngine.start(config(tmp_path / "b", workers=1))
    try:
        large = doc("lookup_order", note="x" * 5000)
        result = await eng.evaluate(large)
        assert (result.effect, result.error) == (Effect.ALLOW, None), result.detail
        assert (await eng.evaluate(doc("lookup_order", note="x" * 5000))).cached
        batch = await eng.evaluate_batch([large, doc("lookup_order"), doc("other")])
        assert [r.effect for r in batch] == [Effect.ALLOW, Effect.ALLOW, Effect.DENY]
    finally:
        await eng.close()


FIRST_FINDING = """package warden

import rego.v1

default decision := {"effect": "allow"}

findings := [f |
	some name
	value := input.action.arguments[name]
	f := finding(name, value)
]

finding(name, value) := {"effect": "deny", "reason": name} if startswith(value, "sk-")

finding(name, value) := {"effect": "require_approval", "reason": name} if {
	endswith(value, "@external.example")
}

decision := findings[0] if count(findings) > 0
"""


async def test_the_order_an_agent_gives_arguments_in_decides_nothing(tmp_path: Path) -> None:
    # rego-cpp walks an object in the order its keys came: the projection goes to the
    # worker sorted, as a whole input does, so "the first finding" is the policy's.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.rego").write_text(FIRST_FINDING)
    for order in (("to", "body"), ("body", "to")):
        eng = await PolicyEngine.start(config(tmp_path / "b", workers=1))
        try:
            values = {"to": "eve@external.example", "body": "sk-live-123"}
            args = {k: values[k] for k in order}
            batch = await eng.evaluate_batch([doc("send_email", **args)])
            single = await eng.evaluate(
                doc("send_email", **{k: values[k] for k in reversed(order)})
            )
            assert [(r.effect, r.reasons) for r in (*batch, single)] == [
                (Effect.DENY, ("body",)),
                (Effect.DENY, ("body",)),
            ]
        finally:
            await eng.close()


async def test_concurrent_callers_share_the_pool(engine: PolicyEngine) -> None:
    results = await asyncio.gather(
        *(engine.evaluate(doc("issue_refund", amount=i)) for i in range(200))
    )
    assert all(r.error is None for r in results)
    assert {r.effect for r in results} == {Effect.DENY, Effect.REQUIRE_APPROVAL}


async def test_hot_reload_from_a_watched_folder(tmp_path: Path) -> None:
    root = write_policy(tmp_path / "b")
    before = REGISTRY.get_sample_value("warden_policy_reloads_total", {"result": "success"}) or 0
    eng = await PolicyEngine.start(config(root, watch=True, workers=1))
    try:
        rev1 = eng.revision
        assert rev1 is not None
        assert rev1.startswith("sha256:")
        assert (await eng.evaluate(doc("lookup_order"))).reasons == ("v1 reads only",)
        assert (await eng.evaluate(doc("lookup_order"))).cached
        write_policy(root, "v2")
        await wait_for(lambda: eng.revision != rev1)
        result = await eng.evaluate(doc("lookup_order"))
        assert result.reasons == ("v2 reads only",)
        assert not result.cached  # the cache went with the old revision
        assert result.revision == eng.revision
        after = REGISTRY.get_sample_value("warden_policy_reloads_total", {"result": "success"})
        assert after == before + 2
        assert REGISTRY.get_sample_value("warden_policy_bundle_info", {"revision": rev1}) is None
    finally:
        await eng.close()


async def test_broken_update_keeps_the_last_good_revision(tmp_path: Path) -> None:
    root = write_policy(tmp_path / "b", revision="good")
    failures = REGISTRY.get_sample_value("warden_policy_reloads_total", {"result": "failure"}) or 0
    eng = await PolicyEngine.start(config(root, watch=True, workers=1))
    try:
        (root / "warden" / "broken.rego").write_text("package warden\n\nx if {\n  input.a ==\n}\n")
        await wait_for(lambda: eng.status()["last_error"] is not None)
        status = eng.status()
        assert "warden/broken.rego:4:" in status["last_error"]
        assert status["revision"] == "good"
        assert status["ready"]
        assert (await eng.evaluate(doc("lookup_order"))).effect is Effect.ALLOW
        now = REGISTRY.get_sample_value("warden_policy_reloads_total", {"result": "failure"})
        assert now == failures + 1
        # Reported once per change, not on every poll.
        await asyncio.sleep(0.4)
        assert (
            REGISTRY.get_sample_value("warden_policy_reloads_total", {"result": "failure"}) == now
        )
        (root / "warden" / "broken.rego").unlink()
        write_policy(root, "v3", revision="fixed")
        await wait_for(lambda: eng.revision == "fixed")
        assert eng.status()["last_error"] is None
    finally:
        await eng.close()


async def test_a_policy_that_crashes_the_compiler_is_refused(tmp_path: Path) -> None:
    root = write_policy(tmp_path / "b", revision="good")
    eng = await PolicyEngine.start(config(root, workers=1))
    try:
        bad = write_policy(tmp_path / "bad", revision="bad")
        # rego-cpp aborts the process compiling a builtin under `with input as`.
        (bad / "warden" / "crash.rego").write_text(
            "package warden\n\nh := upper(input.s)\n\n"
            'x := y if { y := h with input as {"s": "a"} }\n'
        )
        with pytest.raises(Exception, match="died while compiling"):
            await eng.activate(load_bundle(bad, check_syntax=False))
        assert eng.revision == "good"
        assert (await eng.evaluate(doc("lookup_order"))).effect is Effect.ALLOW
        assert "died while compiling" in eng.status()["last_error"]
    finally:
        await eng.close()


async def test_unit_tests_in_the_bundle_are_not_compiled(tmp_path: Path) -> None:
    root = write_policy(tmp_path / "b")
    (root / "warden" / "policy_test.rego").write_text(
        'package warden\n\ntest_x if { upper(input.s) == "A" with input as {"s": "a"} }\n'
    )
    eng = await PolicyEngine.start(config(root, workers=1))
    try:
        assert eng.ready
    finally:
        await eng.close()


async def test_without_a_bundle_the_engine_is_not_ready(tmp_path: Path) -> None:
    eng = await PolicyEngine.start(config(tmp_path / "missing", workers=1))
    try:
        assert not eng.ready
        assert eng.revision is None
        result = await eng.evaluate(doc("lookup_order"))
        assert result.error == "policy_not_ready"
        guard = PolicyGuard(eng, eng.config)
        decision = await guard.check(action("lookup_order"), GuardContext(mode=Mode.ENFORCE))
        assert decision.guard == "fallback"
        assert decision.effect is Effect.DENY
        assert decision.error == "policy_not_ready"
        assert "no such bundle" in eng.status()["last_error"]
    finally:
        await eng.close()


async def test_pre_activate_hook_can_refuse_a_revision(tmp_path: Path) -> None:
    seen: list[str] = []

    async def hook(bundle: Bundle) -> None:
        seen.append(bundle.revision)
        if bundle.revision == "r2":
            raise ValueError("decision table 3 failed")

    root = write_policy(tmp_path / "b", revision="r1")
    eng = await PolicyEngine.start(config(root, workers=1), pre_activate=hook)
    try:
        write_policy(root, "v2", revision="r2")
        with pytest.raises(Exception, match="decision table 3 failed"):
            await eng.activate(load_bundle(root))
        assert seen == ["r1", "r2"]
        assert eng.revision == "r1"
        assert (await eng.evaluate(doc("lookup_order"))).reasons == ("v1 reads only",)
    finally:
        await eng.close()


async def test_swap_under_load_loses_no_request(tmp_path: Path) -> None:
    root = write_policy(tmp_path / "b", revision="r1")
    # A long deadline: this is about the swap losing nothing, and a starved
    # machine must not turn a slow answer into a failure here.
    eng = await PolicyEngine.start(config(root, cache_size=0, deadline_ms=10_000))
    try:
        stop = asyncio.Event()
        revisions: set[str] = set()

        async def caller() -> None:
            while not stop.is_set():
                result = await eng.evaluate(doc("lookup_order"))
                assert result.error is None, result.detail
                revisions.add(result.revision)

        callers = [asyncio.create_task(caller()) for _ in range(4)]
        # Wait on what the callers saw, not on the clock: a busy machine is slow.
        await wait_for(lambda: "r1" in revisions)
        write_policy(root, "v2", revision="r2")
        assert await eng.activate(load_bundle(root))
        await wait_for(lambda: "r2" in revisions)
        stop.set()
        await asyncio.gather(*callers)
        assert revisions == {"r1", "r2"}
        assert not await eng.activate(load_bundle(root))  # same files: no swap
    finally:
        await eng.close()


def tarball(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                tar.add(path, arcname="/" + path.relative_to(root).as_posix())
    return buf.getvalue()


@asynccontextmanager
async def engine_on_server(
    tmp_path: Path,
    serve: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    userinfo: str = "",
    query: str = "",
    path: str = "/bundles/support.tar.gz",
) -> AsyncIterator[tuple[PolicyEngine, int]]:
    """An engine whose bundle comes from ``serve`` at a loopback bundle_url; and the port."""
    app = web.Application()
    app.router.add_get(path or "/", serve)
    async with serving(app) as port:
        url = f"http://{userinfo}127.0.0.1:{port}{path}{query}"
        eng = await PolicyEngine.start(config(tmp_path / "unused", bundle_url=url, workers=1))
        try:
            yield eng, port
        finally:
            await eng.close()


async def test_bundle_server_with_etag(tmp_path: Path) -> None:
    state = {"body": tarball(write_policy(tmp_path / "v1", revision="srv-1")), "etag": '"1"'}
    requests: list[str | None] = []

    async def serve(request: web.Request) -> web.Response:
        requests.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == state["etag"]:
            return web.Response(status=304)
        return web.Response(body=state["body"], headers={"ETag": str(state["etag"])})

    async with engine_on_server(tmp_path, serve) as (eng, _):
        assert eng.revision == "srv-1"
        await wait_for(lambda: len(requests) >= 3)
        assert requests[0] is None
        assert requests[1:3] == ['"1"', '"1"']
        state["body"] = tarball(write_policy(tmp_path / "v2", "v2", revision="srv-2"))
        state["etag"] = '"2"'
        await wait_for(lambda: eng.revision == "srv-2")
        assert (await eng.evaluate(doc("lookup_order"))).reasons == ("v2 reads only",)
        state["body"] = b"garbage"
        state["etag"] = '"3"'
        await wait_for(lambda: eng.status()["last_error"] is not None)
        assert "not a readable .tar.gz" in eng.status()["last_error"]
        assert eng.revision == "srv-2"


async def test_a_bundle_that_arrives_in_many_chunks_is_read_whole(tmp_path: Path) -> None:
    # A few megabytes, sent a chunk at a time: the client must wait for all of it.
    # Reading only what was buffered once cut the tarball, and the ETag stuck.
    root = write_policy(tmp_path / "big", revision="big-1")
    (root / "warden" / "blob").mkdir()
    (root / "warden" / "blob" / "data.json").write_text(
        json.dumps({"noise": os.urandom(1_500_000).hex()})
    )
    body = tarball(root)
    assert len(body) > 1_000_000

    async def serve(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"ETag": '"big"'})
        await response.prepare(request)
        for start in range(0, len(body), 32_768):
            await response.write(body[start : start + 32_768])
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    async with engine_on_server(tmp_path, serve) as (eng, _):
        assert eng.revision == "big-1", eng.status()["last_error"]


async def test_bundle_url_credentials_are_never_shown_or_recorded(tmp_path: Path) -> None:
    """A password or token in ``policy.bundle_url`` is sent, but never shown or recorded.

    The bundle's ``source`` goes into activation records (kept for years) and
    ``/readyz``; errors go to the log.
    """
    state = {"body": tarball(write_policy(tmp_path / "v1", revision="srv-1"))}
    seen: list[tuple[str | None, str]] = []

    async def serve(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization"), request.query_string))
        if state["body"] == b"loop":  # redirected to itself until the client gives up
            raise web.HTTPFound(str(request.rel_url))
        return web.Response(body=state["body"], headers={"ETag": str(len(seen))})

    credentials = {"userinfo": "ops:hunter2@", "query": "?v=2&token=s3cr3t-t0ken"}
    async with engine_on_server(tmp_path, serve, **credentials) as (eng, port):
        assert eng.revision == "srv-1"
        # Fetched with the credentials as given.
        assert seen[0][0] == "Basic " + base64.b64encode(b"ops:hunter2").decode()
        assert seen[0][1] == "v=2&token=s3cr3t-t0ken"
        shown = f"http://ops:***@127.0.0.1:{port}/bundles/support.tar.gz?v=***&token=***"
        assert eng.status()["source"] == shown
        state["body"] = b"garbage"
        await wait_for(lambda: eng.status()["last_error"] is not None)
        status = json.dumps(eng.status())
        assert shown in status
        assert "hunter2" not in status
        assert "s3cr3t" not in status
        # The HTTP client's own error quotes the URL it gave up on.
        state["body"] = b"loop"
        await wait_for(lambda: "cannot fetch" in str(eng.status()["last_error"]))
        status = json.dumps(eng.status())
        assert "token=***" in status
        assert "s3cr3t" not in status


@pytest.mark.parametrize("path", ["", "/"])
async def test_a_bundle_url_without_a_path_names_no_credentials(tmp_path: Path, path: str) -> None:
    """The bundle's name (in activation records, signed marks and errors) comes from the
    URL's path only: a URL without one is named ``bundle``, never ``ops:hunter2@host``."""
    body = tarball(write_policy(tmp_path / "v1", revision="srv-1"))

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=body)

    async with engine_on_server(tmp_path, serve, userinfo="ops:hunter2@", path=path) as (eng, _):
        assert eng.revision == "srv-1"
        gen = eng._active  # noqa: SLF001 - the bundle as built, whose name records carry
        assert gen is not None
        assert gen.bundle.name == "bundle"
        assert "hunter2" not in json.dumps(eng.status())


def action(tool: str, **arguments: Any) -> Action:
    return Action(
        action_id="act_1",
        agent=Agent("support-bot", "1"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta(method="POST", upstream="openai", path="/v1/chat/completions"),
        tool=tool,
        arguments=arguments,
    )


class MemoryAudit:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    async def record_decision(self, action: Action, decision: Decision) -> None:
        self.decisions.append(decision)

    async def record_outcome(self, action: Action, decision_id: str, outcome: Outcome) -> None:
        pass


async def test_guard_in_the_pipeline(engine: PolicyEngine) -> None:
    audit = MemoryAudit()
    pipeline = Pipeline(
        [PolicyGuard(engine, engine.config)],
        cast("AuditSink", audit),  # a partial sink: this pipeline only records decisions
        mode_for=lambda _agent: Mode.ENFORCE,
        risk_of=lambda _tool: "high",
    )
    decision = await pipeline.decide(action("issue_refund", amount=250))
    assert decision.guard == "policy"
    assert decision.effect is Effect.REQUIRE_APPROVAL
    assert decision.obligations.approvers == ("leads",)
    assert decision.bundle_revision == "r1"
    assert audit.decisions == [decision]


async def test_policy_reading_the_whole_input(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "p.rego").write_text(
        "package warden\n\nimport rego.v1\n\n"
        'decision := {"effect": "allow", "reason": object.get(input, ["context", "trace"], "-")}\n'
    )
    eng = await PolicyEngine.start(config(root, workers=1))
    try:
        assert eng.status()["cache"]["input_paths"] is None
        first = await eng.evaluate(doc("lookup_order"))
        assert first.reasons == ("abc",)
        assert (await eng.evaluate(doc("lookup_order"))).cached
        other = doc("lookup_order")
        other["context"] = {"trace": "xyz"}
        second = await eng.evaluate(other)
        assert not second.cached
        assert second.reasons == ("xyz",)
    finally:
        await eng.close()
