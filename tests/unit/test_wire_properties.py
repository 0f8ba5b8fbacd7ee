"""``parse_arguments``: the orjson fast path answers exactly as the stdlib path."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.errors import InvalidJSON
from warden.protocols._wire import (
    dumps,
    loads,
    parse_arguments,
    policy_safe,
    reject_constant,
    request_bytes,
    request_object,
    unique_keys,
)


def reference(raw: str) -> tuple[str, Any]:
    """The stdlib-only reading: duplicate keys and ``NaN`` refused."""
    try:
        value = json.loads(raw, object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return raw, None
    if not isinstance(value, dict) or not policy_safe(value):
        return raw, None
    return raw, value


_SPACE = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])
# Keys and strings that look like JSON structure: quotes, colons, escapes, surrogates.
_TEXT = st.text(
    alphabet=st.sampled_from(["a", "b", '"', ":", "\\", " ", "é", "\ud800", "{", ","]), max_size=5
)
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    st.sampled_from(["NaN", "-Infinity", "1e400", "-0", "0.0"]).map(lambda t: ("raw", t)),
)


def _render(value: Any, space: str) -> str:
    if isinstance(value, tuple):
        return str(value[1])
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, list) and value and value[0] == "obj":
        pairs = value[1]
        return (
            "{"
            + ",".join(
                f"{space}{json.dumps(k, ensure_ascii=False)}{space}:{space}{_render(v, space)}"
                for k, v in pairs
            )
            + space
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(_render(v, space) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _object(pairs: list[tuple[str, Any]]) -> list[Any]:
    return ["obj", pairs]


def _nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Pairs, not a dict: the same key may come twice.
    keys = st.sampled_from(["a", "b", 'c"', "d:"]) | _TEXT
    return st.one_of(
        st.lists(inner, max_size=3), st.lists(st.tuples(keys, inner), max_size=4).map(_object)
    )


_VALUE = st.recursive(_SCALAR, _nest, max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "a", "b", 'x":', "\\"]) | _TEXT, _VALUE), max_size=4),
    _SPACE,
)
def test_fast_path_reads_as_the_stdlib_does(pairs: list[tuple[str, Any]], space: str) -> None:
    raw = _render(["obj", pairs], space)
    got = parse_arguments(raw)
    want = reference(raw)
    assert got[0] == want[0]
    # Compare as JSON text: Python says True == 1 and nan != nan.
    assert json.dumps(got[1], sort_keys=True) == json.dumps(want[1], sort_keys=True)


def test_repeated_keys_are_malformed_on_both_paths() -> None:
    assert parse_arguments('{"a": 1, "a": 2}')[1] is None
    assert parse_arguments('{"a": {"b": 1, "b": 1}}')[1] is None
    # A colon inside a string only makes the fast path defer to the stdlib.
    assert parse_arguments('{"a": "x\\": 1", "b": 2}')[1] == {"a": 'x": 1', "b": 2}
    assert parse_arguments('{"n": 12345678901234567890123}')[1] is None
    assert parse_arguments('{"n": 1234567890123456789}')[1] == {"n": 1234567890123456789}


_DOC = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(alphabet=st.sampled_from(["a", "1", "é", '"', "\\", "\ud800"]), max_size=4),
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "1234567890123456789012"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(_DOC, st.booleans())
def test_loads_reads_bodies_as_the_sdks_do(value: Any, as_bytes: bool) -> None:
    # Integers past 64 bits, NaN and infinities are what the SDKs' stdlib parser keeps.
    text = json.dumps(value)
    got = loads(text.encode("utf-8", "surrogatepass") if as_bytes else text)
    assert json.dumps(got, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(_DOC)
def test_dumps_writes_what_the_sdks_read_back(value: Any) -> None:
    assert json.dumps(json.loads(dumps(value)), sort_keys=True) == json.dumps(value, sort_keys=True)


def test_a_request_is_sent_as_warden_read_it() -> None:
    # A key given twice keeps its last value, and only that goes upstream; integers past
    # 64 bits stay exact (orjson alone would make them floats); NaN is refused.
    body = b'{"seed": 123456789012345678901234567, "model": "a", "model": "b"}'
    value = request_object(body)
    assert value == {"seed": 123456789012345678901234567, "model": "b"}
    assert request_bytes(value) == b'{"seed":123456789012345678901234567,"model":"b"}'
    assert request_bytes({"input": "héllo"}) == '{"input":"héllo"}'.encode()
    big = b'"seed": 12345678901234567890123'
    for bad in (
        b'{"t": NaN}',
        b"{" + big + b', "t": Infinity}',
        b"{" + big + b', "t": 1e400}',  # past a float: as orjson refuses it
        b"{" + big + b', "t": "\\ud83d"}',  # a lone surrogate: as orjson refuses it
        b"[1]",
        b"{",
    ):
        with pytest.raises(InvalidJSON):
            request_object(bad)
