"""Bounds a bundle meets before it is used: folder files, data lengths, whole archives.

A bundle folder is read at every start and reload before its signature is
checked, so a file is bounded before it is read; data the engine would load in
quadratic time is refused with where to split it; an archive that ends early
(a download cut short) is refused rather than read as the files before the cut.
"""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import yaml

from warden.policy.bundle import BundleError, load_bundle, read_tarball
from warden.policy.bundle.files import MAX_ARCHIVE_ENTRIES, MAX_FILE_BYTES, BundleCutShort
from warden.policy.bundle.loader import MAX_DATA_ITEMS

POLICY = b'package warden\n\ndecision := {"effect": "allow"}\n'


def folder(root: Path) -> Path:
    (root / "warden").mkdir(parents=True)
    (root / "warden" / "policy.rego").write_bytes(POLICY)
    return root


def test_a_huge_sparse_file_in_a_folder_is_refused_unread(tmp_path: Path) -> None:
    root = folder(tmp_path / "b")
    with (root / "warden" / "notes.txt").open("wb") as big:
        big.truncate(256 * 1024 * 1024)  # sparse: no disk used, 256 MiB when read
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"notes.txt: file is over {MAX_FILE_BYTES} bytes"):
            load_bundle(root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_FILE_BYTES


def test_a_folder_is_bounded_in_entries_but_not_by_its_hidden_folders(tmp_path: Path) -> None:
    root = folder(tmp_path / "b")
    # A .git folder is skipped unwalked: however many objects it holds.
    (root / ".git").mkdir()
    for i in range(MAX_ARCHIVE_ENTRIES + 1):
        (root / ".git" / str(i)).mkdir()
    assert load_bundle(root).modules
    for i in range(MAX_ARCHIVE_ENTRIES + 1):
        (root / "warden" / f"d{i}").mkdir()
    with pytest.raises(BundleError, match=f"folder has over {MAX_ARCHIVE_ENTRIES} entries"):
        load_bundle(root)


def test_a_data_array_too_long_to_load_in_time_is_refused_with_where_to_split(
    tmp_path: Path,
) -> None:
    root = folder(tmp_path / "b")
    data = root / "warden" / "data.json"
    data.write_text(json.dumps({"blocked": {"ids": [f"A-{i}" for i in range(MAX_DATA_ITEMS)]}}))
    assert len(load_bundle(root).data["warden"]["blocked"]["ids"]) == MAX_DATA_ITEMS
    data.write_text(json.dumps({"blocked": {"ids": [f"A-{i}" for i in range(MAX_DATA_ITEMS + 1)]}}))
    with pytest.raises(BundleError) as refused:
        load_bundle(root)
    message = str(refused.value)
    assert message.startswith(f"{root}/warden/data.json: data.warden.blocked.ids is an array")
    assert f"{MAX_DATA_ITEMS + 1:,} items" in message
    assert "split it" in message


def test_a_yaml_data_object_too_long_is_refused_with_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lower bound, for speed: YAML of 25,001 keys takes seconds to write and read.
    monkeypatch.setattr("warden.policy.bundle.loader.MAX_DATA_ITEMS", 1_000)
    root = folder(tmp_path / "b")
    (root / "warden" / "tools").mkdir()
    catalogue = {"catalogue": [{"by id": {f"t{i}": True for i in range(1_001)}}]}
    (root / "warden" / "tools" / "data.yaml").write_text(yaml.safe_dump(catalogue))
    with pytest.raises(
        BundleError,
        match=r'data\.yaml: data\.warden\.tools\.catalogue\[0\]\["by id"\] is an object of 1,001',
    ):
        load_bundle(root)


def tar_with_bounds(files: dict[str, bytes]) -> tuple[bytes, list[int]]:
    """A plain tar and the offset where each member ends."""
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            ends.append(buf.tell())
    return buf.getvalue(), ends


FREEZE = b"package warden\n\ndeny_refunds := true\n"


def test_a_plain_tar_cut_between_members_is_refused_as_cut_short() -> None:
    whole, ends = tar_with_bounds({"policy.rego": POLICY, "zz_freeze.rego": FREEZE})
    assert set(read_tarball(whole)) == {"policy.rego", "zz_freeze.rego"}
    with pytest.raises(BundleCutShort, match="before its end marker"):
        read_tarball(whole[: ends[0]])  # the freeze rule lost
    with pytest.raises(BundleCutShort, match="cut short"):
        read_tarball(whole[: ends[1] - 100])  # inside a member


def test_a_gzip_stream_cut_past_the_tar_end_is_refused_as_cut_short() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("policy.rego")
        info.size = len(POLICY)
        tar.addfile(info, io.BytesIO(POLICY))
    whole = buf.getvalue()
    assert set(read_tarball(whole)) == {"policy.rego"}
    # The gzip trailer (checksum and length) lost: every tar block is there.
    with pytest.raises(BundleCutShort, match="cut short"):
        read_tarball(whole[:-8])
    # A newline a server added after a whole stream is no cut: read as a next member's
    # header, it refused the bundle, and its ETag kept it from being fetched again.
    assert set(read_tarball(whole + b"\n")) == {"policy.rego"}
    # A checksum that does not match still refuses it.
    damaged = whole[:-8] + bytes(b ^ 0xFF for b in whole[-8:-4]) + whole[-4:]
    with pytest.raises(BundleError):
        read_tarball(damaged)
