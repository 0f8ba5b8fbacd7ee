"""Credentials inside argument values, and numbers kept by drift baselines.

* :func:`warden.audit.record.mask_credentials` masks a URL's password (or its
  user info when it has none: a token as the user name) and its credential
  parameters (``api_key``, ``sig``, ``code``, ``key``, ``X-Amz-Signature``)
  wherever a string or a key holds a URL, lists what it changed, and leaves
  the action's own arguments (what the policy and the tool get) as they were.
* :func:`warden.monitor.psi.quantile_edges` cuts bins at round numbers, never
  at a recorded value that has more significant figures.
"""

from __future__ import annotations

import copy
import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.audit.record import REDACTED, action_body, mask_credentials
from warden.model import Action, ActionKind, Agent, RequestMeta, Stage
from warden.monitor.psi import bin_values, quantile_edges

EDGE_DIGITS = 3  # docs/monitoring.md: an edge has at most three significant figures


@pytest.mark.parametrize(
    ("given_text", "shown"),
    [
        (
            "https://svc:Hunter2Secret@internal.example.com/export?api_key=sk-1&page=2",
            "https://svc:[redacted]@internal.example.com/export?api_key=[redacted]&page=2",
        ),
        # libpq reads "?" as part of a password: the authority ends at the first "/".
        (
            "postgresql://app:p?w#d@db:5432/main?sslmode=require&sslpassword=k3y",
            "postgresql://app:[redacted]@db:5432/main?sslmode=require&sslpassword=[redacted]",
        ),
        # A fragment's parameters (OAuth's implicit flow), a name spelled with escapes.
        (
            "https://app.example.com/cb#access_token=ya29.X&state=s1&token_type=bearer",
            "https://app.example.com/cb#access_token=[redacted]&state=s1&token_type=bearer",
        ),
        ("https://h/p?api%5Fkey=SECRET&q=1", "https://h/p?api%5Fkey=[redacted]&q=1"),
        # URLs inside other text, and one inside another's query.
        (
            "run: curl 'https://bot:pw9@files.example/a?x_api_key=xk' && echo done",
            "run: curl 'https://bot:[redacted]@files.example/a?x_api_key=[redacted]' && echo done",
        ),
        (
            "https://h/login?next=https://u:p4ss@x/y?client_secret=cs1",
            "https://h/login?next=https://u:[redacted]@x/y?client_secret=[redacted]",
        ),
        # An "@" after the host is no user info; the query is still read.
        (
            "https://h.example/users/ann@example.com?refresh_token=rt1",
            "https://h.example/users/ann@example.com?refresh_token=[redacted]",
        ),
        # A token as the user name, with no password or GitHub's placeholder one.
        (
            "git clone https://ghp_abc123@github.com/org/repo.git",
            "git clone https://[redacted]@github.com/org/repo.git",
        ),
        ("https://ghp_abc123:x-oauth-basic@github.com/o", "https://[redacted]@github.com/o"),
        ("https://ghp_abc123:@github.com/o", "https://[redacted]@github.com/o"),
        ("https://ann@example.com/", "https://[redacted]@example.com/"),
        # Parameters named as URLs name credentials: Azure SAS and Functions keys,
        # Google API keys, presigned S3 and GCS URLs.
        (
            "https://a.blob.core.windows.net/c/b?sv=2022-11-02&sp=rw&sig=SAS%2Bsig",
            "https://a.blob.core.windows.net/c/b?sv=2022-11-02&sp=rw&sig=[redacted]",
        ),
        (
            "https://f.azurewebsites.net/api/x?code=FNKEY",
            "https://f.azurewebsites.net/api/x?code=[redacted]",
        ),
        (
            "https://api.example.com/v1/items?page=2&max_tokens=5&key=AIza1",
            "https://api.example.com/v1/items?page=2&max_tokens=5&key=[redacted]",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA1%2F2026&X-Amz-Date=20260101"
            "&X-Amz-Signature=abc",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=[redacted]&X-Amz-Date=20260101"
            "&X-Amz-Signature=[redacted]",
        ),
        (
            "https://storage.googleapis.com/b/o?X-Goog-Signature=def&Signature=s2&subscription-key=k",
            "https://storage.googleapis.com/b/o?X-Goog-Signature=[redacted]&Signature=[redacted]"
            "&subscription-key=[redacted]",
        ),
    ],
)
def test_credentials_in_urls_are_masked(given_text: str, shown: str) -> None:
    masked: list[str] = []
    assert mask_credentials({"v": given_text}, masked) == {"v": shown}
    assert masked == ["/v"]


@pytest.mark.parametrize(
    "text",
    [
        "https://api.example.com/v1/items?page=2&max_tokens=5&codec=h264&signed=1",
        # An "@" in a query that follows the host is the query's, not user info.
        "https://h.example?email=ann@example.com",
        "https://example.com:8443/a#frag",
        # Masked already (warden.urls.shown_url's form, or this one): nothing more to hide.
        "https://u:***@h/?token=***",
        "https://u:[redacted]@h/?token=[redacted]",
        "https://[redacted]@h/?sig=[redacted]",
        "no url here: user:pw@host ?token=abc",
        "://",
        "x:// :@",
    ],
)
def test_strings_without_a_credential_in_a_url_stay_as_they_are(text: str) -> None:
    masked: list[str] = []
    assert mask_credentials({"v": text}, masked) == {"v": text}
    assert masked == []


