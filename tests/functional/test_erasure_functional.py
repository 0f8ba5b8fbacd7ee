"""Erasing a data subject reaches the state store: call links, approvals, Responses chains.

Real Wardens on loopback, driven with the official openai SDK against
:class:`MockLLM`, on SQLite and on a real PostgreSQL. Customer ``C-ann`` is
erased; customer ``C-bob``'s rows must stay as they were. Erasure runs
through the console of the running Warden, through ``warden audit erase``
against a stopped Warden's state, and through the CLI while Warden runs
(which leaves the rest to the running Warden's next checkpoint).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.pg import PgServer
from warden.audit.subjects import SubjectKeys
from warden.cli_audit import main as audit_main
from warden.config import Config
from warden.server import Warden
from warden.state.links import CallLinks
from warden.state.sessions import ERASED_CALLS
from warden.testing import Call, MockLLM, Reply

pytestmark = pytest.mark.timeout(120)

ADMIN = "tok-erasure-admin"
SOURCES = ["action.arguments.customer_id", "context.customer_id"]
POLICY = """package warden

import rego.v1

default decision := {"effect": "allow"}

decision := {"effect": "require_approval", "reason": "an email change needs a person"} if {
    input.action.tool == "update_email"
}
"""
ANN, BOB = "C-ann", "C-bob"


def _lookup(customer: str, call_id: str) -> Call:
    return Call("lookup_customer", {"customer_id": customer}, id=call_id)


def _email(customer: str) -> Call:
    address = f"{customer.lower()}@example.com"
    return Call("update_email", {"customer_id": customer, "email": address}, id=f"em_{customer}")


class State:
    """Reads the state store's tables the way an operator with ``psql``/``sqlite3`` would."""

    def __init__(self, url: str, pg_server: PgServer | None) -> None:
        self._url = url
        self._pg = pg_server

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        if self._pg is None:
            with sqlite3.connect(self._url.removeprefix("sqlite:///")) as conn:
                return list(conn.execute(query).fetchall())
        with self._pg.admin(self._url.rsplit("/", 1)[1]) as conn:
            return list(conn.execute(query).fetchall())

    def links(self) -> set[str]:
        return {str(r[0]) for r in self.rows("SELECT call_id FROM call_links")}

    def approvals(self) -> dict[str, dict[str, Any]]:
        """By customer named in the arguments (``erased`` once erased)."""
        out: dict[str, dict[str, Any]] = {}
        query = "SELECT id, arguments, arguments_sha256, binding, status, decided_by FROM approvals"
        for aid, arguments, sha, binding, status, decided_by in self.rows(query):
            shown = orjson.loads(arguments)
            key = "erased" if shown == {"erased": True} else str(shown["customer_id"])
            out[key] = {
                "id": aid,
                "arguments": shown,
                "sha": sha,
                "binding": binding,
                "status": status,
                "decided_by": decided_by,
            }
        return out

    def chains(self) -> list[str]:
        return [str(r[0]) for r in self.rows("SELECT calls FROM session_responses")]


