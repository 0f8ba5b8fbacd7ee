"""The console in a real browser when an agent writes bidi controls: people read what is sent.

An agent (a prompt-injected model) can put a right-to-left override in an
argument, a tool name or anything else it writes: drawn as is, account
``4401-\\u202e8765`` reads ``4401-5678`` and an approver approves what they did
not read. Debian's chromium driven by Playwright against a real Warden (mock LLM
upstream, the shipped policy) measures where each digit is drawn; people sign
in through the page's own form. Screenshots go to ``test-artifacts/console``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Locator, expect

from tests.functional.conftest import make_config
from tests.functional.test_console_browser import (
    MESSAGES,
    admin_tokens,
    agent,
    shot,
    sign_in,
)
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

pytestmark = pytest.mark.asyncio(loop_scope="session")

RLO, PDF = "\u202e", "\u202c"  # RIGHT-TO-LEFT OVERRIDE, POP DIRECTIONAL FORMATTING
# Sent: A-3001. Drawn as is: A-1003, another customer's order.
ORDER = f"A-{RLO}3001{PDF}"
SHOWN_ORDER = "A-\\u202e3001\\u202c"
# Not a catalogued tool (the policy denies it), drawn as is like get_order.
TOOL = f"get_{RLO}redro{PDF}"
SHOWN_TOOL = "get_\\u202eredro\\u202c"
HELD = Call("issue_refund", {"order_id": ORDER, "amount": 450, "currency": "USD"})
SNEAKY = Call(TOOL, {"order_id": "A-1001"})
# The policy's reason quotes the currency: "...only be issued in USD; this one is in US\u202eD".
ODD_CURRENCY = Call("issue_refund", {"order_id": "A-1001", "amount": 20, "currency": f"US{RLO}D"})
# The digits of text, left to right as drawn on the screen (glyph boxes, not text order).
DRAWN = """(el, digits) => {
  const text = el.firstChild; const s = text.data; const at = s.indexOf(digits);
  if (at < 0) return null;
  const out = [];
  for (let i = at; i < at + digits.length; i++) {
    const r = document.createRange(); r.setStart(text, i); r.setEnd(text, i + 1);
    out.push([r.getBoundingClientRect().left, s[i]]);
  }
  out.sort((a, b) => a[0] - b[0]);
  return out.map(x => x[1]).join('');
}"""


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[MockLLM]:
    async with MockLLM() as mock:
        yield mock


@pytest_asyncio.fixture(loop_scope="session")
async def warden(tmp_path: Path, upstream: MockLLM) -> AsyncIterator[Warden]:
    # approvals.mode defer (make_config's): a held call is answered at once and waits.
    cfg = make_config(tmp_path, upstream.url, admin={"tokens": admin_tokens()})
    async with Warden(cfg) as running:
        yield running


async def agent_calls(warden: Warden, upstream: MockLLM, call: Call) -> None:
    upstream.script(Reply(tool_calls=[call]))
    async with agent(warden) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def drawn(where: Locator, digits: str) -> Any:
    return await where.evaluate(DRAWN, digits)


async def no_live_overrides(where: Locator) -> None:
    text = await where.text_content() or ""
    assert RLO not in text
    assert PDF not in text


async def test_an_approver_reads_the_order_id_the_call_sends_and_is_told_to_look_twice(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    await agent_calls(warden, upstream, HELD)  # deferred: waits for a person
    page = await sign_in(browser, warden, "dana")
    await page.goto(f"{warden.admin_url}/console/approvals")
    card = page.locator("article.approval")
    arguments = card.locator("pre[aria-label=Arguments]")
    await expect(arguments).to_contain_text(f'"order_id": "{SHOWN_ORDER}"')
    await no_live_overrides(card)
    # Drawn in the order sent: 3001, not 1003.
    assert await drawn(arguments, "3001") == "3001"
    # Said in the notice before the arguments, naming where.
    note = card.get_by_role("note", name="Hidden from you")
    await expect(note).to_contain_text("1 text(s) hold invisible or text-reordering characters")
    await expect(note.locator("li")).to_have_text(["/order_id"])
    await shot(page, "approvals-bidi")
    # The decision's page shows the recorded arguments the same way.
    await card.get_by_role("link", name="dec_", exact=False).click()
    recorded = page.locator("pre[aria-label=Arguments]")
    await expect(recorded).to_contain_text(SHOWN_ORDER)
    await no_live_overrides(page.locator("main"))
    assert await drawn(recorded, "3001") == "3001"
    # A person's comment is text from people too.
    await page.goto(f"{warden.admin_url}/console/approvals")
    await page.get_by_label("Comment").fill(f"not order {RLO}3001{PDF}")
    await page.get_by_role("button", name="Reject").click()
    await expect(page.get_by_role("status")).to_contain_text("recorded")
    await page.get_by_role("link", name="History", exact=True).click()
    history = page.get_by_role("table", name="Approval history")
    await expect(history).to_contain_text("not order \\u202e3001\\u202c")
    await no_live_overrides(history)
    await page.context.close()


async def test_a_tool_name_reads_as_sent_in_the_table_its_live_rows_and_the_record(
    browser: Browser, warden: Warden, upstream: MockLLM
) -> None:
    await agent_calls(warden, upstream, SNEAKY)  # denied: a control character in its name
    page = await sign_in(browser, warden, "vic")
    table = page.locator("#decision-rows")
    # Its decision's row (the model's answer has a row of its own).
    rows = table.locator("tr").filter(has_text=SHOWN_TOOL)
    await expect(rows).to_have_count(1)
    first = await rows.first.element_handle()
    await expect(rows.first.locator("td").nth(2)).to_have_text(SHOWN_TOOL)
    # A row the script writes from the live feed reads the same: here the reason.
    await agent_calls(warden, upstream, ODD_CURRENCY)
    reason = table.locator("td.reason").filter(has_text="this one is in US\\u202eD")
    await expect(reason).to_have_count(1, timeout=10_000)
    await no_live_overrides(table)
    # The page's row and the feed's are the same text: the script kept the old row.
    assert await first.evaluate("row => row.isConnected")
    await shot(page, "decisions-bidi")
    # The filter shows the name escaped, and filters by the name itself.
    await page.get_by_label("Tool").select_option(label=SHOWN_TOOL)
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(re.escape("tool=get_%E2%80%AEredro%E2%80%AC")))
    await expect(table.locator("tr")).to_have_count(1)
    seq = await rows.first.get_attribute("data-seq")
    await page.context.close()

    # The record as stored: still JSON, holding the very name the agent sent.
    page = await sign_in(browser, warden, "aude")
    await page.goto(f"{warden.admin_url}/console/evidence/records/{seq}")
    record = page.locator("pre[aria-label=Record]")
    await expect(record).to_contain_text(SHOWN_TOOL)
    await no_live_overrides(page.locator("main"))
    assert json.loads(await record.text_content() or "")["action"]["tool"] == TOOL
    await page.context.close()
