"""Change-management records: what changed, when, who signed it, and the evidence before it.

Four audit record kinds (bodies below; the envelope is every record's):

* ``policy_activation``: a bundle was swapped in. ``role`` (``champion`` for
  the bundle that decides, ``challenger`` for a live challenger), ``revision``,
  ``previous_revision`` (``null`` on a process's first activation),
  ``manifest_sha256`` (SHA-256 over the bundle's file hashes, see
  :func:`manifest_sha256`), ``signed_by`` (the key id that verified the
  bundle's signature, ``null`` when unsigned), ``source`` and ``name``.
  Written *before* the swap, so every decision of the new revision comes
  after it in the log.
* ``config_load``: Warden started with a configuration. ``config_sha256`` is
  the SHA-256 of the effective configuration with secrets left out
  (:func:`config_sha256`), ``source`` the file, ``version`` Warden's.
* ``eval_run``: ``warden eval run`` ran a suite (``suite_sha256``, the bundle
  revision, pass and fail counts, the result).
* ``replay_run``: ``warden policy replay`` ran (the candidate revision, what
  changed, the threshold, the result).

``warden audit export`` lists them as the change log and links each decision
to the activation in force (:mod:`warden.audit.changelog`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from warden import __version__
from warden.audit.log import AuditLog
from warden.audit.record import RecordRef
from warden.config import AuditConfig, Config
from warden.config_shown import shown_config

__all__ = [
    "ACTIVATION",
    "CHANGE_KINDS",
    "CONFIG_LOAD",
    "EVAL_RUN",
    "REPLAY_RUN",
    "ActivationRecorder",
    "activation_body",
    "config_body",
    "config_sha256",
    "manifest_sha256",
    "record_change",
]

ACTIVATION = "policy_activation"
CONFIG_LOAD = "config_load"
EVAL_RUN = "eval_run"
REPLAY_RUN = "replay_run"
CHANGE_KINDS = frozenset({ACTIVATION, CONFIG_LOAD, EVAL_RUN, REPLAY_RUN})
"""The record kinds the export's change log is drawn from."""


class BundleLike(Protocol):
    """What an activation record reads of :class:`warden.policy.bundle.Bundle`."""

    @property
    def revision(self) -> str:
        """The bundle's revision."""
        ...

    @property
    def source(self) -> str:
        """Where it came from."""
        ...

    @property
    def name(self) -> str:
        """Its name."""
        ...

    @property
    def signed_by(self) -> str | None:
        """The key id that verified it."""
        ...

    @property
    def file_hashes(self) -> Mapping[str, str] | None:
        """SHA-256 of each file, by bundle path."""
        ...

    @property
    def signed_at(self) -> Mapping[str, int | None] | None:
        """When each verified bundle was signed (Unix seconds), by name."""
        ...


class ChangeSink(Protocol):
    """Where change records go: the audit log's ``append``."""

    def append(self, kind: str, body: Mapping[str, Any]) -> Awaitable[Any]:
        """Record one event."""
        ...


def manifest_sha256(file_hashes: Mapping[str, str] | None) -> str | None:
    """SHA-256 (hex) of ``"<sha256>  <path>\\n"`` per file, sorted by path (``sha256sum`` style).

    The same files give the same hash wherever the bundle was loaded from.
    """
    if file_hashes is None:
        return None
    lines = "".join(f"{file_hashes[path]}  {path}\n" for path in sorted(file_hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def activation_body(
    bundle: BundleLike, previous: str | None, *, role: str = "champion"
) -> dict[str, Any]:
    """The ``policy_activation`` body for ``bundle`` replacing revision ``previous``."""
    return {
        "role": role,
        "revision": bundle.revision,
        "previous_revision": previous,
        "manifest_sha256": manifest_sha256(bundle.file_hashes),
        "signed_by": bundle.signed_by,
        "signed_at": dict(bundle.signed_at) if bundle.signed_at else None,
        "source": bundle.source,
        "name": bundle.name,
    }


def config_sha256(config: Config) -> str:
    """SHA-256 (hex) of the effective configuration, secrets left out.

    The configuration as ``warden config`` prints it
    (:func:`warden.config_shown.shown_config`: secret fields, credential-named
    keys and what URLs carry masked), encoded with sorted keys. Two sidecars with the same settings
    and different secrets give the same hash; a changed secret is not
    visible in it (by design: the hash must not confirm a guessed secret).
    """
    dumped = shown_config(config)
    return hashlib.sha256(orjson.dumps(dumped, option=orjson.OPT_SORT_KEYS)).hexdigest()


def config_body(config: Config, source: str | Path | None = None) -> dict[str, Any]:
    """The ``config_load`` body."""
    return {
        "config_sha256": config_sha256(config),
        "source": str(source) if source is not None else None,
        "version": __version__,
    }


class ActivationRecorder:
    """A ``pre_activate`` hook for :class:`warden.policy.engine.PolicyEngine` that records it.

    Called after the new revision compiled and just before the swap; when the
    record cannot be written the activation is refused (the last good
    revision stays), so no revision decides without its record.
    """

    def __init__(self, audit: ChangeSink, *, role: str = "champion") -> None:
        self.audit = audit
        self.role = role
        self.previous: str | None = None
        self.last: RecordRef | None = None
        """Where the latest activation record landed."""

    async def __call__(self, bundle: Any) -> None:
        """Record ``bundle``'s activation (durable before returning)."""
        ref = await self.audit.append(
            ACTIVATION, activation_body(bundle, self.previous, role=self.role)
        )
        self.previous = bundle.revision
        self.last = ref if isinstance(ref, RecordRef) else None


async def record_change(config: AuditConfig, kind: str, body: Mapping[str, Any]) -> RecordRef:
    """Append one change record to the audit log ``config`` names, then close it.

    For the command-line tools. Raises :class:`warden.errors.AuditError` when
    the log cannot be opened (another process, such as a running Warden,
    holds it: the cause is :class:`warden.audit.layout.LogLocked`) or written.
    """
    log = await AuditLog.open(config)
    try:
        return await log.append(kind, body)
    finally:
        await log.close()
