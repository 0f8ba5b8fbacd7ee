"""The shipped deployment example stays consistent with what Warden accepts."""

from __future__ import annotations

from pathlib import Path

import yaml

from warden.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_sidecar_example_embeds_a_valid_warden_config(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar-example.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "warden.yaml"
    path.write_text(config_map["data"]["warden.yaml"])
    config = load_config(path, environ={})
    assert config.agent.id == "refunds-agent"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert containers["warden"]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    agent_env = {e["name"]: e["value"] for e in containers["agent"]["env"]}
    assert agent_env["OPENAI_BASE_URL"].startswith("http://127.0.0.1:8080/openai")
