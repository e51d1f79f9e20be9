# Two commands for a newcomer: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
PYTEST_ARGS ?=
# Test processes (pytest-xdist; 0: one process). Three on 2 cores: a third of the suite's time
# is spent waiting on servers, daemons and real-time limits (measured on this machine: serial
# 28 min, three processes 7.5 min, docs/benchmarks.md). Tests that share a server or a loaded
# model say so with xdist_group.
TEST_WORKERS ?= 3

.PHONY: install home demo test test-types test-definitions test-pytest test-fast lint ui bench bench-speed bench-floors bench-peers bench-million clean

# The embed extra (CPU torch 2.13.0 from this machine's disk, a bundled model) adds ~1.4 GB.
# uv installs (pip where uv cannot be had) under this machine's pip configuration.
$(BIN)/batch-defs: pyproject.toml scripts/install.py
	$(PYTHON) scripts/install.py $(VENV) '.[dev,embed,celery]'
	touch $@

install: $(BIN)/batch-defs

# DAGSTER_HOME must exist (with the project's dagster.yaml) before dagster commands run.
home: install
	$(BIN)/python -m batch_defs.instance >/dev/null

# Ends by saying where the letters and the report (html with charts, csv and json rows) are.
demo: install
	$(BIN)/batch-defs run demo
	@latest=$$(ls -td "$(DAGSTER_HOME)"/batch_output/demo/*/ | head -1); \
	echo; echo "outputs: $${latest}letters/ (one letter per customer)"; \
	echo "report:  $${latest}report.html (also report.csv, report.json)"; \
	echo "more:    batch-defs report RUN_ID, batch-defs results RUN_ID (make ui for the UI)"

# mypy (about a minute of one core from a cold cache) and the definitions check (`dg check
# defs`, which replaces `dagster definitions validate` and checks component YAML too) run beside
# pytest, niced: they take the CPU that pytest's waiting tests leave idle (a third of it), not
# the CPU of the daemon and browser tests that start first. make fails if any of them does.
test: home
	bash scripts/ensure-postgres.sh
	bash scripts/ensure-chromium.sh
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory -j3 test-types test-definitions test-pytest

test-types: install
	nice -n 19 $(BIN)/mypy batch_defs assets resources sensors

test-definitions: home
	nice -n 19 $(BIN)/dg check defs

test-pytest: home
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "unit" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy batch_defs assets resources sensors

# The Dagster UI and daemon, and beside them the REST API (docs/api.md) on API_PORT; the API
# stops with the UI.
API_PORT ?= 8088
ui: home
	$(BIN)/batch-defs serve --port $(API_PORT) & api=$$!; \
	trap 'kill $$api 2>/dev/null' EXIT INT TERM; \
	$(BIN)/dagster dev -w workspace.yaml

bench: install
	$(BIN)/python bench/throughput.py

# Issue 16's figures (docs/benchmarks.md), each beside plain threads from the same run.
bench-speed: install
	$(BIN)/python bench/speed.py

# What Dagster and the two cores allow before the product adds anything (the goals' floors).
bench-floors: install
	$(BIN)/python bench/floors.py

# Prefect 3 comes with the peers extra, which the default install leaves out.
bench-peers: install
	$(PYTHON) scripts/install.py $(VENV) '.[peers]'
	$(BIN)/python bench/peers.py

bench-million: install
	$(BIN)/python bench/million.py

clean:
	rm -rf $(VENV) .dagster_home .tmp_dagster_home_* .pytest_cache .ruff_cache .mypy_cache