def test_urls_are_masked_at_any_depth_and_listed_by_pointer() -> None:
    value = {
        "hooks": [{"target": "https://u:pw@h/"}, "https://h/?token=t", 3],
        "note": "plain",
    }
    masked: list[str] = []
    shown = mask_credentials(value, masked)
    assert shown == {
        "hooks": [{"target": "https://u:[redacted]@h/"}, "https://h/?token=[redacted]", 3],
        "note": "plain",
    }
    assert masked == ["/hooks/0/target", "/hooks/1"]
    assert mask_credentials("https://u:pw@h/") == "https://u:[redacted]@h/"


def test_a_url_as_a_key_is_masked_and_keys_stay_unique() -> None:
    value = {
        "https://svc:PwOne@api.example.com/": "first",
        "https://svc:PwTwo@api.example.com/": {"next": "https://tok@h/"},
        "https://svc:[redacted]@api.example.com/": "sent masked by the agent",
        "https://h/?api_key=k1": "a credential-named key",
        "https://h/docs": "no credential",
    }
    masked: list[str] = []
    shown = mask_credentials(value, masked)
    assert shown == {
        "https://svc:[redacted]@api.example.com/ (2)": "first",
        "https://svc:[redacted]@api.example.com/ (3)": {"next": "https://[redacted]@h/"},
        "https://svc:[redacted]@api.example.com/": "sent masked by the agent",
        "https://h/?api_key=[redacted]": "[redacted]",
        "https://h/docs": "no credential",
    }
    assert masked == [
        "/https:~1~1svc:[redacted]@api.example.com~1 (2)",
        "/https:~1~1svc:[redacted]@api.example.com~1 (3)/next",
        "/https:~1~1svc:[redacted]@api.example.com~1 (3)",
        "/https:~1~1h~1?api_key=[redacted]",
    ]
    assert "PwOne" not in repr(shown)
    assert "PwTwo" not in repr(shown)


def _action(arguments: dict[str, Any]) -> Action:
    return Action(
        action_id="act_1",
        agent=Agent("support-triage", "v1"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool="fetch_url",
        arguments=arguments,
        context={"referer": "https://kb.example.com/?session_token=st-1"},
    )


def test_only_the_record_is_masked() -> None:
    arguments = {"url": "https://svc:Hunter2@h/x?api_key=sk-1", "n": 1}
    action = _action(arguments)
    before = copy.deepcopy(arguments)
    body = action_body(action)
    # What the policy and the tool get is the action's own arguments: untouched.
    assert action.arguments == before
    assert body["arguments"] == {"url": "https://svc:[redacted]@h/x?api_key=[redacted]", "n": 1}
    assert body["redacted"] == ["/url"]
    assert body["arguments_sha256"] is not None  # binds the arguments as sent
    assert body["context"] == {"referer": "https://kb.example.com/?session_token=[redacted]"}


def test_a_url_key_is_masked_in_the_record_and_in_the_hidden_arguments_names() -> None:
    arguments = {"https://svc:PwKey@api.example.com/": "x", "n": 1}
    body = action_body(_action(arguments))
    assert body["arguments"] == {"https://svc:[redacted]@api.example.com/": "x", "n": 1}
    assert body["redacted"] == ["/https:~1~1svc:[redacted]@api.example.com~1"]
    hidden = action_body(_action(arguments), ("action.arguments",))
    assert hidden["arguments"] == REDACTED
    assert hidden["argument_keys"] == ["https://svc:[redacted]@api.example.com/", "n"]


def test_a_url_inside_what_the_policy_redacted_is_not_listed_twice() -> None:
    body = action_body(_action({"spec": {"url": "https://u:pw@h/"}}), ("action.arguments.spec",))
    assert body["arguments"] == {"spec": REDACTED}
    assert body["redacted"] == ["spec"]


@pytest.mark.parametrize(
    ("values", "edges"),
    [
        # Between 12.5 and 30, 20; 30 is round already; between 45 and 61.25, 50.
        ([12.5, 30.0, 45.0, 61.25], (20.0, 30.0, 50.0)),
        # Between -37.45 and -37 no number of 1 or 2 figures: -37.4. Then -30, and 0.
        ([-37.45, -37.0, -0.3, 12.0], (-37.4, -30.0, 0.0)),
    ],
)
def test_bin_edges_are_the_roundest_numbers_between_the_values(
    values: list[float], edges: tuple[float, ...]
) -> None:
    found = quantile_edges(values, bins=5)
    assert found == edges
    # The reference is binned as with the values themselves as edges: one bin each.
    assert bin_values(values, found).counts == (1, 1, 1, 1)


def test_no_edge_is_a_value_too_close_to_another_to_round() -> None:
    # Customers' numeric ids or phone numbers: no round number lies between them.
    ids = [float(4915100000000 + i) for i in range(0, 40, 3)]
    edges = quantile_edges(ids)
    assert not set(edges) & set(ids)
    assert all(_digits(e) <= EDGE_DIGITS for e in edges)
    assert bin_values(ids, edges).total == len(ids)


def _digits(value: float) -> int:
    """Significant figures of ``value`` as Python writes it shortest (``repr``)."""
    return len(Decimal(repr(value)).normalize().as_tuple().digits)


@given(st.lists(st.floats(-1e12, 1e12, allow_nan=False), min_size=1, max_size=200))
def test_every_edge_is_round_and_every_value_lands_in_one_bin(values: list[float]) -> None:
    edges = quantile_edges(values)
    assert list(edges) == sorted(set(edges))
    assert all(_digits(e) <= EDGE_DIGITS and math.isfinite(e) for e in edges)
    assert all(e < max(values) for e in edges)
    assert bin_values(values, edges).total == len(values)
