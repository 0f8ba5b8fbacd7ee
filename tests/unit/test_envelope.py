"""``misspelled_key``: every case-blind respelling of an envelope key is found, nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.adversarial import wire
from warden.protocols import anthropic, openai_chat, openai_responses
from warden.protocols._wire import Envelope, event_object

CHAT = openai_chat.OpenAIChatAdapter()
RESPONSES = openai_responses.OpenAIResponsesAdapter()
ANTHROPIC = anthropic.AnthropicMessagesAdapter()
BODIES: list[tuple[Any, Envelope, dict[str, Any]]] = [
    (
        CHAT,
        openai_chat._ENVELOPE,
        wire.chat_body([wire.chat_call("search_kb", {"query": "x"})], text="hi"),
    ),
    (
        RESPONSES,
        openai_responses._ENVELOPE,
        wire.response_body([wire.fn_item("search_kb", {"query": "x"})]),
    ),
    (
        ANTHROPIC,
        anthropic._ENVELOPE,
        wire.message_body([wire.tool_use("search_kb", {"query": "x"})]),
    ),
]


def _keys(value: Any, inside: frozenset[str], out: list[str]) -> list[str]:
    """Every key the envelope checks, in the order they are met."""
    if isinstance(value, list):
        for item in value:
            _keys(item, inside, out)
    elif isinstance(value, dict):
        out.extend(value)
        for name in inside:
            if name in value:
                _keys(value[name], inside, out)
    return out


def _respell(key: str, flips: list[bool]) -> str:
    """``key`` with the letters ``flips`` marks upper-cased (long s and Kelvin sign too)."""
    out = []
    for char, flip in zip(key, flips + [False] * len(key), strict=False):
        if flip and char == "s":
            out.append("\u017f")
        elif flip and char == "k":
            out.append("\u212a")
        else:
            out.append(char.upper() if flip else char)
    return "".join(out)


@given(which=st.integers(0, 2), pick=st.integers(0, 1000), flips=st.lists(st.booleans()))
def test_any_respelled_envelope_key_is_found(which: int, pick: int, flips: list[bool]) -> None:
    adapter, envelope, body = BODIES[which]
    assert adapter.misspelled_key(body) is None
    keys = [k for k in _keys(body, envelope.inside, []) if k in envelope.names]
    key = keys[pick % len(keys)]
    spelled = _respell(key, flips)
    text = json.dumps(body).replace(f'"{key}":', f'"{spelled}":', 1)
    bent = json.loads(text)
    assert adapter.misspelled_key(bent) == (None if spelled == key else spelled)


def test_arguments_and_other_fields_keep_any_spelling() -> None:
    block = wire.tool_use("search_kb", {"ID": 1, "Name": "Ada", "TYPE": "x"})
    assert ANTHROPIC.misspelled_key(wire.message_body([block])) is None
    body = wire.response_body([wire.fn_item("search_kb", {"Name": 1})])
    body["metadata"] = {"ID": "7", "Output": "kept"}
    assert RESPONSES.misspelled_key(body) is None
    chat = wire.chat_body([wire.chat_call("search_kb", {"NAME": "x"})])
    chat["X-Vendor"] = {"Choices": 1}  # an unknown field is not read into
    assert CHAT.misspelled_key(chat) is None


def test_both_spellings_at_once_are_refused() -> None:
    body = wire.chat_body([wire.chat_call("search_kb", {})])
    message = body["choices"][0]["message"]
    message["Tool_Calls"] = [wire.chat_call("export_customers", {})]
    assert CHAT.misspelled_key(body) == "Tool_Calls"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("{", "is not JSON"),
        ("[1]", "is not a JSON object"),
        ('{"CHOICES": []}', "has the key 'CHOICES'"),
    ],
)
def test_event_object_says_what_an_event_is_not(data: str, why: str) -> None:
    envelope = openai_chat._ENVELOPE
    with pytest.raises(ValueError, match=why):
        event_object(data, envelope)
    assert event_object('{"choices": []}', envelope) == {"choices": []}
