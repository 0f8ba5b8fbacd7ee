"""Record bodies: credentials dropped, redactions applied, stable encoding."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from warden.audit import record as audit_record
from warden.audit.record import (
    MAX_RESULT_CHARS,
    REDACTED,
    action_body,
    arguments_sha256,
    decision_body,
    encode,
    is_credential_key,
    mask_credentials,
    outcome_body,
    scrub_headers,
)
from warden.model import Effect, Mode, Outcome
from warden.testing.audit import sample_action, sample_decision


def test_credential_headers_are_dropped() -> None:
    headers = {
        "Authorization": "Bearer sk-live-1",
        "X-Api-Key": "k",
        "api-key": "k",
        "Cookie": "c",
        "User-Agent": "openai-python",
    }
    assert scrub_headers(headers) == {"user-agent": "openai-python"}


def test_credential_keys_are_masked_at_any_depth() -> None:
    value: dict[str, Any] = {
        "headers": {"Authorization": "Bearer x"},
        "items": [{"password": "p", "n": 1}],
    }
    assert mask_credentials(value) == {
        "headers": {"Authorization": REDACTED},
        "items": [{"password": REDACTED, "n": 1}],
    }
    assert value["headers"]["Authorization"] == "Bearer x", "the input must stay untouched"


def test_every_masked_path_is_named() -> None:
    """An agent must not hide an IBAN from approvers unseen, under a credential name."""
    value: dict[str, Any] = {
        "user_id": "ceo",
        "password_reset_email": "attacker@evil.example",
        "note": {"x_credential_hint": {"to_iban": "XX00ATTACKER", "tags": ["a", {"k": 1}]}},
        "a/b~c": {"secret": None},
        "pwd": REDACTED,  # already "[redacted]": nothing is hidden
        "cookie": {},
    }
    masked: list[str] = []
    assert mask_credentials(value, masked) == {
        "user_id": "ceo",
        "password_reset_email": REDACTED,
        # Whole: an object's keys may be secrets too ({"sk-...": "prod"}).
        "note": {"x_credential_hint": REDACTED},
        "a/b~c": {"secret": REDACTED},
        "pwd": REDACTED,
        "cookie": REDACTED,
    }
    assert masked == [
        "/password_reset_email",
        "/note/x_credential_hint",
        "/a~1b~0c/secret",  # RFC 6901: "/" and "~" escaped
        "/cookie",
    ]
    assert value["note"]["x_credential_hint"]["to_iban"] == "XX00ATTACKER"


def test_masked_argument_paths_are_listed_in_redacted_beside_the_policys() -> None:
    args = {
        "customer_id": "ceo",
        "email": "new@example.com",
        "pre_authorization_amount": 50000,
        "note": {"x_credential_hint": {"to_iban": "XX00ATTACKER"}},
    }
    body = action_body(sample_action(arguments=args), ("email",))
    assert body["arguments"] == {
        "customer_id": "ceo",
        "email": REDACTED,
        "pre_authorization_amount": REDACTED,
        "note": {"x_credential_hint": REDACTED},
    }
    assert body["redacted"] == [
        "email",
        "/pre_authorization_amount",
        "/note/x_credential_hint",
    ]
    assert body["arguments_sha256"] == arguments_sha256(args)
    # Inside a path the policy hid whole, a masked value is no longer named on its own.
    whole_note = action_body(sample_action(arguments=args), ("note",))
    assert whole_note["redacted"] == ["note", "/pre_authorization_amount"]
    # Nothing masked, nothing listed: the record's shape is unchanged.
    assert action_body(sample_action(arguments={"order_id": "A-1"}))["redacted"] == []


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "accessToken",
        "clientSecret",
        "refresh_token",
        "private_key",
        "X-Auth-Token",
        "auth",
        "bearer",
        "db_password",
        "x-warden-agent-key",
        "X-Warden-Agent-Token",
        "AWS_SECRET_ACCESS_KEY",
        "sessionToken",
        "Set-Cookie",
        "credentials",
        "api_token",
        "github_token",
        "botToken",
        "private-token",
        "x-vault-token",
        "x-amz-security-token",
        "jwt",
    ],
)
def test_credential_names_are_recognised_in_any_spelling(key: str) -> None:
    assert is_credential_key(key)
    assert mask_credentials({key: "s3cret", "n": 1}) == {key: REDACTED, "n": 1}


@pytest.mark.parametrize(
    "key",
    [
        "max_tokens",
        "prompt_tokens",
        "input_tokens",
        "author",
        "keyword",
        "order_id",
        "customer_key_count",
    ],
)
def test_ordinary_names_are_kept(key: str) -> None:
    assert not is_credential_key(key)


def test_a_json_result_has_its_credentials_masked() -> None:
    """A tool's answer (an OAuth token endpoint, a get_api_key tool) is masked like arguments."""
    token = '{"access_token": "eyJhbGciOi", "expires_in": 3600, "scope": "orders"}'
    recorded = outcome_body(Outcome(status=200, result=token))["result"]
    expected = {"access_token": REDACTED, "expires_in": 3600, "scope": "orders"}
    assert orjson.loads(recorded) == expected
    nested = ' [{"name": "crm", "apiKey": "k-123"}]'
    assert orjson.loads(outcome_body(Outcome(result=nested))["result"]) == [
        {"name": "crm", "apiKey": REDACTED}
    ]
    signed = '{"jwt": "eyJhbGciOi.x.y", "user": "u1"}'
    assert orjson.loads(outcome_body(Outcome(result=signed))["result"]) == {
        "jwt": REDACTED,
        "user": "u1",
    }
    # Nothing to mask, or not JSON at all: recorded exactly as it came. (JSON that names
    # a credential but does not parse is kept as its hash alone: the test below.)
    for text in ('{"order": "A-1", "key_count": 2}', "token: abc (not JSON)"):
        assert outcome_body(Outcome(result=text))["result"] == text


