"""The kustomize base and overlays render with the real kubectl and match the chart's modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.kube_tools import (
    ROOT,
    assert_valid,
    by_kind,
    helm_template,
    kustomize,
    pod_spec,
    warden_container,
)
from warden.cli_inject import SidecarSettings, sidecar_container
from warden.config import Config, load_config

OVERLAYS = ROOT / "deploy" / "kubernetes" / "overlays"
IMAGE = "registry.example/warden:0.1.0"
# The chart values that make the same deployment as each overlay.
CHART_VALUES = {
    "sidecar": ["--set", "agent.image=registry.example/refunds-agent:1.0"],
    "gateway": [
        "--set",
        "mode=gateway",
        "--set",
        "config.state.url=postgresql://warden@postgres.db.svc:5432/warden",
        "--set",
        "secrets.statePassword=x",
        "--set-json",
        'networkPolicy.stateStore=[{"cidr":"10.0.0.0/8","ports":[5432]}]',
    ],
}


def overlay_config(docs: list[dict[str, Any]], tmp_path: Path) -> Config:
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["name"].startswith("warden-config-")  # generated, hash-suffixed
    path = tmp_path / "warden.yaml"
    path.write_text(cm["data"]["warden.yaml"])
    return load_config(path, environ={})


def test_there_is_an_overlay_per_chart_mode() -> None:
    assert sorted(p.name for p in OVERLAYS.iterdir()) == sorted(CHART_VALUES)


@pytest.mark.parametrize("mode", sorted(CHART_VALUES))
def test_overlay_renders_validates_and_matches_the_chart(mode: str, tmp_path: Path) -> None:
    docs = kustomize(OVERLAYS / mode)
    kinds = assert_valid(docs)
    chart = helm_template("--set", "image.tag=0.1.0", *CHART_VALUES[mode])
    chart_kinds = {d["kind"] for d in chart} - {"Pod", "Secret"}  # the test hook; secrets are yours
    assert kinds == chart_kinds

    config = overlay_config(docs, tmp_path)
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_grace_s
    (cm,) = by_kind(docs, "ConfigMap")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["warden-config"]["configMap"]["name"] == cm["metadata"]["name"]

    (chart_cm,) = [
        d for d in by_kind(chart, "ConfigMap") if d["metadata"]["name"] == "t-warden-config"
    ]
    (tmp_path / "chart.yaml").write_text(chart_cm["data"]["warden.yaml"])
    chart_config = load_config(tmp_path / "chart.yaml", environ={})
    # A gateway's callers prove their agent in both (the chart turns require_proof on).
    assert (
        config.identity.require_proof is chart_config.identity.require_proof is (mode == "gateway")
    )

    (chart_deployment,) = by_kind(chart, "Deployment")
    chart_spec = pod_spec(chart_deployment)
    assert warden_container(spec) == warden_container(chart_spec)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["terminationGracePeriodSeconds"] == chart_spec["terminationGracePeriodSeconds"]
    assert spec["automountServiceAccountToken"] is False
    agents = [c for c in spec.get("containers", []) if c["name"] == "agent"]
    for agent, chart_agent in zip(
        agents, [c for c in chart_spec["containers"] if c["name"] == "agent"], strict=True
    ):
        # Never Warden's user (65532): transparent mode's rules exempt Warden's traffic by owner.
        assert agent["securityContext"]["runAsUser"] == chart_agent["securityContext"]["runAsUser"]
        assert (
            agent["securityContext"]["runAsUser"]
            != warden_container(spec)["securityContext"]["runAsUser"]
        )


def test_sidecar_overlay_is_injects_container(tmp_path: Path) -> None:
    docs = kustomize(OVERLAYS / "sidecar")
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    assert spec["initContainers"] == [sidecar_container(SidecarSettings(image=IMAGE))]
    assert overlay_config(docs, tmp_path).agent.id == "refunds-agent"


def test_gateway_overlay_shares_state_and_scales(tmp_path: Path) -> None:
    docs = kustomize(OVERLAYS / "gateway")
    config = overlay_config(docs, tmp_path)
    assert config.state.url.startswith("postgresql://")
    assert config.listen.proxy == "0.0.0.0:8080"
    assert config.identity.require_proof is True
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    (deployment,) = by_kind(docs, "Deployment")
    warden = warden_container(pod_spec(deployment))
    expected = sidecar_container(SidecarSettings(image=IMAGE))
    del expected["restartPolicy"]
    expected["volumeMounts"].append(
        {"name": "warden-secrets", "mountPath": "/etc/warden/secrets", "readOnly": True}
    )
    assert warden == expected
