"""The console tells its users what happened: over HTTP, against a real Warden on loopback.

Damage said as damage (not "no such record"), a kill switch at a name never
seen, a state store that is down, search pages past the first, a form sent
after the session ended, a held decision's approval and follow-up, an empty
evidence period and a quorum's votes. The agent is the openai SDK; the
people sign in through the console's own form.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import openai
import pytest
from google.protobuf import struct_pb2

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_console_http_functional import browser_like
from tests.pg import PgServer
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

TOKENS = {
    "vic": "tok-usable-viewer",
    "dana": "tok-usable-approver",
    "dora": "tok-usable-approver-2",
    "olga": "tok-usable-approver-billing",
    "aude": "tok-usable-auditor",
    "ada": "tok-usable-admin",
}
ROLES = {
    "vic": "viewer",
    "dana": "approver",
    "dora": "approver",
    "olga": "approver",
    "aude": "auditor",
    "ada": "admin",
}
SMALL = Call("issue_refund", {"order_id": "A-1001", "amount": 20, "currency": "USD"})
BIG = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
REFUND_CAP = {"name": "refunds", "tool": "issue_refund", "value": "amount", "limit": 5000}


def config(tmp_path: Path, llm: MockLLM, **over: Any) -> Any:
    tokens = [
        {
            "subject": who,
            "roles": [ROLES[who]],
            # The shipped policy asks support leads; olga is in billing.
            "groups": ["billing" if who == "olga" else "support-leads"],
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
        }
        for who, token in TOKENS.items()
    ]
    return make_config(tmp_path, llm.url, admin={"tokens": tokens}, **over)


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    async with Warden(config(tmp_path, llm)) as running:
        yield running


async def sign_in(http: aiohttp.ClientSession, warden: Warden, who: str) -> str:
    """Sign in through the form; the CSRF token of the first page."""
    async with http.get(f"{warden.admin_url}/console/login") as resp:
        nonce = re.search(r'name="nonce" value="([^"]+)"', await resp.text())
    assert nonce is not None
    async with http.post(
        f"{warden.admin_url}/console/login",
        data={"nonce": nonce.group(1), "token": TOKENS[who]},
    ) as resp:
        assert resp.status == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert csrf is not None
    return csrf.group(1)


async def ask(warden: Warden, llm: MockLLM, *calls: Call) -> openai.types.chat.ChatCompletion:
    """One model call of the agent's through Warden; the model proposes ``calls``."""
    llm.script(Reply(tool_calls=list(calls)) if calls else Reply(text="hello"))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        return await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "refund please"}]
        )


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def rows(http: aiohttp.ClientSession, warden: Warden, query: str) -> list[dict[str, Any]]:
    async with http.get(f"{warden.admin_url}/console/api/decisions?{query}") as resp:
        assert resp.status == 200
        found: list[dict[str, Any]] = (await resp.json())["rows"]
        return found


async def test_a_tampered_or_unreadable_log_is_said_so_not_shown_as_a_missing_record(
    tmp_path: Path, warden: Warden, llm: MockLLM
) -> None:
    await ask(warden, llm, SMALL)
    async with browser_like() as http:
        await sign_in(http, warden, "aude")
        [refund] = await rows(http, warden, "tool=issue_refund")
        seq = refund["seq"]
        record = f"{warden.admin_url}/console/evidence/records/{seq}"
        detail = f"{warden.admin_url}/console/decisions/{seq}"
        assert (await get(http, record))[0] == 200
        # A same-length edit of the refund's amount, as someone with the disk could make.
        [segment] = (tmp_path / "audit" / "segments").iterdir()
        data = segment.read_bytes()
        assert data.count(b'"amount":20,') == 1
        segment.write_bytes(data.replace(b'"amount":20,', b'"amount":90,'))
        for url in (record, detail):
            status, page = await get(http, url)
            assert status == 500
            assert f"The audit log is damaged at record #{seq}" in page
            assert "<code>warden audit verify</code>" in page
            assert "no such" not in page
        status, page = await get(http, f"{warden.admin_url}/console/evidence/records/999999")
        assert (status, "no such record" in page) == (404, True)  # past the log: missing
        # The log's folder gone (a volume unmounted): unreadable, for now.
        (tmp_path / "audit" / "segments").rename(tmp_path / "audit" / "segments.away")
        try:
            status, page = await get(http, record)
        finally:
            (tmp_path / "audit" / "segments.away").rename(tmp_path / "audit" / "segments")
        assert status == 503
        assert f"The audit log is unreadable at record #{seq}" in page