def test_action_body_applies_redactions_without_touching_the_action() -> None:
    args = {"email": "ann@example.com", "customer": {"phone": "+1 555"}, "tags": ["a", "b"]}
    action = sample_action(arguments=args, headers={"authorization": "Bearer sk-1", "x": "y"})
    body = action_body(action, ("email", "arguments.customer.phone", "tags.1", "missing.path"))
    assert body["arguments"] == {
        "email": REDACTED,
        "customer": {"phone": REDACTED},
        "tags": ["a", REDACTED],
    }
    assert body["redacted"] == ["email", "customer.phone", "tags.1"]
    assert body["request"]["headers"] == {"x": "y"}
    assert action.arguments == args


def test_whole_arguments_and_unparsed_arguments_are_redacted_entirely() -> None:
    action = sample_action()
    assert action.arguments is not None
    whole = action_body(action, ("arguments",))
    assert whole["arguments"] == REDACTED
    # What stays: the hash approvals bind to, and the argument names.
    assert whole["arguments_sha256"] == arguments_sha256(action.arguments)
    assert whole["argument_keys"] == sorted(action.arguments)
    shown = action_body(action)
    assert shown["arguments_sha256"] is None
    assert shown["argument_keys"] is None
    raw = dataclasses.replace(action, arguments=None, raw_arguments="{not json ann@example.com")
    # Unparseable text: no path in it can be redacted, so it is never written.
    for redact in ((), ("email",)):
        body = action_body(raw, redact)
        assert body["raw_arguments"] == REDACTED
        assert body["redacted"] == ["raw_arguments"]
        expected = hashlib.sha256(b"{not json ann@example.com").hexdigest()
        assert body["arguments_sha256"] == expected


def test_arguments_rfc8785_cannot_write_still_get_a_hash() -> None:
    action = sample_action(arguments={"amount": float("nan"), "big": 2**80})
    body = action_body(action, ("arguments",))
    assert body["arguments"] == REDACTED
    assert isinstance(body["arguments_sha256"], str)
    assert len(body["arguments_sha256"]) == 64


def test_a_result_hidden_whole_keeps_its_hash() -> None:
    result = "Ann's new email is ann@example.com"
    out = outcome_body(Outcome(status=200, result=result), ("arguments", "result"))
    assert out["result"] == REDACTED
    assert out["result_sha256"] == hashlib.sha256(result.encode()).hexdigest()


def test_outcome_result_redaction_and_truncation() -> None:
    result = '{"email": "ann@example.com", "ok": true}'
    out = outcome_body(Outcome(status=200, result=result), ("result.email",))
    assert orjson.loads(out["result"]) == {"email": REDACTED, "ok": True}
    assert out["redacted"] == ["result.email"]
    assert outcome_body(Outcome(result="plain text"), ("result.email",))["result"] == REDACTED
    assert outcome_body(Outcome(result=result), ("result",))["result"] == REDACTED
    assert outcome_body(Outcome(result=result), ("email",))["result"] == result
    big = "x" * (MAX_RESULT_CHARS + 10)
    cut = outcome_body(Outcome(result=big))
    assert len(cut["result"]) == MAX_RESULT_CHARS
    assert cut["result_sha256"] == hashlib.sha256(big.encode()).hexdigest()


