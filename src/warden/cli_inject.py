"""``warden inject``: add Warden as a native sidecar to Kubernetes manifests, without Helm.

::

    warden inject -f deployment.yaml > governed.yaml
    warden inject -f deployment.yaml --config warden.yaml --image registry.example/warden:0.1.0
    kubectl get deploy refunds-agent -o yaml | warden inject -f - --config-map my-warden-config

Like ``istioctl kube-inject``: every pod template in the input (Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job,
CronJob, and ``List`` items) gets the Warden container as its first init
container with ``restartPolicy: Always``, the volumes it mounts, and a
``terminationGracePeriodSeconds`` longer than ``shutdown_grace_s``. Other
documents pass through unchanged. The container is the one the Helm chart's
``warden.sidecar`` template renders: both start from the package data file
``warden/data/kubernetes/sidecar.yaml``.

The configuration comes from a ConfigMap: ``--config FILE`` validates the
file and adds a ConfigMap holding it; ``--config-map NAME`` alone refers to
one that exists (e.g. the chart's ``<release>-warden-config``); with neither,
a ConfigMap with Warden's defaults and a pod-reachable admin port is added.

Exit status: 0 written; 2 usage, configuration or manifest error (nothing written).
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from warden import __version__

__all__ = [
    "DEFAULT_CONFIG_MAP",
    "DEFAULT_IMAGE",
    "InjectError",
    "SidecarSettings",
    "dump",
    "inject_documents",
    "register",
    "sidecar_container",
    "sidecar_template",
    "sidecar_volumes",
]

DEFAULT_IMAGE = f"registry.example/warden:{__version__}"
DEFAULT_CONFIG_MAP = "warden-config"
CONTAINER_NAME = "warden"
# Seconds the pod's grace period exceeds shutdown_grace_s (the chart's
# shutdownGraceMarginSeconds): the final checkpoint, then the agent's own stop.
GRACE_MARGIN_S = 10
# Kubernetes' default grace period, used when a pod spec sets none.
K8S_DEFAULT_GRACE_S = 30
_VOLUMES = ("warden-config", "warden-data", "warden-tmp")
# Where each kind keeps its pod spec.
_POD_SPEC_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class InjectError(ValueError):
    """A manifest or setting ``warden inject`` cannot work with; the message says which."""


@dataclass(frozen=True)
class SidecarSettings:
    """What ``inject`` sets on the shared container spec (the chart sets the same from values)."""

    image: str = DEFAULT_IMAGE
    pull_policy: str = "IfNotPresent"
    config_map: str = DEFAULT_CONFIG_MAP
    proxy_port: int = 8080
    admin_port: int = 8081
    grpc_port: int | None = None
    shutdown_grace_s: float = 20.0
    env: tuple[Mapping[str, Any], ...] = field(default=())


def sidecar_template() -> dict[str, Any]:
    """The shipped container spec (``warden/data/kubernetes/sidecar.yaml``), as a fresh dict."""
    text = resources.files("warden").joinpath("data/kubernetes/sidecar.yaml").read_text("utf-8")
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict):  # pragma: no cover - the shipped file is a mapping
        raise InjectError("the shipped sidecar template is not a mapping")
    return spec


def sidecar_container(settings: SidecarSettings) -> dict[str, Any]:
    """The Warden init container, as the chart's ``warden.sidecar`` template renders it."""
    container = sidecar_template()
    container["image"] = settings.image
    container["imagePullPolicy"] = settings.pull_policy
    ports = {"warden-proxy": settings.proxy_port, "warden-admin": settings.admin_port}
    for port in container["ports"]:
        port["containerPort"] = ports[port["name"]]
    if settings.grpc_port is not None:
        container["ports"].append(
            {"name": "warden-grpc", "containerPort": settings.grpc_port, "protocol": "TCP"}
        )
    if settings.env:
        container["env"] = [dict(e) for e in settings.env]
    return container


