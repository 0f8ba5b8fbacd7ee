"""Build step: the wheel carries the shipped policy bundle as package data.

``policies/customer-support`` is the one source of the bundle (its tests live
beside it), and ``policies/customer-support-evals`` of its eval suite. Building
a wheel copies both to ``warden/data/policies/`` so that ``pip install
agent-warden`` followed by ``warden serve`` works from any folder (see
``warden.config.default_policy_bundles``) and ``warden init`` writes both.
Everything else about the build is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLE = Path(__file__).resolve().parent / "policies" / "customer-support"
SUITE = BUNDLE.with_name("customer-support-evals")


class BuildWithBundle(build_py):
    """``build_py``, then the shipped bundle and its suite copied into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads the bundle from the checkout
        # Hidden files left out, but the manifest: it names the bundle's revision and roots.
        hidden = shutil.ignore_patterns(".*", "__pycache__")

        def ignore(folder: str, names: list[str]) -> set[str]:
            return set(hidden(folder, names)) - {".manifest"}

        # The suite only where the build has it: an image's build context may carry
        # the bundle alone, and ``warden init`` then writes no suite.
        for source in (BUNDLE, *([SUITE] if SUITE.is_dir() else [])):
            target = Path(self.build_lib) / "warden" / "data" / "policies" / source.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target, ignore=ignore)


setup(cmdclass={"build_py": BuildWithBundle})
