"""URLs as Warden shows them: passwords and query values masked (warden.urls)."""

from __future__ import annotations

import pytest

from warden.audit.record import is_credential_key
from warden.urls import scrub, shown_url, url_secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://host/path", "https://host/path"),
        ("https://ops:hunter2@host:8443/b.tar.gz", "https://ops:***@host:8443/b.tar.gz"),
        ("https://ops@host/b", "https://ops@host/b"),
        ("https://host/b?token=abc&v=2", "https://host/b?token=***&v=***"),
        ("https://host/b?X-Amz-Signature=a%2Fb", "https://host/b?X-Amz-Signature=***"),
        ("https://u:p%40ss@host/b?flag", "https://u:***@host/b?flag=***"),
    ],
)
def test_shown_url_masks_the_password_and_every_query_value(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_secrets_are_found_as_written_and_decoded_and_scrubbed_longest_first() -> None:
    url = "https://ops:pa%2Fss@host/b?token=t0k%2Fen&sig=t0ke&v=2"
    secrets = url_secrets(url)
    assert set(secrets) == {"pa%2Fss", "pa/ss", "t0k%2Fen", "t0k/en", "t0ke"}
    error = "502, message='', url='https://host/b?token=t0k%2Fen&sig=t0ke&v=2' (pa/ss)"
    # "v=2" is too short to tell apart: scrubbing it would take every "2" (the 502).
    scrubbed = "502, message='', url='https://host/b?token=***&sig=***&v=2' (***)"
    assert scrub(error, secrets) == scrubbed


def test_a_database_url_keeps_its_options_readable() -> None:
    url = "postgresql://warden:pw@db/w?sslmode=require&sslpassword=k3y-pass"
    shown = shown_url(url, masked=is_credential_key)
    assert shown == "postgresql://warden:***@db/w?sslmode=require&sslpassword=***"
    assert set(url_secrets(url, masked=is_credential_key)) == {"pw", "k3y-pass"}


@pytest.mark.parametrize(
    ("url", "shown", "password"),
    [
        (
            "postgresql://warden:s3cr?tPW9@db:5432/warden?sslmode=require",
            "postgresql://warden:***@db:5432/warden?sslmode=require",
            "s3cr?tPW9",
        ),
        ("postgresql://ship:ab#cdEFG@db/warden", "postgresql://ship:***@db/warden", "ab#cdEFG"),
        ("postgresql://ship:a?b#c@db", "postgresql://ship:***@db", "a?b#c"),
    ],
)
def test_a_password_holding_question_marks_or_hashes_is_masked_whole(
    url: str, shown: str, password: str
) -> None:
    # libpq reads "?" and "#" in the user info as password characters; urlsplit ends
    # the authority there, and showed the rest of the password.
    assert shown_url(url, masked=is_credential_key) == shown
    assert password in url_secrets(url, masked=is_credential_key)
