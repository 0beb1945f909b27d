# Two commands: `make run` (the whole pipeline) and `make test` (lint + test suite).
# Both create .venv from the pinned requirements first, once.
# For a team: `make tracking-server` starts a shared MLflow server (PostgreSQL backend, installed
# where missing), `make tracking-server-stop` stops it; options: SERVER_ARGS="--host 0.0.0.0".
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Stages call `python`, `dvc` and (when serving) `uvicorn` from the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test lint format clean-outputs tracking-server tracking-server-stop postgres

run: $(INSTALLED)
	dvc repro

test: $(INSTALLED) lint
	pytest

lint: $(INSTALLED)
	ruff check src tests benchmarks scripts
	ruff format --check src tests benchmarks scripts

format: $(INSTALLED)
	ruff check --fix src tests benchmarks scripts
	ruff format src tests benchmarks scripts

tracking-server: $(INSTALLED)
	python scripts/tracking_server.py start $(SERVER_ARGS)

tracking-server-stop: $(INSTALLED)
	python scripts/tracking_server.py stop $(SERVER_ARGS)

# PostgreSQL alone (tracking-server installs it too): for the tests' throwaway servers.
postgres: $(INSTALLED)
	python scripts/tracking_server.py install

$(INSTALLED): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# Removes pipeline outputs and the local MLflow store (not the venv).
clean-outputs:
	rm -rf data/prepared models tuning evaluation reports mlflow.db mlartifacts