Backend = tuple[dict[str, Any], State]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """``state`` config and a reader of the tables, for each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/state.db"
        return {"url": url}, State(url, None)
    pg_server: PgServer = request.getfixturevalue("pg_server")
    url = request.getfixturevalue("pg_url")
    return {"url": url, "password_file": str(pg_server.password_file)}, State(url, pg_server)


def _config(tmp_path: Path, llm: MockLLM, state: dict[str, Any], **over: Any) -> Config:
    policy = tmp_path / "policy"
    policy.mkdir(exist_ok=True)
    (policy / "policy.rego").write_text(POLICY)
    admin = {
        "subject": "ada",
        "roles": ["admin"],
        "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(),
    }
    return make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(policy)]},
        audit={"dir": str(tmp_path / "audit"), "subjects": {"sources": SOURCES}, **over},
        state=state,
        admin={"tokens": [admin]},
    )


def _config_file(tmp_path: Path, state: dict[str, Any]) -> Path:
    """What ``warden audit erase --config`` reads: the audit log and the state store."""
    path = tmp_path / "warden.yaml"
    doc = {"audit": {"dir": str(tmp_path / "audit"), "subjects": {"sources": SOURCES}}}
    path.write_bytes(orjson.dumps({**doc, "state": state}))
    return path


async def _customers_seen(warden: Warden, llm: MockLLM) -> None:
    """Each customer: a looked-up call (a call link), an email change (a pending
    approval) and a Responses answer (a chain link); Ann also through the context header."""
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=30
    ) as oai:
        for who in (ANN, BOB):
            for call in (_lookup(who, f"call_{who}"), _email(who)):
                llm.script(Reply(tool_calls=[call]))
                await oai.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"help {who}"}]
                )
            llm.script(Reply(tool_calls=[_lookup(who, f"resp_{who}")]))
            await oai.responses.create(model="gpt-4.1", input=f"who is {who}?")
        # Named only by the context header (a source), not by the arguments.
        llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1"}, id="call_ctx")]))
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "where is my order?"}],
            extra_headers={"X-Warden-Context-Customer-Id": ANN},
        )
    assert warden.core is not None
    await warden.core.background.drain()  # chain links written
    await warden.core.links.flush()  # call links stored (a batch may still be in flight)


LINKED = {"call_C-ann", "call_C-bob", "resp_C-ann", "resp_C-bob", "call_ctx"}


async def _assert_before(state: State) -> None:
    for _ in range(100):
        if state.links() == LINKED:
            break
        await asyncio.sleep(0.02)
    assert state.links() == LINKED
    approvals = state.approvals()
    assert {approvals[ANN]["status"], approvals[BOB]["status"]} == {"pending"}
    assert len(state.chains()) == 2


def _assert_ann_erased(state: State, audit_dir: Path) -> dict[str, Any]:
    """Ann's rows lost their personal content, Bob's are intact; the erasure record."""
    assert state.links() == {"call_C-bob", "resp_C-bob"}
    approvals = state.approvals()
    assert ANN not in approvals
    erased, bob = approvals["erased"], approvals[BOB]
    # Kept for the history, but nothing can act on it or read the arguments back.
    assert erased["status"] == "rejected"
    assert erased["decided_by"] == "erasure"
    assert erased["sha"] == ""
    assert erased["binding"] == ""
    assert bob["status"] == "pending"
    assert bob["arguments"] == {"customer_id": BOB, "email": "c-bob@example.com"}
    assert len(bob["sha"]) == 64
    assert len(bob["binding"]) == 64
    # Ann's link stays, emptied (it keeps its agent), with the mark that refuses approvals.
    chain, emptied = sorted(state.chains(), key=lambda calls: calls == ERASED_CALLS)
    assert emptied == ERASED_CALLS
    assert BOB in chain
    assert ANN not in chain
    records = audit_records(audit_dir)
    (erasure,) = [r for r in records if r["kind"] == "erasure"]
    ref = SubjectKeys.open(audit_dir, create=False).ref(ANN)
    assert erasure["body"]["subject"] == ref
    assert erasure["body"]["key_destroyed"] is True
    assert erasure["body"]["state"] == {
        "call_links": 3,
        "approvals": 1,
        "approvals_revoked": 1,
        "session_chains": 1,
    }
    assert ANN not in orjson.dumps(erasure).decode()
    (cancelled,) = [r for r in records if r["kind"] == "approval_cancelled"]
    assert cancelled["body"]["approval_id"] == erased["id"]
    assert cancelled["body"]["who"] == "erasure"
    return erasure


async def _console_erase(warden: Warden, subject: str, done: str = "erased") -> str:
    """Erase through the console as an admin does; the page's notice (``done``)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(f"{warden.admin_url}/console/login") as resp:
            nonce = re.search(r'name="nonce" value="([^"]+)"', await resp.text())
        assert nonce is not None
        async with http.post(
            f"{warden.admin_url}/console/login", data={"nonce": nonce.group(1), "token": ADMIN}
        ) as resp:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
        assert csrf is not None
        async with http.post(
            f"{warden.admin_url}/console/evidence/erase",
            data={"csrf": csrf.group(1), "subject": subject},
        ) as resp:
            assert resp.status == 200
            assert resp.url.query.get("done") == done
            return await resp.text()


