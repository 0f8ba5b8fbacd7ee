"""Which adapter speaks for a request: by upstream protocol family and path."""

from __future__ import annotations

from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.base import Adapter
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter

__all__ = ["adapter_for"]

# Adapters hold no per-request state (stream rewriters do), so one each suffices.
_RESPONSES = OpenAIResponsesAdapter()
_ROUTES: dict[str, tuple[tuple[str, Adapter], ...]] = {
    "openai": (
        ("chat/completions", OpenAIChatAdapter()),
        ("responses", _RESPONSES),
    ),
    "anthropic": (("messages", AnthropicMessagesAdapter()),),
}


def adapter_for(family: str, method: str, tail: str) -> Adapter | None:
    """The adapter for ``<method> <tail>`` on an upstream of ``family``, if Warden parses it.

    ``tail`` is the path after the upstream name, e.g. ``v1/chat/completions``;
    matching on the final segments works whether or not the base URL has ``/v1``.
    Other paths (models, embeddings, token counting) pass through as LLM calls.
    """
    tail = tail.strip("/")
    if method == "POST":
        for suffix, adapter in _ROUTES.get(family, ()):
            if tail == suffix or tail.endswith("/" + suffix):
                return adapter
        return None
    if method == "GET" and family == "openai":
        # A stored response fetched (or its stream resumed) later carries the
        # same proposed calls: they are decided like fresh ones.
        head, _, response_id = tail.rpartition("/")
        if (head == "responses" or head.endswith("/responses")) and response_id.startswith("resp"):
            return _RESPONSES
    return None
