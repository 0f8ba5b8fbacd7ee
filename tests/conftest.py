"""Settings every test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests import pg
from tests.pg import PgServer

# CI machines are shared and noisy: a generated case that runs slowly there is
# not a failure. Correctness is what the property tests assert, never speed.
settings.register_profile(
    "warden",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("warden")


# -- a real PostgreSQL (tests/pg.py): one server per session, one database per test ---------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server; tests that use it skip when it cannot start."""
    found = pg.start()
    if isinstance(found, str):
        pytest.skip(found)
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database's URL (as the app role; its password is in ``pg_server.password_file``)."""
    with pg.database(pg_server) as name:
        yield pg_server.url(name)
