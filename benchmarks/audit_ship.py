"""Audit shipping benchmark: records per second from a local log into the central store.

    python benchmarks/audit_ship.py [--records 50000] [--batch 2000] [--url postgresql://...]
        [--if-available]

Writes a local audit log of ``--records`` decision records (realistic size:
an action with arguments and context, a decision with reasons), then ships
all of it into a fresh central store on PostgreSQL with the shipper Warden
runs (:class:`warden.audit.ship.Shipper`): reading the segments, indexing
each record and ``INSERT ... ON CONFLICT DO NOTHING`` in batches. Reported:

* shipping throughput (records/s), from start to the store holding every
  record and the final checkpoint;
* a reference in the same run: ``COPY`` of the same record bytes into a
  bare table with no index (the floor of what the database can take), and
  the shipper's throughput as a fraction of it;
* inserting every batch a second time (every row a duplicate, as after a
  lost acknowledgement): the store still holds each record once;
* ``warden audit verify --url`` throughput over the shipped store.

Without ``--url`` (the password from ``PGPASSWORD``), a throwaway PostgreSQL
server is started as the tests start one (tests/pg.py). Prints a table and
writes ``benchmarks/results/audit_ship.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from tests import pg  # noqa: E402

from warden.audit.central import verify_central  # noqa: E402
from warden.audit.layout import Layout  # noqa: E402
from warden.audit.log import AuditLog  # noqa: E402
from warden.audit.ship import Batch, Shipper, columns, insert_batch, ship_target  # noqa: E402
from warden.audit.tail import RecordTail  # noqa: E402
from warden.audit.verify import iter_records  # noqa: E402
from warden.config import AuditConfig, AuditShipConfig  # noqa: E402
from warden.model import (  # noqa: E402
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    RequestMeta,
    Stage,
    new_id,
)

RESULTS = ROOT / "benchmarks" / "results" / "audit_ship.json"


async def write_log(directory: Path, count: int) -> int:
    """A local log of ``count`` decision records and a final checkpoint; its size in bytes."""
    log = await AuditLog.open(AuditConfig(dir=str(directory), fsync="never"))
    request = RequestMeta(method="POST", upstream="openai", path="/v1/chat/completions")
    agent = Agent(id="refunds-bot", version="2026-11-20")
    pending: list[Any] = []
    for i in range(count):
        action = Action(
            action_id=new_id("act"),
            agent=agent,
            kind=ActionKind.TOOL_CALL,
            protocol="openai",
            stage=Stage.PROPOSED,
            request=request,
            tool="issue_refund",
            arguments={"order_id": f"A-{i}", "amount": 25 + i % 400, "currency": "USD"},
            context={"ticket": f"T-{i % 977}"},
        )
        decision = Decision(
            decision_id=new_id("dec"),
            effect=Effect.ALLOW if i % 7 else Effect.DENY,
            reasons=("refunds under the agent's daily cap are allowed",),
            mode=Mode.ENFORCE,
            guard="policy",
        )
        pending.append(log.record_decision(action, decision))
        if len(pending) >= 512:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await log.close()  # signs the final checkpoint
    return sum(len(p) for _, p in iter_records(directory))


async def ship(config: AuditShipConfig, directory: Path, size: int) -> float:
    """Seconds to ship the whole log (and its checkpoint) with a fresh shipper."""
    shipper = Shipper(config, directory)
    started = time.perf_counter()
    shipper.start(lambda: size)
    await shipper.close(timeout_s=600)  # returns once everything, checkpoint too, is shipped
    elapsed = time.perf_counter() - started
    status = shipper.status()
    if status.shipped != size or status.error is not None:
        raise SystemExit(f"shipping did not finish: {status}")
    return elapsed


async def ship_duplicates(config: AuditShipConfig, directory: Path, size: int) -> float:
    """Seconds to insert every batch again: each row conflicts and is skipped."""
    target = ship_target(config)
    origin = Layout(directory).read_meta().origin
    tail = RecordTail(directory)
    batches = []
    while tail.position < size:
        first = tail.position
        records = tail.read(size, config.batch)
        batches.append(Batch(first, len(records), columns(records)))
    async with await psycopg.AsyncConnection.connect(
        target.url, password=target.password, autocommit=True
    ) as conn:
        started = time.perf_counter()
        for batch in batches:
            await insert_batch(conn, origin, batch)
        return time.perf_counter() - started


async def copy_reference(url: str, password: str | None, directory: Path) -> float:
    """Seconds to COPY the same record bytes into a bare table: what the database takes."""
    lines = [payload for _, payload in iter_records(directory)]
    async with await psycopg.AsyncConnection.connect(url, password=password) as conn:
        await conn.execute("CREATE TABLE bench_copy (idx int8, line bytea)")
        await conn.commit()
        started = time.perf_counter()
        async with conn.cursor() as cur, cur.copy("COPY bench_copy FROM STDIN") as copy:
            for i, line in enumerate(lines):
                await copy.write_row((i, line))
        await conn.commit()
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE bench_copy")
        await conn.commit()
    return elapsed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server: pg.PgServer | None = None
    if args.url:
        config = AuditShipConfig(url=args.url, batch=args.batch)
    else:
        found = pg.start()
        if isinstance(found, str):
            if args.if_available:  # `make bench` on a machine without PostgreSQL
                print(f"audit shipping benchmark skipped: no PostgreSQL ({found})")
                raise SystemExit(0)
            raise SystemExit(f"no PostgreSQL: {found}")
        server = found
        config = AuditShipConfig(
            url=server.url(server.create_database()),
            password_file=str(server.password_file),
            batch=args.batch,
        )
    target = ship_target(config)
    out: dict[str, Any] = {
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "records": args.records,
        "batch": args.batch,
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "audit"
            started = time.perf_counter()
            out["log_bytes"] = await write_log(directory, args.records)
            out["write_s"] = time.perf_counter() - started
            first = await ship(config, directory, args.records)
            again = await ship_duplicates(config, directory, args.records)
            reference = await copy_reference(target.url, target.password, directory)
            report = await verify_central(target)
            ((_, verified),) = report.logs
            async with await psycopg.AsyncConnection.connect(
                target.url, password=target.password
            ) as conn:
                cur = await conn.execute("SELECT count(*), count(DISTINCT idx) FROM audit_records")
                stored = await cur.fetchone()
    finally:
        if server is not None:
            server.stop()
    out["ship"] = {"seconds": first, "records_per_s": args.records / first}
    out["ship_again_duplicates"] = {"seconds": again, "records_per_s": args.records / again}
    out["copy_reference"] = {"seconds": reference, "records_per_s": args.records / reference}
    out["ship_vs_copy"] = reference / first
    out["stored_rows"] = stored[0] if stored else None
    out["verify"] = {
        "ok": report.ok,
        "records": verified.records,
        "records_per_s": verified.rate,
        "checkpoints": verified.checkpoints,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=2000, help="audit.ship.batch")
    parser.add_argument("--url", help="an existing, empty database (password: PGPASSWORD)")
    parser.add_argument(
        "--if-available",
        action="store_true",
        help="without --url and PostgreSQL's server binaries: say so and exit 0",
    )
    args = parser.parse_args()
    out = asyncio.run(run(args))
    avg = out["log_bytes"] / out["records"]
    print("central audit store: shipping into PostgreSQL (benchmarks/audit_ship.py)")
    print(f"{out['records']} records, {avg:.0f} bytes each on average, batch {out['batch']}")
    print(f"{'':<40}{'records/s':>12}{'seconds':>10}")
    for name, key in (
        ("ship into the central store", "ship"),
        ("insert again (every row a duplicate)", "ship_again_duplicates"),
        ("reference: bare COPY of the bytes", "copy_reference"),
    ):
        row = out[key]
        print(f"{name:<40}{row['records_per_s']:>12,.0f}{row['seconds']:>10.2f}")
    rate = out["ship"]["records_per_s"]
    print(f"shipping runs at {out['ship_vs_copy']:.2f}x the bare COPY reference")
    print(f"shipping: {rate:,.0f} records/s (target: 20,000 records/s)")
    print(f"store holds {out['stored_rows']} rows (each record once)")
    v = out["verify"]
    print(f"central verify: ok={v['ok']}, {v['records']} records, {v['records_per_s']:,.0f}/s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
