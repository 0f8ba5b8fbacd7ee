"""The console in a real browser: Debian's chromium driven by Playwright, against a real Warden.

One browser for the whole session; each test starts its own Warden (mock LLM
upstream, the shipped policy) and signs people in through the page's own
form. The agent is the openai SDK, waiting on the proxy while people act in
the page. A screenshot of every view is saved under ``test-artifacts/console``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.async_api import Browser, Page, Route, expect

from tests.functional.conftest import make_config
from tests.sdk_calls import function_calls
from warden.audit.checkpoint import NoteSigner
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
MESSAGES: Any = [{"role": "user", "content": "refund please"}]
BIG = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
SMALL = Call("issue_refund", {"order_id": "A-1001", "amount": 20, "currency": "USD"})
# Generous: the policy decides these tests' refunds; Operations shows the spend against it.
REFUND_CAP = {"name": "refunds", "tool": "issue_refund", "value": "amount", "limit": 5000}
TOKENS = {
    "vic": "tok-console-viewer",
    "dana": "tok-console-approver",
    "aude": "tok-console-auditor",
    "ada": "tok-console-admin",
}
ROLES = {"vic": "viewer", "dana": "approver", "aude": "auditor", "ada": "admin"}
VIEWS = {
    "vic": ["Decisions"],
    "dana": ["Decisions", "Approvals"],
    "aude": ["Decisions", "Evidence", "Model risk"],
    "ada": ["Decisions", "Evidence", "Model risk", "Operations"],
}


def admin_tokens() -> list[dict[str, Any]]:
    return [
        {
            "subject": who,
            "roles": [ROLES[who]],
            "groups": ["support-leads"],
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
        }
        for who, token in TOKENS.items()
    ]


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[MockLLM]:
    async with MockLLM() as mock:
        yield mock


def signing_key_with_plus(path: Path) -> str:
    """A checkpoint key whose verifier key's base64 holds a "+" (the page once split on it).

    The base64 part depends on the key alone, not on the log's origin (its name).
    """
    while True:
        key = Ed25519PrivateKey.generate()
        if "+" in NoteSigner("warden/test", key).verifier.vkey.split("+", 2)[2]:
            break
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    return str(path)


@pytest_asyncio.fixture(loop_scope="session")
async def warden(tmp_path: Path, upstream: MockLLM) -> AsyncIterator[Warden]:
    cfg = make_config(
        tmp_path,
        upstream.url,
        approvals={"mode": "hold", "keepalive_s": 0.2},
        admin={"tokens": admin_tokens()},
        budgets={"caps": [REFUND_CAP]},
    )
    key_file = signing_key_with_plus(tmp_path / "checkpoint.pem")
    cfg = cfg.model_copy(
        update={"audit": cfg.audit.model_copy(update={"signing_key_file": key_file})}
    )
    async with Warden(cfg) as running:
        yield running


def agent(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=60
    )


async def sign_in(browser: Browser, warden: Warden, who: str) -> Page:
    """A fresh browser context, signed in through the form labelled Token."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{warden.admin_url}/console/")
    await expect(page).to_have_url(f"{warden.admin_url}/console/login")
    await page.get_by_label("Token").fill(TOKENS[who])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("navigation", name="Views")).to_be_visible()
    return page


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def wait_for_approval(page: Page, url: str) -> None:
    """Reload the Approvals view until a held call shows up in the queue."""
    for _ in range(100):
        await page.goto(url)
        if await page.get_by_role("button", name="Approve").count():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no approval appeared in the queue")


async def test_each_role_sees_exactly_its_views(browser: Browser, warden: Warden) -> None:
    for who, expected in VIEWS.items():
        page = await sign_in(browser, warden, who)
        links = page.get_by_role("navigation", name="Views").get_by_role("link")
        assert await links.all_inner_texts() == expected
        # A view outside the role is refused even when typed into the address bar.
        for slug, title in (("approvals", "Approvals"), ("operations", "Operations")):
            if title not in expected:
                response = await page.goto(f"{warden.admin_url}/console/{slug}")
                assert response is not None
                assert response.status == 403
        await page.context.close()


