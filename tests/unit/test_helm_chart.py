"""The Helm chart, checked with the real Helm v4 and Kubernetes' own schemas.

Each values file in ``helm/warden/ci/`` is linted and rendered once; every
rendered manifest must pass the strict schema of the newest Kubernetes version
``kubernetes-validate`` ships, and the warden.yaml it renders must load in
Warden. Only rendering is tested here: there is no cluster.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.kube_tools import (
    CHART,
    assert_valid,
    by_kind,
    helm_template,
    pod_spec,
    run,
    schema_errors,
    tool,
    warden_container,
)
from warden import config as warden_config
from warden.config import Config, load_config
from warden.errors import Forbidden
from warden.identity import AGENT_KEY_HEADER, Identity

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
PACKAGE_SIDECAR = CHART.parents[1] / "src" / "warden" / "data" / "kubernetes" / "sidecar.yaml"


@cache
def rendered(values: Path) -> tuple[dict[str, Any], ...]:
    return tuple(helm_template("-f", str(values)))


def values_of(name: str) -> tuple[Path, tuple[dict[str, Any], ...]]:
    path = CHART / "ci" / f"{name}-values.yaml"
    return path, rendered(path)


def warden_yaml(docs: tuple[dict[str, Any], ...], tmp_path: Path) -> Config:
    """Load the rendered warden.yaml exactly as `warden serve --config` would."""
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    path = tmp_path / "warden.yaml"
    path.write_text(cm["data"]["warden.yaml"])
    return load_config(path, environ={})


def test_ci_values_cover_both_modes_and_the_named_cases() -> None:
    names = {p.name for p in CI_VALUES}
    assert {
        "sidecar-values.yaml",
        "gateway-values.yaml",
        "postgresql-values.yaml",
        "existing-secrets-values.yaml",
        "fleet-values.yaml",
    } <= names


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint_passes_strict(values: Path) -> None:
    done = run([tool("helm"), "lint", "--strict", str(CHART), "-f", str(values)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_every_rendered_manifest_passes_the_kubernetes_schema(values: Path, tmp_path: Path) -> None:
    docs = rendered(values)
    kinds = assert_valid(docs)
    assert {"ConfigMap", "ServiceAccount"} <= kinds
    config = warden_yaml(docs, tmp_path)
    admin_host, _ = warden_config.parse_listen(config.listen.admin)
    assert admin_host == "0.0.0.0"  # the kubelet probes it on the pod IP


def test_the_schema_check_rejects_an_unknown_field() -> None:
    _, docs = values_of("gateway")
    (deployment,) = by_kind(docs, "Deployment")
    broken = json.loads(json.dumps(deployment))
    warden_container(pod_spec(broken))["readinessprobe"] = {"httpGet": {"path": "/readyz"}}
    assert schema_errors(broken) is not None
    assert schema_errors(deployment) is None


def test_sidecar_mode_runs_warden_as_a_native_sidecar(tmp_path: Path) -> None:
    _, docs = values_of("sidecar")
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    assert [c["name"] for c in spec["initContainers"]] == ["warden"]
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    warden = warden_container(spec)
    assert warden["restartPolicy"] == "Always"
    assert_probes_and_security(warden)
    config = warden_yaml(docs, tmp_path)
    assert config.agent.id == "refunds-agent"
    assert config.listen.proxy == "127.0.0.1:8080"  # the agent's loopback only
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_grace_s
    agent_env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert agent_env["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/openai/v1"
    assert agent_env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080/anthropic"
    assert spec["securityContext"]["runAsNonRoot"] is True
    # The agent never runs as Warden's user (rules that exempt Warden by owner).
    agent_user = spec["containers"][0]["securityContext"]["runAsUser"]
    assert agent_user != warden["securityContext"].get(
        "runAsUser", spec["securityContext"]["runAsUser"]
    )
    assert not by_kind(docs, "PodDisruptionBudget")
    assert not by_kind(docs, "HorizontalPodAutoscaler")


def test_in_a_sidecar_the_grpc_listener_is_the_agents_alone(tmp_path: Path) -> None:
    # Bound to every address, any pod could Check and ReportOutcome as the agent.
    path = CHART / "ci" / "sidecar-values.yaml"
    docs = tuple(helm_template("-f", str(path), "--set", "ports.grpc=9090"))
    assert warden_yaml(docs, tmp_path).listen.grpc == "127.0.0.1:9090"


def test_the_agents_base_urls_follow_the_proxy_port(tmp_path: Path) -> None:
    docs = helm_template(
        "--set", "agent.image=registry.example/agent:1", "--set", "ports.proxy=9000"
    )
    (deployment,) = by_kind(docs, "Deployment")
    (agent,) = pod_spec(deployment)["containers"]
    env = {e["name"]: e["value"] for e in agent["env"]}
    assert env == {
        "OPENAI_BASE_URL": "http://127.0.0.1:9000/openai/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9000/anthropic",
    }
    assert warden_yaml(tuple(docs), tmp_path).listen.proxy == "127.0.0.1:9000"


GATEWAY = [
    "--set",
    "mode=gateway",
    "--set",
    "gateway.replicaCount=1",
    "--set",
    "gateway.autoscaling.enabled=false",
]


def test_a_gateway_serves_no_request_without_an_agents_proof(tmp_path: Path) -> None:
    """Any pod may call a gateway: a request with no key or token is refused rather than
    served as ``agent.id``, so an agent whose kill switch is thrown cannot shed its key and
    carry on as the default agent."""
    key = "wk_refunds_bot_key_0123456789abcdef"
    digest = hashlib.sha256(key.encode()).hexdigest()
    docs = tuple(
        helm_template(
            *GATEWAY,
            "--set-json",
            f'secrets.agentKeys={{"refunds-bot":{{"key_sha256":["{digest}"]}}}}',
        )
    )
    (secret,) = by_kind(docs, "Secret")
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    path = tmp_path / "warden.yaml"
    path.write_text(cm["data"]["warden.yaml"])
    agents = base64.b64decode(secret["data"]["agent-keys"]).decode()
    config = load_config(path, environ={"WARDEN_IDENTITY__AGENTS": agents})
    assert config.identity.require_proof is True
    identity = Identity(config)
    with pytest.raises(Forbidden):
        asyncio.run(identity.resolve({}))
    assert asyncio.run(identity.resolve({AGENT_KEY_HEADER: key})).id == "refunds-bot"


def test_a_gateway_without_proof_needs_an_explicit_acknowledgement(tmp_path: Path) -> None:
    off = [*GATEWAY, "--set", "config.identity.require_proof=false"]
    done = run([tool("helm"), "template", "t", str(CHART), *off])
    assert done.returncode != 0
    assert "config.identity.require_proof=false in gateway mode" in done.stderr
    assert "gateway.allowUnprovenDefaultAgent=true" in done.stderr
    docs = tuple(helm_template(*off, "--set", "gateway.allowUnprovenDefaultAgent=true"))
    assert warden_yaml(docs, tmp_path).identity.require_proof is False
    # A sidecar's proxy is on the pod's loopback: the chart leaves require_proof to the user.
    assert warden_yaml(tuple(helm_template()), tmp_path).identity.require_proof is False


@pytest.mark.parametrize(
    "proxy", ["127.0.0.1", "127.0.0.2/32", "127.0.0.0/8", "0.0.0.0/0", "64.0.0.0/2"]
)
def test_a_sidecars_console_never_trusts_the_pods_loopback(proxy: str) -> None:
    """The agent shares the sidecar's loopback: trusted there, it could send the sign-on
    headers itself and clear its own kill switch in the console."""
    sso = f'config.console.sso={{"trusted_proxies":["10.0.0.5","{proxy}"]}}'
    done = run([tool("helm"), "template", "t", str(CHART), "--set-json", sso])
    assert done.returncode != 0
    assert f"config.console.sso.trusted_proxies: {proxy} takes in the pod's loopback" in (
        done.stderr
    )
    # A gateway's pod holds Warden alone.
    gateway = [*GATEWAY, "--set-json", sso]
    assert run([tool("helm"), "template", "t", str(CHART), *gateway]).returncode == 0


@pytest.mark.parametrize(
    "proxy",
    [
        "::1",
        "0::1",
        "0:0:0:0:0:0:0:1",
        "::0:1",
        "::0.0.0.1",
        "::ffff:127.0.0.1",
        "::/0",
        "0::/0",
        "1::/0",
        "fd00::5",
    ],
)
def test_a_sidecars_console_trusts_no_ipv6_entry(proxy: str) -> None:
    """The chart's admin listener is IPv4 (0.0.0.0): no auth proxy reaches it over IPv6,
    and the loopback ``::1`` has more spellings than a template can tell apart."""
    sso = f'config.console.sso={{"trusted_proxies":["10.0.0.5","{proxy}"]}}'
    done = run([tool("helm"), "template", "t", str(CHART), "--set-json", sso])
    assert done.returncode != 0
    assert f"config.console.sso.trusted_proxies: {proxy} is an IPv6 entry" in done.stderr
    assert "name the auth proxy's IPv4 address" in done.stderr
    gateway = [*GATEWAY, "--set-json", sso]
    assert run([tool("helm"), "template", "t", str(CHART), *gateway]).returncode == 0


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("WARDEN_IDENTITY__REQUIRE_PROOF", GATEWAY),
        ("WARDEN_IDENTITY", GATEWAY),
        ("WARDEN_identity__require_proof", GATEWAY),
        ("WARDEN_CONSOLE__SSO__TRUSTED_PROXIES", []),
        ("WARDEN_CONSOLE__SSO", []),
        ("WARDEN_CONSOLE", []),
    ],
)
def test_the_charts_checks_cannot_be_got_around_through_env(name: str, mode: list[str]) -> None:
    """The gateway's require_proof and the sidecar's SSO checks read ``config``: an
    environment variable setting the same would pass them by."""
    env = f'env=[{{"name":"OTEL_SERVICE_NAME","value":"w"}},{{"name":"{name}","value":"x"}}]'
    done = run([tool("helm"), "template", "t", str(CHART), *mode, "--set-json", env])
    assert done.returncode != 0
    assert f"env: {name} would set identity or console.sso settings" in done.stderr
    assert "set them as config.identity... or config.console.sso... instead" in done.stderr


def test_other_warden_settings_may_still_come_from_env() -> None:
    env = [{"name": "WARDEN_CONSOLE__ENABLED", "value": "false"}, {"name": "WARDEN_MODE"}]
    docs = helm_template(
        "--set", "agent.image=registry.example/agent:1", "--set-json", f"env={json.dumps(env)}"
    )
    (deployment,) = by_kind(tuple(docs), "Deployment")
    names = [e["name"] for e in warden_container(pod_spec(deployment))["env"]]
    assert names[-2:] == ["WARDEN_CONSOLE__ENABLED", "WARDEN_MODE"]


@pytest.mark.parametrize("proxy", ["10.0.0.5", "10.20.0.0/16", "128.0.0.0/1", "126.0.0.0/8"])
def test_a_sidecars_console_may_trust_an_auth_proxy_elsewhere(proxy: str, tmp_path: Path) -> None:
    sso = f'config.console.sso={{"trusted_proxies":["{proxy}"]}}'
    docs = tuple(helm_template("--set-json", sso))
    console = warden_yaml(docs, tmp_path).console
    assert console.sso is not None
    assert console.sso.trusted_proxies == (proxy,)


def assert_probes_and_security(warden: dict[str, Any]) -> None:
    admin = next(p for p in warden["ports"] if p["name"] == "warden-admin")
    assert warden["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "warden-admin"}
    assert warden["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "warden-admin"}
    assert warden["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "warden-admin"}
    assert admin["containerPort"] == 8081
    sc = warden["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "cpu" not in warden["resources"].get("limits", {})  # no throttling of every call


def test_gateway_mode_has_a_service_pdb_and_hpa(tmp_path: Path) -> None:
    _, docs = values_of("gateway")
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    assert "initContainers" not in spec
    assert spec["enableServiceLinks"] is False  # WARDEN_SERVICE_HOST is no setting
    warden = warden_container(spec)
    assert "restartPolicy" not in warden
    assert_probes_and_security(warden)
    assert {p["name"] for p in warden["ports"]} == {"warden-proxy", "warden-admin", "warden-grpc"}
    config = warden_yaml(docs, tmp_path)
    assert config.listen.proxy == "0.0.0.0:8080"
    assert config.listen.grpc == "0.0.0.0:9090"
    assert config.identity.require_proof is True  # the chart's default in gateway mode
    assert config.state.url.startswith("postgresql://")
    assert config.state.password_file == "/etc/warden/secrets/state-password"
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_grace_s
    (service,) = by_kind(docs, "Service")
    assert {p["name"] for p in service["spec"]["ports"]} == {"proxy", "admin", "grpc"}
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert service["spec"]["selector"] == selector
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it


def test_network_policy_allows_egress_only_to_declared_upstreams_state_and_dns() -> None:
    values, docs = values_of("postgresql")
    declared = yaml.safe_load(values.read_text())["networkPolicy"]
    (policy,) = by_kind(docs, "NetworkPolicy")
    (deployment,) = by_kind(docs, "Deployment")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == (deployment["spec"]["selector"]["matchLabels"])
    )
    assert "Egress" in policy["spec"]["policyTypes"]
    blocks = []
    dns = []
    for rule in policy["spec"]["egress"]:
        (peer,) = rule["to"]
        ports = sorted((p["port"], p["protocol"]) for p in rule["ports"])
        if "ipBlock" in peer:
            blocks.append((peer["ipBlock"]["cidr"], ports))
        else:
            dns.append((peer, ports))
    expected = [
        (r["cidr"], sorted((p, "TCP") for p in r["ports"]))
        for r in declared["upstreams"] + declared["stateStore"]
    ]
    assert blocks == expected
    assert dns == [
        (
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}},
            [(53, "TCP"), (53, "UDP")],
        )
    ]


def test_secrets_stay_out_of_the_config_map(tmp_path: Path) -> None:
    values, docs = values_of("postgresql")
    password = yaml.safe_load(values.read_text())["secrets"]["statePassword"]
    for cm in by_kind(docs, "ConfigMap"):
        assert password not in json.dumps(cm)
    (secret,) = by_kind(docs, "Secret")
    assert base64.b64decode(secret["data"]["state-password"]).decode() == password
    assert "signing-key.pem" in secret["data"]
    config = warden_yaml(docs, tmp_path)
    assert config.audit.signing_key_file == "/etc/warden/secrets/signing-key.pem"
    assert config.policy.bundle_url == "https://bundles.example/warden/customer-support.tar.gz"
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    # A longer shutdown_grace_s moves the pod's grace period with it.
    assert spec["terminationGracePeriodSeconds"] == math.ceil(config.shutdown_grace_s) + 10
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["warden-data"]["persistentVolumeClaim"]["claimName"] == "t-warden-data"
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_a_fleet_shares_postgresql_and_ships_its_audit_log(tmp_path: Path) -> None:
    values, docs = values_of("fleet")
    declared = yaml.safe_load(values.read_text())
    config = warden_yaml(docs, tmp_path)
    assert config.state.url == declared["config"]["state"]["url"]
    assert config.state.password_file == "/etc/warden/secrets/state-password"
    assert config.audit.ship is not None
    assert config.audit.ship.url == declared["config"]["audit"]["ship"]["url"]
    assert config.audit.ship.migrate == "off"
    assert config.audit.ship.password_file == "/etc/warden/secrets/audit-ship-password"
    passwords = {
        "state-password": declared["secrets"]["statePassword"],
        "audit-ship-password": declared["secrets"]["auditShipPassword"],
    }
    for cm in by_kind(docs, "ConfigMap"):
        assert not any(pw in json.dumps(cm) for pw in passwords.values())
    (secret,) = by_kind(docs, "Secret")
    for key, password in passwords.items():
        assert base64.b64decode(secret["data"][key]).decode() == password
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    spec = pod_spec(deployment)
    volumes = {v["name"]: v for v in spec["volumes"]}
    items = {i["key"]: i["path"] for i in volumes["warden-secrets"]["secret"]["items"]}
    assert items == {key: key for key in passwords}
    mounts = {m["name"]: m["mountPath"] for m in warden_container(spec)["volumeMounts"]}
    assert mounts["warden-secrets"] == "/etc/warden/secrets"


def test_admin_tokens_and_agent_keys_reach_warden_from_the_secret(tmp_path: Path) -> None:
    values, docs = values_of("sidecar")
    declared = yaml.safe_load(values.read_text())["secrets"]
    (secret,) = by_kind(docs, "Secret")
    (deployment,) = by_kind(docs, "Deployment")
    env = {e["name"]: e for e in warden_container(pod_spec(deployment))["env"]}
    environ = {}
    for name, key in (
        ("WARDEN_ADMIN__TOKENS", "admin-tokens"),
        ("WARDEN_IDENTITY__AGENTS", "agent-keys"),
    ):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key)
        environ[name] = base64.b64decode(secret["data"][key]).decode()
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "t-warden-config"]
    path = tmp_path / "warden.yaml"
    path.write_text(cm["data"]["warden.yaml"])
    config = load_config(path, environ=environ)  # as the container's environment sets it
    assert config.admin.tokens[0].subject == declared["adminTokens"][0]["subject"]
    assert set(config.identity.agents) == {"refunds-agent"}
    (policy_cm,) = [
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "t-warden-policy"
    ]
    assert "policy.rego" in policy_cm["data"]
    assert config.policy.bundles == ("/etc/warden/policy",)


def test_a_provider_key_reaches_warden_and_not_the_agent(tmp_path: Path) -> None:
    # docs/credentials.md, "On Kubernetes": the key in Warden's env, a placeholder in the agent's.
    extra = tmp_path / "keys.yaml"
    upstream = {"protocol": "openai", "base_url": "https://api.openai.com"}
    extra.write_text(
        yaml.safe_dump(
            {
                "config": {
                    "upstreams": {"openai": {**upstream, "credential": {"env": "OPENAI_API_KEY"}}}
                },
                "env": [
                    {
                        "name": "OPENAI_API_KEY",
                        "valueFrom": {"secretKeyRef": {"name": "provider-keys", "key": "openai"}},
                    }
                ],
                "agent": {
                    "env": [
                        {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/openai/v1"},
                        {"name": "OPENAI_API_KEY", "value": "held-by-warden"},
                    ]
                },
            }
        )
    )
    sidecar = CHART / "ci" / "sidecar-values.yaml"
    docs = tuple(helm_template("-f", str(sidecar), "-f", str(extra)))
    assert_valid(docs)
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    warden_env = {e["name"]: e for e in warden_container(spec)["env"]}
    ref = warden_env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("provider-keys", "openai")
    (agent,) = spec["containers"]
    assert {"name": "OPENAI_API_KEY", "value": "held-by-warden"} in agent["env"]
    assert "secretKeyRef" not in json.dumps(agent)
    credential = warden_yaml(docs, tmp_path).upstreams["openai"].credential
    assert credential is not None
    assert credential.env == "OPENAI_API_KEY"


def test_existing_secret_and_config_map_are_referenced_not_created(tmp_path: Path) -> None:
    _, docs = values_of("existing-secrets")
    assert not by_kind(docs, "Secret")
    assert not by_kind(docs, "Deployment")  # no agent: the user's pods include the template
    assert not by_kind(docs, "PersistentVolumeClaim")  # existingClaim
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "refunds-agent"}}
    config = warden_yaml(docs, tmp_path)
    assert config.state.password_file == "/etc/warden/secrets/state-password"
    assert config.audit.signing_key_file == "/etc/warden/secrets/signing-key.pem"
    assert config.policy.bundles == ("/etc/warden/policy",)


def test_monitoring_resources_render_the_alert_file() -> None:
    _, docs = values_of("sidecar")
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (service,) = by_kind(docs, "Service")
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    labels = service["metadata"]["labels"]
    assert all(labels[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    (dashboard,) = [
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")
    ]
    assert json.loads(dashboard["data"]["warden.json"])["title"]


def test_chart_defaults_are_warden_serves_defaults(tmp_path: Path) -> None:
    docs = tuple(helm_template())
    assert_valid(docs)
    config = warden_yaml(docs, tmp_path)
    defaults = Config()
    # Only the listeners differ (pod networking); paths stay relative to the
    # image's working directory, the data volume, as with `warden serve`.
    assert config.model_dump(exclude={"listen"}) == defaults.model_dump(exclude={"listen"})
    assert config.listen.proxy == warden_config.DEFAULT_PROXY_LISTEN
    assert warden_config.parse_listen(config.listen.admin)[1] == 8081
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["config"]["shutdown_grace_s"] == warden_config.DEFAULT_SHUTDOWN_GRACE_S


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "mode=gateway"], "needs a shared state store"),
        (["--set", "mode=mesh"], "/mode"),
        (["--set", "config.listen.proxy=0.0.0.0:80"], "/config"),
        (["--set", "networkPolicy.upstreams[0].cidr=api.openai.com"], "cidr"),
        (["--set", "policy.bundleUrl=https://b.example/x.tar.gz,policy.files.a=b"], "one of"),
        (["--set", "secrets.auditShipPassword=pw"], "config.audit.ship is not"),
        (["--set", "config.audit.ship.url=sqlite:///x.db"], "config.audit.ship.url"),
        (["--set", "agent.runAsUser=65532"], "runAsUser"),  # Warden's own user
        (["--set-json", 'config.console.sso={"trusted_proxies":["localhost"]}'], "trusted_proxies"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_value(args: list[str], message: str) -> None:
    done = run([tool("helm"), "template", "t", str(CHART), *args])
    assert done.returncode != 0
    assert message in done.stderr


def test_the_packaged_chart_carries_injects_sidecar_file(tmp_path: Path) -> None:
    # files/sidecar.yaml is a link to the package data `warden inject` reads;
    # `helm package` stores the file it points to.
    link = CHART / "files" / "sidecar.yaml"
    assert link.resolve() == PACKAGE_SIDECAR.resolve()
    done = run([tool("helm"), "package", str(CHART), "-d", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("warden-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.extractfile("warden/files/sidecar.yaml")
        assert member is not None
        assert member.read() == PACKAGE_SIDECAR.read_bytes()
        assert not any(name.startswith("warden/ci/") for name in tar.getnames())


def test_helm_test_hook_asks_readyz_with_the_warden_image() -> None:
    _, docs = values_of("gateway")
    (pod,) = by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    (deployment,) = by_kind(docs, "Deployment")
    assert container["image"] == warden_container(pod_spec(deployment))["image"]
    assert container["command"][0] == "python"
    assert "/readyz" in container["args"][0]


def test_notes_render_for_each_mode() -> None:
    for values in CI_VALUES:
        done = run(
            [tool("helm"), "install", "t", str(CHART), "-f", str(values), "--dry-run=client"]
        )
        assert done.returncode == 0, done.stderr
        notes = done.stdout.split("NOTES:", 1)[1]
        assert "/readyz" in notes


PARENT_TEMPLATE = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: myagent}
spec:
  selector: {matchLabels: {app: myagent}}
  template:
    metadata: {labels: {app: myagent}}
    spec:
      terminationGracePeriodSeconds: 30
      initContainers:
        {{- include "warden.sidecar" .Subcharts.warden | nindent 8 }}
      containers:
        - {name: agent, image: registry.example/myagent:1}
      volumes:
        {{- include "warden.volumes" .Subcharts.warden | nindent 8 }}
"""


