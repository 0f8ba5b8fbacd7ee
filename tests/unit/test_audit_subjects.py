"""Subject keys: only from configured sources, at most ``max_keys``, never plaintext past it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from warden.audit import AuditLog, arguments_sha256
from warden.audit.subjects import UNUSABLE, SubjectKeys, subject_value
from warden.audit.verify import iter_records
from warden.config import AuditConfig, SubjectsConfig
from warden.model import Agent, Obligations, Outcome
from warden.testing.audit import sample_action, sample_decision


def config(root: Path, **subjects: Any) -> AuditConfig:
    return AuditConfig(dir=str(root), subjects=SubjectsConfig(**subjects))


def key_files(root: Path) -> list[Path]:
    return sorted((root / "subjects").rglob("*.key"))


def stored(root: Path) -> tuple[list[dict[str, Any]], bytes]:
    raw = [payload for _, payload in iter_records(root)]
    return [orjson.loads(p) for p in raw], b"".join(raw)


def refused(reason: str) -> float:
    value = REGISTRY.get_sample_value("warden_audit_subject_keys_refused_total", {"reason": reason})
    return value or 0.0


def test_subject_value_reads_the_configured_sources_in_order() -> None:
    action = dataclasses.replace(
        sample_action(customer="C-ctx", arguments={"customer": {"id": 42}, "list": ["x"]}),
        agent=Agent("bot", claims={"sub": "user-7"}),
    )
    assert subject_value(action, ("context.customer_id",)) == "C-ctx"
    assert subject_value(action, ("action.arguments.customer.id",)) == "42"
    assert subject_value(action, ("agent.claims.sub",)) == "user-7"
    assert subject_value(action, ("action.arguments.missing", "agent.claims.sub")) == "user-7"
    assert subject_value(action, ("action.arguments.list.0",)) == "x"
    assert subject_value(action, ("action.arguments.customer",)) is UNUSABLE
    assert subject_value(action, ()) is None


@pytest.mark.parametrize(
    "bad", ["customer_id", "headers.x", "context.", "action.arguments..id", "agent.id"]
)
def test_sources_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="must be context"):
        SubjectsConfig(sources=(bad,))


async def test_an_unconfigured_source_creates_no_key(tmp_path: Path) -> None:
    log = await AuditLog.open(config(tmp_path, sources=("action.arguments.customer_id",)))
    # An agent-chosen context header is not a configured source: no key, no file.
    for i in range(20):
        await log.record_decision(sample_action(i, customer=f"invented-{i}"), sample_decision())
    assert key_files(tmp_path) == []
    await log.record_decision(
        sample_action(arguments={"customer_id": "C-1", "amount": 5}), sample_decision()
    )
    await log.close()
    assert len(key_files(tmp_path)) == 1
    records, _ = stored(tmp_path)
    assert all(r["subject"] is None for r in records[:20])
    assert records[20]["subject"] is not None
    assert records[20]["sealed"] is not None
    assert records[20]["action"]["arguments"] is None  # sealed, not in clear


async def test_past_the_bound_personal_fields_are_redacted_not_keyed(tmp_path: Path) -> None:
    before = refused("full")
    log = await AuditLog.open(config(tmp_path, max_keys=2))
    for name in ("cus_a", "cus_b", "cus_c", "cus_a"):
        action = sample_action(customer=name, arguments={"email": f"{name}@example.com"})
        decision = sample_decision()
        await log.record_decision(action, decision)
        await log.record_outcome(action, decision.decision_id, Outcome(result=f"{name} done"))
    await log.close()
    assert len(key_files(tmp_path)) == 2
    assert refused("full") - before == 2  # the decision and the outcome of cus_c
    assert REGISTRY.get_sample_value("warden_audit_subject_keys") == 2
    records, raw = stored(tmp_path)
    third, third_outcome = records[4], records[5]
    assert third["subject"] == log.subject_ref("cus_c")
    assert third["sealed"] is None
    assert third["action"]["arguments"] == "[redacted]"
    assert third["action"]["context"] == "[redacted]"
    assert third["action"]["arguments_sha256"] is not None
    assert third_outcome["outcome"]["result"] == "[redacted]"
    assert b"cus_c" not in raw
    # A subject that already has a key is still sealed.
    assert records[6]["sealed"] is not None
    assert b"cus_a" not in raw


async def test_the_bound_counts_keys_from_earlier_runs(tmp_path: Path) -> None:
    first = await AuditLog.open(config(tmp_path, max_keys=1))
    await first.record_decision(sample_action(customer="cus_a"), sample_decision())
    await first.close()
    second = await AuditLog.open(config(tmp_path, max_keys=1))
    await second.record_decision(sample_action(customer="cus_b"), sample_decision())
    await second.close()
    assert len(key_files(tmp_path)) == 1
    records, raw = stored(tmp_path)
    assert records[1]["sealed"] is None
    assert b"cus_b" not in raw
    # Erasing a subject frees its place.
    keys = SubjectKeys.open(tmp_path, max_keys=1)
    assert keys.count == 1
    assert keys.erase(keys.ref("cus_a"))
    assert keys.count == 0
    assert keys.load_or_create(keys.ref("cus_b")) is not None


async def test_a_subject_value_that_cannot_be_keyed_is_redacted(tmp_path: Path) -> None:
    before = refused("unusable")
    log = await AuditLog.open(config(tmp_path, sources=("action.arguments.customer",)))
    action = sample_action(arguments={"customer": {"name": "Ann Lee"}, "amount": 5})
    await log.record_decision(action, sample_decision())
    await log.close()
    (record,), raw = stored(tmp_path)
    assert record["action"]["arguments"] == "[redacted]"
    assert record["sealed"] is None
    assert b"Ann Lee" not in raw
    assert key_files(tmp_path) == []
    assert refused("unusable") - before == 1


async def test_claims_that_name_the_subject_are_sealed_and_go_with_erasure(tmp_path: Path) -> None:
    """With ``agent.claims.sub`` a subject source, the token's claims are personal too."""
    log = await AuditLog.open(config(tmp_path, sources=("agent.claims.sub",)))
    claims = {"sub": "alice@example.com", "iss": "https://idp.example"}
    action = dataclasses.replace(sample_action(), agent=Agent("bot", "1", claims=claims))
    await log.record_decision(action, sample_decision())
    records, raw = stored(tmp_path)
    assert records[-1]["agent"]["claims"] is None
    assert b"alice@example.com" not in raw
    unsealed = SubjectKeys.open(tmp_path, create=False).unseal(records[-1])
    assert unsealed is not None
    assert unsealed["agent.claims"] == claims
    assert await log.erase_subject("alice@example.com")
    await log.close()
    records, raw = stored(tmp_path)
    assert b"alice@example.com" not in raw
    assert b"idp.example" not in raw  # sealed with the rest, gone with the key