async def test_a_kill_switch_at_a_name_never_seen_is_thrown_and_said_to_stop_nothing(
    warden: Warden, llm: MockLLM
) -> None:
    await ask(warden, llm)
    ops = f"{warden.admin_url}/console/operations"
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "ada")
        _, page = await get(http, ops)
        # The Target field suggests the agents, tools and upstreams this Warden knows.
        assert 'list="switch-targets"' in page
        for name, scope in (
            ("support-triage", "agent"),
            ("search_kb", "tool"),
            ("openai", "upstream"),
        ):
            assert f'<option value="{name}" label="{name} ({scope})">' in page
        form = {"csrf": csrf, "scope": "agent", "target": "support-traige", "reason": "typo"}
        async with http.post(f"{ops}/killswitches", data=form) as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "The kill switch is in force." in page
        assert "no agent named “support-traige” has been seen by this Warden" in page
        assert "(no such agent seen)" in page
        assert warden.killswitches is not None
        assert [s.target for s in warden.killswitches.active()] == ["support-traige"]
        form = {**form, "target": "support-triage", "reason": "incident 7"}
        async with http.post(f"{ops}/killswitches", data=form) as resp:
            page = await resp.text()
        assert "The kill switch is in force." in page
        assert "has been seen" not in page


async def test_engine_health_says_degraded_and_names_a_state_store_that_is_down(
    tmp_path: Path, llm: MockLLM, pg_server: PgServer, pg_url: str
) -> None:
    state = {"url": pg_url, "password_file": str(pg_server.password_file)}
    cfg = config(tmp_path, llm, state=state, budgets={"caps": [REFUND_CAP]})
    async with Warden(cfg) as running, browser_like() as http:
        await sign_in(http, running, "ada")
        _, page = await get(http, f"{running.admin_url}/console/operations")
        assert 'class="ready" role="status">Ready<' in page
        dbname = pg_url.rsplit("/", 1)[1]
        with pg_server.admin() as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
        try:
            await ask(running, llm, SMALL)  # its cap needs the store: the call finds it down
            ready, _ = running.readiness()
            status, page = await get(http, f"{running.admin_url}/console/operations")
        finally:
            with pg_server.admin() as conn:
                conn.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
    assert ready  # /readyz stays ready (ADR 0009): only the page can say it is degraded
    assert status == 200
    assert 'class="degraded" role="status">Degraded: the state store (postgresql)' in page


async def test_evidence_search_pages_past_its_first_fifty_records(
    warden: Warden, llm: MockLLM
) -> None:
    for _ in range(35):
        # A decision and an outcome each; the newest outcomes may reach the index after
        # the first page is read, so 70 records leave the second page 10 whatever.
        await ask(warden, llm)
    async with browser_like() as http:
        await sign_in(http, warden, "aude")
        _, first = await get(http, f"{warden.admin_url}/console/evidence?agent=support-triage")
        link = re.search(r'href="(/console/evidence\?[^"]+)" rel="next">Older records', first)
        assert link is not None
        _, second = await get(http, warden.admin_url + link[1].replace("&amp;", "&"))
    shown = re.compile(r'<a href="/console/evidence/records/(\d+)">')
    one, two = shown.findall(first), shown.findall(second)
    assert len(one) == 50
    assert len(two) >= 10
    assert max(map(int, two)) < min(map(int, one))  # older, none twice
    assert 'rel="first">Newest' in second


