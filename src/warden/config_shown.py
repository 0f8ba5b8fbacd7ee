"""The effective configuration as Warden shows it: every secret masked.

``warden config`` prints it, and the ``config_load`` audit record carries its
hash (:func:`warden.audit.changes.config_sha256`). Secret fields are
``**********`` already (pydantic ``SecretStr``); on top of that,
credential-named keys (``secret``, ``token``, ...) are masked at any depth,
and URLs lose what they may carry: a password, query values (tokens,
presigned signatures; for PostgreSQL only credential-named ones, so
``sslmode`` stays readable) and, for the approval webhook, its path (a Slack
webhook's path is its token).
"""

from __future__ import annotations

import re
from typing import Any

from warden.audit.record import mask_credentials
from warden.config import Config
from warden.state.postgres import redact_url
from warden.urls import MASK, shown_url

__all__ = ["shown_config"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")


def shown_config(config: Config) -> dict[str, Any]:
    """``config`` as JSON-ready data with its secrets masked."""
    dumped: dict[str, Any] = mask_credentials(_urls_shown(config.model_dump(mode="json")))
    webhook = dumped.get("approvals", {}).get("webhook", {})
    if isinstance(webhook.get("url"), str):
        scheme, _, rest = webhook["url"].partition("://")
        webhook["url"] = f"{scheme}://{rest.split('/', 1)[0]}/{MASK}"
    return dumped


def _urls_shown(value: Any) -> Any:
    if isinstance(value, str):
        if not _URL.match(value):
            return _URL_PASSWORD.sub(rf"\1:{MASK}@", value)  # a URL inside other text
        if value.startswith(("postgresql://", "postgres://")):
            return redact_url(value)
        return shown_url(value)
    if isinstance(value, dict):
        return {k: _urls_shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_urls_shown(v) for v in value]
    return value
