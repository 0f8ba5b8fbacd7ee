"""The console over plain HTTP: sign-in, cookies, CSRF, SSO, evidence download, reindex.

What a browser test would only see indirectly is checked here on the wire,
against a real Warden on loopback: the cookie's attributes, the headers of
every kind of answer, refusals of forged and cross-site requests, and the
trusted-header sign-on from an auth proxy.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import re
import sqlite3
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_approvals_api_functional import SNEAKY, SNEAKY_TOOL
from tests.pg import PgServer
from warden.audit.index import DecisionIndex, IndexQuery, default_index_path
from warden.cli_audit import main as audit_main
from warden.console import routes as console_routes
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

TOKENS = {
    "vic": "tok-http-viewer",
    "dana": "tok-http-approver",
    "aude": "tok-http-auditor",
    "ada": "tok-http-admin",
}
ROLES = {"vic": "viewer", "dana": "approver", "aude": "auditor", "ada": "admin"}
SMALL = Call("issue_refund", {"order_id": "A-1001", "amount": 20, "currency": "USD"})


def config(tmp_path: Path, llm: MockLLM, **over: Any) -> Any:
    tokens = [
        {"subject": who, "roles": [ROLES[who]], "sha256": hashlib.sha256(t.encode()).hexdigest()}
        for who, t in TOKENS.items()
    ]
    return make_config(tmp_path, llm.url, admin={"tokens": tokens}, **over)


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    async with Warden(config(tmp_path, llm)) as running:
        yield running


def browser_like() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies from an IP-address host, as browsers do.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def agent_asks(warden: Warden, text: str) -> None:
    """One model call of the agent's through Warden, with the openai SDK."""
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )


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
        page = await resp.text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    return csrf.group(1)


async def test_sign_in_sets_a_strict_http_only_expiring_cookie(warden: Warden) -> None:
    async with browser_like() as http:
        async with http.get(f"{warden.admin_url}/console/login") as resp:
            nonce = re.search(r'name="nonce" value="([^"]+)"', await resp.text())
        assert nonce is not None
        async with http.post(
            f"{warden.admin_url}/console/login",
            data={"nonce": nonce.group(1), "token": TOKENS["vic"]},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/console/"
            cookie = resp.cookies["warden_console"]
        assert cookie["httponly"]
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/console/"
        assert cookie["max-age"] == str(8 * 3600)
        assert not cookie["secure"]  # plain HTTP on loopback; set under TLS
        assert TOKENS["vic"] not in cookie.value


async def test_a_wrong_token_or_a_stale_form_signs_no_one_in(warden: Warden) -> None:
    async with browser_like() as http:
        async with http.get(f"{warden.admin_url}/console/login") as resp:
            nonce = re.search(r'name="nonce" value="([^"]+)"', await resp.text())
        assert nonce is not None
        async with http.post(
            f"{warden.admin_url}/console/login", data={"nonce": nonce.group(1), "token": "guess"}
        ) as resp:
            assert resp.status == 401
            assert "not valid" in await resp.text()
        # A form posted from elsewhere has no login nonce cookie to match.
        async with (
            aiohttp.ClientSession() as other,
            other.post(
                f"{warden.admin_url}/console/login", data={"nonce": "x", "token": TOKENS["vic"]}
            ) as resp,
        ):
            assert resp.status == 403
            assert "warden_console" not in resp.cookies
        async with http.get(f"{warden.admin_url}/console/decisions", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/console/login"
        async with http.get(f"{warden.admin_url}/console/api/decisions") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "refused"


async def test_every_answer_carries_the_csp_and_is_not_cached(warden: Warden) -> None:
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "vic")
        for method, path, data in (
            ("GET", "/console/login", None),
            ("GET", "/console/decisions", None),
            ("GET", "/console/static/console.js", None),
            ("GET", "/console/operations", None),  # 403 for a viewer
            ("GET", "/console/", None),  # a redirect
            ("POST", "/console/logout", {"csrf": "wrong"}),  # refused
        ):
            async with http.request(
                method, warden.admin_url + path, data=data, allow_redirects=False
            ) as resp:
                csp = resp.headers.get("Content-Security-Policy", "")
                assert "default-src 'none'" in csp, path
                assert "script-src 'self'" in csp, path
                assert "'unsafe-inline'" not in csp, path
                assert resp.headers["X-Frame-Options"] == "DENY"
                assert resp.headers["Cache-Control"] == "no-store"
        async with http.post(f"{warden.admin_url}/console/logout", data={"csrf": csrf}) as resp:
            assert resp.url.path == "/console/login"
        async with http.get(f"{warden.admin_url}/console/decisions", allow_redirects=False) as resp:
            assert resp.status == 303  # signed out for good


async def test_state_changes_need_the_csrf_token_and_the_same_origin(warden: Warden) -> None:
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "ada")
        url = f"{warden.admin_url}/console/operations/killswitches"
        form = {"scope": "global", "target": "", "reason": "drill"}
        async with http.post(url, data=form) as resp:
            assert resp.status == 403
            assert "CSRF" in await resp.text()
        async with http.post(
            url, data={**form, "csrf": csrf}, headers={"Origin": "https://evil.example"}
        ) as resp:
            assert resp.status == 403
            assert "cross-site" in await resp.text()
        assert warden.killswitches is not None
        assert warden.killswitches.active() == ()
        async with http.post(url, data={**form, "csrf": csrf}) as resp:
            assert resp.status == 200
            assert "drill" in await resp.text()
        [switch] = warden.killswitches.active()
        assert switch.created_by == "ada"
        clear = f"{warden.admin_url}/console/operations/killswitches/{switch.id}/clear"
        async with http.post(clear, data={"csrf": csrf, "reason": "drill over"}) as resp:
            assert resp.status == 200
        assert warden.killswitches.active() == ()


