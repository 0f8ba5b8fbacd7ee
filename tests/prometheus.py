"""Prometheus's own tools for the tests: ``promtool`` and a real ``prometheus`` server.

Both come from Debian's ``prometheus`` package, which ``make test-tools``
installs when it can; without it the tests that need them skip and say why.
The alerting rules are used as shipped (``helm/warden/files/alerts.yaml``);
the end-to-end test runs a variant that differs only in its durations.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "helm" / "warden" / "files" / "alerts.yaml"
ALERTS_TEST = ROOT / "tests" / "data" / "alerts_test.yaml"
DASHBOARD = ROOT / "helm" / "warden" / "files" / "dashboard.json"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

MISSING = (
    "Debian's prometheus package is not installed (make test-tools, or apt-get install prometheus)"
)

_DURATION = re.compile(r"(?<=\[)(\d+[smhd])(?=\])")
# The same window in seconds, where a rule compares a series' creation time with it.
_CREATED_WITHIN = re.compile(r"(?<=_created < )\d+\b")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def tool(name: str) -> str | None:
    """The path of ``promtool`` or ``prometheus``, or ``None`` when not installed."""
    return shutil.which(name)


def load_rules(path: Path = ALERTS) -> dict[str, Any]:
    """The rule file as data."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def alerting_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule of every group."""
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def fast_variant(rules: dict[str, Any], *, window: str, hold: str) -> dict[str, Any]:
    """The same rules with only durations changed: every range selector (and the
    seconds a creation time is compared with) and ``for:``.

    For an end-to-end test that cannot wait ten minutes: thresholds,
    expressions and labels stay exactly as shipped.
    """
    groups = []
    for group in rules["groups"]:
        out = []
        for shipped in group["rules"]:
            rule = dict(shipped)
            rule["expr"] = _DURATION.sub(window, rule["expr"])
            seconds = int(window[:-1]) * _SECONDS[window[-1]]
            rule["expr"] = _CREATED_WITHIN.sub(str(seconds), rule["expr"])
            if "for" in rule:
                rule["for"] = hold
            out.append(rule)
        groups.append({**group, "rules": out})
    return {**rules, "groups": groups}


def free_port() -> int:
    """A free loopback port (Prometheus cannot report the port it bound to)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PrometheusServer:
    """A ``prometheus`` process on loopback, with its data in a temporary folder."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        """Terminate it and wait."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_prometheus(
    binary: str, folder: Path, *, target: str, rules: dict[str, Any], interval: str = "1s"
) -> PrometheusServer:
    """Start Prometheus scraping ``target`` (``host:port`` of Warden's admin listener)."""
    rule_file = folder / "rules.yaml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {"job_name": "warden", "static_configs": [{"targets": [target]}]},
        ],
    }
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return PrometheusServer(proc, f"http://127.0.0.1:{port}", log)