async def test_a_form_sent_after_the_session_ended_leads_back_through_sign_in(
    warden: Warden,
) -> None:
    decide = f"{warden.admin_url}/console/approvals/apr_1/decide"
    page_like = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
    async with browser_like() as http:
        async with http.post(
            decide,
            data={"csrf": "gone", "verdict": "approve", "comment": "ok"},
            headers=page_like,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303
            where = urllib.parse.urlsplit(resp.headers["Location"])
        assert where.path == "/console/login"
        query = urllib.parse.parse_qs(where.query)
        assert query == {"next": ["/console/approvals"], "lost": ["vote"]}
        async with http.get(f"{warden.admin_url}{resp.headers['Location']}") as resp:
            page = await resp.text()
        assert "Your session ended before your vote reached Warden: it was NOT recorded" in page
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        assert nonce is not None
        form = {"nonce": nonce[1], "token": TOKENS["dana"], "next": "/console/approvals"}
        async with http.post(
            f"{warden.admin_url}/console/login", data=form, allow_redirects=False
        ) as resp:
            assert resp.headers["Location"] == "/console/approvals"  # back to the queue
    # Only a view is a place to return to; a script's POST still gets a plain 401.
    async with browser_like() as http:
        _, page = await get(http, f"{warden.admin_url}/console/login?next=https://evil.example")
        assert "evil" not in page
        async with http.post(decide, data={"verdict": "approve"}) as resp:
            assert resp.status == 401


async def test_a_held_decision_lists_its_approval_records_and_links_its_follow_up(
    warden: Warden, llm: MockLLM
) -> None:
    held = await ask(warden, llm, BIG)  # deferred: the agent is told to retry once approved
    assert not held.choices[0].message.tool_calls
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "dana")
        _, queue = await get(http, f"{warden.admin_url}/console/approvals")
        card = re.search(r'aria-label="Approval (apr_[^"]+)"', queue)
        assert card is not None
        approval_id = card[1]
        link = re.search(r'<a href="(/console/decisions/id/(dec_[^"]+))">', queue)
        assert link is not None
        decision_id = link[2]
        async with http.get(warden.admin_url + link[1], allow_redirects=False) as resp:
            assert resp.status == 303
            held_page = resp.headers["Location"]
        async with http.post(
            f"{warden.admin_url}/console/approvals/{approval_id}/decide",
            data={"csrf": csrf, "verdict": "approve", "comment": "checked"},
        ) as resp:
            assert resp.status == 200
        retried = await ask(warden, llm, BIG)  # the very call: it passes once
        assert retried.choices[0].message.tool_calls
        [follow_up] = [
            r for r in await rows(http, warden, "tool=issue_refund") if r["effect"] == "allow"
        ]
        status, page = await get(http, warden.admin_url + held_page)
    assert status == 200
    assert f"Decision {decision_id}" in page
    assert 'aria-label="Approval records"' in page
    assert page.count(approval_id) >= 2  # asked for, and dana's vote
    assert "<td>dana</td><td>approved</td><td>checked</td>" in page
    assert f'<a href="/console/decisions/{follow_up["seq"]}">{follow_up["decision_id"]}</a>' in page
    assert "<p>None.</p>" not in page


async def test_an_empty_period_is_said_and_a_package_is_named_by_its_days(
    warden: Warden, llm: MockLLM
) -> None:
    await ask(warden, llm)
    export = f"{warden.admin_url}/console/evidence/export"
    today = dt.datetime.now(dt.UTC).date().isoformat()
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "aude")
        form = {"csrf": csrf, "from": "2020-01-01", "to": "2020-01-02", "export_agent": ""}
        async with http.post(export, data=form) as resp:
            assert resp.content_type == "text/html"
            page = await resp.text()
        assert "No records from 2020-01-01 to 2020-01-02 (UTC days)" in page
        assert "Download the empty package" in page
        async with http.post(export, data={**form, "empty": "ok"}) as resp:
            assert resp.content_type == "application/zip"
            assert (
                'filename="evidence-2020-01-01-2020-01-02.zip"'
                in resp.headers["Content-Disposition"]
            )
        async with http.post(export, data={**form, "from": today, "to": today}) as resp:
            assert resp.content_type == "application/zip"
            # The day asked for, not the next midnight the period runs to.
            name = f'filename="evidence-{today}-{today}.zip"'
            assert name in resp.headers["Content-Disposition"]


