"""Fake upstreams for tests, the demo and benchmarks.

:class:`MockLLM` is a scripted OpenAI/Anthropic provider; :class:`MockTools`
serves customer-support tool APIs. Both bind 127.0.0.1 only and work as async
context managers::

    from warden.testing import Call, MockLLM, Reply

    async with MockLLM() as llm:
        llm.script(Reply(text="Checking.", tool_calls=[Call("get_order", {"order_id": "A-1001"})]))
        ...  # point an SDK (or Warden's upstream) at llm.url

Also here, imported by their module path:

* :mod:`warden.testing.raw_upstream`: an upstream that answers with exact
  crafted bytes (status, headers, chunks, delays), for adversarial tests;
* :mod:`warden.testing.mcp_server`: a real MCP server (official SDK) with the
  support tools, runnable over stdio;
* :mod:`warden.testing.memory_audit`: an in-memory audit sink;
* :mod:`warden.testing.audit`: sample records and segment surgery for tests
  of the audit log.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from warden.testing.mock_llm import (
        DEFAULT_TEXT,
        Call,
        Fault,
        FaultKind,
        MockLLM,
        ReceivedRequest,
        Reply,
        Responder,
        WireProtocol,
        last_user_text,
        prompt_tokens,
    )
    from warden.testing.mock_tools import (
        TOOLS,
        MockTools,
        ToolInvocation,
        ToolSpec,
        anthropic_tools,
        openai_tools,
        responses_tools,
    )

__all__ = [
    "DEFAULT_TEXT",
    "TOOLS",
    "Call",
    "Fault",
    "FaultKind",
    "MockLLM",
    "MockTools",
    "ReceivedRequest",
    "Reply",
    "Responder",
    "ToolInvocation",
    "ToolSpec",
    "WireProtocol",
    "anthropic_tools",
    "last_user_text",
    "openai_tools",
    "prompt_tokens",
    "responses_tools",
]

_LLM_NAMES = frozenset(
    {
        "DEFAULT_TEXT",
        "Call",
        "Fault",
        "FaultKind",
        "MockLLM",
        "ReceivedRequest",
        "Reply",
        "Responder",
        "WireProtocol",
        "last_user_text",
        "prompt_tokens",
    }
)


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m warden.testing.mock_llm` does not
    # find its own module already imported by this package.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = "mock_llm" if name in _LLM_NAMES else "mock_tools"
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
