"""Settings every test shares."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# CI machines are shared and noisy: a generated case that runs slowly there is
# not a failure. Correctness is what the property tests assert, never speed.
settings.register_profile(
    "warden",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("warden")