async def test_kill_switches_while_the_state_store_is_locked(tmp_path: Path, llm: MockLLM) -> None:
    # A switch thrown is in force here and the page says the fleet does not see it yet; a
    # saved one's clearing is refused and it stays. Not an internal error either way.
    async with Warden(config(tmp_path, llm)) as running, browser_like() as http:
        assert running.killswitches is not None
        csrf = await sign_in(http, running, "ada")
        url = f"{running.admin_url}/console/operations/killswitches"
        async with http.post(url, data={"scope": "global", "reason": "a", "csrf": csrf}) as resp:
            assert resp.status == 200
        [saved] = running.killswitches.active()
        locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            form = {"scope": "tool", "target": "issue_refund", "reason": "b", "csrf": csrf}
            async with http.post(url, data=form) as resp:
                thrown = (resp.status, await resp.text())
            clear = f"{url}/{saved.id}/clear"
            async with http.post(clear, data={"csrf": csrf, "reason": "over"}) as resp:
                cleared = (resp.status, await resp.text())
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        active = {s.target for s in running.killswitches.active()}
    assert thrown[0] == 503
    assert "in force on this sidecar only" in thrown[1]
    assert cleared[0] == 503
    assert "stays in force" in cleared[1]
    assert active == {"*", "issue_refund"}


async def test_behind_a_tls_proxy_forms_come_from_the_public_origin_and_the_cookie_is_secure(
    tmp_path: Path, llm: MockLLM
) -> None:
    # TLS ends at the proxy: Warden is reached over plain HTTP, the browser is on https.
    public = {"public_url": "https://Warden.Example.com:443/console/"}
    browser = "https://warden.example.com"
    async with Warden(config(tmp_path, llm, console=public)) as running:
        # The jar stands for the browser, which holds Secure cookies on its https origin.
        jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=running.admin_url)
        async with aiohttp.ClientSession(cookie_jar=jar, headers={"Origin": browser}) as http:
            csrf = await sign_in(http, running, "ada")
            cookies = list(jar)
            assert cookies
            assert all(cookie["secure"] for cookie in cookies)
            url = f"{running.admin_url}/console/operations/killswitches"
            form = {"scope": "global", "target": "", "reason": "drill", "csrf": csrf}
            # The address Warden itself is reached on is not the browser's origin.
            async with http.post(url, data=form, headers={"Origin": running.admin_url}) as resp:
                assert resp.status == 403
            async with http.post(url, data=form) as resp:
                assert resp.status == 200
        assert running.killswitches is not None
        assert len(running.killswitches.active()) == 1


async def test_roles_are_enforced_on_actions_not_only_on_pages(warden: Warden) -> None:
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "aude")
        async with http.post(
            f"{warden.admin_url}/console/operations/killswitches",
            data={"csrf": csrf, "scope": "global", "reason": "x"},
        ) as resp:
            assert resp.status == 403
        async with http.post(
            f"{warden.admin_url}/console/evidence/erase", data={"csrf": csrf, "subject": "C-1"}
        ) as resp:
            assert resp.status == 403
            assert "needs the role admin" in await resp.text()
    assert warden.killswitches is not None
    assert warden.killswitches.active() == ()