def test_a_users_chart_includes_the_sidecar_template(tmp_path: Path) -> None:
    # The way docs/deploy.md tells teams to use it: a dependency, two includes.
    parent = tmp_path / "myagent"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: myagent\nversion: 0.1.0\n"
        f"dependencies:\n  - {{name: warden, version: 0.1.0, repository: 'file://{CHART}'}}\n"
    )
    (parent / "values.yaml").write_text(
        "warden:\n  networkPolicy: {podSelector: {matchLabels: {app: myagent}}}\n"
    )
    (parent / "templates" / "deployment.yaml").write_text(PARENT_TEMPLATE)
    built = run([tool("helm"), "dependency", "build", str(parent)])
    assert built.returncode == 0, built.stderr
    done = run([tool("helm"), "template", "r", str(parent)])
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert_valid(docs)
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    own = helm_template("--set", "agent.image=x", release="r")
    (own_deployment,) = by_kind(own, "Deployment")
    assert spec["initContainers"] == pod_spec(own_deployment)["initContainers"]
    config_maps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["warden-config"]["configMap"]["name"] in config_maps
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "myagent"}}


def test_an_empty_list_of_network_peers_admits_nobody() -> None:
    """``from: []`` admits every source: an empty ``clients`` or ``admin`` list leaves its
    rule out (nobody), and an empty DNS port list is refused (it would mean every port)."""
    base = [
        "--set",
        "mode=gateway",
        "--set",
        "config.state.url=postgresql://warden@db:5432/w",
        "--set",
        "secrets.statePassword=x",
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        'networkPolicy.stateStore=[{"cidr":"10.0.12.0/24","ports":[5432]}]',
    ]
    for empty, kept in (("admin", "warden-proxy"), ("clients", "warden-admin")):
        docs = helm_template(*base, "--set-json", f"networkPolicy.{empty}=[]")
        (policy,) = by_kind(docs, "NetworkPolicy")
        rules = policy["spec"]["ingress"]
        assert all(rule["from"] for rule in rules)
        assert [[p["port"] for p in rule["ports"]][0] for rule in rules] == [kept]
    both = helm_template(
        *base, "--set-json", "networkPolicy.admin=[]", "--set-json", "networkPolicy.clients=[]"
    )
    (policy,) = by_kind(both, "NetworkPolicy")
    assert policy["spec"]["ingress"] == []
    done = run(
        [
            tool("helm"),
            "template",
            "t",
            str(CHART),
            *base,
            "--set-json",
            "networkPolicy.dns.ports=[]",
        ]
    )
    assert done.returncode != 0
    assert "ports" in done.stderr


