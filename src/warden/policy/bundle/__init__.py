"""Policy bundles: their files, loading and checking, signatures -- OPA's ``bundle`` package.

* :mod:`~warden.policy.bundle.model`: :class:`Bundle`, :class:`Module`, :class:`BundleError`;
* :mod:`~warden.policy.bundle.files`: reading a directory or ``.tar.gz``, with limits;
* :mod:`~warden.policy.bundle.manifest`: ``.manifest`` revision and roots;
* :mod:`~warden.policy.bundle.loader`: files to a checked bundle; merging bundles;
* :mod:`~warden.policy.bundle.signatures`, :mod:`~warden.policy.bundle.verify`,
  :mod:`~warden.policy.bundle.sign`: ``.signatures.json`` as OPA writes it;
* :mod:`~warden.policy.bundle.diagnostics`: engine errors as ``file:line:col``;
* :mod:`~warden.policy.bundle.compile`: compiling with the engine (loads it, so
  it is not re-exported here).

Nothing in this package imports the engine (:mod:`warden.policy.engine`) or
the authoring tools; they import it. ``tests/unit/test_layering.py`` keeps it so.
"""

from warden.policy.bundle.diagnostics import describe_rego_error
from warden.policy.bundle.files import (
    MANIFEST_FILE,
    MAX_BUNDLE_BYTES,
    SIGNATURES_FILE,
    bundle_name,
    read_bundle_files,
    read_tarball,
)
from warden.policy.bundle.loader import build_bundle, load_bundle, load_bundles, merge_bundles
from warden.policy.bundle.manifest import roots_overlap
from warden.policy.bundle.model import Bundle, BundleError, Module

__all__ = [
    "MANIFEST_FILE",
    "MAX_BUNDLE_BYTES",
    "SIGNATURES_FILE",
    "Bundle",
    "BundleError",
    "Module",
    "build_bundle",
    "bundle_name",
    "describe_rego_error",
    "load_bundle",
    "load_bundles",
    "merge_bundles",
    "read_bundle_files",
    "read_tarball",
    "roots_overlap",
]