async def test_a_quorum_card_shows_who_voted_and_no_buttons_to_those_who_cannot_vote(
    tmp_path: Path, llm: MockLLM
) -> None:
    cfg = config(tmp_path, llm, approvals={"mode": "defer", "required_approvals": 2})
    async with Warden(cfg) as running:
        await ask(running, llm, BIG)
        queue = f"{running.admin_url}/console/approvals"
        async with browser_like() as http:
            csrf = await sign_in(http, running, "dana")
            _, page = await get(http, queue)
            card = re.search(r'aria-label="Approval (apr_[^"]+)"', page)
            assert card is not None
            async with http.post(
                f"{queue}/{card[1]}/decide",
                data={"csrf": csrf, "verdict": "approve", "comment": "looks right"},
            ) as resp:
                page = await resp.text()
        assert "Your approval is recorded." in page
        assert "dana approved at " in page
        assert 'value="approve"' not in page
        assert "it waits for 1 more approval(s) from others" in page
        async with browser_like() as http:
            await sign_in(http, running, "olga")
            _, outside = await get(http, queue)
        assert 'value="approve"' not in outside
        assert "Only members of support-leads may decide this" in outside
        async with browser_like() as http:
            await sign_in(http, running, "dora")
            _, other = await get(http, queue)
        assert 'value="approve"' in other


async def throw(http: aiohttp.ClientSession, warden: Warden, csrf: str, target: str) -> str:
    """An upstream kill switch thrown through the Operations form; the page it answers."""
    form = {"csrf": csrf, "scope": "upstream", "target": target, "reason": "incident 9"}
    async with http.post(f"{warden.admin_url}/console/operations/killswitches", data=form) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert "The kill switch is in force." in page
    return page


