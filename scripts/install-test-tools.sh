#!/usr/bin/env bash
# Installs the real tools the test suite (or the benchmarks) run, when they are
# missing and this runs as root with apt (as in CI). Otherwise it says which
# tests will skip. Usage: scripts/install-test-tools.sh test|bench
set -uo pipefail

# need CHECK PACKAGE WHAT: CHECK is a shell test that succeeds when the tool is there.
need() {
  local check=$1 package=$2 what=$3
  if eval "$check" >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$package not found: $what will be skipped (apt-get install $package)"
    return 0
  fi
  echo "installing $package for $what"
  local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package")
  if ! "${install[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    "${install[@]}" >/dev/null 2>&1 || echo "could not install $package: $what will be skipped"
  fi
}

case ${1:-test} in
  test)
    need "command -v strace" strace "the audit fsync-error test"
    # Playwright drives Debian's chromium (executable_path); it never downloads a browser.
    need "command -v chromium" chromium "the console's browser tests"
    # tests/pg.py starts its own server from these binaries, as the postgres user when root.
    need "ls /usr/lib/postgresql/*/bin/initdb || command -v initdb" postgresql "the PostgreSQL tests"
    # tests/prometheus.py starts its own Prometheus; the package's service is not used.
    need "command -v promtool && command -v prometheus" prometheus "the alert rule tests"
    need "command -v iptables" iptables "the transparent-mode redirection test"
    ;;
  bench)
    need "command -v wrk" wrk "wrk load (the Python load generator is used instead)"
    need "ls /usr/lib/postgresql/*/bin/initdb || command -v initdb" postgresql "the fleet state and audit shipping benchmarks"
    ;;
  *)
    echo "usage: $0 test|bench" >&2
    exit 2
    ;;
esac
