"""Three ``warden serve`` processes share one real PostgreSQL, as the sidecars of a fleet do.

Each sidecar is its own operating-system process with its own config file,
audit directory and listeners; all three keep their state in one database and
ship their audit logs to it (``audit.ship``). The agent side is the official
openai SDK, the upstream is warden.testing's mock LLM (in the test process),
and approvals and kill switches go through each sidecar's admin API. This is
issue 13's fleet scenario end to end: a cap holds across the fleet, an
approval raised on A is decided through B, a kill switch thrown through C cuts
a stream on A, and the central store verifies every sidecar's chain. A second
test runs the fleet on a PostgreSQL server of its own and stops and restarts it
mid-run (issue 13's outage points).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import openai
import orjson
import pytest
import yaml

from tests import pg
from tests.functional.test_audit_ship_functional import pg_start, pg_stop
from tests.pg import APP_PASSWORD, PgServer
from tests.sdk_calls import function_calls
from warden.audit.verify import iter_records
from warden.testing import Call, Fault, MockLLM, Reply, last_user_text

# A kill switch must reach another sidecar within 1 s: run alone, not beside other tests.
pytestmark = pytest.mark.serial

AGENT = "support-triage"
TOKEN = "fleet-process-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLICY = """package warden

import rego.v1

default decision := {"effect": "allow"}

decision := {"effect": "require_approval", "reasons": ["closing needs a person"]} if {
    input.action.tool == "close_account"
}
"""
CAP = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}
START_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class Sidecar:
    """One running ``warden serve`` process and where it listens."""

    name: str
    proc: asyncio.subprocess.Process
    proxy_url: str
    admin_url: str
    audit_dir: Path
    log: Path

    def client(self, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, **kw
        )

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(headers=AUTH) as http,
            http.request(method, self.admin_url + path, json=body) as resp,
        ):
            return resp.status, await resp.json()


def sidecar_config(
    tmp_path: Path,
    name: str,
    llm: MockLLM,
    pg_server: PgServer,
    pg_url: str,
    policy: Path,
    state: Mapping[str, Any] | None = None,
    ship: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One sidecar's warden.yaml: its own ports and audit log, the fleet's database;
    ``state`` and ``ship`` add settings to those sections."""
    password_file = str(pg_server.password_file)
    return {
        "agent": {"id": AGENT},
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "upstreams": {"openai": {"protocol": "openai", "base_url": llm.url, "timeout_s": 10}},
        "policy": {"bundles": [str(policy)], "workers": 1, "watch": False, "deadline_ms": 5000},
        "budgets": {"caps": [CAP]},
        "approvals": {"mode": "hold", "hold_timeout_s": 30, "keepalive_s": 0.2},
        "admin": {
            "tokens": [
                {
                    "subject": "dana",
                    "roles": ["admin", "approver"],
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                }
            ]
        },
        "state": {"url": pg_url, "password_file": password_file, **(state or {})},
        "audit": {
            "dir": str(tmp_path / name / "audit"),
            "ship": {
                "url": pg_url,
                "password_file": password_file,
                "interval_s": 0.05,
                **(ship or {}),
            },
        },
        "shutdown_grace_s": 5,
    }


def replies(llm: MockLLM) -> None:
    """Refunds of 50, an account closing (held for approval), or a stream that hangs."""

    def reply(_proto: str, body: Any) -> Reply:
        text = last_user_text(body)
        if "close" in text:
            return Reply(tool_calls=[Call("close_account", {"customer_id": "C-1"})])
        if "stream" in text:
            return Reply(text="one two three four five six", fault=Fault("hang", after=3))
        return Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 50})])

    llm.on_request(reply)


def child_env() -> dict[str, str]:
    """This environment without WARDEN_* settings: each sidecar reads only its file."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


async def drain(chunks: AsyncIterator[Any]) -> None:
    """Read a stream to its end (or its error)."""
    async for _ in chunks:
        pass


async def listening(log: Path, proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """The proxy and admin URLs from ``warden serve``'s start line on stderr."""
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            for line in read_log(log).splitlines():
                if line.startswith("warden ") and " proxy " in line:
                    words = line.split()
                    return words[words.index("proxy") + 1], words[words.index("admin") + 1]
            if proc.returncode is not None:
                raise AssertionError(f"warden serve exited {proc.returncode}:\n{read_log(log)}")
            await asyncio.sleep(0.05)


