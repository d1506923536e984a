# Two commands: `make run` (set up and start the daemon on its embedded defaults)
# and `make test` (set up and run the whole test suite). Both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test lint venv venv-test prometheus clients bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m pipeline.compiled
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

run: venv
	$(VENV)/bin/telepipe run $(ARGS)

# Debian's prometheus is needed by the integration tests; installed when root and missing.
prometheus:
	@if ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "prometheus not found and not root: its integration tests will be skipped"; fi; \
	fi

# The OTLP/HTTP client tests (tests/test_http_clients.py) run Node's OTel exporters and a headless Chromium:
# Debian's nodejs, npm and chromium are installed when root and missing; the npm packages pinned in
# tests/clients/node/package-lock.json are installed (npm ci) when missing or when the lock file changed.
NODE_CLIENTS := tests/clients/node
$(NODE_CLIENTS)/node_modules/.installed: $(NODE_CLIENTS)/package-lock.json $(NODE_CLIENTS)/package.json
	npm ci --prefix $(NODE_CLIENTS) --no-audit --no-fund --loglevel=error
	touch $@

clients:
	@missing=""; \
	for tool in node:nodejs npm:npm chromium:chromium; do \
	  command -v "$${tool%%:*}" >/dev/null 2>&1 || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not found and not root:$$missing; the OTLP/HTTP client tests that need them will be skipped"; fi; \
	fi
	@if command -v npm >/dev/null 2>&1; then $(MAKE) -s --no-print-directory $(NODE_CLIENTS)/node_modules/.installed; fi

# ruff (pyflakes, pycodestyle, import order, naive datetimes) and mypy on the daemon's packages.
lint: venv-test
	$(VENV)/bin/ruff check pipeline sources sinks telepipe
	$(VENV)/bin/mypy

test: venv-test prometheus clients lint
	$(PY) -m pytest -q $(ARGS)

# Benchmarks print tables (and bench/out/anomaly_eval.png); see docs/performance.md for each one's figures.
bench: venv-test
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench.replay_bench
	$(PY) -m bench.anomaly_eval --hours 2

clean:
	rm -rf $(VENV) .telepipe .pytest_cache
