"""Which requests Warden parses, and which pass through as plain LLM calls."""

from __future__ import annotations

import pytest

from warden.protocols.registry import adapter_for


@pytest.mark.parametrize(
    ("family", "method", "tail", "expected"),
    [
        ("openai", "POST", "v1/chat/completions", "openai.chat"),
        ("openai", "POST", "chat/completions", "openai.chat"),  # base URL already has /v1
        ("openai", "POST", "v1/responses", "openai.responses"),
        # A stored response fetched later carries the same calls: decided too.
        ("openai", "GET", "v1/responses/resp_123", "openai.responses"),
        ("openai", "GET", "v1/responses/resp_123/input_items", None),
        ("openai", "GET", "v1/models", None),
        ("openai", "POST", "v1/embeddings", None),
        ("anthropic", "POST", "v1/messages", "anthropic.messages"),
        ("anthropic", "POST", "v1/messages/count_tokens", None),
        ("anthropic", "GET", "v1/messages", None),
        ("http", "POST", "v1/chat/completions", None),
    ],
)
def test_adapter_for(family: str, method: str, tail: str, expected: str | None) -> None:
    adapter = adapter_for(family, method, tail)
    assert (adapter.name if adapter is not None else None) == expected
