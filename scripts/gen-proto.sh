#!/usr/bin/env bash
# Generates Warden's gRPC code from proto/ with grpcio-tools (the dev lock pins it).
#
#   scripts/gen-proto.sh [OUT_DIR]    # default: src/warden/grpc_api/v1
#
# protoc names Python modules after the .proto path (warden/v1/...); the
# generated code lives in the warden.grpc_api.v1 package instead, so the one
# import line that names it is rewritten. The descriptor keeps its canonical
# file name (warden/v1/governance.proto), which reflection clients see.
# tests/unit/test_grpc_proto.py regenerates into a temp dir and compares.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/src/warden/grpc_api/v1}"
python="${PYTHON:-$root/.venv/bin/python}"
case "$python" in /* | "") ;; */*) python="$PWD/$python" ;; esac  # the cd below moves it
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cd "$root/proto"
"$python" -m grpc_tools.protoc -I. \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  warden/v1/governance.proto

mkdir -p "$out"
for f in governance_pb2.py governance_pb2.pyi governance_pb2_grpc.py; do
  sed -e 's/^from warden\.v1 import /from warden.grpc_api.v1 import /' \
    "$tmp/warden/v1/$f" > "$out/$f"
done
