"""Bundles loaded for the authoring tools, with module paths as people see them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden.policy.bundle import Bundle, BundleError, Module, load_bundle, merge_bundles

__all__ = ["PolicySet", "load_policy_set"]


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Bundles loaded for the tools.

    ``modules`` carry their file path as shown to people
    (``policies/customer-support/policy.rego``), so engine errors name real
    files; ``production`` are the modules the engine compiles (no
    ``*_test.rego``); ``data`` is the merged data tree.
    """

    modules: tuple[Module, ...]
    production: tuple[Module, ...]
    data: Mapping[str, Any]
    revision: str
    folders: tuple[Path, ...]


def load_policy_set(paths: Sequence[str | Path], *, check_syntax: bool = True) -> PolicySet:
    """Load bundles (folders or ``.tar.gz``) as the engine would; raise :class:`BundleError`."""
    if not paths:
        raise BundleError("no policy bundle given")
    bundles: list[Bundle] = [load_bundle(p, check_syntax=check_syntax) for p in paths]
    merged = merge_bundles(bundles)
    modules: list[Module] = []
    for path, bundle in zip(paths, bundles, strict=True):
        modules.extend(Module(_join(path, m.path), m.source) for m in bundle.modules)
    return PolicySet(
        modules=tuple(modules),
        production=tuple(m for m in modules if not m.path.endswith("_test.rego")),
        data=merged.data,
        revision=merged.revision,
        folders=tuple(Path(p) for p in paths if Path(p).is_dir()),
    )


def _join(base: str | Path, rel: str) -> str:
    return (Path(base) / rel).as_posix()
