"""A non-streaming caller that hangs up before its answer is decided, through the real proxy.

The answer's tool calls must not be decided for nobody, nor hold budget a
cap would then refuse to people still there; the model call's outcome says
``client_disconnected`` (as a stream cut does), never a clean 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.pg import PgServer
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply, last_user_text

CAP: dict[str, Any] = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}
GONE = "client_disconnected"


def refund(order: str, **reply: Any) -> Reply:
    return Reply(tool_calls=[Call("issue_refund", {"order_id": order, "amount": 100})], **reply)


def client(warden: Warden, timeout: float) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=timeout
    )


def allow_all(tmp_path: Path) -> dict[str, Any]:
    """A policy that allows everything: the cap alone counts."""
    folder = tmp_path / "allow-all"
    folder.mkdir()
    (folder / "policy.rego").write_text(
        'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'
    )
    return {"bundles": [str(folder)], "queue_timeout_s": 30}


async def wait_for(
    tmp_path: Path, found: Callable[[list[dict[str, Any]]], bool], within: float = 20
) -> list[Any]:
    """The audit records once ``found`` holds of them (outcomes come in the background),
    or as they are after ``within`` seconds, for the assertions to tell what is missing."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not found(audit_records(tmp_path / "audit")):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    return audit_records(tmp_path / "audit")


def outcomes(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "outcome" and r["action"]["kind"] == kind]


def refund_decisions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r for r in records if r["kind"] == "decision" and r["action"].get("tool") == "issue_refund"
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"url": f"sqlite:///{tmp_path}/state.db"}
    server: PgServer = request.getfixturevalue("pg_server")
    return {"url": request.getfixturevalue("pg_url"), "password_file": str(server.password_file)}


def held(tmp_path: Path, state: dict[str, Any]) -> tuple[float, int]:
    """What the refunds cap holds now: reserved in all, and open reservations."""
    counters = "SELECT coalesce(sum(reserved), 0) FROM budget_counters"
    rows = "SELECT count(*) FROM budget_reservations"
    url = str(state["url"])
    if url.startswith("sqlite"):
        with sqlite3.connect(tmp_path / "state.db") as conn:
            return float(conn.execute(counters).fetchone()[0]), conn.execute(rows).fetchone()[0]
    with psycopg.connect(url, password=Path(state["password_file"]).read_text().strip()) as conn:
        reserved = conn.execute(counters).fetchone()
        count = conn.execute(rows).fetchone()
        assert reserved is not None
        assert count is not None
        return float(reserved[0]), int(count[0])


async def test_a_caller_gone_before_the_answer_gets_no_calls_decided(
    tmp_path: Path, llm: MockLLM, state: dict[str, Any]
) -> None:
    llm.on_request(
        lambda _p, body: (
            refund("S-1", fault=Fault("delay", seconds=2.0))
            if "slow" in last_user_text(body)
            else refund("F-1")
        )
    )
    config = make_config(
        tmp_path, llm.url, budgets={"caps": [CAP]}, policy=allow_all(tmp_path), state=state
    )
    async with Warden(config) as warden:
        async with client(warden, timeout=0.5) as c:
            with pytest.raises(openai.APITimeoutError):
                await c.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "slow refund"}]
                )
        # The upstream answers 2 s later, to nobody.
        records = await wait_for(tmp_path, lambda rs: bool(outcomes(rs, "llm_call")))
        (gone,) = outcomes(records, "llm_call")
        assert gone["outcome"]["error"] == GONE  # was a clean 200
        assert refund_decisions(records) == []  # was decided (and reserved) for nobody
        assert held(tmp_path, state) == (0.0, 0)

        # A caller still there gets its refund, decided and held as ever.
        async with client(warden, timeout=30) as c:
            answer = await c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "refund please"}]
            )
        (tool_call,) = answer.choices[0].message.tool_calls or []
        assert tool_call.type == "function"
        assert tool_call.function.name == "issue_refund"
        records = await wait_for(tmp_path, lambda rs: len(outcomes(rs, "llm_call")) == 2)
        assert outcomes(records, "llm_call")[1]["outcome"].get("error") is None
        assert len(refund_decisions(records)) == 1
        assert held(tmp_path, state) == (100.0, 1)


async def test_a_caller_gone_while_its_calls_are_decided_holds_nothing(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The state store is locked as the answer comes back, so the refund's reservation
    # waits for it; the caller gives up meanwhile, and the lock then goes.
    state = {"url": f"sqlite:///{tmp_path}/state.db"}
    lock = sqlite3.connect(tmp_path / "state.db", isolation_level=None, timeout=10)

    def reply(_protocol: str, _body: Any) -> Reply:
        lock.execute("BEGIN IMMEDIATE")
        return refund("L-1")

    llm.on_request(reply)
    config = make_config(
        tmp_path, llm.url, budgets={"caps": [CAP]}, policy=allow_all(tmp_path), state=state
    )
    try:
        async with Warden(config) as warden:
            async with client(warden, timeout=1.0) as c:
                with pytest.raises(openai.APITimeoutError):
                    await c.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "refund"}]
                    )
            await asyncio.sleep(0.3)  # the hang-up reaches Warden
            lock.execute("ROLLBACK")
            records = await wait_for(
                tmp_path,
                lambda rs: bool(outcomes(rs, "llm_call")) and bool(outcomes(rs, "tool_call")),
                within=10,
            )
            (decided,) = refund_decisions(records)
            assert decided["decision"]["effect"] == "allow"
            # Was none: the call held its budget until the reservation expired.
            (undelivered,) = outcomes(records, "tool_call")
            assert undelivered["decision_id"] == decided["decision"]["id"]
            assert undelivered["outcome"]["error"] == GONE
            assert outcomes(records, "llm_call")[0]["outcome"]["error"] == GONE
            # What the refund reserved went back: the agent never got the call.
            async with asyncio.timeout(10):
                while held(tmp_path, state) != (0.0, 0):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
