"""One real Warden, one raw upstream and real Rego for the whole adversarial suite.

Warden, the :class:`~warden.testing.raw_upstream.RawUpstream` and the policy
engine start once per session on an event loop in a background thread; the
tests drive them from the test thread with the official *sync* SDK clients,
so thousands of generated cases share keep-alive connections and one engine.

Each case gets a unique id. It travels twice: in ``X-Warden-Context-Case``
(so Warden's decision records carry it as ``context.case``) and inside the
request body or path (so the upstream picks that case's scripted reply; Warden
strips ``X-Warden-*`` headers before forwarding).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import openai
import orjson
import pytest

from tests.functional.conftest import make_config
from warden.audit.layout import Layout
from warden.audit.segments import FrameScanner, list_segments, parse_header
from warden.server import Warden
from warden.testing.raw_upstream import RawReply, RawRequest, RawUpstream

T = TypeVar("T")

# Deny tools named danger*, bulk export and every call of a type Warden does
# not know; allow the rest (LLM calls included). One decision per input.
POLICY = """\
package warden

import rego.v1

denials contains "dangerous tool" if startswith(input.action.tool, "danger")

denials contains "bulk export is never allowed" if input.action.tool == "export_customers"

denials contains "unknown call type" if input.action.kind == "unknown_call"

# A test names a kind to deny through X-Warden-Context-Deny-Kind.
denials contains "kind denied for this case" if input.action.kind == input.context.deny_kind

decision := {"effect": "deny", "reason": concat("; ", sort(denials))} if {
	count(denials) > 0
} else := {"effect": "allow", "reason": "allowed"}
"""

DENIED_TOOLS = ("export_customers", "danger_wipe", "dangerous_delete")
ALLOWED_TOOLS = ("search_kb", "get_order", "issue_refund")
API_KEY = "sk-adversarial-test"
CASE_HEADER = "X-Warden-Context-Case"
_CASE_RE = re.compile(rb"case-[0-9]{8}")
_counter = itertools.count(1)


def is_denied(name: str | None) -> bool:
    """Whether the suite's policy denies a tool of this name."""
    return name is not None and (name.startswith("danger") or name == "export_customers")


def new_case() -> str:
    """A fresh case id, unique within the session."""
    return f"case-{next(_counter):08d}"