def test_erasure_notes_name_only_the_reference_and_count_no_key(tmp_path: Path) -> None:
    keys = SubjectKeys.open(tmp_path, max_keys=10)
    ref = keys.ref("cus_a")
    keys.load_or_create(ref)
    keys.note_erasure(ref, keys.erase(ref))
    keys.note_erasure(ref, False)  # erased again: the first erasure's key still counts
    assert keys.noted_erasures() == {ref: True}
    assert SubjectKeys.open(tmp_path, max_keys=10).count == 0
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"cus_a" in p.read_bytes()]
    with pytest.raises(ValueError, match="not a subject reference"):
        keys.note_erasure("../keys/subject-salt", True)
    keys.finish_erasure(ref)
    assert keys.noted_erasures() == {}


async def test_the_digests_of_a_subjects_hidden_values_are_sealed_and_go_with_erasure(
    tmp_path: Path,
) -> None:
    # A redacted date of birth beside its digest: the digest is keyed, and sealed with the
    # subject's fields, so erasure leaves nothing to check guesses against.
    log = await AuditLog.open(config(tmp_path))
    arguments = {"customer_id": "cus_a", "dob": "1984-07-19"}
    decision = dataclasses.replace(
        sample_decision(), obligations=Obligations(redact=("action.arguments.dob",))
    )
    action = sample_action(customer="cus_a", arguments=arguments)
    await log.record_decision(action, decision)
    long_result = "x" * 70_000  # cut in the record: its digest is kept
    await log.record_outcome(action, decision.decision_id, Outcome(result=long_result))
    records, raw = stored(tmp_path)
    plain = arguments_sha256(arguments)
    assert plain.encode() not in raw
    assert records[0]["action"]["arguments_sha256"] is None
    assert records[1]["outcome"]["result_sha256"] is None
    keys = SubjectKeys.open(tmp_path, create=False)
    unsealed = keys.unseal(records[0])
    assert unsealed is not None
    assert unsealed["action.arguments_sha256"] == keys.keyed(plain)
    assert (keys.unseal(records[1]) or {})["outcome.result_sha256"].startswith("keyed:")
    assert await log.erase_subject("cus_a")
    await log.close()
    assert SubjectKeys.open(tmp_path, create=False).unseal(stored(tmp_path)[0][0]) is None


