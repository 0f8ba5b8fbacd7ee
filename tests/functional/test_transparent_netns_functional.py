"""``mode: transparent`` with iptables redirection, inside a network namespace the test makes.

The test re-runs this module as a program under ``unshare --net --mount``: a
fresh network namespace (only loopback) where ``/etc/hosts`` is bind-mounted
so that ``api.openai.com`` and ``other.example`` resolve to 127.0.0.77. An
iptables ``nat OUTPUT`` rule redirects 127.0.0.77:443 to Warden's transparent
listener, so the unmodified openai SDK (default base URL, no proxy settings)
is governed without knowing it. Skipped where the machine cannot do this
(not root, no ``unshare`` or ``iptables``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import ROOT, audit_records
from tests.functional.test_transparent_sdk_functional import (
    API_KEY,
    EXPORT,
    KB,
    MESSAGES,
    export_ca,
    transparent_config,
)

REDIRECTED = "127.0.0.77"


def _can_redirect() -> str | None:
    """Why this machine cannot run the test, or ``None``."""
    if os.geteuid() != 0:
        return "needs root for a network namespace with iptables"
    for tool in ("unshare", "iptables", "mount", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "iptables", "-t", "nat", "-L", "OUTPUT"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"iptables in a new network namespace failed: {probe.stderr.decode()[:200]}"
    return None


@pytest.mark.skipif(_can_redirect() is not None, reason=str(_can_redirect()))
async def test_iptables_redirection_is_governed_in_a_network_namespace(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{REDIRECTED} api.openai.com other.example\n")
    script = (
        f"ip link set lo up && mount --bind {hosts} /etc/hosts && "
        f"exec {sys.executable} -m tests.functional.test_transparent_netns_functional {tmp_path}"
    )
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--net", "--mount", "sh", "-c", script,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["tool_calls"] == ["search_kb"]
    assert "blocked the tool call `export_customers`" in result["content"]
    assert result["other_status"] == 403
    assert result["upstream_authorization"] == f"Bearer {API_KEY}"
    assert result["doors"] == ["transparent", "transparent", "transparent"]


async def _inside(work: Path) -> dict[str, Any]:
    """Runs in the namespace: mock upstream, Warden in transparent mode, the plain SDK."""
    import httpx2  # noqa: PLC0415
    import openai  # noqa: PLC0415

    from warden.server import Warden  # noqa: PLC0415
    from warden.testing import MockLLM, Reply  # noqa: PLC0415

    async with MockLLM() as llm:
        cfg = transparent_config(
            work, llm.url, transparent={"mode": "transparent", "listen": "127.0.0.1:0"}
        )
        async with Warden(cfg) as warden:
            port = warden.transparent_address.rsplit(":", 1)[1]
            rule = await asyncio.create_subprocess_exec(
                "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", REDIRECTED,
                "--dport", "443", "-j", "REDIRECT", "--to-ports", port,
            )  # fmt: skip
            assert await rule.wait() == 0
            verify = ssl.create_default_context(cafile=export_ca(warden, work))
            llm.script(Reply(text="Let me help.", tool_calls=[KB, EXPORT]))
            async with openai.AsyncOpenAI(
                api_key=API_KEY,
                max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(verify=verify, trust_env=False),
            ) as client:
                completion = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES
                )
            async with httpx2.AsyncClient(verify=verify, trust_env=False) as http:
                other = await http.get("https://other.example/")
        message = completion.choices[0].message
        authorization = llm.requests[0].headers["Authorization"]
    records = audit_records(work / "audit")
    return {
        "tool_calls": [c.function.name for c in message.tool_calls or [] if c.type == "function"],
        "content": message.content,
        "other_status": other.status_code,
        "upstream_authorization": authorization,
        "doors": [
            r["action"]["request"].get("door") for r in records if r.get("kind") == "decision"
        ],
    }


if __name__ == "__main__":
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    print(json.dumps(asyncio.run(_inside(work))))
