#!/usr/bin/env bash
# Regenerates requirements.lock (runtime) and requirements-dev.lock (dev) from
# pyproject.toml with uv, for Python 3.12+ on every platform, with hashes.
# Existing pins are kept unless the extra arguments say otherwise, e.g.
#   scripts/lock.sh .venv/bin/uv --upgrade
#   scripts/lock.sh .venv/bin/uv --upgrade-package aiohttp
# The dev lock is constrained by the runtime lock, so both install the same
# runtime versions. See docs/adr/0007-dependency-locking.md.
set -euo pipefail
uv=${1:?usage: scripts/lock.sh PATH-TO-UV [uv pip compile options]}
shift
cd "$(dirname "$0")/.."
common=(--universal --python-version 3.12 --generate-hashes --quiet
        --custom-compile-command "make lock")
"$uv" pip compile "${common[@]}" "$@" pyproject.toml -o requirements.lock
"$uv" pip compile "${common[@]}" "$@" pyproject.toml --extra dev \
    --constraint requirements.lock -o requirements-dev.lock
