"""Values the configuration refuses at start, naming the key, that would fail at run time.

Infinite and huge times, unreadable files and YAML, malformed URLs: each is a
:class:`ConfigError` (one line from the CLI), never a traceback, and never
quotes what may be a secret.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from warden.config import MAX_ITEMS, MAX_LIFETIME_S, MAX_OPERATION_S, load_config
from warden.config_shown import shown_config
from warden.errors import ConfigError
from warden.monitor.live import LiveMonitor


def refused(overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides=overrides)
    return str(caught.value)


def write(tmp_path: Path, data: bytes | str) -> Path:
    path = tmp_path / "warden.yaml"
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


# -- infinite, not-a-number and huge numbers ------------------------------------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
def test_infinity_and_nan_are_refused_from_the_file(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"approvals: {{mode: defer, defer_ttl_s: {value}}}\n")
    with pytest.raises(ConfigError, match=r"approvals\.defer_ttl_s: Input should be a finite"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("budgets", {"llm": {"limit_usd": float("inf")}}),
        ("budgets", {"caps": [{"name": "r", "tool": "t", "value": "v", "limit": float("inf")}]}),
        ("policy", {"deadline_ms": float("nan")}),
        ("limits", {"idle_timeout_s": float("inf")}),
        ("ext_proc", {"max_message_timeout_s": float("nan")}),
    ],
)
def test_no_setting_takes_infinity_or_nan(section: str, key: dict[str, Any]) -> None:
    assert "Input should be a finite number" in refused({section: key})


def test_infinity_from_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"keep_decided_s: .*finite.*WARDEN_APPROVALS__KEEP"):
        load_config(environ={"WARDEN_APPROVALS__KEEP_DECIDED_S": ".inf"})


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("defer_ttl_s", 1e17, "ten years, in seconds"),
        ("keep_decided_s", MAX_LIFETIME_S + 1, "ten years, in seconds"),
        ("hold_timeout_s", 1e12, "ten years, in seconds"),
        ("keepalive_s", MAX_OPERATION_S * 2, "a day, in seconds"),
    ],
)
def test_times_past_their_bound_name_the_key_and_the_bound(
    key: str, value: float, bound: str
) -> None:
    said = refused({"approvals": {key: value}})
    assert f"approvals.{key}: Input should be less than or equal to" in said
    assert bound in said


def test_times_at_their_bound_are_taken_and_printable() -> None:
    config = load_config(
        environ={},
        overrides={
            "approvals": {"defer_ttl_s": MAX_LIFETIME_S, "keepalive_s": MAX_OPERATION_S},
            "policy": {"deadline_ms": MAX_OPERATION_S * 1000},
            "ext_proc": {"extend_after_ms": int(MAX_OPERATION_S * 1000)},
        },
    )
    assert config.approvals.defer_ttl_s == MAX_LIFETIME_S
    json.dumps(shown_config(config), allow_nan=False)  # what `warden config` prints


@pytest.mark.parametrize(
    "overrides",
    [
        {"policy": {"deadline_ms": 1e12}},
        {"ext_proc": {"extend_after_ms": 10**12}},
        {"sessions": {"ttl_s": 1e17}},
        {"budgets": {"reservation_ttl_s": 1e17}},
        {"upstreams": {"x": {"protocol": "openai", "base_url": "https://x", "timeout_s": 1e9}}},
        {"shutdown_grace_s": 1e9},
    ],
)
def test_every_time_has_an_upper_bound(overrides: dict[str, Any]) -> None:
    assert "less than or equal to" in refused(overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"monitor": {"max_events": 2**63}}, "monitor.max_events"),
        ({"policy": {"cache_size": 2**63}}, "policy.cache_size"),
        ({"sessions": {"max_messages": 2**63}}, "sessions.max_messages"),
        ({"sessions": {"max_result_chars": 2**63}}, "sessions.max_result_chars"),
        ({"audit": {"subjects": {"max_keys": 2**63}}}, "audit.subjects.max_keys"),
        ({"approvals": {"max_pending_per_agent": 2**63}}, "approvals.max_pending_per_agent"),
        ({"limits": {"max_body_bytes": 2**63}}, "limits.max_body_bytes"),
        ({"limits": {"max_connections": 2**63}}, "limits.max_connections"),
        ({"grpc": {"max_message_bytes": 2**31}}, "grpc.max_message_bytes"),
    ],
)
def test_every_count_that_sizes_memory_has_an_upper_bound(
    overrides: dict[str, Any], key: str
) -> None:
    assert f"{key}: Input should be less than or equal to" in refused(overrides)


def test_the_monitor_starts_with_max_events_at_its_bound(tmp_path: Path) -> None:
    # 2**63 passed the config and `warden serve` died making its windows (OverflowError).
    config = load_config(environ={}, overrides={"monitor": {"max_events": MAX_ITEMS}})
    LiveMonitor(config.monitor, tmp_path)


@pytest.mark.parametrize("window", ["0d", "99999999999999w", "522w", "3651d"])
def test_monitor_windows_are_bounded(window: str) -> None:
    assert "monitor.current: Value error, must be longer than 0 and at most ten years" in (
        refused({"monitor": {"current": window}})
    )


# -- migrate: off, unquoted ----------------------------------------------------------------


def test_an_unquoted_migrate_off_means_off(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "state: {migrate: off}\n"
        "audit: {ship: {url: 'postgresql://warden_audit@db/warden', migrate: off}}\n",
    )
    config = load_config(path, environ={})
    assert config.state.migrate == "off"
    assert config.audit.ship is not None
    assert config.audit.ship.migrate == "off"


def test_migrate_true_is_still_refused() -> None:
    assert "state.migrate: Input should be 'auto' or 'off'" in refused({"state": {"migrate": True}})


# -- files and YAML that cannot be read ----------------------------------------------------


@pytest.mark.parametrize("data", [b"mode: \xff\xfe observe\n", "mode: observe\n".encode("utf-16")])
def test_a_file_that_is_not_utf8_is_one_config_error(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"warden\.yaml: not UTF-8 text \(byte \d+"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "text",
    ["x: " + "[" * 20_000 + "]" * 20_000 + "\n", "x: " + "{a: " * 20_000 + "1" + "}" * 20_000],
)
def test_yaml_nested_past_the_stack_is_one_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="not valid YAML: lists or mappings nest too deeply"):
        load_config(write(tmp_path, text), environ={})


def test_yaml_nested_deep_but_parseable_is_refused(tmp_path: Path) -> None:
    text = "tools: " + "[" * 300 + "]" * 300 + "\n"
    with pytest.raises(ConfigError, match="nest more than 100 deep"):
        load_config(write(tmp_path, text), environ={})


def test_an_integer_past_python_limit_is_one_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "limits: {max_connections: " + "7" * 5000 + "}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).endswith("not valid YAML: an integer has more than 4300 digits")
    assert "7777" not in str(caught.value)


def test_an_integer_past_python_limit_in_the_environment_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="WARDEN_LIMITS__MAX_CONNECTIONS: not a valid value"):
        load_config(environ={"WARDEN_LIMITS__MAX_CONNECTIONS": "7" * 5000})


def test_a_date_that_does_not_exist_is_one_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "agent: {version: 2026-02-31}\n")
    with pytest.raises(ConfigError, match="a value cannot be read \\(day is out of range"):
        load_config(path, environ={})


# -- URLs and folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"state": {"url": "postgresql://ops:S3CRETPW@[::1/db"}}, "state.url"),
        ({"state": {"url": "postgresql://ops:S3CRETPW@h:99999/db"}}, "state.url"),
        ({"state": {"url": "postgresql://ops:S3CRETPW/db"}}, "state.url"),  # "port" S3CRETPW
        ({"state": {"url": "postgresql://ops:S3CRETPW\uff03@h/db"}}, "state.url"),
        (
            {"approvals": {"webhook": {"url": "https://ops:S3CRETPW\uff03@h/hook"}}},
            "approvals.webhook.url",
        ),
        (
            {"audit": {"ship": {"url": "postgresql://ops:S3CRETPW@[::1/db"}}},
            "audit.ship.url",
        ),
        ({"policy": {"bundle_url": "https://u:S3CRETPW@[::1/b.tar.gz"}}, "policy.bundle_url"),
    ],
)
def test_a_malformed_url_names_the_key_not_the_password(
    overrides: dict[str, Any], key: str
) -> None:
    said = refused(overrides)
    assert f"{key}: Value error, is not a valid URL" in said
    assert "S3CRETPW" not in said


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ops@pg-a:5432,pg-b:5432/warden?target_session_attrs=read-write",
        "postgresql://ops@pg-a,pg-b/warden",
        "postgresql://ops@[fd00::1]:5432,[fd00::2]:5433/warden",
    ],
)
def test_a_multi_host_postgresql_url_is_taken(url: str) -> None:
    """libpq tries each host in turn (failover): ``pg-a:5432,pg-b:5432`` is no port to
    urllib, and was refused as one that is not a number."""
    config = load_config(
        environ={}, overrides={"state": {"url": url}, "audit": {"ship": {"url": url}}}
    )
    assert config.state.url == url
    assert config.audit.ship is not None
    assert config.audit.ship.url == url


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("postgresql://ops:S3CRETPW@pg-a:5432,pg-b:S3CRETPW/db", "its port is not a number"),
        ("postgresql://ops:S3CRETPW@pg-a:5432,pg-b:65536/db", "its port is not a number"),
        ("postgresql://ops:S3CRETPW@h/db?port=5432,S3CRETPW", "its port is not a number"),
    ],
)
def test_a_bad_port_among_several_names_the_key_not_the_url(url: str, fault: str) -> None:
    for key, overrides in (
        ("state.url", {"state": {"url": url}}),
        ("audit.ship.url", {"audit": {"ship": {"url": url}}}),
    ):
        said = refused(overrides)
        assert f"{key}: Value error, is not a valid URL: {fault}" in said
        assert "S3CRETPW" not in said


@pytest.mark.parametrize(
    "url", ["/local/file", "file:///srv/bundle.tar.gz", "ftp://host/b.tar.gz", "https:///b"]
)
def test_the_bundle_server_is_http_or_https(url: str) -> None:
    assert "policy.bundle_url: Value error, must be an http:// or https:// URL" in refused(
        {"policy": {"bundle_url": url}}
    )


def test_an_empty_audit_dir_is_refused() -> None:
    assert "audit.dir: String should have at least 1 character" in refused({"audit": {"dir": ""}})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://warden:P@ssw0rd-tail@127.0.0.1:5432/warden",
        "postgresql://warden:2024/Winter!@127.0.0.1:5432/warden",
        "postgresql://warden:Pa?ss@TAILX@127.0.0.1:5432/warden",  # urllib stops at '?'
        "postgresql://warden:Pa?ss/Winter@127.0.0.1:5432/warden",
        "postgresql://warden:Pa/ss?Winter@127.0.0.1:5432/warden",  # a "port" of letters
    ],
)
def test_a_password_libpq_would_read_as_the_host_is_refused_unshown(url: str) -> None:
    # libpq ends the user part at the first '@', and '/' ends the authority: the rest
    # of the password became the host, named in connection errors and the shown config.
    with pytest.raises(ConfigError) as refused:
        load_config(environ={}, overrides={"state": {"url": url}})
    assert "percent-encode" in str(refused.value)
    for part in ("ssw0rd", "Winter", "TAILX", "Pa?ss"):
        assert part not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://warden:p%40ss%2Fw@127.0.0.1:5432/warden?sslrootcert=/etc/a@b.crt",
        "postgresql://warden@[::1]:5432/warden",
        "postgresql://warden@pg-a:5432,pg-b:5432/warden?target_session_attrs=read-write",
        "postgresql:///warden?host=/var/run/postgresql",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/warden",
        "postgresql://[::1]:5432/warden",
    ],
)
def test_urls_libpq_reads_as_written_are_accepted(url: str) -> None:
    assert load_config(environ={}, overrides={"state": {"url": url}}).state.url == url