async def _results_sent_back(warden: Warden, llm: MockLLM) -> None:
    """The agent sends both lookups' results back, as the next turn does."""
    calls = [_lookup(ANN, "call_C-ann"), _lookup(BOB, "call_C-bob")]
    messages: Any = [
        {"role": "user", "content": "help"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json},
                }
                for c in calls
            ],
        },
        *({"role": "tool", "tool_call_id": c.id, "content": f"{c.id} found"} for c in calls),
    ]
    llm.script(Reply(text="Done."))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=30
    ) as oai:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert warden.core is not None
    await warden.core.background.drain()


async def test_the_console_erases_a_subject_from_the_state_store_and_memory(
    tmp_path: Path, llm: MockLLM, backend: Backend
) -> None:
    state_config, state = backend
    async with Warden(_config(tmp_path, llm, state_config)) as warden:
        await _customers_seen(warden, llm)
        await _assert_before(state)
        page = await _console_erase(warden, ANN)
        assert "rows in the state store are erased" in page
        _assert_ann_erased(state, tmp_path / "audit")
        # Ann's link is gone from memory too: her result is linked to no decision
        # (so not recorded); Bob's is recorded as his decision's outcome.
        await _results_sent_back(warden, llm)
    records = audit_records(tmp_path / "audit")
    decided = {
        r["action"]["call_id"]: r["decision"]["id"] for r in records if r["kind"] == "decision"
    }
    outcomes = {r["decision_id"] for r in records if r["kind"] == "outcome"}
    assert decided["call_C-bob"] in outcomes
    assert decided["call_C-ann"] not in outcomes


