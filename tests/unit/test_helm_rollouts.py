"""The Helm chart through pod replacements, node drains and its NetworkPolicy.

A Warden locks its audit log while it runs, and a pod's name changes each time
it is replaced. The chart must never start a second Warden on the data of one
that still runs, must keep a single pod's state where its successor finds it,
must let nodes drain, and must not block, without saying so, the database it
was told to use. Rendering only, with the real Helm v4: there is no cluster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import psycopg
import pytest
import yaml

from tests.unit.kube_tools import (
    CHART,
    assert_valid,
    by_kind,
    helm_template,
    pod_spec,
    run,
    tool,
    warden_container,
)
from warden.config import load_config

ROOT = CHART.parents[1]
WORKDIR = PurePosixPath("/var/lib/warden")  # the image's working directory (deploy/Dockerfile)
SIDECAR = ["--set", "agent.image=registry.example/agent:1"]
PERSISTENCE = ["--set", "persistence.enabled=true"]
ONE_GATEWAY = [
    "--set",
    "mode=gateway",
    "--set",
    "gateway.replicaCount=1",
    "--set",
    "gateway.autoscaling.enabled=false",
]
STATE_STORE = ["--set-json", 'networkPolicy.stateStore=[{"cidr":"10.0.12.0/24","ports":[5432]}]']
POSTGRES = ["--set", "config.state.url=postgresql://warden@db:5432/w", *STATE_STORE]


def refused(*args: str) -> str:
    """The error of a ``helm template`` that must fail."""
    done = run([tool("helm"), "template", "t", str(CHART), *args])
    assert done.returncode != 0, "rendered, but should have been refused"
    return done.stderr


def deployment_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs, "Deployment")
    return deployment


def strategy(docs: list[dict[str, Any]]) -> str:
    """The Deployment's rollout strategy; Kubernetes' default is RollingUpdate."""
    spec: dict[str, Any] = deployment_of(docs)["spec"]
    kind: str = spec.get("strategy", {}).get("type", "RollingUpdate")
    return kind


def state_file(docs: list[dict[str, Any]], tmp_path: Path) -> PurePosixPath:
    """Where the pod's Warden keeps its SQLite state, as a path in the container."""
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    path = tmp_path / "warden.yaml"
    path.write_text(cm["data"]["warden.yaml"])
    url = load_config(path, environ={}).state.url
    assert url.startswith("sqlite:///")
    return WORKDIR / url.removeprefix("sqlite:///")


def on_claim(docs: list[dict[str, Any]], path: PurePosixPath, pod_name: str) -> PurePosixPath:
    """Where a file at ``path`` in the Warden container of pod ``pod_name`` lies on the claim."""
    spec = pod_spec(deployment_of(docs))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "persistentVolumeClaim" in volumes["warden-data"]
    (mount,) = [m for m in warden_container(spec)["volumeMounts"] if m["name"] == "warden-data"]
    sub_path = mount.get("subPath") or mount.get("subPathExpr", "")
    # The kubelet expands $(POD_NAME) from the env the chart sets from metadata.name.
    sub_path = sub_path.replace("$(POD_NAME)", pod_name)
    return PurePosixPath("/claim", sub_path, path.relative_to(mount["mountPath"]))


def test_a_sidecar_pod_on_a_claim_stops_before_its_successor_starts() -> None:
    """Each agent pod mounts the same claim at /var/lib/warden: a rolling update would start
    the new pod's Warden beside the old one, which holds the audit log's lock (exit 2)."""
    docs = helm_template(*SIDECAR, *PERSISTENCE)
    assert_valid(docs)
    assert strategy(docs) == "Recreate"
    postgresql = helm_template("-f", str(CHART / "ci" / "postgresql-values.yaml"))
    assert strategy(postgresql) == "Recreate"
    # On an emptyDir each pod has its own folder: a rolling update keeps the agent up.
    rolling = deployment_of(helm_template(*SIDECAR))["spec"]["strategy"]
    # Written out whole, so the chart owns it: a rollingUpdate block the API server
    # defaulted (no manager's) would stay beside a later `type: Recreate`, which it refuses.
    assert rolling == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
    }