def test_decision_body_carries_everything_the_schema_names() -> None:
    body = decision_body(sample_decision(Effect.DENY, reasons=("over limit",), mode=Mode.OBSERVE))
    value = orjson.loads(encode(body))
    assert value["effect"] == "deny"
    assert value["enforced"] == "allow"
    assert value["would"] == "would_deny"
    assert value["reasons"] == ["over limit"]
    assert value["mode"] == "observe"
    assert value["bundle_revision"] == "rev-1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_encoding_is_rfc8785_for_records_without_floats(value: dict[str, Any]) -> None:
    # Hashes cover the bytes as stored, so this is not needed for integrity; it
    # shows that, floats aside, auditors can recompute the stored form with any
    # JCS tool, including keys that sort differently by UTF-16 than by code point.
    assert encode(value) == rfc8785.dumps(value)


def test_keys_beyond_the_basic_plane_sort_as_rfc8785_says() -> None:
    value: dict[str, Any] = {"outer": {"\ue000": 1, "\U00010000": 2}, "a": "\U0001f600"}
    assert encode(value) == rfc8785.dumps(value)


def test_encoding_is_deterministic_and_handles_huge_integers() -> None:
    assert encode({"b": 1, "a": [2, {"d": 3, "c": 4}]}) == b'{"a":[2,{"c":4,"d":3}],"b":1}'
    assert orjson.loads(encode({"n": 2**70})) == {"n": 2**70}


def test_a_record_encoded_by_the_fallback_reads_back_as_every_reader_reads_it() -> None:
    # An integer past 64 bits sends the record to the standard library, which would
    # write inf as the bare word Infinity: verify and a restart would call it damage.
    record = {"tokens": 10**30, "cost": float("inf"), "rate": float("nan"), "ok": 1.5}
    payload = encode(record)
    assert orjson.loads(payload) == {"cost": None, "ok": 1.5, "rate": None, "tokens": 1e30}
    # An integer no reader can take is refused, never written.
    with pytest.raises(orjson.JSONDecodeError):
        encode({"tokens": 10**400})


def test_a_lone_surrogate_an_upstream_sent_is_written_as_a_replacement_character() -> None:
    # An MCP server's result text "\ud800": UTF-8 cannot hold it, and the outcome
    # record of the call it answers must still be written; the text sent stays
    # bound by its hash.
    body = outcome_body(Outcome(result="ok \ud800", error="bad \udc00"))
    assert orjson.loads(encode(body))["result"] == "ok \ufffd"
    assert body["error"] == "bad \ufffd"
    assert (
        body["result_sha256"]
        == hashlib.sha256("ok \ud800".encode("utf-8", "surrogatepass")).hexdigest()
    )
    # An action's own fields are not mended: no record can carry them, so none is made.
    with pytest.raises(ValueError):  # noqa: PT011 - orjson's and UnicodeEncodeError both
        encode({"tool": "safe\ud800"})


def test_arguments_hash_is_canonical() -> None:
    a = arguments_sha256({"amount": 250, "order_id": "A-1"})
    assert a == arguments_sha256({"order_id": "A-1", "amount": 250})
    assert a == hashlib.sha256(b'{"amount":250,"order_id":"A-1"}').hexdigest()


def test_a_long_argument_name_is_judged_but_not_remembered() -> None:
    long_name = "x" * 100_000 + "_password"
    assert is_credential_key(long_name)
    assert long_name not in audit_record._credential_memo  # kept, it would stay for good


@pytest.mark.parametrize(
    "result",
    [
        '{"access_token": "sk-LIVE-1", "user": "bob\ud83d"}',  # a lone surrogate
        '{"access_token": "sk-LIVE-2", "score": NaN}',
        '{"access_token": "sk-LIVE-3", "items": "xxxx',  # cut short before it was masked
    ],
)
def test_a_result_that_may_hold_a_credential_but_does_not_parse_is_kept_whole_as_its_hash(
    result: str,
) -> None:
    body = outcome_body(Outcome(result=result))
    assert body["result"] == REDACTED
    assert body["redacted"] == ["result"]
    assert body["result_sha256"] is not None
    assert "sk-LIVE" not in encode(body).decode()
