"""A real Prometheus scrapes a running Warden and fires the deny-spike alert.

Prometheus (Debian's package) runs the shipped alerting rules with only their
durations shortened; a burst of denied tool calls driven through the OpenAI
SDK makes ``WardenDenySpike`` fire in Prometheus's own HTTP API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests import prometheus as prom
from tests.functional.conftest import make_config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

PROMETHEUS = prom.tool("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason=prom.MISSING),
]

MESSAGES: Any = [{"role": "user", "content": "send me every customer's email"}]
BURST = 30  # the shipped threshold is "more than 20 denials in the window"


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return body["data"]


async def eventually(check: Callable[[], Awaitable[Any]], *, what: str, within: float) -> Any:
    """Poll ``check`` until it returns something truthy (Prometheus works in intervals)."""
    async with asyncio.timeout(within):
        while True:
            found = await check()
            if found:
                return found
            await asyncio.sleep(0.25)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


@pytest.fixture
async def prometheus(tmp_path: Path, warden: Warden) -> AsyncIterator[str]:
    assert PROMETHEUS is not None
    folder = tmp_path / "prometheus"
    folder.mkdir()
    rules = prom.fast_variant(prom.load_rules(), window="1m", hold="2s")
    target = warden.admin_url.removeprefix("http://")
    server = prom.start_prometheus(PROMETHEUS, folder, target=target, rules=rules)
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                if server.proc.poll() is not None:
                    raise AssertionError(server.log.read_text(errors="replace"))
                try:
                    async with session.get(server.url + "/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(ready, what="Prometheus to be ready", within=30)
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def agent_id() -> str:
    return "spiky-agent"


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM, agent_id: str) -> AsyncIterator[Warden]:
    async with Warden(make_config(tmp_path, llm.url, agent={"id": agent_id})) as running:
        yield running


@pytest.mark.parametrize("agent_id", ["inventive-agent"])
async def test_denials_of_tools_never_seen_before_fire_the_deny_spike_alert(
    warden: Warden, llm: MockLLM, prometheus: str
) -> None:
    # Thirty made-up tools, each denied once: each tool's series appeared with its
    # first count, which increase() does not see, and the alert stayed quiet.
    names = iter(f"exfiltrate_{i}" for i in range(BURST))
    llm.on_request(lambda *_: Reply(tool_calls=[Call(next(names), {})]))
    async with (
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
        ) as client,
        aiohttp.ClientSession() as session,
    ):

        async def scraped() -> Any:
            query = 'warden_agent_decisions_total{agent="inventive-agent",effect="deny"}'
            return (await api(session, prometheus + "/api/v1/query", query=query))["result"]

        # Before any request: the configured agent's series exist at 0.
        await eventually(scraped, what="Prometheus to scrape the agent's series", within=30)
        for _ in range(BURST):
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES
            )
            assert not completion.choices[0].message.tool_calls

        async def firing() -> list[dict[str, Any]]:
            data = await api(session, prometheus + "/api/v1/alerts")
            return [
                a
                for a in data["alerts"]
                if a["labels"]["alertname"] == "WardenDenySpike"
                and a["labels"].get("agent") == "inventive-agent"
                and a["state"] == "firing"
            ]

        await eventually(firing, what="WardenDenySpike to fire", within=60)


async def test_a_burst_of_denials_fires_the_deny_spike_alert(
    warden: Warden, llm: MockLLM, prometheus: str
) -> None:
    llm.on_request(lambda *_: Reply(tool_calls=[Call("export_customers", {"format": "csv"})]))
    async with (
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
        ) as client,
        aiohttp.ClientSession() as session,
    ):

        async def ask() -> None:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES
            )
            message = completion.choices[0].message
            assert not message.tool_calls  # removed: the agent never sees the call
            assert "export_customers" in (message.content or "")

        # One denial first, so Prometheus knows the series before the burst:
        # increase() needs two samples of it.
        await ask()

        async def deny_series() -> Any:
            data = await api(
                session,
                prometheus + "/api/v1/query",
                query='warden_decisions_total{effect="deny",agent="spiky-agent"}',
            )
            return data["result"]

        await eventually(deny_series, what="Prometheus to scrape the denial", within=30)

        async def alerts() -> list[dict[str, Any]]:
            data = await api(session, prometheus + "/api/v1/alerts")
            return list(data["alerts"])

        def spikes(alerts: list[dict[str, Any]], state: str | None = None) -> list[Any]:
            # Metrics are process-wide: another test's agent may have denials of its own
            # within the window.
            return [
                a
                for a in alerts
                if a["labels"]["alertname"] == "WardenDenySpike"
                and a["labels"].get("agent") == "spiky-agent"
                and state in {None, a["state"]}
            ]

        assert not spikes(await alerts())
        for _ in range(BURST):
            await ask()

        async def firing() -> list[dict[str, Any]]:
            return spikes(await alerts(), "firing")

        fired = await eventually(firing, what="WardenDenySpike to fire", within=60)
        assert fired[0]["labels"]["severity"] == "warning"
        assert fired[0]["annotations"]["runbook_url"] == "docs/operations.md#wardendenyspike"

        # Warden is healthy meanwhile: the readiness gauges say so, and no other alert fires.
        ready = await api(session, prometheus + "/api/v1/query", query="min(warden_ready)")
        assert ready["result"][0]["value"][1] == "1"
        # Metrics are process-wide: other tests run in this process leave gauges set
        # for their own agents (drift, spend) and kill switches. Every alert about
        # this agent, or about Warden's own health, must be quiet.
        others = {
            a["labels"]["alertname"]
            for a in await alerts()
            if a["labels"].get("agent", "spiky-agent") == "spiky-agent"
        }
        assert others - {"WardenDenySpike", "WardenKillSwitchActive"} == set()


async def test_every_dashboard_query_runs_against_warden_data(
    warden: Warden, llm: MockLLM, prometheus: str
) -> None:
    llm.script(Reply(text="ok", tool_calls=[Call("search_kb", {"query": "refund policy"})]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    dashboard = json.loads(prom.DASHBOARD.read_text(encoding="utf-8"))
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    async with aiohttp.ClientSession() as session:

        async def scraped() -> Any:
            data = await api(session, prometheus + "/api/v1/query", query="warden_ready")
            return data["result"]

        await eventually(scraped, what="a scrape of Warden", within=30)
        empty = []
        for query in queries:
            promql = query.replace("$__rate_interval", "1m").replace("$agent", ".*")
            data = await api(session, prometheus + "/api/v1/query", query=promql)
            if not data["result"]:
                empty.append(query)
    # Queries over metrics that need traffic Warden has not seen (approvals,
    # caps, fallbacks) may be empty; the headline ones must have data.
    for must in ("min(warden_ready)", "min(warden_audit_writable)"):
        assert must not in empty
    assert len(empty) < len(queries)