def test_a_changed_secret_restarts_the_pods() -> None:
    """Admin tokens and agent keys reach Warden as environment read at start: revoking one
    (a new Secret) changes the pod template, so the pods restart and the old one stops."""

    def checksums(token: str) -> list[str]:
        docs = helm_template(
            "--set",
            "agent.image=registry.example/agent:1",
            "--set-json",
            f'secrets.adminTokens=[{{"subject":"a","roles":["admin"],"sha256":"{token}"}}]',
        )
        (deployment,) = by_kind(docs, "Deployment")
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        return [annotations["checksum/config"], annotations["checksum/secret"]]

    before, after = checksums("a" * 64), checksums("b" * 64)
    assert before[0] == after[0]  # the config is the same
    assert before[1] != after[1]


def test_with_an_existing_secret_no_checksum_pretends_to_follow_it() -> None:
    """The chart cannot see into a Secret it does not render: a checksum of nothing would
    never change, so a revoked key would stay valid. Instead the notes say to restart."""
    args = ["--set", "agent.image=registry.example/agent:1", "--set", "secrets.existingSecret=s"]
    (deployment,) = by_kind(helm_template(*args), "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations
    assert "checksum/config" in annotations
    done = run([tool("helm"), "install", "t", str(CHART), *args, "--dry-run=client"])
    assert done.returncode == 0, done.stderr
    assert "kubectl rollout restart deployment/t-warden-agent" in done.stdout.split("NOTES:")[1]


def test_prometheus_in_its_own_namespace_may_scrape_a_gateway() -> None:
    """networkPolicy.admin admits this namespace only: a ServiceMonitor read by a Prometheus
    elsewhere would be refused unless its namespace is named."""

    def admin_peers(*args: str) -> list[dict[str, Any]]:
        (policy,) = by_kind(helm_template(*GATEWAY, *args), "NetworkPolicy")
        (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "warden-admin"]
        return list(rule["from"])

    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    assert admin_peers() == [{"podSelector": {}}]
    assert admin_peers("--set", "networkPolicy.monitoringNamespace=mon") == [
        {"podSelector": {}},
        monitoring,
    ]
    only = admin_peers(
        "--set-json", "networkPolicy.admin=[]", "--set", "networkPolicy.monitoringNamespace=mon"
    )
    assert only == [monitoring]


def test_the_sidecar_pod_mounts_no_api_token_unless_asked() -> None:
    docs = helm_template(
        "--set", "agent.image=registry.example/agent:1", "--set", "serviceAccount.create=false"
    )
    (deployment,) = by_kind(docs, "Deployment")
    assert pod_spec(deployment)["automountServiceAccountToken"] is False
