"""The policy engine: Rego bundles evaluated in supervised worker processes.

Laid out along OPA's lines (see ``docs/adr/0006-policy-package-layout.md``):

* :mod:`warden.policy.rego` is the only module that imports the engine (regopy);
* :mod:`warden.policy.bundle` reads, checks, verifies and signs bundles, and
  never imports the engine back;
* :mod:`warden.policy.engine` runs the worker pool (:mod:`warden.policy.worker`)
  with a deadline and a cache (:mod:`warden.policy.cache`);
* :mod:`warden.policy.activation` hot-reloads bundles from folders or a server;
* :mod:`warden.policy.guard` is the pipeline stage that asks the engine;
* :mod:`warden.policy.authoring` holds the tools behind ``warden policy
  test|eval|check``, apart from the engine.
"""

from warden.policy.bundle import (
    Bundle,
    BundleError,
    Module,
    load_bundle,
    load_bundles,
    merge_bundles,
)

__all__ = [
    "Bundle",
    "BundleError",
    "Module",
    "load_bundle",
    "load_bundles",
    "merge_bundles",
]
