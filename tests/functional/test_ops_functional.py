"""Operability: metrics, health, readiness, graceful shutdown, the CLI and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.functional.conftest import ROOT, SHIPPED_POLICY, audit_records, make_config
from warden.audit.verify import verify_log
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "help"}]


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_metrics_count_requests_decisions_tokens_and_latency(
    warden: Warden, llm: MockLLM
) -> None:
    _, before = await get(warden.admin_url + "/metrics")
    llm.script(Reply(text="ok", tool_calls=[Call("search_kb", {"query": "x"})]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    status, after = await get(warden.admin_url + "/metrics")
    assert status == 200

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("warden_requests_total", upstream="openai", status="200") == 1
    assert grew("warden_decisions_total", tool="search_kb", effect="allow", guard="policy") == 1
    assert grew("warden_decisions_total", tool="llm_call", effect="allow") == 1
    assert grew("warden_tokens_total", model="gpt-4o-mini", direction="output") > 0
    assert grew("warden_added_latency_seconds_count", upstream="openai") == 1
    assert grew("warden_upstream_latency_seconds_count", upstream="openai") == 1


async def test_health_and_readiness(warden: Warden) -> None:
    status, body = await get(warden.admin_url + "/healthz")
    assert status == 200
    status, body = await get(warden.admin_url + "/readyz")
    assert status == 200
    detail = orjson.loads(body)
    assert detail["status"] == "ready"
    assert detail["audit"]["writable"] is True


async def test_not_ready_without_a_valid_bundle_and_fails_closed(
    tmp_path: Path, llm: MockLLM
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "policy.rego").write_text("package warden\n\ndecision := if {\n")
    config = make_config(tmp_path, llm.url, policy={"bundles": [str(broken)]})
    async with Warden(config) as w:
        status, body = await get(w.admin_url + "/readyz")
        assert status == 503
        assert orjson.loads(body)["status"] == "not_ready"
        async with openai.AsyncOpenAI(
            base_url=f"{w.proxy_url}/openai/v1", api_key="k", max_retries=0
        ) as client:
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert llm.requests == []


async def test_graceful_stop_finishes_in_flight_requests(tmp_path: Path, llm: MockLLM) -> None:
    warden = Warden(make_config(tmp_path, llm.url))
    await warden.start()
    llm.script(Reply(text="slow but fine", fault=Fault("delay", seconds=1.0)))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
    ) as client:
        pending = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        while not llm.requests:  # noqa: ASYNC110 - the mock offers no event to wait on
            await asyncio.sleep(0.01)
        await warden.stop()
        completion = await pending
    assert completion.choices[0].message.content == "slow but fine"
    records = audit_records(tmp_path / "audit")
    outcomes = [r for r in records if r.get("kind") == "outcome"]
    assert len(outcomes) == 1  # flushed before stop returned


async def test_a_stream_still_open_is_cut_within_the_grace_period(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The pod's grace period is the grace plus 10 s: a stop that waited the grace twice
    # (aiohttp's two phases), or drained the admin listener before the doors, was killed
    # before its final signed checkpoint.
    warden = Warden(make_config(tmp_path, llm.url, shutdown_grace_s=6))
    await warden.start()
    words = " ".join(["word"] * 400)  # 200 s at one event every half second
    llm.script(Reply(text=words, fault=Fault("slow_stream", seconds=0.5)))
    host, port = warden.admin_url.removeprefix("http://").rsplit(":", 1)
    _, slow_admin = await asyncio.open_connection(host, int(port))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        await anext(aiter(stream))  # the stream is open and waiting on the model
        # A sign-in form that trickles in: the admin listener has a request in flight.
        slow_admin.write(
            b"POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\nuser="
        )
        await slow_admin.drain()
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await warden.stop()
        took = time.monotonic() - started
        await stream.close()
    slow_admin.close()
    assert 5 < took < 8.5, took  # the grace, not one and a half or twice it
    report = verify_log(tmp_path / "audit")
    assert report.ok
    assert report.latest_checkpoint == report.records  # the final checkpoint covers all
    # The cut stream's call ran: its outcome is recorded (and its hold settled).
    outcomes = [r["outcome"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert [o.get("error") for o in outcomes] == ["shutdown"]


async def test_a_call_still_unanswered_when_the_grace_ends_gets_its_outcome(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Sent, its answer's headers not yet back: its hold stayed reserved until it expired.
    warden = Warden(make_config(tmp_path, llm.url, shutdown_grace_s=2))
    await warden.start()
    llm.script(Reply(text="late", fault=Fault("delay", seconds=30)))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="k", max_retries=0
    ) as client:
        pending = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        while not llm.requests:  # noqa: ASYNC110 - the mock offers no event to wait on
            await asyncio.sleep(0.01)
        await warden.stop()
        with pytest.raises(openai.APIError):
            await pending
    outcomes = [r["outcome"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert [o.get("error") for o in outcomes] == ["shutdown"]


async def test_an_agent_gone_before_a_streams_headers_gets_an_outcome(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The provider answered after the agent left: writing the headers failed before the
    # stream's outcome was set up, so the call ran with none (and an internal error).
    llm.script(Reply(text="late", fault=Fault("delay", seconds=1.0)))
    async with Warden(make_config(tmp_path, llm.url)) as warden:
        host, port = warden.proxy_url.removeprefix("http://").rsplit(":", 1)
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer k\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        while not llm.requests:  # noqa: ASYNC110 - the mock offers no event to wait on
            await asyncio.sleep(0.01)
        writer.close()  # gone before the answer's headers
        await asyncio.sleep(2.0)  # the provider answers at 1 s
    outcomes = [r["outcome"] for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert [o.get("error") for o in outcomes] == ["client_disconnected"]


WARDEN = Path(sys.executable).with_name("warden")


def _ignore_sighup() -> None:
    """What ``nohup`` does before it starts a command: the session's end must not reach it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@contextlib.contextmanager
