"""Every third-party package Warden, its tests and its benchmarks import is declared and locked.

Imports are read from the source (AST), mapped to the distributions that provide
them, and compared with pyproject.toml: ``src`` may use the runtime dependencies
only; ``tests`` and ``benchmarks`` may also use the ``dev`` extra. Each declared
dependency must be pinned in the lock files the Makefile and Dockerfile install
from (docs/adr/0007-dependency-locking.md).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"

# Modules that exist only for type checkers (typeshed, shipped inside mypy).
TYPE_CHECKER_ONLY = frozenset({"_typeshed"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def normalize(name: str) -> str:
    """The PEP 503 form of a distribution name, as lock files and indexes compare them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution name at the start of a PEP 508 requirement string."""
    match = _NAME.match(requirement.strip())
    assert match is not None, f"not a requirement: {requirement!r}"
    return normalize(match.group(0))


def top_level_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in ``source``; relative imports are local."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def local_module_names(roots: Iterable[Path]) -> set[str]:
    """Names importable from the project's own folders (packages, modules, conftest)."""
    names = {"warden"}
    for root in roots:
        names.add(root.name)
        for path in root.rglob("*"):
            if path.suffix == ".py":
                names.add(path.stem)
            elif path.is_dir():
                names.add(path.name)
    return names


def import_problems(
    imports: Iterable[str],
    allowed: set[str],
    local: set[str],
    distributions: Mapping[str, list[str]],
) -> dict[str, str]:
    """Each third-party import not covered by ``allowed``, with what is wrong with it."""
    problems: dict[str, str] = {}
    for name in sorted(set(imports)):
        if name in sys.stdlib_module_names or name in local or name in TYPE_CHECKER_ONLY:
            continue
        providers = distributions.get(name)
        if not providers:
            problems[name] = "is imported but no installed distribution provides it"
        elif not {normalize(p) for p in providers} & allowed:
            problems[name] = f"comes from {' or '.join(sorted(providers))}, which is not declared"
    return problems


def declared(extra: str = "dev") -> tuple[set[str], set[str]]:
    """(runtime, ``extra``) distribution names declared in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for r in project["optional-dependencies"][extra]}
    return runtime, extras


def pins(lock: Path) -> dict[str, str]:
    """Distribution name -> pinned version in a requirements lock file."""
    return {normalize(name): version for name, version in _PIN.findall(lock.read_text())}


def is_demo(path: Path) -> bool:
    """The demo ships in the wheel but runs only with the ``demo`` extra installed."""
    return path.stem == "demo" or "demo" in path.parent.parts


def is_testing_extra(path: Path) -> bool:
    """The MCP test server ships in the wheel but runs only with the ``testing`` extra."""
    return path.parent.name == "testing" and path.stem == "mcp_server"


def imports_under(
    *folders: str, only: Callable[[Path], bool] = lambda _: True
) -> dict[str, set[Path]]:
    """Top-level import name -> the files under ``folders`` (matching ``only``) that import it."""
    found: dict[str, set[Path]] = {}
    for folder in folders:
        for path in sorted(p for p in (ROOT / folder).rglob("*.py") if only(p)):
            for name in top_level_imports(path.read_text()):
                found.setdefault(name, set()).add(path.relative_to(ROOT))
    return found


def _report(problems: dict[str, str], where: dict[str, set[Path]], extra: str) -> str:
    lines = [
        f"`import {name}` {problem} (in {', '.join(sorted(map(str, where[name])))})"
        for name, problem in problems.items()
    ]
    return "\n".join([*lines, extra])


@pytest.mark.parametrize(
    ("extra", "only", "hint"),
    [
        (
            None,
            lambda p: not is_demo(p) and not is_testing_extra(p),
            "declare it in [project] dependencies",
        ),
        ("demo", is_demo, "declare it in the demo extra of pyproject.toml"),
        ("testing", is_testing_extra, "declare it in the testing extra of pyproject.toml"),
    ],
    ids=["runtime", "demo", "testing"],
)
def test_src_imports_only_runtime_dependencies(
    extra: str | None, only: Callable[[Path], bool], hint: str
) -> None:
    runtime, extras = declared(extra) if extra else (declared()[0], set())
    where = imports_under("src", only=only)
    problems = import_problems(
        where,
        runtime | extras,
        # Absolute imports reach only the package itself (src/warden/protocols/mcp.py
        # must not hide the `mcp` distribution).
        {"warden"},
        importlib.metadata.packages_distributions(),
    )
    assert not problems, _report(problems, where, hint)


def test_tests_and_benchmarks_import_only_declared_packages() -> None:
    runtime, dev = declared()
    where = imports_under("tests", "benchmarks")
    problems = import_problems(
        where,
        runtime | dev,
        local_module_names([ROOT / "tests", ROOT / "benchmarks"]),
        importlib.metadata.packages_distributions(),
    )
    assert not problems, _report(problems, where, "declare it in the dev extra of pyproject.toml")


@pytest.mark.parametrize(
    ("source", "allowed", "problem"),
    [
        ("import yaml", {"pyyaml"}, None),
        ("from yaml import safe_load", set(), "comes from PyYAML, which is not declared"),
        ("import json, os.path\nfrom . import streams", set(), None),
        ("import warden.model", set(), None),
        ("import no_such_module_anywhere", set(), "no installed distribution"),
    ],
)
def test_import_problems_maps_imports_to_distributions(
    source: str, allowed: set[str], problem: str | None
) -> None:
    problems = import_problems(
        top_level_imports(source),
        allowed,
        {"warden", "streams"},
        importlib.metadata.packages_distributions(),
    )
    if problem is None:
        assert problems == {}
    else:
        assert len(problems) == 1
        assert problem in next(iter(problems.values()))


def test_lock_files_pin_every_declared_dependency() -> None:
    runtime, dev = declared()
    runtime_pins, dev_pins = pins(RUNTIME_LOCK), pins(DEV_LOCK)
    assert runtime - runtime_pins.keys() == set(), "run `make lock`: requirements.lock is stale"
    assert (runtime | dev) - dev_pins.keys() == set(), (
        "run `make lock`: requirements-dev.lock is stale"
    )
    # The dev lock is constrained by the runtime lock: both install the same versions.
    assert {n: v for n, v in dev_pins.items() if n in runtime_pins} == runtime_pins


def test_installed_dependencies_are_the_locked_versions() -> None:
    runtime, dev = declared()
    dev_pins = pins(DEV_LOCK)
    drift = {
        name: (importlib.metadata.version(name), dev_pins[name])
        for name in sorted(runtime | dev)
        if name in dev_pins and importlib.metadata.version(name) != dev_pins[name]
    }
    assert not drift, f"installed != locked (run `make venv`, or `make lock`): {drift}"


def test_lock_files_carry_hashes() -> None:
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        text = lock.read_text()
        assert len(_PIN.findall(text)) <= text.count("--hash=sha256:"), lock.name


def test_regopy_is_capped_below_its_next_minor_release() -> None:
    # Warden binds rego-cpp's C library directly; a minor release may change it.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (regopy,) = [r for r in project["dependencies"] if requirement_name(r) == "regopy"]
    cap = re.search(r"<\s*(\d+)\.(\d+)(?:\.0)?\s*(?:,|$)", regopy)
    assert cap is not None, f"regopy needs an upper bound below a minor release: {regopy}"
    pinned = pins(RUNTIME_LOCK)["regopy"].split(".")
    assert (int(pinned[0]), int(pinned[1]) + 1) == (int(cap.group(1)), int(cap.group(2))), (
        "the cap should be the release after the locked minor"
    )