async def test_the_pointers_of_a_subjects_masked_values_are_sealed(tmp_path: Path) -> None:
    # A masked value's pointer is made of argument keys, which may be personal data
    # (a map keyed by e-mail address): sealed with the arguments, gone with erasure.
    log = await AuditLog.open(config(tmp_path))
    arguments = {"customer_id": "cus_a", "users": {"ann@example.com": {"password": "x"}}}
    decision = dataclasses.replace(
        sample_decision(), obligations=Obligations(redact=("action.arguments.customer_id",))
    )
    await log.record_decision(sample_action(customer="cus_a", arguments=arguments), decision)
    records, raw = stored(tmp_path)
    assert b"ann@example.com" not in raw
    assert records[0]["action"]["redacted"] == ["customer_id"]
    keys = SubjectKeys.open(tmp_path, create=False)
    unsealed = keys.unseal(records[0])
    assert unsealed is not None
    assert unsealed["action.redacted"] == ["customer_id", "/users/ann@example.com/password"]
    assert await log.erase_subject("cus_a")
    await log.close()
    assert SubjectKeys.open(tmp_path, create=False).unseal(stored(tmp_path)[0][0]) is None


@pytest.mark.parametrize("room", [True, False])
async def test_the_names_of_a_subjects_hidden_arguments_are_never_in_clear(
    tmp_path: Path, room: bool
) -> None:
    # Arguments hidden whole keep their names beside their digest, and a name may be
    # personal (a map keyed by e-mail address): sealed with the subject's fields, or,
    # when the subject can have no key (the store is full), redacted with them.
    log = await AuditLog.open(config(tmp_path, max_keys=1))
    if not room:
        await log.record_decision(sample_action(customer="cus_b"), sample_decision())
    arguments = {"customer_id": "cus_a", "ann@example.com": {"role": "owner"}}
    decision = dataclasses.replace(
        sample_decision(), obligations=Obligations(redact=("action.arguments",))
    )
    await log.record_decision(sample_action(customer="cus_a", arguments=arguments), decision)
    records, raw = stored(tmp_path)
    assert b"ann@example.com" not in raw
    assert records[-1]["action"]["arguments"] == (None if room else "[redacted]")
    assert records[-1]["action"]["argument_keys"] == (None if room else "[redacted]")
    if room:
        keys = SubjectKeys.open(tmp_path, create=False)
        unsealed = keys.unseal(records[0])
        assert unsealed is not None
        assert unsealed["action.argument_keys"] == ["ann@example.com", "customer_id"]
        assert await log.erase_subject("cus_a")
        assert SubjectKeys.open(tmp_path, create=False).unseal(stored(tmp_path)[0][0]) is None
    await log.close()
