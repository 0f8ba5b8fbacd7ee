"""A bundle server's answer cut short once is fetched again, never kept as served.

A body that ends when the connection closes (no Content-Length, not chunked)
can be cut by a proxy or a restart without the client knowing. Such an archive
is refused as cut short and its ETag is not kept, so the next poll fetches it
whole; a plain tar cut between members no longer activates without its last
files.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.functional.test_policy_engine import config, doc, wait_for
from warden.policy.engine import PolicyEngine

BASE = """package warden
import rego.v1
default decision := {"effect": "allow"}
decision := {"effect": "deny", "reasons": ["refunds are frozen"]} if deny_refunds
"""
FREEZE = """package warden
import rego.v1
deny_refunds if input.action.tool == "issue_refund"
"""


def archive(gz: bool) -> tuple[bytes, list[int]]:
    """The bundle, and where each member ends (in the plain tar)."""
    files = {
        ".manifest": json.dumps({"revision": "rel-8", "roots": ["warden"]}).encode(),
        "warden/policy.rego": BASE.encode(),
        "warden/zz_freeze.rego": FREEZE.encode(),
    }
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            ends.append(buf.tell())
    return buf.getvalue(), ends


@asynccontextmanager
async def cut_once(body: bytes, cut: int, asked: list[str | None]) -> AsyncIterator[str]:
    """A bundle server whose first answer ends, at connection close, after ``cut`` bytes."""
    first = [True]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        etags = [
            line.split(b":", 1)[1].strip().decode()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"if-none-match:")
        ]
        asked.append(etags[0] if etags else None)
        if etags == ['"rel-8"']:
            writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "rel-8"\r\nContent-Length: 0\r\n')
            writer.write(b"Connection: close\r\n\r\n")
        else:
            sent = body[:cut] if first[0] else body
            first[0] = False
            writer.write(b'HTTP/1.1 200 OK\r\nETag: "rel-8"\r\nConnection: close\r\n\r\n' + sent)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/bundles/support.tar.gz"
    finally:
        server.close()
        await server.wait_closed()


async def freezes_refunds(eng: PolicyEngine) -> bool:
    decision = await eng.evaluate(doc("issue_refund", amount=80))
    return decision.effect == "deny"


async def test_a_gzipped_bundle_cut_once_is_fetched_whole_at_the_next_poll(
    tmp_path: Path,
) -> None:
    body, _ = archive(gz=True)
    asked: list[str | None] = []
    async with cut_once(body, len(body) // 2, asked) as url:
        eng = await PolicyEngine.start(config(tmp_path / "unused", bundle_url=url, workers=1))
        try:
            assert "cut short" in str(eng.status()["last_error"])
            await wait_for(lambda: eng.revision == "rel-8")
            assert asked[:2] == [None, None]  # the cut answer's ETag was not kept
            assert await freezes_refunds(eng)
        finally:
            await eng.close()


async def test_a_plain_tar_cut_between_members_never_activates_without_its_last_rule(
    tmp_path: Path,
) -> None:
    body, ends = archive(gz=False)
    asked: list[str | None] = []
    async with cut_once(body, ends[1], asked) as url:  # zz_freeze.rego cut off
        eng = await PolicyEngine.start(config(tmp_path / "unused", bundle_url=url, workers=1))
        try:
            assert eng.revision != "rel-8"
            assert "before its end marker" in str(eng.status()["last_error"])
            await wait_for(lambda: eng.revision == "rel-8")
            assert await freezes_refunds(eng)
            await wait_for(lambda: len(asked) >= 4)
            assert asked[2:] == ['"rel-8"'] * (len(asked) - 2)  # kept once activated
        finally:
            await eng.close()