async def ready(admin_url: str) -> None:
    async with asyncio.timeout(START_TIMEOUT_S), aiohttp.ClientSession() as http:
        while True:
            async with http.get(admin_url + "/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)


async def stop(sidecar: Sidecar) -> int:
    """SIGTERM, as Kubernetes stops a pod; the exit status."""
    if sidecar.proc.returncode is None:
        sidecar.proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(sidecar.proc.wait(), 30)
    except TimeoutError:
        sidecar.proc.kill()
        await sidecar.proc.wait()
        raise AssertionError(f"{sidecar.name} did not stop:\n{read_log(sidecar.log)}") from None


@asynccontextmanager
async def running_fleet(
    tmp_path: Path,
    llm: MockLLM,
    pg_server: PgServer,
    pg_url: str,
    state: Mapping[str, Any] | None = None,
    ship: Mapping[str, Any] | None = None,
) -> AsyncIterator[Callable[[], Any]]:
    """Yields ``start``, which starts three sidecar processes (A, B, C) at once on
    ``pg_url``; any still running are stopped (SIGTERM) on leaving."""
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(POLICY)
    replies(llm)
    started: list[Sidecar] = []

    async def start_one(name: str) -> Sidecar:
        folder = tmp_path / name
        folder.mkdir()
        config = folder / "warden.yaml"
        config.write_text(
            yaml.safe_dump(
                sidecar_config(tmp_path, name, llm, pg_server, pg_url, policy, state, ship)
            )
        )
        log = folder / "serve.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "warden.cli",
                "serve",
                "--config",
                str(config),
                cwd=folder,
                env=child_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        try:
            proxy, admin = await listening(log, proc)
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        sidecar = Sidecar(name, proc, proxy, admin, folder / "audit", log)
        started.append(sidecar)
        return sidecar

    async def start() -> list[Sidecar]:
        # Together, as a rollout starts them: the schema migration is serialized.
        results = await asyncio.gather(
            *(start_one(n) for n in ("a", "b", "c")), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the started ones are stopped by the fixture
        sidecars = [r for r in results if isinstance(r, Sidecar)]
        await asyncio.gather(*(ready(s.admin_url) for s in sidecars))
        return sidecars

    async with AsyncExitStack() as stack:
        stack.push_async_callback(lambda: asyncio.gather(*(stop(s) for s in started)))
        yield start


@pytest.fixture
async def fleet(
    tmp_path: Path, llm: MockLLM, pg_server: PgServer, pg_url: str
) -> AsyncIterator[Callable[[], Any]]:
    """Three sidecar processes on the session's PostgreSQL (see :func:`running_fleet`)."""
    async with running_fleet(tmp_path, llm, pg_server, pg_url) as start:
        yield start


def central_verify(pg_server: PgServer, pg_url: str) -> dict[str, Any]:
    """``warden audit verify --url`` as an operator runs it: its own process, JSON out."""
    done = subprocess.run(  # noqa: S603 - fixed arguments
        [
            sys.executable,
            "-m",
            "warden.cli",
            "audit",
            "verify",
            "--url",
            pg_url,
            "--password-file",
            str(pg_server.password_file),
            "--json",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = orjson.loads(done.stdout)
    return report


async def test_three_warden_processes_share_caps_approvals_kill_switches_and_audit(
    fleet: Callable[[], Any], pg_server: PgServer, pg_url: str
) -> None:
    a, b, c = await fleet()
    clients = [s.client(timeout=60) for s in (a, b, c)]
    try:
        # 1. 60 concurrent refunds of 50 over the three, against a cap of 500: exactly 10.
        message: Any = [{"role": "user", "content": "refund please"}]
        completions = await asyncio.gather(
            *(
                clients[i % 3].chat.completions.create(model="gpt-4o-mini", messages=message)
                for i in range(60)
            )
        )
        delivered = [x for x in completions if function_calls(x.choices[0].message)]
        assert len(delivered) == 10
        blocked = [x.choices[0].message.content or "" for x in completions if x not in delivered]
        assert len(blocked) == 50
        assert all("refunds cap" in text for text in blocked), blocked[:3]

        # 2. An approval held on A, approved through B's admin API: A's agent gets the call.
        close: Any = [{"role": "user", "content": "close the account"}]
        agent = asyncio.ensure_future(
            clients[0].chat.completions.create(model="gpt-4o-mini", messages=close)
        )
        async with asyncio.timeout(15):
            while True:
                _, body = await b.admin("GET", "/v1/approvals?status=pending")
                if body["approvals"]:
                    break
                await asyncio.sleep(0.05)
        (item,) = body["approvals"]
        assert item["tool"] == "close_account"
        assert not agent.done()  # A still holds the agent's request
        status, _ = await b.admin("POST", f"/v1/approvals/{item['id']}/approve", {})
        assert status == 200
        # Released by the change feed, well before the waiter's 5 s backstop re-read.
        async with asyncio.timeout(3):
            completion = await agent
        calls = function_calls(completion.choices[0].message)
        assert [t.function.name for t in calls] == ["close_account"]

        # 3. A kill switch thrown through C cuts a live stream on A within 1 s.
        stream_msg: Any = [{"role": "user", "content": "stream a story"}]
        stream = await clients[0].chat.completions.create(
            model="gpt-4o-mini", messages=stream_msg, stream=True
        )
        chunks = aiter(stream)
        async with asyncio.timeout(10):
            await anext(chunks)  # the stream is live; the upstream then hangs
        thrown = time.monotonic()
        kill = {"scope": "agent", "target": AGENT, "reason": "incident 9"}
        status, _ = await c.admin("POST", "/v1/killswitches", kill)
        assert status == 201
        with pytest.raises(openai.APIError, match="incident 9"):
            await asyncio.wait_for(drain(chunks), 1)
        cut_after = time.monotonic() - thrown
        assert cut_after < 1
        _, switches = await a.admin("GET", "/v1/killswitches")
        assert [s["target"] for s in switches["killswitches"]] == [AGENT]
    finally:
        for client in clients:
            await client.close()

    # 4. A graceful stop ships each sidecar's last records and final checkpoint;
    # central verify then passes for all three logs, each holding its whole local log.
    assert [await stop(s) for s in (a, b, c)] == [0, 0, 0]
    local = {s.name: len(list(iter_records(s.audit_dir))) for s in (a, b, c)}
    assert all(count > 0 for count in local.values())
    report = central_verify(pg_server, pg_url)
    assert report["ok"] is True
    logs = report["logs"]
    assert len(logs) == 3
    assert all(log["ok"] and not log["damage"] for log in logs)
    assert sorted(log["records"] for log in logs) == sorted(local.values())
    assert all(log["latest_checkpoint"] == log["records"] for log in logs)
    for sidecar in (a, b, c):
        assert APP_PASSWORD not in read_log(sidecar.log)


# -- a PostgreSQL outage -----------------------------------------------------------------------

REFUND: Any = [{"role": "user", "content": "refund please"}]
ROOM = 10  # the cap's 500 holds ten refunds of 50


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server for one test, which it may stop and start again."""
    found = pg.start()
    if isinstance(found, str):
        pytest.skip(found)
    try:
        yield found
    finally:
        found.stop()


async def readyz(sidecar: Sidecar) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(sidecar.admin_url + "/readyz") as resp,
    ):
        return resp.status, await resp.json()


async def wait_ready(sidecar: Sidecar, check: Callable[[Any], bool], seconds: float = 20) -> Any:
    """Poll ``/readyz`` until ``check`` holds for its body; the last status and body."""
    async with asyncio.timeout(seconds):
        while True:
            status, body = await readyz(sidecar)
            if check(body):
                return status, body
            await asyncio.sleep(0.05)


async def refund(client: openai.AsyncOpenAI) -> tuple[bool, str]:
    """One refund through a sidecar: whether the call was delivered, and the refusal text."""
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=REFUND)
    message = completion.choices[0].message
    return bool(function_calls(message)), message.content or ""


def central_logs(server: PgServer, db: str) -> list[list[tuple[int, bytes]]]:
    """Every log's ``(idx, line)`` rows in the central store."""
    with server.admin(db) as conn:
        rows = conn.execute(
            "SELECT log_id, idx, line FROM audit_records ORDER BY log_id, idx"
        ).fetchall()
    logs: dict[object, list[tuple[int, bytes]]] = {}
    for log_id, idx, line in rows:
        logs.setdefault(log_id, []).append((int(cast("int", idx)), bytes(cast("bytes", line))))
    return list(logs.values())


async def test_three_warden_processes_ride_out_a_postgresql_outage(
    tmp_path: Path, llm: MockLLM, own_pg: PgServer
) -> None:
    db = own_pg.create_database()
    url = own_pg.url(db)
    state = {"pool_timeout_s": 0.5}
    ship = {"max_backoff_s": 0.3}
    async with running_fleet(tmp_path, llm, own_pg, url, state, ship) as start:
        sidecars: list[Sidecar] = await start()
        clients = [s.client(timeout=30) for s in sidecars]
        try:
            # 1. One refund through each sidecar: all three delivered.
            delivered = sum([ok for ok, _ in [await refund(c) for c in clients]])
            assert delivered == 3

            # 2. PostgreSQL stops. Every sidecar reports its state down (degraded, still
            # serving) and refuses every refund with the reason; the refusals spool locally.
            await asyncio.to_thread(pg_stop, own_pg)
            for sidecar in sidecars:
                status, body = await wait_ready(sidecar, lambda b: not b["state"]["up"])
                assert status == 200
                assert (body["state"]["backend"], body["state"]["up"]) == ("postgresql", False)
            down = await asyncio.gather(*(refund(clients[i % 3]) for i in range(9)))
            assert not any(ok for ok, _ in down), down
            assert all("state store is unavailable" in text for _, text in down), down
            for sidecar in sidecars:
                _, body = await wait_ready(
                    sidecar,
                    lambda b: (
                        not b["audit"]["ship"]["connected"]
                        and b["audit"]["ship"]["lag_records"] > 0
                    ),
                )

            # 3. PostgreSQL is back: the cap's remaining room is delivered, never more.
            await asyncio.to_thread(pg_start, own_pg)
            for sidecar in sidecars:
                await wait_ready(sidecar, lambda b: b["state"]["up"])
            capped: set[int] = set()
            async with asyncio.timeout(20):
                while len(capped) < 3:
                    results = await asyncio.gather(*(refund(clients[i % 3]) for i in range(9)))
                    for i, (ok, text) in enumerate(results):
                        if ok:
                            delivered += 1
                        elif "refunds cap" in text:
                            capped.add(i % 3)
                        else:
                            assert "unavailable" in text, text
            assert delivered == ROOM
            after = await asyncio.gather(*(refund(clients[i % 3]) for i in range(6)))
            assert not any(ok for ok, _ in after)
            assert all("refunds cap" in text for _, text in after), after

            # 4. Shipping catches up on every sidecar: connected, nothing left to send.
            for sidecar in sidecars:
                await wait_ready(
                    sidecar,
                    lambda b: (
                        b["audit"]["ship"]["connected"] and not b["audit"]["ship"]["lag_records"]
                    ),
                )
        finally:
            for client in clients:
                await client.close()

        # 5. SIGTERM; the central store then holds every sidecar's whole local log, byte
        # for byte, and verifies; the cap's counter never went past its limit.
        assert [await stop(s) for s in sidecars] == [0, 0, 0]
    local = [list(iter_records(s.audit_dir)) for s in sidecars]
    central = central_logs(own_pg, db)
    assert len(central) == 3
    assert sorted(central) == sorted(local)  # no acknowledged record is missing
    report = central_verify(own_pg, url)
    assert report["ok"] is True
    logs = report["logs"]
    assert len(logs) == 3
    assert all(log["ok"] and not log["damage"] for log in logs)
    assert sorted(log["records"] for log in logs) == sorted(len(x) for x in local)
    assert all(log["latest_checkpoint"] == log["records"] for log in logs)
    with own_pg.admin(db) as conn:
        spent = conn.execute("SELECT spent + reserved FROM budget_counters").fetchall()
    assert spent == [(500.0,)]
    for sidecar in sidecars:
        assert APP_PASSWORD not in read_log(sidecar.log)
