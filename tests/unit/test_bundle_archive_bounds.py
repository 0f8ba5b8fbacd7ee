"""A bundle archive is bounded before its signature is checked.

A few megabytes of ``.tar.gz`` can hold a million entries or gigabytes of
zeros; each bound refuses such an archive, saying which one it passed,
before the rest is read.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest

from warden.policy.bundle import BundleError, load_bundle, read_tarball
from warden.policy.bundle.files import (
    MAX_ARCHIVE_ENTRIES,
    MAX_BUNDLE_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS_BYTES,
    MAX_UNPACKED_BYTES,
)

POLICY = b'package warden\n\ndecision := {"effect": "allow"}\n'


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info.tobuf(tarfile.USTAR_FORMAT)


def gzipped(chunks: Iterable[bytes]) -> bytes:
    """``chunks``, then one policy file and the archive's end, as a .tar.gz.

    Compressed chunk by chunk: a bomb of many megabytes is quick to build.
    """
    squeeze = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip stream
    out = [squeeze.compress(chunk) for chunk in chunks]
    out.append(squeeze.compress(header("policy.rego", len(POLICY)) + POLICY.ljust(512, b"\0")))
    out.append(squeeze.compress(b"\0" * 1024) + squeeze.flush())
    return b"".join(out)


def test_a_small_archive_is_read() -> None:
    files = read_tarball(gzipped([header(".hidden"), header("warden/", kind=tarfile.DIRTYPE)]))
    assert files == {"policy.rego": POLICY}


def test_skipped_entries_count_toward_the_entry_bound() -> None:
    # Hidden files and folders, never counted as files: 2 MB held a million of them.
    pair = header(".h") + header("d/", kind=tarfile.DIRTYPE)
    bomb = gzipped([pair] * (MAX_ARCHIVE_ENTRIES // 2 + 1))
    assert len(bomb) < 100_000
    with pytest.raises(BundleError, match=f"archive has over {MAX_ARCHIVE_ENTRIES} entries"):
        read_tarball(bomb, label="bomb.tar.gz")


def test_an_archive_is_bounded_unpacked_skipped_files_included() -> None:
    # One hidden file of zeros past the bound: a few hundred kilobytes compressed.
    chunk = b"\0" * (1 << 20)
    size = MAX_UNPACKED_BYTES + len(chunk)
    bomb = gzipped([header(".git/pack", size), *[chunk] * (size // len(chunk))])
    assert len(bomb) < 1_000_000
    with pytest.raises(BundleError, match=f"archive is over {MAX_UNPACKED_BYTES} bytes unpacked"):
        read_tarball(bomb, label="bomb.tar.gz")


def test_the_unpacked_bound_counts_what_is_skipped() -> None:
    # A hidden file is skipped, but its bytes are still unpacked to pass it.
    chunk = b"\0" * (1 << 20)
    bomb = gzipped([header(".hidden", 8 * len(chunk)), *[chunk] * 8])
    with pytest.raises(BundleError, match=f"archive is over {len(chunk)} bytes unpacked"):
        read_tarball(bomb, max_unpacked=len(chunk))


def test_an_archive_on_disk_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    archive = tmp_path / "support.tar.gz"
    with archive.open("wb") as file:
        file.truncate(MAX_BUNDLE_BYTES + 1)  # sparse: nothing written
    with pytest.raises(BundleError, match=f"bundle is over {MAX_BUNDLE_BYTES} bytes"):
        load_bundle(archive)


def test_a_plain_tar_is_read_too() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("policy.rego")
        info.size = len(POLICY)
        tar.addfile(info, io.BytesIO(POLICY))
    assert read_tarball(buf.getvalue()) == {"policy.rego": POLICY}


def pax(body: bytes) -> bytes:
    """An extended (PAX) header of ``body``, padded to its blocks."""
    return header("././@PaxHeader", len(body), tarfile.XHDTYPE) + body.ljust(
        -(-len(body) // 512) * 512, b"\0"
    )


def test_extended_headers_are_bounded_before_they_are_parsed() -> None:
    # Before Python 3.12.6 tarfile parses a PAX header in time that grows with the
    # square of its length, holding the interpreter: 80,000 digits (222 bytes
    # gzipped) stalled every request for 18 s before the signature was read.
    with pytest.raises(BundleError, match="extended headers of 80000 bytes"):
        read_tarball(gzipped([pax(b"1" * 80_000)]))
    if MAX_HEADERS_BYTES is not None:
        # Many small ones count together, where they are parsed slowly.
        many = MAX_HEADERS_BYTES // MAX_HEADER_BYTES + 1
        each = [pax(b"1" * MAX_HEADER_BYTES) + header(f".n{i}") for i in range(many)]
        with pytest.raises(BundleError, match="in all"):
            read_tarball(gzipped(each))
    # Headers for headers, nested until the interpreter's stack runs out.
    with pytest.raises(BundleError):
        read_tarball(gzipped([pax(b"")] * 2000))
    # A size field written in base 256 can be negative: it must not lower the count.
    negative = bytearray(header("././@LongLink", 0, tarfile.GNUTYPE_LONGNAME))
    negative[124:136] = b"\xff" * 12
    negative[148:156] = b"%06o\0 " % (sum(negative[:148]) + 256 + sum(negative[156:]))
    with pytest.raises(BundleError, match="claims -"):
        read_tarball(gzipped([bytes(negative)]))
    # Sparse members: a bundle has none, and their maps are read unbounded.
    with pytest.raises(BundleError, match="sparse"):
        read_tarball(gzipped([header("x.rego", 0, tarfile.GNUTYPE_SPARSE)]))
    # A bundle with a long path (Go's archive/tar writes a PAX header for it) is read.
    path = "warden/" + "deep/" * 40 + "policy.rego"  # 218 characters
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(path)
        info.size = len(POLICY)
        tar.addfile(info, io.BytesIO(POLICY))
    assert read_tarball(stream.getvalue()) == {path: POLICY}
