# Three commands: `make run` (the whole pipeline), `make test` (lint + test suite) and
# `make demo` (draw a digit for the registered champion, in the browser).
# All create .venv from the pinned requirements first, once.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Stages call `python`, `dvc` and (when serving) `uvicorn` from the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test demo lint format clean-outputs

run: $(INSTALLED)
	dvc repro

test: $(INSTALLED) lint
	pytest

# Options after DEMO_ARGS=, e.g. DEMO_ARGS="--port 8080" (python -m mnist_mlops.demo --help).
demo: $(INSTALLED)
	python -m mnist_mlops.demo $(DEMO_ARGS)

lint: $(INSTALLED)
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

format: $(INSTALLED)
	ruff check --fix src tests benchmarks
	ruff format src tests benchmarks

$(INSTALLED): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# Removes pipeline outputs and the local MLflow store (not the venv).
clean-outputs:
	rm -rf data/prepared models tuning evaluation reports mlflow.db mlartifacts
