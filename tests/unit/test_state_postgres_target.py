"""What Warden shows of a PostgreSQL URL: never its password, even in libpq's own errors."""

from __future__ import annotations

import pytest

from warden.config import StateConfig
from warden.errors import ConfigError
from warden.state.postgres import PgTarget, redact_url


def test_redact_url_masks_the_password_and_credential_named_query_keys() -> None:
    url = "postgresql://warden:pw@db:5432/w?sslmode=verify-full&sslpassword=kp&password=q"
    assert redact_url(url) == (
        "postgresql://warden:***@db:5432/w?sslmode=verify-full&sslpassword=***&password=***"
    )


async def test_a_url_libpq_cannot_parse_is_refused_without_quoting_its_password() -> None:
    """libpq quotes the token it cannot decode (a bare ``%`` in a password); Warden scrubs it."""
    target = PgTarget.from_config(StateConfig(url="postgresql://warden:p%zzS3CRET@127.0.0.1:1/w"))
    with pytest.raises(ConfigError) as info:
        await target.connect()
    assert "S3CRET" not in str(info.value)
    assert "postgresql://warden:***@127.0.0.1:1/w" in str(info.value)
