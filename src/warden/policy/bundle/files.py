"""Reading a bundle's files from a directory or a ``.tar.gz``, with limits.

Hidden files and folders (``.git``, editor swap files) are skipped, except
``.manifest`` and ``.signatures.json`` at the top. Archive members that are
links or devices, or that escape the bundle, are refused.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from warden.policy.bundle.model import BundleError

__all__ = [
    "DATA_FILES",
    "MANIFEST_FILE",
    "MAX_BUNDLE_BYTES",
    "SIGNATURES_FILE",
    "bundle_name",
    "content_revision",
    "is_policy_file",
    "read_bundle_files",
    "read_tarball",
]

MANIFEST_FILE = ".manifest"
SIGNATURES_FILE = ".signatures.json"
DATA_FILES = frozenset({"data.json", "data.yaml"})
# Bounds so that a hostile or broken bundle server cannot exhaust memory.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_FILES = 10_000


def _safe_member_path(name: str) -> str | None:
    """The normalised bundle path of an archive member, or ``None`` if unsafe."""
    pure = PurePosixPath(name.lstrip("/"))
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _wanted(path: str) -> bool:
    """Every file but hidden ones (``.git``, editor swap files), except our two."""
    parts = path.split("/")
    if len(parts) == 1 and parts[0] in (MANIFEST_FILE, SIGNATURES_FILE):
        return True
    return not any(p.startswith(".") for p in parts)


def is_policy_file(path: str) -> bool:
    """Whether a bundle file shapes the policy: modules, data and the manifest."""
    base = path.rsplit("/", 1)[-1]
    return path == MANIFEST_FILE or base.endswith(".rego") or base in DATA_FILES


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """Read the files of a bundle directory or ``.tar.gz`` as ``{bundle path: bytes}``.

    Hidden files are skipped (see the module docstring). Archive members that
    are links, devices or escape the bundle are refused.
    """
    p = Path(path)
    if p.is_dir():
        return _read_dir(p)
    if p.is_file():
        try:
            return read_tarball(p.read_bytes(), label=str(p))
        except OSError as exc:
            raise BundleError(f"{p}: cannot read: {exc.strerror}") from exc
    raise BundleError(f"{p}: no such bundle directory or archive")


def _read_dir(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for file in sorted(root.rglob("*")):
        if not file.is_file():
            continue
        rel = file.relative_to(root).as_posix()
        if not _wanted(rel):
            continue
        if file.is_symlink() and not file.resolve().is_relative_to(root.resolve()):
            raise BundleError(f"{root}/{rel}: symbolic link leaves the bundle")
        try:
            content = file.read_bytes()
        except OSError as exc:
            raise BundleError(f"{root}/{rel}: cannot read: {exc.strerror}") from exc
        total += len(content)
        _check_limits(str(root), rel, len(content), total, len(files) + 1)
        files[rel] = content
    return files


def read_tarball(blob: bytes, *, label: str = "bundle.tar.gz") -> dict[str, bytes]:
    """Read an OPA bundle archive held in memory (what a bundle server sends)."""
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                rel = _safe_member_path(member.name)
                if rel is None:
                    raise BundleError(f"{label}: member {member.name!r} escapes the bundle")
                if not member.isfile():
                    raise BundleError(f"{label}: {rel}: only regular files are allowed")
                if not _wanted(rel):
                    continue
                total += member.size
                _check_limits(label, rel, member.size, total, len(files) + 1)
                extracted = tar.extractfile(member)
                if extracted is None:  # pragma: no cover - isfile() guarantees a stream
                    raise BundleError(f"{label}: {rel}: cannot read")
                if rel in files:
                    raise BundleError(f"{label}: {rel}: appears twice in the archive")
                files[rel] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{label}: not a readable .tar.gz bundle: {exc}") from exc
    return files


def _check_limits(label: str, rel: str, size: int, total: int, count: int) -> None:
    if size > MAX_FILE_BYTES:
        raise BundleError(f"{label}/{rel}: file is over {MAX_FILE_BYTES} bytes")
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"{label}: bundle is over {MAX_BUNDLE_BYTES} bytes")
    if count > MAX_FILES:
        raise BundleError(f"{label}: bundle has over {MAX_FILES} files")


def content_revision(files: Mapping[str, bytes]) -> str:
    """A revision for a bundle without one: a hash over file names and contents."""
    digest = hashlib.sha256()
    for name in sorted(files):
        if not is_policy_file(name):
            continue
        body = files[name]
        digest.update(f"{name}\0{len(body)}\0".encode())
        digest.update(body)
    return f"sha256:{digest.hexdigest()[:12]}"


def bundle_name(path: str | Path) -> str:
    """A short label for a bundle path: its folder or archive name without ``.tar.gz``."""
    base = Path(path).name
    for suffix in (".tar.gz", ".tgz"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base
