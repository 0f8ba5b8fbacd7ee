# Two commands a new user needs: `make demo` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Coverage floor for `make unit`: a couple of points under what the suite measures.
COV_FLOOR := 89

.PHONY: demo test lint typecheck unit bench bench-tools serve clean venv test-tools lock

venv: $(STAMP)

# Installs the pinned, hash-checked dev lock, then Warden itself without
# resolving anything (docs/adr/0007-dependency-locking.md).
$(STAMP): pyproject.toml requirements-dev.lock scripts/find-python.sh
	@if [ ! -x "$(PY)" ]; then \
	  interp=$$(scripts/find-python.sh) || exit 1; \
	  echo "creating $(VENV) with $$interp"; \
	  "$$interp" -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Regenerates both lock files from pyproject.toml, keeping existing pins.
# Newest allowed versions: make lock LOCK_ARGS=--upgrade
lock: $(STAMP)
	scripts/lock.sh $(VENV)/bin/uv $(LOCK_ARGS)

demo: $(STAMP)
	$(PY) -m warden.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The audit fault tests inject fsync errors with strace. Installed here when
# possible (root with apt, as in CI); otherwise those tests skip and say why.
test-tools:
	@if ! command -v strace >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing strace for the audit fault tests"; \
	    (apt-get install -y -qq strace >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq strace >/dev/null 2>&1)) || \
	    echo "could not install strace: the fsync-error test will be skipped"; \
	  else \
	    echo "strace not found: the fsync-error test will be skipped (apt-get install strace)"; \
	  fi; \
	fi

# Coverage counts code run in the pytest process, where functional tests start
# Warden; subprocesses (policy workers, `warden` started as a command) are not
# measured, so they run exactly as in production.
unit: $(STAMP) test-tools
	$(VENV)/bin/pytest -q --cov=warden --cov-report=term-missing:skip-covered \
	  --cov-fail-under=$(COV_FLOOR)

test: lint typecheck unit

# Load comes from wrk, installed here when possible (root with apt); without
# it the overhead benchmark falls back to its Python load generator. The issue
# table (benchmarks/overhead.py) prints last. About four minutes in all.
bench-tools:
	@if ! command -v wrk >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing wrk for the overhead benchmark"; \
	    (apt-get install -y -qq wrk >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1)) || \
	    echo "could not install wrk: the Python load generator is used"; \
	  else \
	    echo "wrk not found: the Python load generator is used (apt-get install wrk)"; \
	  fi; \
	fi

bench: $(STAMP) bench-tools
	$(PY) benchmarks/policy.py --quick
	$(PY) benchmarks/audit.py --seconds 1 --verify-records 100000
	$(PY) benchmarks/overhead.py

serve: $(STAMP)
	$(VENV)/bin/warden serve $(if $(wildcard warden.yaml),--config warden.yaml,)

clean:
	rm -rf $(VENV) warden-data .pytest_cache .mypy_cache .ruff_cache .coverage
