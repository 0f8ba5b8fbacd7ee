# Two commands a new user needs: `make demo` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench serve clean venv test-tools

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/find-python.sh
	@if [ ! -x "$(PY)" ]; then \
	  interp=$$(scripts/find-python.sh) || exit 1; \
	  echo "creating $(VENV) with $$interp"; \
	  "$$interp" -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

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

unit: $(STAMP) test-tools
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	@for b in benchmarks/policy.py benchmarks/audit.py; do \
	  if [ -f $$b ]; then $(PY) $$b || exit 1; fi; done

serve: $(STAMP)
	$(VENV)/bin/warden serve $(if $(wildcard warden.yaml),--config warden.yaml,)

clean:
	rm -rf $(VENV) warden-data .pytest_cache .mypy_cache .ruff_cache
