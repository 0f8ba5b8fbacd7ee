"""``warden inject`` adds the same sidecar the Helm chart renders, and refuses what it cannot do."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.kube_tools import (
    assert_valid,
    by_kind,
    documents,
    helm_template,
    pod_spec,
    warden_container,
)
from warden import cli
from warden.cli_inject import (
    DEFAULT_IMAGE,
    InjectError,
    SidecarSettings,
    inject_documents,
    sidecar_container,
    sidecar_template,
)
from warden.config import load_config

SAMPLE = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: refunds-agent, namespace: support}
spec:
  selector: {matchLabels: {app: refunds-agent}}
  template:
    metadata: {labels: {app: refunds-agent}}
    spec:
      initContainers:
        - {name: migrate, image: registry.example/refunds-agent:1.0, command: [migrate]}
      containers:
        - name: agent
          image: registry.example/refunds-agent:1.0
          env:
            - {name: OPENAI_BASE_URL, value: "http://127.0.0.1:8080/openai/v1"}
      volumes:
        - {name: cache, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: refunds-agent}
spec:
  selector: {app: refunds-agent}
  ports: [{port: 80}]
"""


def inject(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    source = tmp_path / "deployment.yaml"
    source.write_text(SAMPLE)
    assert cli.main(["inject", "-f", str(source), *args]) == 0
    captured = capsys.readouterr()
    assert "warden inject: added the sidecar to 1 pod template(s)" in captured.err
    return documents(captured.out)


def test_inject_gives_the_charts_container_probes_and_security_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = "registry.example/warden:0.1.0"
    chart = helm_template(
        "--set", "agent.image=registry.example/agent:1", "--set", "image.tag=0.1.0"
    )
    (chart_deployment,) = by_kind(chart, "Deployment")
    from_chart = warden_container(pod_spec(chart_deployment))

    docs = inject(tmp_path, capsys, "--image", image, "--config-map", "t-warden-config")
    (deployment,) = by_kind(docs, "Deployment")
    from_inject = warden_container(pod_spec(deployment))

    assert from_inject == from_chart
    # ...and, spelled out, what both must be:
    assert from_inject["restartPolicy"] == "Always"
    assert from_inject["image"] == image
    assert from_inject["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert from_inject["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert from_inject["securityContext"]["readOnlyRootFilesystem"] is True
    assert from_inject["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert from_inject["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The pod volumes the container mounts are the chart's too.
    chart_volumes = {v["name"]: v for v in pod_spec(chart_deployment)["volumes"]}
    injected = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    for mount in from_inject["volumeMounts"]:
        assert injected[mount["name"]] == chart_volumes[mount["name"]]
    assert not by_kind(docs, "ConfigMap")  # --config-map alone: it exists already


def test_injected_pod_keeps_the_agent_and_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = inject(tmp_path, capsys)
    assert assert_valid(docs) == {"ConfigMap", "Deployment", "Service"}
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    assert [c["name"] for c in spec["initContainers"]] == ["warden", "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    assert [v["name"] for v in spec["volumes"]] == [
        "cache",
        "warden-config",
        "warden-data",
        "warden-tmp",
    ]
    assert spec["terminationGracePeriodSeconds"] == 30  # > shutdown_grace_s (20)
    assert warden_container(spec)["image"] == DEFAULT_IMAGE
    (service,) = by_kind(docs, "Service")
    assert service == list(yaml.safe_load_all(SAMPLE))[1]


def test_without_config_the_added_config_map_keeps_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = inject(tmp_path, capsys, "--namespace", "support")
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"] == {
        "name": "warden-config",
        "namespace": "support",
        "labels": {"app.kubernetes.io/name": "warden", "app.kubernetes.io/part-of": "warden"},
    }
    path = tmp_path / "warden.yaml"
    path.write_text(cm["data"]["warden.yaml"])
    config = load_config(path, environ={})
    assert config.listen.admin == "0.0.0.0:8081"
    assert config.listen.proxy == "127.0.0.1:8080"


def test_config_file_sets_ports_and_grace_period(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "warden.yaml"
    config.write_text(
        "agent: {id: refunds-agent}\n"
        "listen: {proxy: 127.0.0.1:9080, admin: 0.0.0.0:9081, grpc: 0.0.0.0:9090}\n"
        "shutdown_grace_s: 50.5\n"
    )
    docs = inject(tmp_path, capsys, "--config", str(config), "--config-map", "refunds-warden")
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["name"] == "refunds-warden"
    assert cm["data"]["warden.yaml"] == config.read_text()
    (deployment,) = by_kind(docs, "Deployment")
    spec = pod_spec(deployment)
    warden = warden_container(spec)
    ports = {p["name"]: p["containerPort"] for p in warden["ports"]}
    assert ports == {"warden-proxy": 9080, "warden-admin": 9081, "warden-grpc": 9090}
    assert spec["terminationGracePeriodSeconds"] == 61
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["warden-config"]["configMap"]["name"] == "refunds-warden"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("listen: {admin: 127.0.0.1:8081}\n", "cannot reach a loopback address"),
        ("listen: {admin: 0.0.0.0:0}\n", "port 0"),
        ("mode: sometimes\n", "mode"),
    ],
)
def test_a_config_the_pod_cannot_use_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    (tmp_path / "warden.yaml").write_text(config)
    (tmp_path / "deployment.yaml").write_text(SAMPLE)
    args = [
        "inject",
        "-f",
        str(tmp_path / "deployment.yaml"),
        "--config",
        str(tmp_path / "warden.yaml"),
    ]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (SAMPLE.replace("name: migrate", "name: warden"), "already has a container named 'warden'"),
        (SAMPLE.replace("name: cache", "name: warden-data"), "already has a volume named"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n", "no pod template found"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: {}\n", "has no spec.template.spec"),
        ("- just\n- a list\n", "not a Kubernetes object"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_manifest_it_cannot_inject_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: str, message: str
) -> None:
    out = tmp_path / "out.yaml"
    (tmp_path / "in.yaml").write_text(manifest)
    assert cli.main(["inject", "-f", str(tmp_path / "in.yaml"), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


WARDENS_USER = sidecar_template()["securityContext"]["runAsUser"]


@pytest.mark.parametrize(
    ("manifest", "where"),
    [
        # Distroless and Chainguard "nonroot" images run as 65532 too.
        (
            SAMPLE.replace(
                "      initContainers:",
                "      securityContext: {runAsUser: 65532}\n      initContainers:",
            ),
            "): securityContext.runAsUser",
        ),
        (
            SAMPLE.replace(
                "          image: registry.example/refunds-agent:1.0\n          env:",
                "          image: registry.example/refunds-agent:1.0\n"
                "          securityContext: {runAsUser: 65532}\n          env:",
            ),
            "container 'agent'",
        ),
        (
            SAMPLE.replace(
                "command: [migrate]}", "command: [migrate], securityContext: {runAsUser: 65532}}"
            ),
            "container 'migrate'",
        ),
    ],
    ids=["pod", "agent", "init-container"],
)
def test_an_agent_running_as_wardens_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: str, where: str
) -> None:
    """Transparent mode exempts Warden's user (``! --uid-owner 65532``): an agent running
    as it would go around Warden. The chart refuses ``agent.runAsUser=65532`` the same way."""
    assert WARDENS_USER == 65532
    (tmp_path / "in.yaml").write_text(manifest)
    out = tmp_path / "out.yaml"
    assert cli.main(["inject", "-f", str(tmp_path / "in.yaml"), "-o", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert where in line
    assert "65532, Warden's own user" in line
    assert not out.exists()
    # Another user, set on the pod or the container, is fine.
    other = manifest.replace("runAsUser: 65532", "runAsUser: 65533")
    (tmp_path / "in.yaml").write_text(other)
    assert cli.main(["inject", "-f", str(tmp_path / "in.yaml"), "-o", str(out)]) == 0


def pod(pod_context: str, *container_contexts: str) -> dict[str, Any]:
    """A Pod with a container per context (``""``: none set), first an init container."""
    containers = [
        {"name": f"c{i}", "image": "a", **yaml.safe_load(f"{{{context}}}")}
        for i, context in enumerate(container_contexts)
    ]
    spec: dict[str, Any] = {"initContainers": containers[:1], "containers": containers[1:]}
    spec.update(yaml.safe_load(f"{{{pod_context}}}"))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


@pytest.mark.parametrize("user", ["65532.0", '"65532"', "0xFFFC", "6.5532e4", '"65532.0"'])
def test_wardens_user_is_refused_however_it_is_written(user: str) -> None:
    """Kubernetes reads ``65532.0`` as 65532: it is Warden's user all the same."""
    ctx = f"securityContext: {{runAsUser: {user}}}"
    with pytest.raises(InjectError, match="container 'c1': securityContext.runAsUser is 65532"):
        inject_documents([pod("", "", ctx)], SidecarSettings())
    with pytest.raises(InjectError, match=r"\(Pod p\): securityContext.runAsUser is 65532"):
        inject_documents([pod(ctx, "", "")], SidecarSettings())


def test_the_pods_user_counts_only_for_containers_that_set_none() -> None:
    """A container's own ``runAsUser`` wins over the pod's."""
    mine = "securityContext: {runAsUser: 1000}"
    wardens = "securityContext: {runAsUser: 65532}"
    _, count = inject_documents([pod(wardens, mine, mine)], SidecarSettings())
    assert count == 1
    # One container (here the init container) without its own runs as the pod's user.
    with pytest.raises(InjectError, match=r"set one on each container that sets none \('c0'\)"):
        inject_documents([pod(wardens, "", mine)], SidecarSettings())
    with pytest.raises(InjectError, match=r"\('c1'\)"):
        inject_documents(
            [pod(wardens, mine, "securityContext: {runAsNonRoot: true}")], SidecarSettings()
        )


@pytest.mark.parametrize(
    "proxy",
    [
        "127.0.0.1",
        "127.9.9.9/32",
        "127.0.0.0/8",
        "0.0.0.0/0",
        "64.0.0.0/2",
        "::1",
        "0::1",
        "0:0:0:0:0:0:0:1",
        "::0:1",
        "::0.0.0.1",
        "::/0",
        "0::/0",
        "::/127",
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "::ffff:0:0/96",
    ],
)
def test_a_sidecars_sso_never_trusts_the_pods_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], proxy: str
) -> None:
    """The agent shares the sidecar's loopback: trusted there, it could send the sign-on
    headers itself and clear its own kill switch in the console (the chart refuses it too)."""
    (tmp_path / "warden.yaml").write_text(
        yaml.safe_dump({"console": {"sso": {"trusted_proxies": ["10.0.0.5", proxy]}}})
    )
    (tmp_path / "deployment.yaml").write_text(SAMPLE)
    out = tmp_path / "out.yaml"
    args = ["-f", str(tmp_path / "deployment.yaml"), "--config", str(tmp_path / "warden.yaml")]
    assert cli.main(["inject", *args, "-o", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"console.sso.trusted_proxies: {proxy} takes in the pod's loopback" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "proxy", ["10.0.0.5", "10.20.0.0/16", "128.0.0.0/1", "126.0.0.0/8", "fd00::5", "2001:db8::/32"]
)
def test_a_sidecars_sso_may_trust_an_auth_proxy_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], proxy: str
) -> None:
    (tmp_path / "warden.yaml").write_text(
        yaml.safe_dump(
            {
                "listen": {"admin": "0.0.0.0:8081"},
                "console": {"sso": {"trusted_proxies": [proxy]}},
            }
        )
    )
    docs = inject(tmp_path, capsys, "--config", str(tmp_path / "warden.yaml"))
    (config_map,) = by_kind(docs, "ConfigMap")
    assert proxy in config_map["data"]["warden.yaml"]


def test_every_pod_carrying_kind_is_injected_and_the_input_is_left_alone() -> None:
    pod_spec_doc = {"containers": [{"name": "agent", "image": "a"}]}
    docs: list[Any] = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": copy.deepcopy(pod_spec_doc),
        },
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "c"},
            "spec": {
                "schedule": "* * * * *",
                "jobTemplate": {"spec": {"template": {"spec": copy.deepcopy(pod_spec_doc)}}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "metadata": {"name": "s"},
                    "spec": {
                        "serviceName": "s",
                        "selector": {"matchLabels": {"a": "b"}},
                        "template": {
                            "metadata": {"labels": {"a": "b"}},
                            "spec": copy.deepcopy(pod_spec_doc)
                            | {"terminationGracePeriodSeconds": 300},
                        },
                    },
                }
            ],
        },
    ]
    before = copy.deepcopy(docs)
    out, count = inject_documents(docs, SidecarSettings())
    assert count == 3
    assert docs == before
    specs = [
        out[0]["spec"],
        out[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        out[2]["items"][0]["spec"]["template"]["spec"],
    ]
    for spec in specs:
        assert spec["initContainers"][0] == sidecar_container(SidecarSettings())
    assert specs[2]["terminationGracePeriodSeconds"] == 300  # a longer one is kept
    assert_valid([out[0], out[1], out[2]["items"][0]])


def test_the_container_is_the_shipped_template_with_the_settings_applied() -> None:
    template = sidecar_template()
    settings = SidecarSettings(
        image="i:1", pull_policy="Always", env=({"name": "A", "value": "b"},)
    )
    container = sidecar_container(settings)
    assert {
        k: v for k, v in container.items() if k not in ("image", "imagePullPolicy", "env")
    } == template
    assert (container["image"], container["imagePullPolicy"]) == ("i:1", "Always")
    assert container["env"] == [{"name": "A", "value": "b"}]
    with pytest.raises(InjectError, match="initContainers must be lists"):
        inject_documents(
            [{"kind": "Pod", "metadata": {"name": "p"}, "spec": {"initContainers": "x"}}], settings
        )