# Who may open what: every view and feed, and every action, per role (docs/console.md).
READS = {
    "/console/decisions": {"vic", "dana", "aude", "ada"},
    "/console/api/decisions": {"vic", "dana", "aude", "ada"},
    "/console/approvals": {"dana"},
    "/console/evidence": {"aude", "ada"},
    "/console/api/proof/0": {"aude", "ada"},
    "/console/model-risk": {"aude", "ada"},
    "/console/operations": {"ada"},
}
ACTIONS = {
    "/console/approvals/apr_nope/decide": ({"dana"}, {"verdict": "approve"}),
    "/console/operations/killswitches": ({"ada"}, {"scope": "tool", "reason": "x"}),
    "/console/evidence/erase": ({"ada"}, {"subject": ""}),
    "/console/evidence/export": ({"aude", "ada"}, {"from": "x", "to": "y"}),
}


async def test_each_role_reaches_exactly_its_views_feeds_and_actions(warden: Warden) -> None:
    for who in TOKENS:
        async with browser_like() as http:
            csrf = await sign_in(http, warden, who)
            for path, roles in READS.items():
                async with http.get(warden.admin_url + path, allow_redirects=False) as resp:
                    assert (resp.status != 403) == (who in roles), (who, path, resp.status)
            for path, (roles, form) in ACTIONS.items():
                # A valid CSRF token of the person's own session: only the role is missing.
                async with http.post(
                    warden.admin_url + path, data={**form, "csrf": csrf}, allow_redirects=False
                ) as resp:
                    # Allowed roles get past the role check to the input's own refusal.
                    assert (resp.status != 403) == (who in roles), (who, path, resp.status)
                    assert resp.status in {400, 403, 404}, (who, path, resp.status)
    assert warden.killswitches is not None
    assert warden.killswitches.active() == ()


