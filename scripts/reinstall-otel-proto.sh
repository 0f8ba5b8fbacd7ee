#!/usr/bin/env bash
# xds-protos (Envoy's message types) ships its own, older copy of
# opentelemetry/proto/; whichever of it and opentelemetry-proto pip installs
# last owns those files. Reinstalling opentelemetry-proto from the lock (pinned,
# hash-checked, no dependencies) gives the OTLP exporter the files it was built
# with. Envoy's messages only name OpenTelemetry types the newer files also have.
# Usage: scripts/reinstall-otel-proto.sh PYTHON LOCKFILE
set -euo pipefail
python=${1:?usage: $0 PYTHON LOCKFILE}
lock=${2:?usage: $0 PYTHON LOCKFILE}
req=$(mktemp)
trap 'rm -f "$req"' EXIT
# The pin and its hash lines: from "opentelemetry-proto==" to the first line not ending in "\".
awk '/^opentelemetry-proto==/ {p = 1} p {print; if ($0 !~ /\\$/) exit}' "$lock" > "$req"
if ! grep -q '^opentelemetry-proto==' "$req"; then
  echo "opentelemetry-proto is not pinned in $lock" >&2
  exit 1
fi
"$python" -m pip install --quiet --no-deps --force-reinstall --require-hashes -r "$req"