async def test_the_cli_erases_a_subject_from_a_stopped_wardens_state(
    tmp_path: Path, llm: MockLLM, backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    state_config, state = backend
    async with Warden(_config(tmp_path, llm, state_config)) as warden:
        await _customers_seen(warden, llm)
    await _assert_before(state)
    argv = ["erase", "--config", str(_config_file(tmp_path, state_config)), "--subject", ANN]
    code = await asyncio.to_thread(audit_main, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "erased: the subject's key is destroyed" in out
    assert "state store: approvals 1, approvals_revoked 1, call_links 3, session_chains 1" in out
    _assert_ann_erased(state, tmp_path / "audit")


async def test_the_cli_leaves_the_state_store_to_the_running_warden(
    tmp_path: Path, llm: MockLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    state_config = {"url": f"sqlite:///{tmp_path}/state.db"}
    state = State(state_config["url"], None)
    config = _config(tmp_path, llm, state_config, checkpoint_interval_s=0.2)
    async with Warden(config) as warden:
        await _customers_seen(warden, llm)
        argv = ["erase", "--config", str(_config_file(tmp_path, state_config)), "--subject", ANN]
        code = await asyncio.to_thread(audit_main, argv)
        out = capsys.readouterr().out
        assert code == 0, out
        assert "Warden is running" in out
        erased = _erasure_seen(tmp_path / "audit")
        for _ in range(100):
            if erased():
                break
            await asyncio.sleep(0.05)
        _assert_ann_erased(state, tmp_path / "audit")
        # The note is done with: the next checkpoints record nothing more.
        await asyncio.sleep(0.5)
    assert len([r for r in audit_records(tmp_path / "audit") if r["kind"] == "erasure"]) == 1


async def test_the_cli_destroys_the_key_when_the_state_store_is_down_and_warden_finishes(
    tmp_path: Path, llm: MockLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    state_config = {"url": f"sqlite:///{tmp_path}/state.db"}
    state = State(state_config["url"], None)
    async with Warden(_config(tmp_path, llm, state_config)) as warden:
        await _customers_seen(warden, llm)
    await _assert_before(state)
    # The configured state store cannot be reached (nothing listens there).
    down = {"url": "postgresql://warden@127.0.0.1:9/warden"}
    argv = ["erase", "--config", str(_config_file(tmp_path, down)), "--subject", ANN]
    code = await asyncio.to_thread(audit_main, argv)
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "erased: the subject's key is destroyed" in captured.out
    assert "the state store could not be reached" in captured.err
    keys = SubjectKeys.open(tmp_path / "audit", create=False)
    assert keys.noted_erasures() == {keys.ref(ANN): True}
    await _assert_before(state)  # nothing there erased yet
    # The next Warden on the log (and the reachable store) finishes it.
    config = _config(tmp_path, llm, state_config, checkpoint_interval_s=0.1)
    async with Warden(config):
        for _ in range(100):
            if keys.noted_erasures() == {}:
                break
            await asyncio.sleep(0.05)
    assert state.links() == {"call_C-bob", "resp_C-bob"}
    bodies = [r["body"] for r in audit_records(tmp_path / "audit") if r["kind"] == "erasure"]
    assert [b["state"] is None for b in bodies] == [True, False]
    assert bodies[1]["state"]["call_links"] == 3


def _erasure_seen(audit_dir: Path) -> Callable[[], bool]:
    return lambda: any(r["kind"] == "erasure" for r in audit_records(audit_dir))


async def test_an_approval_named_only_by_the_context_header_is_erased_too(
    tmp_path: Path, llm: MockLLM, backend: Backend
) -> None:
    """The default source: the customer is named by the context header, not the arguments.

    The approval keeps the subject's keyed reference (never the id), so erasure
    finds it; approvers see the upstream and method of the held call.
    """
    state_config, state = backend
    config = _config(tmp_path, llm, state_config, subjects={"sources": ["context.customer_id"]})
    async with Warden(config) as warden:
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as oai:
            for who in (ANN, BOB):
                change = Call("update_email", {"email": f"{who}@example.com"}, id=f"em_{who}")
                llm.script(Reply(tool_calls=[change]))
                await oai.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "change my email"}],
                    extra_headers={"X-Warden-Context-Customer-Id": who},
                )
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with (
            aiohttp.ClientSession(headers=admin) as http,
            http.get(f"{warden.admin_url}/v1/approvals") as resp,
        ):
            listed = (await resp.json())["approvals"]
        assert [(a["upstream"], a["method"]) for a in listed] == [("openai", "POST")] * 2
        await _console_erase(warden, ANN)
    rows = state.rows("SELECT status, decided_by, arguments, binding FROM approvals")
    assert sorted(row[:3] for row in rows) == [
        ("pending", None, '{"email":"C-bob@example.com"}'),
        ("rejected", "erasure", '{"erased":true}'),
    ]
    (erasure,) = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "erasure"]
    assert erasure["body"]["state"]["approvals_revoked"] == 1
    assert ANN not in orjson.dumps(state.rows("SELECT subjects FROM approvals")).decode()


async def test_a_failing_erasure_step_does_not_stop_the_others(
    tmp_path: Path, llm: MockLLM, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call links failing first (a slow store past its deadline) left the pending
    # approval holding the subject's email, and able to be approved.
    state_config, state = backend
    config = _config(tmp_path, llm, state_config, subjects={"sources": ["context.customer_id"]})

    async def failing(self: CallLinks, erased: object) -> int:
        raise TimeoutError("the call links did not answer in time")

    monkeypatch.setattr(CallLinks, "erase", failing)
    async with Warden(config) as warden:
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as oai:
            change = Call("update_email", {"email": f"{ANN}@example.com"}, id="em_ann")
            llm.script(Reply(tool_calls=[change]))
            await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "change my email"}],
                extra_headers={"X-Warden-Context-Customer-Id": ANN},
            )
        # The console says the state store's part is still owed.
        await _console_erase(warden, ANN, done="erase-pending")
    rows = state.rows("SELECT status, decided_by, arguments FROM approvals")
    assert rows == [("rejected", "erasure", '{"erased":true}')]
    # Not all done: the record says the state store's part is owed, and it stays noted.
    (erasure,) = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "erasure"]
    assert erasure["body"]["state"] is None