async def test_an_auditor_downloads_an_evidence_package(warden: Warden, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[SMALL]))
    await agent_asks(warden, "refund")
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "aude")
        async with http.post(
            f"{warden.admin_url}/console/evidence/export",
            data={"csrf": csrf, "from": "2000-01-01", "to": "2999-12-31", "export_agent": ""},
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/zip"
            assert "attachment" in resp.headers["Content-Disposition"]
            data = await resp.read()
        async with http.post(
            f"{warden.admin_url}/console/evidence/export",
            data={"csrf": csrf, "from": "yesterday", "to": "2999-12-31"},
        ) as resp:
            assert resp.status == 400
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert any(n.endswith("/records.jsonl") for n in names)
    assert any(n.endswith("/verify_evidence.py") for n in names)


async def test_sso_from_the_trusted_proxy_signs_in_with_mapped_roles(
    tmp_path: Path, llm: MockLLM
) -> None:
    sso = {"trusted_proxies": ["127.0.0.1"], "roles": {"support-leads": ["approver"]}}
    async with Warden(config(tmp_path, llm, console={"sso": sso})) as running:
        headers = {"X-Forwarded-User": "dana@example.com", "X-Forwarded-Groups": "support-leads"}
        async with browser_like() as http:
            async with http.get(f"{running.admin_url}/console/approvals", headers=headers) as resp:
                assert resp.status == 200
                page = await resp.text()
                assert "dana@example.com (approver)" in page
                assert resp.cookies["warden_console"]["samesite"] == "Strict"
            # The approver has no admin view, whatever the proxy says elsewhere.
            async with http.get(f"{running.admin_url}/console/operations", headers=headers) as resp:
                assert resp.status == 403
        unmapped = {"X-Forwarded-User": "eve", "X-Forwarded-Groups": "marketing"}
        async with (
            browser_like() as http,
            http.get(
                f"{running.admin_url}/console/approvals", headers=unmapped, allow_redirects=False
            ) as resp,
        ):
            assert resp.status == 303


async def test_the_person_the_proxy_names_is_signed_in_whatever_the_cookie_says(
    tmp_path: Path, llm: MockLLM
) -> None:
    sso = {"trusted_proxies": ["127.0.0.1"], "roles": {"sre": ["admin"], "leads": ["approver"]}}
    async with Warden(config(tmp_path, llm, console={"sso": sso})) as running:
        ops = f"{running.admin_url}/console/operations"
        ada = {"X-Forwarded-User": "ada", "X-Forwarded-Groups": "sre"}
        async with browser_like() as http:
            async with http.get(ops, headers=ada) as resp:
                assert resp.status == 200
                csrf = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
            assert csrf is not None
            # Ada leaves the sre group: her cookie no longer opens anything.
            demoted = {"X-Forwarded-User": "ada", "X-Forwarded-Groups": "marketing"}
            async with http.get(ops, headers=demoted, allow_redirects=False) as resp:
                assert resp.status == 303
            async with http.post(
                f"{ops}/killswitches",
                headers=demoted,
                data={"csrf": csrf.group(1), "scope": "global", "reason": "x"},
                allow_redirects=False,
            ) as resp:
                assert resp.status == 401
            # And the session is gone: back in the group, she signs in afresh.
            async with http.get(ops, headers=ada) as resp:
                assert resp.status == 200
            # Someone else at the same browser, with no role here, is no one.
            eve = {"X-Forwarded-User": "eve", "X-Forwarded-Groups": "marketing"}
            async with http.get(ops, headers=eve, allow_redirects=False) as resp:
                assert resp.status == 303
        assert running.killswitches is not None
        assert running.killswitches.active() == ()


async def test_a_proxy_made_session_holds_only_while_the_proxy_vouches_for_it(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The auth proxy is 127.0.0.2; the admin port is also reachable directly.
    sso = {"trusted_proxies": ["127.0.0.2"], "roles": {"sre": ["admin"], "leads": ["approver"]}}
    async with Warden(config(tmp_path, llm, console={"sso": sso})) as running:
        ops = f"{running.admin_url}/console/operations"
        proxied = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(connector=proxied, cookie_jar=jar) as via_proxy:
            sam = {"X-Forwarded-User": "sam", "X-Forwarded-Groups": "sre"}
            async with via_proxy.get(ops, headers=sam) as resp:
                assert resp.status == 200
                csrf = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
            assert csrf is not None
            cookies = {c.key: c.value for c in jar}
            # Sam is moved to leads; the proxy's next request sees it.
            demoted = {"X-Forwarded-User": "sam", "X-Forwarded-Groups": "leads"}
            async with via_proxy.get(ops, headers=demoted) as resp:
                assert resp.status == 403
        # The admin cookie, taken around the proxy: no session, no switch.
        async with aiohttp.ClientSession(cookies=cookies) as direct:
            async with direct.get(ops, allow_redirects=False) as resp:
                assert resp.status == 303  # to the token form
            async with direct.post(
                f"{ops}/killswitches",
                data={"csrf": csrf.group(1), "scope": "global", "reason": "x"},
                allow_redirects=False,
            ) as resp:
                assert resp.status == 401
        assert running.killswitches is not None
        assert running.killswitches.active() == ()


async def test_an_evidence_package_that_does_not_fit_is_refused_and_leaves_the_log_alone(
    warden: Warden, llm: MockLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built in the temporary folder (a pod's small volume of its own), never beside the
    # audit log: a package there filled the log's volume and the next audit write failed.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    llm.script(Reply(tool_calls=[SMALL]))
    await agent_asks(warden, "refund")
    form = {"from": "2000-01-01", "to": "2999-12-31", "export_agent": ""}
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "aude")
        url = f"{warden.admin_url}/console/evidence/export"
        async with http.post(url, data={"csrf": csrf, **form}) as resp:
            assert resp.status == 200
            names = zipfile.ZipFile(io.BytesIO(await resp.read())).namelist()
        assert any(n.endswith("/records.jsonl") for n in names)
        assert await cleared(scratch)  # once sent

        def full(folder: Path, target: Path) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(console_routes, "_zip_dir", full)
        async with http.post(url, data={"csrf": csrf, **form}) as resp:
            assert resp.status == 507  # was an unhandled error: 500
            text = await resp.text()
            assert "no room to build the evidence package" in text
            assert "tmpVolume" in text
    assert await cleared(scratch)
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*evidence*")))
    # The agent goes on: the log was not touched by the failed package.
    llm.script(Reply(text="ok"))
    await agent_asks(warden, "hello")


async def cleared(folder: Path) -> bool:
    """Whether the package's work folder is gone (just after the answer)."""
    for _ in range(250):
        if not await asyncio.to_thread(lambda: list(folder.glob("warden-evidence-*"))):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_one_evidence_package_is_built_at_a_time(warden: Warden) -> None:
    assert warden.console is not None
    async with browser_like() as http:
        csrf = await sign_in(http, warden, "aude")
        form = {"csrf": csrf, "from": "2000-01-01", "to": "2999-12-31", "export_agent": ""}
        async with (
            warden.console.exporting,  # another export is being built
            http.post(f"{warden.admin_url}/console/evidence/export", data=form) as resp,
        ):
            assert resp.status == 429
            assert "being built already" in await resp.text()
        async with http.post(f"{warden.admin_url}/console/evidence/export", data=form) as resp:
            assert resp.status == 200


async def test_a_cursor_that_is_not_ascii_digits_is_ignored(warden: Warden) -> None:
    async with browser_like() as http:
        await sign_in(http, warden, "vic")
        for cursor in ("²", "١٢"):
            async with http.get(
                f"{warden.admin_url}/console/decisions", params={"before": cursor}
            ) as resp:
                assert resp.status == 200


@pytest.mark.parametrize(
    ("proxy", "headers"),
    [
        # From a peer that is not the auth proxy.
        ("10.9.8.7", [("X-Forwarded-User", "mallory"), ("X-Forwarded-Groups", "sre")]),
        # From the proxy, which appended its copies after the browser's forged ones.
        (
            "127.0.0.1",
            [
                ("X-Forwarded-User", "mallory"),
                ("X-Forwarded-Groups", "sre"),
                ("X-Forwarded-User", "eve"),
                ("X-Forwarded-Groups", "leads"),
            ],
        ),
    ],
    ids=["untrusted peer", "sent twice"],
)
async def test_sso_headers_that_prove_no_one_sign_no_one_in(
    tmp_path: Path, llm: MockLLM, proxy: str, headers: list[tuple[str, str]]
) -> None:
    sso = {"trusted_proxies": [proxy], "roles": {"sre": ["admin"], "leads": ["approver"]}}
    async with (
        Warden(config(tmp_path, llm, console={"sso": sso})) as running,
        browser_like() as http,
        http.get(
            f"{running.admin_url}/console/operations",
            headers=CIMultiDict(headers),
            allow_redirects=False,
        ) as resp,
    ):
        assert resp.status == 303
        assert resp.headers["Location"] == "/console/login"


async def test_reindex_rebuilds_the_index_from_the_log(tmp_path: Path, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[SMALL]))
    async with (
        Warden(config(tmp_path, llm)) as running,
        openai.AsyncOpenAI(
            base_url=f"{running.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as client,
    ):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "refund"}]
        )
    audit = tmp_path / "audit"
    path = default_index_path(audit)
    path.unlink()  # the index is a cache: losing it loses nothing
    assert audit_main(["audit", "reindex", "--dir", str(audit)]) == 0
    index = DecisionIndex(path)
    try:
        assert index.position == len(audit_records(audit))
        tools = {r.tool for r in index.search(IndexQuery()).rows}
        assert tools == {"issue_refund", "llm_call"}
    finally:
        index.close()
    assert audit_main(["audit", "reindex", "--dir", str(tmp_path / "nothing")]) == 2