def sidecar_volumes(settings: SidecarSettings) -> list[dict[str, Any]]:
    """The pod volumes the container mounts (the chart's ``warden.volumes`` without persistence)."""
    return [
        {"name": "warden-config", "configMap": {"name": settings.config_map}},
        {"name": "warden-data", "emptyDir": {}},
        {"name": "warden-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]


def grace_period(shutdown_grace_s: float) -> int:
    """The pod's ``terminationGracePeriodSeconds`` for a given ``shutdown_grace_s``."""
    return math.ceil(shutdown_grace_s) + GRACE_MARGIN_S


def _pod_specs(doc: dict[str, Any], where: str) -> Iterable[tuple[dict[str, Any], str]]:
    kind = doc.get("kind")
    if kind == "List":
        for i, item in enumerate(doc.get("items") or []):
            if isinstance(item, dict):
                yield from _pod_specs(item, f"{where} item {i}")
        return
    path = _POD_SPEC_PATHS.get(str(kind))
    if path is None:
        return
    name = (doc.get("metadata") or {}).get("name", "?")
    label = f"{where} ({kind} {name})"
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise InjectError(f"{label}: has no {'.'.join(path)} mapping")
    yield node, label


def _run_as_user(holder: Any) -> Any:
    context = holder.get("securityContext") if isinstance(holder, dict) else None
    return context.get("runAsUser") if isinstance(context, dict) else None


def _uid(value: Any) -> int | None:
    """A ``runAsUser`` as the number Kubernetes reads (``65532``, ``65532.0``, ``"65532"``).

    None when unset or not a number (the API server refuses those itself).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return None


def _refuse_wardens_user(spec: dict[str, Any], containers: list[Any], label: str) -> None:
    """Refuse a pod whose agent would run as Warden's user (the chart's ``agent.runAsUser`` check).

    Transparent mode's redirect rules exempt that user's traffic by owner, so an
    agent running as it would pass as Warden and go around it. A container's own
    ``runAsUser`` wins over the pod's: the pod's counts only for a container without one.
    """
    uid = _uid(_run_as_user(sidecar_template()))
    how = f"is {uid}, Warden's own user, which transparent mode exempts: run the agent as another"
    unset = []
    for container in containers:
        own = _run_as_user(container)
        if own is None:
            unset.append(container)
        elif _uid(own) == uid:
            name = container.get("name", "?") if isinstance(container, dict) else "?"
            raise InjectError(
                f"{label}: container {name!r}: securityContext.runAsUser {how} user (e.g. 65533)"
            )
    if unset and _uid(_run_as_user(spec)) == uid:
        names = ", ".join(repr(c.get("name", "?") if isinstance(c, dict) else "?") for c in unset)
        raise InjectError(
            f"{label}: securityContext.runAsUser {how} user (e.g. 65533), or set one on "
            f"each container that sets none ({names})"
        )


def _inject_pod(spec: dict[str, Any], settings: SidecarSettings, label: str) -> None:
    init = spec.get("initContainers") or []
    containers = spec.get("containers") or []
    if not isinstance(init, list) or not isinstance(containers, list):
        raise InjectError(f"{label}: containers and initContainers must be lists")
    names = {c.get("name") for c in [*init, *containers] if isinstance(c, dict)}
    if CONTAINER_NAME in names:
        raise InjectError(f"{label}: already has a container named {CONTAINER_NAME!r}")
    _refuse_wardens_user(spec, [*init, *containers], label)
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise InjectError(f"{label}: volumes must be a list")
    taken = {str(v.get("name")) for v in volumes if isinstance(v, dict)} & set(_VOLUMES)
    if taken:
        raise InjectError(f"{label}: already has a volume named {sorted(taken)[0]!r}")
    # First, so that later init containers and the agent go through a ready Warden.
    spec["initContainers"] = [sidecar_container(settings), *init]
    spec["volumes"] = [*volumes, *sidecar_volumes(settings)]
    current = spec.get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_S)
    if not isinstance(current, int):
        raise InjectError(f"{label}: terminationGracePeriodSeconds must be an integer")
    spec["terminationGracePeriodSeconds"] = max(current, grace_period(settings.shutdown_grace_s))


def inject_documents(docs: Iterable[Any], settings: SidecarSettings) -> tuple[list[Any], int]:
    """Documents with the sidecar added to every pod template, and how many were changed.

    The input is not modified. Raise :class:`InjectError` naming the document.
    """
    out: list[Any] = []
    count = 0
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InjectError(f"document {i + 1}: not a Kubernetes object (a mapping)")
        changed = copy.deepcopy(doc)
        for spec, label in _pod_specs(changed, f"document {i + 1}"):
            _inject_pod(spec, settings, label)
            count += 1
        out.append(changed)
    return out, count


def config_map(name: str, text: str, namespace: str | None) -> dict[str, Any]:
    """The ConfigMap holding ``warden.yaml``."""
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/name": "warden", "app.kubernetes.io/part-of": "warden"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {"warden.yaml": text},
    }


def _listen_port(value: str, key: str, *, reachable: bool) -> int:
    from warden.config import parse_listen

    host, port = parse_listen(value)
    if port == 0:
        raise InjectError(f"listen.{key}: port 0 cannot be probed or scraped; name a port")
    if reachable and host in ("127.0.0.1", "localhost", "::1"):
        raise InjectError(
            f"listen.{key} is {value}: the kubelet's probes (and Prometheus) cannot reach "
            f"a loopback address; use 0.0.0.0:{port}"
        )
    return port


_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACKS_V6 = (
    ipaddress.IPv6Network("::1/128"),
    ipaddress.IPv6Network("::ffff:127.0.0.0/104"),  # 127.0.0.0/8, IPv4-mapped
)


def _takes_in_loopback(entry: str) -> bool:
    """Whether a ``trusted_proxies`` entry (an address or network) overlaps the loopback."""
    try:
        network = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return False  # matches no peer (console.sso skips it too)
    if isinstance(network, ipaddress.IPv4Network):
        return network.overlaps(_LOOPBACK_V4)
    return any(network.overlaps(loopback) for loopback in _LOOPBACKS_V6)


def _refuse_loopback_sso(proxies: Iterable[str]) -> None:
    """A sidecar shares the pod's loopback with the agent: trusted there, the agent could
    send the sign-on headers itself and act in the console (the chart's check too)."""
    for entry in proxies:
        if _takes_in_loopback(entry):
            raise InjectError(
                f"console.sso.trusted_proxies: {entry} takes in the pod's loopback "
                "(127.0.0.0/8, ::1), which the agent shares with the sidecar: it could send "
                "the sign-on headers itself and act in the console (clear its own kill "
                "switch); name only the auth proxy's own address, outside the agent's pod"
            )


def settings_from_config(path: str, base: SidecarSettings) -> tuple[SidecarSettings, str]:
    """Validate a ``warden.yaml`` and take its ports and grace period; return it as text too."""
    from warden.config import load_config
    from warden.errors import ConfigError

    try:
        config = load_config(path, environ={})
        text = Path(path).read_text(encoding="utf-8")
    except (ConfigError, OSError) as exc:
        raise InjectError(str(exc)) from exc
    if config.console.sso is not None:
        _refuse_loopback_sso(config.console.sso.trusted_proxies)
    proxy = _listen_port(config.listen.proxy, "proxy", reachable=False)
    admin = _listen_port(config.listen.admin, "admin", reachable=True)
    grpc = config.listen.grpc
    grpc_port = None if grpc is None else _listen_port(grpc, "grpc", reachable=False)
    settings = SidecarSettings(
        image=base.image,
        pull_policy=base.pull_policy,
        config_map=base.config_map,
        proxy_port=proxy,
        admin_port=admin,
        grpc_port=grpc_port,
        shutdown_grace_s=config.shutdown_grace_s,
        env=base.env,
    )
    return settings, text


def default_config_text(settings: SidecarSettings) -> str:
    """The ``warden.yaml`` used without ``--config``: defaults, admin port reachable in the pod."""
    listen = {
        "proxy": f"127.0.0.1:{settings.proxy_port}",
        "admin": f"0.0.0.0:{settings.admin_port}",
    }
    return yaml.safe_dump({"listen": listen}, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (an embedded warden.yaml) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: Iterable[Any]) -> str:
    """Documents as multi-document YAML, keys in their order."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``inject`` to the main CLI."""
    parser = subparsers.add_parser(
        "inject", help="add Warden as a native sidecar to Kubernetes manifests (no Helm needed)"
    )
    parser.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    parser.add_argument("--config", help="warden.yaml to validate and ship in a ConfigMap")
    parser.add_argument(
        "--config-map",
        help=f"ConfigMap holding warden.yaml (default {DEFAULT_CONFIG_MAP}); "
        "without --config it must exist already",
    )
    parser.add_argument("--namespace", help="namespace of the ConfigMap that is added")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    parser.add_argument(
        "--pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"]
    )
    parser.set_defaults(func=_inject)


def _read(filename: str) -> list[Any]:
    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text(encoding="utf-8")
    except OSError as exc:
        raise InjectError(f"cannot read {filename}: {exc.strerror}") from exc
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InjectError(f"{filename}: not valid YAML: {exc}") from exc


def _inject(args: argparse.Namespace) -> int:
    base = SidecarSettings(
        image=args.image,
        pull_policy=args.pull_policy,
        config_map=args.config_map or DEFAULT_CONFIG_MAP,
    )
    try:
        docs = _read(args.filename)
        if args.config:
            settings, text = settings_from_config(args.config, base)
            extra = [config_map(settings.config_map, text, args.namespace)]
        elif args.config_map:
            settings, extra = base, []
        else:
            settings = base
            extra = [config_map(settings.config_map, default_config_text(base), args.namespace)]
        out, count = inject_documents(docs, settings)
        if count == 0:
            raise InjectError(f"{args.filename}: no pod template found (Pod, Deployment, ...)")
    except InjectError as exc:
        print(f"warden inject: {exc}", file=sys.stderr)
        return 2
    rendered = dump([*extra, *out])
    if args.output:
        Path(args.output).write_text(rendered, encoding="utf-8")
    else:
        sys.stdout.write(rendered)
    print(f"warden inject: added the sidecar to {count} pod template(s)", file=sys.stderr)
    return 0