def serving(
    tmp_path: Path, *, ignore_sighup: bool = False, **settings: Any
) -> Iterator[subprocess.Popen[str]]:
    """``warden serve`` on loopback ports, files under ``tmp_path``; killed if still running."""
    config = tmp_path / "warden.yaml"
    base: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "policy": {"bundles": [str(SHIPPED_POLICY)], "workers": 1},
        "audit": {"dir": str(tmp_path / "audit")},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
    }
    config.write_text(yaml.safe_dump({**base, **settings}))
    proc = subprocess.Popen(
        [str(WARDEN), "serve", "--config", str(config), "--log-format", "text"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_ignore_sighup if ignore_sighup else None,  # noqa: PLW1509
    )
    try:
        assert proc.stderr is not None
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def banner_of(proc: subprocess.Popen[str], lines: int = 1) -> list[str]:
    """The first ``lines`` lines ``warden serve`` prints once started (it prints them at
    once, the first naming the listeners)."""
    assert proc.stderr is not None
    for _ in range(200):
        line = proc.stderr.readline()
        if "admin http" in line or not line:
            break
    return [line, *(proc.stderr.readline() for _ in range(lines - 1))]


def test_warden_serve_under_nohup_is_not_stopped_by_sighup(tmp_path: Path) -> None:
    with serving(tmp_path, ignore_sighup=True) as proc:
        assert "admin http" in banner_of(proc)[0]
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_warden_serve_process_stops_cleanly_on_a_signal(tmp_path: Path, sig: int) -> None:
    with serving(tmp_path) as proc:
        first = banner_of(proc)[0]
        assert "admin http" in first, "warden serve did not report its listeners"
        admin = first.split("admin ", 1)[1].split()[0]
        status, _ = asyncio.run(get(admin + "/readyz"))
        assert status == 200
        proc.send_signal(sig)  # SIGHUP: a closed terminal, or a reload habit
        assert proc.wait(timeout=30) == 0
    leftover = _session_processes(proc.pid)
    assert leftover == [], f"processes left behind: {leftover}"
    verify = subprocess.run(
        [str(WARDEN), "audit", "verify", "--dir", str(tmp_path / "audit")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_start_banner_says_observe_mode_and_not_ready(tmp_path: Path) -> None:
    # A mistyped bundle path started looking normal, then refused every action.
    policy = {"bundles": [str(tmp_path / "polcies")], "workers": 1}
    with serving(tmp_path, mode="observe", policy=policy) as proc:
        banner = banner_of(proc, lines=3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert "admin http" in banner[0]
    assert banner[1].startswith("warden: mode observe: decisions are recorded")
    assert banner[2].startswith("warden: NOT READY: no policy bundle is active (")
    assert "polcies" in banner[2]


def test_invalid_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "warden.yaml"
    config.write_text("policy: {deadline_ms: -5}\n")
    result = subprocess.run(
        [str(WARDEN), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "policy.deadline_ms" in result.stderr


def test_demo_shows_allow_deny_and_hold_and_leaves_nothing_running(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "warden.demo", "--data-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    for effect in ("ALLOWED", "DENIED", "HELD", "APPROVED", "REJECTED"):
        assert effect in out
    assert ": intact" in out
    # The MCP step: a tool call through `warden mcp wrap` allowed, one held and rejected.
    assert "warden mcp wrap --config" in out
    assert "MCP     search_kb                 ALLOWED" in out
    assert "MCP     close_account             REJECTED" in out
    assert "Tools the MCP server actually ran: search_kb\n" in out
    assert "MCP wrap's audit log" in out
    assert "DAMAGED" not in out
    assert "sk-demo-not-a-real-key" not in out
    assert _session_processes(proc.pid) == []
    _assert_ends_with_drift_and_quality(out)


def _assert_ends_with_drift_and_quality(out: str) -> None:
    """The demo ends with cli_monitor.print_summary of its fresh log, then two closing lines."""
    tail = out.split("MCP wrap's audit log: ", 1)[1].splitlines()[1:]
    assert tail[:3] == ["", "Quality (read back from the audit log):", ""], out
    assert re.split(r"\s{2,}", tail[3]) == [
        "agent",
        "version",
        "decisions",
        "deny",
        "hold",
        "appr. rejected",
        "tool errors",
        "cost/conv USD",
        "p95 added ms",
    ]
    # The shares agree with the decision table above: T-5 denied, T-3 and T-4 held.
    denied = len(re.findall(r"^T-\d+ +\S+ +DENIED ", out, re.MULTILINE))
    held = len(re.findall(r"^T-\d+ +\S+ +HELD ", out, re.MULTILINE))
    assert (denied, held) == (1, 2)
    for line, version in zip(tail[4:6], ("-", "*"), strict=True):  # the version, all versions
        agent, shown, decisions, deny, hold, rejected, errors, cost, p95 = re.split(r"\s{2,}", line)
        assert (agent, shown) == ("support-agent", version)
        n = int(decisions)
        assert n >= 5  # five tickets' tool calls, and the model calls
        assert (deny, hold) == (f"{denied / n:.1%}", f"{held / n:.1%}")
        assert rejected == "50.0% of 2"  # T-3 approved, T-4 rejected
        assert errors == "- of 0"  # no outcome the demo's tools report is trusted
        assert cost == "-"  # the demo names no conversation (only X-Warden-Context-Ticket)
        assert float(p95) > 0
    # A fresh log has no reference window: no drift figure yet.
    assert tail[6:10] == [
        "",
        "Drift of the last day against the 7 days before:",
        "  support-agent -: not enough history to compare yet",
        "  support-agent *: not enough history to compare yet",
    ]
    assert tail[10].startswith("Check it yourself: .venv/bin/warden audit verify --dir ")
    assert tail[11].startswith("Finished in ")
    assert len(tail) == 12


def _session_processes(sid: int) -> list[str]:
    """Processes still alive in the session a test started (its children's children too)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are gone already
            found.append(Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " "))
    return found
