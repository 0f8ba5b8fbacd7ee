"""Keys equal but for case, through real doors: decided as malformed, never passed on.

Go's ``encoding/json`` (and .NET's default binder) read JSON keys without
regard to case, the last one winning; a policy that read ``path`` must not let
a tool run on ``PATH``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai

from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "show me the log"}]


async def test_a_tool_call_with_case_variant_keys_is_blocked(
    warden: Warden, llm: MockLLM, records: Callable[[], list[dict[str, Any]]]
) -> None:
    shadow = '{"path": "/tmp/ok.log", "PATH": "/etc/shadow"}'
    llm.script(Reply(tool_calls=[Call("search_kb", shadow), Call("search_kb", {"query": "ok"})]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        got = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    calls = got.choices[0].message.tool_calls or []
    assert [c.function.arguments for c in calls if c.type == "function"] == ['{"query":"ok"}']
    decisions = [
        r["decision"]
        for r in records()
        if r["kind"] == "decision" and r["action"]["tool"] == "search_kb"
    ]
    assert [d["effect"] for d in decisions] == ["deny", "allow"]
