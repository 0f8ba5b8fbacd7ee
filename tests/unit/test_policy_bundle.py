"""Loading, checking and merging policy bundles."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import orjson
import pytest

from warden.policy.bundle import (
    Bundle,
    BundleError,
    Module,
    load_bundle,
    load_bundles,
    merge_bundles,
    read_tarball,
    roots_overlap,
)
from warden.policy.bundle.compile import compile_check
from warden.policy.bundle.signatures import file_digest
from warden.policy.worker import Evaluator

POLICY = """package warden

import rego.v1

default decision := {"effect": "deny", "reason": "not listed"}

decision := {"effect": "allow", "reason": "read only"} if {
\tinput.action.tool in data.warden.tools.read_only
}
"""


def write_bundle(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def tarball(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            body = text.encode() if isinstance(text, str) else text
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.fixture
def support(tmp_path: Path) -> Path:
    return write_bundle(
        tmp_path / "support",
        {
            "warden/decision.rego": POLICY,
            "warden/tools/data.json": json.dumps({"read_only": ["lookup_order"]}),
            "warden/limits/data.yaml": "refund:\n  auto: 50\n",
            ".manifest": json.dumps({"revision": "2025.1", "roots": ["warden"]}),
            "README.md": "not part of the policy",
            "tests/table.yaml": "- not: data\n",
        },
    )


def test_directory_bundle_places_data_at_its_folder(support: Path) -> None:
    bundle = load_bundle(support)
    assert bundle.revision == "2025.1"
    assert bundle.roots == ("warden",)
    assert [m.path for m in bundle.modules] == ["warden/decision.rego"]
    assert bundle.data == {
        "warden": {"tools": {"read_only": ["lookup_order"]}, "limits": {"refund": {"auto": 50}}}
    }
    assert bundle.name == "support"
    assert bundle.modules[0].package == "warden"
    compile_check(bundle.modules, bundle.data, "data.warden.decision")


def test_tarball_bundle_matches_directory(support: Path, tmp_path: Path) -> None:
    files = {
        p.relative_to(support).as_posix(): p.read_bytes() for p in support.rglob("*") if p.is_file()
    }
    archive = tmp_path / "support.tar.gz"
    archive.write_bytes(tarball({"/" + k: v for k, v in files.items()}))
    from_tar = load_bundle(archive)
    from_dir = load_bundle(support)
    assert from_tar.name == "support"
    assert from_tar.modules == from_dir.modules
    assert from_tar.data == from_dir.data
    assert from_tar.revision == from_dir.revision


def test_revision_without_manifest_is_a_content_hash(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", {"p.rego": POLICY})
    first = load_bundle(root).revision
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 12
    assert load_bundle(root).revision == first
    (root / "p.rego").write_text(POLICY + "\n# changed\n")
    assert load_bundle(root).revision != first


def test_parse_error_names_file_and_line(tmp_path: Path) -> None:
    root = write_bundle(
        tmp_path / "b", {"authz/bad.rego": "package warden\n\nallow if {\n  input.a ==\n}\n"}
    )
    with pytest.raises(BundleError, match=r"b/authz/bad\.rego:4:\d+: Invalid boolean operator"):
        load_bundle(root)


def test_package_outside_roots_is_refused(tmp_path: Path) -> None:
    root = write_bundle(
        tmp_path / "b",
        {
            "p.rego": "# other\npackage other.thing\nx := 1\n",
            ".manifest": json.dumps({"roots": ["warden"]}),
        },
    )
    with pytest.raises(BundleError, match=r"p\.rego:2: package other\.thing is outside"):
        load_bundle(root)


@pytest.mark.parametrize(
    "source",
    [
        # rego-cpp reads the package name on the next line, not this raw string's.
        "package # where the plugin lives\nwarden\n\nnote := `\npackage plugin\n`\n",
        "\n# header\n  package\twarden.x\nallow := true\n",
        'package warden["x"]\nallow := true\n',
    ],
)
def test_the_package_is_read_as_the_engine_reads_it(tmp_path: Path, source: str) -> None:
    root = write_bundle(
        tmp_path / "b", {"p.rego": source, ".manifest": json.dumps({"roots": ["plugin"]})}
    )
    with pytest.raises(BundleError, match=r"p\.rego:\d+: package warden(/|\.)?x? is outside"):
        load_bundle(root)


def test_data_outside_roots_is_refused(tmp_path: Path) -> None:
    root = write_bundle(
        tmp_path / "b",
        {
            "warden/p.rego": "package warden.x\ny := 1\n",
            "data.json": json.dumps({"warden": {"x": {"ok": 1}}, "elsewhere": 1}),
            ".manifest": json.dumps({"roots": ["warden/x"]}),
        },
    )
    with pytest.raises(BundleError, match="data path elsewhere is outside the bundle roots"):
        load_bundle(root)


def test_invalid_data_names_file_and_line(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", {"p.rego": POLICY, "warden/data.json": '{\n  "a": ,\n}'})
    with pytest.raises(BundleError, match=r"warden/data\.json:2:\d+: invalid JSON"):
        load_bundle(root)
    root = write_bundle(tmp_path / "c", {"p.rego": POLICY, "data.yaml": "a: [1,\nb: 2\n"})
    with pytest.raises(BundleError, match=r"data\.yaml:\d+:\d+: invalid YAML"):
        load_bundle(root)


def test_data_set_twice_is_refused(tmp_path: Path) -> None:
    root = write_bundle(
        tmp_path / "b",
        {"p.rego": POLICY, "data.json": '{"warden": {"a": 1}}', "warden/data.json": '{"a": 2}'},
    )
    with pytest.raises(BundleError, match="warden/a is set twice"):
        load_bundle(root)


def test_empty_bundle_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no .rego modules"):
        load_bundle(write_bundle(tmp_path / "b", {"data.json": "{}"}))
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("../escape.rego", tarfile.REGTYPE), ("link.rego", tarfile.SYMTYPE)],
)
def test_hostile_archive_members_are_refused(name: str, kind: bytes) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        body = b"package x\n"
        info.size = len(body) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
    with pytest.raises(BundleError):
        read_tarball(buf.getvalue())


def test_not_a_tarball(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(BundleError, match="not a readable"):
        load_bundle(path)


def test_roots_overlap_by_whole_segments() -> None:
    assert roots_overlap("warden", "warden/tools")
    assert roots_overlap("", "anything")
    assert not roots_overlap("warden", "warden_extra")
    assert not roots_overlap("a/b", "a/c")


def _bundle(name: str, roots: tuple[str, ...], package: str) -> Bundle:
    return Bundle(
        revision=f"{name}-1",
        roots=roots,
        modules=(Module("p.rego", f"package {package}\nx := 1\n"),),
        data={package.split(".", maxsplit=1)[0]: {"from": name}} if roots != ("",) else {},
        source=f"/b/{name}",
        name=name,
    )


def test_merge_disjoint_bundles() -> None:
    merged = merge_bundles([_bundle("a", ("a",), "a"), _bundle("b", ("b",), "b")])
    assert merged.revision == "a-1+b-1"
    assert [m.path for m in merged.modules] == ["a/p.rego", "b/p.rego"]
    assert merged.data == {"a": {"from": "a"}, "b": {"from": "b"}}


def test_merge_refuses_overlapping_roots() -> None:
    with pytest.raises(BundleError, match="roots overlap"):
        merge_bundles([_bundle("a", ("a",), "a"), _bundle("b", ("a/b",), "a.b")])
    with pytest.raises(BundleError, match="roots overlap"):
        merge_bundles([_bundle("a", ("",), "a"), _bundle("b", ("b",), "b")])
    with pytest.raises(BundleError, match="no policy bundles"):
        merge_bundles([])


def test_load_bundles_merges_paths(tmp_path: Path) -> None:
    a = write_bundle(
        tmp_path / "a",
        {"a/p.rego": "package a\nx := 1\n", ".manifest": '{"revision": "1", "roots": ["a"]}'},
    )
    b = write_bundle(
        tmp_path / "b",
        {"b/p.rego": "package b\nx := 2\n", ".manifest": '{"revision": "2", "roots": ["b"]}'},
    )
    merged = load_bundles([a, b])
    assert merged.revision == "1+2"
    compile_check(merged.modules, merged.data, "data.b.x")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("package warden\nx if {\n  input.a ==\n}\n", r"p\.rego:3:\d+: Invalid boolean operator"),
        ("package warden\n\nx if nosuch.fn(1)\n", r"p\.rego:3:6: unknown function nosuch\.fn"),
        ("package warden\nx contains 1\nx := 2\n", r"p\.rego:\d+:\d+: Invalid rule body for set"),
        # Calls rego-cpp aborts on (free(): invalid pointer), depending on its heap:
        # refused when the bundle loads, not found as a fallback on every decision.
        (
            'package warden\nx if time.weekday(time.now_ns()) == "Sunday"\n',
            r"p\.rego:2:6: time\.weekday crashes this engine",
        ),
        (
            'package warden\nx if time.date( [time.now_ns(), "Europe/Paris"])[0] > 2000\n',
            r"p\.rego:2:6: the time-zone form of time\.date and time\.clock",
        ),
        # Spelled as the parser takes them too: spaces, a line break, a comment between.
        ("package warden\nx := rem(74, 7)\n", r"p\.rego:2:6: rem, the builtin behind %"),
        ("package warden\nx := time .weekday(1)\n", r"p\.rego:2:6: time\.weekday crashes"),
        (
            "package warden\nx := time # c\n.weekday(1)\n",
            r"p\.rego:2:6: time\.weekday crashes",
        ),
        (
            'package warden\nx := time.clock(\n  [1, "UTC"])\n',
            r"p\.rego:2:6: the time-zone form",
        ),
        # As a reference, in place of another function, or by name as a key.
        (
            "package warden\nbucket(a, b) := a - b\n"
            "x := y if { y := bucket(74, 7) with bucket as rem }\n",
            r"p\.rego:3:44: rem, the builtin",
        ),
        ('package warden\nx := time["weekday"](0)\n', r"p\.rego:2:6: time\.weekday crashes"),
        # Numbers compared as text: max([401, 1933]) is 401.
        ("package warden\nx := max([401, 1933])\n", r"p\.rego:2:6: max compares numbers as text"),
        ("package warden\nx := min([100, 20])\n", r"p\.rego:2:6: min compares numbers as text"),
        # A call at the start of a line is a call, not a definition, and so is a
        # unification with its result.
        ("package warden\nx if {\n    max(input.a) > 500\n}\n", r"p\.rego:3:5: max compares"),
        ("package warden\nx := m if {\n    max(input.a) = m\n}\n", r"p\.rego:3:5: max compares"),
        (
            'package warden\nx := semver["compare"]("1.10.0", "1.9.0")\n',
            r"semver\.compare is wrong",
        ),
        ('package warden\nx := regex["match"]("a", "a")\n', r"p\.rego:2:6: regex\[\.\.\.\] names"),
        (
            'package warden\nx := regex.replace(input.q, "(?i)drop", "")\n',
            r"p\.rego:2:29: the pattern .* uses '\(\?i'",
        ),
        (
            'package warden\nx := semver.compare("1.10.0", "1.9.0")\n',
            r"p\.rego:2:6: semver\.compare is wrong",
        ),
        # RE2 forms the engine's ECMAScript regular expressions do not take.
        (
            'package warden\nx if regex.match("(?i)drop\\\\s+table", input.q)\n',
            r"p\.rego:2:18: the pattern .* uses '\(\?i'",
        ),
        ("package warden\nx if regex.match(`^a\\z`, input.q)\n", r"uses '\\\\z'"),
    ],
)
def test_compile_check_reports_file_and_line(source: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        compile_check([Module("pkg/p.rego", source)], {}, "data.warden.x", label="b")


def test_compile_check_accepts_functions_defined_in_the_bundle() -> None:
    lib = Module("lib.rego", "package lib\n\ndouble(x) := x * 2\n")
    main = Module(
        "main.rego",
        "package warden\nimport data.lib\n# nosuch(1) in a comment\n"
        'x := lib.double(2)\ny := "z(1)"\n',
    )
    compile_check([lib, main], {}, "data.warden.x")


def test_a_function_of_another_package_does_not_stand_in_for_the_builtin() -> None:
    util = Module("util.rego", "package util\n\nmax(xs) := xs[0]\n")
    main = Module("main.rego", "package warden\nx := max([401, 1933])\n")
    with pytest.raises(BundleError, match=r"main\.rego:2:6: max compares"):
        compile_check([util, main], {}, "data.warden.x")


def test_names_and_escaped_text_like_the_faults_are_not_refused() -> None:
    # Variables named rem or max, and a backslash written before A, P or (?s as text.
    source = (
        "package warden\nimport rego.v1\nz := rem if { rem := 5 }\n"
        "m := mx if { some max in [1]; mx := max }\n"
        "x if regex.match(`\\\\AppData\\\\`, input.p)\n"
        'y if regex.match("file\\\\(?s\\\\)?$", input.p)\n'
        "v if regex.match(`^C:\\\\Program`, input.p)\n"
    )
    compile_check([Module("p.rego", source)], {}, "data.warden.z")


def test_a_function_the_bundle_defines_may_share_a_faulty_builtins_name() -> None:
    # The replacement the error suggests, under the builtin's own name, and (?:...) groups.
    lib = Module("lib.rego", "package lib\n\nrem(a, b) := a - b * floor(a / b)\n")
    main = Module(
        "main.rego",
        "package warden\nimport data.lib\nx := lib.rem(74, 7)\n"
        'y if regex.match("^(?:dr)op$", input.q)\n# max(1) in a comment\nz := "min(1)"\n',
    )
    compile_check([lib, main], {}, "data.warden.x")


def test_the_day_of_the_week_as_the_docs_compute_it() -> None:
    # The replacement docs/policies.md gives for time.weekday and `%`: 2023-11-14 was a
    # Tuesday, and 2023-11-12 a Sunday.
    source = (
        "package warden\nday(ns) := d - 7 * floor(d / 7) if d := floor(ns / 86400000000000) + 4\n"
        "days := [day(1700000000000000000), day(1699800000000000000)]\n"
    )
    evaluator = Evaluator([("p.rego", source)], {}, "data.warden.days")
    assert orjson.loads(evaluator.evaluate({}))["expressions"] == [[2, 0]]


def test_a_remainder_is_refused_but_a_percent_sign_in_text_is_not() -> None:
    # rego-cpp's `%`: 74 % 7 is 6. Refused wherever it is the operator, and only there.
    with pytest.raises(BundleError, match=r"p\.rego:3:9: the % operator gives wrong"):
        compile_check(
            [Module("p.rego", "package warden\n# 10 % off\nx := 74 % 7\n")], {}, "data.warden.x"
        )
    fine = 'package warden\n# 10 % off\nx := sprintf("%v%%", [10])\ny := `50 % 2`\n'
    compile_check([Module("p.rego", fine)], {}, "data.warden.x")


def test_compile_check_reports_bad_query() -> None:
    with pytest.raises(BundleError, match="query"):
        compile_check([Module("p.rego", "package warden\nx := 1\n")], {}, "data.warden.x +")


def test_yaml_data_must_be_json(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", {"p.rego": POLICY, "data.yaml": "1: one\n"})
    with pytest.raises(BundleError, match=r"data\.yaml: not representable as JSON"):
        load_bundle(root)


def test_yaml_data_may_not_use_aliases(tmp_path: Path) -> None:
    # Ten aliases a line: each line ten times the values, once hashed for a signature
    # or encoded for the engine (six lines here, a million; ten lines exhaust memory).
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    bomb = "\n".join(lines) + "\n"
    root = write_bundle(tmp_path / "b", {"p.rego": POLICY, "data.yaml": bomb})
    with pytest.raises(BundleError, match=r"data\.yaml:2:\d+: invalid YAML: aliases"):
        load_bundle(root)
    with pytest.raises(BundleError, match="aliases"):
        file_digest("data.yaml", bomb.encode())
    anchored = "limits: &limits {refund: 100}\n"  # an anchor alone is fine
    root = write_bundle(tmp_path / "c", {"p.rego": POLICY, "data.yaml": anchored})
    assert load_bundle(root).data == {"limits": {"refund": 100}}