async def test_a_switch_at_a_doors_own_or_a_seen_upstream_is_not_said_to_stop_nothing(
    tmp_path: Path, llm: MockLLM
) -> None:
    # An upstream this Warden once served: its decisions stay in the log after the
    # configuration no longer names it.
    legacy = {"legacy": {"protocol": "openai", "base_url": llm.url, "timeout_s": 5}}
    async with Warden(config(tmp_path, llm, upstreams=legacy)) as before:
        llm.script(Reply(text="hello"))
        async with openai.AsyncOpenAI(
            base_url=f"{before.proxy_url}/legacy/v1", api_key="sk-test", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    cfg = config(tmp_path, llm, listen={"grpc": "127.0.0.1:0"})
    async with Warden(cfg) as running, browser_like() as http:
        csrf = await sign_in(http, running, "ada")
        _, page = await get(http, f"{running.admin_url}/console/operations")
        assert '<option value="grpc" label="grpc (upstream)">' in page
        # The gRPC door's checks are upstream `grpc` (docs/grpc.md): the switch stops them.
        page = await throw(http, running, csrf, "grpc")
        assert "no upstream named" not in page
        assert "(no such upstream" not in page
        arguments = struct_pb2.Struct()
        arguments.update({"query": "refund policy"})
        async with grpc.aio.insecure_channel(running.grpc_address) as channel:
            checked = await pb_grpc.GovernanceStub(channel).Check(
                pb.CheckRequest(action=pb.Action(tool="search_kb", arguments=arguments))
            )
        assert checked.effect == pb.EFFECT_DENY
        assert "stops upstream grpc" in checked.reason
        page = await throw(http, running, csrf, "envoy")  # ext_authz without an upstream
        assert "no upstream named" not in page
        page = await throw(http, running, csrf, "legacy")  # seen in the log's decisions
        assert "no upstream named" not in page
        # A name no door, configuration or decision here knows: said, but not "stops
        # nothing" (an MCP wrap sharing the state store may run under any name).
        page = await throw(http, running, csrf, "opneai")
        assert "no upstream named “opneai” is configured here" in page
        assert "warden mcp wrap" in page
        assert "stops nothing" not in page
        assert 'opneai <span class="warn">(no such upstream here)</span>' in page
        assert page.count("(no such upstream here)") == 1


def named_after(identifier: str) -> Call:
    """A call to a tool named after ``identifier``: the shipped policy's denial quotes
    an unknown tool's name in its reason."""
    return Call(identifier, {"q": 1})


async def test_an_agent_naming_ids_in_its_calls_hides_no_decision_and_no_follow_up(
    warden: Warden, llm: MockLLM
) -> None:
    await ask(warden, llm, BIG)  # deferred
    admin = warden.admin_url
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "dana")
        _, queue = await get(http, f"{admin}/console/approvals")
        card = re.search(r'aria-label="Approval (apr_[^"]+)"', queue)
        link = re.search(r'<a href="(/console/decisions/id/(dec_[^"]+))">', queue)
        assert card is not None
        assert link is not None
        approval_id, decision_id = card[1], link[2]
        for _ in range(6):
            await ask(warden, llm, named_after(decision_id))
        # The reasons now quote the id six times; the card's link still finds the decision.
        assert any(decision_id in (r["reason"] or "") for r in await rows(http, warden, ""))
        async with http.get(admin + link[1], allow_redirects=False) as resp:
            assert resp.status == 303
            held_page = resp.headers["Location"]
        async with http.post(
            f"{admin}/console/approvals/{approval_id}/decide",
            data={"csrf": csrf, "verdict": "approve", "comment": "checked"},
        ) as resp:
            assert resp.status == 200
        retried = await ask(warden, llm, BIG)
        assert retried.choices[0].message.tool_calls
        [follow_up] = [
            r for r in await rows(http, warden, "tool=issue_refund") if r["effect"] == "allow"
        ]
        for _ in range(6):
            await ask(warden, llm, named_after(approval_id))
        status, page = await get(http, admin + held_page)
    assert status == 200
    assert "Follow-up decisions" in page
    assert f'<a href="/console/decisions/{follow_up["seq"]}">{follow_up["decision_id"]}</a>' in page


async def test_a_held_decision_lists_its_deferral(tmp_path: Path, llm: MockLLM) -> None:
    cfg = config(tmp_path, llm, approvals={"mode": "hold", "keepalive_s": 0.5})
    async with Warden(cfg) as running:
        llm.script(Reply(tool_calls=[BIG]))
        async with openai.AsyncOpenAI(
            base_url=f"{running.proxy_url}/openai/v1", api_key="sk", max_retries=0, timeout=1
        ) as client:
            with pytest.raises(openai.APITimeoutError):
                # The agent gives up waiting: its hold becomes a deferral.
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "refund"}]
                )
        for _ in range(200):
            kinds = [r["kind"] for r in audit_records(tmp_path / "audit")]
            if "approval_deferred" in kinds:
                break
            await asyncio.sleep(0.05)
        assert "approval_deferred" in kinds
        async with browser_like() as http:
            await sign_in(http, running, "aude")
            [held] = await rows(http, running, "tool=issue_refund")
            status, page = await get(http, f"{running.admin_url}/console/decisions/{held['seq']}")
    assert status == 200
    table = re.search(r'aria-label="Approval records".*?</table>', page, re.S)
    assert table is not None
    steps = re.findall(r"<tr><td>[^<]*</td><td>([a-z]+)</td>", table[0])
    assert steps == ["requested", "deferred"]
    assert "<td>deferred</td><td>the request holding it is gone" in table[0]