async def test_viewer_has_no_approve_button_and_a_forged_post_is_refused(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    upstream.script(Reply(tool_calls=[BIG]))
    async with agent(warden) as client:
        waiting = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        approver = await sign_in(browser, warden, "dana")
        await wait_for_approval(approver, f"{warden.admin_url}/console/approvals")
        approval_id = (
            await approver.locator("article.approval").get_attribute("aria-label") or ""
        ).split()[-1]
        viewer = await sign_in(browser, warden, "vic")
        await expect(viewer.get_by_role("button", name="Approve")).to_have_count(0)
        await shot(viewer, "decisions-viewer")
        # The viewer's own, valid CSRF token does not make the viewer an approver.
        csrf = await viewer.locator("input[name=csrf]").first.get_attribute("value")
        forged = await viewer.request.post(
            f"{warden.admin_url}/console/approvals/{approval_id}/decide",
            form={"csrf": csrf or "", "verdict": "approve", "comment": "sneaky"},
        )
        assert forged.status == 403
        assert not waiting.done()  # still held: nothing was approved
        await approver.get_by_role("button", name="Reject").click()
        completion = await waiting
    assert not completion.choices[0].message.tool_calls
    await approver.context.close()
    await viewer.context.close()


async def test_a_held_refund_approved_in_the_page_reaches_the_agent(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    upstream.script(Reply(tool_calls=[BIG]))
    page = await sign_in(browser, warden, "dana")
    async with agent(warden) as client:
        waiting = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        await wait_for_approval(page, f"{warden.admin_url}/console/approvals")
        card = page.get_by_role("article", name="Approval")
        await expect(card.get_by_text("A-1003")).to_be_visible()
        await expect(card.get_by_text("450.00 USD is above", exact=False)).to_be_visible()
        assert not waiting.done()  # the agent is waiting on the person
        await shot(page, "approvals")
        await page.get_by_label("Comment").fill("checked the order")
        await page.get_by_role("button", name="Approve").click()
        await expect(page.get_by_role("status")).to_contain_text("approval is recorded")
        completion = await waiting
    calls = function_calls(completion.choices[0].message)
    assert [c.function.name for c in calls] == ["issue_refund"]
    assert json.loads(calls[0].function.arguments)["amount"] == 450
    # The history is a page of its own: the queue's page reads only pending approvals.
    await page.get_by_role("link", name="History", exact=True).click()
    history = page.get_by_role("table", name="Approval history")
    await expect(history).to_contain_text("dana: approved")
    await page.context.close()


async def test_a_rejection_with_a_comment_reaches_the_agent(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    upstream.script(Reply(tool_calls=[BIG]))
    page = await sign_in(browser, warden, "dana")
    async with agent(warden) as client:
        waiting = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        await wait_for_approval(page, f"{warden.admin_url}/console/approvals")
        await page.get_by_label("Comment").fill("duplicate of A-1002")
        await page.get_by_role("button", name="Reject").click()
        completion = await waiting
    message = completion.choices[0].message
    assert not message.tool_calls
    assert "rejected by dana: duplicate of A-1002" in (message.content or "")
    await page.context.close()


async def test_a_kill_switch_thrown_in_operations_stops_the_next_call(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    page = await sign_in(browser, warden, "ada")
    await page.get_by_role("link", name="Operations").click()
    await page.get_by_label("Scope").select_option("agent")
    await page.get_by_label("Target").fill("support-triage")
    await page.get_by_label("Reason", exact=True).fill("incident 42: refunds misfiring")
    await page.get_by_role("button", name="Throw kill switch").click()
    switches = page.get_by_role("table", name="Kill switches in force")
    await expect(switches).to_contain_text("incident 42")
    await shot(page, "operations")
    upstream.script(Reply(tool_calls=[SMALL]))
    async with agent(warden) as client:
        with pytest.raises(openai.PermissionDeniedError, match="incident 42"):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await page.context.close()


async def spend_cells(page: Page, url: str, spent: str, reserved: str) -> list[str]:
    """Reload Operations until the refunds row shows ``spent`` and ``reserved``; its cells.

    The cells after the row's header (the cap's name): applies to, window,
    counted for, spent, reserved, limit, used, over the limit.
    """
    row = page.get_by_role("table", name="Spend against caps").get_by_role("row", name="refunds")
    cells: list[str] = []
    for _ in range(100):
        await page.goto(url)
        cells = await row.get_by_role("cell").all_inner_texts()
        if cells[3:5] == [spent, reserved]:
            return cells
        await asyncio.sleep(0.1)
    raise AssertionError(f"the spend row never showed {spent} spent, {reserved} reserved: {cells}")


async def test_operations_shows_spend_against_caps_after_a_refund(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    page = await sign_in(browser, warden, "ada")
    url = f"{warden.admin_url}/console/operations"
    await page.goto(url)
    table = page.get_by_role("table", name="Spend against caps")
    await expect(table.get_by_role("row", name="refunds")).to_contain_text("no use yet")
    upstream.script(Reply(tool_calls=[SMALL]), Reply(text="Refunded."))
    async with agent(warden) as client:
        first = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        [call] = function_calls(first.choices[0].message)
        # Delivered to the agent, not yet done: its 20 USD is reserved against the cap.
        held = await spend_cells(page, url, "0.00 USD", "20.00 USD")
        assert held[2] == "agent:support-triage"
        history: Any = [
            *MESSAGES,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "refunded 20.00 USD"},
        ]
        await client.chat.completions.create(model="gpt-4o-mini", messages=history)
    # The tool's result settles it: spent, nothing reserved.
    cells = await spend_cells(page, url, "20.00 USD", "0.00 USD")
    assert cells == [
        "issue_refund.amount per agent",
        held[1],
        "agent:support-triage",
        "20.00 USD",
        "0.00 USD",
        "5,000.00 USD",
        "0%",
        "deny",
    ]
    assert held[1].startswith("day:")
    chart = page.get_by_role("img", name="Spend against caps")
    await expect(chart).to_have_attribute(
        "aria-label",
        "Spend against caps: refunds, agent:support-triage: spent 20.00 USD, "
        "reserved 0.00 USD of 5,000.00 USD (0%)",
    )
    await shot(page, "operations-spend")
    await page.context.close()


async def test_search_finds_a_decision_and_its_proof_verifies_in_the_page(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    export = Call("export_customers", {"format": "csv"})
    upstream.script(Reply(tool_calls=[SMALL]), Reply(tool_calls=[export]))
    async with agent(warden) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        denied = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "blocked the tool call `export_customers`" in (denied.choices[0].message.content or "")
    page = await sign_in(browser, warden, "aude")
    await shot(page, "decisions")
    await page.get_by_role("link", name="Evidence").click()
    await page.get_by_label("Kind").select_option("decision")
    await page.get_by_label("Agent", exact=True).fill("support-triage")
    await page.get_by_label("Tool", exact=True).fill("issue_refund")
    await page.get_by_role("button", name="Search records").click()
    found = page.get_by_role("table", name="Records found").get_by_role("row")
    await expect(found).to_have_count(2)  # the header and the one refund decision
    await found.nth(1).get_by_role("link").click()
    status = page.locator("#proof-status")
    await expect(status).to_have_attribute("data-verified", "true")
    await expect(status).to_contain_text("Verified in this page")
    # Chromium checks Ed25519 itself: the signature is verified here, not taken on trust.
    await expect(status).to_contain_text("signature verified in this page")
    await shot(page, "evidence-proof")
    # The page checks for itself: one flipped byte of the record and it says so.
    record_url = page.url

    async def tamper(route: Route) -> None:
        response = await route.fetch()
        proof = await response.json()
        raw = bytearray(base64.b64decode(proof["record_b64"]))
        raw[10] ^= 1
        proof["record_b64"] = base64.b64encode(bytes(raw)).decode()
        await route.fulfill(response=response, json=proof)

    await page.route("**/console/api/proof/*", tamper)
    await page.goto(record_url)
    await expect(status).to_have_attribute("data-verified", "false")
    await expect(status).to_contain_text("do not hash to its leaf")
    await page.unroute("**/console/api/proof/*")
    await page.get_by_role("link", name="Model risk").click()
    await expect(page.get_by_role("region", name="Policy revisions")).to_be_visible()
    await shot(page, "model-risk")
    await page.context.close()


async def test_hostile_arguments_render_inert_under_a_strict_csp(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    hostile = Call(
        "issue_refund",
        {
            "order_id": "<script>window.pwned = 1</script>",
            "note": '"><img src=x onerror="window.pwned = 2">',
            "amount": 450,
            "currency": "USD",
        },
    )
    upstream.script(Reply(tool_calls=[hostile]))
    page = await sign_in(browser, warden, "dana")
    async with agent(warden) as client:
        waiting = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        response = await page.goto(f"{warden.admin_url}/console/approvals")
        assert response is not None
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        await wait_for_approval(page, f"{warden.admin_url}/console/approvals")
        card = page.get_by_role("article", name="Approval")
        await expect(card).to_contain_text("<script>window.pwned = 1</script>")
        await expect(card).to_contain_text('"><img src=x onerror=')
        assert await page.locator("img").count() == 0
        assert await page.evaluate("window.pwned") is None
        await page.goto(f"{warden.admin_url}/console/decisions?tool=issue_refund")
        await page.get_by_role("link", name="dec_").first.click()
        await expect(page.get_by_label("Arguments")).to_contain_text("<script>")
        assert await page.locator("img").count() == 0
        assert await page.evaluate("window.pwned") is None
        # A cross-site form post, and one without the CSRF token, are both refused.
        approvals = f"{warden.admin_url}/console/approvals"
        await page.goto(approvals)
        approval_id = (
            await page.locator("article.approval").get_attribute("aria-label") or ""
        ).split()[-1]
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
        target = f"{warden.admin_url}/console/approvals/{approval_id}/decide"
        cross_site = await page.request.post(
            target,
            form={"csrf": csrf or "", "verdict": "approve"},
            headers={"Origin": "https://evil.example"},
        )
        assert cross_site.status == 403
        no_token = await page.request.post(target, form={"verdict": "approve"})
        assert no_token.status == 403
        assert not waiting.done()
        await page.get_by_role("button", name="Reject").click()
        await waiting
    await page.context.close()
