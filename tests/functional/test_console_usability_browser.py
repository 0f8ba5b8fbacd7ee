"""The console in a real browser when time passes: live updates, and a session that ends.

Debian's chromium driven by Playwright against a real Warden (mock LLM
upstream, the shipped policy); people sign in through the page's own form.
A session is ended as expiry ends it: the store forgets it, the cookie stays.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from tests.functional.conftest import make_config
from tests.functional.test_console_browser import (
    BIG,
    MESSAGES,
    TOKENS,
    admin_tokens,
    agent,
    sign_in,
)
from warden.server import Warden
from warden.testing import MockLLM, Reply

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[MockLLM]:
    async with MockLLM() as mock:
        yield mock


@pytest_asyncio.fixture(loop_scope="session")
async def warden(tmp_path: Path, upstream: MockLLM) -> AsyncIterator[Warden]:
    cfg = make_config(tmp_path, upstream.url, admin={"tokens": admin_tokens()})
    async with Warden(cfg) as running:
        yield running


async def agent_asks(warden: Warden, upstream: MockLLM) -> None:
    upstream.script(Reply(text="hello"))
    async with agent(warden) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def end_session(warden: Warden, page: Page) -> None:
    """Forget the page's session on the server, as its expiry would."""
    assert warden.console is not None
    for cookie in await page.context.cookies():
        if cookie.get("name") == "warden_console":
            warden.console.sessions.drop(cookie.get("value"))


async def test_live_updates_keep_focus_and_say_when_the_session_ended(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    for _ in range(3):
        await agent_asks(warden, upstream)
    page = await sign_in(browser, warden, "vic")
    rows = page.locator("#decision-rows tr")
    await expect(rows).to_have_count(3)
    link = page.locator("#decision-rows a").nth(1)
    on = await link.inner_text()
    await link.focus()
    await agent_asks(warden, upstream)
    await expect(rows).to_have_count(4, timeout=10_000)  # a live tick added the new one
    # The keyboard user is still on the link they were on, not thrown back to <body>.
    focused = await page.evaluate("document.activeElement.textContent")
    assert focused == on
    await end_session(warden, page)
    live = page.get_by_label("Live updates")
    await expect(live).not_to_be_checked(timeout=10_000)
    status = page.locator("#live-status")
    await expect(status).to_contain_text("you are signed out")
    await status.get_by_role("link", name="sign in again").click()
    await page.get_by_label("Token").fill(TOKENS["vic"])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(f"{warden.admin_url}/console/decisions")
    await page.context.close()


async def test_a_vote_sent_after_the_session_ended_is_said_not_recorded(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    upstream.script(Reply(tool_calls=[BIG]))
    async with agent(warden) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # deferred
    page = await sign_in(browser, warden, "dana")
    queue = f"{warden.admin_url}/console/approvals"
    await page.goto(queue)
    await page.get_by_label("Comment").fill("checked the order")
    await end_session(warden, page)  # the approver read for longer than the session lasts
    await page.get_by_role("button", name="Approve").click()
    await expect(page.get_by_role("alert")).to_contain_text("it was NOT recorded")
    await page.get_by_label("Token").fill(TOKENS["dana"])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(queue)  # back to the queue, the card still waiting
    await expect(page.get_by_role("button", name="Approve")).to_have_count(1)
    assert warden.console is not None
    assert await warden.console.approvals.pending_count() == 1  # nothing was decided
    await page.context.close()
