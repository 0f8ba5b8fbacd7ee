"""Audit log benchmark: durable appends, CPU per record, verify rate.

    python benchmarks/audit.py [--seconds 3] [--verify-records 200000] [--dir DIR] [--strict]

Measures, on the disk holding ``--dir`` (default: a temporary directory):

* durable appends/s with ``fsync: always`` and group commit, for 1 and 64
  concurrent writers (decision records as the proxy writes them), and for 64
  writers whose actions carry a customer id (personal fields encrypted);
* CPU per record of encoding, hashing and framing (plus the Merkle append),
  and of building the whole record from an action and a decision;
* verify rate (records/s) over a log of ``--verify-records`` records.

Prints a table and writes ``benchmarks/results/audit.json``. Targets: at
least 20k durable records/s with group commit, at most 20 µs CPU per record,
at least 100k verified records/s; ``--strict`` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import HasFileno

from warden.audit import AuditLog
from warden.audit.merkle import CompactRange, leaf_hash
from warden.audit.record import action_body, decision_body, encode
from warden.audit.segments import frame
from warden.audit.verify import verify_log
from warden.config import AuditConfig
from warden.testing.audit import sample_action, sample_decision

RESULTS = Path(__file__).parent / "results" / "audit.json"
TARGET_DURABLE = 20_000
TARGET_CPU_US = 20.0
TARGET_VERIFY = 100_000


async def durable_rate(root: Path, writers: int, seconds: float, customer: bool) -> dict[str, Any]:
    """Appends/s with fsync per batch; every append awaited until durable."""
    log = await AuditLog.open(
        AuditConfig(dir=str(root), fsync="always", checkpoint_interval_s=3600)
    )
    actions = [sample_action(i, customer=f"cus_{i % 50}" if customer else None) for i in range(64)]
    decision = sample_decision()
    done = 0
    deadline = time.perf_counter() + seconds
    syncs_before = _fdatasyncs()

    async def writer(n: int) -> None:
        nonlocal done
        action = actions[n % len(actions)]
        while time.perf_counter() < deadline:
            await log.record_decision(action, decision)
            done += 1

    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    batches = _fdatasyncs() - syncs_before
    await log.close()
    return {
        "writers": writers,
        "customer_id": customer,
        "records": done,
        "seconds": round(elapsed, 3),
        "records_per_s": round(done / elapsed),
        "process_cpu_us_per_record": round(cpu / done * 1e6, 2),
        "records_per_fsync": round(done / batches, 1) if batches else None,
    }


_SYNCS = 0


def _fdatasyncs() -> int:
    return _SYNCS


def _count_fdatasync() -> None:
    """Count fdatasync calls (the benchmark's own process only) to report batch sizes."""
    real = os.fdatasync

    def counting(fd: int | HasFileno) -> None:
        global _SYNCS  # noqa: PLW0603 - a benchmark-local counter
        _SYNCS += 1
        real(fd)

    os.fdatasync = counting


def cpu_per_record(count: int) -> dict[str, float]:
    """CPU µs per record: encode + hash + frame + tree, and the whole record build."""
    action = sample_action(1)
    decision = sample_decision()
    body = {
        "v": 1,
        "id": "rec_0123456789abcdef_0000000001",
        "seq": 1,
        "time": "2026-11-26T10:00:00.000000Z",
        "prev": "0" * 64,
        "kind": "decision",
        "subject": None,
        "sealed": None,
        "agent": {"id": action.agent.id, "version": action.agent.version},
        "action": action_body(action),
        "decision": decision_body(decision),
        "approval": None,
    }
    tree = CompactRange()
    started = time.process_time()
    for _ in range(count):
        payload = encode(body)
        digest = leaf_hash(payload)
        tree.append(digest)
        framed = frame(payload)
        _ = digest.hex()
    core = (time.process_time() - started) / count * 1e6

    started = time.process_time()
    for _ in range(count):
        full = {
            **body,
            "agent": {"id": action.agent.id, "version": action.agent.version},
            "action": action_body(action),
            "decision": decision_body(decision),
        }
        payload = encode(full)
        digest = leaf_hash(payload)
        tree.append(digest)
        framed = frame(payload)
    whole = (time.process_time() - started) / count * 1e6
    return {
        "encode_hash_frame_us": round(core, 2),
        "build_encode_hash_frame_us": round(whole, 2),
        "record_bytes": len(framed),
    }


async def _fill(root: Path, count: int) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(root), fsync="never", checkpoint_interval_s=3600))
    action, decision = sample_action(7), sample_decision()
    step = 2000
    for start in range(0, count, step):
        await asyncio.gather(
            *(log.record_decision(action, decision) for _ in range(min(step, count - start)))
        )
    await log.close()


def verify_rate(root: Path, count: int) -> dict[str, Any]:
    """Records/s of a full verify over a log of ``count`` records."""
    asyncio.run(_fill(root, count))
    verify_log(root)  # warm the page cache: measure verification, not the disk
    report = verify_log(root)
    assert report.ok, report.damage
    return {
        "records": report.records,
        "segments": report.segments,
        "seconds": round(report.seconds, 3),
        "records_per_s": round(report.rate),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per durable-append run")
    parser.add_argument("--verify-records", type=int, default=200_000)
    parser.add_argument("--cpu-records", type=int, default=50_000)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    _count_fdatasync()
    base = Path(args.dir) if args.dir else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        root = Path(tmp)
        durable = [
            asyncio.run(durable_rate(root / f"d{w}{c}", w, args.seconds, c))
            for w, c in ((1, False), (64, False), (64, True))
        ]
        cpu = cpu_per_record(args.cpu_records)
        verify = verify_rate(root / "verify", args.verify_records)
    best = max(r["records_per_s"] for r in durable if r["writers"] == 64)
    checks = {
        "durable_records_per_s >= 20k (64 writers)": best >= TARGET_DURABLE,
        "cpu_us_per_record <= 20 (encode+hash+frame)": cpu["encode_hash_frame_us"] <= TARGET_CPU_US,
        "verify_records_per_s >= 100k": verify["records_per_s"] >= TARGET_VERIFY,
    }
    result = {
        "benchmark": "audit",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "durable": durable,
        "cpu_per_record": cpu,
        "verify": verify,
        "targets": checks,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{'durable appends (fsync always, group commit)':<48} {'records/s':>10} "
        f"{'per fsync':>10} {'cpu µs/rec':>11}"
    )
    for row in durable:
        label = f"  {row['writers']:>2} writer(s)" + (
            ", customer id (sealed)" if row["customer_id"] else ""
        )
        print(
            f"{label:<48} {row['records_per_s']:>10,} {row['records_per_fsync'] or '-':>10} "
            f"{row['process_cpu_us_per_record']:>11}"
        )
    print(
        f"{'CPU per record: encode + hash + frame + tree':<48} {cpu['encode_hash_frame_us']:>10} µs"
    )
    print(
        f"{'CPU per record: build from action + decision too':<48} "
        f"{cpu['build_encode_hash_frame_us']:>10} µs"
    )
    print(
        f"{'verify (' + format(verify['records'], ',') + ' records)':<48} "
        f"{verify['records_per_s']:>10,} records/s"
    )
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    print(f"wrote {RESULTS}")
    return 1 if args.strict and not all(checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
