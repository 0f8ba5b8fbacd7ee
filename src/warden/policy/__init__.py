"""The policy engine: Rego bundles evaluated in supervised worker processes.

* :mod:`warden.policy.bundle` loads and checks OPA-layout bundles;
* :mod:`warden.policy.signing` checks and writes ``.signatures.json``;
* :mod:`warden.policy.engine` runs the worker pool with a deadline and a cache;
* :mod:`warden.policy.activation` hot-reloads bundles from folders or a server;
* :mod:`warden.policy.guard` is the pipeline stage that asks the engine.
"""

from warden.policy.bundle import (
    Bundle,
    BundleError,
    Module,
    compile_check,
    load_bundle,
    load_bundles,
    merge_bundles,
)

__all__ = [
    "Bundle",
    "BundleError",
    "Module",
    "compile_check",
    "load_bundle",
    "load_bundles",
    "merge_bundles",
]
