"""``warden init``: what the starter config says, and what ``--force`` replaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from warden.cli_init import BUNDLE_DIR, STARTER_CONFIG, init, shipped_bundle
from warden.config import load_config


@pytest.fixture
def project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    if shipped_bundle() is None:
        pytest.skip("no shipped bundle in this install")
    assert init(tmp_path) == 0
    capsys.readouterr()
    return tmp_path


def test_force_overwrites_only_the_files_it_writes(project: Path) -> None:
    bundle = project / "policies" / "customer-support"
    own = bundle / "own_rules.rego"
    own.write_text("package own\n")
    (bundle / "notes").mkdir()
    (bundle / "notes" / "todo.md").write_text("mine\n")
    (bundle / "policy.rego").write_text("# edited\n")
    (project / "warden.yaml").write_text("mode: observe\n")

    assert init(project, force=True) == 0
    assert own.read_text() == "package own\n"
    assert (bundle / "notes" / "todo.md").read_text() == "mine\n"
    assert (bundle / "policy.rego").read_text() != "# edited\n"
    assert (project / "warden.yaml").read_text() == STARTER_CONFIG


def test_the_bundle_keeps_its_manifest(project: Path) -> None:
    source = shipped_bundle()
    assert source is not None
    copied = project / "policies" / "customer-support"
    if not (source / ".manifest").is_file():
        pytest.skip("this install's bundle carries no .manifest")
    assert (copied / ".manifest").read_bytes() == (source / ".manifest").read_bytes()
    assert not list(copied.rglob("__pycache__"))


def test_the_starter_config_loads_and_shows_how_to_add_admin_tokens(project: Path) -> None:
    config = load_config(project / "warden.yaml", environ={})
    assert config.admin.tokens == ()
    text = STARTER_CONFIG
    assert "admin:" in text
    assert "warden identity hash-key" in text
    assert "roles: [approver]" in text
    # The commented example is valid once filled in.
    example = next(line for line in text.splitlines() if "roles: [approver]" in line)
    entry = yaml.safe_load(example.strip().lstrip("#").strip().lstrip("- "))
    entry["sha256"] = "0" * 64
    overrides = {"admin": {"tokens": [entry]}}
    assert load_config(environ={}, overrides=overrides).admin.tokens[0].subject == "dana"


def test_the_starter_config_says_the_policys_hold_time_wins() -> None:
    source = shipped_bundle()
    if source is None:
        pytest.skip("no shipped bundle in this install")
    asked = json.loads((source / "data.json").read_text())["warden"]["approvals"]["hold_timeout_s"]
    approvals = STARTER_CONFIG[
        STARTER_CONFIG.index("\napprovals:") : STARTER_CONFIG.index("\nadmin:")
    ]
    assert f"{asked} s" in approvals  # the comment names what the shipped policy asks
    assert "wins" in approvals
    assert "600 s" in approvals  # the SDK's read timeout


def test_force_refuses_to_write_through_a_symbolic_link(tmp_path: Path) -> None:
    # Written through, the link would overwrite a file outside the folder, and the
    # bundle would go on reading its policy from there.
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file\n")
    folder = tmp_path / "project"
    assert init(folder) == 0
    policy = folder / BUNDLE_DIR / "policy.rego"
    policy.unlink()
    policy.symlink_to(outside)
    assert init(folder, force=True) != 0
    assert outside.read_text() == "someone else's file\n"
    assert policy.is_symlink()


@pytest.mark.parametrize("linked", ["policies", "policies/customer-support"])
def test_a_linked_folder_on_the_way_is_refused(
    tmp_path: Path, linked: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A folder under the chosen one that is a link (policies -> ../elsewhere) would
    # have the bundle written outside it, with or without --force.
    if shipped_bundle() is None:
        pytest.skip("no shipped bundle in this install")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "project"
    (folder / linked).parent.mkdir(parents=True, exist_ok=True)
    (folder / linked).symlink_to(elsewhere, target_is_directory=True)
    for force in (False, True):
        assert init(folder, force=force) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert list(elsewhere.iterdir()) == []
        assert not (folder / "warden.yaml").exists()
    assert err == (
        f"warden init: {folder / linked} is a symbolic link; nothing was written "
        "(remove it, or choose another folder)\n"
    )


def test_the_chosen_folder_may_itself_be_a_link(tmp_path: Path) -> None:
    if shipped_bundle() is None:
        pytest.skip("no shipped bundle in this install")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "project").symlink_to(real, target_is_directory=True)
    assert init(tmp_path / "project") == 0
    assert (real / "warden.yaml").is_file()