def canonical(value: Any) -> str:
    """Canonical JSON text for comparing arguments (``NaN`` and big ints kept as written)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class AuditTail:
    """Reads an audit log incrementally with the project's frame reader, indexed by case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._segdir = Layout(root).segments
        self._offsets: dict[Path, int] = {}
        self._by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._case_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def _read_new(self) -> None:
        for path in list_segments(self._segdir):
            start = self._offsets.get(path)
            with path.open("rb") as f:
                if start is None:
                    data = f.read()
                    parsed = parse_header(data)
                    if parsed is None:
                        return  # header not written yet
                    base, begin = 0, parsed[1]
                else:
                    f.seek(start)
                    base, data, begin = start, f.read(), 0
            scanner = FrameScanner(data, begin)
            for _, payload in scanner:
                try:
                    record = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    record = json.loads(payload)  # big integers
                case = ((record.get("action") or {}).get("context") or {}).get("case")
                if record.get("kind") == "decision" and case is not None:
                    self._case_of[record["decision"]["id"]] = case
                elif record.get("kind") == "outcome":
                    # Outcome records carry no context: they follow their decision.
                    case = self._case_of.get(record.get("decision_id", ""))
                if case is not None:
                    self._by_case[case].append(record)
            # A frame still being written stops the scanner: resume there next time.
            self._offsets[path] = base + scanner.end

    def records(self, case: str) -> list[dict[str, Any]]:
        """Every record of ``case`` written so far."""
        with self._lock:
            self._read_new()
            return list(self._by_case.get(case, ()))

    def decisions(self, case: str) -> list[dict[str, Any]]:
        """The decision records of ``case`` about calls found in responses."""
        return [
            r
            for r in self.records(case)
            if r.get("kind") == "decision" and r["action"]["kind"] != "llm_call"
        ]

    def wait_for(self, case: str, predicate: Any, timeout: float = 3.0) -> list[dict[str, Any]]:
        """The case's records once ``predicate(records)`` holds (outcomes are written late)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records(case)
            if predicate(recs) or time.monotonic() > deadline:
                return recs
            time.sleep(0.02)


@dataclass
class Harness:
    """The running suite: Warden, the raw upstream, the audit tail and SDK clients."""

    loop: asyncio.AbstractEventLoop
    upstream: RawUpstream
    warden: Warden
    audit: AuditTail
    replies: dict[str, RawReply | Callable[[RawRequest], RawReply]] = field(default_factory=dict)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the harness loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def answer(self, case: str, reply: RawReply | Callable[[RawRequest], RawReply]) -> None:
        """Make the upstream answer the request that carries ``case`` with ``reply``.

        A callable makes the reply from the request as it arrived (on the
        harness loop, before anything is sent back).
        """
        self.replies[case] = reply

    def respond(self, req: RawRequest) -> RawReply | None:
        found = _CASE_RE.search(req.body) or _CASE_RE.search(req.path.encode())
        reply = self.replies.pop(found.group().decode(), None) if found else None
        return reply(req) if callable(reply) else reply

    @property
    def proxy_url(self) -> str:
        return self.warden.proxy_url

    @property
    def warden_port(self) -> int:
        return int(self.proxy_url.rsplit(":", 1)[1])

    def openai(self, **kw: Any) -> openai.OpenAI:
        """A sync OpenAI client pointed at Warden (no retries: one case, one request)."""
        return openai.OpenAI(
            base_url=f"{self.proxy_url}/openai/v1", api_key=API_KEY, max_retries=0, **kw
        )

    def anthropic(self, **kw: Any) -> anthropic.Anthropic:
        """A sync Anthropic client pointed at Warden."""
        return anthropic.Anthropic(
            base_url=f"{self.proxy_url}/anthropic", api_key=API_KEY, max_retries=0, **kw
        )


def _start_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="adversarial-loop", daemon=True)
    thread.start()
    return loop, thread


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("adversarial")
    bundle = root / "policy"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(POLICY)
    loop, thread = _start_loop()

    async def start() -> tuple[RawUpstream, Warden]:
        upstream = RawUpstream()
        await upstream.start()
        config = make_config(
            root,
            upstream.url,
            tools={},
            policy={"bundles": [str(bundle)], "workers": 1, "watch": False, "deadline_ms": 5000},
            # An MCP server at the same raw upstream (tests/adversarial/test_mcp_properties.py).
            upstreams={"tools": {"protocol": "mcp", "base_url": f"{upstream.url}/mcp"}},
            audit={"dir": str(root / "audit"), "fsync": "never"},
        )
        warden = Warden(config)
        await warden.start()
        return upstream, warden

    upstream, warden = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    h = Harness(loop=loop, upstream=upstream, warden=warden, audit=AuditTail(root / "audit"))
    upstream.on_request = h.respond
    try:
        yield h
    finally:

        async def stop() -> None:
            await warden.stop()
            await upstream.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="session")
def oai(harness: Harness) -> Iterator[openai.OpenAI]:
    with harness.openai() as client:
        yield client


@pytest.fixture(scope="session")
def ant(harness: Harness) -> Iterator[anthropic.Anthropic]:
    with harness.anthropic() as client:
        yield client


def case_headers(case: str, deny_kind: str | None = None) -> dict[str, str]:
    """Headers that tag a request with its case id (and a call kind the policy denies)."""
    headers = {CASE_HEADER: case}
    if deny_kind is not None:
        headers["X-Warden-Context-Deny-Kind"] = deny_kind
    return headers


def chat_messages(case: str) -> list[dict[str, Any]]:
    """A chat request's messages carrying the case id, so the upstream finds its reply."""
    return [{"role": "user", "content": f"help ({case})"}]