async def test_with_the_fleet_backend_the_index_lives_in_postgres_and_reindex_rebuilds_it(
    tmp_path: Path, llm: MockLLM, pg_server: PgServer, pg_url: str
) -> None:
    state = {"url": pg_url, "password_file": str(pg_server.password_file)}
    llm.script(Reply(tool_calls=[SMALL]))
    async with (
        Warden(config(tmp_path, llm, state=state)) as running,
        openai.AsyncOpenAI(
            base_url=f"{running.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as client,
    ):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "refund"}]
        )
        async with browser_like() as http:
            await sign_in(http, running, "aude")
            async with http.get(
                f"{running.admin_url}/console/api/decisions?tool=issue_refund"
            ) as resp:
                assert resp.status == 200
                [row] = (await resp.json())["rows"]
            assert row["effect"] == "allow"
            async with http.get(f"{running.admin_url}/console/decisions/{row['seq']}") as resp:
                assert resp.status == 200
            # The index's tables go missing: a clear page in the console, the proxy unaffected.
            dbname = pg_url.rsplit("/", 1)[1]
            with pg_server.admin(dbname) as conn:
                conn.execute("ALTER TABLE console_index RENAME TO console_index_away")
            async with http.get(f"{running.admin_url}/console/decisions") as resp:
                assert resp.status == 503
                assert "decision index is unavailable" in await resp.text()
                assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            with pg_server.admin(dbname) as conn:
                conn.execute("ALTER TABLE console_index_away RENAME TO console_index")
            async with http.get(f"{running.admin_url}/console/decisions") as resp:
                assert resp.status == 200
    audit = tmp_path / "audit"
    assert not default_index_path(audit).exists()  # no SQLite file: the rows are in PostgreSQL
    with pg_server.admin(dbname) as conn:
        indexed = conn.execute("SELECT count(*) FROM console_index").fetchone()
        assert indexed is not None
        assert isinstance(indexed[0], int)
        assert indexed[0] >= 2  # the decision and the llm call, at least
        conn.execute("DELETE FROM console_index")  # the index is a cache: losing it loses nothing
    settings = tmp_path / "warden.yaml"
    settings.write_text(
        f"audit: {{dir: '{audit}'}}\n"
        f"state: {{url: '{pg_url}', password_file: '{pg_server.password_file}'}}\n"
    )
    assert audit_main(["audit", "reindex", "--config", str(settings)]) == 0
    with pg_server.admin(dbname) as conn:
        rebuilt = conn.execute("SELECT count(*), count(DISTINCT log_id) FROM console_index")
        assert rebuilt.fetchone() == (len(audit_records(audit)), 1)


