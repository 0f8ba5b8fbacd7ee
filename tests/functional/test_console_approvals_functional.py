"""An agent cannot bury the approvers' queue: long arguments are cut, the view is paged.

Over real sockets: a tool API held in defer mode, the admin API and the
console's Approvals view, signed in as an approver.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.functional.conftest import make_config
from tests.functional.test_console_http_functional import ROLES, TOKENS, browser_like, sign_in
from tests.functional.test_http_tool_functional import POLICY, ROUTES, Refunds
from warden.approvals.shown import MAX_TEXT
from warden.console.routes import APPROVALS_PAGE
from warden.server import Warden

LONG = 300_000
"""A customer field of an agent's refund body: long, as a hostile agent sends it."""


@pytest.fixture
async def refunds() -> AsyncIterator[Refunds]:
    async with Refunds() as service:
        yield service


@pytest.fixture
async def warden(tmp_path: Path, refunds: Refunds) -> AsyncIterator[Warden]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(POLICY)
    tokens = [
        {"subject": who, "roles": [ROLES[who]], "sha256": hashlib.sha256(t.encode()).hexdigest()}
        for who, t in TOKENS.items()
    ]
    cfg = make_config(
        tmp_path,
        refunds.url,
        upstreams={
            "refunds": {
                "protocol": "http",
                "base_url": refunds.url,
                "timeout_s": 5,
                "routes": ROUTES,
            }
        },
        policy={"bundles": [str(bundle)]},
        approvals={"mode": "defer"},
        admin={"tokens": tokens},
    )
    async with Warden(cfg) as running:
        yield running


async def refund(warden: Warden, order: str, customer: str) -> int:
    """The agent asks for a refund of 300 (held: over 200) through the tool route."""
    body = orjson.dumps({"amount": 300, "customer": customer})
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{warden.proxy_url}/refunds/orders/{order}/refunds",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        await resp.read()
        return resp.status


async def api(warden: Warden, path: str) -> Any:
    headers = {"Authorization": f"Bearer {TOKENS['dana']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(warden.admin_url + path, headers=headers) as r,
    ):
        assert r.status == 200
        return await r.json()


async def test_long_arguments_are_cut_for_people_and_the_grant_binds_the_whole_call(
    warden: Warden, refunds: Refunds
) -> None:
    customer = "c" * LONG
    assert await refund(warden, "A-1", customer) == 403  # deferred: waiting for a person
    (shown,) = (await api(warden, "/v1/approvals?status=pending"))["approvals"]
    assert len(orjson.dumps(shown)) < 4 * MAX_TEXT
    assert shown["arguments"]["customer_id"].startswith("c" * MAX_TEXT + "… [cut by Warden: ")
    assert shown["redacted"] == ["cut:/customer_id"]
    assert shown["arguments_sha256"] is None  # not all of it is shown
    headers = {"Authorization": f"Bearer {TOKENS['dana']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{warden.admin_url}/v1/approvals/{shown['id']}/approve", headers=headers, json={}
        ) as resp,
    ):
        assert resp.status == 200
    # What the approver saw, another end: not the approved call.
    assert await refund(warden, "A-1", customer[:-1] + "d") == 403
    assert await refund(warden, "A-1", customer) == 201  # the very call: once
    assert [body for _, _, body in refunds.seen] == [
        orjson.dumps({"amount": 300, "customer": customer})
    ]


async def test_the_approvals_view_shows_one_page_of_the_queue(warden: Warden) -> None:
    waiting = APPROVALS_PAGE + 1
    for n in range(waiting):
        assert await refund(warden, f"A-{n}", "c" * LONG) == 403
    async with browser_like() as http:
        await sign_in(http, warden, "dana")
        async with http.get(f"{warden.admin_url}/console/approvals") as resp:
            assert resp.status == 200
            first = await resp.text()
        async with http.get(warden.admin_url + next_page(first)) as resp:
            second = await resp.text()
        async with http.get(f"{warden.admin_url}/console/approvals?show=history") as resp:
            history = await resp.text()
        for bad in ("x%C2%B2", "1e9~apr_1", "1.5~apr_%0A", "1~" + "a" * 65, "9" * 200):
            async with http.get(f"{warden.admin_url}/console/approvals?after={bad}") as resp:
                assert resp.status == 200  # no place a page can start after: the first page
                assert 'rel="first"' not in await resp.text()
    assert len(first) < waiting * LONG // 10  # nowhere near every argument in full
    assert f"Waiting ({waiting})" in first
    assert first.count('<article class="approval"') == APPROVALS_PAGE
    assert 'rel="next"' in first
    assert "/customer_id (cut: too long to show)" in first
    assert "Approval history" not in first  # the history is read only when asked for
    assert second.count('<article class="approval"') == 1
    assert 'rel="first"' in second
    assert 'aria-label="Approval history"' in history
    assert '<article class="approval"' not in history
    ids = re.findall(r'aria-label="Approval (apr_[^"]+)"', first + second)
    assert len(set(ids)) == waiting  # each once, oldest first across the pages


def next_page(page: str) -> str:
    """The path the page's Next link goes to."""
    found = re.search(r'href="(/console/approvals\?[^"]+)" rel="next"', page)
    assert found is not None, "no next page"
    return found[1].replace("&amp;", "&")


async def test_approvals_decided_while_paging_make_none_skip_a_page(warden: Warden) -> None:
    for n in range(APPROVALS_PAGE + 5):
        assert await refund(warden, f"A-{n}", "c") == 403
    pending = [a["id"] for a in (await api(warden, "/v1/approvals?status=pending"))["approvals"]]
    shown = re.compile(r'aria-label="Approval (apr_[^"]+)"')
    async with browser_like() as http:
        await sign_in(http, warden, "dana")
        async with http.get(f"{warden.admin_url}/console/approvals") as resp:
            first = await resp.text()
        # Meanwhile another approver rejects five of the first page, through the API.
        headers = {"Authorization": f"Bearer {TOKENS['dana']}"}
        for approval_id in shown.findall(first)[:5]:
            async with http.post(
                f"{warden.admin_url}/v1/approvals/{approval_id}/reject", headers=headers, json={}
            ) as resp:
                assert resp.status == 200
        async with http.get(warden.admin_url + next_page(first)) as resp:
            second = await resp.text()
    seen = shown.findall(first) + shown.findall(second)
    assert seen == pending  # every one that waited, once, oldest first
