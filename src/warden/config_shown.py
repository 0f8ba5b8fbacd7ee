"""The effective configuration as Warden shows it: every secret masked.

``warden config`` prints it, and the ``config_load`` audit record carries its
hash (:func:`warden.audit.changes.config_sha256`). Secret fields are
``**********`` already (pydantic ``SecretStr``); on top of that,
credential-named keys (``secret``, ``token``, ...) are masked at any depth
(one left unset stays ``null``),
and URLs lose what they may carry: a password, query values (tokens,
presigned signatures; for PostgreSQL only credential-named ones, so
``sslmode`` stays readable) and, for the approval webhook, its path (a Slack
webhook's path is its token).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from warden.audit.record import mask_credentials
from warden.config import Config
from warden.state.postgres import redact_url
from warden.urls import MASK, shown_url

__all__ = ["shown_config"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")


def shown_config(config: Config) -> dict[str, Any]:
    """``config`` as JSON-ready data with its secrets masked."""
    dumped: dict[str, Any] = _masked(config, _urls_shown(config.model_dump(mode="json")))
    webhook = dumped.get("approvals", {}).get("webhook", {})
    if isinstance(webhook.get("url"), str):
        scheme, _, rest = webhook["url"].partition("://")
        webhook["url"] = f"{scheme}://{rest.split('/', 1)[0]}/{MASK}"
    return dumped


def _masked(value: Any, dumped: Any) -> Any:
    """``dumped`` (``value`` as JSON) with credential-named keys masked in free-form maps.

    Sections under credential-like names (``identity.jwt``, ``admin.tokens``)
    and the names a map gives its sections (``tools.revoke_api_token``) are
    walked, not hidden whole, so that a change inside them changes the
    configuration's hash; a credential-named value (``webhook.secret``) is
    masked. Maps of the operator's own keys (headers, labels) are masked as
    records mask arguments.
    """
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        return {k: _field_shown(getattr(value, k, None), k, v) for k, v in dumped.items()}
    if isinstance(value, Mapping) and isinstance(dumped, dict):
        if value and all(isinstance(v, BaseModel) for v in value.values()):
            return {k: _masked(value.get(k), v) for k, v in dumped.items()}
        return mask_credentials(dumped)
    if isinstance(value, list | tuple) and isinstance(dumped, list) and len(value) == len(dumped):
        return [_masked(v, d) for v, d in zip(value, dumped, strict=True)]
    return mask_credentials(dumped)


def _field_shown(field: Any, key: str, dumped: Any) -> Any:
    # A credential-named field holding a value (``webhook.secret``) is masked; one
    # holding a section (``identity.jwt``, ``admin.tokens``) is walked.
    if isinstance(field, BaseModel | Mapping | list | tuple):
        return _masked(field, dumped)
    if dumped is None:
        return None  # unset: "[redacted]" would claim a secret is configured
    return mask_credentials({key: dumped})[key]


def _urls_shown(value: Any) -> Any:
    if isinstance(value, str):
        if not _URL.match(value):
            return _URL_PASSWORD.sub(rf"\1:{MASK}@", value)  # a URL inside other text
        if value.startswith(("postgresql://", "postgres://")):
            return redact_url(value)
        if value.startswith("sqlite:///"):
            return value  # a file path, no secret; urlsplit would drop a slash (sqlite:/./x)
        return shown_url(value)
    if isinstance(value, dict):
        return {k: _urls_shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_urls_shown(v) for v in value]
    return value