def test_several_sidecar_replicas_on_one_claim_are_refused() -> None:
    error = refused(*SIDECAR, *PERSISTENCE, "--set", "agent.replicaCount=2")
    assert "agent.replicaCount=2 with persistence.enabled" in error
    assert "only one pod could start" in error
    assert "keep agent.replicaCount=1" in error
    assert "persistence.enabled=false" in error  # the fleet's way (docs/state.md)
    fleet = helm_template(*SIDECAR, "--set", "agent.replicaCount=3")
    assert deployment_of(fleet)["spec"]["replicas"] == 3


def test_the_notes_tell_an_own_pod_spec_on_a_claim_to_recreate() -> None:
    done = run([tool("helm"), "install", "t", str(CHART), *PERSISTENCE, "--dry-run=client"])
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "one replica and\n`strategy: {type: Recreate}`" in notes


def test_a_one_pod_gateways_state_outlives_its_pod(tmp_path: Path) -> None:
    """Kill switches, budgets and approvals live in SQLite on the claim: a replacement pod
    (a new name) must find them, or a thrown kill switch is lifted without a word."""
    docs = helm_template(*ONE_GATEWAY, *PERSISTENCE)
    assert_valid(docs)
    state = state_file(docs, tmp_path)
    before = on_claim(docs, state, "t-warden-5d4f8b7c9-abcde")
    after = on_claim(docs, state, "t-warden-5d4f8b7c9-fghij")
    assert before == after
    assert strategy(docs) == "Recreate"  # the one pod's successor waits for its lock


def test_a_shared_gateways_pods_keep_their_own_log_chains() -> None:
    """Several replicas write at once: each keeps its own folder, state is in PostgreSQL."""
    docs = helm_template("--set", "mode=gateway", *POSTGRES, *PERSISTENCE)
    assert_valid(docs)
    audit = WORKDIR / "warden-data" / "audit" / "audit.log"
    assert on_claim(docs, audit, "t-warden-1") != on_claim(docs, audit, "t-warden-2")
    assert strategy(docs) == "RollingUpdate"


def test_the_sqlite_gateway_message_offers_a_setup_that_keeps_state() -> None:
    error = refused("--set", "mode=gateway")
    assert "needs a shared state store" in error
    assert "gateway.replicaCount=1, gateway.autoscaling.enabled=false and" in error
    assert "persistence.enabled=true" in error


@pytest.mark.parametrize(
    ("args", "floor", "budget"),
    [
        (ONE_GATEWAY, 1, False),
        ([*ONE_GATEWAY, *PERSISTENCE], 1, False),
        (["--set", "mode=gateway", *POSTGRES], 2, True),
        (
            ["--set", "mode=gateway", *POSTGRES, "--set", "gateway.autoscaling.minReplicas=1"],
            1,
            True,
        ),
        ([*ONE_GATEWAY, *POSTGRES, "--set", "gateway.replicaCount=3"], 3, True),
    ],
    ids=["one", "one-persistent", "hpa", "hpa-floor-1", "three"],
)
def test_no_disruption_budget_blocks_a_node_drain(
    args: list[str], floor: int, budget: bool
) -> None:
    """At the fewest pods the gateway runs, the budget still allows an eviction (one pod
    alone gets none: there is nothing to keep serving); with more it keeps one serving."""
    docs = helm_template(*args)
    assert_valid(docs)
    budgets = by_kind(docs, "PodDisruptionBudget")
    if not budget:
        assert budgets == []
        return
    (pdb,) = budgets
    spec = pdb["spec"]
    allowed = floor - spec["minAvailable"] if "minAvailable" in spec else spec["maxUnavailable"]
    assert allowed >= 1
    if floor > 1:
        assert spec["minAvailable"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            # Your own agent pods, state in an in-cluster PostgreSQL, no stateStore.
            [
                "--set",
                "networkPolicy.podSelector.matchLabels.app=refunds-agent",
                "--set",
                "config.state.url=postgresql://warden@postgres.db.svc:5432/warden",
            ],
            "config.state.url names PostgreSQL on port 5432",
        ),
        (
            [
                "--set",
                "mode=gateway",
                *STATE_STORE,
                "--set",
                "config.state.url=postgresql://w@db:5433/w",
            ],
            "config.state.url names PostgreSQL on port 5433",
        ),
        (
            [
                *SIDECAR,
                *STATE_STORE,
                "--set-json",
                'config.audit.ship.url="postgresql://a@db1:5432,db2:6432/w"',
            ],
            "config.audit.ship.url names PostgreSQL on port 6432",
        ),
        (
            # libpq's port= in the query is the one it connects to (a pooler's).
            [
                *SIDECAR,
                *STATE_STORE,
                "--set-json",
                'config.state.url="postgresql://warden@/w?host=pgbouncer.db&port=6432"',
            ],
            "config.state.url names PostgreSQL on port 6432",
        ),
    ],
    ids=["state-no-rule", "state-other-port", "audit-ship", "query-port"],
)
def test_a_network_policy_that_would_block_postgresql_is_refused(
    args: list[str], message: str
) -> None:
    error = refused(*args)
    assert f"networkPolicy: {message}, but no egress rule opens that port" in error
    assert "networkPolicy.stateStore" in error
    assert "networkPolicy.extraEgress" in error
    # Without the chart's policy nothing is blocked.
    helm_template(*args, "--set", "networkPolicy.enabled=false")


