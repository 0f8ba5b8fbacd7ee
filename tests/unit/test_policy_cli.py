"""``warden policy test|eval|check|sign`` (warden.cli_policy)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from warden import cli_policy
from warden.config import SigningConfig
from warden.policy.bundle import BundleError, load_bundle

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "customer-support"

POLICY = """package warden

import rego.v1

decision := {"effect": "allow", "reason": "small"} if input.amount <= 100

decision := {"effect": "deny", "reason": "large"} if input.amount > 100
"""

TESTS = """package warden.tests

import rego.v1

test_small if {
	d := data.warden.decision with input.amount as 5
	d.effect == "allow"
}

test_wrong if {
	d := data.warden.decision with input.amount as 500
	d.effect == "allow"
}

todo_test_later if false
"""

CASES = """cases:
  - name: small amounts are allowed
    input: {amount: 5}
    expect: {effect: allow}
"""


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    root.mkdir()
    (root / "policy.rego").write_text(POLICY)
    (root / "policy_test.rego").write_text(TESTS)
    (root / "amount_cases.yaml").write_text(CASES)
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_policy.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- test -------------------------------------------------------------------------------------


def test_test_prints_failures_and_counts(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, out, _ = _run(capsys, "test", str(bundle))
    assert code == 1
    assert "data.warden.tests.test_wrong: FAIL" in out
    assert "test_small" not in out  # passing tests only with -v, as opa test
    assert out.rstrip().endswith("PASS: 2/4\nFAIL: 1/4\nSKIPPED: 1/4")


def test_test_verbose_lists_every_test_and_case(
    capsys: pytest.CaptureFixture[str], bundle: Path
) -> None:
    code, out, _ = _run(capsys, "test", "-v", str(bundle))
    assert code == 1
    assert "data.warden.tests.test_small: PASS (" in out
    assert "data.warden.tests.todo_test_later: SKIPPED" in out
    assert "case 'small amounts are allowed' (line 2): PASS" in out


def test_test_run_filter_and_exit_zero(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, out, _ = _run(capsys, "test", str(bundle), "--run", "small")
    assert code == 0
    assert out.strip() == "PASS: 2/2"


def test_test_json_format(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, out, _ = _run(capsys, "test", str(bundle), "--format", "json", "--no-cases")
    assert code == 1
    docs = json.loads(out)
    assert [(d["name"], d["status"]) for d in docs] == [
        ("data.warden.tests.test_small", "PASS"),
        ("data.warden.tests.test_wrong", "FAIL"),
        ("data.warden.tests.todo_test_later", "SKIPPED"),
    ]
    assert docs[1]["fail"] is True
    assert docs[0]["location"] == {
        "file": f"{bundle.as_posix()}/policy_test.rego",
        "row": 5,
        "col": 1,
    }


def test_test_extra_case_file(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(CASES.replace("effect: allow", "effect: deny"))
    code, out, _ = _run(capsys, "test", str(bundle), "--cases", str(extra), "--run", "amounts")
    assert code == 1
    assert f"{extra.as_posix()}:" in out
    assert 'expected effect "deny", got "allow"' in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "("], "--run: not a regular expression"),
        (["--cases", "/nonexistent/cases.yaml"], "cannot read"),
    ],
)
def test_test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], bundle: Path, argv: list[str], message: str
) -> None:
    code, _, err = _run(capsys, "test", str(bundle), *argv)
    assert code == 2
    assert message in err


def test_test_missing_bundle_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "test", str(tmp_path / "nope"))
    assert code == 2
    assert "no such bundle" in err


def test_test_without_tests_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "policy.rego").write_text(POLICY)
    code, _, err = _run(capsys, "test", str(tmp_path))
    assert code == 1
    assert "no tests" in err


# --- eval -------------------------------------------------------------------------------------


def test_eval_prints_the_decision_and_timing(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path
) -> None:
    doc = tmp_path / "input.json"
    doc.write_text(json.dumps({"amount": 500}))
    code, out, _ = _run(
        capsys, "eval", "--input", str(doc), "--bundle", str(bundle), "--repeat", "3"
    )
    assert code == 0
    printed = json.loads(out)
    assert printed["result"] == {"effect": "deny", "reason": "large"}
    assert printed["query"] == "data.warden.decision"
    assert printed["timing"]["runs"] == 3
    assert printed["timing"]["p50_us"] > 0


def test_eval_reads_yaml_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bundle: Path
) -> None:
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("amount: 1\n"))
    code, out, _ = _run(capsys, "eval", "--input", "-", "--bundle", str(bundle), "--repeat", "0")
    assert code == 0
    assert json.loads(out)["result"]["effect"] == "allow"


def test_eval_of_the_shipped_bundle_by_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(SHIPPED.parents[1])  # the default bundle path is relative
    doc = tmp_path / "refund.yaml"
    doc.write_text(
        "action: {kind: tool_call, tool: issue_refund, arguments: {order_id: A-1, amount: 250}}\n"
        "budget: {}\n"
    )
    code, out, _ = _run(capsys, "eval", "--input", str(doc), "--repeat", "1")
    assert code == 0
    printed = json.loads(out)
    assert printed["result"]["effect"] == "require_approval"
    assert printed["revision"].startswith("customer-support-")


def test_eval_rejects_an_input_that_is_not_an_object(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path
) -> None:
    doc = tmp_path / "input.json"
    doc.write_text("[1, 2]")
    code, _, err = _run(capsys, "eval", "--input", str(doc), "--bundle", str(bundle))
    assert code == 2
    assert "must be an object" in err


# --- check ------------------------------------------------------------------------------------


def test_check_flags_v0_syntax_with_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "old.rego").write_text(
        'package warden\n\nallow {\n\tinput.a == 1\n}\n\ndeny[msg] {\n\tmsg := "no"\n}\n'
    )
    code, out, _ = _run(capsys, "check", str(tmp_path))
    assert code == 1
    path = (tmp_path / "old.rego").as_posix()
    assert f"{path}:3:7: error: rule body without `if` (v0 syntax)" in out
    assert f"{path}:7:1: error: partial set rule without `contains` (v0 syntax)" in out
    assert "hint: add `import rego.v1`" in out
    assert out.rstrip().endswith("2 error(s), 0 warning(s)")


def test_check_reports_parse_errors_as_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "bad.rego").write_text(
        "package warden\n\nimport rego.v1\n\np if {\n\tinput.a ==\n}\n"
    )
    code, out, _ = _run(capsys, "check", str(tmp_path), "--format", "json")
    assert code == 1
    (finding,) = json.loads(out)
    assert (finding["row"], finding["col"], finding["severity"]) == (6, 10, "error")
    assert finding["file"].endswith("bad.rego")


def test_check_warnings_pass_unless_strict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "p.rego").write_text(
        'package warden\n\nimport future.keywords.if\n\ndecision := {"effect": "allow"} if true\n'
    )
    assert _run(capsys, "check", str(tmp_path))[0] == 0
    assert _run(capsys, "check", str(tmp_path), "--strict")[0] == 1


def test_check_of_the_shipped_bundle_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "check", str(SHIPPED))
    assert code == 0
    assert out.strip().endswith("no problems found")


# --- sign -------------------------------------------------------------------------------------


def _write_key(path: Path, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize(
    ("make_key", "alg"),
    [
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_sign_writes_a_signature_the_loader_accepts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make_key: object, alg: str
) -> None:
    bundle = tmp_path / "cs"
    shutil.copytree(SHIPPED, bundle)
    public = _write_key(tmp_path / "key.pem", make_key())  # type: ignore[operator]
    code, out, _ = _run(
        capsys, "sign", str(bundle), "--key", str(tmp_path / "key.pem"), "--key-id", "ops"
    )
    assert code == 0
    assert f"with key 'ops' ({alg})" in out
    signing = SigningConfig(required=True, keys={"ops": public})
    assert load_bundle(bundle, signing=signing).signed_by == "ops"
    # A changed limit no longer matches the signature.
    data = bundle / "data.json"
    data.write_text(data.read_text().replace('"auto": 100', '"auto": 100000'))
    with pytest.raises(BundleError, match="digest does not match"):
        load_bundle(bundle, signing=signing)


def test_sign_with_an_unreadable_key_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "key.pem").write_text("not a key")
    code, _, err = _run(capsys, "sign", str(tmp_path), "--key", str(tmp_path / "key.pem"))
    assert code == 2
    assert "not an unencrypted PEM private key" in err


def test_register_adds_the_policy_group() -> None:
    parser = argparse.ArgumentParser(prog="warden")
    cli_policy.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["policy", "check", "some/dir", "--strict"])
    assert args.paths == ["some/dir"]
    assert args.strict is True
    assert args.func is not None
