"""``.manifest``: a bundle's revision and the data roots it owns, as OPA defines them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from warden.policy.bundle.files import MANIFEST_FILE
from warden.policy.bundle.model import BundleError

__all__ = ["parse_json", "parse_manifest", "roots_overlap", "within"]


def _segments(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (by whole segments)."""
    p, r = _segments(path), _segments(root)
    return p[: len(r)] == r


def roots_overlap(a: str, b: str) -> bool:
    """Two roots overlap when one is a segment-prefix of the other (``""`` overlaps all)."""
    return within(a, b) or within(b, a)


def parse_json(label: str, body: bytes) -> Any:
    """Parse JSON; raise :class:`BundleError` with ``label:line:col`` on an error."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{label}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def parse_manifest(label: str, files: Mapping[str, bytes]) -> tuple[str | None, tuple[str, ...]]:
    """The manifest's ``(revision, roots)``; no manifest means no revision and root ``""``."""
    body = files.get(MANIFEST_FILE)
    if body is None:
        return None, ("",)
    manifest = parse_json(f"{label}/{MANIFEST_FILE}", body)
    if not isinstance(manifest, dict):
        raise BundleError(f"{label}/{MANIFEST_FILE}:1: must be a JSON object")
    revision = manifest.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise BundleError(f"{label}/{MANIFEST_FILE}: revision must be a string")
    roots_raw = manifest.get("roots", [""])
    if not isinstance(roots_raw, list) or not all(isinstance(r, str) for r in roots_raw):
        raise BundleError(f"{label}/{MANIFEST_FILE}: roots must be a list of strings")
    roots = tuple(dict.fromkeys(r.strip().strip("/") for r in roots_raw)) or ("",)
    return revision or None, roots
