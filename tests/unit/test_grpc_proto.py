"""The generated gRPC code is what ``make proto`` makes from ``proto/`` today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "warden" / "grpc_api" / "v1"
FILES = ("governance_pb2.py", "governance_pb2.pyi", "governance_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in FILES:
        fresh = (tmp_path / name).read_bytes()
        assert fresh == (GENERATED / name).read_bytes(), f"{name} is stale: run `make proto`"


def test_the_stubs_import_under_warden_grpc_api() -> None:
    from warden.grpc_api.v1 import governance_pb2, governance_pb2_grpc  # noqa: PLC0415

    assert governance_pb2.DESCRIPTOR.name == "warden/v1/governance.proto"
    assert governance_pb2.DESCRIPTOR.package == "warden.v1"
    assert hasattr(governance_pb2_grpc, "GovernanceStub")