async def test_odd_query_values_get_a_page_not_an_error(warden: Warden) -> None:
    async with browser_like() as http:
        await sign_in(http, warden, "aude")
        for path in (
            "/console/api/decisions?before=99999999999999999999999999&since=forever",
            "/console/decisions?agent=%3Cscript%3E&effect=%22%3E&before=-1",
            "/console/evidence?q=%25_%5C&kind=decision",
        ):
            async with http.get(warden.admin_url + path) as resp:
                assert resp.status == 200, path
                assert "<script>" not in await resp.text()
        for path in ("/console/decisions/999999", "/console/evidence/records/abc"):
            async with http.get(warden.admin_url + path) as resp:
                assert resp.status == 404, path
        async with http.get(f"{warden.admin_url}/console/api/proof/424242") as resp:
            assert resp.status == 404


async def test_the_approval_card_names_the_values_hidden_from_the_approver(
    warden: Warden, llm: MockLLM
) -> None:
    # Values under credential-like names are masked: the card must say so, path by path.
    llm.script(Reply(tool_calls=[Call(SNEAKY_TOOL, SNEAKY)]))
    await agent_asks(warden, "close my account")
    async with browser_like() as http:
        await sign_in(http, warden, "dana")
        async with http.get(f"{warden.admin_url}/console/approvals") as resp:
            assert resp.status == 200
            page = await resp.text()
    hidden = re.search(
        r'<div class="error" role="note" aria-label="Hidden from you">(.*?)</div>', page
    )
    assert hidden is not None, "the card does not say which values are hidden"
    assert "Reject the call if you need to see them" in hidden.group(1)
    listed = re.findall(r"<li><code>([^<]*)</code></li>", hidden.group(1))
    assert listed == [
        "/password_reset_email",
        "/pre_authorization_amount",
        "/note/x_credential_hint",
    ]
    assert "XX00ATTACKER" not in page


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        # The console's own 64 KiB bound: the admin app's 1 MiB applied before.
        (b"token=" + b"x" * 100_000, {}, 413),
        # Browsers send forms with a length; without one the bound could not be checked.
        (b"token=x", {"Transfer-Encoding": "chunked"}, 411),
        # Compressed: the bound would count compressed bytes (browsers never compress).
        (b"token=x", {"Content-Encoding": "gzip"}, 415),
        (b"--zz\r\nContent-Disposition: form-data; name=a\r\n\r\nv", {"CT": "zz"}, 400),
        (b"token=x", {"CT": "charset=bogus"}, 400),
    ],
)
async def test_a_form_that_cannot_be_read_gets_the_error_page_before_any_check(
    warden: Warden, body: bytes, headers: dict[str, str], status: int
) -> None:
    kind = {
        "zz": "multipart/form-data; boundary=zz",
        "charset=bogus": f"{FORM}; charset=bogus",
    }.get(headers.pop("CT", ""), FORM)
    host, port = warden.admin_url.removeprefix("http://").split(":")
    framing = (
        f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        if headers.pop("Transfer-Encoding", None)
        else f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /console/login HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {kind}\r\n"
        f"Origin: {warden.admin_url}\r\nConnection: close\r\n{extra}".encode()
        + framing
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.split(b" ", 2)[1] == str(status).encode(), answer[:300]
    assert b"<!doctype html>" in answer
