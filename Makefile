# One entry point for humans and CI alike: `.ci/run` calls `make test`.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp

.PHONY: venv demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The demo: the bundled dashboard backend behind the proxy, with the shipped files.
demo: $(STAMP)
	$(BIN)/rbac-proxy demo

## Everything CI runs: lint, types, the whole test suite.
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

## Benchmarks (about 6 minutes): decision core, throughput/latency vs nginx and an aiohttp
## pass-through, memory. Installs nginx and wrk when missing; appends to docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python bench/bench_decide.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