def test_extra_egress_rules_reach_the_network_policy() -> None:
    """An OTLP collector or an in-cluster database, selected by label: added unchanged."""
    values = CHART / "ci" / "existing-secrets-values.yaml"
    extra = yaml.safe_load(values.read_text())["networkPolicy"]["extraEgress"]
    docs = helm_template("-f", str(values))
    assert_valid(docs)
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["egress"][-len(extra) :] == extra
    collector = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}],
        "ports": [{"port": 4318, "protocol": "TCP"}],
    }
    docs = helm_template(
        *SIDECAR, "--set-json", f"networkPolicy.extraEgress=[{json.dumps(collector)}]"
    )
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["egress"][-1] == collector
    # A rule without ports opens every port, so it may carry the database too.
    anywhere = {"to": [{"namespaceSelector": {"matchLabels": {"name": "db"}}}]}
    helm_template(
        *SIDECAR,
        "--set",
        "config.state.url=postgresql://w@db/w",
        "--set-json",
        f"networkPolicy.extraEgress=[{json.dumps(anywhere)}]",
    )


# The Warden image's user has no home folder (HOME=/): without sslrootcert, libpq
# looks for /.postgresql/root.crt and Warden stops at start. "system" does not
# help either: psycopg-binary's own OpenSSL looks in /usr/lib/psycopg-openssl.
DOCUMENTED = [
    ROOT / "docs" / "deploy.md",
    CHART / "values.yaml",
    *sorted((CHART / "ci").glob("*.yaml")),
]
PG_URL = re.compile(r"postgres(?:ql)?://[^\s\"'`]+")


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_postgresql_urls_that_verify_name_their_ca_file(path: Path) -> None:
    for url in PG_URL.findall(path.read_text()):
        params = psycopg.conninfo.conninfo_to_dict(url)
        if params.get("sslmode") not in ("verify-ca", "verify-full"):
            continue
        assert params.get("sslrootcert") == "/etc/ssl/certs/ca-certificates.crt", url


def test_the_gateway_guide_verifies_its_database() -> None:
    urls = PG_URL.findall((ROOT / "docs" / "deploy.md").read_text())
    assert any("sslmode=verify-full" in url for url in urls)


def test_the_tmp_volume_where_evidence_packages_are_built_is_sized_by_a_value() -> None:
    def tmp(*args: str) -> dict[str, Any]:
        volumes = pod_spec(deployment_of(helm_template(*SIDECAR, *args)))["volumes"]
        (found,) = [v for v in volumes if v["name"] == "warden-tmp"]
        return dict(found["emptyDir"])

    assert tmp() == {"medium": "Memory", "sizeLimit": "64Mi"}
    # On the node's disk, for month-long evidence exports: never the audit log's volume.
    disk = tmp("--set", "tmpVolume.medium=", "--set", "tmpVolume.sizeLimit=2Gi")
    assert disk == {"sizeLimit": "2Gi"}
    assert "tmpVolume" in refused(*SIDECAR, "--set", "tmpVolume.medium=Disk")
