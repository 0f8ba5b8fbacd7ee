"""The bundle types: :class:`Module`, :class:`Bundle` and :class:`BundleError`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warden.errors import PolicyError
from warden.policy.bundle.text import package_of

__all__ = ["Bundle", "BundleError", "BundleSignature", "Module", "package_path"]


class BundleError(PolicyError):
    """A bundle cannot be used; the message names the file and line where known."""


@dataclass(frozen=True, slots=True)
class Module:
    """One Rego module: its path inside the bundle (``authz/tools.rego``) and source."""

    path: str
    source: str

    @property
    def package(self) -> str | None:
        """The package as a slash path (``warden/tools``), or ``None`` if none is declared."""
        return package_path(self.source)


@dataclass(frozen=True, slots=True)
class BundleSignature:
    """A verified ``.signatures.json``: the key that checked it and when it was signed.

    ``issued_at`` is the JWT's ``iat`` (Unix seconds), which ``warden policy
    sign`` writes; ``None`` for a signature without one (``opa sign``).
    """

    key_id: str
    issued_at: int | None = None


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle (or several merged with ``merge_bundles``).

    ``revision`` comes from ``.manifest``, else it is a content hash
    (``sha256:<12 hex>``). ``roots`` are the data paths the bundle owns
    (``""`` owns everything). ``data`` is the merged data tree. ``source``
    says where it came from, for logs. ``signed_by`` is the key id that
    verified it, if it was verified.
    """

    revision: str
    roots: tuple[str, ...]
    modules: tuple[Module, ...]
    data: Mapping[str, Any]
    source: str
    name: str = ""
    signed_by: str | None = None
    file_hashes: Mapping[str, str] | None = None
    """SHA-256 of each file's bytes, by bundle path; for status and audit."""
    signed_at: Mapping[str, int | None] | None = None
    """When each verified bundle was signed, by bundle name (``None``: the
    signature carries no time); bundles not verified are absent."""


def package_path(source: str) -> str | None:
    """The package a module declares, as a slash path, or ``None``."""
    found = package_of(source)
    return None if found is None else found[0]
