"""Reading a bundle's files from a directory or a ``.tar.gz``, with limits.

Hidden files and folders (``.git``, editor swap files) are skipped, except
``.manifest`` and ``.signatures.json`` at the top. Archive members that are
links or devices, or that escape the bundle, are refused.

An archive is read before its signature can be checked, so whoever serves it
is bounded: its size, its size unpacked (headers and skipped files included)
and its number of entries of any kind, as well as the files it yields.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import tarfile
import zlib
from collections.abc import Buffer, Mapping
from pathlib import Path, PurePosixPath
from typing import Self

from warden.policy.bundle.model import BundleError

__all__ = [
    "DATA_FILES",
    "MANIFEST_FILE",
    "MAX_ARCHIVE_ENTRIES",
    "MAX_BUNDLE_BYTES",
    "MAX_UNPACKED_BYTES",
    "SIGNATURES_FILE",
    "BundleCutShort",
    "bundle_name",
    "content_revision",
    "is_policy_file",
    "read_bundle_files",
    "read_tarball",
]

MANIFEST_FILE = ".manifest"
SIGNATURES_FILE = ".signatures.json"
DATA_FILES = frozenset({"data.json", "data.yaml"})
# Bounds so that a hostile or broken bundle server cannot exhaust memory or CPU.
# MAX_BUNDLE_BYTES bounds both an archive as fetched or stored and the files it yields.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_FILES = 10_000
# An archive's entries cost time and memory even when skipped (folders, hidden
# files): a 2 MB .tar.gz can hold a million of them.
MAX_ARCHIVE_ENTRIES = 2 * MAX_FILES
# The tar stream once decompressed: the files plus headers, padding and skipped files.
MAX_UNPACKED_BYTES = 2 * MAX_BUNDLE_BYTES


class BundleCutShort(BundleError):
    """An archive that ends before its end: a download cut short, worth fetching again."""


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


# Files a bundle holds, refused as a bundle themselves (an archive is never named so).
_BUNDLE_MEMBERS = (".rego", ".json", ".yaml", ".yml")


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """Read the files of a bundle directory or ``.tar.gz`` as ``{bundle path: bytes}``.

    Hidden files are skipped (see the module docstring). Archive members that
    are links, devices or escape the bundle are refused, and so is a path to
    one of a bundle's own files (``policy.rego``), with the folder to pass.
    """
    p = Path(path)
    if p.is_dir():
        return _read_dir(p)
    if p.is_file():
        if p.name.endswith(_BUNDLE_MEMBERS):
            # `opa test policy.rego policy_test.rego`: Warden takes whole bundles.
            folder = p.parent.as_posix()
            raise BundleError(
                f"{p}: a single {p.suffix} file, not a bundle: pass the bundle's folder, "
                f"{'. (this folder)' if folder == '.' else folder}, which holds its modules, "
                "data and tests; or a .tar.gz"
            )
        try:
            with p.open("rb") as file:
                blob = file.read(MAX_BUNDLE_BYTES + 1)
        except OSError as exc:
            raise BundleError(f"{p}: cannot read: {exc.strerror}") from exc
        if len(blob) > MAX_BUNDLE_BYTES:
            raise BundleError(f"{p}: bundle is over {MAX_BUNDLE_BYTES} bytes")
        return read_tarball(blob, label=str(p))
    raise BundleError(f"{p}: no such bundle directory or archive")


def _read_dir(root: Path) -> dict[str, bytes]:
    """Read a bundle folder's wanted files, each bounded before it is read.

    Read at every start and reload, before the signature is checked: a file's
    size is taken from ``stat`` and at most one byte past the bound is read (a
    sparse file may claim a terabyte), and the folder's entries are counted as
    an archive's are. Hidden folders (``.git``) are skipped unwalked.
    """
    found: list[tuple[str, Path]] = []
    entries = 0
    # os.walk does not follow links to folders, as rglob did not.
    for folder, dirs, names in os.walk(root):
        base = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        entries += len(dirs) + len(names)
        if entries > MAX_ARCHIVE_ENTRIES:
            raise BundleError(f"{root}: folder has over {MAX_ARCHIVE_ENTRIES} entries")
        for name in names:
            file = base / name
            rel = file.relative_to(root).as_posix()
            if _wanted(rel) and file.is_file():
                found.append((rel, file))
    files: dict[str, bytes] = {}
    total = 0
    resolved_root = root.resolve()
    for rel, file in sorted(found):
        if file.is_symlink() and not file.resolve().is_relative_to(resolved_root):
            raise BundleError(f"{root}/{rel}: symbolic link leaves the bundle")
        try:
            size = file.stat().st_size
            _check_limits(str(root), rel, size, total + size, len(files) + 1)
            with file.open("rb") as stream:
                # The file may have grown since stat: one byte past the bound tells.
                content = stream.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise BundleError(f"{root}/{rel}: cannot read: {exc.strerror}") from exc
        total += len(content)
        _check_limits(str(root), rel, len(content), total, len(files) + 1)
        files[rel] = content
    return files


class _Unpacked(io.RawIOBase):
    """The decompressed tar stream, refused once it passes ``limit`` bytes.

    Counted here, below tarfile, so that no header (a PAX header may claim
    gigabytes) and no skipped member is read past the bound.
    """

    def __init__(self, stream: io.BufferedIOBase, limit: int, label: str) -> None:
        super().__init__()
        self._stream = stream
        self._left = limit
        self._limit = limit
        self._label = label

    def readable(self) -> bool:
        """Always: it is read, never written."""
        return True

    def readinto(self, buffer: Buffer) -> int:
        """Fill ``buffer`` from the stream; raise :class:`BundleError` past the bound."""
        # One byte past the bound at most: enough to know it was passed.
        count = self._stream.readinto(memoryview(buffer)[: self._left + 1])
        self._left -= count
        if self._left < 0:
            raise BundleError(f"{self._label}: archive is over {self._limit} bytes unpacked")
        return count


_QUADRATIC_PAX = sys.version_info < (3, 12, 6)
"""Before Python 3.12.6 (CVE-2024-6232) tarfile parses an extended header with regular
expressions whose time grows with the square of its length, holding the interpreter:
80,000 digits took 18 s, 4 KiB 26 ms."""
MAX_HEADER_BYTES = 1024 if _QUADRATIC_PAX else 64 * 1024
"""The longest extended header (PAX, GNU long name) read: 1 KiB (about 2 ms at worst) on
an interpreter that parses them in quadratic time."""
MAX_HEADERS_BYTES = 256 * 1024 if _QUADRATIC_PAX else None
"""All of an archive's extended headers, on such an interpreter: about 0.4 s at worst, and
room for a header of 90 bytes on each of 2,800 files (``tar --format=posix``). ``None``:
no bound beyond the unpacked one."""
_EXTENDED = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_SPARSE = frozenset({tarfile.GNUTYPE_SPARSE})


class _Headers(tarfile.TarInfo):
    ended = False
    """Whether the archive's end marker (a block of zeros) was read: tarfile stops
    without a word at the end of the stream too, between members or inside a header."""


def _bounded_headers() -> type[_Headers]:
    """A member type whose extended headers are refused, unread, past the bounds above,
    and that refuses sparse members (one type per archive: it counts the archive's
    headers and records whether its end marker was seen)."""
    spent = 0

    class BoundedHeaders(_Headers):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
            if len(buf) == tarfile.BLOCKSIZE and not buf.strip(tarfile.NUL):
                cls.ended = True
            return super().frombuf(buf, encoding, errors)

        def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
            nonlocal spent
            if self.size < 0:
                # A base-256 size field can be negative: it would lower what was spent.
                raise tarfile.HeaderError(f"a header claims {self.size} bytes")
            if self.type in _SPARSE:
                raise tarfile.HeaderError("a sparse member (a bundle has none)")
            if self.type in _EXTENDED:
                spent += self.size
                if self.size > MAX_HEADER_BYTES or (
                    MAX_HEADERS_BYTES is not None and spent > MAX_HEADERS_BYTES
                ):
                    # A TarError: read_tarball names the archive in its refusal.
                    raise tarfile.HeaderError(
                        f"extended headers of {self.size} bytes (at most {MAX_HEADER_BYTES} "
                        f"each, {MAX_HEADERS_BYTES or 'no bound'} in all, on Python "
                        f"{sys.version.split()[0]})"
                    )
            member: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
            return member

        # PAX sparse maps (GNU.sparse.*), read before the member is seen: unbounded.
        def _proc_gnusparse_00(self, *_: object) -> None:
            raise tarfile.HeaderError("a sparse member (a bundle has none)")

        _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    return BoundedHeaders


def read_tarball(
    blob: bytes,
    *,
    label: str = "bundle.tar.gz",
    max_entries: int = MAX_ARCHIVE_ENTRIES,
    max_unpacked: int = MAX_UNPACKED_BYTES,
) -> dict[str, bytes]:
    """Read an OPA bundle archive held in memory (what a bundle server sends).

    A gzipped or plain tar. Refused with :class:`BundleError` past
    ``max_entries`` entries (folders and skipped hidden files included) or
    ``max_unpacked`` bytes once decompressed, before it is read further; with
    :class:`BundleCutShort` when it ends early (no tar end marker, a gzip
    stream without its end, a member cut), as a download cut short does.
    """
    raw: io.BufferedIOBase = io.BytesIO(blob)
    if blob.startswith(b"\x1f\x8b"):
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    try:
        # Read as a stream and walked with next(), each header forgotten once seen:
        # iterating keeps a TarInfo for every entry.
        unpacked = _Unpacked(raw, max_unpacked, label)
        headers = _bounded_headers()
        with tarfile.open(fileobj=unpacked, mode="r|", tarinfo=headers) as tar:
            files = _read_members(tar, label, max_entries)
            if not headers.ended:
                # Cut between members, a plain tar yields the files before the cut:
                # a bundle without its last rules.
                raise BundleCutShort(f"{label}: archive ends before its end marker (cut short?)")
        # The rest (padding, the gzip trailer): a gzip stream cut past the tar's
        # end is refused too, and its checksum checked.
        try:
            while unpacked.read(64 * 1024):
                pass
        except gzip.BadGzipFile as exc:
            # Bytes after a member whose trailer verified (a newline a server added):
            # gzip reads them as the next member's header. Not a cut, not the bundle.
            if not str(exc).startswith("Not a gzipped file"):
                raise
    except EOFError as exc:  # gzip: "ended before the end-of-stream marker"
        raise BundleCutShort(f"{label}: archive cut short: {exc}") from exc
    except (
        tarfile.TarError,
        OSError,
        zlib.error,
        ValueError,
        IndexError,
        RecursionError,
    ) as exc:
        if isinstance(exc, tarfile.ReadError) and str(exc) == "unexpected end of data":
            raise BundleCutShort(f"{label}: archive cut short: a member ends early") from exc
        # ValueError, IndexError: what tarfile raises on some malformed headers;
        # RecursionError: extended headers for extended headers, nested past the stack.
        raise BundleError(f"{label}: not a readable .tar.gz bundle: {exc}") from exc
    return files


def _read_members(tar: tarfile.TarFile, label: str, max_entries: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    entries = 0
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # not in the stubs
        entries += 1
        if entries > max_entries:
            raise BundleError(f"{label}: archive has over {max_entries} entries")
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
