"""Typed access to what the official SDKs parsed, for tests that read tool calls."""

from __future__ import annotations

from openai.types.chat import ChatCompletionMessage, ChatCompletionMessageFunctionToolCall


def function_calls(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    """The message's tool calls, which must all be function calls (the mocks send no others)."""
    calls = message.tool_calls or []
    functions = [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert len(functions) == len(calls), f"not all function calls: {calls}"
    return functions
